//! The model families the workspace knows, and what a loaded model of one can do.
//!
//! [`Capabilities`] is the description each family crate gives of a loaded model
//! (`sd_pipelines::pipeline::capabilities`, `sd_flux::pipeline::capabilities`): its tasks, which request
//! fields it reads, its defaults and limits. It is plain data (serialisable: a worker publishes it so a
//! front without the model can check requests), and [`Capabilities::validate`] /
//! [`Capabilities::check_task`] are the one set of request rules the families and the worker share.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::prompt::validate_prompt;
use crate::run::{check_counts, check_prompt_size, check_size, check_strength, Request, Task, TaskKind};
use crate::schedulers::{build_scheduler, flow_match, SchedulerConfig};

/// Architecture family: decides text conditioning, latent preview colours and key layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ModelFamily {
    /// SD 1.x: one OpenAI CLIP-L encoder, 768-wide context.
    Sd1,
    /// SD 2.x: one OpenCLIP-H encoder (penultimate layer), 1024-wide context.
    Sd2,
    /// SDXL: CLIP-L + OpenCLIP-bigG, pooled embeddings and size/crop time ids.
    Sdxl,
    /// FLUX.1 (dev/schnell): T5-XXL + CLIP-L, 16 latent channels, run by sd-flux.
    Flux,
    /// Stable Diffusion 3 / 3.5: MMDiT, CLIP-L + OpenCLIP-bigG + T5-XXL, 16 latent channels, run by sd-sd3.
    Sd3,
    /// Z-Image (Turbo and base): single-stream DiT, Qwen3 text encoder, FLUX.1's VAE, run by sd-zimage.
    ZImage,
    /// FLUX.2 [klein]: double/single-stream DiT, Qwen3 text encoder (layers 9, 18, 27), 32-channel VAE with
    /// 2×2-patchified, batch-norm-normalised latents, run by sd-flux2.
    Flux2,
}

/// How a family reads its prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptSyntax {
    /// A1111 syntax: `(word:1.3)` weights, `[word]`, `BREAK`, 75-token chunks (CLIP-conditioned SD).
    A1111,
    /// The text as written (T5 reads brackets as text).
    Literal,
}

/// How a family turns an img2img/inpaint strength into the steps it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StrengthRounding {
    /// diffusers' SD pipelines: `⌊steps · strength⌋` steps (inpainting at strength 1: all of them).
    Floor,
    /// The flow-matching pipelines: steps from `⌊steps − steps · strength⌋` on
    /// ([`flow_match::img2img_start`]).
    FlowMatch,
}

/// What a loaded model can do and how it reads a [`Request`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Capabilities {
    /// The family.
    pub family: ModelFamily,
    /// The variant's name (`sd15`, `sdxl-turbo`, `flux-dev` …).
    pub variant: String,
    /// The tasks it runs.
    pub tasks: Vec<TaskKind>,
    /// Whether it reads `negative_prompt`.
    pub negative_prompt: bool,
    /// Whether `sampler` (and its sigma schedule) can be chosen.
    pub sampler_choice: bool,
    /// Whether ControlNets can steer it.
    pub controlnet: bool,
    /// Whether LoRAs can be merged into it.
    pub lora: bool,
    /// Text-encoder layers `clip_skip` may skip back over (0: clip skip does not apply).
    pub clip_skip_layers: usize,
    /// How the prompt is read.
    pub prompt_syntax: PromptSyntax,
    /// A dedicated inpainting model (9-channel UNet: mask and masked image as extra input).
    pub inpaint_model: bool,
    /// Whether the family offers A1111's two-pass txt2img (hires fix).
    pub hires_fix: bool,
    /// Whether it offers skip-layer guidance ([`Request::skip_layer_guidance`]; SD 3.x).
    #[serde(default)]
    pub skip_layer_guidance: bool,
    /// Width and height must be multiples of this.
    pub size_multiple: usize,
    /// Default width in pixels.
    pub default_width: usize,
    /// Default height in pixels.
    pub default_height: usize,
    /// Default steps.
    pub default_steps: usize,
    /// Default guidance scale.
    pub default_guidance: f64,
    /// T5 sequence length: the default and the most accepted (`None`: no T5).
    pub sequence_length: Option<(usize, usize)>,
    /// How strength becomes steps.
    pub strength_rounding: StrengthRounding,
    /// The model's scheduler config, which sampler and step choices are checked against (`None` when
    /// the sampler cannot be chosen).
    pub scheduler: Option<SchedulerConfig>,
}

impl Capabilities {
    /// A request with this model's defaults (size, steps, guidance) and the given prompt.
    pub fn request(&self, prompt: impl Into<String>) -> Request {
        Request::new(prompt, self.default_width, self.default_height, self.default_steps, self.default_guidance)
    }

    /// Whether the model runs `task`.
    pub fn runs(&self, task: TaskKind) -> bool {
        self.tasks.contains(&task)
    }

    /// The request fields set to something this model will not use (named as in [`Request`]), so a
    /// front end can say so instead of silently dropping them.
    pub fn ignored(&self, r: &Request) -> Vec<&'static str> {
        let mut out = Vec::new();
        if !self.negative_prompt && !r.negative_prompt.trim().is_empty() {
            out.push("negative_prompt");
        }
        if !self.sampler_choice && r.sampler != crate::schedulers::SamplerKind::Euler.into() {
            out.push("sampler");
        }
        if self.clip_skip_layers == 0 && r.clip_skip > 1 {
            out.push("clip_skip");
        }
        if self.sequence_length.is_none() && r.max_sequence_length.is_some() {
            out.push("max_sequence_length");
        }
        out
    }

    /// The T5 sequence length a request uses (`None`: the model has no T5).
    pub fn sequence_length(&self, r: &Request) -> Option<usize> {
        self.sequence_length.map(|(default, _)| r.max_sequence_length.unwrap_or(default))
    }

    /// Checks a request against every rule of this model before anything is allocated: size (and its
    /// multiple), steps, batch, guidance, clip skip, the prompts (A1111 syntax where it is read), the T5
    /// length and the sampler's own limits. Fields the model does not read are not checked beyond size.
    pub fn validate(&self, r: &Request) -> Result<()> {
        let why = if self.size_multiple > 8 { " (2 × the VAE scale factor, for the 2×2 latent patches)" } else { "" };
        check_size(r.width, r.height, self.size_multiple, why)?;
        check_counts(r.steps, r.batch_size, r.guidance_scale)?;
        crate::run::check_variation(r.variation)?;
        if let Some(slg) = &r.skip_layer_guidance {
            if !self.skip_layer_guidance {
                return Err(Error::invalid(
                    "skip_layer_guidance",
                    format!("{} models have no skip-layer guidance; SD 3.x (sd3) models offer it (SD 3.5 Medium: layers 7, 8, 9)", self.variant),
                ));
            }
            slg.check()?;
            // Its extra call is a third branch of classifier-free guidance: without CFG there is nothing to add it to.
            if r.guidance_scale <= 1.0 {
                return Err(Error::invalid(
                    "skip_layer_guidance",
                    format!("skip-layer guidance works inside classifier-free guidance; guidance_scale {} runs none (use > 1)", r.guidance_scale),
                ));
            }
        }
        if self.clip_skip_layers > 0 && r.clip_skip > self.clip_skip_layers {
            return Err(Error::invalid("clip_skip", format!("{} exceeds the text encoder's {} layers", r.clip_skip, self.clip_skip_layers)));
        }
        match self.prompt_syntax {
            PromptSyntax::A1111 => {
                validate_prompt("prompt", &r.prompt)?;
                crate::prompt_schedule::check_and_parts("prompt", &r.prompt)?;
                validate_prompt("negative_prompt", &r.negative_prompt)?;
            }
            PromptSyntax::Literal => {
                check_prompt_size("prompt", &r.prompt)?;
                check_prompt_size("negative_prompt", &r.negative_prompt)?;
            }
        }
        if let Some((_, max)) = self.sequence_length {
            let len = self.sequence_length(r).unwrap_or(max);
            if len == 0 || len > max {
                return Err(Error::invalid("max_sequence_length", format!("{len} is outside 1..={max}")));
            }
        }
        if let (true, Some(cfg)) = (self.sampler_choice, &self.scheduler) {
            // The sampler's own limits (LCM runs at most its original 50 steps, …).
            build_scheduler(r.sampler, cfg, r.steps)?;
        }
        Ok(())
    }

    /// The denoising steps a `task_kind` run at `strength` takes with `steps` steps.
    pub fn steps_run(&self, task_kind: TaskKind, steps: usize, strength: f64) -> usize {
        match (task_kind, self.strength_rounding) {
            (TaskKind::TextToImage | TaskKind::Edit, _) => steps,
            (TaskKind::Inpaint, StrengthRounding::Floor) if strength >= 1.0 => steps,
            (_, StrengthRounding::Floor) => crate::schedulers::img2img_steps(steps, strength),
            (_, StrengthRounding::FlowMatch) => steps - flow_match::img2img_start(steps, strength).min(steps),
        }
    }

    /// Checks that the model runs a task of this kind at this strength: the task is supported, the
    /// strength lies in [0, 1] and leaves at least one step.
    pub fn check_task_kind(&self, kind: TaskKind, strength: Option<f64>, steps: usize) -> Result<()> {
        if !self.runs(kind) {
            let runs: Vec<&str> = self.tasks.iter().map(|t| t.name()).collect();
            return Err(Error::invalid("task", format!("{} models do not run {}; they run {}", self.variant, kind.name(), runs.join(", "))));
        }
        if let Some(s) = strength {
            check_strength(s)?;
            if self.steps_run(kind, steps, s) == 0 {
                return Err(Error::invalid(
                    "strength",
                    format!("{s} with {steps} steps leaves no step to run (no denoising step); raise the strength or the steps (0 would return the input unchanged)"),
                ));
            }
        }
        Ok(())
    }

    /// [`Self::validate`] plus [`Self::check_task_kind`] and the task's input tensors (`[1, 3, h, w]`
    /// image, `[1, 1, h, w]` mask at the request's size).
    pub fn check(&self, r: &Request, task: &Task<'_>) -> Result<()> {
        self.validate(r)?;
        self.check_task_kind(task.kind(), task.strength(), r.steps)?;
        match task {
            Task::ImageToImage(t) => crate::run::check_batch_image("image", t.image, 3, r.height, r.width, r.batch_size)?,
            Task::Inpaint(t) => {
                crate::run::check_image("image", t.image, 3, r.height, r.width)?;
                crate::run::check_image("mask", t.mask, 1, r.height, r.width)?;
            }
            Task::Edit(t) => {
                if t.images.is_empty() {
                    return Err(Error::invalid("images", "an edit needs at least one reference image"));
                }
                for img in t.images {
                    let dims = img.dims();
                    if dims.len() != 4 || dims[0] != 1 || dims[1] != 3 {
                        return Err(Error::invalid("images", format!("a reference image is [1, 3, h, w]; got {dims:?}")));
                    }
                    crate::run::check_size(dims[3], dims[2], self.size_multiple, " (the model's size multiple)")
                        .map_err(|e| Error::invalid("images", format!("a reference image's size: {e}")))?;
                }
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flux() -> Capabilities {
        Capabilities {
            family: ModelFamily::Flux,
            variant: "flux-dev".into(),
            tasks: vec![TaskKind::TextToImage, TaskKind::ImageToImage, TaskKind::Inpaint],
            negative_prompt: false,
            sampler_choice: false,
            controlnet: false,
            lora: true,
            clip_skip_layers: 0,
            prompt_syntax: PromptSyntax::Literal,
            inpaint_model: false,
            hires_fix: false,
            skip_layer_guidance: false,
            size_multiple: 16,
            default_width: 1024,
            default_height: 1024,
            default_steps: 28,
            default_guidance: 3.5,
            sequence_length: Some((512, 512)),
            strength_rounding: StrengthRounding::FlowMatch,
            scheduler: None,
        }
    }

    fn sd() -> Capabilities {
        Capabilities {
            family: ModelFamily::Sd1,
            variant: "sd15".into(),
            tasks: vec![TaskKind::TextToImage, TaskKind::ImageToImage],
            negative_prompt: true,
            sampler_choice: true,
            controlnet: true,
            clip_skip_layers: 12,
            prompt_syntax: PromptSyntax::A1111,
            hires_fix: true,
            skip_layer_guidance: false,
            size_multiple: 8,
            default_width: 512,
            default_height: 512,
            default_steps: 30,
            default_guidance: 7.5,
            sequence_length: None,
            strength_rounding: StrengthRounding::Floor,
            scheduler: Some(SchedulerConfig::sd15()),
            ..flux()
        }
    }

    fn field(r: Result<()>) -> Option<&'static str> {
        r.err().and_then(|e| e.field())
    }

    #[test]
    fn one_rule_set_names_the_field() {
        let (f, s) = (flux(), sd());
        let mut r = f.request("a cat");
        assert_eq!((r.width, r.steps, r.guidance_scale), (1024, 28, 3.5));
        assert!(f.validate(&r).is_ok());
        r.width = 1000;
        assert_eq!(field(f.validate(&r)), Some("width"));
        assert!(s.validate(&r).is_ok(), "1000 is a multiple of 8");
        r.width = 512;
        r.max_sequence_length = Some(513);
        assert_eq!(field(f.validate(&r)), Some("max_sequence_length"));
        r.max_sequence_length = None;
        r.clip_skip = 13;
        assert_eq!(field(s.validate(&r)), Some("clip_skip"));
        assert!(f.validate(&r).is_ok(), "FLUX has no clip skip to bound");
        r.clip_skip = 1;
        r.prompt = "(unclosed:1e39)".into();
        assert_eq!(field(s.validate(&r)), Some("prompt"));
        assert!(f.validate(&r).is_ok(), "T5 reads brackets as text");
        r.prompt = "a cat".into();
        r.sampler = "LCM".parse().expect("lcm");
        r.steps = 60;
        assert_eq!(field(s.validate(&r)), Some("steps"), "LCM runs at most 50 steps");
    }

    #[test]
    fn skip_layer_guidance_is_refused_without_it_and_checked_with_it() {
        use crate::run::SkipLayerGuidance;
        let s = sd();
        let sd3 = Capabilities { family: ModelFamily::Sd3, variant: "sd3.5-medium".into(), skip_layer_guidance: true, ..flux() };
        let mut r = sd3.request("a cat");
        r.skip_layer_guidance = Some(SkipLayerGuidance::new(vec![7, 8, 9]));
        assert!(sd3.validate(&r).is_ok());
        let err = s.validate(&r).expect_err("SD 1.5 has no SLG");
        assert_eq!(err.field(), Some("skip_layer_guidance"));
        assert!(err.to_string().contains("SD 3.x"), "{err}");
        for bad in [
            SkipLayerGuidance::new(vec![]),
            SkipLayerGuidance { start: 0.5, stop: 0.2, ..SkipLayerGuidance::new(vec![1]) },
            SkipLayerGuidance { scale: f64::NAN, ..SkipLayerGuidance::new(vec![1]) },
            SkipLayerGuidance { scale: -1.0, ..SkipLayerGuidance::new(vec![1]) },
            SkipLayerGuidance { stop: 1.5, ..SkipLayerGuidance::new(vec![1]) },
        ] {
            r.skip_layer_guidance = Some(bad.clone());
            assert_eq!(field(sd3.validate(&r)), Some("skip_layer_guidance"), "{bad:?}");
        }
        assert_eq!(SkipLayerGuidance::new(vec![7, 8, 9]).summary(), "7,8,9 x2.8 (0.01-0.2)");
    }

    #[test]
    fn ignored_fields_and_tasks() {
        let (f, s) = (flux(), sd());
        let mut r = f.request("a cat");
        r.negative_prompt = "blurry".into();
        r.sampler = "DPM++ 2M".parse().expect("sampler");
        r.clip_skip = 2;
        assert_eq!(f.ignored(&r), vec!["negative_prompt", "sampler", "clip_skip"]);
        assert!(s.ignored(&r).is_empty());
        assert_eq!(field(s.check_task_kind(TaskKind::Inpaint, Some(1.0), 4)), Some("task"));
        assert!(f.check_task_kind(TaskKind::Inpaint, Some(1.0), 4).is_ok());
        // 0.1 × 4 steps: SD floors to 0 steps, flow matching still runs one.
        assert_eq!(field(s.check_task_kind(TaskKind::ImageToImage, Some(0.1), 4)), Some("strength"));
        assert_eq!(f.steps_run(TaskKind::ImageToImage, 4, 0.1), 1);
        assert_eq!(field(f.check_task_kind(TaskKind::ImageToImage, Some(0.0), 4)), Some("strength"));
        assert_eq!(field(f.check_task_kind(TaskKind::ImageToImage, Some(f64::NAN), 4)), Some("strength"));
    }
}
