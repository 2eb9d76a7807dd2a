//! The scheduler configuration, read from a diffusers `scheduler_config.json`.
//!
//! Fields whose diffusers default differs between scheduler classes (beta range, timestep
//! spacing, sample clipping …) are `Option`s: `None` means "the default of the scheduler that is
//! built", exactly as `SchedulerClass.from_config(config)` behaves in diffusers.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How the betas of the training noise schedule are spaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// Betas linear in `beta`.
    Linear,
    /// Betas linear in `sqrt(beta)` (Stable Diffusion).
    ScaledLinear,
    /// The cosine schedule of improved DDPM.
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredcosCapV2,
}

/// What the denoising model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    /// The added noise (SD 1.x, SD 2.x base, SDXL).
    #[default]
    Epsilon,
    /// The velocity `alpha·noise − sigma·x0` (SD 2.x 768-v).
    VPrediction,
    /// The clean sample itself.
    Sample,
}

/// How inference timesteps are picked from the training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    /// `0, r, 2r, …` plus `steps_offset` (SD 1.x/XL configs).
    Leading,
    /// Counting down from the last training timestep (zero-terminal-SNR models).
    Trailing,
    /// Evenly spread over `[0, T-1]`.
    Linspace,
}

/// The noise level reached after the last step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalSigmas {
    /// Denoise fully (sigma 0).
    #[default]
    Zero,
    /// Stop at the smallest training sigma.
    SigmaMin,
}

/// How Euler interpolates sigmas between training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Interpolation {
    /// Linear in sigma at the chosen timesteps.
    #[default]
    Linear,
    /// Log-linear between the smallest and largest sigma.
    LogLinear,
}

/// A diffusers scheduler configuration; unknown keys are ignored, as in diffusers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    /// The diffusers class that wrote the file (`"EulerDiscreteScheduler"` …), if recorded.
    #[serde(rename = "_class_name", skip_serializing_if = "Option::is_none")]
    pub class_name: Option<String>,
    /// Length of the training noise schedule.
    pub num_train_timesteps: usize,
    /// First beta (`None`: the scheduler's default).
    pub beta_start: Option<f64>,
    /// Last beta (`None`: the scheduler's default).
    pub beta_end: Option<f64>,
    /// Beta spacing (`None`: the scheduler's default).
    pub beta_schedule: Option<BetaSchedule>,
    /// Explicit betas, overriding the three fields above.
    pub trained_betas: Option<Vec<f64>>,
    /// What the model predicts.
    pub prediction_type: PredictionType,
    /// Timestep spacing (`None`: the scheduler's default).
    pub timestep_spacing: Option<TimestepSpacing>,
    /// Offset added to "leading" timesteps.
    pub steps_offset: usize,
    /// Rescale betas to zero terminal SNR.
    pub rescale_betas_zero_snr: bool,
    /// Clip the predicted clean sample (`None`: the scheduler's default).
    pub clip_sample: Option<bool>,
    /// Range of that clipping.
    pub clip_sample_range: f64,
    /// Use alpha_cumprod 1 after the last DDIM/LCM step (`None`: the scheduler's default).
    pub set_alpha_to_one: Option<bool>,
    /// Dynamic thresholding (unsupported: unsuitable for latent diffusion).
    pub thresholding: bool,
    /// Use Karras sigmas.
    pub use_karras_sigmas: Option<bool>,
    /// Use exponential sigmas.
    pub use_exponential_sigmas: Option<bool>,
    /// Use beta-distribution sigmas (Beta(0.6, 0.6) quantiles).
    pub use_beta_sigmas: Option<bool>,
    /// Use Lu lambdas (unsupported).
    pub use_lu_lambdas: Option<bool>,
    /// Use flow-matching sigmas (unsupported).
    pub use_flow_sigmas: Option<bool>,
    /// Override of the smallest sigma for Karras/exponential schedules.
    pub sigma_min: Option<f64>,
    /// Override of the largest sigma for Karras/exponential schedules.
    pub sigma_max: Option<f64>,
    /// The sigma after the last step.
    pub final_sigmas_type: Option<FinalSigmas>,
    /// Euler's sigma interpolation.
    pub interpolation_type: Interpolation,
    /// Euler's timestep type (`"discrete"`; `"continuous"` is unsupported with v-prediction).
    pub timestep_type: Option<String>,
    /// Order of the multistep solver (UniPC; DPM++ 2M is always second order).
    pub solver_order: Option<usize>,
    /// Solver flavour: `midpoint`/`heun` for DPM-Solver, `bh1`/`bh2` for UniPC.
    pub solver_type: Option<String>,
    /// Drop to lower orders on the last steps of short schedules.
    pub lower_order_final: Option<bool>,
    /// Take an Euler step at the end (DPM-Solver).
    pub euler_at_final: bool,
    /// Clip lambda(t) from below (DPM-Solver); `null`/`-Infinity` means no clipping.
    pub lambda_min_clipped: Option<f64>,
    /// DDPM variance type, or a learned variance marker for DPM-Solver.
    pub variance_type: Option<String>,
    /// UniPC predicts x0 (true) or noise.
    pub predict_x0: Option<bool>,
    /// Steps at which UniPC skips its corrector.
    pub disable_corrector: Vec<usize>,
    /// LCM's distillation schedule length.
    pub original_inference_steps: Option<usize>,
    /// LCM's boundary-condition timestep scale.
    pub timestep_scaling: Option<f64>,
    /// PNDM: skip the Runge–Kutta warm-up steps (`None`: PNDM's default, false; SD configs set true).
    pub skip_prk_steps: Option<bool>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            class_name: None,
            num_train_timesteps: 1000,
            beta_start: None,
            beta_end: None,
            beta_schedule: None,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: None,
            steps_offset: 0,
            rescale_betas_zero_snr: false,
            clip_sample: None,
            clip_sample_range: 1.0,
            set_alpha_to_one: None,
            thresholding: false,
            use_karras_sigmas: None,
            use_exponential_sigmas: None,
            use_beta_sigmas: None,
            use_lu_lambdas: None,
            use_flow_sigmas: None,
            sigma_min: None,
            sigma_max: None,
            final_sigmas_type: None,
            interpolation_type: Interpolation::Linear,
            timestep_type: None,
            solver_order: None,
            solver_type: None,
            lower_order_final: None,
            euler_at_final: false,
            lambda_min_clipped: None,
            variance_type: None,
            predict_x0: None,
            disable_corrector: Vec::new(),
            original_inference_steps: None,
            timestep_scaling: None,
            skip_prk_steps: None,
        }
    }
}

impl SchedulerConfig {
    /// The scheduler config shipped with Stable Diffusion 1.x.
    pub fn sd15() -> Self {
        Self {
            class_name: Some("PNDMScheduler".into()),
            beta_start: Some(0.00085),
            beta_end: Some(0.012),
            beta_schedule: Some(BetaSchedule::ScaledLinear),
            steps_offset: 1,
            clip_sample: Some(false),
            set_alpha_to_one: Some(false),
            skip_prk_steps: Some(true),
            ..Self::default()
        }
    }

    /// The scheduler config of Stable Diffusion 2.x 768-v (v-prediction).
    pub fn sd21_v() -> Self {
        Self {
            class_name: Some("DDIMScheduler".into()),
            prediction_type: PredictionType::VPrediction,
            ..Self::sd15()
        }
    }

    /// The scheduler config shipped with SDXL base.
    pub fn sdxl() -> Self {
        Self {
            class_name: Some("EulerDiscreteScheduler".into()),
            timestep_spacing: Some(TimestepSpacing::Leading),
            use_karras_sigmas: Some(false),
            ..Self::sd15()
        }
    }

    /// Parses the text of a diffusers `scheduler_config.json`.
    ///
    /// Python's `json` writes `-Infinity`/`Infinity`/`NaN` (e.g. `lambda_min_clipped`), which
    /// strict JSON rejects; they are read as `null`, i.e. "the default".
    /// A wrong value is refused naming its field (`timestep_spacing: unknown variant …`).
    pub fn from_json_str(text: &str) -> Result<Self> {
        let cleaned = python_json(text);
        let de = &mut serde_json::Deserializer::from_str(&cleaned);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            Error::ConfigJson {
                reason: if path == "." { inner.to_string() } else { format!("{path}: {inner}") },
            }
        })
    }

    /// Reads a diffusers `scheduler_config.json` file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json_str(&text)
    }

    /// The first of the Karras / exponential / beta flags that is set, as a schedule.
    pub fn sigma_schedule(&self) -> crate::schedulers::SigmaSchedule {
        use crate::schedulers::SigmaSchedule;
        if self.use_karras_sigmas == Some(true) {
            SigmaSchedule::Karras
        } else if self.use_exponential_sigmas == Some(true) {
            SigmaSchedule::Exponential
        } else if self.use_beta_sigmas == Some(true) {
            SigmaSchedule::Beta
        } else {
            SigmaSchedule::Default
        }
    }
}

/// Python's `json` writes `-Infinity`/`Infinity`/`NaN` (diffusers configs carry them, e.g.
/// `lambda_min_clipped`), which strict JSON refuses: returns the text with those bare tokens
/// (outside strings) replaced by `null`, i.e. "the default".
pub fn python_json(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        } else if let Some(token) = ["-Infinity", "Infinity", "NaN"].into_iter().find(|t| rest.starts_with(t)) {
            out.push_str("null");
            rest = &rest[token.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_infinity_reads_as_null() {
        let cfg = SchedulerConfig::from_json_str(
            r#"{"lambda_min_clipped": -Infinity, "_class_name": "NaN-Infinity", "num_train_timesteps": 1000}"#,
        )
        .unwrap();
        assert_eq!(cfg.lambda_min_clipped, None);
        assert_eq!(cfg.class_name.as_deref(), Some("NaN-Infinity"));
    }
}
