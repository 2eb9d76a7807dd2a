//! FLUX's latent layout: 2×2 patches of the 16-channel VAE latent become 64-wide tokens.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

/// `[b, c, h, w]` → `[b, (h/2)·(w/2), 4c]`, as diffusers' `_pack_latents` (h, w even).
pub fn pack_latents(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    Ok(x.reshape((b, c, h / 2, 2, w / 2, 2))?.permute((0, 2, 4, 1, 3, 5))?.reshape((b, (h / 2) * (w / 2), c * 4))?)
}

/// `[b, (h/2)·(w/2), 4c]` → `[b, c, h, w]` for a latent of `h × w` pixels, as `_unpack_latents`.
pub fn unpack_latents(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, _, d) = x.dims3()?;
    Ok(x.reshape((b, h / 2, w / 2, d / 4, 2, 2))?.permute((0, 3, 1, 4, 2, 5))?.reshape((b, d / 4, h, w))?)
}

/// Packed latent tokens of a `width × height` image with a VAE of `vae_scale_factor` (the dynamic
/// shift's input).
pub fn image_seq_len(width: usize, height: usize, vae_scale_factor: usize) -> usize {
    (height / vae_scale_factor / 2) * (width / vae_scale_factor / 2)
}

/// Position ids `[(h/2)·(w/2), 3]` of the packed tokens of an `h × w` latent: 0, row, column
/// (diffusers' `_prepare_latent_image_ids`).
pub fn latent_image_ids(h: usize, w: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    image_ids(0, h, w, dtype, device)
}

/// Position ids of packed tokens `[(h/2)·(w/2), 3]`: `(index, row, column)`. The generated image is index
/// 0; FLUX.1 Kontext's reference image is index 1 (diffusers' `image_ids[..., 0] = 1`).
pub fn image_ids(index: usize, h: usize, w: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let (ph, pw) = (h / 2, w / 2);
    let mut v = Vec::with_capacity(ph * pw * 3);
    for r in 0..ph {
        for c in 0..pw {
            v.extend_from_slice(&[index as f32, r as f32, c as f32]);
        }
    }
    Ok(Tensor::from_vec(v, (ph * pw, 3), device)?.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_unpack_round_trip_and_order() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 2.0 * 3.0 * 4.0 * 6.0, &dev)?.reshape((2, 3, 4, 6))?;
        let p = pack_latents(&x)?;
        assert_eq!(p.dims(), &[2, 6, 12]);
        // Token 0 holds channel 0's 2×2 patch first: (0,0), (0,1), (1,0), (1,1).
        let first: Vec<f32> = p.get(0)?.get(0)?.narrow(0, 0, 4)?.to_vec1()?;
        assert_eq!(first, vec![0.0, 1.0, 6.0, 7.0]);
        let back = unpack_latents(&p, 4, 6)?;
        assert_eq!(back.flatten_all()?.to_vec1::<f32>()?, x.flatten_all()?.to_vec1::<f32>()?);
        let ids = latent_image_ids(4, 6, DType::F32, &dev)?;
        assert_eq!(ids.to_vec2::<f32>()?[4], vec![0.0, 1.0, 1.0]);
        Ok(())
    }
}
