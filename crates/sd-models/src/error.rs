//! The error type of sd-models.

use std::path::PathBuf;

/// Everything that can go wrong while configuring, loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed inside Candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// A file or folder the loader needs is missing.
    #[error("{what} not found at {path}; check the path (a diffusers folder needs model_index.json or unet/, vae/, text_encoder/ sub-folders)")]
    NotFound {
        /// What was looked for ("model folder", "unet weights", …).
        what: String,
        /// Where it was looked for.
        path: PathBuf,
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

    /// A safetensors file is truncated, corrupt or not safetensors at all.
    #[error("{path} is not a valid safetensors file ({reason}); re-download it, the file may be truncated")]
    InvalidSafetensors {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },

    /// The file format is deliberately not loaded (pickle `.ckpt`/`.bin`) or not recognised.
    #[error("{path}: {reason}")]
    UnsupportedFormat {
        /// The file or folder.
        path: PathBuf,
        /// Why, and what to do instead.
        reason: String,
    },

    /// A JSON config is missing a field or has a wrong value.
    #[error("invalid config {path}: {reason}")]
    InvalidConfig {
        /// The config file (or a description of where the config came from).
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// The weights do not look like any supported Stable Diffusion checkpoint.
    #[error("cannot recognise the model in {path}: {reason}")]
    UnknownArchitecture {
        /// The file or folder.
        path: PathBuf,
        /// What was found instead.
        reason: String,
    },

    /// A weight the model needs is absent from the checkpoint.
    #[error("tensor {name} is missing from {source_desc}; is this checkpoint for another model variant (e.g. SDXL weights loaded as SD 1.5)?")]
    MissingTensor {
        /// The (diffusers-style) tensor name that was asked for.
        name: String,
        /// The weight source.
        source_desc: String,
    },

    /// A weight has a different shape from the one the config implies.
    #[error("tensor {name} in {source_desc} has shape {actual:?} but the model expects {expected:?}; the checkpoint does not match the selected variant/config")]
    ShapeMismatch {
        /// The tensor name.
        name: String,
        /// The weight source.
        source_desc: String,
        /// Shape the model expects.
        expected: Vec<usize>,
        /// Shape found in the file.
        actual: Vec<usize>,
    },

    /// The user forced a variant that contradicts what the weights say.
    #[error("the checkpoint looks like {detected} but {requested} was requested; drop the explicit variant or pick a matching one")]
    VariantMismatch {
        /// Variant detected from the weights.
        detected: String,
        /// Variant requested by the caller.
        requested: String,
    },

    /// Tokenizer files are missing or invalid.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),

    /// The dtype cannot be used on the device.
    #[error("dtype {dtype:?} is not supported on {device}; use F32 on CPU, or F16/BF16 on a GPU")]
    UnsupportedDtype {
        /// The requested dtype.
        dtype: candle_core::DType,
        /// The device description.
        device: String,
    },

    /// A dtype name that is not one of f32, f16 or bf16.
    #[error("unknown dtype {0:?}: use f32, f16 or bf16")]
    UnknownDtype(String),

    /// An input tensor has the wrong shape for the model.
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// A [`crate::loader::BackendHook`] (LoRA merging and other weight patches) refused the model.
    #[error("{0}")]
    Extension(Box<dyn std::error::Error + Send + Sync>),

    /// The file is not an ESRGAN-family (RRDBNet) upscaler, or an RRDBNet variant that cannot be run.
    #[error("{path} is not an ESRGAN/RRDBNet upscaler: {reason}")]
    NotAnUpscaler {
        /// The file (or a description of the state dict).
        path: PathBuf,
        /// What was found instead, and what is supported.
        reason: String,
    },

    /// A progress callback asked to stop (e.g. an upscale cancelled between tiles).
    #[error("cancelled")]
    Cancelled,

    /// Resolving or downloading from the Hugging Face hub failed.
    #[error("hub error for {repo}: {reason}; check the repo id and your network, or download the files and pass a local path")]
    Hub {
        /// The repo id.
        repo: String,
        /// What failed.
        reason: String,
    },
}

/// Result alias for sd-models.
pub type Result<T> = std::result::Result<T, Error>;
