//! Cheap previews: a fixed linear projection from the 4 latent channels to RGB, per model family.
//! A 64×64 latent takes well under a millisecond, so previews can be sent at every step.

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use sd_models::ModelFamily;

use crate::error::Result;

/// Latent → RGB factors (rows: latent channels) and bias, fitted to decoded images of each VAE
/// (the values ComfyUI and A1111 use for their "latent2rgb" previews).
fn factors(family: ModelFamily) -> ([[f32; 3]; 4], [f32; 3]) {
    match family {
        ModelFamily::Sd1 | ModelFamily::Sd2 => (
            [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]],
            [0.0, 0.0, 0.0],
        ),
        ModelFamily::Sdxl => (
            [[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068], [0.1076, 0.1111, -0.0362], [-0.3165, -0.2492, -0.2188]],
            [0.1084, -0.0175, -0.0011],
        ),
    }
}

/// Projects the first latent of a batch `[b, 4, h, w]` to an RGB preview of `h × w` pixels
/// (1/8 of the final image size).
pub fn latents_to_rgb(latents: &Tensor, family: ModelFamily) -> Result<RgbImage> {
    let first = latents.get(0)?.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let (c, h, w) = first.dims3()?;
    let data = first.flatten_all()?.to_vec1::<f32>()?;
    let (m, bias) = factors(family);
    let plane = h * w;
    let mut img = RgbImage::new(w as u32, h as u32);
    for (i, px) in img.pixels_mut().enumerate() {
        let mut rgb = bias;
        for (ch, row) in m.iter().enumerate().take(c.min(4)) {
            let v = data[ch * plane + i];
            for k in 0..3 {
                rgb[k] += v * row[k];
            }
        }
        px.0 = rgb.map(|v| (((v + 1.0) * 127.5).round()).clamp(0.0, 255.0) as u8);
    }
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preview_has_latent_size_and_reacts_to_channels() -> Result<()> {
        let dev = Device::Cpu;
        let zeros = Tensor::zeros((2, 4, 6, 10), DType::F32, &dev)?;
        let img = latents_to_rgb(&zeros, ModelFamily::Sd1)?;
        assert_eq!(img.dimensions(), (10, 6));
        assert!(img.pixels().all(|p| p.0 == [128, 128, 128]));
        // Channel 3 is strongly negative blue for SD: a positive value there darkens blue.
        let mut v = vec![0f32; 4 * 6 * 10];
        v[3 * 60..4 * 60].fill(1.0);
        let t = Tensor::from_vec(v, (1, 4, 6, 10), &dev)?;
        let p = latents_to_rgb(&t, ModelFamily::Sd1)?.get_pixel(0, 0).0;
        assert!(p[2] < 50 && p[0] > 80, "{p:?}");
        Ok(())
    }
}
