//! `sd-worker`: serve a Stable Diffusion model over HTTP.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use sd_worker::state::ModelState;
use sd_worker::{Cli, Worker};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    let addr = format!("{}:{}", cli.host, cli.port);
    let config = match cli.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(run(config, addr))
}

/// Logs to stdout: plain text (colour only on a terminal, never escape codes in a file or pipe)
/// or one JSON object per line.
fn init_logging(format: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt().with_env_filter(filter);
    if format == "json" {
        fmt.json().with_ansi(false).init();
    } else {
        fmt.with_ansi(std::io::stdout().is_terminal()).init();
    }
}

async fn run(config: sd_worker::WorkerConfig, addr: String) -> ExitCode {
    let listener = match tokio::net::TcpListener::bind(&addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: cannot listen on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let worker = match Worker::start(config) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("error: cannot start the engine thread: {e}");
            return ExitCode::FAILURE;
        }
    };
    match listener.local_addr() {
        Ok(a) => tracing::info!(addr = %a, "listening (the model loads in the background; GET /ready)"),
        Err(_) => tracing::info!(addr = %addr, "listening"),
    }
    let state = worker.state().clone();
    let watch = state.clone();
    let shutdown = async move {
        tokio::select! {
            _ = termination() => {}
            _ = load_failure(watch) => {}
        }
    };
    if let Err(e) = worker.serve(listener, shutdown).await {
        eprintln!("error: server failed: {e}");
        return ExitCode::FAILURE;
    }
    if let ModelState::Failed(msg) = state.model_state() {
        eprintln!("error: the model failed to load: {msg}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// Resolves when the model failed to load: the worker cannot serve anything useful then.
async fn load_failure(state: std::sync::Arc<sd_worker::state::AppState>) {
    loop {
        if let ModelState::Failed(_) = state.model_state() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Ctrl-C or SIGTERM.
async fn termination() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
