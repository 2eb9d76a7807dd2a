//! Stable Diffusion 1.x / 2.x / XL through `sd-pipelines`, with LoRAs and ControlNets.

use std::path::{Path, PathBuf};
use std::time::Instant;

use sd_controlnet::preprocess::prepare_image;
use sd_controlnet::{ControlNetHook, ControlNetModel, ControlUnit};
use sd_core::family::Capabilities;
use sd_core::run::{Request, RunContext, Task};
use sd_models::loader::{load, read_folder_config, LoadOptions, StableDiffusionModels};
use sd_pipelines::control::ResidualHook;
use sd_pipelines::hires::generate_hires;
use sd_pipelines::pipeline::{generate, SdExtras};

use crate::{ControlNetUnit, Error, Extras, Generated, LoadSpec, LoraWeight, Result};

/// ControlNets kept loaded between runs (a client that sends the same ControlNet with every job should
/// not pay its load each time).
const CONTROLNET_CACHE: usize = 4;

/// A Stable Diffusion model, the LoRAs merged into it and the ControlNets loaded for earlier runs.
pub struct StableDiffusionModel {
    /// The components.
    pub models: StableDiffusionModels,
    pub(crate) caps: Capabilities,
    /// The local folder or file the models came from, reloaded when the LoRA set changes.
    path: PathBuf,
    /// Options of the plain model (no LoRA hook).
    opts: LoadOptions,
    /// The LoRA files and strengths merged into `models` now (empty: the plain model).
    applied: Vec<LoraWeight>,
    /// Most recently used last.
    controlnets: Vec<(PathBuf, ControlNetModel)>,
}

impl std::fmt::Debug for StableDiffusionModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StableDiffusionModel")
            .field("path", &self.path)
            .field("variant", &self.caps.variant)
            .field("loras", &self.applied)
            .field("controlnets", &self.controlnets.iter().map(|(p, _)| p).collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl StableDiffusionModel {
    /// Loads a diffusers folder or a single checkpoint.
    pub fn load(path: &Path, spec: &LoadSpec) -> Result<Self> {
        let config = spec.components.as_deref().map(|dir| read_folder_config(dir, spec.variant)).transpose()?;
        let opts = LoadOptions {
            variant: spec.variant,
            dtype: spec.dtype,
            device: spec.device.clone(),
            config,
            prefer_fp16_files: spec.prefer_fp16_files,
            vae: spec.vae.clone(),
            tokenizer_dir: spec.components.clone(),
            ..LoadOptions::default()
        };
        let models = load(path, &opts)?;
        let caps = sd_pipelines::pipeline::capabilities(&models)?;
        Ok(Self { models, caps, path: path.to_path_buf(), opts, applied: Vec::new(), controlnets: Vec::new() })
    }

    /// LoRAs are merged into the weights as they load, so a different set means a reload; the new
    /// weights load before the old ones go, so a LoRA that fails leaves the model serving.
    pub(crate) fn set_loras(&mut self, wanted: &[LoraWeight]) -> Result<()> {
        if wanted == self.applied.as_slice() {
            return Ok(());
        }
        let mut set = sd_lora::LoraSet::new();
        for (i, l) in wanted.iter().enumerate() {
            set.add_file(&l.path, l.strength as f32)
                .map_err(|e| Error::Lora { field: format!("loras[{i}]"), message: format!("cannot read LoRA {}: {e}", l.path.display()) })?;
        }
        let opts = LoadOptions { backend_hook: (!set.is_empty()).then(|| set.backend_hook()), ..self.opts.clone() };
        let t = Instant::now();
        let models = load(&self.path, &opts)
            .map_err(|e| Error::Lora { field: lora_field(&e, wanted), message: format!("the LoRAs could not be applied: {e}") })?;
        self.models = models;
        self.applied = wanted.to_vec();
        tracing::info!(secs = t.elapsed().as_secs_f64(), loras = wanted.len(), report = %set.report(), "model reloaded with LoRAs");
        Ok(())
    }

    /// The hook running `units`, each ControlNet loaded once and then kept in the cache.
    fn controlnet_hook(&mut self, units: &[ControlNetUnit<'_>], width: usize, height: usize) -> Result<Option<ControlNetHook>> {
        if units.is_empty() {
            return Ok(None);
        }
        let mut out = Vec::with_capacity(units.len());
        for (i, u) in units.iter().enumerate() {
            let model = match self.controlnets.iter().position(|(p, _)| p == u.path) {
                Some(k) => {
                    let entry = self.controlnets.remove(k);
                    let model = entry.1.clone();
                    self.controlnets.push(entry);
                    model
                }
                None => {
                    let t = Instant::now();
                    let m = ControlNetModel::load(u.path, self.models.unet.config(), self.models.dtype, &self.models.device).map_err(|e| {
                        Error::ControlNet { field: format!("controlnets[{i}].model"), message: format!("cannot load ControlNet {}: {e}", u.path.display()) }
                    })?;
                    tracing::info!(path = %u.path.display(), secs = t.elapsed().as_secs_f64(), "ControlNet loaded");
                    if self.controlnets.len() >= CONTROLNET_CACHE {
                        self.controlnets.remove(0);
                    }
                    self.controlnets.push((u.path.to_path_buf(), m.clone()));
                    m
                }
            };
            let image = prepare_image(u.image, width, height)
                .map_err(|e| Error::ControlNet { field: format!("controlnets[{i}]"), message: e.to_string() })?;
            out.push(ControlUnit { model, image, scale: u.scale, start: u.start, end: u.end });
        }
        ControlNetHook::new(out, self.models.unet.config())
            .map(Some)
            .map_err(|e| Error::ControlNet { field: "controlnets".into(), message: e.to_string() })
    }

    pub(crate) fn generate(&mut self, p: &Request, task: &Task<'_>, run: &mut RunContext<'_>, extras: &Extras<'_>) -> Result<Generated> {
        if extras.hires.is_some() && !matches!(task, Task::TextToImage) {
            return Err(Error::Unsupported { field: "hires", reason: format!("the hires fix is a txt2img pass; this is {}", task.name()) });
        }
        self.set_loras(extras.loras)?;
        let mut hook = self.controlnet_hook(extras.controlnets, p.width, p.height)?;
        let control = hook.as_mut().map(|h| h as &mut dyn ResidualHook);
        let out = match extras.hires {
            Some(hr) => generate_hires(&self.models, p, hr, run)?,
            None => generate(&self.models, p, task, run, SdExtras { control, scheduler: None })?,
        };
        Ok(Generated { images: out.images, latents: out.latents, seed: out.seed })
    }
}

/// `loras[i]` for the LoRA a loading error is about, else `loras`. Errors raised while the weights
/// load reach here through candle, which keeps only their text, so the LoRA's path in the message
/// identifies it when the typed error is gone.
fn lora_field(e: &sd_models::Error, wanted: &[LoraWeight]) -> String {
    let typed = match e {
        sd_models::Error::Extension(inner) => inner.downcast_ref::<sd_lora::Error>().and_then(sd_lora::Error::path),
        _ => None,
    };
    let text = e.to_string();
    let index = match typed {
        Some(p) => wanted.iter().position(|l| l.path == p),
        None => wanted.iter().position(|l| text.contains(&l.path.display().to_string())),
    };
    match index {
        Some(i) => format!("loras[{i}]"),
        None => "loras".into(),
    }
}

/// A1111's parameters for an SD run: its own entries, `extra`, then the hires fix's.
pub(crate) fn infotext(p: &Request, prompt: &str, model_name: &str, extras: &Extras<'_>, extra: &[(&str, String)]) -> String {
    let mut fields: Vec<(&str, String)> = extra.to_vec();
    if let Some(hr) = extras.hires {
        fields.push(("Denoising strength", format!("{}", hr.strength)));
        fields.push(("Hires resize", format!("{}x{}", hr.width, hr.height)));
        fields.push(("Hires upscaler", hr.upscaler.name().to_string()));
        if let Some(steps) = hr.steps {
            fields.push(("Hires steps", steps.to_string()));
        }
    }
    let shown = Request { prompt: prompt.to_string(), ..p.clone() };
    sd_pipelines::image_io::a1111_parameters(&shown, model_name, &fields)
}
