//! The engine thread: it alone owns the models, loads them, and runs jobs one at a time.

use std::ops::ControlFlow;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use base64::Engine as _;
use sd_models::loader::{load, read_folder_config, LoadOptions, StableDiffusionModels};
use sd_core::image_io::{encode_png, image_to_tensor, infotext, mask_to_tensor, tensor_to_images};
use sd_core::run::{ImageToImage, Inpaint, RunContext, StepProgress, Task};
use sd_pipelines::image_io::a1111_parameters;
use sd_controlnet::preprocess::prepare_image;
use sd_controlnet::{ControlNetHook, ControlNetModel, ControlUnit};
use sd_pipelines::control::ResidualHook;
use sd_pipelines::hires::generate_hires;
use sd_pipelines::pipeline::{generate, SdExtras};
use sd_core::preview::latents_to_rgb;
use sd_flux::{FluxLoadOptions, FluxModels};

use crate::config::{describe_device, ModelSource, WorkerConfig};
use crate::error::JobError;
use crate::jobs::{Job, JobResult, JobSpec, JobStatus, Operation, Preview};
use crate::controlnet::ResolvedControlNet;
use crate::lora::ResolvedLora;
use crate::state::{AppState, ModelInfo, ModelState};

/// Base64 with padding (what every API here sends and accepts).
pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Display name of a model source.
pub fn model_name(src: &ModelSource) -> String {
    match src {
        ModelSource::Hub(id) => id.clone(),
        ModelSource::Path(p) => {
            let stem = if p.is_dir() { p.file_name() } else { p.file_stem() };
            stem.map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| p.display().to_string())
        }
    }
}

fn load_options(cfg: &WorkerConfig) -> Result<LoadOptions, String> {
    let config = match &cfg.model_config {
        Some(dir) => Some(read_folder_config(dir, cfg.variant).map_err(|e| e.to_string())?),
        None => None,
    };
    Ok(LoadOptions {
        variant: cfg.variant,
        dtype: cfg.dtype,
        device: cfg.device.clone(),
        config,
        prefer_fp16_files: prefer_fp16(cfg),
        vae: cfg.vae.clone(),
        tokenizer_dir: cfg.model_config.clone(),
        ..LoadOptions::default()
    })
}

/// Loads a FLUX model and remembers where its transformer came from, for LoRA reloads.
fn flux_engine(cfg: &WorkerConfig, p: &std::path::Path) -> Result<Engine, String> {
    let models = load_flux(cfg, p)?;
    let info = Arc::new(ModelInfo { sha256: file_sha256(p), ..describe_flux(&models, cfg) });
    // Where the transformer's rotary split is described: the components folder, or the model's own.
    let repo = match (&cfg.model_config, p.is_dir()) {
        (Some(r), false) => r.clone(),
        (None, false) => p.parent().map(|d| d.to_path_buf()).unwrap_or_default(),
        (_, true) => p.to_path_buf(),
    };
    let axes = sd_flux::transformer::folder_axes(&repo.join("transformer")).map_err(|e| e.to_string())?;
    let backend = FluxBackend { models, transformer: p.to_path_buf(), axes, applied: Vec::new() };
    Ok(Engine { backend: Backend::Flux(Box::new(backend)), info })
}

/// Half-precision weight files are worth fetching only for half-precision GPU runs.
fn prefer_fp16(cfg: &WorkerConfig) -> bool {
    !cfg.device.is_cpu() && cfg.dtype != Some(candle_core::DType::F32)
}

/// The model's local folder or file. A hub id is downloaded once here (feature `hub`), so the
/// FLUX check, the loader and every LoRA reload read the same local snapshot without asking the
/// hub again.
fn local_model(cfg: &WorkerConfig) -> Result<std::path::PathBuf, String> {
    match &cfg.model {
        ModelSource::Path(p) => Ok(p.clone()),
        #[cfg(feature = "hub")]
        ModelSource::Hub(id) => {
            let model = sd_models::hub::HubModel::parse(id).map_err(|e| e.to_string())?;
            let hub = sd_models::hub::HubOptions::from_env().map_err(|e| e.to_string())?.for_dtype(cfg.dtype);
            tracing::info!(model = %model, cache = %hub.cache_dir.display(), offline = hub.offline, "resolving the model on the Hugging Face hub");
            sd_models::hub::download(&model, &hub).map_err(|e| e.to_string())
        }
        #[cfg(not(feature = "hub"))]
        ModelSource::Hub(id) => Err(format!(
            "{id:?} is neither an existing path nor usable as a hub id: build with the `hub` feature (on by default) to download from the Hugging Face hub"
        )),
    }
}

fn source_name(cfg: &WorkerConfig) -> String {
    match &cfg.model {
        ModelSource::Path(p) => p.display().to_string(),
        ModelSource::Hub(id) => format!("hub:{id}"),
    }
}

/// The SHA-256 of a single-file model, for A1111's `Model hash` (read once at load; folders have none).
fn file_sha256(path: &std::path::Path) -> Option<String> {
    if !path.is_file() {
        return None;
    }
    let t = Instant::now();
    match sd_models::hash::sha256(path) {
        Ok(h) => {
            tracing::info!(secs = t.elapsed().as_secs_f64(), "model hashed (A1111 Model hash {})", &h[..10]);
            Some(h)
        }
        Err(e) => {
            tracing::warn!(error = %e, "the model file could not be hashed; infotext goes without Model hash");
            None
        }
    }
}

fn describe(models: &StableDiffusionModels, cfg: &WorkerConfig) -> Result<ModelInfo, String> {
    // A scheduler config no sampler can honour stops loading here, not every request later.
    let caps = sd_pipelines::pipeline::capabilities(models).map_err(|e| e.to_string())?;
    Ok(ModelInfo {
        name: model_name(&cfg.model),
        source: source_name(cfg),
        dtype: format!("{:?}", models.dtype).to_lowercase(),
        device: describe_device(&models.device),
        caps,
        unet: Some(models.unet.config().clone()),
        sha256: None,
    })
}

fn describe_flux(models: &FluxModels, cfg: &WorkerConfig) -> ModelInfo {
    ModelInfo {
        name: model_name(&cfg.model),
        source: source_name(cfg),
        dtype: format!("{:?}", models.dtype).to_lowercase(),
        device: describe_device(&models.device),
        caps: sd_flux::pipeline::capabilities(models),
        unet: None,
        sha256: None,
    }
}

/// Loads a FLUX model: a diffusers folder, or a transformer file (BFL `.safetensors` or `.gguf`)
/// whose other components come from `--model-config` or the file's folder.
fn load_flux(cfg: &WorkerConfig, path: &std::path::Path) -> Result<FluxModels, String> {
    let opts = FluxLoadOptions { dtype: cfg.dtype, device: cfg.device.clone(), ..FluxLoadOptions::default() };
    match (&cfg.model_config, path.is_dir()) {
        (Some(repo), false) => {
            let files = sd_flux::FluxFiles::with_components_from(path, None, repo);
            sd_flux::load_source(&sd_flux::FluxSource::Files(files), &opts)
        }
        _ => sd_flux::load(path, &opts),
    }
    .map_err(|e| e.to_string())
}

/// A Stable Diffusion model and what is merged into or attached to it.
struct SdBackend {
    models: StableDiffusionModels,
    /// The local folder or file the models were loaded from, reloaded when the LoRA set changes.
    path: std::path::PathBuf,
    /// Options of the plain model (no LoRA hook).
    opts: LoadOptions,
    /// The LoRA files and strengths merged into `models` now (empty: the plain model).
    applied: Vec<(std::path::PathBuf, f64)>,
    /// ControlNets loaded for earlier jobs, most recently used last (kept so a client that sends the
    /// same ControlNet with every job does not pay its load each time).
    controlnets: Vec<(std::path::PathBuf, ControlNetModel)>,
}

/// ControlNets kept loaded between jobs.
const CONTROLNET_CACHE: usize = 4;

/// What the engine thread serves.
enum Backend {
    /// Stable Diffusion 1.x/2.x/SDXL, with LoRAs and ControlNets.
    Sd(Box<SdBackend>),
    /// FLUX.1 dev or schnell, with LoRAs.
    Flux(Box<FluxBackend>),
}

/// A FLUX model, where its transformer came from and the LoRAs merged into it.
struct FluxBackend {
    models: FluxModels,
    /// The transformer file or diffusers folder, reloaded when the LoRA set changes.
    transformer: std::path::PathBuf,
    /// Rotary split from a diffusers `transformer/config.json`, when one describes the file.
    axes: Option<Vec<usize>>,
    /// The LoRA files and strengths merged into the transformer now.
    applied: Vec<(std::path::PathBuf, f64)>,
}

impl FluxBackend {
    /// As [`SdBackend::ensure_loras`], but only the transformer is reloaded: FLUX LoRAs touch only it,
    /// and T5-XXL is the largest part of the model.
    fn ensure_loras(&mut self, wanted: &[ResolvedLora]) -> Result<(), JobError> {
        let key: Vec<(std::path::PathBuf, f64)> = wanted.iter().map(|l| (l.path.clone(), l.strength)).collect();
        if key == self.applied {
            return Ok(());
        }
        let loras: Vec<sd_flux::FluxLora> = wanted.iter().map(|l| sd_flux::FluxLora::new(&l.path, l.strength as f32)).collect();
        let t = Instant::now();
        let m = &self.models;
        let (transformer, reports) =
            sd_flux::transformer::load_transformer_with_loras(&self.transformer, m.transformer.dtype(), &m.device, self.axes.as_deref(), &loras)
                .map_err(|e| JobError { code: "invalid_lora", message: format!("the LoRAs could not be applied: {e}"), field: Some("loras".into()) })?;
        for (l, r) in wanted.iter().zip(&reports) {
            if !r.unmatched.is_empty() {
                tracing::warn!(lora = %l.name, applied = r.applied.len(), unmatched = r.unmatched.len(), "FLUX LoRA partly matched");
            }
        }
        self.models.transformer = transformer;
        self.applied = key;
        tracing::info!(secs = t.elapsed().as_secs_f64(), loras = wanted.len(), "FLUX transformer reloaded with LoRAs");
        Ok(())
    }
}

/// The loaded model and its description.
struct Engine {
    backend: Backend,
    info: Arc<ModelInfo>,
}

impl SdBackend {
    /// Makes the loaded weights carry exactly `wanted`: LoRAs are merged into the weights at load
    /// time, so a different set means a reload; the last set stays loaded for the next job.
    fn ensure_loras(&mut self, wanted: &[ResolvedLora]) -> Result<(), JobError> {
        let key: Vec<(std::path::PathBuf, f64)> = wanted.iter().map(|l| (l.path.clone(), l.strength)).collect();
        if key == self.applied {
            return Ok(());
        }
        let mut set = sd_lora::LoraSet::new();
        for (i, l) in wanted.iter().enumerate() {
            set.add_file(&l.path, l.strength as f32).map_err(|e| JobError {
                code: "invalid_lora",
                message: format!("cannot read LoRA {:?}: {e}", l.name),
                field: Some(format!("loras[{i}]")),
            })?;
        }
        let opts = LoadOptions { backend_hook: (!set.is_empty()).then(|| set.backend_hook()), ..self.opts.clone() };
        let t = Instant::now();
        // The new weights load before the old ones go, so a LoRA that fails leaves the model serving.
        let models = load(&self.path, &opts).map_err(|e| JobError {
            code: "invalid_lora",
            message: format!("the LoRAs could not be applied: {e}"),
            field: Some(lora_field(&e, wanted)),
        })?;
        self.models = models;
        self.applied = key;
        tracing::info!(secs = t.elapsed().as_secs_f64(), loras = wanted.len(), report = %set.report(), "model reloaded with LoRAs");
        Ok(())
    }

    /// The hook running the job's ControlNets, each loaded once and then kept in the cache.
    fn controlnet_hook(&mut self, units: &[ResolvedControlNet], width: usize, height: usize) -> Result<Option<ControlNetHook>, JobError> {
        if units.is_empty() {
            return Ok(None);
        }
        let mut out = Vec::with_capacity(units.len());
        for (i, u) in units.iter().enumerate() {
            let field = Some(format!("controlnets[{i}].model"));
            let model = match self.controlnets.iter().position(|(p, _)| *p == u.path) {
                Some(k) => {
                    let entry = self.controlnets.remove(k);
                    self.controlnets.push(entry);
                    self.controlnets[self.controlnets.len() - 1].1.clone()
                }
                None => {
                    let t = Instant::now();
                    let m = ControlNetModel::load(&u.path, self.models.unet.config(), self.models.dtype, &self.models.device)
                        .map_err(|e| JobError { code: "invalid_controlnet", message: format!("cannot load ControlNet {:?}: {e}", u.name), field: field.clone() })?;
                    tracing::info!(name = %u.name, secs = t.elapsed().as_secs_f64(), "ControlNet loaded");
                    if self.controlnets.len() >= CONTROLNET_CACHE {
                        self.controlnets.remove(0);
                    }
                    self.controlnets.push((u.path.clone(), m.clone()));
                    m
                }
            };
            let bad = |e: sd_controlnet::Error| JobError { code: "invalid_controlnet", message: e.to_string(), field: Some(format!("controlnets[{i}]")) };
            let image = prepare_image(&u.image, width, height).map_err(bad)?;
            out.push(ControlUnit { model, image, scale: u.scale, start: u.start, end: u.end });
        }
        ControlNetHook::new(out, self.models.unet.config())
            .map(Some)
            .map_err(|e| JobError { code: "invalid_controlnet", message: e.to_string(), field: Some("controlnets".into()) })
    }
}

/// Starts the engine thread: it loads the model, then runs jobs from `rx` until the queue closes.
pub fn spawn(state: Arc<AppState>, rx: mpsc::Receiver<Arc<Job>>) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("sd-engine".into()).spawn(move || engine_main(state, rx))
}

fn engine_main(state: Arc<AppState>, rx: mpsc::Receiver<Arc<Job>>) {
    let t0 = Instant::now();
    let loaded = std::panic::catch_unwind(AssertUnwindSafe(|| -> Result<Engine, String> {
        let cfg = &state.config;
        let path = local_model(cfg)?;
        if sd_flux::detect::is_flux(&path) {
            return flux_engine(cfg, &path);
        }
        let opts = load_options(cfg)?;
        let models = load(&path, &opts).map_err(|e| e.to_string())?;
        let info = Arc::new(ModelInfo { sha256: file_sha256(&path), ..describe(&models, cfg)? });
        Ok(Engine { backend: Backend::Sd(Box::new(SdBackend { models, path, opts, applied: Vec::new(), controlnets: Vec::new() })), info })
    }))
    .unwrap_or_else(|_| Err("the loader panicked".into()));
    let mut engine = match loaded {
        Ok(engine) => {
            let info = &engine.info;
            tracing::info!(model = %info.name, variant = %info.caps.variant, device = %info.device, dtype = %info.dtype,
                secs = t0.elapsed().as_secs_f64(), "model loaded");
            state.set_model_state(ModelState::Ready(info.clone()));
            engine
        }
        Err(msg) => {
            tracing::error!(error = %msg, "model failed to load");
            state.set_model_state(ModelState::Failed(msg));
            return;
        }
    };
    while let Ok(job) = rx.recv() {
        if !job.claim() {
            continue; // cancelled while queued; already finished and counted
        }
        state.unqueue();
        let span = tracing::info_span!("job", job_id = %job.id, operation = job.operation);
        let _g = span.enter();
        if job.cancel_requested() {
            state.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
            job.finish_error(JobStatus::Cancelled, JobError::new("cancelled", "cancelled before it started"));
            continue;
        }
        state.set_current(Some(job.clone()));
        job.set_running();
        tracing::info!("job started");
        let t = Instant::now();
        // The last net: every input validation can refuse is refused before queueing; a panic
        // here is a bug, logged and reported as an internal error.
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| run_job(&state, &mut engine, &job))).unwrap_or_else(|panic| {
            let what = panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned()).unwrap_or_default();
            tracing::error!(panic = %what, "the generation panicked");
            Err((JobStatus::Failed, JobError::new("internal_error", "the generation panicked; see the worker log")))
        });
        state.metrics.observe_job(t.elapsed());
        // Counters and `current` are updated before the final event, so whoever sees the event
        // also sees them.
        state.set_current(None);
        match outcome {
            Ok(result) => {
                state.metrics.completed.fetch_add(1, Ordering::Relaxed);
                tracing::info!(secs = t.elapsed().as_secs_f64(), "job completed");
                job.finish_ok(result);
            }
            Err((status, err)) => {
                tracing::info!(code = err.code, message = %err.message, "job ended without images");
                let counter = if status == JobStatus::Cancelled { &state.metrics.cancelled } else { &state.metrics.failed };
                counter.fetch_add(1, Ordering::Relaxed);
                job.finish_error(status, err);
            }
        }
        state.trim_store();
    }
    tracing::info!("engine stopped");
}

type Failure = (JobStatus, JobError);

/// `loras[i]` for the requested LoRA a loading error is about, else `loras`. Errors raised while
/// the weights load reach here through candle, which keeps only their text, so the LoRA's path in
/// the message identifies it when the typed error is gone.
fn lora_field(e: &sd_models::Error, wanted: &[ResolvedLora]) -> String {
    let typed = match e {
        sd_models::Error::Extension(inner) => inner.downcast_ref::<sd_lora::Error>().and_then(sd_lora::Error::path),
        _ => None,
    };
    let text = e.to_string();
    let index = match typed {
        Some(p) => wanted.iter().position(|l| l.path == p),
        None => wanted.iter().position(|l| text.contains(&l.path.display().to_string())),
    };
    match index {
        Some(i) => format!("loras[{i}]"),
        None => "loras".into(),
    }
}

/// The prompt as the client wrote it (with its `<lora:…>` tags, which the run itself does not read), for
/// the infotext.
fn written_prompt(job: &Job, p: &sd_pipelines::pipeline::GenerationParams) -> String {
    job.parameters["prompt"].as_str().map_or_else(|| p.prompt.clone(), str::to_string)
}

/// A library error as a job failure: cancellation, a named request field (`invalid_request`), or a
/// generation failure.
fn core_failure(e: sd_core::Error) -> Failure {
    match e {
        sd_core::Error::Cancelled { step, total } => {
            (JobStatus::Cancelled, JobError::new("cancelled", format!("cancelled after step {step} of {total}")))
        }
        sd_core::Error::InvalidRequest { field, reason } => {
            (JobStatus::Failed, JobError { code: "invalid_request", message: reason, field: Some(field.to_string()) })
        }
        e => match e.field() {
            Some(field) => (JobStatus::Failed, JobError { code: "invalid_request", message: e.to_string(), field: Some(field.into()) }),
            None => (JobStatus::Failed, JobError::new("generation_failed", e.to_string())),
        },
    }
}

fn failure(e: sd_pipelines::Error) -> Failure {
    match e {
        sd_pipelines::Error::Core(e) => core_failure(e),
        e => (JobStatus::Failed, JobError::new("generation_failed", e.to_string())),
    }
}

fn run_job(state: &AppState, engine: &mut Engine, job: &Job) -> Result<JobResult, Failure> {
    let JobSpec { operation, params: p, loras, controlnets, hires } =
        job.take_spec().ok_or_else(|| (JobStatus::Failed, JobError::new("internal_error", "the job has no request")))?;
    let every = state.config.preview_every;
    let mut last = Instant::now();
    let mut cb = |s: &StepProgress<'_>| -> ControlFlow<()> {
        let now = Instant::now();
        state.metrics.observe_step(now - last);
        last = now;
        job.publish_progress(s.step, s.total);
        if every > 0 && (s.step % every == 0 || s.step == s.total) {
            match preview(s) {
                Ok(p) => job.publish_preview(p),
                Err(e) => tracing::warn!(error = %e, "preview failed"),
            }
        }
        if job.cancel_requested() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    let mut extra: Vec<(&str, String)> = Vec::new();
    if let Operation::Transform { strength, .. } | Operation::Inpaint { strength, .. } = &operation {
        extra.push(("Denoising strength", format!("{strength}")));
    }
    if let Some(h) = &engine.info.sha256 {
        extra.push(("Model hash", h[..10].to_string()));
    }
    if !loras.is_empty() {
        // A1111's "addnet" hashes, so civitai links the LoRAs of a re-imported PNG.
        let hashes: Vec<String> = loras.iter().filter_map(|l| sd_models::hash::lora_hash(&l.path).ok().map(|h| format!("{}: {h}", l.name))).collect();
        if hashes.len() == loras.len() {
            extra.push(("Lora hashes", format!("\"{}\"", hashes.join(", "))));
        }
    }
    if let Backend::Flux(flux) = &engine.backend {
        // Forge's convention: FLUX's embedded guidance is the "Distilled CFG Scale"; true CFG is off.
        if flux.models.variant == sd_flux::FluxVariant::Dev {
            extra.push(("Distilled CFG Scale", format!("{}", p.guidance_scale)));
        }
    }
    // The infotext entries A1111's ControlNet extension writes, so front ends can read them back.
    const UNIT_KEYS: [&str; crate::controlnet::MAX_CONTROLNETS] = ["ControlNet 0", "ControlNet 1", "ControlNet 2", "ControlNet 3"];
    for (key, c) in UNIT_KEYS.iter().zip(&controlnets) {
        let value = format!(
            "\"Module: {}, Model: {}, Weight: {}, Guidance Start: {}, Guidance End: {}\"",
            c.preprocessor_name, c.name, c.scale, c.start, c.end
        );
        extra.push((key, value));
    }
    if !loras.is_empty() {
        let list: Vec<String> = loras.iter().map(|l| format!("{}: {}", l.name, l.strength)).collect();
        extra.push(("Lora weights", format!("\"{}\"", list.join(", "))));
    }
    // The task's input tensors, at the request's size (both families take sd-core's Task).
    let inputs = match &operation {
        Operation::Generation => None,
        Operation::Transform { image, .. } => Some((image_to_tensor(image, p.width, p.height), None)),
        Operation::Inpaint { image, mask, .. } => Some((image_to_tensor(image, p.width, p.height), Some(mask_to_tensor(mask, p.width, p.height)))),
    };
    let inputs = match inputs {
        None => None,
        Some((image, mask)) => Some((image.map_err(core_failure)?, mask.transpose().map_err(core_failure)?)),
    };
    let task = match (&operation, &inputs) {
        (Operation::Transform { strength, .. }, Some((image, _))) => Task::ImageToImage(ImageToImage { image, strength: *strength }),
        (Operation::Inpaint { strength, .. }, Some((image, Some(mask)))) => Task::Inpaint(Inpaint { image, mask, strength: *strength }),
        _ => Task::TextToImage,
    };
    let mut run = RunContext::with_progress(&mut cb);
    let (images, seed, infotext) = match &mut engine.backend {
        Backend::Sd(sd) => {
            sd.ensure_loras(&loras).map_err(|e| (JobStatus::Failed, e))?;
            let mut hook = sd.controlnet_hook(&controlnets, p.width, p.height).map_err(|e| (JobStatus::Failed, e))?;
            let control = hook.as_mut().map(|h| h as &mut dyn ResidualHook);
            let out = match &hires {
                Some(hr) => {
                    extra.push(("Denoising strength", format!("{}", hr.strength)));
                    extra.push(("Hires resize", format!("{}x{}", hr.width, hr.height)));
                    extra.push(("Hires upscaler", hr.upscaler.name().to_string()));
                    if let Some(steps) = hr.steps {
                        extra.push(("Hires steps", steps.to_string()));
                    }
                    generate_hires(&sd.models, &p, hr, &mut run)
                }
                None => generate(&sd.models, &p, &task, &mut run, SdExtras { control, scheduler: None }),
            }
            .map_err(failure)?;
            let shown = sd_pipelines::pipeline::GenerationParams { prompt: written_prompt(job, &p), ..p.clone() };
            (out.images, out.seed, a1111_parameters(&shown, &engine.info.name, &extra))
        }
        Backend::Flux(flux) => {
            flux.ensure_loras(&loras).map_err(|e| (JobStatus::Failed, e))?;
            let models = &flux.models;
            let out = sd_flux::pipeline::generate(models, &p, &task, &mut run).map_err(flux_failure)?;
            // FLUX runs flow-matching Euler without true CFG (scale 1, no negative prompt).
            let mut fields = vec![
                ("Steps", p.steps.to_string()),
                ("Sampler", "Euler".to_string()),
                ("CFG scale", "1".to_string()),
                ("Seed", p.seed.to_string()),
                ("Size", format!("{}x{}", p.width, p.height)),
                ("Model", engine.info.name.clone()),
            ];
            fields.extend(extra.iter().map(|(k, v)| (*k, v.clone())));
            (out.images, out.seed, infotext(&written_prompt(job, &p), "", &fields))
        }
    };
    let images = tensor_to_images(&images)
        .and_then(|imgs| imgs.iter().map(|img| encode_png(img, Some(&infotext)).map(|png| b64(&png))).collect::<Result<Vec<_>, _>>())
        .map_err(core_failure)?;
    Ok(JobResult { images, seed, parameters: job.parameters.clone(), infotext })
}

fn flux_failure(e: sd_flux::Error) -> Failure {
    match e {
        sd_flux::Error::Core(e) => core_failure(e),
        e => (JobStatus::Failed, JobError::new("generation_failed", e.to_string())),
    }
}

fn preview(s: &StepProgress<'_>) -> sd_core::Result<Preview> {
    let img = latents_to_rgb(s.latents, s.family)?;
    let png = encode_png(&img, None)?;
    Ok(Preview { step: s.step, image: b64(&png), mime: "image/png", width: img.width(), height: img.height() })
}
