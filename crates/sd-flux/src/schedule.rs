//! The flow-matching Euler schedule of diffusers' `FlowMatchEulerDiscreteScheduler` as the FLUX
//! pipelines drive it: sigmas `linspace(1, 1/n, n)`, shifted (dev: exponentially by a `mu` that
//! grows with the image's token count; schnell: not at all), then a final 0.

use std::path::Path;

use serde::Deserialize;

use crate::config::FluxVariant;
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

    /// The published config of `variant`.
    pub fn for_variant(variant: FluxVariant) -> Self {
        match variant {
            FluxVariant::Dev => Self::dev(),
            FluxVariant::Schnell => Self::schnell(),
        }
    }

    /// Reads and checks a `scheduler_config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        let cfg: Self = serde_json::from_str(&text)
            .map_err(|e| Error::InvalidConfig { path: path.to_path_buf(), reason: e.to_string() })?;
        cfg.check().map_err(|reason| Error::InvalidConfig { path: path.to_path_buf(), reason })?;
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
            return Err(format!("{name} is not supported by sd-flux's flow-matching Euler sampler; remove it (FLUX.1 does not use it)"));
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

/// Packed latent tokens of a `width × height` image with a VAE of `vae_scale_factor`.
pub fn image_seq_len(width: usize, height: usize, vae_scale_factor: usize) -> usize {
    (height / vae_scale_factor / 2) * (width / vae_scale_factor / 2)
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
    fn unsupported_options_are_named() {
        let c = FlowMatchConfig { use_karras_sigmas: true, ..FlowMatchConfig::dev() };
        assert!(c.check().err().unwrap_or_default().contains("use_karras_sigmas"));
    }
}
