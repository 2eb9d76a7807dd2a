//! The single-step DPM-Solver++ samplers with two model calls per step: "DPM++ 2S a"
//! (k-diffusion `sample_dpmpp_2s_ancestral`; diffusers has no such class) and "DPM++ SDE"
//! (diffusers' `DPMSolverSDEScheduler`, k-diffusion `sample_dpmpp_sde`).
//!
//! Every step but the last calls the model at the step's sigma and at a midpoint (the geometric
//! mean of the step's sigma and σ_down for 2S a, of the step's two sigmas for SDE), so
//! [`Scheduler::timesteps`] lists `2·steps − 1` entries, the midpoint calls at odd indices; the
//! last step is an Euler step to σ = 0.
//!
//! Noise: DPM++ 2S a draws one normal per step (not on the last), as k-diffusion does. DPM++ SDE
//! samples a Brownian motion in σ: diffusers and A1111 take it from a torchsde `BrownianTree`,
//! whose random path cannot be reproduced here. This scheduler draws the tree's two increments of
//! a step (over `[σ_mid, σ]` and `[σ_next, σ]`, which overlap) from the [`NoiseSource`] with the
//! same joint distribution: `z₁`, then `(√(σ − σ_mid)·z₁ + √(σ_mid − σ_next)·z₂) / √(σ − σ_next)`.
//! Images made with A1111/Forge or diffusers using DPM++ SDE therefore do not reproduce bit for
//! bit (the statistics are the same).

use candle_core::{DType, Tensor};

use super::common::{self, f32r, ClassDefaults, NoiseSchedule};
use super::config::{BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing};
use super::{NoiseSource, SamplerKind, Scheduler, SigmaSchedule};
use crate::error::{Error, Result};

/// k-diffusion's `get_ancestral_step(σ_from, σ_to)` with eta = 1, in f32 as torch computes it:
/// `(σ_down, σ_up)`.
fn ancestral_step(from: f64, to: f64) -> (f64, f64) {
    let (f, t) = (from as f32, to as f32);
    let up = (t * t * (f * f - t * t) / (f * f)).sqrt().min(t);
    let down = (t * t - up * up).max(0.0).sqrt();
    (down as f64, up as f64)
}

/// Which of the two samplers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Ancestral2S,
    Sde,
}

/// The state kept between a step's two calls.
#[derive(Debug, Clone)]
struct Pending {
    index: usize,
    sample: Tensor,
    /// DPM++ SDE: the first Brownian increment, reused by the second call.
    z1: Option<Tensor>,
}

/// DPM++ 2S a / DPM++ SDE: two model calls per step.
#[derive(Debug, Clone)]
pub struct DpmPpSdeScheduler {
    variant: Variant,
    timesteps: Vec<f64>,
    /// The step sigmas plus the final 0.
    base: Vec<f64>,
    /// The midpoint sigma of every step.
    mid: Vec<f64>,
    /// The noise level of every call plus the final 0.
    call_sigmas: Vec<f64>,
    steps: usize,
    init_sigma: f64,
    prediction: PredictionType,
    pending: Option<Pending>,
}

impl DpmPpSdeScheduler {
    /// "DPM++ 2S a": DPM-Solver++(2S) steps to σ_down plus ancestral noise.
    pub fn new_2s_ancestral(
        cfg: &SchedulerConfig,
        steps: usize,
        schedule: SigmaSchedule,
    ) -> Result<Self> {
        Self::new(cfg, steps, schedule, Variant::Ancestral2S)
    }

    /// "DPM++ SDE": the stochastic DPM-Solver++ with a midpoint step (r = 1/2, eta = 1).
    pub fn new_sde(cfg: &SchedulerConfig, steps: usize, schedule: SigmaSchedule) -> Result<Self> {
        Self::new(cfg, steps, schedule, Variant::Sde)
    }

    fn new(
        cfg: &SchedulerConfig,
        steps: usize,
        schedule: SigmaSchedule,
        variant: Variant,
    ) -> Result<Self> {
        let d = match variant {
            // No diffusers class: Euler's defaults.
            Variant::Ancestral2S => {
                ClassDefaults::standard("DPM++ 2S a", TimestepSpacing::Linspace, false)
            }
            Variant::Sde => ClassDefaults {
                name: "DPM++ SDE",
                beta_start: 0.00085,
                beta_end: 0.012,
                beta_schedule: BetaSchedule::Linear,
                spacing: TimestepSpacing::Linspace,
                clip_sample: false,
                set_alpha_to_one: true,
            },
        };
        common::reject_unsupported(cfg, d.name, false)?;
        common::require_prediction(
            cfg.prediction_type,
            &[PredictionType::Epsilon, PredictionType::VPrediction],
            d.name,
        )?;
        let cfg = &common::k_class_config(cfg);
        let ns = NoiseSchedule::new(cfg, &d, false)?;
        common::check_steps(d.name, steps, cfg.num_train_timesteps)?;
        let spacing = cfg.timestep_spacing.unwrap_or(d.spacing);
        let (ts, sg) = common::k_schedule(cfg, &ns, spacing, schedule, steps);
        // ddim_uniform may give more steps than asked (see `SigmaSchedule::DdimUniform`).
        let n = ts.len();
        let mut base: Vec<f64> = sg.iter().map(|&s| f32r(s)).collect();
        base.push(0.0);
        let mut exact = sg.clone();
        exact.push(0.0);
        let train = ns.train_sigmas();
        let log_sigmas: Vec<f64> = train.iter().map(|s| f32r(s.ln())).collect();
        let mut mid = vec![0.0; n];
        let mut timesteps = vec![ts[0]];
        let mut call_sigmas = vec![base[0]];
        for k in 0..n.saturating_sub(1) {
            let (m, m_for_t) = match variant {
                Variant::Ancestral2S => {
                    let (down, _) = ancestral_step(base[k], base[k + 1]);
                    let m =
                        f32r(((base[k] as f32).ln() * 0.5 + (down as f32).ln() * 0.5).exp() as f64);
                    (m, m)
                }
                // diffusers takes the midpoint timestep from the unrounded sigmas.
                Variant::Sde => (
                    f32r((base[k] * base[k + 1]).sqrt()),
                    (exact[k] * exact[k + 1]).sqrt(),
                ),
            };
            mid[k] = m;
            timesteps.extend([common::sigma_to_t(m_for_t, &log_sigmas), ts[k + 1]]);
            call_sigmas.extend([m, base[k + 1]]);
        }
        call_sigmas.push(0.0);
        let init_sigma = common::k_init_noise_sigma(&base, spacing);
        Ok(Self {
            variant,
            timesteps,
            base,
            mid,
            call_sigmas,
            steps: n,
            init_sigma,
            prediction: cfg.prediction_type,
            pending: None,
        })
    }

    fn name(&self) -> &'static str {
        match self.variant {
            Variant::Ancestral2S => "DPM++ 2S a",
            Variant::Sde => "DPM++ SDE",
        }
    }
}

impl Scheduler for DpmPpSdeScheduler {
    fn kind(&self) -> SamplerKind {
        match self.variant {
            Variant::Ancestral2S => SamplerKind::DpmPp2sAncestral,
            Variant::Sde => SamplerKind::DpmPpSde,
        }
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// The noise level of every call plus the final 0 (`2·steps` values).
    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.call_sigmas)
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
        common::k_scale(sample, self.call_sigmas[timestep_index])
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
        let k = i / 2;
        let (sigma, sigma_next) = (self.base[k], self.base[k + 1]);
        let prev = if i % 2 == 0 {
            let x0 = common::k_x0(self.prediction, &m, &x, sigma)?;
            if sigma_next == 0.0 {
                // The last step: Euler to 0.
                let d = ((&x - &x0)? / sigma)?;
                (&x + d.affine(-sigma, 0.0)?)?
            } else {
                let mid = self.mid[k];
                match self.variant {
                    Variant::Ancestral2S => {
                        // x₂ = (σ_mid/σ)·x − expm1(−h/2)·x0, h = ln(σ/σ_down).
                        let prev = common::lin2(mid / sigma, &x, 1.0 - mid / sigma, &x0)?;
                        self.pending = Some(Pending {
                            index: i,
                            sample: x,
                            z1: None,
                        });
                        prev
                    }
                    Variant::Sde => {
                        let (down, up) = ancestral_step(sigma, mid);
                        let det = common::lin2(down / sigma, &x, 1.0 - down / sigma, &x0)?;
                        let z1 = noise.randn(m.shape(), DType::F32, m.device())?;
                        let prev = (det + z1.affine(up, 0.0)?)?;
                        self.pending = Some(Pending {
                            index: i,
                            sample: x,
                            z1: Some(z1),
                        });
                        prev
                    }
                }
            }
        } else {
            let p = match self.pending.take() {
                Some(p) if p.index + 1 == i => p,
                _ => {
                    return Err(Error::StepOutOfOrder {
                        scheduler: self.name(),
                        index: i,
                        expected: i - 1,
                    })
                }
            };
            let mid = self.mid[k];
            let x0 = common::k_x0(self.prediction, &m, &x, mid)?;
            let (down, up) = ancestral_step(sigma, sigma_next);
            let det = common::lin2(down / sigma, &p.sample, 1.0 - down / sigma, &x0)?;
            let z = match (self.variant, p.z1) {
                (Variant::Sde, Some(z1)) => {
                    // The increment over [σ_next, σ] contains the one over [σ_mid, σ].
                    let z2 = noise.randn(m.shape(), DType::F32, m.device())?;
                    let (a, b) = ((sigma - mid).max(0.0), (mid - sigma_next).max(0.0));
                    common::lin2((a / (a + b)).sqrt(), &z1, (b / (a + b)).sqrt(), &z2)?
                }
                _ => noise.randn(m.shape(), DType::F32, m.device())?,
            };
            (det + z.affine(up, 0.0)?)?
        };
        Ok(prev.to_dtype(out_dtype)?)
    }

    /// Noises to the step sigma of `timestep_index` (the next step's at odd, midpoint indices, as
    /// diffusers' `DPMSolverSDEScheduler` does).
    fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        timestep_index: usize,
    ) -> Result<Tensor> {
        common::check_index(timestep_index, self.timesteps.len())?;
        common::lin2(1.0, original, self.base[timestep_index.div_ceil(2)], noise)
    }

    fn reset(&mut self) {
        self.pending = None;
    }
}
