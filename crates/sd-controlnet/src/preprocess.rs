//! Control-image preparation (diffusers' `prepare_image`: resize, [0, 1] range) and simple
//! preprocessors that turn a picture into a control map.

use std::str::FromStr;

use candle_core::{Device, Tensor};
use image::{imageops::FilterType, DynamicImage, GrayImage, Luma, RgbImage};

use crate::error::{Error, Result};

/// A control image as `[1, 3, height, width]` F32 in [0, 1] (not [-1, 1]), resized with Lanczos
/// when its size differs from the generation size, as diffusers' control image processor does.
pub fn prepare_image(img: &DynamicImage, width: usize, height: usize) -> Result<Tensor> {
    if width == 0 || height == 0 {
        return Err(Error::InvalidInput { field: "control image size", reason: format!("{width}×{height} must be non-empty") });
    }
    let img = if img.width() as usize == width && img.height() as usize == height {
        img.clone()
    } else {
        img.resize_exact(width as u32, height as u32, FilterType::Lanczos3)
    };
    let rgb = img.to_rgb8();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    let mut planes = vec![0f32; 3 * w * h];
    for (i, px) in rgb.pixels().enumerate() {
        for c in 0..3 {
            planes[c * w * h + i] = f32::from(px.0[c]) / 255.0;
        }
    }
    Ok(Tensor::from_vec(planes, (1, 3, h, w), &Device::Cpu)?)
}

/// Turns a picture into a control map before [`prepare_image`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Preprocessor {
    /// Use the user's image as the control map.
    None,
    /// Binary scribble/lineart map: white where luminance ≥ `threshold` (0–255), black elsewhere;
    /// `invert` turns dark strokes on a light background into white strokes on black, as scribble ControlNets expect.
    Threshold {
        /// Luminance cut (0–255).
        threshold: u8,
        /// Invert before thresholding.
        invert: bool,
    },
    /// Soft edges: Sobel gradient magnitude of the luminance, normalised so the strongest edge is white.
    SoftEdge,
    /// Canny edges of the luminance (imageproc: Gaussian blur σ = 1.4, Sobel L2 magnitude, hysteresis
    /// between `low` and `high`, on the 0..≈1140 magnitude scale; A1111's defaults are 100 and 200).
    Canny {
        /// Lower hysteresis threshold.
        low: f32,
        /// Upper hysteresis threshold.
        high: f32,
    },
}

/// The preprocessor names [`Preprocessor`] parses (what `/controlnet/module_list` lists).
pub const PREPROCESSOR_NAMES: [&str; 5] = ["none", "canny", "threshold", "scribble", "softedge"];

impl FromStr for Preprocessor {
    type Err = Error;

    /// `none`, `canny` (thresholds 100/200), `threshold`/`scribble` (threshold 128, inverted for scribble), `softedge`.
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "none" | "" => Ok(Preprocessor::None),
            "threshold" => Ok(Preprocessor::Threshold { threshold: 128, invert: false }),
            "scribble" => Ok(Preprocessor::Threshold { threshold: 128, invert: true }),
            "softedge" | "soft_edge" => Ok(Preprocessor::SoftEdge),
            "canny" => Ok(Preprocessor::Canny { low: 100.0, high: 200.0 }),
            other => Err(Error::InvalidInput {
                field: "preprocessor",
                reason: format!("unknown preprocessor {other:?}; known: {}", PREPROCESSOR_NAMES.join(", ")),
            }),
        }
    }
}

impl Preprocessor {
    /// Checks the parameters (thresholds finite, positive and ordered). A zero threshold would
    /// let hysteresis walk onto the image border, where imageproc's Canny indexes out of bounds.
    pub fn validate(&self) -> Result<()> {
        if let Preprocessor::Canny { low, high } = *self {
            if !(low.is_finite() && low > 0.0) {
                return Err(Error::InvalidInput {
                    field: "canny low threshold",
                    reason: format!("need a finite low threshold above 0, got {low} (A1111's default is 100)"),
                });
            }
            if !high.is_finite() {
                return Err(Error::InvalidInput {
                    field: "canny high threshold",
                    reason: format!("need a finite high threshold, got {high} (A1111's default is 200)"),
                });
            }
            if low > high {
                return Err(Error::InvalidInput {
                    field: "canny low threshold",
                    reason: format!("the low threshold {low} is above the high one {high}; need 0 < low ≤ high"),
                });
            }
        }
        Ok(())
    }

    /// Applies the preprocessor; the result is an RGB picture of the same size.
    pub fn apply(&self, img: &DynamicImage) -> Result<DynamicImage> {
        self.validate()?;
        if img.width() == 0 || img.height() == 0 {
            return Err(Error::InvalidInput { field: "control image", reason: "the picture is empty".into() });
        }
        Ok(match *self {
            Preprocessor::None => img.clone(),
            Preprocessor::Threshold { threshold, invert } => {
                let mut gray = img.to_luma8();
                for p in gray.pixels_mut() {
                    let v = if invert { 255 - p.0[0] } else { p.0[0] };
                    *p = Luma([if v >= threshold { 255 } else { 0 }]);
                }
                gray_to_rgb(&gray)
            }
            Preprocessor::SoftEdge => gray_to_rgb(&soft_edge(&img.to_luma8())),
            Preprocessor::Canny { low, high } => gray_to_rgb(&imageproc::edges::canny(&img.to_luma8(), low, high)),
        })
    }
}

fn gray_to_rgb(gray: &GrayImage) -> DynamicImage {
    DynamicImage::ImageRgb8(DynamicImage::ImageLuma8(gray.clone()).to_rgb8())
}

/// Sobel magnitude with replicated borders, scaled so the maximum becomes 255 (flat images stay black).
fn soft_edge(gray: &GrayImage) -> GrayImage {
    let (w, h) = (gray.width() as i64, gray.height() as i64);
    let px = |x: i64, y: i64| f32::from(gray.get_pixel(x.clamp(0, w - 1) as u32, y.clamp(0, h - 1) as u32).0[0]);
    let mut mag = Vec::with_capacity((w * h) as usize);
    for y in 0..h {
        for x in 0..w {
            let gx = (px(x + 1, y - 1) + 2.0 * px(x + 1, y) + px(x + 1, y + 1)) - (px(x - 1, y - 1) + 2.0 * px(x - 1, y) + px(x - 1, y + 1));
            let gy = (px(x - 1, y + 1) + 2.0 * px(x, y + 1) + px(x + 1, y + 1)) - (px(x - 1, y - 1) + 2.0 * px(x, y - 1) + px(x + 1, y - 1));
            mag.push(gx.hypot(gy));
        }
    }
    let max = mag.iter().copied().fold(0f32, f32::max);
    let scale = if max > 0.0 { 255.0 / max } else { 0.0 };
    GrayImage::from_fn(w as u32, h as u32, |x, y| Luma([(mag[(y as i64 * w + x as i64) as usize] * scale).round() as u8]))
}

/// An RGB picture from a `[1, 3, h, w]` tensor in [0, 1] (for saving control maps).
pub fn tensor_to_rgb(t: &Tensor) -> Result<RgbImage> {
    let (_, c, h, w) = t.dims4()?;
    if c != 3 {
        return Err(Error::InvalidInput { field: "control image", reason: format!("expected 3 channels, got {c}") });
    }
    let data = t.get(0)?.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let plane = h * w;
    Ok(RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let i = y as usize * w + x as usize;
        let ch = |k: usize| (data[k * plane + i].clamp(0.0, 1.0) * 255.0).round() as u8;
        image::Rgb([ch(0), ch(1), ch(2)])
    }))
}
