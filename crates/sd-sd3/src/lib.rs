//! Stable Diffusion 3 and 3.5 (Medium, Large, Large Turbo) on Candle.
//!
//! Load a model with [`load`] (a diffusers folder, a Stability single file, or a diffusion-model file with
//! its split text encoders and VAE beside it), then run [`pipeline::generate`] with an sd-core
//! [`sd_core::run::Task`] (txt2img, img2img, inpaint) and [`sd_core::run::RunContext`] (noise,
//! progress/cancel, latent edits). LoRAs (kohya, PEFT/diffusers, ComfyUI and OneTrainer names) are merged into
//! the MMDiT as it loads ([`Sd3LoadOptions::loras`], see [`lora`]). Previews (`sd_core::preview::latents_to_rgb`
//! with `ModelFamily::Sd3`), image I/O and the flow-matching scheduler are sd-core's; this crate depends on no
//! other model family.
//!
//! ```no_run
//! use sd_core::image_io::{save_png, tensor_to_images};
//! use sd_core::run::{RunContext, Task};
//! use sd_sd3::{load, pipeline, Sd3LoadOptions};
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let models = load("stable-diffusion-3.5-medium".as_ref(), &Sd3LoadOptions::default())?;
//!     let mut request = pipeline::capabilities(&models).request("a red fox in the snow");
//!     request.seed = 42;
//!     let out = pipeline::generate(&models, &request, &Task::TextToImage, &mut RunContext::default())?;
//!     save_png(&tensor_to_images(&out.images)?[0], "fox.png".as_ref(), None)?;
//!     Ok(())
//! }
//! ```

pub mod config;
pub mod detect;
pub mod error;
pub mod keymap;
pub mod loader;
pub mod lora;
pub mod model;
pub mod pipeline;
pub mod text;

pub use config::{Sd3Config, Sd3Variant};
pub use error::{Error, Result};
#[cfg(feature = "hub")]
pub use loader::load_from_hub;
pub use loader::{load, load_files, Part, Sd3Files, Sd3LoadOptions, Sd3Models};
pub use lora::{parse_lora_spec, Sd3Lora};
pub use sd_lora::AdapterReport;
pub use model::Mmdit;
pub use pipeline::{Sd3Output, SkipLayerGuidance};
