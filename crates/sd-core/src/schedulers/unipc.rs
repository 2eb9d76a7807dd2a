//! UniPC multistep predictor-corrector (Zhao et al. 2023), as diffusers'
//! `UniPCMultistepScheduler` (bh1/bh2, any solver order, data or noise prediction).

use candle_core::Tensor;

use super::common::{self, f32r, ClassDefaults, NoiseSchedule};
use super::config::{FinalSigmas, PredictionType, SchedulerConfig, TimestepSpacing};
use super::dpmpp::{vp_alpha_sigma, vp_lambda, vp_schedule, vp_x0};
use super::{NoiseSource, SamplerKind, Scheduler, SigmaSchedule};
use crate::error::{Error, Result};

const DEFAULTS: ClassDefaults = ClassDefaults::standard("UniPC", TimestepSpacing::Linspace, false);

/// UniPC's B(h) choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bh {
    Bh1,
    Bh2,
}

/// Deterministic UniPC sampling with any sigma schedule.
#[derive(Debug, Clone)]
pub struct UniPcScheduler {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    steps: usize,
    prediction: PredictionType,
    predict_x0: bool,
    bh: Bh,
    solver_order: usize,
    lower_order_final: bool,
    disable_corrector: Vec<usize>,
    /// Converted model outputs of the last `solver_order` steps, oldest first.
    outputs: Vec<Tensor>,
    lower_order_nums: usize,
    this_order: usize,
    last_sample: Option<Tensor>,
    next_index: Option<usize>,
}

impl UniPcScheduler {
    /// Builds the schedule for `steps` inference steps.
    pub fn new(cfg: &SchedulerConfig, steps: usize, schedule: SigmaSchedule) -> Result<Self> {
        let name = DEFAULTS.name;
        common::reject_unsupported(cfg, name, true)?;
        let bh = match cfg.solver_type.as_deref() {
            None | Some("bh2") | Some("midpoint") | Some("heun") | Some("logrho") => Bh::Bh2,
            Some("bh1") => Bh::Bh1,
            Some(other) => {
                return Err(Error::UnsupportedConfig {
                    scheduler: name,
                    option: format!("solver_type = {other:?}"),
                    hint: "use bh1 or bh2",
                })
            }
        };
        let solver_order = cfg.solver_order.unwrap_or(2);
        if !(1..=3).contains(&solver_order) {
            return Err(Error::UnsupportedConfig {
                scheduler: name,
                option: format!("solver_order = {solver_order}"),
                hint: "use 1, 2 or 3 (2 is the default)",
            });
        }
        let ns = NoiseSchedule::new(cfg, &DEFAULTS, true)?;
        let n = cfg.num_train_timesteps;
        // At n steps the spacing repeats a timestep, and the multistep update divides by the zero gap.
        common::check_steps(name, steps, n - 1)?;
        let spacing = cfg.timestep_spacing.unwrap_or(DEFAULTS.spacing);
        let timesteps = common::multistep_timesteps(spacing, steps, n, n, cfg.steps_offset);
        let (timesteps, mut sigmas) = vp_schedule(cfg, &ns, timesteps, schedule, steps, true);
        let final_type = cfg.final_sigmas_type.unwrap_or_default();
        sigmas.push(match (final_type, schedule) {
            (FinalSigmas::Zero, _) => 0.0,
            // With Karras/exponential/beta sigmas diffusers repeats the last one instead of sigma_min; the
            // table schedules it lacks can stop above sigma_min, so they end there.
            (FinalSigmas::SigmaMin, SigmaSchedule::Default) => ns.train_sigmas()[0],
            (FinalSigmas::SigmaMin, SigmaSchedule::Karras | SigmaSchedule::Exponential | SigmaSchedule::Beta) => sigmas[sigmas.len() - 1],
            (FinalSigmas::SigmaMin, _) => sigmas[sigmas.len() - 1].min(ns.train_sigmas()[0]),
        });
        let sigmas = sigmas.into_iter().map(f32r).collect();
        Ok(Self {
            steps: timesteps.len(),
            timesteps,
            sigmas,
            prediction: cfg.prediction_type,
            predict_x0: cfg.predict_x0.unwrap_or(true),
            bh,
            solver_order,
            lower_order_final: cfg.lower_order_final.unwrap_or(true),
            disable_corrector: cfg.disable_corrector.clone(),
            outputs: Vec::new(),
            lower_order_nums: 0,
            this_order: 1,
            last_sample: None,
            next_index: None,
        })
    }

    fn convert(&self, m: &Tensor, x: &Tensor, sigma: f64) -> Result<Tensor> {
        if self.predict_x0 {
            return vp_x0(self.prediction, m, x, sigma);
        }
        let (a, s) = vp_alpha_sigma(sigma);
        match self.prediction {
            PredictionType::Epsilon => Ok(m.clone()),
            PredictionType::Sample => common::lin2(1.0 / s, x, -a / s, m),
            PredictionType::VPrediction => common::lin2(a, m, s, x),
        }
    }

    /// The coefficients shared by predictor and corrector: `(h_phi_1, B_h, R, b)`.
    fn coefficients(
        &self,
        h: f64,
        rks: &[f64],
        order: usize,
    ) -> (f64, f64, Vec<Vec<f64>>, Vec<f64>) {
        let hh = if self.predict_x0 { -h } else { h };
        let h_phi_1 = hh.exp_m1();
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial = 1.0;
        let b_h = match self.bh {
            Bh::Bh1 => hh,
            Bh::Bh2 => hh.exp_m1(),
        };
        let mut r = Vec::with_capacity(order);
        let mut b = Vec::with_capacity(order);
        for i in 1..=order {
            r.push(rks.iter().map(|rk| rk.powi(i as i32 - 1)).collect());
            b.push(h_phi_k * factorial / b_h);
            factorial *= (i + 1) as f64;
            h_phi_k = h_phi_k / hh - 1.0 / factorial;
        }
        (h_phi_1, b_h, r, b)
    }

    /// `x_t_` of both updates: the first-order (DDIM-like) part.
    fn base(&self, x: &Tensor, m0: &Tensor, s_t: f64, s_s0: f64, h_phi_1: f64) -> Result<Tensor> {
        let (alpha_t, sigma_t) = vp_alpha_sigma(s_t);
        let (alpha_s0, sigma_s0) = vp_alpha_sigma(s_s0);
        if self.predict_x0 {
            common::lin2(sigma_t / sigma_s0, x, -alpha_t * h_phi_1, m0)
        } else {
            // sigma_t·(e^h − 1) tends to alpha_t·sigma_s0/alpha_s0 as sigma_t → 0; diffusers
            // evaluates 0·∞ = NaN on a final zero sigma.
            let c = if sigma_t == 0.0 {
                alpha_t * sigma_s0 / alpha_s0
            } else {
                sigma_t * h_phi_1
            };
            common::lin2(alpha_t / alpha_s0, x, -c, m0)
        }
    }

    /// The scale in front of the higher-order residual: `alpha_t·B_h` or `sigma_t·B_h`.
    fn residual_scale(&self, s_t: f64, b_h: f64) -> f64 {
        let (alpha_t, sigma_t) = vp_alpha_sigma(s_t);
        if self.predict_x0 {
            alpha_t * b_h
        } else {
            sigma_t * b_h
        }
    }

    /// The differences `(m_k − m0) / r_k` and ratios `r_k` of older outputs, newest first.
    fn history(
        &self,
        skip: usize,
        order: usize,
        i: usize,
        l_s0: f64,
        h: f64,
    ) -> Result<(Vec<f64>, Vec<Tensor>)> {
        let m0 = &self.outputs[self.outputs.len() - 1];
        let mut rks = Vec::with_capacity(order);
        let mut d1s = Vec::with_capacity(order);
        for k in 1..order {
            let mk = &self.outputs[self.outputs.len() - 1 - k];
            let rk = (vp_lambda(self.sigmas[i - k - skip]) - l_s0) / h;
            d1s.push(((mk - m0)? * (1.0 / rk))?);
            rks.push(rk);
        }
        rks.push(1.0);
        Ok((rks, d1s))
    }

    fn predictor(&self, x: &Tensor, order: usize, i: usize) -> Result<Tensor> {
        let (s_t, s_s0) = (self.sigmas[i + 1], self.sigmas[i]);
        let (l_t, l_s0) = (vp_lambda(s_t), vp_lambda(s_s0));
        let h = l_t - l_s0;
        let (rks, d1s) = self.history(0, order, i, l_s0, h)?;
        let (h_phi_1, b_h, r, b) = self.coefficients(h, &rks, order);
        let m0 = &self.outputs[self.outputs.len() - 1];
        let mut x_t = self.base(x, m0, s_t, s_s0, h_phi_1)?;
        if !d1s.is_empty() {
            let rhos = if order == 2 {
                vec![0.5]
            } else {
                let k = order - 1;
                let sub: Vec<Vec<f64>> = r[..k].iter().map(|row| row[..k].to_vec()).collect();
                solve(sub, b[..k].to_vec())
            };
            let res = weighted_sum(&rhos, &d1s)?;
            x_t = (x_t - res.affine(self.residual_scale(s_t, b_h), 0.0)?)?;
        }
        Ok(x_t)
    }

    fn corrector(&self, m_t: &Tensor, last: &Tensor, order: usize, i: usize) -> Result<Tensor> {
        let (s_t, s_s0) = (self.sigmas[i], self.sigmas[i - 1]);
        let (l_t, l_s0) = (vp_lambda(s_t), vp_lambda(s_s0));
        let h = l_t - l_s0;
        let (rks, d1s) = self.history(1, order, i, l_s0, h)?;
        let (h_phi_1, b_h, r, b) = self.coefficients(h, &rks, order);
        let m0 = &self.outputs[self.outputs.len() - 1];
        let x_t = self.base(last, m0, s_t, s_s0, h_phi_1)?;
        let rhos = if order == 1 { vec![0.5] } else { solve(r, b) };
        let d1_t = (m_t - m0)?;
        let mut res = d1_t.affine(rhos[rhos.len() - 1], 0.0)?;
        if !d1s.is_empty() {
            res = (res + weighted_sum(&rhos[..rhos.len() - 1], &d1s)?)?;
        }
        Ok((x_t - res.affine(self.residual_scale(s_t, b_h), 0.0)?)?)
    }
}

/// `Σ w_k·t_k`.
fn weighted_sum(weights: &[f64], tensors: &[Tensor]) -> Result<Tensor> {
    let mut acc = tensors[0].affine(weights[0], 0.0)?;
    for (w, t) in weights.iter().zip(tensors).skip(1) {
        acc = (acc + t.affine(*w, 0.0)?)?;
    }
    Ok(acc)
}

/// Solves the small dense system `a·x = b` by Gaussian elimination with partial pivoting.
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Vec<f64> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&p, &q| a[p][col].abs().total_cmp(&a[q][col].abs()))
            .unwrap_or(col);
        a.swap(col, pivot);
        b.swap(col, pivot);
        let pivot_row = a[col].clone();
        for row in col + 1..n {
            let f = a[row][col] / pivot_row[col];
            for (dst, src) in a[row][col..].iter_mut().zip(&pivot_row[col..]) {
                *dst -= f * src;
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let s: f64 = (row + 1..n).map(|c| a[row][c] * x[c]).sum();
        x[row] = (b[row] - s) / a[row][row];
    }
    x
}

impl Scheduler for UniPcScheduler {
    fn kind(&self) -> SamplerKind {
        SamplerKind::UniPc
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
            self.reset();
        }
        let out_dtype = model_output.dtype();
        let (m, mut x) = (common::f32t(model_output)?, common::f32t(sample)?);
        let m_conv = self.convert(&m, &x, self.sigmas[i])?;
        if let Some(last) = &self.last_sample {
            if i > 0 && !self.disable_corrector.contains(&(i - 1)) {
                x = self.corrector(&m_conv, last, self.this_order, i)?;
            }
        }
        if self.outputs.len() == self.solver_order {
            self.outputs.remove(0);
        }
        self.outputs.push(m_conv);
        let order = if self.lower_order_final {
            self.solver_order.min(len - i)
        } else {
            self.solver_order
        };
        self.this_order = order.min(self.lower_order_nums + 1);
        let prev = self.predictor(&x, self.this_order, i)?;
        self.last_sample = Some(x);
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
        self.this_order = 1;
        self.last_sample = None;
        self.next_index = None;
    }
}
