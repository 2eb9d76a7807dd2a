"""End-to-end pipeline goldens: diffusers runs of the tiny fixture models with every random draw recorded.

Each run records, in order, every tensor diffusers draws through `randn_tensor` (initial noise, VAE
posterior samples, img2img/inpaint noise, ancestral step noise), so the Rust tests can replay exactly
the same draws through a `NoiseQueue` instead of trying to match PyTorch's RNG.

Run after make_fixtures.py (it reads fixtures/sd15, sd15-inpaint, sd2, sdxl):
    tools/.venv/bin/python tools/pipeline_goldens.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixture_common import (  # noqa: E402
    DRAWS,
    FIXTURES_DIR,
    GOLDENS_DIR,
    check_goldens,
    record_randn,
    save_json,
    save_tensors,
)

import diffusers  # noqa: E402
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

OUT = GOLDENS_DIR / "pipelines"
SIZE = 32  # tiny VAE has a scale factor of 2: 16×16 latents


def scheduler_for(name: str, config):
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(config)
    if name == "euler_a":
        return EulerAncestralDiscreteScheduler.from_config(config)
    if name == "dpmpp_2m_karras":
        return DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True
        )
    raise ValueError(name)


def test_image(seed: int) -> Image.Image:
    """A smooth, structured RGB picture (gradients + a disc), so VAE encodes carry signal."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    r = 0.5 + 0.5 * np.sin(6.0 * x + seed)
    g = y
    b = ((x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.1).astype(np.float64)
    arr = (np.stack([r, g, b], -1) * 255).round().astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def test_mask() -> Image.Image:
    m = np.zeros((SIZE, SIZE), dtype=np.uint8)
    m[SIZE // 4 : 3 * SIZE // 4, SIZE // 3 : SIZE] = 255
    return Image.fromarray(m, "L")


def image_tensor(img: Image.Image) -> torch.Tensor:
    a = torch.from_numpy(np.asarray(img).astype(np.float32) / 255.0)
    return a.permute(2, 0, 1)[None] if a.ndim == 3 else a[None, None]


def run(label: str, pipe, kwargs: dict, meta: dict) -> None:
    record_randn()
    DRAWS.clear()
    gen = torch.Generator("cpu").manual_seed(meta["seed"])
    lat = pipe(**kwargs, generator=gen, output_type="latent", return_dict=True).images
    draws_latent = list(DRAWS)
    # Same run again with the same generator seed for the decoded image; the draws must repeat.
    DRAWS.clear()
    gen = torch.Generator("cpu").manual_seed(meta["seed"])
    img = pipe(**kwargs, generator=gen, output_type="pt", return_dict=True).images
    assert len(DRAWS) == len(draws_latent) and all(torch.equal(a, b) for a, b in zip(DRAWS, draws_latent))
    tensors = {"latents": lat.float(), "image": img.float()}
    for i, d in enumerate(draws_latent):
        tensors[f"draw_{i}"] = d
    check_goldens(label, tensors, skip=tuple(k for k in tensors if k.startswith("draw_")))
    meta = dict(meta, draws=len(draws_latent))
    save_tensors(OUT / f"{label}.safetensors", tensors)
    save_json(OUT / f"{label}.json", meta)
    print(f"{label}: {len(draws_latent)} draws, latents max {lat.abs().max():.3f}")


@torch.no_grad()
def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    common = dict(prompt="a red fox in the snow", negative_prompt="blurry, grey", height=SIZE, width=SIZE)

    sd15 = StableDiffusionPipeline.from_pretrained(FIXTURES_DIR / "sd15", safety_checker=None, requires_safety_checker=False)
    sd15.set_progress_bar_config(disable=True)
    base_config = sd15.scheduler.config
    for sampler in ["ddim", "euler", "dpmpp_2m_karras", "euler_a"]:
        sd15.scheduler = scheduler_for(sampler, base_config)
        meta = dict(common, model="sd15", sampler=sampler, steps=4, guidance_scale=7.5, seed=11, operation="txt2img")
        run(f"sd15_txt2img_{sampler}", sd15, dict(common, num_inference_steps=4, guidance_scale=7.5), meta)

    # Batch of two images with guidance.
    sd15.scheduler = scheduler_for("euler", base_config)
    meta = dict(common, model="sd15", sampler="euler", steps=3, guidance_scale=5.0, seed=5, operation="txt2img", batch=2)
    run("sd15_txt2img_batch2", sd15, dict(common, num_inference_steps=3, guidance_scale=5.0, num_images_per_prompt=2), meta)

    i2i = StableDiffusionImg2ImgPipeline(**sd15.components)
    i2i.set_progress_bar_config(disable=True)
    init = test_image(0)
    save_tensors(OUT / "input_image.safetensors", {"image": image_tensor(init), "mask": image_tensor(test_mask())})
    for sampler in ["ddim", "euler_a"]:
        i2i.scheduler = scheduler_for(sampler, base_config)
        meta = dict(common, model="sd15", sampler=sampler, steps=5, guidance_scale=7.5, seed=21, operation="img2img", strength=0.6)
        run(f"sd15_img2img_{sampler}", i2i, dict(common, image=init, strength=0.6, num_inference_steps=5, guidance_scale=7.5), meta)

    # 4-channel model inpainting (mask blending).
    inp4 = StableDiffusionInpaintPipeline(**sd15.components)
    inp4.set_progress_bar_config(disable=True)
    inp4.scheduler = scheduler_for("ddim", base_config)
    meta = dict(common, model="sd15", sampler="ddim", steps=5, guidance_scale=7.5, seed=31, operation="inpaint", strength=0.75)
    run("sd15_inpaint4", inp4, dict(common, image=init, mask_image=test_mask(), strength=0.75, num_inference_steps=5, guidance_scale=7.5), meta)

    # 9-channel inpainting model.
    inp9 = StableDiffusionInpaintPipeline.from_pretrained(FIXTURES_DIR / "sd15-inpaint", safety_checker=None, requires_safety_checker=False)
    inp9.set_progress_bar_config(disable=True)
    inp9.scheduler = scheduler_for("ddim", inp9.scheduler.config)
    meta = dict(common, model="sd15-inpaint", sampler="ddim", steps=4, guidance_scale=7.5, seed=41, operation="inpaint", strength=1.0)
    run("sd15_inpaint9", inp9, dict(common, image=init, mask_image=test_mask(), strength=1.0, num_inference_steps=4, guidance_scale=7.5), meta)

    # SD2-like v-prediction.
    sd2 = StableDiffusionPipeline.from_pretrained(FIXTURES_DIR / "sd2", safety_checker=None, requires_safety_checker=False)
    sd2.set_progress_bar_config(disable=True)
    sd2.scheduler = scheduler_for("ddim", sd2.scheduler.config)
    assert sd2.scheduler.config.prediction_type == "v_prediction"
    meta = dict(common, model="sd2", sampler="ddim", steps=4, guidance_scale=7.5, seed=51, operation="txt2img")
    run("sd2_txt2img_ddim", sd2, dict(common, num_inference_steps=4, guidance_scale=7.5), meta)

    # SDXL: two encoders, pooled embeddings, time ids; empty negative prompt → zero embeddings.
    xl = StableDiffusionXLPipeline.from_pretrained(FIXTURES_DIR / "sdxl")
    xl.set_progress_bar_config(disable=True)
    xl.scheduler = scheduler_for("euler", xl.scheduler.config)
    xl_common = dict(prompt="a red fox in the snow", height=SIZE, width=SIZE)
    meta = dict(xl_common, negative_prompt="", model="sdxl", sampler="euler", steps=4, guidance_scale=5.0, seed=61, operation="txt2img")
    run("sdxl_txt2img_euler", xl, dict(xl_common, num_inference_steps=4, guidance_scale=5.0), meta)
    meta = dict(xl_common, negative_prompt="blurry", model="sdxl", sampler="euler", steps=3, guidance_scale=5.0, seed=62, operation="txt2img")
    run("sdxl_txt2img_negative", xl, dict(xl_common, negative_prompt="blurry", num_inference_steps=3, guidance_scale=5.0), meta)

    print("diffusers", diffusers.__version__)


if __name__ == "__main__":
    main()
