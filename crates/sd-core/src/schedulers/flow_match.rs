//! Flow matching: diffusers' `FlowMatchEulerDiscreteScheduler` as the rectified-flow pipelines (FLUX.1,
//! and the newer families built the same way) drive it. Sigmas are `linspace(1, 1/n, n)`, shifted
//! (statically by `shift`, or by a `mu` that grows with the image's token count when dynamic shifting is
//! on), then a final 0; the model predicts a velocity `v` and the Euler step is `x += (σ_next − σ)·v`.

use std::path::Path;

use candle_core::{DType, Tensor};
use serde::Deserialize;

use crate::error::{Error, Result};

fn d1000() -> usize {
    1000
}
fn d1() -> f64 {
    1.0
}
fn d_base_shift() -> Option<f64> {
    Some(0.5)
}
fn d_max_shift() -> Option<f64> {
    Some(1.15)
}
fn d256() -> usize {
    256
}
fn d4096() -> usize {
    4096
}
fn d_exponential() -> String {
    "exponential".into()
}

/// The scheduler settings (diffusers' `scheduler/scheduler_config.json`, same field names).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct FlowMatchConfig {
    /// Training timesteps: model timesteps are `sigma · num_train_timesteps`.
    #[serde(default = "d1000")]
    pub num_train_timesteps: usize,
    /// Static shift `shift·s / (1 + (shift − 1)·s)` used when dynamic shifting is off.
    #[serde(default = "d1")]
    pub shift: f64,
    /// Resolution-dependent shift (FLUX.1 dev: on; schnell: off).
    #[serde(default)]
    pub use_dynamic_shifting: bool,
    /// `mu` at `base_image_seq_len` tokens.
    #[serde(default = "d_base_shift")]
    pub base_shift: Option<f64>,
    /// `mu` at `max_image_seq_len` tokens.
    #[serde(default = "d_max_shift")]
    pub max_shift: Option<f64>,
    /// Token count where `mu = base_shift`.
    #[serde(default = "d256")]
    pub base_image_seq_len: usize,
    /// Token count where `mu = max_shift`.
    #[serde(default = "d4096")]
    pub max_image_seq_len: usize,
    /// `exponential` (FLUX) or `linear`.
    #[serde(default = "d_exponential")]
    pub time_shift_type: String,
    /// Not implemented; must be off.
    #[serde(default)]
    pub invert_sigmas: bool,
    /// Not implemented; must be absent.
    #[serde(default)]
    pub shift_terminal: Option<f64>,
    /// Not implemented; must be off.
    #[serde(default)]
    pub use_karras_sigmas: bool,
    /// Not implemented; must be off.
    #[serde(default)]
    pub use_exponential_sigmas: bool,
    /// Not implemented; must be off.
    #[serde(default)]
    pub use_beta_sigmas: bool,
    /// Not implemented; must be off.
    #[serde(default)]
    pub stochastic_sampling: bool,
}

impl FlowMatchConfig {
    /// FLUX.1 [dev]'s published config (dynamic shifting, mu from 0.5 to 1.15).
    pub fn dev() -> Self {
        Self {
            num_train_timesteps: 1000,
            shift: 3.0,
            use_dynamic_shifting: true,
            base_shift: Some(0.5),
            max_shift: Some(1.15),
            base_image_seq_len: 256,
            max_image_seq_len: 4096,
            time_shift_type: "exponential".into(),
            invert_sigmas: false,
            shift_terminal: None,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            stochastic_sampling: false,
        }
    }

    /// FLUX.1 [schnell]'s published config (no shift).
    pub fn schnell() -> Self {
        Self { shift: 1.0, use_dynamic_shifting: false, ..Self::dev() }
    }

    /// Reads and checks a `scheduler_config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        Self::from_json(&text).map_err(|e| match e {
            Error::ConfigJson { reason } => Error::InvalidConfig { path: path.to_path_buf(), reason },
            other => other,
        })
    }

    /// Parses and checks the text of a `scheduler_config.json` (every field by its diffusers name).
    pub fn from_json(text: &str) -> Result<Self> {
        let cleaned = super::config::python_json(text);
        let de = &mut serde_json::Deserializer::from_str(&cleaned);
        let cfg: Self = serde_path_to_error::deserialize(de)
            .map_err(|e| Error::ConfigJson { reason: format!("field `{}`: {}", e.path(), e.inner()) })?;
        cfg.check().map_err(|reason| Error::ConfigJson { reason })?;
        Ok(cfg)
    }

    /// Rejects options this implementation does not have, with what to change.
    pub fn check(&self) -> std::result::Result<(), String> {
        let unsupported = [
            ("invert_sigmas", self.invert_sigmas),
            ("shift_terminal", self.shift_terminal.is_some()),
            ("use_karras_sigmas", self.use_karras_sigmas),
            ("use_exponential_sigmas", self.use_exponential_sigmas),
            ("use_beta_sigmas", self.use_beta_sigmas),
            ("stochastic_sampling", self.stochastic_sampling),
        ];
        if let Some((name, _)) = unsupported.iter().find(|(_, on)| *on) {
            return Err(format!("{name} is not supported by the flow-matching Euler sampler; remove it (FLUX.1 does not use it)"));
        }
        if self.time_shift_type != "exponential" && self.time_shift_type != "linear" {
            return Err(format!("time_shift_type {:?} is unknown; use \"exponential\" or \"linear\"", self.time_shift_type));
        }
        if self.use_dynamic_shifting && self.base_image_seq_len >= self.max_image_seq_len {
            return Err("base_image_seq_len must be below max_image_seq_len".into());
        }
        if self.num_train_timesteps == 0 || self.shift.is_nan() || self.shift <= 0.0 {
            return Err("num_train_timesteps and shift must be positive".into());
        }
        Ok(())
    }

    /// `mu` for `image_seq_len` packed latent tokens (diffusers' `calculate_shift`, with this
    /// config's endpoints).
    pub fn mu(&self, image_seq_len: usize) -> f64 {
        calculate_shift(
            image_seq_len,
            self.base_image_seq_len,
            self.max_image_seq_len,
            self.base_shift.unwrap_or(0.5),
            self.max_shift.unwrap_or(1.15),
        )
    }

    /// The `steps + 1` sigmas of a run over `image_seq_len` tokens, ending in 0.
    pub fn sigmas(&self, steps: usize, image_seq_len: usize) -> Vec<f64> {
        let mu = self.mu(image_seq_len);
        let mut out: Vec<f64> = linspace_sigmas(steps)
            .into_iter()
            .map(|s| {
                let shifted = if self.use_dynamic_shifting {
                    if self.time_shift_type == "linear" {
                        mu / (mu + (1.0 / s - 1.0))
                    } else {
                        time_shift_exponential(mu, 1.0, s)
                    }
                } else {
                    self.shift * s / (1.0 + (self.shift - 1.0) * s)
                };
                // diffusers keeps sigmas in float32.
                shifted as f32 as f64
            })
            .collect();
        out.push(0.0);
        out
    }
    /// The `steps + 1` sigmas diffusers' `set_timesteps(steps)` makes when the pipeline passes no sigmas
    /// (the SD 3.x pipelines): timesteps spaced evenly (in float64) between the training schedule's
    /// largest and smallest sigma — which the scheduler's constructor has already shifted when dynamic
    /// shifting is off (float32) — then shifted (again) and rounded to float32, then a final 0.
    pub fn spaced_sigmas(&self, steps: usize, image_seq_len: usize) -> Vec<f64> {
        let n = self.num_train_timesteps.max(1);
        // The constructor's training sigmas t/N for t = N..1, shifted in float32 unless shifting is dynamic.
        let train = |t: usize| -> f64 {
            let s = t as f32 / n as f32;
            if self.use_dynamic_shifting {
                s as f64
            } else {
                let shift = self.shift as f32;
                (shift * s / (1.0 + (shift - 1.0) * s)) as f64
            }
        };
        let (hi, lo) = (train(n) * n as f64, train(1) * n as f64);
        let spaced: Vec<f64> = match steps {
            0 => Vec::new(),
            1 => vec![hi],
            k => {
                let step = (lo - hi) / (k - 1) as f64;
                (0..k).map(|i| if i == k - 1 { lo } else { hi + step * i as f64 }).collect()
            }
        };
        let mu = self.mu(image_seq_len);
        let mut out: Vec<f64> = spaced
            .into_iter()
            .map(|t| {
                let s = t / n as f64;
                let shifted = if self.use_dynamic_shifting {
                    if self.time_shift_type == "linear" {
                        mu / (mu + (1.0 / s - 1.0))
                    } else {
                        time_shift_exponential(mu, 1.0, s)
                    }
                } else {
                    self.shift * s / (1.0 + (self.shift - 1.0) * s)
                };
                shifted as f32 as f64
            })
            .collect();
        out.push(0.0);
        out
    }

}

/// `mu` linearly interpolated between `(base_seq_len, base_shift)` and `(max_seq_len, max_shift)`
/// (extrapolated outside), as diffusers' `calculate_shift`.
pub fn calculate_shift(image_seq_len: usize, base_seq_len: usize, max_seq_len: usize, base_shift: f64, max_shift: f64) -> f64 {
    let m = (max_shift - base_shift) / (max_seq_len as f64 - base_seq_len as f64);
    let b = base_shift - m * base_seq_len as f64;
    image_seq_len as f64 * m + b
}

/// `e^mu / (e^mu + (1/t − 1)^sigma)`.
pub fn time_shift_exponential(mu: f64, sigma: f64, t: f64) -> f64 {
    let e = mu.exp();
    e / (e + (1.0 / t - 1.0).powf(sigma))
}

/// `linspace(1, 1/n, n)` in float32, as the FLUX pipelines pass them to the scheduler.
pub fn linspace_sigmas(steps: usize) -> Vec<f64> {
    match steps {
        0 => Vec::new(),
        1 => vec![1.0],
        n => {
            let end = 1.0 / n as f64;
            let step = (end - 1.0) / (n - 1) as f64;
            (0..n).map(|i| if i == n - 1 { end } else { 1.0 + step * i as f64 } as f32 as f64).collect()
        }
    }
}

/// The first step index an img2img run of `steps` steps at `strength` denoises from, as
/// `FluxImg2ImgPipeline.get_timesteps`: `int(max(steps − min(steps·strength, steps), 0))`.
pub fn img2img_start(steps: usize, strength: f64) -> usize {
    let init = (steps as f64 * strength).min(steps as f64);
    (steps as f64 - init).max(0.0) as usize
}

/// A flow-matching Euler run: its sigmas, the velocity step and the forward process that img2img and
/// inpainting use to noise clean latents (`scale_noise`).
#[derive(Debug, Clone, PartialEq)]
pub struct FlowMatchEulerScheduler {
    sigmas: Vec<f64>,
    timesteps: Vec<f64>,
    num_train_timesteps: usize,
}

impl FlowMatchEulerScheduler {
    /// The schedule of `steps` steps over `image_seq_len` latent tokens (the dynamic shift's input).
    pub fn new(config: &FlowMatchConfig, steps: usize, image_seq_len: usize) -> Result<Self> {
        config.check().map_err(|reason| Error::ConfigJson { reason })?;
        if steps == 0 {
            return Err(Error::InvalidSteps { scheduler: "FlowMatchEuler", steps, max: usize::MAX });
        }
        Ok(Self::from_sigmas(config.sigmas(steps, image_seq_len), config.num_train_timesteps))
    }

    /// The schedule diffusers' pipelines get when they pass no sigmas (SD 3.x; see
    /// [`FlowMatchConfig::spaced_sigmas`]).
    pub fn spaced(config: &FlowMatchConfig, steps: usize, image_seq_len: usize) -> Result<Self> {
        config.check().map_err(|reason| Error::ConfigJson { reason })?;
        if steps == 0 {
            return Err(Error::InvalidSteps { scheduler: "FlowMatchEuler", steps, max: usize::MAX });
        }
        Ok(Self::from_sigmas(config.spaced_sigmas(steps, image_seq_len), config.num_train_timesteps))
    }

    /// `steps + 1` sigmas ending in 0 → the schedule (timesteps `σ · N`).
    fn from_sigmas(sigmas: Vec<f64>, num_train_timesteps: usize) -> Self {
        let n = num_train_timesteps as f64;
        let timesteps = sigmas[..sigmas.len().saturating_sub(1)].iter().map(|s| s * n).collect();
        Self { sigmas, timesteps, num_train_timesteps }
    }

    /// The `steps + 1` sigmas, ending in 0.
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// The timesteps `σ · num_train_timesteps` of the model calls, one per step.
    pub fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// Training timesteps (the model receives `timestep / num_train_timesteps`, i.e. σ).
    pub fn num_train_timesteps(&self) -> usize {
        self.num_train_timesteps
    }

    /// The first step of an img2img/inpaint run at `strength` (see [`img2img_start`]); refuses a
    /// strength outside [0, 1] or one that leaves no step to run.
    pub fn begin_at_strength(&self, strength: f64) -> Result<usize> {
        let steps = self.timesteps.len();
        if !(0.0..=1.0).contains(&strength) {
            return Err(Error::InvalidStrength { strength, steps, reason: "it must lie in [0, 1]".into() });
        }
        let start = img2img_start(steps, strength);
        if start >= steps {
            return Err(Error::InvalidStrength {
                strength,
                steps,
                reason: "it leaves no step to run; use a larger strength (0 would return the input unchanged)".into(),
            });
        }
        Ok(start)
    }

    /// One Euler step from step `index` to `index + 1` given the model's velocity, in F32 as diffusers
    /// upcasts the sample.
    pub fn step(&self, velocity: &Tensor, index: usize, sample: &Tensor) -> Result<Tensor> {
        let (sigma, next) = match (self.sigmas.get(index), self.sigmas.get(index + 1)) {
            (Some(&s), Some(&n)) => (s, n),
            _ => return Err(Error::StepIndex { index, len: self.timesteps.len() }),
        };
        Ok((sample.to_dtype(DType::F32)? + (velocity.to_dtype(DType::F32)? * (next - sigma))?)?)
    }

    /// The forward process at sigma index `index`: `σ·noise + (1 − σ)·clean` (diffusers' `scale_noise`).
    /// Index `steps` (σ = 0) returns the clean latents.
    pub fn scale_noise(&self, clean: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        let sigma = *self.sigmas.get(index).ok_or(Error::StepIndex { index, len: self.timesteps.len() })?;
        Ok(((noise * sigma)? + (clean * (1.0 - sigma))?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shift_endpoints_and_schnell_identity() {
        let c = FlowMatchConfig::dev();
        assert!((c.mu(256) - 0.5).abs() < 1e-12 && (c.mu(4096) - 1.15).abs() < 1e-12);
        let s = FlowMatchConfig::schnell().sigmas(4, 4096);
        assert_eq!(s, vec![1.0, 0.75, 0.5, 0.25, 0.0]);
        let d = c.sigmas(4, 4096);
        assert_eq!(d.len(), 5);
        assert!(d[0] == 1.0 && d[4] == 0.0 && d.windows(2).all(|w| w[0] > w[1]));
        // Dynamic shifting pushes every intermediate sigma up.
        assert!(d[1..4].iter().zip(&s[1..4]).all(|(a, b)| a > b));
    }

    #[test]
    fn img2img_start_matches_get_timesteps() {
        assert_eq!(img2img_start(4, 0.6), 1);
        assert_eq!(img2img_start(28, 1.0), 0);
        assert_eq!(img2img_start(10, 0.0), 10);
        assert_eq!(img2img_start(10, 0.35), 6);
    }

    #[test]
    fn euler_scheduler_steps_and_noises() -> Result<()> {
        let s = FlowMatchEulerScheduler::new(&FlowMatchConfig::schnell(), 4, 16)?;
        assert_eq!(s.timesteps(), &[1000.0, 750.0, 500.0, 250.0]);
        let dev = candle_core::Device::Cpu;
        let x = Tensor::full(2f32, (1, 2), &dev)?;
        let v = Tensor::full(-4f32, (1, 2), &dev)?;
        // x + (0.75 − 1)·v = 2 + 1 = 3
        assert_eq!(s.step(&v, 0, &x)?.to_vec2::<f32>()?, vec![vec![3.0, 3.0]]);
        let n = Tensor::full(10f32, (1, 2), &dev)?;
        assert_eq!(s.scale_noise(&x, &n, 2)?.to_vec2::<f32>()?, vec![vec![6.0, 6.0]]);
        assert_eq!(s.scale_noise(&x, &n, 4)?.to_vec2::<f32>()?, vec![vec![2.0, 2.0]]);
        assert!(s.step(&v, 4, &x).is_err() && s.scale_noise(&x, &n, 5).is_err());
        assert_eq!(s.begin_at_strength(0.6)?, 1);
        assert_eq!(s.begin_at_strength(0.1)?, 3);
        assert!(s.begin_at_strength(0.0).is_err() && s.begin_at_strength(1.5).is_err() && s.begin_at_strength(f64::NAN).is_err());
        Ok(())
    }

    #[test]
    fn config_fields_are_named() {
        let e = FlowMatchConfig::from_json(r#"{"shift": "three"}"#).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("shift"), "{e}");
        let e = FlowMatchConfig::from_json(r#"{"use_beta_sigmas": true}"#).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("use_beta_sigmas"), "{e}");
    }

    #[test]
    fn unsupported_options_are_named() {
        let c = FlowMatchConfig { use_karras_sigmas: true, ..FlowMatchConfig::dev() };
        assert!(c.check().err().unwrap_or_default().contains("use_karras_sigmas"));
    }
}
