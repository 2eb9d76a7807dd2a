//! Prompt → text conditioning for every SD family: A1111 weights and 75-token chunks, clip skip,
//! SDXL's two encoders with pooled embeddings and size/crop time ids.

use candle_core::{DType, Device, Tensor, D};
use sd_models::clip::ClipTextModel;
use sd_models::loader::StableDiffusionModels;
use sd_models::tokenizer::ClipTokenizer;
use sd_models::ModelFamily;

use crate::error::{Error, Result};
use crate::prompt::{chunk_tokens_with_embeddings, parse_prompt_attention, EmbeddingMatch, SpecialTokens, TokenChunk, MAX_PROMPT_CHUNKS};
use sd_models::embeddings::TextualInversion;

/// Text conditioning for one prompt (or a negative prompt), before batching.
#[derive(Debug, Clone)]
pub struct PromptEmbeds {
    /// `[1, 77·chunks, context_dim]` token embeddings for the UNet's cross-attention.
    pub context: Tensor,
    /// SDXL: pooled, projected embedding of the second encoder `[1, proj_dim]`.
    pub pooled: Option<Tensor>,
}

/// Conditioning for a classifier-free-guided (or unguided) batch, ready for the UNet.
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// `[k·batch, seq, ctx]` with the negative half first when guided (diffusers' order).
    pub context: Tensor,
    /// SDXL: `[k·batch, pooled_dim]`.
    pub text_embeds: Option<Tensor>,
    /// SDXL: `[k·batch, 6]` (original size, crop top-left, target size).
    pub time_ids: Option<Tensor>,
}

fn specials(tok: &ClipTokenizer) -> Result<SpecialTokens> {
    let comma = tok.encode(",").map_err(Error::Model)?;
    // encode() wraps the text in bos/eos; a single-token comma sits between them.
    let comma = if comma.len() == 3 { Some(comma[1]) } else { None };
    Ok(SpecialTokens { bos: tok.bos_id(), eos: tok.eos_id(), pad: tok.pad_id(), comma })
}

/// Parses a prompt's A1111 syntax and tokenizes it into `max_len`-token chunks with per-token weights,
/// exactly as [`encode_prompt`] feeds them to a text encoder (without textual-inversion embeddings).
pub fn prompt_chunks(tok: &ClipTokenizer, prompt: &str, max_len: usize) -> Result<Vec<TokenChunk>> {
    prompt_chunks_with_embeddings(tok, prompt, max_len, &[])
}

/// [`prompt_chunks`] where the names of `embeddings` in the prompt become their vectors' placeholders
/// (A1111's matching: by the name's tokens, longest name first, so case does not matter).
pub fn prompt_chunks_with_embeddings(tok: &ClipTokenizer, prompt: &str, max_len: usize, embeddings: &[TextualInversion]) -> Result<Vec<TokenChunk>> {
    let parts = parse_prompt_attention(prompt)?;
    let special = specials(tok)?;
    let strip = |ids: Vec<u32>| ids.get(1..ids.len().saturating_sub(1)).map(<[u32]>::to_vec).unwrap_or_default();
    let mut names: Vec<(Vec<u32>, usize, usize)> = Vec::with_capacity(embeddings.len());
    for (i, e) in embeddings.iter().enumerate() {
        let ids = strip(tok.encode(&e.name).map_err(Error::Model)?);
        if !ids.is_empty() {
            names.push((ids, i, e.len()));
        }
    }
    names.sort_by_key(|n| std::cmp::Reverse(n.0.len()));
    let find = |tokens: &[u32], pos: usize| {
        names.iter().find(|(ids, _, _)| tokens[pos..].starts_with(ids)).map(|(ids, i, n)| EmbeddingMatch { embedding: *i, name_tokens: ids.len(), vectors: *n })
    };
    let chunks = chunk_tokens_with_embeddings(&parts, max_len, special, |text| Ok::<_, Error>(strip(tok.encode(text).map_err(Error::Model)?)), find)?;
    if chunks.len() > MAX_PROMPT_CHUNKS {
        return Err(Error::invalid("prompt", format!("the prompt encodes into {} chunks of 75 tokens; at most {MAX_PROMPT_CHUNKS}", chunks.len())));
    }
    Ok(chunks)
}

/// The indices (in `models.embeddings`) of the embeddings `prompt` names, in order of first use.
pub fn embeddings_used(models: &StableDiffusionModels, prompt: &str) -> Result<Vec<usize>> {
    if models.embeddings.is_empty() {
        return Ok(Vec::new());
    }
    let chunks = prompt_chunks_with_embeddings(&models.tokenizer, prompt, models.config.text_encoder.max_position_embeddings, &models.embeddings)?;
    let mut used = Vec::new();
    for f in chunks.iter().flat_map(|c| &c.fixes) {
        if !used.contains(&f.embedding) {
            used.push(f.embedding);
        }
    }
    Ok(used)
}

/// Which hidden state an encoder contributes.
#[derive(Debug, Clone, Copy)]
enum Layer {
    /// `final_layer_norm(hidden(skip))` (SD 1.x/2.x; skip 0 is `last_hidden_state`).
    Normed(usize),
    /// `hidden(skip)` without the final LayerNorm (SDXL, which uses the penultimate layer: skip 1).
    Raw(usize),
}

/// Runs one encoder over the chunks; returns `[1, 77·chunks, hidden]` and the first chunk's pooled
/// projection (A1111 and diffusers both pool from the first window).
fn encode_chunks(enc: &ClipTextModel, chunks: &[TokenChunk], layer: Layer, device: &Device, vectors: &[Option<&Tensor>]) -> Result<(Tensor, Option<Tensor>)> {
    let mut outs = Vec::with_capacity(chunks.len());
    let mut pooled = None;
    for (i, chunk) in chunks.iter().enumerate() {
        let ids = Tensor::new(chunk.ids.as_slice(), device)?.unsqueeze(0)?;
        let fixes = chunk
            .fixes
            .iter()
            .map(|f| vectors.get(f.embedding).copied().flatten().map(|v| (f.position, v.clone())).ok_or_else(|| Error::invalid("prompt", "an embedding the prompt names is missing")))
            .collect::<Result<Vec<_>>>()?;
        let out = enc.forward_with_vectors(&ids, &fixes)?;
        let z = match layer {
            Layer::Normed(0) => out.last_hidden_state.clone(),
            Layer::Normed(skip) => enc.final_layer_norm(out.hidden(skip).map_err(Error::Model)?)?,
            Layer::Raw(skip) => out.hidden(skip).map_err(Error::Model)?.clone(),
        };
        let z = apply_weights(&z, &chunk.weights)?;
        if i == 0 {
            pooled = out.text_embeds.clone();
        }
        outs.push(z);
    }
    Ok((Tensor::cat(&outs, 1)?, pooled))
}

/// A1111's emphasis: scale each token's embedding by its weight, then restore the original mean so
/// weights change the direction of the conditioning rather than its overall magnitude.
fn apply_weights(z: &Tensor, weights: &[f32]) -> Result<Tensor> {
    if weights.iter().all(|&w| w == 1.0) {
        return Ok(z.clone());
    }
    let dtype = z.dtype();
    let z32 = z.to_dtype(DType::F32)?;
    let original_mean = z32.mean_all()?.to_scalar::<f32>()?;
    let w = Tensor::new(weights, z.device())?.reshape((1, weights.len(), 1))?;
    let weighted = z32.broadcast_mul(&w)?;
    let new_mean = weighted.mean_all()?.to_scalar::<f32>()?;
    let ratio = if new_mean != 0.0 { original_mean / new_mean } else { 1.0 };
    Ok((weighted * ratio as f64)?.to_dtype(dtype)?)
}

/// Encodes one prompt with the model's text encoder(s).
///
/// `clip_skip` follows A1111: 1 (or 0) uses the last layer, 2 the penultimate, and so on; SDXL
/// always starts from its penultimate layer, as it was trained.
pub fn encode_prompt(models: &StableDiffusionModels, prompt: &str, clip_skip: usize) -> Result<PromptEmbeds> {
    let skip = clip_skip.saturating_sub(1);
    let device = &models.device;
    let max_len = models.config.text_encoder.max_position_embeddings;
    match models.config.variant.family() {
        ModelFamily::Sd1 | ModelFamily::Sd2 => {
            let chunks = prompt_chunks_with_embeddings(&models.tokenizer, prompt, max_len, &models.embeddings)?;
            let (context, _) = encode_chunks(&models.text_encoder, &chunks, Layer::Normed(skip), device, &encoder_vectors(models, 0))?;
            Ok(PromptEmbeds { context, pooled: None })
        }
        ModelFamily::Flux => Err(Error::invalid("model", "FLUX models are conditioned by T5 + CLIP in sd-flux; run them with sd_flux::pipeline")),
        ModelFamily::Sd3 => Err(Error::invalid("model", "SD 3.x models are conditioned by CLIP-L + CLIP-G + T5 in sd-sd3; run them with sd_sd3::pipeline")),
        ModelFamily::ZImage => Err(Error::invalid("model", "Z-Image models are conditioned by Qwen3 in sd-zimage; run them with sd_zimage::pipeline")),
        ModelFamily::Flux2 => Err(Error::invalid("model", "FLUX.2 models are conditioned by Qwen3 in sd-flux2; run them with sd_flux2::pipeline")),
        ModelFamily::Sdxl => {
            let (enc2, tok2) = match (&models.text_encoder_2, &models.tokenizer_2) {
                (Some(e), Some(t)) => (e, t),
                _ => return Err(Error::invalid("model", "an SDXL model needs its second text encoder and tokenizer")),
            };
            let c1 = prompt_chunks_with_embeddings(&models.tokenizer, prompt, max_len, &models.embeddings)?;
            let c2 = prompt_chunks_with_embeddings(tok2, prompt, max_len, &models.embeddings)?;
            let (e1, _) = encode_chunks(&models.text_encoder, &c1, Layer::Raw(1 + skip), device, &encoder_vectors(models, 0))?;
            // Pooled at end-of-text as A1111 does (placeholders are id 0), not at diffusers' argmax.
            let (e2, pooled) = encode_chunks(enc2, &c2, Layer::Raw(1 + skip), device, &encoder_vectors(models, 1))?;
            // The two tokenizers can split a long prompt into different chunk counts only through
            // their padding token, which never changes the content; guard anyway.
            let (e1, e2) = equalize(e1, e2)?;
            let context = Tensor::cat(&[&e1, &e2.to_dtype(e1.dtype())?], D::Minus1)?;
            Ok(PromptEmbeds { context, pooled })
        }
    }
}

/// Every embedding's vectors for text encoder `index` (in the order of `models.embeddings`).
fn encoder_vectors(models: &StableDiffusionModels, index: usize) -> Vec<Option<&Tensor>> {
    models.embeddings.iter().map(|e| e.vectors.get(index)).collect()
}

fn equalize(a: Tensor, b: Tensor) -> Result<(Tensor, Tensor)> {
    let (la, lb) = (a.dim(1)?, b.dim(1)?);
    if la == lb {
        return Ok((a, b));
    }
    let n = la.min(lb);
    Ok((a.narrow(1, 0, n)?, b.narrow(1, 0, n)?))
}

/// Pads the shorter of two chunked embeddings with the encoding of an empty prompt, as A1111 does,
/// so positive and negative can share a batch.
fn pad_to(models: &StableDiffusionModels, e: PromptEmbeds, len: usize, clip_skip: usize) -> Result<PromptEmbeds> {
    let cur = e.context.dim(1)?;
    if cur >= len {
        return Ok(e);
    }
    let empty = encode_prompt(models, "", clip_skip)?.context;
    let chunk = empty.dim(1)?;
    let mut parts = vec![e.context.clone()];
    let mut have = cur;
    while have < len {
        parts.push(empty.clone());
        have += chunk;
    }
    Ok(PromptEmbeds { context: Tensor::cat(&parts, 1)?, pooled: e.pooled })
}

/// Builds the UNet conditioning for a batch: positive (and, with guidance, negative) prompt
/// embeddings repeated `batch` times, SDXL pooled embeddings and time ids.
///
/// SDXL with an empty negative prompt uses zero embeddings, as diffusers'
/// `force_zeros_for_empty_prompt` does for the SDXL base model.
pub fn build_conditioning(
    models: &StableDiffusionModels,
    prompt: &str,
    negative: &str,
    clip_skip: usize,
    guided: bool,
    batch: usize,
    size: (usize, usize),
) -> Result<Conditioning> {
    conditioning_for(models, &[prompt], negative, negative.is_empty(), clip_skip, guided, batch, size)
}

/// [`build_conditioning`] for one or more positive prompts (A1111's composable diffusion: the batch is the
/// negative then each prompt in turn, all padded to one length), where `zero_negative` says whether SDXL's
/// negative half is zeros (an empty negative prompt; with prompt editing, one that is empty at every step,
/// as A1111 decides it).
#[allow(clippy::too_many_arguments)]
pub(crate) fn conditioning_for(
    models: &StableDiffusionModels,
    prompts: &[&str],
    negative: &str,
    zero_negative: bool,
    clip_skip: usize,
    guided: bool,
    batch: usize,
    (height, width): (usize, usize),
) -> Result<Conditioning> {
    let sdxl = models.config.variant.family() == ModelFamily::Sdxl;
    let positives = prompts.iter().map(|p| encode_prompt(models, p, clip_skip)).collect::<Result<Vec<_>>>()?;
    let pos = positives.first().ok_or(Error::invalid("prompt", "no prompt to encode"))?;
    let mut halves = Vec::new();
    let mut len = 0;
    for p in &positives {
        len = len.max(p.context.dim(1)?);
    }
    if guided {
        // SDXL with an empty negative prompt gets zero embeddings (built below at the final length).
        let neg = if sdxl && zero_negative {
            None
        } else {
            let neg = encode_prompt(models, negative, clip_skip)?;
            len = len.max(neg.context.dim(1)?);
            Some(pad_to(models, neg, len, clip_skip)?)
        };
        let neg = match neg {
            Some(neg) => neg,
            None => PromptEmbeds {
                context: Tensor::zeros((1, len, pos.context.dim(2)?), pos.context.dtype(), pos.context.device())?,
                pooled: pos.pooled.as_ref().map(|p| p.zeros_like()).transpose()?,
            },
        };
        halves.push(neg);
    }
    for pos in positives {
        halves.push(pad_to(models, pos, len, clip_skip)?);
    }

    let repeat = |t: &Tensor| -> Result<Tensor> {
        let mut dims = vec![1usize; t.rank()];
        dims[0] = batch;
        Ok(t.repeat(dims.as_slice())?)
    };
    let dtype = models.dtype;
    let context = Tensor::cat(&halves.iter().map(|h| repeat(&h.context)).collect::<Result<Vec<_>>>()?, 0)?.to_dtype(dtype)?;
    let (text_embeds, time_ids) = if sdxl {
        let pooled = halves
            .iter()
            .map(|h| {
                h.pooled.as_ref().ok_or(Error::invalid("model", "SDXL's second text encoder has no text_projection"))
            })
            .map(|p| p.and_then(repeat))
            .collect::<Result<Vec<_>>>()?;
        let text_embeds = Tensor::cat(&pooled, 0)?.to_dtype(dtype)?;
        let (h, w) = (height as f32, width as f32);
        let ids = [h, w, 0.0, 0.0, h, w];
        let rows = halves.len() * batch;
        let time_ids = Tensor::new(&ids, &models.device)?.unsqueeze(0)?.repeat((rows, 1))?.to_dtype(dtype)?;
        (Some(text_embeds), Some(time_ids))
    } else {
        (None, None)
    };
    Ok(Conditioning { context, text_embeds, time_ids })
}
