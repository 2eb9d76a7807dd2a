//! Z-Image (Turbo and base) through `sd-zimage`, with LoRAs.

use std::path::{Path, PathBuf};
use std::time::Instant;

use sd_core::family::Capabilities;
use sd_core::image_io::infotext;
use sd_core::run::{Request, RunContext, Task};
use sd_zimage::{ZImageLoadOptions, ZImageModels};

use crate::{Error, Extras, Generated, LoadSpec, LoraWeight, Result, SkippedEmbedding};

/// A Z-Image model, where its transformer came from and the LoRAs merged into it.
pub struct ZImageModel {
    /// The components.
    pub models: ZImageModels,
    pub(crate) caps: Capabilities,
    /// The transformer file or folder, reloaded when the LoRA set changes.
    transformer: PathBuf,
    /// The LoRA files and strengths merged into the transformer now.
    applied: Vec<LoraWeight>,
    /// Every embedding file given: Z-Image takes none.
    pub(crate) skipped_embeddings: Vec<SkippedEmbedding>,
}

impl std::fmt::Debug for ZImageModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZImageModel")
            .field("transformer", &self.transformer)
            .field("variant", &self.caps.variant)
            .field("loras", &self.applied)
            .finish_non_exhaustive()
    }
}

impl ZImageModel {
    /// Loads a diffusers folder, or a transformer file whose other components come from
    /// [`LoadSpec::components`] or the file's own folder.
    pub fn load(path: &Path, spec: &LoadSpec) -> Result<Self> {
        if spec.vae.is_some() {
            return Err(Error::Unsupported {
                field: "vae",
                reason: "a separate VAE is for Stable Diffusion 1.x/2.x/XL models; a Z-Image model takes its VAE from its folder or --model-config".into(),
            });
        }
        if let Some(v) = spec.variant {
            tracing::warn!(variant = %v, "a Stable Diffusion variant was given for a Z-Image model; Turbo or base is read from its name");
        }
        let mut opts = ZImageLoadOptions { dtype: spec.dtype, device: spec.device.clone(), ..ZImageLoadOptions::default() };
        // A transformer file's architecture beyond what its shapes show (the rotary split of non-standard
        // head widths) comes from the components folder's transformer config, when it has one.
        if let Some(cfg) = spec.components.as_ref().map(|r| r.join("transformer").join("config.json")).filter(|p| p.is_file() && !path.is_dir()) {
            opts.transformer_config = Some(sd_zimage::ZImageConfig::from_file(&cfg)?);
        }
        let (models, transformer) = match (&spec.components, path.is_dir()) {
            (Some(repo), false) => {
                let files = sd_zimage::ZImageFiles::with_components_from(path, None, repo);
                let variant = sd_zimage::ZImageVariant::from_path(path);
                (sd_zimage::load_files(&files, variant, &opts)?, path.to_path_buf())
            }
            (_, true) => (sd_zimage::load(path, &opts)?, path.join("transformer")),
            (None, false) => (sd_zimage::load(path, &opts)?, path.to_path_buf()),
        };
        let caps = sd_zimage::pipeline::capabilities(&models);
        let skipped_embeddings = crate::skipped_embeddings(&spec.embeddings, "Z-Image");
        Ok(Self { models, caps, transformer, applied: Vec::new(), skipped_embeddings })
    }

    /// Lists the embedding files of `dirs` afresh, all skipped.
    pub(crate) fn load_embeddings(&mut self, dirs: &[PathBuf]) {
        self.skipped_embeddings = crate::skipped_embeddings(dirs, "Z-Image");
    }

    /// Z-Image LoRAs touch only the transformer, so only it is reloaded.
    pub(crate) fn set_loras(&mut self, wanted: &[LoraWeight]) -> Result<()> {
        if wanted == self.applied.as_slice() {
            return Ok(());
        }
        let loras: Vec<sd_zimage::ZImageLora> = wanted.iter().map(|l| sd_zimage::ZImageLora::new(&l.path, l.strength as f32)).collect();
        let t = Instant::now();
        let m = &self.models;
        let config = m.transformer.config().clone();
        let (transformer, reports) = sd_zimage::transformer::load_transformer_with_loras(&self.transformer, m.dtype, &m.device, Some(&config), &loras)
            .map_err(|e| Error::Lora { field: "loras".into(), message: format!("the LoRAs could not be applied: {e}") })?;
        for (l, r) in wanted.iter().zip(&reports) {
            if !r.unmatched.is_empty() {
                tracing::warn!(lora = %l.path.display(), applied = r.applied.len(), unmatched = r.unmatched.len(), "Z-Image LoRA partly matched");
            }
        }
        self.models.transformer = transformer;
        self.applied = wanted.to_vec();
        tracing::info!(secs = t.elapsed().as_secs_f64(), loras = wanted.len(), "Z-Image transformer reloaded with LoRAs");
        Ok(())
    }

    pub(crate) fn generate(&mut self, p: &Request, task: &Task<'_>, run: &mut RunContext<'_>, extras: &Extras<'_>) -> Result<Generated> {
        crate::refuse_sd_extras(extras, "Z-Image")?;
        self.set_loras(extras.loras)?;
        let out = sd_zimage::pipeline::generate(&self.models, p, task, run)?;
        Ok(Generated { images: out.images, latents: out.latents, seed: out.seed })
    }

    /// A1111's `parameters` text: flow-matching Euler, with CFG only when the scale asks for it.
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
        fields.extend(extra.iter().map(|(k, v)| (*k, v.clone())));
        infotext(prompt, &p.negative_prompt, &fields)
    }
}
