"""Tiny LoRA adapters for the tiny fixture models, and diffusers goldens with them fused.

Writes fixtures/lora/*.safetensors (kohya with diffusers-style and LDM-style block names, PEFT/diffusers
`lora_A`/`lora_B`, old diffusers `.lora.down`/`.lora.up`, LyCORIS LoHa/LoKr) and fixtures/goldens/lora/*:
UNet and text-encoder outputs after diffusers' `load_lora_weights` + `fuse_lora(lora_scale=…)` (LoHa/LoKr:
PEFT's LyCORIS layers merged, as diffusers cannot load those for SD), and one end-to-end txt2img with
two adapters at different strengths (random draws recorded like tools/pipeline_goldens.py).

Reads the tiny models (fixtures/sd15, fixtures/sdxl) and never writes them. Run after make_fixtures.py:
    /root/venv-sd/bin/python tools/lora_fixtures.py
Needs `peft` (diffusers' LoRA loading uses it).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixture_common import FIXTURES_DIR, GOLDENS_DIR, check_goldens, generator, randn, save_json, save_tensors  # noqa: E402
from ldm_convert import unet_to_ldm  # noqa: E402
import pipeline_goldens as pg  # noqa: E402

from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline  # noqa: E402

LORA_DIR = FIXTURES_DIR / "lora"
OUT = GOLDENS_DIR / "lora"
TE_PROMPTS = ["a photo of a cat", "an astronaut riding a horse on the moon"]

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
RESNET_TARGETS = ("conv1", "conv2", "time_emb_proj")
TE_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def lora_targets(model: torch.nn.Module, suffixes: tuple[str, ...]) -> list[tuple[str, torch.nn.Module]]:
    out = []
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and any(name.endswith("." + s) for s in suffixes):
            out.append((name, m))
    return out


def down_up(m: torch.nn.Module, rank: int, g: torch.Generator, up_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Random LoRA factors shaped like kohya/PEFT store them for a Linear or a Conv2d."""
    if isinstance(m, torch.nn.Linear):
        down = torch.randn(rank, m.in_features, generator=g) / math.sqrt(m.in_features)
        up = torch.randn(m.out_features, rank, generator=g) * up_scale / math.sqrt(rank)
    else:
        kh, kw = m.kernel_size
        fan_in = m.in_channels * kh * kw
        down = torch.randn(rank, m.in_channels, kh, kw, generator=g) / math.sqrt(fan_in)
        up = torch.randn(m.out_channels, rank, 1, 1, generator=g) * up_scale / math.sqrt(rank)
    return down, up


def make_modules(components: dict[str, torch.nn.Module], seed: int, rank: int) -> dict[tuple[str, str], tuple]:
    """{(component, module): (down, up, alpha)} for every targeted layer.

    One alpha (≠ rank) for all modules: diffusers' kohya converter drops per-module alphas of some
    names (attention processors, text-encoder self_attn) and falls back to the most common alpha, so
    only a uniform alpha gives a faithful golden. Per-module alphas are covered by the Rust unit tests.
    """
    g = generator(seed)
    mods = {}
    for comp, model in components.items():
        suffixes = UNET_TARGETS + RESNET_TARGETS if comp == "unet" else TE_TARGETS
        for name, m in lora_targets(model, suffixes):
            if comp != "unet" and not name.startswith("text_model."):
                # transformers 5 dropped the `text_model` level from module names; LoRA files in the
                # wild (and our loader's names) keep it.
                name = "text_model." + name
            down, up = down_up(m, rank, g, 0.6)
            alpha = 1.0
            mods[(comp, name)] = (down, up, alpha)
    return mods


KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}


def kohya_dict(mods, ldm_unet: bool, lpb: int, sdxl: bool) -> dict[str, torch.Tensor]:
    out = {}
    for (comp, name), (down, up, alpha) in mods.items():
        path = name
        if comp == "unet" and ldm_unet:
            (path,) = [k[: -len(".w")] for k in unet_to_ldm({name + ".w": down}, lpb, prefix="")]
        prefix = KOHYA_PREFIX[comp]
        if sdxl and comp == "text_encoder":
            prefix = "lora_te1_"
        key = prefix + path.replace(".", "_")
        out[f"{key}.lora_down.weight"] = down
        out[f"{key}.lora_up.weight"] = up
        out[f"{key}.alpha"] = torch.tensor(alpha)
    return out


def peft_dict(mods, old_style: bool = False) -> dict[str, torch.Tensor]:
    """diffusers/PEFT keys; no alphas (so alpha = rank, scale 1)."""
    out = {}
    for (comp, name), (down, up, _alpha) in mods.items():
        if old_style:
            out[f"{comp}.{name}.lora.down.weight"] = down
            out[f"{comp}.{name}.lora.up.weight"] = up
        else:
            out[f"{comp}.{name}.lora_A.weight"] = down
            out[f"{comp}.{name}.lora_B.weight"] = up
    return out


def kohya_meta(rank: int, base: str) -> dict:
    return {"ss_network_dim": str(rank), "ss_network_alpha": "1.0", "ss_base_model_version": base,
            "ss_network_module": "networks.lora"}


def fresh_sd15():
    p = StableDiffusionPipeline.from_pretrained(FIXTURES_DIR / "sd15", safety_checker=None, requires_safety_checker=False)
    p.set_progress_bar_config(disable=True)
    return p


def fresh_sd2():
    p = StableDiffusionPipeline.from_pretrained(FIXTURES_DIR / "sd2", safety_checker=None, requires_safety_checker=False)
    p.set_progress_bar_config(disable=True)
    return p


def fresh_sdxl():
    p = StableDiffusionXLPipeline.from_pretrained(FIXTURES_DIR / "sdxl")
    p.set_progress_bar_config(disable=True)
    return p


def fuse(pipe, loras: list[tuple[Path, float]]):
    """diffusers' load_lora_weights + fuse_lora(lora_scale) for each adapter, then drop the LoRA layers."""
    for i, (path, strength) in enumerate(loras):
        name = f"a{i}"
        pipe.load_lora_weights(str(path), adapter_name=name)
        pipe.fuse_lora(lora_scale=strength, adapter_names=[name])
        pipe.unload_lora_weights()
    return pipe


def te_ids(tok) -> torch.Tensor:
    return tok(TE_PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"].to(torch.int64)


def component_goldens(pipe, xl: bool) -> dict[str, torch.Tensor]:
    cfg = pipe.unet.config
    g = {
        "sample": randn((2, cfg.in_channels, cfg.sample_size, cfg.sample_size), 901),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": randn((2, 77, cfg.cross_attention_dim), 902),
        "input_ids": te_ids(pipe.tokenizer),
    }
    added = None
    if xl:
        g["text_embeds"] = randn((2, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim), 903)
        g["time_ids"] = torch.tensor([[32, 32, 0, 0, 32, 32], [48, 40, 4, 8, 32, 32]], dtype=torch.float32)
        added = {"text_embeds": g["text_embeds"], "time_ids": g["time_ids"]}
        g["te2_input_ids"] = te_ids(pipe.tokenizer_2)
    g["unet_out"] = pipe.unet(g["sample"], g["timestep"], g["encoder_hidden_states"], added_cond_kwargs=added).sample
    g["te_last_hidden_state"] = pipe.text_encoder(g["input_ids"]).last_hidden_state
    if xl:
        o = pipe.text_encoder_2(g["te2_input_ids"])
        g["te2_last_hidden_state"] = o.last_hidden_state
        g["te2_text_embeds"] = o.text_embeds
    return g


def assert_changes(label: str, base: dict, lora: dict) -> None:
    for k in ("unet_out", "te_last_hidden_state", "te2_last_hidden_state"):
        if k in base:
            d = (base[k] - lora[k]).abs().max().item()
            print(f"  {label}:{k} differs from the base model by {d:.4g}")
            assert d > 1e-2, f"{label}: the LoRA does not change {k} (max diff {d})"


@torch.no_grad()
def family(label: str, fresh, xl: bool, seed: int) -> None:
    pipe = fresh()
    comps = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    if xl:
        comps["text_encoder_2"] = pipe.text_encoder_2
    lpb = pipe.unet.config.layers_per_block
    base = kohya_meta(4, "sdxl_base_v1-0" if xl else ("sd_v2" if label == "sd2" else "sd_v1"))
    kohya = make_modules(comps, seed, 4)
    peft = make_modules(comps, seed + 1, 2)
    save_tensors(LORA_DIR / f"{label}_kohya.safetensors", kohya_dict(kohya, False, lpb, xl), base)
    save_tensors(LORA_DIR / f"{label}_kohya_ldm.safetensors", kohya_dict(kohya, True, lpb, xl), base)
    save_tensors(LORA_DIR / f"{label}_peft.safetensors", peft_dict(peft))
    save_tensors(LORA_DIR / f"{label}_diffusers_old.safetensors", peft_dict(peft, old_style=True))
    print(f"{label}: {len(kohya)} kohya modules, {len(peft)} peft modules")

    plain = component_goldens(fresh(), xl)
    for name, strength in [("kohya", 0.8), ("peft", -0.6)]:
        g = component_goldens(fuse(fresh(), [(LORA_DIR / f"{label}_{name}.safetensors", strength)]), xl)
        assert_changes(f"{label}_{name}", plain, g)
        if name == "kohya":
            # The LDM-style file holds the same tensors under LDM block names, so it shares this golden.
            # diffusers' own sgm-name mapping is only a heuristic (it rejects SD1 LDM names outright), so
            # it is reported here, not relied on.
            try:
                g2 = component_goldens(fuse(fresh(), [(LORA_DIR / f"{label}_kohya_ldm.safetensors", strength)]), xl)
                d = max((g[k] - g2[k]).abs().max().item() for k in g if k.endswith(("out", "state", "embeds")))
                print(f"  {label}: diffusers fuses the LDM-style names to within {d:.3g} of the diffusers-style ones")
            except Exception as e:  # noqa: BLE001
                print(f"  {label}: diffusers cannot load the LDM-style kohya names ({type(e).__name__})")
        check_goldens(f"{label}_{name}", g)
        save_tensors(OUT / f"{label}_{name}.safetensors", g, {"strength": str(strength)})


@torch.no_grad()
def end_to_end() -> None:
    pipe = fuse(fresh_sd15(), [(LORA_DIR / "sd15_kohya.safetensors", 0.7), (LORA_DIR / "sd15_peft.safetensors", -0.4)])
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    common = dict(prompt="a red fox in the snow", negative_prompt="blurry, grey", height=pg.SIZE, width=pg.SIZE)
    meta = dict(common, model="sd15", sampler="euler", steps=3, guidance_scale=7.5, seed=71, operation="txt2img",
                loras=[["sd15_kohya.safetensors", 0.7], ["sd15_peft.safetensors", -0.4]])
    pg.OUT = OUT
    pg.run("sd15_txt2img_two_loras", pipe, dict(common, num_inference_steps=3, guidance_scale=7.5), meta)


LYCORIS_UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]
LYCORIS_TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


@torch.no_grad()
def lycoris(kind: str, seed: int, strength: float) -> None:
    """LoHa / LoKr through PEFT's own LyCORIS layers (diffusers cannot load them for SD): random
    factors saved under kohya/LyCORIS names, golden from PEFT's merge with the factors scaled by `strength`."""
    from peft import LoHaConfig, LoKrConfig, inject_adapter_in_model
    from peft.tuners.lycoris_utils import LycorisLayer

    pipe = fresh_sd15()
    if kind == "loha":
        make = lambda targets: LoHaConfig(r=2, alpha=1, target_modules=targets, init_weights=False)  # noqa: E731
        parts, scaled = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), "hada_w1_a"
    else:
        # r=1 keeps w2 rank-decomposed, where PEFT's alpha/r scaling and LyCORIS' agree.
        make = lambda targets: LoKrConfig(r=1, alpha=0.5, target_modules=targets, init_weights=False)  # noqa: E731
        parts, scaled = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"), None
    g = generator(seed)
    tensors = {}
    for comp, model, targets, prefix in [
        ("unet", pipe.unet, LYCORIS_UNET_TARGETS, "lora_unet_"),
        ("text_encoder", pipe.text_encoder, LYCORIS_TE_TARGETS, "lora_te_"),
    ]:
        inject_adapter_in_model(make(targets), model, adapter_name="default")
        for name, m in model.named_modules():
            if not isinstance(m, LycorisLayer):
                continue
            path = name if comp == "unet" or name.startswith("text_model.") else "text_model." + name
            key = prefix + path.replace(".", "_")
            present = [p for p in parts if "default" in getattr(m, p, {})]
            for p in present:
                w = getattr(m, p)["default"]
                w.copy_(torch.randn(w.shape, generator=g) * (0.5 if kind == "loha" else 0.4))
                tensors[f"{key}.{p}"] = w.detach().clone()
            tensors[f"{key}.alpha"] = torch.tensor(float(m.alpha["default"]) if hasattr(m, "alpha") else (1.0 if kind == "loha" else 0.5))
            # Strength scales the whole update: one factor of the product carries it.
            first = scaled or ("lokr_w1" if "lokr_w1" in present else "lokr_w1_a")
            getattr(m, first)["default"].mul_(strength)
            m.merge(adapter_names=["default"])
    save_tensors(LORA_DIR / f"sd15_{kind}.safetensors", tensors, kohya_meta(2 if kind == "loha" else 1, "sd_v1") | {"ss_network_module": "lycoris.kohya"})
    plain = component_goldens(fresh_sd15(), False)
    gold = component_goldens(pipe, False)
    assert_changes(f"sd15_{kind}", plain, gold)
    check_goldens(f"sd15_{kind}", gold)
    save_tensors(OUT / f"sd15_{kind}.safetensors", gold, {"strength": str(strength)})
    print(f"sd15_{kind}: {len(tensors)} tensors")


def main() -> None:
    LORA_DIR.mkdir(parents=True, exist_ok=True)
    OUT.mkdir(parents=True, exist_ok=True)
    family("sd15", fresh_sd15, False, 700)
    family("sdxl", fresh_sdxl, True, 800)
    # SD2: linear proj_in/out, and an OpenCLIP text encoder (fused q/k/v) in the single file.
    family("sd2", fresh_sd2, False, 850)
    end_to_end()
    lycoris("loha", 750, 0.7)
    lycoris("lokr", 760, -0.8)


if __name__ == "__main__":
    main()
