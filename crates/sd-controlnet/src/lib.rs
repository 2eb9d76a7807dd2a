//! diffusers-compatible ControlNet for Stable Diffusion 1.x/2.x and SDXL on Candle.
//!
//! Load a diffusers ControlNet folder or an A1111/civitai single file with [`ControlNetModel::load`], prepare a control image
//! with [`preprocess`], and pass a [`ControlNetHook`] to sd-pipelines' `*_with_hooks` entry points.

pub mod config;
pub mod error;
pub mod hook;
pub mod model;
pub mod preprocess;
pub mod single_file;

pub use config::ControlNetConfig;
pub use error::{Error, Result};
pub use hook::{ControlNetHook, ControlUnit};
pub use model::ControlNetModel;
