//! DDIM (Song et al. 2020) with eta = 0, as diffusers' `DDIMScheduler`.

use candle_core::Tensor;

use super::common::{self, ClassDefaults, NoiseSchedule};
use super::config::{PredictionType, SchedulerConfig, TimestepSpacing};
use super::{NoiseSource, SamplerKind, Scheduler};
use crate::error::Result;

const DEFAULTS: ClassDefaults = ClassDefaults::standard("DDIM", TimestepSpacing::Leading, true);

/// Deterministic DDIM sampling.
#[derive(Debug, Clone)]
pub struct DdimScheduler {
    schedule: NoiseSchedule,
    timesteps: Vec<f64>,
    steps: usize,
    step_ratio: i64,
    final_alpha_cumprod: f64,
    prediction: PredictionType,
    clip: Option<f64>,
}

impl DdimScheduler {
    /// Builds the schedule for `steps` inference steps.
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        common::reject_unsupported(cfg, DEFAULTS.name, true)?;
        let schedule = NoiseSchedule::new(cfg, &DEFAULTS, false)?;
        let n = cfg.num_train_timesteps;
        common::check_steps(DEFAULTS.name, steps, n)?;
        let spacing = cfg.timestep_spacing.unwrap_or(DEFAULTS.spacing);
        let timesteps: Vec<f64> = common::spaced_timesteps(spacing, steps, n, cfg.steps_offset)
            .into_iter()
            .map(common::round_even)
            .collect();
        let final_alpha_cumprod = if cfg.set_alpha_to_one.unwrap_or(DEFAULTS.set_alpha_to_one) {
            1.0
        } else {
            schedule.alphas_cumprod[0]
        };
        let clip = cfg
            .clip_sample
            .unwrap_or(DEFAULTS.clip_sample)
            .then_some(cfg.clip_sample_range);
        Ok(Self {
            schedule,
            timesteps,
            steps,
            step_ratio: (n / steps) as i64,
            final_alpha_cumprod,
            prediction: cfg.prediction_type,
            clip,
        })
    }
}

impl Scheduler for DdimScheduler {
    fn kind(&self) -> SamplerKind {
        SamplerKind::Ddim
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn num_inference_steps(&self) -> usize {
        self.steps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, timestep_index: usize) -> Result<Tensor> {
        common::check_index(timestep_index, self.timesteps.len())?;
        Ok(sample.clone())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep_index: usize,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        common::check_index(timestep_index, self.timesteps.len())?;
        let out_dtype = model_output.dtype();
        let (eps_in, x) = (common::f32t(model_output)?, common::f32t(sample)?);
        let t = self.timesteps[timestep_index] as i64;
        // diffusers steps back by T / steps whatever the spacing, not to the next listed timestep.
        let prev_t = t - self.step_ratio;
        let a_t = self.schedule.alpha_prod(t, self.final_alpha_cumprod);
        let a_prev = self.schedule.alpha_prod(prev_t, self.final_alpha_cumprod);
        let b_t = 1.0 - a_t;
        let (mut x0, eps) = match self.prediction {
            PredictionType::Epsilon => (
                common::ddpm_x0(self.prediction, &eps_in, &x, a_t)?,
                eps_in.clone(),
            ),
            PredictionType::VPrediction => (
                common::lin2(a_t.sqrt(), &x, -b_t.sqrt(), &eps_in)?,
                common::lin2(a_t.sqrt(), &eps_in, b_t.sqrt(), &x)?,
            ),
            PredictionType::Sample => (
                eps_in.clone(),
                common::lin2(1.0 / b_t.sqrt(), &x, -a_t.sqrt() / b_t.sqrt(), &eps_in)?,
            ),
        };
        if let Some(r) = self.clip {
            // Like diffusers (use_clipped_model_output = false), eps stays the unclipped one.
            x0 = x0.clamp(-r, r)?;
        }
        let prev = common::lin2(a_prev.sqrt(), &x0, (1.0 - a_prev).sqrt(), &eps)?;
        Ok(prev.to_dtype(out_dtype)?)
    }

    fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        timestep_index: usize,
    ) -> Result<Tensor> {
        common::check_index(timestep_index, self.timesteps.len())?;
        let a = self.schedule.alpha_prod(
            self.timesteps[timestep_index] as i64,
            self.final_alpha_cumprod,
        );
        common::lin2(a.sqrt(), original, (1.0 - a).sqrt(), noise)
    }

    fn reset(&mut self) {}
}
