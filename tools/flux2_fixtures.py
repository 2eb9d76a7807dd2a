#!/usr/bin/env python3
"""Tiny random-weight FLUX.2 [klein] fixtures (diffusers Flux2KleinPipeline layout) and diffusers goldens.

Writes:
  - fixtures/flux2/klein/ : a diffusers Flux2KleinPipeline folder (is_distilled false, so classifier-free guidance
    is exercised): a tiny Flux2Transformer2DModel (2 double + 2 single blocks, width 32, 4 rotary axes), a tiny
    Qwen3ForCausalLM text encoder with 28 layers (width 16, tied embeddings) so the pipeline's default
    `text_encoder_out_layers` (9, 18, 27) are read as on the real model, the byte-level BPE tokenizer of
    tools/zimage_fixtures.py (Qwen's special tokens and chat template), a tiny AutoencoderKLFlux2 (8 latent channels,
    2x2 patchified to 32, batch-norm statistics randomised) and klein's scheduler config (dynamic shifting; the
    pipeline passes its own empirical mu).
  - fixtures/goldens/flux2/ : prompt embeddings, transformer forwards (plain and with reference tokens of two
    images), VAE encode/decode with the latent normalisation, and end-to-end runs with every random draw recorded:
    txt2img (guidance 1 = no CFG, and guidance 4 with CFG), editing with one reference image and with two
    references of different sizes (one needing the center crop), and inpainting (strength 0.6), each with
    per-step packed latents, final latents (VAE space) and the decoded image.

Run: /root/venv-sd/bin/python tools/flux2_fixtures.py   (CPU, float32, deterministic)
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fixture_common import (  # noqa: E402
    DRAWS,
    FIXTURES_DIR,
    GOLDENS_DIR,
    check_goldens,
    dir_size,
    randn,
    randomize_weights_,
    record_randn,
    save_json,
    save_tensors,
    seed_everything,
)
from zimage_fixtures import build_tokenizer  # noqa: E402  (the shared offline Qwen tokenizer)

import diffusers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinInpaintPipeline,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
)
from transformers import Qwen3Config, Qwen3ForCausalLM  # noqa: E402

warnings.filterwarnings("ignore")
diffusers.utils.logging.set_verbosity_error()
torch.set_grad_enabled(False)
torch.use_deterministic_algorithms(True)

FOLDER = FIXTURES_DIR / "flux2" / "klein"
OUT = GOLDENS_DIR / "flux2"

SEEDS = dict(transformer=9500, text=9600, vae=9700)
PROMPTS = ["a photo of a cat", "a red cube on a table, studio lighting, 35mm"]
PROMPT = PROMPTS[0]
MAX_LEN = 64  # max_sequence_length of every tiny golden (the pipeline's default is 512)
H, W = 24, 16  # pixels; VAE factor 2 -> 12x8 latents -> 6x4 patchified = 24 tokens
STEPS = 3
LAYERS = (9, 18, 27)

TRANSFORMER_KW = dict(
    patch_size=1,
    in_channels=32,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=48,
    timestep_guidance_channels=32,
    mlp_ratio=3.0,
    axes_dims_rope=(4, 4, 4, 4),
    rope_theta=2000,
    eps=1e-6,
    guidance_embeds=False,
)

QWEN_KW = dict(
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=28,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    max_position_embeddings=512,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    attention_bias=False,
    hidden_act="silu",
    use_cache=False,
)

VAE_KW = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(8, 16),
    layers_per_block=1,
    latent_channels=8,
    norm_num_groups=4,
    sample_size=32,
    use_quant_conv=True,
    use_post_quant_conv=True,
    mid_block_add_attention=True,
    batch_norm_eps=1e-4,
)

# FLUX.2 [klein]'s scheduler_config.json.
SCHEDULER_KW = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                    base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential")


def build_transformer() -> Flux2Transformer2DModel:
    seed_everything(SEEDS["transformer"])
    m = Flux2Transformer2DModel(**TRANSFORMER_KW)
    randomize_weights_(m, SEEDS["transformer"])
    return m.eval()


def build_text_encoder(vocab_size: int) -> Qwen3ForCausalLM:
    seed_everything(SEEDS["text"])
    m = Qwen3ForCausalLM(Qwen3Config(vocab_size=vocab_size, **QWEN_KW))
    randomize_weights_(m, SEEDS["text"])
    return m.eval()


def build_vae() -> AutoencoderKLFlux2:
    seed_everything(SEEDS["vae"])
    m = AutoencoderKLFlux2(**VAE_KW)
    randomize_weights_(m, SEEDS["vae"])
    g = torch.Generator().manual_seed(SEEDS["vae"] + 1)
    with torch.no_grad():
        m.decoder.conv_out.weight.mul_(0.4)
        m.decoder.conv_out.bias.mul_(0.4)
        n = m.bn.running_mean.numel()
        m.bn.running_mean.copy_(0.3 * torch.randn(n, generator=g))
        m.bn.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return m.eval()


def golden(name: str, tensors: dict, meta: dict | None = None, skip: tuple[str, ...] = ()) -> None:
    check_goldens(name, tensors, skip=skip)
    save_tensors(OUT / name, tensors)
    if meta is not None:
        save_json(OUT / (Path(name).stem + ".json"), meta)


def pattern(h: int, w: int, phase: float) -> np.ndarray:
    """A smooth uint8 RGB test pattern [h, w, 3]."""
    y, x = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    rgb = np.stack([0.5 + 0.5 * np.sin(6.0 * x + phase), y, 0.5 + 0.4 * np.cos(5.0 * (x + y) + phase)], -1)
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


def to_tensor(a: np.ndarray) -> torch.Tensor:
    """uint8 [h, w, 3] -> [1, 3, h, w] in [-1, 1] (what the Rust side receives)."""
    return torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255.0 * 2 - 1


def prompt_goldens(pipe: Flux2KleinPipeline) -> None:
    tok = pipe.tokenizer
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True,
                                     enable_thinking=False) for p in PROMPTS]
    for p, t in zip(PROMPTS, texts):
        expect = f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        if t != expect:
            raise AssertionError(f"chat template renders {t!r}, expected {expect!r}")
    enc = tok(texts, padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="pt")
    embeds = pipe._get_qwen3_prompt_embeds(pipe.text_encoder, tok, list(PROMPTS), max_sequence_length=MAX_LEN,
                                           hidden_states_layers=LAYERS)
    out = pipe.text_encoder(input_ids=enc.input_ids[:1], attention_mask=enc.attention_mask[:1],
                            output_hidden_states=True, use_cache=False)
    if len(out.hidden_states) != QWEN_KW["num_hidden_layers"] + 1:
        raise AssertionError("unexpected hidden_states layout")
    tensors = dict(input_ids=enc.input_ids.to(torch.int64), attention_mask=enc.attention_mask.to(torch.int64))
    for i, e in enumerate(embeds):
        tensors[f"prompt_embeds_{i}"] = e
    tensors["hidden_state_1_of_0"] = out.hidden_states[1][0]
    golden("prompt_embeds.safetensors", tensors,
           dict(prompts=PROMPTS, templated=texts, max_sequence_length=MAX_LEN, layers=list(LAYERS),
                note="prompt_embeds_i = cat(hidden_states[9], [18], [27]) per token, padded to max_length, masked"))


def transformer_goldens(m: Flux2Transformer2DModel) -> None:
    p = Flux2KleinPipeline
    lat = randn((1, 32, 6, 4), 600)
    ids = p._prepare_latent_ids(lat)
    x = p._pack_latents(lat)
    txt = randn((1, 10, 48), 601)
    txt_ids = p._prepare_text_ids(txt)
    t = torch.tensor([0.7])
    out = m(hidden_states=x, encoder_hidden_states=txt, timestep=t, img_ids=ids, txt_ids=txt_ids, guidance=None,
            return_dict=False)[0]
    golden("transformer.safetensors", dict(x=x, img_ids=ids.float(), txt=txt, txt_ids=txt_ids.float(), t=t, out=out),
           dict(note="out = transformer(x, txt, t, img_ids, txt_ids); x packed [1, 24, 32]"), skip=("t", "txt_ids"))
    refs = [randn((1, 32, 4, 4), 602), randn((1, 32, 3, 5), 603)]
    ref_ids = p._prepare_image_ids(refs)
    ref_tokens = torch.cat([p._pack_latents(r) for r in refs], dim=1)
    xr = torch.cat([x, ref_tokens], 1)
    idr = torch.cat([ids, ref_ids], 1)
    out_r = m(hidden_states=xr, encoder_hidden_states=txt, timestep=t, img_ids=idr, txt_ids=txt_ids, guidance=None,
              return_dict=False)[0]
    golden("transformer_refs.safetensors",
           dict(x=x, ref0=refs[0], ref1=refs[1], ref_ids=ref_ids.float(), txt=txt, t=t, out=out_r),
           dict(note="out = transformer(cat(x, refs), ...) over all tokens; ref ids T = 10, 20"),
           skip=("t",))


def vae_goldens(vae: AutoencoderKLFlux2) -> None:
    p = Flux2KleinPipeline
    image = to_tensor(pattern(H, W, 1.0))
    mean = vae.encode(image).latent_dist.mode()
    mu = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    normalized = (p._patchify_latents(mean) - mu) / std
    lat_in = randn((1, 32, 6, 4), 610)
    z = p._unpatchify_latents(lat_in * std + mu)
    decoded = vae.decode(z).sample
    golden("vae.safetensors", dict(image=image, posterior_mean=mean, normalized=normalized, latent_in=lat_in, z=z,
                                   decoded=decoded),
           dict(note="normalized = (patchify(mode) - bn_mean) / sqrt(bn_var + eps); decoded = decode(unpatchify(latent_in * std + mean))"))


def run(pipe, kind: str, seed: int, **kw):
    steps_seen: list[torch.Tensor] = []

    def cb(p, i, t, k):
        steps_seen.append(k["latents"].detach().clone())
        return {}

    record_randn()
    DRAWS.clear()
    lat = pipe(prompt=PROMPT, num_inference_steps=STEPS, max_sequence_length=MAX_LEN,
               generator=torch.Generator().manual_seed(seed), output_type="latent", callback_on_step_end=cb,
               callback_on_step_end_tensor_inputs=["latents"], **kw).images
    draws = list(DRAWS)
    dec = pipe.vae.decode(lat).sample
    image = (dec / 2 + 0.5).clamp(0, 1)
    full = pipe(prompt=PROMPT, num_inference_steps=STEPS, max_sequence_length=MAX_LEN,
                generator=torch.Generator().manual_seed(seed), output_type="pt", **kw).images
    if (full - image).abs().max() > 1e-5:
        raise AssertionError(f"{kind}: manual decode disagrees with the pipeline image")
    sigmas = [float(s) for s in pipe.scheduler.sigmas]
    timesteps = [float(s) for s in pipe.scheduler.timesteps]
    return dict(latents_final=lat, image=image, step_latents=torch.stack(steps_seen)), draws, sigmas, timesteps


def e2e_goldens(components: dict) -> None:
    t2i = Flux2KleinPipeline(**components)
    for name, guidance, seed in [("txt2img", 1.0, 42), ("txt2img_cfg", 4.0, 43)]:
        tensors, draws, sigmas, ts = run(t2i, name, seed, height=H, width=W, guidance_scale=guidance)
        if len(draws) != 1:
            raise AssertionError(f"{name}: {len(draws)} draws")
        tensors["noise"] = draws[0]
        golden(f"{name}.safetensors", tensors,
               dict(prompt=PROMPT, height=H, width=W, steps=STEPS, guidance_scale=guidance, max_sequence_length=MAX_LEN,
                    generator_seed=seed, sigmas=sigmas, timesteps=ts, draws="noise"))

    # Editing: one reference at the output size, then two references of other sizes (the second is cropped to 64x80).
    r0 = pattern(64, 68, 0.3)
    r1 = pattern(83, 66, 2.0)  # center-cropped by diffusers to 80x64 (multiples of 4)
    crop1 = r1[1:81, 1:65]
    for name, refs, seed in [("edit_1ref", [r0], 44), ("edit_2ref", [r0, r1], 45)]:
        pil = [PIL.Image.fromarray(r) for r in refs]
        tensors, draws, sigmas, ts = run(t2i, name, seed, image=pil if len(pil) > 1 else pil[0], height=H, width=W,
                                         guidance_scale=4.0)
        if len(draws) != 1:
            raise AssertionError(f"{name}: {len(draws)} draws")
        tensors["noise"] = draws[0]
        for i, r in enumerate(refs):
            tensors[f"ref{i}"] = to_tensor(r)
        if len(refs) > 1:
            tensors["ref1_cropped"] = to_tensor(crop1)
        golden(f"{name}.safetensors", tensors,
               dict(prompt=PROMPT, height=H, width=W, steps=STEPS, guidance_scale=4.0, max_sequence_length=MAX_LEN,
                    generator_seed=seed, sigmas=sigmas, timesteps=ts, draws="noise",
                    refs=[list(r.shape) for r in refs]))

    inp = Flux2KleinInpaintPipeline(**components)
    img = pattern(H, W, 1.0)
    mask = np.zeros((H, W), np.uint8)
    mask[6:18, 4:12] = 255
    tensors, draws, sigmas, ts = run(inp, "inpaint", 11, image=PIL.Image.fromarray(img),
                                     mask_image=PIL.Image.fromarray(mask), strength=0.6, guidance_scale=4.0)
    if len(draws) != 1:
        raise AssertionError(f"inpaint: {len(draws)} draws")
    tensors.update(init_image=to_tensor(img), mask=torch.from_numpy(mask)[None, None].float() / 255.0, noise=draws[0])
    golden("inpaint.safetensors", tensors,
           dict(prompt=PROMPT, height=H, width=W, steps=STEPS, strength=0.6, guidance_scale=4.0,
                max_sequence_length=MAX_LEN, generator_seed=11, sigmas=sigmas, timesteps=ts, draws="noise"))


def main() -> None:
    tok = build_tokenizer()
    transformer = build_transformer()
    text_encoder = build_text_encoder(len(tok))
    vae = build_vae()
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_KW)
    pipe = Flux2KleinPipeline(transformer=transformer, text_encoder=text_encoder, tokenizer=tok, vae=vae,
                              scheduler=scheduler, is_distilled=False)
    pipe.save_pretrained(FOLDER, safe_serialization=True)
    pipe = Flux2KleinPipeline.from_pretrained(FOLDER)
    components = dict(transformer=pipe.transformer, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                      vae=pipe.vae, scheduler=pipe.scheduler, is_distilled=False)
    prompt_goldens(pipe)
    transformer_goldens(pipe.transformer)
    vae_goldens(pipe.vae)
    e2e_goldens(components)
    print(f"fixtures/flux2: {dir_size(FOLDER) / 1e6:.2f} MB, goldens/flux2: {dir_size(OUT) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
