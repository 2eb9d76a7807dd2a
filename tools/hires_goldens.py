#!/usr/bin/env python3
"""Hires fix goldens: A1111's two-pass txt2img as diffusers' two pipelines chained, on the tiny sd15 fixture.

First pass: StableDiffusionPipeline at 32x32 (Euler, 4 steps, CFG 7.5) to latents. Then either
  - latent upscale (A1111's "Latent" upscaler: torch.nn.functional.interpolate(mode="bilinear",
    align_corners=False, no antialias) of the latents to 64x64 pixels' worth) and
    StableDiffusionImg2ImgPipeline on those latents (4-channel input is used as the initial latents), or
  - pixel upscale: the decoded first-pass image resized with PIL's Lanczos to 64x64, then img2img on it
    (the resized image is recorded, so the test can feed exactly what diffusers got),
at strength 0.6 with 5 steps (img2img runs int(5 * 0.6) = 3). Every random draw is recorded in order
(first pass, then second pass) as in pipeline_goldens.py.

    /root/venv-sd/bin/python tools/hires_goldens.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixture_common import DRAWS, FIXTURES_DIR, GOLDENS_DIR, check_goldens, record_randn, save_json, save_tensors  # noqa: E402

import diffusers  # noqa: E402
from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline  # noqa: E402

OUT = GOLDENS_DIR / "pipelines"
BASE, TARGET = 32, 64


@torch.no_grad()
def main() -> None:
    pipe = StableDiffusionPipeline.from_pretrained(FIXTURES_DIR / "sd15", safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    i2i = StableDiffusionImg2ImgPipeline(**pipe.components)
    i2i.set_progress_bar_config(disable=True)
    common = dict(prompt="a red fox in the snow", negative_prompt="blurry, grey", guidance_scale=7.5)
    f = pipe.vae_scale_factor
    for mode in ("latent", "lanczos"):
        record_randn()
        DRAWS.clear()
        first = pipe(**common, height=BASE, width=BASE, num_inference_steps=4, generator=torch.Generator().manual_seed(71),
                     output_type="latent").images
        first_draws = len(DRAWS)
        tensors = {"first_latents": first.float()}
        if mode == "latent":
            up = F.interpolate(first, size=(TARGET // f, TARGET // f), mode="bilinear", align_corners=False)
            tensors["upscaled_latents"] = up.float()
            second_input = up
        else:
            decoded = pipe.vae.decode(first / pipe.vae.config.scaling_factor).sample
            pixels = (decoded / 2 + 0.5).clamp(0, 1)
            arr = (pixels[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            resized = Image.fromarray(arr).resize((TARGET, TARGET), Image.LANCZOS)
            tensors["first_image"] = pixels.float()
            tensors["upscaled_image"] = torch.from_numpy(np.asarray(resized).astype(np.float32) / 255.0).permute(2, 0, 1)[None]
            second_input = resized
        out = i2i(**common, image=second_input, strength=0.6, num_inference_steps=5, generator=torch.Generator().manual_seed(72),
                  output_type="latent").images
        image = (pipe.vae.decode(out / pipe.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
        draws = list(DRAWS)
        expected = first_draws + (1 if mode == "latent" else 2)
        if len(draws) != expected:
            raise AssertionError(f"{mode}: {len(draws)} draws, expected {expected}")
        tensors.update(latents=out.float(), image=image.float())
        for i, d in enumerate(draws):
            tensors[f"draw_{i}"] = d
        label = f"sd15_hires_{mode}"
        check_goldens(label, tensors, skip=tuple(k for k in tensors if k.startswith("draw_")))
        save_tensors(OUT / f"{label}.safetensors", tensors)
        save_json(OUT / f"{label}.json", dict(common, model="sd15", sampler="euler", steps=4, width=BASE, height=BASE, seed=71,
                                              hr_width=TARGET, hr_height=TARGET, hr_upscaler=mode, hr_steps=5, strength=0.6,
                                              first_pass_draws=first_draws, draws=len(draws), diffusers=diffusers.__version__))
        print(f"{label}: {len(draws)} draws")


if __name__ == "__main__":
    main()
