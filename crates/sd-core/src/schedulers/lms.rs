//! Linear multistep sampling of order 4 ("LMS", k-diffusion `sample_lms`), as diffusers'
//! `LMSDiscreteScheduler`.

use std::collections::VecDeque;

use candle_core::Tensor;

use super::common::{self, f32r, ClassDefaults, NoiseSchedule};
use super::config::{PredictionType, SchedulerConfig, TimestepSpacing};
use super::{NoiseSource, SamplerKind, Scheduler, SigmaSchedule};
use crate::error::Result;

const DEFAULTS: ClassDefaults = ClassDefaults::standard("LMS", TimestepSpacing::Linspace, false);

/// The order of the multistep method (diffusers' and k-diffusion's default).
const LMS_ORDER: usize = 4;

/// Deterministic linear multistep sampling with any sigma schedule.
#[derive(Debug, Clone)]
pub struct LmsScheduler {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    steps: usize,
    init_sigma: f64,
    prediction: PredictionType,
    /// The derivatives `(x − x0) / σ` of the last steps, oldest first.
    derivatives: VecDeque<Tensor>,
    next_index: Option<usize>,
}

impl LmsScheduler {
    /// Builds the schedule for `steps` inference steps.
    pub fn new(cfg: &SchedulerConfig, steps: usize, schedule: SigmaSchedule) -> Result<Self> {
        common::reject_unsupported(cfg, DEFAULTS.name, false)?;
        let cfg = &common::k_class_config(cfg);
        let ns = NoiseSchedule::new(cfg, &DEFAULTS, false)?;
        common::check_steps(DEFAULTS.name, steps, cfg.num_train_timesteps)?;
        let spacing = cfg.timestep_spacing.unwrap_or(DEFAULTS.spacing);
        let (timesteps, mut sigmas) = common::k_schedule(cfg, &ns, spacing, schedule, steps);
        sigmas.push(0.0);
        let sigmas: Vec<f64> = sigmas.into_iter().map(f32r).collect();
        let init_sigma = common::k_init_noise_sigma(&sigmas, spacing);
        Ok(Self {
            // ddim_uniform may give more steps than asked (see `SigmaSchedule::DdimUniform`).
            steps: timesteps.len(),
            timesteps,
            sigmas,
            init_sigma,
            prediction: cfg.prediction_type,
            derivatives: VecDeque::new(),
            next_index: None,
        })
    }

    /// ∫ from σ_i to σ_{i+1} of the Lagrange basis polynomial of node `σ_{i−j}` over the nodes
    /// `σ_i … σ_{i−order+1}` (diffusers integrates it with `scipy.integrate.quad`; 4-point
    /// Gauss–Legendre is exact for these polynomials of degree ≤ 3).
    fn coefficient(&self, order: usize, i: usize, j: usize) -> f64 {
        let basis = |tau: f64| {
            (0..order)
                .filter(|&k| k != j)
                .map(|k| (tau - self.sigmas[i - k]) / (self.sigmas[i - j] - self.sigmas[i - k]))
                .product::<f64>()
        };
        let (a, b) = (self.sigmas[i], self.sigmas[i + 1]);
        let (half, mid) = ((b - a) / 2.0, (a + b) / 2.0);
        const NODES: [(f64, f64); 4] = [
            (-0.861_136_311_594_052_6, 0.347_854_845_137_453_85),
            (-0.339_981_043_584_856_3, 0.652_145_154_862_546_1),
            (0.339_981_043_584_856_3, 0.652_145_154_862_546_1),
            (0.861_136_311_594_052_6, 0.347_854_845_137_453_85),
        ];
        half * NODES
            .iter()
            .map(|&(x, w)| w * basis(mid + half * x))
            .sum::<f64>()
    }
}

impl Scheduler for LmsScheduler {
    fn kind(&self) -> SamplerKind {
        SamplerKind::Lms
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
        if self.next_index != Some(i) {
            // A jump (first call, img2img start, a new image) starts a fresh history.
            self.reset();
        }
        let out_dtype = model_output.dtype();
        let (m, x) = (common::f32t(model_output)?, common::f32t(sample)?);
        let sigma = self.sigmas[i];
        let x0 = common::k_x0(self.prediction, &m, &x, sigma)?;
        let derivative = ((&x - &x0)? / sigma)?;
        self.derivatives.push_back(derivative);
        if self.derivatives.len() > LMS_ORDER {
            self.derivatives.pop_front();
        }
        // As diffusers: the order follows the step index, not the history length, so an img2img
        // run's first steps use the coefficients of a higher order with the derivatives it has.
        let order = (i + 1).min(LMS_ORDER);
        let mut prev = x;
        for (j, d) in self.derivatives.iter().rev().take(order).enumerate() {
            prev = (prev + d.affine(self.coefficient(order, i, j), 0.0)?)?;
        }
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
        common::lin2(1.0, original, self.sigmas[timestep_index], noise)
    }

    fn reset(&mut self) {
        self.derivatives.clear();
        self.next_index = None;
    }
}
