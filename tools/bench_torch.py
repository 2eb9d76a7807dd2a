#!/usr/bin/env python3
"""PyTorch/diffusers baseline for benches/unet.rs and benches/vae.rs.

Same workloads, random weights, F32, CPU, 2 threads:
  unet: one SD 1.5 UNet forward, batch 2, 64x64 latent, timestep 500, context [2, 77, 768]
  vae:  SD VAE decode of [1, 4, 64, 64] into a 512x512 image
Prints one line per workload and, with --json, writes {"unet_ms": ..., "vae_ms": ...} (medians).
--small uses the same tiny configs as SD_BENCH_SMALL=1 on the Rust side.
--check-dir DIR saves each model as a diffusers folder (DIR/unet, DIR/vae) with io.safetensors
(its inputs and PyTorch's output) so the Rust benches run on the same weights and inputs and
check their output against PyTorch's before timing (SD_BENCH_CHECK_DIR=DIR).
"""

import argparse
import json
import statistics
import time

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file


def timed(fn, warmup, runs):
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples), samples


def unet_workload(small):
    if small:
        channels, cross, heads, side = (32, 64, 64, 64), 32, 2, 16
    else:
        channels, cross, heads, side = (320, 640, 1280, 1280), 768, 8, 64
    unet = UNet2DConditionModel(
        sample_size=side,
        in_channels=4,
        out_channels=4,
        block_out_channels=channels,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=2,
        cross_attention_dim=cross,
        attention_head_dim=heads,
        norm_num_groups=32,
    ).eval()
    sample = torch.randn(2, 4, side, side)
    context = torch.randn(2, 77, cross)
    timestep = torch.tensor([500.0])
    return unet, {"sample": sample, "context": context}, lambda: unet(sample, timestep, encoder_hidden_states=context).sample


def vae_workload(small):
    if small:
        channels, layers, side = (32, 32, 64, 64), 1, 16
    else:
        channels, layers, side = (128, 256, 512, 512), 2, 64
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=channels,
        layers_per_block=layers,
        latent_channels=4,
        norm_num_groups=32,
    ).eval()
    latents = torch.randn(1, 4, side, side)
    return vae, {"latents": latents}, lambda: vae.decode(latents).sample


def save_check(model, inputs, fn, folder):
    """The model as a diffusers folder plus io.safetensors: its inputs and PyTorch's output."""
    import os

    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tensors = {k: v.contiguous() for k, v in inputs.items()}
    tensors["output"] = fn().contiguous()
    save_file(tensors, os.path.join(folder, "io.safetensors"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per workload (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--small", action="store_true", help="tiny configs, to check the harness")
    parser.add_argument("--only", choices=["unet", "vae"], help="run one workload")
    parser.add_argument("--json", help="write the medians (ms) to this file")
    parser.add_argument("--check-dir", help="save weights, inputs and outputs here for the Rust benches' check")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = {}
    with torch.inference_mode():
        for name, build in (("unet", unet_workload), ("vae", vae_workload)):
            if args.only and args.only != name:
                continue
            model, inputs, fn = build(args.small)
            if args.check_dir:
                save_check(model, inputs, fn, f"{args.check_dir}/{name}")
            median, samples = timed(fn, args.warmup, args.runs)
            results[f"{name}_ms"] = median
            print(f"torch {name}: median {median:.1f} ms over {args.runs} runs "
                  f"(min {min(samples):.1f}, max {max(samples):.1f}); torch {torch.__version__}, "
                  f"{torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()} kernels", flush=True)
            del model, fn
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
