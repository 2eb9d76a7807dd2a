#!/usr/bin/env python3
"""Tiny random-weight Z-Image fixtures (diffusers ZImagePipeline layout) and diffusers goldens.

Writes:
  - fixtures/zimage/turbo/ : a diffusers ZImagePipeline folder: a tiny ZImageTransformer2DModel (every weight
    randomised with signal, the adaLN and pad tokens too), a tiny Qwen3Model text encoder, a byte-level BPE
    Qwen2Tokenizer carrying Qwen's special tokens and a chat template that renders a single user turn exactly as
    Qwen3's does (`<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n` with enable_thinking=True),
    a 16-channel AutoencoderKL with FLUX.1's scaling/shift factors and Z-Image-Turbo's scheduler config
    (FlowMatchEulerDiscreteScheduler, shift 3, no dynamic shifting).
  - fixtures/zimage/z_image_tiny_bf16.safetensors : the same transformer with the original (ComfyUI / Tongyi)
    tensor names (fused attention.qkv, attention.out, q_norm/k_norm, x_embedder, final_layer), stored in BF16;
    checked to convert back with diffusers' convert_z_image_transformer_checkpoint_to_diffusers.
  - fixtures/zimage/lora_{peft,kohya}.safetensors : two tiny LoRAs (diffusers/PEFT names; kohya names with alphas).
  - fixtures/goldens/zimage/ : prompt embeddings, transformer forwards (odd token counts and a batch whose
    captions pad to different lengths), VAE round trip, schedules, and end-to-end runs with every random draw
    recorded: txt2img (Turbo style, guidance 0; and with CFG and a negative prompt), img2img (strength 0.6) and
    inpaint (rectangular mask), each with per-step latents, final latents and the decoded image; and the
    transformer with both LoRAs applied by diffusers' ZImageLoraLoaderMixin (strengths 0.8 and 1.2).

Run: /root/venv-sd/bin/python tools/zimage_fixtures.py   (CPU, float32, deterministic)
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fixture_common import (  # noqa: E402
    DRAWS,
    FIXTURES_DIR,
    GOLDENS_DIR,
    assert_state_dicts_equal,
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

import diffusers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    ZImageImg2ImgPipeline,
    ZImageInpaintPipeline,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers  # noqa: E402
from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3Model  # noqa: E402
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402

warnings.filterwarnings("ignore")
diffusers.utils.logging.set_verbosity_error()
torch.set_grad_enabled(False)
torch.use_deterministic_algorithms(True)

ZDIR = FIXTURES_DIR / "zimage"
FOLDER = ZDIR / "turbo"
OUT = GOLDENS_DIR / "zimage"

SEEDS = dict(transformer=9100, text=9200, vae=9300)
PROMPTS = ["a photo of a cat", "a red cube on a table, studio lighting, 35mm"]
PROMPT = PROMPTS[0]
NEGATIVE = "blurry, low quality, watermark, text, extra fingers"
MAX_LEN = 64  # max_sequence_length of every tiny golden (the pipeline's default is 512)
H, W = 24, 16  # pixels; VAE factor 2 -> 12x8 latents -> 6x4 = 24 tokens (padded to 32)
STEPS = 4

TRANSFORMER_KW = dict(
    all_patch_size=(2,),
    all_f_patch_size=(1,),
    in_channels=16,
    dim=64,
    n_layers=2,
    n_refiner_layers=1,
    n_heads=2,
    n_kv_heads=2,
    norm_eps=1e-5,
    qk_norm=True,
    cap_feat_dim=32,
    rope_theta=256.0,
    t_scale=1000.0,
    axes_dims=[8, 12, 12],
    axes_lens=[512, 64, 64],
)

QWEN_KW = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    attention_bias=False,
    hidden_act="silu",
    use_cache=False,
)

VAE_KW = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(8, 16),
    layers_per_block=1,
    norm_num_groups=4,
    sample_size=32,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=True,
)

SCHEDULER_KW = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)

# Renders a conversation as Qwen3's template does (no default system prompt; `<think>` block only when
# enable_thinking is false), which is all ZImagePipeline asks of it.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def build_tokenizer() -> Qwen2Tokenizer:
    """Byte-level BPE over the 256 byte symbols plus a few merges, with Qwen's special tokens."""
    alphabet = list(bytes_to_unicode().values())
    vocab = {"<|endoftext|>": 0}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    merges = [("Ġ", "a"), ("a", "t"), ("Ġ", "c"), ("Ġc", "at"), ("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("o", "n")]
    for a, b in merges:
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=list(merges),
                         additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.add_tokens(["<think>", "</think>"], special_tokens=False)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_transformer() -> ZImageTransformer2DModel:
    seed_everything(SEEDS["transformer"])
    m = ZImageTransformer2DModel(**TRANSFORMER_KW)
    randomize_weights_(m, SEEDS["transformer"])
    with torch.no_grad():
        # Pad tokens are [1, dim] parameters (N(0, 1/dim) above): give them unit scale so padding matters.
        m.x_pad_token.mul_(8.0)
        m.cap_pad_token.mul_(8.0)
    return m.eval()


def build_text_encoder(vocab_size: int) -> Qwen3Model:
    seed_everything(SEEDS["text"])
    m = Qwen3Model(Qwen3Config(vocab_size=vocab_size, **QWEN_KW))
    randomize_weights_(m, SEEDS["text"])
    return m.eval()


def build_vae() -> AutoencoderKL:
    seed_everything(SEEDS["vae"])
    m = AutoencoderKL(**VAE_KW)
    randomize_weights_(m, SEEDS["vae"])
    with torch.no_grad():
        m.decoder.conv_out.weight.mul_(0.4)
        m.decoder.conv_out.bias.mul_(0.4)
    return m.eval()


def golden(name: str, tensors: dict, meta: dict | None = None, skip: tuple[str, ...] = ()) -> None:
    check_goldens(name, tensors, skip=skip)
    save_tensors(OUT / name, tensors)
    if meta is not None:
        save_json(OUT / (Path(name).stem + ".json"), meta)


# ---- The original (ComfyUI / Tongyi) layout, inverse of diffusers' single-file converter.

def to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if ".attention.to_k." in k or ".attention.to_v." in k:
            continue
        if ".attention.to_q.weight" in k:
            kk, vv = k.replace("to_q", "to_k"), k.replace("to_q", "to_v")
            out[k.replace(".attention.to_q.weight", ".attention.qkv.weight")] = torch.cat([v, sd[kk], sd[vv]], 0)
            continue
        n = k.replace("all_final_layer.2-1.", "final_layer.").replace("all_x_embedder.2-1.", "x_embedder.")
        n = n.replace(".attention.to_out.0.", ".attention.out.").replace(".attention.norm_k.", ".attention.k_norm.")
        n = n.replace(".attention.norm_q.", ".attention.q_norm.")
        out[n] = v
    return out


def write_original_file(transformer: ZImageTransformer2DModel) -> None:
    sd = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    orig = to_original(sd)
    back = convert_z_image_transformer_checkpoint_to_diffusers(dict(orig))
    assert_state_dicts_equal("original-layout round trip", back, sd)
    save_tensors(ZDIR / "z_image_tiny_bf16.safetensors", {k: v.to(torch.bfloat16) for k, v in orig.items()})


def write_qwen_file(text_encoder: Qwen3Model) -> None:
    """The text encoder as ComfyUI's stand-alone `text_encoders/qwen_3_4b.safetensors` holds it:
    `Qwen3ForCausalLM` names (under `model.`, with the tied `lm_head.weight`), beside the transformer file."""
    sd = {f"model.{k}": v.detach().clone() for k, v in text_encoder.state_dict().items()}
    sd["lm_head.weight"] = text_encoder.embed_tokens.weight.detach().clone()
    path = ZDIR / "qwen_3_tiny.safetensors"
    save_tensors(path, sd)
    back = Qwen3Model(text_encoder.config).eval()
    back.load_state_dict({k[len("model."):]: v for k, v in load_tensors(path).items() if k.startswith("model.")}, strict=True)
    assert_state_dicts_equal("qwen_3_tiny.safetensors", back.state_dict(), text_encoder.state_dict())


# ---- Goldens

def init_image() -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(0, 1, H), torch.linspace(0, 1, W), indexing="ij")
    return torch.stack([0.5 + 0.5 * torch.sin(6.0 * x + 1.0), y, 0.5 + 0.4 * torch.cos(5.0 * (x + y))])[None].float().clamp(0, 1)


def inpaint_mask() -> torch.Tensor:
    m = torch.zeros(1, 1, H, W)
    m[:, :, 6:18, 4:12] = 1.0
    return m


def prompt_goldens(pipe: ZImagePipeline) -> None:
    tok = pipe.tokenizer
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True,
                                     enable_thinking=True) for p in PROMPTS]
    for p, t in zip(PROMPTS, texts):
        expect = f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n"
        if t != expect:
            raise AssertionError(f"chat template renders {t!r}, expected {expect!r}")
    enc = tok(texts, padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="pt")
    embeds = pipe._encode_prompt(list(PROMPTS), device="cpu", max_sequence_length=MAX_LEN)
    # hidden_states[-2] is the output of the second-to-last decoder layer (before the final norm).
    te = pipe.text_encoder
    h = te.embed_tokens(enc.input_ids[:1])
    out = te(input_ids=enc.input_ids[:1], attention_mask=enc.attention_mask[:1].bool(), output_hidden_states=True)
    if len(out.hidden_states) != QWEN_KW["num_hidden_layers"] + 1 or not torch.allclose(out.hidden_states[0], h):
        raise AssertionError("unexpected hidden_states layout")
    n0 = int(enc.attention_mask[0].sum())
    # Right padding under a causal mask: the real tokens never see the pads, so encoding only them agrees.
    alone = te(input_ids=enc.input_ids[:1, :n0], output_hidden_states=True).hidden_states[-2][0]
    if (alone - embeds[0]).abs().max() > 1e-5:
        raise AssertionError("encoding only the real tokens disagrees with the padded, masked encoding")
    tensors = dict(input_ids=enc.input_ids.to(torch.int64), attention_mask=enc.attention_mask.to(torch.int64))
    for i, e in enumerate(embeds):
        tensors[f"prompt_embeds_{i}"] = e
    golden("prompt_embeds.safetensors", tensors,
           dict(prompts=PROMPTS, templated=texts, max_sequence_length=MAX_LEN,
                note="prompt_embeds_i = hidden_states[-2][i][attention_mask[i]] as ZImagePipeline._encode_prompt"))


def transformer_goldens(m: ZImageTransformer2DModel) -> None:
    # Batch of two: 6x10 latents (15 tokens -> padded to 32) with captions of 7 and 40 tokens (padded to 32 and 64),
    # so the batch is padded and masked at every stage.
    xs = [randn((16, 1, 6, 10), 500), randn((16, 1, 6, 10), 501)]
    caps = [randn((7, 32), 502), randn((40, 32), 503)]
    t = torch.tensor([0.3, 0.85])
    out = m(xs, t, caps, return_dict=False)[0]
    golden("transformer_batch.safetensors",
           dict(x0=xs[0], x1=xs[1], cap0=caps[0], cap1=caps[1], t=t, out0=out[0], out1=out[1]),
           dict(note="out = transformer([x0, x1], t, [cap0, cap1]); x: [16, 1, 6, 10]; caption lengths 7 and 40"),
           skip=("t",))
    # Each item alone gives the same prediction (up to float rounding).
    for i in range(2):
        alone = m([xs[i]], t[i:i + 1], [caps[i]], return_dict=False)[0][0]
        if (alone - out[i]).abs().max() > 1e-4:
            raise AssertionError("batched and single forwards disagree")
    # Batch of one, 8x8 latents (16 tokens), caption of 33 tokens (padded to 64).
    x = randn((16, 1, 8, 8), 504)
    cap = randn((33, 32), 505)
    t1 = torch.tensor([0.5])
    o = m([x], t1, [cap], return_dict=False)[0][0]
    golden("transformer_single.safetensors", dict(x=x, cap=cap, t=t1, out=o), dict(note="out = transformer([x], t, [cap])[0]"),
           skip=("t",))


def vae_golden(vae: AutoencoderKL) -> None:
    image = init_image() * 2 - 1
    post = vae.encode(image).latent_dist
    latent_in = randn((1, 16, 12, 8), 4200)
    decoded = vae.decode(latent_in).sample
    golden("vae.safetensors", dict(image=image, posterior_mean=post.mean, posterior_logvar=post.logvar,
                                   latent_in=latent_in, decoded=decoded),
           dict(scaling_factor=VAE_KW["scaling_factor"], shift_factor=VAE_KW["shift_factor"]))


def schedule_golden() -> None:
    cases = []
    for steps in (1, 4, 8, 9, 50):
        s = FlowMatchEulerDiscreteScheduler(**SCHEDULER_KW)
        sig = torch.linspace(1.0, 1 / steps, steps).tolist()
        s.set_timesteps(steps, sigmas=sig, mu=0.5)
        cases.append(dict(steps=steps, sigmas=[float(x) for x in s.sigmas], timesteps=[float(x) for x in s.timesteps]))
    save_json(OUT / "schedule.json", dict(config=SCHEDULER_KW, cases=cases))


def run(pipe, kind: str, seed: int, **kw):
    steps_seen: list[torch.Tensor] = []
    ts_seen: list[float] = []

    def cb(p, i, t, k):
        steps_seen.append(k["latents"].detach().clone())
        ts_seen.append(float(t))
        return {}

    record_randn()
    DRAWS.clear()
    lat = pipe(prompt=PROMPT, height=H, width=W, num_inference_steps=STEPS, max_sequence_length=MAX_LEN,
               generator=torch.Generator().manual_seed(seed), output_type="latent", callback_on_step_end=cb,
               callback_on_step_end_tensor_inputs=["latents"], **kw).images
    draws = list(DRAWS)
    sf, sh = pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor
    dec = pipe.vae.decode(lat / sf + sh).sample
    image = (dec / 2 + 0.5).clamp(0, 1)
    full = pipe(prompt=PROMPT, height=H, width=W, num_inference_steps=STEPS, max_sequence_length=MAX_LEN,
                generator=torch.Generator().manual_seed(seed), output_type="pt", **kw).images
    if (full - image).abs().max() > 1e-5:
        raise AssertionError(f"{kind}: manual decode disagrees with the pipeline image")
    sigmas = [float(s) for s in pipe.scheduler.sigmas]
    return dict(latents_final=lat, image=image, step_latents=torch.stack(steps_seen), timesteps=torch.tensor(ts_seen),
                sigmas=torch.tensor(sigmas)), draws, ts_seen, sigmas


def e2e_goldens(components: dict) -> None:
    t2i = ZImagePipeline(**components)
    for name, guidance, neg, seed in [("txt2img_turbo", 0.0, None, 42), ("txt2img_cfg", 4.0, NEGATIVE, 43)]:
        tensors, draws, ts, sigmas = run(t2i, name, seed, guidance_scale=guidance, negative_prompt=neg)
        if len(draws) != 1:
            raise AssertionError(f"{name}: {len(draws)} draws")
        tensors["noise"] = draws[0]
        golden(f"{name}.safetensors", tensors,
               dict(prompt=PROMPT, negative_prompt=neg, height=H, width=W, steps=STEPS, guidance_scale=guidance,
                    max_sequence_length=MAX_LEN, generator_seed=seed, timesteps=ts, sigmas=sigmas,
                    draws="noise"), skip=("timesteps",))

    i2i = ZImageImg2ImgPipeline(**components)
    img = init_image()
    tensors, draws, ts, sigmas = run(i2i, "img2img", 7, image=img, strength=0.6, guidance_scale=0.0)
    if len(draws) != 2:
        raise AssertionError(f"img2img: {len(draws)} draws")
    tensors.update(init_image=img, posterior_noise=draws[0], noise=draws[1])
    golden("img2img_turbo.safetensors", tensors,
           dict(prompt=PROMPT, height=H, width=W, steps=STEPS, strength=0.6, guidance_scale=0.0,
                max_sequence_length=MAX_LEN, generator_seed=7, timesteps=ts, sigmas=sigmas,
                draws="posterior_noise (VAE sample), noise"), skip=("timesteps",))

    inp = ZImageInpaintPipeline(**components)
    mask = inpaint_mask()
    tensors, draws, ts, sigmas = run(inp, "inpaint", 11, image=img, mask_image=mask, strength=0.75, guidance_scale=0.0)
    if len(draws) != 3:
        raise AssertionError(f"inpaint: {len(draws)} draws")
    tensors.update(init_image=img, mask=mask, posterior_noise=draws[0], noise=draws[1], masked_posterior_noise=draws[2])
    golden("inpaint_turbo.safetensors", tensors,
           dict(prompt=PROMPT, height=H, width=W, steps=STEPS, strength=0.75, guidance_scale=0.0,
                max_sequence_length=MAX_LEN, generator_seed=11, timesteps=ts, sigmas=sigmas,
                draws="posterior_noise, noise, masked_posterior_noise (encoded, unused)"), skip=("timesteps",))


LORA_RANK = 4


def lora_goldens() -> None:
    """A PEFT/diffusers-named LoRA and a kohya-named one (with alphas), applied by diffusers'
    ZImageLoraLoaderMixin at strengths 0.8 and 1.2; the transformer output on transformer_single's inputs."""
    dim, ffn = TRANSFORMER_KW["dim"], int(TRANSFORMER_KW["dim"] / 3 * 8)
    g = torch.Generator().manual_seed(9400)

    def pair(d_in: int, d_out: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.randn(LORA_RANK, d_in, generator=g) / d_in ** 0.5
        b = torch.randn(d_out, LORA_RANK, generator=g) * scale / LORA_RANK ** 0.5
        return a, b

    peft_modules = {
        "layers.0.attention.to_q": (dim, dim), "layers.0.attention.to_k": (dim, dim), "layers.0.attention.to_v": (dim, dim),
        "layers.0.attention.to_out.0": (dim, dim), "noise_refiner.0.feed_forward.w2": (ffn, dim),
        "layers.1.adaLN_modulation.0": (dim, 4 * dim), "all_final_layer.2-1.linear": (dim, 64),
        "context_refiner.0.attention.to_k": (dim, dim),
    }
    peft = {}
    for m, (i, o) in peft_modules.items():
        a, b = pair(i, o, 0.5)
        peft[f"transformer.{m}.lora_A.weight"] = a
        peft[f"transformer.{m}.lora_B.weight"] = b
    kohya_modules = {"layers.1.attention.to_q": (dim, dim), "layers.1.attention.to_v": (dim, dim),
                     "layers.1.feed_forward.w1": (dim, ffn), "noise_refiner.0.attention.to_out.0": (dim, dim)}
    kohya = {}
    for m, (i, o) in kohya_modules.items():
        a, b = pair(i, o, 0.5)
        k = "lora_unet_" + m.replace(".", "_")
        kohya[f"{k}.lora_down.weight"] = a
        kohya[f"{k}.lora_up.weight"] = b
        kohya[f"{k}.alpha"] = torch.tensor(2.0)
    save_tensors(ZDIR / "lora_peft.safetensors", peft)
    save_tensors(ZDIR / "lora_kohya.safetensors", kohya)
    pipe = ZImagePipeline.from_pretrained(FOLDER)
    pipe.load_lora_weights(str(ZDIR / "lora_peft.safetensors"), adapter_name="peft")
    pipe.load_lora_weights(str(ZDIR / "lora_kohya.safetensors"), adapter_name="kohya")
    pipe.set_adapters(["peft", "kohya"], [0.8, 1.2])
    x = randn((16, 1, 8, 8), 504)
    cap = randn((33, 32), 505)
    t1 = torch.tensor([0.5])
    out = pipe.transformer([x], t1, [cap], return_dict=False)[0][0]
    base = ZImageTransformer2DModel.from_pretrained(FOLDER / "transformer")([x], t1, [cap], return_dict=False)[0][0]
    if (out - base).abs().max() < 1e-2:
        raise AssertionError("the LoRAs barely change the output")
    golden("lora.safetensors", dict(x=x, cap=cap, t=t1, out=out),
           dict(note="out = transformer with lora_peft (0.8) and lora_kohya (1.2, alpha 2, rank 4) applied by diffusers",
                strengths=dict(peft=0.8, kohya=1.2)), skip=("t",))


def main() -> None:
    tok = build_tokenizer()
    transformer = build_transformer()
    text_encoder = build_text_encoder(len(tok))
    vae = build_vae()
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_KW)
    components = dict(transformer=transformer, text_encoder=text_encoder, tokenizer=tok, vae=vae, scheduler=scheduler)
    pipe = ZImagePipeline(**components)
    pipe.save_pretrained(FOLDER, safe_serialization=True)
    # Reload so every golden comes from what is on disk.
    pipe = ZImagePipeline.from_pretrained(FOLDER)
    components = dict(transformer=pipe.transformer, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, vae=pipe.vae,
                      scheduler=pipe.scheduler)
    write_original_file(pipe.transformer)
    write_qwen_file(pipe.text_encoder)
    prompt_goldens(pipe)
    transformer_goldens(pipe.transformer)
    vae_golden(pipe.vae)
    schedule_golden()
    e2e_goldens(components)
    lora_goldens()
    print(f"fixtures/zimage: {dir_size(ZDIR) / 1e6:.2f} MB, goldens/zimage: {dir_size(OUT) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
