//! The generation loops: plain functions over loaded models, a scheduler and a request.

use candle_core::{DType, Device, Tensor};
use sd_models::loader::StableDiffusionModels;
use sd_models::unet::{AddedCond, UNetConditioning};
use sd_models::PredictionType as ModelPrediction;

use crate::conditioning::{conditioning_for, Conditioning};
use sd_core::prompt_schedule::{prompt_schedule, schedule_index, split_and, ScheduledPrompt};
use crate::control::ResidualHook;
use crate::error::{Error, Result};
use crate::schedulers::{
    build_scheduler, BetaSchedule, NoiseSource, PredictionType, Scheduler, SchedulerConfig, TimestepSpacing,
};
pub use sd_core::family::{Capabilities, PromptSyntax, StrengthRounding};
pub use sd_core::run::{
    random_seed, EditFn, ImageToImage, Inpaint, LatentsToImage, NoiseKind, ProgressFn, Request, RunContext, StepProgress, Task, TaskKind, MAX_BATCH,
    MAX_SIDE, MAX_STEPS,
};

/// Latent pixels above which the VAE is tiled when the request does not say (sd-models' rule for every family).
pub use sd_models::vae::AUTO_TILE_LATENT_PIXELS;

/// What to generate: sd-core's shared [`Request`] (the SD fields: prompt and negative prompt with A1111
/// syntax, size, steps, guidance, seed, batch, sampler, clip skip, VAE tiling, noise).
pub type GenerationParams = Request;

/// What a loaded Stable Diffusion model can do: txt2img, img2img and inpaint (9-channel inpainting
/// models get the mask as UNet input; others blend), negative prompts, every sampler, ControlNet, LoRA,
/// clip skip over its first text encoder, A1111 prompt syntax; sizes in multiples of 8. Fails when the
/// model's `scheduler_config.json` asks for something no sampler implements.
pub fn capabilities(models: &StableDiffusionModels) -> Result<Capabilities> {
    let c = &models.config;
    Ok(Capabilities {
        family: c.variant.family(),
        variant: c.variant.name().to_string(),
        tasks: vec![TaskKind::TextToImage, TaskKind::ImageToImage, TaskKind::Inpaint],
        negative_prompt: true,
        sampler_choice: true,
        controlnet: true,
        lora: true,
        clip_skip_layers: c.text_encoder.num_hidden_layers,
        prompt_syntax: PromptSyntax::A1111,
        inpaint_model: c.is_inpaint(),
        hires_fix: true,
        skip_layer_guidance: false,
        size_multiple: c.vae_scale_factor().max(8),
        default_width: c.default_width,
        default_height: c.default_height,
        default_steps: c.default_steps,
        default_guidance: c.default_guidance,
        sequence_length: None,
        strength_rounding: StrengthRounding::Floor,
        scheduler: Some(scheduler_config(models)?),
    })
}

/// The model's defaults (size, steps, guidance) with the given prompt, Euler sampling and seed 0.
pub fn default_params(models: &StableDiffusionModels, prompt: impl Into<String>) -> GenerationParams {
    let c = &models.config;
    Request::new(prompt, c.default_width, c.default_height, c.default_steps, c.default_guidance)
}

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

/// Checks a request against the model's rules before anything is allocated ([`Capabilities::validate`]).
pub fn validate(models: &StableDiffusionModels, p: &GenerationParams) -> Result<()> {
    Ok(capabilities(models)?.validate(p)?)
}

/// The scheduler config the model was trained with: its whole `scheduler_config.json` when it came
/// with one (every field honoured, or refused by name when a sampler is built), else the
/// variant's published settings (single-file checkpoints).
pub fn scheduler_config(models: &StableDiffusionModels) -> Result<SchedulerConfig> {
    let s = &models.config.scheduler;
    let prediction_type = match s.prediction_type {
        ModelPrediction::Epsilon => PredictionType::Epsilon,
        ModelPrediction::VPrediction => PredictionType::VPrediction,
        ModelPrediction::Sample => PredictionType::Sample,
    };
    if let Some(text) = &s.file {
        let mut c = SchedulerConfig::from_json_str(text)?;
        // A single file's `v_pred` / `ztsnr` markers win over the `--model-config` folder's scheduler.
        c.prediction_type = prediction_type;
        c.rescale_betas_zero_snr |= s.rescale_betas_zero_snr;
        return Ok(c);
    }
    let mut c = SchedulerConfig::sd15();
    c.num_train_timesteps = s.num_train_timesteps;
    c.beta_start = Some(s.beta_start);
    c.beta_end = Some(s.beta_end);
    c.steps_offset = s.steps_offset;
    c.prediction_type = prediction_type;
    c.rescale_betas_zero_snr = s.rescale_betas_zero_snr;
    c.timestep_spacing = match s.timestep_spacing.as_deref() {
        Some("leading") => Some(TimestepSpacing::Leading),
        Some("trailing") => Some(TimestepSpacing::Trailing),
        Some("linspace") => Some(TimestepSpacing::Linspace),
        Some(other) => {
            return Err(sd_core::Error::ConfigJson { reason: format!("timestep_spacing: {other:?} is not leading, trailing or linspace") }.into())
        }
        None => None,
    };
    c.beta_schedule = match s.beta_schedule.as_str() {
        "scaled_linear" => Some(BetaSchedule::ScaledLinear),
        "linear" => Some(BetaSchedule::Linear),
        "squaredcos_cap_v2" => Some(BetaSchedule::SquaredcosCapV2),
        other => {
            return Err(sd_core::Error::ConfigJson {
                reason: format!("beta_schedule: {other:?} is not linear, scaled_linear or squaredcos_cap_v2"),
            }
            .into())
        }
    };
    Ok(c)
}

/// Whether the unconditional prediction is computed: with guidance, and always for A1111's composable
/// diffusion (`AND`, or a part weight other than 1), whose blend is relative to it, and for samplers that
/// step with it (CFG++, whose scales are mostly ≤ 1).
fn guided(p: &GenerationParams) -> bool {
    p.guidance_scale > 1.0 || !plain_prompt(p) || p.sampler.kind.needs_uncond()
}

/// A prompt that is one part of weight 1 (no composable diffusion).
fn plain_prompt(p: &GenerationParams) -> bool {
    matches!(split_and(&p.prompt).as_slice(), [(_, w)] if *w == 1.0)
}

/// UNet batch copies of the latents: the unconditional one (when guided) and one per prompt part.
fn batch_copies(p: &GenerationParams) -> usize {
    if guided(p) {
        1 + split_and(&p.prompt).len()
    } else {
        1
    }
}

fn use_tiling(p: &GenerationParams, latent_pixels: usize) -> bool {
    p.vae_tiling.unwrap_or(latent_pixels > AUTO_TILE_LATENT_PIXELS)
}

use sd_models::vae::{TILE, TILE_OVERLAP};

/// Decodes scheduler-space latents `[b, 4, h/8, w/8]` to images `[b, 3, h, w]` in [0, 1] (F32, CPU),
/// tiled as `p.vae_tiling` says — what a run ends with, also usable on a step's latents (an
/// interrupted run's images).
pub fn decode_latents(models: &StableDiffusionModels, latents: &Tensor, p: &GenerationParams) -> Result<Tensor> {
    decode(models, latents, p)
}

fn decode(models: &StableDiffusionModels, latents: &Tensor, p: &GenerationParams) -> Result<Tensor> {
    let vae = &models.vae;
    let z = (latents.to_dtype(models.vae_dtype)? / models.config.vae.scaling_factor)?;
    let img = vae.decode_auto(&z, p.vae_tiling)?;
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

/// What only Stable Diffusion runs take beside the [`RunContext`].
#[derive(Default)]
pub struct SdExtras<'a> {
    /// Consulted at every step for UNet residuals (ControlNet: `sd_controlnet::ControlHook`).
    pub control: Option<&'a mut dyn ResidualHook>,
    /// A scheduler built by the caller (for the request's step count), used instead of the one
    /// `p.sampler` names.
    pub scheduler: Option<Box<dyn Scheduler>>,
}

/// What the denoising loop needs for inpainting.
struct InpaintState {
    /// 9-channel models: `[mask, masked_image_latents]` concatenated to the UNet input (CFG-doubled).
    extra_channels: Option<Tensor>,
    /// 4-channel models: latent mask, clean image latents and the noise to re-noise them with.
    blend: Option<(Tensor, Tensor, Tensor)>,
}

/// Runs `task` for the request `p`: validates everything before allocating, builds the sampler (or
/// takes `extras.scheduler`), encodes the prompt, draws every random tensor from `run.noise` (taken by
/// this run; else from `p.seed`) in diffusers' order, denoises — calling `run`'s editor and progress callback after
/// every step — and decodes.
///
/// - img2img encodes the image, noises it to `strength` of the schedule and denoises from there.
/// - Inpainting: 9-channel inpainting models get the mask and the masked image as extra UNet input, as
///   diffusers feeds them; ordinary 4-channel models blend the re-noised original into the unmasked
///   area after every step. The residual hook sees the 4-channel latents, never the mask channels.
pub fn generate(
    models: &StableDiffusionModels,
    p: &GenerationParams,
    task: &Task<'_>,
    run: &mut RunContext<'_>,
    extras: SdExtras<'_>,
) -> Result<GenerationOutput> {
    generate_pass(models, p, task, run, extras, PromptClock::single(p))
}

/// The step count A1111's prompt editing schedules a pass over: model calls (a second-order sampler's
/// steps doubled) and, for a hires fix's second pass, the first pass's too.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PromptClock {
    /// Model calls of the (first) pass's schedule.
    pub base: usize,
    /// The second pass's, for a hires fix's second pass.
    pub hires: Option<usize>,
}

impl PromptClock {
    /// A pass on its own.
    pub fn single(p: &GenerationParams) -> Self {
        Self { base: p.sampler.kind.schedule_steps(p.steps), hires: None }
    }
}

/// The conditioning of each stretch of model calls: A1111 prompt editing (`[from:to:when]`) and
/// alternation (`[a|b]`) in each part of the prompt (A1111's composable diffusion splits it at `AND`) and
/// in the negative prompt resolved per call, each distinct set of texts encoded once. `(last call,
/// conditioning)` in call order; a plain prompt gives one entry.
fn conditioning_schedule(models: &StableDiffusionModels, p: &GenerationParams, clock: PromptClock) -> Result<Vec<(usize, Conditioning)>> {
    let parts: Vec<Vec<ScheduledPrompt>> = split_and(&p.prompt).iter().map(|(text, _)| prompt_schedule(text, clock.base, clock.hires)).collect();
    // Without guidance the negative prompt is never encoded: its schedule must not split the stretches.
    let neg = if guided(p) { prompt_schedule(&p.negative_prompt, clock.base, clock.hires) } else { prompt_schedule("", clock.base, clock.hires) };
    // A1111 zeroes SDXL's negative conditioning only when every scheduled negative text is empty.
    let zero_negative = neg.iter().all(|e| e.text.is_empty());
    let ends: std::collections::BTreeSet<usize> = parts.iter().flatten().chain(&neg).map(|e| e.end_at_step).collect();
    let mut built: Vec<((Vec<usize>, usize), Conditioning)> = Vec::new();
    let mut out = Vec::with_capacity(ends.len());
    for end in ends {
        let at = |s: &[ScheduledPrompt]| schedule_index(s.iter().map(|e| e.end_at_step), end);
        let key = (parts.iter().map(|s| at(s)).collect::<Vec<_>>(), at(&neg));
        let cond = match built.iter().find(|(k, _)| *k == key) {
            Some((_, c)) => c.clone(),
            None => {
                let texts: Vec<&str> = parts.iter().zip(&key.0).map(|(s, &i)| s[i].text.as_str()).collect();
                let c = conditioning_for(
                    models,
                    &texts,
                    &neg[key.1].text,
                    zero_negative,
                    p.clip_skip,
                    guided(p),
                    p.batch_size,
                    (p.height, p.width),
                )?;
                built.push((key, c.clone()));
                c
            }
        };
        out.push((end, cond));
    }
    Ok(out)
}

/// [`generate`] with the prompt-editing clock of the pass.
pub(crate) fn generate_pass(
    models: &StableDiffusionModels,
    p: &GenerationParams,
    task: &Task<'_>,
    run: &mut RunContext<'_>,
    extras: SdExtras<'_>,
    clock: PromptClock,
) -> Result<GenerationOutput> {
    let caps = capabilities(models)?;
    caps.check(p, task)?;
    let mut sched = match extras.scheduler {
        Some(s) => s,
        None => {
            // Align Your Steps has a table per model type; SDXL takes its own, as A1111 and ComfyUI pick it.
            let mut sampler = p.sampler;
            if models.config.variant.family() == sd_models::ModelFamily::Sdxl {
                sampler.schedule = sampler.schedule.map(|s| s.for_sdxl());
            }
            build_scheduler(sampler, &scheduler_config(models)?, p.steps)?
        }
    };
    let mut noise = run.take_noise_for(p);
    let noise = noise.get();
    let cond = conditioning_schedule(models, p, clock)?;
    let shape = latent_shape(models, p);
    let (latents, start, inpaint) = match task {
        Task::TextToImage => {
            sched.reset();
            ((draw(noise, &shape, models)? * sched.init_noise_sigma())?, 0, None)
        }
        Task::ImageToImage(input) => {
            let start = sched.begin_at_strength(input.strength)?;
            let init = batched(encode(models, input.image, p, noise)?, p.batch_size)?;
            let eps = draw(noise, &shape, models)?;
            (sched.add_noise(&init, &eps, start)?, start, None)
        }
        Task::LatentsToImage(input) => {
            let dims = input.latents.dims();
            if dims.len() != 4 || !(dims[0] == 1 || dims[0] == p.batch_size) || dims[1..] != shape[1..] {
                return Err(Error::invalid("latents", format!("expected [1 or {}, {}, {}, {}] latents, got {dims:?}", p.batch_size, shape[1], shape[2], shape[3])));
            }
            let start = sched.begin_at_strength(input.strength)?;
            let init = batched(input.latents.to_device(&models.device)?.to_dtype(models.dtype)?, p.batch_size)?;
            let eps = draw(noise, &shape, models)?;
            (sched.add_noise(&init, &eps, start)?, start, None)
        }
        Task::Inpaint(input) => {
            let (latents, start, state) = prepare_inpaint(models, p, input, sched.as_mut(), noise, &shape)?;
            (latents, start, Some(state))
        }
        other => return Err(unsupported(other)),
    };
    let latents = denoise(models, p, sched.as_mut(), &cond, latents, start, inpaint.as_ref(), extras.control, noise, run)?;
    let images = decode(models, &latents, p)?;
    Ok(GenerationOutput { images, latents, seed: p.seed })
}

/// One input for every image of the batch, or already one per image.
fn batched(t: Tensor, batch: usize) -> Result<Tensor> {
    Ok(if t.dim(0)? == batch { t } else { t.repeat((batch, 1, 1, 1))? })
}

fn unsupported(task: &Task<'_>) -> Error {
    Error::invalid("task", format!("Stable Diffusion models do not run {}; they run txt2img, img2img and inpaint", task.name()))
}

/// The starting latents, first step and loop state of an inpainting run.
fn prepare_inpaint(
    models: &StableDiffusionModels,
    p: &GenerationParams,
    input: &Inpaint<'_>,
    sched: &mut dyn Scheduler,
    noise: &mut dyn NoiseSource,
    shape: &[usize],
) -> Result<(Tensor, usize, InpaintState)> {
    let nine = models.config.is_inpaint();
    let full = input.strength >= 1.0;
    let start = if full {
        sched.reset();
        0
    } else {
        sched.begin_at_strength(input.strength)?
    };
    // diffusers binarises the mask at 0.5 and keeps the image where the mask is 0.
    let mask = input.mask.to_device(&models.device)?.to_dtype(DType::F32)?.ge(0.5)?.to_dtype(DType::F32)?;
    let image = input.image.to_device(&models.device)?.to_dtype(DType::F32)?;

    // Draw order follows diffusers: image latents (when needed), the noise, then the masked image.
    let image_latents = if !nine || !full { Some(encode(models, &image, p, noise)?.repeat((p.batch_size, 1, 1, 1))?) } else { None };
    let eps = draw(noise, shape, models)?;
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
        let extra = Tensor::cat(&vec![&extra; batch_copies(p)], 0)?;
        InpaintState { extra_channels: Some(extra), blend: None }
    } else {
        // diffusers encodes the masked image for 4-channel models too (and ignores it); drawing
        // its posterior noise keeps every later draw of a seed identical to diffusers'.
        noise.randn(&(1, shape[1], lh, lw).into(), DType::F32, &Device::Cpu)?;
        let init = image_latents.ok_or_else(|| Error::invalid("image", "image latents missing"))?;
        InpaintState { extra_channels: None, blend: Some((latent_mask, init, eps)) }
    };
    Ok((latents, start, state))
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
    cond: &[(usize, Conditioning)],
    mut latents: Tensor,
    start: usize,
    inpaint: Option<&InpaintState>,
    mut hook: Option<&mut dyn ResidualHook>,
    noise: &mut dyn NoiseSource,
    run: &mut RunContext<'_>,
) -> Result<Tensor> {
    let g = guided(p);
    let copies = batch_copies(p);
    // Composable diffusion: the guided prediction is uncond + Σ wᵢ·(condᵢ − uncond), A1111's
    // `combine_denoised` (which blends the denoised latents: the same sum, as x₀ is affine in ε).
    let weights: Vec<f64> = split_and(&p.prompt).into_iter().map(|(_, w)| w).collect();
    let timesteps = sched.timesteps().to_vec();
    let total = timesteps.len().saturating_sub(start);
    let added = |c: &Conditioning| match (&c.text_embeds, &c.time_ids) {
        (Some(text_embeds), Some(time_ids)) => Some(AddedCond { text_embeds: text_embeds.clone(), time_ids: time_ids.clone() }),
        _ => None,
    };
    let mut unet_cond = UNetConditioning::default();
    for (i, &t) in timesteps.iter().enumerate().skip(start) {
        // A1111 counts prompt-editing steps in model calls from the start of the pass.
        let cond = &cond[schedule_index(cond.iter().map(|(end, _)| *end), i - start)].1;
        unet_cond.added = added(cond);
        let input = if copies > 1 { Tensor::cat(&vec![&latents; copies], 0)? } else { latents.clone() };
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
        latents = if g {
            // Both predictions go to the scheduler: CFG++-style samplers need the unconditional one alone.
            let n = latents.dim(0)?;
            let uncond = out.narrow(0, 0, n)?;
            let cond = if plain_prompt(p) {
                out.narrow(0, n, n)?
            } else {
                let mut sum = uncond.clone();
                for (k, w) in weights.iter().enumerate() {
                    sum = (sum + ((out.narrow(0, n * (k + 1), n)? - &uncond)? * *w)?)?;
                }
                sum
            };
            // Composable prompts at CFG ≤ 1 blend at scale 1, as a plain prompt there gives its condition alone.
            let scale = if plain_prompt(p) || p.guidance_scale > 1.0 { p.guidance_scale } else { 1.0 };
            sched.step_guided(&uncond, &cond, scale, i, &latents, noise)?
        } else {
            sched.step(&out, i, &latents, noise)?
        };
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
        if let Some(edited) = run.step_done(&info)? {
            latents = edited;
        }
    }
    Ok(latents)
}
