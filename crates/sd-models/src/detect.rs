//! Telling which Stable Diffusion variant a checkpoint is.
//!
//! Single files are recognised from tensor names and shapes: SDXL by `conditioner.embedders.*`
//! or the UNet's `label_emb` add-embedding, SD 2.x by the OpenCLIP prefix `cond_stage_model.model.`
//! or 1024-wide cross-attention, inpainting by 9 UNet input channels. Diffusers folders are
//! recognised from their config files.
//!
//! Turbo models cannot be told from their weights (SD-Turbo is an SD 2.1 UNet, SDXL-Turbo an SDXL
//! one). Pass the variant explicitly, or rely on the hint: a file or folder name containing
//! "turbo" (any case), or a folder whose scheduler uses `trailing` timestep spacing, selects the
//! turbo variant of the detected family.

use std::path::Path;

use crate::config::{ClipActivation, ClipConfig, PredictionType, UNetConfig};
use crate::keymap::{
    LDM_SD1_CLIP_PREFIX, LDM_SD2_OPENCLIP_PREFIX, LDM_SDXL_CLIP_PREFIX, LDM_SDXL_OPENCLIP_PREFIX, LDM_UNET_PREFIX,
};
use crate::single_file::TensorInfo;
use crate::variant::{ModelFamily, SdVariant};
use crate::{Error, Result};

/// What detection found out about a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Detection {
    /// The variant the weights (plus the turbo hint) point to.
    pub variant: SdVariant,
    /// UNet input channels (4, or 9 for inpainting).
    pub in_channels: usize,
    /// Width of the UNet's cross-attention context, when it could be read.
    pub cross_attention_dim: Option<usize>,
    /// Why this variant was chosen, for logs and `inspect`.
    pub evidence: String,
}

fn pick(path: &Path, family: ModelFamily, inpaint: bool, turbo: bool) -> Result<SdVariant> {
    Ok(match (family, inpaint, turbo) {
        (ModelFamily::Sd1, false, _) => SdVariant::V1_5,
        (ModelFamily::Sd1, true, _) => SdVariant::V1_5Inpaint,
        (ModelFamily::Sd2, false, false) => SdVariant::V2_1,
        (ModelFamily::Sd2, false, true) => SdVariant::SdTurbo,
        (ModelFamily::Sd2, true, _) => SdVariant::V2Inpaint,
        (ModelFamily::Sdxl, false, false) => SdVariant::Xl,
        (ModelFamily::Sdxl, false, true) => SdVariant::XlTurbo,
        (ModelFamily::Sdxl, true, _) => SdVariant::XlInpaint,
        (ModelFamily::Flux, ..) => {
            return Err(Error::UnknownArchitecture { path: path.to_path_buf(), reason: FLUX_HINT.to_string() })
        }
        (ModelFamily::Sd3 | ModelFamily::ZImage | ModelFamily::Flux2, ..) => {
            return Err(Error::UnknownArchitecture {
                path: path.to_path_buf(),
                reason: format!("this is a {family:?} model, not Stable Diffusion 1.x/2.x/XL; load it through sd-families"),
            })
        }
    })
}

/// What to tell a user who hands a FLUX model to the Stable Diffusion loader.
const FLUX_HINT: &str = "this is a FLUX checkpoint (double_blocks.*); load it with sd-flux (sd_flux::load)";

/// Whether a file or folder name hints at a turbo model. Inside a Hugging Face cache snapshot
/// (`models--owner--name/snapshots/<commit>/…`) the repo's folder name counts too, since the
/// snapshot folder itself is named by a commit hash.
pub fn name_hints_turbo(path: &Path) -> bool {
    let turbo = |n: &std::ffi::OsStr| n.to_string_lossy().to_ascii_lowercase().contains("turbo");
    path.file_name().is_some_and(turbo)
        || path.ancestors().filter_map(Path::file_name).any(|n| n.to_string_lossy().starts_with("models--") && turbo(n))
}

fn check_in_channels(path: &Path, in_channels: usize) -> Result<bool> {
    match in_channels {
        4 => Ok(false),
        9 => Ok(true),
        n => Err(Error::UnknownArchitecture {
            path: path.to_path_buf(),
            reason: format!(
                "the UNet takes {n} input channels; supported are 4 (text-to-image) and 9 (inpainting) \
                 (8 is instruct-pix2pix, 7 the x4 upscaler)"
            ),
        }),
    }
}

/// Explains what a file that is not an SD checkpoint seems to be.
fn describe_foreign(tensors: &[TensorInfo]) -> String {
    let has = |p: &str| tensors.iter().any(|t| t.name.starts_with(p) || t.name.contains(p));
    if has("double_blocks.") {
        return FLUX_HINT.to_string();
    }
    let what = if has("joint_blocks.") {
        "an SD3 MMDiT (joint_blocks.*), which is not supported".to_string()
    } else if tensors.iter().any(|t| t.name.starts_with("lora_") || t.name.contains(".lora_")) {
        "a LoRA, not a full checkpoint: load a base model and apply the LoRA to it".to_string()
    } else if has("encoder.down.") || has("encoder.down_blocks.") {
        "a standalone VAE, not a full checkpoint".to_string()
    } else if has("text_model.") {
        "a standalone text encoder, not a full checkpoint".to_string()
    } else if has("input_blocks.0.0.weight") || has("down_blocks.0.resnets.0") || has("conv_in.weight") {
        "a UNet without the single-file prefix model.diffusion_model. (a bare UNet or diffusers-named file); \
         use a full checkpoint or a diffusers folder"
            .to_string()
    } else {
        "no Stable Diffusion UNet".to_string()
    };
    let examples: Vec<&str> = tensors.iter().take(3).map(|t| t.name.as_str()).collect();
    format!(
        "found {what}; there is no {LDM_UNET_PREFIX}input_blocks.0.0.weight among its {} tensors (e.g. {})",
        tensors.len(),
        if examples.is_empty() { "none".to_string() } else { examples.join(", ") }
    )
}

/// Detects the variant of a single-file checkpoint from its tensor names and shapes.
pub fn detect_single_file(path: &Path, tensors: &[TensorInfo]) -> Result<Detection> {
    let unknown = |reason: String| Error::UnknownArchitecture { path: path.to_path_buf(), reason };
    let conv_in_name = format!("{LDM_UNET_PREFIX}input_blocks.0.0.weight");
    let Some(conv_in) = tensors.iter().find(|t| t.name == conv_in_name) else {
        return Err(unknown(describe_foreign(tensors)));
    };
    let in_channels = match conv_in.shape.as_slice() {
        [_, c, _, _] => *c,
        s => return Err(unknown(format!("{conv_in_name} has shape {s:?}, expected a 4-d convolution kernel"))),
    };
    let inpaint = check_in_channels(path, in_channels)?;
    let has_prefix = |p: &str| tensors.iter().any(|t| t.name.starts_with(p));
    let cross_attention_dim = tensors
        .iter()
        .find(|t| t.name.starts_with(LDM_UNET_PREFIX) && t.name.ends_with("attn2.to_k.weight"))
        .and_then(|t| t.shape.get(1).copied());
    let xl_marker = has_prefix("conditioner.embedders.") || has_prefix(&format!("{LDM_UNET_PREFIX}label_emb."));
    let (family, evidence) = if xl_marker {
        if !has_prefix(LDM_SDXL_CLIP_PREFIX) && has_prefix("conditioner.embedders.0.model.") {
            return Err(unknown(
                "this is an SDXL refiner (only an OpenCLIP-bigG text encoder at conditioner.embedders.0.model.), which is not supported"
                    .into(),
            ));
        }
        (ModelFamily::Sdxl, "SDXL markers (conditioner.embedders.* / label_emb)".to_string())
    } else if has_prefix(LDM_SD2_OPENCLIP_PREFIX) {
        (ModelFamily::Sd2, format!("OpenCLIP text encoder at {LDM_SD2_OPENCLIP_PREFIX}"))
    } else if cross_attention_dim == Some(1024) {
        (ModelFamily::Sd2, "1024-wide cross-attention".to_string())
    } else {
        let why = if has_prefix(LDM_SD1_CLIP_PREFIX) {
            format!("OpenAI CLIP text encoder at {LDM_SD1_CLIP_PREFIX}")
        } else {
            "a UNet without SD 2 / SDXL markers".to_string()
        };
        (ModelFamily::Sd1, why)
    };
    if family == ModelFamily::Sdxl && has_prefix("conditioner.embedders.") && !has_prefix(LDM_SDXL_OPENCLIP_PREFIX) {
        tracing::warn!(
            "{}: SDXL checkpoint without a second text encoder at {LDM_SDXL_OPENCLIP_PREFIX}",
            path.display()
        );
    }
    let turbo = name_hints_turbo(path);
    let variant = pick(path, family, inpaint, turbo)?;
    let evidence = format!(
        "{evidence}, {in_channels} UNet input channels{}",
        if turbo && !inpaint { ", \"turbo\" in the name" } else { "" }
    );
    Ok(Detection { variant, in_channels, cross_attention_dim, evidence })
}

/// Detects the variant of a diffusers folder from its component configs.
///
/// `timestep_spacing` and the folder name only feed the turbo hint.
pub fn detect_from_configs(
    path: &Path,
    unet: &UNetConfig,
    text_encoder: &ClipConfig,
    has_text_encoder_2: bool,
    prediction_type: PredictionType,
    timestep_spacing: &str,
) -> Result<Detection> {
    let inpaint = check_in_channels(path, unet.in_channels)?;
    let (family, evidence) = if unet.has_text_time() || has_text_encoder_2 {
        (ModelFamily::Sdxl, "text_time add-embedding / text_encoder_2")
    } else if unet.cross_attention_dim == 1024 || text_encoder.hidden_act == ClipActivation::Gelu {
        (ModelFamily::Sd2, "1024-wide cross-attention / OpenCLIP (gelu) text encoder")
    } else {
        (ModelFamily::Sd1, "OpenAI CLIP (quick_gelu) text encoder")
    };
    let turbo = name_hints_turbo(path) || timestep_spacing == "trailing";
    // SD 2.x v-prediction is 2.1 proper; only epsilon models can be SD-Turbo.
    let turbo = turbo && !(family == ModelFamily::Sd2 && prediction_type == PredictionType::VPrediction);
    let variant = pick(path, family, inpaint, turbo)?;
    Ok(Detection {
        variant,
        in_channels: unet.in_channels,
        cross_attention_dim: Some(unet.cross_attention_dim),
        evidence: format!(
            "{evidence}, {} UNet input channels{}",
            unet.in_channels,
            if turbo && !inpaint { ", turbo hint" } else { "" }
        ),
    })
}

/// Combines detection with the variant the caller asked for.
///
/// An explicit variant wins when it has the same family and inpainting-ness as the detected one
/// (e.g. `SdTurbo` for a detected `V2_1`); otherwise it is a [`Error::VariantMismatch`].
pub fn resolve_variant(detected: &Detection, requested: Option<SdVariant>) -> Result<SdVariant> {
    match requested {
        None => Ok(detected.variant),
        Some(r) if r.family() == detected.variant.family() && r.is_inpaint() == detected.variant.is_inpaint() => Ok(r),
        Some(r) => Err(Error::VariantMismatch {
            detected: format!("{} ({})", detected.variant, detected.evidence),
            requested: r.name().to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, shape: &[usize]) -> TensorInfo {
        TensorInfo { name: name.into(), shape: shape.to_vec(), dtype: None }
    }

    #[test]
    fn single_file_markers() {
        let p = Path::new("model.safetensors");
        let conv = |c| t("model.diffusion_model.input_blocks.0.0.weight", &[320, c, 3, 3]);
        let sd1 = [conv(4), t("cond_stage_model.transformer.text_model.final_layer_norm.weight", &[768])];
        assert_eq!(detect_single_file(p, &sd1).expect("sd1").variant, SdVariant::V1_5);
        let sd2 =
            [conv(9), t("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", &[320, 1024])];
        assert_eq!(detect_single_file(p, &sd2).expect("sd2").variant, SdVariant::V2Inpaint);
        let xl = [conv(4), t("model.diffusion_model.label_emb.0.0.weight", &[1280, 2816])];
        assert_eq!(detect_single_file(p, &xl).expect("xl").variant, SdVariant::Xl);
        assert_eq!(
            detect_single_file(Path::new("sd_xl_Turbo_1.0.safetensors"), &xl).expect("xl").variant,
            SdVariant::XlTurbo
        );
        let e = detect_single_file(p, &[conv(8)]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("8 input channels"), "{e}");
        let flux = [t("double_blocks.0.img_attn.qkv.weight", &[9216, 3072])];
        let e = detect_single_file(p, &flux).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("FLUX") && e.contains("load it with sd-flux"), "{e}");
        let refiner = [conv(4), t("conditioner.embedders.0.model.ln_final.weight", &[1280])];
        assert!(matches!(detect_single_file(p, &refiner), Err(Error::UnknownArchitecture { .. })));
    }

    #[test]
    fn turbo_hint_reads_hub_cache_repo_names() {
        assert!(name_hints_turbo(Path::new("/m/sdxl-turbo")));
        assert!(name_hints_turbo(Path::new("/hf/hub/models--stabilityai--sd-turbo/snapshots/0123abcd")));
        assert!(name_hints_turbo(Path::new("/hf/hub/models--someone--SD_Turbo_mix/snapshots/ab/model.safetensors")));
        assert!(!name_hints_turbo(Path::new("/hf/hub/models--stabilityai--stable-diffusion-2-1/snapshots/0123abcd")));
        // Only the repo folder counts, not any parent folder that happens to say turbo.
        assert!(!name_hints_turbo(Path::new("/home/turbo/models/v1-5.safetensors")));
    }

    #[test]
    fn explicit_variant_must_agree() {
        let d = Detection {
            variant: SdVariant::Xl,
            in_channels: 4,
            cross_attention_dim: Some(2048),
            evidence: String::new(),
        };
        assert_eq!(resolve_variant(&d, Some(SdVariant::XlTurbo)).expect("turbo"), SdVariant::XlTurbo);
        assert!(matches!(resolve_variant(&d, Some(SdVariant::V1_5)), Err(Error::VariantMismatch { .. })));
        assert!(matches!(resolve_variant(&d, Some(SdVariant::XlInpaint)), Err(Error::VariantMismatch { .. })));
    }
}
