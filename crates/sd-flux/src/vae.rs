//! The FLUX autoencoder: sd-models' `AutoencoderKL` with 16 latent channels, no quant convs, and a
//! latent shift as well as a scale.

use std::path::Path;

use candle_core::{DType, Device};
use sd_models::vae::AutoencoderKL;
use sd_models::VaeConfig;

use crate::error::{Error, Result};

/// The FLUX.1 VAE config (`black-forest-labs/FLUX.1-dev/vae/config.json`), used for a lone
/// `ae.safetensors`, which carries no config.
pub fn flux_vae_config() -> VaeConfig {
    VaeConfig::flux1()
}

fn check_config(cfg: &VaeConfig, path: &Path) -> Result<()> {
    if cfg.latent_channels != 16 {
        return Err(Error::NotFlux {
            path: path.to_path_buf(),
            reason: format!(
                "this VAE has {} latent channels; FLUX needs its 16-channel autoencoder (vae/ of a FLUX repo, or ae.safetensors)",
                cfg.latent_channels
            ),
        });
    }
    if cfg.shift_factor.is_none() {
        tracing::warn!("{}: the VAE config has no shift_factor; FLUX's is 0.1159, using 0", path.display());
    }
    Ok(())
}

/// Loads the VAE from a diffusers `vae/` folder or an LDM-named file (BFL's `ae.safetensors`),
/// in `dtype` (F32 instead of F16 when the config says it overflows in F16, as FLUX's does), through
/// sd-models' VAE loader.
///
/// `config` replaces the built-in FLUX config for a single file (tiny or custom autoencoders);
/// folders always use their own `config.json`.
pub fn load_vae(path: &Path, dtype: DType, device: &Device, config: Option<&VaeConfig>) -> Result<AutoencoderKL> {
    if !path.exists() {
        return Err(Error::NotFound {
            what: "FLUX autoencoder".into(),
            path: path.to_path_buf(),
            hint: "pass ae.safetensors from black-forest-labs/FLUX.1-schnell or a diffusers vae/ folder".into(),
        });
    }
    if path.is_dir() {
        // A folder's own config decides; refuse a non-FLUX one before reading any weight.
        check_config(&sd_models::diffusers::read_vae_config(&path.join("config.json"))?, path)?;
    }
    let cfg = config.cloned().unwrap_or_else(flux_vae_config);
    check_config(&cfg, path)?;
    let (vae, _) = sd_models::vae::load_vae_weights(path, &cfg, dtype, device)?;
    Ok(vae)
}
