//! txt2img / img2img / inpaint for Stable Diffusion 1.x / 2.x / SDXL on Candle.
//!
//! One entry point, [`pipeline::generate`], runs a [`pipeline::Task`] over
//! [`sd_models::loader::StableDiffusionModels`] and a request ([`pipeline::GenerationParams`]), driven by a
//! [`sd_core::run::RunContext`] (noise, progress, latent edits) and optional [`pipeline::SdExtras`]
//! (ControlNet residuals, a scheduler of your own). The schedulers, noise, previews and image I/O are
//! sd-core's, re-exported here under their old paths.

pub mod conditioning;
pub mod control;
pub mod error;
pub mod hires;
pub mod image_io;
pub mod pipeline;

pub use error::{Error, Result};
pub use sd_core::{preview, prompt, schedulers};
