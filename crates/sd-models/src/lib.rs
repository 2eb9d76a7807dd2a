//! Stable Diffusion model architectures, configs and loaders for Candle.
//!
//! Load any SD 1.5 / 2.x / SDXL variant from a diffusers folder, a single-file civitai/A1111
//! checkpoint, or (feature `hub`) a Hugging Face repo id, and run its components.

pub mod clip;
pub mod config;
pub mod detect;
pub mod device;
pub mod diffusers;
pub mod embeddings;
pub mod esrgan;
pub mod error;
pub mod hash;
#[cfg(feature = "hub")]
pub mod hub;
pub mod keymap;
pub mod loader;
pub mod ops;
pub mod single_file;
pub mod split;
pub mod qwen3;
pub mod t5;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod variant;
pub mod weights;

pub use config::{ClipActivation, ClipConfig, PerBlock, PredictionType, UNetConfig, VaeConfig};
pub use error::{Error, Result};
pub use variant::{ModelConfig, ModelFamily, SchedulerDefaults, SdVariant};

/// The Hugging Face model used when none is named: SD-Turbo (an SD 2.1 distillation, 1 step at
/// 512², no guidance), ≈ 2.6 GB in fp16 safetensors. Its license (Stability AI Non-Commercial
/// Research Community License) allows non-commercial use only.
pub const DEFAULT_MODEL_REPO: &str = "stabilityai/sd-turbo";

/// The variant of [`DEFAULT_MODEL_REPO`] (turbo models cannot be told from their weights).
pub const DEFAULT_MODEL_VARIANT: SdVariant = SdVariant::SdTurbo;
