//! The engine thread: it alone owns the models, loads them, and runs jobs one at a time.

use std::ops::ControlFlow;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use base64::Engine as _;
use sd_core::image_io::{encode_png, image_to_tensor, mask_to_tensor, tensor_to_images};
use sd_core::preview::latents_to_rgb;
use sd_core::run::{Edit, ImageToImage, Inpaint, RunContext, StepProgress, Task};
use sd_families::{ControlNetUnit, Extras, LoadSpec, LoadedModel, LoraWeight};

use crate::config::{describe_device, ModelSource, WorkerConfig};
use crate::error::JobError;
use crate::jobs::{Job, JobResult, JobSpec, JobStatus, Operation, Preview};
use crate::state::{AppState, EmbeddingEntry, EmbeddingList, EngineMsg, ModelInfo, ModelLocation, ModelState, UpscaleRequest, UpscalerChoice};

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

/// How a model loads: the `-m` model with `--variant` and `--model-config`; a `--models-dir` checkpoint
/// detected from its own files.
fn load_spec(cfg: &WorkerConfig, primary: bool) -> LoadSpec {
    LoadSpec {
        variant: if primary { cfg.variant } else { None },
        dtype: cfg.dtype,
        device: cfg.device.clone(),
        components: if primary { cfg.model_config.clone() } else { None },
        vae: cfg.vae.clone(),
        prefer_fp16_files: prefer_fp16(cfg),
        embeddings: cfg.embedding_dirs.clone(),
    }
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

fn describe(model: &LoadedModel, key: &str, source: String, path: &std::path::Path) -> ModelInfo {
    ModelInfo {
        file_name: None,
        key: key.to_string(),
        name: key.to_string(),
        source,
        dtype: format!("{:?}", model.dtype()).to_lowercase(),
        device: describe_device(model.device()),
        caps: model.capabilities().clone(),
        unet: model.unet_config().cloned(),
        sha256: file_sha256(path),
        embeddings: embedding_list(model),
    }
}

fn embedding_list(model: &LoadedModel) -> EmbeddingList {
    let (loaded, skipped) = model.embeddings();
    EmbeddingList {
        loaded: loaded.into_iter().map(|e| EmbeddingEntry { name: e.name, vectors: e.vectors, width: e.width, reason: None }).collect(),
        skipped: skipped.iter().map(|e| EmbeddingEntry { name: e.name.clone(), vectors: 0, width: 0, reason: Some(e.reason.clone()) }).collect(),
    }
}

/// A loaded model and its description.
struct Engine {
    model: LoadedModel,
    info: Arc<ModelInfo>,
    /// Weight bytes, from the files' headers (what the cache is bounded by).
    bytes: u64,
}

/// The loaded models, least recently used first: the one in use plus as many others as
/// `--model-cache-mb` holds.
struct Engines {
    loaded: Vec<Engine>,
    budget: u64,
    /// Checkpoints that failed to load, with the file's modification time then: asked again unchanged,
    /// they fail at once instead of unloading the model in use for another failed try.
    failed: std::collections::HashMap<String, (Option<std::time::SystemTime>, String)>,
    /// Upscaler networks, most recently used last (a few MB to 70 MB each; the last two are kept).
    upscalers: Vec<(std::path::PathBuf, Arc<sd_models::esrgan::RrdbNet>)>,
}

impl Engines {
    /// The model `key`, loaded now if it is not (evicting the least recently used beyond the budget
    /// first, so two large models are not resident at once when they do not fit).
    fn get(&mut self, state: &AppState, key: &str) -> Result<&mut Engine, String> {
        // Jobs from a front of an older version carry no key: the `-m` model.
        let key = if key.is_empty() { state.primary_key.as_str() } else { key };
        if let Some(i) = self.loaded.iter().position(|e| e.info.key == key) {
            let e = self.loaded.remove(i);
            self.loaded.push(e);
        } else {
            let (path, primary, source) = locate(state, key)?;
            let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
            if let Some((when, why)) = self.failed.get(key) {
                if *when == modified {
                    return Err(why.clone());
                }
            }
            let dtype = state.config.dtype.unwrap_or(if state.config.device.is_cpu() { candle_core::DType::F32 } else { candle_core::DType::F16 });
            let need = crate::models::estimate_bytes(&path, dtype);
            while !self.loaded.is_empty() && self.loaded.iter().map(|e| e.bytes).sum::<u64>() + need > self.budget {
                let gone = self.loaded.remove(0);
                tracing::info!(model = %gone.info.key, mb = gone.bytes >> 20, "model unloaded (least recently used)");
            }
            self.publish(state);
            let t0 = Instant::now();
            let loaded = std::panic::catch_unwind(AssertUnwindSafe(|| LoadedModel::load(&path, &load_spec(&state.config, primary)).map_err(|e| e.to_string())))
                .unwrap_or_else(|_| Err("the loader panicked".into()));
            let loaded = match loaded {
                Ok(m) => m,
                Err(why) => {
                    self.failed.insert(key.to_string(), (modified, why.clone()));
                    return Err(why);
                }
            };
            self.failed.remove(key);
            let file_name = state.catalog.list().into_iter().find(|c| c.name == key).map(|c| c.file_name).or_else(|| {
                path.is_file().then(|| path.file_name().map(|f| f.to_string_lossy().into_owned())).flatten()
            });
            let info = Arc::new(ModelInfo { file_name, ..describe(&loaded, key, source, &path) });
            tracing::info!(model = %info.key, variant = %info.caps.variant, device = %info.device, dtype = %info.dtype,
                mb = need >> 20, secs = t0.elapsed().as_secs_f64(), "model loaded");
            state.remember_model(info.clone());
            state.metrics.model_loads.fetch_add(1, Ordering::Relaxed);
            self.loaded.push(Engine { model: loaded, info, bytes: need });
        }
        self.publish(state);
        self.loaded.last_mut().ok_or_else(|| "no model is loaded".to_string())
    }

    /// The upscaler network in `path`, loaded on the worker's device once and kept for the next request.
    fn upscaler(&mut self, state: &AppState, path: &std::path::Path) -> Result<Arc<sd_models::esrgan::RrdbNet>, String> {
        if let Some(i) = self.upscalers.iter().position(|(p, _)| p == path) {
            let hit = self.upscalers.remove(i);
            let net = hit.1.clone();
            self.upscalers.push(hit);
            return Ok(net);
        }
        let net = Arc::new(sd_models::esrgan::RrdbNet::load(path, &state.config.device).map_err(|e| e.to_string())?);
        tracing::info!(upscaler = %path.display(), config = %net.config(), "upscaler loaded");
        if self.upscalers.len() >= 2 {
            self.upscalers.remove(0);
        }
        self.upscalers.push((path.to_path_buf(), net.clone()));
        Ok(net)
    }

    fn publish(&self, state: &AppState) {
        state.metrics.models_loaded.store(self.loaded.len() as u64, Ordering::Relaxed);
        state.metrics.model_bytes.store(self.loaded.iter().map(|e| e.bytes).sum(), Ordering::Relaxed);
    }
}

/// The local path of the model `key`, whether it is the `-m` model, and its source's display form.
fn locate(state: &AppState, key: &str) -> Result<(std::path::PathBuf, bool, String), String> {
    match state.model_location(key) {
        Some(ModelLocation::Primary) => Ok((local_model(&state.config)?, true, source_name(&state.config))),
        Some(ModelLocation::Catalog(path)) => {
            let source = path.display().to_string();
            Ok((path, false, source))
        }
        None => Err(format!("no checkpoint {key:?} in the models folders (was it removed? POST /sdapi/v1/refresh-checkpoints rescans them)")),
    }
}

/// Starts the engine thread: it loads the model, then runs jobs from `rx` until the queue closes.
pub fn spawn(state: Arc<AppState>, rx: mpsc::Receiver<EngineMsg>) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("sd-engine".into()).spawn(move || engine_main(state, rx))
}

fn engine_main(state: Arc<AppState>, rx: mpsc::Receiver<EngineMsg>) {
    let mut engines = Engines { loaded: Vec::new(), budget: state.config.model_cache_bytes, failed: Default::default(), upscalers: Vec::new() };
    match engines.get(&state, &state.primary_key) {
        Ok(engine) => state.set_model_state(ModelState::Ready(engine.info.clone())),
        Err(msg) => {
            tracing::error!(error = %msg, "model failed to load");
            state.set_model_state(ModelState::Failed(msg));
            return;
        }
    }
    while let Ok(msg) = rx.recv() {
        let job = match msg {
            EngineMsg::Job(job) => job,
            EngineMsg::Load { key, reply } => {
                let answer = engines.get(&state, &key).map(|e| e.info.clone());
                if let Err(e) = &answer {
                    tracing::warn!(model = %key, error = %e, "model failed to load");
                }
                let _ = reply.send(answer);
                continue;
            }
            EngineMsg::Upscale { request, reply } => {
                let t = Instant::now();
                let out = std::panic::catch_unwind(AssertUnwindSafe(|| upscale(&state, &mut engines, &request)))
                    .unwrap_or_else(|_| Err("the upscaler panicked; see the worker log".into()));
                tracing::info!(images = request.images.len(), secs = t.elapsed().as_secs_f64(), ok = out.is_ok(), "extras upscale");
                let _ = reply.send(out);
                continue;
            }
            EngineMsg::ReloadEmbeddings { reply } => {
                let active = match state.model_state() {
                    ModelState::Ready(m) => Some(m.key.clone()),
                    _ => None,
                };
                for e in &mut engines.loaded {
                    // Embedding files are user-dropped: a panic while parsing one must not stop the engine.
                    let reloaded = std::panic::catch_unwind(AssertUnwindSafe(|| e.model.reload_embeddings(&state.config.embedding_dirs)));
                    if reloaded.is_err() {
                        tracing::error!(model = %e.info.key, "reading the embeddings panicked; the model keeps what it read before the file at fault");
                    }
                    e.info = Arc::new(ModelInfo { embeddings: embedding_list(&e.model), ..(*e.info).clone() });
                    state.remember_model(e.info.clone());
                    if active.as_deref() == Some(e.info.key.as_str()) {
                        state.set_model_state(ModelState::Ready(e.info.clone()));
                    }
                }
                let _ = reply.send(());
                continue;
            }
        };
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
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| run_job(&state, &mut engines, &job))).unwrap_or_else(|panic| {
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

/// A1111's extras upscale of every picture of `r`.
fn upscale(state: &AppState, engines: &mut Engines, r: &UpscaleRequest) -> Result<Vec<image::DynamicImage>, String> {
    use sd_pipelines::hires::{upscale_by, PixelUpscale};
    let mut nets = Vec::new();
    for choice in std::iter::once(&r.first).chain(r.second.as_ref().map(|(c, _)| c)) {
        nets.push(match choice {
            UpscalerChoice::Model(m) => Some(engines.upscaler(state, &m.path).map_err(|e| format!("the upscaler {:?} failed to load: {e}", m.name))?),
            _ => None,
        });
    }
    fn method<'a>(choice: &UpscalerChoice, net: &'a Option<Arc<sd_models::esrgan::RrdbNet>>) -> PixelUpscale<'a> {
        match (choice, net) {
            (_, Some(net)) => PixelUpscale::Model(net),
            (UpscalerChoice::Nearest, None) => PixelUpscale::Nearest,
            _ => PixelUpscale::Lanczos,
        }
    }
    let mut out = Vec::with_capacity(r.images.len());
    for (img, scale) in &r.images {
        let mut up = upscale_by(img, *scale, method(&r.first, &nets[0])).map_err(|e| e.to_string())?.to_rgb8();
        if let (Some((choice, visibility)), Some(net)) = (&r.second, nets.get(1)) {
            let other = upscale_by(img, *scale, method(choice, net)).map_err(|e| e.to_string())?.to_rgb8();
            // PIL's Image.blend: im1·(1 − α) + im2·α per channel, truncated to 8 bits.
            for (a, b) in up.pixels_mut().zip(other.pixels()) {
                for c in 0..3 {
                    let v = f32::from(a.0[c]) * (1.0 - visibility) + f32::from(b.0[c]) * visibility;
                    a.0[c] = v.clamp(0.0, 255.0) as u8;
                }
            }
        }
        let mut up = image::DynamicImage::ImageRgb8(up);
        if let Some((cw, ch)) = r.crop {
            // A1111 pastes the result centred on a black canvas of the requested size.
            let mut canvas = image::RgbImage::new(cw, ch);
            let x = i64::from(cw / 2) - i64::from(up.width() / 2);
            let y = i64::from(ch / 2) - i64::from(up.height() / 2);
            image::imageops::replace(&mut canvas, &up.to_rgb8(), x, y);
            up = image::DynamicImage::ImageRgb8(canvas);
        }
        out.push(up);
    }
    Ok(out)
}

type Failure = (JobStatus, JobError);

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

/// A family error as a job failure: a LoRA or ControlNet that would not apply names its field with
/// its own code; the rest as [`core_failure`].
fn failure(e: sd_families::Error) -> Failure {
    let field = e.field();
    let e = match e.into_core() {
        Ok(core) => return core_failure(core),
        Err(e) => e,
    };
    match e {
        sd_families::Error::Lora { field, message } => (JobStatus::Failed, JobError { code: "invalid_lora", message, field: Some(field) }),
        sd_families::Error::ControlNet { field, message } => {
            (JobStatus::Failed, JobError { code: "invalid_controlnet", message, field: Some(field) })
        }
        e @ sd_families::Error::Unsupported { .. } => (JobStatus::Failed, JobError { code: "invalid_request", message: e.to_string(), field }),
        e => (JobStatus::Failed, JobError::new("generation_failed", e.to_string())),
    }
}

fn run_job(state: &AppState, engines: &mut Engines, job: &Job) -> Result<JobResult, Failure> {
    let JobSpec { operation, params: p, loras, controlnets, mut hires, partial_on_cancel, model, vae } =
        job.take_spec().ok_or_else(|| (JobStatus::Failed, JobError::new("internal_error", "the job has no request")))?;
    if let Some(e) = hires.as_mut().and_then(|h| h.esrgan.as_mut()).filter(|e| e.net.is_none()) {
        let net = engines.upscaler(state, &e.path).map_err(|msg| {
            (JobStatus::Failed, JobError { code: "invalid_request", message: format!("the upscaler {:?} failed to load: {msg}", e.name), field: Some("hr_upscaler".into()) })
        })?;
        e.net = Some(net);
    }
    let engine = engines.get(state, &model).map_err(|e| {
        (JobStatus::Failed, JobError { code: "model_load_failed", message: format!("the checkpoint {model:?} failed to load: {e}"), field: Some("model".into()) })
    })?;
    let every = state.config.preview_every;
    let mut last = Instant::now();
    // The latest step's latents, for the images an interrupted A1111 request answers with.
    let mut latest: Option<candle_core::Tensor> = None;
    let mut cb = |s: &StepProgress<'_>| -> ControlFlow<()> {
        if partial_on_cancel {
            latest = Some(s.latents.clone());
        }
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
    // A1111's `sd_vae`: the VAE this job decodes with (found again in this worker's own folders).
    let vae_file = match &vae {
        None => None,
        Some(name) => Some(state.vaes.resolve(name).ok_or_else(|| {
            (JobStatus::Failed, JobError { code: "invalid_request", message: format!("no VAE {name:?} in this worker's --vae-dir folders"), field: Some("sd_vae".into()) })
        })?),
    };
    engine.model.set_vae(vae_file.as_ref().map(|v| v.path.as_path())).map_err(|e| {
        (JobStatus::Failed, JobError { code: "invalid_request", message: e.to_string(), field: Some("sd_vae".into()) })
    })?;
    let mut extra: Vec<(&str, String)> = Vec::new();
    if let Operation::Transform { strength, .. } | Operation::Inpaint { strength, .. } = &operation {
        extra.push(("Denoising strength", format!("{strength}")));
    }
    if let Some(h) = &engine.info.sha256 {
        extra.push(("Model hash", crate::models::short_hash(h).to_string()));
    }
    // A1111 writes the VAE it switched to (its hash for a file, as its `VAE hash`).
    if let Some(v) = &vae_file {
        if let Some(h) = v.path.is_file().then(|| sd_models::hash::sha256(&v.path).ok()).flatten() {
            extra.push(("VAE hash", crate::models::short_hash(&h).to_string()));
        }
        extra.push(("VAE", v.name.clone()));
    }
    // A1111's "TI hashes" for the embeddings the prompts name (first 12 hex digits of the file's sha256).
    let mut used = engine.model.embeddings_used(&p.prompt);
    for e in engine.model.embeddings_used(&p.negative_prompt) {
        if !used.iter().any(|u| u.name == e.name) {
            used.push(e);
        }
    }
    if !used.is_empty() {
        let hashes: Vec<String> = used.iter().filter_map(|e| sd_models::hash::sha256(&e.path).ok().map(|h| format!("{}: {}", e.name, &h[..12]))).collect();
        if hashes.len() == used.len() {
            extra.push(("TI hashes", format!("\"{}\"", hashes.join(", "))));
        }
    }
    if !loras.is_empty() {
        // A1111's "addnet" hashes, so civitai links the LoRAs of a re-imported PNG.
        let hashes: Vec<String> = loras.iter().filter_map(|l| sd_models::hash::lora_hash(&l.path).ok().map(|h| format!("{}: {h}", l.name))).collect();
        if hashes.len() == loras.len() {
            extra.push(("Lora hashes", format!("\"{}\"", hashes.join(", "))));
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
    let references = match &operation {
        Operation::Edit { images } => images.iter().map(|i| image_to_tensor(i, i.width() as usize, i.height() as usize)).collect::<Result<Vec<_>, _>>().map_err(core_failure)?,
        _ => Vec::new(),
    };
    let inputs = match &operation {
        Operation::Generation | Operation::Edit { .. } => None,
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
        (Operation::Edit { .. }, _) => Task::Edit(Edit { images: &references }),
        _ => Task::TextToImage,
    };
    let lora_weights: Vec<LoraWeight> = loras.iter().map(|l| LoraWeight { path: l.path.clone(), strength: l.strength, text_encoder_strength: l.text_encoder_strength }).collect();
    let units: Vec<ControlNetUnit<'_>> = controlnets
        .iter()
        .map(|c| ControlNetUnit { path: &c.path, image: &c.image, scale: c.scale, start: c.start, end: c.end })
        .collect();
    let extras = Extras { loras: &lora_weights, controlnets: &units, hires: hires.as_ref() };
    let generated = {
        let mut run = RunContext::with_progress(&mut cb);
        engine.model.generate(&p, &task, &mut run, &extras)
    };
    let infotext = engine.model.infotext(&p, &written_prompt(job, &p), &engine.info.name, &extras, &extra);
    let (images, seed) = match generated {
        Ok(out) => (out.images, out.seed),
        Err(e) if e.is_cancelled() && latest.is_some() => {
            // A1111 answers an interrupt with what the last step shows (of a hires fix's second pass too).
            let latents = latest.take().ok_or_else(|| failure(e))?;
            tracing::info!("interrupted: answering with the last step's images");
            (engine.model.decode_latents(&latents, &p).map_err(failure)?, p.seed)
        }
        Err(e) => return Err(failure(e)),
    };
    let images = tensor_to_images(&images)
        .and_then(|imgs| imgs.iter().map(|img| encode_png(img, Some(&infotext)).map(|png| b64(&png))).collect::<Result<Vec<_>, _>>())
        .map_err(core_failure)?;
    Ok(JobResult { images, seed, parameters: job.parameters.clone(), infotext })
}

fn preview(s: &StepProgress<'_>) -> sd_core::Result<Preview> {
    let img = latents_to_rgb(s.latents, s.family)?;
    let png = encode_png(&img, None)?;
    Ok(Preview { step: s.step, image: b64(&png), mime: "image/png", width: img.width(), height: img.height() })
}
