//! Pseudo numerical methods for diffusion models (Liu et al. 2022, "PNDM"/"PLMS"), as diffusers'
//! `PNDMScheduler`, the scheduler Stable Diffusion 1.x ships in its `scheduler_config.json`.
//!
//! With `skip_prk_steps = true` (every SD config) it is pseudo linear multistep sampling: the
//! first step is repeated once (a second-order start), so [`Scheduler::timesteps`] lists
//! `steps + 1` entries. With `skip_prk_steps = false` the first three steps run the pseudo
//! Runge–Kutta method with four model calls each (`steps + 9` entries; at least 4 steps).

use candle_core::Tensor;

use super::common::{self, round_even, ClassDefaults, NoiseSchedule};
use super::config::{PredictionType, SchedulerConfig, TimestepSpacing};
use super::{NoiseSource, SamplerKind, Scheduler};
use crate::error::{Error, Result};

const DEFAULTS: ClassDefaults = ClassDefaults {
    set_alpha_to_one: false,
    ..ClassDefaults::standard("PNDM", TimestepSpacing::Leading, false)
};

/// The number of pseudo Runge–Kutta calls (three steps of four calls).
const PRK_CALLS: usize = 12;

/// PLMS / PNDM sampling.
#[derive(Debug, Clone)]
pub struct PndmScheduler {
    schedule: NoiseSchedule,
    final_alpha: f64,
    timesteps: Vec<f64>,
    steps: usize,
    /// `num_train_timesteps / steps`, the timestep distance diffusers steps over.
    ratio: i64,
    skip_prk: bool,
    prediction: PredictionType,
    /// Calls since the run started (diffusers' `counter`).
    counter: usize,
    /// Model outputs of the last (up to four) steps, oldest first (diffusers' `ets`).
    ets: Vec<Tensor>,
    /// The Runge–Kutta weighted sum of model outputs so far.
    rk_sum: Option<Tensor>,
    /// The sample at the start of the step being refined.
    cur_sample: Option<Tensor>,
    next_index: Option<usize>,
}

impl PndmScheduler {
    /// Builds the schedule for `steps` inference steps.
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        common::reject_unsupported(cfg, DEFAULTS.name, false)?;
        common::require_prediction(
            cfg.prediction_type,
            &[PredictionType::Epsilon, PredictionType::VPrediction],
            DEFAULTS.name,
        )?;
        // PNDM has no zero-terminal-SNR option in diffusers and ignores the key.
        let cfg = &SchedulerConfig {
            rescale_betas_zero_snr: false,
            ..cfg.clone()
        };
        let schedule = NoiseSchedule::new(cfg, &DEFAULTS, false)?;
        let n = cfg.num_train_timesteps;
        common::check_steps(DEFAULTS.name, steps, n)?;
        let skip_prk = cfg.skip_prk_steps.unwrap_or(false);
        if !skip_prk && steps < 4 {
            return Err(Error::UnsupportedConfig {
                scheduler: DEFAULTS.name,
                option: format!("skip_prk_steps = false with {steps} steps"),
                hint: "its Runge-Kutta warm-up needs at least 4 steps; use more steps or set skip_prk_steps to true",
            });
        }
        let ratio = n / steps;
        // Ascending, as diffusers' `_timesteps`.
        let base: Vec<i64> = match cfg.timestep_spacing.unwrap_or(DEFAULTS.spacing) {
            TimestepSpacing::Linspace => common::linspace(0.0, (n - 1) as f64, steps)
                .into_iter()
                .map(|t| round_even(t) as i64)
                .collect(),
            TimestepSpacing::Leading => (0..steps)
                .map(|i| (i * ratio + cfg.steps_offset) as i64)
                .collect(),
            TimestepSpacing::Trailing => {
                let mut v = common::spaced_timesteps(TimestepSpacing::Trailing, steps, n, 0);
                v.reverse();
                v.into_iter().map(|t| t as i64).collect()
            }
        };
        let timesteps: Vec<i64> = if skip_prk {
            let mut v: Vec<i64> = base[..steps - 1].to_vec();
            if steps >= 2 {
                v.push(base[steps - 2]);
            }
            v.push(base[steps - 1]);
            v.reverse();
            v
        } else {
            // diffusers: the last four timesteps, each followed by its half-step, every value
            // but the ends doubled, reversed; then PLMS over the remaining timesteps.
            let half = (ratio / 2) as i64;
            let mut prk: Vec<i64> = base[steps - 4..]
                .iter()
                .flat_map(|&t| [t, t + half])
                .collect();
            prk.pop();
            let doubled: Vec<i64> = prk.iter().flat_map(|&t| [t, t]).collect();
            let mut prk: Vec<i64> = doubled[1..doubled.len() - 1].to_vec();
            prk.reverse();
            prk.extend(base[..steps - 3].iter().rev());
            prk
        };
        let final_alpha = if cfg.set_alpha_to_one.unwrap_or(DEFAULTS.set_alpha_to_one) {
            1.0
        } else {
            schedule.alphas_cumprod[0]
        };
        Ok(Self {
            schedule,
            final_alpha,
            timesteps: timesteps.into_iter().map(|t| t as f64).collect(),
            steps,
            ratio: ratio as i64,
            skip_prk,
            prediction: cfg.prediction_type,
            counter: 0,
            ets: Vec::new(),
            rk_sum: None,
            cur_sample: None,
            next_index: None,
        })
    }

    /// diffusers' `_get_prev_sample`: the DDIM-like transfer from `t` to `prev_t` given the
    /// (combined) model output.
    fn transfer(
        &self,
        sample: &Tensor,
        t: i64,
        prev_t: i64,
        model_output: &Tensor,
    ) -> Result<Tensor> {
        let a_t = self.schedule.alpha_prod(t, self.final_alpha);
        let a_prev = self.schedule.alpha_prod(prev_t, self.final_alpha);
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let eps = match self.prediction {
            PredictionType::VPrediction => {
                common::lin2(a_t.sqrt(), model_output, b_t.sqrt(), sample)?
            }
            _ => model_output.clone(),
        };
        let denom = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
        common::lin2((a_prev / a_t).sqrt(), sample, -(a_prev - a_t) / denom, &eps)
    }

    fn step_prk(&mut self, m: &Tensor, t: i64, x: &Tensor) -> Result<Tensor> {
        let c = self.counter;
        let diff_to_prev = if c % 2 == 1 { 0 } else { self.ratio / 2 };
        let prev_t = t - diff_to_prev;
        let t = self.timesteps[c / 4 * 4] as i64;
        let add = |sum: &Option<Tensor>, w: f64| -> Result<Tensor> {
            let term = m.affine(w, 0.0)?;
            Ok(match sum {
                Some(s) => (s + term)?,
                None => term,
            })
        };
        let model_output = match c % 4 {
            0 => {
                self.rk_sum = Some(add(&self.rk_sum, 1.0 / 6.0)?);
                self.ets.push(m.clone());
                self.cur_sample = Some(x.clone());
                m.clone()
            }
            1 | 2 => {
                self.rk_sum = Some(add(&self.rk_sum, 1.0 / 3.0)?);
                m.clone()
            }
            _ => {
                let out = add(&self.rk_sum, 1.0 / 6.0)?;
                self.rk_sum = None;
                out
            }
        };
        let cur = self.cur_sample.clone().unwrap_or_else(|| x.clone());
        self.transfer(&cur, t, prev_t, &model_output)
    }

    fn step_plms(&mut self, m: &Tensor, t: i64, x: &Tensor) -> Result<Tensor> {
        let c = self.counter;
        let (mut t, mut prev_t) = (t, t - self.ratio);
        if c != 1 {
            if self.ets.len() > 3 {
                self.ets.drain(..self.ets.len() - 3);
            }
            self.ets.push(m.clone());
        } else {
            prev_t = t;
            t += self.ratio;
        }
        let e = &self.ets;
        let n = e.len();
        let mut sample = x.clone();
        let model_output = if n == 1 && c == 0 {
            self.cur_sample = Some(x.clone());
            m.clone()
        } else if n == 1 && c == 1 {
            if let Some(s) = self.cur_sample.take() {
                sample = s;
            }
            ((m + &e[0])? * 0.5)?
        } else if n == 2 {
            common::lin2(1.5, &e[1], -0.5, &e[0])?
        } else if n == 3 {
            (common::lin2(23.0 / 12.0, &e[2], -16.0 / 12.0, &e[1])?
                + e[0].affine(5.0 / 12.0, 0.0)?)?
        } else {
            let a = common::lin2(55.0 / 24.0, &e[3], -59.0 / 24.0, &e[2])?;
            let b = common::lin2(37.0 / 24.0, &e[1], -9.0 / 24.0, &e[0])?;
            (a + b)?
        };
        self.transfer(&sample, t, prev_t, &model_output)
    }
}

impl Scheduler for PndmScheduler {
    fn kind(&self) -> SamplerKind {
        SamplerKind::Pndm
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
        let i = timestep_index;
        common::check_index(i, self.timesteps.len())?;
        if self.next_index != Some(i) {
            // A jump (first call, img2img start, a new image) starts a fresh history, as a new
            // `set_timesteps` does in diffusers.
            self.reset();
        }
        let out_dtype = model_output.dtype();
        let (m, x) = (common::f32t(model_output)?, common::f32t(sample)?);
        let t = self.timesteps[i] as i64;
        let prev = if !self.skip_prk && self.counter < PRK_CALLS {
            self.step_prk(&m, t, &x)?
        } else {
            self.step_plms(&m, t, &x)?
        };
        self.counter += 1;
        self.next_index = Some(i + 1);
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
            .alpha_prod(self.timesteps[timestep_index] as i64, self.final_alpha);
        common::lin2(a.sqrt(), original, (1.0 - a).sqrt(), noise)
    }

    fn reset(&mut self) {
        self.counter = 0;
        self.ets.clear();
        self.rk_sum = None;
        self.cur_sample = None;
        self.next_index = None;
    }
}
