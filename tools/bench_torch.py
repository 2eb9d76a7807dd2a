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


def openvino_timed(model, inputs, reference, threads, warmup, runs):
    """The same module converted with OpenVINO (what FastSD CPU and optimum-intel run), compiled
    for the CPU in F32 with `threads` threads; returns (median ms, samples, rel L2 to PyTorch)."""
    import openvino as ov

    class Plain(torch.nn.Module):
        # convert_model traces a forward over plain tensors; diffusers' return objects do not trace.
        def __init__(self, inner, kind):
            super().__init__()
            self.inner, self.kind = inner, kind

        def forward(self, *xs):
            if self.kind == "unet":
                return self.inner(xs[0], torch.tensor([500.0]), encoder_hidden_states=xs[1]).sample
            return self.inner.decode(xs[0]).sample

    kind = "unet" if "context" in inputs else "vae"
    args = tuple(inputs[k] for k in (("sample", "context") if kind == "unet" else ("latents",)))
    start = time.perf_counter()
    converted = ov.convert_model(Plain(model, kind), example_input=args)
    compiled = ov.Core().compile_model(converted, "CPU", {
        "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"})
    print(f"openvino {kind}: converted and compiled in {time.perf_counter() - start:.0f} s", flush=True)
    arrays = [a.numpy() for a in args]
    out = torch.from_numpy(compiled(arrays)[0])
    rel = float((out - reference).norm() / reference.norm())
    median, samples = timed(lambda: compiled(arrays), warmup, runs)
    return median, samples, rel


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per workload (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--small", action="store_true", help="tiny configs, to check the harness")
    parser.add_argument("--only", choices=["unet", "vae"], help="run one workload")
    parser.add_argument("--json", help="write the medians (ms) to this file")
    parser.add_argument("--check-dir", help="save weights, inputs and outputs here for the Rust benches' check")
    parser.add_argument("--openvino", action="store_true", help="also time OpenVINO (pip install openvino) on the same model")
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
            if args.openvino:
                ov_median, ov_samples, rel = openvino_timed(model, inputs, fn(), args.threads, args.warmup, args.runs)
                results[f"{name}_openvino_ms"] = ov_median
                results[f"{name}_openvino_rel_l2"] = rel
                print(f"openvino {name}: median {ov_median:.1f} ms over {args.runs} runs "
                      f"(min {min(ov_samples):.1f}, max {max(ov_samples):.1f}); relative L2 to torch {rel:.2e}", flush=True)
            del model, fn
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
