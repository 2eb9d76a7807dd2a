//! The engine thread: it alone owns the models, loads them, and runs jobs one at a time.

use std::ops::ControlFlow;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use base64::Engine as _;
use sd_models::loader::{load, read_folder_config, LoadOptions, StableDiffusionModels};
use sd_pipelines::image_io::{a1111_parameters, encode_png, image_to_tensor, mask_to_tensor, tensor_to_images};
use sd_pipelines::pipeline::{image_to_image, inpaint, text_to_image, ImageToImage, Inpaint, StepProgress};
use sd_pipelines::preview::latents_to_rgb;

use crate::config::{describe_device, ModelSource, WorkerConfig};
use crate::error::JobError;
use crate::jobs::{Job, JobResult, JobSpec, JobStatus, Operation, Preview};
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
        prefer_fp16_files: !cfg.device.is_cpu() && cfg.dtype != Some(candle_core::DType::F32),
        ..LoadOptions::default()
    })
}

fn load_models(cfg: &WorkerConfig, opts: &LoadOptions) -> Result<StableDiffusionModels, String> {
    match &cfg.model {
        ModelSource::Path(p) => load(p, opts).map_err(|e| e.to_string()),
        #[cfg(feature = "hub")]
        ModelSource::Hub(id) => sd_models::loader::load_from_hub(id, None, opts).map_err(|e| e.to_string()),
        #[cfg(not(feature = "hub"))]
        ModelSource::Hub(id) => Err(format!(
            "{id:?} is neither an existing path nor usable as a hub id: build with `--features hub` to download from the Hugging Face hub"
        )),
    }
}

fn describe(models: &StableDiffusionModels, cfg: &WorkerConfig) -> ModelInfo {
    let c = &models.config;
    ModelInfo {
        name: model_name(&cfg.model),
        source: match &cfg.model {
            ModelSource::Path(p) => p.display().to_string(),
            ModelSource::Hub(id) => format!("hub:{id}"),
        },
        variant: c.variant,
        family: c.variant.family(),
        dtype: format!("{:?}", models.dtype).to_lowercase(),
        device: describe_device(&models.device),
        default_width: c.default_width,
        default_height: c.default_height,
        default_steps: c.default_steps,
        default_guidance: c.default_guidance,
        vae_scale_factor: c.vae_scale_factor(),
        text_layers: c.text_encoder.num_hidden_layers,
        is_inpaint: c.is_inpaint(),
    }
}

/// The models and what is merged into them.
struct Engine {
    models: StableDiffusionModels,
    info: Arc<ModelInfo>,
    /// Options of the plain model (no LoRA hook).
    opts: LoadOptions,
    /// The LoRA files and strengths merged into `models` now (empty: the plain model).
    applied: Vec<(std::path::PathBuf, f64)>,
}

impl Engine {
    /// Makes the loaded weights carry exactly `wanted`: LoRAs are merged into the weights at load
    /// time, so a different set means a reload; the last set stays loaded for the next job.
    fn ensure_loras(&mut self, cfg: &WorkerConfig, wanted: &[ResolvedLora]) -> Result<(), JobError> {
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
        let models = load_models(cfg, &opts).map_err(|e| JobError {
            code: "invalid_lora",
            message: format!("the LoRAs could not be applied: {e}"),
            field: Some("loras".into()),
        })?;
        self.models = models;
        self.applied = key;
        tracing::info!(secs = t.elapsed().as_secs_f64(), loras = wanted.len(), report = %set.report(), "model reloaded with LoRAs");
        Ok(())
    }
}

/// Starts the engine thread: it loads the model, then runs jobs from `rx` until the queue closes.
pub fn spawn(state: Arc<AppState>, rx: mpsc::Receiver<Arc<Job>>) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("sd-engine".into()).spawn(move || engine_main(state, rx))
}

fn engine_main(state: Arc<AppState>, rx: mpsc::Receiver<Arc<Job>>) {
    let t0 = Instant::now();
    let loaded = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let opts = load_options(&state.config)?;
        load_models(&state.config, &opts).map(|m| (m, opts))
    }))
    .unwrap_or_else(|_| Err("the loader panicked".into()));
    let mut engine = match loaded {
        Ok((models, opts)) => {
            let info = Arc::new(describe(&models, &state.config));
            tracing::info!(model = %info.name, variant = %info.variant, device = %info.device, dtype = %info.dtype,
                secs = t0.elapsed().as_secs_f64(), "model loaded");
            state.set_model_state(ModelState::Ready(info.clone()));
            Engine { models, info, opts, applied: Vec::new() }
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
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| run_job(&state, &mut engine, &job)))
            .unwrap_or_else(|_| Err((JobStatus::Failed, JobError::new("internal_error", "the generation panicked; see the worker log"))));
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
    }
    tracing::info!("engine stopped");
}

type Failure = (JobStatus, JobError);

fn failure(e: sd_pipelines::Error) -> Failure {
    use sd_pipelines::Error as E;
    match e {
        E::Cancelled { step, total } => (JobStatus::Cancelled, JobError::new("cancelled", format!("cancelled after step {step} of {total}"))),
        E::InvalidRequest { field, reason } => {
            (JobStatus::Failed, JobError { code: "invalid_request", message: reason, field: Some(field.to_string()) })
        }
        e @ E::InvalidStrength { .. } => (JobStatus::Failed, JobError { code: "invalid_request", message: e.to_string(), field: Some("strength".into()) }),
        e @ (E::UnknownSampler { .. } | E::UnsupportedSchedule { .. }) => {
            (JobStatus::Failed, JobError { code: "invalid_request", message: e.to_string(), field: Some("sampler".into()) })
        }
        e => (JobStatus::Failed, JobError::new("generation_failed", e.to_string())),
    }
}

fn run_job(state: &AppState, engine: &mut Engine, job: &Job) -> Result<JobResult, Failure> {
    let JobSpec { operation, params: p, loras } =
        job.take_spec().ok_or_else(|| (JobStatus::Failed, JobError::new("internal_error", "the job has no request")))?;
    engine.ensure_loras(&state.config, &loras).map_err(|e| (JobStatus::Failed, e))?;
    let models = &engine.models;
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
    let out = match &operation {
        Operation::Generation => text_to_image(models, &p, &mut cb),
        Operation::Transform { image, strength } => image_to_tensor(image, p.width, p.height)
            .and_then(|t| image_to_image(models, &p, &ImageToImage { image: &t, strength: *strength }, &mut cb)),
        Operation::Inpaint { image, mask, strength } => image_to_tensor(image, p.width, p.height).and_then(|img| {
            let m = mask_to_tensor(mask, p.width, p.height)?;
            inpaint(models, &p, &Inpaint { image: &img, mask: &m, strength: *strength }, &mut cb)
        }),
    }
    .map_err(failure)?;
    let mut extra: Vec<(&str, String)> = Vec::new();
    if let Operation::Transform { strength, .. } | Operation::Inpaint { strength, .. } = &operation {
        extra.push(("Denoising strength", format!("{strength}")));
    }
    if !loras.is_empty() {
        let list: Vec<String> = loras.iter().map(|l| format!("{}: {}", l.name, l.strength)).collect();
        extra.push(("Lora weights", format!("\"{}\"", list.join(", "))));
    }
    let infotext = a1111_parameters(&p, &engine.info.name, &extra);
    let images = tensor_to_images(&out.images)
        .and_then(|imgs| imgs.iter().map(|img| encode_png(img, Some(&infotext)).map(|png| b64(&png))).collect::<Result<Vec<_>, _>>())
        .map_err(failure)?;
    Ok(JobResult { images, seed: out.seed, parameters: job.parameters.clone(), infotext })
}

fn preview(s: &StepProgress<'_>) -> sd_pipelines::Result<Preview> {
    let img = latents_to_rgb(s.latents, s.family)?;
    let png = encode_png(&img, None)?;
    Ok(Preview { step: s.step, image: b64(&png), mime: "image/png", width: img.width(), height: img.height() })
}
