//! Telling an SD 3.x model from the other families before loading anything, from file headers and config
//! files only.

use std::path::Path;

use candle_core::safetensors::MmapedSafetensors;

/// Whether `names` are the tensor names of an SD 3.x MMDiT (Stability's `joint_blocks.*`, with or without
/// a `model.diffusion_model.` prefix, or diffusers' `pos_embed.proj` + `transformer_blocks.*`).
pub fn names_are_sd3<'a>(names: impl Iterator<Item = &'a str>) -> bool {
    let (mut joint, mut patch, mut blocks) = (false, false, false);
    for n in names {
        joint |= n.contains("joint_blocks.") && n.contains("x_block.");
        patch |= n.ends_with("pos_embed.proj.weight");
        blocks |= n.starts_with("transformer_blocks.") && n.contains(".attn.add_q_proj.");
    }
    joint || (patch && blocks)
}

fn class_name(config: &Path) -> Option<String> {
    let text = std::fs::read_to_string(config).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("_class_name")?.as_str().map(String::from)
}

/// Whether `path` holds an SD 3.x model: a diffusers folder whose `model_index.json` names a
/// `StableDiffusion3*Pipeline` (or whose `transformer/config.json` an `SD3Transformer2DModel`), a
/// transformer folder itself, or a `.safetensors` file with MMDiT tensors (Stability single files,
/// ComfyUI diffusion-model files). Unreadable paths are not SD3.
pub fn is_sd3(path: &Path) -> bool {
    if path.is_dir() {
        return class_name(&path.join("model_index.json")).is_some_and(|c| c.starts_with("StableDiffusion3"))
            || class_name(&path.join("transformer").join("config.json")).is_some_and(|c| c == "SD3Transformer2DModel")
            || class_name(&path.join("config.json")).is_some_and(|c| c == "SD3Transformer2DModel");
    }
    if !path.is_file() || !path.extension().is_some_and(|e| e.eq_ignore_ascii_case("safetensors")) {
        return false;
    }
    // SAFETY: read-only mapping of the header; the file must not be truncated while mapped.
    let Ok(st) = (unsafe { MmapedSafetensors::new(path) }) else { return false };
    let names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
    names_are_sd3(names.iter().map(String::as_str))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd3_names() {
        assert!(names_are_sd3(["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"].into_iter()));
        assert!(names_are_sd3(["pos_embed.proj.weight", "transformer_blocks.0.attn.add_q_proj.weight"].into_iter()));
        // FLUX's diffusers names share add_q_proj but have no patch-embedding convolution.
        assert!(!names_are_sd3(["x_embedder.weight", "transformer_blocks.0.attn.add_q_proj.weight"].into_iter()));
        assert!(!names_are_sd3(["model.diffusion_model.input_blocks.0.0.weight"].into_iter()));
    }
}
