//! What every generation run shares, whatever the model family: request limits and their checks, the
//! seed's noise generator, the per-step callbacks (progress/cancel and latent edits) and the run context
//! that carries them into a family's `generate`.

use std::ops::ControlFlow;

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::family::ModelFamily;
use crate::schedulers::noise::{CudaPhiloxNoise, PerImageNoise};
use crate::schedulers::{NoiseSource, Sampler, SamplerKind, SeededNoise, TorchCpuNoise};

/// Largest image side accepted, in pixels; beyond it a request is rejected before any allocation.
pub const MAX_SIDE: usize = 4096;
/// Largest batch accepted in one call.
pub const MAX_BATCH: usize = 16;
/// Most steps accepted in one call.
pub const MAX_STEPS: usize = 1000;
/// Largest guidance scale accepted.
pub const MAX_GUIDANCE: f64 = 100.0;

/// Longest prompt in bytes (a 77-token chunk holds about 300 bytes of English).
pub const MAX_PROMPT_BYTES: usize = 16 * 1024;

/// A random seed for a request that gives none (53 bits, so it survives JSON doubles and A1111's
/// infotext).
pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.finish() >> 11
}

/// Which generator turns the seed into noise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NoiseKind {
    /// Philox on the CPU: the same image for a seed on every device and platform.
    #[default]
    Philox,
    /// PyTorch's CPU generator: the same noise as diffusers with `torch.Generator("cpu").manual_seed(seed)`,
    /// so a diffusers seed reproduces its image.
    Torch,
    /// A1111's "CPU" random source: PyTorch's CPU generator, one per image seeded `seed + i`.
    A1111Cpu,
    /// A1111's "NV" source — and its default "GPU" source on NVIDIA cards —: what `torch.randn` draws on
    /// an NVIDIA GPU ([`CudaPhiloxNoise`]), one generator per image seeded `seed + i`.
    A1111Nv,
}

impl NoiseKind {
    /// `philox`, `torch`, `a1111-cpu` or `a1111-nv`.
    pub fn name(self) -> &'static str {
        match self {
            NoiseKind::Philox => "philox",
            NoiseKind::Torch => "torch",
            NoiseKind::A1111Cpu => "a1111-cpu",
            NoiseKind::A1111Nv => "a1111-nv",
        }
    }

    /// One stream of noise for `seed` (see [`NoiseKind::source_for`] for a whole request).
    pub fn source(self, seed: u64) -> Box<dyn NoiseSource> {
        (self.generator())(seed)
    }

    fn generator(self) -> fn(u64) -> Box<dyn NoiseSource> {
        match self {
            NoiseKind::Philox => |s| Box::new(SeededNoise::new(s)),
            NoiseKind::Torch | NoiseKind::A1111Cpu => |s| Box::new(TorchCpuNoise::new(s)),
            NoiseKind::A1111Nv => |s| Box::new(CudaPhiloxNoise::new(s)),
        }
    }

    /// Whether each image of a batch has its own generator, as in A1111.
    pub fn per_image(self) -> bool {
        matches!(self, NoiseKind::A1111Cpu | NoiseKind::A1111Nv)
    }

    /// The noise of request `p`: one stream for `p.seed` (Philox, Torch), or A1111's per-image generators
    /// (its kinds, or any kind with a variation seed, an eta noise seed delta or a seed resize).
    pub fn source_for(self, p: &Request) -> Box<dyn NoiseSource> {
        if !self.per_image() && p.variation.is_none() && p.eta_noise_seed_delta == 0 && p.seed_resize_from.is_none() {
            return self.source(p.seed);
        }
        let mut noise = PerImageNoise::new(self.generator(), p.seed, p.batch_size).with_eta_noise_seed_delta(p.eta_noise_seed_delta);
        if let Some((h, w)) = p.seed_resize_from {
            noise = noise.with_seed_resize(h, w);
        }
        if let Some(v) = p.variation {
            noise = noise.with_variation(v.subseed, v.strength);
        }
        Box::new(noise)
    }
}

/// A1111's variation seed: the initial noise is the seed's, spherically blended towards the subseed's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Variation {
    /// The variation seed (image `i` uses `subseed + i`).
    pub subseed: u64,
    /// How far towards it, in [0, 1] (0: the seed's noise).
    pub strength: f32,
}

/// What to generate: the request every family takes. A family reads the fields it has (FLUX has no
/// negative prompt, sampler choice or clip skip; SD has no T5 sequence length) — its
/// [`crate::family::Capabilities`] say which, and [`crate::family::Capabilities::ignored`] lists what a
/// request sets that the family will not use.
#[derive(Debug, Clone)]
pub struct Request {
    /// The prompt (for SD: A1111 weighting syntax and `BREAK` allowed; empty is allowed).
    pub prompt: String,
    /// What to steer away from (SD; ignored when guidance ≤ 1).
    pub negative_prompt: String,
    /// Image width in pixels (a multiple of the family's size multiple).
    pub width: usize,
    /// Image height in pixels (same rule as `width`).
    pub height: usize,
    /// Number of sampling steps.
    pub steps: usize,
    /// SD: classifier-free guidance scale (≤ 1 runs the model once per step, no negative prompt).
    /// FLUX.1 dev: the embedded (distilled) guidance; schnell ignores it.
    pub guidance_scale: f64,
    /// Seed of all noise the run draws.
    pub seed: u64,
    /// Images generated at once.
    pub batch_size: usize,
    /// Sampler and sigma schedule (SD).
    pub sampler: Sampler,
    /// A1111 clip skip: 1 = last layer (default), 2 = penultimate, … (SD).
    pub clip_skip: usize,
    /// Decode (and encode) through the VAE in tiles: `None` decides from the image size (SD).
    pub vae_tiling: Option<bool>,
    /// Generator behind the seed.
    pub noise: NoiseKind,
    /// T5 tokens (FLUX; `None`: the variant's default).
    pub max_sequence_length: Option<usize>,
    /// A1111's variation seed (`subseed`, `subseed_strength`).
    pub variation: Option<Variation>,
    /// A1111's eta noise seed delta (ENSD): the sampler's noise after the initial latents comes from
    /// `seed + delta` (0: from the seed's own generators).
    pub eta_noise_seed_delta: u64,
    /// A1111's "resize seed from" `(height, width)` in pixels: the seed's initial noise as at that size,
    /// centred in this one (see [`crate::schedulers::noise::PerImageNoise::with_seed_resize`]).
    pub seed_resize_from: Option<(usize, usize)>,
    /// Skip-layer guidance (SD 3.x; `None`: off). Families without it refuse a request that sets it
    /// ([`crate::family::Capabilities::skip_layer_guidance`]).
    pub skip_layer_guidance: Option<SkipLayerGuidance>,
}

/// Most layers one [`SkipLayerGuidance`] may name.
pub const MAX_SLG_LAYERS: usize = 256;

/// Skip-layer guidance (diffusers' `skip_guidance_layers`; Stability's recommendation for SD 3.5 Medium is
/// layers 7, 8 and 9): on the steps `i` with `start · steps < i < stop · steps` of a guided run, one more
/// model call on the prompt alone with `layers` left out, and the prediction moves by
/// `scale · (text − skipped)`. The family checks what depends on the model (which layers exist, which
/// tasks take it).
#[derive(Debug, Clone, PartialEq)]
pub struct SkipLayerGuidance {
    /// The transformer blocks left out of the extra call (0-based).
    pub layers: Vec<usize>,
    /// Its weight (diffusers' default 2.8).
    pub scale: f64,
    /// Fraction of the steps after which it starts (default 0.01).
    pub start: f64,
    /// Fraction of the steps before which it stops (default 0.2).
    pub stop: f64,
}

impl SkipLayerGuidance {
    /// diffusers' defaults (scale 2.8, from 1 % to 20 % of the steps) on `layers`.
    pub fn new(layers: Vec<usize>) -> Self {
        Self { layers, scale: 2.8, start: 0.01, stop: 0.2 }
    }

    /// Checks the values alone, naming `skip_layer_guidance`: at least one layer (at most
    /// [`MAX_SLG_LAYERS`]), a finite scale in `0..=`[`MAX_GUIDANCE`], and `0 ≤ start ≤ stop ≤ 1`.
    pub fn check(&self) -> Result<()> {
        let bad = |why: String| Err(Error::invalid("skip_layer_guidance", why));
        if self.layers.is_empty() {
            return bad("name at least one layer to skip in `layers` (SD 3.5 Medium: [7, 8, 9])".into());
        }
        if self.layers.len() > MAX_SLG_LAYERS {
            return bad(format!("{} layers; name at most {MAX_SLG_LAYERS}", self.layers.len()));
        }
        if !self.scale.is_finite() || !(0.0..=MAX_GUIDANCE).contains(&self.scale) {
            return bad(format!("scale {} is outside 0..={MAX_GUIDANCE}", self.scale));
        }
        for (name, v) in [("start", self.start), ("stop", self.stop)] {
            if !v.is_finite() || !(0.0..=1.0).contains(&v) {
                return bad(format!("{name} {v} is not a fraction of the steps in [0, 1]"));
            }
        }
        if self.start > self.stop {
            return bad(format!("start {} is after stop {}", self.start, self.stop));
        }
        Ok(())
    }

    /// The short form the PNG infotext carries: `7,8,9 x2.8 (0.01-0.2)`.
    pub fn summary(&self) -> String {
        let layers: Vec<String> = self.layers.iter().map(|l| l.to_string()).collect();
        format!("{} x{} ({}-{})", layers.join(","), self.scale, self.start, self.stop)
    }
}

impl Request {
    /// A request with the given defaults (size, steps, guidance), Euler sampling and seed 0.
    pub fn new(prompt: impl Into<String>, width: usize, height: usize, steps: usize, guidance_scale: f64) -> Self {
        Self {
            prompt: prompt.into(),
            negative_prompt: String::new(),
            width,
            height,
            steps,
            guidance_scale,
            seed: 0,
            batch_size: 1,
            sampler: Sampler::from(SamplerKind::Euler),
            clip_skip: 1,
            vae_tiling: None,
            noise: NoiseKind::Philox,
            max_sequence_length: None,
            variation: None,
            eta_noise_seed_delta: 0,
            seed_resize_from: None,
            skip_layer_guidance: None,
        }
    }
}

impl std::str::FromStr for NoiseKind {
    type Err = Error;

    /// `philox` (also empty), `torch`, `a1111-cpu` or `a1111-nv` (also `nv`), any case.
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "philox" => Ok(NoiseKind::Philox),
            "torch" => Ok(NoiseKind::Torch),
            "a1111-cpu" => Ok(NoiseKind::A1111Cpu),
            "a1111-nv" | "nv" => Ok(NoiseKind::A1111Nv),
            other => Err(Error::invalid("noise", format!("unknown noise generator {other:?}; use \"philox\", \"torch\", \"a1111-cpu\" or \"a1111-nv\""))),
        }
    }
}

/// Progress of a running generation, passed to the callbacks after every model step.
#[derive(Debug)]
pub struct StepProgress<'a> {
    /// Steps done (1-based).
    pub step: usize,
    /// Steps in this run.
    pub total: usize,
    /// The timestep just denoised.
    pub timestep: f64,
    /// Current latents `[batch, c, h/f, w/f]`: c = 4 for SD, 16 for FLUX (unpacked from its 2×2
    /// patches); call [`crate::preview::latents_to_rgb`] for a preview.
    pub latents: &'a Tensor,
    /// Model family (selects the preview colour projection).
    pub family: ModelFamily,
}

/// The per-step callback: return `ControlFlow::Break(())` to cancel the run.
pub type ProgressFn<'a> = dyn FnMut(&StepProgress<'_>) -> ControlFlow<()> + 'a;

/// A per-step latent editor, run before the progress callback: return `Some(latents)` (same shape,
/// in the layout of [`StepProgress::latents`]) to replace the run's latents, as diffusers'
/// `callback_on_step_end` returning `latents` does.
pub type EditFn<'a> = dyn FnMut(&StepProgress<'_>) -> Result<Option<Tensor>> + 'a;

/// How a run is driven, beside the request itself: where its noise comes from and who hears about
/// (or edits) each step. `RunContext::default()` draws from the request's seed and calls nobody.
#[derive(Default)]
pub struct RunContext<'a> {
    /// Every random tensor of the run is drawn from here (`None`: the request's seed and noise kind).
    /// Tests replay a reference implementation's draws through a [`crate::schedulers::NoiseQueue`].
    pub noise: Option<&'a mut dyn NoiseSource>,
    /// Progress, previews and cancellation.
    pub progress: Option<&'a mut ProgressFn<'a>>,
    /// Reads and may replace the latents after every step.
    pub edit: Option<&'a mut EditFn<'a>>,
}

impl<'a> RunContext<'a> {
    /// A context that only reports progress.
    pub fn with_progress(progress: &'a mut ProgressFn<'a>) -> Self {
        Self { progress: Some(progress), ..Self::default() }
    }

    /// Adds a noise source.
    pub fn noise(mut self, noise: &'a mut dyn NoiseSource) -> Self {
        self.noise = Some(noise);
        self
    }

    /// Adds a latent editor.
    pub fn edit(mut self, edit: &'a mut EditFn<'a>) -> Self {
        self.edit = Some(edit);
        self
    }

    /// The noise this run draws from: the context's source (taken: it serves one run), else a fresh
    /// generator of `kind` seeded with `seed`.
    pub fn take_noise_for(&mut self, p: &Request) -> RunNoise<'a> {
        match self.noise.take() {
            Some(n) => RunNoise::Given(n),
            None => RunNoise::Seeded(p.noise.source_for(p)),
        }
    }

    /// Takes the noise source given to the run, or one stream of `kind` for `seed`.
    pub fn take_noise(&mut self, kind: NoiseKind, seed: u64) -> RunNoise<'a> {
        match self.noise.take() {
            Some(n) => RunNoise::Given(n),
            None => RunNoise::Seeded(kind.source(seed)),
        }
    }

    /// Runs the editor then the progress callback for a finished step: `Ok(Some(t))` when the editor
    /// replaced the latents (checked to keep their shape), `Err(Cancelled)` when the progress callback
    /// stopped the run.
    pub fn step_done(&mut self, info: &StepProgress<'_>) -> Result<Option<Tensor>> {
        let mut replaced = None;
        if let Some(edit) = self.edit.as_deref_mut() {
            if let Some(t) = edit(info)? {
                if t.dims() != info.latents.dims() {
                    return Err(Error::invalid(
                        "latents",
                        format!("the step callback returned latents of shape {:?}; the run's are {:?}", t.dims(), info.latents.dims()),
                    ));
                }
                replaced = Some(t.to_dtype(info.latents.dtype())?.to_device(info.latents.device())?);
            }
        }
        if let Some(progress) = self.progress.as_deref_mut() {
            let latest = StepProgress { latents: replaced.as_ref().unwrap_or(info.latents), ..*info };
            if progress(&latest).is_break() {
                return Err(Error::Cancelled { step: info.step, total: info.total });
            }
        }
        Ok(replaced)
    }
}

/// What to run: the task and its inputs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Task<'a> {
    /// Images from the prompt alone.
    TextToImage,
    /// Re-generate an image (see [`ImageToImage`]).
    ImageToImage(ImageToImage<'a>),
    /// Repaint the masked part of an image (see [`Inpaint`]).
    Inpaint(Inpaint<'a>),
    /// Re-generate from latents instead of pixels (see [`LatentsToImage`]): the second pass of a hires fix
    /// with a latent upscaler; diffusers' img2img given 4-channel "images".
    LatentsToImage(LatentsToImage<'a>),
    /// Edit after reference images (see [`Edit`]): the images join the model's input as extra tokens and
    /// the prompt says what to change (FLUX.1 Kontext).
    Edit(Edit<'a>),
}

/// Extra inputs of a reference-image edit.
#[derive(Debug, Clone)]
pub struct Edit<'a> {
    /// Reference images, each `[1, 3, h, w]` in [-1, 1] at its own size (sides multiples of the model's
    /// size multiple; the output size is the request's).
    pub images: &'a [Tensor],
}

/// Extra inputs of an img2img run that starts from latents.
#[derive(Debug, Clone)]
pub struct LatentsToImage<'a> {
    /// Latents in the model's space `[1 or batch, c, h/f, w/f]` (the VAE's scaling already applied, as a
    /// family's `generate` returns them).
    pub latents: &'a Tensor,
    /// Fraction of the schedule re-noised: 0 keeps the latents, 1 ignores them.
    pub strength: f64,
}

impl Task<'_> {
    /// What kind of task this is.
    pub fn kind(&self) -> TaskKind {
        match self {
            Task::TextToImage => TaskKind::TextToImage,
            Task::ImageToImage(_) => TaskKind::ImageToImage,
            Task::Inpaint(_) => TaskKind::Inpaint,
            Task::LatentsToImage(_) => TaskKind::ImageToImage,
            Task::Edit(_) => TaskKind::Edit,
        }
    }

    /// The task's name as the families' capability lists and errors spell it.
    pub fn name(&self) -> &'static str {
        self.kind().name()
    }

    /// The strength of an img2img or inpaint task.
    pub fn strength(&self) -> Option<f64> {
        match self {
            Task::TextToImage | Task::Edit(_) => None,
            Task::ImageToImage(t) => Some(t.strength),
            Task::Inpaint(t) => Some(t.strength),
            Task::LatentsToImage(t) => Some(t.strength),
        }
    }
}

/// A [`Task`] without its inputs: what capability lists and request checks talk about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum TaskKind {
    /// Images from the prompt alone.
    #[serde(rename = "txt2img")]
    TextToImage,
    /// Re-generate an image.
    #[serde(rename = "img2img")]
    ImageToImage,
    /// Repaint the masked part of an image.
    Inpaint,
    /// Edit after reference images.
    Edit,
}

impl TaskKind {
    /// `txt2img`, `img2img` or `inpaint`.
    pub fn name(self) -> &'static str {
        match self {
            TaskKind::TextToImage => "txt2img",
            TaskKind::ImageToImage => "img2img",
            TaskKind::Inpaint => "inpaint",
            TaskKind::Edit => "edit",
        }
    }
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

/// A run's noise source, from [`RunContext::take_noise`].
pub enum RunNoise<'a> {
    /// The caller's source.
    Given(&'a mut dyn NoiseSource),
    /// The request seed's own generator.
    Seeded(Box<dyn NoiseSource>),
}

impl RunNoise<'_> {
    /// The source to draw from.
    pub fn get(&mut self) -> &mut dyn NoiseSource {
        match self {
            RunNoise::Given(n) => &mut **n,
            RunNoise::Seeded(n) => n.as_mut(),
        }
    }
}

/// Checks a prompt's size alone ([`MAX_PROMPT_BYTES`]): all that applies to prompts read literally
/// (FLUX's T5); errors name `field`.
pub fn check_prompt_size(field: &'static str, prompt: &str) -> Result<()> {
    if prompt.len() > MAX_PROMPT_BYTES {
        return Err(Error::invalid(
            field,
            format!("{} bytes is longer than the {MAX_PROMPT_BYTES} bytes a prompt may have", prompt.len()),
        ));
    }
    Ok(())
}

/// Checks an image size: both sides in 1..=[`MAX_SIDE`] and multiples of `multiple` (`why` says where
/// the multiple comes from).
pub fn check_size(width: usize, height: usize, multiple: usize, why: &str) -> Result<()> {
    for (field, v) in [("width", width), ("height", height)] {
        if v == 0 || v > MAX_SIDE {
            return Err(Error::invalid(field, format!("{v} px is outside 1..={MAX_SIDE}")));
        }
        if multiple > 1 && v % multiple != 0 {
            return Err(Error::invalid(field, format!("{v} px is not a multiple of {multiple}{why}")));
        }
    }
    Ok(())
}

/// Checks a variation seed's strength is in [0, 1].
pub fn check_variation(v: Option<Variation>) -> Result<()> {
    match v {
        Some(v) if !(0.0..=1.0).contains(&v.strength) => Err(Error::invalid("subseed_strength", format!("{} is outside [0, 1]", v.strength))),
        _ => Ok(()),
    }
}

/// Checks the step count, batch size and guidance scale every family shares.
pub fn check_counts(steps: usize, batch_size: usize, guidance_scale: f64) -> Result<()> {
    if steps == 0 || steps > MAX_STEPS {
        return Err(Error::invalid("steps", format!("{steps} is outside 1..={MAX_STEPS}")));
    }
    if batch_size == 0 || batch_size > MAX_BATCH {
        return Err(Error::invalid("batch_size", format!("{batch_size} is outside 1..={MAX_BATCH}")));
    }
    if !guidance_scale.is_finite() || !(0.0..=MAX_GUIDANCE).contains(&guidance_scale) {
        return Err(Error::invalid("guidance_scale", format!("{guidance_scale} is outside 0..={MAX_GUIDANCE}")));
    }
    Ok(())
}

/// Checks an img2img / inpaint strength is in [0, 1].
pub fn check_strength(strength: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&strength) {
        return Err(Error::invalid("strength", format!("{strength} is outside [0, 1]")));
    }
    Ok(())
}

/// Checks an input tensor is `[1, channels, height, width]` (the request's size).
pub fn check_image(field: &'static str, t: &Tensor, channels: usize, height: usize, width: usize) -> Result<()> {
    check_batch_image(field, t, channels, height, width, 1)
}

/// Checks an input tensor is `[1 or batch, channels, height, width]`: one input for every image of the
/// batch, or one per image.
pub fn check_batch_image(field: &'static str, t: &Tensor, channels: usize, height: usize, width: usize, batch: usize) -> Result<()> {
    let dims = t.dims();
    let ok = dims.len() == 4 && (dims[0] == 1 || dims[0] == batch) && dims[1..] == [channels, height, width];
    if !ok {
        return Err(Error::invalid(
            field,
            format!("expected a [1, {channels}, {height}, {width}] tensor (height × width of the request; or one per batch image), got {dims:?}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn step_done_edits_then_reports_and_cancels() -> Result<()> {
        let x = Tensor::zeros((1, 4, 2, 2), DType::F32, &Device::Cpu)?;
        let mut seen = Vec::new();
        let mut progress = |s: &StepProgress<'_>| {
            seen.push(s.latents.sum_all().and_then(|v| v.to_scalar::<f32>()).unwrap_or(f32::NAN));
            if s.step == 2 { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
        };
        let mut edit = |s: &StepProgress<'_>| -> Result<Option<Tensor>> { Ok(Some((s.latents + 1.0)?)) };
        let mut ctx = RunContext::with_progress(&mut progress).edit(&mut edit);
        let info = StepProgress { step: 1, total: 2, timestep: 1.0, latents: &x, family: ModelFamily::Sd1 };
        let out = ctx.step_done(&info)?.map(|t| t.sum_all().and_then(|v| v.to_scalar::<f32>()));
        assert_eq!(out.transpose()?, Some(16.0));
        let info = StepProgress { step: 2, ..info };
        assert!(matches!(ctx.step_done(&info), Err(Error::Cancelled { step: 2, total: 2 })));
        assert_eq!(seen, vec![16.0, 16.0]);
        Ok(())
    }

    #[test]
    fn edits_of_another_shape_are_refused() -> Result<()> {
        let x = Tensor::zeros((1, 4, 2, 2), DType::F32, &Device::Cpu)?;
        let mut edit = |_: &StepProgress<'_>| -> Result<Option<Tensor>> { Ok(Some(Tensor::zeros(3, DType::F32, &Device::Cpu)?)) };
        let mut ctx = RunContext { edit: Some(&mut edit), ..RunContext::default() };
        let info = StepProgress { step: 1, total: 1, timestep: 1.0, latents: &x, family: ModelFamily::Flux };
        assert!(matches!(ctx.step_done(&info), Err(Error::InvalidRequest { field: "latents", .. })));
        Ok(())
    }

    #[test]
    fn noise_kinds_parse_and_name() {
        for k in [NoiseKind::Philox, NoiseKind::Torch] {
            assert_eq!(k.name().parse::<NoiseKind>().ok(), Some(k));
        }
        assert_eq!(" TORCH ".parse::<NoiseKind>().ok(), Some(NoiseKind::Torch));
        assert_eq!("".parse::<NoiseKind>().ok(), Some(NoiseKind::Philox));
        assert!(matches!("cuda".parse::<NoiseKind>(), Err(Error::InvalidRequest { field: "noise", .. })));
    }

    #[test]
    fn limits_name_their_field() {
        assert!(matches!(check_size(0, 8, 8, ""), Err(Error::InvalidRequest { field: "width", .. })));
        assert!(matches!(check_size(16, 12, 8, ""), Err(Error::InvalidRequest { field: "height", .. })));
        assert!(check_size(16, 16, 16, "").is_ok());
        assert!(matches!(check_counts(0, 1, 1.0), Err(Error::InvalidRequest { field: "steps", .. })));
        assert!(matches!(check_counts(1, 17, 1.0), Err(Error::InvalidRequest { field: "batch_size", .. })));
        assert!(matches!(check_counts(1, 1, f64::NAN), Err(Error::InvalidRequest { field: "guidance_scale", .. })));
        assert!(matches!(check_strength(f64::NAN), Err(Error::InvalidRequest { field: "strength", .. })));
    }
}
