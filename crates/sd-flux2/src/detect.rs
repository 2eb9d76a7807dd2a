//! Telling a FLUX.2 [klein] model from other families before loading anything, from config files and
//! safetensors headers only.

use std::path::Path;

use candle_core::safetensors::MmapedSafetensors;

use crate::loader::names_are_flux2;

fn class_name(config: &Path) -> Option<String> {
    let text = std::fs::read_to_string(config).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("_class_name")?.as_str().map(String::from)
}

/// Whether `path` is a FLUX.2 [klein] model: a diffusers folder whose `model_index.json` names a
/// `Flux2Klein*` pipeline, or (without one) whose `transformer/config.json` names `Flux2Transformer2DModel`
/// beside a Qwen3 `text_encoder/`; or a `.safetensors` file with a FLUX.2 transformer's tensors (BFL's
/// single file, ComfyUI's diffusion model: shared `double_stream_modulation_img`, where FLUX.1 modulates
/// each block). Unreadable paths and other families are not FLUX.2.
pub fn is_flux2(path: &Path) -> bool {
    if path.is_file() {
        if !path.extension().is_some_and(|e| e.eq_ignore_ascii_case("safetensors")) {
            return false;
        }
        // SAFETY: read-only mapping of the header; the file must not be truncated while mapped.
        let Ok(st) = (unsafe { MmapedSafetensors::new(path) }) else { return false };
        let names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
        return names_are_flux2(names.iter().map(String::as_str));
    }
    if !path.is_dir() {
        return false;
    }
    if let Some(c) = class_name(&path.join("model_index.json")) {
        return c.starts_with("Flux2Klein");
    }
    let qwen = std::fs::read_to_string(path.join("text_encoder").join("config.json")).is_ok_and(|t| t.contains("\"qwen3\""));
    qwen && class_name(&path.join("transformer").join("config.json")).is_some_and(|c| c == "Flux2Transformer2DModel")
}
