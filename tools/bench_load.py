"""Helper of tools/bench_load.sh: writes a random full-size SD 1.5 diffusers folder in fp16, and times
diffusers/transformers loading it into F32 on the CPU (the reference for our loader).

    python tools/bench_load.py make DIR        # UNet + VAE + CLIP text encoder, *.fp16.safetensors
    python tools/bench_load.py load DIR        # one timed load; prints one JSON line
    python tools/bench_load.py single DIR      # DIR's weights as one LDM checkpoint, DIR.safetensors

The JSON line has `secs` (wall time of the three from_pretrained calls), `vmhwm_kib` (peak RSS,
mapped file pages included) and `peak_anon_kib` (peak anonymous RSS sampled every 5 ms: the memory
the process itself holds, without the page cache it maps), like `benches/load.rs`.
"""

import json
import sys
import threading
import time
from pathlib import Path

THREADS = 2


def status_kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class AnonPeak:
    """Samples RssAnon on a thread (torch releases the GIL while it copies)."""

    def __init__(self):
        self.peak = status_kib("RssAnon")
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, status_kib("RssAnon"))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, status_kib("RssAnon"))


def sd15_unet_config():
    return dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
    )


def sd15_vae_config():
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )


def make(out):
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    unet = UNet2DConditionModel(**sd15_unet_config()).half()
    unet.save_pretrained(out / "unet", variant="fp16")
    del unet
    AutoencoderKL(**sd15_vae_config()).half().save_pretrained(out / "vae", variant="fp16")
    te = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=768,
    )
    te_dir = out / "text_encoder"
    CLIPTextModel(te).half().save_pretrained(te_dir, variant="fp16")
    # transformers 5 saves CLIPTextModel without the `text_model.` level that every published SD
    # checkpoint has (and that both loaders read); restore it.
    from safetensors.torch import load_file, save_file

    weights = te_dir / "model.fp16.safetensors"
    sd = load_file(weights)
    save_file({k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in sd.items()}, weights, metadata={"format": "pt"})
    PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1
    ).save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "scheduler": ["diffusers", "PNDMScheduler"],
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


def single(folder):
    """The folder's weights under A1111/LDM names in one file, for timing our single-file path."""
    from safetensors.torch import load_file, save_file

    sys.path.insert(0, str(Path(__file__).parent))
    from ldm_convert import SD1_CLIP_PREFIX, clip_to_ldm, unet_to_ldm, vae_to_ldm

    out = {}
    out.update(unet_to_ldm(load_file(folder / "unet" / "diffusion_pytorch_model.fp16.safetensors"), 2))
    out.update(vae_to_ldm(load_file(folder / "vae" / "diffusion_pytorch_model.fp16.safetensors"), 4))
    out.update(clip_to_ldm(load_file(folder / "text_encoder" / "model.fp16.safetensors"), SD1_CLIP_PREFIX))
    path = folder.with_suffix(".safetensors")
    save_file({k: v.contiguous() for k, v in out.items()}, path, metadata={"format": "pt"})
    print(f"wrote {path}")


def load(folder):
    import torch

    torch.set_num_threads(THREADS)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    with AnonPeak() as peak:
        start = time.perf_counter()
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", variant="fp16", torch_dtype=torch.float32)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", variant="fp16", torch_dtype=torch.float32)
        te = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", variant="fp16", dtype=torch.float32)
        secs = time.perf_counter() - start
    params = sum(p.numel() for m in (unet, vae, te) for p in m.parameters())
    dtypes = sorted({str(p.dtype) for m in (unet, vae, te) for p in m.parameters()})
    print(
        json.dumps(
            {
                "side": "diffusers",
                "secs": secs,
                "vmhwm_kib": status_kib("VmHWM"),
                "peak_anon_kib": peak.peak,
                "params": params,
                "dtypes": dtypes,
            }
        )
    )


def main():
    commands = {"make": make, "load": load, "single": single}
    if len(sys.argv) != 3 or sys.argv[1] not in commands:
        raise SystemExit(__doc__)
    commands[sys.argv[1]](Path(sys.argv[2]))


if __name__ == "__main__":
    main()
