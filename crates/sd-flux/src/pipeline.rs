//! The FLUX generation loops: plain functions over [`FluxModels`], with sd-pipelines' progress,
//! preview and cancellation conventions.
//!
//! Guidance: FLUX.1 [dev] is guidance-distilled, so `guidance_scale` is fed to the transformer as
//! an embedding (one forward per step, no negative prompt). FLUX.1 [schnell] has no guidance
//! embedding: a non-zero `guidance_scale` is ignored with a `tracing` warning, and the output is
//! exactly that of a run with guidance 0.

use std::ops::ControlFlow;

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::flux::WithForward;
use sd_models::ModelFamily;
use sd_pipelines::pipeline::{NoiseKind, ProgressFn, StepProgress, MAX_BATCH, MAX_SIDE, MAX_STEPS};
use sd_pipelines::schedulers::NoiseSource;

use crate::config::FluxVariant;
use crate::error::{Error, Result};
use crate::latents::{latent_image_ids, pack_latents, unpack_latents};
use crate::loader::FluxModels;
use crate::schedule::{image_seq_len, img2img_start};
use crate::text::{encode_prompt, PromptEmbeds, T5_MAX_LEN};

/// What to generate.
#[derive(Debug, Clone)]
pub struct FluxParams {
    /// The prompt (plain text: FLUX has no prompt weighting or negative prompt).
    pub prompt: String,
    /// Image width in pixels (a multiple of 2 × the VAE scale factor: 16 for FLUX.1).
    pub width: usize,
    /// Image height in pixels (same rule as `width`).
    pub height: usize,
    /// Sampling steps.
    pub steps: usize,
    /// Embedded guidance for dev (3.5 by default); ignored by schnell (see the module docs).
    pub guidance_scale: f64,
    /// Seed of all noise the run draws.
    pub seed: u64,
    /// Images generated at once.
    pub batch_size: usize,
    /// T5 tokens (`None`: 512 for dev, 256 for schnell).
    pub max_sequence_length: Option<usize>,
    /// Generator behind the seed.
    pub noise: NoiseKind,
}

impl FluxParams {
    /// The variant's defaults (1024², 28 steps and guidance 3.5 for dev, 4 steps for schnell), seed 0.
    pub fn for_model(models: &FluxModels, prompt: impl Into<String>) -> Self {
        let v = models.variant;
        Self {
            prompt: prompt.into(),
            width: 1024,
            height: 1024,
            steps: v.default_steps(),
            guidance_scale: v.default_guidance(),
            seed: 0,
            batch_size: 1,
            max_sequence_length: None,
            noise: NoiseKind::Philox,
        }
    }

    /// The T5 sequence length this request uses on `variant`.
    pub fn sequence_length(&self, variant: FluxVariant) -> usize {
        self.max_sequence_length.unwrap_or(variant.default_max_sequence_length())
    }
}

/// What a run returns.
#[derive(Debug, Clone)]
pub struct FluxOutput {
    /// Decoded images `[batch, 3, h, w]` in [0, 1], F32 on the CPU.
    pub images: Tensor,
    /// Final latents, unpacked `[batch, 16, h/f, w/f]`, before the VAE scaling and shift (F32).
    pub latents: Tensor,
    /// The seed used.
    pub seed: u64,
}

/// Checks a request against the model's rules before anything is allocated.
pub fn validate(models: &FluxModels, p: &FluxParams) -> Result<()> {
    let multiple = 2 * models.vae_scale_factor();
    for (field, v) in [("width", p.width), ("height", p.height)] {
        if v == 0 || v > MAX_SIDE {
            return Err(Error::InvalidRequest { field, reason: format!("{v} px is outside 1..={MAX_SIDE}") });
        }
        if v % multiple != 0 {
            return Err(Error::InvalidRequest {
                field,
                reason: format!("{v} px is not a multiple of {multiple} (2 × the VAE scale factor, for the 2×2 latent patches)"),
            });
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
    let len = p.sequence_length(models.variant);
    if len == 0 || len > T5_MAX_LEN {
        return Err(Error::InvalidRequest { field: "max_sequence_length", reason: format!("{len} is outside 1..={T5_MAX_LEN}") });
    }
    Ok(())
}

/// Generates images from a prompt with noise from `p.seed`.
pub fn text_to_image(models: &FluxModels, p: &FluxParams, progress: &mut ProgressFn<'_>) -> Result<FluxOutput> {
    text_to_image_with_noise(models, p, p.noise.source(p.seed).as_mut(), progress)
}

/// [`text_to_image`] drawing the initial noise `[batch, 16, h/f, w/f]` from `noise` (tests replay
/// diffusers' draws with sd-pipelines' `NoiseQueue`).
pub fn text_to_image_with_noise(
    models: &FluxModels,
    p: &FluxParams,
    noise: &mut dyn NoiseSource,
    progress: &mut ProgressFn<'_>,
) -> Result<FluxOutput> {
    validate(models, p)?;
    let (lh, lw) = latent_size(models, p);
    let cond = conditioning(models, p)?;
    let sigmas = models.scheduler.sigmas(p.steps, image_seq_len(p.width, p.height, models.vae_scale_factor()));
    let x = draw(noise, (p.batch_size, latent_channels(models), lh, lw), &models.device)?;
    let latents = denoise(models, p, &cond, pack_latents(&x)?, &sigmas, 0, (lh, lw), progress)?;
    finish(models, &latents, (lh, lw), p.seed)
}

/// Re-generates `image` (`[1, 3, height, width]` in [-1, 1], see `sd_pipelines::image_io`): encodes
/// it, noises it to `strength` of the schedule and denoises from there (0 keeps the image, 1
/// ignores it; at least one step must remain).
pub fn image_to_image(
    models: &FluxModels,
    p: &FluxParams,
    image: &Tensor,
    strength: f64,
    progress: &mut ProgressFn<'_>,
) -> Result<FluxOutput> {
    image_to_image_with_noise(models, p, image, strength, p.noise.source(p.seed).as_mut(), progress)
}

/// [`image_to_image`] drawing from `noise` in diffusers' order: the VAE posterior sample
/// `[1, 16, h/f, w/f]`, then the initial noise `[batch, 16, h/f, w/f]`.
pub fn image_to_image_with_noise(
    models: &FluxModels,
    p: &FluxParams,
    image: &Tensor,
    strength: f64,
    noise: &mut dyn NoiseSource,
    progress: &mut ProgressFn<'_>,
) -> Result<FluxOutput> {
    validate(models, p)?;
    if !(0.0..=1.0).contains(&strength) {
        return Err(Error::InvalidRequest { field: "strength", reason: format!("{strength} is outside [0, 1]") });
    }
    let dims = image.dims();
    if dims != [1, 3, p.height, p.width] {
        return Err(Error::InvalidRequest {
            field: "image",
            reason: format!("expected a [1, 3, {}, {}] tensor (height × width of the request), got {dims:?}", p.height, p.width),
        });
    }
    let start = img2img_start(p.steps, strength);
    if start >= p.steps {
        return Err(Error::InvalidRequest {
            field: "strength",
            reason: format!("{strength} with {} steps leaves no step to run; use a strength above 0 (0 would return the input unchanged)", p.steps),
        });
    }
    let (lh, lw) = latent_size(models, p);
    let cond = conditioning(models, p)?;
    let sigmas = models.scheduler.sigmas(p.steps, image_seq_len(p.width, p.height, models.vae_scale_factor()));
    let init = encode_image(models, image, noise)?.repeat((p.batch_size, 1, 1, 1))?;
    let eps = draw(noise, (p.batch_size, latent_channels(models), lh, lw), &models.device)?;
    // Flow matching's forward process: x_sigma = sigma·noise + (1 − sigma)·x_0.
    let sigma = sigmas[start];
    let x = ((eps * sigma)? + (init * (1.0 - sigma))?)?;
    let latents = denoise(models, p, &cond, pack_latents(&x)?, &sigmas, start, (lh, lw), progress)?;
    finish(models, &latents, (lh, lw), p.seed)
}

/// Encodes an image `[1, 3, h, w]` in [-1, 1] to transformer-space latents
/// `(sample − shift_factor) · scaling_factor` (F32), sampling the posterior with one draw from
/// `noise` as diffusers' `retrieve_latents(sample_mode="sample")`.
pub fn encode_image(models: &FluxModels, image: &Tensor, noise: &mut dyn NoiseSource) -> Result<Tensor> {
    let vae = &models.vae;
    let x = image.to_device(vae.device())?.to_dtype(vae.dtype())?;
    let dist = vae.encode(&x)?;
    let eps = noise.randn(dist.mean.shape(), DType::F32, &Device::Cpu)?.to_device(vae.device())?;
    let z = dist.sample(&eps)?.to_dtype(DType::F32)?;
    let cfg = vae.config();
    Ok(((z - cfg.shift_factor.unwrap_or(0.0))? * cfg.scaling_factor)?)
}

/// Decodes transformer-space latents `[b, 16, h/f, w/f]` to images `[b, 3, h, w]` in [0, 1]
/// (F32, CPU): `latents / scaling_factor + shift_factor` through the VAE.
pub fn decode_latents(models: &FluxModels, latents: &Tensor) -> Result<Tensor> {
    let vae = &models.vae;
    let cfg = vae.config();
    let z = ((latents.to_dtype(DType::F32)? / cfg.scaling_factor)? + cfg.shift_factor.unwrap_or(0.0))?;
    let img = vae.decode(&z.to_device(vae.device())?.to_dtype(vae.dtype())?)?;
    Ok(((img.to_dtype(DType::F32)?.to_device(&Device::Cpu)? / 2.0)? + 0.5)?.clamp(0f32, 1f32)?)
}

fn latent_channels(models: &FluxModels) -> usize {
    models.vae.config().latent_channels
}

fn latent_size(models: &FluxModels, p: &FluxParams) -> (usize, usize) {
    let f = models.vae_scale_factor();
    (p.height / f, p.width / f)
}

fn draw(noise: &mut dyn NoiseSource, shape: (usize, usize, usize, usize), device: &Device) -> Result<Tensor> {
    // Drawn on the CPU in F32 so a seed gives the same image on every device and dtype.
    Ok(noise.randn(&shape.into(), DType::F32, &Device::Cpu)?.to_device(device)?)
}

/// The prompt's conditioning, repeated over the batch, with a warning when schnell is given guidance.
fn conditioning(models: &FluxModels, p: &FluxParams) -> Result<PromptEmbeds> {
    if models.variant == FluxVariant::Schnell && p.guidance_scale != 0.0 {
        tracing::warn!(
            "FLUX.1 [schnell] has no guidance embedding; guidance_scale {} is ignored",
            p.guidance_scale
        );
    }
    let e = encode_prompt(
        &models.t5,
        &models.t5_tokenizer,
        &models.clip,
        &models.clip_tokenizer,
        &p.prompt,
        p.sequence_length(models.variant),
        models.dtype,
        &models.device,
    )?;
    let b = p.batch_size;
    Ok(PromptEmbeds { prompt_embeds: e.prompt_embeds.repeat((b, 1, 1))?, pooled: e.pooled.repeat((b, 1))?, text_ids: e.text_ids })
}

/// Runs the Euler steps `start..` of `sigmas` over packed latents; returns packed F32 latents.
#[allow(clippy::too_many_arguments)]
fn denoise(
    models: &FluxModels,
    p: &FluxParams,
    cond: &PromptEmbeds,
    mut latents: Tensor,
    sigmas: &[f64],
    start: usize,
    (lh, lw): (usize, usize),
    progress: &mut ProgressFn<'_>,
) -> Result<Tensor> {
    let dtype = models.dtype;
    let dev = &models.device;
    let b = p.batch_size;
    let img_ids = latent_image_ids(lh, lw, dtype, dev)?.unsqueeze(0)?.repeat((b, 1, 1))?;
    let txt_ids = cond.text_ids.unsqueeze(0)?.repeat((b, 1, 1))?;
    let guidance = match models.variant {
        FluxVariant::Dev => Some(Tensor::full(p.guidance_scale as f32, b, dev)?),
        FluxVariant::Schnell => None,
    };
    let steps = sigmas.len().saturating_sub(1);
    let total = steps.saturating_sub(start);
    for i in start..steps {
        let (sigma, next) = (sigmas[i], sigmas[i + 1]);
        // diffusers passes t / 1000 with t = sigma · 1000, i.e. sigma, to the transformer.
        let t = Tensor::full(sigma as f32, b, dev)?;
        let v = models.transformer.forward(
            &latents.to_dtype(dtype)?,
            &img_ids,
            &cond.prompt_embeds,
            &txt_ids,
            &t,
            &cond.pooled,
            guidance.as_ref(),
        )?;
        // The Euler step runs in F32, as diffusers upcasts the sample.
        latents = (latents.to_dtype(DType::F32)? + (v.to_dtype(DType::F32)? * (next - sigma))?)?;
        let step = i + 1 - start;
        let unpacked = unpack_latents(&latents, lh, lw)?;
        let info = StepProgress { step, total, timestep: sigma * 1000.0, latents: &unpacked, family: ModelFamily::Flux };
        if let ControlFlow::Break(()) = progress(&info) {
            return Err(Error::Cancelled { step, total });
        }
    }
    Ok(latents)
}

fn finish(models: &FluxModels, packed: &Tensor, (lh, lw): (usize, usize), seed: u64) -> Result<FluxOutput> {
    let latents = unpack_latents(packed, lh, lw)?;
    let images = decode_latents(models, &latents)?;
    Ok(FluxOutput { images, latents, seed })
}
