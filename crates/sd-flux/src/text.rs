//! Prompt conditioning: T5-XXL token embeddings and CLIP-L's pooled output.
//!
//! As in diffusers' `FluxPipeline.encode_prompt`: T5 gets the prompt padded with its pad token to
//! exactly `max_sequence_length` ids (truncated, end-of-sequence kept) and no attention mask; CLIP
//! gets the usual 77 tokens and contributes only its pooled (end-of-text) output.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::t5::Config as T5Config;
use sd_models::clip::ClipTextModel;
use sd_models::t5::T5Encoder;
use sd_models::tokenizer::ClipTokenizer;
use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::transformer::mmap;
use sd_models::single_file::innermost;
use sd_models::weights::MappedWeights;

/// Where to get the T5 encoder when it is missing.
const T5_HINT: &str = "FLUX needs the T5-XXL encoder: download text_encoder_2/ (config.json and model*.safetensors, \
                       with model.safetensors.index.json when sharded) and tokenizer_2/ (tokenizer.json) from \
                       black-forest-labs/FLUX.1-schnell (or FLUX.1-dev) and pass their paths";

/// CLIP's context length.
pub const CLIP_MAX_LEN: usize = 77;

/// Longest T5 sequence FLUX accepts (diffusers rejects more).
pub const T5_MAX_LEN: usize = 512;

/// Loads the T5 encoder from a transformers `text_encoder_2/` folder (`config.json` +
/// `model.safetensors` or shards listed in `model.safetensors.index.json`).
///
/// F16 is replaced by BF16: T5's activations overflow in F16. BF16 weights stay BF16 on the CPU too (the
/// encoder multiplies them panel by panel into F32 activations), F32 stays F32.
pub fn load_t5(dir: &Path, dtype: DType, device: &Device) -> Result<T5Encoder> {
    let cfg_path = dir.join("config.json");
    if !dir.is_dir() {
        return Err(Error::NotFound { what: "T5 text encoder folder (text_encoder_2/)".into(), path: dir.to_path_buf(), hint: T5_HINT.into() });
    }
    if !cfg_path.is_file() {
        return Err(Error::NotFound { what: "T5 config".into(), path: cfg_path, hint: T5_HINT.into() });
    }
    let text = std::fs::read_to_string(&cfg_path).map_err(|source| Error::Io { path: cfg_path.clone(), source })?;
    let cfg: T5Config = serde_json::from_str(&text).map_err(|e| Error::InvalidConfig {
        path: cfg_path.clone(),
        reason: format!("{e}; expected a transformers T5 config (d_model, d_kv, num_heads, feed_forward_proj, …)"),
    })?;
    let files = sd_models::diffusers::find_weight_files(dir, false).map_err(|e| match e {
        sd_models::Error::NotFound { what, path } => Error::NotFound { what, path, hint: T5_HINT.into() },
        other => Error::Models(other),
    })?;
    let st = mmap(&files, dir)?;
    let dtype = if dtype == DType::F16 { DType::BF16 } else { dtype };
    let vb = VarBuilder::from_backend(Box::new(MappedWeights::new(st)), dtype, device.clone());
    T5Encoder::new(vb, &cfg).map_err(|e| Error::BadWeights {
        source_desc: dir.display().to_string(),
        reason: format!("T5 encoder: {}", innermost(&e)),
    })
}

/// Loads the T5 tokenizer from a `tokenizer_2/` folder or a `tokenizer.json` file.
pub fn load_t5_tokenizer(path: &Path) -> Result<Tokenizer> {
    sd_models::t5::load_tokenizer(path).map_err(|e| match e {
        sd_models::Error::NotFound { path, .. } => {
            Error::NotFound { what: "T5 tokenizer (tokenizer_2/tokenizer.json)".into(), path, hint: T5_HINT.into() }
        }
        sd_models::Error::Tokenizer(m) => Error::Tokenizer(m),
        other => Error::Models(other),
    })
}

/// Exactly `max_len` T5 ids for `prompt` (transformers' `padding="max_length", truncation=True`).
pub fn t5_input_ids(tok: &Tokenizer, prompt: &str, max_len: usize) -> Result<Vec<u32>> {
    sd_models::t5::input_ids(tok, prompt, max_len).map_err(|e| match e {
        sd_models::Error::Tokenizer(m) => Error::Tokenizer(m),
        other => Error::Models(other),
    })
}

/// Runs T5 on ids `[b, seq]` and returns the last hidden state `[b, seq, d_model]` as `dtype`.
pub fn t5_embeddings(t5: &T5Encoder, ids: &Tensor, dtype: DType) -> Result<Tensor> {
    Ok(sd_models::t5::embeddings(t5, ids, dtype)?)
}

/// CLIP's pooled output `[b, hidden]` for ids `[b, 77]`, as `dtype`.
pub fn clip_pooled(clip: &ClipTextModel, ids: &Tensor, dtype: DType) -> Result<Tensor> {
    Ok(clip.forward(ids)?.pooled.to_dtype(dtype)?)
}

/// Loads CLIP-L from a transformers `text_encoder/` folder.
pub fn load_clip(dir: &Path, dtype: DType, device: &Device) -> Result<ClipTextModel> {
    let cfg_path = dir.join("config.json");
    if !cfg_path.is_file() {
        return Err(Error::NotFound {
            what: "CLIP text encoder config (text_encoder/config.json)".into(),
            path: cfg_path,
            hint: "FLUX needs CLIP-L: download text_encoder/ and tokenizer/ from black-forest-labs/FLUX.1-schnell".into(),
        });
    }
    let cfg = sd_models::diffusers::read_clip_config(&cfg_path)?;
    let files = sd_models::diffusers::find_weight_files(dir, false)?;
    let st = mmap(&files, dir)?;
    let vb = VarBuilder::from_backend(Box::new(MappedWeights::new(st)), dtype, device.clone());
    ClipTextModel::new(vb, &cfg).map_err(|e| Error::BadWeights {
        source_desc: dir.display().to_string(),
        reason: format!("CLIP text encoder: {}", innermost(&e)),
    })
}

/// Loads the CLIP tokenizer from a `tokenizer/` folder.
pub fn load_clip_tokenizer(dir: &Path) -> Result<ClipTokenizer> {
    Ok(ClipTokenizer::from_folder(dir)?)
}

/// The conditioning of one prompt, as the transformer takes it.
#[derive(Debug, Clone)]
pub struct PromptEmbeds {
    /// T5 embeddings `[1, max_sequence_length, 4096]`.
    pub prompt_embeds: Tensor,
    /// Pooled CLIP output `[1, 768]`.
    pub pooled: Tensor,
    /// Text position ids `[max_sequence_length, 3]`, all zero as in diffusers.
    pub text_ids: Tensor,
}

/// Encodes `prompt` with both text encoders into `dtype` tensors on `device`.
#[allow(clippy::too_many_arguments)]
pub fn encode_prompt(
    t5: &T5Encoder,
    t5_tokenizer: &Tokenizer,
    clip: &ClipTextModel,
    clip_tokenizer: &ClipTokenizer,
    prompt: &str,
    max_sequence_length: usize,
    dtype: DType,
    device: &Device,
) -> Result<PromptEmbeds> {
    if max_sequence_length == 0 || max_sequence_length > T5_MAX_LEN {
        return Err(Error::invalid("max_sequence_length", format!("{max_sequence_length} is outside 1..={T5_MAX_LEN}")));
    }
    let ids = t5_input_ids(t5_tokenizer, prompt, max_sequence_length)?;
    let ids = Tensor::from_vec(ids, (1, max_sequence_length), device)?;
    let prompt_embeds = t5_embeddings(t5, &ids, dtype)?;
    let clip_ids = clip_tokenizer.encode_padded(prompt, CLIP_MAX_LEN)?;
    let clip_ids = Tensor::from_vec(clip_ids, (1, CLIP_MAX_LEN), device)?;
    let pooled = clip_pooled(clip, &clip_ids, dtype)?;
    let text_ids = Tensor::zeros((max_sequence_length, 3), dtype, device)?;
    Ok(PromptEmbeds { prompt_embeds, pooled, text_ids })
}
