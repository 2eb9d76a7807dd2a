//! Noise schedulers (samplers), ported from diffusers 0.42 and checked against it; flow matching
//! (FLUX and other rectified-flow models) in [`flow_match`].
//!
//! Build one with [`build_scheduler`] from a [`Sampler`] (parsed from the names users know,
//! e.g. `"DPM++ 2M Karras"`, `"Euler a"`, `"dpmpp_2m"`) and a [`SchedulerConfig`] (usually the
//! model's `scheduler_config.json`). The loop is index-based:
//!
//! ```
//! # use candle_core::{Device, DType, Tensor};
//! # use sd_core::schedulers::*;
//! # fn unet(x: &Tensor, _t: f64) -> sd_core::Result<Tensor> { Ok((x * 0.1)?) }
//! # fn main() -> sd_core::Result<()> {
//! let mut sched = build_scheduler("Euler a".parse::<Sampler>()?, &SchedulerConfig::sd15(), 20)?;
//! let mut noise = SeededNoise::new(1234);
//! let mut latents = (noise.randn(&(1, 4, 8, 8).into(), DType::F32, &Device::Cpu)? * sched.init_noise_sigma())?;
//! for i in 0..sched.timesteps().len() {
//!     let input = sched.scale_model_input(&latents, i)?;
//!     let eps = unet(&input, sched.timesteps()[i])?;
//!     latents = sched.step(&eps, i, &latents, &mut noise)?;
//! }
//! assert!(latents.flatten_all()?.to_vec1::<f32>()?.iter().all(|v| v.is_finite()));
//! # Ok(()) }
//! ```

mod common;
pub mod config;
mod ddim;
mod ddpm;
mod dpmpp;
mod euler;
mod euler_ancestral;
pub mod flow_match;
mod heun;
mod lcm;
pub mod noise;
mod unipc;

use std::fmt;
use std::str::FromStr;

use candle_core::Tensor;

pub use config::{
    BetaSchedule, FinalSigmas, Interpolation, PredictionType, SchedulerConfig, TimestepSpacing,
};
pub use common::img2img_steps;
pub use ddim::DdimScheduler;
pub use ddpm::DdpmScheduler;
pub use dpmpp::DpmPp2mScheduler;
pub use euler::EulerScheduler;
pub use euler_ancestral::EulerAncestralScheduler;
pub use heun::HeunScheduler;
pub use lcm::LcmScheduler;
pub use noise::{NoNoise, NoiseQueue, NoiseSource, SeededNoise, TorchCpuNoise};
pub use unipc::UniPcScheduler;

use crate::error::{Error, Result};

/// A diffusion sampler driven by timestep index: call [`Scheduler::step`] once for every index
/// of [`Scheduler::timesteps`], in order, with the model's output at that timestep.
pub trait Scheduler: Send {
    /// The sampler this scheduler implements.
    fn kind(&self) -> SamplerKind;

    /// The timestep fed to the model at each call, in call order (Heun repeats timesteps).
    fn timesteps(&self) -> &[f64];

    /// The noise level of each call plus the final one, for sigma-based schedulers.
    fn sigmas(&self) -> Option<&[f64]> {
        None
    }

    /// The number of inference steps the scheduler was built with.
    fn num_inference_steps(&self) -> usize;

    /// Model calls per inference step (2 for Heun), diffusers' `scheduler.order`.
    fn order(&self) -> usize {
        1
    }

    /// Standard deviation of the initial noise: multiply unit Gaussian latents by it.
    fn init_noise_sigma(&self) -> f64;

    /// Scales the latents before they are fed to the model at `timestep_index`.
    fn scale_model_input(&self, sample: &Tensor, timestep_index: usize) -> Result<Tensor>;

    /// Advances the latents past `timestep_index` given the model output there.
    ///
    /// Stochastic samplers draw their fresh noise from `noise` (deterministic ones never touch it,
    /// so [`NoNoise`] is fine for them). The result has the model output's dtype; the arithmetic
    /// runs in F32.
    fn step(
        &mut self,
        model_output: &Tensor,
        timestep_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor>;

    /// Advances the latents from a classifier-free-guided call's two predictions: the pipeline hands
    /// over the unconditional and conditional outputs and the guidance `scale` instead of their blend.
    /// The default blends them (`uncond + scale·(cond − uncond)`) and calls [`Scheduler::step`]; a
    /// sampler that needs the unconditional prediction on its own (CFG++ renoises with it) overrides it.
    fn step_guided(
        &mut self,
        uncond: &Tensor,
        cond: &Tensor,
        scale: f64,
        timestep_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let guided = (uncond + ((cond - uncond)? * scale)?)?;
        self.step(&guided, timestep_index, sample, noise)
    }

    /// Noises clean latents to the level of `timestep_index` (img2img starts, inpainting masks).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep_index: usize)
        -> Result<Tensor>;

    /// Forgets multistep history so the same schedule can denoise another sample.
    fn reset(&mut self);

    /// Prepares an img2img run at `strength` (0 < strength ≤ 1) and returns the first timestep
    /// index to run, like diffusers' `get_timesteps(strength)` + `set_begin_index`.
    ///
    /// Noise the encoded image with [`Scheduler::add_noise`] at the returned index, then step from
    /// there to the end. Call it once, before the first step.
    fn begin_at_strength(&mut self, strength: f64) -> Result<usize> {
        self.reset();
        common::strength_start(self.num_inference_steps(), strength, self.order())
    }
}

/// The sampling algorithms on offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SamplerKind {
    /// DDIM (deterministic, eta = 0).
    Ddim,
    /// DDPM ancestral sampling.
    Ddpm,
    /// Euler (k-diffusion `sample_euler`).
    Euler,
    /// Euler ancestral ("Euler a").
    EulerAncestral,
    /// Heun's second-order method (two model calls per step).
    Heun,
    /// DPM-Solver++ (2M), multistep second order.
    DpmPp2m,
    /// DPM-Solver++ (2M) SDE variant, stochastic.
    DpmPp2mSde,
    /// Latent Consistency Model sampling (for LCM-distilled models / LoRAs).
    Lcm,
    /// UniPC multistep predictor-corrector.
    UniPc,
}

impl SamplerKind {
    /// Every sampler.
    pub const ALL: [SamplerKind; 9] = [
        Self::Ddim,
        Self::Ddpm,
        Self::Euler,
        Self::EulerAncestral,
        Self::Heun,
        Self::DpmPp2m,
        Self::DpmPp2mSde,
        Self::Lcm,
        Self::UniPc,
    ];

    /// Model calls A1111 schedules prompt editing over for `steps` steps: twice the steps for its
    /// second-order samplers (Heun), the steps otherwise.
    pub fn schedule_steps(self, steps: usize) -> usize {
        match self {
            Self::Heun => steps * 2,
            _ => steps,
        }
    }

    /// The A1111 display name ("Euler a", "DPM++ 2M" …).
    pub fn display_name(self) -> &'static str {
        match self {
            Self::Ddim => "DDIM",
            Self::Ddpm => "DDPM",
            Self::Euler => "Euler",
            Self::EulerAncestral => "Euler a",
            Self::Heun => "Heun",
            Self::DpmPp2m => "DPM++ 2M",
            Self::DpmPp2mSde => "DPM++ 2M SDE",
            Self::Lcm => "LCM",
            Self::UniPc => "UniPC",
        }
    }

    /// The snake-case id ("euler_a", "dpmpp_2m" …).
    pub fn id(self) -> &'static str {
        match self {
            Self::Ddim => "ddim",
            Self::Ddpm => "ddpm",
            Self::Euler => "euler",
            Self::EulerAncestral => "euler_a",
            Self::Heun => "heun",
            Self::DpmPp2m => "dpmpp_2m",
            Self::DpmPp2mSde => "dpmpp_2m_sde",
            Self::Lcm => "lcm",
            Self::UniPc => "unipc",
        }
    }

    /// Whether steps draw fresh noise.
    pub fn is_stochastic(self) -> bool {
        matches!(
            self,
            Self::Ddpm | Self::EulerAncestral | Self::DpmPp2mSde | Self::Lcm
        )
    }

    /// Whether Karras / exponential sigma schedules apply.
    pub fn supports_sigma_schedules(self) -> bool {
        matches!(
            self,
            Self::Euler | Self::Heun | Self::DpmPp2m | Self::DpmPp2mSde | Self::UniPc
        )
    }

    /// The sampler matching a diffusers scheduler class name, if it is one of ours.
    pub fn from_diffusers_class(class_name: &str) -> Option<Self> {
        Some(match class_name {
            "DDIMScheduler" => Self::Ddim,
            "DDPMScheduler" => Self::Ddpm,
            "EulerDiscreteScheduler" => Self::Euler,
            "EulerAncestralDiscreteScheduler" => Self::EulerAncestral,
            "HeunDiscreteScheduler" => Self::Heun,
            "DPMSolverMultistepScheduler" => Self::DpmPp2m,
            "LCMScheduler" => Self::Lcm,
            "UniPCMultistepScheduler" => Self::UniPc,
            _ => return None,
        })
    }

    fn from_normalized(id: &str) -> Option<Self> {
        Some(match id {
            "ddim" => Self::Ddim,
            "ddpm" => Self::Ddpm,
            "euler" => Self::Euler,
            "euler_a" | "euler_ancestral" => Self::EulerAncestral,
            "heun" => Self::Heun,
            "dpmpp_2m" | "dpm_solver++" | "dpmsolver++" | "dpm_solver_multistep" => Self::DpmPp2m,
            "dpmpp_2m_sde" => Self::DpmPp2mSde,
            "lcm" => Self::Lcm,
            "unipc" | "uni_pc" => Self::UniPc,
            _ => return None,
        })
    }
}

impl fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.display_name())
    }
}

/// How the noise levels of the chosen steps are spaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SigmaSchedule {
    /// The scheduler's own spacing (from the timestep spacing).
    #[default]
    Default,
    /// Karras et al. rho = 7 sigmas ("… Karras" in A1111).
    Karras,
    /// Log-uniform sigmas ("… Exponential").
    Exponential,
}

impl SigmaSchedule {
    /// The lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::Karras => "karras",
            Self::Exponential => "exponential",
        }
    }
}

impl FromStr for SigmaSchedule {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "default" | "" | "automatic" | "normal" => Ok(Self::Default),
            "karras" => Ok(Self::Karras),
            "exponential" | "exp" => Ok(Self::Exponential),
            _ => Err(Error::UnknownSchedule {
                name: s.to_string(),
            }),
        }
    }
}

/// A sampler choice: algorithm plus, optionally, a sigma schedule overriding the config's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sampler {
    /// The algorithm.
    pub kind: SamplerKind,
    /// `None`: follow the config (`use_karras_sigmas` …); `Some`: force this schedule.
    pub schedule: Option<SigmaSchedule>,
}

impl Sampler {
    /// A sampler with an explicit sigma schedule.
    pub fn new(kind: SamplerKind, schedule: SigmaSchedule) -> Self {
        Self {
            kind,
            schedule: Some(schedule),
        }
    }

    /// The schedule this sampler uses with `config`.
    pub fn resolved_schedule(&self, config: &SchedulerConfig) -> SigmaSchedule {
        self.schedule.unwrap_or_else(|| {
            if self.kind.supports_sigma_schedules() {
                config.sigma_schedule()
            } else {
                SigmaSchedule::Default
            }
        })
    }

    fn known_names() -> String {
        let mut names: Vec<String> = SamplerKind::ALL
            .iter()
            .map(|k| format!("{:?}", k.display_name()))
            .collect();
        names.push("\"DPM++ 2M Karras\"".into());
        names.push("\"DPM++ 2M SDE Karras\"".into());
        let ids: Vec<&str> = SamplerKind::ALL.iter().map(|k| k.id()).collect();
        format!(
            "{} (or ids {}, with an optional _karras/_exponential suffix)",
            names.join(", "),
            ids.join(", ")
        )
    }
}

impl From<SamplerKind> for Sampler {
    fn from(kind: SamplerKind) -> Self {
        Self {
            kind,
            schedule: None,
        }
    }
}

impl fmt::Display for Sampler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind.display_name())?;
        match self.schedule {
            Some(SigmaSchedule::Karras) => f.write_str(" Karras"),
            Some(SigmaSchedule::Exponential) => f.write_str(" Exponential"),
            _ => Ok(()),
        }
    }
}

impl FromStr for Sampler {
    type Err = Error;

    /// Parses A1111 names ("DPM++ 2M Karras", "Euler a"), snake-case ids ("dpmpp_2m_karras"),
    /// k-diffusion names ("k_euler_a") and diffusers class names ("EulerDiscreteScheduler").
    fn from_str(name: &str) -> Result<Self> {
        let unknown = || Error::UnknownSampler {
            name: name.to_string(),
            known: Sampler::known_names(),
        };
        if let Some(kind) = SamplerKind::from_diffusers_class(name.trim()) {
            return Ok(kind.into());
        }
        let mut id = name
            .trim()
            .to_ascii_lowercase()
            .replace("++", "pp")
            .replace([' ', '-', '.'], "_");
        while id.contains("__") {
            id = id.replace("__", "_");
        }
        let id = id.strip_prefix("k_").unwrap_or(&id).to_string();
        let (base, schedule) = if let Some(b) = id.strip_suffix("_karras") {
            (b, Some(SigmaSchedule::Karras))
        } else if let Some(b) = id.strip_suffix("_exponential") {
            (b, Some(SigmaSchedule::Exponential))
        } else {
            (id.as_str(), None)
        };
        let kind = SamplerKind::from_normalized(base).ok_or_else(unknown)?;
        if schedule.is_some() && !kind.supports_sigma_schedules() {
            return Err(unknown());
        }
        Ok(Self { kind, schedule })
    }
}

impl FromStr for SamplerKind {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self> {
        let s: Sampler = name.parse()?;
        match s.schedule {
            None => Ok(s.kind),
            Some(_) => Err(Error::UnknownSampler {
                name: name.to_string(),
                known: Sampler::known_names(),
            }),
        }
    }
}

/// Builds a scheduler for `steps` inference steps.
///
/// Errors for `steps == 0`, `steps > num_train_timesteps`, schedules the sampler lacks and
/// config options that are not implemented (thresholding, beta/flow sigmas, learned variances).
pub fn build_scheduler(
    sampler: impl Into<Sampler>,
    config: &SchedulerConfig,
    steps: usize,
) -> Result<Box<dyn Scheduler>> {
    let sampler = sampler.into();
    let schedule = sampler.resolved_schedule(config);
    Ok(match sampler.kind {
        SamplerKind::Ddim => {
            common::require_default_schedule(schedule, "DDIM")?;
            Box::new(DdimScheduler::new(config, steps)?)
        }
        SamplerKind::Ddpm => {
            common::require_default_schedule(schedule, "DDPM")?;
            Box::new(DdpmScheduler::new(config, steps)?)
        }
        SamplerKind::Euler => Box::new(EulerScheduler::new(config, steps, schedule)?),
        SamplerKind::EulerAncestral => {
            common::require_default_schedule(schedule, "Euler a")?;
            Box::new(EulerAncestralScheduler::new(config, steps)?)
        }
        SamplerKind::Heun => Box::new(HeunScheduler::new(config, steps, schedule)?),
        SamplerKind::DpmPp2m => Box::new(DpmPp2mScheduler::new(config, steps, schedule, false)?),
        SamplerKind::DpmPp2mSde => Box::new(DpmPp2mScheduler::new(config, steps, schedule, true)?),
        SamplerKind::Lcm => {
            common::require_default_schedule(schedule, "LCM")?;
            Box::new(LcmScheduler::new(config, steps)?)
        }
        SamplerKind::UniPc => Box::new(UniPcScheduler::new(config, steps, schedule)?),
    })
}
