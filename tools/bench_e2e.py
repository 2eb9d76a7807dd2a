"""Python side of tools/bench_e2e.sh: full-size random-weight pipelines built by diffusers/transformers,
the diffusers run of each stage, and the image comparison that makes every timed row a checked row.

    python tools/bench_e2e.py make STAGE DIR          # write the random full-size folder of a stage (once)
    python tools/bench_e2e.py run STAGE DIR OUT.png [SIZE]   # one diffusers txt2img run; prints one JSON line
    python tools/bench_e2e.py compare OURS.png THEIRS.png LIMIT   # exits 1 above LIMIT (relative L2)
    python tools/bench_e2e.py settings STAGE          # "STEPS GUIDANCE SIZE", for the shell script
    python tools/bench_e2e.py table LOG               # the summary table of tools/bench_e2e.sh's runs

Stages (the settings both sides use are in STAGES below):
  sd15      SD 1.5, 512², 20 Euler steps, CFG 7.5 (the folder tools/bench_load.py writes)
  turbo     SD-Turbo (the SD 2.1 architecture: OpenCLIP ViT-H text encoder, linear projections), 512²,
            1 step, no CFG, Euler with trailing timesteps as stabilityai/sd-turbo ships it
  sdxl      SDXL base 1.0 architecture, 1024², 1 Euler step, CFG 5.0

Weights are written in fp16 (`*.fp16.safetensors`, as published) and every run loads them into F32 on
2 threads. The tokenizers are the fixtures' (a 1000-token CLIP vocabulary): both sides tokenise the same way
and the full-size text encoders accept its ids; the text encoders' work is the same for any 77 ids.
"""

import json
import shutil
import sys
import time
from pathlib import Path

START = time.perf_counter()
THREADS = 2
ROOT = Path(__file__).resolve().parent.parent

STAGES = {
    "sd15": dict(steps=20, guidance=7.5, size=512, fixture="sd15"),
    "turbo": dict(steps=1, guidance=0.0, size=512, fixture="sd2"),
    "sdxl": dict(steps=1, guidance=5.0, size=1024, fixture="sdxl"),
}
PROMPT = "a cat"
SEED = 1


def clip_config(**kw):
    from transformers import CLIPTextConfig

    base = dict(vocab_size=49408, max_position_embeddings=77, hidden_size=768, intermediate_size=3072,
                num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768)
    base.update(kw)
    return CLIPTextConfig(**base)


def save_text_encoder(model, out):
    """transformers 5 saves CLIP text models without the `text_model.` level every published checkpoint has
    (and both loaders read); restore it."""
    from safetensors.torch import load_file, save_file

    model.half().save_pretrained(out, variant="fp16")
    weights = out / "model.fp16.safetensors"
    sd = load_file(weights)
    fixed = {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v for k, v in sd.items()}
    save_file(fixed, weights, metadata={"format": "pt"})


def vae_config(sample_size, scaling):
    return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, latent_channels=4, sample_size=sample_size, scaling_factor=scaling)


def euler(spacing, steps_offset):
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  timestep_spacing=spacing, steps_offset=steps_offset, prediction_type="epsilon")


def make(stage, out):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if stage == "sd15":
        sys.path.insert(0, str(Path(__file__).parent))
        import bench_load

        bench_load.make(out)
        index = json.loads((out / "model_index.json").read_text())
    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    if stage == "turbo":
        # stabilityai/sd-turbo's unet/text_encoder/vae config.json (the SD 2.1 base architecture).
        UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20),
            cross_attention_dim=1024, use_linear_projection=True,
        ).half().save_pretrained(out / "unet", variant="fp16")
        save_text_encoder(CLIPTextModel(clip_config(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                                    num_attention_heads=16, hidden_act="gelu", projection_dim=512)),
                          out / "text_encoder")
        AutoencoderKL(**vae_config(768, 0.18215)).half().save_pretrained(out / "vae", variant="fp16")
        euler("trailing", 1).save_pretrained(out / "scheduler")
        index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                 "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
                 "scheduler": ["diffusers", "EulerDiscreteScheduler"]}
    elif stage == "sdxl":
        # stabilityai/stable-diffusion-xl-base-1.0's config.json files.
        UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        ).half().save_pretrained(out / "unet", variant="fp16")
        save_text_encoder(CLIPTextModel(clip_config()), out / "text_encoder")
        save_text_encoder(CLIPTextModelWithProjection(clip_config(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            hidden_act="gelu", projection_dim=1280)), out / "text_encoder_2")
        vae = vae_config(1024, 0.13025)
        vae["force_upcast"] = True
        AutoencoderKL(**vae).half().save_pretrained(out / "vae", variant="fp16")
        euler("leading", 1).save_pretrained(out / "scheduler")
        index = {"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                 "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
                 "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                 "tokenizer_2": ["transformers", "CLIPTokenizer"],
                 "scheduler": ["diffusers", "EulerDiscreteScheduler"], "force_zeros_for_empty_prompt": True}
    fixture = ROOT / "fixtures" / STAGES[stage]["fixture"]
    for tok in ("tokenizer", "tokenizer_2"):
        if (fixture / tok).is_dir():
            shutil.copytree(fixture / tok, out / tok, dirs_exist_ok=True)
    index.update(tokenizer=["transformers", "CLIPTokenizer"], safety_checker=[None, None],
                 feature_extractor=[None, None], requires_safety_checker=False)
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    print(f"wrote {out}")


def run(stage, folder, out, size):
    import torch
    from diffusers import AutoPipelineForText2Image, EulerDiscreteScheduler

    s = STAGES[stage]
    size = size or s["size"]
    torch.set_num_threads(THREADS)
    # The full-size folders are fp16 as published; the tiny fixtures of SD_BENCH_SMALL=1 are not.
    variant = "fp16" if any(Path(folder).rglob("*.fp16.safetensors")) else None
    with torch.inference_mode():
        pipe = AutoPipelineForText2Image.from_pretrained(folder, variant=variant, torch_dtype=torch.float32)
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        loaded = time.perf_counter()
        image = pipe(PROMPT, num_inference_steps=s["steps"], guidance_scale=s["guidance"], height=size,
                     width=size, generator=torch.Generator().manual_seed(SEED)).images[0]
    image.save(out)
    done = time.perf_counter()
    print(json.dumps({"load": loaded - START, "generate": done - loaded}))


def compare(ours, theirs, limit):
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(ours).convert("RGB"), dtype=np.float64)
    b = np.asarray(Image.open(theirs).convert("RGB"), dtype=np.float64)
    if a.shape != b.shape:
        print(f"check FAILED: image sizes differ, ours {a.shape} vs diffusers {b.shape}")
        sys.exit(1)
    rel = float(np.sqrt(((a - b) ** 2).sum() / max((b ** 2).sum(), 1e-12)))
    diff = np.abs(a - b)
    verdict = "ok" if rel <= limit else "FAILED"
    print(f"check {verdict}: relative L2 {rel:.2e} (limit {limit:.0e}), max |diff| {diff.max():.0f}/255, "
          f"pixels off by more than 2 levels {(diff > 2).mean() * 100:.3f} %")
    sys.exit(0 if rel <= limit else 1)


def table(log):
    """LOG lines: `STAGE SIDE WALL_S MAX_RSS_KIB LOAD_S GENERATE_S` (one per process), plus `STAGE check TEXT`."""
    import statistics

    runs, checks = {}, {}
    for line in Path(log).read_text().splitlines():
        f = line.split()
        if len(f) >= 3 and f[1] == "check":
            checks[f[0]] = " ".join(f[2:])
        elif len(f) == 6:
            runs.setdefault((f[0], f[1]), []).append(tuple(map(float, f[2:])))
    med = {k: [statistics.median(col) for col in zip(*v)] for k, v in runs.items()}
    print("| stage | settings | load ours / diffusers | generate ours / diffusers | **generate ratio** "
          "| wall ours / diffusers | wall ratio | peak RSS ours / diffusers | RSS ratio | runs | check |")
    print("|---|---|---|---|---:|---|---:|---|---:|---:|---|")
    for stage, s in STAGES.items():
        if (stage, "ours") not in med or (stage, "diffusers") not in med:
            continue
        (wo, ro, lo, go), (wd, rd, ld, gd) = med[(stage, "ours")], med[(stage, "diffusers")]
        n = len(runs[(stage, "ours")])
        cfg = f"{s['size']}², {s['steps']} step{'s' if s['steps'] > 1 else ''}, " + (
            f"CFG {s['guidance']}" if s["guidance"] > 1 else "no CFG")
        print(f"| {stage} | {cfg} | {lo:.1f} / {ld:.1f} s | {go:.1f} / {gd:.1f} s | **{go / gd:.2f}** | "
              f"{wo:.1f} / {wd:.1f} s | {wo / wd:.2f} | {ro / 1024:.0f} / {rd / 1024:.0f} MiB | {ro / rd:.2f} | {n} | "
              f"{checks.get(stage, 'not checked')} |")


def main():
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "make" and len(sys.argv) == 4 and sys.argv[2] in STAGES:
        make(sys.argv[2], Path(sys.argv[3]))
    elif cmd == "run" and len(sys.argv) in (5, 6) and sys.argv[2] in STAGES:
        run(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]) if len(sys.argv) == 6 else None)
    elif cmd == "settings" and len(sys.argv) == 3:
        if sys.argv[2] not in STAGES:
            raise SystemExit(f"unknown stage {sys.argv[2]!r}: one of {', '.join(STAGES)}")
        s = STAGES[sys.argv[2]]
        print(s["steps"], s["guidance"], s["size"], s["fixture"])
    elif cmd == "table" and len(sys.argv) == 3:
        table(sys.argv[2])
    elif cmd == "compare" and len(sys.argv) == 5:
        compare(sys.argv[2], sys.argv[3], float(sys.argv[4]))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
