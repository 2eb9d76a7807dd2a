//! The Qwen3 text encoder as `ZImagePipeline` uses it: the prompt wrapped in Qwen3's chat template
//! (one user turn, generation prompt, thinking enabled — which adds nothing), tokenized, and the
//! second-to-last hidden state (`hidden_states[-2]`: the output of the second-to-last decoder layer,
//! before the final norm) of the real tokens only.
//!
//! The encoder itself is sd-models' shared [`sd_models::qwen3::Qwen3Encoder`] (re-exported here), loaded
//! with all but its last layer. diffusers pads to `max_sequence_length` on the right and passes the
//! attention mask; with causal attention the real tokens never see right padding, so the kept rows are the
//! same (checked by `tools/zimage_fixtures.py`).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use sd_models::single_file::innermost;
use tokenizers::Tokenizer;

use crate::error::{Error, Result};

pub use sd_models::qwen3::Qwen3Encoder;

/// The prompt as Qwen3's chat template renders one user turn with `add_generation_prompt=True` and
/// `enable_thinking=True` (what `ZImagePipeline._encode_prompt` asks for).
pub fn chat_prompt(prompt: &str) -> String {
    sd_models::qwen3::chat_prompt(prompt, true)
}

/// Loads the encoder (all but its last layer) from a `text_encoder/` folder (`config.json` and
/// safetensors weights, named as `Qwen3Model` or, under `model.`, as `Qwen3ForCausalLM` saves them) or a
/// stand-alone file (ComfyUI's `text_encoders/qwen_3_4b.safetensors`, its architecture read off the shapes).
pub fn load_text_encoder(path: &Path, dtype: DType, device: &Device) -> Result<Qwen3Encoder> {
    let (cfg, vb) = sd_models::qwen3::text_encoder_part(path, None, dtype, device).map_err(|e| match e {
        sd_models::Error::NotFound { what, path } => {
            Error::NotFound { what, path, hint: "pass the text_encoder/ folder of a Z-Image repo (Qwen3-4B) or qwen_3_4b.safetensors".into() }
        }
        sd_models::Error::InvalidSafetensors { path, reason } => Error::NotZImage { path, reason: format!("not a valid safetensors file ({reason}); re-download it, it may be truncated") },
        other => Error::Models(other),
    })?;
    if cfg.num_hidden_layers < 2 {
        return Err(Error::InvalidConfig {
            path: path.to_path_buf(),
            reason: "Z-Image reads the second-to-last hidden state, so the encoder needs at least 2 layers".into(),
        });
    }
    Qwen3Encoder::new(&cfg, vb, cfg.num_hidden_layers - 1).map_err(|e| Error::BadWeights {
        source_desc: path.display().to_string(),
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
    sd_models::qwen3::load_tokenizer(&file).map_err(|e| Error::Tokenizer(e.to_string()))
}

/// The token ids of `prompt` as the pipeline feeds them: the chat template applied, tokenized, truncated
/// to `max_len` (padding is not needed, see the module docs).
pub fn input_ids(tokenizer: &Tokenizer, prompt: &str, max_len: usize) -> Result<Vec<u32>> {
    sd_models::qwen3::chat_input_ids(tokenizer, prompt, true, max_len).map_err(|e| Error::Tokenizer(e.to_string()))
}

/// The caption features `[len, hidden]` of `prompt` (`ZImagePipeline._encode_prompt`), in the encoder's dtype.
pub fn encode_prompt(encoder: &Qwen3Encoder, tokenizer: &Tokenizer, prompt: &str, max_len: usize) -> Result<Tensor> {
    let ids = input_ids(tokenizer, prompt, max_len)?;
    if ids.is_empty() {
        return Err(Error::invalid("max_sequence_length", "leaves no prompt token; use a positive length"));
    }
    Ok(encoder.encode(&ids)?)
}
