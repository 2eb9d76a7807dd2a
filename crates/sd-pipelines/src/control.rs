//! Hooks that add ControlNet-style residuals to every UNet call of a pipeline run.
//!
//! sd-pipelines only defines the interface; crates such as `sd-controlnet` implement it, so the
//! pipelines do not depend on any particular control model.

use candle_core::Tensor;
use sd_models::unet::AddedCond;

use crate::error::Result;

/// Down residuals (one per UNet skip connection) and the mid-block residual.
pub type Residuals = (Vec<Tensor>, Tensor);

/// Supplies residuals for the UNet skip connections at each denoising step.
pub trait ResidualHook {
    /// Residuals for the UNet call of step `step_index` (0-based, counted from the first step this run
    /// denoises) out of `total_steps`, or `None` to leave the UNet unconditioned at this step.
    ///
    /// `latent_model_input` is the scaled, CFG-doubled latent batch without any inpainting mask
    /// channels (diffusers' `control_model_input`); `context`, `added` are what the UNet receives.
    fn residuals(
        &mut self,
        step_index: usize,
        total_steps: usize,
        timestep: f64,
        latent_model_input: &Tensor,
        context: &Tensor,
        added: Option<&AddedCond>,
    ) -> Result<Option<Residuals>>;
}
