//! The error vocabulary every sd-* crate shares: request fields, steps, strength, cancellation,
//! scheduler configs, noise and images. The family crates wrap it (`#[from]`) beside their own loading errors.

use std::path::PathBuf;

/// Everything that can go wrong while configuring a scheduler, drawing noise, checking a request or
/// converting an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed inside Candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// Reading a file failed.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A scheduler_config.json could not be parsed.
    #[error("invalid scheduler config: {reason}; pass a diffusers scheduler_config.json")]
    ConfigJson {
        /// What the JSON parser said.
        reason: String,
    },

    /// The number of inference steps is 0 or larger than the training schedule.
    #[error("{steps} inference steps requested but {scheduler} supports 1..={max}; choose a step count in that range")]
    InvalidSteps {
        /// The scheduler.
        scheduler: &'static str,
        /// The requested number of steps.
        steps: usize,
        /// The largest allowed number of steps.
        max: usize,
    },

    /// A sampler name did not match any known sampler.
    #[error("unknown sampler {name:?}; known samplers: {known}")]
    UnknownSampler {
        /// The name as given.
        name: String,
        /// The accepted names.
        known: String,
    },

    /// A sigma schedule name did not match.
    #[error("unknown sigma schedule {name:?}; use \"default\", \"karras\" or \"exponential\"")]
    UnknownSchedule {
        /// The name as given.
        name: String,
    },

    /// The scheduler cannot use the requested sigma schedule.
    #[error("{scheduler} has no {schedule} sigma schedule; use it with Euler, Euler a, Heun, LMS, DPM2, DPM2 a, DPM++ 2S a, DPM++ SDE, DPM++ 2M (SDE), DPM++ 3M SDE, DEIS or UniPC, or pick the default schedule")]
    UnsupportedSchedule {
        /// The scheduler.
        scheduler: &'static str,
        /// The requested schedule.
        schedule: &'static str,
    },

    /// The configuration asks for a feature this scheduler does not implement.
    #[error("{scheduler}: {option} is not supported; {hint}")]
    UnsupportedConfig {
        /// The scheduler.
        scheduler: &'static str,
        /// The offending option and value.
        option: String,
        /// What to do instead.
        hint: &'static str,
    },

    /// A step index is outside the schedule.
    #[error("timestep index {index} is out of range for a schedule of {len} model calls; iterate over 0..scheduler.timesteps().len()")]
    StepIndex {
        /// The index passed in.
        index: usize,
        /// The number of timesteps.
        len: usize,
    },

    /// A multi-call step was made out of order.
    #[error("{scheduler}: step {index} needs step {expected} to be run first; call step() for every index in order")]
    StepOutOfOrder {
        /// The scheduler.
        scheduler: &'static str,
        /// The index passed in.
        index: usize,
        /// The index that had to come before.
        expected: usize,
    },

    /// A stochastic sampler was given a noise source that cannot produce noise.
    #[error("{scheduler} draws fresh noise every step; pass a SeededNoise (or another NoiseSource) instead of NoNoise")]
    NoiseRequired {
        /// The scheduler that asked for noise.
        scheduler: &'static str,
    },

    /// A queue of prepared noise tensors ran out or held a tensor of the wrong shape.
    #[error("noise queue: {reason}; queue one tensor of the sample's shape per noise draw")]
    NoiseQueue {
        /// What went wrong.
        reason: String,
    },

    /// An img2img strength is outside [0, 1] or leaves no step to run.
    #[error("strength {strength} cannot be used with {steps} steps: {reason}")]
    InvalidStrength {
        /// The requested strength.
        strength: f64,
        /// The number of inference steps.
        steps: usize,
        /// Why, and what would work.
        reason: String,
    },
    /// The progress callback asked the pipeline to stop.
    #[error("generation cancelled at step {step} of {total}")]
    Cancelled {
        /// Steps completed before the stop.
        step: usize,
        /// Steps the run would have taken.
        total: usize,
    },

    /// A request field has an invalid value.
    #[error("invalid `{field}`: {reason}")]
    InvalidRequest {
        /// The offending field, as named in the request.
        field: &'static str,
        /// What is wrong and what is allowed.
        reason: String,
    },

    /// A config file is unreadable or asks for something that is not implemented.
    #[error("invalid config {path}: {reason}")]
    InvalidConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong and what would work.
        reason: String,
    },

    /// Decoding or encoding an image failed.
    #[error("image error: {0}")]
    Image(String),
}

impl Error {
    /// An invalid request field.
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidRequest { field, reason: reason.into() }
    }

    /// The request field this error is about, when it is about one (what an HTTP front names in its
    /// 4xx answer).
    pub fn field(&self) -> Option<&'static str> {
        match self {
            Error::InvalidRequest { field, .. } => Some(field),
            Error::InvalidStrength { .. } => Some("strength"),
            Error::InvalidSteps { .. } => Some("steps"),
            Error::UnknownSampler { .. } | Error::UnsupportedSchedule { .. } | Error::UnknownSchedule { .. } => Some("sampler"),
            _ => None,
        }
    }
}

/// The result type of sd-core.
pub type Result<T> = std::result::Result<T, Error>;
