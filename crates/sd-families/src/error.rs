//! Errors of every family, with the request field they are about.

/// Everything that can go wrong loading or running a model of any family.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// From the shared runtime: an invalid request (naming its field), a cancelled run …
    #[error(transparent)]
    Core(#[from] sd_core::Error),
    /// From loading a Stable Diffusion model.
    #[error(transparent)]
    Models(#[from] sd_models::Error),
    /// From a Stable Diffusion run.
    #[error(transparent)]
    StableDiffusion(#[from] sd_pipelines::Error),
    /// From loading or running a FLUX model.
    #[error(transparent)]
    Flux(#[from] sd_flux::Error),
    /// From loading or running an SD 3.x model.
    #[error(transparent)]
    Sd3(#[from] sd_sd3::Error),
    /// From loading or running a Z-Image model.
    #[error(transparent)]
    ZImage(#[from] sd_zimage::Error),
    /// From loading or running a FLUX.2 model.
    #[error(transparent)]
    Flux2(#[from] sd_flux2::Error),
    /// A LoRA could not be read or applied; `field` is `loras[i]`, or `loras` when the failing one
    /// cannot be told.
    #[error("{message}")]
    Lora {
        /// The request field.
        field: String,
        /// What went wrong.
        message: String,
    },
    /// A ControlNet could not be loaded or run; `field` is `controlnets[i].model`, `controlnets[i]`
    /// or `controlnets`.
    #[error("{message}")]
    ControlNet {
        /// The request field.
        field: String,
        /// What went wrong.
        message: String,
    },
    /// The family does not offer what the request or the load asked for.
    #[error("{field}: {reason}")]
    Unsupported {
        /// The request (or load) field.
        field: &'static str,
        /// Why, and what to do instead.
        reason: String,
    },
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The shared-runtime error inside, if any (cancellation, an invalid request …).
    pub fn core(&self) -> Option<&sd_core::Error> {
        match self {
            Error::Core(e)
            | Error::StableDiffusion(sd_pipelines::Error::Core(e))
            | Error::Flux(sd_flux::Error::Core(e))
            | Error::Sd3(sd_sd3::Error::Core(e))
            | Error::ZImage(sd_zimage::Error::Core(e))
            | Error::Flux2(sd_flux2::Error::Core(e)) => Some(e),
            _ => None,
        }
    }

    /// The shared-runtime error inside, taken out (for callers that map it to their own answers without
    /// knowing the families), or the error itself when it is not one.
    pub fn into_core(self) -> std::result::Result<sd_core::Error, Self> {
        match self {
            Error::Core(e)
            | Error::StableDiffusion(sd_pipelines::Error::Core(e))
            | Error::Flux(sd_flux::Error::Core(e))
            | Error::Sd3(sd_sd3::Error::Core(e))
            | Error::ZImage(sd_zimage::Error::Core(e))
            | Error::Flux2(sd_flux2::Error::Core(e)) => Ok(e),
            other => Err(other),
        }
    }

    /// Whether the run was cancelled through its progress callback.
    pub fn is_cancelled(&self) -> bool {
        matches!(self.core(), Some(sd_core::Error::Cancelled { .. }))
    }

    /// The request field the error is about, when one is to blame.
    pub fn field(&self) -> Option<String> {
        match self {
            Error::Lora { field, .. } | Error::ControlNet { field, .. } => Some(field.clone()),
            Error::Unsupported { field, .. } => Some((*field).to_string()),
            other => other.core().and_then(sd_core::Error::field).map(str::to_string),
        }
    }
}
