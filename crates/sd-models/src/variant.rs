//! The Stable Diffusion variants and their complete configs.

use crate::config::{ClipConfig, PredictionType, UNetConfig, VaeConfig};
use serde::{Deserialize, Serialize};

pub use sd_core::ModelFamily;

/// A published Stable Diffusion model variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SdVariant {
    /// Stable Diffusion 1.5.
    V1_5,
    /// Stable Diffusion 1.5 inpainting (9-channel UNet).
    V1_5Inpaint,
    /// Stable Diffusion 2.1 (768 px, v-prediction).
    V2_1,
    /// Stable Diffusion 2 inpainting (512 px, epsilon, 9-channel UNet).
    V2Inpaint,
    /// SD-Turbo (SD 2.1 distilled for 1–4 steps, 512 px).
    SdTurbo,
    /// SDXL 1.0 base.
    Xl,
    /// SDXL 1.0 inpainting (9-channel UNet).
    XlInpaint,
    /// SDXL-Turbo (512 px, 1–4 steps, no guidance).
    XlTurbo,
}

/// Noise-schedule settings a variant was trained with (diffusers' `scheduler_config.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SchedulerDefaults {
    /// First beta of the training schedule.
    pub beta_start: f64,
    /// Last beta of the training schedule.
    pub beta_end: f64,
    /// `scaled_linear` for every SD variant.
    pub beta_schedule: String,
    /// Training timesteps (1000).
    pub num_train_timesteps: usize,
    /// `leading`, `trailing` or `linspace`; `None` (as in the published SD 1.5 / 2.x configs) means
    /// each scheduler's own default, as diffusers' `from_config` does.
    pub timestep_spacing: Option<String>,
    /// Offset added to `leading` timesteps.
    pub steps_offset: usize,
    /// What the UNet predicts.
    pub prediction_type: PredictionType,
    /// Betas rescaled to zero terminal SNR (diffusers' `rescale_betas_zero_snr`; NoobAI-XL-style
    /// checkpoints mark it with a `ztsnr` key).
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    /// The model's whole `scheduler_config.json`, when it came with one: the scheduler library
    /// parses every field of it (these few are what loading and detection need).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

impl SchedulerDefaults {
    fn sd(spacing: Option<&str>, prediction_type: PredictionType) -> Self {
        Self {
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "scaled_linear".into(),
            num_train_timesteps: 1000,
            timestep_spacing: spacing.map(String::from),
            steps_offset: 1,
            prediction_type,
            rescale_betas_zero_snr: false,
            file: None,
        }
    }
}

/// Everything needed to build and run one variant: component configs and generation defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// The variant these configs describe (for tiny/custom models: the closest published one).
    pub variant: SdVariant,
    /// UNet config.
    pub unet: UNetConfig,
    /// VAE config.
    pub vae: VaeConfig,
    /// First (or only) text encoder.
    pub text_encoder: ClipConfig,
    /// SDXL's second text encoder.
    pub text_encoder_2: Option<ClipConfig>,
    /// Noise schedule and prediction type.
    pub scheduler: SchedulerDefaults,
    /// Default image width in pixels.
    pub default_width: usize,
    /// Default image height in pixels.
    pub default_height: usize,
    /// Default number of sampling steps.
    pub default_steps: usize,
    /// Default classifier-free guidance scale (≤ 1 disables guidance).
    pub default_guidance: f64,
}

impl ModelConfig {
    /// Pixels per latent pixel (8 for every published VAE; derived so tiny test VAEs work too).
    pub fn vae_scale_factor(&self) -> usize {
        1 << self.vae.block_out_channels.len().saturating_sub(1)
    }

    /// What the UNet predicts.
    pub fn prediction_type(&self) -> PredictionType {
        self.scheduler.prediction_type
    }

    /// Whether the UNet takes masked-image conditioning (9 input channels).
    pub fn is_inpaint(&self) -> bool {
        self.unet.in_channels == 9
    }
}

impl SdVariant {
    /// All variants, for listing and tests.
    pub const ALL: [SdVariant; 8] = [
        SdVariant::V1_5,
        SdVariant::V1_5Inpaint,
        SdVariant::V2_1,
        SdVariant::V2Inpaint,
        SdVariant::SdTurbo,
        SdVariant::Xl,
        SdVariant::XlInpaint,
        SdVariant::XlTurbo,
    ];

    /// The architecture family.
    pub fn family(self) -> ModelFamily {
        match self {
            SdVariant::V1_5 | SdVariant::V1_5Inpaint => ModelFamily::Sd1,
            SdVariant::V2_1 | SdVariant::V2Inpaint | SdVariant::SdTurbo => ModelFamily::Sd2,
            SdVariant::Xl | SdVariant::XlInpaint | SdVariant::XlTurbo => ModelFamily::Sdxl,
        }
    }

    /// Whether this is a 9-channel inpainting variant.
    pub fn is_inpaint(self) -> bool {
        matches!(self, SdVariant::V1_5Inpaint | SdVariant::V2Inpaint | SdVariant::XlInpaint)
    }

    /// A short stable name ("sd15", "sdxl-turbo", …) used in CLIs and APIs.
    pub fn name(self) -> &'static str {
        match self {
            SdVariant::V1_5 => "sd15",
            SdVariant::V1_5Inpaint => "sd15-inpaint",
            SdVariant::V2_1 => "sd21",
            SdVariant::V2Inpaint => "sd2-inpaint",
            SdVariant::SdTurbo => "sd-turbo",
            SdVariant::Xl => "sdxl",
            SdVariant::XlInpaint => "sdxl-inpaint",
            SdVariant::XlTurbo => "sdxl-turbo",
        }
    }

    /// Parses a name produced by [`SdVariant::name`] (a few common aliases accepted).
    pub fn from_name(name: &str) -> Option<Self> {
        let n = name.to_ascii_lowercase().replace(['_', '.', ' '], "-");
        Some(match n.as_str() {
            "sd15" | "sd-1-5" | "v1-5" | "sd1" | "sd1-5" => SdVariant::V1_5,
            "sd15-inpaint" | "sd-1-5-inpaint" | "v1-5-inpaint" | "sd1-5-inpaint" => SdVariant::V1_5Inpaint,
            "sd21" | "sd-2-1" | "v2-1" | "sd2" | "sd2-1" => SdVariant::V2_1,
            "sd2-inpaint" | "sd-2-inpaint" | "v2-inpaint" => SdVariant::V2Inpaint,
            "sd-turbo" | "sdturbo" => SdVariant::SdTurbo,
            "sdxl" | "xl" | "sdxl-1-0" => SdVariant::Xl,
            "sdxl-inpaint" | "xl-inpaint" => SdVariant::XlInpaint,
            "sdxl-turbo" | "xl-turbo" => SdVariant::XlTurbo,
            _ => return None,
        })
    }

    /// The complete config of the published full-size model.
    pub fn config(self) -> ModelConfig {
        use PredictionType::{Epsilon, VPrediction};
        let (unet, vae, te, te2, sched, size, steps, guidance) = match self {
            SdVariant::V1_5 | SdVariant::V1_5Inpaint => (
                UNetConfig::sd15(if self.is_inpaint() { 9 } else { 4 }),
                VaeConfig::sd(),
                ClipConfig::vit_l14(),
                None,
                SchedulerDefaults::sd(None, Epsilon),
                512,
                30,
                7.5,
            ),
            SdVariant::V2_1 => (
                UNetConfig::sd2(4, 96),
                VaeConfig { sample_size: 768, ..VaeConfig::sd() },
                ClipConfig::vit_h14_sd2(),
                None,
                SchedulerDefaults::sd(None, VPrediction),
                768,
                30,
                7.5,
            ),
            SdVariant::V2Inpaint => (
                UNetConfig::sd2(9, 64),
                VaeConfig::sd(),
                ClipConfig::vit_h14_sd2(),
                None,
                SchedulerDefaults::sd(None, Epsilon),
                512,
                30,
                7.5,
            ),
            SdVariant::SdTurbo => (
                UNetConfig::sd2(4, 64),
                VaeConfig::sd(),
                ClipConfig::vit_h14_sd2(),
                None,
                SchedulerDefaults::sd(Some("trailing"), Epsilon),
                512,
                1,
                0.0,
            ),
            SdVariant::Xl | SdVariant::XlInpaint => (
                UNetConfig::sdxl(if self.is_inpaint() { 9 } else { 4 }),
                VaeConfig::sdxl(),
                ClipConfig::vit_l14(),
                Some(ClipConfig::vit_bigg14()),
                SchedulerDefaults::sd(Some("leading"), Epsilon),
                1024,
                30,
                5.0,
            ),
            SdVariant::XlTurbo => (
                UNetConfig { sample_size: 64, ..UNetConfig::sdxl(4) },
                VaeConfig { sample_size: 512, ..VaeConfig::sdxl() },
                ClipConfig::vit_l14(),
                Some(ClipConfig::vit_bigg14()),
                SchedulerDefaults::sd(Some("trailing"), Epsilon),
                512,
                1,
                0.0,
            ),
        };
        ModelConfig {
            variant: self,
            unet,
            vae,
            text_encoder: te,
            text_encoder_2: te2,
            scheduler: sched,
            default_width: size,
            default_height: size,
            default_steps: steps,
            default_guidance: guidance,
        }
    }
}

impl std::fmt::Display for SdVariant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for v in SdVariant::ALL {
            assert_eq!(SdVariant::from_name(v.name()), Some(v));
        }
        assert_eq!(SdVariant::from_name("nonsense"), None);
    }

    #[test]
    fn configs_are_consistent() {
        for v in SdVariant::ALL {
            let c = v.config();
            assert_eq!(c.variant, v);
            assert_eq!(c.unet.in_channels, if v.is_inpaint() { 9 } else { 4 });
            assert_eq!(c.vae_scale_factor(), 8);
            let ctx = c.text_encoder.hidden_size + c.text_encoder_2.as_ref().map_or(0, |t| t.hidden_size);
            assert_eq!(c.unet.cross_attention_dim, ctx, "{v}");
            let expected_scale = if v.family() == ModelFamily::Sdxl { 0.13025 } else { 0.18215 };
            assert_eq!(c.vae.scaling_factor, expected_scale);
            if let Some(dim) = c.unet.projection_class_embeddings_input_dim {
                let pooled = c.text_encoder_2.as_ref().and_then(|t| t.projection_dim).unwrap_or(0);
                assert_eq!(dim, pooled + 6 * c.unet.addition_time_embed_dim.unwrap_or(0));
            }
        }
        assert_eq!(SdVariant::V2_1.config().prediction_type(), PredictionType::VPrediction);
    }
}
