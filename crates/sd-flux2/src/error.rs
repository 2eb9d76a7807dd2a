//! The error type of sd-flux2.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running a FLUX.2 [klein] model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed inside Candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// Loading a shared component (VAE, Qwen3 encoder, safetensors parsing) failed in sd-models.
    #[error(transparent)]
    Models(#[from] sd_models::Error),

    /// A LoRA file could not be read, or matches nothing in the FLUX.2 transformer.
    #[error(transparent)]
    Lora(#[from] sd_lora::Error),

    /// A LoRA's update does not fit the weight it names (a LoRA for a klein of another size).
    #[error("LoRA {path} does not fit this model: {reason}; use a LoRA trained for this FLUX.2 [klein] model (4B and 9B LoRAs differ)")]
    LoraMismatch {
        /// The LoRA file.
        path: PathBuf,
        /// The mismatch.
        reason: String,
    },

    /// A request, scheduler, noise or image error (sd-core's shared vocabulary: request fields,
    /// strength, cancellation).
    #[error(transparent)]
    Core(#[from] sd_core::Error),

    /// A file or folder the loader needs is missing.
    #[error("{what} not found at {path}; {hint}")]
    NotFound {
        /// What was looked for.
        what: String,
        /// Where it was looked for.
        path: PathBuf,
        /// What to download or pass instead.
        hint: String,
    },

    /// A path is not a FLUX.2 [klein] model (another family, a lone file, a corrupt folder…).
    #[error("{path} is not a FLUX.2 [klein] model: {reason}")]
    NotFlux2 {
        /// The file or folder.
        path: PathBuf,
        /// What it looks like instead, and what to do.
        reason: String,
    },

    /// A JSON config is unreadable or asks for something this crate does not implement.
    #[error("invalid config {path}: {reason}")]
    InvalidConfig {
        /// The config file.
        path: PathBuf,
        /// What is wrong and what would work.
        reason: String,
    },

    /// A weight a model needs is absent or has an unexpected shape.
    #[error("{source_desc}: {reason}; is this a complete {component}?")]
    BadWeights {
        /// The weight source.
        source_desc: String,
        /// The missing or mis-shaped tensor.
        reason: String,
        /// What the weights should be ("FLUX.2 transformer", "Qwen3 text encoder").
        component: &'static str,
    },

    /// A tokenizer file is missing or invalid, or tokenizing failed.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),

    /// The dtype cannot be used for this model or device.
    #[error("dtype {dtype:?} is not supported here: {reason}")]
    UnsupportedDtype {
        /// The requested dtype.
        dtype: candle_core::DType,
        /// Why, and what to use instead.
        reason: String,
    },
}

impl Error {
    /// An invalid request field.
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Error::Core(sd_core::Error::invalid(field, reason))
    }

    /// The request field this error is about, when it is about one.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            Error::Core(e) => e.field(),
            _ => None,
        }
    }
}

/// The result type of sd-flux2.
pub type Result<T> = std::result::Result<T, Error>;
