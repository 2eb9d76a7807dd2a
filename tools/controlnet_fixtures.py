"""Tiny ControlNet fixtures and goldens (diffusers `ControlNetModel`).

Builds ControlNets from the tiny fixture UNets (`ControlNetModel.from_unet`, conditioning embedding
channels (4, 8): one stride-2 step, matching the tiny VAE's scale factor of 2), re-draws every weight so
the zero convolutions carry signal, and records:
  - fixtures/controlnet/{sd15,sd15b,sdxl}/ : diffusers folders (config.json + diffusion_pytorch_model.safetensors)
  - fixtures/goldens/controlnet/{sd15,sdxl}_residuals.safetensors : residuals for fixed inputs
  - fixtures/controlnet/control_sd15_ldm.safetensors : the sd15 ControlNet as the single-file checkpoints
    A1111/civitai users have (`control_model.*` LDM names: input_blocks, zero_convs, input_hint_block,
    middle_block_out), checked by converting back with diffusers' convert_controlnet_checkpoint
  - fixtures/goldens/controlnet/{sd15,sdxl}_pipeline_*.safetensors/.json and sd15_img2img/inpaint runs:
    StableDiffusion(XL)ControlNet(Img2Img/Inpaint)Pipeline runs from recorded noise (same recording
    approach as pipeline_goldens.py)
  - fixtures/goldens/controlnet/canny.safetensors : OpenCV Canny edges of a test picture (needs
    opencv-python-headless), for the pixel-agreement test of the Rust canny preprocessor

Run after make_fixtures.py:
    tools/.venv/bin/python tools/controlnet_fixtures.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixture_common import (  # noqa: E402
    DRAWS,
    record_randn,
    FIXTURES_DIR,
    GOLDENS_DIR,
    check_goldens,
    randn,
    randomize_weights_,
    save_json,
    save_tensors,
    seed_everything,
)

import diffusers  # noqa: E402
from diffusers import (  # noqa: E402
    ControlNetModel,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetInpaintPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint  # noqa: E402

OUT = GOLDENS_DIR / "controlnet"
MODELS = FIXTURES_DIR / "controlnet"
SIZE = 32  # pixels; 16×16 latents


def control_image(seed: int) -> Image.Image:
    """An edge-like RGB control picture (a ring and stripes), 32×32."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    ring = np.abs(np.hypot(x - 0.5, y - 0.45) - 0.3) < 0.06
    stripes = (np.sin(12.0 * (x + seed * 0.1)) > 0.7)
    a = np.stack([ring, stripes, ring | stripes], -1).astype(np.uint8) * 255
    return Image.fromarray(a, "RGB")


def image_tensor(img: Image.Image) -> torch.Tensor:
    a = torch.from_numpy(np.asarray(img).astype(np.float32) / 255.0)
    return a.permute(2, 0, 1)[None]


def make_controlnet(unet_dir: Path, out: Path, seed: int) -> ControlNetModel:
    unet = UNet2DConditionModel.from_pretrained(unet_dir)
    seed_everything(seed)
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8))
    randomize_weights_(cn, seed)
    # Scale the zero convs down so residuals stay in a realistic range relative to the UNet skips.
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if name.startswith("controlnet_down_blocks") or name.startswith("controlnet_mid_block"):
                p.mul_(0.3)
    cn.eval()
    cn.save_pretrained(out, safe_serialization=True)
    return cn


@torch.no_grad()
def residual_goldens(label: str, cn: ControlNetModel, ctx_dim: int, sdxl: bool) -> None:
    sample = randn((2, 4, 16, 16), 100)
    ehs = randn((2, 77, ctx_dim), 101)
    cond = torch.cat([image_tensor(control_image(0))] * 2)
    t = torch.tensor([537.0])
    kwargs = {}
    tensors = dict(sample=sample, timestep=t, encoder_hidden_states=ehs, controlnet_cond=cond)
    if sdxl:
        text_embeds = randn((2, 32), 102)
        time_ids = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2)
        kwargs["added_cond_kwargs"] = dict(text_embeds=text_embeds, time_ids=time_ids)
        tensors.update(text_embeds=text_embeds, time_ids=time_ids)
    down, mid = cn(sample, t, ehs, controlnet_cond=cond, conditioning_scale=0.7, return_dict=False, **kwargs)
    for i, d in enumerate(down):
        tensors[f"down_residual_{i}"] = d
    tensors["mid_residual"] = mid
    check_goldens(label, tensors, skip=("timestep",))
    save_tensors(OUT / f"{label}_residuals.safetensors", tensors)


def run(label: str, pipe, kwargs: dict, meta: dict) -> None:
    record_randn()
    DRAWS.clear()
    gen = torch.Generator("cpu").manual_seed(meta["seed"])
    lat = pipe(**kwargs, generator=gen, output_type="latent", return_dict=True).images
    tensors = {"latents": lat.float()}
    for i, d in enumerate(DRAWS):
        tensors[f"draw_{i}"] = d
    check_goldens(label, tensors, skip=tuple(k for k in tensors if k.startswith("draw_")))
    save_tensors(OUT / f"{label}.safetensors", tensors)
    save_json(OUT / f"{label}.json", dict(meta, draws=len(DRAWS)))
    print(f"{label}: {len(DRAWS)} draws, latents max {lat.abs().max():.3f}")


def test_image(seed: int) -> Image.Image:
    """The smooth picture pipeline_goldens.py uses for img2img and inpainting."""
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


_RESNET_TO_LDM = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                  ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]


def controlnet_to_ldm(sd: dict, cfg) -> dict:
    """diffusers ControlNet names → the `control_model.*` names of A1111/civitai single files."""
    lpb = cfg.layers_per_block
    n_hint = len(cfg.conditioning_embedding_out_channels)
    out = {}
    for k, v in sd.items():
        p = k.split(".")
        if p[0] == "time_embedding":
            new = f"time_embed.{0 if p[1] == 'linear_1' else 2}." + ".".join(p[2:])
        elif p[0] == "add_embedding":
            new = f"label_emb.0.{0 if p[1] == 'linear_1' else 2}." + ".".join(p[2:])
        elif p[0] == "conv_in":
            new = "input_blocks.0.0." + ".".join(p[1:])
        elif p[0] == "controlnet_down_blocks":
            new = f"zero_convs.{p[1]}.0." + ".".join(p[2:])
        elif p[0] == "controlnet_mid_block":
            new = "middle_block_out.0." + ".".join(p[1:])
        elif p[0] == "controlnet_cond_embedding":
            if p[1] == "conv_in":
                idx, rest = 0, p[2:]
            elif p[1] == "conv_out":
                idx, rest = 2 * (2 * (n_hint - 1) + 1), p[2:]
            else:
                idx, rest = 2 * (int(p[2]) + 1), p[3:]
            new = f"input_hint_block.{idx}." + ".".join(rest)
        elif p[0] == "down_blocks":
            b, kind, j, rest = int(p[1]), p[2], int(p[3]), ".".join(p[4:])
            base = 1 + b * (lpb + 1)
            if kind == "resnets":
                for a, c in _RESNET_TO_LDM:
                    rest = rest.replace(a, c) if rest.startswith(a) else rest
                new = f"input_blocks.{base + j}.0.{rest}"
            elif kind == "attentions":
                new = f"input_blocks.{base + j}.1.{rest}"
            else:
                new = f"input_blocks.{base + lpb}.0.op.{rest.split('.', 1)[1]}"
        elif p[0] == "mid_block":
            kind, j, rest = p[1], int(p[2]), ".".join(p[3:])
            if kind == "resnets":
                for a, c in _RESNET_TO_LDM:
                    rest = rest.replace(a, c) if rest.startswith(a) else rest
                new = f"middle_block.{2 * j}.{rest}"
            else:
                new = f"middle_block.1.{rest}"
        else:
            raise KeyError(k)
        out["control_model." + new] = v.detach().clone().contiguous()
    # diffusers' converter hard-codes the released 8-conv hint block (conv_out at index 14); the tiny one
    # has 4 convs, so the hint block is checked by our rule above and everything else by diffusers.
    back = convert_controlnet_checkpoint(dict(out), dict(cfg))
    hint = "controlnet_cond_embedding."
    back = {k: v for k, v in back.items() if not k.startswith(hint) and v is not None}
    want = {k: v for k, v in sd.items() if not k.startswith(hint)}
    assert set(back) == set(want), sorted(set(back) ^ set(want))[:10]
    for k in want:
        assert torch.equal(back[k], want[k]), k
    return out


def canny_test_pictures() -> list[np.ndarray]:
    """Three grey pictures with edges of different kinds: shapes on a ramp, thin lines and a ring at
    several contrasts, and smoothed seeded noise blobs (natural-looking, many curved edges)."""
    n = 64
    y, x = np.mgrid[0:n, 0:n].astype(np.float64)
    a = 40 + 60 * (x / n)  # a soft ramp that must not produce edges
    a[np.hypot(x - 22, y - 24) < 12] = 210  # disc
    a[40:56, 30:58] = 120  # rectangle
    a[8:14, 36:60] = 20  # dark bar
    a += 6 * np.sin(0.7 * x + 0.3 * y)  # texture below the thresholds
    b = np.full((n, n), 128.0)
    for k, level in enumerate([60, 90, 200, 240]):
        b[:, 6 + 14 * k: 8 + 14 * k] = level  # 2-px lines of rising contrast
    b[np.abs(np.hypot(x - 32, y - 40) - 14) < 2.5] = 30  # a dark ring
    rng = np.random.default_rng(1234)
    c = rng.normal(0, 1, (n, n))
    for _ in range(6):  # smooth the noise into blobs
        c = (c + np.roll(c, 1, 0) + np.roll(c, -1, 0) + np.roll(c, 1, 1) + np.roll(c, -1, 1)) / 5
    c = 128 + 110 * np.tanh(4 * c / c.std())
    return [np.clip(p, 0, 255).round().astype(np.uint8) for p in (a, b, c)]


def canny_goldens() -> None:
    """OpenCV Canny with the same pre-blur as imageproc's canny (Gaussian σ 1.4, radius 3, replicated border)."""
    import cv2

    tensors = {}
    for i, gray in enumerate(canny_test_pictures()):
        blurred = cv2.GaussianBlur(gray, (7, 7), 1.4, borderType=cv2.BORDER_REPLICATE)
        edges = cv2.Canny(blurred, 100, 200, L2gradient=True)
        print(f"  canny {i}: {int((edges > 0).sum())} edge pixels of {gray.size}")
        tensors[f"image{i}"] = torch.from_numpy(gray)
        tensors[f"edges{i}"] = torch.from_numpy(edges)
    # One metadata key: several would be written in hash order and the file would differ between runs.
    meta = json.dumps({"low": 100, "high": 200, "opencv": cv2.__version__, "L2gradient": True}, sort_keys=True)
    save_tensors(OUT / "canny.safetensors", tensors, metadata={"params": meta})


@torch.no_grad()
def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    canny_goldens()
    cn15 = make_controlnet(FIXTURES_DIR / "sd15" / "unet", MODELS / "sd15", 700)
    cn15b = make_controlnet(FIXTURES_DIR / "sd15" / "unet", MODELS / "sd15b", 701)
    cnxl = make_controlnet(FIXTURES_DIR / "sdxl" / "unet", MODELS / "sdxl", 702)
    residual_goldens("sd15", cn15, 32, False)
    residual_goldens("sdxl", cnxl, 64, True)
    save_tensors(OUT / "control_images.safetensors", {"image0": image_tensor(control_image(0)), "image1": image_tensor(control_image(3))})

    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        FIXTURES_DIR / "sd15", controlnet=cn15, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    common = dict(prompt="a red fox in the snow", negative_prompt="blurry, grey", height=SIZE, width=SIZE)
    base = dict(common, model="sd15", sampler="ddim", guidance_scale=7.5)
    run("sd15_pipeline_scale07", pipe, dict(common, image=control_image(0), num_inference_steps=4, guidance_scale=7.5,
                                              controlnet_conditioning_scale=0.7),
        dict(base, steps=4, seed=71, scales=[0.7], images=["image0"], start=[0.0], end=[1.0]))
    run("sd15_pipeline_start_end", pipe, dict(common, image=control_image(0), num_inference_steps=5, guidance_scale=7.5,
                                                controlnet_conditioning_scale=0.7, control_guidance_start=0.2,
                                                control_guidance_end=0.8),
        dict(base, steps=5, seed=72, scales=[0.7], images=["image0"], start=[0.2], end=[0.8]))
    multi = StableDiffusionControlNetPipeline(**{**pipe.components, "controlnet": [cn15, cn15b]})
    multi.set_progress_bar_config(disable=True)
    run("sd15_pipeline_multi", multi, dict(common, image=[control_image(0), control_image(3)], num_inference_steps=4,
                                            guidance_scale=7.5, controlnet_conditioning_scale=[0.7, 0.5]),
        dict(base, steps=4, seed=73, scales=[0.7, 0.5], images=["image0", "image1"], start=[0.0, 0.0], end=[1.0, 1.0],
             controlnets=["sd15", "sd15b"]))
    # The same sd15 ControlNet as an A1111/civitai single file (LDM names).
    save_tensors(MODELS / "control_sd15_ldm.safetensors", controlnet_to_ldm(cn15.state_dict(), cn15.config))

    # img2img and 4-channel inpainting with a ControlNet (DDIM, scale 0.7).
    i2i = StableDiffusionControlNetImg2ImgPipeline(**pipe.components)
    i2i.set_progress_bar_config(disable=True)
    save_tensors(OUT / "input_image.safetensors", {"image": image_tensor(test_image(0)), "mask": torch.from_numpy(np.asarray(test_mask()).astype(np.float32) / 255.0)[None, None]})
    run("sd15_img2img_control", i2i, dict(common, image=test_image(0), control_image=control_image(0), strength=0.6,
                                           num_inference_steps=5, guidance_scale=7.5, controlnet_conditioning_scale=0.7),
        dict(base, steps=5, seed=74, scales=[0.7], images=["image0"], start=[0.0], end=[1.0], operation="img2img", strength=0.6))
    inp = StableDiffusionControlNetInpaintPipeline(**pipe.components)
    inp.set_progress_bar_config(disable=True)
    run("sd15_inpaint_control", inp, dict(common, image=test_image(0), mask_image=test_mask(), control_image=control_image(0),
                                           strength=0.75, num_inference_steps=5, guidance_scale=7.5,
                                           controlnet_conditioning_scale=0.7),
        dict(base, steps=5, seed=75, scales=[0.7], images=["image0"], start=[0.0], end=[1.0], operation="inpaint", strength=0.75))

    # SDXL ControlNet pipeline (text_time conditioning reaches the ControlNet too).
    xl = StableDiffusionXLPipeline.from_pretrained(FIXTURES_DIR / "sdxl")
    xlc = StableDiffusionXLControlNetPipeline(**{**xl.components, "controlnet": cnxl})
    xlc.set_progress_bar_config(disable=True)
    xlc.scheduler = EulerDiscreteScheduler.from_config(xl.scheduler.config)
    xl_common = dict(prompt="a red fox in the snow", height=SIZE, width=SIZE)
    run("sdxl_pipeline_scale07", xlc, dict(xl_common, image=control_image(0), num_inference_steps=4, guidance_scale=5.0,
                                            controlnet_conditioning_scale=0.7),
        dict(xl_common, negative_prompt="", model="sdxl", sampler="euler", guidance_scale=5.0, steps=4, seed=76,
             scales=[0.7], images=["image0"], start=[0.0], end=[1.0], controlnets=["sdxl"]))
    print("diffusers", diffusers.__version__)


if __name__ == "__main__":
    main()
