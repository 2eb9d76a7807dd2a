//! Loading every Z-Image component into one [`ZImageModels`].

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use sd_core::schedulers::flow_match::FlowMatchConfig;
use sd_models::vae::AutoencoderKL;
use sd_models::VaeConfig;
use tokenizers::Tokenizer;

use crate::config::ZImageConfig;
use crate::error::{Error, Result};
use crate::model::ZImageModel;
use crate::text::{load_text_encoder, load_tokenizer, Qwen3Encoder};
use crate::lora::ZImageLora;
use crate::transformer::load_transformer_with_loras;
use sd_lora::AdapterReport;
use crate::vae::load_vae;

/// Which Z-Image model: the weights are the same architecture, only the defaults differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ZImageVariant {
    /// Z-Image-Turbo: distilled, guidance-free, 9 steps (the model card's settings).
    Turbo,
    /// Z-Image (base): classifier-free guidance with a negative prompt (diffusers' defaults: 50 steps, 5.0).
    Base,
}

impl ZImageVariant {
    /// `turbo` or `base`.
    pub fn name(self) -> &'static str {
        match self {
            ZImageVariant::Turbo => "turbo",
            ZImageVariant::Base => "base",
        }
    }

    /// Default steps (Turbo's model card: 9; `ZImagePipeline`'s default: 50).
    pub fn default_steps(self) -> usize {
        match self {
            ZImageVariant::Turbo => 9,
            ZImageVariant::Base => 50,
        }
    }

    /// Default guidance (Turbo: 0, no CFG; `ZImagePipeline`'s default: 5.0).
    pub fn default_guidance(self) -> f64 {
        match self {
            ZImageVariant::Turbo => 0.0,
            ZImageVariant::Base => 5.0,
        }
    }

    /// The variant a path names: `turbo` anywhere in it means Turbo, otherwise `z-image`/`z_image`/`zimage`
    /// means the base model; anything else is taken for Turbo, the published default.
    pub fn from_path(path: &Path) -> Self {
        let s = path.to_string_lossy().to_ascii_lowercase();
        if s.contains("turbo") {
            ZImageVariant::Turbo
        } else if s.contains("z-image") || s.contains("z_image") || s.contains("zimage") {
            ZImageVariant::Base
        } else {
            ZImageVariant::Turbo
        }
    }
}

/// Z-Image-Turbo's `scheduler_config.json` (static shift 3, no dynamic shifting), for files without one.
pub fn default_scheduler() -> FlowMatchConfig {
    FlowMatchConfig { shift: 3.0, use_dynamic_shifting: false, ..FlowMatchConfig::dev() }
}

/// How to load.
#[derive(Debug, Clone)]
pub struct ZImageLoadOptions {
    /// Weight dtype; `None` means F32 on the CPU and BF16 on GPUs (Z-Image ships in BF16).
    pub dtype: Option<DType>,
    /// Where the weights go.
    pub device: Device,
    /// Turbo or base; `None` reads it off the path (see [`ZImageVariant::from_path`]).
    pub variant: Option<ZImageVariant>,
    /// Transformer architecture for a single file that is not the published size (folders carry their own).
    pub transformer_config: Option<ZImageConfig>,
    /// VAE config for a lone `ae.safetensors` that is not the published one (folders carry their own).
    pub vae_config: Option<VaeConfig>,
    /// Scheduler settings; `None` reads `scheduler/scheduler_config.json` or uses Turbo's.
    pub scheduler: Option<FlowMatchConfig>,
    /// LoRAs merged into the transformer while it loads.
    pub loras: Vec<ZImageLora>,
}

impl Default for ZImageLoadOptions {
    fn default() -> Self {
        Self { dtype: None, device: Device::Cpu, variant: None, transformer_config: None, vae_config: None, scheduler: None, loras: Vec::new() }
    }
}

impl ZImageLoadOptions {
    /// The dtype the weights will be loaded as.
    pub fn resolved_dtype(&self) -> Result<DType> {
        let dtype = self.dtype.unwrap_or(if self.device.is_cpu() { DType::F32 } else { DType::BF16 });
        crate::transformer::check_dtype(dtype)?;
        Ok(dtype)
    }
}

/// Where each component comes from.
#[derive(Debug, Clone)]
pub struct ZImageFiles {
    /// Transformer: a diffusers `transformer/` folder or a `.safetensors` file (either layout).
    pub transformer: PathBuf,
    /// VAE: a diffusers `vae/` folder or `ae.safetensors`.
    pub vae: PathBuf,
    /// Qwen3 text encoder: a `text_encoder/` folder or a stand-alone file (ComfyUI's `qwen_3_4b.safetensors`).
    pub text_encoder: PathBuf,
    /// Tokenizer folder (`tokenizer/`) or its `tokenizer.json`.
    pub tokenizer: PathBuf,
    /// `scheduler_config.json`, if any.
    pub scheduler_config: Option<PathBuf>,
}

impl ZImageFiles {
    /// A transformer (and optionally an autoencoder) with every other component from the diffusers folder `repo`;
    /// for a transformer file, a stand-alone Qwen3 file (`qwen*.safetensors`) beside it or in ComfyUI's sibling
    /// `text_encoders/` folder is the text encoder.
    pub fn with_components_from(transformer: impl Into<PathBuf>, vae: Option<PathBuf>, repo: &Path) -> Self {
        let transformer: PathBuf = transformer.into();
        let sched = repo.join("scheduler").join("scheduler_config.json");
        let qwen_file = transformer
            .is_file()
            .then(|| sd_models::split::find_sibling(&sd_models::split::sibling_dirs(&transformer).0, &transformer, &|s| s.starts_with("qwen")))
            .flatten();
        Self {
            transformer,
            vae: vae.unwrap_or_else(|| repo.join("vae")),
            text_encoder: qwen_file.unwrap_or_else(|| repo.join("text_encoder")),
            tokenizer: repo.join("tokenizer"),
            scheduler_config: sched.is_file().then_some(sched),
        }
    }
}

/// Every component of a loaded Z-Image model.
pub struct ZImageModels {
    /// Turbo or base (defaults only).
    pub variant: ZImageVariant,
    /// The denoising transformer.
    pub transformer: ZImageModel,
    /// The Qwen3 text encoder (all but its last layer).
    pub text_encoder: Qwen3Encoder,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// The 16-channel autoencoder.
    pub vae: AutoencoderKL,
    /// Flow-matching schedule settings.
    pub scheduler: FlowMatchConfig,
    /// dtype of the transformer and text encoder.
    pub dtype: DType,
    /// Device of every component.
    pub device: Device,
    /// What each LoRA of [`ZImageLoadOptions::loras`] merged (and left unmatched).
    pub lora_report: Vec<AdapterReport>,
}

impl std::fmt::Debug for ZImageModels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZImageModels")
            .field("variant", &self.variant)
            .field("dtype", &self.dtype)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

// Loaded models are handed to engine threads; keep that a compile-time guarantee.
const _: fn() = || {
    fn assert<T: Send + Sync>() {}
    assert::<ZImageModels>();
};

impl ZImageModels {
    /// Image pixels per latent pixel (8 for Z-Image).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.scale_factor()
    }
}

/// Loads from a diffusers `ZImagePipeline` folder, or from a transformer `.safetensors` file whose folder
/// holds the other components in diffusers layout (`vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`).
pub fn load(path: &Path, opts: &ZImageLoadOptions) -> Result<ZImageModels> {
    let (files, variant_path) = if path.is_dir() {
        if path.join("unet").is_dir() {
            return Err(Error::NotZImage {
                path: path.to_path_buf(),
                reason: "this is a Stable Diffusion folder (unet/); load it with sd-models (sd_models::loader::load)".into(),
            });
        }
        let transformer = path.join("transformer");
        if !transformer.is_dir() {
            return Err(Error::NotFound {
                what: "transformer/ folder".into(),
                path: transformer,
                hint: "a diffusers Z-Image folder has transformer/, vae/, text_encoder/, tokenizer/ and scheduler/".into(),
            });
        }
        (ZImageFiles::with_components_from(transformer, None, path), path.to_path_buf())
    } else {
        let repo = path.parent().unwrap_or(Path::new("."));
        (ZImageFiles::with_components_from(path, None, repo), path.to_path_buf())
    };
    let variant = opts.variant.unwrap_or_else(|| ZImageVariant::from_path(&variant_path));
    load_files(&files, variant, opts)
}

/// Loads every component from `files`.
pub fn load_files(files: &ZImageFiles, variant: ZImageVariant, opts: &ZImageLoadOptions) -> Result<ZImageModels> {
    let dtype = opts.resolved_dtype()?;
    let device = &opts.device;
    // The transformer first: it tells a foreign file apart before anything heavy.
    let (transformer, lora_report) = load_transformer_with_loras(&files.transformer, dtype, device, opts.transformer_config.as_ref(), &opts.loras)?;
    let tokenizer = load_tokenizer(&files.tokenizer)?;
    let text_encoder = load_text_encoder(&files.text_encoder, dtype, device)?;
    let cap = transformer.config().cap_feat_dim;
    let hidden = text_encoder.config().hidden_size;
    if hidden != cap {
        return Err(Error::InvalidConfig {
            path: files.text_encoder.clone(),
            reason: format!("the text encoder is {hidden} wide but the transformer reads {cap}-wide captions; use the text encoder of the same Z-Image repo"),
        });
    }
    let vae = load_vae(&files.vae, dtype, device, opts.vae_config.as_ref())?;
    let scheduler = match (&opts.scheduler, &files.scheduler_config) {
        (Some(s), _) => {
            s.check().map_err(|reason| Error::InvalidConfig { path: "ZImageLoadOptions::scheduler".into(), reason })?;
            s.clone()
        }
        (None, Some(p)) => FlowMatchConfig::from_file(p)?,
        (None, None) => default_scheduler(),
    };
    Ok(ZImageModels { variant, transformer, text_encoder, tokenizer, vae, scheduler, dtype, device: device.clone(), lora_report })
}

/// Loads a diffusers-format Z-Image repo (e.g. `Tongyi-MAI/Z-Image-Turbo`) from the Hugging Face hub.
#[cfg(feature = "hub")]
pub fn load_from_hub(model: &sd_models::hub::HubModel, hub: &sd_models::hub::HubOptions, opts: &ZImageLoadOptions) -> Result<ZImageModels> {
    let path = sd_models::hub::download(model, hub)?;
    let variant = opts.variant.unwrap_or_else(|| ZImageVariant::from_path(&path));
    load(&path, &ZImageLoadOptions { variant: Some(variant), ..opts.clone() })
}
