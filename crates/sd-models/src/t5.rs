//! T5 encoder helpers shared by the families that condition on T5-XXL (FLUX.1, SD 3.x): the tokenizer
//! with transformers' padding rule, the encoder call, and the encoder's config read off tensor shapes for
//! checkpoints that carry no `config.json` (SD 3.x single files, ComfyUI's `t5xxl_*.safetensors`).
//!
//! The encoder itself is candle-transformers' `T5EncoderModel`, which is right for this use (the last
//! hidden state, no mask), so it is reused rather than rewritten.

use std::path::Path;

use candle_core::{DType, Tensor};
use candle_transformers::models::t5::{Config as T5Config, T5EncoderModel};
use tokenizers::{Tokenizer, TruncationDirection};

use crate::error::{Error, Result};

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
///
/// The encoder is cloned (tensors are shared) because candle's T5 takes `&mut self`.
pub fn embeddings(t5: &T5EncoderModel, ids: &Tensor, dtype: DType) -> Result<Tensor> {
    let mut t5 = t5.clone();
    let ids = ids.to_dtype(DType::U32)?.to_device(t5.device())?;
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
