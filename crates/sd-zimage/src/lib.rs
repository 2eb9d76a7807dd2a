//! Z-Image (Turbo and base) on Candle, as diffusers 0.42 runs it.
//!
//! Load a model with [`load`] (a diffusers `ZImagePipeline` folder, or a transformer `.safetensors` in the
//! diffusers or original/ComfyUI layout beside the other components), then run [`pipeline::generate`]
//! with an sd-core [`sd_core::run::Task`] (txt2img, img2img, inpaint) and [`sd_core::run::RunContext`]
//! (noise, progress/cancel, latent edits). The parts: [`model::ZImageModel`] (the single-stream DiT),
//! [`text::Qwen3Encoder`] (Qwen3's second-to-last hidden state), FLUX.1's 16-channel autoencoder from
//! sd-models, and sd-core's flow-matching Euler scheduler. LoRAs merge while the transformer loads
//! ([`ZImageLoadOptions::loras`], [`lora`]). [`detect::is_zimage`] tells a Z-Image path apart without
//! loading it.
//!
//! ```no_run
//! use std::ops::ControlFlow;
//! use sd_core::image_io::{save_png, tensor_to_images};
//! use sd_core::run::{RunContext, StepProgress, Task};
//! use sd_zimage::pipeline::{default_params, generate};
//! use sd_zimage::{load, ZImageLoadOptions};
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let models = load("Z-Image-Turbo".as_ref(), &ZImageLoadOptions::default())?;
//!     let mut p = default_params(&models, "a red fox in the snow");
//!     p.seed = 42;
//!     let mut progress = |s: &StepProgress<'_>| {
//!         eprintln!("step {}/{}", s.step, s.total);
//!         ControlFlow::Continue(())
//!     };
//!     let out = generate(&models, &p, &Task::TextToImage, &mut RunContext::with_progress(&mut progress))?;
//!     save_png(&tensor_to_images(&out.images)?[0], "fox.png".as_ref(), None)?;
//!     Ok(())
//! }
//! ```

#![warn(missing_docs)]

pub mod config;
pub mod detect;
pub mod error;
pub mod loader;
pub mod lora;
pub mod model;
pub mod norm;
pub mod pipeline;
pub mod text;
pub mod transformer;
pub mod vae;

pub use config::{Qwen3Config, ZImageConfig};
pub use error::{Error, Result};
#[cfg(feature = "hub")]
pub use loader::load_from_hub;
pub use loader::{load, load_files, ZImageFiles, ZImageLoadOptions, ZImageModels, ZImageVariant};
pub use lora::ZImageLora;
pub use model::ZImageModel;
pub use pipeline::{ZImageOutput, ZImageParams};
pub use text::Qwen3Encoder;
