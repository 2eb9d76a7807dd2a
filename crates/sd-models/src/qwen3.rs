//! The Qwen3 text encoder shared by the families that condition on a Qwen3 language model's hidden states
//! (Z-Image: the second-to-last state; FLUX.2 [klein]: states 9, 18 and 27 stacked), as transformers'
//! `Qwen3Model` / `Qwen3ForCausalLM` compute them with `output_hidden_states=True`.
//!
//! candle-transformers' `qwen3::Model` returns only the final normed state and has no hook for an
//! intermediate layer, so this is a compact encoder of its own: it loads only the decoder layers a family
//! reads (never the final norm or the LM head), goes through [`crate::ops`] for every dense layer and the
//! attention, and returns `hidden_states[k]` in transformers' numbering (0 = the token embeddings, k = the
//! output of decoder layer k, before any final norm).

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;
use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::ops::{self, Linear};
use crate::weights::{MappedWeights, RenamedWeights, Source};

/// transformers' `Qwen3Config`, as far as the encoder reads it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Qwen3Config {
    /// Token vocabulary size.
    pub vocab_size: usize,
    /// Hidden width (2560 for Qwen3-4B, 4096 for Qwen3-8B).
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers (36 for Qwen3-4B and -8B).
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention).
    pub num_key_value_heads: usize,
    /// Head width (`hidden_size / num_attention_heads` when absent).
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// RMSNorm epsilon.
    #[serde(default = "d_qeps")]
    pub rms_norm_eps: f64,
    /// Rotary base (transformers 4.x field).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// Rotary parameters (transformers 5.x field: `{"rope_theta": …, "rope_type": "default"}`).
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    /// Whether the attention projections have biases.
    #[serde(default)]
    pub attention_bias: bool,
    /// Activation of the MLP (must be `silu`).
    #[serde(default = "d_silu")]
    pub hidden_act: String,
}

fn d_qeps() -> f64 {
    1e-6
}
fn d_silu() -> String {
    "silu".into()
}

impl Qwen3Config {
    /// Reads and checks a `text_encoder/config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        let bad = |reason: String| Error::InvalidConfig { path: path.to_path_buf(), reason };
        let cfg: Self = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        cfg.check().map_err(bad)?;
        Ok(cfg)
    }

    /// Whether the encoder can run this config; the reason when not.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.hidden_act != "silu" {
            return Err(format!("hidden_act {:?} is not supported; Qwen3 uses silu", self.hidden_act));
        }
        if self.num_attention_heads == 0 || self.num_key_value_heads == 0 || self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(format!("{} attention heads cannot share {} key/value heads", self.num_attention_heads, self.num_key_value_heads));
        }
        if let Some(t) = self.rope_parameters.as_ref().and_then(|p| p.get("rope_type")).and_then(|t| t.as_str()) {
            if t != "default" {
                return Err(format!("rope_type {t:?} is not supported; Qwen3 uses the default rotary embedding"));
            }
        }
        if self.head_dim() == 0 || self.head_dim() % 2 == 1 {
            return Err(format!("head_dim {} must be even and positive", self.head_dim()));
        }
        Ok(())
    }

    /// The config of Qwen3 weights read off their shapes (`shape` of un-prefixed names such as
    /// `layers.0.self_attn.q_proj.weight`), for stand-alone encoder files, which carry no config: the rotary
    /// base and norm epsilon are Qwen3's (1e6, 1e-6).
    pub fn from_shapes(shape: &dyn Fn(&str) -> Option<Vec<usize>>, num_layers: usize) -> std::result::Result<Self, String> {
        let need = |n: &str| shape(n).ok_or_else(|| format!("{n} is missing"));
        let embed = need("embed_tokens.weight")?;
        let q = need("layers.0.self_attn.q_proj.weight")?;
        let k = need("layers.0.self_attn.k_proj.weight")?;
        let gate = need("layers.0.mlp.gate_proj.weight")?;
        let head = need("layers.0.self_attn.q_norm.weight")?;
        let (Some(&vocab_size), Some(&hidden_size), Some(&q_rows), Some(&k_rows), Some(&intermediate_size), Some(&head_dim)) =
            (embed.first(), embed.get(1), q.first(), k.first(), gate.first(), head.first())
        else {
            return Err("a tensor has fewer dimensions than a Qwen3 model's".into());
        };
        if head_dim == 0 || q_rows % head_dim != 0 || k_rows % head_dim != 0 {
            return Err(format!("q_proj ({q_rows} rows) and k_proj ({k_rows} rows) do not split into {head_dim}-wide heads"));
        }
        let cfg = Self {
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers: num_layers,
            num_attention_heads: q_rows / head_dim,
            num_key_value_heads: k_rows / head_dim,
            head_dim: Some(head_dim),
            rms_norm_eps: d_qeps(),
            rope_theta: Some(1_000_000.0),
            rope_parameters: None,
            attention_bias: shape("layers.0.self_attn.q_proj.bias").is_some(),
            hidden_act: d_silu(),
        };
        cfg.check()?;
        Ok(cfg)
    }

    /// Width of each attention head.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// The rotary base, from either transformers layout (1e6 for Qwen3 when absent).
    pub fn theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|p| p.get("rope_theta"))
            .and_then(|t| t.as_f64())
            .or(self.rope_theta)
            .unwrap_or(1_000_000.0)
    }
}

/// RMSNorm with a learned scale, computed in F32 (as transformers' and diffusers' RMSNorms upcast) and
/// returned in the input dtype.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    /// Loads `weight` `[dim]` (kept in F32).
    pub fn load(vb: VarBuilder, dim: usize, eps: f64) -> candle_core::Result<Self> {
        Self::from_weight(&vb.get(dim, "weight")?, eps)
    }

    /// A norm with `weight` `[dim]` (kept in F32), for models that name it otherwise (`scale`).
    pub fn from_weight(weight: &Tensor, eps: f64) -> candle_core::Result<Self> {
        Ok(Self { weight: weight.to_dtype(DType::F32)?, eps: eps as f32 })
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let out = candle_nn::ops::rms_norm(&xf.contiguous()?, &self.weight, self.eps)?;
        out.to_dtype(dtype)
    }
}

/// The prompt as Qwen3's chat template renders one user turn with `add_generation_prompt=True`; with
/// `enable_thinking=false` the template appends an empty `<think>` block (FLUX.2 [klein] asks for that,
/// Z-Image does not).
pub fn chat_prompt(prompt: &str, enable_thinking: bool) -> String {
    let think = if enable_thinking { "" } else { "<think>\n\n</think>\n\n" };
    format!("<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n{think}")
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

/// The first decoder layers of a Qwen3 model (as many as a family reads).
#[derive(Debug, Clone)]
pub struct Qwen3Encoder {
    cfg: Qwen3Config,
    embed: Tensor,
    layers: Vec<Layer>,
    dtype: DType,
    device: Device,
}

impl Qwen3Encoder {
    /// Builds the encoder's first `num_layers` decoder layers from transformers-named weights
    /// (`embed_tokens.weight`, `layers.N.self_attn.*`).
    pub fn new(cfg: &Qwen3Config, vb: VarBuilder, num_layers: usize) -> candle_core::Result<Self> {
        if num_layers > cfg.num_hidden_layers {
            candle_core::bail!("the Qwen3 text encoder has {} layers, {num_layers} were asked for", cfg.num_hidden_layers);
        }
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
        Ok(Self {
            embed: vb.pp("embed_tokens").get((cfg.vocab_size, h), "weight")?,
            layers: (0..num_layers).map(layer).collect::<candle_core::Result<_>>()?,
            cfg: cfg.clone(),
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// dtype of the weights and of the returned states.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The config the encoder was built from.
    pub fn config(&self) -> &Qwen3Config {
        &self.cfg
    }

    /// How many decoder layers are loaded (the deepest hidden state it can return).
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The output `[len, hidden]` of the last loaded layer for token ids `ids` (one sequence, no padding).
    pub fn encode(&self, ids: &[u32]) -> candle_core::Result<Tensor> {
        let n = self.layers.len();
        let mut out = self.hidden_states(ids, ids.len(), &[n])?;
        out.pop().ok_or_else(|| candle_core::Error::Msg("Qwen3 encoder: no state".into()))
    }

    /// transformers' `hidden_states[k]` `[len, hidden]` for every `k` in `layers` (0 = embeddings, `k` = the
    /// output of decoder layer `k`), for one sequence `ids` whose first `valid` tokens are real and the rest
    /// right padding: padded keys are masked out of the causal attention (as transformers does with an
    /// attention mask), padded positions still get states.
    pub fn hidden_states(&self, ids: &[u32], valid: usize, layers: &[usize]) -> candle_core::Result<Vec<Tensor>> {
        let len = ids.len();
        if len == 0 || valid == 0 {
            candle_core::bail!("Qwen3 encoder: no tokens");
        }
        if let Some(&k) = layers.iter().find(|&&k| k > self.layers.len()) {
            candle_core::bail!("hidden state {k} asked for, but only {} decoder layers are loaded", self.layers.len());
        }
        let dev = &self.device;
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.cfg.vocab_size) {
            candle_core::bail!("token id {bad} is outside the text encoder's vocabulary of {}; the tokenizer does not belong to it", self.cfg.vocab_size);
        }
        let ids_t = Tensor::new(ids, dev)?;
        let mut x = self.embed.index_select(&ids_t, 0)?.unsqueeze(0)?;
        let mut out: Vec<Option<Tensor>> = vec![None; layers.len()];
        let mut keep = |k: usize, x: &Tensor| -> candle_core::Result<()> {
            for (slot, &want) in out.iter_mut().zip(layers) {
                if want == k {
                    *slot = Some(x.squeeze(0)?);
                }
            }
            Ok(())
        };
        keep(0, &x)?;
        let deepest = layers.iter().copied().max().unwrap_or(0);
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
        let mask: Vec<f32> = (0..len)
            .flat_map(|i| (0..len).map(move |j| if j <= i && j < valid { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        let mask = Tensor::from_vec(mask, (len, len), dev)?;
        let dtype = self.dtype;
        for (li, l) in self.layers.iter().enumerate().take(deepest) {
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
            let a = ops::attention_masked(&q.reshape((1, len, nh * hd))?, &expand(k)?, &expand(v)?, nh, false, Some(&mask))?;
            x = (x + l.o.forward(&a)?)?;
            let h = l.post_norm.forward(&x)?;
            let m = l.down.forward(&(ops::silu(&l.gate.forward(&h)?)? * l.up.forward(&h)?)?)?;
            x = (x + m)?;
            keep(li + 1, &x)?;
        }
        out.into_iter()
            .map(|t| t.ok_or_else(|| candle_core::Error::Msg("Qwen3 encoder: hidden state not computed".into())))
            .collect()
    }
}

/// A [`VarBuilder`] over a `text_encoder/` folder's safetensors weights, named as `Qwen3Model` saves them
/// or, under `model.`, as `Qwen3ForCausalLM` does (both served as `embed_tokens.weight`, `layers.N.…`).
pub fn text_encoder_weights(dir: &Path, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    let files = crate::diffusers::find_weight_files(dir, false)?;
    // SAFETY: read-only mapping; like every mmap-based loader we rely on the files not being truncated by
    // another process while they are mapped.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }.map_err(|e| Error::InvalidSafetensors {
        path: dir.to_path_buf(),
        reason: crate::single_file::innermost(&e).to_string(),
    })?;
    let prefixed = st.get("model.embed_tokens.weight").is_ok();
    Ok(if prefixed {
        let map = |n: &str| Some(Source::Rename(format!("model.{n}")));
        VarBuilder::from_backend(Box::new(RenamedWeights::new(st, Box::new(map), dir.display().to_string(), "a Qwen3 text encoder")), dtype, device.clone())
    } else {
        VarBuilder::from_backend(Box::new(MappedWeights::new(st)), dtype, device.clone())
    })
}

/// The config and weights of a Qwen3 text encoder in either form people have it: a transformers
/// `text_encoder/` folder, or one stand-alone `.safetensors` file (ComfyUI's `text_encoders/qwen_3_4b.safetensors`,
/// named as `Qwen3Model` saves it or, under `model.`, as `Qwen3ForCausalLM` does; an `lm_head.weight` in it is
/// ignored, fp8-scaled weights are dequantised). A file's config comes from `config` (a `config.json`) when
/// given, else from its tensor shapes.
pub fn text_encoder_part(path: &Path, config: Option<&Path>, dtype: DType, device: &Device) -> Result<(Qwen3Config, VarBuilder<'static>)> {
    if path.is_dir() {
        let cfg_path = path.join("config.json");
        if !cfg_path.is_file() {
            return Err(Error::NotFound { what: "Qwen3 text encoder config.json".into(), path: cfg_path });
        }
        return Ok((Qwen3Config::from_file(&cfg_path)?, text_encoder_weights(path, dtype, device)?));
    }
    if !path.is_file() {
        return Err(Error::NotFound { what: "Qwen3 text encoder (a text_encoder/ folder or qwen_3_*.safetensors)".into(), path: path.to_path_buf() });
    }
    let st = crate::single_file::open_safetensors(path)?;
    let prefix = if st.get("model.embed_tokens.weight").is_ok() {
        "model."
    } else if st.get("embed_tokens.weight").is_ok() {
        ""
    } else {
        let example = st.tensors().into_iter().map(|(n, _)| n).min().unwrap_or_default();
        return Err(Error::UnsupportedFormat {
            path: path.to_path_buf(),
            reason: format!("no embed_tokens.weight (or model.embed_tokens.weight), so this is no Qwen3 text encoder (found e.g. {example:?}); pass qwen_3_4b.safetensors / qwen_3_8b.safetensors or a text_encoder/ folder"),
        });
    };
    let cfg = match config.filter(|p| p.is_file()) {
        Some(p) => Qwen3Config::from_file(p)?,
        None => {
            let names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
            let layers = crate::split::count_blocks(names.iter().map(String::as_str), &format!("{prefix}layers."));
            Qwen3Config::from_shapes(&|n| st.get(&format!("{prefix}{n}")).ok().map(|v| v.shape().to_vec()), layers)
                .map_err(|reason| Error::InvalidConfig { path: path.to_path_buf(), reason: format!("{reason}; is this a complete Qwen3 text encoder?") })?
        }
    };
    let vb = VarBuilder::from_backend(Box::new(MappedWeights::new(st)), dtype, device.clone());
    Ok((cfg, if prefix.is_empty() { vb } else { vb.pp("model") }))
}

/// Loads `tokenizer.json` from a `tokenizer/` folder (or the file itself), with any saved padding or
/// truncation switched off (the callers pad and truncate as their pipeline does).
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    let file = if path.is_dir() { path.join("tokenizer.json") } else { path.to_path_buf() };
    if !file.is_file() {
        return Err(Error::NotFound { what: "Qwen tokenizer (tokenizer.json)".into(), path: file });
    }
    let mut tok = Tokenizer::from_file(&file).map_err(|e| Error::Tokenizer(format!("{}: {e}", file.display())))?;
    tok.with_padding(None);
    tok.with_truncation(None).map_err(|e| Error::Tokenizer(format!("{}: {e}", file.display())))?;
    Ok(tok)
}

/// The token ids of `prompt` in the chat template ([`chat_prompt`]), truncated to `max_len`.
pub fn chat_input_ids(tokenizer: &Tokenizer, prompt: &str, enable_thinking: bool, max_len: usize) -> Result<Vec<u32>> {
    let enc = tokenizer.encode(chat_prompt(prompt, enable_thinking), true).map_err(|e| Error::Tokenizer(e.to_string()))?;
    let mut ids = enc.get_ids().to_vec();
    ids.truncate(max_len);
    Ok(ids)
}

/// The id of Qwen's padding token `<|endoftext|>`.
pub fn pad_token_id(tokenizer: &Tokenizer) -> Result<u32> {
    tokenizer
        .token_to_id("<|endoftext|>")
        .ok_or_else(|| Error::Tokenizer("the tokenizer has no <|endoftext|> token; it is not a Qwen tokenizer".into()))
}
