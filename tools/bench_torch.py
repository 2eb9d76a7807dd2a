#!/usr/bin/env python3
"""PyTorch/diffusers/transformers baseline for benches/{unet,vae,clip,flux_block}.rs.

Same workloads, random weights (each library's default init), F32, CPU, 2 threads:
  unet:        one SD 1.5 UNet forward, batch 2, 64x64 latent, timestep 500, context [2, 77, 768]
  vae:         SD VAE decode of [1, 4, 64, 64] into a 512x512 image
  clip:        SD 1.5's text encoder (CLIP ViT-L/14, transformers CLIPTextModel), input_ids [2, 77]
               (a prompt and the empty prompt, as classifier-free guidance encodes them); output
               last_hidden_state
  flux_double: FLUX.1 transformer at full width with one double-stream block and no single block
  flux_single: the same with one single-stream block and no double block
               (both: 4096 image tokens = a 1024^2 image's 128^2 latent packed 2x2, 512 T5 tokens,
               timestep 0.5 = sigma as FluxPipeline passes it, no guidance embedding; the whole
               transformer runs, so its input embedders and final layer are timed too, under 2 %
               of one block's work at 4608 tokens; the full model does not fit 23 GiB in F32)
Prints one line per workload and, with --json, writes {"unet_ms": ..., "vae_ms": ..., ...} (medians).
--only NAME (repeatable) runs some workloads; all of them by default.
--small uses the same tiny configs as SD_BENCH_SMALL=1 on the Rust side.
--check-dir DIR saves each model as a diffusers/transformers folder (DIR/<workload>) with
io.safetensors (its inputs and PyTorch's output) so the Rust benches run on the same weights and
inputs and check their output against PyTorch's before timing (SD_BENCH_CHECK_DIR=DIR).
"""

import argparse
import json
import statistics
import time

import torch
from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

WORKLOADS = ("unet", "vae", "clip", "flux_double", "flux_single")


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


def clip_workload(small):
    # SD 1.5's text_encoder/config.json (openai/clip-vit-large-patch14); eos_token_id 2 is its legacy
    # value (pooling by argmax), which our loader follows too; the check compares last_hidden_state.
    common = dict(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                  bos_token_id=0, eos_token_id=2, pad_token_id=1)
    if small:
        cfg = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, **common)
    else:
        cfg = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                             projection_dim=768, **common)
    model = CLIPTextModel(cfg).eval()
    # What CLIPTokenizer gives SD 1.5 for a 20-token prompt and for "": <|startoftext|>, the tokens,
    # then <|endoftext|> (49407) to 77 tokens, which SD 1.5's tokenizer also pads with.
    bos, eos = 49406, 49407
    prompt = torch.randint(0, bos, (20,)).tolist()
    rows = [[bos] + prompt + [eos] * (76 - len(prompt)), [bos] + [eos] * 76]
    input_ids = torch.tensor(rows, dtype=torch.int64)
    return model, {"input_ids": input_ids}, lambda: model(input_ids=input_ids).last_hidden_state


def flux_workload(small, double):
    if small:
        width = dict(num_attention_heads=2, attention_head_dim=16, joint_attention_dim=32,
                     pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
        grid, txt = 8, 16
    else:
        width = dict(num_attention_heads=24, attention_head_dim=128, joint_attention_dim=4096,
                     pooled_projection_dim=768, axes_dims_rope=(16, 56, 56))
        # 1024^2 image -> 128^2 latent -> 64^2 packed tokens; dev's T5 sequence of 512 tokens.
        grid, txt = 64, 512
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, guidance_embeds=False,
                                   num_layers=1 if double else 0, num_single_layers=0 if double else 1,
                                   **width).eval()
    x = dict(
        hidden_states=torch.randn(1, grid * grid, 64),
        encoder_hidden_states=torch.randn(1, txt, width["joint_attention_dim"]),
        pooled_projections=torch.randn(1, width["pooled_projection_dim"]),
        # The pipeline passes sigma (t / 1000); the model scales it by 1000 itself.
        timestep=torch.tensor([0.5]),
        img_ids=FluxPipeline._prepare_latent_image_ids(1, grid, grid, "cpu", torch.float32),
        txt_ids=torch.zeros(txt, 3),
    )

    def fn():
        return model(**x, return_dict=False)[0]

    out = fn()
    if not torch.isfinite(out).all() or out.abs().max() == 0:
        # Some diffusers versions zero-initialise the final layer, which would make the check compare zeros.
        with torch.no_grad():
            for p in list(model.norm_out.parameters()) + list(model.proj_out.parameters()):
                p.normal_(0.0, 0.02)
        out = fn()
    if not torch.isfinite(out).all() or out.abs().max() == 0:
        raise SystemExit(f"flux_{'double' if double else 'single'}: PyTorch's output is degenerate; nothing to check against")
    return model, x, fn


def save_check(model, inputs, fn, folder):
    """The model as a diffusers (or transformers) folder plus io.safetensors: its inputs and PyTorch's output."""
    import os

    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    if isinstance(model, CLIPTextModel):
        # transformers >= 5.6 saves CLIPTextModel without `text_model.`; every real SD repo (and so our
        # loader) has it.
        from safetensors.torch import load_file

        path = os.path.join(folder, "model.safetensors")
        state = load_file(path)
        save_file({k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v
                   for k, v in state.items()}, path, metadata={"format": "pt"})
    tensors = {k: v.contiguous() for k, v in inputs.items()}
    tensors["output"] = fn().contiguous()
    save_file(tensors, os.path.join(folder, "io.safetensors"))


# Each workload's inputs in the order OpenVINO's traced forward takes them, and that forward.
OPENVINO_FORWARD = {
    "unet": (("sample", "context"), lambda m, xs: m(xs[0], torch.tensor([500.0]), encoder_hidden_states=xs[1]).sample),
    "vae": (("latents",), lambda m, xs: m.decode(xs[0]).sample),
    "clip": (("input_ids",), lambda m, xs: m(input_ids=xs[0]).last_hidden_state),
}
FLUX_INPUTS = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids")
for _flux in ("flux_double", "flux_single"):
    OPENVINO_FORWARD[_flux] = (FLUX_INPUTS, lambda m, xs: m(**dict(zip(FLUX_INPUTS, xs)), return_dict=False)[0])


def openvino_timed(name, model, inputs, reference, threads, warmup, runs):
    """The same module converted with OpenVINO (what FastSD CPU and optimum-intel run), compiled
    for the CPU in F32 with `threads` threads; returns (median ms, samples, rel L2 to PyTorch)."""
    import openvino as ov

    keys, forward = OPENVINO_FORWARD[name]

    class Plain(torch.nn.Module):
        # convert_model traces a forward over plain tensors; diffusers' return objects do not trace.
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *xs):
            return forward(self.inner, xs)

    args = tuple(inputs[k] for k in keys)
    start = time.perf_counter()
    converted = ov.convert_model(Plain(model), example_input=args)
    compiled = ov.Core().compile_model(converted, "CPU", {
        "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"})
    print(f"openvino {name}: converted and compiled in {time.perf_counter() - start:.0f} s", flush=True)
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
    parser.add_argument("--only", choices=WORKLOADS, action="append",
                        help="run this workload (repeatable; all of them by default)")
    parser.add_argument("--json", help="write the medians (ms) to this file")
    parser.add_argument("--check-dir", help="save weights, inputs and outputs here for the Rust benches' check")
    parser.add_argument("--openvino", action="store_true", help="also time OpenVINO (pip install openvino) on the same model")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    builders = {
        "unet": unet_workload,
        "vae": vae_workload,
        "clip": clip_workload,
        "flux_double": lambda small: flux_workload(small, double=True),
        "flux_single": lambda small: flux_workload(small, double=False),
    }
    results = {}
    with torch.inference_mode():
        for name in WORKLOADS:
            if args.only and name not in args.only:
                continue
            # Seeded per workload, so a workload's weights and inputs do not depend on which ran before it
            # (a run split with SD_BENCH_STAGES builds the same models as a full one).
            torch.manual_seed(WORKLOADS.index(name))
            model, inputs, fn = builders[name](args.small)
            if args.check_dir:
                save_check(model, inputs, fn, f"{args.check_dir}/{name}")
            median, samples = timed(fn, args.warmup, args.runs)
            results[f"{name}_ms"] = median
            print(f"torch {name}: median {median:.1f} ms over {args.runs} runs "
                  f"(min {min(samples):.1f}, max {max(samples):.1f}); torch {torch.__version__}, "
                  f"{torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()} kernels", flush=True)
            if args.openvino:
                ov_median, ov_samples, rel = openvino_timed(name, model, inputs, fn(), args.threads, args.warmup, args.runs)
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
