//! Loading every FLUX.2 [klein] component of a diffusers `Flux2KleinPipeline` folder into one
//! [`Flux2Models`].

use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use sd_core::schedulers::flow_match::FlowMatchConfig;
use sd_models::qwen3::Qwen3Encoder;
use sd_models::single_file::innermost;
use sd_models::weights::MappedWeights;
use tokenizers::Tokenizer;

use crate::config::{read_json, Flux2Config};
use crate::error::{Error, Result};
use crate::model::Flux2Transformer;
use crate::text::{load_text_encoder, load_tokenizer, OUT_LAYERS};
use crate::vae::{load_vae, Flux2Vae};

/// Which klein: the step-distilled models (guidance-free, 4 steps) or the base models (CFG).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Flux2Variant {
    /// FLUX.2 [klein] 4B / 9B: step-distilled (`is_distilled: true`); guidance is ignored, 4 steps.
    Klein,
    /// FLUX.2 [klein] base 4B / 9B: classifier-free guidance with the empty prompt (pipeline defaults:
    /// 50 steps, guidance 4.0).
    KleinBase,
}

impl Flux2Variant {
    /// `klein` or `klein-base`.
    pub fn name(self) -> &'static str {
        match self {
            Flux2Variant::Klein => "klein",
            Flux2Variant::KleinBase => "klein-base",
        }
    }

    /// Whether the model is step-distilled (the pipeline's `is_distilled`: no CFG).
    pub fn is_distilled(self) -> bool {
        self == Flux2Variant::Klein
    }

    /// Default steps (the klein model card: 4; `Flux2KleinPipeline`'s default: 50).
    pub fn default_steps(self) -> usize {
        match self {
            Flux2Variant::Klein => 4,
            Flux2Variant::KleinBase => 50,
        }
    }

    /// Default guidance (the klein model card: 1.0, i.e. none; `Flux2KleinPipeline`'s default: 4.0).
    pub fn default_guidance(self) -> f64 {
        match self {
            Flux2Variant::Klein => 1.0,
            Flux2Variant::KleinBase => 4.0,
        }
    }
}

/// FLUX.2 [klein]'s `scheduler_config.json` (dynamic shifting; the pipeline passes its own `mu`).
pub fn default_scheduler() -> FlowMatchConfig {
    FlowMatchConfig { shift: 3.0, use_dynamic_shifting: true, base_shift: Some(0.5), max_shift: Some(1.15), ..FlowMatchConfig::dev() }
}

/// How to load.
#[derive(Debug, Clone)]
pub struct Flux2LoadOptions {
    /// Weight dtype; `None` means F32 on the CPU and BF16 on GPUs (klein ships in BF16).
    pub dtype: Option<DType>,
    /// Where the weights go.
    pub device: Device,
    /// Distilled or base; `None` reads `is_distilled` from `model_index.json` (absent: base, the
    /// pipeline's default).
    pub variant: Option<Flux2Variant>,
    /// Scheduler settings; `None` reads `scheduler/scheduler_config.json` or uses klein's.
    pub scheduler: Option<FlowMatchConfig>,
}

impl Default for Flux2LoadOptions {
    fn default() -> Self {
        Self { dtype: None, device: Device::Cpu, variant: None, scheduler: None }
    }
}

impl Flux2LoadOptions {
    /// The dtype the weights will be loaded as.
    pub fn resolved_dtype(&self) -> Result<DType> {
        let dtype = self.dtype.unwrap_or(if self.device.is_cpu() { DType::F32 } else { DType::BF16 });
        match dtype {
            DType::F32 | DType::F16 | DType::BF16 => Ok(dtype),
            other => Err(Error::UnsupportedDtype { dtype: other, reason: "use F32, F16 or BF16".into() }),
        }
    }
}

/// Every loaded component.
#[derive(Debug, Clone)]
pub struct Flux2Models {
    /// The transformer.
    pub transformer: Flux2Transformer,
    /// The Qwen3 text encoder (its first 27 layers).
    pub text_encoder: Qwen3Encoder,
    /// The Qwen tokenizer.
    pub tokenizer: Tokenizer,
    /// The autoencoder and its latent statistics.
    pub vae: Flux2Vae,
    /// Scheduler settings.
    pub scheduler: FlowMatchConfig,
    /// Distilled or base.
    pub variant: Flux2Variant,
    /// The text encoder's hidden states the prompt features stack (9, 18, 27).
    pub text_layers: Vec<usize>,
    /// Where the transformer runs.
    pub device: Device,
}

impl Flux2Models {
    /// Image pixels per VAE latent pixel (8 for FLUX.2; a latent token covers 2× that).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.scale_factor()
    }
}

/// The parts of `model_index.json` the loader reads.
#[derive(serde::Deserialize)]
struct ModelIndex {
    #[serde(rename = "_class_name", default)]
    class_name: String,
    #[serde(default)]
    is_distilled: bool,
}

fn sub(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// Loads a diffusers `Flux2KleinPipeline` folder (`model_index.json`, `transformer/`, `text_encoder/`,
/// `tokenizer/`, `vae/`, `scheduler/`).
pub fn load(path: &Path, options: &Flux2LoadOptions) -> Result<Flux2Models> {
    if !path.is_dir() {
        return Err(Error::NotFlux2 {
            path: path.to_path_buf(),
            reason: "pass a diffusers FLUX.2 [klein] folder (model_index.json, transformer/, text_encoder/, tokenizer/, vae/); single files are not supported".into(),
        });
    }
    let index_path = path.join("model_index.json");
    let index: Option<ModelIndex> = if index_path.is_file() { Some(read_json(&index_path)?) } else { None };
    if let Some(ix) = &index {
        if !ix.class_name.starts_with("Flux2Klein") {
            return Err(Error::NotFlux2 {
                path: path.to_path_buf(),
                reason: format!("model_index.json names {:?}; this crate runs Flux2KleinPipeline folders (FLUX.2 [dev] with its Mistral encoder is not supported)", ix.class_name),
            });
        }
    }
    let variant = options.variant.unwrap_or(if index.as_ref().is_some_and(|i| i.is_distilled) { Flux2Variant::Klein } else { Flux2Variant::KleinBase });
    let dtype = options.resolved_dtype()?;
    let device = &options.device;
    let transformer = load_transformer(&sub(path, "transformer"), dtype, device)?;
    let text_layers = OUT_LAYERS.to_vec();
    let text_encoder = load_text_encoder(&sub(path, "text_encoder"), &text_layers, dtype, device)?;
    let width = 3 * text_encoder.config().hidden_size;
    if width != transformer.config().joint_attention_dim {
        return Err(Error::NotFlux2 {
            path: path.to_path_buf(),
            reason: format!("the text encoder gives {width}-wide features but the transformer takes {}; the components belong to different models", transformer.config().joint_attention_dim),
        });
    }
    let tokenizer = load_tokenizer(&sub(path, "tokenizer"))?;
    let vae = load_vae(&sub(path, "vae"), dtype, device)?;
    if 4 * vae.latent_channels() != transformer.config().in_channels {
        return Err(Error::NotFlux2 {
            path: path.to_path_buf(),
            reason: format!("the VAE has {} latent channels but the transformer takes {} (= 4 × 32 for FLUX.2)", vae.latent_channels(), transformer.config().in_channels),
        });
    }
    let scheduler = match &options.scheduler {
        Some(s) => s.clone(),
        None => {
            let p = path.join("scheduler").join("scheduler_config.json");
            if p.is_file() { FlowMatchConfig::from_file(&p)? } else { default_scheduler() }
        }
    };
    Ok(Flux2Models { transformer, text_encoder, tokenizer, vae, scheduler, variant, text_layers, device: device.clone() })
}

/// Loads the transformer from a diffusers `transformer/` folder.
pub fn load_transformer(dir: &Path, dtype: DType, device: &Device) -> Result<Flux2Transformer> {
    let cfg_path = dir.join("config.json");
    if !cfg_path.is_file() {
        return Err(Error::NotFound { what: "transformer config.json".into(), path: cfg_path, hint: "pass the transformer/ folder of a FLUX.2 [klein] repo".into() });
    }
    let cfg = Flux2Config::from_file(&cfg_path)?;
    let files = sd_models::diffusers::find_weight_files(dir, false)?;
    // SAFETY: read-only mapping; like every mmap-based loader we rely on the files not being truncated by
    // another process while they are mapped.
    let st = unsafe { MmapedSafetensors::multi(&files) }.map_err(|e| Error::NotFlux2 {
        path: dir.to_path_buf(),
        reason: format!("not a valid safetensors file ({}); re-download it, it may be truncated", innermost(&e)),
    })?;
    let vb = VarBuilder::from_backend(Box::new(MappedWeights::new(st)), dtype, device.clone());
    Flux2Transformer::new(&cfg, vb).map_err(|e| Error::BadWeights {
        source_desc: dir.display().to_string(),
        reason: innermost(&e).to_string(),
        component: "FLUX.2 transformer",
    })
}

/// Loads a diffusers-format FLUX.2 [klein] repo (e.g. `black-forest-labs/FLUX.2-klein-4B`) from the Hugging Face
/// hub, downloading only the pipeline's files into the hub cache (or, offline, reading them from there).
#[cfg(feature = "hub")]
pub fn load_from_hub(model: &sd_models::hub::HubModel, hub: &sd_models::hub::HubOptions, options: &Flux2LoadOptions) -> Result<Flux2Models> {
    let path = sd_models::hub::download(model, hub)?;
    load(&path, options)
}
