//! Command line and environment configuration, and the validated [`WorkerConfig`] built from it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::{DType, Device};
use clap::Parser;
use sd_models::device::first_line;
use sd_models::SdVariant;

/// Serve Stable Diffusion image jobs over HTTP (native job API with SSE, OpenAI images, A1111).
#[derive(Parser, Debug, Clone)]
#[command(version, about)]
pub struct Cli {
    /// Model: a diffusers folder (Stable Diffusion or FLUX), a single-file `.safetensors` checkpoint,
    /// a FLUX transformer file (BFL `.safetensors` or `.gguf`), or a Hugging Face model
    /// `hub:owner/name[/file.safetensors][@revision]` (a diffusers SD/FLUX repo or a single-file repo).
    /// Default: hub:stabilityai/sd-turbo, downloaded once into the Hugging Face cache.
    #[arg(long, short = 'm', env = "SD_WORKER_MODEL")]
    pub model: Option<String>,
    /// Variant (sd15, sd15-inpaint, sd21, sd2-inpaint, sd-turbo, sdxl, sdxl-inpaint, sdxl-turbo) or `auto` to detect
    /// (FLUX models are always detected: dev or schnell from the weights).
    #[arg(long, env = "SD_WORKER_VARIANT", default_value = "auto")]
    pub variant: String,
    /// A diffusers folder whose configs describe a single-file checkpoint of non-standard size; for a
    /// FLUX transformer file, the diffusers FLUX folder that provides its VAE, T5, CLIP and tokenizers
    /// (default: the file's own folder).
    #[arg(long, env = "SD_WORKER_MODEL_CONFIG")]
    pub model_config: Option<PathBuf>,
    /// A VAE to use instead of the model's own (Stable Diffusion models): a diffusers `vae/` folder or a
    /// `.safetensors` file with diffusers, LDM or `first_stage_model.*` names.
    #[arg(long, env = "SD_WORKER_VAE")]
    pub vae: Option<PathBuf>,
    /// Device: `auto` (a GPU when compiled in and present), `cpu`, `cuda[:N]` or `metal[:N]`.
    #[arg(long, env = "SD_WORKER_DEVICE", default_value = "auto")]
    pub device: String,
    /// Weight dtype: f32, f16 or bf16 (default: f32 on CPU, f16 on GPUs).
    #[arg(long, env = "SD_WORKER_DTYPE")]
    pub dtype: Option<String>,
    /// Address to bind.
    #[arg(long, env = "SD_WORKER_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// Port to bind (0 picks a free one).
    #[arg(long, env = "SD_WORKER_PORT", default_value_t = 7861)]
    pub port: u16,
    /// Jobs that may wait behind the running one; more are answered 429.
    #[arg(long, env = "SD_WORKER_QUEUE_CAPACITY", default_value_t = 16)]
    pub queue_capacity: usize,
    /// Largest image width in pixels.
    #[arg(long, env = "SD_WORKER_MAX_WIDTH", default_value_t = 2048)]
    pub max_width: usize,
    /// Largest image height in pixels.
    #[arg(long, env = "SD_WORKER_MAX_HEIGHT", default_value_t = 2048)]
    pub max_height: usize,
    /// Largest batch (images per job).
    #[arg(long, env = "SD_WORKER_MAX_BATCH", default_value_t = 4)]
    pub max_batch: usize,
    /// Most sampling steps per job.
    #[arg(long, env = "SD_WORKER_MAX_STEPS", default_value_t = 150)]
    pub max_steps: usize,
    /// Folder of checkpoints clients may switch between by name (`/sdapi/v1/options`, `override_settings`,
    /// the native `model` field): single `.safetensors`/`.gguf` files and diffusers folders, searched four
    /// levels deep, as A1111's `--ckpt-dir` (repeatable; `,` in the env var). Without `-m`, the first
    /// (by name) is loaded at startup, and nothing is ever downloaded.
    #[arg(long = "models-dir", env = "SD_WORKER_MODELS_DIRS", value_delimiter = ',')]
    pub models_dirs: Vec<PathBuf>,
    /// Megabytes of model weights kept loaded in all, the model in use included, for switching back without a
    /// reload (least recently used go first; the model in use always stays, even when larger). 0 keeps only
    /// the model in use.
    #[arg(long, env = "SD_WORKER_MODEL_CACHE_MB", default_value_t = 0)]
    pub model_cache_mb: u64,
    /// Folder of VAEs (`.safetensors` files with diffusers, LDM or `first_stage_model.*` names, or diffusers
    /// `vae/` folders) that A1111's `sd_vae` (options or `override_settings`) may switch to, as A1111's
    /// `models/VAE` (repeatable; `,` in the env var).
    #[arg(long = "vae-dir", env = "SD_WORKER_VAE_DIRS", value_delimiter = ',')]
    pub vae_dirs: Vec<PathBuf>,
    /// Folder of ESRGAN-family upscaler models (`.pth`/`.safetensors`: ESRGAN, Real-ESRGAN, 4x-UltraSharp-style
    /// RRDBNets) that `hr_upscaler` and `/sdapi/v1/extra-single-image` may name by file stem, as A1111's
    /// `models/ESRGAN` (repeatable; `,` in the env var).
    #[arg(long = "upscaler-dir", env = "SD_WORKER_UPSCALER_DIRS", value_delimiter = ',')]
    pub upscaler_dirs: Vec<PathBuf>,
    /// Folder of LoRA `.safetensors` files requests may use (repeat the flag, or separate with `,` in the env var).
    #[arg(long = "lora-dir", env = "SD_WORKER_LORA_DIRS", value_delimiter = ',')]
    pub lora_dirs: Vec<PathBuf>,
    /// Folder of ControlNets (diffusers folders or `.safetensors` files) requests may use (repeatable; `,` in the env var).
    #[arg(long = "controlnet-dir", env = "SD_WORKER_CONTROLNET_DIRS", value_delimiter = ',')]
    pub controlnet_dirs: Vec<PathBuf>,
    /// Folder of textual-inversion embeddings (`.pt`, `.bin`, `.safetensors`, searched recursively) that
    /// prompts may name, as A1111's `--embeddings-dir` (repeatable; `,` in the env var).
    #[arg(long = "embeddings-dir", env = "SD_WORKER_EMBEDDINGS_DIRS", value_delimiter = ',')]
    pub embedding_dirs: Vec<PathBuf>,
    /// Seconds a finished job's result is kept.
    #[arg(long, env = "SD_WORKER_JOB_EXPIRY_SECS", default_value_t = 3600)]
    pub job_expiry_secs: u64,
    /// Largest request body in bytes (base64 images included).
    #[arg(long, env = "SD_WORKER_MAX_BODY_BYTES", default_value_t = 50 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Send a preview every N steps (0 disables previews).
    #[arg(long, env = "SD_WORKER_PREVIEW_EVERY", default_value_t = 1)]
    pub preview_every: usize,
    /// On shutdown, seconds the running job may take to finish before it is cancelled.
    #[arg(long, env = "SD_WORKER_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub shutdown_grace_secs: u64,
    /// Seconds a client has to send a request's headers; also how long an idle keep-alive
    /// connection is kept.
    #[arg(long, env = "SD_WORKER_HEADER_TIMEOUT_SECS", default_value_t = 30.0)]
    pub header_timeout_secs: f64,
    /// Seconds a client has to send a request's body once its headers arrived.
    #[arg(long, env = "SD_WORKER_BODY_TIMEOUT_SECS", default_value_t = 60.0)]
    pub body_timeout_secs: f64,
    /// Open connections served at once; more are answered 503 and closed.
    #[arg(long, env = "SD_WORKER_MAX_CONNECTIONS", default_value_t = 256)]
    pub max_connections: usize,
    /// SSE streams open at once, over all jobs (429 beyond).
    #[arg(long, env = "SD_WORKER_MAX_SUBSCRIBERS", default_value_t = 64)]
    pub max_subscribers: usize,
    /// SSE streams open at once on one job (429 beyond).
    #[arg(long, env = "SD_WORKER_MAX_SUBSCRIBERS_PER_JOB", default_value_t = 8)]
    pub max_subscribers_per_job: usize,
    /// Jobs kept in memory (queued, running and finished); the oldest finished go first.
    #[arg(long, env = "SD_WORKER_MAX_STORED_JOBS", default_value_t = 256)]
    pub max_stored_jobs: usize,
    /// Bytes of finished jobs' images, previews and parameters kept in memory; the oldest finished go first.
    #[arg(long, env = "SD_WORKER_MAX_STORED_BYTES", default_value_t = 512 * 1024 * 1024)]
    pub max_stored_bytes: usize,
    /// API key clients must send as `Authorization: Bearer <key>` (repeatable; `,` in the env var).
    /// With no key and no `--api-auth`, the API is open.
    #[arg(long = "api-key", env = "SD_WORKER_API_KEYS", value_delimiter = ',', hide_env_values = true)]
    pub api_keys: Vec<String>,
    /// `user:password` clients may send as HTTP Basic auth, as A1111's `--api-auth` (repeatable; `,` in the env var).
    #[arg(long = "api-auth", env = "SD_WORKER_API_AUTH", value_delimiter = ',', hide_env_values = true)]
    pub api_auth: Vec<String>,
    /// Serve `/metrics` without credentials (for a scraper) even when auth is on.
    #[arg(long, env = "SD_WORKER_METRICS_PUBLIC")]
    pub metrics_public: bool,
    /// An origin browsers may call the API from (`https://app.example`, or `*`); repeatable. None: no CORS headers.
    #[arg(long = "cors-origin", env = "SD_WORKER_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,
    /// Queue mode: take jobs from (and put jobs into) a Redis Stream shared by any number of
    /// workers and fronts, e.g. `redis://127.0.0.1:6379/0` (feature `queue`). Without it, this
    /// process queues and runs its own jobs.
    #[arg(long, env = "SD_WORKER_QUEUE")]
    pub queue: Option<String>,
    /// Name of the shared queue; one per model (every worker on a queue must serve the same model).
    #[arg(long, env = "SD_WORKER_QUEUE_NAME", default_value = "default")]
    pub queue_name: String,
    /// Serve the HTTP API only: accept jobs into the queue and serve status, SSE and results from
    /// it, with no model loaded here (needs --queue).
    #[arg(long, env = "SD_WORKER_FRONT_ONLY")]
    pub front_only: bool,
    /// Seconds a running job's worker may stay silent before another worker takes the job over
    /// (a live worker renews its claim every 5 s, or three times per period if that is shorter).
    #[arg(long, env = "SD_WORKER_QUEUE_CLAIM_IDLE_SECS", default_value_t = 30.0)]
    pub queue_claim_idle_secs: f64,
    /// How many times a job may be started before it fails (each start beyond the first means the
    /// worker running it died).
    #[arg(long, env = "SD_WORKER_QUEUE_MAX_ATTEMPTS", default_value_t = 3)]
    pub queue_max_attempts: u32,
    /// Log format: `text` (coloured only when stdout is a terminal) or `json` (one object per line,
    /// for log collectors).
    #[arg(long, env = "SD_WORKER_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

/// Queue mode settings (`--queue`).
#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// Redis URL.
    pub url: String,
    /// Queue name (keys live under `sdw:{name}:`).
    pub name: String,
    /// No model here: HTTP only.
    pub front_only: bool,
    /// Silence after which a running job is taken over.
    pub claim_idle: Duration,
    /// Starts before a job fails.
    pub max_attempts: u32,
}

/// Where the model comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// A diffusers folder or a single-file checkpoint.
    Path(PathBuf),
    /// A Hugging Face repo id (feature `hub`).
    Hub(String),
}

/// Request limits enforced before a job is queued.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest width in pixels.
    pub max_width: usize,
    /// Largest height in pixels.
    pub max_height: usize,
    /// Largest batch.
    pub max_batch: usize,
    /// Most steps.
    pub max_steps: usize,
    /// Largest request body in bytes.
    pub max_body_bytes: usize,
}

/// Connection hygiene: timeouts and caps on what clients may hold open.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// Time to send a request's headers, and the idle keep-alive limit.
    pub header_timeout: Duration,
    /// Time to send a request's body.
    pub body_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// SSE streams open at once, over all jobs.
    pub max_subscribers: usize,
    /// SSE streams open at once on one job.
    pub max_subscribers_per_job: usize,
}

/// Bounds on the job table.
#[derive(Debug, Clone)]
pub struct StoreLimits {
    /// Jobs kept (queued, running and finished).
    pub max_jobs: usize,
    /// Bytes of finished jobs' outputs kept.
    pub max_bytes: usize,
}

/// Who may call the API.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// Bearer keys.
    pub api_keys: Vec<String>,
    /// HTTP Basic `(user, password)` pairs.
    pub basic: Vec<(String, String)>,
    /// `/metrics` needs no credentials.
    pub metrics_public: bool,
}

impl AuthConfig {
    /// Whether any credential is configured (else the API is open).
    pub fn enabled(&self) -> bool {
        !self.api_keys.is_empty() || !self.basic.is_empty()
    }
}

/// Everything the worker needs, validated.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The model to load.
    pub model: ModelSource,
    /// Forced variant, `None` to detect.
    pub variant: Option<SdVariant>,
    /// Folder whose configs describe a single-file checkpoint.
    pub model_config: Option<PathBuf>,
    /// A VAE replacing the model's own.
    pub vae: Option<PathBuf>,
    /// Device for every component.
    pub device: Device,
    /// Weight dtype, `None` for the device default.
    pub dtype: Option<DType>,
    /// Waiting jobs beyond the running one.
    pub queue_capacity: usize,
    /// Request limits.
    pub limits: Limits,
    /// Folders of checkpoints clients may switch to by name.
    pub models_dirs: Vec<PathBuf>,
    /// Bytes of weights the model cache keeps loaded besides the model in use.
    pub model_cache_bytes: u64,
    /// Folders of upscaler models requests may name.
    pub upscaler_dirs: Vec<PathBuf>,
    /// Folders of VAEs `sd_vae` may name.
    pub vae_dirs: Vec<PathBuf>,
    /// Folders LoRA requests are confined to.
    pub lora_dirs: Vec<PathBuf>,
    /// Folders ControlNet requests are confined to.
    pub controlnet_dirs: Vec<PathBuf>,
    /// Folders of textual-inversion embeddings loaded with the model.
    pub embedding_dirs: Vec<PathBuf>,
    /// How long finished jobs are kept.
    pub job_expiry: Duration,
    /// Preview every N steps (0 = never).
    pub preview_every: usize,
    /// How long shutdown lets the running job finish.
    pub shutdown_grace: Duration,
    /// Timeouts and connection caps.
    pub http: HttpLimits,
    /// Job table bounds.
    pub store: StoreLimits,
    /// Credentials.
    pub auth: AuthConfig,
    /// Origins allowed by CORS (`*` for any); empty: no CORS headers.
    pub cors_origins: Vec<String>,
    /// Queue mode, `None` for a self-contained worker.
    pub queue: Option<QueueConfig>,
}

impl WorkerConfig {
    /// A CPU config for `model` with the CLI defaults.
    pub fn new(model: ModelSource) -> Self {
        Self {
            model,
            variant: None,
            model_config: None,
            vae: None,
            device: Device::Cpu,
            dtype: None,
            queue_capacity: 16,
            limits: Limits { max_width: 2048, max_height: 2048, max_batch: 4, max_steps: 150, max_body_bytes: 50 * 1024 * 1024 },
            models_dirs: Vec::new(),
            model_cache_bytes: 0,
            upscaler_dirs: Vec::new(),
            vae_dirs: Vec::new(),
            lora_dirs: Vec::new(),
            controlnet_dirs: Vec::new(),
            embedding_dirs: Vec::new(),
            job_expiry: Duration::from_secs(3600),
            preview_every: 1,
            shutdown_grace: Duration::from_secs(30),
            http: HttpLimits {
                header_timeout: Duration::from_secs(30),
                body_timeout: Duration::from_secs(60),
                max_connections: 256,
                max_subscribers: 64,
                max_subscribers_per_job: 8,
            },
            store: StoreLimits { max_jobs: 256, max_bytes: 512 * 1024 * 1024 },
            auth: AuthConfig::default(),
            cors_origins: Vec::new(),
            queue: None,
        }
    }
}

impl Cli {
    /// Validates the arguments into a [`WorkerConfig`].
    pub fn into_config(self) -> Result<WorkerConfig, String> {
        let variant = match self.variant.trim() {
            "" | "auto" => None,
            v => Some(SdVariant::from_name(v).ok_or_else(|| {
                let names: Vec<&str> = SdVariant::ALL.iter().map(|v| v.name()).collect();
                format!("unknown --variant {v:?}; use auto or one of {}", names.join(", "))
            })?),
        };
        let dtype = self.dtype.as_deref().map(sd_models::device::parse_dtype).transpose().map_err(|e| e.to_string())?;
        let device = parse_device(&self.device)?;
        let catalog = (!self.models_dirs.is_empty()).then(|| crate::models::ModelCatalog::new(&self.models_dirs));
        let (model, variant) = match (&self.model, &catalog) {
            // `-m NAME` may name a checkpoint of --models-dir.
            (Some(m), Some(cat)) if !Path::new(m).exists() && !m.starts_with("hub:") && cat.resolve(m).is_some() => {
                (ModelSource::Path(cat.resolve(m).map(|c| c.path).unwrap_or_default()), variant)
            }
            (Some(m), _) => (parse_model(m), variant),
            // The first checkpoint of --models-dir: a models-dir worker never downloads.
            (None, Some(cat)) => match cat.list().into_iter().next() {
                Some(c) => (ModelSource::Path(c.path), variant),
                None => {
                    let dirs: Vec<String> = self.models_dirs.iter().map(|d| d.display().to_string()).collect();
                    return Err(format!(
                        "--models-dir {} holds no checkpoint (.safetensors, .gguf or diffusers folder); add one or pass -m",
                        dirs.join(", ")
                    ));
                }
            },
            // The documented first-run model; a turbo variant cannot be told from its weights.
            (None, None) => (
                ModelSource::Hub(sd_models::DEFAULT_MODEL_REPO.to_string()),
                variant.or(Some(sd_models::DEFAULT_MODEL_VARIANT)),
            ),
        };
        for (name, v) in [("--max-width", self.max_width), ("--max-height", self.max_height), ("--max-batch", self.max_batch), ("--max-steps", self.max_steps)] {
            if v == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        let secs = |name: &str, v: f64| {
            if v.is_finite() && v > 0.0 && v <= 86_400.0 {
                Ok(Duration::from_secs_f64(v))
            } else {
                Err(format!("{name} must be between 0 and 86400 seconds, got {v}"))
            }
        };
        let http = HttpLimits {
            header_timeout: secs("--header-timeout-secs", self.header_timeout_secs)?,
            body_timeout: secs("--body-timeout-secs", self.body_timeout_secs)?,
            max_connections: self.max_connections,
            max_subscribers: self.max_subscribers,
            max_subscribers_per_job: self.max_subscribers_per_job,
        };
        for (name, v) in [("--max-connections", http.max_connections), ("--max-subscribers", http.max_subscribers), ("--max-subscribers-per-job", http.max_subscribers_per_job)] {
            if v == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        // Every queued job and the running one must fit in the table.
        // (In queue mode the capacity bounds the shared stream; the table only mirrors jobs.)
        if self.queue.is_none() && self.max_stored_jobs < self.queue_capacity + 1 {
            return Err(format!(
                "--max-stored-jobs ({}) must be larger than --queue-capacity ({}): queued and running jobs are never evicted",
                self.max_stored_jobs, self.queue_capacity
            ));
        }
        let mut basic = Vec::new();
        for pair in &self.api_auth {
            match pair.split_once(':') {
                Some((u, p)) if !u.is_empty() && !p.is_empty() => basic.push((u.to_string(), p.to_string())),
                _ => return Err("--api-auth takes user:password (both non-empty)".into()),
            }
        }
        if self.api_keys.iter().any(|k| k.trim().is_empty()) {
            return Err("--api-key must not be empty".into());
        }
        let auth = AuthConfig { api_keys: self.api_keys.clone(), basic, metrics_public: self.metrics_public };
        let queue = match &self.queue {
            None if self.front_only => return Err("--front-only needs --queue redis://… (a front serves a shared queue)".into()),
            None => None,
            Some(_) if !cfg!(feature = "queue") => {
                return Err("this build has no queue mode; rebuild sd-worker with the `queue` feature (on by default)".into())
            }
            Some(url) => {
                let name = self.queue_name.trim();
                if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                    return Err(format!("--queue-name {name:?} must be 1–64 letters, digits, `-`, `_` or `.`"));
                }
                if self.queue_max_attempts == 0 {
                    return Err("--queue-max-attempts must be at least 1".into());
                }
                Some(QueueConfig {
                    url: url.trim().to_string(),
                    name: name.to_string(),
                    front_only: self.front_only,
                    claim_idle: secs("--queue-claim-idle-secs", self.queue_claim_idle_secs)?,
                    max_attempts: self.queue_max_attempts,
                })
            }
        };
        Ok(WorkerConfig {
            model,
            variant,
            model_config: self.model_config,
            vae: self.vae,
            device,
            dtype,
            queue_capacity: self.queue_capacity,
            limits: Limits {
                max_width: self.max_width,
                max_height: self.max_height,
                max_batch: self.max_batch,
                max_steps: self.max_steps.min(sd_pipelines::pipeline::MAX_STEPS),
                max_body_bytes: self.max_body_bytes,
            },
            models_dirs: self.models_dirs,
            model_cache_bytes: self.model_cache_mb.saturating_mul(1 << 20),
            upscaler_dirs: self.upscaler_dirs,
            vae_dirs: self.vae_dirs,
            lora_dirs: self.lora_dirs,
            controlnet_dirs: self.controlnet_dirs,
            embedding_dirs: self.embedding_dirs,
            job_expiry: Duration::from_secs(self.job_expiry_secs),
            preview_every: self.preview_every,
            shutdown_grace: Duration::from_secs(self.shutdown_grace_secs),
            http,
            store: StoreLimits { max_jobs: self.max_stored_jobs, max_bytes: self.max_stored_bytes },
            auth,
            cors_origins: self.cors_origins.iter().map(|o| o.trim().trim_end_matches('/').to_string()).filter(|o| !o.is_empty()).collect(),
            queue,
        })
    }
}

/// `hub:owner/name` (or a bare `owner/name` that is not an existing path) is a hub id.
pub fn parse_model(s: &str) -> ModelSource {
    if let Some(repo) = s.strip_prefix("hub:") {
        return ModelSource::Hub(repo.to_string());
    }
    let path = PathBuf::from(s);
    let looks_like_repo = s.split('/').count() == 2 && !s.starts_with(['.', '/', '~']) && !s.contains('\\');
    if !path.exists() && looks_like_repo {
        return ModelSource::Hub(s.to_string());
    }
    ModelSource::Path(path)
}

/// Parses `auto`, `cpu`, `cuda[:N]`, `metal[:N]`.
pub fn parse_device(s: &str) -> Result<Device, String> {
    let s = s.trim().to_ascii_lowercase();
    let (kind, ordinal) = match s.split_once(':') {
        Some((k, n)) => (k.to_string(), n.parse::<usize>().map_err(|_| format!("bad device ordinal in {s:?}; use e.g. cuda:0"))?),
        None => (s.clone(), 0),
    };
    match kind.as_str() {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            let (device, fallback) = sd_models::device::auto_device(ordinal);
            if let Some(why) = fallback {
                tracing::warn!("--device auto: {why}");
            }
            Ok(device)
        }
        "cuda" if !candle_core::utils::cuda_is_available() => {
            Err("this build has no CUDA backend; rebuild with `--features cuda` (tools/build_cuda.sh), or use --device auto or cpu".into())
        }
        "cuda" => Device::new_cuda(ordinal).map_err(|e| {
            format!("cannot open CUDA device {ordinal} ({}); is an NVIDIA GPU with its driver present? --device auto runs on the CPU without one", first_line(&e))
        }),
        "metal" if !candle_core::utils::metal_is_available() => {
            Err("this build has no Metal backend; rebuild with `--features metal` on macOS, or use --device auto or cpu".into())
        }
        "metal" => Device::new_metal(ordinal).map_err(|e| format!("cannot open Metal device {ordinal} ({}); use --device auto or cpu", first_line(&e))),
        other => Err(format!("unknown device {other:?}; use auto, cpu, cuda[:N] or metal[:N]")),
    }
}

/// Describes a device for logs and `/v1/models`.
pub fn describe_device(d: &Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_a_missing_backend_is_a_sentence() {
        assert!(parse_device("cpu").expect("cpu").is_cpu());
        assert!(parse_device(" CPU ").expect("cpu").is_cpu());
        assert!(parse_device("tpu").unwrap_err().contains("unknown device"));
        assert!(parse_device("cuda:x").unwrap_err().contains("ordinal"));
        if !candle_core::utils::cuda_is_available() {
            let e = parse_device("cuda:1").unwrap_err();
            assert!(e.contains("no CUDA backend") && e.contains("--features cuda"), "{e}");
            assert!(parse_device("auto").expect("auto").is_cpu());
        }
        if !candle_core::utils::metal_is_available() {
            assert!(parse_device("metal").unwrap_err().contains("no Metal backend"));
        }
    }

    #[test]
    fn a_models_dir_gives_the_default_model_and_never_the_hub() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
        let dir = std::env::temp_dir().join(format!("sd-worker-cfg-models-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("b")).expect("dir");
        std::fs::copy(fixtures.join("sd2.safetensors"), dir.join("b/zeta.safetensors")).expect("copy");
        std::fs::copy(fixtures.join("sd15.safetensors"), dir.join("alpha.safetensors")).expect("copy");
        let cli = |args: &[&str]| Cli::try_parse_from([&["sd-worker"], args].concat()).expect("args").into_config();
        let d = dir.to_string_lossy().into_owned();
        let canonical = |p: &Path| p.canonicalize().expect("canonical");
        let cfg = cli(&["--models-dir", &d]).expect("config");
        assert_eq!(cfg.model, ModelSource::Path(canonical(&dir.join("alpha.safetensors"))), "the first by name");
        let cfg = cli(&["--models-dir", &d, "-m", "b/zeta"]).expect("config");
        assert_eq!(cfg.model, ModelSource::Path(canonical(&dir.join("b/zeta.safetensors"))), "-m may name a checkpoint");
        let cfg = cli(&["--models-dir", &d, "--model-cache-mb", "3"]).expect("config");
        assert_eq!(cfg.model_cache_bytes, 3 << 20);
        std::fs::create_dir_all(dir.join("empty")).expect("dir");
        let e = cli(&["--models-dir", &dir.join("empty").to_string_lossy()]).expect_err("empty");
        assert!(e.contains("holds no checkpoint"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
