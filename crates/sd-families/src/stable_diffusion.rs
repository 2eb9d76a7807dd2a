//! Stable Diffusion 1.x / 2.x / XL through `sd-pipelines`, with LoRAs and ControlNets.

use std::path::{Path, PathBuf};
use std::time::Instant;

use sd_controlnet::preprocess::prepare_image;
use sd_controlnet::{ControlNetHook, ControlNetModel, ControlUnit};
use sd_core::family::Capabilities;
use sd_core::run::{Request, RunContext, Task};
use sd_models::loader::{load, read_folder_config, LoadOptions, StableDiffusionModels};
use sd_pipelines::control::ResidualHook;
use sd_pipelines::hires::generate_hires_controlled;
use sd_pipelines::pipeline::{generate, SdExtras};

use crate::{ControlNetUnit, Error, Extras, Generated, LoadSpec, LoraWeight, Result, SkippedEmbedding};

/// ControlNets kept loaded between runs (a client that sends the same ControlNet with every job should
/// not pay its load each time).
const CONTROLNET_CACHE: usize = 4;

/// A Stable Diffusion model, the LoRAs merged into it and the ControlNets loaded for earlier runs.
pub struct StableDiffusionModel {
    /// The components.
    pub models: StableDiffusionModels,
    pub(crate) caps: Capabilities,
    /// The local folder or file the models came from.
    path: PathBuf,
    /// Patches LoRA sets into the loaded weights in place (switching sets never reloads the model).
    patcher: sd_lora::LivePatcher,
    /// The LoRA files and strengths patched into `models` now (empty: the plain model).
    applied: Vec<LoraWeight>,
    /// Most recently used last.
    controlnets: Vec<(PathBuf, ControlNetModel)>,
    /// Embedding files that did not fit the model.
    pub(crate) skipped_embeddings: Vec<SkippedEmbedding>,
    /// The VAE the model loaded with (its own, or `LoadSpec::vae`), kept while [`Self::set_vae`]'s decodes.
    base_vae: Option<(sd_models::vae::AutoencoderKL, sd_models::VaeConfig, candle_core::DType)>,
    /// The VAE file or folder [`Self::set_vae`] put in place.
    vae_path: Option<PathBuf>,
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
        let patcher = sd_lora::LivePatcher::new();
        let opts = LoadOptions {
            variant: spec.variant,
            dtype: spec.dtype,
            device: spec.device.clone(),
            config,
            prefer_fp16_files: spec.prefer_fp16_files,
            vae: spec.vae.clone(),
            tokenizer_dir: spec.components.clone(),
            backend_hook: Some(patcher.recording_hook()),
        };
        let models = load(path, &opts)?;
        let caps = sd_pipelines::pipeline::capabilities(&models)?;
        let mut model = Self {
            models,
            caps,
            path: path.to_path_buf(),
            patcher,
            applied: Vec::new(),
            controlnets: Vec::new(),
            skipped_embeddings: Vec::new(),
            base_vae: None,
            vae_path: None,
        };
        model.load_embeddings(&spec.embeddings);
        Ok(model)
    }

    /// Decodes (and encodes) with the VAE at `path` from now on, or with the one the model loaded with
    /// (`None`), as A1111's `sd_vae` switches it; the loaded one is kept aside, so switching back is free.
    pub(crate) fn set_vae(&mut self, path: Option<&Path>) -> Result<()> {
        if self.vae_path.as_deref() == path {
            return Ok(());
        }
        if let Some((vae, cfg, dtype)) = self.base_vae.take() {
            self.models.vae = vae;
            self.models.config.vae = cfg;
            self.models.vae_dtype = dtype;
        }
        self.vae_path = None;
        let Some(path) = path else { return Ok(()) };
        let m = &mut self.models;
        let (vae, cfg) = sd_models::vae::load_vae_weights(path, &m.config.vae, m.dtype, &m.device)
            .map_err(|e| Error::Unsupported { field: "vae", reason: format!("{}: {e}", path.display()) })?;
        if cfg.latent_channels != m.config.vae.latent_channels || cfg.block_out_channels.len() != m.config.vae.block_out_channels.len() {
            return Err(Error::Unsupported {
                field: "vae",
                reason: format!("{} is a VAE for another model family ({} latent channels); this {} model needs {}", path.display(), cfg.latent_channels, m.config.variant, m.config.vae.latent_channels),
            });
        }
        let dtype = sd_models::loader::vae_dtype_for(m.dtype, &cfg);
        let base = (std::mem::replace(&mut m.vae, vae), std::mem::replace(&mut m.config.vae, cfg), std::mem::replace(&mut m.vae_dtype, dtype));
        self.base_vae = Some(base);
        self.vae_path = Some(path.to_path_buf());
        tracing::info!(vae = %path.display(), "VAE switched");
        Ok(())
    }

    /// Reads every embedding file of `dirs` afresh: new files are added, removed ones dropped, changed
    /// ones reloaded; those that do not fit this model are listed as skipped.
    pub(crate) fn load_embeddings(&mut self, dirs: &[std::path::PathBuf]) {
        self.models.embeddings.clear();
        self.skipped_embeddings.clear();
        for file in crate::embedding_files(dirs) {
            if let Err(e) = self.models.add_embedding(&file) {
                tracing::warn!(file = %file.display(), error = %e, "textual-inversion embedding skipped");
                self.skipped_embeddings.push(SkippedEmbedding { name: crate::file_stem(&file), path: file, reason: e.to_string() });
            }
        }
        if !self.models.embeddings.is_empty() {
            tracing::info!(loaded = self.models.embeddings.len(), skipped = self.skipped_embeddings.len(), "textual-inversion embeddings");
        }
    }

    /// Patches `wanted` into the loaded weights in place (the previous set taken out first); a set that
    /// fails to apply leaves the previous one in place.
    pub(crate) fn set_loras(&mut self, wanted: &[LoraWeight]) -> Result<()> {
        if wanted == self.applied.as_slice() {
            return Ok(());
        }
        let set = lora_set(wanted)?;
        let t = Instant::now();
        match self.patcher.apply(&set, &self.models.config) {
            Ok(report) => {
                self.applied = wanted.to_vec();
                tracing::info!(secs = t.elapsed().as_secs_f64(), loras = wanted.len(), weights = self.patcher.patched(), report = %report, "LoRA set patched in");
                Ok(())
            }
            Err(e) => {
                // The patcher left the plain model; put the previous set back (it applied before).
                let previous = std::mem::take(&mut self.applied);
                match lora_set(&previous).and_then(|set| self.patcher.apply(&set, &self.models.config).map_err(|e| lora_error(e, &previous))) {
                    Ok(_) => self.applied = previous,
                    Err(again) => tracing::error!(error = %again, "the previous LoRA set could not be restored; serving the plain model"),
                }
                Err(lora_error(e, wanted))
            }
        }
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
            Some(hr) => {
                // The second pass gets the same units with the control images at its own size.
                let mut second = self.controlnet_hook(extras.controlnets, hr.width, hr.height)?;
                let second = second.as_mut().map(|h| h as &mut dyn ResidualHook);
                generate_hires_controlled(&self.models, p, hr, run, [control, second])?
            }
            None => generate(&self.models, p, task, run, SdExtras { control, scheduler: None })?,
        };
        Ok(Generated { images: out.images, latents: out.latents, seed: out.seed })
    }
}

/// Opens every LoRA of `wanted` (errors name `loras[i]`).
fn lora_set(wanted: &[LoraWeight]) -> Result<sd_lora::LoraSet> {
    let mut set = sd_lora::LoraSet::new();
    for (i, l) in wanted.iter().enumerate() {
        match l.text_encoder_strength {
            Some(te) => set.add_file_split(&l.path, l.strength as f32, te as f32),
            None => set.add_file(&l.path, l.strength as f32),
        }
        .map_err(|e| Error::Lora { field: format!("loras[{i}]"), message: format!("cannot read LoRA {}: {e}", l.path.display()) })?;
    }
    Ok(set)
}

/// A LoRA that would not apply, naming `loras[i]` for the file it is about (else `loras`).
fn lora_error(e: sd_lora::Error, wanted: &[LoraWeight]) -> Error {
    let field = match e.path().and_then(|p| wanted.iter().position(|l| l.path == p)) {
        Some(i) => format!("loras[{i}]"),
        None => "loras".into(),
    };
    Error::Lora { field, message: format!("the LoRAs could not be applied: {e}") }
}

/// A1111's parameters for an SD run: its own entries, `extra`, then the hires fix's.
pub(crate) fn infotext(p: &Request, prompt: &str, model_name: &str, extras: &Extras<'_>, extra: &[(&str, String)]) -> String {
    let mut fields: Vec<(&str, String)> = extra.to_vec();
    if let Some(hr) = extras.hires {
        fields.push(("Denoising strength", format!("{}", hr.strength)));
        fields.push(("Hires resize", format!("{}x{}", hr.width, hr.height)));
        fields.push(("Hires upscaler", hr.upscaler_name().to_string()));
        if let Some(steps) = hr.steps {
            fields.push(("Hires steps", steps.to_string()));
        }
    }
    let shown = Request { prompt: prompt.to_string(), ..p.clone() };
    sd_pipelines::image_io::a1111_parameters(&shown, model_name, &fields)
}
