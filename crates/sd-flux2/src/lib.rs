//! FLUX.2 [klein] on Candle, as diffusers 0.42 runs it (`Flux2KleinPipeline`, `Flux2KleinInpaintPipeline`).
//!
//! Load a diffusers folder, BFL's single transformer file or ComfyUI's split files with [`load`], then run [`pipeline::generate`] with an sd-core
//! [`sd_core::run::Task`] (txt2img, `Edit` with one or more reference images, inpaint) and
//! [`sd_core::run::RunContext`] (noise, progress/cancel, latent edits). The parts: [`model::Flux2Transformer`]
//! (double/single-stream DiT with four-axis RoPE), sd-models' shared [`sd_models::qwen3::Qwen3Encoder`]
//! (hidden states 9, 18 and 27, see [`text`]), [`vae::Flux2Vae`] (32-channel autoencoder, 2×2-patchified
//! batch-norm-normalised latents) and sd-core's flow-matching Euler scheduler with klein's empirical shift.
//! [`detect::is_flux2`] tells a klein folder or transformer file apart without loading it; [`lora`] merges
//! PEFT, kohya and BFL-named LoRAs into the transformer as it loads.
//!
//! ```no_run
//! use sd_core::image_io::{save_png, tensor_to_images};
//! use sd_core::run::{RunContext, Task};
//! use sd_flux2::pipeline::{default_params, generate};
//! use sd_flux2::{load, Flux2LoadOptions};
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let models = load("FLUX.2-klein-4B".as_ref(), &Flux2LoadOptions::default())?;
//!     let mut p = default_params(&models, "a red fox in the snow");
//!     p.seed = 42;
//!     let out = generate(&models, &p, &Task::TextToImage, &mut RunContext::default())?;
//!     save_png(&tensor_to_images(&out.images)?[0], "fox.png".as_ref(), None)?;
//!     Ok(())
//! }
//! ```

#![warn(missing_docs)]

pub mod config;
pub mod detect;
pub mod error;
pub mod keymap;
pub mod loader;
pub mod lora;
pub mod model;
pub mod pipeline;
pub mod text;
pub mod vae;

pub use config::{Flux2Config, Flux2VaeExtra};
pub use error::{Error, Result};
#[cfg(feature = "hub")]
pub use loader::load_from_hub;
pub use loader::{load, load_files, Flux2Files, Flux2LoadOptions, Flux2Models, Flux2Variant};
pub use lora::Flux2Lora;
pub use model::Flux2Transformer;
pub use pipeline::{Flux2Output, Flux2Params};
pub use vae::Flux2Vae;
