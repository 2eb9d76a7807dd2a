//! The Z-Image autoencoder: FLUX.1's 16-channel `AutoencoderKL` (no quant convs, a latent scale and shift),
//! run by sd-models.

use std::path::Path;

use candle_core::{DType, Device};
use sd_models::vae::AutoencoderKL;
use sd_models::VaeConfig;

use crate::error::{Error, Result};

/// The Z-Image / FLUX.1 VAE config, for a lone `ae.safetensors`, which carries no config.
pub fn zimage_vae_config() -> VaeConfig {
    VaeConfig::flux1()
}

fn check_config(cfg: &VaeConfig, path: &Path) -> Result<()> {
    if cfg.latent_channels != 16 {
        return Err(Error::NotZImage {
            path: path.to_path_buf(),
            reason: format!("this VAE has {} latent channels; Z-Image needs its 16-channel autoencoder (vae/ of a Z-Image repo, or FLUX.1's ae.safetensors)", cfg.latent_channels),
        });
    }
    if cfg.shift_factor.is_none() {
        tracing::warn!("{}: the VAE config has no shift_factor; Z-Image's is 0.1159, using 0", path.display());
    }
    Ok(())
}

/// The dtype the VAE runs in for a model loaded in `dtype`: F32 on the CPU (candle's CPU convolutions and
/// matmuls have no half-precision kernels), and F32 instead of F16 where the config says F16 overflows
/// (`force_upcast`, as diffusers upcasts); otherwise `dtype`.
pub fn vae_dtype(dtype: DType, device: &Device, cfg: &VaeConfig) -> DType {
    match dtype {
        DType::BF16 | DType::F16 if device.is_cpu() => DType::F32,
        DType::F16 if cfg.force_upcast => DType::F32,
        other => other,
    }
}

/// Loads the VAE from a diffusers `vae/` folder (its own `config.json`) or an LDM-named file
/// (`ae.safetensors`, with `config` or the published config), in [`vae_dtype`].
pub fn load_vae(path: &Path, dtype: DType, device: &Device, config: Option<&VaeConfig>) -> Result<AutoencoderKL> {
    if !path.exists() {
        return Err(Error::NotFound {
            what: "Z-Image autoencoder".into(),
            path: path.to_path_buf(),
            hint: "pass the vae/ folder of a Z-Image repo or ae.safetensors".into(),
        });
    }
    let cfg = if path.is_dir() {
        sd_models::diffusers::read_vae_config(&path.join("config.json"))?
    } else {
        config.cloned().unwrap_or_else(zimage_vae_config)
    };
    check_config(&cfg, path)?;
    let (vae, _) = sd_models::vae::load_vae_weights(path, &cfg, vae_dtype(dtype, device, &cfg), device)?;
    Ok(vae)
}
