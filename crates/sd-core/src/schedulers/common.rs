//! Noise-schedule arithmetic shared by the schedulers, following diffusers step by step.
//!
//! diffusers keeps `alphas_cumprod` and the final sigmas in f32; the helpers round to f32 at the
//! same places so timesteps and sigmas agree with diffusers to the last digit or two.

use candle_core::{DType, Tensor};

use super::config::{BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing};
use super::SigmaSchedule;
use crate::error::{Error, Result};

/// Rounds to the nearest f32, the precision diffusers stores schedules in.
pub(crate) fn f32r(x: f64) -> f64 {
    x as f32 as f64
}

/// The per-class defaults diffusers uses for keys a config leaves out.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClassDefaults {
    pub name: &'static str,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub spacing: TimestepSpacing,
    pub clip_sample: bool,
    pub set_alpha_to_one: bool,
}

impl ClassDefaults {
    /// Defaults of DDIMScheduler, DDPMScheduler, Euler*, DPMSolverMultistep and UniPC.
    pub const fn standard(name: &'static str, spacing: TimestepSpacing, clip_sample: bool) -> Self {
        Self {
            name,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            spacing,
            clip_sample,
            set_alpha_to_one: true,
        }
    }
}

/// The training noise schedule: `alphas_cumprod[t]` for t in 0..T.
#[derive(Debug, Clone)]
pub(crate) struct NoiseSchedule {
    pub alphas_cumprod: Vec<f64>,
}

impl NoiseSchedule {
    /// Builds the schedule from a config, filling unset fields with the class defaults.
    pub fn new(cfg: &SchedulerConfig, d: &ClassDefaults, zero_snr_clamp: bool) -> Result<Self> {
        let n = cfg.num_train_timesteps;
        if n < 2 {
            return Err(Error::UnsupportedConfig {
                scheduler: d.name,
                option: format!("num_train_timesteps = {n}"),
                hint: "use the model's scheduler_config.json (Stable Diffusion uses 1000)",
            });
        }
        let betas: Vec<f64> = if let Some(tb) = &cfg.trained_betas {
            if tb.len() != n {
                return Err(Error::UnsupportedConfig {
                    scheduler: d.name,
                    option: format!(
                        "trained_betas of length {} with num_train_timesteps = {n}",
                        tb.len()
                    ),
                    hint: "give one beta per training timestep",
                });
            }
            tb.iter().map(|&b| f32r(b)).collect()
        } else {
            let start = cfg.beta_start.unwrap_or(d.beta_start);
            let end = cfg.beta_end.unwrap_or(d.beta_end);
            match cfg.beta_schedule.unwrap_or(d.beta_schedule) {
                BetaSchedule::Linear => linspace(start, end, n).into_iter().map(f32r).collect(),
                BetaSchedule::ScaledLinear => linspace(start.sqrt(), end.sqrt(), n)
                    .into_iter()
                    .map(|b| f32r(f32r(b) * f32r(b)))
                    .collect(),
                BetaSchedule::SquaredcosCapV2 => {
                    let f = |t: f64| {
                        ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                            .cos()
                            .powi(2)
                    };
                    (0..n)
                        .map(|i| {
                            let t1 = i as f64 / n as f64;
                            let t2 = (i + 1) as f64 / n as f64;
                            f32r((1.0 - f(t2) / f(t1)).min(0.999))
                        })
                        .collect()
                }
            }
        };
        let betas = if cfg.rescale_betas_zero_snr {
            rescale_zero_terminal_snr(&betas)
        } else {
            betas
        };
        let mut acc = 1.0f64;
        let mut alphas_cumprod: Vec<f64> = betas
            .iter()
            .map(|&b| {
                acc *= f32r(1.0 - b);
                f32r(acc)
            })
            .collect();
        if cfg.rescale_betas_zero_snr && zero_snr_clamp {
            // diffusers' sigma-based schedulers avoid an infinite sigma at the last timestep.
            alphas_cumprod[n - 1] = 2f64.powi(-24);
        }
        Ok(Self { alphas_cumprod })
    }

    /// The number of training timesteps.
    pub fn len(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// `sqrt((1 - ᾱ) / ᾱ)` for every training timestep (ascending in t).
    pub fn train_sigmas(&self) -> Vec<f64> {
        self.alphas_cumprod
            .iter()
            .map(|&a| f32r(((1.0 - a) / a).sqrt()))
            .collect()
    }

    /// `alphas_cumprod` at an integer timestep, `final` for negative ones.
    pub fn alpha_prod(&self, t: i64, final_alpha: f64) -> f64 {
        if t >= 0 {
            self.alphas_cumprod[(t as usize).min(self.len() - 1)]
        } else {
            final_alpha
        }
    }
}

fn rescale_zero_terminal_snr(betas: &[f64]) -> Vec<f64> {
    let mut acc = 1.0;
    let mut sqrt_bar: Vec<f64> = betas
        .iter()
        .map(|b| {
            acc *= 1.0 - b;
            acc.sqrt()
        })
        .collect();
    let first = sqrt_bar[0];
    let last = sqrt_bar[sqrt_bar.len() - 1];
    for v in sqrt_bar.iter_mut() {
        *v = (*v - last) * first / (first - last);
    }
    let bar: Vec<f64> = sqrt_bar.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(f32r(1.0 - bar[0]));
    for i in 1..bar.len() {
        out.push(f32r(1.0 - bar[i] / bar[i - 1]));
    }
    out
}

/// numpy's `linspace(start, end, n)` (endpoint included).
pub(crate) fn linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    match n {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (end - start) / (n - 1) as f64;
            let mut v: Vec<f64> = (0..n).map(|i| start + i as f64 * step).collect();
            v[n - 1] = end;
            v
        }
    }
}

/// numpy's `arange(start, stop, step)` for a negative float step.
fn arange_down(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let n = ((stop - start) / step).ceil().max(0.0) as usize;
    (0..n).map(|i| start + i as f64 * step).collect()
}

/// numpy's round-half-to-even.
pub(crate) fn round_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 {
        2.0 * (x / 2.0).round()
    } else {
        r
    }
}

/// Checks `1 ≤ steps ≤ num_train_timesteps`.
pub(crate) fn check_steps(name: &'static str, steps: usize, num_train: usize) -> Result<()> {
    if steps == 0 || steps > num_train {
        return Err(Error::InvalidSteps {
            scheduler: name,
            steps,
            max: num_train,
        });
    }
    Ok(())
}

/// The DDIM/DDPM/Euler/Heun timestep spacing (`steps` values, descending).
pub(crate) fn spaced_timesteps(
    spacing: TimestepSpacing,
    steps: usize,
    num_train: usize,
    offset: usize,
) -> Vec<f64> {
    match spacing {
        TimestepSpacing::Linspace => linspace(0.0, (num_train - 1) as f64, steps)
            .into_iter()
            .rev()
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = num_train / steps;
            (0..steps)
                .rev()
                .map(|i| (i * ratio + offset) as f64)
                .collect()
        }
        TimestepSpacing::Trailing => trailing(num_train, num_train, steps),
    }
}

/// "trailing" spacing: `round(arange(last, 0, -T/steps)) - 1`.
///
/// For some step counts (61, 103, …) numpy's float `arange` yields one extra value that rounds
/// to timestep -1 in diffusers; it is dropped here so there are always `steps` timesteps.
fn trailing(num_train: usize, last: usize, steps: usize) -> Vec<f64> {
    let ratio = num_train as f64 / steps as f64;
    let mut v: Vec<f64> = arange_down(last as f64, 0.0, -ratio)
        .into_iter()
        .map(|t| round_even(t) - 1.0)
        .collect();
    v.truncate(steps);
    v
}

/// The DPM-Solver/UniPC spacing, which spaces `steps + 1` points and drops the last.
pub(crate) fn multistep_timesteps(
    spacing: TimestepSpacing,
    steps: usize,
    num_train: usize,
    last_timestep: usize,
    offset: usize,
) -> Vec<f64> {
    match spacing {
        TimestepSpacing::Linspace => {
            let mut v: Vec<f64> = linspace(0.0, last_timestep as f64 - 1.0, steps + 1)
                .into_iter()
                .map(round_even)
                .rev()
                .collect();
            v.pop();
            v
        }
        TimestepSpacing::Leading => {
            let ratio = last_timestep / (steps + 1);
            (1..=steps)
                .rev()
                .map(|i| (i * ratio + offset) as f64)
                .collect()
        }
        TimestepSpacing::Trailing => trailing(num_train, last_timestep, steps),
    }
}

/// numpy's `interp(x, arange(len(fp)), fp)`.
pub(crate) fn interp(x: f64, fp: &[f64]) -> f64 {
    if x <= 0.0 {
        return fp[0];
    }
    let last = fp.len() - 1;
    if x >= last as f64 {
        return fp[last];
    }
    let i = x.floor() as usize;
    let w = x - i as f64;
    fp[i] + w * (fp[i + 1] - fp[i])
}

/// diffusers' `_sigma_to_t`: the fractional training timestep whose sigma is `sigma`.
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    // argmax of the cumulative count of `log_sigma >= log_sigmas[i]`: the last such index.
    let count_last = log_sigmas
        .iter()
        .rposition(|&ls| log_sigma - ls >= 0.0)
        .unwrap_or(0);
    let low_idx = count_last.min(n - 2);
    let high_idx = low_idx + 1;
    let low = log_sigmas[low_idx];
    let high = log_sigmas[high_idx];
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// The config as a diffusers class without `sigma_min`/`sigma_max` and zero-terminal-SNR options
/// reads it (LMS, KDPM2, DEIS): those fields belong to other classes and are ignored.
pub(crate) fn k_class_config(cfg: &SchedulerConfig) -> SchedulerConfig {
    SchedulerConfig {
        sigma_min: None,
        sigma_max: None,
        rescale_betas_zero_snr: false,
        ..cfg.clone()
    }
}

/// [`sigma_to_t`] in diffusers' float32 arithmetic, for sigmas that diffusers keeps as float32
/// tensors (KDPM2's midpoints): the log and the interpolation weight are rounded to f32.
pub(crate) fn sigma_to_t_f32(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let log_sigma = (sigma.max(1e-10) as f32).ln();
    let n = log_sigmas.len();
    let count_last = log_sigmas
        .iter()
        .rposition(|&ls| log_sigma - ls as f32 >= 0.0)
        .unwrap_or(0);
    let low_idx = count_last.min(n - 2);
    let high_idx = low_idx + 1;
    let (low, high) = (log_sigmas[low_idx] as f32, log_sigmas[high_idx] as f32);
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) as f64 * low_idx as f64 + w as f64 * high_idx as f64
}

/// Karras et al. (2022) sigmas with rho = 7 from `sigma_max` down to `sigma_min`.
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, steps: usize) -> Vec<f64> {
    let rho = 7.0;
    let min_inv = sigma_min.powf(1.0 / rho);
    let max_inv = sigma_max.powf(1.0 / rho);
    linspace(0.0, 1.0, steps)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// Sigmas evenly spaced in log from `sigma_max` down to `sigma_min`.
pub(crate) fn exponential_sigmas(sigma_min: f64, sigma_max: f64, steps: usize) -> Vec<f64> {
    linspace(sigma_max.ln(), sigma_min.ln(), steps)
        .into_iter()
        .map(f64::exp)
        .collect()
}

/// Sigmas at the quantiles of a Beta(0.6, 0.6) distribution between `sigma_max` and `sigma_min`
/// (Lee et al. 2024, "Beta Sampling is All You Need"; diffusers' `use_beta_sigmas`).
pub(crate) fn beta_sigmas(sigma_min: f64, sigma_max: f64, steps: usize) -> Vec<f64> {
    linspace(0.0, 1.0, steps)
        .into_iter()
        .map(|r| sigma_min + beta_ppf(1.0 - r, 0.6, 0.6) * (sigma_max - sigma_min))
        .collect()
}

/// `ln Γ(x)` for x > 0 (Lanczos, g = 7; ~1e-15 relative).
fn ln_gamma(x: f64) -> f64 {
    const G: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let t = x + 7.5;
    let sum = G[1..]
        .iter()
        .enumerate()
        .fold(G[0], |acc, (i, g)| acc + g / (x + i as f64 + 1.0));
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
}

/// The regularized incomplete beta function `I_x(a, b)` (continued fraction, Lentz's method).
fn beta_cdf(x: f64, a: f64, b: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    if x > (a + 1.0) / (a + b + 2.0) {
        return 1.0 - beta_cdf(1.0 - x, b, a);
    }
    let ln_front = a * x.ln() + b * (1.0 - x).ln() - (ln_gamma(a) + ln_gamma(b) - ln_gamma(a + b));
    let tiny = 1e-300;
    let (mut c, mut d) = (1.0, 1.0 - (a + b) * x / (a + 1.0));
    d = if d.abs() < tiny { 1.0 / tiny } else { 1.0 / d };
    let mut f = d;
    for m in 1..500 {
        let m = m as f64;
        for num in [
            m * (b - m) * x / ((a + 2.0 * m - 1.0) * (a + 2.0 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2.0 * m) * (a + 2.0 * m + 1.0)),
        ] {
            d = 1.0 + num * d;
            d = if d.abs() < tiny { 1.0 / tiny } else { 1.0 / d };
            c = 1.0 + num / c;
            if c.abs() < tiny {
                c = tiny;
            }
            f *= c * d;
        }
        if (c * d - 1.0).abs() < 1e-16 {
            break;
        }
    }
    ln_front.exp() * f / a
}

/// The Beta(a, b) quantile function (`scipy.stats.beta.ppf`), by bisection on [`beta_cdf`].
fn beta_ppf(q: f64, a: f64, b: f64) -> f64 {
    if q <= 0.0 {
        return 0.0;
    }
    if q >= 1.0 {
        return 1.0;
    }
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if mid <= lo || mid >= hi {
            break;
        }
        if beta_cdf(mid, a, b) < q {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// Align Your Steps sigma tables for 10 steps (NVIDIA, "Align Your Steps", 2024), as ComfyUI's
/// `comfy_extras/nodes_align_your_steps.py` publishes them: SD 1.x and SDXL.
const AYS_SD1: [f64; 11] = [
    14.614_641_229_3,
    6.474_576_095_6,
    3.863_674_598_5,
    2.694_615_152_0,
    1.884_192_117_7,
    1.394_380_509_2,
    0.964_258_390_4,
    0.652_368_601_6,
    0.397_745_627_2,
    0.151_523_266_2,
    0.029_167_158_2,
];
const AYS_SDXL: [f64; 11] = [
    14.614_641_229_3,
    6.318_448_528_7,
    3.768_179_031_5,
    2.181_148_076_9,
    1.340_524_494_5,
    0.862_072_114_1,
    0.555_069_328_9,
    0.379_854_070_8,
    0.233_236_413_4,
    0.111_418_817_7,
    0.029_167_158_2,
];

/// k-diffusion's `DiscreteSchedule.t_to_sigma`: log-linear between the training sigmas.
fn t_to_sigma(t: f64, log_sigmas: &[f64]) -> f64 {
    let t = t.clamp(0.0, (log_sigmas.len() - 1) as f64);
    let (lo, hi) = (t.floor() as usize, t.ceil() as usize);
    let w = t - t.floor();
    ((1.0 - w) * log_sigmas[lo] + w * log_sigmas[hi]).exp()
}

/// The sigmas (descending, without the final 0) of the schedules defined on the model's
/// training sigmas `train` (ascending) by ComfyUI's `comfy/samplers.py` and A1111's
/// `sd_schedulers.py`: `sgm_uniform`, `simple`, `ddim_uniform` and Align Your Steps.
///
/// `ddim_uniform` takes every ⌊T/steps⌋-th training sigma from index 1, so it yields
/// ⌈(T−1)/⌊T/steps⌋⌉ sigmas: more than `steps` when T is not a multiple of `steps`, as in
/// ComfyUI and A1111.
pub(crate) fn table_sigmas(schedule: SigmaSchedule, train: &[f64], steps: usize) -> Vec<f64> {
    let n = train.len();
    let log_sigmas: Vec<f64> = train.iter().map(|s| f32r(s.ln())).collect();
    match schedule {
        SigmaSchedule::SgmUniform => {
            // linspace(t(σ_max), t(σ_min), steps + 1)[:-1] with t(σ_max) = T−1, t(σ_min) = 0.
            linspace((n - 1) as f64, 0.0, steps + 1)[..steps]
                .iter()
                .map(|&t| t_to_sigma(t, &log_sigmas))
                .collect()
        }
        SigmaSchedule::Simple => {
            let ss = n as f64 / steps as f64;
            (0..steps)
                .map(|x| train[n - 1 - ((x as f64 * ss) as usize).min(n - 1)])
                .collect()
        }
        SigmaSchedule::DdimUniform => {
            let ss = (n / steps).max(1);
            let mut v: Vec<f64> = (1..n).step_by(ss).map(|x| train[x]).collect();
            v.reverse();
            v
        }
        SigmaSchedule::AlignYourSteps | SigmaSchedule::AlignYourStepsXl => {
            let table = if schedule == SigmaSchedule::AlignYourSteps {
                &AYS_SD1
            } else {
                &AYS_SDXL
            };
            let sigmas: Vec<f64> = if steps + 1 == table.len() {
                table.to_vec()
            } else {
                // loglinear_interp: interpolate log σ (ascending) over [0, 1].
                let ys: Vec<f64> = table.iter().rev().map(|s| s.ln()).collect();
                let scale = (ys.len() - 1) as f64;
                let mut v: Vec<f64> = linspace(0.0, 1.0, steps + 1)
                    .into_iter()
                    .map(|x| interp(x * scale, &ys).exp())
                    .collect();
                v.reverse();
                v
            };
            // The last of the steps + 1 values becomes the final 0.
            sigmas[..steps].to_vec()
        }
        _ => Vec::new(),
    }
}

/// Rejects config options that no scheduler here implements. `thresholding` belongs to the
/// classes that have it in diffusers (DDIM, DDPM, DPM-Solver, UniPC, LCM); the others ignore it, as
/// their `from_config` does.
pub(crate) fn reject_unsupported(cfg: &SchedulerConfig, name: &'static str, has_thresholding: bool) -> Result<()> {
    let unsupported = [
        (
            has_thresholding && cfg.thresholding,
            "thresholding = true",
            "dynamic thresholding is for pixel-space models; set it to false",
        ),
        (
            cfg.use_lu_lambdas == Some(true),
            "use_lu_lambdas = true",
            "use Karras or exponential sigmas instead",
        ),
        (
            cfg.use_flow_sigmas == Some(true),
            "use_flow_sigmas = true",
            "flow-matching models need a flow-matching scheduler",
        ),
    ];
    for (bad, option, hint) in unsupported {
        if bad {
            return Err(Error::UnsupportedConfig {
                scheduler: name,
                option: option.into(),
                hint,
            });
        }
    }
    let flags = [
        cfg.use_karras_sigmas,
        cfg.use_exponential_sigmas,
        cfg.use_beta_sigmas,
    ];
    if flags.iter().filter(|&&f| f == Some(true)).count() > 1 {
        return Err(Error::UnsupportedConfig {
            scheduler: name,
            option: "more than one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas true".into(),
            hint: "enable at most one sigma schedule",
        });
    }
    Ok(())
}

/// Rejects a Karras/exponential request on a scheduler without sigma schedules.
pub(crate) fn require_default_schedule(schedule: SigmaSchedule, name: &'static str) -> Result<()> {
    match schedule {
        SigmaSchedule::Default => Ok(()),
        other => Err(Error::UnsupportedSchedule {
            scheduler: name,
            schedule: other.as_str(),
        }),
    }
}

/// Rejects a prediction type a scheduler cannot handle.
pub(crate) fn require_prediction(
    p: PredictionType,
    allowed: &[PredictionType],
    name: &'static str,
) -> Result<()> {
    if allowed.contains(&p) {
        Ok(())
    } else {
        Err(Error::UnsupportedConfig {
            scheduler: name,
            option: format!("prediction_type = {p:?}"),
            hint: "use epsilon or v_prediction",
        })
    }
}

/// Checks a step index against the schedule length.
pub(crate) fn check_index(index: usize, len: usize) -> Result<()> {
    if index >= len {
        return Err(Error::StepIndex { index, len });
    }
    Ok(())
}

/// Converts to F32, the precision all scheduler arithmetic runs in.
pub(crate) fn f32t(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F32)?)
}

/// `a·x + b·y`.
pub(crate) fn lin2(a: f64, x: &Tensor, b: f64, y: &Tensor) -> Result<Tensor> {
    Ok((x.affine(a, 0.0)? + y.affine(b, 0.0)?)?)
}

/// The predicted clean sample of a DDPM-parameterised model at `alpha_prod_t`.
pub(crate) fn ddpm_x0(
    pred: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    alpha_prod_t: f64,
) -> Result<Tensor> {
    let beta_prod_t = 1.0 - alpha_prod_t;
    match pred {
        PredictionType::Epsilon => lin2(
            1.0 / alpha_prod_t.sqrt(),
            sample,
            -beta_prod_t.sqrt() / alpha_prod_t.sqrt(),
            model_output,
        ),
        PredictionType::VPrediction => lin2(
            alpha_prod_t.sqrt(),
            sample,
            -beta_prod_t.sqrt(),
            model_output,
        ),
        PredictionType::Sample => Ok(model_output.clone()),
    }
}

/// Rejects a strength outside [0, 1] (NaN included).
pub(crate) fn check_strength(strength: f64, steps: usize) -> Result<()> {
    if (0.0..=1.0).contains(&strength) {
        Ok(())
    } else {
        Err(Error::InvalidStrength {
            strength,
            steps,
            reason: "strength must lie in (0, 1]".into(),
        })
    }
}

/// The steps an img2img run at `strength` denoises, as diffusers' SD pipelines' `get_timesteps`:
/// `min(⌊steps · strength⌋, steps)`.
pub fn img2img_steps(steps: usize, strength: f64) -> usize {
    ((steps as f64 * strength) as usize).min(steps)
}

/// The first step index that diffusers' img2img `get_timesteps(strength)` keeps.
pub(crate) fn strength_start(steps: usize, strength: f64, order: usize) -> Result<usize> {
    check_strength(strength, steps)?;
    let init = img2img_steps(steps, strength);
    if init == 0 {
        return Err(Error::InvalidStrength {
            strength,
            steps,
            reason:
                "it leaves no denoising step; raise strength or steps so that strength × steps ≥ 1"
                    .into(),
        });
    }
    Ok((steps - init) * order)
}

/// The predicted clean sample of a sigma-parameterised (k-diffusion) step at noise level `sigma`.
pub(crate) fn k_x0(
    pred: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f64,
) -> Result<Tensor> {
    match pred {
        PredictionType::Epsilon => lin2(1.0, sample, -sigma, model_output),
        PredictionType::VPrediction => {
            let s2 = sigma * sigma + 1.0;
            lin2(-sigma / s2.sqrt(), model_output, 1.0 / s2, sample)
        }
        PredictionType::Sample => Ok(model_output.clone()),
    }
}

/// `sample / sqrt(sigma² + 1)`, the k-diffusion model-input scaling.
pub(crate) fn k_scale(sample: &Tensor, sigma: f64) -> Result<Tensor> {
    Ok(sample.affine(1.0 / (sigma * sigma + 1.0).sqrt(), 0.0)?)
}

/// k-diffusion's initial noise scale: the largest sigma, or `sqrt(σ²+1)` for "leading" spacing.
pub(crate) fn k_init_noise_sigma(sigmas: &[f64], spacing: TimestepSpacing) -> f64 {
    let max = sigmas.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
        TimestepSpacing::Leading => f32r((max * max + 1.0).sqrt()),
    }
}

/// Euler/Heun timesteps and sigmas (`steps` of each, sigmas without the final one; more for
/// `ddim_uniform`, see [`table_sigmas`]).
///
/// Karras/exponential/beta ranges come from the spaced sigmas, as in diffusers' Euler and Heun;
/// the ComfyUI/A1111 schedules from the training sigmas.
pub(crate) fn k_schedule(
    cfg: &SchedulerConfig,
    ns: &NoiseSchedule,
    spacing: TimestepSpacing,
    schedule: SigmaSchedule,
    steps: usize,
) -> (Vec<f64>, Vec<f64>) {
    let timesteps: Vec<f64> =
        spaced_timesteps(spacing, steps, cfg.num_train_timesteps, cfg.steps_offset)
            .into_iter()
            .map(f32r)
            .collect();
    let train = ns.train_sigmas();
    let log_sigmas: Vec<f64> = train.iter().map(|s| f32r(s.ln())).collect();
    let sigmas: Vec<f64> = timesteps.iter().map(|&t| interp(t, &train)).collect();
    let (lo, hi) = (
        cfg.sigma_min.unwrap_or(sigmas[steps - 1]),
        cfg.sigma_max.unwrap_or(sigmas[0]),
    );
    let sigmas = match schedule {
        SigmaSchedule::Default => return (timesteps, sigmas),
        SigmaSchedule::Karras => karras_sigmas(lo, hi, steps),
        SigmaSchedule::Exponential => exponential_sigmas(lo, hi, steps),
        SigmaSchedule::Beta => beta_sigmas(lo, hi, steps),
        _ => table_sigmas(schedule, &train, steps),
    };
    let ts = sigmas
        .iter()
        .map(|&s| f32r(sigma_to_t(s, &log_sigmas)))
        .collect();
    (ts, sigmas)
}
