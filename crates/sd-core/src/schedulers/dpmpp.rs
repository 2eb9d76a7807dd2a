//! DPM-Solver++ (2M) and its SDE variant (Lu et al. 2022), as diffusers'
//! `DPMSolverMultistepScheduler` with `solver_order = 2` and `algorithm_type` `dpmsolver++` /
//! `sde-dpmsolver++`, and DPM++ 3M SDE (`solver_order = 3`, `sde-dpmsolver++`).
//!
//! DPM++ 3M SDE follows diffusers, which draws fresh Gaussian noise every step; A1111's
//! "DPM++ 3M SDE" runs k-diffusion's `sample_dpmpp_3m_sde` on a torchsde Brownian tree, so
//! images made there do not reproduce bit for bit.

use candle_core::{DType, Tensor};

use super::common::{self, f32r, ClassDefaults, NoiseSchedule};
use super::config::{BetaSchedule, FinalSigmas, PredictionType, SchedulerConfig, TimestepSpacing};
use super::{NoiseSource, SamplerKind, Scheduler, SigmaSchedule};
use crate::error::{Error, Result};

const DEFAULTS: ClassDefaults =
    ClassDefaults::standard("DPM++ 2M", TimestepSpacing::Linspace, false);

/// The second-order update rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SolverType {
    Midpoint,
    Heun,
}

/// `alpha_t, sigma_t` of the variance-preserving process at k-diffusion noise level `sigma`.
pub(crate) fn vp_alpha_sigma(sigma: f64) -> (f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// `log(alpha) − log(sigma)`, +∞ at sigma = 0.
pub(crate) fn vp_lambda(sigma: f64) -> f64 {
    let (a, s) = vp_alpha_sigma(sigma);
    a.ln() - s.ln()
}

/// The clean sample predicted at noise level `sigma` (the "data prediction" of DPM-Solver++).
pub(crate) fn vp_x0(
    pred: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f64,
) -> Result<Tensor> {
    let (a, s) = vp_alpha_sigma(sigma);
    match pred {
        PredictionType::Epsilon => common::lin2(1.0 / a, sample, -s / a, model_output),
        PredictionType::VPrediction => common::lin2(a, sample, -s, model_output),
        PredictionType::Sample => Ok(model_output.clone()),
    }
}

/// Sigma-schedule construction shared with UniPC and DEIS: Karras/exponential/beta ranges span
/// the whole training schedule (unlike Euler/Heun), and timesteps are integers (the step count
/// follows the schedule: `ddim_uniform` may give more than `steps`).
pub(crate) fn vp_schedule(
    cfg: &SchedulerConfig,
    ns: &NoiseSchedule,
    mut timesteps: Vec<f64>,
    schedule: SigmaSchedule,
    steps: usize,
    round_karras: bool,
) -> (Vec<f64>, Vec<f64>) {
    let train = ns.train_sigmas();
    let log_sigmas: Vec<f64> = train.iter().map(|s| f32r(s.ln())).collect();
    let lo = cfg.sigma_min.unwrap_or(train[0]);
    let hi = cfg.sigma_max.unwrap_or(train[train.len() - 1]);
    let sigmas = match schedule {
        SigmaSchedule::Default => timesteps
            .iter()
            .map(|&t| common::interp(t, &train))
            .collect(),
        SigmaSchedule::Karras => {
            let s = common::karras_sigmas(lo, hi, steps);
            timesteps = s
                .iter()
                .map(|&x| {
                    let t = common::sigma_to_t(x, &log_sigmas);
                    // diffusers rounds Karras timesteps; the int64 cast truncates the others.
                    if round_karras {
                        common::round_even(t)
                    } else {
                        t.trunc()
                    }
                })
                .collect();
            s
        }
        other => {
            let s = match other {
                SigmaSchedule::Exponential => common::exponential_sigmas(lo, hi, steps),
                SigmaSchedule::Beta => common::beta_sigmas(lo, hi, steps),
                _ => common::table_sigmas(other, &train, steps),
            };
            timesteps = s
                .iter()
                .map(|&x| common::sigma_to_t(x, &log_sigmas).trunc())
                .collect();
            s
        }
    };
    (timesteps, sigmas)
}

/// Multistep DPM-Solver++ of order 2 (deterministic or SDE) or 3 (SDE).
#[derive(Debug, Clone)]
pub struct DpmPp2mScheduler {
    /// The solver order: 2 (DPM++ 2M / 2M SDE) or 3 (DPM++ 3M SDE).
    order: usize,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    steps: usize,
    prediction: PredictionType,
    sde: bool,
    solver: SolverType,
    lower_order_final: bool,
    euler_at_final: bool,
    final_zero: bool,
    /// x0 predictions of the last `order` steps, newest last.
    outputs: Vec<Tensor>,
    lower_order_nums: usize,
    next_index: Option<usize>,
}

impl DpmPp2mScheduler {
    /// Builds the schedule for `steps` inference steps; `sde` picks the stochastic variant.
    pub fn new(
        cfg: &SchedulerConfig,
        steps: usize,
        schedule: SigmaSchedule,
        sde: bool,
    ) -> Result<Self> {
        Self::with_order(cfg, steps, schedule, sde, 2)
    }

    /// DPM++ 3M SDE: the third-order SDE solver (diffusers' `solver_order = 3`).
    pub fn new_3m_sde(cfg: &SchedulerConfig, steps: usize, schedule: SigmaSchedule) -> Result<Self> {
        Self::with_order(cfg, steps, schedule, true, 3)
    }

    fn with_order(
        cfg: &SchedulerConfig,
        steps: usize,
        schedule: SigmaSchedule,
        sde: bool,
        order: usize,
    ) -> Result<Self> {
        let name = match (sde, order) {
            (true, 3) => "DPM++ 3M SDE",
            (true, _) => "DPM++ 2M SDE",
            _ => DEFAULTS.name,
        };
        common::reject_unsupported(cfg, name, true)?;
        if let Some(v) = cfg.variance_type.as_deref() {
            if v.starts_with("learned") {
                return Err(Error::UnsupportedConfig {
                    scheduler: name,
                    option: format!("variance_type = {v:?}"),
                    hint: "Stable Diffusion UNets predict no variance; remove variance_type",
                });
            }
        }
        let solver = match cfg.solver_type.as_deref() {
            None | Some("midpoint") | Some("logrho") | Some("bh1") | Some("bh2") => {
                SolverType::Midpoint
            }
            Some("heun") => SolverType::Heun,
            Some(other) => {
                return Err(Error::UnsupportedConfig {
                    scheduler: name,
                    option: format!("solver_type = {other:?}"),
                    hint: "use midpoint or heun",
                })
            }
        };
        let ns = NoiseSchedule::new(cfg, &DEFAULTS, true)?;
        let n = cfg.num_train_timesteps;
        // At n steps the spacing repeats a timestep, and the multistep update divides by the zero gap.
        common::check_steps(name, steps, n - 1)?;
        let last_timestep = match cfg.lambda_min_clipped {
            Some(clip) if clip.is_finite() => {
                let below = ns
                    .alphas_cumprod
                    .iter()
                    .filter(|&&a| {
                        let (al, si) = (f32r(a.sqrt()), f32r((1.0 - a).sqrt()));
                        al.ln() - si.ln() < clip
                    })
                    .count();
                n - below
            }
            _ => n,
        };
        if last_timestep == 0 {
            return Err(Error::UnsupportedConfig {
                scheduler: name,
                option: format!("lambda_min_clipped = {:?}", cfg.lambda_min_clipped),
                hint: "it clips away every training timestep; lower it or remove it",
            });
        }
        let spacing = cfg.timestep_spacing.unwrap_or(DEFAULTS.spacing);
        let timesteps =
            common::multistep_timesteps(spacing, steps, n, last_timestep, cfg.steps_offset);
        let round_karras = cfg.beta_schedule != Some(BetaSchedule::SquaredcosCapV2);
        let (timesteps, mut sigmas) =
            vp_schedule(cfg, &ns, timesteps, schedule, steps, round_karras);
        let final_type = cfg.final_sigmas_type.unwrap_or_default();
        sigmas.push(match final_type {
            FinalSigmas::Zero => 0.0,
            FinalSigmas::SigmaMin => ns.train_sigmas()[0],
        });
        let sigmas = sigmas.into_iter().map(f32r).collect();
        Ok(Self {
            order,
            steps: timesteps.len(),
            timesteps,
            sigmas,
            prediction: cfg.prediction_type,
            sde,
            solver,
            lower_order_final: cfg.lower_order_final.unwrap_or(true),
            euler_at_final: cfg.euler_at_final,
            final_zero: final_type == FinalSigmas::Zero,
            outputs: Vec::new(),
            lower_order_nums: 0,
            next_index: None,
        })
    }

    fn third_order(&self, x: &Tensor, i: usize, noise: Option<&Tensor>) -> Result<Tensor> {
        let (s_t, s0, s1, s2) = (
            self.sigmas[i + 1],
            self.sigmas[i],
            self.sigmas[i - 1],
            self.sigmas[i - 2],
        );
        let (alpha_t, sigma_t) = vp_alpha_sigma(s_t);
        let (_, sigma_s0) = vp_alpha_sigma(s0);
        let (l_t, l0, l1, l2) = (vp_lambda(s_t), vp_lambda(s0), vp_lambda(s1), vp_lambda(s2));
        let (h, h0, h1) = (l_t - l0, l0 - l1, l1 - l2);
        let (r0, r1) = (h0 / h, h1 / h);
        let k = self.outputs.len();
        let (m0, m1, m2) = (&self.outputs[k - 1], &self.outputs[k - 2], &self.outputs[k - 3]);
        let d1_0 = ((m0 - m1)? * (1.0 / r0))?;
        let d1_1 = ((m1 - m2)? * (1.0 / r1))?;
        let diff = (&d1_0 - &d1_1)?;
        let d1 = (&d1_0 + diff.affine(r0 / (r0 + r1), 0.0)?)?;
        let d2 = diff.affine(1.0 / (r0 + r1), 0.0)?;
        let (cx, c0, c1, c2) = match noise {
            None => {
                let em = (-h).exp() - 1.0;
                (
                    sigma_t / sigma_s0,
                    -alpha_t * em,
                    alpha_t * (em / h + 1.0),
                    -alpha_t * ((em + h) / (h * h) - 0.5),
                )
            }
            Some(_) => {
                let e2 = 1.0 - (-2.0 * h).exp();
                (
                    sigma_t / sigma_s0 * (-h).exp(),
                    alpha_t * e2,
                    alpha_t * (e2 / (-2.0 * h) + 1.0),
                    alpha_t * ((e2 - 2.0 * h) / (4.0 * h * h) - 0.5),
                )
            }
        };
        let mut out = (common::lin2(cx, x, c0, m0)? + common::lin2(c1, &d1, c2, &d2)?)?;
        if let Some(z) = noise {
            let e2 = 1.0 - (-2.0 * h).exp();
            out = (out + z.affine(sigma_t * e2.sqrt(), 0.0)?)?;
        }
        Ok(out)
    }

    fn first_order(
        &self,
        x: &Tensor,
        d0: &Tensor,
        i: usize,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (s_t, s_s) = (self.sigmas[i + 1], self.sigmas[i]);
        let (alpha_t, sigma_t) = vp_alpha_sigma(s_t);
        let (_, sigma_s) = vp_alpha_sigma(s_s);
        let h = vp_lambda(s_t) - vp_lambda(s_s);
        match noise {
            None => common::lin2(sigma_t / sigma_s, x, -alpha_t * ((-h).exp() - 1.0), d0),
            Some(z) => {
                let e2 = (-2.0 * h).exp();
                let det =
                    common::lin2(sigma_t / sigma_s * (-h).exp(), x, alpha_t * (1.0 - e2), d0)?;
                Ok((det + z.affine(sigma_t * (1.0 - e2).sqrt(), 0.0)?)?)
            }
        }
    }

    fn second_order(
        &self,
        x: &Tensor,
        m0: &Tensor,
        m1: &Tensor,
        i: usize,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (s_t, s_s0, s_s1) = (self.sigmas[i + 1], self.sigmas[i], self.sigmas[i - 1]);
        let (alpha_t, sigma_t) = vp_alpha_sigma(s_t);
        let (_, sigma_s0) = vp_alpha_sigma(s_s0);
        let (l_t, l_s0, l_s1) = (vp_lambda(s_t), vp_lambda(s_s0), vp_lambda(s_s1));
        let (h, h0) = (l_t - l_s0, l_s0 - l_s1);
        let r0 = h0 / h;
        // D1 = (m0 - m1) / r0
        let d1 = ((m0 - m1)? * (1.0 / r0))?;
        let (cx, c0, c1) = match noise {
            None => {
                let em = (-h).exp() - 1.0;
                let c1 = match self.solver {
                    SolverType::Midpoint => -0.5 * alpha_t * em,
                    SolverType::Heun => alpha_t * (em / h + 1.0),
                };
                (sigma_t / sigma_s0, -alpha_t * em, c1)
            }
            Some(_) => {
                let e2 = 1.0 - (-2.0 * h).exp();
                let c1 = match self.solver {
                    SolverType::Midpoint => 0.5 * alpha_t * e2,
                    SolverType::Heun => alpha_t * (e2 / (-2.0 * h) + 1.0),
                };
                (sigma_t / sigma_s0 * (-h).exp(), alpha_t * e2, c1)
            }
        };
        let mut out = (common::lin2(cx, x, c0, m0)? + d1.affine(c1, 0.0)?)?;
        if let Some(z) = noise {
            let e2 = 1.0 - (-2.0 * h).exp();
            out = (out + z.affine(sigma_t * e2.sqrt(), 0.0)?)?;
        }
        Ok(out)
    }
}

impl Scheduler for DpmPp2mScheduler {
    fn kind(&self) -> SamplerKind {
        match (self.sde, self.order) {
            (true, 3) => SamplerKind::DpmPp3mSde,
            (true, _) => SamplerKind::DpmPp2mSde,
            _ => SamplerKind::DpmPp2m,
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
        let len = self.timesteps.len();
        common::check_index(i, len)?;
        if self.next_index != Some(i) {
            // A jump (first call, img2img start, a new image) starts a fresh multistep history.
            self.reset();
        }
        let out_dtype = model_output.dtype();
        let (m, x) = (common::f32t(model_output)?, common::f32t(sample)?);
        let lower_order_final = i == len - 1
            && (self.euler_at_final || (self.lower_order_final && len < 15) || self.final_zero);
        let lower_order_second = i + 2 == len && self.lower_order_final && len < 15;
        let x0 = vp_x0(self.prediction, &m, &x, self.sigmas[i])?;
        self.outputs.push(x0.clone());
        if self.outputs.len() > self.order {
            self.outputs.remove(0);
        }
        let z = if self.sde {
            Some(noise.randn(m.shape(), DType::F32, m.device())?)
        } else {
            None
        };
        let k = self.outputs.len();
        let prev = if self.lower_order_nums < 1 || lower_order_final || k < 2 {
            self.first_order(&x, &x0, i, z.as_ref())?
        } else if self.order == 2 || self.lower_order_nums < 2 || lower_order_second || k < 3 {
            // With solver_order 2, diffusers' `lower_order_second` also lands on second order.
            self.second_order(&x, &x0, &self.outputs[k - 2], i, z.as_ref())?
        } else {
            self.third_order(&x, i, z.as_ref())?
        };
        self.lower_order_nums = (self.lower_order_nums + 1).min(self.order);
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
