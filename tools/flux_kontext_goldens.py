#!/usr/bin/env python3
"""FLUX.1 Kontext goldens: diffusers' FluxKontextPipeline on the tiny FLUX.1 [dev] fixture.

Kontext checkpoints have the [dev] architecture; the pipeline is what differs: the reference image is
VAE-encoded (the posterior mode, no random draw), packed, and appended to the noise tokens with position
ids whose first coordinate is 1; the transformer's prediction for the appended tokens is dropped.

Writes fixtures/goldens/flux/kontext_dev.safetensors and kontext_params.json. Run after flux_fixtures.py:
    tools/.venv/bin/python tools/flux_kontext_goldens.py
CPU, float32, deterministic.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fixture_common import DRAWS, GOLDENS_DIR, FIXTURES_DIR, check_goldens, record_randn, save_json, save_tensors  # noqa: E402

from diffusers import FluxKontextPipeline, FluxPipeline  # noqa: E402

OUT = GOLDENS_DIR / "flux"
PROMPT = "a photo of a cat"
SIZE = 16  # output pixels (tiny VAE factor 2: 8x8 latents, 16 packed tokens)
REF_H, REF_W = 12, 20  # the reference image: another size (6x10 latents, 15 packed tokens)
STEPS = 4
L_T5 = 32


def reference_image() -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(0, 1, REF_H), torch.linspace(0, 1, REF_W), indexing="ij")
    return torch.stack([0.5 + 0.5 * torch.sin(5.0 * x), y, 0.5 + 0.4 * torch.cos(4.0 * (x - y))])[None].float().clamp(0, 1)


def main() -> None:
    pipe = FluxKontextPipeline.from_pretrained(FIXTURES_DIR / "flux" / "dev")
    captured: dict[str, torch.Tensor] = {}
    enc = pipe.vae.encode

    def encode_hook(x, *a, **k):
        captured["vae_input"] = x.detach().clone()
        r = enc(x, *a, **k)
        captured["posterior_mean"] = r.latent_dist.mean.detach().clone()
        return r

    pipe.vae.encode = encode_hook
    steps_seen: list[torch.Tensor] = []

    def cb(p, i, t, kw):
        steps_seen.append(kw["latents"].detach().clone())
        return {}

    record_randn()
    DRAWS.clear()
    image = reference_image()
    common = dict(prompt=PROMPT, image=image, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=2.5,
                  max_sequence_length=L_T5, max_area=SIZE * SIZE, _auto_resize=False)
    lat = pipe(**common, generator=torch.Generator().manual_seed(21), output_type="latent", callback_on_step_end=cb,
               callback_on_step_end_tensor_inputs=["latents"]).images
    pipe.vae.encode = enc
    draws = list(DRAWS)
    if len(draws) != 1:
        raise AssertionError(f"Kontext drew {len(draws)} random tensors; expected only the initial noise")
    noise = draws[0]
    sf, sh = pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor
    if not torch.allclose(captured["vae_input"], image * 2 - 1, atol=1e-6):
        raise AssertionError("the reference image is not preprocessed as x*2-1 at its own size")
    image_latents = (captured["posterior_mean"] - sh) * sf
    unpacked = FluxPipeline._unpack_latents(lat, SIZE, SIZE, pipe.vae_scale_factor)
    dec = pipe.vae.decode(unpacked / sf + sh).sample
    decoded = (dec / 2 + 0.5).clamp(0, 1)
    sigmas = [float(s) for s in pipe.scheduler.sigmas]
    tensors = dict(reference_image=image, vae_input=captured["vae_input"], image_latents=image_latents, noise=noise,
                   latents_final=lat, latents_final_unpacked=unpacked, image=decoded, step_latents=torch.stack(steps_seen),
                   sigmas=torch.tensor(sigmas))
    check_goldens("kontext_dev.safetensors", tensors)
    save_tensors(OUT / "kontext_dev.safetensors", tensors)
    save_json(OUT / "kontext_params.json", dict(prompt=PROMPT, height=SIZE, width=SIZE, reference=[REF_H, REF_W], steps=STEPS,
                                                 guidance_scale=2.5, max_sequence_length=L_T5, generator_seed=21,
                                                 draws="the initial noise only (the reference is encoded with the posterior mode)"))
    print("kontext_dev.safetensors:", {k: list(v.shape) for k, v in tensors.items()})


if __name__ == "__main__":
    main()
