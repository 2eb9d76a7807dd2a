"""Helpers shared by the fixture generators under tools/ (models, schedulers, pipelines goldens).

Import from a sibling module with `from fixture_common import save_tensors, ...` (tools/ is put on
sys.path when a script in it is run directly).
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file, save_file

REPO_ROOT = Path(__file__).resolve().parent.parent
# SD_FIXTURES_DIR redirects the output (the Rust tests read the same variable), e.g. to diff a fresh set.
FIXTURES_DIR = Path(os.environ.get("SD_FIXTURES_DIR") or REPO_ROOT / "fixtures").resolve()
GOLDENS_DIR = FIXTURES_DIR / "goldens"
ASSETS_DIR = REPO_ROOT / "crates" / "sd-models" / "assets"

# Every golden must carry signal: a golden that is all ~0 cannot catch a broken implementation.
MIN_GOLDEN_MAX_ABS = 1e-3


def seed_everything(seed: int) -> None:
    """Seed torch's global RNG; called once per model so each fixture is reproducible on its own."""
    torch.manual_seed(seed)


def generator(seed: int) -> torch.Generator:
    """A CPU generator for fixed random inputs, independent of the global RNG state."""
    return torch.Generator(device="cpu").manual_seed(seed)


def randn(shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    """Deterministic standard-normal float32 tensor (times `scale`)."""
    return torch.randn(*shape, generator=generator(seed), dtype=torch.float32) * scale


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Write tensors as safetensors: detached, contiguous, on CPU; floating goldens as float32 unless already half."""
    out = {}
    for name, t in tensors.items():
        t = t.detach().cpu()
        if t.is_floating_point() and t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            t = t.to(torch.float32)
        out[name] = t.contiguous().clone()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt"}
    if metadata:
        meta.update(metadata)
    save_file(out, str(path), metadata=meta)


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors file into a dict of CPU tensors."""
    return load_file(str(path))


def canonical_header(path: str | os.PathLike) -> None:
    """Rewrite a safetensors header with its `__metadata__` entries sorted: safetensors (Rust) writes them in hash-map
    order, which changes from run to run as soon as there are two of them."""
    path = Path(path)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def save_json(path: str | os.PathLike, obj) -> None:
    """Write JSON with stable formatting (sorted keys off: field order is part of the readable spec)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def max_abs(t: torch.Tensor) -> float:
    """Largest absolute value of a tensor, as a Python float."""
    return float(t.detach().abs().max()) if t.numel() else 0.0


def check_goldens(label: str, tensors: Mapping[str, torch.Tensor], skip: tuple[str, ...] = ()) -> None:
    """Print max|x| for every floating golden and fail if one is ~0 or not finite."""
    for name, t in tensors.items():
        if not t.is_floating_point() or name in skip:
            continue
        m = max_abs(t)
        print(f"  {label}:{name:<28} shape={list(t.shape)!s:<18} max|x|={m:.4g}")
        if not math.isfinite(m):
            raise AssertionError(f"{label}:{name} is not finite")
        if m <= MIN_GOLDEN_MAX_ABS:
            raise AssertionError(f"{label}:{name} is ~0 (max|x|={m}); the golden would not catch anything")


@torch.no_grad()
def randomize_weights_(model: torch.nn.Module, seed: int, norm_jitter: float = 0.2) -> None:
    """Re-draw every parameter so goldens exercise every weight.

    Library default inits leave norm scales at 1, biases at 0 and CLIP matrices at std 0.02, which makes
    attention nearly uniform and hides bugs in biases, norm affines and q/k handling. Matrices and conv
    kernels become N(0, 1/fan_in) (unit-variance activations, O(1) attention logits); 1-D weights
    (norm scales) become 1 + jitter*N(0,1); biases and other 1-D tensors become jitter*N(0,1).
    """
    g = generator(seed)
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
        elif name.endswith("weight"):
            p.copy_(1.0 + norm_jitter * torch.randn(p.shape, generator=g))
        else:
            p.copy_(norm_jitter * torch.randn(p.shape, generator=g))


def assert_state_dicts_equal(label: str, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    """Fail unless two state dicts have the same keys and bit-identical tensors."""
    ka, kb = set(a), set(b)
    if ka != kb:
        raise AssertionError(
            f"{label}: key sets differ; only in first: {sorted(ka - kb)[:10]}, only in second: {sorted(kb - ka)[:10]}"
        )
    for k in sorted(ka):
        if a[k].shape != b[k].shape or not torch.equal(a[k].to(b[k].dtype), b[k]):
            raise AssertionError(f"{label}: tensor {k} differs")


def dir_size(path: str | os.PathLike) -> int:
    """Total size in bytes of the files under `path`."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# ---- Recording every random draw a diffusers pipeline makes, so the Rust tests can replay them.

DRAWS: list[torch.Tensor] = []
"""Every tensor drawn through diffusers' `randn_tensor` since the last `DRAWS.clear()`, as float32."""

_original_randn = None


def _recording_randn(*args, **kwargs):
    t = _original_randn(*args, **kwargs)
    DRAWS.append(t.detach().clone().float())
    return t


def record_randn() -> None:
    """Route every module-level `randn_tensor` name in the loaded diffusers modules (pipelines, VAE,
    schedulers) through the recorder; call it after the pipelines are imported and before each run."""
    import sys

    global _original_randn
    from diffusers.utils import torch_utils

    if _original_randn is None:
        _original_randn = torch_utils.randn_tensor
    for mod in list(sys.modules.values()):
        if mod is None or not getattr(mod, "__name__", "").startswith("diffusers"):
            continue
        if getattr(mod, "randn_tensor", None) is _original_randn:
            mod.randn_tensor = _recording_randn
