#!/usr/bin/env python3
"""Tiny random-weight FLUX.2 [klein] fixtures (diffusers Flux2KleinPipeline layout) and diffusers goldens.

Writes:
  - fixtures/flux2/klein/ : a diffusers Flux2KleinPipeline folder (is_distilled false, so classifier-free guidance
    is exercised): a tiny Flux2Transformer2DModel (2 double + 2 single blocks, width 32, 4 rotary axes), a tiny
    Qwen3ForCausalLM text encoder with 28 layers (width 16, tied embeddings) so the pipeline's default
    `text_encoder_out_layers` (9, 18, 27) are read as on the real model, the byte-level BPE tokenizer of
    tools/zimage_fixtures.py (Qwen's special tokens and chat template), a tiny AutoencoderKLFlux2 (8 latent channels,
    2x2 patchified to 32, batch-norm statistics randomised) and klein's scheduler config (dynamic shifting; the
    pipeline passes its own empirical mu).
  - fixtures/goldens/flux2/ : prompt embeddings, transformer forwards (plain and with reference tokens of two
    images), VAE encode/decode with the latent normalisation, and end-to-end runs with every random draw recorded:
    txt2img (guidance 1 = no CFG, and guidance 4 with CFG), editing with one reference image and with two
    references of different sizes (one needing the center crop), and inpainting (strength 0.6), each with
    per-step packed latents, final latents (VAE space) and the decoded image.
  - the files people download, from the same models: fixtures/flux2/flux-2-klein-base-tiny.safetensors (BFL's
    single-file names, the exact inverse of diffusers' convert_flux2_transformer_checkpoint_to_diffusers, F32; checked
    with Flux2Transformer2DModel.from_single_file), ComfyUI's split files in fixtures/flux2/comfy/ (diffusion_models/:
    the same under `model.diffusion_model.` in bf16 and fp8-scaled; text_encoders/qwen_3_tiny.safetensors:
    Qwen3ForCausalLM names with lm_head, bf16; vae/flux2-vae.safetensors: BFL's original (LDM) names plus the
    batch-norm statistics), and LoRAs in fixtures/flux2/lora/ (PEFT with lora_alpha metadata, kohya with per-module
    alphas, ai-toolkit BFL names), with goldens: transformer_comfy (the comfy files through diffusers' converter),
    split_txt2img (prompt features and a CFG txt2img run from the split files), lora (transformer outputs with the
    LoRAs fused by Flux2KleinPipeline.load_lora_weights + fuse_lora).

Run: /root/venv-sd/bin/python tools/flux2_fixtures.py   (CPU, float32, deterministic)
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import safetensors.torch
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fixture_common import (  # noqa: E402
    DRAWS,
    FIXTURES_DIR,
    GOLDENS_DIR,
    assert_state_dicts_equal,
    canonical_header,
    check_goldens,
    dir_size,
    load_tensors,
    randn,
    randomize_weights_,
    record_randn,
    save_json,
    save_tensors,
    seed_everything,
)
from zimage_fixtures import build_tokenizer  # noqa: E402  (the shared offline Qwen tokenizer)
import ldm_convert as ldm  # noqa: E402

import diffusers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinInpaintPipeline,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
)
from diffusers.loaders import single_file_utils  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from transformers import Qwen3Config, Qwen3ForCausalLM  # noqa: E402

warnings.filterwarnings("ignore")
diffusers.utils.logging.set_verbosity_error()
torch.set_grad_enabled(False)
torch.use_deterministic_algorithms(True)

FOLDER = FIXTURES_DIR / "flux2" / "klein"
OUT = GOLDENS_DIR / "flux2"

SEEDS = dict(transformer=9500, text=9600, vae=9700)
PROMPTS = ["a photo of a cat", "a red cube on a table, studio lighting, 35mm"]
PROMPT = PROMPTS[0]
MAX_LEN = 64  # max_sequence_length of every tiny golden (the pipeline's default is 512)
H, W = 24, 16  # pixels; VAE factor 2 -> 12x8 latents -> 6x4 patchified = 24 tokens
STEPS = 3
LAYERS = (9, 18, 27)

TRANSFORMER_KW = dict(
    patch_size=1,
    in_channels=32,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=48,
    timestep_guidance_channels=32,
    mlp_ratio=3.0,
    axes_dims_rope=(4, 4, 4, 4),
    rope_theta=2000,
    eps=1e-6,
    guidance_embeds=False,
)

QWEN_KW = dict(
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=28,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    max_position_embeddings=512,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    attention_bias=False,
    hidden_act="silu",
    use_cache=False,
)

VAE_KW = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(8, 16),
    layers_per_block=1,
    latent_channels=8,
    norm_num_groups=4,
    sample_size=32,
    use_quant_conv=True,
    use_post_quant_conv=True,
    mid_block_add_attention=True,
    batch_norm_eps=1e-4,
)

# FLUX.2 [klein]'s scheduler_config.json.
SCHEDULER_KW = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                    base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential")


def build_transformer() -> Flux2Transformer2DModel:
    seed_everything(SEEDS["transformer"])
    m = Flux2Transformer2DModel(**TRANSFORMER_KW)
    randomize_weights_(m, SEEDS["transformer"])
    return m.eval()


def build_text_encoder(vocab_size: int) -> Qwen3ForCausalLM:
    seed_everything(SEEDS["text"])
    m = Qwen3ForCausalLM(Qwen3Config(vocab_size=vocab_size, **QWEN_KW))
    randomize_weights_(m, SEEDS["text"])
    return m.eval()


def build_vae() -> AutoencoderKLFlux2:
    seed_everything(SEEDS["vae"])
    m = AutoencoderKLFlux2(**VAE_KW)
    randomize_weights_(m, SEEDS["vae"])
    g = torch.Generator().manual_seed(SEEDS["vae"] + 1)
    with torch.no_grad():
        m.decoder.conv_out.weight.mul_(0.4)
        m.decoder.conv_out.bias.mul_(0.4)
        n = m.bn.running_mean.numel()
        m.bn.running_mean.copy_(0.3 * torch.randn(n, generator=g))
        m.bn.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return m.eval()


def golden(name: str, tensors: dict, meta: dict | None = None, skip: tuple[str, ...] = ()) -> None:
    check_goldens(name, tensors, skip=skip)
    save_tensors(OUT / name, tensors)
    if meta is not None:
        save_json(OUT / (Path(name).stem + ".json"), meta)


def pattern(h: int, w: int, phase: float) -> np.ndarray:
    """A smooth uint8 RGB test pattern [h, w, 3]."""
    y, x = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    rgb = np.stack([0.5 + 0.5 * np.sin(6.0 * x + phase), y, 0.5 + 0.4 * np.cos(5.0 * (x + y) + phase)], -1)
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


def to_tensor(a: np.ndarray) -> torch.Tensor:
    """uint8 [h, w, 3] -> [1, 3, h, w] in [-1, 1] (what the Rust side receives)."""
    return torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255.0 * 2 - 1


def prompt_goldens(pipe: Flux2KleinPipeline) -> None:
    tok = pipe.tokenizer
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True,
                                     enable_thinking=False) for p in PROMPTS]
    for p, t in zip(PROMPTS, texts):
        expect = f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        if t != expect:
            raise AssertionError(f"chat template renders {t!r}, expected {expect!r}")
    enc = tok(texts, padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="pt")
    embeds = pipe._get_qwen3_prompt_embeds(pipe.text_encoder, tok, list(PROMPTS), max_sequence_length=MAX_LEN,
                                           hidden_states_layers=LAYERS)
    out = pipe.text_encoder(input_ids=enc.input_ids[:1], attention_mask=enc.attention_mask[:1],
                            output_hidden_states=True, use_cache=False)
    if len(out.hidden_states) != QWEN_KW["num_hidden_layers"] + 1:
        raise AssertionError("unexpected hidden_states layout")
    tensors = dict(input_ids=enc.input_ids.to(torch.int64), attention_mask=enc.attention_mask.to(torch.int64))
    for i, e in enumerate(embeds):
        tensors[f"prompt_embeds_{i}"] = e
    tensors["hidden_state_1_of_0"] = out.hidden_states[1][0]
    golden("prompt_embeds.safetensors", tensors,
           dict(prompts=PROMPTS, templated=texts, max_sequence_length=MAX_LEN, layers=list(LAYERS),
                note="prompt_embeds_i = cat(hidden_states[9], [18], [27]) per token, padded to max_length, masked"))


def transformer_goldens(m: Flux2Transformer2DModel) -> None:
    p = Flux2KleinPipeline
    lat = randn((1, 32, 6, 4), 600)
    ids = p._prepare_latent_ids(lat)
    x = p._pack_latents(lat)
    txt = randn((1, 10, 48), 601)
    txt_ids = p._prepare_text_ids(txt)
    t = torch.tensor([0.7])
    out = m(hidden_states=x, encoder_hidden_states=txt, timestep=t, img_ids=ids, txt_ids=txt_ids, guidance=None,
            return_dict=False)[0]
    golden("transformer.safetensors", dict(x=x, img_ids=ids.float(), txt=txt, txt_ids=txt_ids.float(), t=t, out=out),
           dict(note="out = transformer(x, txt, t, img_ids, txt_ids); x packed [1, 24, 32]"), skip=("t", "txt_ids"))
    refs = [randn((1, 32, 4, 4), 602), randn((1, 32, 3, 5), 603)]
    ref_ids = p._prepare_image_ids(refs)
    ref_tokens = torch.cat([p._pack_latents(r) for r in refs], dim=1)
    xr = torch.cat([x, ref_tokens], 1)
    idr = torch.cat([ids, ref_ids], 1)
    out_r = m(hidden_states=xr, encoder_hidden_states=txt, timestep=t, img_ids=idr, txt_ids=txt_ids, guidance=None,
              return_dict=False)[0]
    golden("transformer_refs.safetensors",
           dict(x=x, ref0=refs[0], ref1=refs[1], ref_ids=ref_ids.float(), txt=txt, t=t, out=out_r),
           dict(note="out = transformer(cat(x, refs), ...) over all tokens; ref ids T = 10, 20"),
           skip=("t",))


def vae_goldens(vae: AutoencoderKLFlux2) -> None:
    p = Flux2KleinPipeline
    image = to_tensor(pattern(H, W, 1.0))
    mean = vae.encode(image).latent_dist.mode()
    mu = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    normalized = (p._patchify_latents(mean) - mu) / std
    lat_in = randn((1, 32, 6, 4), 610)
    z = p._unpatchify_latents(lat_in * std + mu)
    decoded = vae.decode(z).sample
    golden("vae.safetensors", dict(image=image, posterior_mean=mean, normalized=normalized, latent_in=lat_in, z=z,
                                   decoded=decoded),
           dict(note="normalized = (patchify(mode) - bn_mean) / sqrt(bn_var + eps); decoded = decode(unpatchify(latent_in * std + mean))"))


def run(pipe, kind: str, seed: int, **kw):
    steps_seen: list[torch.Tensor] = []

    def cb(p, i, t, k):
        steps_seen.append(k["latents"].detach().clone())
        return {}

    record_randn()
    DRAWS.clear()
    lat = pipe(prompt=PROMPT, num_inference_steps=STEPS, max_sequence_length=MAX_LEN,
               generator=torch.Generator().manual_seed(seed), output_type="latent", callback_on_step_end=cb,
               callback_on_step_end_tensor_inputs=["latents"], **kw).images
    draws = list(DRAWS)
    dec = pipe.vae.decode(lat).sample
    image = (dec / 2 + 0.5).clamp(0, 1)
    full = pipe(prompt=PROMPT, num_inference_steps=STEPS, max_sequence_length=MAX_LEN,
                generator=torch.Generator().manual_seed(seed), output_type="pt", **kw).images
    if (full - image).abs().max() > 1e-5:
        raise AssertionError(f"{kind}: manual decode disagrees with the pipeline image")
    sigmas = [float(s) for s in pipe.scheduler.sigmas]
    timesteps = [float(s) for s in pipe.scheduler.timesteps]
    return dict(latents_final=lat, image=image, step_latents=torch.stack(steps_seen)), draws, sigmas, timesteps


def e2e_goldens(components: dict) -> None:
    t2i = Flux2KleinPipeline(**components)
    for name, guidance, seed in [("txt2img", 1.0, 42), ("txt2img_cfg", 4.0, 43)]:
        tensors, draws, sigmas, ts = run(t2i, name, seed, height=H, width=W, guidance_scale=guidance)
        if len(draws) != 1:
            raise AssertionError(f"{name}: {len(draws)} draws")
        tensors["noise"] = draws[0]
        golden(f"{name}.safetensors", tensors,
               dict(prompt=PROMPT, height=H, width=W, steps=STEPS, guidance_scale=guidance, max_sequence_length=MAX_LEN,
                    generator_seed=seed, sigmas=sigmas, timesteps=ts, draws="noise"))

    # Editing: one reference at the output size, then two references of other sizes (the second is cropped to 64x80).
    r0 = pattern(64, 68, 0.3)
    r1 = pattern(83, 66, 2.0)  # center-cropped by diffusers to 80x64 (multiples of 4)
    crop1 = r1[1:81, 1:65]
    for name, refs, seed in [("edit_1ref", [r0], 44), ("edit_2ref", [r0, r1], 45)]:
        pil = [PIL.Image.fromarray(r) for r in refs]
        tensors, draws, sigmas, ts = run(t2i, name, seed, image=pil if len(pil) > 1 else pil[0], height=H, width=W,
                                         guidance_scale=4.0)
        if len(draws) != 1:
            raise AssertionError(f"{name}: {len(draws)} draws")
        tensors["noise"] = draws[0]
        for i, r in enumerate(refs):
            tensors[f"ref{i}"] = to_tensor(r)
        if len(refs) > 1:
            tensors["ref1_cropped"] = to_tensor(crop1)
        golden(f"{name}.safetensors", tensors,
               dict(prompt=PROMPT, height=H, width=W, steps=STEPS, guidance_scale=4.0, max_sequence_length=MAX_LEN,
                    generator_seed=seed, sigmas=sigmas, timesteps=ts, draws="noise",
                    refs=[list(r.shape) for r in refs]))

    inp = Flux2KleinInpaintPipeline(**components)
    img = pattern(H, W, 1.0)
    mask = np.zeros((H, W), np.uint8)
    mask[6:18, 4:12] = 255
    tensors, draws, sigmas, ts = run(inp, "inpaint", 11, image=PIL.Image.fromarray(img),
                                     mask_image=PIL.Image.fromarray(mask), strength=0.6, guidance_scale=4.0)
    if len(draws) != 1:
        raise AssertionError(f"inpaint: {len(draws)} draws")
    tensors.update(init_image=to_tensor(img), mask=torch.from_numpy(mask)[None, None].float() / 255.0, noise=draws[0])
    golden("inpaint.safetensors", tensors,
           dict(prompt=PROMPT, height=H, width=W, steps=STEPS, strength=0.6, guidance_scale=4.0,
                max_sequence_length=MAX_LEN, generator_seed=11, sigmas=sigmas, timesteps=ts, draws="noise"))


# ----------------------------------------------------------------------------------------------------------------
# The files people download: BFL's single transformer file, ComfyUI's split files, LoRAs
# ----------------------------------------------------------------------------------------------------------------

BFL_FILE = FIXTURES_DIR / "flux2" / "flux-2-klein-base-tiny.safetensors"
COMFY = FIXTURES_DIR / "flux2" / "comfy"
COMFY_TRANSFORMER = COMFY / "diffusion_models" / "flux-2-klein-base-tiny.safetensors"
COMFY_FP8 = COMFY / "diffusion_models" / "flux-2-klein-base-tiny-fp8-scaled.safetensors"
COMFY_QWEN = COMFY / "text_encoders" / "qwen_3_tiny.safetensors"
COMFY_VAE = COMFY / "vae" / "flux2-vae.safetensors"
LORA_DIR = FIXTURES_DIR / "flux2" / "lora"
COMFY_PREFIX = "model.diffusion_model."
LORA_RANK = 4
PEFT_ALPHA = 2.0


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def flux2_to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers Flux2Transformer2DModel keys -> Black Forest Labs' original names: the exact inverse of
    `convert_flux2_transformer_checkpoint_to_diffusers` (q/k/v fused back into `qkv`, RMSNorm weights named
    `.scale`, `norm_out.linear`'s (scale, shift) halves swapped back to BFL's (shift, scale))."""
    sd = dict(sd)
    out: dict[str, torch.Tensor] = {}

    def mv(src: str, dst: str) -> None:
        out[dst] = sd.pop(src)

    mv("x_embedder.weight", "img_in.weight")
    mv("context_embedder.weight", "txt_in.weight")
    mv("time_guidance_embed.timestep_embedder.linear_1.weight", "time_in.in_layer.weight")
    mv("time_guidance_embed.timestep_embedder.linear_2.weight", "time_in.out_layer.weight")
    for m in ("double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation"):
        mv(f"{m}.linear.weight", f"{m}.lin.weight")
    mv("proj_out.weight", "final_layer.linear.weight")
    out["final_layer.adaLN_modulation.1.weight"] = swap_halves(sd.pop("norm_out.linear.weight"))
    for i in range(TRANSFORMER_KW["num_layers"]):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        out[b + "img_attn.qkv.weight"] = torch.cat([sd.pop(d + f"attn.{p}.weight") for p in ("to_q", "to_k", "to_v")])
        out[b + "txt_attn.qkv.weight"] = torch.cat(
            [sd.pop(d + f"attn.{p}.weight") for p in ("add_q_proj", "add_k_proj", "add_v_proj")])
        for src, dst in [("attn.norm_q.weight", "img_attn.norm.query_norm.scale"),
                         ("attn.norm_k.weight", "img_attn.norm.key_norm.scale"),
                         ("attn.to_out.0.weight", "img_attn.proj.weight"), ("ff.linear_in.weight", "img_mlp.0.weight"),
                         ("ff.linear_out.weight", "img_mlp.2.weight"),
                         ("attn.norm_added_q.weight", "txt_attn.norm.query_norm.scale"),
                         ("attn.norm_added_k.weight", "txt_attn.norm.key_norm.scale"),
                         ("attn.to_add_out.weight", "txt_attn.proj.weight"),
                         ("ff_context.linear_in.weight", "txt_mlp.0.weight"),
                         ("ff_context.linear_out.weight", "txt_mlp.2.weight")]:
            mv(d + src, b + dst)
    for i in range(TRANSFORMER_KW["num_single_layers"]):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for src, dst in [("attn.to_qkv_mlp_proj.weight", "linear1.weight"), ("attn.to_out.weight", "linear2.weight"),
                         ("attn.norm_q.weight", "norm.query_norm.scale"), ("attn.norm_k.weight", "norm.key_norm.scale")]:
            mv(d + src, b + dst)
    if sd:
        raise KeyError(f"unmapped FLUX.2 keys: {sorted(sd)}")
    return out


def from_bfl(config, bfl: dict[str, torch.Tensor]) -> Flux2Transformer2DModel:
    """A float32 diffusers transformer from BFL-named weights, through diffusers' own converter."""
    conv = single_file_utils.convert_flux2_transformer_checkpoint_to_diffusers({k: v.float().clone() for k, v in bfl.items()})
    t = Flux2Transformer2DModel.from_config(config).eval()
    t.load_state_dict(conv, strict=True)
    return t


def fp8_scaled(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's "fp8 scaled" form: each 2-D weight as float8_e4m3fn `weight / scale` beside a scalar
    `scale_weight`; norms stay bf16."""
    out = {}
    for k, v in sd.items():
        if v.ndim == 2 and k.endswith(".weight"):
            scale = v.abs().max().float() / 448.0
            out[k] = (v.float() / scale).to(torch.float8_e4m3fn)
            out[k[: -len(".weight")] + ".scale_weight"] = scale.reshape(())
        else:
            out[k] = v.to(torch.bfloat16)
    return out


def dequant(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if k.endswith(".scale_weight"):
            continue
        s = sd.get(k[: -len(".weight")] + ".scale_weight") if k.endswith(".weight") else None
        out[k] = v.float() * s.float() if s is not None else v.float()
    return out


def vae_file(vae: AutoencoderKLFlux2) -> dict[str, torch.Tensor]:
    """The VAE as FLUX.2's `flux2-vae.safetensors` stores it: BFL's original (LDM) names, the latent batch-norm
    statistics under `bn.`."""
    sd = vae.state_dict()
    bn = {k: v for k, v in sd.items() if k.startswith("bn.")}
    rest = {k: v for k, v in sd.items() if not k.startswith("bn.")}
    return {**ldm.vae_to_ldm(rest, len(VAE_KW["block_out_channels"]), prefix=""), **bn}


def vae_from_file(config, path: Path) -> AutoencoderKLFlux2:
    f = load_tensors(path)
    bn = {k: v for k, v in f.items() if k.startswith("bn.")}
    conv = single_file_utils.convert_ldm_vae_checkpoint({k: v for k, v in f.items() if not k.startswith("bn.")}, config)
    m = AutoencoderKLFlux2.from_config(config).eval()
    m.load_state_dict({**conv, **bn}, strict=True)
    return m


def transformer_inputs() -> dict:
    g = load_tensors(OUT / "transformer.safetensors")
    return dict(hidden_states=g["x"], encoder_hidden_states=g["txt"], timestep=g["t"], img_ids=g["img_ids"].long(),
                txt_ids=g["txt_ids"].long(), guidance=None, return_dict=False), g["out"]


def single_file_goldens(pipe: Flux2KleinPipeline) -> None:
    ref = pipe.transformer.state_dict()
    cfg = pipe.transformer.config
    kw, base_out = transformer_inputs()
    bfl = flux2_to_bfl(ref)
    save_tensors(BFL_FILE, bfl)
    m = Flux2Transformer2DModel.from_single_file(str(BFL_FILE), config=str(FOLDER), subfolder="transformer",
                                                 local_files_only=True, torch_dtype=torch.float32)
    assert_state_dicts_equal(f"{BFL_FILE.name} via from_single_file", m.state_dict(), ref)

    # ComfyUI: the diffusion model prefixed and in bf16, its fp8-scaled form, the Qwen3 file, the VAE file.
    for d in (COMFY_TRANSFORMER.parent, COMFY_QWEN.parent, COMFY_VAE.parent):
        d.mkdir(parents=True, exist_ok=True)
    bf16 = {k: v.to(torch.bfloat16) for k, v in bfl.items()}
    save_tensors(COMFY_TRANSFORMER, {COMFY_PREFIX + k: v for k, v in bf16.items()})
    # save_tensors would widen float8 to float32: write the file as ComfyUI does, with its `scaled_fp8` marker.
    fp8 = {COMFY_PREFIX + k: v.contiguous() for k, v in fp8_scaled(bfl).items()}
    fp8[COMFY_PREFIX + "scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    safetensors.torch.save_file(fp8, str(COMFY_FP8), metadata={"format": "pt"})
    if load_tensors(COMFY_FP8)[COMFY_PREFIX + "img_in.weight"].dtype != torch.float8_e4m3fn:
        raise AssertionError("the fp8-scaled file lost its float8 weights")
    m_bf16 = from_bfl(cfg, {k[len(COMFY_PREFIX):]: v for k, v in load_tensors(COMFY_TRANSFORMER).items()})
    m_fp8 = from_bfl(cfg, dequant({k[len(COMFY_PREFIX):]: v for k, v in load_tensors(COMFY_FP8).items() if not k.endswith("scaled_fp8")}))
    out_bf16 = m_bf16(**kw)[0]
    out_fp8 = m_fp8(**kw)[0]
    te = {f"model.{k}": v.to(torch.bfloat16) for k, v in pipe.text_encoder.model.state_dict().items()}
    te["lm_head.weight"] = pipe.text_encoder.lm_head.weight.to(torch.bfloat16)
    save_tensors(COMFY_QWEN, te)
    save_tensors(COMFY_VAE, vae_file(pipe.vae))
    vae_back = vae_from_file(pipe.vae.config, COMFY_VAE)
    assert_state_dicts_equal(f"{COMFY_VAE.name} via convert_ldm_vae_checkpoint", vae_back.state_dict(), pipe.vae.state_dict())
    text_encoder = Qwen3ForCausalLM(pipe.text_encoder.config).eval()
    text_encoder.load_state_dict({k: v.float() for k, v in load_tensors(COMFY_QWEN).items()}, strict=True)
    golden("transformer_comfy.safetensors", dict(out_bf16=out_bf16, out_fp8_scaled=out_fp8),
           dict(inputs="transformer.safetensors",
                note="outputs of the ComfyUI diffusion-model files (bf16, fp8-scaled) converted by diffusers' "
                     "convert_flux2_transformer_checkpoint_to_diffusers and run in float32"))

    # End to end from the split files (bf16 transformer and Qwen3, the VAE file): text embeddings and txt2img.
    comp = dict(transformer=m_bf16, text_encoder=text_encoder, tokenizer=pipe.tokenizer, vae=vae_back,
                scheduler=pipe.scheduler, is_distilled=False)
    split = Flux2KleinPipeline(**comp)
    emb = split._get_qwen3_prompt_embeds(text_encoder, pipe.tokenizer, [PROMPT], max_sequence_length=MAX_LEN,
                                         hidden_states_layers=LAYERS)
    tensors, draws, sigmas, ts = run(split, "split_txt2img", 46, height=H, width=W, guidance_scale=4.0)
    if len(draws) != 1:
        raise AssertionError(f"split_txt2img: {len(draws)} draws")
    tensors.update(noise=draws[0], prompt_embeds=emb[0])
    golden("split_txt2img.safetensors", tensors,
           dict(prompt=PROMPT, height=H, width=W, steps=STEPS, guidance_scale=4.0, max_sequence_length=MAX_LEN,
                generator_seed=46, sigmas=sigmas, timesteps=ts, draws="noise",
                files=[str(p.relative_to(FIXTURES_DIR)) for p in (COMFY_TRANSFORMER, COMFY_QWEN, COMFY_VAE)]))
    if (out_bf16 - base_out).abs().max() > 0.1:
        raise AssertionError("the bf16 file strays too far from the folder's transformer")


PEFT_TARGETS = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v", "transformer_blocks.1.attn.add_k_proj",
                "transformer_blocks.0.attn.to_out.0", "transformer_blocks.1.ff.linear_in",
                "single_transformer_blocks.1.attn.to_qkv_mlp_proj", "single_transformer_blocks.0.attn.to_out",
                "x_embedder", "norm_out.linear", "double_stream_modulation_img.linear"]
# BFL module -> (out, in), for kohya's and ai-toolkit's files (width 32, MLP 96).
BFL_TARGETS = {
    "double_blocks.0.img_attn.qkv": (96, 32),
    "double_blocks.1.txt_attn.qkv": (96, 32),
    "double_blocks.0.txt_attn.proj": (32, 32),
    "double_blocks.1.img_mlp.0": (192, 32),
    "double_blocks.0.txt_mlp.2": (32, 96),
    "single_blocks.0.linear1": (288, 32),
    "single_blocks.1.linear2": (32, 128),
    "img_in": (32, 32),
    "final_layer.linear": (32, 32),
}


def peft_lora(base: Flux2Transformer2DModel) -> tuple[dict[str, torch.Tensor], dict]:
    t = Flux2Transformer2DModel.from_config(base.config)
    t.load_state_dict(base.state_dict())
    t.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=PEFT_ALPHA, target_modules=PEFT_TARGETS, init_lora_weights=False))
    g = torch.Generator().manual_seed(9800)
    for name, p in sorted(t.named_parameters()):
        if "lora_A" in name or "lora_B" in name:
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "lora_A" in name else 0.5) / p[0].numel() ** 0.5)
    sd = get_peft_model_state_dict(t)
    covered = {k.rsplit(".lora_", 1)[0] for k in sd}
    assert covered == set(PEFT_TARGETS), sorted(set(PEFT_TARGETS) ^ covered)
    meta = t.peft_config["default"].to_dict()
    meta["target_modules"] = sorted(meta["target_modules"])
    return sd, meta


def bfl_lora(seed: int, kohya: bool) -> dict[str, torch.Tensor]:
    """kohya (`lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`, `.alpha` per module) or ai-toolkit
    (`diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`) factors for the BFL modules."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, (name, (out_f, in_f)) in enumerate(BFL_TARGETS.items()):
        down = torch.randn(LORA_RANK, in_f, generator=g) / in_f ** 0.5
        up = torch.randn(out_f, LORA_RANK, generator=g) * 0.5
        if kohya:
            key = "lora_unet_" + name.replace(".", "_")
            sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
            # Alphas differ per module (one equals the rank) so per-module scaling is exercised.
            sd[f"{key}.alpha"] = torch.tensor(float(LORA_RANK if i % 3 == 0 else 1 + i % 3))
        else:
            sd[f"diffusion_model.{name}.lora_A.weight"], sd[f"diffusion_model.{name}.lora_B.weight"] = down, up
    return sd


def lora_goldens() -> None:
    LORA_DIR.mkdir(parents=True, exist_ok=True)
    kw, base_out = transformer_inputs()
    base = Flux2KleinPipeline.from_pretrained(FOLDER).transformer
    peft_sd, peft_meta = peft_lora(base)
    peft_path, kohya_path, aitk_path = (LORA_DIR / n for n in ("flux2_peft.safetensors", "flux2_kohya.safetensors",
                                                               "flux2_aitk.safetensors"))
    Flux2KleinPipeline.save_lora_weights(str(LORA_DIR), transformer_lora_layers=peft_sd,
                                         transformer_lora_adapter_metadata=peft_meta, weight_name=peft_path.name,
                                         safe_serialization=True)
    save_tensors(kohya_path, bfl_lora(9801, kohya=True), {"ss_network_dim": str(LORA_RANK), "ss_network_module": "networks.lora_flux"})
    save_tensors(aitk_path, bfl_lora(9802, kohya=False))
    for p in (peft_path, kohya_path, aitk_path):
        canonical_header(p)
    outs = {}
    for label, adapters in [("peft_1.0", [("peft", peft_path, 1.0)]), ("kohya_0.8", [("kohya", kohya_path, 0.8)]),
                            ("aitk_1.0", [("aitk", aitk_path, 1.0)]),
                            ("peft_0.6_kohya_-0.5", [("peft", peft_path, 0.6), ("kohya", kohya_path, -0.5)])]:
        pipe = Flux2KleinPipeline.from_pretrained(FOLDER)
        for name, path, _ in adapters:
            pipe.load_lora_weights(str(path), adapter_name=name)
        pipe.set_adapters([a[0] for a in adapters], adapter_weights=[a[2] for a in adapters])
        pipe.fuse_lora(adapter_names=[a[0] for a in adapters], lora_scale=1.0)
        pipe.unload_lora_weights()
        out = pipe.transformer(**kw)[0]
        if (out - base_out).abs().max() < 1e-2:
            raise AssertionError(f"LoRA {label} changed nothing")
        outs[f"out_{label}"] = out
    golden("lora.safetensors", outs,
           dict(inputs="transformer.safetensors", peft="fixtures/flux2/lora/flux2_peft.safetensors (lora_alpha 2, rank 4)",
                kohya="fixtures/flux2/lora/flux2_kohya.safetensors", aitk="fixtures/flux2/lora/flux2_aitk.safetensors",
                how="Flux2KleinPipeline.load_lora_weights + set_adapters(weights) + fuse_lora; out = transformer(inputs)"))


def main() -> None:
    tok = build_tokenizer()
    transformer = build_transformer()
    text_encoder = build_text_encoder(len(tok))
    vae = build_vae()
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_KW)
    pipe = Flux2KleinPipeline(transformer=transformer, text_encoder=text_encoder, tokenizer=tok, vae=vae,
                              scheduler=scheduler, is_distilled=False)
    pipe.save_pretrained(FOLDER, safe_serialization=True)
    pipe = Flux2KleinPipeline.from_pretrained(FOLDER)
    components = dict(transformer=pipe.transformer, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                      vae=pipe.vae, scheduler=pipe.scheduler, is_distilled=False)
    prompt_goldens(pipe)
    transformer_goldens(pipe.transformer)
    vae_goldens(pipe.vae)
    e2e_goldens(components)
    single_file_goldens(pipe)
    lora_goldens()
    print(f"fixtures/flux2: {dir_size(FOLDER) / 1e6:.2f} MB, goldens/flux2: {dir_size(OUT) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
