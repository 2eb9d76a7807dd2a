//! Loading every FLUX component into one [`FluxModels`].

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use sd_models::clip::ClipTextModel;
use sd_models::t5::T5Encoder;
use sd_models::tokenizer::ClipTokenizer;
use sd_models::vae::AutoencoderKL;
use sd_models::VaeConfig;
use tokenizers::Tokenizer;

use crate::config::FluxVariant;
use crate::error::{Error, Result};
use sd_core::schedulers::flow_match::FlowMatchConfig;
use crate::text::{load_clip, load_clip_tokenizer, load_t5, load_t5_tokenizer};
use crate::lora::FluxLora;
use crate::transformer::{load_transformer_with_loras, FluxTransformer};
use sd_lora::AdapterReport;
use crate::vae::load_vae;

/// How to load.
#[derive(Debug, Clone)]
pub struct FluxLoadOptions {
    /// Weight dtype; `None` means F32 on the CPU and BF16 on GPUs (FLUX was trained in BF16).
    pub dtype: Option<DType>,
    /// Where the weights go.
    pub device: Device,
    /// Rotary split of the attention heads when it is not FLUX.1's 16/56/56 and no
    /// `transformer/config.json` says it (tiny or custom models).
    pub axes_dim: Option<Vec<usize>>,
    /// VAE config for a lone `ae.safetensors` that is not FLUX.1's (folders carry their own).
    pub vae_config: Option<VaeConfig>,
    /// Scheduler settings; `None` reads `scheduler/scheduler_config.json` or uses the variant's.
    pub scheduler: Option<FlowMatchConfig>,
    /// LoRAs merged into the transformer while it loads (dense weights only).
    pub loras: Vec<FluxLora>,
}

impl Default for FluxLoadOptions {
    fn default() -> Self {
        Self { dtype: None, device: Device::Cpu, axes_dim: None, vae_config: None, scheduler: None, loras: Vec::new() }
    }
}

impl FluxLoadOptions {
    /// The dtype the weights will be loaded as.
    pub fn resolved_dtype(&self) -> Result<DType> {
        let dtype = self.dtype.unwrap_or(if self.device.is_cpu() { DType::F32 } else { DType::BF16 });
        match dtype {
            DType::F32 | DType::F16 | DType::BF16 => Ok(dtype),
            other => Err(Error::UnsupportedDtype { dtype: other, reason: "use F32, F16 or BF16".into() }),
        }
    }
}

/// Where each component comes from when they are not one diffusers folder: typically BFL's
/// `flux1-dev.safetensors` (or a GGUF) and `ae.safetensors`, with the text encoders from a
/// diffusers repo.
#[derive(Debug, Clone)]
pub struct FluxFiles {
    /// Transformer: BFL `.safetensors`, `.gguf`, or a diffusers `transformer/` folder.
    pub transformer: PathBuf,
    /// VAE: `ae.safetensors` or a diffusers `vae/` folder.
    pub vae: PathBuf,
    /// T5 encoder folder (`text_encoder_2/`).
    pub t5: PathBuf,
    /// T5 tokenizer: `tokenizer_2/` folder or its `tokenizer.json`.
    pub t5_tokenizer: PathBuf,
    /// CLIP-L text encoder folder (`text_encoder/`).
    pub clip: PathBuf,
    /// CLIP tokenizer folder (`tokenizer/`); `None` uses sd-models' bundled CLIP vocabulary.
    pub clip_tokenizer: Option<PathBuf>,
    /// `scheduler_config.json`, if any.
    pub scheduler_config: Option<PathBuf>,
    /// A diffusers `transformer/` folder whose `config.json` gives the rotary split
    /// (`axes_dims_rope`) of a transformer file, which its weights cannot show; `None`: FLUX.1's.
    pub transformer_config: Option<PathBuf>,
}

impl FluxFiles {
    /// A transformer file (and optionally an autoencoder file) with every other component taken
    /// from the diffusers folder `repo` (e.g. a download of FLUX.1-schnell without its transformer).
    pub fn with_components_from(transformer: impl Into<PathBuf>, vae: Option<PathBuf>, repo: &Path) -> Self {
        let sched = repo.join("scheduler").join("scheduler_config.json");
        Self {
            transformer: transformer.into(),
            vae: vae.unwrap_or_else(|| {
                // A BFL download keeps `ae.safetensors` beside the transformer instead of `vae/`.
                let ae = repo.join("ae.safetensors");
                if !repo.join("vae").is_dir() && ae.is_file() {
                    ae
                } else {
                    repo.join("vae")
                }
            }),
            t5: repo.join("text_encoder_2"),
            t5_tokenizer: repo.join("tokenizer_2"),
            clip: repo.join("text_encoder"),
            clip_tokenizer: Some(repo.join("tokenizer")),
            scheduler_config: sched.is_file().then_some(sched),
            transformer_config: repo.join("transformer").join("config.json").is_file().then(|| repo.join("transformer")),
        }
    }
}

/// What to load: a diffusers folder, or components from separate paths.
#[derive(Debug, Clone)]
pub enum FluxSource {
    /// A diffusers FLUX pipeline folder (`model_index.json`, `transformer/`, `vae/`, `text_encoder*/`, `tokenizer*/`).
    Folder(PathBuf),
    /// Separate component paths.
    Files(FluxFiles),
}

/// Every component of a loaded FLUX model.
pub struct FluxModels {
    /// Dev or schnell, from the transformer's weights.
    pub variant: FluxVariant,
    /// The denoising transformer.
    pub transformer: FluxTransformer,
    /// The 16-channel autoencoder.
    pub vae: AutoencoderKL,
    /// T5-XXL encoder (token embeddings).
    pub t5: T5Encoder,
    /// T5 tokenizer.
    pub t5_tokenizer: Tokenizer,
    /// CLIP-L text encoder (pooled output).
    pub clip: ClipTextModel,
    /// CLIP tokenizer.
    pub clip_tokenizer: ClipTokenizer,
    /// Flow-matching schedule settings.
    pub scheduler: FlowMatchConfig,
    /// dtype of the transformer's activations and the text embeddings.
    pub dtype: DType,
    /// Device of every component.
    pub device: Device,
    /// What each LoRA of [`FluxLoadOptions::loras`] merged (and left unmatched).
    pub lora_report: Vec<AdapterReport>,
    /// A FLUX.1 Kontext model (the [dev] architecture trained to edit after a reference image): its
    /// folder's `model_index.json` names `FluxKontextPipeline`, or its transformer's file or folder name
    /// says "kontext" (BFL and ComfyUI files are named so; the weights alone cannot tell).
    pub kontext: bool,
    /// A FLUX.1 Fill model: its transformer's input also takes the masked image's latents and the mask (384
    /// channels per token where the others take 64), read off the weights.
    pub fill: bool,
}

impl std::fmt::Debug for FluxModels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FluxModels")
            .field("variant", &self.variant)
            .field("quantized", &self.transformer.is_quantized())
            .field("dtype", &self.dtype)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

// Loaded models are handed to engine threads; keep that a compile-time guarantee.
const _: fn() = || {
    fn assert<T: Send + Sync>() {}
    assert::<FluxModels>();
};

impl FluxModels {
    /// Image pixels per latent pixel (8 for FLUX.1).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.scale_factor()
    }
}

/// Loads from a diffusers folder, or from a single transformer file (BFL `.safetensors` or `.gguf`)
/// whose parent folder holds the other components in diffusers layout.
pub fn load(path: &Path, opts: &FluxLoadOptions) -> Result<FluxModels> {
    if path.is_dir() {
        return load_source(&FluxSource::Folder(path.to_path_buf()), opts);
    }
    let repo = path.parent().unwrap_or(Path::new("."));
    load_source(&FluxSource::Files(FluxFiles::with_components_from(path, None, repo)), opts)
}

/// Loads every component from `source`.
pub fn load_source(source: &FluxSource, opts: &FluxLoadOptions) -> Result<FluxModels> {
    let files = match source {
        FluxSource::Folder(dir) => folder_files(dir)?,
        FluxSource::Files(f) => f.clone(),
    };
    let dtype = opts.resolved_dtype()?;
    let device = &opts.device;
    // The transformer first: it tells an SD checkpoint or a foreign file apart before anything heavy.
    let axes_dim = match (&opts.axes_dim, &files.transformer_config) {
        (Some(a), _) => Some(a.clone()),
        (None, Some(dir)) => crate::transformer::folder_axes(dir)?,
        (None, None) => None,
    };
    let (transformer, lora_report) = load_transformer_with_loras(&files.transformer, dtype, device, axes_dim.as_deref(), &opts.loras)?;
    let variant = transformer.variant();
    let t5_tokenizer = load_t5_tokenizer(&files.t5_tokenizer)?;
    let t5 = load_t5(&files.t5, dtype, device)?;
    let clip = load_clip(&files.clip, dtype, device)?;
    let clip_tokenizer = match &files.clip_tokenizer {
        Some(dir) => load_clip_tokenizer(dir)?,
        None => ClipTokenizer::bundled(sd_models::tokenizer::PadToken::EndOfText)?,
    };
    let vae = load_vae(&files.vae, dtype, device, opts.vae_config.as_ref())?;
    let scheduler = match (&opts.scheduler, &files.scheduler_config) {
        (Some(s), _) => {
            s.check().map_err(|reason| Error::InvalidConfig { path: "FluxLoadOptions::scheduler".into(), reason })?;
            s.clone()
        }
        (None, Some(p)) => FlowMatchConfig::from_file(p)?,
        (None, None) => variant.scheduler_config(),
    };
    let dtype = transformer.dtype();
    let kontext = variant == FluxVariant::Dev && is_kontext(source, &files.transformer);
    let fill = transformer.config().in_channels > 4 * vae.config().latent_channels;
    Ok(FluxModels {
        variant,
        transformer,
        vae,
        t5,
        t5_tokenizer,
        clip,
        clip_tokenizer,
        scheduler,
        dtype,
        device: device.clone(),
        lora_report,
        kontext,
        fill,
    })
}

/// Whether the model is FLUX.1 Kontext (see [`FluxModels::kontext`]).
fn is_kontext(source: &FluxSource, transformer: &Path) -> bool {
    if let FluxSource::Folder(dir) = source {
        let class = std::fs::read_to_string(dir.join("model_index.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v.get("_class_name").and_then(|c| c.as_str()).map(str::to_string));
        if let Some(class) = class {
            return class == "FluxKontextPipeline";
        }
    }
    let named = |p: &Path| p.file_name().is_some_and(|n| n.to_string_lossy().to_ascii_lowercase().contains("kontext"));
    named(transformer) || (transformer.file_name().is_some_and(|n| n == "transformer") && transformer.parent().is_some_and(named))
}

/// The component paths of a diffusers FLUX folder, checking that it is one.
fn folder_files(dir: &Path) -> Result<FluxFiles> {
    if dir.join("unet").is_dir() {
        return Err(Error::NotFlux {
            path: dir.to_path_buf(),
            reason: "this is a Stable Diffusion folder (unet/); load it with sd-models (sd_models::loader::load)".into(),
        });
    }
    let transformer = dir.join("transformer");
    if !transformer.is_dir() {
        return Err(Error::NotFound {
            what: "transformer/ folder".into(),
            path: transformer,
            hint: "a diffusers FLUX folder has transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/ and tokenizer_2/".into(),
        });
    }
    Ok(FluxFiles::with_components_from(transformer, None, dir))
}

/// Loads a diffusers-format FLUX repo (e.g. `black-forest-labs/FLUX.1-schnell`) from the Hugging Face
/// hub, downloading only the pipeline's files into the hub cache (or, offline, reading them from there).
#[cfg(feature = "hub")]
pub fn load_from_hub(model: &sd_models::hub::HubModel, hub: &sd_models::hub::HubOptions, opts: &FluxLoadOptions) -> Result<FluxModels> {
    let path = sd_models::hub::download(model, hub)?;
    load(&path, opts)
}
