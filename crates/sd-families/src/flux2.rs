//! FLUX.2 [klein] through `sd-flux2`.

use std::path::{Path, PathBuf};

use sd_core::family::Capabilities;
use sd_core::image_io::infotext;
use sd_core::run::{Request, RunContext, Task};
use sd_flux2::{Flux2LoadOptions, Flux2Models};

use crate::{Error, Extras, Generated, LoadSpec, LoraWeight, Result, SkippedEmbedding};

/// A FLUX.2 [klein] model and where it came from.
pub struct Flux2Model {
    /// The components.
    pub models: Flux2Models,
    pub(crate) caps: Capabilities,
    /// The folder it was loaded from.
    path: PathBuf,
    /// Every embedding file given: FLUX.2 takes none.
    pub(crate) skipped_embeddings: Vec<SkippedEmbedding>,
}

impl std::fmt::Debug for Flux2Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flux2Model").field("path", &self.path).field("variant", &self.caps.variant).finish_non_exhaustive()
    }
}

impl Flux2Model {
    /// Loads a diffusers `Flux2KleinPipeline` folder.
    pub fn load(path: &Path, spec: &LoadSpec) -> Result<Self> {
        if spec.vae.is_some() {
            return Err(Error::Unsupported {
                field: "vae",
                reason: "a separate VAE is for Stable Diffusion 1.x/2.x/XL models; FLUX.2 decodes with its own AutoencoderKLFlux2".into(),
            });
        }
        if spec.components.is_some() && !path.is_dir() {
            return Err(Error::Unsupported {
                field: "model",
                reason: "FLUX.2 [klein] loads from a diffusers folder here; single and split files are not supported yet".into(),
            });
        }
        let opts = Flux2LoadOptions { dtype: spec.dtype, device: spec.device.clone(), ..Flux2LoadOptions::default() };
        let models = sd_flux2::load(path, &opts)?;
        let caps = sd_flux2::pipeline::capabilities(&models);
        Ok(Self { models, caps, path: path.to_path_buf(), skipped_embeddings: crate::skipped_embeddings(&spec.embeddings, "FLUX.2") })
    }

    /// The weights' dtype.
    pub(crate) fn dtype(&self) -> candle_core::DType {
        self.models.transformer.dtype()
    }

    /// Lists the embedding files of `dirs` afresh, all skipped.
    pub(crate) fn load_embeddings(&mut self, dirs: &[PathBuf]) {
        self.skipped_embeddings = crate::skipped_embeddings(dirs, "FLUX.2");
    }

    pub(crate) fn set_loras(&mut self, wanted: &[LoraWeight]) -> Result<()> {
        if wanted.is_empty() {
            return Ok(());
        }
        Err(Error::Lora { field: "loras".into(), message: "LoRAs are not supported for FLUX.2 [klein] models here yet".into() })
    }

    pub(crate) fn generate(&mut self, p: &Request, task: &Task<'_>, run: &mut RunContext<'_>, extras: &Extras<'_>) -> Result<Generated> {
        crate::refuse_sd_extras(extras, "FLUX.2")?;
        self.set_loras(extras.loras)?;
        let out = sd_flux2::pipeline::generate(&self.models, p, task, run)?;
        Ok(Generated { images: out.images, latents: out.latents, seed: out.seed })
    }

    /// A1111's `parameters` text: flow-matching Euler; CFG only for the base (non-distilled) model.
    pub(crate) fn infotext(&self, p: &Request, prompt: &str, model_name: &str, extra: &[(&str, String)]) -> String {
        let mut fields = vec![
            ("Steps", p.steps.to_string()),
            ("Sampler", "Euler".to_string()),
            ("CFG scale", format!("{}", p.guidance_scale)),
            ("Seed", p.seed.to_string()),
            ("Size", format!("{}x{}", p.width, p.height)),
            ("Model", model_name.to_string()),
        ];
        fields.extend(extra.iter().map(|(k, v)| (*k, v.clone())));
        infotext(prompt, &p.negative_prompt, &fields)
    }
}
