//! Telling a FLUX.2 [klein] model from other families before loading anything, from config files only.

use std::path::Path;

fn class_name(config: &Path) -> Option<String> {
    let text = std::fs::read_to_string(config).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("_class_name")?.as_str().map(String::from)
}

/// Whether `path` is a diffusers FLUX.2 [klein] folder: its `model_index.json` names a `Flux2Klein*`
/// pipeline, or (without one) its `transformer/config.json` names `Flux2Transformer2DModel` beside a
/// Qwen3 `text_encoder/`. Unreadable paths and other families are not FLUX.2.
pub fn is_flux2(path: &Path) -> bool {
    if !path.is_dir() {
        return false;
    }
    if let Some(c) = class_name(&path.join("model_index.json")) {
        return c.starts_with("Flux2Klein");
    }
    let qwen = std::fs::read_to_string(path.join("text_encoder").join("config.json")).is_ok_and(|t| t.contains("\"qwen3\""));
    qwen && class_name(&path.join("transformer").join("config.json")).is_some_and(|c| c == "Flux2Transformer2DModel")
}
