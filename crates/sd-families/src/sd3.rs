//! Stable Diffusion 3 / 3.5 through `sd-sd3`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use sd_core::family::Capabilities;
use sd_core::image_io::infotext;
use sd_core::run::{Request, RunContext, Task};
use sd_sd3::{Sd3LoadOptions, Sd3Models};

use crate::{Error, Extras, Generated, LoadSpec, LoraWeight, Result, SkippedEmbedding};

/// An SD 3.x model, where it came from and the LoRAs merged into its MMDiT.
pub struct Sd3Model {
    /// The components.
    pub models: Sd3Models,
    pub(crate) caps: Capabilities,
    /// The folder or file it was loaded from.
    path: PathBuf,
    /// The LoRA files and strengths merged into the MMDiT now.
    applied: Vec<LoraWeight>,
    /// Every embedding file given: SD 3.x takes none here.
    pub(crate) skipped_embeddings: Vec<SkippedEmbedding>,
}

impl std::fmt::Debug for Sd3Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sd3Model").field("path", &self.path).field("variant", &self.caps.variant).finish_non_exhaustive()
    }
}

impl Sd3Model {
    /// Loads a diffusers folder, a Stability single file, or a diffusion-model file with its split text
    /// encoders and VAE beside it; [`LoadSpec::components`] fills in what a file lacks.
    pub fn load(path: &Path, spec: &LoadSpec) -> Result<Self> {
        if spec.vae.is_some() {
            return Err(Error::Unsupported {
                field: "vae",
                reason: "a separate VAE is for Stable Diffusion 1.x/2.x/XL models; put an SD 3.x VAE file beside the diffusion model or in --model-config".into(),
            });
        }
        if let Some(v) = spec.variant {
            tracing::warn!(variant = %v, "a Stable Diffusion variant was given for an SD 3.x model; its variant is read from its weights");
        }
        let opts = Sd3LoadOptions { dtype: spec.dtype, device: spec.device.clone(), components: spec.components.clone(), ..Sd3LoadOptions::default() };
        let models = sd_sd3::load(path, &opts)?;
        let caps = sd_sd3::pipeline::capabilities(&models);
        let skipped_embeddings = crate::skipped_embeddings(&spec.embeddings, "SD 3.x");
        Ok(Self { models, caps, path: path.to_path_buf(), applied: Vec::new(), skipped_embeddings })
    }

    /// Lists the embedding files of `dirs` afresh, all skipped.
    pub(crate) fn load_embeddings(&mut self, dirs: &[PathBuf]) {
        self.skipped_embeddings = crate::skipped_embeddings(dirs, "SD 3.x");
    }

    /// SD 3.x LoRAs here touch only the MMDiT, so only it is reloaded (T5-XXL is the largest part).
    pub(crate) fn set_loras(&mut self, wanted: &[LoraWeight]) -> Result<()> {
        if wanted == self.applied.as_slice() {
            return Ok(());
        }
        let loras: Vec<sd_sd3::Sd3Lora> = wanted.iter().map(|l| sd_sd3::Sd3Lora::new(&l.path, l.strength as f32)).collect();
        let t = Instant::now();
        let m = &self.models;
        let dtype = m.weight_dtype;
        let (transformer, reports) =
            sd_sd3::loader::load_transformer_with_loras(&m.files.transformer, m.files.configs.as_deref(), dtype, &m.device, &loras)
                .map_err(|e| Error::Lora { field: "loras".into(), message: format!("the LoRAs could not be applied: {e}") })?;
        for (l, r) in wanted.iter().zip(&reports) {
            if !r.unmatched.is_empty() {
                tracing::warn!(lora = %l.path.display(), applied = r.applied.len(), unmatched = r.unmatched.len(), "SD 3.x LoRA partly matched");
            }
        }
        self.models.transformer = transformer;
        self.applied = wanted.to_vec();
        tracing::info!(secs = t.elapsed().as_secs_f64(), loras = wanted.len(), path = %self.path.display(), "SD 3.x MMDiT reloaded with LoRAs");
        Ok(())
    }

    pub(crate) fn generate(&mut self, p: &Request, task: &Task<'_>, run: &mut RunContext<'_>, extras: &Extras<'_>) -> Result<Generated> {
        crate::refuse_sd_extras(extras, "SD 3.x")?;
        self.set_loras(extras.loras)?;
        let out = sd_sd3::pipeline::generate(&self.models, p, task, run)?;
        Ok(Generated { images: out.images, latents: out.latents, seed: out.seed })
    }

    /// A1111's `parameters` text: SD 3.x runs flow-matching Euler with true CFG.
    pub(crate) fn infotext(&self, p: &Request, prompt: &str, model_name: &str, extra: &[(&str, String)]) -> String {
        let mut fields = vec![
            ("Steps", p.steps.to_string()),
            ("Sampler", "Euler".to_string()),
            ("Schedule type", "Simple".to_string()),
            ("CFG scale", format!("{}", p.guidance_scale)),
            ("Seed", p.seed.to_string()),
            ("Size", format!("{}x{}", p.width, p.height)),
            ("Model", model_name.to_string()),
        ];
        if p.clip_skip > 1 {
            fields.push(("Clip skip", p.clip_skip.to_string()));
        }
        if let Some(slg) = &p.skip_layer_guidance {
            // Quoted, as A1111 quotes values with commas: `SLG: "7,8,9 x2.8 (0.01-0.2)"`.
            fields.push(("SLG", format!("\"{}\"", slg.summary())));
        }
        fields.extend(extra.iter().map(|(k, v)| (*k, v.clone())));
        infotext(prompt, &p.negative_prompt, &fields)
    }
}
