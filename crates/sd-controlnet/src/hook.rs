//! Running one or more ControlNets inside an sd-pipelines run through [`sd_pipelines::control::ResidualHook`].

use candle_core::Tensor;
use sd_models::unet::AddedCond;
use sd_models::UNetConfig;
use sd_pipelines::control::{ResidualHook, Residuals};

use crate::error::{Error, Result};
use crate::model::ControlNetModel;

/// Largest accepted conditioning scale (A1111's "control weight" slider goes to 2).
pub const MAX_CONDITIONING_SCALE: f64 = 2.0;

/// One ControlNet with its control image, strength and active part of the schedule.
#[derive(Debug, Clone)]
pub struct ControlUnit {
    /// The ControlNet.
    pub model: ControlNetModel,
    /// Control image `[1 or batch, 3, height, width]` in [0, 1] at the generation size (see [`crate::preprocess::prepare_image`]).
    pub image: Tensor,
    /// Multiplier of the residuals (diffusers' `controlnet_conditioning_scale`), in `0..=2`.
    pub scale: f64,
    /// Fraction of the schedule at which the unit starts acting (diffusers' `control_guidance_start`).
    pub start: f64,
    /// Fraction of the schedule after which the unit stops acting (diffusers' `control_guidance_end`).
    pub end: f64,
}

impl ControlUnit {
    /// A unit active over the whole schedule.
    pub fn new(model: ControlNetModel, image: Tensor, scale: f64) -> Self {
        Self { model, image, scale, start: 0.0, end: 1.0 }
    }

    /// Whether the unit acts at step `i` of `total`, exactly as diffusers' `controlnet_keep`.
    pub fn active(&self, i: usize, total: usize) -> bool {
        let n = total as f64;
        !((i as f64) / n < self.start || ((i + 1) as f64) / n > self.end)
    }

    fn validate(&self) -> Result<()> {
        if !self.scale.is_finite() || !(0.0..=MAX_CONDITIONING_SCALE).contains(&self.scale) {
            return Err(Error::InvalidInput {
                field: "controlnet conditioning scale",
                reason: format!("{} is outside 0..={MAX_CONDITIONING_SCALE}", self.scale),
            });
        }
        if !(self.start >= 0.0 && self.start < self.end && self.end <= 1.0) {
            return Err(Error::InvalidInput {
                field: "control guidance start/end",
                reason: format!("need 0 ≤ start < end ≤ 1, got start {} and end {}", self.start, self.end),
            });
        }
        match self.image.dims() {
            &[_, 3, _, _] => Ok(()),
            dims => Err(Error::InvalidInput { field: "control image", reason: format!("expected [batch, 3, height, width] in [0, 1], got {dims:?}") }),
        }
    }
}

/// Several ControlNets whose residuals are summed, as diffusers' `MultiControlNetModel` (non-guess mode).
#[derive(Debug, Clone)]
pub struct ControlNetHook {
    units: Vec<ControlUnit>,
}

impl ControlNetHook {
    /// Checks every unit's parameters and that each ControlNet fits `unet` before any step runs.
    pub fn new(units: Vec<ControlUnit>, unet: &UNetConfig) -> Result<Self> {
        for unit in &units {
            unit.validate()?;
            unit.model.config().check_compatible(unet)?;
        }
        Ok(Self { units })
    }

    /// The units, in order.
    pub fn units(&self) -> &[ControlUnit] {
        &self.units
    }

    /// Summed residuals of the active units for one UNet call, or `None` when none is active.
    pub fn compute(
        &self,
        step_index: usize,
        total_steps: usize,
        timestep: f64,
        latent_model_input: &Tensor,
        context: &Tensor,
        added: Option<&AddedCond>,
    ) -> Result<Option<Residuals>> {
        let b = latent_model_input.dim(0)?;
        let mut sum: Option<Residuals> = None;
        for unit in self.units.iter().filter(|u| u.active(step_index, total_steps)) {
            let image = batch_image(&unit.image, b)?;
            let (down, mid) = unit.model.forward(latent_model_input, timestep, context, &image, added, unit.scale)?;
            sum = Some(match sum {
                None => (down, mid),
                Some((acc_down, acc_mid)) => {
                    let down = acc_down.iter().zip(&down).map(|(a, d)| a + d).collect::<candle_core::Result<Vec<_>>>()?;
                    (down, (acc_mid + mid)?)
                }
            });
        }
        Ok(sum)
    }
}

/// Repeats a control image to the UNet batch; with CFG the batch is doubled and both halves get the same image.
fn batch_image(image: &Tensor, b: usize) -> Result<Tensor> {
    let n = image.dim(0)?;
    if n == b {
        Ok(image.clone())
    } else if n > 0 && b % n == 0 {
        Ok(image.repeat((b / n, 1, 1, 1))?)
    } else {
        Err(Error::InvalidInput { field: "control image", reason: format!("batch {n} does not divide the UNet batch {b}; pass 1 image or one per generated image") })
    }
}

impl ResidualHook for ControlNetHook {
    fn residuals(
        &mut self,
        step_index: usize,
        total_steps: usize,
        timestep: f64,
        latent_model_input: &Tensor,
        context: &Tensor,
        added: Option<&AddedCond>,
    ) -> sd_pipelines::Result<Option<Residuals>> {
        Ok(self.compute(step_index, total_steps, timestep, latent_model_input, context, added)?)
    }
}
