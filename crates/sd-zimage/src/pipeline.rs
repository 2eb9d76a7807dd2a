//! The Z-Image generation loop: one entry point, [`generate`], over sd-core's [`Task`] (txt2img, img2img,
//! inpaint) and [`RunContext`] (noise, progress/cancel, latent edits), following diffusers'
//! `ZImagePipeline`, `ZImageImg2ImgPipeline` and `ZImageInpaintPipeline`:
//!
//! - Schedule: sigmas `linspace(1, 1/n, n)` through the scheduler's shift (Turbo: static shift 3), then 0 —
//!   exactly sd-core's [`FlowMatchEulerScheduler`]. The transformer gets `(1000 − t) / 1000` (= 1 − σ) and
//!   predicts the negative velocity: the Euler step uses `−output`.
//! - Guidance: classifier-free guidance whenever `guidance_scale > 0`, as `pos + g·(pos − neg)` (not the
//!   usual `neg + g·(pos − neg)`), prompt and negative prompt in one batch; Turbo runs with 0 (one forward).
//! - img2img / inpaint: the image's VAE posterior is sampled, the start index follows `strength`
//!   (`⌊n − n·strength⌋`); inpainting resets the unmasked area after every step to the image latents noised
//!   to the next sigma (clean after the last step), with the mask binarised at 0.5 and resized (nearest) to
//!   the latent grid.

use candle_core::{DType, Device, Tensor};
use sd_core::family::{Capabilities, PromptSyntax, StrengthRounding};
use sd_core::run::{Request, RunContext, StepProgress, Task, TaskKind};
use sd_core::schedulers::flow_match::FlowMatchEulerScheduler;
use sd_core::schedulers::NoiseSource;
use sd_core::ModelFamily;

use crate::error::{Error, Result};
use crate::loader::ZImageModels;
use crate::text::encode_prompt;

/// What to generate: sd-core's shared [`Request`]. Z-Image reads the prompt and negative prompt (literally),
/// size (multiples of 16), steps, guidance (CFG when > 0), seed, batch, noise and `max_sequence_length`
/// (Qwen3 tokens, default 512).
pub type ZImageParams = Request;

/// The default caption length (diffusers' `max_sequence_length`).
pub const DEFAULT_MAX_SEQUENCE_LENGTH: usize = 512;

/// What a loaded Z-Image model can do: txt2img, img2img and inpaint; a negative prompt (used when guidance
/// is on); LoRAs (merged at load, [`crate::ZImageLoadOptions::loras`]); no sampler choice (flow-matching
/// Euler), clip skip or ControlNet; the prompt read literally; sizes in multiples of 2 × the VAE factor (16).
pub fn capabilities(models: &ZImageModels) -> Capabilities {
    let v = models.variant;
    let max_len = models.transformer.config().max_caption_tokens().max(1);
    Capabilities {
        family: ModelFamily::ZImage,
        variant: format!("z-image-{}", v.name()),
        tasks: vec![TaskKind::TextToImage, TaskKind::ImageToImage, TaskKind::Inpaint],
        negative_prompt: true,
        sampler_choice: false,
        controlnet: false,
        lora: true,
        clip_skip_layers: 0,
        prompt_syntax: PromptSyntax::Literal,
        inpaint_model: false,
        hires_fix: false,
        skip_layer_guidance: false,
        size_multiple: 2 * models.vae_scale_factor(),
        default_width: 1024,
        default_height: 1024,
        default_steps: v.default_steps(),
        default_guidance: v.default_guidance(),
        sequence_length: Some((DEFAULT_MAX_SEQUENCE_LENGTH.min(max_len), max_len)),
        strength_rounding: StrengthRounding::FlowMatch,
        scheduler: None,
    }
}

/// The variant's defaults (1024², Turbo: 9 steps and guidance 0; base: 50 steps and 5.0), seed 0.
pub fn default_params(models: &ZImageModels, prompt: impl Into<String>) -> ZImageParams {
    capabilities(models).request(prompt)
}

/// What a run returns.
#[derive(Debug, Clone)]
pub struct ZImageOutput {
    /// Decoded images `[batch, 3, h, w]` in [0, 1], F32 on the CPU.
    pub images: Tensor,
    /// Final latents `[batch, 16, h/8, w/8]`, before the VAE scaling and shift (F32).
    pub latents: Tensor,
    /// The seed used.
    pub seed: u64,
}

fn unsupported(task: &Task<'_>) -> Error {
    let what = match task {
        Task::LatentsToImage(_) => "img2img from latents (pass pixels with Task::ImageToImage)",
        other => other.name(),
    };
    Error::invalid("task", format!("Z-Image does not run {what}; it runs txt2img, img2img and inpaint"))
}

/// Runs `task` for the request `p`: validates, encodes the prompt (and, with guidance, the negative
/// prompt), draws every random tensor from `run.noise` (taken by this run; else from `p.seed`) in diffusers'
/// order on the CPU in F32, denoises — calling `run`'s editor and progress callback after every step with
/// the latents `[batch, 16, h/8, w/8]` — and decodes.
///
/// Draw order (as diffusers): txt2img: the initial noise. img2img: the VAE posterior sample, then the noise.
/// Inpaint: the posterior sample, the noise, then the masked image's posterior sample (diffusers encodes the
/// masked image and never uses it; the draw is made so a shared generator stays in step, the encoding is
/// skipped).
pub fn generate(models: &ZImageModels, p: &ZImageParams, task: &Task<'_>, run: &mut RunContext<'_>) -> Result<ZImageOutput> {
    let caps = capabilities(models);
    caps.check(p, task)?;
    for field in caps.ignored(p) {
        tracing::warn!(field, "Z-Image does not use this request field; it is ignored");
    }
    let cfg_on = p.guidance_scale > 0.0;
    if !cfg_on && !p.negative_prompt.trim().is_empty() {
        tracing::warn!("the negative prompt is only used with guidance_scale > 0; it is ignored");
    }
    let f = models.vae_scale_factor();
    let (lh, lw) = (2 * (p.height / (2 * f)), 2 * (p.width / (2 * f)));
    let channels = models.vae.config().latent_channels;
    let shape = (p.batch_size, channels, lh, lw);
    let sched = FlowMatchEulerScheduler::new(&models.scheduler, p.steps, (lh / 2) * (lw / 2))?;
    let max_len = caps.sequence_length(p).unwrap_or(DEFAULT_MAX_SEQUENCE_LENGTH);
    let prompt = encode_prompt(&models.text_encoder, &models.tokenizer, &p.prompt, max_len)?;
    let negative = if cfg_on { Some(encode_prompt(&models.text_encoder, &models.tokenizer, &p.negative_prompt, max_len)?) } else { None };
    let mut noise = run.take_noise_for(p);
    let noise = noise.get();
    let (x, start, blend) = match task {
        Task::TextToImage => (draw(noise, shape, &models.device)?, 0, None),
        Task::ImageToImage(t) => {
            let start = sched.begin_at_strength(t.strength)?;
            let init = encode_image(models, t.image, noise)?;
            let init = if init.dim(0)? == p.batch_size { init } else { init.repeat((p.batch_size, 1, 1, 1))? };
            let eps = draw(noise, shape, &models.device)?;
            (sched.scale_noise(&init, &eps, start)?, start, None)
        }
        Task::Inpaint(t) => {
            let start = sched.begin_at_strength(t.strength)?;
            let init = encode_image(models, t.image, noise)?.repeat((p.batch_size, 1, 1, 1))?;
            let eps = draw(noise, shape, &models.device)?;
            noise.randn(&(1, channels, lh, lw).into(), DType::F32, &Device::Cpu)?;
            let mask = t.mask.to_device(&models.device)?.to_dtype(DType::F32)?.ge(0.5)?.to_dtype(DType::F32)?;
            let mask = mask.upsample_nearest2d(lh, lw)?;
            let blend = Blend { mask, image: init.clone(), noise: eps.clone() };
            (sched.scale_noise(&init, &eps, start)?, start, Some(blend))
        }
        other => return Err(unsupported(other)),
    };
    let latents = denoise(models, p, &prompt, negative.as_ref(), &sched, x, start, blend.as_ref(), run)?;
    let images = decode_latents(models, &latents, p.vae_tiling)?;
    Ok(ZImageOutput { images, latents, seed: p.seed })
}

/// Inpainting's per-step reset of the unmasked area (F32; the mask `[1, 1, h, w]` broadcasts).
struct Blend {
    mask: Tensor,
    image: Tensor,
    noise: Tensor,
}

/// Runs the Euler steps `start..` of `sched`; returns F32 latents.
#[allow(clippy::too_many_arguments)]
fn denoise(
    models: &ZImageModels,
    p: &ZImageParams,
    prompt: &Tensor,
    negative: Option<&Tensor>,
    sched: &FlowMatchEulerScheduler,
    mut latents: Tensor,
    start: usize,
    blend: Option<&Blend>,
    run: &mut RunContext<'_>,
) -> Result<Tensor> {
    let b = p.batch_size;
    let dev = &models.device;
    let dtype = models.transformer.dtype();
    let mut caps: Vec<Tensor> = vec![prompt.clone(); b];
    if let Some(n) = negative {
        caps.extend(std::iter::repeat_n(n.clone(), b));
    }
    let batch = caps.len();
    let steps = sched.timesteps().len();
    let total = steps.saturating_sub(start);
    for i in start..steps {
        let sigma = sched.sigmas()[i];
        // diffusers: t = σ·1000 (float32), the transformer gets (1000 − t) / 1000.
        let t = sigma as f32 * 1000.0;
        let t_model = Tensor::full((1000.0 - t) / 1000.0, batch, dev)?;
        let input = latents.to_device(dev)?.to_dtype(dtype)?;
        let input = if negative.is_some() { Tensor::cat(&[&input, &input], 0)? } else { input };
        let out = models.transformer.forward(&input, &t_model, &caps)?.to_dtype(DType::F32)?;
        let pred = if negative.is_some() {
            let pos = out.narrow(0, 0, b)?;
            let neg = out.narrow(0, b, b)?;
            (&pos + ((&pos - &neg)? * p.guidance_scale)?)?
        } else {
            out
        };
        latents = sched.step(&pred.neg()?, i, &latents)?;
        if let Some(bl) = blend {
            // The unmasked area goes back to the original, noised to the next sigma (clean at the end).
            let proper = sched.scale_noise(&bl.image, &bl.noise, i + 1)?;
            latents = (proper.broadcast_mul(&(1.0 - &bl.mask)?)? + latents.broadcast_mul(&bl.mask)?)?;
        }
        let info = StepProgress { step: i + 1 - start, total, timestep: sched.timesteps()[i], latents: &latents, family: ModelFamily::ZImage };
        if let Some(edited) = run.step_done(&info)? {
            latents = edited.to_device(dev)?.to_dtype(DType::F32)?;
        }
    }
    Ok(latents)
}

/// Encodes an image `[n, 3, h, w]` in [-1, 1] to transformer-space latents `(sample − shift) · scale` (F32),
/// sampling the posterior with one draw from `noise` as diffusers' `retrieve_latents(sample_mode="sample")`.
pub fn encode_image(models: &ZImageModels, image: &Tensor, noise: &mut dyn NoiseSource) -> Result<Tensor> {
    let vae = &models.vae;
    let x = image.to_device(vae.device())?.to_dtype(vae.dtype())?;
    let dist = vae.encode(&x)?;
    let eps = noise.randn(dist.mean.shape(), DType::F32, &Device::Cpu)?.to_device(vae.device())?.to_dtype(dist.mean.dtype())?;
    let z = dist.sample(&eps)?.to_dtype(DType::F32)?;
    let cfg = vae.config();
    Ok(((z - cfg.shift_factor.unwrap_or(0.0))? * cfg.scaling_factor)?)
}

/// Decodes transformer-space latents `[b, 16, h/8, w/8]` to images `[b, 3, h, w]` in [0, 1] (F32, CPU):
/// `latents / scaling_factor + shift_factor` through the VAE, tiled as `tiling` says (`Request::vae_tiling`;
/// `None`: above 1024² pixels).
pub fn decode_latents(models: &ZImageModels, latents: &Tensor, tiling: Option<bool>) -> Result<Tensor> {
    let vae = &models.vae;
    let cfg = vae.config();
    let z = ((latents.to_dtype(DType::F32)? / cfg.scaling_factor)? + cfg.shift_factor.unwrap_or(0.0))?;
    let img = vae.decode_auto(&z.to_device(vae.device())?.to_dtype(vae.dtype())?, tiling)?;
    Ok(((img.to_dtype(DType::F32)?.to_device(&Device::Cpu)? / 2.0)? + 0.5)?.clamp(0f32, 1f32)?)
}

fn draw(noise: &mut dyn NoiseSource, shape: (usize, usize, usize, usize), device: &Device) -> Result<Tensor> {
    // Drawn on the CPU in F32 so a seed gives the same image on every device and dtype.
    Ok(noise.randn(&shape.into(), DType::F32, &Device::Cpu)?.to_device(device)?)
}
