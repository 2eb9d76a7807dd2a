//! The Qwen3 text encoder as `ZImagePipeline` uses it: the prompt wrapped in Qwen3's chat template
//! (one user turn, generation prompt, thinking enabled — which adds nothing), tokenized, and the
//! second-to-last hidden state (`hidden_states[-2]`: the output of the second-to-last decoder layer,
//! before the final norm) of the real tokens only.
//!
//! candle-transformers' `qwen3::Model` returns only the final normed state and has no hook for an
//! intermediate layer, so this is a compact encoder of its own: it stops after layer `n − 1` (the
//! last layer is never loaded), goes through `sd_models::ops` for every dense layer and the attention,
//! and runs on the real tokens only. diffusers pads to `max_sequence_length` on the right and passes
//! the attention mask; with causal attention the real tokens never see right padding, so the kept
//! rows are the same (checked by `tools/zimage_fixtures.py`).

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use sd_models::ops::{self, Linear};
use sd_models::single_file::innermost;
use sd_models::weights::{MappedWeights, RenamedWeights, Source};
use tokenizers::Tokenizer;

use crate::config::Qwen3Config;
use crate::error::{Error, Result};
use crate::norm::RmsNorm;

/// The prompt as Qwen3's chat template renders one user turn with `add_generation_prompt=True` and
/// `enable_thinking=True` (what `ZImagePipeline._encode_prompt` asks for).
pub fn chat_prompt(prompt: &str) -> String {
    format!("<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n")
}

#[derive(Debug, Clone)]
struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    input_norm: RmsNorm,
    post_norm: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// The first `num_hidden_layers − 1` decoder layers of a Qwen3 model.
#[derive(Debug, Clone)]
pub struct Qwen3Encoder {
    cfg: Qwen3Config,
    embed: Tensor,
    layers: Vec<Layer>,
    dtype: DType,
    device: Device,
}

impl Qwen3Encoder {
    /// Builds the encoder from transformers-named weights (`embed_tokens.weight`, `layers.N.self_attn.*`).
    pub fn new(cfg: &Qwen3Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim());
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let eps = cfg.rms_norm_eps;
        let bias = cfg.attention_bias;
        let layer = |i: usize| -> candle_core::Result<Layer> {
            let vb = vb.pp("layers").pp(i.to_string());
            let a = vb.pp("self_attn");
            let m = vb.pp("mlp");
            Ok(Layer {
                q: ops::linear(a.pp("q_proj"), h, nh * hd, bias)?,
                k: ops::linear(a.pp("k_proj"), h, nkv * hd, bias)?,
                v: ops::linear(a.pp("v_proj"), h, nkv * hd, bias)?,
                o: ops::linear(a.pp("o_proj"), nh * hd, h, false)?,
                q_norm: RmsNorm::load(a.pp("q_norm"), hd, eps)?,
                k_norm: RmsNorm::load(a.pp("k_norm"), hd, eps)?,
                input_norm: RmsNorm::load(vb.pp("input_layernorm"), h, eps)?,
                post_norm: RmsNorm::load(vb.pp("post_attention_layernorm"), h, eps)?,
                gate: ops::linear(m.pp("gate_proj"), h, cfg.intermediate_size, false)?,
                up: ops::linear(m.pp("up_proj"), h, cfg.intermediate_size, false)?,
                down: ops::linear(m.pp("down_proj"), cfg.intermediate_size, h, false)?,
            })
        };
        let n = cfg.num_hidden_layers.saturating_sub(1);
        Ok(Self {
            embed: vb.pp("embed_tokens").get((cfg.vocab_size, h), "weight")?,
            layers: (0..n).map(layer).collect::<candle_core::Result<_>>()?,
            cfg: cfg.clone(),
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// dtype of the weights and of the returned states.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The second-to-last hidden state `[len, hidden]` of token ids `ids` (one sequence, no padding).
    pub fn encode(&self, ids: &[u32]) -> candle_core::Result<Tensor> {
        let len = ids.len();
        if len == 0 {
            candle_core::bail!("Qwen3 encoder: no tokens");
        }
        let dev = &self.device;
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.cfg.vocab_size) {
            candle_core::bail!("token id {bad} is outside the text encoder's vocabulary of {}; the tokenizer does not belong to it", self.cfg.vocab_size);
        }
        let ids_t = Tensor::new(ids, dev)?;
        let mut x = self.embed.index_select(&ids_t, 0)?.unsqueeze(0)?;
        let (nh, nkv, hd) = (self.cfg.num_attention_heads, self.cfg.num_key_value_heads, self.cfg.head_dim());
        // Rotary (rotate-half layout), in F32 as transformers computes it.
        let theta = self.cfg.theta() as f32;
        let inv: Vec<f32> = (0..hd).step_by(2).map(|i| 1.0 / theta.powf(i as f32 / hd as f32)).collect();
        let mut cos = Vec::with_capacity(len * hd / 2);
        let mut sin = Vec::with_capacity(len * hd / 2);
        for p in 0..len {
            for f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (len, hd / 2), dev)?;
        let sin = Tensor::from_vec(sin, (len, hd / 2), dev)?;
        let causal: Vec<f32> = (0..len).flat_map(|i| (0..len).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY })).collect();
        let causal = Tensor::from_vec(causal, (len, len), dev)?;
        let dtype = self.dtype;
        for l in &self.layers {
            let h = l.input_norm.forward(&x)?;
            let split = |t: Tensor, heads: usize| t.reshape((1, len, heads, hd));
            let q = l.q_norm.forward(&split(l.q.forward(&h)?, nh)?)?;
            let k = l.k_norm.forward(&split(l.k.forward(&h)?, nkv)?)?;
            let v = split(l.v.forward(&h)?, nkv)?;
            let rot = |t: Tensor| -> candle_core::Result<Tensor> {
                let t = t.to_dtype(DType::F32)?.transpose(1, 2)?.contiguous()?;
                candle_nn::rotary_emb::rope(&t, &cos, &sin)?.to_dtype(dtype)?.transpose(1, 2)
            };
            let q = rot(q)?;
            let k = rot(k)?;
            // Grouped-query attention: every key/value head serves nh / nkv query heads.
            let rep = nh / nkv;
            let expand = |t: Tensor| -> candle_core::Result<Tensor> {
                if rep == 1 {
                    return t.reshape((1, len, nh * hd));
                }
                t.unsqueeze(3)?.broadcast_as((1, len, nkv, rep, hd))?.reshape((1, len, nh * hd))
            };
            let a = ops::attention_masked(&q.reshape((1, len, nh * hd))?, &expand(k)?, &expand(v)?, nh, false, Some(&causal))?;
            x = (x + l.o.forward(&a)?)?;
            let h = l.post_norm.forward(&x)?;
            let m = l.down.forward(&(ops::silu(&l.gate.forward(&h)?)? * l.up.forward(&h)?)?)?;
            x = (x + m)?;
        }
        x.squeeze(0)
    }
}

/// Loads the encoder from a `text_encoder/` folder (`config.json` and safetensors weights, named as
/// `Qwen3Model` or, under `model.`, as `Qwen3ForCausalLM` saves them).
pub fn load_text_encoder(dir: &Path, dtype: DType, device: &Device) -> Result<Qwen3Encoder> {
    let cfg_path = dir.join("config.json");
    if !cfg_path.is_file() {
        return Err(Error::NotFound {
            what: "text encoder config.json".into(),
            path: cfg_path,
            hint: "pass the text_encoder/ folder of a Z-Image repo (Qwen3-4B)".into(),
        });
    }
    let cfg = Qwen3Config::from_file(&cfg_path)?;
    let files = sd_models::diffusers::find_weight_files(dir, false)?;
    let st = crate::transformer::mmap(&files, dir)?;
    let prefixed = st.get("model.embed_tokens.weight").is_ok();
    let vb = if prefixed {
        let map = |n: &str| Some(Source::Rename(format!("model.{n}")));
        VarBuilder::from_backend(Box::new(RenamedWeights::new(st, Box::new(map), dir.display().to_string(), "a Qwen3 text encoder")), dtype, device.clone())
    } else {
        VarBuilder::from_backend(Box::new(MappedWeights::new(st)), dtype, device.clone())
    };
    Qwen3Encoder::new(&cfg, vb).map_err(|e| Error::BadWeights {
        source_desc: dir.display().to_string(),
        reason: innermost(&e).to_string(),
        component: "Qwen3 text encoder",
    })
}

/// Loads `tokenizer.json` from a `tokenizer/` folder (or the file itself).
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    let file = if path.is_dir() { path.join("tokenizer.json") } else { path.to_path_buf() };
    if !file.is_file() {
        return Err(Error::NotFound { what: "tokenizer.json".into(), path: file, hint: "pass the tokenizer/ folder of a Z-Image repo".into() });
    }
    Tokenizer::from_file(&file).map_err(|e| Error::Tokenizer(format!("{}: {e}", file.display())))
}

/// The token ids of `prompt` as the pipeline feeds them: the chat template applied, tokenized, truncated
/// to `max_len` (padding is not needed, see the module docs).
pub fn input_ids(tokenizer: &Tokenizer, prompt: &str, max_len: usize) -> Result<Vec<u32>> {
    let enc = tokenizer.encode(chat_prompt(prompt), true).map_err(|e| Error::Tokenizer(e.to_string()))?;
    let mut ids = enc.get_ids().to_vec();
    ids.truncate(max_len);
    Ok(ids)
}

/// The caption features `[len, hidden]` of `prompt` (`ZImagePipeline._encode_prompt`), in the encoder's dtype.
pub fn encode_prompt(encoder: &Qwen3Encoder, tokenizer: &Tokenizer, prompt: &str, max_len: usize) -> Result<Tensor> {
    let ids = input_ids(tokenizer, prompt, max_len)?;
    if ids.is_empty() {
        return Err(Error::invalid("max_sequence_length", "leaves no prompt token; use a positive length"));
    }
    Ok(encoder.encode(&ids)?)
}
