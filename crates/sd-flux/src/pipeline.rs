//! The FLUX generation loop: one entry point, [`generate`], over sd-core's [`Task`] (txt2img, img2img,
//! inpaint) and [`RunContext`] (noise, progress/cancel, latent edits), with sd-core's flow-matching Euler
//! scheduler.
//!
//! Guidance: FLUX.1 [dev] is guidance-distilled, so `guidance_scale` is fed to the transformer as
//! an embedding (one forward per step, no negative prompt). FLUX.1 [schnell] has no guidance
//! embedding: a non-zero `guidance_scale` is ignored with a `tracing` warning, and the output is
//! exactly that of a run with guidance 0.
//!
//! Editing ([`Task::Edit`], FLUX.1 Kontext) follows diffusers' `FluxKontextPipeline`: the reference image is
//! encoded with the VAE's posterior mode (no random draw), packed, and appended to the noise tokens with
//! position ids whose first coordinate is 1; the prediction for those tokens is dropped every step. The
//! output size is the request's; the schedule's shift follows the generated tokens only.
//!
//! Inpainting follows diffusers' `FluxInpaintPipeline` for the 64-channel FLUX.1 transformers: the
//! image is encoded and noised to `strength` as for img2img; after every step the unmasked area is reset
//! to the original latents noised to the next sigma (the clean latents after the last step), so only the
//! masked (white) area is repainted.

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::flux::WithForward;
use sd_core::family::{Capabilities, PromptSyntax, StrengthRounding};
use sd_core::run::{Request, RunContext, StepProgress, Task, TaskKind};
use sd_core::schedulers::flow_match::FlowMatchEulerScheduler;
use sd_core::schedulers::NoiseSource;
use sd_core::ModelFamily;

use crate::config::FluxVariant;
use crate::error::{Error, Result};
use crate::latents::{image_ids, image_seq_len, latent_image_ids, pack_latents, unpack_latents};
use crate::loader::FluxModels;
use crate::text::{encode_prompt, PromptEmbeds, T5_MAX_LEN};

/// What to generate: sd-core's shared [`Request`]. FLUX reads the prompt (literally), size (multiples of
/// 16), steps, guidance (embedded, dev only), seed, batch, noise and `max_sequence_length` (T5 tokens;
/// `None`: 512 for dev, 256 for schnell); see [`capabilities`] for what it ignores.
pub type FluxParams = Request;

/// What a loaded FLUX.1 model can do: txt2img, img2img and inpaint (and edits for Kontext; inpaint only
/// for Fill, which needs a picture and a mask); no negative prompt, sampler
/// choice (flow-matching Euler), clip skip or ControlNet; LoRAs on the dense transformer; the prompt read
/// literally; sizes in multiples of 2 × the VAE factor (16).
pub fn capabilities(models: &FluxModels) -> Capabilities {
    let v = models.variant;
    let mut tasks = vec![TaskKind::TextToImage, TaskKind::ImageToImage, TaskKind::Inpaint];
    if models.kontext {
        tasks.push(TaskKind::Edit);
    }
    if models.fill {
        // diffusers has only FluxFillPipeline for it: the model needs a picture and a mask.
        tasks = vec![TaskKind::Inpaint];
    }
    let variant = match (models.fill, models.kontext) {
        (true, _) => format!("flux-fill-{}", v.name()),
        (false, true) => "flux-kontext-dev".to_string(),
        _ => format!("flux-{}", v.name()),
    };
    Capabilities {
        family: ModelFamily::Flux,
        variant,
        tasks,
        negative_prompt: false,
        sampler_choice: false,
        controlnet: false,
        lora: !models.transformer.is_quantized(),
        clip_skip_layers: 0,
        prompt_syntax: PromptSyntax::Literal,
        inpaint_model: models.fill,
        hires_fix: false,
        skip_layer_guidance: false,
        size_multiple: 2 * models.vae_scale_factor(),
        default_width: 1024,
        default_height: 1024,
        // FluxFillPipeline's defaults: 50 steps, guidance 30.
        default_steps: if models.fill { 50 } else { v.default_steps() },
        // diffusers' FluxKontextPipeline examples use 2.5.
        default_guidance: if models.fill {
            30.0
        } else if models.kontext {
            2.5
        } else {
            v.default_guidance()
        },
        sequence_length: Some((v.default_max_sequence_length(), T5_MAX_LEN)),
        strength_rounding: StrengthRounding::FlowMatch,
        scheduler: None,
    }
}

/// The variant's defaults (1024², 28 steps and guidance 3.5 for dev, 4 steps for schnell), seed 0.
pub fn default_params(models: &FluxModels, prompt: impl Into<String>) -> FluxParams {
    capabilities(models).request(prompt)
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

/// Checks a request against the model's rules before anything is allocated ([`Capabilities::validate`]).
pub fn validate(models: &FluxModels, p: &FluxParams) -> Result<()> {
    Ok(capabilities(models).validate(p)?)
}

fn unsupported(task: &Task<'_>) -> Error {
    let what = match task {
        Task::LatentsToImage(_) => "img2img from latents (pass pixels with Task::ImageToImage)",
        other => other.name(),
    };
    Error::invalid("task", format!("FLUX.1 dev/schnell do not run {what}; they run txt2img, img2img and inpaint (and edits with a Kontext model)"))
}

/// Runs `task` for the request `p`: validates, encodes the prompt, draws every random tensor from
/// `run.noise` (taken by this run; else from `p.seed`) in diffusers' order, denoises with the model's
/// flow-matching schedule — calling `run`'s editor and progress callback after every step with the
/// unpacked latents `[batch, 16, h/f, w/f]` — and decodes.
///
/// Draw order (as diffusers): txt2img: the initial noise. img2img: the VAE posterior sample, then the
/// noise. Inpaint: the posterior sample, the noise, then the masked image's posterior sample (diffusers
/// encodes the masked image and the 64-channel transformer ignores it; the draw is made so a shared
/// generator stays in step, the encoding is skipped).
pub fn generate(models: &FluxModels, p: &FluxParams, task: &Task<'_>, run: &mut RunContext<'_>) -> Result<FluxOutput> {
    let caps = capabilities(models);
    caps.check(p, task)?;
    for field in caps.ignored(p) {
        tracing::warn!(field, "FLUX.1 does not use this request field; it is ignored");
    }
    let (lh, lw) = latent_size(models, p);
    let shape = (p.batch_size, latent_channels(models), lh, lw);
    let sched = FlowMatchEulerScheduler::new(&models.scheduler, p.steps, image_seq_len(p.width, p.height, models.vae_scale_factor()))?;
    let cond = conditioning(models, p)?;
    let mut noise = run.take_noise_for(p);
    let noise = noise.get();
    let mut reference = None;
    let mut fill = None;
    let (x, start, blend) = match task {
        Task::TextToImage => (draw(noise, shape, &models.device)?, 0, None),
        Task::Edit(t) => {
            let [image] = t.images else {
                return Err(Error::invalid("images", format!("FLUX.1 Kontext edits after one reference image; {} were given", t.images.len())));
            };
            // The posterior mode, as diffusers' Kontext `retrieve_latents(sample_mode="argmax")`: no draw.
            let latents = encode_image_mode(models, image)?;
            let (_, _, rh, rw) = latents.dims4()?;
            let latents = latents.repeat((p.batch_size, 1, 1, 1))?;
            let ids = image_ids(1, rh, rw, models.dtype, &models.device)?.unsqueeze(0)?.repeat((p.batch_size, 1, 1))?;
            reference = Some((pack_latents(&latents)?, ids));
            (draw(noise, shape, &models.device)?, 0, None)
        }
        Task::ImageToImage(t) => {
            let start = sched.begin_at_strength(t.strength)?;
            // One image for the whole batch, or one per batch image.
            let init = encode_image(models, t.image, noise)?;
            let init = if init.dim(0)? == p.batch_size { init } else { init.repeat((p.batch_size, 1, 1, 1))? };
            let eps = draw(noise, shape, &models.device)?;
            (sched.scale_noise(&init, &eps, start)?, start, None)
        }
        Task::Inpaint(t) if models.fill => {
            // FluxFillPipeline: image posterior, noise, masked image posterior; no per-step blending.
            let start = sched.begin_at_strength(t.strength)?;
            let init = encode_image(models, t.image, noise)?.repeat((p.batch_size, 1, 1, 1))?;
            let eps = draw(noise, shape, &models.device)?;
            let mask = t.mask.to_device(&models.device)?.to_dtype(DType::F32)?.ge(0.5)?.to_dtype(DType::F32)?;
            let image = t.image.to_device(&models.device)?.to_dtype(DType::F32)?;
            let masked = image.broadcast_mul(&(1.0 - &mask)?)?;
            let masked = encode_image(models, &masked, noise)?.repeat((p.batch_size, 1, 1, 1))?;
            fill = Some(Tensor::cat(&[pack_latents(&masked)?, fold_mask(&mask, models.vae_scale_factor(), p.batch_size)?], 2)?);
            (sched.scale_noise(&init, &eps, start)?, start, None)
        }
        Task::Inpaint(t) => {
            let start = sched.begin_at_strength(t.strength)?;
            let init = encode_image(models, t.image, noise)?.repeat((p.batch_size, 1, 1, 1))?;
            let eps = draw(noise, shape, &models.device)?;
            noise.randn(&(1, shape.1, lh, lw).into(), DType::F32, &Device::Cpu)?;
            // The mask is binarised at 0.5 at full size, then sampled to the latent grid (nearest), as
            // diffusers' mask processor and `prepare_mask_latents` do.
            let mask = t.mask.to_device(&models.device)?.to_dtype(DType::F32)?.ge(0.5)?.to_dtype(DType::F32)?;
            let mask = mask.upsample_nearest2d(lh, lw)?.repeat((p.batch_size, shape.1, 1, 1))?;
            let blend = Blend { mask: pack_latents(&mask)?, image: pack_latents(&init)?, noise: pack_latents(&eps)? };
            (sched.scale_noise(&init, &eps, start)?, start, Some(blend))
        }
        other => return Err(unsupported(other)),
    };
    let extra = Extra { reference: reference.as_ref(), fill: fill.as_ref() };
    let latents = denoise(models, p, &cond, &sched, pack_latents(&x)?, start, (lh, lw), blend.as_ref(), extra, run)?;
    let latents = unpack_latents(&latents, lh, lw)?;
    let images = decode_latents(models, &latents, p.vae_tiling)?;
    Ok(FluxOutput { images, latents, seed: p.seed })
}

/// What the transformer takes besides the noise tokens: Kontext's reference tokens and their ids, or Fill's
/// per-token masked-image latents and mask.
#[derive(Clone, Copy, Default)]
struct Extra<'a> {
    reference: Option<&'a (Tensor, Tensor)>,
    fill: Option<&'a Tensor>,
}

/// A pixel mask `[1, 1, H, W]` folded into the latent grid and packed, as diffusers' `prepare_mask_latents`
/// for Fill: each latent pixel's `f × f` mask values become channels, `[batch, tokens, 4·f²]`.
fn fold_mask(mask: &Tensor, f: usize, batch: usize) -> Result<Tensor> {
    let (_, _, h, w) = mask.dims4()?;
    let (lh, lw) = (h / f, w / f);
    let m = mask.narrow(2, 0, lh * f)?.narrow(3, 0, lw * f)?.reshape((1, lh, f, lw, f))?.permute((0, 2, 4, 1, 3))?.reshape((1, f * f, lh, lw))?;
    pack_latents(&m.repeat((batch, 1, 1, 1))?)
}

/// Inpainting's per-step reset of the unmasked area (all packed `[batch, tokens, 64]`, F32).
struct Blend {
    mask: Tensor,
    image: Tensor,
    noise: Tensor,
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

/// The resolutions FLUX.1 Kontext was trained at (width, height), as diffusers' `PREFERRED_KONTEXT_RESOLUTIONS`.
pub const KONTEXT_RESOLUTIONS: [(usize, usize); 17] = [
    (672, 1568),
    (688, 1504),
    (720, 1456),
    (752, 1392),
    (800, 1328),
    (832, 1248),
    (880, 1184),
    (944, 1104),
    (1024, 1024),
    (1104, 944),
    (1184, 880),
    (1248, 832),
    (1328, 800),
    (1392, 752),
    (1456, 720),
    (1504, 688),
    (1568, 672),
];

/// The Kontext resolution closest in aspect ratio to a `width × height` reference (diffusers' default
/// `_auto_resize`: ties go to the narrower one, as Python's `min` over `(difference, w, h)` does).
pub fn kontext_reference_size(width: usize, height: usize) -> (usize, usize) {
    let aspect = width as f64 / height.max(1) as f64;
    let mut best = KONTEXT_RESOLUTIONS[8];
    let mut best_key = (f64::INFINITY, usize::MAX, usize::MAX);
    for (w, h) in KONTEXT_RESOLUTIONS {
        let key = ((aspect - w as f64 / h as f64).abs(), w, h);
        if key.0 < best_key.0 || (key.0 == best_key.0 && (key.1, key.2) < (best_key.1, best_key.2)) {
            best_key = key;
            best = (w, h);
        }
    }
    best
}

/// Encodes a reference image `[1, 3, h, w]` in [-1, 1] to transformer-space latents with the posterior's
/// mode (its mean), as diffusers' Kontext pipeline does.
fn encode_image_mode(models: &FluxModels, image: &Tensor) -> Result<Tensor> {
    let vae = &models.vae;
    let x = image.to_device(vae.device())?.to_dtype(vae.dtype())?;
    let z = vae.encode(&x)?.mean.to_dtype(DType::F32)?;
    let cfg = vae.config();
    Ok(((z - cfg.shift_factor.unwrap_or(0.0))? * cfg.scaling_factor)?)
}

/// Decodes transformer-space latents `[b, 16, h/f, w/f]` to images `[b, 3, h, w]` in [0, 1]
/// (F32, CPU): `latents / scaling_factor + shift_factor` through the VAE, tiled as `tiling` says
/// (`Request::vae_tiling`; `None`: above 1024² pixels).
pub fn decode_latents(models: &FluxModels, latents: &Tensor, tiling: Option<bool>) -> Result<Tensor> {
    let vae = &models.vae;
    let cfg = vae.config();
    let z = ((latents.to_dtype(DType::F32)? / cfg.scaling_factor)? + cfg.shift_factor.unwrap_or(0.0))?;
    let img = vae.decode_auto(&z.to_device(vae.device())?.to_dtype(vae.dtype())?, tiling)?;
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
        p.max_sequence_length.unwrap_or(models.variant.default_max_sequence_length()),
        models.dtype,
        &models.device,
    )?;
    let b = p.batch_size;
    Ok(PromptEmbeds { prompt_embeds: e.prompt_embeds.repeat((b, 1, 1))?, pooled: e.pooled.repeat((b, 1))?, text_ids: e.text_ids })
}

/// Runs the Euler steps `start..` of `sched` over packed latents; returns packed F32 latents.
#[allow(clippy::too_many_arguments)]
fn denoise(
    models: &FluxModels,
    p: &FluxParams,
    cond: &PromptEmbeds,
    sched: &FlowMatchEulerScheduler,
    mut latents: Tensor,
    start: usize,
    (lh, lw): (usize, usize),
    blend: Option<&Blend>,
    extra: Extra<'_>,
    run: &mut RunContext<'_>,
) -> Result<Tensor> {
    let dtype = models.dtype;
    let dev = &models.device;
    let b = p.batch_size;
    let img_ids = latent_image_ids(lh, lw, dtype, dev)?.unsqueeze(0)?.repeat((b, 1, 1))?;
    let tokens = latents.dim(1)?;
    // Kontext: the reference tokens follow the generated ones, in the input and in the position ids.
    let (reference_tokens, img_ids) = match extra.reference {
        Some((r, ids)) => (Some(r.to_dtype(dtype)?), Tensor::cat(&[&img_ids, ids], 1)?),
        None => (None, img_ids),
    };
    let txt_ids = cond.text_ids.unsqueeze(0)?.repeat((b, 1, 1))?;
    let guidance = match models.variant {
        FluxVariant::Dev => Some(Tensor::full(p.guidance_scale as f32, b, dev)?),
        FluxVariant::Schnell => None,
    };
    let steps = sched.timesteps().len();
    let total = steps.saturating_sub(start);
    for i in start..steps {
        let sigma = sched.sigmas()[i];
        // diffusers passes t / 1000 with t = sigma · 1000, i.e. sigma, to the transformer.
        let t = Tensor::full(sigma as f32, b, dev)?;
        let input = match (&reference_tokens, extra.fill) {
            (Some(r), _) => Tensor::cat(&[&latents.to_dtype(dtype)?, r], 1)?,
            // Fill: the masked image and mask ride along each token's channels.
            (None, Some(f)) => Tensor::cat(&[&latents.to_dtype(dtype)?, &f.to_dtype(dtype)?], 2)?,
            (None, None) => latents.to_dtype(dtype)?,
        };
        let v = models.transformer.forward(
            &input,
            &img_ids,
            &cond.prompt_embeds,
            &txt_ids,
            &t,
            &cond.pooled,
            guidance.as_ref(),
        )?;
        let v = if reference_tokens.is_some() { v.narrow(1, 0, tokens)? } else { v };
        latents = sched.step(&v, i, &latents)?;
        if let Some(bl) = blend {
            // The unmasked area goes back to the original, noised to the next sigma (clean at the end).
            let proper = sched.scale_noise(&bl.image, &bl.noise, i + 1)?;
            latents = ((proper.broadcast_mul(&(1.0 - &bl.mask)?))? + latents.broadcast_mul(&bl.mask)?)?;
        }
        let step = i + 1 - start;
        let unpacked = unpack_latents(&latents, lh, lw)?;
        let info = StepProgress { step, total, timestep: sched.timesteps()[i], latents: &unpacked, family: ModelFamily::Flux };
        if let Some(edited) = run.step_done(&info)? {
            latents = pack_latents(&edited.to_dtype(DType::F32)?)?;
        }
    }
    Ok(latents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kontext_references_snap_to_the_nearest_trained_aspect() {
        assert_eq!(kontext_reference_size(512, 512), (1024, 1024));
        assert_eq!(kontext_reference_size(1920, 1080), (1392, 752));
        assert_eq!(kontext_reference_size(1080, 1920), (752, 1392));
        assert_eq!(kontext_reference_size(4000, 100), (1568, 672));
        assert_eq!(kontext_reference_size(100, 4000), (672, 1568));
    }
}
