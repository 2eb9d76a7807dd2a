//! Telling a Z-Image model from other families before loading anything, from config files and
//! safetensors headers only.

use std::path::Path;

use candle_core::safetensors::MmapedSafetensors;

use crate::transformer::names_are_zimage;

fn class_name(config: &Path) -> Option<String> {
    let text = std::fs::read_to_string(config).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("_class_name")?.as_str().map(String::from)
}

/// Whether `path` holds a Z-Image model: a diffusers folder whose `model_index.json` (or
/// `transformer/config.json`, or its own `config.json`) names a `ZImage*` class, or a `.safetensors`
/// file with Z-Image transformer tensors (either layout). Unreadable paths are not Z-Image.
pub fn is_zimage(path: &Path) -> bool {
    if path.is_dir() {
        let z = |p: &Path| class_name(p).is_some_and(|c| c.starts_with("ZImage"));
        return z(&path.join("model_index.json")) || z(&path.join("transformer").join("config.json")) || z(&path.join("config.json"));
    }
    if !path.is_file() || !path.extension().is_some_and(|e| e.eq_ignore_ascii_case("safetensors")) {
        return false;
    }
    // SAFETY: read-only mapping of the header; the file must not be truncated while mapped.
    let Ok(st) = (unsafe { MmapedSafetensors::new(path) }) else { return false };
    let names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
    names_are_zimage(names.iter().map(String::as_str))
}
