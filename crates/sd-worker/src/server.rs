//! The router, the server loop, job expiry and graceful shutdown.

use std::future::Future;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;

use crate::config::WorkerConfig;
use crate::error::JobError;
use crate::state::AppState;
use crate::{a1111, api, engine, openai};

/// A started worker: shared state plus the engine thread (which is loading or serving the model).
pub struct Worker {
    state: Arc<AppState>,
    engine: Option<std::thread::JoinHandle<()>>,
}

impl Worker {
    /// Starts the engine thread, which begins loading the model at once (`/ready` answers 503 meanwhile).
    pub fn start(config: WorkerConfig) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let state = Arc::new(AppState::new(config, tx));
        let engine = engine::spawn(state.clone(), rx)?;
        Ok(Self { state, engine: Some(engine) })
    }

    /// The shared state.
    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// Every route.
    pub fn router(&self) -> Router {
        router(self.state.clone())
    }

    /// Serves until `shutdown` resolves, then stops taking jobs, cancels queued ones, lets the running
    /// job finish (cancelling it after the grace period), answers in-flight requests and stops the engine.
    pub async fn serve(mut self, listener: tokio::net::TcpListener, shutdown: impl Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
        let state = self.state.clone();
        let sweeper = tokio::spawn(expiry_loop(state.clone()));
        let st = state.clone();
        let signal = async move {
            shutdown.await;
            tracing::info!("shutdown requested");
            drain(&st).await;
        };
        let served = axum::serve(listener, self.router()).with_graceful_shutdown(signal).await;
        sweeper.abort();
        state.close_queue();
        if let Some(h) = self.engine.take() {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
        tracing::info!("stopped");
        served
    }
}

/// Builds the router over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.config.limits.max_body_bytes;
    Router::new()
        .route("/health", get(api::health))
        .route("/ready", get(api::ready))
        .route("/metrics", get(api::metrics))
        .route("/v1/models", get(api::models))
        .route("/v1/jobs", post(api::submit_job))
        .route("/v1/jobs/{id}", get(api::job_status).delete(api::cancel_job))
        .route("/v1/jobs/{id}/stream", get(api::stream_job))
        .route("/v1/images/generations", post(openai::generations))
        .route("/v1/images/edits", post(openai::edits))
        .route("/sdapi/v1/txt2img", post(a1111::txt2img))
        .route("/sdapi/v1/img2img", post(a1111::img2img))
        .route("/sdapi/v1/progress", get(a1111::progress))
        .route("/sdapi/v1/interrupt", post(a1111::interrupt))
        .route("/sdapi/v1/samplers", get(a1111::samplers))
        .route("/sdapi/v1/schedulers", get(a1111::schedulers))
        .route("/sdapi/v1/sd-models", get(a1111::sd_models))
        .route("/sdapi/v1/options", get(a1111::options))
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
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
