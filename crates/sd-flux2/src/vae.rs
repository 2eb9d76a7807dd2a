//! The FLUX.2 autoencoder (`AutoencoderKLFlux2`): a 32-channel `AutoencoderKL` (run by sd-models) whose
//! latents the pipeline folds into 2×2 patches (128 channels at 1/16 of the image size) and normalises
//! with the VAE's batch-norm running statistics, `(z − mean) / sqrt(var + eps)`.

use std::path::Path;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use sd_models::split::Part;
use sd_models::vae::AutoencoderKL;
use sd_models::VaeConfig;

use crate::config::Flux2VaeExtra;
use crate::error::{Error, Result};

/// The autoencoder and its latent statistics.
#[derive(Debug, Clone)]
pub struct Flux2Vae {
    vae: AutoencoderKL,
    /// `bn.running_mean` `[1, 4c, 1, 1]` (F32).
    mean: Tensor,
    /// `sqrt(bn.running_var + eps)` `[1, 4c, 1, 1]` (F32).
    std: Tensor,
}

/// Folds 2×2 patches into channels: `[b, c, h, w]` → `[b, 4c, h/2, w/2]` (channel order `c, dy, dx`).
pub fn patchify(z: &Tensor) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = z.dims4()?;
    z.reshape((b, c, h / 2, 2, w / 2, 2))?.permute((0, 1, 3, 5, 2, 4))?.reshape((b, c * 4, h / 2, w / 2))
}

/// Inverse of [`patchify`]: `[b, 4c, h, w]` → `[b, c, 2h, 2w]`.
pub fn unpatchify(z: &Tensor) -> candle_core::Result<Tensor> {
    let (b, c4, h, w) = z.dims4()?;
    z.reshape((b, c4 / 4, 2, 2, h, w))?.permute((0, 1, 4, 2, 5, 3))?.reshape((b, c4 / 4, h * 2, w * 2))
}

/// `[b, c, h, w]` → tokens `[b, h·w, c]` (rows outer).
pub fn pack(z: &Tensor) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = z.dims4()?;
    z.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()
}

/// Tokens `[b, h·w, c]` → `[b, c, h, w]`.
pub fn unpack(x: &Tensor, h: usize, w: usize) -> candle_core::Result<Tensor> {
    let (b, _, c) = x.dims3()?;
    x.transpose(1, 2)?.reshape((b, c, h, w))
}

impl Flux2Vae {
    /// The sd-models autoencoder.
    pub fn autoencoder(&self) -> &AutoencoderKL {
        &self.vae
    }

    /// Image pixels per (unpatchified) latent pixel.
    pub fn scale_factor(&self) -> usize {
        self.vae.scale_factor()
    }

    /// Latent channels of the autoencoder (32 for FLUX.2).
    pub fn latent_channels(&self) -> usize {
        self.vae.config().latent_channels
    }

    /// Encodes images `[n, 3, h, w]` in [-1, 1] to normalised patchified latents `[n, 4c, h/2f, w/2f]` (F32):
    /// the posterior mode (diffusers' `sample_mode="argmax"`), patchified, batch-norm normalised.
    pub fn encode(&self, image: &Tensor) -> Result<Tensor> {
        let x = image.to_device(self.vae.device())?.to_dtype(self.vae.dtype())?;
        let z = self.vae.encode(&x)?.mean.to_dtype(DType::F32)?;
        let z = patchify(&z)?;
        Ok(z.broadcast_sub(&self.mean)?.broadcast_div(&self.std)?)
    }

    /// Denormalises patchified latents `[b, 4c, h, w]` to VAE latents `[b, c, 2h, 2w]` (F32).
    pub fn denormalize(&self, latents: &Tensor) -> Result<Tensor> {
        let z = latents.to_device(self.mean.device())?.to_dtype(DType::F32)?.broadcast_mul(&self.std)?.broadcast_add(&self.mean)?;
        Ok(unpatchify(&z)?)
    }

    /// Decodes VAE latents `[b, c, h, w]` to images `[b, 3, h·f, w·f]` in [0, 1] (F32, CPU), tiled as `tiling`
    /// says (`Request::vae_tiling`; `None`: above 1024² pixels).
    pub fn decode(&self, z: &Tensor, tiling: Option<bool>) -> Result<Tensor> {
        let img = self.vae.decode_auto(&z.to_device(self.vae.device())?.to_dtype(self.vae.dtype())?, tiling)?;
        Ok(((img.to_dtype(DType::F32)?.to_device(&Device::Cpu)? / 2.0)? + 0.5)?.clamp(0f32, 1f32)?)
    }
}

/// The dtype the VAE runs in for a model loaded in `dtype`: F32 on the CPU (candle's CPU convolutions
/// have no half-precision kernels), else `dtype`.
pub fn vae_dtype(dtype: DType, device: &Device) -> DType {
    match dtype {
        DType::BF16 | DType::F16 if device.is_cpu() => DType::F32,
        other => other,
    }
}

/// FLUX.2's autoencoder config (`AutoencoderKLFlux2`'s defaults, `black-forest-labs/FLUX.2-klein-4B/vae`), for
/// VAE files, which carry none.
pub fn flux2_vae_config() -> VaeConfig {
    VaeConfig { latent_channels: 32, scaling_factor: 1.0, shift_factor: None, use_quant_conv: true, use_post_quant_conv: true, sample_size: 1024, force_upcast: true, ..VaeConfig::sd() }
}

/// Loads the autoencoder from a diffusers `vae/` folder (`AutoencoderKLFlux2`: `config.json` and weights) or
/// a file (`flux2-vae.safetensors`: BFL's original names or diffusers'; its config from `configs/vae/` or
/// [`flux2_vae_config`]), with the batch-norm statistics `bn.running_mean` / `bn.running_var` among them.
pub fn load_vae(part: &Part, configs: Option<&Path>, dtype: DType, device: &Device) -> Result<Flux2Vae> {
    let path = part.path();
    let (cfg_path, files) = match part {
        Part::Folder(dir) => {
            let p = dir.join("config.json");
            if !p.is_file() {
                return Err(Error::NotFound { what: "VAE config.json".into(), path: p, hint: "pass the vae/ folder of a FLUX.2 [klein] repo".into() });
            }
            (Some(p), sd_models::diffusers::find_weight_files(dir, false)?)
        }
        Part::File { path, .. } => (configs.map(|c| c.join("vae").join("config.json")).filter(|p| p.is_file()), vec![path.clone()]),
    };
    let (cfg, eps) = match &cfg_path {
        Some(p) => (sd_models::diffusers::read_vae_config(p)?, Flux2VaeExtra::from_file(p)?.batch_norm_eps),
        None => (flux2_vae_config(), 1e-4),
    };
    let bad = |reason: String| Error::BadWeights { source_desc: path.display().to_string(), reason, component: "FLUX.2 autoencoder (flux2-vae.safetensors / AutoencoderKLFlux2)" };
    // SAFETY: read-only mapping; the files must not be truncated while they are mapped.
    let st = unsafe { MmapedSafetensors::multi(&files) }
        .map_err(|e| Error::NotFlux2 { path: path.to_path_buf(), reason: format!("not a valid safetensors file ({e}); re-download it") })?;
    if st.get("bn.running_mean").is_err() && st.get("decoder.conv_in.weight").is_err() {
        let names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
        return Err(Error::NotFlux2 { path: path.to_path_buf(), reason: format!("not a VAE: {}", crate::loader::describe_foreign(&names)) });
    }
    let (vae, cfg) = sd_models::vae::load_vae_weights(path, &cfg, vae_dtype(dtype, device), device)?;
    let channels = 4 * cfg.latent_channels;
    let stat = |name: &str| -> Result<Tensor> {
        let t = st.load(name, device).map_err(|_| bad(format!("{name} is missing (FLUX.2's VAE carries batch-norm statistics of its patchified latents; a FLUX.1 ae.safetensors has none)")))?;
        if t.dims() != [channels] {
            return Err(bad(format!("{name} has shape {:?}, expected [{channels}] (4 × {} latent channels)", t.dims(), cfg.latent_channels)));
        }
        Ok(t.to_dtype(DType::F32)?.reshape((1, channels, 1, 1))?)
    };
    let mean = stat("bn.running_mean")?;
    let var = stat("bn.running_var")?;
    let std = (var + eps)?.sqrt()?;
    Ok(Flux2Vae { vae, mean, std })
}
