//! A1111's hires fix: a two-pass txt2img. The first pass runs at the request's size; its result is
//! upscaled — in latent space (A1111's "Latent" upscalers) or in pixels (Lanczos, nearest, or an
//! ESRGAN-family model as A1111 runs it: see [`upscale_image`]) — and the
//! second pass re-generates it at the target size as img2img at `strength` (A1111's
//! `denoising_strength`), with `steps` steps (A1111's `hr_second_pass_steps`; the first pass's count when
//! absent). Checked against diffusers' `StableDiffusionPipeline` chained into
//! `StableDiffusionImg2ImgPipeline` (tools/hires_goldens.py).

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use candle_core::{DType, Tensor};
use image::{imageops::FilterType, DynamicImage};
use sd_models::esrgan::{RrdbNet, TileOptions};
use sd_models::loader::StableDiffusionModels;

use crate::control::ResidualHook;
use crate::error::{Error, Result};
use crate::image_io::{image_to_tensor, tensor_to_images};
use crate::pipeline::{
    capabilities, generate_pass, EditFn, GenerationOutput, GenerationParams, ImageToImage, LatentsToImage, ProgressFn, RunContext, PromptClock, SdExtras, Task,
};
use crate::schedulers::NoiseSource;

/// How the first pass is enlarged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HiresUpscaler {
    /// Bilinear interpolation of the latents (A1111's "Latent"; PyTorch `interpolate(mode="bilinear")`).
    Latent,
    /// Nearest-neighbour interpolation of the latents (A1111's "Latent (nearest)").
    LatentNearest,
    /// The decoded image resized with a Lanczos filter (A1111's "Lanczos", and "None").
    Lanczos,
    /// The decoded image resized nearest-neighbour (A1111's "Nearest").
    Nearest,
    /// The decoded image enlarged by an ESRGAN-family model ([`HiresFix::esrgan`]), then Lanczos-resized to
    /// the exact size, as A1111's upscalers do (see [`upscale_image`]).
    Esrgan,
}

impl HiresUpscaler {
    /// Every upscaler, by A1111 name.
    pub const ALL: [HiresUpscaler; 4] = [HiresUpscaler::Latent, HiresUpscaler::LatentNearest, HiresUpscaler::Lanczos, HiresUpscaler::Nearest];

    /// The A1111 name.
    pub fn name(self) -> &'static str {
        match self {
            HiresUpscaler::Latent => "Latent",
            HiresUpscaler::LatentNearest => "Latent (nearest)",
            HiresUpscaler::Lanczos => "Lanczos",
            HiresUpscaler::Nearest => "Nearest",
            HiresUpscaler::Esrgan => "ESRGAN",
        }
    }

    fn in_latent_space(self) -> bool {
        matches!(self, HiresUpscaler::Latent | HiresUpscaler::LatentNearest)
    }
}

impl FromStr for HiresUpscaler {
    type Err = Error;

    /// A1111's names, any case; "None" (resize without an upscaler model) is Lanczos, as in A1111.
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "latent" | "latent (bilinear)" => Ok(HiresUpscaler::Latent),
            "latent (nearest)" | "latent (nearest-exact)" => Ok(HiresUpscaler::LatentNearest),
            "lanczos" | "none" | "" => Ok(HiresUpscaler::Lanczos),
            "nearest" => Ok(HiresUpscaler::Nearest),
            other => Err(Error::invalid(
                "hr_upscaler",
                format!(
                    "unknown upscaler {other:?}; use one of: {}, or an ESRGAN-family model's name (the worker lists them at /sdapi/v1/upscalers)",
                    HiresUpscaler::ALL.map(|u| u.name()).join(", ")
                ),
            )),
        }
    }
}

/// An ESRGAN-family upscaler model named by the request: its name (for the infotext), its file, and the
/// network once loaded (whoever runs the fix loads it; requests are validated before).
#[derive(Clone)]
pub struct EsrganUpscaler {
    /// The name the request used (A1111 writes it as `Hires upscaler`).
    pub name: String,
    /// The model file.
    pub path: PathBuf,
    /// The loaded network, `None` until loaded.
    pub net: Option<Arc<RrdbNet>>,
}

impl std::fmt::Debug for EsrganUpscaler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EsrganUpscaler").field("name", &self.name).field("path", &self.path).field("loaded", &self.net.is_some()).finish()
    }
}

impl PartialEq for EsrganUpscaler {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && self.path == other.path
    }
}

/// The second pass of a hires fix.
#[derive(Debug, Clone, PartialEq)]
pub struct HiresFix {
    /// Target width in pixels.
    pub width: usize,
    /// Target height in pixels.
    pub height: usize,
    /// How the first pass is enlarged.
    pub upscaler: HiresUpscaler,
    /// Steps of the second pass (`None`: the first pass's); as img2img, `⌊steps · strength⌋` run.
    pub steps: Option<usize>,
    /// Fraction of the second pass's schedule re-noised (A1111's `denoising_strength`, default 0.7).
    pub strength: f64,
    /// With [`HiresUpscaler::Esrgan`], the model.
    pub esrgan: Option<EsrganUpscaler>,
}

impl HiresFix {
    /// A1111's `hr_scale`: the target is the first pass's size times `scale`, each side rounded down to a
    /// multiple of 8.
    pub fn scaled(p: &GenerationParams, scale: f64, upscaler: HiresUpscaler, strength: f64) -> Result<Self> {
        let (width, height) = Self::scaled_size(p.width, p.height, scale, 8)?;
        Ok(Self { width, height, upscaler, steps: None, strength, esrgan: None })
    }

    /// `width × height` times `scale` (1 to 8), each side rounded down to a multiple of `multiple`.
    pub fn scaled_size(width: usize, height: usize, scale: f64, multiple: usize) -> Result<(usize, usize)> {
        if !scale.is_finite() || !(1.0..=8.0).contains(&scale) {
            return Err(Error::invalid("hr_scale", format!("{scale} is outside 1..=8")));
        }
        let side = |v: usize| ((v as f64 * scale) as usize / multiple) * multiple;
        Ok((side(width), side(height)))
    }

    /// The upscaler's name as A1111 writes it (`Hires upscaler`): the model's for an ESRGAN upscaler.
    pub fn upscaler_name(&self) -> &str {
        match (&self.esrgan, self.upscaler) {
            (Some(e), HiresUpscaler::Esrgan) => &e.name,
            _ => self.upscaler.name(),
        }
    }

    /// The second pass's request: the first's at the target size, with the second pass's steps.
    pub fn second_pass(&self, p: &GenerationParams) -> GenerationParams {
        GenerationParams { width: self.width, height: self.height, steps: self.steps.unwrap_or(p.steps), ..p.clone() }
    }
}

/// Runs a hires fix: txt2img at `p`'s size, upscale, img2img at `hr`'s size. Every random tensor of both
/// passes comes, in that order, from `run`'s noise source (else from `p.seed`); the progress callback and
/// the latent editor see both passes (each with its own step count).
pub fn generate_hires(models: &StableDiffusionModels, p: &GenerationParams, hr: &HiresFix, run: &mut RunContext<'_>) -> Result<GenerationOutput> {
    generate_hires_controlled(models, p, hr, run, [None, None])
}

/// [`generate_hires`] with residual hooks (ControlNets) for the first and the second pass — each built for
/// its own pass's size (A1111's ControlNet extension resizes the control image to the hires size).
pub fn generate_hires_controlled(
    models: &StableDiffusionModels,
    p: &GenerationParams,
    hr: &HiresFix,
    run: &mut RunContext<'_>,
    [first_control, second_control]: [Option<&mut dyn ResidualHook>; 2],
) -> Result<GenerationOutput> {
    let second = hr.second_pass(p);
    let caps = capabilities(models)?;
    caps.validate(p)?;
    caps.validate(&second).map_err(|e| rename(e, &[("width", "hr_width"), ("height", "hr_height"), ("steps", "hr_steps")]))?;
    if hr.width < p.width || hr.height < p.height {
        return Err(Error::invalid("hr_scale", format!("the target {}×{} is smaller than the first pass {}×{}", hr.width, hr.height, p.width, p.height)));
    }
    caps.check_task_kind(sd_core::run::TaskKind::ImageToImage, Some(hr.strength), second.steps)
        .map_err(|e| rename(e, &[("strength", "denoising_strength")]))?;
    let mut noise = run.take_noise_for(p);
    // Prompt editing: the second pass schedules over its own calls, whole numbers counting from the first's.
    let first_clock = PromptClock::single(p);
    let second_clock = PromptClock { base: first_clock.base, hires: Some(second.sampler.kind.schedule_steps(second.steps)) };
    let first = pass(models, p, &Task::TextToImage, noise.get(), run, first_clock, first_control)?;
    let f = models.config.vae_scale_factor();
    if hr.upscaler.in_latent_space() {
        let (h, w) = (hr.height / f, hr.width / f);
        let latents = first.latents.to_dtype(DType::F32)?;
        let up = match hr.upscaler {
            HiresUpscaler::LatentNearest => latents.upsample_nearest2d(h, w)?,
            _ => latents.upsample_bilinear2d(h, w, false)?,
        };
        let task = Task::LatentsToImage(LatentsToImage { latents: &up, strength: hr.strength });
        let out = pass(models, &second, &task, noise.get(), run, second_clock, second_control)?;
        return Ok(GenerationOutput { seed: p.seed, ..out });
    }
    let method = match (hr.upscaler, &hr.esrgan) {
        (HiresUpscaler::Esrgan, Some(EsrganUpscaler { net: Some(net), .. })) => PixelUpscale::Model(net),
        (HiresUpscaler::Esrgan, e) => {
            let name = e.as_ref().map_or("", |e| e.name.as_str());
            return Err(Error::invalid("hr_upscaler", format!("the ESRGAN upscaler {name:?} is not loaded")));
        }
        (HiresUpscaler::Nearest, _) => PixelUpscale::Nearest,
        _ => PixelUpscale::Lanczos,
    };
    let resized = tensor_to_images(&first.images)?
        .into_iter()
        .map(|img| {
            let img = upscale_image(&DynamicImage::ImageRgb8(img), hr.width, hr.height, method)?;
            Ok(image_to_tensor(&img, hr.width, hr.height)?)
        })
        .collect::<Result<Vec<Tensor>>>()?;
    let image = Tensor::cat(&resized, 0)?;
    let task = Task::ImageToImage(ImageToImage { image: &image, strength: hr.strength });
    let out = pass(models, &second, &task, noise.get(), run, second_clock, second_control)?;
    Ok(GenerationOutput { seed: p.seed, ..out })
}

/// How [`upscale_image`] enlarges a picture.
#[derive(Debug, Clone, Copy)]
pub enum PixelUpscale<'a> {
    /// A Lanczos resize (A1111's "Lanczos", and "None").
    Lanczos,
    /// A nearest-neighbour resize (A1111's "Nearest").
    Nearest,
    /// An ESRGAN-family model, tiled (192-pixel tiles, as A1111's default `ESRGAN_tile`).
    Model(&'a RrdbNet),
}

/// Pixels an upscaler model may produce in one pass: its whole output is held in memory (tiling bounds
/// only the model's working set).
pub const MAX_UPSCALE_PIXELS: u64 = 40_000_000;

/// Enlarges `img` to exactly `width × height` as A1111's hires fix (`images.resize_image`) does: with a
/// model, [`upscale_by`] the larger of the two ratios, then a Lanczos resize to the exact size; Lanczos
/// and Nearest resize directly.
pub fn upscale_image(img: &DynamicImage, width: usize, height: usize, method: PixelUpscale<'_>) -> Result<DynamicImage> {
    let (w, h) = (width as u32, height as u32);
    let mut img = match method {
        PixelUpscale::Lanczos => return Ok(img.resize_exact(w, h, FilterType::Lanczos3)),
        PixelUpscale::Nearest => return Ok(img.resize_exact(w, h, FilterType::Nearest)),
        PixelUpscale::Model(_) => {
            let scale = (f64::from(w) / f64::from(img.width())).max(f64::from(h) / f64::from(img.height()));
            if scale > 1.0 {
                upscale_by(img, scale, method)?
            } else {
                img.clone()
            }
        }
    };
    if img.width() != w || img.height() != h {
        img = img.resize_exact(w, h, FilterType::Lanczos3);
    }
    Ok(img)
}

/// A1111's `Upscaler.upscale(img, scale)`: the target is each side times `scale` rounded down to a multiple
/// of 8; the upscaler runs until the picture reaches it (at least once, at most three times; a model's
/// result rounded to 8-bit pixels each time; Lanczos and Nearest resize by `scale`), then a Lanczos resize
/// to the target.
pub fn upscale_by(img: &DynamicImage, scale: f64, method: PixelUpscale<'_>) -> Result<DynamicImage> {
    if !scale.is_finite() || scale <= 0.0 {
        return Err(Error::invalid("upscaler", format!("scale {scale} is not a positive number")));
    }
    let dest = |v: u32| ((f64::from(v) * scale / 8.0).floor() * 8.0).max(8.0) as u32;
    let (dw, dh) = (dest(img.width()), dest(img.height()));
    let mut img = DynamicImage::ImageRgb8(img.to_rgb8());
    for i in 0..3 {
        if img.width() >= dw && img.height() >= dh && (i > 0 || scale != 1.0) {
            break;
        }
        let before = (img.width(), img.height());
        let by = |v: u32| ((f64::from(v) * scale) as u32).max(1);
        img = match method {
            PixelUpscale::Lanczos => img.resize_exact(by(img.width()), by(img.height()), FilterType::Lanczos3),
            PixelUpscale::Nearest => img.resize_exact(by(img.width()), by(img.height()), FilterType::Nearest),
            PixelUpscale::Model(net) => model_pass(net, &img)?,
        };
        if (img.width(), img.height()) == before {
            break;
        }
    }
    if img.width() != dw || img.height() != dh {
        img = img.resize_exact(dw, dh, FilterType::Lanczos3);
    }
    Ok(img)
}

/// One pass of an upscaler model over an 8-bit picture.
fn model_pass(net: &RrdbNet, img: &DynamicImage) -> Result<DynamicImage> {
    let rgb = img.to_rgb8();
    let (iw, ih) = (rgb.width() as usize, rgb.height() as usize);
    let s = net.scale() as u64;
    let out_pixels = (iw as u64 * s).saturating_mul(ih as u64 * s);
    if out_pixels > MAX_UPSCALE_PIXELS {
        return Err(Error::invalid(
            "upscaler",
            format!("a ×{s} pass over {iw}×{ih} would make {} pixels; at most {MAX_UPSCALE_PIXELS}: upscale a smaller picture", out_pixels),
        ));
    }
    let mut planes = vec![0f32; 3 * iw * ih];
    for (i, px) in rgb.pixels().enumerate() {
        for c in 0..3 {
            planes[c * iw * ih + i] = f32::from(px.0[c]) / 255.0;
        }
    }
    let x = Tensor::from_vec(planes, (1, 3, ih, iw), net.device())?;
    // A1111's default ESRGAN tile (192) and overlap (8).
    let out = net.upscale(&x, TileOptions { tile: 192, overlap: 8 })?;
    let mut images = tensor_to_images(&out)?;
    if images.is_empty() {
        return Err(Error::invalid("upscaler", "the upscaler returned no picture"));
    }
    Ok(DynamicImage::ImageRgb8(images.remove(0)))
}

/// One pass, drawing from `noise` and reporting through `run`'s callbacks.
fn pass(
    models: &StableDiffusionModels,
    request: &GenerationParams,
    task: &Task<'_>,
    noise: &mut dyn NoiseSource,
    run: &mut RunContext<'_>,
    clock: PromptClock,
    control: Option<&mut dyn ResidualHook>,
) -> Result<GenerationOutput> {
    let progress = run.progress.as_deref_mut().map(|f| f as &mut ProgressFn<'_>);
    let edit = run.edit.as_deref_mut().map(|f| f as &mut EditFn<'_>);
    let mut ctx = RunContext { noise: Some(noise), progress, edit };
    generate_pass(models, request, task, &mut ctx, SdExtras { control, scheduler: None }, clock)
}

/// Names a second-pass error by the hires field it comes from.
fn rename(e: sd_core::Error, names: &[(&'static str, &'static str)]) -> Error {
    match e {
        sd_core::Error::InvalidRequest { field, reason } => {
            let field = names.iter().find(|(from, _)| *from == field).map_or(field, |(_, to)| to);
            Error::invalid(field, reason)
        }
        other => Error::Core(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upscaler_names_parse_as_a1111_writes_them() {
        for u in HiresUpscaler::ALL {
            assert_eq!(u.name().parse::<HiresUpscaler>().ok(), Some(u));
        }
        assert_eq!("None".parse::<HiresUpscaler>().ok(), Some(HiresUpscaler::Lanczos));
        assert_eq!("latent (nearest-exact)".parse::<HiresUpscaler>().ok(), Some(HiresUpscaler::LatentNearest));
        let e = "R-ESRGAN 4x+".parse::<HiresUpscaler>().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("hr_upscaler") && e.contains("ESRGAN"), "{e}");
    }

    fn once(net: &RrdbNet, img: &DynamicImage) -> DynamicImage {
        let rgb = img.to_rgb8();
        let (w, h) = (rgb.width() as usize, rgb.height() as usize);
        let planes: Vec<f32> = (0..3).flat_map(|c| rgb.pixels().map(move |p| f32::from(p.0[c]) / 255.0).collect::<Vec<_>>()).collect();
        let x = Tensor::from_vec(planes, (1, 3, h, w), &candle_core::Device::Cpu).expect("tensor");
        let out = net.upscale(&x, TileOptions { tile: 192, overlap: 8 }).expect("upscale");
        DynamicImage::ImageRgb8(tensor_to_images(&out).expect("images").remove(0))
    }

    #[test]
    fn model_upscaling_repeats_the_model_until_the_target_then_resizes_as_a1111() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/esrgan");
        let img = DynamicImage::ImageRgb8(image::RgbImage::from_fn(10, 6, |x, y| image::Rgb([(x * 25) as u8, (y * 40) as u8, ((x * y) * 5) as u8])));
        // A ×2 model to 30×18 (3×): A1111 upscales by 3 to the multiple-of-8 target 24×16 (two passes: 20×12,
        // 40×24, then Lanczos down), then resizes to the exact size.
        let x2 = RrdbNet::load(&dir.join("realesrgan_x2_params.pth"), &candle_core::Device::Cpu).expect("x2");
        let want = once(&x2, &once(&x2, &img)).resize_exact(24, 16, FilterType::Lanczos3).resize_exact(30, 18, FilterType::Lanczos3);
        let got = upscale_image(&img, 30, 18, PixelUpscale::Model(&x2)).expect("x2 upscale");
        assert_eq!(got.to_rgb8().as_raw(), want.to_rgb8().as_raw());
        // A ×1 model: one pass leaves the size, so it stops there and resizes (16×8, then 20×12).
        let x1 = RrdbNet::load(&dir.join("realesrgan_x1.safetensors"), &candle_core::Device::Cpu).expect("x1");
        let want = once(&x1, &img).resize_exact(16, 8, FilterType::Lanczos3).resize_exact(20, 12, FilterType::Lanczos3);
        let got = upscale_image(&img, 20, 12, PixelUpscale::Model(&x1)).expect("x1 upscale");
        assert_eq!(got.to_rgb8().as_raw(), want.to_rgb8().as_raw());
        // Already large enough: no model pass in the hires fix; but A1111's extras at scale 1 run the model once.
        let got = upscale_image(&img, 10, 6, PixelUpscale::Model(&x2)).expect("same size");
        assert_eq!(got.to_rgb8().as_raw(), img.to_rgb8().as_raw());
        let square = DynamicImage::ImageRgb8(image::RgbImage::from_fn(16, 16, |x, y| image::Rgb([(x * 15) as u8, (y * 15) as u8, 99])));
        let got = upscale_by(&square, 1.0, PixelUpscale::Model(&x1)).expect("scale 1");
        assert_eq!(got.to_rgb8().as_raw(), once(&x1, &square).to_rgb8().as_raw());
        assert!(upscale_by(&square, f64::NAN, PixelUpscale::Lanczos).is_err());
    }
}
