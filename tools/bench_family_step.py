#!/usr/bin/env python3
"""PyTorch/diffusers baseline for benches/family_step.rs: one full-size transformer step per newer family.

Random weights (diffusers' own init), CPU, 2 threads, one model call of a 512^2 image without CFG:
  sd3_medium:   SD3Transformer2DModel with SD 3.5 Medium's config (2.5B, MMDiT-X), F32:
                hidden_states [1, 16, 64, 64], encoder_hidden_states [1, 77 + 256, 4096] (CLIP-L/G + T5),
                pooled_projections [1, 2048], timestep [500.0] (sigma * 1000, as StableDiffusion3Pipeline passes it)
  zimage_turbo: ZImageTransformer2DModel with Z-Image-Turbo's published transformer/config.json (6.2B), built
                directly in BF16 (no F32 copy: F32 would take 24 GB) and run in BF16, as diffusers users run it on
                a CPU: x = [latent [16, 1, 64, 64]], cap_feats = [[64, 2560]] (Qwen3 features), t = [0.5]
                ((1000 - t) / 1000 at t = 500, as ZImagePipeline passes it)
  flux2_klein:  Flux2Transformer2DModel with FLUX.2 [klein] 4B's transformer/config.json (3.88B, 5 double + 20
                single blocks of width 3072), F32 (15.5 GB: one copy per process fits; the two sides never run at
                once): hidden_states [1, 1024, 128] (the pipeline's [1, 128, 32, 32] latents packed: a 512^2 image
                is 64x64 VAE latents of 32 channels, 2x2-patchified), encoder_hidden_states [1, 512, 7680] (Qwen3
                features padded to max_sequence_length 512, the klein pipeline's default), timestep [0.5]
                (t / 1000 at t = 500, as Flux2KleinPipeline passes it), guidance None, img_ids / txt_ids built by
                Flux2KleinPipeline's own _prepare_latent_ids / _prepare_text_ids (saved with the inputs)
The forward that gives the checked output is the first untimed run; then --runs timed ones (median printed).
Prints, per workload, the median ms and this process's peak RSS (ru_maxrss; with several workloads each runs in
its own child process, so each peak is its own). --json writes {"<name>_ms": ..., "<name>_peak_rss_kib": ...}.
--only NAME (repeatable) picks workloads (all by default); --small uses the tiny configs of SD_BENCH_SMALL=1.
--check-dir DIR saves each model as a diffusers transformer folder (DIR/<name>, safetensors) with io.safetensors
(its inputs and PyTorch's `output`, F32) and reference.json (dtype and the relative-L2 limit our output is held
to: 1e-4 for F32 (sd3_medium, flux2_klein); for BF16 (zimage_turbo) max(4 x d, 1e-3) where d is PyTorch's own
BF16 output's distance to an F32 forward of the same BF16-rounded weights, computed after timing with each large
Linear weight widened to F32 one layer at a time, so it never needs the 24 GB F32 copy).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel, SD3Transformer2DModel, ZImageTransformer2DModel
from safetensors.torch import save_file

WORKLOADS = ("sd3_medium", "zimage_turbo", "flux2_klein")

# stabilityai/stable-diffusion-3.5-medium transformer/config.json: the MMDiT-X, 24 blocks of width 1536, dual
# attention in blocks 0-12, RMS QK norm.
SD35_MEDIUM_CONFIG = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                          num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                          pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                          dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")

# Tongyi-MAI/Z-Image-Turbo transformer/config.json (diffusers 0.36.0.dev0), as published; the hub is not
# reachable from here, so the values are copied (they are also diffusers' class defaults except axes_lens,
# whose default is [1024, 512, 512]; axes_lens only sizes the rotary lookup tables).
ZIMAGE_TURBO_CONFIG = dict(
    all_patch_size=(2,),
    all_f_patch_size=(1,),
    in_channels=16,
    dim=3840,
    n_layers=30,
    n_refiner_layers=2,
    n_heads=30,
    n_kv_heads=30,
    norm_eps=1e-5,
    qk_norm=True,
    cap_feat_dim=2560,
    rope_theta=256.0,
    t_scale=1000.0,
    axes_dims=[32, 48, 48],
    axes_lens=[1536, 512, 512],
)

# black-forest-labs/FLUX.2-klein-4B transformer/config.json (the hub is not reachable from here): the "klein-4b"
# config of diffusers' scripts/convert_flux2_to_diffusers.py, which produced the published folders; the same values
# appear verbatim, said to be copied from the hub's config.json (identical for FLUX.2-klein-base-4B), in other public
# loaders. Width 24 x 128 = 3072; joint_attention_dim 7680 = 3 x Qwen3-4B's hidden size 2560 (hidden states 9, 18,
# 27 stacked); SwiGLU MLPs of 3 x 3072; no guidance embedder (klein is guidance-free: the pipeline passes
# guidance=None). 3,875,544,576 parameters.
FLUX2_KLEIN_4B_CONFIG = dict(
    patch_size=1,
    in_channels=128,
    out_channels=None,
    num_layers=5,
    num_single_layers=20,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=7680,
    timestep_guidance_channels=256,
    mlp_ratio=3.0,
    axes_dims_rope=(32, 32, 32, 32),
    rope_theta=2000,
    eps=1e-6,
    guidance_embeds=False,
)


def peak_rss_kib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def rel_l2(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def check_output(name, out):
    return torch.isfinite(out).all() and out.abs().max() > 0


def sd3_workload(small):
    if small:
        cfg = dict(sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
                   num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32,
                   out_channels=16, pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")
        side, txt = 16, 16
    else:
        cfg = SD35_MEDIUM_CONFIG
        side, txt = 64, 77 + 256
    model = SD3Transformer2DModel(**cfg).eval()
    x = dict(
        hidden_states=torch.randn(1, 16, side, side),
        encoder_hidden_states=torch.randn(1, txt, cfg["joint_attention_dim"]),
        pooled_projections=torch.randn(1, cfg["pooled_projection_dim"]),
        timestep=torch.tensor([500.0]),
    )

    def fn():
        return model(**x, return_dict=False)[0]

    final = list(model.norm_out.parameters()) + list(model.proj_out.parameters())
    return model, x, fn, final, torch.float32


def zimage_workload(small):
    if small:
        cfg = dict(ZIMAGE_TURBO_CONFIG, dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
                   axes_dims=[8, 12, 12], axes_lens=[1536, 64, 64])
        # 24 caption tokens: padded to 32 with cap_pad_token, so the small run covers the padding too.
        side, txt = 16, 24
    else:
        cfg = ZIMAGE_TURBO_CONFIG
        side, txt = 64, 64
    # Built in BF16 directly: every parameter is allocated and initialised in BF16, never an F32 copy.
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = ZImageTransformer2DModel(**cfg).eval()
    finally:
        torch.set_default_dtype(default)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with torch.no_grad():
        # The pad tokens start at zero; any value is as likely in a trained model, and zero would hide a
        # pad-token bug in the small run.
        model.x_pad_token.normal_(0.0, 0.5)
        model.cap_pad_token.normal_(0.0, 0.5)
    x = dict(
        hidden_states=torch.randn(16, 1, side, side).bfloat16(),
        encoder_hidden_states=torch.randn(txt, cfg["cap_feat_dim"]).bfloat16(),
        timestep=torch.tensor([0.5]),
    )

    def fn(inputs=x):
        return model([inputs["hidden_states"]], inputs["timestep"], [inputs["encoder_hidden_states"]], return_dict=False)[0][0]

    final = list(model.all_final_layer.parameters())
    return model, x, fn, final, torch.bfloat16


def flux2_workload(small):
    if small:
        cfg = dict(FLUX2_KLEIN_4B_CONFIG, in_channels=32, num_layers=2, num_single_layers=2, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=48, timestep_guidance_channels=32,
                   axes_dims_rope=(4, 4, 4, 4))
        side, txt = 8, 24
    else:
        cfg = FLUX2_KLEIN_4B_CONFIG
        side, txt = 32, 512
    model = Flux2Transformer2DModel(**cfg).eval()
    # As Flux2KleinPipeline prepares them: latents [B, 4 * 32, H / 16, W / 16], their position ids (0, h, w, 0),
    # packed to [B, H * W / 256, 128]; the prompt features' ids (0, 0, 0, l); the timestep t / 1000.
    latents = torch.randn(1, cfg["in_channels"], side, side)
    encoder_hidden_states = torch.randn(1, txt, cfg["joint_attention_dim"])
    x = dict(
        hidden_states=Flux2KleinPipeline._pack_latents(latents),
        encoder_hidden_states=encoder_hidden_states,
        timestep=torch.tensor([500.0]) / 1000,
        img_ids=Flux2KleinPipeline._prepare_latent_ids(latents),
        txt_ids=Flux2KleinPipeline._prepare_text_ids(encoder_hidden_states),
    )

    def fn():
        return model(**x, guidance=None, return_dict=False)[0]

    final = list(model.norm_out.parameters()) + list(model.proj_out.parameters())
    return model, x, fn, final, torch.float32


def f32_reference(model, inputs, fn):
    """PyTorch's forward in F32 on the same BF16-rounded weights, without an F32 copy of the model: small
    tensors (norms, biases, embedders, modulation) are widened in place, and each large Linear weight is
    widened for its own product only."""
    big = 1 << 22
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.numel() < big:
                p.data = p.data.float()
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.forward = (lambda mod: lambda x: F.linear(
                    x, mod.weight.to(x.dtype), None if mod.bias is None else mod.bias.to(x.dtype)))(m)
    x32 = {k: v.float() if v.is_floating_point() else v for k, v in inputs.items()}
    return fn(x32).float()


def save_check(name, model, inputs, out, dtype, folder):
    os.makedirs(folder, exist_ok=True)
    # Shards of at most 5 GB (Z-Image's 12 GB and FLUX.2 klein's 15.5 GB go into three and four files), read back
    # through the shard index.
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="5GB")
    tensors = {k: v.contiguous() for k, v in inputs.items()}
    tensors["output"] = out.float().contiguous()
    save_file(tensors, os.path.join(folder, "io.safetensors"))
    # F32: 1e-4 on both sides. BF16: 1e-2 until the F32 reference after timing replaces it (see run_one).
    ref = {"dtype": "f32", "rel_l2_limit": 1e-4} if dtype == torch.float32 else {"dtype": "bf16", "rel_l2_limit": 1e-2}
    with open(os.path.join(folder, "reference.json"), "w") as f:
        json.dump(ref, f, indent=2)


def run_one(name, args):
    torch.manual_seed(WORKLOADS.index(name))
    builders = {"sd3_medium": sd3_workload, "zimage_turbo": zimage_workload, "flux2_klein": flux2_workload}
    result = {}
    with torch.inference_mode():
        start = time.perf_counter()
        model, inputs, fn, final, dtype = builders[name](args.small)
        result[f"{name}_build_s"] = time.perf_counter() - start
        # The first forward is the first untimed run.
        out = fn()
        if not check_output(name, out):
            # A zero-initialised final layer would make the check compare zeros.
            with torch.no_grad():
                for p in final:
                    p.normal_(0.0, 0.02)
            out = fn()
        if not check_output(name, out):
            raise SystemExit(f"{name}: PyTorch's output is degenerate; nothing to check against")
        folder = os.path.join(args.check_dir, name) if args.check_dir else None
        if folder:
            save_check(name, model, inputs, out, dtype, folder)
        for _ in range(max(args.warmup - 1, 0)):
            fn()
        samples = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        median = statistics.median(samples)
        rss = peak_rss_kib()
        result.update({f"{name}_ms": median, f"{name}_samples_ms": samples, f"{name}_peak_rss_kib": rss,
                       f"{name}_dtype": str(dtype).removeprefix("torch."),
                       f"{name}_params": sum(p.numel() for p in model.parameters())})
        print(f"torch {name}: median {median:.1f} ms over {args.runs} runs (min {min(samples):.1f}, "
              f"max {max(samples):.1f}); {str(dtype).removeprefix('torch.')}, "
              f"{result[f'{name}_params'] / 1e6:.1f}M parameters; peak RSS {rss / 1024:.0f} MiB; torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()} kernels", flush=True)
    if folder and dtype != torch.float32:
        start = time.perf_counter()
        with torch.inference_mode():
            lowp = rel_l2(out, f32_reference(model, inputs, fn))
        limit = max(4 * lowp, 1e-3)
        with open(os.path.join(folder, "reference.json"), "w") as f:
            json.dump({"dtype": "bf16", "rel_l2_limit": limit, "torch_bf16_vs_f32_rel_l2": lowp}, f, indent=2)
        result[f"{name}_bf16_vs_f32_rel_l2"] = lowp
        print(f"torch {name}: BF16 output vs F32 forward on the same weights: relative L2 {lowp:.3e}; "
              f"limit for ours {limit:.2e} ({time.perf_counter() - start:.0f} s)", flush=True)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per workload (median reported)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed runs first (the forward that gives the checked output is the first)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--small", action="store_true", help="tiny configs, to check the harness")
    parser.add_argument("--only", choices=WORKLOADS, action="append",
                        help="run this workload (repeatable; all by default)")
    parser.add_argument("--json", help="write the medians (ms) and peak RSS (KiB) to this file")
    parser.add_argument("--check-dir", help="save weights, inputs and output here for benches/family_step.rs")
    args = parser.parse_args()
    names = [n for n in WORKLOADS if not args.only or n in args.only]

    results = {}
    if len(names) > 1:
        # One child per workload: ru_maxrss only grows, so each workload's peak needs its own process.
        for name in names:
            with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
                argv = [sys.executable, os.path.abspath(__file__), "--only", name, "--json", tmp.name,
                        "--runs", str(args.runs), "--warmup", str(args.warmup), "--threads", str(args.threads)]
                argv += ["--small"] if args.small else []
                argv += ["--check-dir", args.check_dir] if args.check_dir else []
                subprocess.run(argv, check=True)
                results.update(json.load(open(tmp.name)))
    else:
        torch.set_num_threads(args.threads)
        results = run_one(names[0], args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
