//! The Qwen3 text encoder as `Flux2KleinPipeline` uses it: the prompt in Qwen3's chat template (one user
//! turn, generation prompt, `enable_thinking=False`, which appends an empty `<think>` block), tokenized,
//! truncated and right-padded with `<|endoftext|>` to `max_sequence_length` (512 by default), run with
//! the attention mask, and `hidden_states` 9, 18 and 27 concatenated per token (`[len, 3·hidden]`). The
//! padded positions are kept: the transformer attends to all `max_sequence_length` text tokens.

use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use sd_models::qwen3::{self, Qwen3Encoder};
use sd_models::split::Part;
use sd_models::single_file::innermost;
use tokenizers::Tokenizer;

use crate::error::{Error, Result};

/// The hidden states klein reads (`text_encoder_out_layers` of the pipeline).
pub const OUT_LAYERS: [usize; 3] = [9, 18, 27];

/// Loads the first `max(layers)` decoder layers of the Qwen3 encoder from a `text_encoder/` folder or a
/// stand-alone file (ComfyUI's `qwen_3_4b.safetensors`); `config` is a `config.json` describing a file
/// (without it the architecture is read off the shapes).
pub fn load_text_encoder(part: &Part, config: Option<&Path>, layers: &[usize], dtype: DType, device: &Device) -> Result<Qwen3Encoder> {
    let path = part.path();
    let (cfg, vb) = qwen3::text_encoder_part(path, config, dtype, device).map_err(|e| match e {
        sd_models::Error::NotFound { what, path } => {
            Error::NotFound { what, path, hint: "pass the text_encoder/ folder of a FLUX.2 [klein] repo (Qwen3-4B or Qwen3-8B) or qwen_3_4b.safetensors".into() }
        }
        sd_models::Error::InvalidSafetensors { path, reason } => Error::NotFlux2 { path, reason: format!("not a valid safetensors file ({reason}); re-download it, it may be truncated") },
        other => Error::Models(other),
    })?;
    let deepest = layers.iter().copied().max().unwrap_or(0);
    if deepest > cfg.num_hidden_layers {
        return Err(Error::InvalidConfig {
            path: path.to_path_buf(),
            reason: format!("FLUX.2 [klein] reads hidden state {deepest}, but this encoder has {} layers; use Qwen3-4B (klein 4B) or Qwen3-8B (klein 9B)", cfg.num_hidden_layers),
        });
    }
    Qwen3Encoder::new(&cfg, vb, deepest).map_err(|e| Error::BadWeights {
        source_desc: path.display().to_string(),
        reason: innermost(&e).to_string(),
        component: "Qwen3 text encoder",
    })
}

/// Loads `tokenizer.json` from a `tokenizer/` folder (or the file itself).
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    let file = if path.is_dir() { path.join("tokenizer.json") } else { path.to_path_buf() };
    if !file.is_file() {
        return Err(Error::NotFound { what: "tokenizer.json".into(), path: file, hint: "pass the tokenizer/ folder of a FLUX.2 [klein] repo".into() });
    }
    qwen3::load_tokenizer(&file).map_err(|e| Error::Tokenizer(e.to_string()))
}

/// The padded token ids (`max_len` of them) and the number of real ones, as the pipeline's tokenizer
/// call gives them (`padding="max_length"`, `truncation=True`).
pub fn input_ids(tokenizer: &Tokenizer, prompt: &str, max_len: usize) -> Result<(Vec<u32>, usize)> {
    let mut ids = qwen3::chat_input_ids(tokenizer, prompt, false, max_len).map_err(|e| Error::Tokenizer(e.to_string()))?;
    let valid = ids.len();
    if valid == 0 {
        return Err(Error::invalid("max_sequence_length", "leaves no prompt token; use a positive length"));
    }
    let pad = qwen3::pad_token_id(tokenizer).map_err(|e| Error::Tokenizer(e.to_string()))?;
    ids.resize(max_len, pad);
    Ok((ids, valid))
}

/// The prompt features `[max_len, 3·hidden]` of `prompt` (`Flux2KleinPipeline._get_qwen3_prompt_embeds`),
/// in the encoder's dtype.
pub fn encode_prompt(encoder: &Qwen3Encoder, tokenizer: &Tokenizer, prompt: &str, max_len: usize, layers: &[usize]) -> Result<Tensor> {
    let (ids, valid) = input_ids(tokenizer, prompt, max_len)?;
    let states = encoder.hidden_states(&ids, valid, layers)?;
    Ok(Tensor::cat(&states, D::Minus1)?)
}
