//! Prompt conditioning: CLIP-L and OpenCLIP-bigG (penultimate hidden states and projected pooled
//! outputs) and T5-XXL, combined as diffusers' `StableDiffusion3Pipeline.encode_prompt` does.
//!
//! The two CLIP sequences (77 tokens each) are concatenated along the width, zero-padded to T5's width,
//! and followed by T5's tokens; the pooled outputs are concatenated. Without T5 (diffusers allows
//! dropping it to save memory) its tokens are zeros.

use candle_core::{DType, Device, Tensor};
use sd_models::t5::T5Encoder;
use sd_models::clip::ClipTextModel;
use sd_models::config::{ClipActivation, ClipConfig};
use sd_models::tokenizer::ClipTokenizer;
use tokenizers::Tokenizer;

use crate::error::{Error, Result};

/// CLIP's context length.
pub const CLIP_MAX_LEN: usize = 77;

/// T5 sequence length of the SD 3.x pipelines by default.
pub const T5_DEFAULT_LEN: usize = 256;

/// Longest T5 sequence accepted.
pub const T5_MAX_LEN: usize = 512;

/// The three text encoders and their tokenizers.
#[derive(Debug, Clone)]
pub struct TextEncoders {
    /// CLIP-L with its projection (`text_encoder/`, `text_encoders.clip_l`).
    pub clip_l: ClipTextModel,
    /// OpenCLIP bigG with its projection (`text_encoder_2/`, `text_encoders.clip_g`).
    pub clip_g: ClipTextModel,
    /// T5-XXL (`text_encoder_3/`, `text_encoders.t5xxl`); `None` runs without it, as diffusers allows.
    pub t5: Option<T5Encoder>,
    /// CLIP-L's tokenizer.
    pub tokenizer_l: ClipTokenizer,
    /// CLIP-G's tokenizer (pads with `!`).
    pub tokenizer_g: ClipTokenizer,
    /// T5's tokenizer, when T5 is loaded.
    pub t5_tokenizer: Option<Tokenizer>,
}

/// The conditioning of one prompt, as the transformer takes it.
#[derive(Debug, Clone)]
pub struct PromptEmbeds {
    /// `[1, 77 + t5_len, joint_attention_dim]`: CLIP-L ‖ CLIP-G (zero-padded), then T5.
    pub context: Tensor,
    /// `[1, width_l + proj_g]`: CLIP-L's pooled output and CLIP-G's projected one.
    pub pooled: Tensor,
}

/// A CLIP text encoder's config read off a transformers-named state dict (`text_model.*`,
/// `text_projection.weight`), for files that carry no `config.json`. Heads are 64 wide and OpenCLIP
/// bigG (width 1280) uses exact GELU where OpenAI's CLIP-L uses quick GELU, as in SD 3.x's configs.
pub fn clip_config_from_shapes(shape: &dyn Fn(&str) -> Option<Vec<usize>>, names: &[&str], source: &str) -> Result<ClipConfig> {
    let bad = |reason: String| Error::BadWeights { source_desc: source.to_string(), reason };
    let tok = shape("text_model.embeddings.token_embedding.weight").ok_or_else(|| bad("no text_model.embeddings.token_embedding.weight (a CLIP text encoder with transformers names)".into()))?;
    let [vocab_size, hidden_size] = tok[..] else { return Err(bad(format!("token embedding of shape {tok:?}"))) };
    let pos = shape("text_model.embeddings.position_embedding.weight").ok_or_else(|| bad("no position embedding".into()))?;
    let layers = names
        .iter()
        .filter_map(|n| n.split("text_model.encoder.layers.").nth(1)?.split('.').next()?.parse::<usize>().ok())
        .max()
        .map_or(0, |m| m + 1);
    let fc1 = shape("text_model.encoder.layers.0.mlp.fc1.weight").ok_or_else(|| bad("no encoder layers".into()))?;
    Ok(ClipConfig {
        vocab_size,
        hidden_size,
        intermediate_size: fc1.first().copied().unwrap_or(0),
        num_hidden_layers: layers,
        num_attention_heads: (hidden_size / 64).max(1),
        max_position_embeddings: pos.first().copied().unwrap_or(CLIP_MAX_LEN),
        hidden_act: if hidden_size == 1280 { ClipActivation::Gelu } else { ClipActivation::QuickGelu },
        layer_norm_eps: 1e-5,
        projection_dim: shape("text_projection.weight").and_then(|s| s.first().copied()),
        eos_token_id: 2,
    })
}

/// One CLIP encoder's `(hidden states of layer −(2 + skip), pooled output)` for `prompt`; the pooled output
/// goes through the encoder's `text_projection` when `projected`.
///
/// SD 3.x reads CLIP-L's pooled output unprojected (Stability's and ComfyUI's `return_projected_pooled=False`;
/// the diffusers repos store an identity projection for it, and the `clip_l.safetensors` files people share
/// carry SD 1.x's real one, which must not apply), and CLIP-G's projected.
fn clip_embeds(clip: &ClipTextModel, tok: &ClipTokenizer, prompt: &str, skip: usize, projected: bool, device: &Device) -> Result<(Tensor, Tensor)> {
    let ids = tok.encode_padded(prompt, CLIP_MAX_LEN)?;
    let ids = Tensor::from_vec(ids, (1, CLIP_MAX_LEN), device)?;
    let out = clip.forward(&ids)?;
    let pooled = if projected {
        out.text_embeds.clone().ok_or_else(|| Error::BadWeights {
            source_desc: "CLIP-G".into(),
            reason: "the text encoder has no text_projection, which SD 3.x needs for OpenCLIP bigG".into(),
        })?
    } else {
        out.pooled.clone()
    };
    Ok((out.hidden(1 + skip)?.clone(), pooled))
}

/// Encodes `prompt` (each encoder reads it whole; CLIP truncates at 77 tokens, T5 at
/// `max_sequence_length`) into `dtype` tensors on `device`.
///
/// `clip_skip` follows A1111 as for SDXL: 0 or 1 is diffusers' default (the penultimate layer), each step
/// above goes one layer further back.
pub fn encode_prompt(
    enc: &TextEncoders,
    prompt: &str,
    clip_skip: usize,
    max_sequence_length: usize,
    joint_attention_dim: usize,
    dtype: DType,
) -> Result<PromptEmbeds> {
    if max_sequence_length == 0 || max_sequence_length > T5_MAX_LEN {
        return Err(Error::invalid("max_sequence_length", format!("{max_sequence_length} is outside 1..={T5_MAX_LEN}")));
    }
    let skip = clip_skip.saturating_sub(1);
    let device = enc.clip_l.device().clone();
    let (l, pooled_l) = clip_embeds(&enc.clip_l, &enc.tokenizer_l, prompt, skip, false, &device)?;
    let (g, pooled_g) = clip_embeds(&enc.clip_g, &enc.tokenizer_g, prompt, skip, true, &device)?;
    let clip = Tensor::cat(&[l.to_dtype(DType::F32)?, g.to_dtype(DType::F32)?], 2)?;
    let width = clip.dim(2)?;
    if width > joint_attention_dim {
        return Err(Error::BadWeights {
            source_desc: "text encoders".into(),
            reason: format!("CLIP-L and CLIP-G are {width} wide together, wider than the transformer's {joint_attention_dim}-wide text input; are they this model's encoders?"),
        });
    }
    let clip = clip.pad_with_zeros(2, 0, joint_attention_dim - width)?;
    let t5 = match (&enc.t5, &enc.t5_tokenizer) {
        (Some(t5), Some(tok)) => {
            let ids = sd_models::t5::input_ids(tok, prompt, max_sequence_length)?;
            let ids = Tensor::from_vec(ids, (1, max_sequence_length), &device)?;
            let e = sd_models::t5::embeddings(t5, &ids, DType::F32)?;
            if e.dim(2)? != joint_attention_dim {
                return Err(Error::BadWeights {
                    source_desc: "T5 text encoder".into(),
                    reason: format!("it is {} wide but the transformer takes {joint_attention_dim}", e.dim(2)?),
                });
            }
            e
        }
        _ => Tensor::zeros((1, max_sequence_length, joint_attention_dim), DType::F32, &device)?,
    };
    let context = Tensor::cat(&[clip, t5], 1)?.to_dtype(dtype)?;
    let pooled = Tensor::cat(&[pooled_l.to_dtype(DType::F32)?, pooled_g.to_dtype(DType::F32)?], 1)?.to_dtype(dtype)?;
    Ok(PromptEmbeds { context, pooled })
}
