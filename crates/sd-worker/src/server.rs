//! The router, the accept loop (timeouts, half-close, connection cap), the request guards (CORS,
//! body size, credentials), job expiry and graceful shutdown.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{from_fn_with_state, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;

use crate::config::WorkerConfig;
use crate::error::{ApiError, JobError};
use crate::state::AppState;
use crate::{a1111, api, engine, openai};

/// A started worker: shared state plus the engine thread (which is loading or serving the model).
pub struct Worker {
    state: Arc<AppState>,
    engine: Option<std::thread::JoinHandle<()>>,
}

impl Worker {
    /// Starts the engine thread, which begins loading the model at once (`/ready` answers 503 meanwhile).
    /// A front (`--front-only`) starts no engine: it serves the queue's jobs.
    pub fn start(config: WorkerConfig) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let front_only = config.queue.as_ref().is_some_and(|q| q.front_only);
        let state = Arc::new(AppState::new(config, tx));
        let engine = if front_only { None } else { Some(engine::spawn(state.clone(), rx)?) };
        Ok(Self { state, engine })
    }

    /// The shared state.
    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// Every route.
    pub fn router(&self) -> Router {
        router(self.state.clone())
    }

    /// Serves until `shutdown` resolves, then stops taking connections and jobs, cancels queued
    /// jobs, lets the running job finish (cancelling it after the grace period), and gives open
    /// connections the same grace period before closing them.
    ///
    /// Each connection gets `--header-timeout-secs` to send its headers (also the keep-alive idle
    /// limit) and `--body-timeout-secs` for its body; a client that half-closes its socket still
    /// gets its answer; beyond `--max-connections` a connection is answered 503 and closed.
    pub async fn serve(mut self, listener: tokio::net::TcpListener, shutdown: impl Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
        let state = self.state.clone();
        #[cfg(feature = "queue")]
        let fleet_tasks = join_queue(&state, self.engine.is_some())?;
        let sweeper = tokio::spawn(expiry_loop(state.clone()));
        let app = self.router();
        let limits = state.config.http.clone();
        let permits = Arc::new(Semaphore::new(limits.max_connections));
        let graceful = GracefulShutdown::new();
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                biased;
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                state.metrics.refused_connections.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(refuse_connection(stream));
                continue;
            };
            let _ = stream.set_nodelay(true);
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout).half_close(true);
            let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone())));
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(%peer, "connection closed: {e}");
                }
                drop(permit);
            });
        }
        drop(listener);
        tracing::info!("shutdown requested");
        drain(&state).await;
        #[cfg(feature = "queue")]
        if let Some(q) = state.fleet() {
            // The consumer stores its last job's outcome (or hands the job back) before the engine goes.
            q.join_consumer(state.config.shutdown_grace + Duration::from_secs(15)).await;
            for t in fleet_tasks {
                t.abort();
            }
        }
        if tokio::time::timeout(state.config.shutdown_grace, graceful.shutdown()).await.is_err() {
            tracing::warn!("connections still open after the grace period are closed");
        }
        sweeper.abort();
        state.close_queue();
        if let Some(h) = self.engine.take() {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// Opens the shared queue (queue mode): a refresher keeps the fleet's view current and, with an
/// engine here, a consumer takes jobs onto it.
#[cfg(feature = "queue")]
fn join_queue(state: &Arc<AppState>, has_engine: bool) -> std::io::Result<Vec<tokio::task::JoinHandle<()>>> {
    let Some(cfg) = state.config.queue.clone() else { return Ok(Vec::new()) };
    let q = crate::queue::RedisQueue::open(cfg, state.config.queue_capacity, state.config.job_expiry).map_err(std::io::Error::other)?;
    let q = Arc::new(q);
    state.set_fleet(q.clone());
    tracing::info!(queue = %q.config().name, consumer = %q.consumer, front_only = !has_engine, "queue mode");
    let refresher = tokio::spawn(q.clone().refresh_loop(state.clone(), has_engine));
    let notifier = tokio::spawn(q.clone().notify_loop());
    if has_engine {
        q.spawn_consumer(state.clone());
    }
    Ok(vec![refresher, notifier])
}

/// Answers a connection over the cap with a 503 JSON error and closes it.
async fn refuse_connection(mut stream: tokio::net::TcpStream) {
    let body = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "too_many_connections", None, "the worker serves as many connections as it may; retry shortly").body().to_string();
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
}

/// Builds the router over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.config.limits.max_body_bytes;
    let body_timeout = state.config.http.body_timeout;
    Router::new()
        .route("/health", get(api::health))
        .route("/ready", get(api::ready))
        .route("/metrics", get(api::metrics))
        .route("/v1/models", get(api::models))
        .route("/v1/jobs", post(api::submit_job))
        .route("/v1/jobs/{id}", get(api::job_status).delete(api::cancel_job))
        .route("/v1/jobs/{id}/stream", get(api::stream_job))
        .route("/v1/jobs/{id}/images/{index}", get(api::job_image))
        .route("/v1/images/generations", post(openai::generations))
        .route("/v1/images/edits", post(openai::edits))
        .route("/sdapi/v1/txt2img", post(a1111::txt2img))
        .route("/sdapi/v1/img2img", post(a1111::img2img))
        .route("/sdapi/v1/progress", get(a1111::progress))
        .route("/sdapi/v1/interrupt", post(a1111::interrupt))
        .route("/sdapi/v1/skip", post(a1111::skip))
        .route("/sdapi/v1/samplers", get(a1111::samplers))
        .route("/sdapi/v1/schedulers", get(a1111::schedulers))
        .route("/sdapi/v1/sd-models", get(a1111::sd_models))
        .route("/sdapi/v1/options", get(a1111::options).post(a1111::set_options))
        .route("/sdapi/v1/loras", get(a1111::loras))
        .route("/sdapi/v1/refresh-loras", post(a1111::refresh))
        .route("/sdapi/v1/refresh-checkpoints", post(a1111::refresh_checkpoints))
        .route("/sdapi/v1/refresh-embeddings", post(a1111::refresh_embeddings))
        .route("/sdapi/v1/refresh-vae", post(a1111::refresh))
        .route("/sdapi/v1/embeddings", get(a1111::embeddings))
        .route("/sdapi/v1/sd-vae", get(a1111::sd_vae))
        .route("/sdapi/v1/upscalers", get(a1111::upscalers))
        .route("/sdapi/v1/latent-upscale-modes", get(a1111::latent_upscale_modes))
        .route("/sdapi/v1/extra-single-image", post(a1111::extra_single_image))
        .route("/sdapi/v1/extra-batch-images", post(a1111::extra_batch_images))
        .route("/sdapi/v1/png-info", post(a1111::png_info))
        .route("/controlnet/model_list", get(a1111::controlnet_models))
        .route("/controlnet/module_list", get(a1111::controlnet_modules))
        .route("/controlnet/version", get(a1111::controlnet_version))
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(body_timeout))
        .layer(from_fn_with_state(state.clone(), authenticate))
        .layer(from_fn_with_state(state.clone(), refuse_oversized_body))
        .layer(from_fn_with_state(state.clone(), cors))
        .with_state(state)
}

/// Who sent a request: the credential it authenticated with, `None` when the API is open. Jobs
/// remember it, and only the same caller may cancel or interrupt them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller(pub Option<String>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts.extensions.get::<Caller>().cloned().unwrap_or(Caller(None)))
    }
}

/// Compares in time independent of where the inputs differ (the length still shows).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        diff |= usize::from(a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0));
    }
    diff == 0
}

/// The credential an `Authorization` header proves, if any.
fn credential(state: &AppState, authorization: Option<&str>) -> Option<String> {
    let auth = &state.config.auth;
    let value = authorization?.trim();
    let (scheme, rest) = value.split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        // Every key is compared, so the time does not tell which one matched.
        let mut found = None;
        for (i, k) in auth.api_keys.iter().enumerate() {
            if constant_time_eq(k.as_bytes(), rest.as_bytes()) && found.is_none() {
                found = Some(format!("key#{i}"));
            }
        }
        return found;
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD.decode(rest).ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (user, pass) = text.split_once(':')?;
        let mut found = None;
        for (u, p) in &auth.basic {
            let ok = constant_time_eq(u.as_bytes(), user.as_bytes()) & constant_time_eq(p.as_bytes(), pass.as_bytes());
            if ok && found.is_none() {
                found = Some(format!("user:{u}"));
            }
        }
        return found;
    }
    None
}

/// Requires a configured credential on every route but the probes (and `/metrics` when public).
async fn authenticate(State(st): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    let auth = &st.config.auth;
    let path = req.uri().path();
    let open = !auth.enabled() || path == "/health" || path == "/ready" || (path == "/metrics" && auth.metrics_public);
    let caller = if open {
        None
    } else {
        let header = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        match credential(&st, header) {
            Some(c) => Some(c),
            None => {
                let mut resp = ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    Some("authorization".into()),
                    "send `Authorization: Bearer <api key>` or HTTP Basic credentials (--api-key / --api-auth)",
                )
                .into_response();
                resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"sd-worker\", Bearer"));
                return resp;
            }
        }
    };
    req.extensions_mut().insert(Caller(caller));
    next.run(req).await
}

/// Refuses a body whose announced length is over the limit at once, before reading any of it.
async fn refuse_oversized_body(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let limit = st.config.limits.max_body_bytes;
    let announced = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).map(|v| v.trim().parse::<u64>());
    match announced {
        Some(Ok(n)) if n > limit as u64 => crate::error::body_rejection(StatusCode::PAYLOAD_TOO_LARGE, String::new(), limit).into_response(),
        Some(Err(_)) => ApiError::new(StatusCode::BAD_REQUEST, "bad_body", Some("content-length".into()), "Content-Length is not a number").into_response(),
        _ => next.run(req).await,
    }
}

/// CORS for the configured origins only; without `--cors-origin`, no CORS headers at all (browsers
/// then refuse cross-origin calls).
async fn cors(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let origins = &st.config.cors_origins;
    let origin = req.headers().get(header::ORIGIN).and_then(|v| v.to_str().ok()).map(str::to_string);
    let allowed = match &origin {
        Some(o) if !origins.is_empty() => origins.iter().any(|a| a == "*" || a.eq_ignore_ascii_case(o)),
        _ => false,
    };
    if !allowed {
        return next.run(req).await;
    }
    let origin = origin.unwrap_or_default();
    let preflight = req.method() == Method::OPTIONS && req.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut resp = if preflight { StatusCode::NO_CONTENT.into_response() } else { next.run(req).await };
    let h = resp.headers_mut();
    let any = origins.iter().any(|a| a == "*");
    if let Ok(v) = HeaderValue::from_str(if any { "*" } else { &origin }) {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
    }
    h.insert(header::VARY, HeaderValue::from_static("origin"));
    if preflight {
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST, DELETE, OPTIONS"));
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static("authorization, content-type, last-event-id"));
        h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
    }
    resp
}

async fn expiry_loop(state: Arc<AppState>) {
    let every = (state.config.job_expiry / 4).clamp(Duration::from_millis(50), Duration::from_secs(30));
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let n = state.expire();
        if n > 0 {
            tracing::debug!(expired = n, "expired finished jobs");
        }
    }
}

async fn drain(state: &AppState) {
    let Some(running) = state.begin_shutdown() else { return };
    let grace = state.config.shutdown_grace;
    tracing::info!(job_id = %running.id, grace_secs = grace.as_secs_f64(), "waiting for the running job");
    if tokio::time::timeout(grace, running.wait()).await.is_err() {
        state.cancel(&running, JobError::new("shutdown", "the worker is shutting down"));
        let _ = running.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn constant_time_eq_compares_whole_inputs() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
    }
}
