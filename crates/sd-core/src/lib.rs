//! The shared runtime of the sd-* diffusion crates: what every model family uses and none owns.
//!
//! - [`schedulers`]: the samplers of diffusers (DDIM … UniPC, with one typed parser of
//!   `scheduler_config.json`) and flow matching ([`schedulers::flow_match`]), noise sources.
//! - [`run`]: request limits and checks, the seed's generator, per-step progress/cancel and latent-edit
//!   callbacks, and the [`run::RunContext`] a family's `generate` takes.
//! - [`prompt`]: A1111's prompt syntax (weights, `BREAK`, 75-token chunks) and its limits.
//! - [`prompt_schedule`]: A1111 prompt editing `[from:to:when]` and alternation `[a|b]` per model call.
//! - [`family`]: what a loaded model can do ([`family::Capabilities`]) and the one request check every
//!   family and front end shares.
//! - [`preview`]: cheap latent → RGB previews per [`ModelFamily`].
//! - [`image_io`]: images ↔ tensors, PNGs with A1111 `parameters` (infotext) metadata.
//! - [`Error`]: the error vocabulary (request fields, steps, strength, cancellation) the family crates wrap.
//!
//! ```
//! use std::ops::ControlFlow;
//! use candle_core::{DType, Device, Tensor};
//! use sd_core::run::{RunContext, StepProgress};
//! use sd_core::schedulers::flow_match::{FlowMatchConfig, FlowMatchEulerScheduler};
//! use sd_core::ModelFamily;
//!
//! # fn main() -> sd_core::Result<()> {
//! let sched = FlowMatchEulerScheduler::new(&FlowMatchConfig::schnell(), 4, 16)?;
//! let mut steps = 0;
//! let mut progress = |_: &StepProgress<'_>| { steps += 1; ControlFlow::Continue(()) };
//! let mut run = RunContext::with_progress(&mut progress);
//! let mut x = Tensor::ones((1, 16, 8, 8), DType::F32, &Device::Cpu)?;
//! for i in 0..sched.timesteps().len() {
//!     let v = (&x * -1.0)?; // a model predicting the velocity towards 0
//!     x = sched.step(&v, i, &x)?;
//!     let info = StepProgress { step: i + 1, total: 4, timestep: sched.timesteps()[i], latents: &x, family: ModelFamily::Flux };
//!     if let Some(edited) = run.step_done(&info)? { x = edited; }
//! }
//! drop(run);
//! assert_eq!(steps, 4);
//! # Ok(()) }
//! ```

pub mod error;
pub mod family;
pub mod image_io;
pub mod preview;
pub mod prompt;
pub mod prompt_schedule;
pub mod run;
pub mod schedulers;

pub use error::{Error, Result};
pub use family::ModelFamily;
