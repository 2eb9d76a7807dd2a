//! The error type of sd-sd3.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running an SD 3.x model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed inside Candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// Loading a shared component (CLIP, VAE, safetensors parsing) failed in sd-models.
    #[error(transparent)]
    Models(#[from] sd_models::Error),

    /// A request, scheduler, noise or image error (sd-core's shared vocabulary).
    #[error(transparent)]
    Core(#[from] sd_core::Error),

    /// A LoRA could not be read or applied.
    #[error(transparent)]
    Lora(#[from] sd_lora::Error),

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

    /// A file is not what the SD3 loader expects (another family, a LoRA, a corrupt file …).
    #[error("{path} is not an SD 3.x model: {reason}")]
    NotSd3 {
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

    /// A weight is absent or has an unexpected shape.
    #[error("{source_desc}: {reason}; is this a complete SD 3.x checkpoint?")]
    BadWeights {
        /// The weight source.
        source_desc: String,
        /// The missing or mis-shaped tensor.
        reason: String,
    },

    /// A LoRA matches nothing in the model, or its update does not fit.
    #[error("LoRA {path}: {reason}")]
    LoraMismatch {
        /// The LoRA file.
        path: PathBuf,
        /// What is wrong, and what to use instead.
        reason: String,
    },

    /// A tokenizer file is missing or invalid, or tokenizing failed.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),

    /// The dtype cannot be used for this model.
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

/// The result type of sd-sd3.
pub type Result<T> = std::result::Result<T, Error>;
