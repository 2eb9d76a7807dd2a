//! The SD 3.x generation loop: one entry point, [`generate`], over sd-core's [`Task`] (txt2img, img2img,
//! inpaint) and [`RunContext`] (noise, progress/cancel, latent edits), with sd-core's flow-matching Euler
//! scheduler driven as diffusers' SD3 pipelines drive it (timesteps spaced over the shifted training
//! schedule, [`FlowMatchEulerScheduler::spaced`]).
//!
//! Guidance is true classifier-free guidance over the negative prompt (a batch of two when
//! `guidance_scale > 1`, the unconditional half first), as `StableDiffusion3Pipeline`.
//!
//! Inpainting follows `StableDiffusion3InpaintPipeline` for the 16-channel MMDiTs: the image is encoded
//! and noised to `strength`, and after every step the unmasked area is reset to the original latents
//! noised to the next sigma (clean after the last step). diffusers 0.42.1 decodes that pipeline's result
//! without adding the VAE's `shift_factor`, unlike its txt2img and img2img pipelines; this crate decodes
//! every task the same way (`latents / scaling_factor + shift_factor`), and the goldens record both.

use candle_core::{DType, Device, Tensor};
use sd_core::family::{Capabilities, PromptSyntax, StrengthRounding};
use sd_core::run::{Request, RunContext, StepProgress, Task, TaskKind};
use sd_core::schedulers::flow_match::FlowMatchEulerScheduler;
use sd_core::schedulers::NoiseSource;
use sd_core::ModelFamily;

use crate::error::{Error, Result};
use crate::loader::Sd3Models;
use crate::text::{encode_prompt, PromptEmbeds, T5_DEFAULT_LEN, T5_MAX_LEN};


/// What a loaded SD 3.x model can do: txt2img, img2img and inpaint; negative prompts and CFG; clip skip
/// over the CLIP encoders; T5 sequence length; LoRAs on the MMDiT; skip-layer guidance; the prompt read
/// literally; sizes in multiples of 2 × the VAE factor (16); no sampler choice (flow-matching Euler) or ControlNet.
pub fn capabilities(models: &Sd3Models) -> Capabilities {
    let (steps, guidance) = models.variant.defaults();
    let side = models.transformer.config().sample_size * models.vae_scale_factor();
    Capabilities {
        family: ModelFamily::Sd3,
        variant: models.variant.name().to_string(),
        tasks: vec![TaskKind::TextToImage, TaskKind::ImageToImage, TaskKind::Inpaint],
        negative_prompt: true,
        sampler_choice: false,
        controlnet: false,
        lora: true,
        clip_skip_layers: models.text.clip_l.layer_count().min(models.text.clip_g.layer_count()).saturating_sub(1),
        prompt_syntax: PromptSyntax::Literal,
        inpaint_model: false,
        hires_fix: false,
        skip_layer_guidance: true,
        size_multiple: models.transformer.config().patch_size * models.vae_scale_factor(),
        default_width: side,
        default_height: side,
        default_steps: steps,
        default_guidance: guidance,
        sequence_length: models.text.t5.as_ref().map(|_| (T5_DEFAULT_LEN, T5_MAX_LEN)),
        strength_rounding: StrengthRounding::FlowMatch,
        scheduler: None,
    }
}

pub use sd_core::run::SkipLayerGuidance;

/// The SD 3.x rules for a request's skip-layer guidance beside sd-core's (values, CFG; `Capabilities::validate`):
/// its layers exist in this MMDiT and the task is txt2img (diffusers applies it only there), naming
/// `skip_layer_guidance`.
fn check_slg(slg: &SkipLayerGuidance, models: &Sd3Models, task: &Task<'_>) -> Result<()> {
    let n = models.transformer.config().num_layers;
    if let Some(l) = slg.layers.iter().find(|&&l| l >= n) {
        return Err(Error::invalid("skip_layer_guidance", format!("layer {l} does not exist: the MMDiT has {n} blocks (0..{n})")));
    }
    if !matches!(task, Task::TextToImage) {
        return Err(Error::invalid("skip_layer_guidance", "diffusers applies skip-layer guidance to text to image only"));
    }
    Ok(())
}

/// What a run returns.
#[derive(Debug, Clone)]
pub struct Sd3Output {
    /// Decoded images `[batch, 3, h, w]` in [0, 1], F32 on the CPU.
    pub images: Tensor,
    /// Final latents `[batch, 16, h/8, w/8]` in the transformer's space (before the VAE's scaling and shift), F32.
    pub latents: Tensor,
    /// The seed used.
    pub seed: u64,
}

fn unsupported(task: &Task<'_>) -> Error {
    let what = match task {
        Task::LatentsToImage(_) => "img2img from latents (pass pixels with Task::ImageToImage)",
        other => other.name(),
    };
    Error::invalid("task", format!("SD 3.x models do not run {what}; they run txt2img, img2img and inpaint"))
}

fn draw(noise: &mut dyn NoiseSource, shape: (usize, usize, usize, usize), device: &Device) -> Result<Tensor> {
    // Drawn on the CPU in F32 so a seed gives the same image on every device and dtype.
    Ok(noise.randn(&shape.into(), DType::F32, &Device::Cpu)?.to_device(device)?)
}

/// The prompt's (and, with CFG, the negative prompt's) conditioning over the batch: `[n·b, seq, width]`
/// and `[n·b, pooled]`, the unconditional half first.
fn conditioning(models: &Sd3Models, p: &Request, cfg: bool) -> Result<PromptEmbeds> {
    let len = p.max_sequence_length.unwrap_or(T5_DEFAULT_LEN);
    let joint = models.transformer.config().joint_attention_dim;
    let enc = |text: &str| encode_prompt(&models.text, text, p.clip_skip, len, joint, models.dtype);
    let b = p.batch_size;
    let pos = enc(&p.prompt)?;
    if !cfg {
        return Ok(PromptEmbeds { context: pos.context.repeat((b, 1, 1))?, pooled: pos.pooled.repeat((b, 1))? });
    }
    let neg = enc(&p.negative_prompt)?;
    Ok(PromptEmbeds {
        context: Tensor::cat(&[neg.context.repeat((b, 1, 1))?, pos.context.repeat((b, 1, 1))?], 0)?,
        pooled: Tensor::cat(&[neg.pooled.repeat((b, 1))?, pos.pooled.repeat((b, 1))?], 0)?,
    })
}

/// Encodes an image `[1, 3, h, w]` in [-1, 1] to transformer-space latents `(sample − shift) · scale`
/// (F32), sampling the posterior with one draw from `noise` (diffusers' `retrieve_latents(sample_mode="sample")`).
pub fn encode_image(models: &Sd3Models, image: &Tensor, noise: &mut dyn NoiseSource) -> Result<Tensor> {
    let vae = &models.vae;
    let x = image.to_device(vae.device())?.to_dtype(vae.dtype())?;
    let dist = vae.encode(&x)?;
    let eps = noise.randn(dist.mean.shape(), DType::F32, &Device::Cpu)?.to_device(vae.device())?;
    let z = dist.sample(&eps)?.to_dtype(DType::F32)?;
    let cfg = vae.config();
    Ok(((z - cfg.shift_factor.unwrap_or(0.0))? * cfg.scaling_factor)?)
}

/// Decodes transformer-space latents `[b, 16, h/8, w/8]` to images `[b, 3, h, w]` in [0, 1] (F32, CPU):
/// `latents / scaling_factor + shift_factor` through the VAE, in tiles when `p.vae_tiling` says so (by
/// default above 1024² pixels). Also what an interrupted run's last step shows.
pub fn decode_latents(models: &Sd3Models, latents: &Tensor, p: &Request) -> Result<Tensor> {
    let vae = &models.vae;
    let cfg = vae.config();
    let z = ((latents.to_dtype(DType::F32)? / cfg.scaling_factor)? + cfg.shift_factor.unwrap_or(0.0))?;
    let z = z.to_device(vae.device())?.to_dtype(vae.dtype())?;
    let img = vae.decode_auto(&z, p.vae_tiling)?;
    Ok(((img.to_dtype(DType::F32)?.to_device(&Device::Cpu)? / 2.0)? + 0.5)?.clamp(0f32, 1f32)?)
}

/// Inpainting's per-step reset of the unmasked area (all `[batch, 16, h, w]`, F32).
struct Blend {
    mask: Tensor,
    image: Tensor,
    noise: Tensor,
}

/// Runs `task` for the request `p`: validates, encodes the prompts, draws every random tensor from
/// `run.noise` (taken by this run; else from `p.seed`) in diffusers' order, denoises — calling `run`'s editor
/// and progress callback after every step with the latents `[batch, 16, h/8, w/8]` — and decodes.
///
/// Draw order (as diffusers): txt2img: the initial noise. img2img: the VAE posterior sample, then the noise.
/// Inpaint: the image's posterior sample, the noise, then the masked image's posterior sample (diffusers
/// encodes the masked image, which the 16-channel MMDiT does not read; the draw is made so a shared generator
/// stays in step, the encoding is skipped).
///
/// `p.skip_layer_guidance` adds skip-layer guidance (txt2img with CFG only; refused elsewhere, naming the field).
pub fn generate(models: &Sd3Models, p: &Request, task: &Task<'_>, run: &mut RunContext<'_>) -> Result<Sd3Output> {
    let caps = capabilities(models);
    caps.check(p, task)?;
    let slg = p.skip_layer_guidance.as_ref();
    if let Some(slg) = slg {
        check_slg(slg, models, task)?;
    }
    for field in caps.ignored(p) {
        tracing::warn!(field, "SD 3.x does not use this request field; it is ignored");
    }
    let f = models.vae_scale_factor();
    let (lh, lw) = (p.height / f, p.width / f);
    let cfgt = models.transformer.config();
    let most = cfgt.pos_embed_max_size * cfgt.patch_size * f;
    for (field, side) in [("width", p.width), ("height", p.height)] {
        if side > most {
            return Err(Error::invalid(field, format!("{side} px is beyond this model's position table ({most} px at most)")));
        }
    }
    let shape = (p.batch_size, models.vae.config().latent_channels, lh, lw);
    let sched = FlowMatchEulerScheduler::spaced(&models.scheduler, p.steps, (lh / 2) * (lw / 2))?;
    let cfg = p.guidance_scale > 1.0;
    let cond = conditioning(models, p, cfg)?;
    let mut noise = run.take_noise_for(p);
    let noise = noise.get();
    let (x, start, blend) = match task {
        Task::TextToImage => (draw(noise, shape, &models.device)?, 0, None),
        Task::ImageToImage(t) => {
            let start = sched.begin_at_strength(t.strength)?;
            // One image for the whole batch, or one per batch image.
            let init = encode_image(models, t.image, noise)?;
            let init = if init.dim(0)? == p.batch_size { init } else { init.repeat((p.batch_size, 1, 1, 1))? };
            let eps = draw(noise, shape, &models.device)?;
            (sched.scale_noise(&init, &eps, start)?, start, None)
        }
        Task::Inpaint(t) => {
            let start = sched.begin_at_strength(t.strength)?;
            let init = encode_image(models, t.image, noise)?.repeat((p.batch_size, 1, 1, 1))?;
            let eps = draw(noise, shape, &models.device)?;
            noise.randn(&(1, shape.1, lh, lw).into(), DType::F32, &Device::Cpu)?;
            // Binarised at 0.5 at full size, then sampled to the latent grid (nearest), as diffusers' mask
            // processor and `prepare_mask_latents` do.
            let mask = t.mask.to_device(&models.device)?.to_dtype(DType::F32)?.ge(0.5)?.to_dtype(DType::F32)?;
            let mask = mask.upsample_nearest2d(lh, lw)?.repeat((p.batch_size, shape.1, 1, 1))?;
            let x = sched.scale_noise(&init, &eps, start)?;
            (x, start, Some(Blend { mask, image: init, noise: eps }))
        }
        other => return Err(unsupported(other)),
    };
    let latents = denoise(models, p, &cond, &sched, x, start, cfg, blend.as_ref(), slg, run)?;
    let images = decode_latents(models, &latents, p)?;
    Ok(Sd3Output { images, latents, seed: p.seed })
}

/// Runs the Euler steps `start..` of `sched`; returns F32 latents.
#[allow(clippy::too_many_arguments)]
fn denoise(
    models: &Sd3Models,
    p: &Request,
    cond: &PromptEmbeds,
    sched: &FlowMatchEulerScheduler,
    mut latents: Tensor,
    start: usize,
    cfg: bool,
    blend: Option<&Blend>,
    slg: Option<&SkipLayerGuidance>,
    run: &mut RunContext<'_>,
) -> Result<Tensor> {
    let dtype = models.dtype;
    let dev = &models.device;
    let copies = if cfg { 2 } else { 1 };
    let n = copies * p.batch_size;
    let steps = sched.timesteps().len();
    let total = steps.saturating_sub(start);
    for i in start..steps {
        let t = Tensor::full(sched.timesteps()[i] as f32, n, dev)?;
        let x = latents.to_dtype(dtype)?;
        let input = if cfg { Tensor::cat(&[&x, &x], 0)? } else { x };
        let v = models.transformer.forward(&input, &t, &cond.context, &cond.pooled, &[])?.to_dtype(DType::F32)?;
        let v = if cfg {
            let (uncond, text) = (v.narrow(0, 0, p.batch_size)?, v.narrow(0, p.batch_size, p.batch_size)?);
            let guided = (&uncond + ((&text - &uncond)? * p.guidance_scale)?)?;
            // diffusers counts from the first step run and compares against the requested step count.
            let k = (i - start) as f64;
            match slg.filter(|s| k > p.steps as f64 * s.start && k < p.steps as f64 * s.stop) {
                Some(s) => {
                    let b = p.batch_size;
                    let (ctx, pooled) = (cond.context.narrow(0, b, b)?, cond.pooled.narrow(0, b, b)?);
                    let t1 = t.narrow(0, 0, b)?;
                    let skipped = models.transformer.forward(&latents.to_dtype(dtype)?, &t1, &ctx, &pooled, &s.layers)?.to_dtype(DType::F32)?;
                    (guided + ((&text - skipped)? * s.scale)?)?
                }
                None => guided,
            }
        } else {
            v
        };
        latents = sched.step(&v, i, &latents)?;
        if let Some(bl) = blend {
            // The unmasked area goes back to the original, noised to the next sigma (clean at the end).
            let proper = sched.scale_noise(&bl.image, &bl.noise, i + 1)?;
            latents = (proper.broadcast_mul(&(1.0 - &bl.mask)?)? + latents.broadcast_mul(&bl.mask)?)?;
        }
        let info = StepProgress { step: i + 1 - start, total, timestep: sched.timesteps()[i], latents: &latents, family: ModelFamily::Sd3 };
        if let Some(edited) = run.step_done(&info)? {
            latents = edited.to_dtype(DType::F32)?;
        }
    }
    Ok(latents)
}
