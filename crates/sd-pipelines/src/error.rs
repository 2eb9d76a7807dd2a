//! The error type of sd-pipelines: the shared vocabulary of sd-core, or a model error from sd-models.

/// Everything that can go wrong while running a Stable Diffusion pipeline.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request, scheduler, noise or image error (sd-core's vocabulary: match on it for the field).
    #[error(transparent)]
    Core(#[from] sd_core::Error),

    /// Loading or running a model failed.
    #[error(transparent)]
    Model(#[from] sd_models::Error),
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Core(sd_core::Error::Candle(e))
    }
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
            Error::Model(_) => None,
        }
    }
}

/// The result type of sd-pipelines.
pub type Result<T> = std::result::Result<T, Error>;
