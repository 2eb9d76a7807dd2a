//! Euler ancestral sampling ("Euler a", k-diffusion `sample_euler_ancestral`), as diffusers'
//! `EulerAncestralDiscreteScheduler`.

use candle_core::{DType, Tensor};

use super::common::{self, f32r, ClassDefaults, NoiseSchedule};
use super::config::{PredictionType, SchedulerConfig, TimestepSpacing};
use super::{NoiseSource, SamplerKind, Scheduler, SigmaSchedule};
use crate::error::Result;

const DEFAULTS: ClassDefaults =
    ClassDefaults::standard("Euler a", TimestepSpacing::Linspace, false);

/// Stochastic Euler sampling; draws one noise tensor per step.
#[derive(Debug, Clone)]
pub struct EulerAncestralScheduler {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    steps: usize,
    init_sigma: f64,
    prediction: PredictionType,
}

impl EulerAncestralScheduler {
    /// Builds the schedule for `steps` inference steps.
    ///
    /// diffusers' Euler a has no sigma schedules; the others (Karras, SGM uniform …) are
    /// computed as for Euler, as k-diffusion's `sample_euler_ancestral` takes any sigmas.
    pub fn new(cfg: &SchedulerConfig, steps: usize, schedule: SigmaSchedule) -> Result<Self> {
        common::reject_unsupported(cfg, DEFAULTS.name, false)?;
        common::require_prediction(
            cfg.prediction_type,
            &[PredictionType::Epsilon, PredictionType::VPrediction],
            DEFAULTS.name,
        )?;
        let ns = NoiseSchedule::new(cfg, &DEFAULTS, true)?;
        common::check_steps(DEFAULTS.name, steps, cfg.num_train_timesteps)?;
        let spacing = cfg.timestep_spacing.unwrap_or(DEFAULTS.spacing);
        // The class has no sigma_min/sigma_max: Karras/exponential/beta span the spaced sigmas.
        let range_cfg = SchedulerConfig {
            sigma_min: None,
            sigma_max: None,
            ..cfg.clone()
        };
        let (timesteps, mut sigmas) = common::k_schedule(&range_cfg, &ns, spacing, schedule, steps);
        sigmas.push(0.0);
        let sigmas: Vec<f64> = sigmas.into_iter().map(f32r).collect();
        let init_sigma = common::k_init_noise_sigma(&sigmas, spacing);
        Ok(Self {
            // ddim_uniform may give more steps than asked (see `SigmaSchedule::DdimUniform`).
            steps: timesteps.len(),
            timesteps,
            sigmas,
            init_sigma,
            prediction: cfg.prediction_type,
        })
    }
}

impl Scheduler for EulerAncestralScheduler {
    fn kind(&self) -> SamplerKind {
        SamplerKind::EulerAncestral
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas)
    }

    fn num_inference_steps(&self) -> usize {
        self.steps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, timestep_index: usize) -> Result<Tensor> {
        common::check_index(timestep_index, self.timesteps.len())?;
        common::k_scale(sample, self.sigmas[timestep_index])
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        common::check_index(timestep_index, self.timesteps.len())?;
        let out_dtype = model_output.dtype();
        let (m, x) = (common::f32t(model_output)?, common::f32t(sample)?);
        let sigma = self.sigmas[timestep_index];
        let sigma_to = self.sigmas[timestep_index + 1];
        let x0 = common::k_x0(self.prediction, &m, &x, sigma)?;
        let sigma_up =
            (sigma_to * sigma_to * (sigma * sigma - sigma_to * sigma_to) / (sigma * sigma)).sqrt();
        let sigma_down = (sigma_to * sigma_to - sigma_up * sigma_up).max(0.0).sqrt();
        let ratio = (sigma_down - sigma) / sigma;
        let prev = common::lin2(1.0 + ratio, &x, -ratio, &x0)?;
        // diffusers draws noise on every step, the last included, so the stream stays aligned.
        let z = noise.randn(m.shape(), DType::F32, m.device())?;
        let prev = (prev + z.affine(sigma_up, 0.0)?)?;
        Ok(prev.to_dtype(out_dtype)?)
    }

    fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        timestep_index: usize,
    ) -> Result<Tensor> {
        common::check_index(timestep_index, self.timesteps.len())?;
        common::lin2(1.0, original, self.sigmas[timestep_index], noise)
    }

    fn reset(&mut self) {}
}
