#!/usr/bin/env python3
"""Goldens for the samplers added for A1111/Forge names (LMS, PNDM, DPM2, DPM2 a, DEIS, TCD, …).

Extends tools/scheduler_goldens.py without touching its output: it reads the committed
fixtures/goldens/schedulers/common.safetensors (the same inputs) and writes NEW files only:

  fixtures/goldens/schedulers/cases_a1111.json      one entry per case, same format as cases.json
  fixtures/goldens/schedulers/<family>.safetensors   for the new families (lms, pndm, dpm2, dpm2_a,
                                                      deis, tcd), same keys as scheduler_goldens.py
  fixtures/goldens/schedulers/real_configs_a1111.json  timesteps/sigmas of the new samplers from the
                                                      published configs in fixtures/schedulers/

Run with the diffusers 0.42.1 environment (LMS's coefficients need scipy):
    /root/venv-sd/bin/python tools/scheduler_goldens_a1111.py

Sigmas: for DPM2 / DPM2 a the recorded `sigmas` are the noise level of every model call plus the
final 0 (diffusers' `sigmas` repeats the step sigmas and keeps the midpoints in `sigmas_interpol`;
the Rust scheduler exposes the per-call list). TCD runs with diffusers' `step` default eta = 0.3.

To stay small, long loops store a few calls (`recorded`), and stochastic runs store their noise
draws only for runs of at most 8 steps; every run stores `noise_draws` (how many draws diffusers
made, seeds 1234 / img2img 99), and the Rust test replays runs without stored draws from
`TorchCpuNoise`, the exact torch CPU generator stream.
"""

import json
import math
import os
import sys

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import diffusers
from diffusers import (
    DEISMultistepScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    TCDScheduler,
)
from diffusers.schedulers import scheduling_k_dpm_2_ancestral_discrete, scheduling_tcd

import scheduler_goldens as base

ROOT = base.ROOT
OUT = base.OUT
SD15 = base.SD15

CLASSES = {
    **base.CLASSES,
    "lms": LMSDiscreteScheduler,
    "pndm": PNDMScheduler,
    "dpm2": KDPM2DiscreteScheduler,
    "dpm2_a": KDPM2AncestralDiscreteScheduler,
    "deis": DEISMultistepScheduler,
    "tcd": TCDScheduler,
    "dpmpp_3m_sde": diffusers.DPMSolverMultistepScheduler,
    "dpmpp_sde": diffusers.DPMSolverSDEScheduler,
}
# Samplers whose scale_model_input is not the identity.
SCALES = {"lms", "dpm2", "dpm2_a", "euler", "euler_a", "heun", "dpmpp_sde", "dpmpp_2s_a"}
# Samplers whose step takes a generator.
STOCHASTIC = {"dpm2_a", "tcd", "euler_a", "dpmpp_2m_sde", "dpmpp_3m_sde"}
# Samplers without sigmas.
NO_SIGMAS = {"pndm", "tcd"}
# Samplers whose img2img start comes from set_timesteps(strength=…) (LCM-style).
STRENGTH_IN_SET_TIMESTEPS = {"tcd"}

# (scheduler_goldens.py already patched the modules of its own stochastic samplers.)
for mod in (scheduling_k_dpm_2_ancestral_discrete, scheduling_tcd):
    mod.randn_tensor = base.recording_randn


def make_scheduler(family, overrides):
    cfg = dict(SD15)
    cfg.update(overrides)
    if family == "dpmpp_2m_sde":
        cfg["algorithm_type"] = "sde-dpmsolver++"
    if family == "dpmpp_3m_sde":
        cfg["algorithm_type"] = "sde-dpmsolver++"
        cfg["solver_order"] = 3
    return CLASSES[family].from_config(cfg)


class BrownianIncrements:
    """Replaces DPMSolverSDEScheduler's torchsde Brownian tree (whose path the Rust port cannot
    reproduce) by what the port draws: per step, z1 for the increment over [sigma_mid, sigma], then
    the increment over [sigma_next, sigma] = (sqrt(sigma - sigma_mid) z1 + sqrt(sigma_mid - sigma_next) z2)
    / sqrt(sigma - sigma_next), the same joint distribution; z1, z2 drawn from the run's generator."""

    def __init__(self, generator, shape):
        self.generator, self.shape, self.z1, self.mid = generator, shape, None, None

    def __call__(self, sigma, sigma_next):
        z = base.recording_randn(self.shape, generator=self.generator)
        if self.z1 is None:
            self.z1, self.mid = z, float(sigma_next)
            return z
        a, b = float(sigma) - self.mid, self.mid - float(sigma_next)
        z1, self.z1 = self.z1, None
        return math.sqrt(a / (a + b)) * z1 + math.sqrt(b / (a + b)) * z


def call_sigmas(sched, family):
    """The noise level of every model call plus the final one."""
    if family == "dpm2":
        n = len(sched.timesteps)
        return [float(sched.sigmas[i] if i % 2 == 0 else sched.sigmas_interpol[i]) for i in range(n)] + [0.0]
    if family == "dpm2_a":
        n = len(sched.timesteps)
        return [float(sched.sigmas[i] if i % 2 == 0 else sched.sigmas_interpol[i - 1]) for i in range(n)] + [0.0]
    if family == "dpmpp_sde":
        # The midpoint sigma as DPMSolverSDEScheduler.step computes it (float32).
        n = len(sched.timesteps)
        out = []
        for i in range(n):
            if i % 2 == 0:
                out.append(float(sched.sigmas[i]))
            else:
                t, t_next = sched.sigmas[i - 1].log().neg(), sched.sigmas[i].log().neg()
                out.append(float((t + (t_next - t) * 0.5).neg().exp()))
        return out + [0.0]
    return [float(s) for s in np.asarray(sched.sigmas, dtype=np.float64).reshape(-1)]


def step(sched, family, out, t, sample, generator):
    kwargs = {}
    if family in STOCHASTIC:
        kwargs["generator"] = generator
    if family == "tcd":
        kwargs["eta"] = 0.3
    return sched.step(out, t, sample, **kwargs).prev_sample


def recorded(i, n):
    """Which calls are stored: the first two, the middle and the last (keeps the files small;
    the last output depends on every step)."""
    return i < 2 or i == n // 2 or i == n - 1


def keep_noise(steps):
    """Noise draws are stored for short runs only; the Rust test replays the others with
    TorchCpuNoise (the exact torch.Generator stream, checked against torch_randn.safetensors)."""
    return steps <= 8


def run_loop(sched, family, sample, fixed, start, generator, rec, prefix, detail=True):
    timesteps = sched.timesteps
    n = len(timesteps)
    for i in range(start, n):
        keep = rec is not None and recorded(i, n) and (detail or i >= n // 2)
        t = timesteps[i]
        x_in = sched.scale_model_input(sample, t)
        if keep and detail and family in SCALES and i < 2:
            rec[f"{prefix}scaled.{i}"] = x_in.clone()
        out = base.fake_model(x_in, t, fixed)
        sample = step(sched, family, out, t, sample, generator)
        if keep:
            rec[f"{prefix}prev.{i}"] = sample.clone()
    return sample


def img2img_start(sched, family, steps, strength):
    if family in STRENGTH_IN_SET_TIMESTEPS:
        sched.set_timesteps(steps, strength=strength)
        return 0
    init_timestep = min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0)
    begin = t_start * sched.order
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(begin)
    return begin


def run_case(name, family, overrides, steps, common, tensors, img2img, file_family):
    sched = make_scheduler(family, overrides)
    sched.set_timesteps(steps)
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(0)
    rec = {"timesteps": sched.timesteps.to(torch.float64).clone()}
    if family not in NO_SIGMAS:
        rec["sigmas"] = torch.tensor(call_sigmas(sched, family), dtype=torch.float64)
    rec["init_noise_sigma"] = torch.tensor([float(sched.init_noise_sigma)], dtype=torch.float64)

    base.CAPTURED.clear()
    generator = torch.Generator().manual_seed(1234)
    sample = common["unit_sample"] * sched.init_noise_sigma
    if family == "dpmpp_sde":
        sched.noise_sampler = BrownianIncrements(generator, sample.shape)
    # Only the "default" cases of a sampler store scaled inputs, early outputs, add_noise and noise
    # draws; the others (schedules, spacings, options) store the middle and last outputs.
    detail = "_default_" in name
    run_loop(sched, family, sample, common["fixed"], 0, generator, rec, "", detail)
    if keep_noise(steps) and detail:
        for k, z in enumerate(base.CAPTURED):
            rec[f"noise.{k}"] = z
    rec["noise_draws"] = torch.tensor([len(base.CAPTURED)], dtype=torch.int64)

    n = len(rec["timesteps"])
    for i in sorted({0, n // 2}) if detail else ():
        fresh = make_scheduler(family, overrides)
        fresh.set_timesteps(steps)
        t = fresh.timesteps[i : i + 1]
        if hasattr(fresh, "set_begin_index"):
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
        base.CAPTURED.clear()
        generator = torch.Generator().manual_seed(99)
        if family == "dpmpp_sde":
            fresh.noise_sampler = BrownianIncrements(generator, noised.shape)
        final = run_loop(fresh, family, noised, common["fixed"], start, generator, None, "")
        rec["img2img.final"] = final
        rec["img2img.noise_draws"] = torch.tensor([len(base.CAPTURED)], dtype=torch.int64)

    for k, v in rec.items():
        tensors[f"{name}.{k}"] = v.contiguous()
    config = {k: v for k, v in dict(sched.config).items() if k != "_use_default_values"}
    return {
        "name": name,
        "family": file_family,
        "sampler": family,
        "steps": steps,
        "img2img_strength": img2img,
        "config_json": json.dumps(config, sort_keys=True),
        "num_calls": n,
    }


def run_k_case(name, family, overrides, steps, common, tensors, img2img, file_family):
    """DPM++ 2S a, which diffusers lacks: k-diffusion's sample_dpmpp_2s_ancestral on the sigmas of
    diffusers' EulerDiscreteScheduler for the config, with the goldens' fake model. Recorded in the
    layout of run_case: the model input of call i + 1 is the output of call i."""
    sampling, _ = load_k_diffusion()
    cfg = dict(SD15)
    cfg.update(overrides)
    euler = diffusers.EulerDiscreteScheduler.from_config(cfg)
    euler.set_timesteps(steps)
    sig = euler.sigmas.to(torch.float32)
    log_sigmas = np.log((((1 - euler.alphas_cumprod) / euler.alphas_cumprod) ** 0.5).numpy())
    init = float(euler.init_noise_sigma)
    fixed = common["fixed"]

    def run(x, start_step, generator, inputs):
        calls = {"n": 0}
        sig_calls, t_calls = [], []

        def denoiser(xc, sigma, **_):
            s = float(sigma[0])
            j = calls["n"]
            calls["n"] += 1
            # Even calls sit on the schedule (Euler's timesteps), odd ones at the midpoint.
            t = float(euler.timesteps[start_step + j // 2]) if j % 2 == 0 else float(euler._sigma_to_t(np.array(s), log_sigmas))
            sig_calls.append(s)
            t_calls.append(t)
            inputs.append(xc.clone())
            out = base.fake_model(xc / (s * s + 1) ** 0.5, t, fixed)
            if cfg.get("prediction_type") == "v_prediction":
                # k-diffusion's CompVisVDenoiser (sigma_data = 1).
                return out * (-s / (s * s + 1) ** 0.5) + xc / (s * s + 1)
            return xc - s * out

        def noise_sampler(sigma, sigma_next):
            return base.recording_randn(x.shape, generator=generator)

        out = sampling.sample_dpmpp_2s_ancestral(denoiser, x, sig[start_step:], disable=True, noise_sampler=noise_sampler)
        return out, sig_calls, t_calls

    rec = {}
    base.CAPTURED.clear()
    inputs = []
    final, sig_calls, t_calls = run(common["unit_sample"] * init, 0, torch.Generator().manual_seed(1234), inputs)
    n = len(t_calls)
    rec["timesteps"] = torch.tensor(t_calls, dtype=torch.float64)
    rec["sigmas"] = torch.tensor(sig_calls + [0.0], dtype=torch.float64)
    rec["init_noise_sigma"] = torch.tensor([init], dtype=torch.float64)
    detail = "_default_" in name
    outputs = inputs[1:] + [final]
    for i in range(n):
        if recorded(i, n) and (detail or i >= n // 2):
            rec[f"prev.{i}"] = outputs[i]
    if keep_noise(steps) and detail:
        for k, z in enumerate(base.CAPTURED):
            rec[f"noise.{k}"] = z
    rec["noise_draws"] = torch.tensor([len(base.CAPTURED)], dtype=torch.int64)
    for i in sorted({0, n // 2}) if detail else ():
        rec[f"add_noise.{i}"] = common["original"] + common["noise"] * sig[(i + 1) // 2]
    if img2img is not None:
        t_start = steps - min(int(steps * img2img), steps)
        noised = common["original"] + common["noise"] * sig[t_start]
        rec["img2img.start"] = torch.tensor([2 * t_start], dtype=torch.int64)
        rec["img2img.noised"] = noised
        rec["img2img.timesteps"] = rec["timesteps"].clone()
        base.CAPTURED.clear()
        final, _, _ = run(noised, t_start, torch.Generator().manual_seed(99), [])
        rec["img2img.final"] = final
        rec["img2img.noise_draws"] = torch.tensor([len(base.CAPTURED)], dtype=torch.int64)
    for k, v in rec.items():
        tensors[f"{name}.{k}"] = v.contiguous()
    config = {k: v for k, v in dict(euler.config).items() if k != "_use_default_values"}
    return {"name": name, "family": file_family, "sampler": family, "steps": steps, "img2img_strength": img2img,
            "config_json": json.dumps(config, sort_keys=True), "num_calls": n}


# Samplers diffusers lacks, run through k-diffusion (run_k_case).
K_ONLY = {"dpmpp_2s_a"}


def case_list():
    cases = []

    def add(family, tag, overrides, steps_list=(20, 4), preds=("epsilon", "v_prediction"), img2img=False, full=False):
        for steps in steps_list:
            for pred in preds:
                if pred == "v_prediction" and steps > 8 and not full:
                    continue  # v-prediction is covered by the short runs (and the `full` cases)
                p = "eps" if pred == "epsilon" else "v"
                o = dict(overrides)
                o["prediction_type"] = pred
                strength = 0.6 if (img2img and steps == 20 and pred == "epsilon") else None
                cases.append((f"{family}_{tag}_{p}_{steps}", family, o, steps, strength, family))

    add("lms", "default", {}, img2img=True, full=True)
    add("lms", "leading", {"timestep_spacing": "leading"}, steps_list=(20,), preds=("epsilon",))
    add("lms", "karras", {"use_karras_sigmas": True})
    add("lms", "exponential", {"use_exponential_sigmas": True}, steps_list=(20,), preds=("epsilon",))
    add("pndm", "default", {}, img2img=True, full=True)
    add("pndm", "linspace", {"timestep_spacing": "linspace"}, steps_list=(20,), preds=("epsilon",))
    add("pndm", "trailing", {"timestep_spacing": "trailing"}, steps_list=(20,), preds=("epsilon",))
    add("pndm", "alpha_one", {"set_alpha_to_one": True}, steps_list=(20,), preds=("epsilon",))
    add("pndm", "prk", {"skip_prk_steps": False}, steps_list=(20, 4), img2img=True)
    add("dpm2", "default", {}, img2img=True, full=True)
    add("dpm2", "karras", {"use_karras_sigmas": True})
    add("dpm2", "exponential", {"use_exponential_sigmas": True}, steps_list=(20,), preds=("epsilon",))
    add("dpm2", "leading", {"timestep_spacing": "leading"}, steps_list=(20,), preds=("epsilon",))
    add("dpm2_a", "default", {}, img2img=True, full=True)
    add("dpm2_a", "karras", {"use_karras_sigmas": True})
    add("dpm2_a", "leading", {"timestep_spacing": "leading"}, steps_list=(20,), preds=("epsilon",))
    add("deis", "default", {}, img2img=True, full=True)
    add("deis", "karras", {"use_karras_sigmas": True}, img2img=True)
    add("deis", "exponential", {"use_exponential_sigmas": True}, steps_list=(20,), preds=("epsilon",))
    add("deis", "leading", {"timestep_spacing": "leading"}, steps_list=(20,), preds=("epsilon",))
    add("deis", "trailing", {"timestep_spacing": "trailing"}, steps_list=(20,), preds=("epsilon",))
    add("deis", "order3", {"solver_order": 3}, steps_list=(20, 4), preds=("epsilon",))
    add("deis", "order1", {"solver_order": 1}, steps_list=(20,), preds=("epsilon",))
    add("tcd", "default", {}, img2img=True, full=True)
    add("tcd", "leading", {"timestep_spacing": "leading"}, steps_list=(8,), preds=("epsilon",))
    add("dpmpp_3m_sde", "default", {}, img2img=True, full=True)
    add("dpmpp_3m_sde", "karras", {"use_karras_sigmas": True}, steps_list=(20,), preds=("epsilon",))
    add("dpmpp_3m_sde", "leading", {"timestep_spacing": "leading"}, steps_list=(20,), preds=("epsilon",))
    add("dpmpp_sde", "default", {}, img2img=True, full=True)
    add("dpmpp_sde", "karras", {"use_karras_sigmas": True}, steps_list=(20,), preds=("epsilon",))
    add("dpmpp_sde", "leading", {"timestep_spacing": "leading"}, steps_list=(20,), preds=("epsilon",))
    add("dpmpp_2s_a", "default", {}, img2img=True, full=True)
    add("dpmpp_2s_a", "karras", {"use_karras_sigmas": True}, steps_list=(20,), preds=("epsilon",))
    add("dpmpp_2s_a", "leading", {"timestep_spacing": "leading"}, steps_list=(20,), preds=("epsilon",))
    # diffusers' use_beta_sigmas (Beta(0.6, 0.6) quantiles) on every sampler that has it; the cases of
    # samplers with goldens in scheduler_goldens.py go to a file of their own (beta.safetensors) so
    # that those files stay as committed.
    beta = {"use_beta_sigmas": True}
    for family, steps_list, preds, img2img in (
        ("euler", (20, 4), ("epsilon", "v_prediction"), True),
        ("heun", (20,), ("epsilon",), False),
        ("dpmpp_2m", (20, 4), ("epsilon", "v_prediction"), True),
        ("dpmpp_2m_sde", (4,), ("epsilon",), False),
        ("unipc", (20,), ("epsilon",), False),
        ("lms", (20,), ("epsilon",), False),
        ("dpm2", (20,), ("epsilon",), False),
        ("dpm2_a", (4,), ("epsilon",), False),
        ("deis", (20,), ("epsilon",), False),
    ):
        for steps in steps_list:
            for pred in preds:
                p = "eps" if pred == "epsilon" else "v"
                strength = 0.6 if (img2img and steps == 20 and pred == "epsilon") else None
                cases.append((f"{family}_beta_{p}_{steps}", family, {**beta, "prediction_type": pred}, steps, strength, "beta"))
    return cases


# Our sampler id -> diffusers class and overrides, for the published real configs.
REAL = {
    "lms": (LMSDiscreteScheduler, {}),
    "pndm": (PNDMScheduler, {}),
    "dpm2": (KDPM2DiscreteScheduler, {}),
    "dpm2_a": (KDPM2AncestralDiscreteScheduler, {}),
    "deis": (DEISMultistepScheduler, {}),
    "tcd": (TCDScheduler, {}),
    "dpmpp_sde": (diffusers.DPMSolverSDEScheduler, {}),
    "dpmpp_3m_sde": (diffusers.DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}),
}
REAL_WITH_SIGMA_SCHEDULES = {"lms", "dpm2", "dpm2_a", "deis", "dpmpp_sde", "dpmpp_3m_sde"}
# Exponential sigmas are covered by the step-by-step goldens; the real configs check default and Karras.
REAL_SCHEDULES = {"default": {}, "karras": {"use_karras_sigmas": True}, "beta": {"use_beta_sigmas": True}}
# The samplers of scheduler_goldens.py that have diffusers' beta sigmas: real configs for that only.
REAL_BETA_ONLY = {
    "euler": (diffusers.EulerDiscreteScheduler, {}),
    "heun": (diffusers.HeunDiscreteScheduler, {}),
    "dpmpp_2m": (diffusers.DPMSolverMultistepScheduler, {}),
    "dpmpp_2m_sde": (diffusers.DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": (diffusers.UniPCMultistepScheduler, {}),
}


def short(values):
    """10 significant digits: the test compares to 1e-6 relative; keeps the file small."""
    return [float(f"{v:.10g}") for v in values]


def real_configs():
    cases = []
    # SD 2.1's config differs from SD 1.5's only in prediction_type, which changes no schedule.
    for model in ("sd15", "sdxl", "sd-turbo"):
        with open(os.path.join(ROOT, "fixtures", "schedulers", f"{model}.json")) as f:
            cfg = json.load(f)
        for sampler, (cls, extra) in {**REAL, **REAL_BETA_ONLY}.items():
            for schedule, flags in REAL_SCHEDULES.items():
                if schedule != "default" and sampler not in REAL_WITH_SIGMA_SCHEDULES | set(REAL_BETA_ONLY):
                    continue
                if sampler in REAL_BETA_ONLY and schedule != "beta":
                    continue
                # 50 steps for the default schedules; Karras/beta (formulas checked step by step in
                # the goldens) at 4 and 20 keep the file small.
                for steps in (4, 20, 50) if schedule == "default" else (4, 20):
                    s = cls.from_config(cfg, **extra, **flags)
                    s.set_timesteps(steps)
                    case = {"model": model, "sampler": sampler, "schedule": schedule, "steps": steps,
                            "timesteps": short(float(t) for t in s.timesteps.to(torch.float64))}
                    if sampler not in NO_SIGMAS:
                        case["sigmas"] = short(call_sigmas(s, sampler))
                    cases.append(case)
    path = os.path.join(OUT, "real_configs_a1111.json")
    with open(path, "w") as f:
        json.dump({"diffusers": diffusers.__version__, "cases": cases}, f, separators=(",", ":"), sort_keys=True)
        f.write("\n")
    return len(cases)


# --- Schedules defined by ComfyUI / A1111 (no diffusers equivalent) ---------------------------
#
# sgm_uniform, simple, ddim_uniform and Align Your Steps are REIMPLEMENTED here from ComfyUI's
# comfy/samplers.py (`normal_scheduler(sgm=True)`, `simple_scheduler`, `ddim_scheduler`) and
# comfy_extras/nodes_align_your_steps.py (tables and `loglinear_interp`), which are not on PyPI;
# the model's sigma <-> timestep mapping is k-diffusion's `DiscreteSchedule` (k-diffusion 0.1.1.post1
# from PyPI, loaded without its package __init__, whose imports need training-only packages), and
# the sampler loops below are k-diffusion's own `sample_*` functions.

AYS_TABLES = {
    "SD1": [14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092,
            0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582],
    "SDXL": [14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141,
             0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582],
}


def load_k_diffusion():
    import importlib.util
    import types

    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"], sys.modules["k_diffusion.external"]

    spec = importlib.util.find_spec("k_diffusion")
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = [os.path.dirname(spec.origin)]
    sys.modules["k_diffusion"] = pkg
    utils = types.ModuleType("k_diffusion.utils")
    # The two helpers sampling.py/external.py use from k_diffusion.utils, as written there.
    utils.append_dims = lambda x, target_dims: x[(...,) + (None,) * (target_dims - x.ndim)]
    utils.append_zero = lambda x: torch.cat([x, x.new_zeros([1])])
    sys.modules["k_diffusion.utils"] = utils
    pkg.utils = utils
    from k_diffusion import external, sampling

    return sampling, external


def comfy_sgm_uniform(ds, steps):
    start, end = ds.sigma_to_t(ds.sigma_max), ds.sigma_to_t(ds.sigma_min)
    timesteps = torch.linspace(float(start), float(end), steps + 1)[:-1]
    return [float(ds.t_to_sigma(t)) for t in timesteps] + [0.0]


def comfy_simple(ds, steps):
    ss = len(ds.sigmas) / steps
    return [float(ds.sigmas[-(1 + int(x * ss))]) for x in range(steps)] + [0.0]


def comfy_ddim_uniform(ds, steps):
    x = 1
    sigs = [0.0]  # ComfyUI skips this 0 only for models whose sigmas[1] is ~0 (not SD)
    ss = max(len(ds.sigmas) // steps, 1)
    while x < len(ds.sigmas):
        sigs.append(float(ds.sigmas[x]))
        x += ss
    return sigs[::-1]


def comfy_ays(model_type, steps):
    def loglinear_interp(t_steps, num_steps):
        xs = np.linspace(0, 1, len(t_steps))
        ys = np.log(t_steps[::-1])
        new_xs = np.linspace(0, 1, num_steps)
        new_ys = np.interp(new_xs, xs, ys)
        return np.exp(new_ys)[::-1].copy()

    sigmas = AYS_TABLES[model_type][:]
    if (steps + 1) != len(sigmas):
        sigmas = loglinear_interp(sigmas, steps + 1)
    sigmas = list(sigmas[-(steps + 1):])
    sigmas[-1] = 0
    return [float(v) for v in torch.FloatTensor(sigmas)]


TABLE_SCHEDULES = {
    "sgm_uniform": comfy_sgm_uniform,
    "simple": comfy_simple,
    "ddim_uniform": comfy_ddim_uniform,
    "align_your_steps": lambda ds, steps: comfy_ays("SD1", steps),
    "align_your_steps_sdxl": lambda ds, steps: comfy_ays("SDXL", steps),
}
# SD's scaled-linear betas (every SD config) and diffusers' default linear betas.
TABLE_CONFIGS = {"sd15": SD15, "linear": {"num_train_timesteps": 1000}}


def discrete_schedule(external, cfg):
    ac = diffusers.EulerDiscreteScheduler.from_config(cfg).alphas_cumprod
    return external.DiscreteSchedule(((1 - ac) / ac) ** 0.5, quantize=False)


def k_runs(sampling, external, common):
    """k-diffusion's sample_* loops with the goldens' fake model (in sigma space) on these schedules."""
    ds = discrete_schedule(external, SD15)
    fixed = common["fixed"]

    def denoiser(x, sigma, **_):
        s = float(sigma[0])
        t = float(ds.sigma_to_t(sigma[:1]))
        eps = base.fake_model(x / (s * s + 1) ** 0.5, t, fixed)
        return x - s * eps

    runs = {
        "euler_sgm_uniform_10": ("euler", "sgm_uniform", 10, sampling.sample_euler),
        "euler_a_simple_8": ("euler_a", "simple", 8, sampling.sample_euler_ancestral),
        "euler_a_karras_12": ("euler_a", "karras", 12, sampling.sample_euler_ancestral),
        "heun_ays_10": ("heun", "align_your_steps", 10, sampling.sample_heun),
        "lms_ddim_uniform_7": ("lms", "ddim_uniform", 7, sampling.sample_lms),
        "lms_ays_sdxl_15": ("lms", "align_your_steps_sdxl", 15, sampling.sample_lms),
        "dpm2_simple_9": ("dpm2", "simple", 9, sampling.sample_dpm_2),
        "dpm2_a_sgm_uniform_6": ("dpm2_a", "sgm_uniform", 6, sampling.sample_dpm_2_ancestral),
    }
    meta, tensors = [], {}
    for name, (sampler, schedule, steps, fn) in runs.items():
        if schedule == "karras":
            # diffusers' Euler Karras range: the spaced (linspace) sigmas' ends.
            e = diffusers.EulerDiscreteScheduler.from_config(SD15, use_karras_sigmas=True)
            e.set_timesteps(steps)
            sigmas = [float(v) for v in e.sigmas]
        else:
            sigmas = TABLE_SCHEDULES[schedule](ds, steps)
        sig = torch.tensor(sigmas, dtype=torch.float32)
        g = torch.Generator().manual_seed(1234)
        draws = []

        def noise_sampler(sigma, sigma_next):
            draws.append(1)
            return torch.randn(fixed.shape, generator=g, dtype=torch.float32)

        x = common["unit_sample"] * sig[0]
        kwargs = {"noise_sampler": noise_sampler} if sampler in ("euler_a", "dpm2_a") else {}
        final = fn(denoiser, x, sig, disable=True, **kwargs)
        tensors[f"{name}.final"] = final.contiguous()
        meta.append({"name": name, "sampler": sampler, "schedule": schedule, "steps": steps,
                     "config": "sd15", "sigmas": sigmas})
    return meta, tensors


def table_schedules(common):
    sampling, external = load_k_diffusion()
    cases = []
    for cfg_name, cfg in TABLE_CONFIGS.items():
        ds = discrete_schedule(external, cfg)
        for schedule, fn in TABLE_SCHEDULES.items():
            if schedule.startswith("align") and cfg_name != "sd15":
                continue  # the AYS tables are in SD's sigma range, whatever the model
            for steps in (1, 4, 7, 10, 20, 30, 50):
                sigmas = fn(ds, steps)
                ts = ds.sigma_to_t(torch.tensor(sigmas[:-1], dtype=torch.float32))
                cases.append({"config": cfg_name, "config_json": json.dumps(cfg, sort_keys=True),
                              "schedule": schedule, "steps": steps, "sigmas": short(sigmas),
                              "timesteps": short(float(t) for t in ts)})
    runs, tensors = k_runs(sampling, external, common)
    for r in runs:
        r["config_json"] = json.dumps(SD15, sort_keys=True)
    with open(os.path.join(OUT, "schedules_a1111.json"), "w") as f:
        json.dump({"k_diffusion": "0.1.1.post1", "tables": cases, "runs": runs}, f, separators=(",", ":"), sort_keys=True)
        f.write("\n")
    path = os.path.join(OUT, "k_diffusion_runs.safetensors")
    save_file(tensors, path)
    os.chmod(path, 0o644)
    return [os.path.join(OUT, "schedules_a1111.json"), path]


def main():
    if diffusers.__version__ != "0.42.1":
        print(f"warning: goldens are meant for diffusers 0.42.1, found {diffusers.__version__}", file=sys.stderr)
    torch.manual_seed(0)
    common = load_file(os.path.join(OUT, "common.safetensors"))
    per_family = {}
    meta = []
    for name, family, overrides, steps, strength, file_family in case_list():
        tensors = per_family.setdefault(file_family, {})
        runner = run_k_case if family in K_ONLY else run_case
        meta.append(runner(name, family, overrides, steps, common, tensors, strength, file_family))
    written = []
    for family, tensors in per_family.items():
        path = os.path.join(OUT, f"{family}.safetensors")
        save_file(tensors, path)
        os.chmod(path, 0o644)
        written.append(path)
    path = os.path.join(OUT, "cases_a1111.json")
    with open(path, "w") as f:
        json.dump({"diffusers": diffusers.__version__, "cases": meta}, f, indent=1, sort_keys=True)
        f.write("\n")
    written.append(path)
    n_real = real_configs()
    written.append(os.path.join(OUT, "real_configs_a1111.json"))
    written += table_schedules(common)
    total = sum(os.path.getsize(p) for p in written)
    print(f"wrote {len(meta)} cases and {n_real} real-config cases, {total / 1e6:.2f} MB")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
