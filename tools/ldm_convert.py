"""diffusers/transformers state dicts -> original LDM / SGM single-file checkpoint keys.

The inverse of diffusers' `loaders/single_file_utils.py` (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
convert_ldm_clip_checkpoint, convert_open_clip_checkpoint), written out so the fixtures have the key layout of
real A1111/civitai files. Every function returns a new dict and fails loudly on a key it does not know.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SD2_OPENCLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."

_UNET_RESNET_RENAMES = [
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("time_emb_proj.", "emb_layers.1."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("conv_shortcut.", "skip_connection."),
]

_UNET_TOP_LEVEL = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
    "class_embedding.linear_1.": "label_emb.0.0.",
    "class_embedding.linear_2.": "label_emb.0.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}


def _resnet_rest(rest: str) -> str:
    for old, new in _UNET_RESNET_RENAMES:
        if rest.startswith(old):
            return new + rest[len(old) :]
    raise KeyError(f"unknown UNet resnet parameter {rest!r}")


def unet_to_ldm(sd: Mapping[str, torch.Tensor], layers_per_block: int, prefix: str = UNET_PREFIX) -> dict:
    """Diffusers UNet2DConditionModel keys -> `model.diffusion_model.{input_blocks,middle_block,output_blocks,...}`."""
    lpb = layers_per_block
    up_has_attn = {int(m.group(1)) for k in sd for m in [re.match(r"up_blocks\.(\d+)\.attentions\.", k)] if m}
    out = {}
    for key, t in sd.items():
        new = None
        for old, repl in _UNET_TOP_LEVEL.items():
            if key.startswith(old):
                new = repl + key[len(old) :]
                break
        if new is None:
            if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
                i, j, rest = int(m[1]), int(m[2]), m[3]
                new = f"input_blocks.{1 + i * (lpb + 1) + j}.0.{_resnet_rest(rest)}"
            elif m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
                i, j, rest = int(m[1]), int(m[2]), m[3]
                new = f"input_blocks.{1 + i * (lpb + 1) + j}.1.{rest}"
            elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
                i, rest = int(m[1]), m[2]
                new = f"input_blocks.{(i + 1) * (lpb + 1)}.0.op.{rest}"
            elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
                j, rest = int(m[1]), m[2]
                new = f"middle_block.{2 * j}.{_resnet_rest(rest)}"
            elif m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
                new = f"middle_block.1.{m[1]}"
            elif m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
                i, j, rest = int(m[1]), int(m[2]), m[3]
                new = f"output_blocks.{i * (lpb + 1) + j}.0.{_resnet_rest(rest)}"
            elif m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
                i, j, rest = int(m[1]), int(m[2]), m[3]
                new = f"output_blocks.{i * (lpb + 1) + j}.1.{rest}"
            elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
                i, rest = int(m[1]), m[2]
                slot = 2 if i in up_has_attn else 1
                new = f"output_blocks.{i * (lpb + 1) + lpb}.{slot}.conv.{rest}"
            else:
                raise KeyError(f"unknown UNet key {key!r}")
        out[prefix + new] = t
    return out


_VAE_RESNET_RENAMES = [("conv_shortcut.", "nin_shortcut.")]
_VAE_ATTN_RENAMES = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
}


def _vae_resnet_rest(rest: str) -> str:
    for old, new in _VAE_RESNET_RENAMES:
        if rest.startswith(old):
            return new + rest[len(old) :]
    if rest.split(".")[0] in ("norm1", "conv1", "norm2", "conv2"):
        return rest
    raise KeyError(f"unknown VAE resnet parameter {rest!r}")


def vae_to_ldm(sd: Mapping[str, torch.Tensor], num_blocks: int, prefix: str = VAE_PREFIX) -> dict:
    """Diffusers AutoencoderKL keys -> `first_stage_model.{encoder,decoder}.{down,mid,up}...` (attention as 1x1 convs)."""
    out = {}
    for key, t in sd.items():
        if m := re.match(r"(encoder|decoder)\.(conv_in|conv_out)\.(.*)", key):
            new = key
        elif m := re.match(r"(encoder|decoder)\.conv_norm_out\.(.*)", key):
            new = f"{m[1]}.norm_out.{m[2]}"
        elif key.startswith(("quant_conv.", "post_quant_conv.")):
            new = key
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{_vae_resnet_rest(m[3])}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"decoder.up.{num_blocks - 1 - int(m[1])}.block.{m[2]}.{_vae_resnet_rest(m[3])}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            new = f"decoder.up.{num_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{_vae_resnet_rest(m[3])}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
            rest = m[2]
            for old, repl in _VAE_ATTN_RENAMES.items():
                if rest.startswith(old):
                    rest = repl + rest[len(old) :]
                    break
            else:
                raise KeyError(f"unknown VAE attention key {key!r}")
            new = f"{m[1]}.mid.attn_1.{rest}"
            # Original LDM AttnBlock uses 1x1 Conv2d for q/k/v/proj_out; files store [c, c, 1, 1].
            if t.ndim == 2:
                t = t[:, :, None, None]
        else:
            raise KeyError(f"unknown VAE key {key!r}")
        out[prefix + new] = t
    return out


def clip_to_ldm(sd: Mapping[str, torch.Tensor], prefix: str) -> dict:
    """transformers CLIPTextModel keys (with `text_model.`) -> `<prefix>text_model.*` (OpenAI CLIP, SD1 / SDXL te1)."""
    out = {}
    for key, t in sd.items():
        if not key.startswith("text_model."):
            raise KeyError(f"CLIP key without text_model. prefix: {key!r}")
        out[prefix + key] = t
    return out


_OPENCLIP_LAYER_RENAMES = [
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
    ("self_attn.out_proj.", "attn.out_proj."),
]


def openclip_to_ldm(
    sd: Mapping[str, torch.Tensor],
    prefix: str,
    extra_resblock: Mapping[str, torch.Tensor] | None = None,
) -> dict:
    """transformers CLIP text keys -> OpenCLIP `<prefix>{token_embedding,positional_embedding,transformer.resblocks,ln_final,text_projection}`.

    q/k/v are fused into attn.in_proj_{weight,bias} = cat(q, k, v); text_projection is stored as
    [hidden, proj] (OpenCLIP applies x @ P), i.e. the transpose of transformers' Linear weight.
    `extra_resblock` (OpenCLIP names, no prefix) is appended as resblock N (N = number of layers), like SD2 files.
    """
    out = {}
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        if key == "text_model.embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = t
        elif key == "text_model.embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = t
        elif key.startswith("text_model.final_layer_norm."):
            out[prefix + "ln_final." + key.rsplit(".", 1)[1]] = t
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = t.T.contiguous()
        elif m := re.match(r"text_model\.encoder\.layers\.(\d+)\.(.*)", key):
            layers.setdefault(int(m[1]), {})[m[2]] = t
        else:
            raise KeyError(f"unknown CLIP key {key!r}")
    n = len(layers)
    if sorted(layers) != list(range(n)):
        raise KeyError(f"CLIP layers are not contiguous: {sorted(layers)}")
    for idx, p in layers.items():
        base = f"{prefix}transformer.resblocks.{idx}."
        for kind in ("weight", "bias"):
            out[base + f"attn.in_proj_{kind}"] = torch.cat(
                [p.pop(f"self_attn.{x}_proj.{kind}") for x in ("q", "k", "v")], dim=0
            )
        for rest, t in p.items():
            for old, new in _OPENCLIP_LAYER_RENAMES:
                if rest.startswith(old):
                    out[base + new + rest[len(old) :]] = t
                    break
            else:
                raise KeyError(f"unknown CLIP layer parameter {rest!r}")
    if extra_resblock is not None:
        for rest, t in extra_resblock.items():
            out[f"{prefix}transformer.resblocks.{n}.{rest}"] = t
    return out


def random_openclip_resblock(hidden: int, intermediate: int, seed: int) -> dict:
    """A random OpenCLIP residual block (names relative to the block) standing in for SD2's unused last layer."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) / (shape[-1] ** 0.5 if len(shape) > 1 else 5.0)

    return {
        "ln_1.weight": 1.0 + r(hidden),
        "ln_1.bias": r(hidden),
        "attn.in_proj_weight": r(3 * hidden, hidden),
        "attn.in_proj_bias": r(3 * hidden),
        "attn.out_proj.weight": r(hidden, hidden),
        "attn.out_proj.bias": r(hidden),
        "ln_2.weight": 1.0 + r(hidden),
        "ln_2.bias": r(hidden),
        "mlp.c_fc.weight": r(intermediate, hidden),
        "mlp.c_fc.bias": r(intermediate),
        "mlp.c_proj.weight": r(hidden, intermediate),
        "mlp.c_proj.bias": r(hidden),
    }
