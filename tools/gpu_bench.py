#!/usr/bin/env python3
"""Ours against PyTorch/diffusers on the same workloads, weights and inputs, on a GPU (driven by
tools/gpu_bench.sh, which checks the machine and finds our binaries first).

    python tools/gpu_bench.py drive --bin DIR [--device cuda|cpu] [--small] [--only LIST] [--compile]
    python tools/gpu_bench.py torch STAGE [--device cuda|cpu] [--small] [--compile]   # one stage's PyTorch side

Stages, cheap ones first (`--only` takes a comma list):
  unet15    SD 1.5 UNet step: batch 2, latent [2, 4, 64, 64] (512²), timestep 500, context [2, 77, 768]; F16
  vae512    SD VAE decode of [1, 4, 64, 64] into 512²; F16
  vae1024   SDXL VAE (the fp16-fix config: force_upcast false) decode of [1, 4, 128, 128] into 1024²; F16
  unetxl    SDXL UNet step: batch 2, latent [2, 4, 128, 128] (1024²), context [2, 77, 2048], text_time; F16
  flux      FLUX.1-schnell transformer step: 4096 image tokens (1024²), 256 T5 tokens, sigma 1; BF16
  e2e_sdxl  SDXL txt2img 1024², 30 Euler steps, CFG 5 (text encoders, UNet, VAE decode upcast to F32); F16
  e2e_flux  FLUX.1-schnell txt2img 1024², 4 steps, no CFG (CLIP-L, T5-XXL, transformer, VAE); BF16

Every model has random full-size weights in the real diffusers/transformers configs (diffusers' and
transformers' own initialisation, seeded, built on the GPU). For each component stage the PyTorch side
saves the model as a diffusers folder (CHECK/<stage>/model/) with io.safetensors (inputs and PyTorch's
output) and reference.json (dtype, and the relative-L2 limit for our output: 4x the distance between
PyTorch's own low-precision and F32 outputs on the same weights, at least 1e-3; 1e-4 when the workload
runs in F32), times eager PyTorch (inference_mode, SDPA, warm-up excluded, synchronised, median) and,
with --compile, torch.compile; then `benches/gpu.rs` loads the folder through our loaders, stops unless
its output is within the limit, and times ours. For the end-to-end stages the PyTorch side saves a
diffusers pipeline folder and times `from_pretrained` and the pipeline call separately; ours runs the
txt2img / flux examples on that folder, which print their load and generation times.

Peak GPU memory is sampled with nvidia-smi every 100 ms for both sides over the same phases (component
stages: the warm-up and timed runs; end-to-end: load and generation), minus the idle baseline. On the
CPU (smoke mode) each process's peak RSS is reported instead, for the whole process.

Results go to --json (rewritten after every stage, so a run cut short keeps its finished rows) and a
table is printed at the end. Each stage's weights are deleted after it ran unless --keep (the SDXL UNet
and FLUX transformer are handed on to the end-to-end stage when both run).
"""

import argparse
import gc
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
STAGES = ["unet15", "vae512", "vae1024", "unetxl", "flux", "e2e_sdxl", "e2e_flux"]
# (label, dtype on a GPU, target ratio ours/PyTorch eager; None: no target set)
STAGE_INFO = {
    "unet15": ("SD1.5 UNet step b2 512²", "f16", 1.0),
    "vae512": ("VAE decode 512²", "f16", 1.2),
    "vae1024": ("VAE decode 1024²", "f16", 1.2),
    "unetxl": ("SDXL UNet step b2 1024²", "f16", 1.0),
    "flux": ("FLUX-schnell step 1024²", "bf16", 1.0),
    "e2e_sdxl": ("SDXL 1024² 30 steps", "f16", None),
    "e2e_flux": ("FLUX-schnell 1024² 4 steps", "bf16", None),
}
# The component stage whose model an end-to-end stage takes over instead of drawing it again.
HANDED_ON = {"unetxl": ("e2e_sdxl", "unet"), "flux": ("e2e_flux", "transformer")}
# GB of weights each stage writes at full size (F16/BF16).
WEIGHTS_GB = {"unet15": 1.7, "vae512": 0.2, "vae1024": 0.2, "unetxl": 5.1, "flux": 23.8, "e2e_sdxl": 7.0,
              "e2e_flux": 33.8}
PROMPT = "a photo of an astronaut riding a horse on the moon"

# --------------------------------------------------------------------------------------------------
# Configs (the published diffusers/transformers configs; --small uses tiny ones)
# --------------------------------------------------------------------------------------------------

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
# The tiny SD 1.5 config of tools/bench_torch.py --small.
SD15_UNET_SMALL = dict(SD15_UNET, sample_size=16, block_out_channels=(32, 64, 64, 64), cross_attention_dim=32, attention_head_dim=2)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=2048,
    block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    sample_size=512, scaling_factor=0.18215, force_upcast=False,
)
# The tiny VAE of tools/bench_torch.py --small.
SD_VAE_SMALL = dict(SD_VAE, block_out_channels=(32, 32, 64, 64), layers_per_block=1)
SDXL_VAE = dict(SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
# madebyollin/sdxl-vae-fp16-fix: SDXL's architecture and scale, and meant to run in F16.
SDXL_VAE_FP16 = dict(SDXL_VAE, force_upcast=False)
FLUX_SCHNELL = dict(
    patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=False,
    axes_dims_rope=(16, 56, 56),
)
FLUX_VAE = dict(
    SD_VAE, latent_channels=16, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
    use_post_quant_conv=False, force_upcast=True, mid_block_add_attention=True,
)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768)
CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, projection_dim=1280)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24)


def fixture_config(path):
    """A diffusers config.json from fixtures/ without its bookkeeping keys."""
    cfg = json.loads(Path(path).read_text())
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


# --------------------------------------------------------------------------------------------------
# The PyTorch side of one stage (`torch` subcommand)
# --------------------------------------------------------------------------------------------------


class Timeout(Exception):
    """Raised by SIGALRM when torch.compile takes longer than allowed."""


def rel_l2(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def make(torch, factory, seed, device, dtype):
    """Builds a module with its library's own random initialisation directly on `device` in `dtype`
    (no F32 copy first: FLUX's would take 48 GB)."""
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = factory()
    finally:
        torch.set_default_dtype(previous)
    if any(p.dtype != dtype for p in model.parameters() if p.is_floating_point()):
        model = model.to(dtype)
    return model.eval()


def randn(torch, shape, seed, device, dtype):
    """Seeded normal draws, made on the CPU so every device gets the same numbers."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype)


def component_workload(torch, stage, small, device, dtype):
    """(model, inputs, call) for a component stage; `call(model, inputs)` runs one forward."""
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel, UNet2DConditionModel

    if stage in ("unet15", "unetxl"):
        if stage == "unet15":
            cfg = SD15_UNET_SMALL if small else SD15_UNET
        else:
            cfg = fixture_config(FIXTURES / "sdxl/unet/config.json") if small else SDXL_UNET
        model = make(torch, lambda: UNet2DConditionModel(**cfg), 1000 + STAGES.index(stage), device, dtype)
        side = cfg["sample_size"]
        x = dict(
            sample=randn(torch, (2, 4, side, side), 1, device, dtype),
            timestep=torch.tensor([500.0], device=device),
            context=randn(torch, (2, 77, cfg["cross_attention_dim"]), 2, device, dtype),
        )
        if stage == "unetxl":
            time_dims = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
            x["text_embeds"] = randn(torch, (2, time_dims), 3, device, dtype)
            px = float(side * 8)
            x["time_ids"] = torch.tensor([[px, px, 0.0, 0.0, px, px]] * 2, device=device, dtype=dtype)

        def call(m, x):
            added = {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]} if "time_ids" in x else None
            return m(x["sample"], x["timestep"], encoder_hidden_states=x["context"], added_cond_kwargs=added).sample

        return model, x, call
    if stage in ("vae512", "vae1024"):
        cfg = SD_VAE_SMALL if small else (SD_VAE if stage == "vae512" else SDXL_VAE_FP16)
        model = make(torch, lambda: AutoencoderKL(**cfg), 1000 + STAGES.index(stage), device, dtype)
        side = (16 if stage == "vae512" else 32) if small else (64 if stage == "vae512" else 128)
        x = dict(latents=randn(torch, (1, 4, side, side), 4, device, dtype))
        return model, x, lambda m, x: m.decode(x["latents"]).sample
    if stage == "flux":
        cfg = fixture_config(FIXTURES / "flux/schnell/transformer/config.json") if small else FLUX_SCHNELL
        model = make(torch, lambda: FluxTransformer2DModel(**cfg), 1000 + STAGES.index(stage), device, dtype)
        # 1024² image -> 128² latent -> 64² packed tokens; schnell's T5 sequence is 256 tokens.
        grid, txt = (8, 16) if small else (64, 256)
        x = dict(
            hidden_states=randn(torch, (1, grid * grid, cfg["in_channels"]), 5, device, dtype),
            img_ids=FluxPipeline._prepare_latent_image_ids(1, grid, grid, device, dtype),
            encoder_hidden_states=randn(torch, (1, txt, cfg["joint_attention_dim"]), 6, device, dtype),
            txt_ids=torch.zeros(txt, 3, device=device, dtype=dtype),
            pooled_projections=randn(torch, (1, cfg["pooled_projection_dim"]), 7, device, dtype),
            # The pipeline passes sigma (t / 1000); 1.0 is schnell's first step.
            timestep=torch.tensor([1.0], device=device, dtype=dtype),
        )

        def call(m, x):
            return m(hidden_states=x["hidden_states"], img_ids=x["img_ids"], txt_ids=x["txt_ids"],
                     encoder_hidden_states=x["encoder_hidden_states"], pooled_projections=x["pooled_projections"],
                     timestep=x["timestep"], return_dict=False)[0]

        return model, x, call
    raise SystemExit(f"unknown component stage {stage}")


def timed(fn, warmup, runs, sync):
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples), samples


def to_f32_in_place(torch, model, cuda):
    """Converts a module to F32 tensor by tensor, returning freed low-precision blocks to the driver as
    it goes, so an 80 GB card holds FLUX's 48 GB of F32 weights without the cached BF16 ones beside them."""
    with torch.no_grad():
        for i, t in enumerate(list(model.parameters()) + list(model.buffers())):
            if t.is_floating_point():
                t.data = t.data.float()
            if cuda and i % 16 == 0:
                torch.cuda.empty_cache()
    if cuda:
        torch.cuda.empty_cache()


def torch_component(torch, args, stage_dir, device, dtype, sync):
    from safetensors.torch import save_file

    cuda = device.type == "cuda"
    result = {"dtype": dtype_name(dtype)}
    model, inputs, call = component_workload(torch, args.stage, args.small, device, dtype)
    result["parameters"] = sum(p.numel() for p in model.parameters())
    with torch.inference_mode():
        out = call(model, inputs)
    sync()
    if not torch.isfinite(out).all() or float(out.abs().max()) == 0:
        raise SystemExit(f"{args.stage}: PyTorch's output on the random weights is not usable (non-finite or zero)")
    start = time.perf_counter()
    model.save_pretrained(stage_dir / "model", safe_serialization=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in inputs.items()}
    tensors["output"] = out.detach().cpu().contiguous()
    save_file(tensors, str(stage_dir / "io.safetensors"))
    result["save_s"] = time.perf_counter() - start

    # The measured window: warm-up and timed runs only (building, saving and the F32 reference below
    # are PyTorch-side bookkeeping that ours does not do either).
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    window_start = time.time()
    with torch.inference_mode():
        median, samples = timed(lambda: call(model, inputs), args.warmup, args.runs, sync)
    result["window"] = [window_start, time.time()]
    result.update(eager_ms=median, eager_samples_ms=samples)
    if cuda:
        result["max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["max_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
    print(f"torch {args.stage}: eager median {median:.2f} ms over {args.runs} runs "
          f"(min {min(samples):.2f}, max {max(samples):.2f})", flush=True)

    if args.compile:
        result["compile"] = torch_compiled(torch, args, model, inputs, call, out, sync)

    if dtype == torch.float32:
        result.update(lowp_vs_f32_rel_l2=0.0, rel_l2_limit=1e-4)
    else:
        # How far PyTorch's own low-precision output is from F32 on the same (rounded) weights and inputs:
        # the scale our low-precision output is held to. TF32 would blur the F32 side, so it is off.
        try:
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            to_f32_in_place(torch, model, cuda)
            x32 = {k: v.float() if v.is_floating_point() else v for k, v in inputs.items()}
            with torch.inference_mode():
                ref = call(model, x32)
            sync()
            lowp = rel_l2(out, ref)
            result.update(lowp_vs_f32_rel_l2=lowp, rel_l2_limit=max(4 * lowp, 1e-3))
        except Exception as e:  # noqa: BLE001 - an OOM here must not lose the timings above
            result.update(reference_error=f"{type(e).__name__}: {first_line(e)}", rel_l2_limit=1e-2)
            print(f"torch {args.stage}: no F32 reference ({result['reference_error']}); limit falls back to 1e-2", flush=True)
    (stage_dir / "reference.json").write_text(json.dumps(
        {"dtype": result["dtype"], "rel_l2_limit": result["rel_l2_limit"],
         "torch_lowp_vs_f32_rel_l2": result.get("lowp_vs_f32_rel_l2")}, indent=2))
    return result


def torch_compiled(torch, args, model, inputs, call, eager_out, sync):
    """torch.compile's time on the same model, or why it could not be had (never raises)."""

    def on_alarm(signum, frame):
        raise Timeout(f"compiling took over {args.compile_timeout} s")

    compiled = None
    old = signal.signal(signal.SIGALRM, on_alarm)
    # Then again every second: inductor catches some exceptions (and tries another way to compile), so
    # one raise may not get out.
    signal.setitimer(signal.ITIMER_REAL, args.compile_timeout, 1.0)
    try:
        # The whole call, not the module: the VAE's workload is its `decode` method, not `forward`.
        compiled = torch.compile(lambda x: call(model, x))
        start = time.perf_counter()
        with torch.inference_mode():
            first = compiled(inputs)
            sync()
            compile_s = time.perf_counter() - start
            median, _ = timed(lambda: compiled(inputs), args.warmup, args.runs, sync)
        signal.setitimer(signal.ITIMER_REAL, 0)
        print(f"torch {args.stage}: torch.compile median {median:.2f} ms (first call {compile_s:.1f} s)", flush=True)
        return {"ms": median, "first_call_s": compile_s, "rel_l2_to_eager": rel_l2(first, eager_out)}
    except BaseException as e:  # noqa: BLE001 - a compiler failure is a result, not a crash
        signal.setitimer(signal.ITIMER_REAL, 0)
        if isinstance(e, KeyboardInterrupt):
            raise
        print(f"torch {args.stage}: torch.compile failed: {type(e).__name__}: {first_line(e)}", flush=True)
        return {"error": f"{type(e).__name__}: {first_line(e)}"}
    finally:
        signal.signal(signal.SIGALRM, old)
        del compiled
        torch._dynamo.reset()
        gc.collect()


def copy_fixture_parts(src, dst, parts):
    dst.mkdir(parents=True, exist_ok=True)
    for part in parts:
        s = src / part
        if s.is_dir():
            shutil.copytree(s, dst / part)
        else:
            shutil.copy(s, dst / part)


def sized_config(cls, fixture_dir, sizes):
    """The fixture's transformers config (token ids, activation, norms) with the full-size dimensions."""
    cfg = cls.from_pretrained(fixture_dir)
    for k, v in sizes.items():
        setattr(cfg, k, v)
    return cfg


def prefix_text_model_keys(folder):
    """transformers >= 5.6 saves CLIPTextModel without the `text_model.` prefix every published SD/FLUX
    repo has (and our loader reads); rewritten as tools/make_fixtures.py does for the fixtures."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    fixed = {(k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v for k, v in tensors.items()}
    if fixed.keys() != tensors.keys():
        save_file(fixed, str(path), metadata={"format": "pt"})


def build_pipeline(torch, args, stage, folder, device, dtype):
    """Writes the random pipeline folder an end-to-end stage runs: the fixture pipeline itself with
    --small, else the fixture's tokenizers, scheduler and model_index.json with full-size components.
    Either way the UNet/transformer is the component stage's when that one handed it on (the tiny
    component stages use the fixtures' configs, so it fits there too)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    fixture = FIXTURES / ("sdxl" if stage == "e2e_sdxl" else "flux/schnell")
    component, name = ("unetxl", "unet") if stage == "e2e_sdxl" else ("flux", "transformer")
    handed = Path(args.check_dir) / component / "model"
    if args.small:
        shutil.copytree(fixture, folder)
        parts = {}
    else:
        copy_fixture_parts(fixture, folder, ["model_index.json", "scheduler", "tokenizer", "tokenizer_2"])

        def te(cls, config, sub, sizes):
            return lambda: cls(sized_config(config, fixture / sub, sizes))

        if stage == "e2e_sdxl":
            parts = {
                "unet": lambda: UNet2DConditionModel(**SDXL_UNET),
                "vae": lambda: AutoencoderKL(**SDXL_VAE),
                "text_encoder": te(CLIPTextModel, CLIPTextConfig, "text_encoder", CLIP_L),
                "text_encoder_2": te(CLIPTextModelWithProjection, CLIPTextConfig, "text_encoder_2", CLIP_BIGG),
            }
        else:
            parts = {
                "transformer": lambda: FluxTransformer2DModel(**FLUX_SCHNELL),
                "vae": lambda: AutoencoderKL(**FLUX_VAE),
                "text_encoder": te(CLIPTextModel, CLIPTextConfig, "text_encoder", CLIP_L),
                "text_encoder_2": te(T5EncoderModel, T5Config, "text_encoder_2", T5_XXL),
            }
    if handed.is_dir():
        shutil.rmtree(folder / name, ignore_errors=True)
        handed.rename(folder / name)
        print(f"torch {stage}: {name} taken over from the {component} stage", flush=True)
    seed = 2000 + STAGES.index(stage) * 10
    for i, (part, factory) in enumerate(parts.items()):
        if (folder / part).is_dir():
            continue
        model = make(torch, factory, seed + i, device, dtype)
        model.save_pretrained(folder / part)
        if type(model).__name__.startswith("CLIPText"):
            prefix_text_model_keys(folder / part)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def torch_e2e(torch, args, stage_dir, device, dtype, sync):
    from diffusers import FluxPipeline, StableDiffusionXLPipeline

    cuda = device.type == "cuda"
    folder = stage_dir / "pipeline"
    start = time.perf_counter()
    build_pipeline(torch, args, args.stage, folder, device, dtype)
    result = {"dtype": dtype_name(dtype), "build_s": time.perf_counter() - start}
    side = 64 if args.small else 1024
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    window_start = time.time()
    start = time.perf_counter()
    cls = StableDiffusionXLPipeline if args.stage == "e2e_sdxl" else FluxPipeline
    pipe = cls.from_pretrained(folder, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    sync()
    result["load_s"] = time.perf_counter() - start
    kwargs = dict(prompt=PROMPT, height=side, width=side, output_type="pt", generator=torch.Generator().manual_seed(0))
    if args.stage == "e2e_sdxl":
        # negative_prompt stays None: SDXL's force_zeros_for_empty_prompt then zeroes it, as ours does for "".
        kwargs.update(num_inference_steps=30, guidance_scale=5.0)
    else:
        kwargs.update(num_inference_steps=4, guidance_scale=0.0, max_sequence_length=256)
    start = time.perf_counter()
    with torch.inference_mode():
        images = pipe(**kwargs).images
    sync()
    result["generate_s"] = time.perf_counter() - start
    result["window"] = [window_start, time.time()]
    if cuda:
        result["max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["max_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
    if not torch.isfinite(images).all():
        raise SystemExit(f"{args.stage}: the pipeline's image is not finite")
    print(f"torch {args.stage}: load {result['load_s']:.2f} s, generate {result['generate_s']:.2f} s", flush=True)
    return result


def dtype_name(dtype):
    """`torch.bfloat16` -> `bf16`, as our `parse_dtype` reads it."""
    return {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}[str(dtype).removeprefix("torch.")]


def torch_main(args):
    import warnings

    import torch

    import diffusers
    import transformers

    # Loading bars and the `torch_dtype` deprecation notice would bury the numbers in the log.
    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("PyTorch sees no CUDA device")
    cuda = device.type == "cuda"
    dtype = {"f16": torch.float16, "bf16": torch.bfloat16}[STAGE_INFO[args.stage][1]] if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    stage_dir = Path(args.check_dir) / args.stage
    shutil.rmtree(stage_dir, ignore_errors=True)
    stage_dir.mkdir(parents=True)
    run = torch_e2e if args.stage.startswith("e2e_") else torch_component
    result = run(torch, args, stage_dir, device, dtype, sync)
    result["versions"] = {"torch": torch.__version__, "diffusers": diffusers.__version__,
                          "transformers": transformers.__version__}
    if cuda:
        result["gpu"] = torch.cuda.get_device_name(0)
    (stage_dir / "torch.json").write_text(json.dumps(result, indent=2))


# --------------------------------------------------------------------------------------------------
# The driver (`drive` subcommand): PyTorch side, ours, memory, the table
# --------------------------------------------------------------------------------------------------


def first_line(e):
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class GpuMemory:
    """Samples nvidia-smi's memory.used of GPU 0 every 100 ms for the whole run, with nvidia-smi's own
    timestamps (its output may arrive in bursts when piped)."""

    def __init__(self):
        cmd = ["nvidia-smi", "--query-gpu=timestamp,memory.used", "--format=csv,noheader,nounits", "-i", "0",
               "-lms", "100"]
        if shutil.which("stdbuf"):
            cmd = ["stdbuf", "-oL", *cmd]
        self.samples = []
        self.lock = threading.Lock()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        deadline = time.time() + 5
        while time.time() < deadline and len(self.samples) < 3:
            time.sleep(0.1)
        with self.lock:
            self.baseline = min((used for _, used in self.samples), default=0.0)

    def _read(self):
        for line in self.proc.stdout:
            sample = parse_smi_line(line)
            if sample:
                with self.lock:
                    self.samples.append(sample)

    def peak(self, window, wait=True):
        """Peak MiB used in [start, end] above the idle baseline (None without samples)."""
        start, end = window
        deadline = time.time() + (3 if wait else 0)
        while time.time() < deadline:
            with self.lock:
                if self.samples and self.samples[-1][0] >= end:
                    break
            time.sleep(0.1)
        with self.lock:
            inside = [used for t, used in self.samples if start <= t <= end]
            if not inside:
                # A window shorter than the sampling period: the first sample after it began.
                inside = [used for t, used in self.samples if t >= start][:1]
        return max(inside) - self.baseline if inside else None

    def stop(self):
        # Ctrl-C is how its loop mode is meant to end (and a chance to flush); SIGKILL if it lingers.
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.thread.join(timeout=5)


def parse_smi_line(line):
    """`2026/12/07 18:30:01.123, 1234` -> (epoch seconds, MiB); None for anything else."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != 2:
        return None
    try:
        stamp = datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
        return stamp, float(parts[1])
    except ValueError:
        return None


@dataclass
class Proc:
    """One finished process of a stage."""

    rc: object  # exit status, or "timeout"
    output: str
    rss_kib: object  # peak RSS of the process (None when it never started)
    window: list  # [start, end], epoch seconds

    def failure(self, side):
        what = "timed out" if self.rc == "timeout" else f"failed (exit {self.rc})"
        return f"{side} {what}: {last_error(self.output)}"


class Driver:
    def __init__(self, args):
        self.args = args
        self.cuda = args.device == "cuda"
        self.check_dir = Path(args.check_dir)
        self.bin = Path(args.bin)
        self.json_path = Path(args.json)
        self.deadline = time.time() + args.deadline if args.deadline else None
        wanted = args.only.split(",") if args.only else STAGES
        unknown = sorted(set(wanted) - set(STAGES))
        if unknown:
            raise SystemExit(f"unknown stage(s) {unknown}; stages: {','.join(STAGES)}")
        self.stages = [s for s in STAGES if s in wanted]
        self.log = open(args.log, "w")
        self.memory = GpuMemory() if self.cuda else None
        build = self.bin / "BUILD"
        self.results = {
            "machine": {"device": args.device, "small": args.small,
                        "ours_build": build.read_text().strip() if build.is_file() else "built here"},
            "settings": {"runs": args.runs, "warmup": args.warmup, "compile": args.compile},
            "rows": {},
        }
        if self.cuda:
            self.results["machine"]["gpu"] = smi_query("name,driver_version,memory.total")
            self.results["machine"]["idle_gpu_mib"] = self.memory.baseline

    def say(self, text):
        print(text, flush=True)
        self.log.write(text + "\n")
        self.log.flush()

    def remaining(self):
        return None if self.deadline is None else self.deadline - time.time()

    def run(self, tag, cmd, env=None):
        """Runs one side's process with its output streamed (prefixed) to the console and the log;
        killed (with its children) when the deadline passes."""
        remaining = self.remaining()
        if remaining is not None and remaining <= 0:
            return Proc("timeout", "", None, [time.time()] * 2)
        self.say(f"[{tag}] $ {' '.join(str(c) for c in cmd)}")
        start = time.time()
        proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", env={**os.environ, **(env or {})}, cwd=ROOT, start_new_session=True)
        timed_out = threading.Event()
        timer = None
        if remaining is not None:
            def kill():
                timed_out.set()
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass  # it ended just now
            timer = threading.Timer(remaining, kill)
            timer.start()
        lines = []
        for line in proc.stdout:
            # Progress bars redraw with \r; keep the last state of each line.
            line = line.rstrip("\n").split("\r")[-1]
            lines.append(line)
            self.say(f"[{tag}] {line}")
        # wait4 rather than wait: it also gives this child's own peak RSS.
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if timer:
            timer.cancel()
        rc = "timeout" if timed_out.is_set() else proc.returncode
        return Proc(rc, "\n".join(lines), usage.ru_maxrss, [start, time.time()])

    def torch_cmd(self, stage):
        cmd = [sys.executable, Path(__file__).resolve(), "torch", stage, "--device", self.args.device,
               "--check-dir", self.check_dir, "--runs", self.args.runs, "--warmup", self.args.warmup]
        if self.args.small:
            cmd.append("--small")
        if self.args.compile:
            cmd += ["--compile", "--compile-timeout", self.args.compile_timeout]
        return cmd

    def ours_cmd(self, stage):
        env = {}
        if self.args.ours_lib_path:
            # Only for ours: PyTorch finds its own CUDA libraries, and a changed search path could swap them.
            env["LD_LIBRARY_PATH"] = ":".join(p for p in (self.args.ours_lib_path, os.environ.get("LD_LIBRARY_PATH")) if p)
        if not stage.startswith("e2e_"):
            env.update(SD_BENCH_CHECK_DIR=str(self.check_dir), SD_BENCH_ONLY=stage, SD_BENCH_DEVICE=self.args.device,
                       CRITERION_HOME=str(ROOT / "target/criterion"))
            return [self.bin / "gpu", "--bench"], env
        side = 64 if self.args.small else 1024
        dtype = STAGE_INFO[stage][1] if self.cuda else "f32"
        common = ["-m", self.check_dir / stage / "pipeline", "--dtype", dtype, "-p", PROMPT, "--width", side,
                  "--height", side, "--seed", 0, "-o", self.check_dir / stage / "ours.png"]
        if not self.cuda:
            common.append("--cpu")
        if stage == "e2e_sdxl":
            return [self.bin / "txt2img", *common, "--variant", "sdxl", "--steps", 30, "--guidance", 5,
                    "--sampler", "Euler"], env
        return [self.bin / "flux", *common, "--steps", 4, "--max-sequence-length", 256], env

    def disk_short(self, stage):
        """Why a full-size stage cannot write its weights (None when it can): better skipped than a
        full disk halfway through a 24 GB save."""
        if self.args.small:
            return None
        need = WEIGHTS_GB[stage] * 1.1
        for component, (e2e, _) in HANDED_ON.items():
            if e2e == stage and (self.check_dir / component / "model").is_dir():
                need -= WEIGHTS_GB[component]
        free = shutil.disk_usage(self.check_dir).free / 1e9
        return f"skipped: needs about {need:.0f} GB of free disk, {free:.0f} GB free" if free < need else None

    def stage(self, stage, row):
        short = self.disk_short(stage)
        if short:
            row["status"] = short
            return
        torch_proc = self.run(f"{stage} torch", self.torch_cmd(stage))
        row["torch_rss_mib"] = kib_to_mib(torch_proc.rss_kib)
        if torch_proc.rc != 0:
            row["status"] = torch_proc.failure("PyTorch side")
            return
        torch_res = json.loads((self.check_dir / stage / "torch.json").read_text())
        row["torch"] = torch_res
        self.results["machine"].setdefault("versions", torch_res.get("versions"))
        ours = self.run(f"{stage} ours", *self.ours_cmd(stage))
        row["ours_rss_mib"] = kib_to_mib(ours.rss_kib)
        check = self.check_dir / stage / "check.json"
        if check.is_file():
            row["check"] = json.loads(check.read_text())
        if ours.rc != 0:
            row["status"] = ours.failure("ours")
            return
        if self.cuda and "running on the CPU" in ours.output:
            row["status"] = "ours ran on the CPU: the binary could not open the GPU (see the log)"
            return
        if stage.startswith("e2e_"):
            self.e2e_row(row, ours, torch_res)
        else:
            self.component_row(stage, row, torch_res)

    def component_row(self, stage, row, torch_res):
        ours = json.loads((self.check_dir / stage / "ours.json").read_text())
        estimates = ROOT / "target/criterion" / f"gpu_{stage}" / "ours/new/estimates.json"
        ours_ms = json.loads(estimates.read_text())["median"]["point_estimate"] / 1e6
        row.update(ours_ms=ours_ms, torch_ms=torch_res["eager_ms"], ratio=ours_ms / torch_res["eager_ms"],
                   rel_l2=row["check"]["rel_l2"], limit=row["check"]["limit"], ours_load_s=ours["load_s"])
        row["met"] = row["ratio"] <= row["target"]
        if "ms" in torch_res.get("compile", {}):
            row["compile_ms"] = torch_res["compile"]["ms"]
        # Both sides over the same phase: the warm-up/check forward and the timed runs.
        row["ours_window"], row["torch_window"] = ours["window"], torch_res["window"]
        self.peaks(row)
        row["status"] = "ok"

    def e2e_row(self, row, ours, torch_res):
        load = re.search(r"^loaded .* in ([0-9.]+)s$", ours.output, re.MULTILINE)
        gen = re.search(r"generate: ([0-9.]+) s", ours.output)
        if not gen:
            row["status"] = "ours printed no `generate: … s` line"
            return
        row.update(ours_s=float(gen.group(1)), torch_s=torch_res["generate_s"],
                   ours_load_s=float(load.group(1)) if load else None, torch_load_s=torch_res["load_s"])
        row["ratio"] = row["ours_s"] / row["torch_s"]
        # Both sides over loading and generating: ours' whole process, PyTorch's window after it built the folder.
        row["ours_window"], row["torch_window"] = ours.window, torch_res["window"]
        self.peaks(row)
        row["status"] = "ok"

    def peaks(self, row, wait=True):
        if self.memory:
            row["ours_peak_mib"] = self.memory.peak(row["ours_window"], wait)
            row["torch_peak_mib"] = self.memory.peak(row["torch_window"], wait)

    def cleanup(self, stage):
        if self.args.keep:
            return
        d = self.check_dir / stage
        if not (stage in HANDED_ON and HANDED_ON[stage][0] in self.stages):
            shutil.rmtree(d / "model", ignore_errors=True)
        shutil.rmtree(d / "pipeline", ignore_errors=True)

    def save(self):
        tmp = self.json_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=2, default=str))
        tmp.replace(self.json_path)

    def main(self):
        self.check_dir.mkdir(parents=True, exist_ok=True)
        self.say(f"gpu_bench: device {self.args.device}{' (tiny configs)' if self.args.small else ''}; "
                 f"stages {','.join(self.stages)}; results {self.json_path}")
        if self.cuda:
            self.say(f"GPU: {self.results['machine']['gpu']}; idle memory used {self.memory.baseline:.0f} MiB")
        self.say(f"free disk at {self.check_dir}: {shutil.disk_usage(self.check_dir).free / 1e9:.0f} GB")
        try:
            for stage in self.stages:
                label, _, target = STAGE_INFO[stage]
                row = {"label": label + (" (tiny)" if self.args.small else ""), "target": target}
                self.results["rows"][stage] = row
                if self.remaining() is not None and self.remaining() <= 0:
                    row["status"] = "not run (deadline)"
                    continue
                try:
                    self.stage(stage, row)
                except Exception as e:  # noqa: BLE001 - one broken stage must not lose the others
                    row["status"] = f"driver error: {type(e).__name__}: {first_line(e)}"
                finally:
                    self.cleanup(stage)
                    self.save()
                    self.say(f"== {stage}: {row.get('status')}")
        finally:
            if self.memory:
                self.memory.stop()
                # Again, now that nvidia-smi has flushed every sample.
                for row in self.results["rows"].values():
                    if row.get("status") == "ok":
                        self.peaks(row, wait=False)
            self.save()
            self.print_table()
            if not self.args.keep:
                for stage in self.stages:  # a model handed on to a stage that never took it over
                    shutil.rmtree(self.check_dir / stage / "model", ignore_errors=True)
        ok = all(r.get("status") == "ok" for r in self.results["rows"].values())
        return 0 if ok else 1

    def print_table(self):
        m = self.results["machine"]
        self.say("")
        self.say(f"device: {m.get('gpu', 'cpu')}; PyTorch/diffusers: {m.get('versions')}; ours: {m['ours_build']}")
        mem = "peak GPU MiB ours/torch" if self.cuda else "peak RSS MiB ours/torch"
        self.say(f"{'workload':34} {'ours ms':>9} {'torch ms':>9} {'ratio':>6} {'target':>6} {'met':>4} "
                 f"{'compile ms':>10} {mem:>24} {'rel L2 / limit':>18}")
        for stage, row in self.results["rows"].items():
            if not stage.startswith("e2e_"):
                self.say(self.component_line(row))
        e2e = [row for stage, row in self.results["rows"].items() if stage.startswith("e2e_")]
        if e2e:
            self.say("")
            self.say(f"{'end to end (generate)':34} {'ours s':>9} {'torch s':>9} {'ratio':>6} "
                     f"{'load s ours/torch':>18} {mem:>24}")
            for row in e2e:
                self.say(self.e2e_line(row))
        self.say("")
        self.say("ratio = ours / PyTorch eager (lower is better); targets: steps <= 1.0x, VAE <= 1.2x; memory: "
                 + ("nvidia-smi's peak minus idle, over the timed phase (end to end: load + generate)" if self.cuda
                    else "each whole process's peak RSS (PyTorch's also builds, saves and checks the model)"))
        self.say(f"written {self.json_path}")

    def mem_pair(self, row):
        if self.cuda:
            ours, torch = row.get("ours_peak_mib"), row.get("torch_peak_mib")
        else:
            ours, torch = row.get("ours_rss_mib"), row.get("torch_rss_mib")
        return f"{fmt(ours, '.0f')} / {fmt(torch, '.0f')}"

    def component_line(self, row):
        label = row["label"][:34]
        if row.get("status") != "ok":
            return f"{label:34} {row.get('status', 'not run')}"
        return (f"{label:34} {row['ours_ms']:9.2f} {row['torch_ms']:9.2f} {row['ratio']:6.2f} {row['target']:6.1f} "
                f"{'yes' if row['met'] else 'NO':>4} {fmt(row.get('compile_ms'), '.2f'):>10} {self.mem_pair(row):>24} "
                f"{row['rel_l2']:8.1e} / {row['limit']:7.1e}")

    def e2e_line(self, row):
        label = row["label"][:34]
        if row.get("status") != "ok":
            return f"{label:34} {row.get('status', 'not run')}"
        load = f"{fmt(row.get('ours_load_s'), '.1f')} / {row['torch_load_s']:.1f}"
        return (f"{label:34} {row['ours_s']:9.2f} {row['torch_s']:9.2f} {row['ratio']:6.2f} {load:>18} "
                f"{self.mem_pair(row):>24}")


def kib_to_mib(kib):
    return kib / 1024 if kib else None


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def last_error(output):
    """The most telling line of a failed process's output."""
    lines = [l for l in output.splitlines() if l.strip()]
    for line in reversed(lines):
        if re.search(r"error|Error|MISMATCH|panicked|differs", line):
            return line.strip()[:300]
    return lines[-1].strip()[:300] if lines else "no output"


def smi_query(fields):
    out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader", "-i", "0"],
                         capture_output=True, text=True, check=False)
    return out.stdout.strip() or out.stderr.strip()


# --------------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)

    def common(p):
        p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
        p.add_argument("--small", action="store_true", help="tiny configs (smoke test of the harness)")
        p.add_argument("--check-dir", default=str(ROOT / "target/gpu_bench/check"))
        p.add_argument("--runs", type=int, help="timed PyTorch runs per workload (median; default 10 on cuda, 3 on cpu)")
        p.add_argument("--warmup", type=int, help="untimed runs first (default 3 on cuda, 1 on cpu)")
        p.add_argument("--compile", action="store_true", help="also time torch.compile (adds minutes per stage)")
        p.add_argument("--compile-timeout", type=int, default=240, help="seconds torch.compile may take per stage")

    t = sub.add_parser("torch", help="one stage's PyTorch side")
    t.add_argument("stage", choices=STAGES)
    common(t)
    d = sub.add_parser("drive", help="every selected stage, both sides, and the table")
    common(d)
    d.add_argument("--bin", required=True, help="folder with our `gpu` bench binary and `txt2img`/`flux` examples")
    d.add_argument("--only", help=f"comma list of stages ({','.join(STAGES)})")
    d.add_argument("--json", default=str(ROOT / "target/gpu_bench.json"))
    d.add_argument("--log", default=str(ROOT / "target/gpu_bench/gpu_bench.log"))
    d.add_argument("--keep", action="store_true", help="keep every stage's weights")
    d.add_argument("--ours-lib-path", help="folders prepended to LD_LIBRARY_PATH for our binaries only (CUDA libraries)")
    d.add_argument("--deadline", type=float, help="seconds from start after which running processes are killed "
                   "and remaining stages skipped, so the table still prints inside an outer time limit")
    args = parser.parse_args()
    cpu = args.device == "cpu"
    args.runs = args.runs or (3 if cpu else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if cpu else 3)
    if args.cmd == "torch":
        torch_main(args)
        return 0
    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    return Driver(args).main()


if __name__ == "__main__":
    sys.exit(main())
