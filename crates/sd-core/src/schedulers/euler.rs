//! Euler's method on the probability-flow ODE (k-diffusion `sample_euler`), as diffusers'
//! `EulerDiscreteScheduler` with `s_churn = 0`; and Euler CFG++ (Chung et al. 2024, ComfyUI's
//! `sample_euler_cfg_pp`, Forge's "Euler CFG++"), which steps to the guided denoised estimate and
//! re-noises it along the unconditional prediction's direction.

use candle_core::Tensor;

use super::common::{self, f32r, ClassDefaults, NoiseSchedule};
use super::config::{FinalSigmas, Interpolation, PredictionType, SchedulerConfig, TimestepSpacing};
use super::{NoiseSource, SamplerKind, Scheduler, SigmaSchedule};
use crate::error::{Error, Result};

const DEFAULTS: ClassDefaults = ClassDefaults::standard("Euler", TimestepSpacing::Linspace, false);

/// Deterministic Euler sampling with any sigma schedule.
#[derive(Debug, Clone)]
pub struct EulerScheduler {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    steps: usize,
    init_sigma: f64,
    prediction: PredictionType,
    /// Euler CFG++: guided steps re-noise along the unconditional direction.
    cfg_pp: bool,
}

impl EulerScheduler {
    /// Euler CFG++ on the same schedule (CFG++ scales are small: about 0.5–2 where CFG uses 5–10).
    pub fn new_cfg_pp(cfg: &SchedulerConfig, steps: usize, schedule: SigmaSchedule) -> Result<Self> {
        Ok(Self { cfg_pp: true, ..Self::new(cfg, steps, schedule)? })
    }

    /// Builds the schedule for `steps` inference steps.
    pub fn new(cfg: &SchedulerConfig, steps: usize, schedule: SigmaSchedule) -> Result<Self> {
        common::reject_unsupported(cfg, DEFAULTS.name, false)?;
        if cfg.interpolation_type == Interpolation::LogLinear {
            return Err(Error::UnsupportedConfig {
                scheduler: DEFAULTS.name,
                option: "interpolation_type = log_linear".into(),
                hint: "use linear interpolation or exponential sigmas",
            });
        }
        if cfg.timestep_type.as_deref() == Some("continuous")
            && cfg.prediction_type == PredictionType::VPrediction
        {
            return Err(Error::UnsupportedConfig {
                scheduler: DEFAULTS.name,
                option: "timestep_type = continuous".into(),
                hint: "use discrete timesteps",
            });
        }
        let ns = NoiseSchedule::new(cfg, &DEFAULTS, true)?;
        common::check_steps(DEFAULTS.name, steps, cfg.num_train_timesteps)?;
        let spacing = cfg.timestep_spacing.unwrap_or(DEFAULTS.spacing);
        let (timesteps, mut sigmas) = common::k_schedule(cfg, &ns, spacing, schedule, steps);
        let last = match cfg.final_sigmas_type.unwrap_or_default() {
            FinalSigmas::Zero => 0.0,
            FinalSigmas::SigmaMin => ns.train_sigmas()[0],
        };
        sigmas.push(last);
        let sigmas: Vec<f64> = sigmas.into_iter().map(f32r).collect();
        let init_sigma = common::k_init_noise_sigma(&sigmas, spacing);
        Ok(Self {
            // ddim_uniform may give more steps than asked (see `SigmaSchedule::DdimUniform`).
            steps: timesteps.len(),
            timesteps,
            sigmas,
            init_sigma,
            prediction: cfg.prediction_type,
            cfg_pp: false,
        })
    }
}

impl Scheduler for EulerScheduler {
    fn kind(&self) -> SamplerKind {
        if self.cfg_pp {
            SamplerKind::EulerCfgPp
        } else {
            SamplerKind::Euler
        }
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
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        common::check_index(timestep_index, self.timesteps.len())?;
        // Given one prediction (an unguided run), CFG++ has no unconditional direction to re-noise along:
        // it is Euler. Pipelines run it guided (`SamplerKind::needs_uncond`).
        self.euler_step(model_output, timestep_index, sample)
    }

    fn step_guided(
        &mut self,
        uncond: &Tensor,
        cond: &Tensor,
        scale: f64,
        timestep_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let guided = (uncond + ((cond - uncond)? * scale)?)?;
        if !self.cfg_pp {
            return self.step(&guided, timestep_index, sample, noise);
        }
        common::check_index(timestep_index, self.timesteps.len())?;
        let out_dtype = guided.dtype();
        let (g, u, x) = (common::f32t(&guided)?, common::f32t(uncond)?, common::f32t(sample)?);
        let sigma = self.sigmas[timestep_index];
        let x0_guided = common::k_x0(self.prediction, &g, &x, sigma)?;
        let x0_uncond = common::k_x0(self.prediction, &u, &x, sigma)?;
        // x0_guided + (x - x0_uncond) / sigma * sigma_next
        let r = self.sigmas[timestep_index + 1] / sigma;
        let prev = (common::lin2(1.0, &x0_guided, r, &x)? - (x0_uncond * r)?)?;
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

impl EulerScheduler {
    /// The plain Euler update from one prediction.
    fn euler_step(&self, model_output: &Tensor, timestep_index: usize, sample: &Tensor) -> Result<Tensor> {
        let out_dtype = model_output.dtype();
        let (m, x) = (common::f32t(model_output)?, common::f32t(sample)?);
        let sigma = self.sigmas[timestep_index];
        let x0 = common::k_x0(self.prediction, &m, &x, sigma)?;
        // x + (x - x0) / sigma * (sigma_next - sigma)
        let ratio = (self.sigmas[timestep_index + 1] - sigma) / sigma;
        let prev = common::lin2(1.0 + ratio, &x, -ratio, &x0)?;
        Ok(prev.to_dtype(out_dtype)?)
    }
}
