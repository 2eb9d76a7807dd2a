//! The generation loops: plain functions over loaded models, a scheduler and a request.

use std::ops::ControlFlow;

use candle_core::{DType, Device, Tensor};
use sd_models::loader::StableDiffusionModels;
use sd_models::unet::{AddedCond, UNetConditioning};
use sd_models::{ModelFamily, PredictionType as ModelPrediction};

use crate::conditioning::{build_conditioning, Conditioning};
use crate::control::ResidualHook;
use crate::error::{Error, Result};
use crate::schedulers::{
    build_scheduler, BetaSchedule, NoiseSource, PredictionType, Sampler, SamplerKind, Scheduler, SchedulerConfig, SeededNoise, TimestepSpacing,
    TorchCpuNoise,
};

/// Largest image side accepted, in pixels; beyond it a request is rejected before any allocation.
pub const MAX_SIDE: usize = 4096;
/// Largest batch accepted in one call.
pub const MAX_BATCH: usize = 16;
/// Most steps accepted in one call.
pub const MAX_STEPS: usize = 1000;

/// A random seed for a request that gives none (53 bits, so it survives JSON doubles and A1111's
/// infotext).
pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.finish() >> 11
}
/// Above this many latent pixels the VAE decodes/encodes in tiles unless told otherwise
/// (128×128 latents = 1024² images for SD).
pub const AUTO_TILE_LATENT_PIXELS: usize = 128 * 128;

/// Which generator turns the seed into noise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NoiseKind {
    /// Philox on the CPU: the same image for a seed on every device and platform.
    #[default]
    Philox,
    /// PyTorch's CPU generator: the same noise as diffusers with `torch.Generator("cpu").manual_seed(seed)`,
    /// so a diffusers seed reproduces its image.
    Torch,
}

impl NoiseKind {
    /// The noise source for `seed`.
    pub fn source(self, seed: u64) -> Box<dyn NoiseSource> {
        match self {
            NoiseKind::Philox => Box::new(SeededNoise::new(seed)),
            NoiseKind::Torch => Box::new(TorchCpuNoise::new(seed)),
        }
    }
}

/// What to generate: the fields every operation shares.
#[derive(Debug, Clone)]
pub struct GenerationParams {
    /// The prompt (A1111 weighting syntax and `BREAK` allowed; empty is allowed).
    pub prompt: String,
    /// What to steer away from (ignored when guidance ≤ 1).
    pub negative_prompt: String,
    /// Image width in pixels (a multiple of 8).
    pub width: usize,
    /// Image height in pixels (a multiple of 8).
    pub height: usize,
    /// Number of sampling steps.
    pub steps: usize,
    /// Classifier-free guidance scale; ≤ 1 runs the UNet once per step with no negative prompt.
    pub guidance_scale: f64,
    /// Seed of all noise the run draws.
    pub seed: u64,
    /// Images generated at once.
    pub batch_size: usize,
    /// Sampler and sigma schedule.
    pub sampler: Sampler,
    /// A1111 clip skip: 1 = last layer (default), 2 = penultimate, …
    pub clip_skip: usize,
    /// Decode (and encode) through the VAE in tiles: `None` decides from the image size.
    pub vae_tiling: Option<bool>,
    /// Generator behind the seed.
    pub noise: NoiseKind,
}

impl GenerationParams {
    /// The model's defaults (size, steps, guidance) with the given prompt, Euler sampling and seed 0.
    pub fn for_model(models: &StableDiffusionModels, prompt: impl Into<String>) -> Self {
        let c = &models.config;
        Self {
            prompt: prompt.into(),
            negative_prompt: String::new(),
            width: c.default_width,
            height: c.default_height,
            steps: c.default_steps,
            guidance_scale: c.default_guidance,
            seed: 0,
            batch_size: 1,
            sampler: Sampler::from(SamplerKind::Euler),
            clip_skip: 1,
            vae_tiling: None,
            noise: NoiseKind::Philox,
        }
    }
}

/// Progress of a running generation, passed to the callback after every model step.
#[derive(Debug)]
pub struct StepProgress<'a> {
    /// Steps done (1-based).
    pub step: usize,
    /// Steps in this run.
    pub total: usize,
    /// The timestep just denoised.
    pub timestep: f64,
    /// Current latents `[batch, c, h/8, w/8]`: c = 4 for SD, 16 for FLUX (unpacked); call
    /// [`crate::preview::latents_to_rgb`] for a preview.
    pub latents: &'a Tensor,
    /// Model family (selects the preview colour projection).
    pub family: ModelFamily,
}

/// The per-step callback: return `ControlFlow::Break(())` to cancel the run.
pub type ProgressFn<'a> = dyn FnMut(&StepProgress<'_>) -> ControlFlow<()> + 'a;

/// What a run returns.
#[derive(Debug, Clone)]
pub struct GenerationOutput {
    /// Decoded images `[batch, 3, h, w]` in [0, 1], F32 on the CPU.
    pub images: Tensor,
    /// Final latents before VAE scaling `[batch, 4, h/8, w/8]` (already divided by nothing: the
    /// scheduler's output).
    pub latents: Tensor,
    /// The seed used.
    pub seed: u64,
}

/// Extra inputs of an img2img run.
#[derive(Debug, Clone)]
pub struct ImageToImage<'a> {
    /// Input image `[1, 3, h, w]` in [-1, 1] at the requested size (see [`crate::image_io`]).
    pub image: &'a Tensor,
    /// Fraction of the schedule re-noised: 0 keeps the image, 1 ignores it.
    pub strength: f64,
}

/// Extra inputs of an inpainting run.
#[derive(Debug, Clone)]
pub struct Inpaint<'a> {
    /// Input image `[1, 3, h, w]` in [-1, 1].
    pub image: &'a Tensor,
    /// Mask `[1, 1, h, w]` in [0, 1]; 1 (white) is repainted. It is binarised at 0.5, as diffusers does.
    pub mask: &'a Tensor,
    /// Fraction of the schedule re-noised (1.0 repaints the masked area from pure noise).
    pub strength: f64,
}

/// Checks a request against the model's rules before anything is allocated.
pub fn validate(models: &StableDiffusionModels, p: &GenerationParams) -> Result<()> {
    let f = models.config.vae_scale_factor();
    for (field, v) in [("width", p.width), ("height", p.height)] {
        if v == 0 || v > MAX_SIDE {
            return Err(Error::InvalidRequest { field, reason: format!("{v} px is outside 1..={MAX_SIDE}") });
        }
        if v % 8 != 0 || v % f != 0 {
            return Err(Error::InvalidRequest { field, reason: format!("{v} px is not a multiple of {}", 8.max(f)) });
        }
    }
    if p.steps == 0 || p.steps > MAX_STEPS {
        return Err(Error::InvalidRequest { field: "steps", reason: format!("{} is outside 1..={MAX_STEPS}", p.steps) });
    }
    if p.batch_size == 0 || p.batch_size > MAX_BATCH {
        return Err(Error::InvalidRequest { field: "batch_size", reason: format!("{} is outside 1..={MAX_BATCH}", p.batch_size) });
    }
    if !p.guidance_scale.is_finite() || p.guidance_scale < 0.0 || p.guidance_scale > 100.0 {
        return Err(Error::InvalidRequest { field: "guidance_scale", reason: format!("{} is outside 0..=100", p.guidance_scale) });
    }
    let layers = models.config.text_encoder.num_hidden_layers;
    if p.clip_skip > layers {
        return Err(Error::InvalidRequest { field: "clip_skip", reason: format!("{} exceeds the text encoder's {layers} layers", p.clip_skip) });
    }
    crate::prompt::validate_prompt("prompt", &p.prompt)?;
    crate::prompt::validate_prompt("negative_prompt", &p.negative_prompt)?;
    // The sampler's own limits (LCM runs at most its original 50 steps, …), before any allocation.
    build_scheduler(p.sampler, &scheduler_config(models)?, p.steps)?;
    Ok(())
}

/// The scheduler config the model was trained with: its whole `scheduler_config.json` when it came
/// with one (every field honoured, or refused by name when a sampler is built), else the
/// variant's published settings (single-file checkpoints).
pub fn scheduler_config(models: &StableDiffusionModels) -> Result<SchedulerConfig> {
    let s = &models.config.scheduler;
    if let Some(text) = &s.file {
        return SchedulerConfig::from_json_str(text);
    }
    let mut c = SchedulerConfig::sd15();
    c.num_train_timesteps = s.num_train_timesteps;
    c.beta_start = Some(s.beta_start);
    c.beta_end = Some(s.beta_end);
    c.steps_offset = s.steps_offset;
    c.prediction_type = match s.prediction_type {
        ModelPrediction::Epsilon => PredictionType::Epsilon,
        ModelPrediction::VPrediction => PredictionType::VPrediction,
        ModelPrediction::Sample => PredictionType::Sample,
    };
    c.timestep_spacing = match s.timestep_spacing.as_deref() {
        Some("leading") => Some(TimestepSpacing::Leading),
        Some("trailing") => Some(TimestepSpacing::Trailing),
        Some("linspace") => Some(TimestepSpacing::Linspace),
        Some(other) => return Err(Error::ConfigJson { reason: format!("timestep_spacing: {other:?} is not leading, trailing or linspace") }),
        None => None,
    };
    c.beta_schedule = match s.beta_schedule.as_str() {
        "scaled_linear" => Some(BetaSchedule::ScaledLinear),
        "linear" => Some(BetaSchedule::Linear),
        "squaredcos_cap_v2" => Some(BetaSchedule::SquaredcosCapV2),
        other => return Err(Error::ConfigJson { reason: format!("beta_schedule: {other:?} is not linear, scaled_linear or squaredcos_cap_v2") }),
    };
    Ok(c)
}

fn guided(p: &GenerationParams) -> bool {
    p.guidance_scale > 1.0
}

fn use_tiling(p: &GenerationParams, latent_pixels: usize) -> bool {
    p.vae_tiling.unwrap_or(latent_pixels > AUTO_TILE_LATENT_PIXELS)
}

/// Latent tile size and overlap (latent pixels) for tiled VAE work: 64 latents = 512 px tiles.
const TILE: usize = 64;
const TILE_OVERLAP: usize = 16;

fn decode(models: &StableDiffusionModels, latents: &Tensor, p: &GenerationParams) -> Result<Tensor> {
    let vae = &models.vae;
    let z = (latents.to_dtype(models.vae_dtype)? / models.config.vae.scaling_factor)?;
    let (_, _, h, w) = z.dims4()?;
    let img = if use_tiling(p, h * w) { vae.decode_tiled(&z, TILE, TILE_OVERLAP)? } else { vae.decode(&z)? };
    Ok(((img.to_dtype(DType::F32)?.to_device(&Device::Cpu)? / 2.0)? + 0.5)?.clamp(0f32, 1f32)?)
}

/// Encodes an image to scaled latents, sampling the posterior with noise from `noise` (as
/// diffusers' `retrieve_latents(sample_mode="sample")`).
fn encode(models: &StableDiffusionModels, image: &Tensor, p: &GenerationParams, noise: &mut dyn NoiseSource) -> Result<Tensor> {
    let vae = &models.vae;
    let x = image.to_device(&models.device)?.to_dtype(models.vae_dtype)?;
    let (_, _, h, w) = x.dims4()?;
    let f = models.config.vae_scale_factor();
    let dist = if use_tiling(p, (h / f) * (w / f)) { vae.encode_tiled(&x, TILE * f, TILE_OVERLAP * f)? } else { vae.encode(&x)? };
    let eps = noise.randn(dist.mean.shape(), DType::F32, &Device::Cpu)?.to_device(&models.device)?.to_dtype(dist.mean.dtype())?;
    let z = dist.sample(&eps)?;
    Ok((z * models.config.vae.scaling_factor)?.to_dtype(models.dtype)?)
}

fn check_image(field: &'static str, t: &Tensor, channels: usize, p: &GenerationParams) -> Result<()> {
    let dims = t.dims();
    if dims.len() != 4 || dims[0] != 1 || dims[1] != channels || dims[2] != p.height || dims[3] != p.width {
        return Err(Error::InvalidRequest {
            field,
            reason: format!("expected a [1, {channels}, {}, {}] tensor (height × width of the request), got {dims:?}", p.height, p.width),
        });
    }
    Ok(())
}

fn check_strength(strength: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&strength) || strength.is_nan() {
        return Err(Error::InvalidRequest { field: "strength", reason: format!("{strength} is outside [0, 1]") });
    }
    Ok(())
}

/// Generates images from a prompt.
pub fn text_to_image(models: &StableDiffusionModels, p: &GenerationParams, progress: &mut ProgressFn<'_>) -> Result<GenerationOutput> {
    text_to_image_with_noise(models, p, p.noise.source(p.seed).as_mut(), progress)
}

/// [`text_to_image`] drawing every random tensor from `noise` (tests replay diffusers' draws).
pub fn text_to_image_with_noise(
    models: &StableDiffusionModels,
    p: &GenerationParams,
    noise: &mut dyn NoiseSource,
    progress: &mut ProgressFn<'_>,
) -> Result<GenerationOutput> {
    text_to_image_with_hooks(models, p, noise, None, progress)
}

/// [`text_to_image_with_noise`] with an optional residual hook (ControlNet) consulted at every step.
pub fn text_to_image_with_hooks(
    models: &StableDiffusionModels,
    p: &GenerationParams,
    noise: &mut dyn NoiseSource,
    hook: Option<&mut dyn ResidualHook>,
    progress: &mut ProgressFn<'_>,
) -> Result<GenerationOutput> {
    validate(models, p)?;
    let mut sched = build_scheduler(p.sampler, &scheduler_config(models)?, p.steps)?;
    let cond = build_conditioning(models, &p.prompt, &p.negative_prompt, p.clip_skip, guided(p), p.batch_size, (p.height, p.width))?;
    let shape = latent_shape(models, p);
    let latents = (draw(noise, &shape, models)? * sched.init_noise_sigma())?;
    let latents = denoise(models, p, sched.as_mut(), &cond, latents, 0, None, hook, noise, progress)?;
    let images = decode(models, &latents, p)?;
    Ok(GenerationOutput { images, latents, seed: p.seed })
}

/// Re-generates an image: encodes it, noises it to `strength` of the schedule and denoises from there.
pub fn image_to_image(
    models: &StableDiffusionModels,
    p: &GenerationParams,
    input: &ImageToImage<'_>,
    progress: &mut ProgressFn<'_>,
) -> Result<GenerationOutput> {
    image_to_image_with_noise(models, p, input, p.noise.source(p.seed).as_mut(), progress)
}

/// [`image_to_image`] drawing every random tensor from `noise`.
pub fn image_to_image_with_noise(
    models: &StableDiffusionModels,
    p: &GenerationParams,
    input: &ImageToImage<'_>,
    noise: &mut dyn NoiseSource,
    progress: &mut ProgressFn<'_>,
) -> Result<GenerationOutput> {
    image_to_image_with_hooks(models, p, input, noise, None, progress)
}

/// [`image_to_image_with_noise`] with an optional residual hook (ControlNet) consulted at every step.
pub fn image_to_image_with_hooks(
    models: &StableDiffusionModels,
    p: &GenerationParams,
    input: &ImageToImage<'_>,
    noise: &mut dyn NoiseSource,
    hook: Option<&mut dyn ResidualHook>,
    progress: &mut ProgressFn<'_>,
) -> Result<GenerationOutput> {
    validate(models, p)?;
    check_strength(input.strength)?;
    check_image("image", input.image, 3, p)?;
    let mut sched = build_scheduler(p.sampler, &scheduler_config(models)?, p.steps)?;
    let start = sched.begin_at_strength(input.strength)?;
    let cond = build_conditioning(models, &p.prompt, &p.negative_prompt, p.clip_skip, guided(p), p.batch_size, (p.height, p.width))?;
    let init = encode(models, input.image, p, noise)?.repeat((p.batch_size, 1, 1, 1))?;
    let eps = draw(noise, &latent_shape(models, p), models)?;
    let latents = sched.add_noise(&init, &eps, start)?;
    let latents = denoise(models, p, sched.as_mut(), &cond, latents, start, None, hook, noise, progress)?;
    let images = decode(models, &latents, p)?;
    Ok(GenerationOutput { images, latents, seed: p.seed })
}

/// Repaints the masked (white) part of an image: 9-channel inpainting models get the mask and the
/// masked image as extra UNet input, as diffusers feeds them; ordinary 4-channel models blend the
/// re-noised original into the unmasked area after every step.
pub fn inpaint(models: &StableDiffusionModels, p: &GenerationParams, input: &Inpaint<'_>, progress: &mut ProgressFn<'_>) -> Result<GenerationOutput> {
    inpaint_with_noise(models, p, input, p.noise.source(p.seed).as_mut(), progress)
}

/// What the denoising loop needs for inpainting.
struct InpaintState {
    /// 9-channel models: `[mask, masked_image_latents]` concatenated to the UNet input (CFG-doubled).
    extra_channels: Option<Tensor>,
    /// 4-channel models: latent mask, clean image latents and the noise to re-noise them with.
    blend: Option<(Tensor, Tensor, Tensor)>,
}

/// [`inpaint`] drawing every random tensor from `noise`.
pub fn inpaint_with_noise(
    models: &StableDiffusionModels,
    p: &GenerationParams,
    input: &Inpaint<'_>,
    noise: &mut dyn NoiseSource,
    progress: &mut ProgressFn<'_>,
) -> Result<GenerationOutput> {
    inpaint_with_hooks(models, p, input, noise, None, progress)
}

/// [`inpaint_with_noise`] with an optional residual hook (ControlNet) consulted at every step; the hook
/// sees the 4-channel latents, never the mask channels of 9-channel models.
pub fn inpaint_with_hooks(
    models: &StableDiffusionModels,
    p: &GenerationParams,
    input: &Inpaint<'_>,
    noise: &mut dyn NoiseSource,
    hook: Option<&mut dyn ResidualHook>,
    progress: &mut ProgressFn<'_>,
) -> Result<GenerationOutput> {
    validate(models, p)?;
    check_strength(input.strength)?;
    check_image("image", input.image, 3, p)?;
    check_image("mask", input.mask, 1, p)?;
    if input.strength == 0.0 {
        return Err(Error::InvalidRequest { field: "strength", reason: "0 leaves nothing to repaint; use a value in (0, 1]".into() });
    }
    let nine = models.config.is_inpaint();
    let mut sched = build_scheduler(p.sampler, &scheduler_config(models)?, p.steps)?;
    let full = input.strength >= 1.0;
    let start = if full { sched.reset(); 0 } else { sched.begin_at_strength(input.strength)? };
    let cond = build_conditioning(models, &p.prompt, &p.negative_prompt, p.clip_skip, guided(p), p.batch_size, (p.height, p.width))?;

    // diffusers binarises the mask at 0.5 and keeps the image where the mask is 0.
    let mask = input.mask.to_device(&models.device)?.to_dtype(DType::F32)?.ge(0.5)?.to_dtype(DType::F32)?;
    let image = input.image.to_device(&models.device)?.to_dtype(DType::F32)?;
    let shape = latent_shape(models, p);

    // Draw order follows diffusers: image latents (when needed), the noise, then the masked image.
    let image_latents = if !nine || !full { Some(encode(models, &image, p, noise)?.repeat((p.batch_size, 1, 1, 1))?) } else { None };
    let eps = draw(noise, &shape, models)?;
    let latents = match (&image_latents, full) {
        (Some(init), false) => sched.add_noise(init, &eps, start)?,
        _ => (&eps * sched.init_noise_sigma())?,
    };
    let (lh, lw) = (shape[2], shape[3]);
    let latent_mask = mask.upsample_nearest2d(lh, lw)?.to_dtype(models.dtype)?.repeat((p.batch_size, 1, 1, 1))?;
    let state = if nine {
        let masked_image = image.broadcast_mul(&mask.lt(0.5)?.to_dtype(DType::F32)?)?;
        let masked_latents = encode(models, &masked_image, p, noise)?.repeat((p.batch_size, 1, 1, 1))?;
        let extra = Tensor::cat(&[&latent_mask, &masked_latents], 1)?;
        let extra = if guided(p) { Tensor::cat(&[&extra, &extra], 0)? } else { extra };
        InpaintState { extra_channels: Some(extra), blend: None }
    } else {
        // diffusers encodes the masked image for 4-channel models too (and ignores it); drawing
        // its posterior noise keeps every later draw of a seed identical to diffusers'.
        noise.randn(&(1, shape[1], lh, lw).into(), DType::F32, &Device::Cpu)?;
        let init = image_latents.ok_or_else(|| Error::InvalidRequest { field: "image", reason: "image latents missing".into() })?;
        InpaintState { extra_channels: None, blend: Some((latent_mask, init, eps)) }
    };
    let latents = denoise(models, p, sched.as_mut(), &cond, latents, start, Some(&state), hook, noise, progress)?;
    let images = decode(models, &latents, p)?;
    Ok(GenerationOutput { images, latents, seed: p.seed })
}

fn latent_shape(models: &StableDiffusionModels, p: &GenerationParams) -> Vec<usize> {
    let f = models.config.vae_scale_factor();
    vec![p.batch_size, models.config.vae.latent_channels, p.height / f, p.width / f]
}

fn draw(noise: &mut dyn NoiseSource, shape: &[usize], models: &StableDiffusionModels) -> Result<Tensor> {
    // Drawn on the CPU in F32 so a seed gives the same image on every device and dtype.
    Ok(noise.randn(&shape.into(), DType::F32, &Device::Cpu)?.to_device(&models.device)?.to_dtype(models.dtype)?)
}

#[allow(clippy::too_many_arguments)]
fn denoise(
    models: &StableDiffusionModels,
    p: &GenerationParams,
    sched: &mut dyn Scheduler,
    cond: &Conditioning,
    mut latents: Tensor,
    start: usize,
    inpaint: Option<&InpaintState>,
    mut hook: Option<&mut dyn ResidualHook>,
    noise: &mut dyn NoiseSource,
    progress: &mut ProgressFn<'_>,
) -> Result<Tensor> {
    let g = guided(p);
    let timesteps = sched.timesteps().to_vec();
    let total = timesteps.len().saturating_sub(start);
    let added = match (&cond.text_embeds, &cond.time_ids) {
        (Some(text_embeds), Some(time_ids)) => Some(AddedCond { text_embeds: text_embeds.clone(), time_ids: time_ids.clone() }),
        _ => None,
    };
    let mut unet_cond = UNetConditioning { added, ..Default::default() };
    for (i, &t) in timesteps.iter().enumerate().skip(start) {
        let input = if g { Tensor::cat(&[&latents, &latents], 0)? } else { latents.clone() };
        let input = sched.scale_model_input(&input, i)?;
        if let Some(hook) = hook.as_deref_mut() {
            // The hook sees the latents before the inpainting channels, as diffusers' `control_model_input`.
            let residuals = hook.residuals(i - start, total, t, &input, &cond.context, unet_cond.added.as_ref())?;
            let (down, mid) = residuals.map_or((None, None), |(d, m)| (Some(d), Some(m)));
            unet_cond.down_residuals = down;
            unet_cond.mid_residual = mid;
        }
        let input = match inpaint.and_then(|s| s.extra_channels.as_ref()) {
            Some(extra) => Tensor::cat(&[&input, extra], 1)?,
            None => input,
        };
        let out = models.unet.forward(&input, t, &cond.context, &unet_cond)?;
        let out = if g {
            let n = latents.dim(0)?;
            let uncond = out.narrow(0, 0, n)?;
            let text = out.narrow(0, n, n)?;
            (&uncond + ((text - &uncond)? * p.guidance_scale)?)?
        } else {
            out
        };
        latents = sched.step(&out, i, &latents, noise)?;
        if let Some((mask, init, eps)) = inpaint.and_then(|s| s.blend.as_ref()) {
            // Keep the unmasked area on the original image, noised to the level of the next step.
            let proper = match timesteps.get(i + 1) {
                Some(_) => sched.add_noise(init, eps, i + 1)?,
                None => init.clone(),
            };
            let inv = (1.0 - mask)?;
            latents = (proper.broadcast_mul(&inv)? + latents.broadcast_mul(mask)?)?;
        }
        let step = i + 1 - start;
        let info = StepProgress { step, total, timestep: t, latents: &latents, family: models.config.variant.family() };
        if progress(&info).is_break() {
            return Err(Error::Cancelled { step, total });
        }
    }
    Ok(latents)
}
