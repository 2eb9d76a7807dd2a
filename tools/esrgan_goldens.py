"""ESRGAN-family (RRDBNet) upscaler fixtures and goldens from spandrel, the loader ComfyUI and chaiNNer use.

Builds tiny random RRDBNets with spandrel's own architecture class, saves them in the key layouts users have
and loads every file back with spandrel's `ModelLoader` (its detection, key-layout conversion and
hyper-parameter inference), then records what spandrel computes:

- fixtures/esrgan/esrgan_x4_old.pth              old ESRGAN names (`model.0`, `model.1.sub.N.RDBk.convj.0`,
                                                  `model.3`/`model.6` upconvs, `model.8` HR conv, `model.10`),
                                                  a bare state dict (as 4x-UltraSharp and most community models)
- fixtures/esrgan/esrgan_x4_basicsr.safetensors  the same weights under BasicSR's RRDBNet names (`conv_first`,
                                                  `body.N.rdbk.convj`, `conv_body`, `conv_up1/2`, `conv_hr`, `conv_last`)
- fixtures/esrgan/realesrgan_x4_params_ema.pth   the same weights wrapped as Real-ESRGAN ships them:
                                                  `{"params_ema": <BasicSR names>}`
- fixtures/esrgan/realesrgan_x2_params.pth       Real-ESRGAN x2 style: pixel-unshuffle 2 at the input (in_nc 12),
                                                  wrapped as `{"params": ...}` (BasicSR training checkpoints)
- fixtures/esrgan/realesrgan_x1.safetensors      Real-ESRGAN x1 style: pixel-unshuffle 4 (in_nc 48)
- fixtures/esrgan/bsrgan_x2.pth                  BSRGAN/RealSR names (`RRDB_trunk`, `trunk_conv`, `upconv1`, `HRconv`)
- fixtures/esrgan/esrgan_plus_x2_old.pth         ESRGAN+ (extra `conv1x1` residual paths), old names

fixtures/goldens/esrgan/<model>.safetensors holds `input` (1×3×12×16 in [0, 1]), `raw` (the network's forward,
unclamped) and `clamped` (what spandrel's descriptor returns: padded to its size requirements and clamped to
[0, 1]); the unshuffle models also hold `input_odd` (1×3×7×9) and `raw_odd` (the network reflect-pads to a
multiple of the unshuffle factor and crops). fixtures/goldens/esrgan/manifest.json lists, per fixture file,
its golden and the hyper-parameters spandrel inferred.

spandrel hard-codes 32 growth channels (every released ESRGAN model has 32), which would make each fixture
~1 MB. To keep them tiny, the RRDB blocks are built with 4 growth channels by patching the `gc` argument
spandrel's RRDBNet passes to its `RRDB` block; everything else (detection, key conversion, scale and
unshuffle inference, forward) is spandrel's. The script checks that the patch changes nothing else: a gc=32
model gives bit-identical outputs with and without it.

Run: /root/venv-sd/bin/python tools/esrgan_goldens.py   (needs `spandrel`, see requirements.txt)
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixture_common import (  # noqa: E402
    FIXTURES_DIR,
    GOLDENS_DIR,
    assert_state_dicts_equal,
    check_goldens,
    dir_size,
    randn,
    randomize_weights_,
    save_json,
    save_tensors,
)

import spandrel  # noqa: E402
import spandrel.architectures.__arch_helpers.block as spandrel_block  # noqa: E402
from spandrel import ModelLoader  # noqa: E402
from spandrel.architectures.ESRGAN import ESRGAN  # noqa: E402

MODELS = FIXTURES_DIR / "esrgan"
OUT = GOLDENS_DIR / "esrgan"
GROWTH = 4


@contextlib.contextmanager
def growth_channels(gc: int):
    """Make spandrel's RRDBNet build its RRDB blocks with `gc` growth channels instead of its fixed 32."""
    original = spandrel_block.RRDB.__init__

    def patched(self, *args, **kwargs):
        kwargs["gc"] = gc
        original(self, *args, **kwargs)

    spandrel_block.RRDB.__init__ = patched
    try:
        yield
    finally:
        spandrel_block.RRDB.__init__ = original


def build(seed: int, *, in_nc: int, nf: int, nb: int, scale: int, plus: bool = False, shuffle: int | None = None,
          gc: int = GROWTH) -> OrderedDict:
    """A random spandrel RRDBNet's state dict (old ESRGAN names), weights re-drawn from a fixed generator."""
    torch.manual_seed(seed)
    with growth_channels(gc):
        net = ESRGAN(in_nc=in_nc, out_nc=3, num_filters=nf, num_blocks=nb, scale=scale, plus=plus,
                     shuffle_factor=shuffle)
    randomize_weights_(net, seed)
    with torch.no_grad():
        # Centre the output near [0, 1] so the clamped golden keeps signal on both sides of the clamp.
        last = max(int(k.split(".")[1]) for k in net.state_dict() if k.startswith("model."))
        net.model[last].bias.add_(0.5)
    return OrderedDict((k, v.detach().clone()) for k, v in net.state_dict().items())


def upconv_indices(old: dict) -> tuple[list[int], int, int]:
    """The old layout's upsampling conv indices, HR conv index and last conv index."""
    top = sorted({int(m.group(1)) for k in old if (m := re.match(r"model\.(\d+)\.weight$", k))})
    last = top[-1]
    hr = last - 2
    ups = [i for i in top if 1 < i < hr]
    return ups, hr, last


def to_new_names(old: dict, bsrgan: bool = False) -> OrderedDict:
    """Old ESRGAN names → BasicSR RRDBNet names (or BSRGAN/RealSR names with `bsrgan`)."""
    ups, hr, last = upconv_indices(old)
    nb = max(int(m.group(1)) for k in old if (m := re.match(r"model\.1\.sub\.(\d+)\.RDB", k))) + 1
    trunk, rdb, body, up, hrname = (
        ("RRDB_trunk", "RDB", "trunk_conv", "upconv", "HRconv") if bsrgan else ("body", "rdb", "conv_body", "conv_up", "conv_hr")
    )
    new = OrderedDict()
    for k, v in old.items():
        if m := re.match(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)$", k):
            name = f"{trunk}.{m.group(1)}.{rdb}{m.group(2)}.conv{m.group(3)}.{m.group(4)}"
        elif m := re.match(rf"model\.1\.sub\.{nb}\.(weight|bias)$", k):
            name = f"{body}.{m.group(1)}"
        elif m := re.match(r"model\.(\d+)\.(weight|bias)$", k):
            i, kind = int(m.group(1)), m.group(2)
            if i == 0:
                name = f"conv_first.{kind}"
            elif i in ups:
                name = f"{up}{ups.index(i) + 1}.{kind}"
            elif i == hr:
                name = f"{hrname}.{kind}"
            elif i == last:
                name = f"conv_last.{kind}"
            else:
                raise AssertionError(f"unexpected key {k}")
        else:
            raise AssertionError(f"unexpected key {k}")
        new[name] = v
    return new


def load_with_spandrel(path: Path, gc: int = GROWTH):
    """spandrel's ModelLoader on a fixture file; returns the descriptor (CPU, float32, eval mode)."""
    with growth_channels(gc):
        desc = ModelLoader().load_from_file(str(path))
    if desc.architecture.id != "ESRGAN":
        raise AssertionError(f"{path.name}: spandrel detected {desc.architecture.id}, not ESRGAN")
    desc.model.eval()
    return desc


def save_model(name: str, state: dict, kind: str) -> Path:
    """Write a state dict as `.pth` (bare or wrapped under `kind`) or `.safetensors`."""
    path = MODELS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if name.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif kind == "bare":
        torch.save(state, path)
    else:
        torch.save({kind: state}, path)
    return path


def describe(desc, old: dict) -> dict:
    """The hyper-parameters spandrel inferred (plus the growth channels, which it does not infer)."""
    net = desc.model
    return {
        "scale": desc.scale,
        "input_channels": desc.input_channels,
        "output_channels": desc.output_channels,
        "num_feat": int(old["model.0.weight"].shape[0]),
        "num_block": int(net.hyperparameters["num_blocks"]),
        "num_grow_ch": int(old["model.1.sub.0.RDB1.conv1.0.weight"].shape[0]),
        "unshuffle": int(net.shuffle_factor or 1),
        "plus": bool(net.hyperparameters["plus"]),
        "tags": list(desc.tags),
    }


@torch.no_grad()
def run(desc, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """spandrel's raw network forward and its descriptor call (size padding + clamp to [0, 1])."""
    return desc.model(x.clone()), desc(x.clone())


def main() -> None:
    print(f"spandrel {spandrel.__version__}, torch {torch.__version__}")
    torch.set_grad_enabled(False)
    x = torch.rand(1, 3, 12, 16, generator=torch.Generator().manual_seed(1234))
    x_odd = torch.rand(1, 3, 7, 9, generator=torch.Generator().manual_seed(4321))
    manifest: dict[str, dict] = {}

    # (golden name, seed, build args, [(file, layout, wrapper)])
    models = [
        ("esrgan_x4", 10, dict(in_nc=3, nf=8, nb=2, scale=4), [
            ("esrgan_x4_old.pth", "old", "bare"),
            ("esrgan_x4_basicsr.safetensors", "basicsr", None),
            ("realesrgan_x4_params_ema.pth", "basicsr", "params_ema"),
        ]),
        ("realesrgan_x2", 20, dict(in_nc=12, nf=4, nb=1, scale=4, shuffle=2), [
            ("realesrgan_x2_params.pth", "basicsr", "params"),
        ]),
        ("realesrgan_x1", 30, dict(in_nc=48, nf=4, nb=1, scale=4, shuffle=4), [
            ("realesrgan_x1.safetensors", "basicsr", None),
        ]),
        ("bsrgan_x2", 40, dict(in_nc=3, nf=4, nb=1, scale=2), [
            ("bsrgan_x2.pth", "bsrgan", "bare"),
        ]),
        ("esrgan_plus_x2", 50, dict(in_nc=3, nf=4, nb=1, scale=2, plus=True), [
            ("esrgan_plus_x2_old.pth", "old", "bare"),
        ]),
    ]
    for golden, seed, args, files in models:
        old = build(seed, **args)
        outputs = None
        for file, layout, wrapper in files:
            state = old if layout == "old" else to_new_names(old, bsrgan=layout == "bsrgan")
            path = save_model(file, state, wrapper or "bare")
            desc = load_with_spandrel(path)
            # spandrel converts every layout back to old names: the weights must be exactly ours.
            assert_state_dicts_equal(file, desc.model.state_dict(), old)
            tensors = {"input": x}
            tensors["raw"], tensors["clamped"] = run(desc, x)
            if args.get("shuffle"):
                tensors["input_odd"] = x_odd
                tensors["raw_odd"] = desc.model(x_odd.clone())
            if outputs is None:
                outputs = tensors
            else:
                for k, v in tensors.items():
                    if not torch.equal(v, outputs[k]):
                        raise AssertionError(f"{file}: {k} differs from {files[0][0]} (same weights)")
            info = describe(desc, old)
            info.update(golden=f"{golden}.safetensors", layout=layout, wrapper=wrapper)
            manifest[file] = info
            print(f"{file}: {info}")
        assert outputs is not None
        expected_scale = args["scale"] // (args.get("shuffle") or 1)
        if outputs["raw"].shape[-1] != 16 * expected_scale:
            raise AssertionError(f"{golden}: output {list(outputs['raw'].shape)} is not {expected_scale}x")
        check_goldens(golden, outputs, skip=("input", "input_odd"))
        save_tensors(OUT / f"{golden}.safetensors", outputs)

    # The growth-channel patch must change nothing but the growth channels.
    old = build(99, in_nc=3, nf=4, nb=1, scale=2, gc=32)
    tmp = OUT / "_gc32.pth"
    torch.save(old, tmp)
    try:
        patched = load_with_spandrel(tmp, gc=32).model(x)
        plain = ModelLoader().load_from_file(str(tmp)).model.eval()(x)
        if not torch.equal(patched, plain):
            raise AssertionError("the growth-channel patch changes spandrel's output for gc=32")
    finally:
        tmp.unlink()

    save_json(OUT / "manifest.json", manifest)
    size = dir_size(MODELS) + dir_size(OUT)
    print(f"esrgan fixtures: {size / 1024:.0f} KiB")
    if size > 900 * 1024:
        raise AssertionError(f"esrgan fixtures are {size} bytes; keep them well under 1 MB")


if __name__ == "__main__":
    main()
