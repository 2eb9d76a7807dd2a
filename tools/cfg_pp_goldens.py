#!/usr/bin/env python3
"""Goldens for Euler CFG++ (Chung et al. 2024, "CFG++"), as ComfyUI's `sample_euler_cfg_pp` and Forge's
"Euler CFG++" run it: each step lands on the guided denoised estimate and re-noises it along the
*unconditional* direction,

    x_next = denoised_guided + to_d(x, sigma, denoised_uncond) * sigma_next,

with k-diffusion's `to_d` (from PyPI) and diffusers' `EulerDiscreteScheduler` sigmas for the real SD 1.5
config (fixtures/schedulers/sd15.json), Karras and default spacing. ComfyUI is not on PyPI: the loop above
is its published loop, written out here.

The model is a fixed synthetic epsilon predictor on the scaled input x_in = x / sqrt(sigma^2 + 1):
eps_uncond = 0.3 * x_in, eps_cond = 0.25 * x_in + 0.1, which the Rust test evaluates the same way.

Writes fixtures/goldens/schedulers/euler_cfg_pp.safetensors and euler_cfg_pp.json.
    /root/venv-sd/bin/python tools/cfg_pp_goldens.py
"""

import json
from pathlib import Path

import torch
import sys

from diffusers import EulerDiscreteScheduler
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
# k-diffusion's package __init__ imports its training stack; the sampling module alone is loaded as
# scheduler_goldens_a1111.py does.
from scheduler_goldens_a1111 import load_k_diffusion  # noqa: E402

to_d = load_k_diffusion()[0].to_d

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "fixtures" / "goldens" / "schedulers"
CONFIG = ROOT / "fixtures" / "schedulers" / "sd15.json"


def run(steps: int, scale: float, karras: bool) -> dict[str, torch.Tensor]:
    cfg = json.loads(CONFIG.read_text())
    sched = EulerDiscreteScheduler.from_config(cfg, use_karras_sigmas=karras)
    sched.set_timesteps(steps)
    sigmas = sched.sigmas.double()
    x = torch.randn((1, 4, 6, 5), generator=torch.Generator().manual_seed(31), dtype=torch.float64) * sigmas[0]
    x0 = x.clone()
    seen = []
    for i in range(len(sigmas) - 1):
        sigma, nxt = sigmas[i], sigmas[i + 1]
        x_in = x / torch.sqrt(sigma**2 + 1)
        eps_u = 0.3 * x_in
        eps_c = 0.25 * x_in + 0.1
        eps_g = eps_u + scale * (eps_c - eps_u)
        denoised = x - sigma * eps_g
        uncond_denoised = x - sigma * eps_u
        x = denoised + to_d(x, sigma, uncond_denoised) * nxt
        seen.append(x.clone())
    return {"x_init": x0.float(), "sigmas": sigmas.float(), "steps": torch.stack(seen).float()}


def main() -> None:
    tensors: dict[str, torch.Tensor] = {}
    cases = []
    for steps, scale, karras in [(20, 0.8, False), (8, 1.5, True), (4, 0.0, False)]:
        name = f"s{steps}_cfg{str(scale).replace('.', 'p')}_{'karras' if karras else 'default'}"
        for k, v in run(steps, scale, karras).items():
            tensors[f"{name}.{k}"] = v.contiguous()
        cases.append({"name": name, "steps": steps, "scale": scale, "karras": karras})
    save_file(tensors, OUT / "euler_cfg_pp.safetensors")
    (OUT / "euler_cfg_pp.json").write_text(json.dumps({"config": "fixtures/schedulers/sd15.json", "cases": cases}, indent=1) + "\n")
    print(f"wrote {len(cases)} Euler CFG++ cases")


if __name__ == "__main__":
    main()
