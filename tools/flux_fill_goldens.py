#!/usr/bin/env python3
"""FLUX.1 Fill fixture and goldens: a tiny random Fill transformer and diffusers' FluxFillPipeline on it.

FLUX.1 Fill is the [dev] architecture with a wider input: the packed noise latents, the packed latents of
the masked image (image * (1 - mask)) and the mask folded into the latent grid (vae_factor^2 channels per
latent pixel, then packed) are concatenated per token. Real Fill: 64 + 64 + 256 = 384 input channels; the
tiny fixture's VAE factor 2 gives 64 + 64 + 16 = 144. No per-step blending: the model repaints by itself.

Writes fixtures/flux/fill/ (a diffusers FluxFillPipeline folder: the tiny dev components with the Fill
transformer) and fixtures/goldens/flux/fill_dev_s{100,75}.safetensors + fill_params.json. Run after
flux_fixtures.py:
    tools/.venv/bin/python tools/flux_fill_goldens.py
CPU, float32, deterministic.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import flux_fixtures as ff  # noqa: E402  (constants and the tiny builders; importing runs nothing)
from fixture_common import DRAWS, check_goldens, randomize_weights_, record_randn, save_json, save_tensors, seed_everything  # noqa: E402

from diffusers import FluxFillPipeline, FluxPipeline, FluxTransformer2DModel  # noqa: E402

FILL_DIR = ff.FLUX_DIR / "fill"
SEED = 4141


def build_fill_transformer(vae_factor: int) -> FluxTransformer2DModel:
    seed_everything(SEED)
    kw = dict(ff.TRANSFORMER_KW)
    kw["in_channels"] = 64 + 64 + 4 * vae_factor * vae_factor
    kw["out_channels"] = 64
    m = FluxTransformer2DModel(guidance_embeds=True, **kw)
    randomize_weights_(m, SEED)
    return m.eval()


def write_folder() -> Path:
    dev = ff.FLUX_DIR / "dev"
    if FILL_DIR.exists():
        shutil.rmtree(FILL_DIR)
    shutil.copytree(dev, FILL_DIR)
    index = json.loads((FILL_DIR / "model_index.json").read_text())
    index["_class_name"] = "FluxFillPipeline"
    (FILL_DIR / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    vae_factor = 2 ** (len(ff.VAE_KW["block_out_channels"]) - 1)
    shutil.rmtree(FILL_DIR / "transformer")
    t = build_fill_transformer(vae_factor)
    t.save_pretrained(FILL_DIR / "transformer", safe_serialization=True)
    back = FluxFillPipeline.from_pretrained(FILL_DIR)
    for k, v in t.state_dict().items():
        if not torch.equal(back.transformer.state_dict()[k], v):
            raise AssertionError(f"fill transformer {k} did not round-trip")
    return FILL_DIR


def fill_golden(pipe: FluxFillPipeline, strength: float, seed: int) -> None:
    img, mask = ff.init_image(), ff.inpaint_mask()
    captured: dict[str, torch.Tensor] = {}
    orig = pipe.prepare_mask_latents

    def mask_hook(*a, **k):
        r = orig(*a, **k)
        captured["mask_packed"] = r[0].detach().clone()
        captured["masked_image_latents_packed"] = r[1].detach().clone()
        return r

    pipe.prepare_mask_latents = mask_hook
    steps_seen: list[torch.Tensor] = []

    def cb(p, i, t, kw):
        steps_seen.append(kw["latents"].detach().clone())
        return {}

    record_randn()
    DRAWS.clear()
    common = dict(prompt=ff.PROMPT, image=img, mask_image=mask, height=ff.SIZE, width=ff.SIZE, strength=strength,
                  num_inference_steps=ff.STEPS, guidance_scale=30.0, max_sequence_length=ff.L_T5)
    lat = pipe(**common, generator=torch.Generator().manual_seed(seed), output_type="latent", callback_on_step_end=cb,
               callback_on_step_end_tensor_inputs=["latents"]).images
    pipe.prepare_mask_latents = orig
    draws = list(DRAWS)
    # Draw order: the image's posterior sample, the noise, the masked image's posterior sample.
    if len(draws) != 3:
        raise AssertionError(f"unexpected fill draws: {len(draws)}")
    sf, sh = pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor
    unpacked = FluxPipeline._unpack_latents(lat, ff.SIZE, ff.SIZE, pipe.vae_scale_factor)
    image = (pipe.vae.decode(unpacked / sf + sh).sample / 2 + 0.5).clamp(0, 1)
    full = pipe(**common, generator=torch.Generator().manual_seed(seed), output_type="pt").images
    if (full - image).abs().max() > 1e-6:
        raise AssertionError("manual decode disagrees with the fill pipeline image")
    name = f"fill_dev_s{int(round(strength * 100))}.safetensors"
    tensors = dict(init_image=img, mask=mask, posterior_noise=draws[0], noise=draws[1], masked_posterior_noise=draws[2],
                   mask_packed=captured["mask_packed"], masked_image_latents_packed=captured["masked_image_latents_packed"],
                   step_latents=torch.stack(steps_seen), latents_final=lat, latents_final_unpacked=unpacked, image=image,
                   sigmas=torch.tensor([float(s) for s in pipe.scheduler.sigmas]))
    check_goldens(name, tensors)
    save_tensors(ff.OUT / name, tensors)
    PARAMS[name] = dict(prompt=ff.PROMPT, height=ff.SIZE, width=ff.SIZE, strength=strength, steps=ff.STEPS, guidance_scale=30.0,
                        max_sequence_length=ff.L_T5, generator_seed=seed,
                        draws="posterior_noise, noise, masked_posterior_noise from one Generator")


PARAMS: dict[str, dict] = {}


def main() -> None:
    folder = write_folder()
    pipe = FluxFillPipeline.from_pretrained(folder)
    fill_golden(pipe, 1.0, 13)
    fill_golden(pipe, 0.75, 14)
    save_json(ff.OUT / "fill_params.json", PARAMS)
    print("fill goldens written")


if __name__ == "__main__":
    main()
