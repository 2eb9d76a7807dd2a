#!/usr/bin/env python3
"""Full-size random-weight diffusers folders of the newer families, for tools/family_memory.sh.

    family_memory.py build FAMILY OUT     # FAMILY: sd35_medium, flux2_klein_4b, zimage_turbo
    family_memory.py run OUT.json CMD...  # runs CMD, records its peak memory (see `measure`)
    family_memory.py diffusers FOLDER SIZE OUT.png   # diffusers' pipeline on FOLDER, bf16, one step

`build` takes the tiny fixture folder of the family (fixtures/sd3/medium, fixtures/flux2/klein,
fixtures/zimage/turbo): its tokenizers, scheduler and model_index.json as they are, and every model component's
config.json with the published full-size values below written over it. Each model is built on PyTorch's meta
device (no memory), and its weights are written as BF16 (what Z-Image Turbo and FLUX.2 [klein] ship in) random
values in 2 GB shards with an index, as the published folders are sharded. Only the tensor names the tiny
fixture's file holds are written (so tied or derived tensors, such as Qwen3ForCausalLM's lm_head, are left out as
in the published files), and every name the fixture holds must exist at full size. Matrices are drawn from
N(0, 1/fan_in) so activations stay in range; norm weights are 1, biases 0. The values are random: this measures
memory, not images.

The published configs are copied from the model cards' config.json files (the hub is not reachable from here):
  SD 3.5 Medium: SD3Transformer2DModel 2.5 B (24 MMDiT-X blocks, width 1536, dual attention in blocks 0-12),
    CLIP-L (CLIPTextModelWithProjection, 12 x 768), OpenCLIP bigG (32 x 1280), T5-XXL v1.1 encoder (24 x 4096,
    d_ff 10240, 64 heads), a 16-channel AutoencoderKL.
  FLUX.2 [klein] 4B: Flux2Transformer2DModel 3.88 B (5 double + 20 single blocks of width 3072), Qwen3-4B
    (Qwen3ForCausalLM, 36 layers of 2560), AutoencoderKLFlux2 (32 latent channels), distilled (4 steps, no CFG).
  Z-Image Turbo: ZImageTransformer2DModel 6.15 B (30 layers of 3840), Qwen3-4B (Qwen3Model), the FLUX.1
    AutoencoderKL (16 latent channels).
"""

import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# `run` must not import torch: the wrapper's own memory would sit beside the measured process's.
if len(sys.argv) < 2 or sys.argv[1] != "run":
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT / "tools"))
    from bench_family_step import FLUX2_KLEIN_4B_CONFIG, SD35_MEDIUM_CONFIG, ZIMAGE_TURBO_CONFIG  # noqa: E402

SHARD_BYTES = 2 << 30

# Qwen/Qwen3-4B config.json (the text encoder of Z-Image and FLUX.2 [klein] 4B).
QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                rms_norm_eps=1e-6, layer_types=["full_attention"] * 36, max_window_layers=36,
                rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"})
# The FLUX.1 / SD 3 VAE layout (16 latent channels), FLUX.2's with 32.
VAE_BLOCKS = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32,
                  down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, projection_dim=1280, num_hidden_layers=32,
              num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu")
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
              tie_word_embeddings=False)


def families():
    """Per family: its tiny fixture folder, the full-size config of each model component, model_index changes."""
    return {
        "sd35_medium": dict(
            fixture="fixtures/sd3/medium",
            components={
                "transformer": dict(SD35_MEDIUM_CONFIG, dual_attention_layers=list(SD35_MEDIUM_CONFIG["dual_attention_layers"])),
                "text_encoder": CLIP_L,
                "text_encoder_2": CLIP_G,
                "text_encoder_3": T5_XXL,
                "vae": dict(VAE_BLOCKS, sample_size=1024),
            },
            model_index={},
        ),
        "flux2_klein_4b": dict(
            fixture="fixtures/flux2/klein",
            components={
                "transformer": dict(FLUX2_KLEIN_4B_CONFIG, axes_dims_rope=list(FLUX2_KLEIN_4B_CONFIG["axes_dims_rope"])),
                "text_encoder": dict(QWEN3_4B, tie_word_embeddings=True),
                "vae": dict(VAE_BLOCKS, latent_channels=32, sample_size=1024),
            },
            model_index={"is_distilled": True},
        ),
        "zimage_turbo": dict(
            fixture="fixtures/zimage/turbo",
            components={
                "transformer": dict(ZIMAGE_TURBO_CONFIG, all_patch_size=[2], all_f_patch_size=[1]),
                "text_encoder": dict(QWEN3_4B, tie_word_embeddings=False),
                "vae": dict(VAE_BLOCKS, sample_size=1024),
            },
            model_index={},
        ),
    }


def pattern(name):
    return re.sub(r"\.\d+\.", ".N.", name)


def weight_files(folder):
    files = sorted(p for p in folder.iterdir() if p.suffix == ".safetensors")
    if not files:
        raise SystemExit(f"{folder}: no safetensors file")
    return files


def meta_model(folder, cfg):
    """The component's model class built from `cfg` on the meta device (no memory)."""
    with torch.device("meta"):
        if "_class_name" in cfg:
            import diffusers

            cls = getattr(diffusers, cfg["_class_name"])
            return cls.from_config(cfg)
        import transformers

        cls = getattr(transformers, cfg["architectures"][0])
        return cls(cls.config_class.from_dict(cfg))


def random_tensor(name, shape, dtype, gen):
    if not dtype.is_floating_point:
        return torch.zeros(shape, dtype=dtype)
    if len(shape) <= 1:
        if name.endswith("bias") or "running_mean" in name:
            return torch.zeros(shape, dtype=torch.bfloat16)
        if name.endswith("weight") or "running_var" in name or "scale" in name:
            return torch.ones(shape, dtype=torch.bfloat16)
        return (torch.randn(shape, generator=gen) * 0.02).bfloat16()
    fan_in = math.prod(shape[1:])
    out = torch.empty(shape, dtype=torch.bfloat16)
    flat = out.view(shape[0], -1)
    step = max(1, (64 << 20) // max(1, fan_in))
    for i in range(0, shape[0], step):
        rows = flat[i:i + step]
        rows.copy_(torch.randn(rows.shape, generator=gen) / math.sqrt(fan_in))
    return out


def write_component(src, dst, overrides, seed):
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(overrides)
    model = meta_model(src, cfg)
    wanted = set()
    for f in weight_files(src):
        with safe_open(str(f), "pt") as st:
            wanted |= {pattern(k) for k in st.keys()}
    full = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items() if pattern(k) in wanted}
    missing = wanted - {pattern(k) for k in full}
    if missing:
        raise SystemExit(f"{src.name}: the full-size model has no tensor like {sorted(missing)[:5]}")
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for extra in src.iterdir():
        if extra.name == "config.json" or extra.suffix == ".safetensors" or extra.name.endswith(".index.json"):
            continue
        shutil.copy(extra, dst / extra.name)
    stem = "diffusion_pytorch_model" if "_class_name" in cfg else "model"
    gen = torch.Generator().manual_seed(seed)
    # Each shard is written as soon as it is full, so at most one shard (and its serialised copy) is in memory;
    # the files are renamed to the `-0000i-of-0000n` names once n is known.
    written, index, shard, size, total = [], {}, {}, 0, 0

    def flush():
        nonlocal shard, size
        tmp = dst / f"{stem}.part{len(written)}"
        save_file(shard, str(tmp), metadata={"format": "pt"})
        written.append((tmp, list(shard)))
        shard, size = {}, 0

    for name in sorted(full):
        shape, dtype = full[name]
        t = random_tensor(name, shape, dtype, gen)
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > SHARD_BYTES:
            flush()
        shard[name] = t
        size += nbytes
        total += nbytes
    if shard:
        flush()
    count = len(written)
    for i, (tmp, names) in enumerate(written):
        fname = f"{stem}-{i + 1:05d}-of-{count:05d}.safetensors"
        tmp.rename(dst / fname)
        index.update({k: fname for k in names})
    (dst / f"{stem}.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=2) + "\n")
    params = sum(math.prod(s) for s, _ in full.values())
    print(f"  {dst.name}: {params / 1e9:.3f} B parameters, {total / 2**30:.2f} GiB in {count} shard(s)", flush=True)


def build(family, out):
    spec = families()[family]
    src, out = ROOT / spec["fixture"], Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    index = json.loads((src / "model_index.json").read_text())
    index.update(spec["model_index"])
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    for i, part in enumerate(sorted(p for p in src.iterdir() if p.is_dir())):
        if part.name in spec["components"]:
            write_component(part, out / part.name, spec["components"][part.name], seed=1000 + i)
        else:
            shutil.copytree(part, out / part.name)
    print(f"{family}: written to {out}", flush=True)


def measure(out_json, cmd):
    """Runs `cmd`; records its wall time, its peak RSS (the kernel's ru_maxrss of the child: anonymous memory and
    the resident pages of memory-mapped weight files alike) and the peak of its anonymous memory (RssAnon,
    sampled every 50 ms: what the process holds itself, without the page-cache pages of the mapped files the
    kernel can drop)."""
    start = time.time()
    proc = subprocess.Popen(cmd)
    peak_anon = 0
    done = threading.Event()

    def sample():
        nonlocal peak_anon
        path = f"/proc/{proc.pid}/status"
        while not done.is_set():
            try:
                for line in open(path):
                    if line.startswith("RssAnon:"):
                        peak_anon = max(peak_anon, int(line.split()[1]))
            except OSError:
                pass
            time.sleep(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    code = proc.wait()
    done.set()
    t.join()
    peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result = dict(cmd=cmd, exit=code, wall_s=round(time.time() - start, 1), peak_rss_kib=peak_rss,
                  peak_anon_kib=peak_anon)
    Path(out_json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"exit {code}, {result['wall_s']} s, peak RSS {peak_rss / 2**20:.2f} GiB, "
          f"peak anonymous {peak_anon / 2**20:.2f} GiB", flush=True)
    return code


def diffusers_run(folder, size, png):
    """diffusers' own pipeline on `folder` in bf16 with its defaults, one step, `size`² (CPU, all cores)."""
    import diffusers

    torch.set_num_threads(os.cpu_count() or 1)
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16)
    with torch.inference_mode():
        image = pipe(prompt="a lighthouse on a cliff at dawn", num_inference_steps=1, width=size, height=size,
                     generator=torch.Generator().manual_seed(1)).images[0]
    image.save(png)


def main():
    if len(sys.argv) >= 4 and sys.argv[1] == "build" and sys.argv[2] in families():
        build(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 5 and sys.argv[1] == "diffusers":
        diffusers_run(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    elif len(sys.argv) >= 4 and sys.argv[1] == "run":
        sys.exit(measure(sys.argv[2], sys.argv[3:]))
    else:
        sys.exit(f"usage: {sys.argv[0]} build {{sd35_medium,flux2_klein_4b,zimage_turbo}} OUT | run OUT.json CMD... | diffusers FOLDER SIZE OUT.png")


if __name__ == "__main__":
    main()
