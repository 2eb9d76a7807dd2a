//! FLUX.1 through `sd-flux`, with LoRAs.

use std::path::{Path, PathBuf};
use std::time::Instant;

use sd_core::family::Capabilities;
use sd_core::image_io::infotext;
use sd_core::run::{Request, RunContext, Task};
use sd_flux::{FluxLoadOptions, FluxModels};

use crate::{Error, Extras, Generated, LoadSpec, LoraWeight, Result, SkippedEmbedding};

/// A FLUX model, where its transformer came from and the LoRAs merged into it.
pub struct FluxModel {
    /// The components.
    pub models: FluxModels,
    pub(crate) caps: Capabilities,
    /// The transformer file or diffusers folder, reloaded when the LoRA set changes.
    transformer: PathBuf,
    /// Rotary split from a diffusers `transformer/config.json`, when one describes the file.
    axes: Option<Vec<usize>>,
    /// The LoRA files and strengths merged into the transformer now.
    applied: Vec<LoraWeight>,
    /// Every embedding file given: FLUX takes none.
    pub(crate) skipped_embeddings: Vec<SkippedEmbedding>,
}

impl std::fmt::Debug for FluxModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FluxModel")
            .field("transformer", &self.transformer)
            .field("variant", &self.caps.variant)
            .field("loras", &self.applied)
            .finish_non_exhaustive()
    }
}

impl FluxModel {
    /// Loads a diffusers folder, or a transformer file (BFL `.safetensors` or `.gguf`) whose other
    /// components come from [`LoadSpec::components`] or the file's own folder.
    pub fn load(path: &Path, spec: &LoadSpec) -> Result<Self> {
        if spec.vae.is_some() {
            return Err(Error::Unsupported {
                field: "vae",
                reason: "a separate VAE is for Stable Diffusion models; a FLUX model takes its VAE from its folder or --model-config".into(),
            });
        }
        if let Some(v) = spec.variant {
            tracing::warn!(variant = %v, "a Stable Diffusion variant was given for a FLUX model; FLUX's variant is read from its weights");
        }
        let opts = FluxLoadOptions { dtype: spec.dtype, device: spec.device.clone(), ..FluxLoadOptions::default() };
        let models = match (&spec.components, path.is_dir()) {
            (Some(repo), false) => {
                let files = sd_flux::FluxFiles::with_components_from(path, None, repo);
                sd_flux::load_source(&sd_flux::FluxSource::Files(files), &opts)?
            }
            _ => sd_flux::load(path, &opts)?,
        };
        // Where the transformer's rotary split is described: the components folder, or the model's own.
        let repo = match (&spec.components, path.is_dir()) {
            (Some(r), false) => r.clone(),
            (None, false) => path.parent().map(Path::to_path_buf).unwrap_or_default(),
            (_, true) => path.to_path_buf(),
        };
        let axes = sd_flux::transformer::folder_axes(&repo.join("transformer"))?;
        let caps = sd_flux::pipeline::capabilities(&models);
        let skipped_embeddings = crate::skipped_embeddings(&spec.embeddings, "FLUX.1");
        Ok(Self { models, caps, transformer: path.to_path_buf(), axes, applied: Vec::new(), skipped_embeddings })
    }

    /// Lists the embedding files of `dirs` afresh, all skipped.
    pub(crate) fn load_embeddings(&mut self, dirs: &[std::path::PathBuf]) {
        self.skipped_embeddings = crate::skipped_embeddings(dirs, "FLUX.1");
    }

    /// FLUX LoRAs touch only the transformer, so only it is reloaded (T5-XXL is the largest part).
    pub(crate) fn set_loras(&mut self, wanted: &[LoraWeight]) -> Result<()> {
        if wanted == self.applied.as_slice() {
            return Ok(());
        }
        let loras: Vec<sd_flux::FluxLora> = wanted.iter().map(|l| sd_flux::FluxLora::new(&l.path, l.strength as f32)).collect();
        let t = Instant::now();
        let m = &self.models;
        let (transformer, reports) =
            sd_flux::transformer::load_transformer_with_loras(&self.transformer, m.transformer.dtype(), &m.device, self.axes.as_deref(), &loras)
                .map_err(|e| Error::Lora { field: "loras".into(), message: format!("the LoRAs could not be applied: {e}") })?;
        for (l, r) in wanted.iter().zip(&reports) {
            if !r.unmatched.is_empty() {
                tracing::warn!(lora = %l.path.display(), applied = r.applied.len(), unmatched = r.unmatched.len(), "FLUX LoRA partly matched");
            }
        }
        self.models.transformer = transformer;
        self.applied = wanted.to_vec();
        tracing::info!(secs = t.elapsed().as_secs_f64(), loras = wanted.len(), "FLUX transformer reloaded with LoRAs");
        Ok(())
    }

    pub(crate) fn generate(&mut self, p: &Request, task: &Task<'_>, run: &mut RunContext<'_>, extras: &Extras<'_>) -> Result<Generated> {
        crate::refuse_sd_extras(extras, "FLUX.1")?;
        self.set_loras(extras.loras)?;
        let out = sd_flux::pipeline::generate(&self.models, p, task, run)?;
        Ok(Generated { images: out.images, latents: out.latents, seed: out.seed })
    }

    /// FLUX runs flow-matching Euler without true CFG (scale 1, no negative prompt); Forge writes the
    /// embedded guidance of dev as its "Distilled CFG Scale".
    pub(crate) fn infotext(&self, p: &Request, prompt: &str, model_name: &str, extra: &[(&str, String)]) -> String {
        let mut fields = vec![
            ("Steps", p.steps.to_string()),
            ("Sampler", "Euler".to_string()),
            ("CFG scale", "1".to_string()),
            ("Seed", p.seed.to_string()),
            ("Size", format!("{}x{}", p.width, p.height)),
            ("Model", model_name.to_string()),
        ];
        if self.models.variant == sd_flux::FluxVariant::Dev {
            fields.push(("Distilled CFG Scale", format!("{}", p.guidance_scale)));
        }
        fields.extend(extra.iter().map(|(k, v)| (*k, v.clone())));
        infotext(prompt, "", &fields)
    }
}
