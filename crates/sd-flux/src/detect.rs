//! Telling a FLUX model from a Stable Diffusion one before loading anything, from file headers and
//! config files only.

use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::safetensors::MmapedSafetensors;

/// Whether `names` are the tensor names of a FLUX.1 transformer (BFL or diffusers naming); FLUX.2's, which
/// share the block names but modulate all blocks at once (`double_stream_modulation_img`), are not.
pub fn names_are_flux<'a>(names: impl Iterator<Item = &'a str>) -> bool {
    let (mut blocks, mut flux2) = (false, false);
    for n in names {
        blocks |= n.contains("double_blocks.") || n.contains("single_transformer_blocks.");
        flux2 |= n.contains("double_stream_modulation_img.");
    }
    blocks && !flux2
}

fn class_name(config: &Path) -> Option<String> {
    let text = std::fs::read_to_string(config).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("_class_name")?.as_str().map(String::from)
}

/// Whether `path` holds a FLUX model: a diffusers folder whose `model_index.json` (or
/// `transformer/config.json`) names a FLUX class, a `transformer/` folder itself, or a
/// `.safetensors` / `.gguf` file with FLUX transformer tensors. Unreadable paths are not FLUX
/// (the Stable Diffusion loader then reports what is wrong with them).
pub fn is_flux(path: &Path) -> bool {
    if path.is_dir() {
        let flux_class = |p: &Path| class_name(p).is_some_and(|c| c.starts_with("Flux"));
        return flux_class(&path.join("model_index.json"))
            || flux_class(&path.join("transformer").join("config.json"))
            || flux_class(&path.join("config.json"));
    }
    let ext = path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
    if ext == "gguf" {
        let Ok(mut f) = std::fs::File::open(path) else { return false };
        return gguf_file::Content::read(&mut f).is_ok_and(|c| names_are_flux(c.tensor_infos.keys().map(String::as_str)));
    }
    if !path.is_file() {
        return false;
    }
    // SAFETY: read-only mapping of the header; the file must not be truncated while mapped.
    let Ok(st) = (unsafe { MmapedSafetensors::new(path) }) else { return false };
    let names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
    names_are_flux(names.iter().map(String::as_str))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flux_names() {
        assert!(names_are_flux(["model.diffusion_model.double_blocks.0.img_mod.lin.weight"].into_iter()));
        assert!(names_are_flux(["single_transformer_blocks.3.proj_out.weight"].into_iter()));
        assert!(!names_are_flux(["model.diffusion_model.input_blocks.0.0.weight", "transformer_blocks.0.attn1.to_q.weight"].into_iter()));
        assert!(!names_are_flux(["double_blocks.0.img_attn.qkv.weight", "double_stream_modulation_img.lin.weight"].into_iter()));
    }
}
