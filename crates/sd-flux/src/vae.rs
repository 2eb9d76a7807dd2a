//! The FLUX autoencoder: sd-models' `AutoencoderKL` with 16 latent channels, no quant convs, and a
//! latent shift as well as a scale.

use std::path::Path;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use sd_models::vae::AutoencoderKL;
use sd_models::VaeConfig;

use crate::error::{Error, Result};
use crate::transformer::mmap;
use sd_models::single_file::innermost;

/// The FLUX.1 VAE config (`black-forest-labs/FLUX.1-dev/vae/config.json`), used for a lone
/// `ae.safetensors`, which carries no config.
pub fn flux_vae_config() -> VaeConfig {
    VaeConfig {
        in_channels: 3,
        out_channels: 3,
        latent_channels: 16,
        block_out_channels: vec![128, 256, 512, 512],
        layers_per_block: 2,
        norm_num_groups: 32,
        scaling_factor: 0.3611,
        shift_factor: Some(0.1159),
        use_quant_conv: false,
        use_post_quant_conv: false,
        sample_size: 1024,
        force_upcast: true,
    }
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
/// in `dtype` (F32 instead of F16 when the config says it overflows in F16, as FLUX's does).
///
/// `config` replaces the built-in FLUX config for a single file (tiny or custom autoencoders);
/// folders always use their own `config.json`.
pub fn load_vae(path: &Path, dtype: DType, device: &Device, config: Option<&VaeConfig>) -> Result<AutoencoderKL> {
    let (cfg, vb) = if path.is_dir() {
        let cfg = sd_models::diffusers::read_vae_config(&path.join("config.json"))?;
        check_config(&cfg, path)?;
        let files = sd_models::diffusers::find_weight_files(path, false)?;
        let st = mmap(&files, path)?;
        let dtype = sd_models::loader::vae_dtype_for(dtype, &cfg);
        (cfg, VarBuilder::from_backend(Box::new(st), dtype, device.clone()))
    } else {
        if !path.is_file() {
            return Err(Error::NotFound {
                what: "FLUX autoencoder".into(),
                path: path.to_path_buf(),
                hint: "pass ae.safetensors from black-forest-labs/FLUX.1-schnell or a diffusers vae/ folder".into(),
            });
        }
        let cfg = config.cloned().unwrap_or_else(flux_vae_config);
        check_config(&cfg, path)?;
        let st = mmap(&[path.to_path_buf()], path)?;
        let dtype = sd_models::loader::vae_dtype_for(dtype, &cfg);
        let diffusers_names = st.get("decoder.conv_in.weight").is_ok() && st.get("decoder.up_blocks.0.resnets.0.conv1.weight").is_ok();
        let vb = if diffusers_names {
            VarBuilder::from_backend(Box::new(st), dtype, device.clone())
        } else {
            let backend = crate::keymap::LdmVaeBackend::new(st, cfg.block_out_channels.len(), path.display().to_string());
            VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
        };
        (cfg, vb)
    };
    AutoencoderKL::new(vb, &cfg).map_err(|e| Error::BadWeights {
        source_desc: path.display().to_string(),
        reason: format!("VAE: {}", innermost(&e)),
    })
}
