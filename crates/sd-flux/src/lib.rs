//! FLUX.1 [dev] and [schnell] on Candle.
//!
//! Load a model with [`load`] (a diffusers folder, or a BFL `flux1-*.safetensors` / GGUF transformer
//! beside its other components) or [`load_source`] (every component from its own path), then run
//! [`pipeline::generate`] with an sd-core [`sd_core::run::Task`] (txt2img, img2img, inpaint) and
//! [`sd_core::run::RunContext`] (noise, progress/cancel, latent edits). Previews
//! (`sd_core::preview::latents_to_rgb` with `ModelFamily::Flux`), image I/O and the flow-matching
//! scheduler are sd-core's; this crate depends on no other model family.
//!
//! ```no_run
//! use std::ops::ControlFlow;
//! use sd_core::image_io::{save_png, tensor_to_images};
//! use sd_core::run::{RunContext, StepProgress, Task};
//! use sd_flux::pipeline::{default_params, generate};
//! use sd_flux::{load, FluxLoadOptions};
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let models = load("FLUX.1-schnell".as_ref(), &FluxLoadOptions::default())?;
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

pub mod config;
pub mod detect;
pub mod error;
pub mod keymap;
pub mod latents;
pub mod loader;
pub mod lora;
pub mod model;
pub mod pipeline;
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
