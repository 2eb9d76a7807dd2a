//! Jobs: their state, the events they publish and the subscriptions that follow them.
//!
//! A job's state lives behind one mutex; events are published while holding it, and a subscriber
//! takes a snapshot and subscribes under the same lock, so late subscribers see the current state
//! and then every later event, with nothing lost or repeated.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use image::DynamicImage;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::broadcast;

use crate::error::JobError;
use crate::lora::ResolvedLora;

/// Lifecycle of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Waiting in the queue.
    Queued,
    /// On the engine.
    Running,
    /// Finished with images.
    Completed,
    /// Finished with an error.
    Failed,
    /// Stopped by a cancel request, an interrupt or shutdown.
    Cancelled,
}

impl JobStatus {
    /// Whether the job is over.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }

    /// The lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

/// Step progress.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
pub struct Progress {
    /// Steps done.
    pub step: usize,
    /// Steps in the run.
    pub total: usize,
    /// `100 · step / total`.
    pub percent: f64,
}

/// A small preview of the current latents.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Preview {
    /// Step it shows.
    pub step: usize,
    /// Base64 PNG.
    pub image: String,
    /// MIME type of `image`.
    pub mime: &'static str,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

/// A finished job's output.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct JobResult {
    /// Base64 PNGs with A1111 `parameters` metadata.
    pub images: Vec<String>,
    /// Seed of the run.
    pub seed: u64,
    /// The resolved request (every default filled in).
    pub parameters: Value,
    /// The A1111 infotext written into the PNGs.
    pub infotext: String,
}

/// SSE id of a job's last event (the largest integer JavaScript holds exactly).
pub const FINAL_EVENT_ID: u64 = (1 << 53) - 1;

/// What a job publishes; SSE event names are `progress`, `preview`, `complete`, `error`.
#[derive(Debug, Clone)]
pub enum JobEvent {
    /// A step finished.
    Progress(Progress),
    /// A new preview.
    Preview(Arc<Preview>),
    /// Images are ready.
    Complete(Arc<JobResult>),
    /// The job failed or was cancelled.
    Error(JobError),
}

impl JobEvent {
    /// Whether this is the last event of a job.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Complete(_) | Self::Error(_))
    }

    /// The SSE id: it grows through a job (`2·step` for progress, `2·step + 1` for that step's
    /// preview, [`FINAL_EVENT_ID`] for the last event), so `Last-Event-ID` says what a client saw.
    pub fn sse_id(&self) -> u64 {
        match self {
            Self::Progress(p) => 2 * p.step as u64,
            Self::Preview(p) => 2 * p.step as u64 + 1,
            Self::Complete(_) | Self::Error(_) => FINAL_EVENT_ID,
        }
    }

    /// The SSE event name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Progress(_) => "progress",
            Self::Preview(_) => "preview",
            Self::Complete(_) => "complete",
            Self::Error(_) => "error",
        }
    }

    /// The SSE data.
    pub fn data(&self) -> Value {
        let v = match self {
            Self::Progress(p) => serde_json::to_value(p),
            Self::Preview(p) => serde_json::to_value(&**p),
            Self::Complete(r) => serde_json::to_value(&**r),
            Self::Error(e) => serde_json::to_value(e),
        };
        v.unwrap_or(Value::Null)
    }
}

/// Which pipeline a job runs, with its decoded inputs.
#[derive(Debug, Clone)]
pub enum Operation {
    /// txt2img.
    Generation,
    /// img2img.
    Transform {
        /// The input image.
        image: DynamicImage,
        /// Fraction of the schedule re-noised.
        strength: f64,
    },
    /// Inpainting; white mask pixels are repainted.
    Inpaint {
        /// The input image.
        image: DynamicImage,
        /// The mask, same size as the image.
        mask: DynamicImage,
        /// Fraction of the schedule re-noised.
        strength: f64,
    },
    /// An edit after reference images (FLUX.1 Kontext), each at the size it is encoded at.
    Edit {
        /// The reference images.
        images: Vec<DynamicImage>,
    },
}

impl Operation {
    /// The API name of the operation.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Generation => "image_generation",
            Self::Transform { .. } => "image_transform",
            Self::Inpaint { .. } => "image_inpaint",
            Self::Edit { .. } => "image_edit",
        }
    }
}

/// A validated request, ready for the engine.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// What to run.
    pub operation: Operation,
    /// Prompt, size, steps, sampler, seed …
    pub params: sd_pipelines::pipeline::GenerationParams,
    /// LoRAs to apply.
    pub loras: Vec<ResolvedLora>,
    /// ControlNets to run at every step.
    pub controlnets: Vec<crate::controlnet::ResolvedControlNet>,
    /// A1111's hires fix (a second, upscaled pass) for a generation.
    pub hires: Option<sd_pipelines::hires::HiresFix>,
    /// An interrupted run ends with the images of its last step (A1111 routes) instead of an error.
    pub partial_on_cancel: bool,
    /// The model to run it on ([`crate::state::ModelInfo::key`]), loaded on demand if another is in use.
    pub model: String,
    /// A `--vae-dir` VAE to decode with (A1111's `sd_vae`); `None`: the one the model loaded with.
    pub vae: Option<String>,
}

/// Mutable state of a job.
#[derive(Debug)]
pub struct JobInner {
    /// Lifecycle.
    pub status: JobStatus,
    /// Last progress.
    pub progress: Option<Progress>,
    /// Last preview.
    pub preview: Option<Arc<Preview>>,
    /// Output, once completed.
    pub result: Option<Arc<JobResult>>,
    /// Bytes of the result (images, infotext, parameters), measured once when it is set.
    pub result_bytes: usize,
    /// Error, once failed or cancelled.
    pub error: Option<JobError>,
    /// When it finished (expiry counts from here).
    pub finished_at: Option<Instant>,
    /// Unix seconds it started running.
    pub started_at: Option<u64>,
}

/// One job, shared by the HTTP side and the engine.
#[derive(Debug)]
pub struct Job {
    /// Public id.
    pub id: String,
    /// `image_generation`, `image_transform` or `image_inpaint`.
    pub operation: &'static str,
    /// Unix seconds it was submitted.
    pub created_at: u64,
    /// The resolved request, for status answers.
    pub parameters: Value,
    /// The credential that submitted it (`None` when the API is open); only it may cancel the job.
    pub owner: Option<String>,
    /// Open SSE streams on this job.
    pub subscribers: std::sync::atomic::AtomicUsize,
    /// A local copy of a job queue mode keeps in Redis (it runs elsewhere; cancels go through Redis).
    pub remote: bool,
    /// Size of `parameters` as JSON, measured once (it never changes).
    parameters_bytes: usize,
    spec: Mutex<Option<JobSpec>>,
    cancel: AtomicBool,
    /// Set once by whichever of the engine (dequeue) or a cancel (while queued) gets there first.
    claimed: AtomicBool,
    inner: Mutex<JobInner>,
    tx: broadcast::Sender<JobEvent>,
}

/// Locks a mutex, recovering the data if a holder panicked (state stays usable).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Job {
    /// A queued job submitted by `owner`.
    pub fn new(id: String, spec: JobSpec, parameters: Value, owner: Option<String>) -> Self {
        let operation = spec.operation.name();
        Self::build(id, operation, unix_now(), parameters, owner, Some(spec))
    }

    /// A local mirror of a queue-mode job held in Redis: no spec, never on this engine.
    pub fn mirror(id: String, operation: &'static str, created_at: u64, parameters: Value, owner: Option<String>) -> Self {
        Self::build(id, operation, created_at, parameters, owner, None)
    }

    fn build(id: String, operation: &'static str, created_at: u64, parameters: Value, owner: Option<String>, spec: Option<JobSpec>) -> Self {
        let (tx, _) = broadcast::channel(256);
        let remote = spec.is_none();
        Self {
            id,
            operation,
            created_at,
            parameters_bytes: parameters.to_string().len(),
            parameters,
            owner,
            subscribers: std::sync::atomic::AtomicUsize::new(0),
            remote,
            spec: Mutex::new(spec),
            cancel: AtomicBool::new(false),
            // A mirror is never this engine's to dequeue.
            claimed: AtomicBool::new(remote),
            inner: Mutex::new(JobInner {
                status: JobStatus::Queued,
                progress: None,
                preview: None,
                result: None,
                result_bytes: 0,
                error: None,
                finished_at: None,
                started_at: None,
            }),
            tx,
        }
    }

    /// Takes the spec (the engine does, once).
    pub fn take_spec(&self) -> Option<JobSpec> {
        lock(&self.spec).take()
    }

    /// Claims the job out of the queue; false if a cancel already took it.
    pub fn claim(&self) -> bool {
        !self.claimed.swap(true, Ordering::SeqCst)
    }

    /// Whether a cancel was requested.
    pub fn cancel_requested(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// Asks the job to stop; `true` if it was still in the queue and the caller now owns its
    /// cancellation (and must finish it), `false` if the engine has it and will stop within a step.
    pub fn request_cancel(&self) -> bool {
        self.cancel.store(true, Ordering::SeqCst);
        if self.claim() {
            lock(&self.spec).take();
            true
        } else {
            false
        }
    }

    /// Current status.
    pub fn status(&self) -> JobStatus {
        lock(&self.inner).status
    }

    /// A consistent view of the state.
    pub fn with_inner<R>(&self, f: impl FnOnce(&JobInner) -> R) -> R {
        f(&lock(&self.inner))
    }

    /// Marks the job running.
    pub fn set_running(&self) {
        let mut g = lock(&self.inner);
        if !g.status.is_terminal() {
            g.status = JobStatus::Running;
            g.started_at = Some(unix_now());
        }
    }

    /// Marks a running job queued again (queue mode: its worker handed it back).
    pub fn requeue(&self) {
        let mut g = lock(&self.inner);
        if g.status == JobStatus::Running {
            g.status = JobStatus::Queued;
            g.started_at = None;
            g.progress = None;
        }
    }

    /// Publishes step progress.
    pub fn publish_progress(&self, step: usize, total: usize) {
        let p = Progress { step, total, percent: if total == 0 { 0.0 } else { (step as f64 * 1000.0 / total as f64).round() / 10.0 } };
        let mut g = lock(&self.inner);
        if g.status.is_terminal() {
            return;
        }
        g.progress = Some(p);
        let _ = self.tx.send(JobEvent::Progress(p));
    }

    /// Publishes a preview.
    pub fn publish_preview(&self, preview: Preview) {
        let preview = Arc::new(preview);
        let mut g = lock(&self.inner);
        if g.status.is_terminal() {
            return;
        }
        g.preview = Some(preview.clone());
        let _ = self.tx.send(JobEvent::Preview(preview));
    }

    /// Finishes with images.
    pub fn finish_ok(&self, result: JobResult) {
        let result = Arc::new(result);
        let mut g = lock(&self.inner);
        if g.status.is_terminal() {
            return;
        }
        g.status = JobStatus::Completed;
        g.result_bytes = result.images.iter().map(String::len).sum::<usize>() + result.infotext.len() + result.parameters.to_string().len();
        g.result = Some(result.clone());
        g.finished_at = Some(Instant::now());
        let _ = self.tx.send(JobEvent::Complete(result));
    }

    /// Finishes with an error (`status` is Failed or Cancelled).
    pub fn finish_error(&self, status: JobStatus, err: JobError) {
        let mut g = lock(&self.inner);
        if g.status.is_terminal() {
            return;
        }
        g.status = status;
        g.error = Some(err.clone());
        g.finished_at = Some(Instant::now());
        let _ = self.tx.send(JobEvent::Error(err));
    }

    /// The events that reproduce the current state, and a receiver for everything after them.
    pub fn subscribe(&self) -> (VecDeque<JobEvent>, broadcast::Receiver<JobEvent>) {
        let g = lock(&self.inner);
        let rx = self.tx.subscribe();
        (Self::snapshot_events(&g), rx)
    }

    fn snapshot_events(g: &JobInner) -> VecDeque<JobEvent> {
        let mut ev = VecDeque::new();
        if let Some(p) = g.progress {
            ev.push_back(JobEvent::Progress(p));
        }
        if let Some(p) = &g.preview {
            ev.push_back(JobEvent::Preview(p.clone()));
        }
        if let Some(r) = &g.result {
            ev.push_back(JobEvent::Complete(r.clone()));
        } else if let Some(e) = &g.error {
            ev.push_back(JobEvent::Error(e.clone()));
        }
        ev
    }

    /// Waits for the end of the job.
    pub async fn wait(&self) -> Result<Arc<JobResult>, JobError> {
        let (snapshot, mut rx) = self.subscribe();
        let mut pending: VecDeque<JobEvent> = snapshot;
        loop {
            while let Some(ev) = pending.pop_front() {
                match ev {
                    JobEvent::Complete(r) => return Ok(r),
                    JobEvent::Error(e) => return Err(e),
                    _ => {}
                }
            }
            match rx.recv().await {
                Ok(ev) => pending.push_back(ev),
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => {
                    return Err(JobError::new("internal_error", "the job's event channel closed"));
                }
            }
        }
    }

    /// The status document of `GET /v1/jobs/{id}`: the result's metadata and the URL of each
    /// image as PNG, and the base64 images themselves only with `include_images`.
    pub fn status_json(&self, include_images: bool) -> Value {
        let g = lock(&self.inner);
        let result = g.result.as_deref().map(|r| {
            let urls: Vec<String> = (0..r.images.len()).map(|i| format!("/v1/jobs/{}/images/{i}", self.id)).collect();
            let mut v = serde_json::json!({
                "seed": r.seed,
                "parameters": r.parameters,
                "infotext": r.infotext,
                "image_urls": urls,
            });
            if include_images {
                v["images"] = serde_json::json!(r.images);
            }
            v
        });
        serde_json::json!({
            "job_id": self.id,
            "operation": self.operation,
            "status": g.status.as_str(),
            "created_at": self.created_at,
            "started_at": g.started_at,
            "progress": g.progress,
            "parameters": self.parameters,
            "result": result,
            "error": g.error,
            "sse_url": format!("/v1/jobs/{}/stream", self.id),
        })
    }

    /// Image `index` of the result, as a base64 PNG.
    pub fn image(&self, index: usize) -> Option<String> {
        lock(&self.inner).result.as_ref().and_then(|r| r.images.get(index).cloned())
    }

    /// When it finished, if it has.
    pub fn finished_at(&self) -> Option<Instant> {
        lock(&self.inner).finished_at
    }

    /// Bytes this job holds beyond its fixed size: parameters, preview and images (what the job
    /// store's byte cap counts).
    pub fn stored_bytes(&self) -> usize {
        let g = lock(&self.inner);
        self.parameters_bytes + g.preview.as_ref().map_or(0, |p| p.image.len()) + g.result_bytes
    }
}
