//! Textual-inversion embeddings as civitai and A1111 ship them: named vectors that stand in for a word
//! of the prompt.
//!
//! Formats: A1111 `.pt` (`string_to_param: {"*": [n, d]}`), its `.safetensors` (`emb_params`), SDXL
//! safetensors (`clip_l` `[n, 768]` and `clip_g` `[n, 1280]`), and diffusers' `learned_embeds` (one
//! tensor named after its token, `.bin` or `.safetensors`). The name is the file's stem, matched in
//! prompts as A1111 does (by its CLIP tokens, so case does not matter) and expanded to all its vectors.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::variant::{ModelConfig, ModelFamily};

/// Most vectors one embedding may have (one 77-token window holds 75).
pub const MAX_VECTORS: usize = 75;

/// A textual-inversion embedding for one model: its name and, per text encoder, `[vectors, width]`.
#[derive(Debug, Clone)]
pub struct TextualInversion {
    /// The name prompts use (the file stem).
    pub name: String,
    /// The file it came from.
    pub path: PathBuf,
    /// One `[vectors, width]` tensor per text encoder of the model (SDXL: CLIP-L then OpenCLIP-G), F32.
    pub vectors: Vec<Tensor>,
}

impl TextualInversion {
    /// How many prompt positions the embedding fills.
    pub fn len(&self) -> usize {
        self.vectors.first().and_then(|v| v.dim(0).ok()).unwrap_or(0)
    }

    /// Whether it has no vectors (never true for a loaded embedding).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Loads the embedding at `path` for a model with config `cfg`, checking that its widths fit the
    /// model's text encoders.
    pub fn load(path: &Path, cfg: &ModelConfig) -> Result<Self> {
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| invalid(path, "the file has no name to use in prompts".into()))?;
        let tensors = read_tensors(path)?;
        let width1 = cfg.text_encoder.hidden_size;
        let vectors = match cfg.variant.family() {
            ModelFamily::Sdxl => {
                let width2 = cfg.text_encoder_2.as_ref().map(|c| c.hidden_size).unwrap_or(1280);
                let get = |key: &str| tensors.iter().find(|(k, _)| k == key).map(|(_, t)| t.clone());
                match (get("clip_l"), get("clip_g")) {
                    (Some(l), Some(g)) => vec![rows(path, "clip_l", l, width1)?, rows(path, "clip_g", g, width2)?],
                    _ => {
                        return Err(invalid(
                            path,
                            format!(
                                "an SDXL embedding needs clip_l and clip_g tensors; this file has {}: is it an SD 1.x/2.x embedding?",
                                names(&tensors)
                            ),
                        ))
                    }
                }
            }
            ModelFamily::Sd1 | ModelFamily::Sd2 => {
                let pick = tensors.iter().find(|(k, _)| k == "emb_params" || k == "*").or(match tensors.as_slice() {
                    [one] => Some(one),
                    _ => None,
                });
                match pick {
                    Some((k, t)) => vec![rows(path, k, t.clone(), width1)?],
                    None if tensors.iter().any(|(k, _)| k == "clip_l") => {
                        return Err(invalid(path, format!("this is an SDXL embedding (clip_l/clip_g); the model is {}", cfg.variant)))
                    }
                    None => return Err(invalid(path, format!("no embedding tensor (emb_params, string_to_param or a single tensor) among {}", names(&tensors)))),
                }
            }
            other @ (ModelFamily::Flux | ModelFamily::Sd3 | ModelFamily::ZImage | ModelFamily::Flux2) => {
                return Err(invalid(path, format!("{other:?} models take no textual-inversion embeddings here")))
            }
        };
        let n = vectors[0].dim(0)?;
        if vectors.iter().any(|v| v.dim(0).ok() != Some(n)) {
            return Err(invalid(path, "its text encoders' parts have different vector counts".into()));
        }
        Ok(Self { name, path: path.to_path_buf(), vectors })
    }
}

fn invalid(path: &Path, reason: String) -> Error {
    Error::UnsupportedFormat { path: path.to_path_buf(), reason: format!("not a usable textual-inversion embedding: {reason}") }
}

fn names(tensors: &[(String, Tensor)]) -> String {
    let list: Vec<&str> = tensors.iter().map(|(k, _)| k.as_str()).take(8).collect();
    if list.is_empty() {
        "no tensors".into()
    } else {
        list.join(", ")
    }
}

/// `[vectors, width]` in F32 from a `[width]` or `[vectors, width]` tensor, checked against the encoder.
fn rows(path: &Path, key: &str, t: Tensor, width: usize) -> Result<Tensor> {
    let t = match t.rank() {
        1 => t.unsqueeze(0)?,
        2 => t,
        _ => return Err(invalid(path, format!("{key} has shape {:?}; expected [vectors, width]", t.dims()))),
    };
    let (n, w) = t.dims2()?;
    if w != width {
        let hint = match w {
            768 => " (an SD 1.x embedding)",
            1024 => " (an SD 2.x embedding)",
            _ => "",
        };
        return Err(invalid(path, format!("{key} is {w} wide{hint} but the model's text encoder is {width} wide")));
    }
    if n == 0 || n > MAX_VECTORS {
        return Err(invalid(path, format!("{key} has {n} vectors; 1 to {MAX_VECTORS} fit in a prompt window")));
    }
    Ok(t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)
}

/// Every tensor of a safetensors file, or of a PyTorch pickle (A1111's `string_to_param` dict first).
fn read_tensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let ext = path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
    if !path.is_file() {
        return Err(Error::NotFound { what: "embedding file".into(), path: path.to_path_buf() });
    }
    if ext == "safetensors" {
        let map = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| Error::InvalidSafetensors { path: path.to_path_buf(), reason: e.to_string() })?;
        let mut v: Vec<(String, Tensor)> = map.into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        return Ok(v);
    }
    if !matches!(ext.as_str(), "pt" | "bin" | "pth" | "ckpt") {
        return Err(invalid(path, format!("unknown extension {ext:?}; use .safetensors, .pt or .bin")));
    }
    let pickle = |key: Option<&str>| -> Result<Vec<(String, Tensor)>> {
        let file = candle_core::pickle::PthTensors::new(path, key)
            .map_err(|e| invalid(path, format!("cannot read it as a PyTorch file ({e}); convert it to .safetensors")))?;
        let mut names: Vec<String> = file.tensor_infos().keys().cloned().collect();
        names.sort();
        names.into_iter().filter_map(|n| file.get(&n).transpose().map(|t| t.map(|t| (n, t)).map_err(Error::from))).collect()
    };
    match pickle(Some("string_to_param")) {
        Ok(v) if !v.is_empty() => Ok(v),
        _ => pickle(None),
    }
}
