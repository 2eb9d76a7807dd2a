//! Schedulers and txt2img / img2img / inpaint pipelines for Stable Diffusion on Candle.
//!
//! Pipelines are plain functions over [`sd_models::loader::StableDiffusionModels`], a sampler and a
//! request ([`pipeline::GenerationParams`]); schedulers are checked step by step against diffusers.

pub mod conditioning;
pub mod control;
pub mod error;
pub mod image_io;
pub mod pipeline;
pub mod preview;
pub mod prompt;
pub mod schedulers;

pub use error::{Error, Result};
