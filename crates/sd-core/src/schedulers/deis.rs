//! Diffusion exponential integrator sampling (Zhang & Chen 2022, "DEIS", log-rho multistep), as
//! diffusers' `DEISMultistepScheduler` (order 2 unless the config's `solver_order` says 1 or 3).

use candle_core::Tensor;

use super::common::{self, f32r, ClassDefaults, NoiseSchedule};
use super::config::{PredictionType, SchedulerConfig, TimestepSpacing};
use super::dpmpp::{vp_alpha_sigma, vp_schedule, vp_x0};
use super::{NoiseSource, SamplerKind, Scheduler, SigmaSchedule};
use crate::error::{Error, Result};

const DEFAULTS: ClassDefaults = ClassDefaults::standard("DEIS", TimestepSpacing::Linspace, false);

/// Deterministic multistep DEIS.
#[derive(Debug, Clone)]
pub struct DeisScheduler {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    steps: usize,
    prediction: PredictionType,
    solver_order: usize,
    lower_order_final: bool,
    /// Noise predictions of the last `solver_order` steps, newest last.
    outputs: Vec<Tensor>,
    lower_order_nums: usize,
    next_index: Option<usize>,
}

impl DeisScheduler {
    /// Builds the schedule for `steps` inference steps.
    pub fn new(cfg: &SchedulerConfig, steps: usize, schedule: SigmaSchedule) -> Result<Self> {
        common::reject_unsupported(cfg, DEFAULTS.name, true)?;
        let solver_order = cfg.solver_order.unwrap_or(2);
        if !(1..=3).contains(&solver_order) {
            return Err(Error::UnsupportedConfig {
                scheduler: DEFAULTS.name,
                option: format!("solver_order = {solver_order}"),
                hint: "DEIS has orders 1, 2 and 3; use 2 (the default)",
            });
        }
        match cfg.solver_type.as_deref() {
            // diffusers maps the DPM-Solver/UniPC solver types to logrho.
            None | Some("logrho" | "midpoint" | "heun" | "bh1" | "bh2") => {}
            Some(other) => {
                return Err(Error::UnsupportedConfig {
                    scheduler: DEFAULTS.name,
                    option: format!("solver_type = {other:?}"),
                    hint: "DEIS only has the logrho solver; remove solver_type",
                })
            }
        }
        let cfg = &common::k_class_config(cfg);
        let ns = NoiseSchedule::new(cfg, &DEFAULTS, false)?;
        let n = cfg.num_train_timesteps;
        // At n steps the spacing repeats a timestep, and the multistep update divides by the zero gap.
        common::check_steps(DEFAULTS.name, steps, n - 1)?;
        let spacing = cfg.timestep_spacing.unwrap_or(DEFAULTS.spacing);
        let timesteps = common::multistep_timesteps(spacing, steps, n, n, cfg.steps_offset);
        let (timesteps, mut sigmas) = vp_schedule(cfg, &ns, timesteps, schedule, steps, true);
        // diffusers ends DEIS at the smallest training sigma (default spacing) or repeats the
        // last sigma (its Karras/exponential/beta schedules, which end there), never at 0. The table
        // schedules diffusers lacks (SGM uniform, simple, DDIM, AYS) can stop above it: they end at it.
        let last_sigma = sigmas.last().copied().unwrap_or(0.0);
        let last = match schedule {
            SigmaSchedule::Default => ns.train_sigmas()[0],
            SigmaSchedule::Karras | SigmaSchedule::Exponential | SigmaSchedule::Beta => last_sigma,
            _ => last_sigma.min(ns.train_sigmas()[0]),
        };
        sigmas.push(last);
        Ok(Self {
            steps: timesteps.len(),
            timesteps,
            sigmas: sigmas.into_iter().map(f32r).collect(),
            prediction: cfg.prediction_type,
            solver_order,
            lower_order_final: cfg.lower_order_final.unwrap_or(true),
            outputs: Vec::new(),
            lower_order_nums: 0,
            next_index: None,
        })
    }

    fn first_order(&self, x: &Tensor, m0: &Tensor, i: usize) -> Result<Tensor> {
        let (alpha_t, sigma_t) = vp_alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s, sigma_s) = vp_alpha_sigma(self.sigmas[i]);
        let h = (alpha_t.ln() - sigma_t.ln()) - (alpha_s.ln() - sigma_s.ln());
        common::lin2(alpha_t / alpha_s, x, -sigma_t * h.exp_m1(), m0)
    }

    fn second_order(&self, x: &Tensor, i: usize) -> Result<Tensor> {
        let rho = |s: f64| {
            let (a, sg) = vp_alpha_sigma(s);
            sg / a
        };
        let (alpha_t, _) = vp_alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, _) = vp_alpha_sigma(self.sigmas[i]);
        let (rt, r0, r1) = (
            rho(self.sigmas[i + 1]),
            rho(self.sigmas[i]),
            rho(self.sigmas[i - 1]),
        );
        let ind = |t: f64, b: f64, c: f64| t * (-c.ln() + t.ln() - 1.0) / (b.ln() - c.ln());
        let coef1 = ind(rt, r0, r1) - ind(r0, r0, r1);
        let coef2 = ind(rt, r1, r0) - ind(r0, r1, r0);
        let k = self.outputs.len();
        let (m0, m1) = (&self.outputs[k - 1], &self.outputs[k - 2]);
        let inner = (x.affine(1.0 / alpha_s0, 0.0)? + common::lin2(coef1, m0, coef2, m1)?)?;
        Ok(inner.affine(alpha_t, 0.0)?)
    }

    fn third_order(&self, x: &Tensor, i: usize) -> Result<Tensor> {
        let rho = |s: f64| {
            let (a, sg) = vp_alpha_sigma(s);
            sg / a
        };
        let (alpha_t, _) = vp_alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, _) = vp_alpha_sigma(self.sigmas[i]);
        let rt = rho(self.sigmas[i + 1]);
        let (r0, r1, r2) = (
            rho(self.sigmas[i]),
            rho(self.sigmas[i - 1]),
            rho(self.sigmas[i - 2]),
        );
        let ind = |t: f64, b: f64, c: f64, d: f64| {
            let (lt, lb, lc, ld) = (t.ln(), b.ln(), c.ln(), d.ln());
            let num = t * (lc * (ld - lt + 1.0) - ld * lt + ld + lt * lt - 2.0 * lt + 2.0);
            num / ((lb - lc) * (lb - ld))
        };
        let coef1 = ind(rt, r0, r1, r2) - ind(r0, r0, r1, r2);
        let coef2 = ind(rt, r1, r2, r0) - ind(r0, r1, r2, r0);
        let coef3 = ind(rt, r2, r0, r1) - ind(r0, r2, r0, r1);
        let k = self.outputs.len();
        let (m0, m1, m2) = (
            &self.outputs[k - 1],
            &self.outputs[k - 2],
            &self.outputs[k - 3],
        );
        let sum = (common::lin2(coef1, m0, coef2, m1)? + m2.affine(coef3, 0.0)?)?;
        let inner = (x.affine(1.0 / alpha_s0, 0.0)? + sum)?;
        Ok(inner.affine(alpha_t, 0.0)?)
    }
}

impl Scheduler for DeisScheduler {
    fn kind(&self) -> SamplerKind {
        SamplerKind::Deis
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
        let len = self.timesteps.len();
        common::check_index(i, len)?;
        if self.next_index != Some(i) {
            // A jump (first call, img2img start, a new image) starts a fresh multistep history.
            self.reset();
        }
        let out_dtype = model_output.dtype();
        let (m, x) = (common::f32t(model_output)?, common::f32t(sample)?);
        let short = self.lower_order_final && len < 15;
        let lower_order_final = i == len - 1 && short;
        let lower_order_second = i + 2 == len && short;
        // DEIS works on noise predictions: eps = (x − α·x0) / σ.
        let sigma = self.sigmas[i];
        let (alpha, sigma_t) = vp_alpha_sigma(sigma);
        let x0 = vp_x0(self.prediction, &m, &x, sigma)?;
        let eps = common::lin2(1.0 / sigma_t, &x, -alpha / sigma_t, &x0)?;
        self.outputs.push(eps.clone());
        if self.outputs.len() > self.solver_order {
            self.outputs.remove(0);
        }
        let prev = if self.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final {
            self.first_order(&x, &eps, i)?
        } else if self.solver_order == 2 || self.lower_order_nums < 2 || lower_order_second {
            self.second_order(&x, i)?
        } else {
            self.third_order(&x, i)?
        };
        self.lower_order_nums = (self.lower_order_nums + 1).min(self.solver_order);
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
        let (a, s) = vp_alpha_sigma(self.sigmas[timestep_index]);
        common::lin2(a, original, s, noise)
    }

    fn reset(&mut self) {
        self.outputs.clear();
        self.lower_order_nums = 0;
        self.next_index = None;
    }
}
