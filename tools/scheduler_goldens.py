#!/usr/bin/env python3
"""Writes scheduler goldens from diffusers for crates/sd-pipelines/tests/schedulers.rs.

Run with the diffusers 0.42.1 environment:
    /root/venv-sd/bin/python tools/scheduler_goldens.py

Output (deterministic, CPU, float32):
  fixtures/goldens/schedulers/cases.json        one entry per case: family, sampler id, steps,
                                                 full diffusers config (as a JSON string), keys
  fixtures/goldens/schedulers/common.safetensors unit_sample, fixed, original, noise  [1,4,8,8]
  fixtures/goldens/schedulers/torch_randn.safetensors "<seed>.<k>": k-th torch.randn draw of
                                                 torch.Generator().manual_seed(seed)
  fixtures/goldens/schedulers/<family>.safetensors per case "<case>.<what>":
      timesteps (f64), sigmas (f64, sigma-based schedulers), init_noise_sigma (f64 [1]),
      scaled.<i> (scale_model_input output; only where it is not the identity), prev.<i>
      (prev_sample of call i; long loops store a spread of calls, see `recorded`), noise.<k> (k-th noise draw of stochastic samplers),
      add_noise.<i> (add_noise(original, noise, timesteps[i])), and for img2img cases
      img2img.start (i64 [1], first index), img2img.noised, img2img.final, img2img.noise.<k>.

The loop starts from sample = unit_sample * init_noise_sigma and uses the fake model
    model_output = 0.5 * scale_model_input(sample, t) + fixed * cos(0.003 * t)
which tests/schedulers.rs replicates.
"""

import json
import math
import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file

import diffusers
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers import (
    scheduling_ddim,
    scheduling_ddpm,
    scheduling_dpmsolver_multistep,
    scheduling_euler_ancestral_discrete,
    scheduling_euler_discrete,
    scheduling_lcm,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "fixtures", "goldens", "schedulers")

# The scheduler_config.json of Stable Diffusion 1.5 (a PNDMScheduler config, as shipped).
SD15 = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

CLASSES = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "heun": HeunDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "dpmpp_2m_sde": DPMSolverMultistepScheduler,
    "lcm": LCMScheduler,
    "unipc": UniPCMultistepScheduler,
}

# Samplers whose scale_model_input is not the identity.
SCALES = {"euler", "euler_a", "heun"}

CAPTURED = []


def recording_randn(shape, generator=None, device=None, dtype=None, layout=None):
    """randn_tensor replacement: draws from the generator on the CPU and records the draw."""
    t = torch.randn(shape, generator=generator, dtype=torch.float32)
    CAPTURED.append(t.clone())
    return t.to(dtype or torch.float32)


for mod in (
    scheduling_ddim,
    scheduling_ddpm,
    scheduling_dpmsolver_multistep,
    scheduling_euler_ancestral_discrete,
    scheduling_euler_discrete,
    scheduling_lcm,
):
    mod.randn_tensor = recording_randn


def make_scheduler(family, overrides):
    cfg = dict(SD15)
    cfg.update(overrides)
    if family == "dpmpp_2m_sde":
        cfg["algorithm_type"] = "sde-dpmsolver++"
    return CLASSES[family].from_config(cfg)


def fake_model(x_in, t, fixed):
    return 0.5 * x_in + fixed * math.cos(0.003 * float(t))


def recorded(i, n):
    """Which calls of a loop of n calls are stored (all for short loops, a spread for long ones)."""
    return n <= 8 or i < 3 or i % 5 == 0 or i >= n - 2


def run_loop(sched, family, sample, fixed, start, steps, generator, rec, prefix):
    """Runs the sampling loop from `start`, recording into rec[prefix + ...]."""
    timesteps = sched.timesteps
    n = len(timesteps)
    for i in range(start, n):
        keep = rec is not None and recorded(i, n)
        t = timesteps[i]
        x_in = sched.scale_model_input(sample, t)
        if keep and family in SCALES:
            rec[f"{prefix}scaled.{i}"] = x_in.clone()
        out = fake_model(x_in, t, fixed)
        kwargs = {"generator": generator} if family in ("ddpm", "euler_a", "dpmpp_2m_sde", "lcm") else {}
        sample = sched.step(out, t, sample, **kwargs).prev_sample
        if keep:
            rec[f"{prefix}prev.{i}"] = sample.clone()
    return sample


def img2img_start(sched, family, steps, strength):
    """diffusers' img2img get_timesteps + set_begin_index (LCM: set_timesteps(strength=...))."""
    if family == "lcm":
        sched.set_timesteps(steps, strength=strength)
        return 0
    init_timestep = min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0)
    begin = t_start * sched.order
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(begin)
    return begin


def run_case(name, family, overrides, steps, common, tensors, img2img):
    sched = make_scheduler(family, overrides)
    sched.set_timesteps(steps)
    rec = {}
    rec["timesteps"] = sched.timesteps.to(torch.float64).clone()
    sigmas = getattr(sched, "sigmas", None)
    if family not in ("ddim", "ddpm", "lcm"):
        rec["sigmas"] = torch.as_tensor(sigmas).to(torch.float64).clone()
    init = float(sched.init_noise_sigma)
    rec["init_noise_sigma"] = torch.tensor([init], dtype=torch.float64)

    CAPTURED.clear()
    generator = torch.Generator().manual_seed(1234)
    sample = common["unit_sample"] * sched.init_noise_sigma
    run_loop(sched, family, sample, common["fixed"], 0, steps, generator, rec, "")
    for k, z in enumerate(CAPTURED):
        rec[f"noise.{k}"] = z

    n = len(rec["timesteps"])
    for i in sorted({0, n // 2, n - 1}):
        fresh = make_scheduler(family, overrides)
        fresh.set_timesteps(steps)
        t = fresh.timesteps[i : i + 1]
        if hasattr(fresh, "set_begin_index"):
            # Index-addressed like the Rust API (avoids diffusers' duplicate-timestep lookup).
            fresh.set_begin_index(i)
        rec[f"add_noise.{i}"] = fresh.add_noise(common["original"], common["noise"], t)

    if img2img is not None:
        fresh = make_scheduler(family, overrides)
        fresh.set_timesteps(steps)
        start = img2img_start(fresh, family, steps, img2img)
        t0 = fresh.timesteps[start : start + 1]
        noised = fresh.add_noise(common["original"], common["noise"], t0)
        rec["img2img.start"] = torch.tensor([start], dtype=torch.int64)
        rec["img2img.noised"] = noised
        rec["img2img.timesteps"] = fresh.timesteps.to(torch.float64).clone()
        CAPTURED.clear()
        generator = torch.Generator().manual_seed(99)
        final = run_loop(fresh, family, noised, common["fixed"], start, steps, generator, None, "")
        rec["img2img.final"] = final
        for k, z in enumerate(CAPTURED):
            rec[f"img2img.noise.{k}"] = z

    for k, v in rec.items():
        tensors[f"{name}.{k}"] = v.contiguous()
    # `_use_default_values` is an unordered set in diffusers; dropping it keeps the file stable.
    config = {k: v for k, v in dict(sched.config).items() if k != "_use_default_values"}
    return {
        "name": name,
        "family": family,
        "sampler": family,
        "steps": steps,
        "img2img_strength": img2img,
        "config_json": json.dumps(config, sort_keys=True),
        "num_calls": n,
    }


def case_list():
    cases = []

    def add(family, tag, overrides, steps_list=(20, 4), preds=("epsilon", "v_prediction"), img2img=False):
        for steps in steps_list:
            for pred in preds:
                p = "eps" if pred == "epsilon" else "v"
                name = f"{family}_{tag}_{p}_{steps}"
                o = dict(overrides)
                o["prediction_type"] = pred
                strength = 0.6 if (img2img and steps == 20 and pred == "epsilon") else None
                cases.append((name, family, o, steps, strength))

    for spacing in ("leading", "trailing", "linspace"):
        add("ddim", spacing, {"timestep_spacing": spacing}, img2img=spacing == "leading")
    add("ddpm", "leading", {"timestep_spacing": "leading"}, img2img=True)
    add("ddpm", "trailing", {"timestep_spacing": "trailing"}, steps_list=(20,), preds=("epsilon",))
    for spacing in ("leading", "trailing", "linspace"):
        add("euler", spacing, {"timestep_spacing": spacing}, img2img=spacing == "leading")
    add("euler", "karras", {"use_karras_sigmas": True})
    add("euler", "exponential", {"use_exponential_sigmas": True})
    add("euler", "karras_leading", {"use_karras_sigmas": True, "timestep_spacing": "leading"}, steps_list=(20,), preds=("epsilon",))
    add("euler_a", "linspace", {"timestep_spacing": "linspace"}, img2img=True)
    add("euler_a", "leading", {"timestep_spacing": "leading"})
    add("heun", "default", {}, img2img=True)
    add("heun", "karras", {"use_karras_sigmas": True})
    add("heun", "exponential", {"use_exponential_sigmas": True}, steps_list=(20,))
    add("heun", "leading", {"timestep_spacing": "leading"}, steps_list=(20,), preds=("epsilon",))
    add("dpmpp_2m", "default", {}, img2img=True)
    add("dpmpp_2m", "karras", {"use_karras_sigmas": True}, img2img=True)
    add("dpmpp_2m", "exponential", {"use_exponential_sigmas": True})
    add("dpmpp_2m", "leading", {"timestep_spacing": "leading"}, steps_list=(20,), preds=("epsilon",))
    add("dpmpp_2m", "trailing", {"timestep_spacing": "trailing"}, steps_list=(20,), preds=("epsilon",))
    add("dpmpp_2m", "heun_solver", {"solver_type": "heun", "use_karras_sigmas": True}, steps_list=(20,), preds=("epsilon",))
    add("dpmpp_2m", "sigma_min", {"final_sigmas_type": "sigma_min"}, steps_list=(20,), preds=("epsilon",))
    add("dpmpp_2m_sde", "default", {}, img2img=True)
    add("dpmpp_2m_sde", "karras", {"use_karras_sigmas": True})
    add("lcm", "default", {}, img2img=True)
    add("unipc", "default", {}, img2img=True)
    add("unipc", "karras", {"use_karras_sigmas": True})
    add("unipc", "exponential", {"use_exponential_sigmas": True}, steps_list=(20,))
    # diffusers returns NaN on the last step of bh1 and of noise prediction when the final sigma is 0
    # (0 * inf); the Rust port takes the finite limit there, so these goldens stop at sigma_min.
    add("unipc", "bh1", {"solver_type": "bh1", "final_sigmas_type": "sigma_min"}, steps_list=(20,), preds=("epsilon",))
    add("unipc", "order3", {"solver_order": 3}, steps_list=(20, 4), preds=("epsilon",))
    add("unipc", "noise_pred", {"predict_x0": False, "final_sigmas_type": "sigma_min"}, steps_list=(20,), preds=("epsilon",))
    add("unipc", "leading", {"timestep_spacing": "leading"}, steps_list=(20,), preds=("epsilon",))
    add("unipc", "trailing", {"timestep_spacing": "trailing"}, steps_list=(20,), preds=("epsilon",))
    # Zero-terminal-SNR models (trailing spacing, v-prediction), where diffusers clamps the last
    # alphas_cumprod to 2**-24 in its sigma-based schedulers.
    zsnr = {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True}
    for family in ("ddim", "euler", "euler_a", "dpmpp_2m", "unipc"):
        add(family, "zero_snr", zsnr, steps_list=(20, 4) if family == "ddim" else (20,), preds=("v_prediction",))
    return cases


def main():
    if diffusers.__version__ != "0.42.1":
        print(f"warning: goldens are meant for diffusers 0.42.1, found {diffusers.__version__}", file=sys.stderr)
    torch.manual_seed(0)
    os.makedirs(OUT, exist_ok=True)
    g = torch.Generator().manual_seed(2024)
    common = {
        "unit_sample": torch.randn((1, 4, 8, 8), generator=g, dtype=torch.float32),
        "fixed": torch.randn((1, 4, 8, 8), generator=g, dtype=torch.float32),
        "original": torch.randn((1, 4, 8, 8), generator=g, dtype=torch.float32) * 0.8,
        "noise": torch.randn((1, 4, 8, 8), generator=g, dtype=torch.float32),
    }
    save_file(common, os.path.join(OUT, "common.safetensors"))

    # PyTorch CPU-generator draws for TorchCpuNoise: one generator per seed, drawn in order.
    randn = {}
    for seed, shapes in ((0, [(7,), (1, 4, 8, 8), (3,), (2, 4, 5, 3), (16,), (1, 4, 5, 5)]), (2**40 + 17, [(1, 4, 8, 8)])):
        gen = torch.Generator().manual_seed(seed)
        for k, shape in enumerate(shapes):
            randn[f"{seed}.{k}"] = torch.randn(shape, generator=gen, dtype=torch.float32)
    path = os.path.join(OUT, "torch_randn.safetensors")
    save_file(randn, path)
    os.chmod(path, 0o644)

    per_family = {}
    meta = []
    for name, family, overrides, steps, strength in case_list():
        tensors = per_family.setdefault(family, {})
        meta.append(run_case(name, family, overrides, steps, common, tensors, strength))
    for family, tensors in per_family.items():
        path = os.path.join(OUT, f"{family}.safetensors")
        save_file(tensors, path)
        os.chmod(path, 0o644)
    os.chmod(os.path.join(OUT, "common.safetensors"), 0o644)
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump({"diffusers": diffusers.__version__, "cases": meta}, f, indent=1, sort_keys=True)
        f.write("\n")
    total = sum(os.path.getsize(os.path.join(OUT, p)) for p in os.listdir(OUT))
    print(f"wrote {len(meta)} cases, {total / 1e6:.2f} MB to {OUT}")


if __name__ == "__main__":
    main()
