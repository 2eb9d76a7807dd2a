//! The native job API, health, readiness, model listing and metrics.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
#[cfg(feature = "queue")]
use futures_util::StreamExt as _;
use sd_pipelines::schedulers::SamplerKind;
use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::error::{body_rejection, ApiError, JobError};
use crate::jobs::JobEvent;
use crate::request::{native_job_object, parse_json_object};
use crate::server::Caller;
use crate::state::{AppState, ModelState};

/// Shared state as handlers receive it.
pub type St = State<Arc<AppState>>;

/// Reads the body or answers a JSON error naming `body` (413 when over the limit).
pub fn body_bytes(state: &AppState, body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|r| body_rejection(r.status(), r.body_text(), state.config.limits.max_body_bytes))
}

/// The `{id}` of a job route, or a JSON error naming `id` (a malformed percent-encoding such as
/// `%FF` is refused here instead of with axum's plain-text answer).
pub fn job_id(p: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    p.map(|Path(id)| id).map_err(|e| ApiError::invalid("id", format!("not a valid job id: {}", e.body_text())))
}

/// `POST /v1/jobs`: validates and queues a job; 202 with its id and stream URL.
pub async fn submit_job(State(st): St, caller: Caller, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let body = body_bytes(&st, body)?;
    st.ready_model()?;
    // JSON and image decoding can take a while for large uploads; keep them off the async workers.
    let mut obj = blocking(move || parse_json_object(&body)).await?;
    // `model` names a `--models-dir` checkpoint to run this job on (default: the model in use).
    let model = match obj.remove("model") {
        None | Some(Value::Null) => st.active_model().await?,
        Some(Value::String(name)) => st.model_for("model", &name).await?,
        Some(other) => return Err(ApiError::invalid("model", format!("expected a checkpoint name (GET /sdapi/v1/sd-models lists them), got {other}"))),
    };
    let st2 = st.clone();
    let (spec, params) = blocking(move || native_job_object(&st2, &model, obj)).await?;
    let job = st.submit_job(spec, params, caller.0).await?;
    let sse_url = format!("/v1/jobs/{}/stream", job.id);
    let body = json!({"job_id": job.id, "sse_url": sse_url, "status_url": format!("/v1/jobs/{}", job.id), "status": "queued"});
    Ok((StatusCode::ACCEPTED, [(header::LOCATION, format!("/v1/jobs/{}", job.id))], Json(body)).into_response())
}

/// `GET /v1/jobs/{id}` query.
#[derive(Debug, serde::Deserialize)]
pub struct StatusQuery {
    /// Add the base64 PNGs to the result (default: only their URLs).
    #[serde(default)]
    pub include_images: bool,
}

/// `GET /v1/jobs/{id}`: status, progress and (when done) the result's metadata with each image's
/// URL; `?include_images=true` adds the base64 PNGs.
pub async fn job_status(
    State(st): St,
    id: Result<Path<String>, PathRejection>,
    q: Result<Query<StatusQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id = job_id(id)?;
    let Query(q) = q.map_err(|e| ApiError::invalid("include_images", format!("{}; use include_images=true or false", e.body_text())))?;
    let job = st.find_job(&id).await?.ok_or_else(|| ApiError::job_not_found(&id))?;
    Ok(Json(job.status_json(q.include_images)))
}

/// `GET /v1/jobs/{id}/images/{index}`: one finished image as PNG bytes (with its A1111 metadata).
pub async fn job_image(State(st): St, p: Result<Path<(String, String)>, PathRejection>) -> Result<Response, ApiError> {
    let (id, index) = p.map(|Path(p)| p).map_err(|e| ApiError::invalid("id", format!("not a valid image path: {}", e.body_text())))?;
    let job = st.find_job(&id).await?.ok_or_else(|| ApiError::job_not_found(&id))?;
    let i: usize = index.trim_end_matches(".png").parse().map_err(|_| ApiError::invalid("index", format!("{index:?} is not an image number")))?;
    let b64 = job.image(i).ok_or_else(|| {
        ApiError::new(StatusCode::NOT_FOUND, "image_not_found", Some("index".into()), format!("job {id} has no image {i} (yet); see its image_urls"))
    })?;
    let png = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64.as_bytes())
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", None, e.to_string()))?;
    Ok(([(header::CONTENT_TYPE, "image/png")], png).into_response())
}

/// `DELETE /v1/jobs/{id}`: cancels a queued or running job.
pub async fn cancel_job(State(st): St, caller: Caller, id: Result<Path<String>, PathRejection>) -> Result<Response, ApiError> {
    let id = job_id(id)?;
    let job = st.find_job(&id).await?.ok_or_else(|| ApiError::job_not_found(&id))?;
    if job.owner != caller.0 {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "not_your_job", Some("id".into()), format!("job {id} was submitted with other credentials")));
    }
    let status = job.status();
    if status.is_terminal() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "job_finished",
            Some("id".into()),
            format!("job {id} already {}; nothing to cancel", status.as_str()),
        ));
    }
    let err = JobError::new("cancelled", "cancelled by request");
    #[cfg(feature = "queue")]
    if let (true, Some(q)) = (job.remote, st.fleet()) {
        // The fleet decides: a queued job is cancelled at once, a running one within a step.
        let status = match q.cancel(&id, &err).await?.as_str() {
            "gone" => return Err(ApiError::job_not_found(&id)),
            "running" => "running",
            "cancelled" => "cancelled",
            done => return Err(ApiError::new(StatusCode::CONFLICT, "job_finished", Some("id".into()), format!("job {id} already {done}; nothing to cancel"))),
        };
        return Ok((StatusCode::ACCEPTED, Json(json!({"job_id": job.id, "status": status, "cancel_requested": true}))).into_response());
    }
    st.cancel(&job, err);
    let body = json!({"job_id": job.id, "status": job.status().as_str(), "cancel_requested": true});
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

/// `GET /v1/jobs/{id}/stream`: Server-Sent Events from the current state to the end of the job.
/// Every event has an id and a reconnecting client's `Last-Event-ID` resumes after it: in queue
/// mode the id of the event's entry in the job's Redis stream (on any front, with every event in
/// between); in a self-contained worker an id that grows with the job's steps (from the job's
/// current state).
pub async fn stream_job(
    State(st): St,
    headers: axum::http::HeaderMap,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = job_id(id)?;
    let job = st.find_job(&id).await?.ok_or_else(|| ApiError::job_not_found(&id))?;
    // Counted against the subscriber caps until the stream is dropped.
    let subscription = st.subscribe(&job)?;
    #[cfg(feature = "queue")]
    if let (true, Some(q)) = (job.remote, st.fleet()) {
        let after = headers.get("last-event-id").and_then(|v| v.to_str().ok()).map(str::trim).filter(|v| crate::queue::is_stream_id(v)).map(str::to_string);
        let events = q.clone().event_stream(id, after).map(move |(eid, name, data)| {
            let _counted = &subscription;
            Ok::<_, Infallible>(Event::default().id(eid).event(name).data(data))
        });
        return Ok(Sse::new(events).keep_alive(KeepAlive::default()).into_response());
    }
    // Ids here follow the job's steps (see `JobEvent::sse_id`): a reconnecting client is sent only
    // what comes after its `Last-Event-ID` (from the job's current state on).
    let after: Option<u64> = headers.get("last-event-id").and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse().ok());
    let (snapshot, rx) = job.subscribe();
    type StreamState = (VecDeque<JobEvent>, Option<broadcast::Receiver<JobEvent>>, crate::state::Subscription);
    let stream = futures_util::stream::unfold((snapshot, Some(rx), subscription), move |(mut pending, mut rx, sub): StreamState| async move {
        loop {
            if let Some(ev) = pending.pop_front() {
                if ev.is_terminal() {
                    pending.clear();
                    rx = None;
                }
                let id = ev.sse_id();
                if after.is_some_and(|a| id <= a) {
                    continue;
                }
                let event = Event::default().id(id.to_string()).event(ev.name()).data(ev.data().to_string());
                return Some((Ok::<_, Infallible>(event), (pending, rx, sub)));
            }
            let r = rx.as_mut()?;
            match r.recv().await {
                Ok(ev) => pending.push_back(ev),
                // A slow reader skipped some progress; the newest events follow.
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()).into_response())
}

/// `GET /health`: the process is up.
pub async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /ready`: 200 once the model is loaded (and, in queue mode, the queue answers), 503 while
/// loading, after a failed load, or while the queue is unreachable.
pub async fn ready(State(st): St) -> Response {
    #[cfg(feature = "queue")]
    if let Some(q) = st.fleet() {
        if !q.is_connected() {
            return (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "2")], Json(json!({"status": "queue_unavailable", "queue": q.config().name}))).into_response();
        }
        if q.config().front_only && matches!(st.model_state(), ModelState::Loading) {
            return (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "2")], Json(json!({"status": "no_worker", "queue": q.config().name}))).into_response();
        }
    }
    match st.model_state() {
        ModelState::Ready(m) => Json(json!({"status": "ready", "model": m.name, "variant": m.caps.variant})).into_response(),
        ModelState::Loading => (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "5")], Json(json!({"status": "loading"}))).into_response(),
        ModelState::Failed(e) => (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "failed", "error": e}))).into_response(),
    }
}

/// `GET /v1/models`: the loaded model (OpenAI list shape) and the LoRAs requests may use.
pub async fn models(State(st): St) -> Result<Json<serde_json::Value>, ApiError> {
    let m = st.ready_model()?;
    let samplers: Vec<&str> = SamplerKind::ALL.iter().map(|k| k.display_name()).collect();
    Ok(Json(json!({
        "object": "list",
        "data": [{
            "id": m.name,
            "object": "model",
            "owned_by": "sd-worker",
            "created": 0,
            "variant": m.caps.variant,
            "family": format!("{:?}", m.caps.family).to_lowercase(),
            "inpainting": m.caps.inpaint_model,
            "skip_layer_guidance": m.caps.skip_layer_guidance,
            "tasks": m.caps.tasks,
            "source": m.source,
            "dtype": m.dtype,
            "device": m.device,
            "defaults": {"width": m.caps.default_width, "height": m.caps.default_height, "steps": m.caps.default_steps, "guidance_scale": m.caps.default_guidance},
        }],
        "checkpoints": st.catalog.list(),
        "loras": st.loras.list(),
        "controlnets": st.controlnets.list(),
        "samplers": samplers,
        "limits": {
            "max_width": st.config.limits.max_width,
            "max_height": st.config.limits.max_height,
            "max_batch": st.config.limits.max_batch,
            "max_steps": st.config.limits.max_steps,
            "max_body_bytes": st.config.limits.max_body_bytes,
            "queue_capacity": st.config.queue_capacity,
        },
    })))
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(st): St) -> Response {
    let ready = matches!(st.model_state(), ModelState::Ready(_));
    #[allow(unused_mut)]
    let mut text = st.metrics.render(st.queue_depth(), st.current().is_some(), ready, (st.stored_jobs(), st.stored_bytes()));
    #[cfg(feature = "queue")]
    if let Some(q) = st.fleet() {
        use std::fmt::Write as _;
        let _ = writeln!(text, "# HELP sd_worker_queue_connected Whether the shared queue (Redis) answered at the last check.");
        let _ = writeln!(text, "# TYPE sd_worker_queue_connected gauge");
        let _ = writeln!(text, "sd_worker_queue_connected {}", u8::from(q.is_connected()));
        let _ = writeln!(text, "# HELP sd_worker_fleet_workers Workers that sent a heartbeat to the queue in the last minute.");
        let _ = writeln!(text, "# TYPE sd_worker_fleet_workers gauge");
        let _ = writeln!(text, "sd_worker_fleet_workers {}", q.live_workers());
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

/// Any other path.
pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", None, "no such route; see the README for the API")
}

/// A known path with the wrong method.
pub async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", None, "this route does not take that HTTP method; see the README")
}

/// Maps a job that ended without images to the HTTP error of a synchronous route.
pub fn job_error_response(e: JobError) -> ApiError {
    let status = match e.code {
        "invalid_request" | "invalid_lora" | "invalid_controlnet" => StatusCode::BAD_REQUEST,
        "cancelled" | "shutdown" => StatusCode::CONFLICT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let code = match e.code {
        "invalid_request" => "invalid_request",
        "cancelled" => "cancelled",
        "shutdown" => "shutdown",
        "invalid_lora" => "invalid_lora",
        "invalid_controlnet" => "invalid_controlnet",
        "internal_error" => "internal_error",
        _ => "generation_failed",
    };
    ApiError::new(status, code, e.field, e.message)
}

/// Runs `f` on the blocking pool (image decoding, validation of large bodies).
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, ApiError> + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", None, e.to_string()))?
}

/// Queues a job and waits for its images (the synchronous OpenAI and A1111 routes); the job is
/// cancelled if the request is dropped first (its connection failed). A client that only
/// half-closed its socket keeps waiting for the answer.
pub async fn run_sync(st: &Arc<AppState>, caller: Caller, spec: crate::jobs::JobSpec, params: serde_json::Value) -> Result<Arc<crate::jobs::JobResult>, ApiError> {
    let job = st.submit_job(spec, params, caller.0).await?;
    let mut guard = crate::state::CancelOnDrop::new(st.clone(), job.clone());
    let r = job.wait().await;
    guard.disarm();
    r.map_err(job_error_response)
}
