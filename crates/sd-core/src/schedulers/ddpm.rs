//! DDPM ancestral sampling (Ho et al. 2020), as diffusers' `DDPMScheduler`.

use candle_core::{DType, Tensor};

use super::common::{self, ClassDefaults, NoiseSchedule};
use super::config::{PredictionType, SchedulerConfig, TimestepSpacing};
use super::{NoiseSource, SamplerKind, Scheduler};
use crate::error::{Error, Result};

const DEFAULTS: ClassDefaults = ClassDefaults::standard("DDPM", TimestepSpacing::Leading, true);

/// How the posterior variance is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variance {
    Small,
    SmallLog,
    Large,
}

/// Stochastic DDPM sampling; draws one noise tensor per step except at t = 0.
#[derive(Debug, Clone)]
pub struct DdpmScheduler {
    schedule: NoiseSchedule,
    timesteps: Vec<f64>,
    steps: usize,
    prediction: PredictionType,
    clip: Option<f64>,
    variance: Variance,
}

impl DdpmScheduler {
    /// Builds the schedule for `steps` inference steps.
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        common::reject_unsupported(cfg, DEFAULTS.name, true)?;
        let variance = match cfg.variance_type.as_deref() {
            None | Some("fixed_small") => Variance::Small,
            Some("fixed_small_log") => Variance::SmallLog,
            Some("fixed_large") => Variance::Large,
            Some(other) => {
                return Err(Error::UnsupportedConfig {
                    scheduler: DEFAULTS.name,
                    option: format!("variance_type = {other:?}"),
                    hint: "use fixed_small, fixed_small_log or fixed_large (Stable Diffusion UNets predict no variance)",
                })
            }
        };
        let schedule = NoiseSchedule::new(cfg, &DEFAULTS, false)?;
        let n = cfg.num_train_timesteps;
        common::check_steps(DEFAULTS.name, steps, n)?;
        let spacing = cfg.timestep_spacing.unwrap_or(DEFAULTS.spacing);
        let timesteps = common::spaced_timesteps(spacing, steps, n, cfg.steps_offset)
            .into_iter()
            .map(common::round_even)
            .collect();
        let clip = cfg
            .clip_sample
            .unwrap_or(DEFAULTS.clip_sample)
            .then_some(cfg.clip_sample_range);
        Ok(Self {
            schedule,
            timesteps,
            steps,
            prediction: cfg.prediction_type,
            clip,
            variance,
        })
    }

    fn prev_timestep(&self, index: usize) -> i64 {
        self.timesteps.get(index + 1).map_or(-1, |&t| t as i64)
    }
}

impl Scheduler for DdpmScheduler {
    fn kind(&self) -> SamplerKind {
        SamplerKind::Ddpm
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
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        common::check_index(timestep_index, self.timesteps.len())?;
        let out_dtype = model_output.dtype();
        let (m, x) = (common::f32t(model_output)?, common::f32t(sample)?);
        let t = self.timesteps[timestep_index] as i64;
        let prev_t = self.prev_timestep(timestep_index);
        let a_t = self.schedule.alpha_prod(t, 1.0);
        let a_prev = self.schedule.alpha_prod(prev_t, 1.0);
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let cur_alpha = a_t / a_prev;
        let cur_beta = 1.0 - cur_alpha;
        let mut x0 = common::ddpm_x0(self.prediction, &m, &x, a_t)?;
        if let Some(r) = self.clip {
            x0 = x0.clamp(-r, r)?;
        }
        let x0_coeff = a_prev.sqrt() * cur_beta / b_t;
        let x_coeff = cur_alpha.sqrt() * b_prev / b_t;
        let mut prev = common::lin2(x0_coeff, &x0, x_coeff, &x)?;
        if t > 0 {
            let z = noise.randn(m.shape(), DType::F32, m.device())?;
            let var = (b_prev / b_t * cur_beta).max(1e-20);
            let std = match self.variance {
                Variance::Small => var.sqrt(),
                Variance::SmallLog => (0.5 * var.ln()).exp(),
                Variance::Large => cur_beta.sqrt(),
            };
            prev = (prev + z.affine(std, 0.0)?)?;
        }
        Ok(prev.to_dtype(out_dtype)?)
    }

    fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        timestep_index: usize,
    ) -> Result<Tensor> {
        common::check_index(timestep_index, self.timesteps.len())?;
        let a = self
            .schedule
            .alpha_prod(self.timesteps[timestep_index] as i64, 1.0);
        common::lin2(a.sqrt(), original, (1.0 - a).sqrt(), noise)
    }

    fn reset(&mut self) {}
}
