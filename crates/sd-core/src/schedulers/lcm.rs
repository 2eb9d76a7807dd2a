//! Latent Consistency Model multistep sampling (Luo et al. 2023), as diffusers' `LCMScheduler`.

use candle_core::{DType, Tensor};

use super::common::{self, ClassDefaults, NoiseSchedule};
use super::config::{BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing};
use super::{NoiseSource, SamplerKind, Scheduler};
use crate::error::{Error, Result};

const DEFAULTS: ClassDefaults = ClassDefaults {
    name: "LCM",
    beta_start: 0.00085,
    beta_end: 0.012,
    beta_schedule: BetaSchedule::ScaledLinear,
    spacing: TimestepSpacing::Leading,
    clip_sample: false,
    set_alpha_to_one: true,
};

/// LCM sampling; every step but the last re-noises the consistency prediction.
#[derive(Debug, Clone)]
pub struct LcmScheduler {
    schedule: NoiseSchedule,
    timesteps: Vec<f64>,
    steps: usize,
    original_steps: usize,
    timestep_scaling: f64,
    prediction: PredictionType,
    clip: Option<f64>,
}

impl LcmScheduler {
    /// Builds the schedule for `steps` inference steps (at most `original_inference_steps`).
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        common::reject_unsupported(cfg, DEFAULTS.name, true)?;
        let schedule = NoiseSchedule::new(cfg, &DEFAULTS, false)?;
        let n = cfg.num_train_timesteps;
        common::check_steps(DEFAULTS.name, steps, n)?;
        let original_steps = cfg.original_inference_steps.unwrap_or(50);
        if original_steps == 0 || original_steps > n {
            return Err(Error::UnsupportedConfig {
                scheduler: DEFAULTS.name,
                option: format!("original_inference_steps = {original_steps}"),
                hint: "it must lie in 1..=num_train_timesteps (LCM models use 50)",
            });
        }
        if steps > original_steps {
            return Err(Error::InvalidSteps {
                scheduler: DEFAULTS.name,
                steps,
                max: original_steps,
            });
        }
        let mut s = Self {
            schedule,
            timesteps: Vec::new(),
            steps,
            original_steps,
            timestep_scaling: cfg.timestep_scaling.unwrap_or(10.0),
            prediction: cfg.prediction_type,
            clip: cfg
                .clip_sample
                .unwrap_or(DEFAULTS.clip_sample)
                .then_some(cfg.clip_sample_range),
        };
        s.timesteps = s.lcm_timesteps(1.0)?;
        Ok(s)
    }

    /// Picks `steps` timesteps from the distillation schedule, truncated by img2img `strength`.
    fn lcm_timesteps(&self, strength: f64) -> Result<Vec<f64>> {
        distilled_timesteps(
            DEFAULTS.name,
            self.schedule.len(),
            self.original_steps,
            self.steps,
            strength,
        )
    }
}

/// LCM/TCD timesteps: `steps` picks from the `original_steps`-step distillation schedule of a
/// `num_train`-step model, truncated by img2img `strength`.
pub(crate) fn distilled_timesteps(
    name: &'static str,
    num_train: usize,
    original_steps: usize,
    steps: usize,
    strength: f64,
) -> Result<Vec<f64>> {
    let k = num_train / original_steps;
    let count = (original_steps as f64 * strength) as usize;
    if count / steps < 1 {
        return Err(Error::InvalidStrength {
            strength,
            steps,
            reason: format!(
                "{name} spreads its steps over original_inference_steps × strength = {count} \
                 timesteps; raise strength or use at most {count} steps"
            ),
        });
    }
    let origin: Vec<usize> = (1..=count).rev().map(|i| i * k - 1).collect();
    let step = count as f64 / steps as f64;
    Ok((0..steps)
        .map(|i| origin[((i as f64 * step).floor() as usize).min(count - 1)] as f64)
        .collect())
}

impl Scheduler for LcmScheduler {
    fn kind(&self) -> SamplerKind {
        SamplerKind::Lcm
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
        let t = self.timesteps[i];
        let prev_t = self.timesteps.get(i + 1).copied().unwrap_or(t);
        let a_t = self.schedule.alpha_prod(t as i64, 1.0);
        let a_prev = self.schedule.alpha_prod(prev_t as i64, 1.0);
        let scaled = t * self.timestep_scaling;
        let c_skip = 0.25 / (scaled * scaled + 0.25);
        let c_out = scaled / (scaled * scaled + 0.25).sqrt();
        let mut x0 = common::ddpm_x0(self.prediction, &m, &x, a_t)?;
        if let Some(r) = self.clip {
            x0 = x0.clamp(-r, r)?;
        }
        let denoised = common::lin2(c_out, &x0, c_skip, &x)?;
        let prev = if i + 1 != self.steps {
            let z = noise.randn(m.shape(), DType::F32, m.device())?;
            common::lin2(a_prev.sqrt(), &denoised, (1.0 - a_prev).sqrt(), &z)?
        } else {
            denoised
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
        if let Ok(t) = self.lcm_timesteps(1.0) {
            self.timesteps = t;
        }
    }

    /// LCM spreads its steps over the strength-truncated distillation schedule (diffusers'
    /// `set_timesteps(strength=…)`), so the run always starts at index 0.
    fn begin_at_strength(&mut self, strength: f64) -> Result<usize> {
        common::check_strength(strength, self.steps)?;
        self.timesteps = self.lcm_timesteps(strength)?;
        Ok(0)
    }
}
