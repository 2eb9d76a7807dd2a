"""Textual-inversion goldens: diffusers' `load_textual_inversion` + `encode_prompt` on the tiny fixtures.

Writes random embeddings in the formats civitai ships (A1111 `.pt` with `string_to_param`, A1111
`.safetensors` with `emb_params`, diffusers' `learned_embeds.bin`, SDXL `clip_l`/`clip_g` safetensors) to
fixtures/embeddings/, and the prompt embeddings diffusers computes with them to
fixtures/goldens/embeddings/. For SDXL, diffusers pools the second encoder at argmax(input_ids), which lands
on the added token ids; A1111 pools at end-of-text: both are recorded (`pooled_diffusers`, `pooled_a1111`,
the latter computed from the same encoder with transformers).

Run after make_fixtures.py: /root/venv-sd/bin/python tools/ti_goldens.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixture_common import FIXTURES_DIR, GOLDENS_DIR, save_tensors  # noqa: E402

from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline  # noqa: E402

EMB = FIXTURES_DIR / "embeddings"
OUT = GOLDENS_DIR / "embeddings"


def sd15() -> None:
    g = torch.Generator().manual_seed(7)
    width = 32
    mystyle = torch.randn(2, width, generator=g)
    badhand = torch.randn(1, width, generator=g)
    cattoy = torch.randn(width, generator=g)
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": torch.nn.Parameter(mystyle)},
            "name": "mystyle",
            "step": 1500,
            "sd_checkpoint": "0123456789",
            "sd_checkpoint_name": "tiny",
        },
        EMB / "mystyle.pt",
    )
    save_file({"emb_params": badhand}, EMB / "badhand.safetensors")
    torch.save({"<cat-toy>": cattoy}, EMB / "cattoy.bin")

    pipe = StableDiffusionPipeline.from_pretrained(FIXTURES_DIR / "sd15", safety_checker=None, requires_safety_checker=False)
    pipe.load_textual_inversion(str(EMB / "mystyle.pt"), token="mystyle")
    pipe.load_textual_inversion(str(EMB / "badhand.safetensors"), token="badhand")
    pipe.load_textual_inversion(str(EMB / "cattoy.bin"), token="cattoy")
    prompt = "a mystyle photo of a cattoy, sharp"
    negative = "badhand, blurry mystyle"
    with torch.no_grad():
        pe, ne = pipe.encode_prompt(prompt, "cpu", 1, True, negative_prompt=negative)
    save_tensors(OUT / "sd15.safetensors", {"prompt_embeds": pe, "negative_embeds": ne}, {"prompt": prompt, "negative": negative})


def sdxl() -> None:
    g = torch.Generator().manual_seed(11)
    clip_l = torch.randn(2, 32, generator=g)
    clip_g = torch.randn(2, 32, generator=g)
    save_file({"clip_l": clip_l, "clip_g": clip_g}, EMB / "xlstyle.safetensors")

    pipe = StableDiffusionXLPipeline.from_pretrained(FIXTURES_DIR / "sdxl")
    pipe.load_textual_inversion(clip_l, token="xlstyle", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(clip_g, token="xlstyle", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    prompt = "a xlstyle photo, sharp"
    with torch.no_grad():
        pe, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
        # A1111's pooled output: the second encoder's final state at end-of-text, projected.
        text = pipe.maybe_convert_prompt(prompt, pipe.tokenizer_2)
        ids = pipe.tokenizer_2(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        enc = pipe.text_encoder_2
        hidden = enc.text_model(ids).last_hidden_state
        eos = int((ids[0] == pipe.tokenizer_2.eos_token_id).nonzero()[0, 0])
        pooled_a1111 = enc.text_projection(hidden[:, eos])
    save_tensors(
        OUT / "sdxl.safetensors",
        {"prompt_embeds": pe, "pooled_diffusers": pooled, "pooled_a1111": pooled_a1111},
        {"prompt": prompt},
    )


def main() -> None:
    EMB.mkdir(parents=True, exist_ok=True)
    OUT.mkdir(parents=True, exist_ok=True)
    sd15()
    sdxl()
    print("wrote", sorted(p.name for p in EMB.iterdir()), sorted(p.name for p in OUT.iterdir()))


if __name__ == "__main__":
    main()
