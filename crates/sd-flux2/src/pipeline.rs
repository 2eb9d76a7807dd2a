//! The FLUX.2 [klein] generation loop: one entry point, [`generate`], over sd-core's [`Task`] (txt2img,
//! reference-image editing, inpaint) and [`RunContext`] (noise, progress/cancel, latent edits), following
//! diffusers' `Flux2KleinPipeline` (txt2img; `image=` for editing) and `Flux2KleinInpaintPipeline`:
//!
//! - Latents: the VAE's 32-channel latents folded into 2×2 patches (128 channels at 1/16 of the image) and
//!   normalised with the VAE's batch-norm statistics; one token per patch, position ids `(0, row, col, 0)`.
//! - Text: Qwen3 hidden states 9, 18 and 27 of the chat-templated prompt padded to `max_sequence_length`
//!   (512), position ids `(0, 0, 0, i)`; no attention mask in the transformer.
//! - Schedule: sigmas `linspace(1, 1/n, n)` shifted with diffusers' `compute_empirical_mu(seq_len, n)`
//!   (the scheduler's exponential time shift), then 0; the transformer gets σ and predicts the velocity.
//! - Guidance: classifier-free guidance with the empty prompt when `guidance_scale > 1` and the model is
//!   not step-distilled: `neg + g·(pos − neg)`. The distilled klein ignores guidance.
//! - Editing: each reference image (center-cropped to multiples of 16, at most 1024² pixels) is encoded
//!   (posterior mode), normalised and appended as extra tokens with position ids `(10 + 10·i, row, col, 0)`;
//!   only the target tokens' prediction is used.
//! - Inpaint: the image's latents start the run at `strength` (`⌊n − n·strength⌋` steps skipped), are also
//!   a reference (T = 10), and the unmasked area is reset after every step to them noised to the next sigma
//!   (clean after the last); the mask is binarised at 0.5 and resized bilinearly to the token grid.

use candle_core::{DType, Device, Tensor};
use sd_core::family::{Capabilities, PromptSyntax, StrengthRounding};
use sd_core::run::{Request, RunContext, StepProgress, Task, TaskKind};
use sd_core::schedulers::flow_match::{FlowMatchConfig, FlowMatchEulerScheduler};
use sd_core::schedulers::NoiseSource;
use sd_core::ModelFamily;

use crate::error::{Error, Result};
use crate::loader::Flux2Models;
use crate::model::{latent_ids, reference_ids, text_ids};
use crate::text::encode_prompt;
use crate::vae::{pack, unpack};

/// What to generate: sd-core's shared [`Request`]. FLUX.2 [klein] reads the prompt (literally), size
/// (multiples of 16), steps, guidance (CFG when > 1 on the base models), seed, batch, noise and
/// `max_sequence_length` (Qwen3 tokens, default 512). The negative prompt is not used (diffusers' klein
/// pipelines always guide against the empty prompt).
pub type Flux2Params = Request;

/// The default text length (diffusers' `max_sequence_length`).
pub const DEFAULT_MAX_SEQUENCE_LENGTH: usize = 512;

/// The largest reference image diffusers takes without resizing it (1024² pixels).
pub const MAX_REFERENCE_PIXELS: usize = 1024 * 1024;

/// What a loaded FLUX.2 [klein] model can do: txt2img, reference-image editing and inpaint, LoRAs (merged at
/// load, [`crate::Flux2LoadOptions::loras`]); no negative prompt, sampler choice, clip skip or ControlNet; the
/// prompt read literally; sizes in multiples of 2 × the VAE factor (16).
pub fn capabilities(models: &Flux2Models) -> Capabilities {
    let v = models.variant;
    Capabilities {
        family: ModelFamily::Flux2,
        variant: format!("flux2-{}", v.name()),
        tasks: vec![TaskKind::TextToImage, TaskKind::Edit, TaskKind::Inpaint],
        negative_prompt: false,
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
        sequence_length: Some((DEFAULT_MAX_SEQUENCE_LENGTH, DEFAULT_MAX_SEQUENCE_LENGTH)),
        strength_rounding: StrengthRounding::FlowMatch,
        scheduler: None,
    }
}

/// The variant's defaults (1024²; distilled klein: 4 steps, guidance 1; base: 50 steps, 4.0), seed 0.
pub fn default_params(models: &Flux2Models, prompt: impl Into<String>) -> Flux2Params {
    capabilities(models).request(prompt)
}

/// What a run returns.
#[derive(Debug, Clone)]
pub struct Flux2Output {
    /// Decoded images `[batch, 3, h, w]` in [0, 1], F32 on the CPU.
    pub images: Tensor,
    /// Final VAE latents `[batch, 32, h/8, w/8]` (denormalised and unpatchified, what diffusers returns
    /// with `output_type="latent"`; F32). [`decode_latents`] turns them into images.
    pub latents: Tensor,
    /// The seed used.
    pub seed: u64,
}

/// diffusers' `compute_empirical_mu`: the time shift of klein's schedule for `image_seq_len` latent tokens
/// and `num_steps` steps.
pub fn compute_empirical_mu(image_seq_len: usize, num_steps: usize) -> f64 {
    let (a1, b1) = (8.73809524e-05, 1.89833333);
    let (a2, b2) = (0.00016927, 0.45666666);
    let n = image_seq_len as f64;
    if image_seq_len > 4300 {
        return a2 * n + b2;
    }
    let m_200 = a2 * n + b2;
    let m_10 = a1 * n + b1;
    let a = (m_200 - m_10) / 190.0;
    let b = m_200 - 200.0 * a;
    a * num_steps as f64 + b
}

/// The schedule of a run: `steps` sigmas through the scheduler's shift with `mu` =
/// [`compute_empirical_mu`] (when the config shifts dynamically; a static shift otherwise), then 0.
pub fn schedule(config: &FlowMatchConfig, steps: usize, image_seq_len: usize) -> Result<FlowMatchEulerScheduler> {
    let mut cfg = config.clone();
    if cfg.use_dynamic_shifting {
        // sd-core computes mu by interpolating between (base_seq_len, base_shift) and (max_seq_len,
        // max_shift): equal endpoints make it the pipeline's own mu for every length.
        let mu = compute_empirical_mu(image_seq_len, steps);
        cfg.base_shift = Some(mu);
        cfg.max_shift = Some(mu);
    }
    Ok(FlowMatchEulerScheduler::new(&cfg, steps, image_seq_len)?)
}

fn unsupported(task: &Task<'_>) -> Error {
    Error::invalid("task", format!("FLUX.2 [klein] does not run {}; it runs txt2img, edit (reference images) and inpaint (diffusers has no strength-based img2img for klein)", task.name()))
}

/// A reference image checked as `Flux2ImageProcessor.check_image_input` does (sides ≥ 64, aspect ratio
/// ≤ 8) and center-cropped to multiples of `multiple` (its `resize_mode="crop"`).
fn prepare_reference(img: &Tensor, multiple: usize) -> Result<Tensor> {
    let dims = img.dims();
    if dims.len() != 4 || dims[0] != 1 || dims[1] != 3 {
        return Err(Error::invalid("images", format!("a reference image is [1, 3, h, w] in [-1, 1]; got {dims:?}")));
    }
    let (h, w) = (dims[2], dims[3]);
    if h < 64 || w < 64 {
        return Err(Error::invalid("images", format!("a reference image of {w}×{h} is too small; both sides must be at least 64 pixels")));
    }
    if h.max(w) > 8 * h.min(w) {
        return Err(Error::invalid("images", format!("a reference image of {w}×{h} has an aspect ratio above 8:1")));
    }
    if h * w > MAX_REFERENCE_PIXELS {
        return Err(Error::invalid("images", format!("a reference image of {w}×{h} has more than 1024² pixels; downscale it to at most 1024² (diffusers resizes it with Lanczos)")));
    }
    let (ch, cw) = (h / multiple * multiple, w / multiple * multiple);
    Ok(img.narrow(2, (h - ch) / 2, ch)?.narrow(3, (w - cw) / 2, cw)?)
}

/// torch's `interpolate(mode="bilinear", align_corners=False)` of a `[h, w]` plane to `[oh, ow]`.
fn resize_bilinear(src: &[f32], h: usize, w: usize, oh: usize, ow: usize) -> Vec<f32> {
    let index = |dst: usize, inp: usize, out: usize| -> (usize, usize, f32) {
        let scale = inp as f32 / out as f32;
        let s = (scale * (dst as f32 + 0.5) - 0.5).max(0.0);
        let i0 = (s as usize).min(inp - 1);
        let i1 = if i0 < inp - 1 { i0 + 1 } else { i0 };
        (i0, i1, s - i0 as f32)
    };
    let mut out = Vec::with_capacity(oh * ow);
    for y in 0..oh {
        let (y0, y1, ly) = index(y, h, oh);
        for x in 0..ow {
            let (x0, x1, lx) = index(x, w, ow);
            let top = (1.0 - lx) * src[y0 * w + x0] + lx * src[y0 * w + x1];
            let bottom = (1.0 - lx) * src[y1 * w + x0] + lx * src[y1 * w + x1];
            out.push((1.0 - ly) * top + ly * bottom);
        }
    }
    out
}

/// Runs `task` for the request `p`: validates, encodes the prompt (and, with guidance on a base model, the
/// empty prompt), draws the initial noise `[batch, 128, h/16, w/16]` from `run.noise` (taken by this run;
/// else from `p.seed`) on the CPU in F32 — the only draw diffusers makes for every task (images are encoded
/// with the posterior mode) — denoises, calling `run`'s editor and progress callback after every step with
/// the normalised patchified latents `[batch, 128, h/16, w/16]`, and decodes.
pub fn generate(models: &Flux2Models, p: &Flux2Params, task: &Task<'_>, run: &mut RunContext<'_>) -> Result<Flux2Output> {
    let caps = capabilities(models);
    caps.validate(p)?;
    if !matches!(task, Task::TextToImage | Task::Edit(_) | Task::Inpaint(_)) {
        return Err(unsupported(task));
    }
    caps.check_task_kind(task.kind(), task.strength(), p.steps)?;
    for field in caps.ignored(p) {
        tracing::warn!(field, "FLUX.2 [klein] does not use this request field; it is ignored");
    }
    let distilled = models.variant.is_distilled();
    if distilled && p.guidance_scale > 1.0 {
        tracing::warn!(guidance = p.guidance_scale, "guidance is ignored by the step-distilled klein models");
    }
    let cfg_on = p.guidance_scale > 1.0 && !distilled;
    let multiple = caps.size_multiple;
    let (lh, lw) = (p.height / multiple, p.width / multiple);
    let channels = models.transformer.config().in_channels;
    let shape = (p.batch_size, channels, lh, lw);
    let sched = schedule(&models.scheduler, p.steps, lh * lw)?;
    let max_len = caps.sequence_length(p).unwrap_or(DEFAULT_MAX_SEQUENCE_LENGTH);
    let layers = &models.text_layers;
    let prompt = encode_prompt(&models.text_encoder, &models.tokenizer, &p.prompt, max_len, layers)?;
    let negative = if cfg_on { Some(encode_prompt(&models.text_encoder, &models.tokenizer, "", max_len, layers)?) } else { None };
    let mut noise = run.take_noise_for(p);
    let noise = noise.get();
    let mut refs: Vec<Tensor> = Vec::new();
    let (x, start, blend) = match task {
        Task::Edit(t) => {
            if t.images.is_empty() {
                return Err(Error::invalid("images", "an edit needs at least one reference image"));
            }
            let x = draw(noise, shape, &models.device)?;
            for img in t.images {
                refs.push(models.vae.encode(&prepare_reference(img, multiple)?)?);
            }
            (x, 0, None)
        }
        Task::Inpaint(t) => {
            sd_core::run::check_image("image", t.image, 3, p.height, p.width)?;
            sd_core::run::check_image("mask", t.mask, 1, p.height, p.width)?;
            let start = sched.begin_at_strength(t.strength)?;
            let init = models.vae.encode(t.image)?;
            let eps = draw(noise, shape, &models.device)?;
            let init_b = init.to_device(&models.device)?.repeat((p.batch_size, 1, 1, 1))?;
            let m = t.mask.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.ge(0.5)?.to_dtype(DType::F32)?;
            let m = resize_bilinear(&m.flatten_all()?.to_vec1::<f32>()?, p.height, p.width, lh, lw);
            let mask = Tensor::from_vec(m, (1, 1, lh, lw), &models.device)?;
            let x = sched.scale_noise(&init_b, &eps, start)?;
            refs.push(init);
            (x, start, Some(Blend { mask, image: init_b, noise: eps }))
        }
        _ => (draw(noise, shape, &models.device)?, 0, None),
    };
    let latents = denoise(models, p, &prompt, negative.as_ref(), &refs, &sched, x, start, blend.as_ref(), run)?;
    let z = models.vae.denormalize(&latents)?;
    let images = models.vae.decode(&z, p.vae_tiling)?;
    Ok(Flux2Output { images, latents: z, seed: p.seed })
}

/// Inpainting's per-step reset of the unmasked area (F32; the mask `[1, 1, h, w]` broadcasts).
struct Blend {
    mask: Tensor,
    image: Tensor,
    noise: Tensor,
}

/// Runs the Euler steps `start..` of `sched` on latents `[b, 128, h, w]`; returns F32 latents.
#[allow(clippy::too_many_arguments)]
fn denoise(
    models: &Flux2Models,
    p: &Flux2Params,
    prompt: &Tensor,
    negative: Option<&Tensor>,
    refs: &[Tensor],
    sched: &FlowMatchEulerScheduler,
    mut latents: Tensor,
    start: usize,
    blend: Option<&Blend>,
    run: &mut RunContext<'_>,
) -> Result<Tensor> {
    let b = p.batch_size;
    let dev = &models.device;
    let tf = &models.transformer;
    let dtype = tf.dtype();
    let (_, _, lh, lw) = latents.dims4()?;
    let n_img = lh * lw;
    let mut img_ids = latent_ids(lh, lw);
    let sizes: Vec<(usize, usize)> = refs.iter().map(|r| -> Result<(usize, usize)> { Ok((r.dim(2)?, r.dim(3)?)) }).collect::<Result<_>>()?;
    img_ids.extend(reference_ids(&sizes));
    let batch = if negative.is_some() { 2 * b } else { b };
    let ref_tokens = if refs.is_empty() {
        None
    } else {
        let packed: Vec<Tensor> = refs.iter().map(|r| pack(&r.to_device(dev)?.to_dtype(dtype)?)).collect::<candle_core::Result<_>>()?;
        Some(Tensor::cat(&packed, 1)?.repeat((batch, 1, 1))?)
    };
    let mut txts = vec![prompt.unsqueeze(0)?; b];
    if let Some(n) = negative {
        txts.extend(std::iter::repeat_n(n.unsqueeze(0)?, b));
    }
    let txt = Tensor::cat(&txts, 0)?.to_device(dev)?;
    let txt_ids = text_ids(txt.dim(1)?);
    let steps = sched.timesteps().len();
    let total = steps.saturating_sub(start);
    for i in start..steps {
        // diffusers: t = σ·1000 (float32); the transformer gets t / 1000 and multiplies it back.
        let t = sched.timesteps()[i] as f32;
        let t_model = Tensor::full(t / 1000.0, batch, dev)?;
        let x = pack(&latents.to_device(dev)?.to_dtype(dtype)?)?;
        let x = if negative.is_some() { Tensor::cat(&[&x, &x], 0)? } else { x };
        let x = match &ref_tokens {
            Some(r) => Tensor::cat(&[&x, r], 1)?,
            None => x,
        };
        let out = tf.forward(&x, &img_ids, &txt, &txt_ids, &t_model)?.narrow(1, 0, n_img)?.to_dtype(DType::F32)?;
        let out = unpack(&out, lh, lw)?;
        let pred = if negative.is_some() {
            let pos = out.narrow(0, 0, b)?;
            let neg = out.narrow(0, b, b)?;
            (&neg + ((&pos - &neg)? * p.guidance_scale)?)?
        } else {
            out
        };
        latents = sched.step(&pred, i, &latents.to_dtype(DType::F32)?)?;
        if let Some(bl) = blend {
            // The unmasked area goes back to the image, noised to the next sigma (clean at the end).
            let proper = sched.scale_noise(&bl.image, &bl.noise, i + 1)?;
            latents = (proper.broadcast_mul(&(1.0 - &bl.mask)?)? + latents.broadcast_mul(&bl.mask)?)?;
        }
        let info = StepProgress { step: i + 1 - start, total, timestep: sched.timesteps()[i], latents: &latents, family: ModelFamily::Flux2 };
        if let Some(edited) = run.step_done(&info)? {
            latents = edited.to_device(dev)?.to_dtype(DType::F32)?;
        }
    }
    Ok(latents)
}

/// Decodes latents to images `[b, 3, h, w]` in [0, 1] (F32, CPU): VAE latents `[b, 32, h/8, w/8]` (as
/// [`Flux2Output::latents`]), or a step's normalised, patchified latents `[b, 128, h/16, w/16]` (what the
/// progress callback sees; an interrupted run shows them), which are denormalised first; tiled as `tiling` says.
pub fn decode_latents(models: &Flux2Models, latents: &Tensor, tiling: Option<bool>) -> Result<Tensor> {
    let c = models.vae.latent_channels();
    if latents.dim(1)? == 4 * c {
        return models.vae.decode(&models.vae.denormalize(latents)?, tiling);
    }
    models.vae.decode(latents, tiling)
}

fn draw(noise: &mut dyn NoiseSource, shape: (usize, usize, usize, usize), device: &Device) -> Result<Tensor> {
    // Drawn on the CPU in F32 so a seed gives the same image on every device and dtype.
    Ok(noise.randn(&shape.into(), DType::F32, &Device::Cpu)?.to_device(device)?)
}
