//! Public entry points: load every component of a Stable Diffusion model from a diffusers folder,
//! a single-file checkpoint or (feature `hub`) a Hugging Face repo, into the same structs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::clip::ClipTextModel;
use crate::config::VaeConfig;
use crate::detect::{self, Detection};
use crate::diffusers::DiffusersFolder;
use crate::keymap::{text_encoder_layout, Component, KeyMap, LDM_UNET_PREFIX, LDM_VAE_PREFIX};
use crate::single_file::{self, take_error, SingleFile, SingleFileBackend, TensorInfo};
use crate::tokenizer::{ClipTokenizer, PadToken};
use crate::unet::UNet2DConditionModel;
use crate::vae::AutoencoderKL;
use crate::variant::{ModelConfig, ModelFamily, SdVariant};
use crate::weights::MappedWeights;
use crate::{Error, Result};

/// Wraps the weight source of one component before its model is built (LoRA merging, weight
/// patching), so extensions change weights without touching model code. Called once per component
/// with the component, the resolved model config and the backend serving diffusers names.
pub type BackendHook =
    Arc<dyn Fn(Component, &ModelConfig, Box<dyn SimpleBackend>) -> Result<Box<dyn SimpleBackend>> + Send + Sync>;

/// How to load a model.
#[derive(Clone)]
pub struct LoadOptions {
    /// Force a variant instead of detecting it (needed to pick the turbo variants); must agree with
    /// the weights' family and inpainting-ness.
    pub variant: Option<SdVariant>,
    /// Weight dtype; `None` means F32 on CPU and F16 on CUDA/Metal.
    pub dtype: Option<DType>,
    /// Where the weights go.
    pub device: Device,
    /// Component configs for a single file whose architecture differs from the published variant
    /// (tiny or custom models), like diffusers' `config=`; ignored for folders, which carry their own.
    pub config: Option<ModelConfig>,
    /// In diffusers folders, load `*.fp16.safetensors` when both variants are present.
    pub prefer_fp16_files: bool,
    /// Wraps each component's weight backend (folders and single files alike); see [`BackendHook`].
    pub backend_hook: Option<BackendHook>,
    /// A VAE to use instead of the model's own: a diffusers `vae/` folder or a `.safetensors` file
    /// (diffusers, LDM or `first_stage_model.*` names; see [`crate::vae::load_vae_weights`]). It must
    /// have the model's latent channel count; a folder's `config.json` (scaling factor …) replaces the
    /// model's VAE config, a file keeps it.
    pub vae: Option<PathBuf>,
    /// For a single file: a diffusers folder whose `tokenizer/` (and `tokenizer_2/`) are used instead of
    /// the bundled CLIP vocabulary (the folder that [`LoadOptions::config`] was read from, typically).
    pub tokenizer_dir: Option<PathBuf>,
}

impl std::fmt::Debug for LoadOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadOptions")
            .field("variant", &self.variant)
            .field("dtype", &self.dtype)
            .field("device", &self.device)
            .field("config", &self.config)
            .field("prefer_fp16_files", &self.prefer_fp16_files)
            .field("backend_hook", &self.backend_hook.as_ref().map(|_| "<hook>"))
            .field("vae", &self.vae)
            .field("tokenizer_dir", &self.tokenizer_dir)
            .finish()
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            variant: None,
            dtype: None,
            device: Device::Cpu,
            config: None,
            prefer_fp16_files: false,
            backend_hook: None,
            vae: None,
            tokenizer_dir: None,
        }
    }
}

impl LoadOptions {
    /// Passes `backend` through the hook, if any.
    fn wrap(
        &self,
        c: Component,
        config: &ModelConfig,
        backend: Box<dyn SimpleBackend>,
    ) -> Result<Box<dyn SimpleBackend>> {
        match &self.backend_hook {
            Some(hook) => hook(c, config, backend),
            None => Ok(backend),
        }
    }
}

impl LoadOptions {
    /// The dtype the weights will be loaded as, after defaults and validation.
    pub fn resolved_dtype(&self) -> Result<DType> {
        let dtype = self.dtype.unwrap_or(if self.device.is_cpu() { DType::F32 } else { DType::F16 });
        match dtype {
            DType::F32 => Ok(dtype),
            DType::F16 | DType::BF16 => {
                if self.device.is_cpu() {
                    tracing::warn!("{dtype:?} on the CPU works but is much slower than F32");
                }
                Ok(dtype)
            }
            other => Err(Error::UnsupportedDtype { dtype: other, device: describe_device(&self.device) }),
        }
    }
}

fn describe_device(device: &Device) -> String {
    if device.is_cuda() {
        "CUDA".into()
    } else if device.is_metal() {
        "Metal".into()
    } else {
        "CPU".into()
    }
}

/// Every component of a loaded Stable Diffusion model.
pub struct StableDiffusionModels {
    /// Configs and generation defaults of the loaded model.
    pub config: ModelConfig,
    /// The denoising UNet.
    pub unet: UNet2DConditionModel,
    /// The autoencoder.
    pub vae: AutoencoderKL,
    /// The first (or only) text encoder.
    pub text_encoder: ClipTextModel,
    /// SDXL's second text encoder.
    pub text_encoder_2: Option<ClipTextModel>,
    /// Tokenizer of the first text encoder.
    pub tokenizer: ClipTokenizer,
    /// Tokenizer of the second text encoder (SDXL).
    pub tokenizer_2: Option<ClipTokenizer>,
    /// dtype of the UNet and text encoders.
    pub dtype: DType,
    /// dtype of the VAE (F32 when `dtype` is F16 and the VAE overflows in F16, as SDXL's does).
    pub vae_dtype: DType,
    /// Device of every component.
    pub device: Device,
    /// Textual-inversion embeddings prompts may name (see [`StableDiffusionModels::add_embedding`]).
    pub embeddings: Vec<crate::embeddings::TextualInversion>,
}

impl StableDiffusionModels {
    /// Loads the textual-inversion embedding at `path` (checked against this model's text encoders) so
    /// prompts can use it by its file stem; an embedding of the same name is replaced.
    pub fn add_embedding(&mut self, path: &Path) -> Result<&crate::embeddings::TextualInversion> {
        let e = crate::embeddings::TextualInversion::load(path, &self.config)?;
        self.embeddings.retain(|old| !old.name.eq_ignore_ascii_case(&e.name));
        self.embeddings.push(e);
        let last = self.embeddings.len() - 1;
        Ok(&self.embeddings[last])
    }
}

impl std::fmt::Debug for StableDiffusionModels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StableDiffusionModels")
            .field("variant", &self.config.variant)
            .field("dtype", &self.dtype)
            .field("vae_dtype", &self.vae_dtype)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

/// The VAE dtype for a model dtype: diffusers' `force_upcast` keeps overflowing VAEs in F32.
pub fn vae_dtype_for(dtype: DType, vae: &VaeConfig) -> DType {
    if dtype == DType::F16 && vae.force_upcast {
        DType::F32
    } else {
        dtype
    }
}

const PICKLE_EXTENSIONS: [&str; 4] = ["ckpt", "pt", "pth", "bin"];

fn pickle_error(path: &Path) -> Error {
    Error::UnsupportedFormat {
        path: path.to_path_buf(),
        reason: "PyTorch pickle checkpoints (.ckpt/.pt/.bin) are not loaded because unpickling can run arbitrary code; \
                 convert it to .safetensors first (e.g. load it with diffusers' `from_single_file` and `save_pretrained`, \
                 or `safetensors.torch.save_file(torch.load(path)[\"state_dict\"], out)`)"
            .into(),
    }
}

/// Loads a model from a diffusers folder or a single `.safetensors` checkpoint.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<StableDiffusionModels> {
    if path.is_dir() {
        return load_diffusers_folder(path, opts);
    }
    if !path.exists() {
        return Err(Error::NotFound { what: "model file or folder".into(), path: path.to_path_buf() });
    }
    load_single_file(path, opts)
}

/// Turns a candle error from building `component` into the most specific [`Error`].
fn classify(e: candle_core::Error, component: Component, source: &Path) -> Error {
    let source_desc = format!("{} ({component})", source.display());
    match single_file::innermost(&e) {
        candle_core::Error::CannotFindTensor { path } => {
            Error::MissingTensor { name: format!("{component}/{path}"), source_desc }
        }
        candle_core::Error::SafeTensor(safetensors::SafeTensorError::TensorNotFound(name)) => {
            Error::MissingTensor { name: format!("{component}/{name}"), source_desc }
        }
        candle_core::Error::UnexpectedShape { msg, expected, got } => Error::ShapeMismatch {
            name: format!("{component}/{}", msg.strip_prefix("shape mismatch for ").unwrap_or(msg)),
            source_desc,
            expected: expected.dims().to_vec(),
            actual: got.dims().to_vec(),
        },
        _ => Error::Candle(e),
    }
}

/// Per-component var builders of one checkpoint.
struct Builders<'a> {
    vb: BTreeMap<Component, VarBuilder<'a>>,
}

/// The models of one checkpoint before tokenizers are attached.
struct Components {
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: ClipTextModel,
    text_encoder_2: Option<ClipTextModel>,
}

impl<'a> Builders<'a> {
    fn take(&mut self, c: Component) -> Result<VarBuilder<'a>> {
        self.vb.remove(&c).ok_or_else(|| Error::InvalidInput(format!("internal: no weights prepared for the {c}")))
    }
}

/// Builds every model, mapping failures with `on_err(component, candle_error)`.
fn build_components(
    mut b: Builders<'_>,
    config: &ModelConfig,
    on_err: &dyn Fn(Component, candle_core::Error) -> Error,
) -> Result<Components> {
    let unet =
        UNet2DConditionModel::new(b.take(Component::Unet)?, &config.unet).map_err(|e| on_err(Component::Unet, e))?;
    let vae = AutoencoderKL::new(b.take(Component::Vae)?, &config.vae).map_err(|e| on_err(Component::Vae, e))?;
    let text_encoder = ClipTextModel::new(b.take(Component::TextEncoder)?, &config.text_encoder)
        .map_err(|e| on_err(Component::TextEncoder, e))?;
    let text_encoder_2 = match &config.text_encoder_2 {
        Some(cfg) => Some(
            ClipTextModel::new(b.take(Component::TextEncoder2)?, cfg)
                .map_err(|e| on_err(Component::TextEncoder2, e))?,
        ),
        None => None,
    };
    Ok(Components { unet, vae, text_encoder, text_encoder_2 })
}

/// Replaces the loaded VAE with [`LoadOptions::vae`], when one is given.
fn override_vae(opts: &LoadOptions, dtype: DType, config: &mut ModelConfig, vae: &mut AutoencoderKL, vae_dtype: &mut DType) -> Result<()> {
    let Some(path) = &opts.vae else { return Ok(()) };
    let (new_vae, cfg) = crate::vae::load_vae_weights(path, &config.vae, dtype, &opts.device)?;
    if cfg.latent_channels != config.vae.latent_channels {
        return Err(Error::InvalidConfig {
            path: path.clone(),
            reason: format!(
                "this VAE has {} latent channels but the {} model needs {}; use a VAE made for this model family",
                cfg.latent_channels, config.variant, config.vae.latent_channels
            ),
        });
    }
    *vae_dtype = vae_dtype_for(dtype, &cfg);
    *vae = new_vae;
    config.vae = cfg;
    tracing::info!("using the VAE from {}", path.display());
    Ok(())
}

/// The complete config of a diffusers folder for `variant`.
pub fn folder_model_config(folder: &DiffusersFolder, variant: SdVariant) -> ModelConfig {
    let defaults = variant.config();
    let mut cfg = ModelConfig {
        variant,
        unet: folder.unet.clone(),
        vae: folder.vae.clone(),
        text_encoder: folder.text_encoder.clone(),
        text_encoder_2: folder.text_encoder_2.clone(),
        scheduler: folder.scheduler.clone(),
        ..defaults
    };
    // diffusers' pipelines default to `unet.sample_size * vae_scale_factor` pixels.
    let size = cfg.unet.sample_size * cfg.vae_scale_factor();
    cfg.default_width = size;
    cfg.default_height = size;
    cfg
}

/// Detects the variant of a diffusers folder (see [`crate::detect`]).
pub fn detect_folder(folder: &DiffusersFolder) -> Result<Detection> {
    detect::detect_from_configs(
        &folder.root,
        &folder.unet,
        &folder.text_encoder,
        folder.text_encoder_2.is_some(),
        folder.scheduler.prediction_type,
        folder.scheduler.timestep_spacing.as_deref().unwrap_or_default(),
    )
}

/// Reads only the configs of a diffusers folder and returns its complete [`ModelConfig`].
///
/// Useful as [`LoadOptions::config`] for a single file converted from the same model.
pub fn read_folder_config(dir: &Path, variant: Option<SdVariant>) -> Result<ModelConfig> {
    let folder = DiffusersFolder::open(dir)?;
    let detected = detect_folder(&folder)?;
    let variant = detect::resolve_variant(&detected, variant)?;
    Ok(folder_model_config(&folder, variant))
}

/// Loads the tokenizer in `dir`, or the bundled CLIP vocabulary when the folder has none.
fn folder_tokenizer(dir: &Path, pad: PadToken) -> Result<ClipTokenizer> {
    if dir.is_dir() {
        return ClipTokenizer::from_folder(dir);
    }
    bundled_tokenizer(pad, dir)
}

#[cfg(feature = "bundled-vocab")]
fn bundled_tokenizer(pad: PadToken, _missing: &Path) -> Result<ClipTokenizer> {
    ClipTokenizer::bundled(pad)
}

#[cfg(not(feature = "bundled-vocab"))]
fn bundled_tokenizer(_pad: PadToken, missing: &Path) -> Result<ClipTokenizer> {
    Err(Error::NotFound {
        what: "tokenizer (enable the `bundled-vocab` feature to use the built-in CLIP vocabulary)".into(),
        path: missing.to_path_buf(),
    })
}

/// Loads a diffusers pipeline folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, …).
pub fn load_diffusers_folder(dir: &Path, opts: &LoadOptions) -> Result<StableDiffusionModels> {
    let dtype = opts.resolved_dtype()?;
    let folder = DiffusersFolder::open(dir)?;
    let detected = detect_folder(&folder)?;
    let variant = detect::resolve_variant(&detected, opts.variant)?;
    if opts.config.is_some() {
        tracing::warn!(
            "{}: LoadOptions::config is ignored for diffusers folders, which carry their own config.json files",
            dir.display()
        );
    }
    let mut config = folder_model_config(&folder, variant);
    let mut vae_dtype = vae_dtype_for(dtype, &config.vae);
    let mut components = vec![Component::Unet, Component::Vae, Component::TextEncoder];
    if config.text_encoder_2.is_some() {
        components.push(Component::TextEncoder2);
    }
    let mut vb = BTreeMap::new();
    for c in components {
        let files = folder.weight_files(c, opts.prefer_fp16_files)?;
        // Parse every header up front so a truncated shard is reported with its own path.
        for f in &files {
            single_file::open_safetensors(f)?;
        }
        let d = if c == Component::Vae { vae_dtype } else { dtype };
        // SAFETY: read-only mapping; the files must not be truncated while the model is loading.
        let st = unsafe { MmapedSafetensors::multi(&files) }
            .map_err(|e| Error::InvalidSafetensors { path: folder.component_dir(c), reason: e.to_string() })?;
        let backend = opts.wrap(c, &config, Box::new(MappedWeights::new(st)))?;
        vb.insert(c, VarBuilder::from_backend(backend, d, opts.device.clone()));
    }
    let on_err = |c: Component, e: candle_core::Error| classify(e, c, &folder.component_dir(c));
    let mut parts = build_components(Builders { vb }, &config, &on_err)?;
    override_vae(opts, dtype, &mut config, &mut parts.vae, &mut vae_dtype)?;
    let tok_pad = if variant.family() == ModelFamily::Sd2 { PadToken::Exclamation } else { PadToken::EndOfText };
    let tokenizer = folder_tokenizer(&dir.join("tokenizer"), tok_pad)?;
    let tokenizer_2 = match config.text_encoder_2 {
        Some(_) => Some(folder_tokenizer(&dir.join("tokenizer_2"), PadToken::Exclamation)?),
        None => None,
    };
    tracing::info!("loaded {} ({}) from {}", variant, detected.evidence, dir.display());
    Ok(StableDiffusionModels {
        config,
        unet: parts.unet,
        vae: parts.vae,
        text_encoder: parts.text_encoder,
        text_encoder_2: parts.text_encoder_2,
        tokenizer,
        tokenizer_2,
        dtype,
        vae_dtype,
        device: opts.device.clone(),
        embeddings: Vec::new(),
    })
}

fn has_pickle_extension(path: &Path) -> bool {
    path.extension().is_some_and(|e| PICKLE_EXTENSIONS.iter().any(|p| e.eq_ignore_ascii_case(p)))
}

/// Opens a single file, detects and resolves its variant and config.
fn prepare_single_file(path: &Path, opts: &LoadOptions) -> Result<(SingleFile, Detection, ModelConfig)> {
    if has_pickle_extension(path) {
        return Err(pickle_error(path));
    }
    let file = SingleFile::open(path)?;
    let detected = detect::detect_single_file(path, &file.tensors())?;
    let requested = opts.variant.or(opts.config.as_ref().map(|c| c.variant));
    let variant = detect::resolve_variant(&detected, requested)?;
    let mut config = opts.config.clone().unwrap_or_else(|| variant.config());
    config.variant = variant;
    // Finetunes of SDXL trained for v-prediction and zero terminal SNR (NoobAI-XL and its kin) mark their
    // single files with empty `v_pred` and `ztsnr` tensors, which A1111 and ComfyUI read; so do we.
    if file.contains("v_pred") {
        config.scheduler.prediction_type = crate::config::PredictionType::VPrediction;
        tracing::info!("{}: `v_pred` key: a v-prediction model", path.display());
    }
    if file.contains("ztsnr") {
        config.scheduler.rescale_betas_zero_snr = true;
        tracing::info!("{}: `ztsnr` key: betas rescaled to zero terminal SNR", path.display());
    }
    if config.unet.in_channels != detected.in_channels {
        return Err(Error::VariantMismatch {
            detected: format!("{} ({})", detected.variant, detected.evidence),
            requested: format!("a config with {} UNet input channels", config.unet.in_channels),
        });
    }
    Ok((file, detected, config))
}

/// Loads a single-file checkpoint (`model.diffusion_model.*`, `first_stage_model.*`, text encoders).
///
/// The config is [`LoadOptions::config`] when given, else the published config of the variant.
pub fn load_single_file(path: &Path, opts: &LoadOptions) -> Result<StableDiffusionModels> {
    let dtype = opts.resolved_dtype()?;
    let (file, detected, mut config) = prepare_single_file(path, opts)?;
    let variant = config.variant;
    let mut vae_dtype = vae_dtype_for(dtype, &config.vae);
    let file = Arc::new(file);
    let keymap = Arc::new(KeyMap::new(variant.family(), &config.unet, &config.vae));
    let mut components = vec![Component::Unet, Component::Vae, Component::TextEncoder];
    if config.text_encoder_2.is_some() {
        components.push(Component::TextEncoder2);
    }
    let mut vb = BTreeMap::new();
    let mut slots = BTreeMap::new();
    for c in components {
        let backend = SingleFileBackend::new(file.clone(), c, keymap.clone());
        slots.insert(c, backend.error_slot());
        let d = if c == Component::Vae { vae_dtype } else { dtype };
        let backend = opts.wrap(c, &config, Box::new(backend))?;
        vb.insert(c, VarBuilder::from_backend(backend, d, opts.device.clone()));
    }
    let on_err = |c: Component, e: candle_core::Error| {
        slots.get(&c).and_then(|s| take_error(s, &e)).unwrap_or_else(|| classify(e, c, path))
    };
    let mut parts = build_components(Builders { vb }, &config, &on_err)?;
    override_vae(opts, dtype, &mut config, &mut parts.vae, &mut vae_dtype)?;
    let (tokenizer, tokenizer_2) = single_file_tokenizers(variant.family(), config.text_encoder_2.is_some(), path, opts.tokenizer_dir.as_deref())?;
    tracing::info!("loaded {} ({}) from {}", variant, detected.evidence, path.display());
    Ok(StableDiffusionModels {
        config,
        unet: parts.unet,
        vae: parts.vae,
        text_encoder: parts.text_encoder,
        text_encoder_2: parts.text_encoder_2,
        tokenizer,
        tokenizer_2,
        dtype,
        vae_dtype,
        device: opts.device.clone(),
        embeddings: Vec::new(),
    })
}

/// Single files carry no tokenizer: use the bundled CLIP vocabulary with each encoder's pad token.
fn single_file_tokenizers(
    family: ModelFamily,
    second: bool,
    path: &Path,
    folder: Option<&Path>,
) -> Result<(ClipTokenizer, Option<ClipTokenizer>)> {
    let pad = if family == ModelFamily::Sd2 { PadToken::Exclamation } else { PadToken::EndOfText };
    // A config folder's own tokenizer wins (custom or tiny vocabularies); else the bundled one.
    let pick = |sub: &str, pad: PadToken| match folder.map(|f| f.join(sub)).filter(|d| d.is_dir()) {
        Some(dir) => ClipTokenizer::from_folder(&dir),
        None => bundled_tokenizer(pad, path),
    };
    let first = pick("tokenizer", pad)?;
    let second = if second { Some(pick("tokenizer_2", PadToken::Exclamation)?) } else { None };
    Ok((first, second))
}

/// Where a checkpoint's weights come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointFormat {
    /// A diffusers pipeline folder.
    DiffusersFolder,
    /// A single-file (LDM / A1111 / civitai) safetensors checkpoint.
    SingleFile,
}

/// Tensor statistics of one component.
#[derive(Debug, Clone, PartialEq)]
pub struct ComponentInfo {
    /// The component.
    pub component: Component,
    /// Number of stored tensors.
    pub tensors: usize,
    /// Number of stored parameters (elements).
    pub parameters: usize,
    /// The most common stored dtype.
    pub dtype: Option<DType>,
}

/// What [`inspect`] learns from headers and configs alone, without loading weights.
#[derive(Debug, Clone)]
pub struct CheckpointInfo {
    /// The inspected path.
    pub path: PathBuf,
    /// Folder or single file.
    pub format: CheckpointFormat,
    /// Detection result.
    pub detection: Detection,
    /// Per-component statistics (absent components are left out).
    pub components: Vec<ComponentInfo>,
    /// Tensors of a single file that belong to no component (EMA copies, schedules, …).
    pub other_tensors: usize,
    /// The most common stored dtype over all weights.
    pub dtype: Option<DType>,
}

impl CheckpointInfo {
    /// Total stored parameters of all components.
    pub fn total_parameters(&self) -> usize {
        self.components.iter().map(|c| c.parameters).sum()
    }
}

fn most_common(dtypes: &BTreeMap<String, (DType, usize)>) -> Option<DType> {
    dtypes.values().max_by_key(|(_, n)| *n).map(|(d, _)| *d)
}

fn summarize(component: Component, tensors: &[&TensorInfo]) -> ComponentInfo {
    let mut dtypes: BTreeMap<String, (DType, usize)> = BTreeMap::new();
    let mut parameters = 0;
    for t in tensors {
        let n: usize = t.shape.iter().product();
        parameters += n;
        if let Some(d) = t.dtype {
            dtypes.entry(format!("{d:?}")).or_insert((d, 0)).1 += n;
        }
    }
    ComponentInfo { component, tensors: tensors.len(), parameters, dtype: most_common(&dtypes) }
}

fn overall_dtype(components: &[ComponentInfo]) -> Option<DType> {
    let mut dtypes: BTreeMap<String, (DType, usize)> = BTreeMap::new();
    for c in components {
        if let Some(d) = c.dtype {
            dtypes.entry(format!("{d:?}")).or_insert((d, 0)).1 += c.parameters;
        }
    }
    most_common(&dtypes)
}

/// Detects the variant and counts parameters per component by reading headers and configs only.
pub fn inspect(path: &Path) -> Result<CheckpointInfo> {
    if path.is_dir() {
        let folder = DiffusersFolder::open(path)?;
        let detection = detect_folder(&folder)?;
        let mut components = Vec::new();
        for c in Component::ALL {
            if c == Component::TextEncoder2 && folder.text_encoder_2.is_none() {
                continue;
            }
            let mut infos = Vec::new();
            for f in folder.weight_files(c, false)? {
                infos.extend(single_file::tensor_infos(&single_file::open_safetensors(&f)?));
            }
            components.push(summarize(c, &infos.iter().collect::<Vec<_>>()));
        }
        let dtype = overall_dtype(&components);
        return Ok(CheckpointInfo {
            path: path.to_path_buf(),
            format: CheckpointFormat::DiffusersFolder,
            detection,
            components,
            other_tensors: 0,
            dtype,
        });
    }
    if !path.exists() {
        return Err(Error::NotFound { what: "model file or folder".into(), path: path.to_path_buf() });
    }
    if has_pickle_extension(path) {
        return Err(pickle_error(path));
    }
    let file = SingleFile::open(path)?;
    let tensors = file.tensors();
    let detection = detect::detect_single_file(path, &tensors)?;
    let family = detection.variant.family();
    let prefix_of = |c: Component| -> Option<&'static str> {
        match c {
            Component::Unet => Some(LDM_UNET_PREFIX),
            Component::Vae => Some(LDM_VAE_PREFIX),
            _ => text_encoder_layout(family, c).map(|(p, _)| p),
        }
    };
    let mut components = Vec::new();
    let mut assigned = 0;
    for c in Component::ALL {
        let Some(prefix) = prefix_of(c) else { continue };
        let mine: Vec<&TensorInfo> = tensors.iter().filter(|t| t.name.starts_with(prefix)).collect();
        if mine.is_empty() {
            continue;
        }
        assigned += mine.len();
        components.push(summarize(c, &mine));
    }
    let dtype = overall_dtype(&components);
    Ok(CheckpointInfo {
        path: path.to_path_buf(),
        format: CheckpointFormat::SingleFile,
        detection,
        components,
        other_tensors: tensors.len() - assigned,
        dtype,
    })
}

/// Loads a model from the Hugging Face hub (a diffusers repo, or a repo holding one checkpoint
/// file), downloading into the hub cache or, offline, reading it from there.
#[cfg(feature = "hub")]
pub fn load_from_hub(model: &crate::hub::HubModel, hub: &crate::hub::HubOptions, opts: &LoadOptions) -> Result<StableDiffusionModels> {
    let path = crate::hub::download(model, hub)?;
    load(&path, opts)
}
