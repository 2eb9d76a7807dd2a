//! Images in and out: `image` crate pictures ↔ pipeline tensors, and PNGs that carry A1111-style
//! `parameters` metadata.

use candle_core::{DType, Device, Tensor};
use image::{imageops::FilterType, DynamicImage, GrayImage, RgbImage};

use crate::error::{Error, Result};

/// An RGB image as a `[1, 3, height, width]` F32 tensor in [-1, 1], resized (Lanczos) when its size
/// differs, as diffusers' image processor does.
pub fn image_to_tensor(img: &DynamicImage, width: usize, height: usize) -> Result<Tensor> {
    let rgb = resize(img, width, height).to_rgb8();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    let mut planes = vec![0f32; 3 * w * h];
    for (i, px) in rgb.pixels().enumerate() {
        for c in 0..3 {
            planes[c * w * h + i] = px.0[c] as f32 / 255.0 * 2.0 - 1.0;
        }
    }
    Ok(Tensor::from_vec(planes, (1, 3, h, w), &Device::Cpu)?)
}

/// A mask as a `[1, 1, height, width]` F32 tensor in [0, 1] from its luminance (white = repaint).
pub fn mask_to_tensor(img: &DynamicImage, width: usize, height: usize) -> Result<Tensor> {
    let gray: GrayImage = resize(img, width, height).to_luma8();
    let (w, h) = (gray.width() as usize, gray.height() as usize);
    let data: Vec<f32> = gray.pixels().map(|p| p.0[0] as f32 / 255.0).collect();
    Ok(Tensor::from_vec(data, (1, 1, h, w), &Device::Cpu)?)
}

fn resize(img: &DynamicImage, width: usize, height: usize) -> DynamicImage {
    if img.width() as usize == width && img.height() as usize == height {
        img.clone()
    } else {
        img.resize_exact(width as u32, height as u32, FilterType::Lanczos3)
    }
}

/// Pipeline output `[batch, 3, h, w]` in [0, 1] → one RGB image per batch item (rounded as
/// diffusers' `numpy_to_pil`).
pub fn tensor_to_images(images: &Tensor) -> Result<Vec<RgbImage>> {
    let images = images.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let (b, c, h, w) = images.dims4()?;
    if c != 3 {
        return Err(Error::Image(format!("expected 3 channels, got {c}")));
    }
    let mut out = Vec::with_capacity(b);
    for i in 0..b {
        let data = images.get(i)?.flatten_all()?.to_vec1::<f32>()?;
        let mut img = RgbImage::new(w as u32, h as u32);
        for (j, px) in img.pixels_mut().enumerate() {
            for ch in 0..3 {
                px.0[ch] = (data[ch * w * h + j].clamp(0.0, 1.0) * 255.0).round() as u8;
            }
        }
        out.push(img);
    }
    Ok(out)
}

/// A1111's `parameters` text (infotext): the prompt, `Negative prompt: …` when there is one, then the
/// settings as one `Key: value, …` line in the order given. Each family fills in its own settings.
pub fn infotext(prompt: &str, negative_prompt: &str, fields: &[(&str, String)]) -> String {
    let mut s = prompt.to_string();
    if !negative_prompt.is_empty() {
        s.push_str("\nNegative prompt: ");
        s.push_str(negative_prompt);
    }
    s.push('\n');
    s.push_str(&fields.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(", "));
    s
}

/// Encodes an RGB image as PNG with an optional `parameters` tEXt chunk (A1111's metadata key).
pub fn encode_png(img: &RgbImage, parameters: Option<&str>) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut buf, img.width(), img.height());
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        if let Some(text) = parameters {
            if text.is_ascii() {
                enc.add_text_chunk("parameters".into(), text.into()).map_err(|e| Error::Image(e.to_string()))?;
            } else {
                // tEXt is Latin-1 only; A1111 uses iTXt for prompts with other characters.
                enc.add_itxt_chunk("parameters".into(), text.into()).map_err(|e| Error::Image(e.to_string()))?;
            }
        }
        let mut w = enc.write_header().map_err(|e| Error::Image(e.to_string()))?;
        w.write_image_data(img.as_raw()).map_err(|e| Error::Image(e.to_string()))?;
        w.finish().map_err(|e| Error::Image(e.to_string()))?;
    }
    Ok(buf)
}

/// Reads the `parameters` text back from a PNG (tEXt or iTXt), if present.
pub fn read_png_parameters(bytes: &[u8]) -> Result<Option<String>> {
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let reader = decoder.read_info().map_err(|e| Error::Image(e.to_string()))?;
    let info = reader.info();
    if let Some(t) = info.uncompressed_latin1_text.iter().find(|t| t.keyword == "parameters") {
        return Ok(Some(t.text.clone()));
    }
    match info.utf8_text.iter().find(|t| t.keyword == "parameters") {
        Some(t) => Ok(Some(t.get_text().map_err(|e| Error::Image(e.to_string()))?)),
        None => Ok(None),
    }
}

/// Writes an RGB image to a PNG file with `parameters` metadata.
pub fn save_png(img: &RgbImage, path: &std::path::Path, parameters: Option<&str>) -> Result<()> {
    let bytes = encode_png(img, parameters)?;
    std::fs::write(path, bytes).map_err(|source| Error::Io { path: path.to_path_buf(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_round_trips_parameters() -> Result<()> {
        let img = RgbImage::from_fn(4, 3, |x, y| image::Rgb([x as u8 * 60, y as u8 * 80, 7]));
        for text in ["a cat\nSteps: 20, Seed: 1", "ein Kätzchen 🐱\nSteps: 4"] {
            let bytes = encode_png(&img, Some(text))?;
            assert_eq!(read_png_parameters(&bytes)?.as_deref(), Some(text));
            let back = image::load_from_memory(&bytes).map_err(|e| Error::Image(e.to_string()))?.to_rgb8();
            assert_eq!(back, img);
        }
        Ok(())
    }

    #[test]
    fn tensors_round_trip_images() -> Result<()> {
        let img = RgbImage::from_fn(5, 2, |x, y| image::Rgb([x as u8 * 50, y as u8 * 200, 255]));
        let t = image_to_tensor(&DynamicImage::ImageRgb8(img.clone()), 5, 2)?;
        assert_eq!(t.dims(), &[1, 3, 2, 5]);
        let back = tensor_to_images(&((t + 1.0)? / 2.0)?)?;
        assert_eq!(back[0], img);
        Ok(())
    }
}
