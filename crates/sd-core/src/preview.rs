//! Cheap previews: a fixed linear projection from the latent channels (4 for SD, 16 for FLUX) to
//! RGB, per model family.
//! A 64×64 latent takes well under a millisecond, so previews can be sent at every step.

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use crate::family::ModelFamily;

use crate::error::Result;

/// FLUX.1 latent (scaled and shifted, as the transformer sees it) → RGB, one row per channel, and
/// the bias: ComfyUI's `comfy/latent_formats.py` (class `Flux`), fitted to FLUX VAE decodes.
const FLUX_FACTORS: [[f32; 3]; 16] = [
    [-0.0346, 0.0244, 0.0681],
    [0.0034, 0.0210, 0.0687],
    [0.0275, -0.0668, -0.0433],
    [-0.0174, 0.0160, 0.0617],
    [0.0859, 0.0721, 0.0329],
    [0.0004, 0.0383, 0.0115],
    [0.0405, 0.0861, 0.0915],
    [-0.0236, -0.0185, -0.0259],
    [-0.0245, 0.0250, 0.1180],
    [0.1008, 0.0755, -0.0421],
    [-0.0515, 0.0201, 0.0011],
    [0.0428, -0.0012, -0.0036],
    [0.0817, 0.0765, 0.0749],
    [-0.1264, -0.0522, -0.1103],
    [-0.0280, -0.0881, -0.0499],
    [-0.1262, -0.0982, -0.0778],
];
const FLUX_BIAS: [f32; 3] = [-0.0329, -0.0718, -0.0851];

/// SD 3.x latent (scaled and shifted) → RGB and bias: ComfyUI's `comfy/latent_formats.py` (class `SD3`),
/// fitted to SD3 VAE decodes.
const SD3_FACTORS: [[f32; 3]; 16] = [
    [-0.0922, -0.0175, 0.0749],
    [0.0311, 0.0633, 0.0954],
    [0.1994, 0.0927, 0.0458],
    [0.0856, 0.0339, 0.0902],
    [0.0587, 0.0272, -0.0496],
    [-0.0006, 0.1104, 0.0309],
    [0.0978, 0.0306, 0.0427],
    [-0.0042, 0.1038, 0.1358],
    [-0.0194, 0.0020, 0.0669],
    [-0.0488, 0.0130, -0.0268],
    [0.0922, 0.0988, 0.0951],
    [-0.0278, 0.0524, -0.0542],
    [0.0332, 0.0456, 0.0895],
    [-0.0069, -0.0030, -0.0810],
    [-0.0596, -0.0465, -0.0293],
    [-0.1448, -0.1463, -0.1189],
];
const SD3_BIAS: [f32; 3] = [0.2394, 0.2135, 0.1925];

/// FLUX.2 latent → RGB and bias: ComfyUI's `comfy/latent_formats.py` (class `Flux2`, 32 rows applied to
/// the 128-channel patchified latents after `latent_rgb_factors_reshape` unfolds their 2×2 patches into
/// 32 channels at twice the resolution), fitted to FLUX.2 VAE decodes.
const FLUX2_FACTORS: [[f32; 3]; 32] = [
    [0.0058, 0.0113, 0.0073], [0.0495, 0.0443, 0.0836], [-0.0099, 0.0096, 0.0644], [0.2144, 0.3009, 0.3652],
    [0.0166, -0.0039, -0.0054], [0.0157, 0.0103, -0.0160], [-0.0398, 0.0902, -0.0235], [-0.0052, 0.0095, 0.0109],
    [-0.3527, -0.2712, -0.1666], [-0.0301, -0.0356, -0.0180], [-0.0107, 0.0078, 0.0013], [0.0746, 0.0090, -0.0941],
    [0.0156, 0.0169, 0.0070], [-0.0034, -0.0040, -0.0114], [0.0032, 0.0181, 0.0080], [-0.0939, -0.0008, 0.0186],
    [0.0018, 0.0043, 0.0104], [0.0284, 0.0056, -0.0127], [-0.0024, -0.0022, -0.0030], [0.1207, -0.0026, 0.0065],
    [0.0128, 0.0101, 0.0142], [0.0137, -0.0072, -0.0007], [0.0095, 0.0092, -0.0059], [0.0000, -0.0077, -0.0049],
    [-0.0465, -0.0204, -0.0312], [0.0095, 0.0012, -0.0066], [0.0290, -0.0034, 0.0025], [0.0220, 0.0169, -0.0048],
    [-0.0332, -0.0457, -0.0468], [-0.0085, 0.0389, 0.0609], [-0.0076, 0.0003, -0.0043], [-0.0111, -0.0460, -0.0614],
];
const FLUX2_BIAS: [f32; 3] = [-0.0329, -0.0718, -0.0851];

/// SD 1.x / 2.x and SDXL factors, as ComfyUI and A1111 use them for their "latent2rgb" previews.
const SD_FACTORS: [[f32; 3]; 4] =
    [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]];
const SDXL_FACTORS: [[f32; 3]; 4] =
    [[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068], [0.1076, 0.1111, -0.0362], [-0.3165, -0.2492, -0.2188]];

/// Latent → RGB factors (rows: latent channels) and bias, fitted to decoded images of each VAE.
fn factors(family: ModelFamily) -> (&'static [[f32; 3]], [f32; 3]) {
    match family {
        ModelFamily::Sd1 | ModelFamily::Sd2 => (&SD_FACTORS, [0.0, 0.0, 0.0]),
        ModelFamily::Sdxl => (&SDXL_FACTORS, [0.1084, -0.0175, -0.0011]),
        // Z-Image decodes with FLUX.1's autoencoder, so its latents read the same.
        ModelFamily::Flux | ModelFamily::ZImage => (&FLUX_FACTORS, FLUX_BIAS),
        ModelFamily::Sd3 => (&SD3_FACTORS, SD3_BIAS),
        ModelFamily::Flux2 => (&FLUX2_FACTORS, FLUX2_BIAS),
    }
}

/// Projects the first latent of a batch `[b, c, h, w]` (c = 4 for SD, 16 for FLUX; FLUX latents
/// unpacked from their 2×2 patches) to an RGB preview of `h × w` pixels (1/8 of the image size).
pub fn latents_to_rgb(latents: &Tensor, family: ModelFamily) -> Result<RgbImage> {
    let first = latents.get(0)?.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let (c, h, w) = first.dims3()?;
    // FLUX.2's transformer latents are 2×2 patches of 32 channels: unfold them first (ComfyUI's reshape).
    let (first, c, h, w) = if family == ModelFamily::Flux2 && c == 128 {
        let t = first.reshape((32, 2, 2, h, w))?.permute((0, 3, 1, 4, 2))?.reshape((32, 2 * h, 2 * w))?;
        (t, 32, 2 * h, 2 * w)
    } else {
        (first, c, h, w)
    };
    let data = first.flatten_all()?.to_vec1::<f32>()?;
    let (m, bias) = factors(family);
    let plane = h * w;
    let mut img = RgbImage::new(w as u32, h as u32);
    for (i, px) in img.pixels_mut().enumerate() {
        let mut rgb = bias;
        for (ch, row) in m.iter().enumerate().take(c) {
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
        // FLUX: 16 channels all count; channel 15 pulls every colour down.
        let flux_zero = latents_to_rgb(&Tensor::zeros((1, 16, 2, 3), DType::F32, &dev)?, ModelFamily::Flux)?;
        let mut v = vec![0f32; 16 * 6];
        v[15 * 6..].fill(4.0);
        let flux = latents_to_rgb(&Tensor::from_vec(v, (1, 16, 2, 3), &dev)?, ModelFamily::Flux)?;
        let (z, f) = (flux_zero.get_pixel(0, 0).0, flux.get_pixel(0, 0).0);
        assert!((0..3).all(|k| f[k] + 30 < z[k]), "{z:?} {f:?}");
        Ok(())
    }
}
