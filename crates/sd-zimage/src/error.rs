//! The error type of sd-zimage.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running a Z-Image model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed inside Candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// Loading a shared component (VAE, safetensors parsing) failed in sd-models.
    #[error(transparent)]
    Models(#[from] sd_models::Error),

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

    /// Reading a file failed.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A file is not what the Z-Image loader expects (an SD or FLUX checkpoint, a LoRA, a corrupt file…).
    #[error("{path} is not a Z-Image model: {reason}")]
    NotZImage {
        /// The file or folder.
        path: PathBuf,
        /// What it looks like instead, and what to do.
        reason: String,
    },

    /// A JSON config is unreadable or asks for something this crate does not implement.
    #[error("invalid config {path}: {reason}")]
    InvalidConfig {
        /// The config file (or a description of where the config came from).
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
        /// What the weights should be ("Z-Image transformer", "Qwen3 text encoder").
        component: &'static str,
    },

    /// A LoRA could not be read or applied.
    #[error(transparent)]
    Lora(#[from] sd_lora::Error),

    /// A LoRA matches no weight of the transformer.
    #[error("LoRA {path} matches no weight of this Z-Image transformer ({modules} modules, e.g. {example}); use a LoRA trained for Z-Image (diffusers/PEFT transformer.layers.*, diffusion_model.layers.* or kohya lora_unet_layers_* names)")]
    LoraNoMatch {
        /// The LoRA file.
        path: PathBuf,
        /// How many modules it has.
        modules: usize,
        /// One of its module keys.
        example: String,
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

/// The result type of sd-zimage.
pub type Result<T> = std::result::Result<T, Error>;
