//! T5 encoder shared by the families that condition on T5-XXL (FLUX.1, SD 3.x): the encoder, the
//! tokenizer with transformers' padding rule, the encoder call, and the encoder's config read off tensor
//! shapes for checkpoints that carry no `config.json` (SD 3.x single files, ComfyUI's `t5xxl_*.safetensors`).
//!
//! [`T5Encoder`] is this crate's own rather than candle-transformers' `T5EncoderModel`: that one runs every
//! matmul in the weights' dtype, and candle's CPU matmul has no BF16 kernel (it widens both operands to
//! whole F32 copies on every product), so T5-XXL had to be loaded in F32 on the CPU (19 GB). Here every dense
//! layer goes through [`crate::ops::Linear`], which multiplies BF16/F16 weights panel by panel into F32, and
//! the activations stay F32 on the CPU, so the weights can stay BF16 (9.5 GB). candle-transformers' `Config`
//! is still the config type.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Activation, VarBuilder};
use candle_transformers::models::t5::Config as T5Config;
use tokenizers::{Tokenizer, TruncationDirection};

use crate::error::{Error, Result};
use crate::ops::{self, Linear};
use crate::qwen3::RmsNorm;

/// Loads a T5 tokenizer from a folder holding `tokenizer.json` or from the file itself.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    let file = if path.is_dir() { path.join("tokenizer.json") } else { path.to_path_buf() };
    if !file.is_file() {
        return Err(Error::NotFound { what: "T5 tokenizer (tokenizer.json)".into(), path: file });
    }
    let mut tok = Tokenizer::from_file(&file).map_err(|e| Error::Tokenizer(format!("{}: {e}", file.display())))?;
    // Padding and truncation are applied by `input_ids`; a saved setting would interfere.
    tok.with_padding(None);
    tok.with_truncation(None).map_err(|e| Error::Tokenizer(format!("{}: {e}", file.display())))?;
    if tok.token_to_id("<pad>").is_none() {
        return Err(Error::Tokenizer(format!("{} has no <pad> token; it is not a T5 tokenizer", file.display())));
    }
    Ok(tok)
}

/// Exactly `max_len` T5 ids for `prompt`: the prompt's tokens, truncated so the end-of-sequence token
/// still fits, then `</s>`, then `<pad>` (transformers' `padding="max_length", truncation=True`).
pub fn input_ids(tok: &Tokenizer, prompt: &str, max_len: usize) -> Result<Vec<u32>> {
    let pad = tok.token_to_id("<pad>").ok_or_else(|| Error::Tokenizer("the T5 tokenizer has no <pad> token".into()))?;
    let mut enc = tok.encode(prompt, false).map_err(|e| Error::Tokenizer(format!("cannot tokenize the prompt: {e}")))?;
    let added = tok.get_post_processor().map_or(0, |p| tokenizers::PostProcessor::added_tokens(p, false));
    enc.truncate(max_len.saturating_sub(added), 0, TruncationDirection::Right);
    let enc = tok.post_process(enc, None, true).map_err(|e| Error::Tokenizer(format!("cannot finish the T5 tokens: {e}")))?;
    let mut ids = enc.get_ids().to_vec();
    ids.truncate(max_len);
    ids.resize(max_len, pad);
    Ok(ids)
}

/// Runs T5 on ids `[b, seq]` and returns the last hidden state `[b, seq, d_model]` as `dtype`.
pub fn embeddings(t5: &T5Encoder, ids: &Tensor, dtype: DType) -> Result<Tensor> {
    let ids = ids.to_device(t5.device())?;
    Ok(t5.forward(&ids)?.to_dtype(dtype)?)
}

/// The encoder config of a T5 v1.1 checkpoint (transformers names: `shared.weight`,
/// `encoder.block.N.layer.0.SelfAttention.q.weight`, …) read off its shapes; `shape` answers for names
/// without the file's prefix. Gated-GELU feed-forward, 32 relative-position buckets up to distance 128, as
/// T5-XXL v1.1 (FLUX's and SD3's encoder).
pub fn config_from_shapes(shape: &dyn Fn(&str) -> Option<Vec<usize>>, names: &[&str], source: &str) -> Result<T5Config> {
    let bad = |reason: String| Error::InvalidInput(format!("{source}: {reason}; is this a T5 v1.1 encoder (t5xxl)?"));
    let need = |n: &str| shape(n).ok_or_else(|| bad(format!("no tensor {n}")));
    let shared = shape("shared.weight").or_else(|| shape("encoder.embed_tokens.weight")).ok_or_else(|| bad("no tensor shared.weight".into()))?;
    let [vocab, d_model] = shared[..] else { return Err(bad(format!("shared.weight has shape {shared:?}"))) };
    let layers = names
        .iter()
        .filter_map(|n| n.split("encoder.block.").nth(1)?.split('.').next()?.parse::<usize>().ok())
        .max()
        .map_or(0, |m| m + 1);
    let rel = need("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")?;
    let heads = rel.get(1).copied().unwrap_or(0);
    let q = need("encoder.block.0.layer.0.SelfAttention.q.weight")?;
    let wi = need("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")?;
    if heads == 0 || layers == 0 {
        return Err(bad("no attention heads or blocks".into()));
    }
    let cfg = serde_json::json!({
        "vocab_size": vocab,
        "d_model": d_model,
        "d_kv": q.first().copied().unwrap_or(0) / heads,
        "d_ff": wi.first().copied().unwrap_or(0),
        "num_layers": layers,
        "num_heads": heads,
        "relative_attention_num_buckets": rel.first().copied().unwrap_or(32),
        "relative_attention_max_distance": 128,
        "dropout_rate": 0.0,
        "layer_norm_epsilon": 1e-6,
        "initializer_factor": 1.0,
        "feed_forward_proj": "gated-gelu",
        "is_decoder": false,
        "is_encoder_decoder": true,
        "use_cache": false,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "tie_word_embeddings": false
    });
    serde_json::from_value(cfg).map_err(|e| bad(format!("cannot build its config: {e}")))
}

/// The feed-forward half of a block: gated (`wi_0`, `wi_1`, `wo`; T5 v1.1's `gated-gelu`) or plain (`wi`, `wo`;
/// the original T5's `relu`).
#[derive(Debug, Clone)]
enum FeedForward {
    Gated { wi_0: Linear, wi_1: Linear, wo: Linear },
    Plain { wi: Linear, wo: Linear },
}

/// One encoder block: self-attention then feed-forward, each behind a pre-norm and a residual.
#[derive(Debug, Clone)]
struct Block {
    attn_norm: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ff_norm: RmsNorm,
    ff: FeedForward,
}

/// The encoder of a T5 model (transformers' `T5EncoderModel`): the last hidden state, no attention mask, as
/// FLUX.1 and SD 3.x read it.
///
/// On the CPU the activations are F32 whatever the weights' dtype: BF16/F16 weights are multiplied panel by
/// panel in F32 ([`crate::ops::Linear`]), so T5-XXL stays BF16 in memory. On a GPU it computes in the
/// weights' dtype, as candle-transformers' and transformers' encoders do, except that F16 weights are kept
/// as BF16 there (T5's activations overflow F16's range; transformers patches that with clamping and an F32
/// `wo`, BF16 has F32's range). The norms, the position bias and the softmax are F32 everywhere.
#[derive(Debug, Clone)]
pub struct T5Encoder {
    shared: Tensor,
    blocks: Vec<Block>,
    final_norm: RmsNorm,
    /// `relative_attention_bias` of block 0 `[num_buckets, heads]`, F32: every block adds the same bias.
    relative_bias: Tensor,
    act: Activation,
    heads: usize,
    d_kv: usize,
    num_buckets: usize,
    max_distance: usize,
    dtype: DType,
    act_dtype: DType,
    device: Device,
}

impl T5Encoder {
    /// Builds the encoder from transformers-named weights (`shared.weight` or `encoder.embed_tokens.weight`,
    /// `encoder.block.N.layer.{0,1}.…`, `encoder.final_layer_norm.weight`), as candle-transformers' T5 reads them.
    pub fn new(vb: VarBuilder, cfg: &T5Config) -> candle_core::Result<Self> {
        let nb = cfg.relative_attention_num_buckets;
        // Bidirectional buckets: half per direction, half of those exact; fewer than 4 leaves no exact bucket.
        if nb < 4 || cfg.relative_attention_max_distance <= nb / 4 {
            candle_core::bail!(
                "T5 config: relative_attention_num_buckets {nb} with relative_attention_max_distance {} cannot form T5's position buckets",
                cfg.relative_attention_max_distance
            );
        }
        if cfg.num_heads == 0 || cfg.d_kv == 0 || cfg.num_layers == 0 {
            candle_core::bail!("T5 config: {} heads of width {} in {} layers is no encoder", cfg.num_heads, cfg.d_kv, cfg.num_layers);
        }
        // F16 leaves no room for T5's activations on a GPU, where they run in the weights' dtype; on the CPU
        // they are F32 and F16 weights are fine.
        let vb = if vb.dtype() == DType::F16 && !vb.device().is_cpu() { vb.set_dtype(DType::BF16) } else { vb };
        let (d, inner, d_ff, eps) = (cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff, cfg.layer_norm_epsilon);
        // Same lookup order as candle-transformers' `T5EncoderModel::load`, so every loader's names still work.
        let shared_vb = if vb.contains_tensor("shared.weight") { vb.pp("shared") } else { vb.pp("encoder.embed_tokens") };
        let shared = shared_vb.get((cfg.vocab_size, d), "weight")?;
        let enc = vb.pp("encoder");
        let gated = cfg.feed_forward_proj.gated;
        let block = |i: usize| -> candle_core::Result<Block> {
            let l = enc.pp(format!("block.{i}.layer"));
            let a = l.pp("0.SelfAttention");
            let f = l.pp("1.DenseReluDense");
            let ff = if gated {
                FeedForward::Gated {
                    wi_0: ops::linear(f.pp("wi_0"), d, d_ff, false)?,
                    wi_1: ops::linear(f.pp("wi_1"), d, d_ff, false)?,
                    wo: ops::linear(f.pp("wo"), d_ff, d, false)?,
                }
            } else {
                FeedForward::Plain { wi: ops::linear(f.pp("wi"), d, d_ff, false)?, wo: ops::linear(f.pp("wo"), d_ff, d, false)? }
            };
            Ok(Block {
                attn_norm: RmsNorm::load(l.pp("0.layer_norm"), d, eps)?,
                q: ops::linear(a.pp("q"), d, inner, false)?,
                k: ops::linear(a.pp("k"), d, inner, false)?,
                v: ops::linear(a.pp("v"), d, inner, false)?,
                o: ops::linear(a.pp("o"), inner, d, false)?,
                ff_norm: RmsNorm::load(l.pp("1.layer_norm"), d, eps)?,
                ff,
            })
        };
        let relative_bias = enc
            .pp("block.0.layer.0.SelfAttention.relative_attention_bias")
            .get((nb, cfg.num_heads), "weight")?
            .to_dtype(DType::F32)?;
        let dtype = vb.dtype();
        let device = vb.device().clone();
        Ok(Self {
            shared,
            blocks: (0..cfg.num_layers).map(block).collect::<candle_core::Result<_>>()?,
            final_norm: RmsNorm::load(enc.pp("final_layer_norm"), d, eps)?,
            relative_bias,
            // transformers' gated-gelu is `gelu_new` (tanh approximation), candle's `NewGelu`; a plain
            // feed-forward uses its named activation (`relu` for the original T5).
            act: cfg.feed_forward_proj.activation,
            heads: cfg.num_heads,
            d_kv: cfg.d_kv,
            num_buckets: nb,
            max_distance: cfg.relative_attention_max_distance,
            act_dtype: if device.is_cpu() { DType::F32 } else { dtype },
            dtype,
            device,
        })
    }

    /// The device the weights are on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// dtype the weights are stored in (activations are F32 on the CPU whatever it is).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The last hidden state `[b, seq, d_model]` for token ids `[b, seq]` (F32 on the CPU, the weights' dtype
    /// on a GPU), with no attention mask.
    pub fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (b, len) = ids.dims2()?;
        if b == 0 || len == 0 {
            candle_core::bail!("T5 encoder: no tokens (ids of shape {:?})", ids.dims());
        }
        let ids = ids.to_dtype(DType::U32)?.to_device(&self.device)?.flatten_all()?;
        let vocab = self.shared.dim(0)?;
        let top = ids.max(0)?.to_scalar::<u32>()?;
        if top as usize >= vocab {
            candle_core::bail!("token id {top} is outside the T5 encoder's vocabulary of {vocab}; the tokenizer does not belong to it");
        }
        let d = self.shared.dim(1)?;
        // Only the gathered rows are widened, never the whole (vocab × d_model) table.
        let mut x = self.shared.index_select(&ids, 0)?.reshape((b, len, d))?.to_dtype(self.act_dtype)?;
        let bias = self.position_bias(len)?;
        for block in &self.blocks {
            x = self.block(block, &x, &bias)?;
        }
        self.final_norm.forward(&x)
    }

    /// One block on `x` `[b, len, d_model]` with the position bias `[1, heads, len, len]`.
    fn block(&self, l: &Block, x: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
        let (b, len, _) = x.dims3()?;
        let h = l.attn_norm.forward(x)?;
        let split = |t: Tensor| t.reshape((b, len, self.heads, self.d_kv))?.transpose(1, 2)?.contiguous();
        let q = split(l.q.forward(&h)?)?;
        let k = split(l.k.forward(&h)?)?;
        let v = split(l.v.forward(&h)?)?;
        // T5 scales neither q nor the scores (the scale is folded into its weights) and adds a position bias,
        // so `ops::attention*` (which scale by 1/√d) do not fit; len ≤ 512 keeps the scores small.
        let scores = q.matmul(&k.t()?)?.to_dtype(DType::F32)?.broadcast_add(bias)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        let a = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, len, self.heads * self.d_kv))?;
        let x = (x + l.o.forward(&a)?)?;
        let h = l.ff_norm.forward(&x)?;
        let y = match &l.ff {
            FeedForward::Gated { wi_0, wi_1, wo } => wo.forward(&(self.act.forward(&wi_0.forward(&h)?)? * wi_1.forward(&h)?)?)?,
            FeedForward::Plain { wi, wo } => wo.forward(&self.act.forward(&wi.forward(&h)?)?)?,
        };
        x + y
    }

    /// The relative position bias `[1, heads, len, len]` (F32) that every block adds to its scores.
    fn position_bias(&self, len: usize) -> candle_core::Result<Tensor> {
        let buckets = relative_buckets(len, self.num_buckets, self.max_distance);
        let buckets = Tensor::from_vec(buckets, len * len, &self.device)?;
        self.relative_bias.index_select(&buckets, 0)?.reshape((len, len, self.heads))?.permute((2, 0, 1))?.unsqueeze(0)?.contiguous()
    }
}

/// transformers' bidirectional `_relative_position_bucket` for every (query i, key j) of a `len`-token
/// sequence, row-major: half the buckets for keys after the query, exact distances up to a quarter of the
/// buckets, logarithmic up to `max_distance`, the last bucket beyond. Computed in f32 as candle-transformers
/// and transformers do, so the bucket edges fall where theirs do.
fn relative_buckets(len: usize, num_buckets: usize, max_distance: usize) -> Vec<u32> {
    let half = (num_buckets / 2) as u32;
    let max_exact = half / 2;
    let log_bucket = |dist: u32| -> u32 {
        let b = f32::log(dist as f32 / max_exact as f32, max_distance as f32 / max_exact as f32) * (half - max_exact) as f32;
        (max_exact + b as u32).min(half - 1)
    };
    let len = len as u32;
    (0..len)
        .flat_map(|i| {
            (0..len).map(move |j| {
                let dist = i.abs_diff(j);
                let bucket = if dist < max_exact { dist } else { log_bucket(dist) };
                if j > i {
                    bucket + half
                } else {
                    bucket
                }
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{DType, Device, Tensor};
    use candle_nn::VarBuilder;
    use candle_transformers::models::t5::{Config as T5Config, T5EncoderModel};

    use super::{relative_buckets, T5Encoder};

    const VOCAB: usize = 50;

    /// A tiny T5 config with odd sizes: d_model 24, 3 heads of width 8, d_ff 40, 2 layers.
    fn config(feed_forward_proj: &str, num_buckets: usize, max_distance: usize) -> T5Config {
        serde_json::from_value(serde_json::json!({
            "vocab_size": VOCAB, "d_model": 24, "d_kv": 8, "d_ff": 40, "num_layers": 2, "num_heads": 3,
            "relative_attention_num_buckets": num_buckets, "relative_attention_max_distance": max_distance,
            "dropout_rate": 0.0, "layer_norm_epsilon": 1e-6, "initializer_factor": 1.0,
            "feed_forward_proj": feed_forward_proj, "is_decoder": false, "is_encoder_decoder": true,
            "use_cache": false, "pad_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": false
        }))
        .expect("config")
    }

    /// Random F32 weights under transformers' names; `shared` names the embedding `shared.weight`, else
    /// `encoder.embed_tokens.weight`. Scaled so activations stay O(1), as in a trained model.
    fn weights(cfg: &T5Config, shared: bool, seed: u64) -> HashMap<String, Tensor> {
        // candle's CPU rng cannot be seeded: a xorshift and Box–Muller keep the weights the same every run.
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut uniform = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        let (d, inner, ff) = (cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff);
        let mut w = HashMap::new();
        let mut put = |name: String, dims: &[usize], std: f64, mean: f64| {
            let n: usize = dims.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|_| (mean + std * (-2.0 * uniform().ln()).sqrt() * (std::f64::consts::TAU * uniform()).cos()) as f32)
                .collect();
            w.insert(name, Tensor::from_vec(v, dims, &Device::Cpu).expect("weights"));
        };
        put(if shared { "shared.weight".into() } else { "encoder.embed_tokens.weight".into() }, &[VOCAB, d], 1.0, 0.0);
        put("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight".into(), &[cfg.relative_attention_num_buckets, cfg.num_heads], 1.0, 0.0);
        for i in 0..cfg.num_layers {
            let p = format!("encoder.block.{i}.layer");
            for n in ["q", "k", "v"] {
                put(format!("{p}.0.SelfAttention.{n}.weight"), &[inner, d], 1.0 / (d as f64).sqrt(), 0.0);
            }
            put(format!("{p}.0.SelfAttention.o.weight"), &[d, inner], 1.0 / (inner as f64).sqrt(), 0.0);
            put(format!("{p}.0.layer_norm.weight"), &[d], 0.2, 1.0);
            put(format!("{p}.1.layer_norm.weight"), &[d], 0.2, 1.0);
            let names: &[&str] = if cfg.feed_forward_proj.gated { &["wi_0", "wi_1"] } else { &["wi"] };
            for n in names {
                put(format!("{p}.1.DenseReluDense.{n}.weight"), &[ff, d], 1.0 / (d as f64).sqrt(), 0.0);
            }
            put(format!("{p}.1.DenseReluDense.wo.weight"), &[d, ff], 1.0 / (ff as f64).sqrt(), 0.0);
        }
        put("encoder.final_layer_norm.weight".into(), &[d], 0.2, 1.0);
        w
    }

    fn ids(b: usize, len: usize) -> Tensor {
        let v: Vec<u32> = (0..b * len).map(|i| ((i * 7 + 3) % VOCAB) as u32).collect();
        Tensor::from_vec(v, (b, len), &Device::Cpu).expect("ids")
    }

    fn ours(w: &HashMap<String, Tensor>, cfg: &T5Config, dtype: DType, ids: &Tensor) -> Tensor {
        let vb = VarBuilder::from_tensors(w.clone(), dtype, &Device::Cpu);
        T5Encoder::new(vb, cfg).expect("load").forward(ids).expect("forward")
    }

    fn candle(w: &HashMap<String, Tensor>, cfg: &T5Config, ids: &Tensor) -> Tensor {
        let vb = VarBuilder::from_tensors(w.clone(), DType::F32, &Device::Cpu);
        T5EncoderModel::load(vb, cfg).expect("load").forward(ids).expect("forward")
    }

    /// max |a − b| / max(1, max |b|).
    fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        let diff = (a - b).and_then(|d| d.abs()).and_then(|d| d.max_all()).and_then(|d| d.to_scalar::<f32>()).expect("diff");
        let scale = b.abs().and_then(|d| d.max_all()).and_then(|d| d.to_scalar::<f32>()).expect("max");
        diff / scale.max(1.0)
    }

    #[test]
    fn buckets_follow_transformers() {
        // T5-XXL's 32 buckets up to distance 128: exact below 8, keys after the query offset by 16.
        let b = relative_buckets(300, 32, 128);
        let at = |i: usize, j: usize| b[i * 300 + j];
        assert_eq!((at(0, 0), at(5, 0), at(0, 5), at(7, 0), at(0, 7)), (0, 5, 21, 7, 23));
        // transformers: 8 + int(log(d / 8) / log(128 / 8) · 8), capped at 15.
        assert_eq!((at(8, 0), at(12, 0), at(20, 0), at(0, 20), at(127, 0), at(299, 0), at(0, 299)), (8, 9, 10, 26, 15, 15, 31));
    }

    /// The same random F32 weights give candle-transformers' `T5EncoderModel`'s output, for gated-GELU and
    /// ReLU feed-forwards, both embedding names, short and long sequences (past the exact buckets and, with 8
    /// buckets up to distance 10, past the last one).
    #[test]
    fn matches_candle_transformers() {
        for (proj, nb, max_distance, shared) in [("gated-gelu", 32, 128, true), ("gated-gelu", 8, 10, false), ("relu", 32, 20, true)] {
            let cfg = config(proj, nb, max_distance);
            let w = weights(&cfg, shared, 7);
            for (b, len) in [(1, 7), (2, 19)] {
                let ids = ids(b, len);
                let (a, e) = (ours(&w, &cfg, DType::F32, &ids), candle(&w, &cfg, &ids));
                assert_eq!(a.dims(), [b, len, 24]);
                let d = rel_diff(&a, &e);
                assert!(d < 1e-5, "{proj} {nb}/{max_distance} seq {len}: {d:e} from candle-transformers");
            }
        }
    }

    /// BF16 weights give F32 activations: the output is F32, equals the F32 encoder on the same
    /// bf16-rounded weights to F32 rounding (an encoder computing in BF16 would be ~1e-2 away), and stays
    /// within BF16's weight rounding of the F32 weights' output.
    #[test]
    fn bf16_weights_compute_in_f32() {
        let cfg = config("gated-gelu", 32, 128);
        let w = weights(&cfg, true, 11);
        let rounded: HashMap<String, Tensor> = w
            .iter()
            .map(|(n, t)| (n.clone(), t.to_dtype(DType::BF16).and_then(|t| t.to_dtype(DType::F32)).expect("round")))
            .collect();
        for len in [7, 19] {
            let ids = ids(2, len);
            let f32_out = ours(&w, &cfg, DType::F32, &ids);
            let bf16_out = ours(&w, &cfg, DType::BF16, &ids);
            assert_eq!(bf16_out.dtype(), DType::F32);
            let same_weights = rel_diff(&bf16_out, &ours(&rounded, &cfg, DType::F32, &ids));
            assert!(same_weights < 1e-5, "seq {len}: {same_weights:e} from F32 on the same bf16 weights");
            let d = rel_diff(&bf16_out, &f32_out);
            assert!(d < 3e-2, "seq {len}: {d:e} from the F32 weights' output");
        }
    }

    /// Ids outside the vocabulary are an error, not a panic.
    #[test]
    fn refuses_ids_outside_the_vocabulary() {
        let cfg = config("gated-gelu", 32, 128);
        let t5 = T5Encoder::new(VarBuilder::from_tensors(weights(&cfg, true, 1), DType::F32, &Device::Cpu), &cfg).expect("load");
        let bad = Tensor::new(&[[1u32, VOCAB as u32]], &Device::Cpu).expect("ids");
        let err = t5.forward(&bad).expect_err("out of vocabulary").to_string();
        assert!(err.contains("vocabulary"), "{err}");
        assert!(T5Encoder::new(VarBuilder::from_tensors(weights(&cfg, true, 1), DType::F32, &Device::Cpu), &config("gated-gelu", 2, 128)).is_err());
    }
}
