//! DPM-Solver-2 in Karras et al.'s formulation ("DPM2", k-diffusion `sample_dpm_2`) and its
//! ancestral variant ("DPM2 a", `sample_dpm_2_ancestral`), as diffusers'
//! `KDPM2DiscreteScheduler` / `KDPM2AncestralDiscreteScheduler`.
//!
//! Every step but the last takes two model calls: one at the step's sigma and one at the
//! geometric midpoint towards the next (DPM2 a: towards the ancestral `σ_down`), so
//! [`Scheduler::timesteps`] lists `2·steps − 1` entries, the midpoint calls at odd indices. The
//! last step is an Euler step to σ = 0.

use candle_core::{DType, Tensor};

use super::common::{self, f32r, ClassDefaults, NoiseSchedule};
use super::config::{BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing};
use super::{NoiseSource, SamplerKind, Scheduler, SigmaSchedule};
use crate::error::{Error, Result};

const fn defaults(name: &'static str) -> ClassDefaults {
    ClassDefaults {
        name,
        beta_start: 0.00085,
        beta_end: 0.012,
        beta_schedule: BetaSchedule::Linear,
        spacing: TimestepSpacing::Linspace,
        clip_sample: false,
        set_alpha_to_one: true,
    }
}

/// `exp(lerp(ln a, ln b, 0.5))` in f32, as torch computes diffusers' midpoint sigmas.
fn log_midpoint(a: f64, b: f64) -> f64 {
    let (la, lb) = ((a as f32).ln(), (b as f32).ln());
    // torch.lerp with weight 0.5: end − (end − start)·0.5.
    (lb - (lb - la) * 0.5).exp() as f64
}

/// DPM2 / DPM2 a: two model calls per step.
#[derive(Debug, Clone)]
pub struct Kdpm2Scheduler {
    ancestral: bool,
    timesteps: Vec<f64>,
    /// The step sigmas plus the final 0.
    base: Vec<f64>,
    /// The midpoint sigma of every step.
    mid: Vec<f64>,
    /// DPM2 a: the noise added and the deterministic target of every step.
    up: Vec<f64>,
    down: Vec<f64>,
    /// The noise level of every call plus the final 0.
    call_sigmas: Vec<f64>,
    steps: usize,
    init_sigma: f64,
    prediction: PredictionType,
    /// The sample at the start of the step whose midpoint call comes next.
    pending: Option<(usize, Tensor)>,
}

impl Kdpm2Scheduler {
    /// Builds the schedule for `steps` inference steps; `ancestral` picks DPM2 a.
    pub fn new(
        cfg: &SchedulerConfig,
        steps: usize,
        schedule: SigmaSchedule,
        ancestral: bool,
    ) -> Result<Self> {
        let d = defaults(if ancestral { "DPM2 a" } else { "DPM2" });
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
        let (mut ts, sg) = common::k_schedule(cfg, &ns, spacing, schedule, steps);
        if schedule == SigmaSchedule::Karras {
            // diffusers rounds the Karras timesteps of both KDPM2 schedulers.
            ts.iter_mut().for_each(|t| *t = common::round_even(*t));
        }
        let mut base: Vec<f64> = sg.into_iter().map(f32r).collect();
        base.push(0.0);
        // ddim_uniform may give more steps than asked (see `SigmaSchedule::DdimUniform`).
        let n = ts.len();
        let (mut up, mut down) = (vec![0.0; n + 1], vec![0.0; n + 1]);
        let mid: Vec<f64> = if ancestral {
            for k in 0..n {
                // In f32 as torch computes them: σ_down = sqrt(σ_next² − σ_up²) cancels badly
                // on the last steps, and the midpoint timesteps follow that rounding.
                let (s, s_next) = (base[k] as f32, base[k + 1] as f32);
                let (s2, n2) = (s * s, s_next * s_next);
                let u = (n2 * (s2 - n2) / s2).sqrt();
                up[k] = u as f64;
                down[k] = (n2 - u * u).max(0.0).sqrt() as f64;
            }
            // diffusers zeroes the last two midpoints: the last step is an Euler step to 0.
            (0..=n)
                .map(|k| {
                    // σ_down also rounds to 0 before the end when σ_next ≪ σ (few steps over a wide
                    // sigma range): that step is then an Euler step to 0, as k-diffusion takes it.
                    if k + 2 > n || down[k] <= 0.0 {
                        0.0
                    } else {
                        log_midpoint(base[k], down[k])
                    }
                })
                .collect()
        } else {
            // mid[k] lies between base[k-1] and base[k] (diffusers' `sigmas_interpol`).
            (0..=n)
                .map(|k| {
                    if k == 0 {
                        0.0
                    } else {
                        log_midpoint(base[k], base[k - 1])
                    }
                })
                .collect()
        };
        let train = ns.train_sigmas();
        let log_sigmas: Vec<f64> = train.iter().map(|s| f32r(s.ln())).collect();
        let mut timesteps = vec![ts[0]];
        let mut call_sigmas = vec![base[0]];
        for k in 1..n {
            // The midpoint call of step k−1, then the first call of step k.
            let m = if ancestral { mid[k - 1] } else { mid[k] };
            timesteps.extend([f32r(common::sigma_to_t_f32(m, &log_sigmas)), ts[k]]);
            call_sigmas.extend([m, base[k]]);
        }
        call_sigmas.push(0.0);
        let init_sigma = common::k_init_noise_sigma(&base, spacing);
        Ok(Self {
            ancestral,
            timesteps,
            base,
            mid,
            up,
            down,
            call_sigmas,
            steps: n,
            init_sigma,
            prediction: cfg.prediction_type,
            pending: None,
        })
    }

    fn name(&self) -> &'static str {
        if self.ancestral {
            "DPM2 a"
        } else {
            "DPM2"
        }
    }
}

impl Scheduler for Kdpm2Scheduler {
    fn kind(&self) -> SamplerKind {
        if self.ancestral {
            SamplerKind::Dpm2Ancestral
        } else {
            SamplerKind::Dpm2
        }
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// The noise level of every call plus the final 0 (`2·steps` values; diffusers' `sigmas`
    /// repeats the step sigmas instead and keeps the midpoints in `sigmas_interpol`).
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
        let sigma = self.base[k];
        // DPM2's midpoint of step k is mid[k+1], DPM2 a's mid[k].
        let mid = if self.ancestral {
            self.mid[k]
        } else {
            self.mid[k + 1]
        };
        let prev = if i % 2 == 0 {
            let x0 = common::k_x0(self.prediction, &m, &x, sigma)?;
            let derivative = ((&x - &x0)? / sigma)?;
            let prev = (&x + derivative.affine(mid - sigma, 0.0)?)?;
            self.pending = Some((i, x));
            prev
        } else {
            let start = match self.pending.take() {
                Some((p, s)) if p + 1 == i => s,
                _ => {
                    return Err(Error::StepOutOfOrder {
                        scheduler: self.name(),
                        index: i,
                        expected: i - 1,
                    })
                }
            };
            let target = if self.ancestral {
                self.down[k]
            } else {
                self.base[k + 1]
            };
            let prev = if mid == 0.0 {
                // The first call already took the Euler step to σ = 0 (= target): keep it.
                x.clone()
            } else {
                let x0 = common::k_x0(self.prediction, &m, &x, mid)?;
                let derivative = ((&x - &x0)? / mid)?;
                (start + derivative.affine(target - sigma, 0.0)?)?
            };
            if self.ancestral {
                let z = noise.randn(m.shape(), DType::F32, m.device())?;
                (prev + z.affine(self.up[k], 0.0)?)?
            } else {
                prev
            }
        };
        Ok(prev.to_dtype(out_dtype)?)
    }

    /// Noises to diffusers' `sigmas[timestep_index]`: the step's sigma at even (first-call)
    /// indices, the next step's at odd ones.
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
