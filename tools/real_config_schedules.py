#!/usr/bin/env python3
"""Timesteps and sigmas that diffusers derives from the published scheduler configs of real models.

Writes fixtures/schedulers/<model>.json (the model's scheduler/scheduler_config.json, as published on the
hub: field values of stable-diffusion-v1-5, stable-diffusion-2-1, stable-diffusion-xl-base-1.0, sd-turbo,
FLUX.1-dev and FLUX.1-schnell; written out here because this machine cannot reach the hub) and
fixtures/goldens/schedulers/real_configs.json: for every SD config x sampler x sigma schedule x steps in
(4, 20, 50), what `<Sampler>.from_config(config, **overrides).set_timesteps(steps)` gives (timesteps and,
for sigma-based samplers, sigmas); for the FLUX configs, FlowMatchEulerDiscreteScheduler as FluxPipeline
drives it (sigmas = linspace(1, 1/n, n), mu from the image's token count) at 512^2 and 1024^2.

    /root/venv-sd/bin/python tools/real_config_schedules.py
"""

import json
import os

import numpy as np
import diffusers
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "fixtures", "schedulers")
OUT = os.path.join(ROOT, "fixtures", "goldens", "schedulers", "real_configs.json")

PUBLISHED = {
    "sd15": {
        "_class_name": "PNDMScheduler",
        "_diffusers_version": "0.6.0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
        "clip_sample": False,
    },
    "sd21": {
        "_class_name": "DDIMScheduler",
        "_diffusers_version": "0.8.0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "num_train_timesteps": 1000,
        "prediction_type": "v_prediction",
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
    },
    "sdxl": {
        "_class_name": "EulerDiscreteScheduler",
        "_diffusers_version": "0.19.0.dev0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "interpolation_type": "linear",
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "sample_max_value": 1.0,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "trained_betas": None,
        "use_karras_sigmas": False,
    },
    "sd-turbo": {
        "_class_name": "EulerDiscreteScheduler",
        "_diffusers_version": "0.24.0.dev0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "interpolation_type": "linear",
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "sample_max_value": 1.0,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "timestep_spacing": "trailing",
        "timestep_type": "discrete",
        "trained_betas": None,
        "use_karras_sigmas": False,
    },
    "flux-dev": {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "_diffusers_version": "0.30.0.dev0",
        "base_image_seq_len": 256,
        "base_shift": 0.5,
        "max_image_seq_len": 4096,
        "max_shift": 1.15,
        "num_train_timesteps": 1000,
        "shift": 3.0,
        "use_dynamic_shifting": True,
    },
    "flux-schnell": {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "_diffusers_version": "0.30.0.dev0",
        "base_image_seq_len": 256,
        "base_shift": 0.5,
        "max_image_seq_len": 4096,
        "max_shift": 1.15,
        "num_train_timesteps": 1000,
        "shift": 1.0,
        "use_dynamic_shifting": False,
    },
}

# Our sampler id -> diffusers class and the overrides a pipeline applies for it.
SAMPLERS = {
    "ddim": (DDIMScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {}),
    "dpmpp_2m_sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
    "lcm": (LCMScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
}
WITH_SIGMA_SCHEDULES = {"euler", "heun", "dpmpp_2m", "dpmpp_2m_sde", "unipc"}
SCHEDULES = {"default": {}, "karras": {"use_karras_sigmas": True}, "exponential": {"use_exponential_sigmas": True}}
STEPS = (4, 20, 50)


def floats(t):
    return [float(x) for x in np.asarray(t, dtype=np.float64).reshape(-1)]


def main():
    os.makedirs(CONFIGS, exist_ok=True)
    for name, cfg in PUBLISHED.items():
        with open(os.path.join(CONFIGS, f"{name}.json"), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")
    cases = []
    for model in ("sd15", "sd21", "sdxl", "sd-turbo"):
        cfg = PUBLISHED[model]
        for sampler, (cls, extra) in SAMPLERS.items():
            for schedule, flags in SCHEDULES.items():
                if schedule != "default" and sampler not in WITH_SIGMA_SCHEDULES:
                    continue
                for steps in STEPS:
                    s = cls.from_config(cfg, **extra, **flags)
                    s.set_timesteps(steps)
                    case = {"model": model, "sampler": sampler, "schedule": schedule, "steps": steps,
                            "timesteps": floats(s.timesteps)}
                    if getattr(s, "sigmas", None) is not None and sampler not in ("ddim", "ddpm", "lcm"):
                        case["sigmas"] = floats(s.sigmas)
                    cases.append(case)
    for model in ("flux-dev", "flux-schnell"):
        cfg = PUBLISHED[model]
        for side in (512, 1024):
            seq = (side // 16) * (side // 16)
            for steps in STEPS:
                s = FlowMatchEulerDiscreteScheduler.from_config(cfg)
                sigmas = np.linspace(1.0, 1 / steps, steps)
                mu = calculate_shift(seq, cfg["base_image_seq_len"], cfg["max_image_seq_len"], cfg["base_shift"], cfg["max_shift"])
                s.set_timesteps(sigmas=sigmas, mu=mu)
                cases.append({"model": model, "sampler": "flow_match_euler", "schedule": "default", "steps": steps,
                              "image_seq_len": seq, "timesteps": floats(s.timesteps), "sigmas": floats(s.sigmas)})
    with open(OUT, "w") as f:
        json.dump({"diffusers": diffusers.__version__, "cases": cases}, f, indent=0, sort_keys=True)
        f.write("\n")
    print(f"wrote {len(cases)} cases to {OUT} ({os.path.getsize(OUT) / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
