//! Trajectory Consistency Distillation sampling (Zheng et al. 2024, "TCD"), as diffusers'
//! `TCDScheduler`, for TCD-distilled models and LoRAs.
//!
//! Its stochasticity `eta` (the paper's gamma) is a `step` argument in diffusers, not a config
//! field; [`TcdScheduler::DEFAULT_ETA`] is diffusers' `step` default, 0.3 (diffusers' SD
//! pipelines pass their own `eta`, 0 unless the caller sets it).

use candle_core::{DType, Tensor};

use super::common::{self, ClassDefaults, NoiseSchedule};
use super::config::{BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing};
use super::lcm::distilled_timesteps;
use super::{NoiseSource, SamplerKind, Scheduler};
use crate::error::{Error, Result};

const DEFAULTS: ClassDefaults = ClassDefaults {
    name: "TCD",
    beta_start: 0.00085,
    beta_end: 0.012,
    beta_schedule: BetaSchedule::ScaledLinear,
    spacing: TimestepSpacing::Leading,
    clip_sample: false,
    set_alpha_to_one: true,
};

/// TCD sampling; with `eta > 0` every step but the last re-noises part of the way.
#[derive(Debug, Clone)]
pub struct TcdScheduler {
    schedule: NoiseSchedule,
    timesteps: Vec<f64>,
    steps: usize,
    original_steps: usize,
    eta: f64,
    prediction: PredictionType,
}

impl TcdScheduler {
    /// The default gamma (`eta`) of diffusers' `TCDScheduler.step`.
    pub const DEFAULT_ETA: f64 = 0.3;

    /// Builds the schedule for `steps` inference steps (at most `original_inference_steps`)
    /// with the default `eta` of 0.3.
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        Self::with_eta(cfg, steps, Self::DEFAULT_ETA)
    }

    /// Builds the schedule with stochasticity `eta` in [0, 1] (0: deterministic).
    pub fn with_eta(cfg: &SchedulerConfig, steps: usize, eta: f64) -> Result<Self> {
        // diffusers' TCD step never applies thresholding or clip_sample, so both are ignored.
        common::reject_unsupported(cfg, DEFAULTS.name, false)?;
        if !(0.0..=1.0).contains(&eta) {
            return Err(Error::UnsupportedConfig {
                scheduler: DEFAULTS.name,
                option: format!("eta = {eta}"),
                hint: "eta (gamma) must lie in [0, 1]; TCD uses 0.3",
            });
        }
        let schedule = NoiseSchedule::new(cfg, &DEFAULTS, false)?;
        let n = cfg.num_train_timesteps;
        common::check_steps(DEFAULTS.name, steps, n)?;
        let original_steps = cfg.original_inference_steps.unwrap_or(50);
        if original_steps == 0 || original_steps > n {
            return Err(Error::UnsupportedConfig {
                scheduler: DEFAULTS.name,
                option: format!("original_inference_steps = {original_steps}"),
                hint: "it must lie in 1..=num_train_timesteps (TCD models use 50)",
            });
        }
        if steps > original_steps {
            return Err(Error::InvalidSteps {
                scheduler: DEFAULTS.name,
                steps,
                max: original_steps,
            });
        }
        let timesteps = distilled_timesteps(DEFAULTS.name, n, original_steps, steps, 1.0)?;
        Ok(Self {
            schedule,
            timesteps,
            steps,
            original_steps,
            eta,
            prediction: cfg.prediction_type,
        })
    }
}

impl Scheduler for TcdScheduler {
    fn kind(&self) -> SamplerKind {
        SamplerKind::Tcd
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
        let i = timestep_index;
        common::check_index(i, self.timesteps.len())?;
        let out_dtype = model_output.dtype();
        let (m, x) = (common::f32t(model_output)?, common::f32t(sample)?);
        let t = self.timesteps[i] as i64;
        let prev_t = self.timesteps.get(i + 1).map_or(0, |&p| p as i64);
        let t_s = ((1.0 - self.eta) * prev_t as f64).floor() as i64;
        let a_t = self.schedule.alpha_prod(t, 1.0);
        let a_prev = self.schedule.alpha_prod(prev_t, 1.0);
        let a_s = self.schedule.alpha_prod(t_s, 1.0);
        let (b_t, b_s) = (1.0 - a_t, 1.0 - a_s);
        let (x0, eps) = match self.prediction {
            PredictionType::Epsilon => (
                common::lin2(1.0 / a_t.sqrt(), &x, -b_t.sqrt() / a_t.sqrt(), &m)?,
                m.clone(),
            ),
            PredictionType::Sample => (
                m.clone(),
                common::lin2(1.0 / b_t.sqrt(), &x, -a_t.sqrt() / b_t.sqrt(), &m)?,
            ),
            PredictionType::VPrediction => (
                common::lin2(a_t.sqrt(), &x, -b_t.sqrt(), &m)?,
                common::lin2(a_t.sqrt(), &m, b_t.sqrt(), &x)?,
            ),
        };
        let noised = common::lin2(a_s.sqrt(), &x0, b_s.sqrt(), &eps)?;
        let prev = if self.eta > 0.0 && i + 1 != self.steps {
            let z = noise.randn(m.shape(), DType::F32, m.device())?;
            let r = a_prev / a_s;
            common::lin2(r.sqrt(), &noised, (1.0 - r).max(0.0).sqrt(), &z)?
        } else {
            noised
        };
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

    /// Back to the full schedule, undoing a `begin_at_strength` (so the scheduler can run txt2img again).
    fn reset(&mut self) {
        if let Ok(t) = distilled_timesteps(DEFAULTS.name, self.schedule.len(), self.original_steps, self.steps, 1.0) {
            self.timesteps = t;
        }
    }

    /// Like LCM, TCD spreads its steps over the strength-truncated distillation schedule
    /// (diffusers' `set_timesteps(strength=…)`), so the run always starts at index 0.
    fn begin_at_strength(&mut self, strength: f64) -> Result<usize> {
        common::check_strength(strength, self.steps)?;
        self.timesteps = distilled_timesteps(
            DEFAULTS.name,
            self.schedule.len(),
            self.original_steps,
            self.steps,
            strength,
        )?;
        Ok(0)
    }
}
