//! Shared worker state: the loaded model's description, the job table and the bounded queue.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};

use axum::http::StatusCode;
use sd_core::family::Capabilities;
use serde_json::Value;

use crate::config::WorkerConfig;
use crate::error::{ApiError, JobError};
use crate::jobs::{lock, Job, JobSpec};
use crate::controlnet::ControlNetFolders;
use crate::models::ModelCatalog;
use crate::lora::LoraFolders;
use crate::metrics::Metrics;

/// What the HTTP side knows about the loaded model (the models themselves stay on the engine thread).
/// In queue mode workers publish it to Redis, and fronts without a model validate against it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelInfo {
    /// The key jobs name it by: its `--models-dir` name, else the display name.
    #[serde(default)]
    pub key: String,
    /// Display name (folder or file stem, or the repo id).
    pub name: String,
    /// Where it was loaded from.
    pub source: String,
    /// Weight dtype.
    pub dtype: String,
    /// Device.
    pub device: String,
    /// What the model can do and how it reads a request (from its family crate): tasks, defaults,
    /// size multiple, which fields it ignores, the scheduler config sampler choices are checked against.
    pub caps: Capabilities,
    /// The UNet's config, which ControlNets are checked against before a job is queued (SD only).
    pub unet: Option<sd_models::UNetConfig>,
    /// The file name A1111 lists it by: relative to its models folder with the extension
    /// (`xl/juggernaut.safetensors`), the folder's name for a diffusers folder.
    #[serde(default)]
    pub file_name: Option<String>,
    /// SHA-256 of a single-file model (A1111's `Model hash` is its first 10 hex digits); `None` for folders.
    #[serde(default)]
    pub sha256: Option<String>,
    /// Textual-inversion embeddings loaded with the model, and the files skipped.
    #[serde(default)]
    pub embeddings: EmbeddingList,
}

/// The textual-inversion embeddings of a loaded model.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct EmbeddingList {
    /// Usable in prompts.
    pub loaded: Vec<EmbeddingEntry>,
    /// Not loaded (another model's embedding, an unreadable file).
    pub skipped: Vec<EmbeddingEntry>,
}

/// One embedding of an [`EmbeddingList`].
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct EmbeddingEntry {
    /// The name prompts use.
    pub name: String,
    /// Prompt positions it fills (0 when skipped).
    pub vectors: usize,
    /// Vector width (0 when skipped).
    pub width: usize,
    /// Why it was skipped.
    pub reason: Option<String>,
}

/// Model loading state.
#[derive(Debug, Clone)]
pub enum ModelState {
    /// The engine is loading the model.
    Loading,
    /// Loaded and serving.
    Ready(Arc<ModelInfo>),
    /// Loading failed; the message says why.
    Failed(String),
}

/// What the engine thread is asked to do, in order.
#[derive(Debug)]
pub enum EngineMsg {
    /// Run a job (on the model its spec names).
    Job(Arc<Job>),
    /// Load a model (or mark it used, if loaded) and answer with its description.
    Load {
        /// The model's key.
        key: String,
        /// Where the answer goes.
        reply: tokio::sync::oneshot::Sender<Result<Arc<ModelInfo>, String>>,
    },
    /// Upscale pictures (A1111's extras routes).
    Upscale {
        /// What to do.
        request: Box<UpscaleRequest>,
        /// The upscaled pictures, in order, or why not.
        reply: tokio::sync::oneshot::Sender<Result<Vec<image::DynamicImage>, String>>,
    },
    /// Read the `--embeddings-dir` folders afresh into every loaded model.
    ReloadEmbeddings {
        /// Answered when done.
        reply: tokio::sync::oneshot::Sender<()>,
    },
}

/// How an extras request enlarges its pictures.
#[derive(Debug, Clone)]
pub enum UpscalerChoice {
    /// A Lanczos resize (A1111's "None" and "Lanczos").
    Lanczos,
    /// A nearest-neighbour resize.
    Nearest,
    /// An ESRGAN-family model of `--upscaler-dir`.
    Model(sd_pipelines::hires::EsrganUpscaler),
}

/// An extras upscale: pictures, each one's scale factor, and the upscalers (the second blended in at a
/// visibility, as A1111's `upscaler_2`).
#[derive(Debug)]
pub struct UpscaleRequest {
    /// The pictures with their scale factors (A1111's `upscale_by`; the result is each side times it,
    /// rounded down to a multiple of 8, before any crop).
    pub images: Vec<(image::DynamicImage, f64)>,
    /// Centre-crop each result to this size (A1111's `upscaling_crop` with a target size).
    pub crop: Option<(u32, u32)>,
    /// The first upscaler.
    pub first: UpscalerChoice,
    /// The second upscaler and its visibility in (0, 1].
    pub second: Option<(UpscalerChoice, f32)>,
}

/// Where the engine finds a model's weights.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelLocation {
    /// The `-m` model (a path or a hub id), with `--model-config` and `--variant`.
    Primary,
    /// A checkpoint of `--models-dir`.
    Catalog(std::path::PathBuf),
}

#[derive(Debug)]
struct Queue {
    waiting: usize,
    shutting_down: bool,
    tx: Option<mpsc::Sender<EngineMsg>>,
}

/// State shared by every handler and the engine thread.
#[derive(Debug)]
pub struct AppState {
    /// Validated configuration.
    pub config: WorkerConfig,
    /// Allowed LoRA folders.
    pub loras: LoraFolders,
    /// Allowed ControlNet folders.
    pub controlnets: ControlNetFolders,
    /// The checkpoints of `--models-dir`.
    pub catalog: ModelCatalog,
    /// Upscaler models of `--upscaler-dir`.
    pub upscalers: crate::upscalers::UpscalerFolders,
    /// VAEs of `--vae-dir`.
    pub vaes: crate::models::VaeFolders,
    /// The VAE `/sdapi/v1/options` chose (`None`: the one each model loaded with).
    active_vae: RwLock<Option<String>>,
    /// The key of the `-m` model.
    pub primary_key: String,
    /// Extras upscales waiting for or running on the engine.
    extras_waiting: std::sync::atomic::AtomicUsize,
    /// Descriptions of every model loaded so far, by key (kept after the model itself is evicted, so
    /// requests for it validate without a reload).
    infos: RwLock<HashMap<String, Arc<ModelInfo>>>,
    model: RwLock<ModelState>,
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    queue: Mutex<Queue>,
    current: Mutex<Option<Arc<Job>>>,
    /// Counters and histograms.
    pub metrics: Metrics,
    subscribers: std::sync::atomic::AtomicUsize,
    id_seed: u64,
    next_id: AtomicU64,
    #[cfg(feature = "queue")]
    fleet: std::sync::OnceLock<Arc<crate::queue::RedisQueue>>,
}

impl AppState {
    /// State with an empty queue feeding `tx`.
    pub fn new(config: WorkerConfig, tx: mpsc::Sender<EngineMsg>) -> Self {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(crate::jobs::unix_now());
        let loras = LoraFolders::new(&config.lora_dirs);
        let controlnets = ControlNetFolders::new(&config.controlnet_dirs);
        let catalog = ModelCatalog::new(&config.models_dirs);
        let upscalers = crate::upscalers::UpscalerFolders::new(&config.upscaler_dirs);
        let vaes = crate::models::VaeFolders::new(&config.vae_dirs);
        let primary_key = match &config.model {
            crate::config::ModelSource::Path(p) => p.canonicalize().ok().and_then(|c| catalog.by_path(&c)).map(|c| c.name),
            crate::config::ModelSource::Hub(_) => None,
        }
        .unwrap_or_else(|| {
            // A `-m` model outside the folders whose name a checkpoint already has goes by its file name (or
            // path), so the two never share a key.
            let name = crate::engine::model_name(&config.model);
            let taken = |n: &str| catalog.list().iter().any(|c| c.name == n);
            match &config.model {
                crate::config::ModelSource::Path(p) if taken(&name) => {
                    let file = p.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
                    if file.is_empty() || taken(&file) { p.display().to_string() } else { file }
                }
                _ => name,
            }
        });
        Self {
            config,
            loras,
            controlnets,
            catalog,
            upscalers,
            vaes,
            active_vae: RwLock::new(None),
            primary_key,
            infos: RwLock::new(HashMap::new()),
            extras_waiting: std::sync::atomic::AtomicUsize::new(0),
            model: RwLock::new(ModelState::Loading),
            jobs: Mutex::new(HashMap::new()),
            queue: Mutex::new(Queue { waiting: 0, shutting_down: false, tx: Some(tx) }),
            current: Mutex::new(None),
            metrics: Metrics::default(),
            subscribers: std::sync::atomic::AtomicUsize::new(0),
            id_seed: h.finish(),
            next_id: AtomicU64::new(1),
            #[cfg(feature = "queue")]
            fleet: std::sync::OnceLock::new(),
        }
    }

    /// The shared queue, in queue mode.
    #[cfg(feature = "queue")]
    pub fn fleet(&self) -> Option<&Arc<crate::queue::RedisQueue>> {
        self.fleet.get()
    }

    /// Joins the shared queue (once, at startup).
    #[cfg(feature = "queue")]
    pub fn set_fleet(&self, q: Arc<crate::queue::RedisQueue>) {
        let _ = self.fleet.set(q);
    }

    /// Queues a job: on this worker's engine, or on the fleet's queue in queue mode.
    pub async fn submit_job(self: &Arc<Self>, spec: JobSpec, parameters: Value, owner: Option<String>) -> Result<Arc<Job>, ApiError> {
        #[cfg(feature = "queue")]
        if let Some(q) = self.fleet() {
            if self.is_shutting_down() {
                return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", None, "this front is shutting down; use another one"));
            }
            return q.clone().submit(self, self.new_id(), spec, parameters, owner).await;
        }
        self.submit(spec, parameters, owner)
    }

    /// Looks a job up: in this process's table, then (queue mode) in the fleet's queue.
    pub async fn find_job(self: &Arc<Self>, id: &str) -> Result<Option<Arc<Job>>, ApiError> {
        if let Some(j) = self.job(id) {
            return Ok(Some(j));
        }
        #[cfg(feature = "queue")]
        if let Some(q) = self.fleet() {
            // Ids are only ever made of these characters; anything else cannot be a key.
            if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Ok(None);
            }
            return q.load(self, id).await;
        }
        Ok(None)
    }

    /// Registers a mirror of a fleet job (or returns the one already registered) and follows its
    /// events after `last`.
    #[cfg(feature = "queue")]
    pub fn adopt_mirror(&self, job: Arc<Job>, last: String) -> Arc<Job> {
        let mut jobs = lock(&self.jobs);
        if let Some(existing) = jobs.get(&job.id) {
            return existing.clone();
        }
        jobs.insert(job.id.clone(), job.clone());
        drop(jobs);
        if let Some(q) = self.fleet() {
            tokio::spawn(q.clone().follow(job.clone(), last));
        }
        self.trim_store();
        job
    }

    /// Hands a job taken from the fleet's queue to this worker's engine; false when the engine has stopped.
    pub fn run_local(&self, job: Arc<Job>) -> bool {
        let mut q = lock(&self.queue);
        let Some(tx) = q.tx.as_ref() else { return false };
        if tx.send(EngineMsg::Job(job)).is_err() {
            return false;
        }
        q.waiting += 1;
        true
    }

    /// Whether shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        lock(&self.queue).shutting_down
    }

    /// The loading state.
    pub fn model_state(&self) -> ModelState {
        self.model.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Sets the loading state (engine only).
    pub fn set_model_state(&self, s: ModelState) {
        *self.model.write().unwrap_or_else(|e| e.into_inner()) = s;
    }

    /// The VAE requests get when they name none (A1111's `sd_vae` option).
    pub fn active_vae(&self) -> Option<String> {
        self.active_vae.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Sets the VAE later requests get.
    pub fn set_active_vae(&self, vae: Option<String>) {
        *self.active_vae.write().unwrap_or_else(|e| e.into_inner()) = vae;
    }

    /// Records a loaded model's description.
    pub fn remember_model(&self, info: Arc<ModelInfo>) {
        self.infos.write().unwrap_or_else(|e| e.into_inner()).insert(info.key.clone(), info);
    }

    /// Where the engine loads the model `key` from: the `-m` model, or a `--models-dir` checkpoint of that
    /// exact name (never a path a client wrote).
    pub fn model_location(&self, key: &str) -> Option<ModelLocation> {
        if key.is_empty() || key == self.primary_key {
            return Some(ModelLocation::Primary);
        }
        self.catalog.list().into_iter().find(|c| c.name == key).map(|c| ModelLocation::Catalog(c.path))
    }

    /// The key of the model a client names (`sd15`, `sd15.safetensors`, `sd15.safetensors [hash]`): the
    /// model in use, the `-m` model or a `--models-dir` checkpoint; else a 400 naming `field` that says what
    /// can be named.
    pub fn resolve_model(&self, field: &str, requested: &str) -> Result<String, ApiError> {
        if let ModelState::Ready(m) = self.model_state() {
            if crate::a1111::names_model(requested, &m) {
                return Ok(m.key.clone());
            }
        }
        // The `-m` model first, then every model described so far (on a front: those the workers published).
        let primary = self.model_info(&self.primary_key);
        if let Some(p) = primary.filter(|p| crate::a1111::names_model(requested, p)) {
            return Ok(p.key.clone());
        }
        let mut known = self.known_models();
        known.sort_by(|a, b| a.key.cmp(&b.key));
        if let Some(m) = known.iter().find(|m| crate::a1111::names_model(requested, m)) {
            return Ok(m.key.clone());
        }
        let checkpoints = self.checkpoints();
        if let Some(c) = crate::models::resolve_in(&checkpoints, requested) {
            return Ok(c.name);
        }
        let why = if checkpoints.is_empty() {
            format!("this worker serves {:?} only; start it with --models-dir to switch between checkpoints", self.primary_key)
        } else {
            let names: Vec<String> = checkpoints.into_iter().take(20).map(|c| c.name).collect();
            format!("no checkpoint {requested:?} in the models folders (GET /sdapi/v1/sd-models lists them: {})", names.join(", "))
        };
        Err(ApiError::invalid(field, why))
    }

    /// The description of the model a client names, loading it first if it never was (a request for it
    /// is then validated against its own capabilities).
    pub async fn model_for(&self, field: &str, requested: &str) -> Result<Arc<ModelInfo>, ApiError> {
        let key = self.resolve_model(field, requested)?;
        if let Some(info) = self.model_info(&key) {
            return Ok(info);
        }
        if self.has_engine() {
            return self.load_model(field, &key).await;
        }
        // A front: the description a worker published, else (no worker loaded it yet) the checks of the model
        // in use, and the worker that takes the job loads it.
        #[cfg(feature = "queue")]
        if let Some(q) = self.fleet() {
            if let Some(info) = q.described_model(&key).await? {
                return Ok(Arc::new(info));
            }
        }
        let ready = self.ready_model()?;
        Ok(Arc::new(ModelInfo { key: key.clone(), name: key, sha256: None, file_name: None, ..(*ready).clone() }))
    }

    /// Every model described so far.
    pub fn known_models(&self) -> Vec<Arc<ModelInfo>> {
        self.infos.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }

    /// The checkpoints clients may name: `--models-dir`'s, or on a front without the folders, those its
    /// workers publish.
    pub fn checkpoints(&self) -> Vec<crate::models::Checkpoint> {
        #[cfg(feature = "queue")]
        if self.catalog.is_empty() {
            if let Some(q) = self.fleet() {
                return q.checkpoints();
            }
        }
        self.catalog.list()
    }

    /// Whether this process has an engine (a front in queue mode has none).
    fn has_engine(&self) -> bool {
        !self.config.queue.as_ref().is_some_and(|q| q.front_only)
    }

    /// The model a request gets when it names none: in queue mode the fleet's choice (read from Redis on
    /// every request, so picking a model on one front and generating through another works), else the
    /// model chosen here. A 503 while the first model loads.
    pub async fn active_model(&self) -> Result<Arc<ModelInfo>, ApiError> {
        let ready = self.ready_model()?;
        #[cfg(feature = "queue")]
        if let Some(q) = self.fleet() {
            if let (Some(key), info) = q.active_model().await? {
                if let Some(info) = info.map(Arc::new).or_else(|| self.model_info(&key)) {
                    return Ok(info);
                }
                // Chosen on a front and not loaded by any worker yet: checked against the fleet's own
                // model's capabilities; the worker that takes the job loads the chosen one.
                if key != ready.key {
                    return Ok(Arc::new(ModelInfo { key: key.clone(), name: key, sha256: None, file_name: None, ..(*ready).clone() }));
                }
            }
        }
        Ok(ready)
    }

    /// The description of the model `key`, if it was ever loaded.
    pub fn model_info(&self, key: &str) -> Option<Arc<ModelInfo>> {
        self.infos.read().unwrap_or_else(|e| e.into_inner()).get(key).cloned()
    }

    /// Makes `key` the model later requests get (A1111's `sd_model_checkpoint` option), loading it first.
    /// In queue mode the choice is the fleet's (stored in Redis); a front, which loads nothing, records it
    /// and the first worker to run a job on it loads it.
    pub async fn switch_model(&self, field: &str, key: &str) -> Result<(), ApiError> {
        let info = if self.has_engine() { Some(self.load_model(field, key).await?) } else { self.model_info(key) };
        #[cfg(feature = "queue")]
        if let Some(q) = self.fleet() {
            q.set_active_model(key, info.as_deref()).await?;
        }
        tracing::info!(model = %key, "requests now use this model");
        if let Some(info) = info {
            self.set_model_state(ModelState::Ready(info));
        }
        Ok(())
    }

    /// Runs an extras upscale on the engine (after the jobs queued before) and waits for the pictures; at
    /// most `--queue-capacity` extras wait at once (429 beyond).
    pub async fn upscale(&self, request: UpscaleRequest) -> Result<Vec<image::DynamicImage>, ApiError> {
        struct Slot<'a>(&'a std::sync::atomic::AtomicUsize);
        impl Drop for Slot<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        if self.extras_waiting.fetch_add(1, Ordering::SeqCst) >= self.config.queue_capacity.max(1) {
            self.extras_waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(ApiError::new(StatusCode::TOO_MANY_REQUESTS, "queue_full", None, "too many upscales are waiting; retry shortly").with_retry_after(5));
        }
        let _slot = Slot(&self.extras_waiting);
        let (reply, rx) = tokio::sync::oneshot::channel();
        {
            let q = lock(&self.queue);
            let sent = self.has_engine() && !q.shutting_down && q.tx.as_ref().is_some_and(|tx| tx.send(EngineMsg::Upscale { request: Box::new(request), reply }).is_ok());
            if !sent {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no_engine",
                    None,
                    "this process runs no models (a queue front, or shutting down): send extras requests to a worker",
                ));
            }
        }
        match rx.await {
            Ok(Ok(images)) => Ok(images),
            Ok(Err(msg)) => Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "upscale_failed", Some("upscaler_1".into()), msg)),
            Err(_) => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "engine_stopped", None, "the engine stopped")),
        }
    }

    /// Asks the engine to read the embedding folders afresh (after the jobs queued before) and waits.
    pub async fn reload_embeddings(&self) -> Result<(), ApiError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        {
            let q = lock(&self.queue);
            let sent = !q.shutting_down && q.tx.as_ref().is_some_and(|tx| tx.send(EngineMsg::ReloadEmbeddings { reply }).is_ok());
            if !sent || !self.has_engine() {
                return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", None, "this process loads no models (a front, or shutting down)"));
            }
        }
        rx.await.map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "engine_stopped", None, "the engine stopped"))
    }

    /// Asks the engine to load the model `key` (after the jobs queued before) and waits for it.
    pub async fn load_model(&self, field: &str, key: &str) -> Result<Arc<ModelInfo>, ApiError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        {
            let q = lock(&self.queue);
            let sent = !q.shutting_down && q.tx.as_ref().is_some_and(|tx| tx.send(EngineMsg::Load { key: key.to_string(), reply }).is_ok());
            if !sent {
                return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", None, "this process loads no models (a front, or shutting down)"));
            }
        }
        match rx.await {
            Ok(Ok(info)) => Ok(info),
            Ok(Err(msg)) => Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "model_load_failed", Some(field.to_string()), format!("the checkpoint {key:?} failed to load: {msg}"))),
            Err(_) => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "engine_stopped", None, "the engine stopped before the model loaded")),
        }
    }

    /// The model description, or a 503 while loading / after a failed load.
    pub fn ready_model(&self) -> Result<Arc<ModelInfo>, ApiError> {
        match self.model_state() {
            ModelState::Ready(m) => Ok(m),
            ModelState::Loading => Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "model_loading",
                None,
                "the model is still loading; retry when GET /ready answers 200",
            )
            .with_retry_after(5)),
            ModelState::Failed(msg) => {
                Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "model_failed", None, format!("the model failed to load: {msg}")))
            }
        }
    }

    fn new_id(&self) -> String {
        use std::hash::{BuildHasher, Hasher};
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(self.id_seed ^ n);
        format!("job_{:012x}{:04x}", h.finish() >> 16, n & 0xffff)
    }

    /// Queues a job for `owner`, or answers 429 (queue full) / 503 (shutting down).
    pub fn submit(&self, spec: JobSpec, parameters: Value, owner: Option<String>) -> Result<Arc<Job>, ApiError> {
        let mut q = lock(&self.queue);
        if q.shutting_down {
            return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", None, "the worker is shutting down; use another worker"));
        }
        if q.waiting >= self.config.queue_capacity {
            self.metrics.rejected.fetch_add(1, Ordering::Relaxed);
            let per_job = self.metrics.mean_job_seconds().unwrap_or(5.0);
            let wait = (per_job * (q.waiting as f64 + 1.0)).ceil().clamp(1.0, 3600.0) as u64;
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "queue_full",
                None,
                format!("{} jobs are already waiting (the queue capacity); retry after the Retry-After seconds", q.waiting),
            )
            .with_retry_after(wait));
        }
        let job = Arc::new(Job::new(self.new_id(), spec, parameters, owner));
        let Some(tx) = q.tx.as_ref() else {
            return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", None, "the engine has stopped"));
        };
        lock(&self.jobs).insert(job.id.clone(), job.clone());
        if tx.send(EngineMsg::Job(job.clone())).is_err() {
            lock(&self.jobs).remove(&job.id);
            return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "engine_stopped", None, "the engine thread has stopped; restart the worker"));
        }
        // The queue lock is held, so the engine cannot unqueue this job before it is counted.
        q.waiting += 1;
        tracing::info!(job_id = %job.id, operation = job.operation, queued = q.waiting, "job queued");
        drop(q);
        self.trim_store();
        Ok(job)
    }

    /// Evicts the oldest finished jobs until the table is within `--max-stored-jobs` and
    /// `--max-stored-bytes` (queued and running jobs always stay).
    pub fn trim_store(&self) {
        let cap = &self.config.store;
        let mut jobs = lock(&self.jobs);
        let mut total: usize = 0;
        let mut finished = Vec::new();
        for j in jobs.values() {
            let bytes = j.stored_bytes();
            total += bytes;
            if let Some(t) = j.finished_at() {
                finished.push((t, j.id.clone(), bytes));
            }
        }
        if jobs.len() <= cap.max_jobs && total <= cap.max_bytes {
            return;
        }
        finished.sort_by_key(|f| f.0);
        let mut evicted = 0usize;
        for (_, id, bytes) in finished {
            if jobs.len() <= cap.max_jobs && total <= cap.max_bytes {
                break;
            }
            jobs.remove(&id);
            total -= bytes;
            evicted += 1;
        }
        self.metrics.evicted.fetch_add(evicted as u64, Ordering::Relaxed);
        tracing::debug!(evicted, jobs = jobs.len(), bytes = total, "job store trimmed");
    }

    /// Bytes the job table holds (what `--max-stored-bytes` bounds).
    pub fn stored_bytes(&self) -> usize {
        lock(&self.jobs).values().map(|j| j.stored_bytes()).sum()
    }

    /// Jobs in the table.
    pub fn stored_jobs(&self) -> usize {
        lock(&self.jobs).len()
    }

    /// Registers an SSE stream on `job`, or answers 429 when the per-job or total cap is reached.
    pub fn subscribe(self: &Arc<Self>, job: &Arc<Job>) -> Result<Subscription, ApiError> {
        let limits = &self.config.http;
        let full = |what: &str, n: usize| {
            ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too_many_subscribers", Some("id".into()), format!("{n} event streams are open {what}, the limit; close one or poll GET /v1/jobs/{{id}}"))
                .with_retry_after(1)
        };
        if self.subscribers.fetch_add(1, Ordering::SeqCst) >= limits.max_subscribers {
            self.subscribers.fetch_sub(1, Ordering::SeqCst);
            return Err(full("on this worker", limits.max_subscribers));
        }
        if job.subscribers.fetch_add(1, Ordering::SeqCst) >= limits.max_subscribers_per_job {
            job.subscribers.fetch_sub(1, Ordering::SeqCst);
            self.subscribers.fetch_sub(1, Ordering::SeqCst);
            return Err(full("on this job", limits.max_subscribers_per_job));
        }
        Ok(Subscription { state: self.clone(), job: job.clone() })
    }

    /// Called once per job when it leaves the queue (started by the engine or cancelled).
    pub fn unqueue(&self) {
        let mut q = lock(&self.queue);
        q.waiting = q.waiting.saturating_sub(1);
    }

    /// Jobs waiting behind the running one (queue mode: jobs in the fleet's stream).
    pub fn queue_depth(&self) -> usize {
        #[cfg(feature = "queue")]
        if let Some(q) = self.fleet() {
            return q.depth();
        }
        lock(&self.queue).waiting
    }

    /// Looks a job up.
    pub fn job(&self, id: &str) -> Option<Arc<Job>> {
        lock(&self.jobs).get(id).cloned()
    }

    /// The job on the engine, if any (a front without one: a running fleet job it follows).
    pub fn current(&self) -> Option<Arc<Job>> {
        let local = lock(&self.current).clone();
        local.or_else(|| lock(&self.jobs).values().find(|j| j.remote && j.status() == crate::jobs::JobStatus::Running).cloned())
    }

    /// Sets the job on the engine (engine only).
    pub fn set_current(&self, job: Option<Arc<Job>>) {
        *lock(&self.current) = job;
    }

    /// Cancels a job: at once if it is queued, within one step if it is running.
    pub fn cancel(&self, job: &Job, err: JobError) {
        tracing::info!(job_id = %job.id, reason = %err.message, "cancel requested");
        if job.remote {
            #[cfg(feature = "queue")]
            if let (Some(q), Ok(rt)) = (self.fleet().cloned(), tokio::runtime::Handle::try_current()) {
                let id = job.id.clone();
                rt.spawn(async move {
                    if let Err(e) = q.cancel(&id, &err).await {
                        tracing::warn!(job_id = %id, error = %e.message, "cannot cancel the job on the queue");
                    }
                });
            }
            return;
        }
        if job.request_cancel() {
            self.unqueue();
            self.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
            job.finish_error(crate::jobs::JobStatus::Cancelled, err);
            self.trim_store();
        }
    }

    /// Drops finished jobs older than the expiry; returns how many went.
    pub fn expire(&self) -> usize {
        let ttl = self.config.job_expiry;
        let mut jobs = lock(&self.jobs);
        let before = jobs.len();
        jobs.retain(|_, j| j.with_inner(|g| g.finished_at.map(|t| t.elapsed() < ttl).unwrap_or(true)));
        before - jobs.len()
    }

    /// Stops accepting jobs and cancels every queued one; returns the running job, if any.
    pub fn begin_shutdown(&self) -> Option<Arc<Job>> {
        lock(&self.queue).shutting_down = true;
        #[cfg(feature = "queue")]
        if let Some(q) = self.fleet() {
            q.begin_drain();
        }
        let jobs: Vec<Arc<Job>> = lock(&self.jobs).values().cloned().collect();
        for j in jobs {
            // Fleet jobs live in Redis and go on without this process.
            if !j.remote && j.status() == crate::jobs::JobStatus::Queued {
                self.cancel(&j, JobError::new("shutdown", "the worker is shutting down; submit the job again elsewhere"));
            }
        }
        // Only this process's engine: a fleet job a front follows is not this process's to stop.
        lock(&self.current).clone()
    }

    /// Closes the queue so the engine thread exits once idle.
    pub fn close_queue(&self) {
        lock(&self.queue).tx = None;
    }
}

/// An open SSE stream, counted against the subscriber caps until dropped.
pub struct Subscription {
    state: Arc<AppState>,
    job: Arc<Job>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.job.subscribers.fetch_sub(1, Ordering::SeqCst);
        self.state.subscribers.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Cancels its job when dropped while armed: a synchronous route whose request is dropped (its
/// connection failed) stops its work.
pub struct CancelOnDrop {
    state: Arc<AppState>,
    job: Option<Arc<Job>>,
}

impl CancelOnDrop {
    /// Guards `job`.
    pub fn new(state: Arc<AppState>, job: Arc<Job>) -> Self {
        Self { state, job: Some(job) }
    }

    /// Keeps the job running after the guard is dropped.
    pub fn disarm(&mut self) {
        self.job = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(job) = self.job.take() {
            if !job.status().is_terminal() {
                tracing::info!(job_id = %job.id, "client disconnected; cancelling its job");
                self.state.cancel(&job, JobError::new("cancelled", "the client disconnected"));
            }
        }
    }
}
