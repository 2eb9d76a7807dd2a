//! FLUX.1 [dev] and [schnell] on Candle.
//!
//! Load a model with [`load`] (a diffusers folder, or a BFL `flux1-*.safetensors` / GGUF transformer
//! beside its other components) or [`load_source`] (every component from its own path), then run
//! [`pipeline::text_to_image`] or [`pipeline::image_to_image`]. Progress callbacks, previews
//! (`sd_pipelines::preview::latents_to_rgb` with `ModelFamily::Flux`) and cancellation work as in
//! sd-pipelines.
//!
//! ```no_run
//! use std::ops::ControlFlow;
//! use sd_flux::pipeline::{text_to_image, FluxParams};
//! use sd_flux::{load, FluxLoadOptions};
//! use sd_pipelines::image_io::{save_png, tensor_to_images};
//! use sd_pipelines::pipeline::StepProgress;
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let models = load("FLUX.1-schnell".as_ref(), &FluxLoadOptions::default())?;
//!     let mut p = FluxParams::for_model(&models, "a red fox in the snow");
//!     p.seed = 42;
//!     let out = text_to_image(&models, &p, &mut |s: &StepProgress<'_>| {
//!         eprintln!("step {}/{}", s.step, s.total);
//!         ControlFlow::Continue(())
//!     })?;
//!     save_png(&tensor_to_images(&out.images)?[0], "fox.png".as_ref(), None)?;
//!     Ok(())
//! }
//! ```

pub mod config;
pub mod detect;
pub mod error;
pub mod keymap;
pub mod latents;
pub mod loader;
pub mod lora;
pub mod pipeline;
pub mod schedule;
pub mod text;
pub mod transformer;
pub mod vae;

pub use config::FluxVariant;
pub use error::{Error, Result};
#[cfg(feature = "hub")]
pub use loader::load_from_hub;
pub use loader::{load, load_source, FluxFiles, FluxLoadOptions, FluxModels, FluxSource};
pub use lora::FluxLora;
pub use pipeline::{FluxOutput, FluxParams};
pub use transformer::FluxTransformer;
