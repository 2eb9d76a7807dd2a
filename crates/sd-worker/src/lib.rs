#![warn(missing_docs)]
//! An HTTP worker serving Stable Diffusion image jobs, composed from `sd-models` (loading),
//! `sd-pipelines` (generation), `sd-lora` and `sd-controlnet` with no model logic of its own.
//!
//! One engine thread owns the models and runs jobs one at a time from a bounded queue. Jobs are
//! submitted through the native API (`POST /v1/jobs`, progress and previews over Server-Sent
//! Events), the OpenAI images API or the AUTOMATIC1111 API subset. See the README for the routes.
//!
//! In queue mode (feature `queue`, `--queue redis://…`) jobs go through a Redis Stream shared by
//! any number of workers and HTTP-only fronts instead (see [`queue`]).

pub mod a1111;
pub mod api;
pub mod config;
pub mod controlnet;
pub mod engine;
pub mod error;
pub mod folders;
pub mod jobs;
pub mod lora;
pub mod metrics;
pub mod models;
pub mod openai;
#[cfg(feature = "queue")]
pub mod queue;
pub mod request;
pub mod server;
pub mod state;
pub mod upscalers;
#[cfg(feature = "queue")]
pub mod wire;

pub use config::{Cli, Limits, ModelSource, QueueConfig, WorkerConfig};
pub use error::ApiError;
pub use server::{router, Worker};
