//! FLUX.2 [klein] through `sd-flux2`, with LoRAs.

use std::path::{Path, PathBuf};
use std::time::Instant;

use sd_core::family::Capabilities;
use sd_core::image_io::infotext;
use sd_core::run::{Request, RunContext, Task};
use sd_flux2::{Flux2LoadOptions, Flux2Models};

use crate::{Error, Extras, Generated, LoadSpec, LoraWeight, Result, SkippedEmbedding};

/// A FLUX.2 [klein] model, where it came from and the LoRAs merged into it.
pub struct Flux2Model {
    /// The components.
    pub models: Flux2Models,
    pub(crate) caps: Capabilities,
    /// The folder or transformer file it was loaded from.
    path: PathBuf,
    /// The LoRA files and strengths merged into the transformer now.
    applied: Vec<LoraWeight>,
    /// Every embedding file given: FLUX.2 takes none.
    pub(crate) skipped_embeddings: Vec<SkippedEmbedding>,
}

impl std::fmt::Debug for Flux2Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flux2Model").field("path", &self.path).field("variant", &self.caps.variant).field("loras", &self.applied).finish_non_exhaustive()
    }
}

impl Flux2Model {
    /// Loads a diffusers `Flux2KleinPipeline` folder, or a transformer file (BFL's or ComfyUI's) whose text
    /// encoder and VAE lie beside it (or in ComfyUI's sibling folders) and whose tokenizer, configs and
    /// scheduler come from [`LoadSpec::components`].
    pub fn load(path: &Path, spec: &LoadSpec) -> Result<Self> {
        if spec.vae.is_some() {
            return Err(Error::Unsupported {
                field: "vae",
                reason: "a separate VAE is for Stable Diffusion 1.x/2.x/XL models; put flux2-vae.safetensors beside the FLUX.2 diffusion model (or in ComfyUI's vae/ folder)".into(),
            });
        }
        if let Some(v) = spec.variant {
            tracing::warn!(variant = %v, "a Stable Diffusion variant was given for a FLUX.2 model; distilled or base is read from its folder or file name");
        }
        let opts = Flux2LoadOptions { dtype: spec.dtype, device: spec.device.clone(), components: spec.components.clone(), ..Flux2LoadOptions::default() };
        let models = sd_flux2::load(path, &opts)?;
        let caps = sd_flux2::pipeline::capabilities(&models);
        Ok(Self { models, caps, path: path.to_path_buf(), applied: Vec::new(), skipped_embeddings: crate::skipped_embeddings(&spec.embeddings, "FLUX.2") })
    }

    /// The weights' dtype.
    pub(crate) fn dtype(&self) -> candle_core::DType {
        self.models.transformer.dtype()
    }

    /// Lists the embedding files of `dirs` afresh, all skipped.
    pub(crate) fn load_embeddings(&mut self, dirs: &[PathBuf]) {
        self.skipped_embeddings = crate::skipped_embeddings(dirs, "FLUX.2");
    }

    /// FLUX.2 LoRAs touch only the transformer, so only it is reloaded (the Qwen3 encoder is as large).
    pub(crate) fn set_loras(&mut self, wanted: &[LoraWeight]) -> Result<()> {
        if wanted == self.applied.as_slice() {
            return Ok(());
        }
        let loras: Vec<sd_flux2::Flux2Lora> = wanted.iter().map(|l| sd_flux2::Flux2Lora::new(&l.path, l.strength as f32)).collect();
        let t = Instant::now();
        let m = &self.models;
        let (transformer, reports) =
            sd_flux2::loader::load_transformer_with_loras(&m.files.transformer, m.files.configs.as_deref(), m.transformer.dtype(), &m.device, &loras)
                .map_err(|e| Error::Lora { field: "loras".into(), message: format!("the LoRAs could not be applied: {e}") })?;
        for (l, r) in wanted.iter().zip(&reports) {
            if !r.unmatched.is_empty() {
                tracing::warn!(lora = %l.path.display(), applied = r.applied.len(), unmatched = r.unmatched.len(), "FLUX.2 LoRA partly matched");
            }
        }
        self.models.transformer = transformer;
        self.models.lora_report = reports;
        self.applied = wanted.to_vec();
        tracing::info!(secs = t.elapsed().as_secs_f64(), loras = wanted.len(), path = %self.path.display(), "FLUX.2 transformer reloaded with LoRAs");
        Ok(())
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
