#!/usr/bin/env python3
"""Goldens for A1111's "resize seed from" (`seed_resize_from_h/w`): the initial noise of one image drawn at the
size the seed was found at (`from // 8` latent pixels, a fresh generator seeded `seed`), pasted centred into
the noise the image's own generator draws at the target size, as A1111's `ImageRNG.first` (modules/rng.py)
does; with a variation seed the small noise is slerped with the subseed's first. Written out from A1111's
code (it is not on PyPI), with torch's CPU generator (A1111's "CPU" random source).

Writes fixtures/goldens/seed_resize.safetensors:
    tools/.venv/bin/python tools/seed_resize_goldens.py
"""

from pathlib import Path

import torch
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parent.parent / "fixtures" / "goldens" / "seed_resize.safetensors"


def randn(seed: int, shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def slerp(val, low, high):
    # A1111's modules/rng.py slerp.
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


def first(shape, seed, from_h, from_w, subseed=None, strength=0.0):
    """A1111's ImageRNG.first for one image; also returns the generator's next draw (the sampler's noise)."""
    noise_shape = shape if from_h <= 0 or from_w <= 0 else (shape[0], int(from_h) // 8, int(from_w) // 8)
    generator = torch.Generator().manual_seed(seed)
    subnoise = randn(subseed, noise_shape) if subseed is not None and strength != 0 else None
    if noise_shape != shape:
        noise = randn(seed, noise_shape)
    else:
        noise = torch.randn(shape, generator=generator)
    if subnoise is not None:
        noise = slerp(strength, noise, subnoise)
    if noise_shape != shape:
        x = torch.randn(shape, generator=generator)
        dx = (shape[2] - noise_shape[2]) // 2
        dy = (shape[1] - noise_shape[1]) // 2
        w = noise_shape[2] if dx >= 0 else noise_shape[2] + 2 * dx
        h = noise_shape[1] if dy >= 0 else noise_shape[1] + 2 * dy
        tx = 0 if dx < 0 else dx
        ty = 0 if dy < 0 else dy
        dx = max(-dx, 0)
        dy = max(-dy, 0)
        x[:, ty:ty + h, tx:tx + w] = noise[:, dy:dy + h, dx:dx + w]
        noise = x
    return noise, torch.randn(shape, generator=generator)


def main() -> None:
    shape = (4, 8, 8)
    cases = {
        # name: (seed, from_h, from_w, subseed, strength)
        "smaller": (11, 48, 80, None, 0.0),    # 6x10 latents: taller crop pasted, wider one cropped
        "larger": (12, 112, 40, None, 0.0),    # 14x5
        "odd": (13, 56, 72, None, 0.0),        # 7x9
        "variation": (14, 48, 48, 99, 0.4),   # 6x6 with a variation seed
        "same": (15, 64, 64, None, 0.0),       # 8x8: as without resizing
    }
    tensors = {}
    for name, (seed, fh, fw, sub, st) in cases.items():
        noise, nxt = first(shape, seed, fh, fw, sub, st)
        tensors[f"{name}.first"] = noise.contiguous()
        tensors[f"{name}.next"] = nxt.contiguous()
        tensors[f"{name}.args"] = torch.tensor([seed, fh, fw, -1 if sub is None else sub], dtype=torch.int64)
        tensors[f"{name}.strength"] = torch.tensor([st], dtype=torch.float32)
    save_file(tensors, OUT)
    print(f"wrote {len(cases)} seed-resize cases to {OUT}")


if __name__ == "__main__":
    main()
