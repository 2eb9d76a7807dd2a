#![warn(missing_docs)]
//! One entry to every model family of the workspace.
//!
//! The family crates (`sd-pipelines` for Stable Diffusion 1.x/2.x/XL, `sd-flux` for FLUX.1, `sd-sd3` for
//! SD 3.x, `sd-zimage` for Z-Image, `sd-flux2` for FLUX.2) never depend on each other; this crate is the one place that knows them all. It detects a model's
//! family from its files ([`detect`]), loads it ([`LoadedModel::load`]), says what it can do
//! ([`LoadedModel::capabilities`], sd-core's rule set), keeps the LoRAs merged into it and the
//! ControlNets attached to it between runs, and runs an sd-core [`Request`] + [`Task`] through the
//! family's one `generate` ([`LoadedModel::generate`]). A server or an app dispatches through it
//! and holds no model logic; a new family is one more arm here and nothing elsewhere.
//!
//! ```no_run
//! use sd_core::image_io::{save_png, tensor_to_images};
//! use sd_core::run::{RunContext, Task};
//! use sd_families::{Extras, LoadSpec, LoadedModel};
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     // A Stable Diffusion or FLUX folder or single file: the family is read from the files.
//!     let mut model = LoadedModel::load("models/sd-turbo".as_ref(), &LoadSpec::default())?;
//!     let mut request = model.capabilities().request("a red fox in the snow");
//!     request.seed = 42;
//!     let out = model.generate(&request, &Task::TextToImage, &mut RunContext::default(), &Extras::default())?;
//!     let text = model.infotext(&request, &request.prompt, "sd-turbo", &Extras::default(), &[]);
//!     save_png(&tensor_to_images(&out.images)?[0], "fox.png".as_ref(), Some(&text))?;
//!     Ok(())
//! }
//! ```

mod error;
mod flux;
mod flux2;
mod sd3;
mod stable_diffusion;
mod zimage;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::DynamicImage;
use sd_core::run::{RunContext, Task};

pub use error::{Error, Result};
pub use flux::FluxModel;
pub use flux2::Flux2Model;
pub use sd3::Sd3Model;
pub use zimage::ZImageModel;
pub use sd_core::family::{Capabilities, ModelFamily};
pub use sd_core::run::Request;
pub use sd_models::SdVariant;
pub use sd_pipelines::hires::{HiresFix, HiresUpscaler};
pub use stable_diffusion::StableDiffusionModel;

/// The crate that runs a model (finer than that, [`ModelFamily`] tells SD 1.x, 2.x and XL apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// Stable Diffusion 1.x / 2.x / XL and their inpainting and turbo variants (`sd-pipelines`).
    StableDiffusion,
    /// FLUX.1 dev / schnell, Kontext and Fill (`sd-flux`).
    Flux,
    /// Stable Diffusion 3 / 3.5 (`sd-sd3`).
    Sd3,
    /// Z-Image Turbo and base (`sd-zimage`).
    ZImage,
    /// FLUX.2 [klein] (`sd-flux2`).
    Flux2,
}

impl Family {
    /// Every family.
    pub const ALL: [Family; 5] = [Family::Flux, Family::Flux2, Family::Sd3, Family::ZImage, Family::StableDiffusion];

    /// A short lower-case name (`stable-diffusion`, `flux`, `sd3`, `z-image`, `flux2`).
    pub fn name(self) -> &'static str {
        match self {
            Family::StableDiffusion => "stable-diffusion",
            Family::Flux => "flux",
            Family::Sd3 => "sd3",
            Family::ZImage => "z-image",
            Family::Flux2 => "flux2",
        }
    }
}

/// The family of the model at `path` (a diffusers folder, a single checkpoint file or a transformer
/// file), read from its files: FLUX.1, FLUX.2, SD 3.x or Z-Image when a `model_index.json` / `config.json` names one of their
/// classes or the tensors are their transformer's, else Stable Diffusion (whose loader then says what is
/// wrong with a path that is none of them).
pub fn detect(path: &Path) -> Family {
    // Before FLUX.1: FLUX.2's class names start with "Flux" too, and its BFL files have double_blocks.* as well.
    if sd_flux2::detect::is_flux2(path) {
        Family::Flux2
    } else if sd_flux::detect::is_flux(path) {
        Family::Flux
    } else if sd_sd3::detect::is_sd3(path) {
        Family::Sd3
    } else if sd_zimage::detect::is_zimage(path) {
        Family::ZImage
    } else {
        Family::StableDiffusion
    }
}

/// How to load a model, for every family.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Stable Diffusion only: force a variant instead of detecting it (needed for the turbo variants).
    pub variant: Option<SdVariant>,
    /// Weight dtype; `None`: F32 on the CPU, the family's half type on GPUs.
    pub dtype: Option<DType>,
    /// Where the weights go.
    pub device: Device,
    /// For a single file: a diffusers folder of the same model that supplies what the file lacks (SD:
    /// component configs and tokenizers, as diffusers' `config=`; FLUX: the text encoders, VAE,
    /// tokenizers and scheduler beside a lone transformer). Ignored for folders.
    pub components: Option<PathBuf>,
    /// Stable Diffusion only: a VAE folder or file used instead of the model's own.
    pub vae: Option<PathBuf>,
    /// In diffusers folders, load `*.fp16.safetensors` when both variants are present.
    pub prefer_fp16_files: bool,
    /// Textual-inversion embeddings: files, or folders searched recursively for `.pt`, `.bin`, `.pth`
    /// and `.safetensors` files. Those that do not fit the model are skipped (see
    /// [`LoadedModel::embeddings`]), as A1111 skips them.
    pub embeddings: Vec<PathBuf>,
}

impl Default for LoadSpec {
    fn default() -> Self {
        Self { variant: None, dtype: None, device: Device::Cpu, components: None, vae: None, prefer_fp16_files: false, embeddings: Vec::new() }
    }
}

/// A textual-inversion embedding a loaded model can use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddingInfo {
    /// The name prompts use.
    pub name: String,
    /// Its file.
    pub path: PathBuf,
    /// Prompt positions it fills.
    pub vectors: usize,
    /// Width of its (first text encoder's) vectors.
    pub width: usize,
}

/// An embedding file that was not loaded, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedEmbedding {
    /// The name it would have had.
    pub name: String,
    /// Its file.
    pub path: PathBuf,
    /// Why it was skipped (another model's embedding, an unreadable file …).
    pub reason: String,
}

/// A file's stem, as the name prompts use.
pub(crate) fn file_stem(path: &Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Every embedding file of `dirs`, as skipped by a family (`name`) that takes none.
pub(crate) fn skipped_embeddings(dirs: &[PathBuf], name: &str) -> Vec<SkippedEmbedding> {
    embedding_files(dirs)
        .into_iter()
        .map(|path| SkippedEmbedding { name: file_stem(&path), path, reason: format!("{name} models take no textual-inversion embeddings here") })
        .collect()
}

/// Refuses the SD-only extras (ControlNet units, the hires fix) for the transformer family `name`.
pub(crate) fn refuse_sd_extras(extras: &Extras<'_>, name: &str) -> Result<()> {
    if !extras.controlnets.is_empty() {
        return Err(Error::Unsupported { field: "controlnets", reason: format!("{name} models here take no ControlNet; ControlNets steer SD 1.x/2.x/XL models") });
    }
    if extras.hires.is_some() {
        return Err(Error::Unsupported { field: "hires", reason: format!("{name} has no hires fix here; ask for the final size directly") });
    }
    Ok(())
}

/// The embedding files under `paths` (files as given; folders searched recursively, sorted).
pub fn embedding_files(paths: &[PathBuf]) -> Vec<PathBuf> {
    fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        let mut entries: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        entries.sort();
        for p in entries {
            if p.is_dir() && depth < 8 {
                walk(&p, depth + 1, out);
            } else if p.extension().is_some_and(|e| matches!(e.to_string_lossy().to_ascii_lowercase().as_str(), "pt" | "bin" | "pth" | "safetensors")) {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            walk(p, 0, &mut out);
        } else {
            out.push(p.clone());
        }
    }
    out
}

/// A LoRA to merge (errors about it name `loras[i]`, its index in [`Extras::loras`]).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraWeight {
    /// The adapter file.
    pub path: PathBuf,
    /// Scale of its delta (on the UNet / transformer).
    pub strength: f64,
    /// Scale on the text encoders when it differs (A1111's `<lora:name:te:unet>`; Stable Diffusion only:
    /// FLUX LoRAs here change only the transformer).
    pub text_encoder_strength: Option<f64>,
}

/// A ControlNet unit of a run (Stable Diffusion only).
#[derive(Debug, Clone, Copy)]
pub struct ControlNetUnit<'a> {
    /// A ControlNet diffusers folder or single `.safetensors` file.
    pub path: &'a Path,
    /// The control picture, already preprocessed (resized to the generation size here).
    pub image: &'a DynamicImage,
    /// Conditioning scale (`0..=2`).
    pub scale: f64,
    /// Fraction of the schedule where the unit starts acting.
    pub start: f64,
    /// Fraction of the schedule after which it stops.
    pub end: f64,
}

/// What a run adds to the model besides the request: adapters, control and a second pass.
#[derive(Debug, Clone, Copy, Default)]
pub struct Extras<'a> {
    /// LoRAs the weights must carry for this run (empty: the plain model); the set stays merged for
    /// the next run, so repeating it costs nothing.
    pub loras: &'a [LoraWeight],
    /// ControlNet units (refused by families without ControlNet support, naming `controlnets`).
    pub controlnets: &'a [ControlNetUnit<'a>],
    /// A1111's hires fix: txt2img at the request's size, then img2img at this one (refused by families
    /// without one, naming `hires`).
    pub hires: Option<&'a HiresFix>,
}

/// What a run returns, for every family.
#[derive(Debug, Clone)]
pub struct Generated {
    /// Decoded images `[batch, 3, h, w]` in [0, 1], F32 on the CPU.
    pub images: Tensor,
    /// The final latents, unscaled (the family's layout: `[batch, channels, h/f, w/f]`).
    pub latents: Tensor,
    /// The seed used.
    pub seed: u64,
}

fn info(e: &sd_models::embeddings::TextualInversion) -> EmbeddingInfo {
    EmbeddingInfo {
        name: e.name.clone(),
        path: e.path.clone(),
        vectors: e.len(),
        width: e.vectors.first().and_then(|v| v.dim(1).ok()).unwrap_or(0),
    }
}

/// A loaded model of any family, with the LoRAs merged into it and its ControlNet cache.
#[derive(Debug)]
pub enum LoadedModel {
    /// Stable Diffusion 1.x / 2.x / XL.
    StableDiffusion(Box<StableDiffusionModel>),
    /// FLUX.1.
    Flux(Box<FluxModel>),
    /// Stable Diffusion 3 / 3.5.
    Sd3(Box<Sd3Model>),
    /// Z-Image.
    ZImage(Box<ZImageModel>),
    /// FLUX.2 [klein].
    Flux2(Box<Flux2Model>),
}

impl LoadedModel {
    /// Detects the family of `path` and loads it; a scheduler config no sampler can honour fails here,
    /// not at every request later.
    pub fn load(path: &Path, spec: &LoadSpec) -> Result<Self> {
        Ok(match detect(path) {
            Family::StableDiffusion => Self::StableDiffusion(Box::new(StableDiffusionModel::load(path, spec)?)),
            Family::Flux => Self::Flux(Box::new(FluxModel::load(path, spec)?)),
            Family::Sd3 => Self::Sd3(Box::new(Sd3Model::load(path, spec)?)),
            Family::ZImage => Self::ZImage(Box::new(ZImageModel::load(path, spec)?)),
            Family::Flux2 => Self::Flux2(Box::new(Flux2Model::load(path, spec)?)),
        })
    }

    /// The crate that runs it.
    pub fn family(&self) -> Family {
        match self {
            Self::StableDiffusion(_) => Family::StableDiffusion,
            Self::Flux(_) => Family::Flux,
            Self::Sd3(_) => Family::Sd3,
            Self::ZImage(_) => Family::ZImage,
            Self::Flux2(_) => Family::Flux2,
        }
    }

    /// What it runs and how it reads a request (the rules `generate` applies; check requests with
    /// them before queueing).
    pub fn capabilities(&self) -> &Capabilities {
        match self {
            Self::StableDiffusion(m) => &m.caps,
            Self::Flux(m) => &m.caps,
            Self::Sd3(m) => &m.caps,
            Self::ZImage(m) => &m.caps,
            Self::Flux2(m) => &m.caps,
        }
    }

    /// The weights' dtype.
    pub fn dtype(&self) -> DType {
        match self {
            Self::StableDiffusion(m) => m.models.dtype,
            Self::Flux(m) => m.models.dtype,
            Self::Sd3(m) => m.models.dtype,
            Self::ZImage(m) => m.models.dtype,
            Self::Flux2(m) => m.dtype(),
        }
    }

    /// The device every component is on.
    pub fn device(&self) -> &Device {
        match self {
            Self::StableDiffusion(m) => &m.models.device,
            Self::Flux(m) => &m.models.device,
            Self::Sd3(m) => &m.models.device,
            Self::ZImage(m) => &m.models.device,
            Self::Flux2(m) => &m.models.device,
        }
    }

    /// The UNet's config, which a ControlNet must match (Stable Diffusion only).
    pub fn unet_config(&self) -> Option<&sd_models::UNetConfig> {
        match self {
            Self::StableDiffusion(m) => Some(m.models.unet.config()),
            Self::Flux(_) | Self::Sd3(_) | Self::ZImage(_) | Self::Flux2(_) => None,
        }
    }

    /// The textual-inversion embeddings prompts may name, and the files skipped at load.
    pub fn embeddings(&self) -> (Vec<EmbeddingInfo>, &[SkippedEmbedding]) {
        match self {
            Self::StableDiffusion(m) => (m.models.embeddings.iter().map(info).collect(), &m.skipped_embeddings),
            Self::Flux(m) => (Vec::new(), &m.skipped_embeddings),
            Self::Sd3(m) => (Vec::new(), &m.skipped_embeddings),
            Self::ZImage(m) => (Vec::new(), &m.skipped_embeddings),
            Self::Flux2(m) => (Vec::new(), &m.skipped_embeddings),
        }
    }

    /// Switches the VAE that decodes (A1111's `sd_vae`): a VAE file or diffusers `vae/` folder, or `None` for
    /// the one the model loaded with. FLUX takes no other VAE here.
    pub fn set_vae(&mut self, path: Option<&Path>) -> Result<()> {
        match (self, path) {
            (Self::StableDiffusion(m), path) => m.set_vae(path),
            (Self::Flux(_), None) => Ok(()),
            (Self::Flux(_), Some(_)) => Err(Error::Unsupported { field: "vae", reason: "FLUX.1 models here decode with the VAE they loaded with".into() }),
            (Self::Sd3(_) | Self::ZImage(_) | Self::Flux2(_), None) => Ok(()),
            (Self::Sd3(_) | Self::ZImage(_) | Self::Flux2(_), Some(_)) => Err(Error::Unsupported {
                field: "vae",
                reason: "SD 3.x, Z-Image and FLUX.2 models here decode with the VAE they loaded with".into(),
            }),
        }
    }

    /// Reads the textual-inversion embeddings of `dirs` afresh (A1111's `refresh-embeddings`): files added,
    /// changed or removed since the model loaded are picked up without reloading it.
    pub fn reload_embeddings(&mut self, dirs: &[PathBuf]) {
        match self {
            Self::StableDiffusion(m) => m.load_embeddings(dirs),
            Self::Flux(m) => m.load_embeddings(dirs),
            Self::Sd3(m) => m.load_embeddings(dirs),
            Self::ZImage(m) => m.load_embeddings(dirs),
            Self::Flux2(m) => m.load_embeddings(dirs),
        }
    }

    /// The embeddings `prompt` names (in order of first use, each once), for the infotext's `TI hashes`.
    pub fn embeddings_used(&self, prompt: &str) -> Vec<EmbeddingInfo> {
        match self {
            Self::StableDiffusion(m) => sd_pipelines::conditioning::embeddings_used(&m.models, prompt)
                .unwrap_or_default()
                .into_iter()
                .filter_map(|i| m.models.embeddings.get(i).map(info))
                .collect(),
            Self::Flux(_) | Self::Sd3(_) | Self::ZImage(_) | Self::Flux2(_) => Vec::new(),
        }
    }

    /// Makes the weights carry exactly `loras` (the same set as now costs nothing; a set that fails
    /// to apply leaves the model as it was).
    pub fn set_loras(&mut self, loras: &[LoraWeight]) -> Result<()> {
        match self {
            Self::StableDiffusion(m) => m.set_loras(loras),
            Self::Flux(m) => m.set_loras(loras),
            Self::Sd3(m) => m.set_loras(loras),
            Self::ZImage(m) => m.set_loras(loras),
            Self::Flux2(m) => m.set_loras(loras),
        }
    }

    /// Runs `task` for `request` with `extras`, through the family's `generate`: the request is
    /// validated there, against [`LoadedModel::capabilities`], with errors that name the field.
    pub fn generate(&mut self, request: &Request, task: &Task<'_>, run: &mut RunContext<'_>, extras: &Extras<'_>) -> Result<Generated> {
        match self {
            Self::StableDiffusion(m) => m.generate(request, task, run, extras),
            Self::Flux(m) => m.generate(request, task, run, extras),
            Self::Sd3(m) => m.generate(request, task, run, extras),
            Self::ZImage(m) => m.generate(request, task, run, extras),
            Self::Flux2(m) => m.generate(request, task, run, extras),
        }
    }

    /// Decodes latents as a run of `request` ends (a step's latents from the progress callback too: what
    /// an interrupted run shows).
    pub fn decode_latents(&self, latents: &Tensor, request: &Request) -> Result<Tensor> {
        match self {
            Self::StableDiffusion(m) => Ok(sd_pipelines::pipeline::decode_latents(&m.models, latents, request)?),
            Self::Flux(m) => Ok(sd_flux::pipeline::decode_latents(&m.models, latents, request.vae_tiling)?),
            Self::Sd3(m) => Ok(sd_sd3::pipeline::decode_latents(&m.models, latents, request)?),
            Self::ZImage(m) => Ok(sd_zimage::pipeline::decode_latents(&m.models, latents, request.vae_tiling)?),
            Self::Flux2(m) => Ok(sd_flux2::pipeline::decode_latents(&m.models, latents, request.vae_tiling)?),
        }
    }

    /// A1111's `parameters` text for a run of `request`: the family's own entries (sampler, CFG, hires
    /// fix, FLUX's distilled guidance …) and then `extra` (hashes and other entries the caller knows).
    /// `prompt` is the prompt as the user wrote it (with its `<lora:…>` tags).
    pub fn infotext(&self, request: &Request, prompt: &str, model_name: &str, extras: &Extras<'_>, extra: &[(&str, String)]) -> String {
        match self {
            Self::StableDiffusion(_) => stable_diffusion::infotext(request, prompt, model_name, extras, extra),
            Self::Flux(m) => m.infotext(request, prompt, model_name, extra),
            Self::Sd3(m) => m.infotext(request, prompt, model_name, extra),
            Self::ZImage(m) => m.infotext(request, prompt, model_name, extra),
            Self::Flux2(m) => m.infotext(request, prompt, model_name, extra),
        }
    }
}
