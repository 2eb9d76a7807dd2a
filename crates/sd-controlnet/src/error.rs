//! The error type of sd-controlnet.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running a ControlNet.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed inside Candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// A model-level error from sd-models.
    #[error(transparent)]
    Model(#[from] sd_models::Error),

    /// Reading a file failed.
    #[error("cannot read {path}: {source}; pass a diffusers ControlNet folder (config.json + diffusion_pytorch_model.safetensors)")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// config.json could not be parsed or describes an unsupported ControlNet.
    #[error("invalid ControlNet config: {0}")]
    Config(String),

    /// The ControlNet was trained for a different base model than the UNet it is paired with.
    #[error("ControlNet does not fit this UNet: {0}; use a ControlNet trained for this base model (SD 1.x, SD 2.x or SDXL)")]
    Incompatible(String),

    /// A request parameter is out of range.
    #[error("invalid `{field}`: {reason}")]
    InvalidInput {
        /// The parameter.
        field: &'static str,
        /// What is wrong and what is accepted.
        reason: String,
    },
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl From<Error> for sd_pipelines::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Candle(e) => sd_pipelines::Error::from(e),
            Error::Model(e) => sd_pipelines::Error::Model(e),
            other => sd_pipelines::Error::Model(sd_models::Error::Extension(Box::new(other))),
        }
    }
}
