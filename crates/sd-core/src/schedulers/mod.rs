//! Noise schedulers (samplers), ported from diffusers 0.42 and checked against it; flow matching
//! (FLUX and other rectified-flow models) in [`flow_match`].
//!
//! The samplers A1111/Forge offer by name are here: Euler, Euler a, Heun, LMS, DPM2, DPM2 a,
//! DPM++ 2S a (k-diffusion's, diffusers has none), DPM++ SDE, DPM++ 2M, DPM++ 2M SDE, DPM++ 3M SDE,
//! DDIM, PNDM/PLMS, UniPC, DEIS, LCM, TCD (and DDPM). The k-diffusion-style ones take any
//! [`SigmaSchedule`]: Karras, exponential, beta, SGM uniform, simple, DDIM uniform and Align Your
//! Steps (the last four as ComfyUI/A1111 compute them). Results follow diffusers' timestep spacing,
//! not A1111's k-diffusion interpolation, and the Brownian-tree samplers (DPM++ SDE, 2M SDE, 3M SDE)
//! draw their noise from the [`NoiseSource`] instead of torchsde, so A1111 PNGs made with those do
//! not reproduce bit for bit.
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
mod deis;
mod dpmpp;
mod dpmpp_sde;
mod euler;
mod euler_ancestral;
pub mod flow_match;
mod heun;
mod kdpm2;
mod lcm;
mod lms;
pub mod noise;
mod pndm;
mod tcd;
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
pub use deis::DeisScheduler;
pub use dpmpp::DpmPp2mScheduler;
pub use dpmpp_sde::DpmPpSdeScheduler;
pub use euler::EulerScheduler;
pub use euler_ancestral::EulerAncestralScheduler;
pub use heun::HeunScheduler;
pub use kdpm2::Kdpm2Scheduler;
pub use lcm::LcmScheduler;
pub use lms::LmsScheduler;
pub use noise::{NoNoise, NoiseQueue, NoiseSource, SeededNoise, TorchCpuNoise};
pub use pndm::PndmScheduler;
pub use tcd::TcdScheduler;
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
    /// Euler CFG++ (ComfyUI `euler_cfg_pp`, Forge "Euler CFG++"): needs the unconditional prediction, so
    /// it always runs guided; its scales are small (about 0.5–2).
    EulerCfgPp,
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
    /// Linear multistep of order 4 ("LMS").
    Lms,
    /// Pseudo linear multistep ("PNDM"/PLMS), SD 1.x's shipped default.
    Pndm,
    /// DPM-Solver-2 in Karras' form (two model calls per step).
    Dpm2,
    /// DPM2 ancestral ("DPM2 a"), stochastic, two model calls per step.
    Dpm2Ancestral,
    /// DEIS multistep (log-rho).
    Deis,
    /// Trajectory Consistency Distillation sampling (for TCD models / LoRAs), stochastic.
    Tcd,
    /// DPM-Solver++(2S) ancestral ("DPM++ 2S a"), stochastic, two model calls per step.
    DpmPp2sAncestral,
    /// Stochastic single-step DPM-Solver++ ("DPM++ SDE"), two model calls per step.
    DpmPpSde,
    /// DPM-Solver++ (3M) SDE variant, multistep third order, stochastic.
    DpmPp3mSde,
}

impl SamplerKind {
    /// Every sampler.
    pub const ALL: [SamplerKind; 19] = [
        Self::Ddim,
        Self::Ddpm,
        Self::Euler,
        Self::EulerAncestral,
        Self::Heun,
        Self::DpmPp2m,
        Self::DpmPp2mSde,
        Self::Lcm,
        Self::UniPc,
        Self::Lms,
        Self::Pndm,
        Self::Dpm2,
        Self::Dpm2Ancestral,
        Self::Deis,
        Self::Tcd,
        Self::DpmPp2sAncestral,
        Self::DpmPpSde,
        Self::DpmPp3mSde,
        Self::EulerCfgPp,
    ];

    /// Model calls A1111 schedules prompt editing over for `steps` steps: twice the steps for its
    /// second-order samplers (Heun, DPM2, DPM2 a, DPM++ 2S a, DPM++ SDE), the steps otherwise.
    pub fn schedule_steps(self, steps: usize) -> usize {
        match self {
            Self::Heun
            | Self::Dpm2
            | Self::Dpm2Ancestral
            | Self::DpmPp2sAncestral
            | Self::DpmPpSde => steps * 2,
            _ => steps,
        }
    }

    /// The A1111 display name ("Euler a", "DPM++ 2M" …).
    pub fn display_name(self) -> &'static str {
        match self {
            Self::Ddim => "DDIM",
            Self::Ddpm => "DDPM",
            Self::Euler => "Euler",
            Self::EulerCfgPp => "Euler CFG++",
            Self::EulerAncestral => "Euler a",
            Self::Heun => "Heun",
            Self::DpmPp2m => "DPM++ 2M",
            Self::DpmPp2mSde => "DPM++ 2M SDE",
            Self::Lcm => "LCM",
            Self::UniPc => "UniPC",
            Self::Lms => "LMS",
            Self::Pndm => "PNDM",
            Self::Dpm2 => "DPM2",
            Self::Dpm2Ancestral => "DPM2 a",
            Self::Deis => "DEIS",
            Self::Tcd => "TCD",
            Self::DpmPp2sAncestral => "DPM++ 2S a",
            Self::DpmPpSde => "DPM++ SDE",
            Self::DpmPp3mSde => "DPM++ 3M SDE",
        }
    }

    /// The snake-case id ("euler_a", "dpmpp_2m" …).
    pub fn id(self) -> &'static str {
        match self {
            Self::Ddim => "ddim",
            Self::Ddpm => "ddpm",
            Self::Euler => "euler",
            Self::EulerCfgPp => "euler_cfg_pp",
            Self::EulerAncestral => "euler_a",
            Self::Heun => "heun",
            Self::DpmPp2m => "dpmpp_2m",
            Self::DpmPp2mSde => "dpmpp_2m_sde",
            Self::Lcm => "lcm",
            Self::UniPc => "unipc",
            Self::Lms => "lms",
            Self::Pndm => "pndm",
            Self::Dpm2 => "dpm2",
            Self::Dpm2Ancestral => "dpm2_a",
            Self::Deis => "deis",
            Self::Tcd => "tcd",
            Self::DpmPp2sAncestral => "dpmpp_2s_a",
            Self::DpmPpSde => "dpmpp_sde",
            Self::DpmPp3mSde => "dpmpp_3m_sde",
        }
    }

    /// Whether the sampler needs the unconditional prediction at every step, whatever the guidance scale
    /// (CFG++ re-noises with it; pipelines run it guided even at scale ≤ 1).
    pub fn needs_uncond(self) -> bool {
        matches!(self, Self::EulerCfgPp)
    }

    /// Whether steps draw fresh noise.
    pub fn is_stochastic(self) -> bool {
        matches!(
            self,
            Self::Ddpm
                | Self::EulerAncestral
                | Self::DpmPp2mSde
                | Self::Lcm
                | Self::Dpm2Ancestral
                | Self::Tcd
                | Self::DpmPp2sAncestral
                | Self::DpmPpSde
                | Self::DpmPp3mSde
        )
    }

    /// Whether the sigma schedules (Karras, exponential, beta, SGM uniform, simple, DDIM uniform,
    /// Align Your Steps) apply.
    pub fn supports_sigma_schedules(self) -> bool {
        matches!(
            self,
            Self::Euler
                | Self::EulerCfgPp
                | Self::EulerAncestral
                | Self::Heun
                | Self::DpmPp2m
                | Self::DpmPp2mSde
                | Self::UniPc
                | Self::Lms
                | Self::Dpm2
                | Self::Dpm2Ancestral
                | Self::Deis
                | Self::DpmPp2sAncestral
                | Self::DpmPpSde
                | Self::DpmPp3mSde
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
            "LMSDiscreteScheduler" => Self::Lms,
            "PNDMScheduler" => Self::Pndm,
            "KDPM2DiscreteScheduler" => Self::Dpm2,
            "KDPM2AncestralDiscreteScheduler" => Self::Dpm2Ancestral,
            "DEISMultistepScheduler" => Self::Deis,
            "TCDScheduler" => Self::Tcd,
            "DPMSolverSDEScheduler" => Self::DpmPpSde,
            _ => return None,
        })
    }

    fn from_normalized(id: &str) -> Option<Self> {
        Some(match id {
            "ddim" => Self::Ddim,
            "ddpm" => Self::Ddpm,
            "euler" => Self::Euler,
            "euler_cfg_pp" | "euler_cfgpp" => Self::EulerCfgPp,
            "euler_a" | "euler_ancestral" => Self::EulerAncestral,
            "heun" => Self::Heun,
            "dpmpp_2m" | "dpm_solver++" | "dpmsolver++" | "dpm_solver_multistep" => Self::DpmPp2m,
            "dpmpp_2m_sde" => Self::DpmPp2mSde,
            "lcm" => Self::Lcm,
            "unipc" | "uni_pc" => Self::UniPc,
            "lms" => Self::Lms,
            "pndm" | "plms" => Self::Pndm,
            "dpm2" | "dpm_2" => Self::Dpm2,
            "dpm2_a" | "dpm_2_a" | "dpm2_ancestral" | "dpm_2_ancestral" => Self::Dpm2Ancestral,
            "deis" => Self::Deis,
            "tcd" => Self::Tcd,
            "dpmpp_2s_a" | "dpmpp_2s_ancestral" => Self::DpmPp2sAncestral,
            "dpmpp_sde" | "dpm_solver_sde" => Self::DpmPpSde,
            "dpmpp_3m_sde" => Self::DpmPp3mSde,
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
    /// Sigmas at Beta(0.6, 0.6) quantiles ("Beta"; diffusers' `use_beta_sigmas`).
    Beta,
    /// Timesteps evenly spaced from the largest training sigma, the last one dropped ("SGM
    /// Uniform", ComfyUI `sgm_uniform`).
    SgmUniform,
    /// Evenly strided training sigmas from the top ("Simple", ComfyUI `simple`).
    Simple,
    /// Every ⌊T/steps⌋-th training sigma from index 1 ("DDIM" in A1111, ComfyUI `ddim_uniform`;
    /// one or two steps more than asked when T is not a multiple of the steps, as there).
    DdimUniform,
    /// NVIDIA's Align Your Steps sigmas for SD 1.x, log-linearly interpolated to the step count
    /// (ComfyUI's `AlignYourStepsScheduler`, model type SD1).
    AlignYourSteps,
    /// Align Your Steps with the SDXL table (model type SDXL).
    AlignYourStepsXl,
}

impl SigmaSchedule {
    /// Every schedule.
    pub const ALL: [SigmaSchedule; 9] = [
        Self::Default,
        Self::Karras,
        Self::Exponential,
        Self::Beta,
        Self::SgmUniform,
        Self::Simple,
        Self::DdimUniform,
        Self::AlignYourSteps,
        Self::AlignYourStepsXl,
    ];

    /// The lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::Karras => "karras",
            Self::Exponential => "exponential",
            Self::Beta => "beta",
            Self::SgmUniform => "sgm_uniform",
            Self::Simple => "simple",
            Self::DdimUniform => "ddim_uniform",
            Self::AlignYourSteps => "align_your_steps",
            Self::AlignYourStepsXl => "align_your_steps_sdxl",
        }
    }

    /// The A1111 scheduler label ("Karras", "SGM Uniform" …), `""` for the default.
    pub fn display_name(self) -> &'static str {
        match self {
            Self::Default => "",
            Self::Karras => "Karras",
            Self::Exponential => "Exponential",
            Self::Beta => "Beta",
            Self::SgmUniform => "SGM Uniform",
            Self::Simple => "Simple",
            Self::DdimUniform => "DDIM Uniform",
            Self::AlignYourSteps => "Align Your Steps",
            Self::AlignYourStepsXl => "Align Your Steps SDXL",
        }
    }

    /// A1111's scheduler name and label (`/sdapi/v1/schedulers`, the infotext's `Schedule type`): its
    /// `ddim` is labelled "DDIM", and it has one "Align Your Steps" whose table follows the model.
    pub fn a1111(self) -> (&'static str, &'static str) {
        match self {
            Self::Default => ("automatic", "Automatic"),
            Self::DdimUniform => ("ddim", "DDIM"),
            Self::AlignYourSteps | Self::AlignYourStepsXl => ("align_your_steps", "Align Your Steps"),
            other => (other.as_str(), other.display_name()),
        }
    }

    /// The schedule to use on an SDXL model: Align Your Steps takes its SDXL table (as A1111
    /// and ComfyUI pick it by model type); the others are unchanged.
    pub fn for_sdxl(self) -> Self {
        match self {
            Self::AlignYourSteps => Self::AlignYourStepsXl,
            other => other,
        }
    }

    fn from_normalized(s: &str) -> Option<Self> {
        Some(match s {
            "default" | "" | "automatic" | "normal" => Self::Default,
            "karras" => Self::Karras,
            "exponential" | "exp" => Self::Exponential,
            "beta" => Self::Beta,
            "sgm_uniform" => Self::SgmUniform,
            "simple" => Self::Simple,
            "ddim_uniform" | "ddim" => Self::DdimUniform,
            "align_your_steps" | "ays" => Self::AlignYourSteps,
            "align_your_steps_sdxl" | "align_your_steps_xl" | "ays_sdxl" | "ays_xl" => {
                Self::AlignYourStepsXl
            }
            _ => return None,
        })
    }
}

/// Lower case, spaces and dashes as underscores: "SGM Uniform" → "sgm_uniform".
fn normalize_schedule(s: &str) -> String {
    s.trim().to_ascii_lowercase().replace([' ', '-'], "_")
}

impl FromStr for SigmaSchedule {
    type Err = Error;

    /// Parses A1111/Forge scheduler labels ("Karras", "SGM Uniform", "Align Your Steps"), ComfyUI
    /// names ("sgm_uniform", "ddim_uniform") and the lower-case names of [`SigmaSchedule::as_str`].
    fn from_str(s: &str) -> Result<Self> {
        Self::from_normalized(&normalize_schedule(s)).ok_or_else(|| Error::UnknownSchedule {
            name: s.to_string(),
        })
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
    ///
    /// Euler a takes a named schedule but ignores the config's `use_*_sigmas` flags, as diffusers'
    /// `EulerAncestralDiscreteScheduler` (which has none) does.
    pub fn resolved_schedule(&self, config: &SchedulerConfig) -> SigmaSchedule {
        self.schedule.unwrap_or_else(|| {
            if self.kind.supports_sigma_schedules() && self.kind != SamplerKind::EulerAncestral {
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
            "{} (or ids {}, with an optional schedule suffix: _karras, _exponential, _beta, \
             _sgm_uniform, _simple, _ddim_uniform, _align_your_steps)",
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
            Some(s) if s != SigmaSchedule::Default => write!(f, " {}", s.display_name()),
            _ => Ok(()),
        }
    }
}

/// Sampler-name suffixes naming a sigma schedule ("DPM++ 2M SGM Uniform" → "dpmpp_2m_sgm_uniform"),
/// longest first where one ends another.
const SCHEDULE_SUFFIXES: [(&str, SigmaSchedule); 13] = [
    ("_karras", SigmaSchedule::Karras),
    ("_exponential", SigmaSchedule::Exponential),
    ("_beta", SigmaSchedule::Beta),
    ("_sgm_uniform", SigmaSchedule::SgmUniform),
    ("_simple", SigmaSchedule::Simple),
    ("_ddim_uniform", SigmaSchedule::DdimUniform),
    ("_align_your_steps_sdxl", SigmaSchedule::AlignYourStepsXl),
    ("_align_your_steps_xl", SigmaSchedule::AlignYourStepsXl),
    ("_align_your_steps", SigmaSchedule::AlignYourSteps),
    ("_ays_sdxl", SigmaSchedule::AlignYourStepsXl),
    ("_ays_xl", SigmaSchedule::AlignYourStepsXl),
    ("_ays", SigmaSchedule::AlignYourSteps),
    ("_uniform_ddim", SigmaSchedule::DdimUniform),
];

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
        let (base, schedule) = SCHEDULE_SUFFIXES
            .iter()
            .find_map(|&(suffix, s)| id.strip_suffix(suffix).map(|b| (b, Some(s))))
            .unwrap_or((id.as_str(), None));
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
        SamplerKind::EulerCfgPp => Box::new(EulerScheduler::new_cfg_pp(config, steps, schedule)?),
        SamplerKind::EulerAncestral => {
            Box::new(EulerAncestralScheduler::new(config, steps, schedule)?)
        }
        SamplerKind::Heun => Box::new(HeunScheduler::new(config, steps, schedule)?),
        SamplerKind::DpmPp2m => Box::new(DpmPp2mScheduler::new(config, steps, schedule, false)?),
        SamplerKind::DpmPp2mSde => Box::new(DpmPp2mScheduler::new(config, steps, schedule, true)?),
        SamplerKind::Lcm => {
            common::require_default_schedule(schedule, "LCM")?;
            Box::new(LcmScheduler::new(config, steps)?)
        }
        SamplerKind::UniPc => Box::new(UniPcScheduler::new(config, steps, schedule)?),
        SamplerKind::Lms => Box::new(LmsScheduler::new(config, steps, schedule)?),
        SamplerKind::Pndm => {
            common::require_default_schedule(schedule, "PNDM")?;
            Box::new(PndmScheduler::new(config, steps)?)
        }
        SamplerKind::Dpm2 => Box::new(Kdpm2Scheduler::new(config, steps, schedule, false)?),
        SamplerKind::Dpm2Ancestral => {
            Box::new(Kdpm2Scheduler::new(config, steps, schedule, true)?)
        }
        SamplerKind::Deis => Box::new(DeisScheduler::new(config, steps, schedule)?),
        SamplerKind::Tcd => {
            common::require_default_schedule(schedule, "TCD")?;
            Box::new(TcdScheduler::new(config, steps)?)
        }
        SamplerKind::DpmPp2sAncestral => {
            Box::new(DpmPpSdeScheduler::new_2s_ancestral(config, steps, schedule)?)
        }
        SamplerKind::DpmPpSde => Box::new(DpmPpSdeScheduler::new_sde(config, steps, schedule)?),
        SamplerKind::DpmPp3mSde => Box::new(DpmPp2mScheduler::new_3m_sde(config, steps, schedule)?),
    })
}
