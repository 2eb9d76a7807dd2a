//! Heun's second-order method (Karras et al. 2022, Algorithm 2 without churn), as diffusers'
//! `HeunDiscreteScheduler`: every step but the last takes two model calls, so
//! [`Scheduler::timesteps`] lists `2·steps − 1` entries.

use candle_core::Tensor;

use super::common::{self, f32r, ClassDefaults, NoiseSchedule};
use super::config::{BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing};
use super::{NoiseSource, SamplerKind, Scheduler, SigmaSchedule};
use crate::error::{Error, Result};

const DEFAULTS: ClassDefaults = ClassDefaults {
    name: "Heun",
    beta_start: 0.00085,
    beta_end: 0.012,
    beta_schedule: BetaSchedule::Linear,
    spacing: TimestepSpacing::Linspace,
    clip_sample: false,
    set_alpha_to_one: true,
};

/// The Euler predictor's result, kept for the correction call.
#[derive(Debug, Clone)]
struct Predictor {
    index: usize,
    derivative: Tensor,
    dt: f64,
    sample: Tensor,
}

/// Deterministic Heun sampling with any sigma schedule.
#[derive(Debug, Clone)]
pub struct HeunScheduler {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    steps: usize,
    init_sigma: f64,
    prediction: PredictionType,
    clip: Option<f64>,
    pending: Option<Predictor>,
}

impl HeunScheduler {
    /// Builds the schedule for `steps` inference steps.
    pub fn new(cfg: &SchedulerConfig, steps: usize, schedule: SigmaSchedule) -> Result<Self> {
        common::reject_unsupported(cfg, DEFAULTS.name, false)?;
        // diffusers' Heun has no zero-terminal-SNR option and ignores the key.
        let cfg = &SchedulerConfig {
            rescale_betas_zero_snr: false,
            ..cfg.clone()
        };
        let ns = NoiseSchedule::new(cfg, &DEFAULTS, false)?;
        common::check_steps(DEFAULTS.name, steps, cfg.num_train_timesteps)?;
        let spacing = cfg.timestep_spacing.unwrap_or(DEFAULTS.spacing);
        let (ts, sg) = common::k_schedule(cfg, &ns, spacing, schedule, steps);
        // [t0, t1, t1, …, tn-1, tn-1] and [s0, s1, s1, …, sn-1, sn-1, 0], as diffusers interleaves them.
        let mut timesteps = vec![ts[0]];
        for &t in &ts[1..] {
            timesteps.extend([t, t]);
        }
        let mut sigmas = vec![f32r(sg[0])];
        for &s in &sg[1..] {
            sigmas.extend([f32r(s), f32r(s)]);
        }
        sigmas.push(0.0);
        let init_sigma = common::k_init_noise_sigma(&sigmas, spacing);
        let clip = cfg
            .clip_sample
            .unwrap_or(DEFAULTS.clip_sample)
            .then_some(cfg.clip_sample_range);
        Ok(Self {
            // ddim_uniform may give more steps than asked (see `SigmaSchedule::DdimUniform`).
            steps: ts.len(),
            timesteps,
            sigmas,
            init_sigma,
            prediction: cfg.prediction_type,
            clip,
            pending: None,
        })
    }
}

impl Scheduler for HeunScheduler {
    fn kind(&self) -> SamplerKind {
        SamplerKind::Heun
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

    fn order(&self) -> usize {
        2
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
        let i = timestep_index;
        common::check_index(i, self.timesteps.len())?;
        let out_dtype = model_output.dtype();
        let (m, x) = (common::f32t(model_output)?, common::f32t(sample)?);
        // Even indices are Euler predictor calls, odd ones the trapezoidal correction.
        let first_order = i % 2 == 0;
        let (sigma, sigma_next) = if first_order {
            (self.sigmas[i], self.sigmas[i + 1])
        } else {
            (self.sigmas[i - 1], self.sigmas[i])
        };
        let sigma_input = if first_order { sigma } else { sigma_next };
        let mut x0 = common::k_x0(self.prediction, &m, &x, sigma_input)?;
        if let Some(r) = self.clip {
            x0 = x0.clamp(-r, r)?;
        }
        let prev = if first_order {
            let derivative = ((&x - &x0)? / sigma)?;
            let dt = sigma_next - sigma;
            let prev = (&x + derivative.affine(dt, 0.0)?)?;
            self.pending = Some(Predictor {
                index: i,
                derivative,
                dt,
                sample: x,
            });
            prev
        } else {
            let p = match self.pending.take() {
                Some(p) if p.index + 1 == i => p,
                _ => {
                    return Err(Error::StepOutOfOrder {
                        scheduler: "Heun",
                        index: i,
                        expected: i - 1,
                    })
                }
            };
            let derivative = ((&x - &x0)? / sigma_next)?;
            let derivative = ((p.derivative + derivative)? * 0.5)?;
            (p.sample + derivative.affine(p.dt, 0.0)?)?
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
        common::lin2(1.0, original, self.sigmas[timestep_index], noise)
    }

    fn reset(&mut self) {
        self.pending = None;
    }
}
