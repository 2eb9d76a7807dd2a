//! Errors of LoRA parsing and merging, each telling the user what to do about it.

use std::path::PathBuf;

/// Everything that can go wrong reading or applying a LoRA.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The LoRA file does not exist.
    #[error("LoRA file {path} does not exist; check the path (use `--lora path/to/file.safetensors:strength`)")]
    NotFound {
        /// The missing path.
        path: PathBuf,
    },

    /// The file could not be read.
    #[error("cannot read LoRA file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },

    /// The file is not a readable safetensors file.
    #[error("{path} is not a valid safetensors LoRA ({reason}); re-download it, the file may be truncated or not a .safetensors file")]
    InvalidFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// A valid safetensors file without any LoRA tensors.
    #[error("{path} holds no LoRA tensors (expected kohya `lora_down`/`lora_up` or PEFT `lora_A`/`lora_B` names; first keys: {sample}); is it a full checkpoint or an embedding instead of a LoRA?")]
    NotALora {
        /// The file.
        path: PathBuf,
        /// A few of its tensor names.
        sample: String,
    },

    /// An adapter type this crate does not merge.
    #[error("{path}: {kind} adapters are not supported (only LoRA and LyCORIS LoCon); convert it to a plain LoRA or drop it")]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// The adapter kind (LoHa, LoKr, DoRA, …).
        kind: String,
    },

    /// One half of a LoRA pair is missing.
    #[error(
        "{path}: module {module} has no {missing} tensor; the LoRA file is incomplete, re-download or re-export it"
    )]
    MissingPart {
        /// The file.
        path: PathBuf,
        /// The module key in the file.
        module: String,
        /// Which tensor is missing.
        missing: &'static str,
    },

    /// The up and down matrices of a module disagree on the rank.
    #[error("{path}: module {module} has a down matrix of shape {down:?} and an up matrix of shape {up:?}, whose ranks differ; the LoRA file is corrupt")]
    RankMismatch {
        /// The file.
        path: PathBuf,
        /// The module key in the file.
        module: String,
        /// Shape of the down (A) matrix.
        down: Vec<usize>,
        /// Shape of the up (B) matrix.
        up: Vec<usize>,
    },

    /// The adapter names no weight of the loaded model.
    #[error("LoRA {path} matches no weight of the {model} model ({modules} modules, e.g. {example}); {hint}")]
    NoMatch {
        /// The file.
        path: PathBuf,
        /// The loaded model variant.
        model: String,
        /// Number of modules in the adapter.
        modules: usize,
        /// One of the adapter's module keys.
        example: String,
        /// The likely cause.
        hint: String,
    },

    /// The adapter's delta does not fit the model weight it names.
    #[error("{0}")]
    ShapeMismatch(Box<ShapeMismatch>),

    /// A `path:strength` argument could not be parsed.
    #[error("invalid LoRA argument {0:?}: use `path/to/lora.safetensors` or `path/to/lora.safetensors:0.8` (strength may be negative)")]
    InvalidSpec(String),

    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    /// `NoMatch` for `adapter` (loaded from `path`), which matched nothing of `model`; `hint` says what it
    /// seems to be for.
    pub fn no_match(path: &std::path::Path, model: &str, adapter: &crate::LoraAdapter, hint: String) -> Self {
        Error::NoMatch {
            path: path.to_path_buf(),
            model: model.into(),
            modules: adapter.modules().len(),
            example: adapter.modules().first().map(|m| m.key.clone()).unwrap_or_default(),
            hint,
        }
    }

    /// The LoRA file the error is about, when it is about one (callers that applied several map
    /// it back to the request that named it).
    pub fn path(&self) -> Option<&std::path::Path> {
        match self {
            Error::NotFound { path }
            | Error::Io { path, .. }
            | Error::InvalidFile { path, .. }
            | Error::NotALora { path, .. }
            | Error::Unsupported { path, .. }
            | Error::MissingPart { path, .. }
            | Error::RankMismatch { path, .. }
            | Error::NoMatch { path, .. } => Some(path),
            Error::ShapeMismatch(m) => Some(&m.path),
            Error::InvalidSpec(_) | Error::Candle(_) => None,
        }
    }
}

/// A LoRA update whose shape does not fit the model weight it targets.
#[derive(Debug, thiserror::Error)]
#[error("LoRA {path}: module {module} produces a {lora:?} update but the model weight {weight} is {model:?}; {hint}")]
pub struct ShapeMismatch {
    /// The file.
    pub path: PathBuf,
    /// The module key in the file.
    pub module: String,
    /// The model weight.
    pub weight: String,
    /// Shape of the LoRA update.
    pub lora: Vec<usize>,
    /// Shape of the model weight.
    pub model: Vec<usize>,
    /// The likely cause.
    pub hint: String,
}

/// Result alias for sd-lora.
pub type Result<T> = std::result::Result<T, Error>;

impl From<Error> for sd_models::Error {
    fn from(e: Error) -> Self {
        sd_models::Error::Extension(Box::new(e))
    }
}
