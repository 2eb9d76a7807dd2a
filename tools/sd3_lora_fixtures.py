#!/usr/bin/env python3
"""Tiny LoRAs for the tiny SD 3.5 Medium fixture transformer, and diffusers goldens with them fused.

Writes
  - fixtures/sd3/lora/sd3_peft.safetensors : a PEFT/diffusers LoRA (`transformer.transformer_blocks.N.attn.to_q.lora_A.weight`
    …), rank 4, lora_alpha 2 (kept, as diffusers writes it, in the `lora_adapter_metadata` header entry), saved by
    `StableDiffusion3Pipeline.save_lora_weights`. Covers to_q/k/v, to_out.0, add_q/k/v_proj, to_add_out, attn2.*,
    ff.net.*, ff_context.*, norm1.linear, norm1_context.linear (the last block's too: swapped halves), proj_out,
    norm_out.linear (swapped halves), context_embedder, time_text_embed.* and pos_embed.proj (a conv).
  - fixtures/sd3/lora/sd3_kohya.safetensors : a kohya sd-scripts style LoRA with Stability module names
    (`lora_unet_joint_blocks_1_x_block_attn_qkv.lora_down.weight`, `.lora_up.weight`, `.alpha`, alphas differing per
    module), including the last block's `context_block_adaLN_modulation_1` and `final_layer_adaLN_modulation_1`
    (whose halves are swapped between the Stability and diffusers layouts), plus two CLIP modules (`lora_te1_*`,
    `lora_te2_*`) that a transformer-only loader reports as unmatched.
  - fixtures/goldens/sd3/lora.safetensors : the medium transformer's output on the inputs of
    goldens/sd3/transformer.safetensors with the LoRAs fused.

diffusers 0.42.1 has no converter for SD3 LoRAs with Stability (kohya / ComfyUI) names: `load_lora_weights` refuses
them (it loads nothing into the transformer; checked below). Its golden is therefore made the way ComfyUI and sd-scripts apply such a file: every update
(`alpha / rank · up · down`) is added to the weight of the same name in the Stability state dict, and the merged
checkpoint is turned into diffusers' layout by diffusers' own single-file converter
(`convert_sd3_transformer_checkpoint_to_diffusers`, which splits q/k/v and swaps the adaLN halves), then run.

Run after sd3_fixtures.py:
    /root/venv-sd/bin/python tools/sd3_lora_fixtures.py
CPU, float32, deterministic. Needs `peft`.
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fixture_common import FIXTURES_DIR, GOLDENS_DIR, canonical_header, check_goldens, generator, load_tensors, save_tensors  # noqa: E402
from sd3_fixtures import MEDIUM_DIR, SD3_DIR, sd3_to_sai  # noqa: E402

import diffusers  # noqa: E402
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline  # noqa: E402
from diffusers.loaders import single_file_utils  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

warnings.filterwarnings("ignore")
diffusers.utils.logging.set_verbosity_error()
torch.set_grad_enabled(False)
torch.use_deterministic_algorithms(True)

LORA_DIR = SD3_DIR / "lora"
OUT = GOLDENS_DIR / "sd3"
RANK = 4
PEFT_ALPHA = 2.0

# diffusers module names of the PEFT LoRA (medium: 3 blocks, block 0 with attn2, block 2 context_pre_only).
PEFT_TARGETS = [
    "pos_embed.proj",
    "context_embedder",
    "time_text_embed.timestep_embedder.linear_1",
    "time_text_embed.text_embedder.linear_2",
    *[f"transformer_blocks.0.{m}" for m in (
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
        "attn.to_add_out", "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2",
        "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear", "norm1_context.linear")],
    "transformer_blocks.1.attn.to_k",
    "transformer_blocks.1.attn.add_v_proj",
    "transformer_blocks.1.norm1_context.linear",
    "transformer_blocks.2.attn.to_v",
    "transformer_blocks.2.attn.add_q_proj",
    "transformer_blocks.2.ff.net.2",
    "transformer_blocks.2.norm1_context.linear",
    "proj_out",
    "norm_out.linear",
]

# Stability module names of the kohya LoRA -> (out, in) for width 32.
H = 32
KOHYA_TARGETS = {
    "joint_blocks_0_x_block_attn2_qkv": (3 * H, H),
    "joint_blocks_0_context_block_attn_proj": (H, H),
    "joint_blocks_0_x_block_adaLN_modulation_1": (9 * H, H),
    "joint_blocks_1_x_block_attn_qkv": (3 * H, H),
    "joint_blocks_1_context_block_attn_qkv": (3 * H, H),
    "joint_blocks_1_x_block_mlp_fc1": (4 * H, H),
    "joint_blocks_1_context_block_mlp_fc2": (H, 4 * H),
    "joint_blocks_1_context_block_adaLN_modulation_1": (6 * H, H),
    "joint_blocks_2_x_block_attn_proj": (H, H),
    "joint_blocks_2_context_block_attn_qkv": (3 * H, H),
    "joint_blocks_2_context_block_adaLN_modulation_1": (2 * H, H),
    "final_layer_adaLN_modulation_1": (2 * H, H),
    "final_layer_linear": (2 * 2 * 16, H),
    "t_embedder_mlp_2": (H, H),
    "y_embedder_mlp_0": (H, 56),
    "context_embedder": (H, 64),
}
# CLIP modules (CLIP-L width 32, CLIP-G width 24): not part of the transformer.
KOHYA_TE = {
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (32, 32),
    "lora_te2_text_model_encoder_layers_1_mlp_fc1": (48, 24),
}


def peft_lora(base: SD3Transformer2DModel) -> tuple[dict[str, torch.Tensor], dict]:
    """A PEFT adapter on a copy of `base` with deterministic factors; its state dict and config."""
    t = SD3Transformer2DModel.from_config(base.config)
    t.load_state_dict(base.state_dict())
    cfg = LoraConfig(r=RANK, lora_alpha=PEFT_ALPHA, target_modules=PEFT_TARGETS, init_lora_weights=False)
    t.add_adapter(cfg)
    g = generator(6300)
    for name, p in sorted(t.named_parameters()):
        if "lora_A" in name or "lora_B" in name:
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "lora_A" in name else 0.5) / math.sqrt(fan_in))
    sd = get_peft_model_state_dict(t)
    covered = {k.rsplit(".lora_", 1)[0] for k in sd}
    assert covered == set(PEFT_TARGETS), sorted(set(PEFT_TARGETS) ^ covered)
    meta = t.peft_config["default"].to_dict()
    meta["target_modules"] = sorted(meta["target_modules"])
    return sd, meta


def kohya_lora() -> dict[str, torch.Tensor]:
    g = generator(6301)
    sd = {}
    for i, (name, (out_f, in_f)) in enumerate({**KOHYA_TARGETS, **KOHYA_TE}.items()):
        key = name if name.startswith("lora_te") else f"lora_unet_{name}"
        sd[f"{key}.lora_down.weight"] = torch.randn(RANK, in_f, generator=g) / math.sqrt(in_f)
        sd[f"{key}.lora_up.weight"] = torch.randn(out_f, RANK, generator=g) * 0.5
        # Alphas differ per module (one equals the rank) so per-module scaling is exercised.
        sd[f"{key}.alpha"] = torch.tensor(float(RANK if i % 3 == 0 else 1 + i % 3))
    return sd


def merge_kohya_sai(base: SD3Transformer2DModel, kohya: dict[str, torch.Tensor], strength: float) -> dict[str, torch.Tensor]:
    """The base transformer's Stability state dict with the kohya updates added (ComfyUI's / sd-scripts' rule)."""
    n = base.config.num_layers
    sai = sd3_to_sai(base.state_dict(), n, prefix="")
    underscored = {k[: -len(".weight")].replace(".", "_"): k for k in sai if k.endswith(".weight")}
    for name in KOHYA_TARGETS:
        weight = underscored[name]
        down, up = kohya[f"lora_unet_{name}.lora_down.weight"], kohya[f"lora_unet_{name}.lora_up.weight"]
        alpha = float(kohya[f"lora_unet_{name}.alpha"])
        sai[weight] = sai[weight] + strength * (alpha / RANK) * (up @ down)
    return sai


def from_sai(config, sai: dict[str, torch.Tensor]) -> SD3Transformer2DModel:
    conv = single_file_utils.convert_sd3_transformer_checkpoint_to_diffusers({k: v.clone() for k, v in sai.items()})
    t = SD3Transformer2DModel.from_config(config).eval()
    t.load_state_dict(conv, strict=True)
    return t


def main() -> None:
    LORA_DIR.mkdir(parents=True, exist_ok=True)
    inputs = load_tensors(OUT / "transformer.safetensors")
    kw = {k: inputs[k] for k in ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections")}
    base_out = inputs["out_medium"]

    pipe = StableDiffusion3Pipeline.from_pretrained(MEDIUM_DIR)
    base = pipe.transformer
    assert (base(**kw, return_dict=False)[0] - base_out).abs().max() < 1e-5, "the medium fixture changed"

    peft_sd, peft_meta = peft_lora(base)
    peft_path, kohya_path = LORA_DIR / "sd3_peft.safetensors", LORA_DIR / "sd3_kohya.safetensors"
    StableDiffusion3Pipeline.save_lora_weights(
        str(LORA_DIR), transformer_lora_layers=peft_sd, transformer_lora_adapter_metadata=peft_meta,
        weight_name=peft_path.name, safe_serialization=True)
    kohya = kohya_lora()
    save_tensors(kohya_path, kohya, {"ss_network_dim": str(RANK), "ss_base_model_version": "sd3",
                                     "ss_network_module": "networks.lora_sd3"})
    canonical_header(peft_path)
    canonical_header(kohya_path)

    outs = {}
    # (a) PEFT, through diffusers' loader, at 1.0 and 0.5.
    for scale in (1.0, 0.5):
        p = StableDiffusion3Pipeline.from_pretrained(MEDIUM_DIR)
        p.load_lora_weights(str(peft_path), adapter_name="peft")
        p.fuse_lora(lora_scale=scale)
        if scale == 1.0:
            # diffusers applied lora_alpha / r from the header: check one weight by hand.
            w = p.transformer.transformer_blocks[0].attn.to_q.base_layer.weight
            a = peft_sd["transformer_blocks.0.attn.to_q.lora_A.weight"]
            b = peft_sd["transformer_blocks.0.attn.to_q.lora_B.weight"]
            want = base.transformer_blocks[0].attn.to_q.weight + (PEFT_ALPHA / RANK) * (b @ a)
            assert (w - want).abs().max() < 1e-6, "diffusers did not fuse lora_alpha / r"
        p.unload_lora_weights()
        outs[f"out_peft_{scale}"] = p.transformer(**kw, return_dict=False)[0]

    # (b) kohya with Stability names: diffusers cannot load it; merge into the Stability weights and convert.
    p = StableDiffusion3Pipeline.from_pretrained(MEDIUM_DIR)
    try:
        p.load_lora_weights(str(kohya_path))
        ignored = (p.transformer(**kw, return_dict=False)[0] - base_out).abs().max() < 1e-5
        print(f"  diffusers loads the kohya/Stability LoRA without error; transformer unchanged: {bool(ignored)}")
        assert ignored, "diffusers applied a Stability-named LoRA: use its loader for the golden instead"
    except (ValueError, KeyError, RuntimeError) as e:
        print(f"  diffusers refuses the kohya/Stability LoRA ({type(e).__name__}: {str(e)[:80]})")
    merged = merge_kohya_sai(base, kohya, 1.0)
    outs["out_kohya_1.0"] = from_sai(base.config, merged)(**kw, return_dict=False)[0]

    # Both at once: kohya 1.0 merged as above, then PEFT at 0.5 through diffusers' loader.
    p = StableDiffusion3Pipeline.from_pretrained(MEDIUM_DIR)
    p.transformer = from_sai(base.config, merged)
    p.load_lora_weights(str(peft_path), adapter_name="peft")
    p.fuse_lora(lora_scale=0.5)
    p.unload_lora_weights()
    outs["out_kohya_1.0_peft_0.5"] = p.transformer(**kw, return_dict=False)[0]

    for k, v in outs.items():
        d = float((v - base_out).abs().max())
        print(f"  {k}: max |out - base| = {d:.4f}")
        assert d > 1e-2, f"{k}: the LoRA changed nothing"
    check_goldens("lora.safetensors", outs)
    save_tensors(OUT / "lora.safetensors", outs, {
        "inputs": "goldens/sd3/transformer.safetensors (hidden_states, timestep, encoder_hidden_states, pooled_projections)",
        "model": "fixtures/sd3/medium/transformer",
        "peft": "fixtures/sd3/lora/sd3_peft.safetensors: load_lora_weights + fuse_lora(lora_scale)",
        "kohya": "fixtures/sd3/lora/sd3_kohya.safetensors: W_sai += alpha/rank * up @ down, then "
                 "convert_sd3_transformer_checkpoint_to_diffusers",
        "diffusers": diffusers.__version__, "torch": torch.__version__,
    })
    canonical_header(OUT / "lora.safetensors")
    size = sum(f.stat().st_size for f in (peft_path, kohya_path, OUT / "lora.safetensors"))
    print(f"sd3 LoRA fixtures + goldens: {size / 1e3:.1f} kB")


if __name__ == "__main__":
    main()
