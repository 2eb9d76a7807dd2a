//! Loading every SD 3.x component into one [`Sd3Models`], from the layouts people download: a diffusers
//! folder, Stability's single files (`sd3.5_medium.safetensors`, `sd3_medium_incl_clips_t5xxlfp16.safetensors`:
//! the MMDiT under `model.diffusion_model.`, the VAE under `first_stage_model.`, and the text encoders under
//! `text_encoders.{clip_l,clip_g,t5xxl}.transformer.` when included), and the split files ComfyUI users keep
//! (a diffusion-model file with `clip_l*.safetensors`, `clip_g*.safetensors`, `t5xxl*.safetensors` and a VAE
//! file beside it or in ComfyUI's `text_encoders/` and `vae/` folders).

use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use candle_transformers::models::t5::Config as T5Config;
use sd_core::schedulers::flow_match::FlowMatchConfig;
use sd_lora::AdapterReport;
use sd_models::clip::ClipTextModel;
use sd_models::single_file::innermost;
use sd_models::t5::T5Encoder;
use sd_models::tokenizer::{ClipTokenizer, PadToken};
use sd_models::vae::AutoencoderKL;
use sd_models::weights::MappedWeights;
use sd_models::VaeConfig;
use tokenizers::Tokenizer;

use crate::config::{Sd3Config, Sd3Variant};
use crate::error::{Error, Result};
use crate::keymap::{count_blocks, count_diffusers_blocks, diffusers_backend};
use crate::lora::{wrap_backend, Sd3Lora};
use crate::model::Mmdit;
use crate::text::{clip_config_from_shapes, TextEncoders};

/// The prefixes of Stability's single files.
const MMDIT_PREFIX: &str = "model.diffusion_model.";
const VAE_PREFIX: &str = "first_stage_model.";
const CLIP_L_PREFIX: &str = "text_encoders.clip_l.transformer.";
const CLIP_G_PREFIX: &str = "text_encoders.clip_g.transformer.";
const T5_PREFIX: &str = "text_encoders.t5xxl.transformer.";

/// What to download when a component is missing.
const HINT: &str = "an SD 3.x model needs the MMDiT, the VAE, CLIP-L and CLIP-G (T5-XXL is optional): pass a diffusers \
                    folder (stabilityai/stable-diffusion-3.5-medium), a single file that includes them, or put \
                    clip_l.safetensors, clip_g.safetensors, t5xxl_fp16.safetensors and the VAE beside the diffusion model \
                    (or give --model-config a diffusers SD 3.x folder)";

/// How to load.
#[derive(Debug, Clone)]
pub struct Sd3LoadOptions {
    /// Weight dtype; `None` means F32 on the CPU and F16 on GPUs.
    pub dtype: Option<DType>,
    /// Where the weights go.
    pub device: Device,
    /// A diffusers SD 3.x folder supplying what a single file lacks (text encoders, VAE, tokenizers, configs,
    /// scheduler), as diffusers' `from_single_file(config=…)`.
    pub components: Option<PathBuf>,
    /// Scheduler settings; `None` reads `scheduler/scheduler_config.json` or uses SD 3.5's (shift 3).
    pub scheduler: Option<FlowMatchConfig>,
    /// Load T5-XXL when the files have it (`false` saves its ≈ 9 GB in F16; prompts then lose T5's tokens,
    /// as diffusers' `text_encoder_3=None`).
    pub t5: bool,
    /// LoRAs merged into the MMDiT as it loads (text-encoder modules in them are reported unmatched).
    pub loras: Vec<Sd3Lora>,
}

impl Default for Sd3LoadOptions {
    fn default() -> Self {
        Self { dtype: None, device: Device::Cpu, components: None, scheduler: None, t5: true, loras: Vec::new() }
    }
}

impl Sd3LoadOptions {
    /// The dtype the weights will be loaded as.
    pub fn resolved_dtype(&self) -> Result<DType> {
        let dtype = self.dtype.unwrap_or(if self.device.is_cpu() { DType::F32 } else { DType::F16 });
        match dtype {
            DType::F32 | DType::F16 | DType::BF16 => Ok(dtype),
            other => Err(Error::UnsupportedDtype { dtype: other, reason: "use F32, F16 or BF16".into() }),
        }
    }
}

/// Where one component's weights are (shared with the other families that load split files).
pub use sd_models::split::Part;

/// Where every component comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sd3Files {
    /// The MMDiT.
    pub transformer: Part,
    /// The 16-channel autoencoder.
    pub vae: Part,
    /// CLIP-L.
    pub clip_l: Part,
    /// OpenCLIP bigG.
    pub clip_g: Part,
    /// T5-XXL, when there is one.
    pub t5: Option<Part>,
    /// A folder with diffusers' `tokenizer/`, `tokenizer_2/`, `tokenizer_3/`; `None` uses the bundled CLIP
    /// vocabulary (a T5 then needs `tokenizer_3/` from somewhere: see the loader's "not found" hint).
    pub tokenizers: Option<PathBuf>,
    /// A diffusers folder whose component `config.json` files describe file parts (tiny or custom models;
    /// without it the architectures are read off the tensor shapes).
    pub configs: Option<PathBuf>,
    /// `scheduler_config.json`, if any.
    pub scheduler_config: Option<PathBuf>,
}

fn file_names(path: &Path) -> Result<Vec<String>> {
    let st = mmap(&[path.to_path_buf()], path)?;
    Ok(st.tensors().into_iter().map(|(n, _)| n).collect())
}

impl Sd3Files {
    /// The components of a diffusers SD 3.x folder (`text_encoder_3/` optional).
    pub fn folder(dir: &Path) -> Result<Self> {
        if dir.join("unet").is_dir() {
            return Err(Error::NotSd3 { path: dir.to_path_buf(), reason: "this is a Stable Diffusion 1.x/2.x/XL folder (unet/)".into() });
        }
        let need = |sub: &str| -> Result<Part> {
            let p = dir.join(sub);
            if p.is_dir() {
                Ok(Part::Folder(p))
            } else {
                Err(Error::NotFound { what: format!("{sub}/ folder"), path: p, hint: HINT.into() })
            }
        };
        let sched = dir.join("scheduler").join("scheduler_config.json");
        Ok(Self {
            transformer: need("transformer")?,
            vae: need("vae")?,
            clip_l: need("text_encoder")?,
            clip_g: need("text_encoder_2")?,
            t5: dir.join("text_encoder_3").is_dir().then(|| Part::Folder(dir.join("text_encoder_3"))),
            tokenizers: Some(dir.to_path_buf()),
            configs: Some(dir.to_path_buf()),
            scheduler_config: sched.is_file().then_some(sched),
        })
    }

    /// The components of a single file: those it contains, the rest from split files beside it (`clip_l*`,
    /// `clip_g*`, `t5xxl*` and `*vae*` `.safetensors`, in its folder or in ComfyUI's sibling `text_encoders/`,
    /// `clip/` and `vae/` folders) or else from `components` (a diffusers SD 3.x folder, which also gives the
    /// tokenizers, scheduler and the configs of tiny or custom architectures).
    pub fn single_file(path: &Path, components: Option<&Path>) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::NotFound { what: "SD 3.x checkpoint".into(), path: path.to_path_buf(), hint: HINT.into() });
        }
        let names = file_names(path)?;
        let has = |prefix: &str| names.iter().any(|n| n.starts_with(prefix));
        if !crate::detect::names_are_sd3(names.iter().map(String::as_str)) {
            return Err(Error::NotSd3 { path: path.to_path_buf(), reason: describe_foreign(&names) });
        }
        let parent = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let up = parent.parent().map(Path::to_path_buf).unwrap_or_default();
        let (encoder_dirs, vae_dirs) = sd_models::split::sibling_dirs(path);
        let comp = |sub: &str| components.map(|c| c.join(sub)).filter(|p| p.is_dir());
        let part = |prefix: &str, sub: &str, dirs: &[PathBuf], pick: &dyn Fn(&str) -> bool| -> Option<Part> {
            if has(prefix) {
                return Some(Part::File { path: path.to_path_buf(), prefix: prefix.to_string() });
            }
            // Split files beside the model are what the user keeps with it; a components folder fills in.
            sd_models::split::find_sibling(dirs, path, pick).map(|f| Part::File { path: f, prefix: String::new() }).or_else(|| comp(sub).map(Part::Folder))
        };
        let missing = |what: &str| Error::NotFound { what: what.into(), path: path.to_path_buf(), hint: HINT.into() };
        let vae = part(VAE_PREFIX, "vae", &vae_dirs, &|s| s.contains("vae") || s == "ae").ok_or_else(|| missing("the VAE"))?;
        let clip_l = part(CLIP_L_PREFIX, "text_encoder", &encoder_dirs, &|s| s.starts_with("clip_l")).ok_or_else(|| missing("CLIP-L (clip_l.safetensors)"))?;
        let clip_g = part(CLIP_G_PREFIX, "text_encoder_2", &encoder_dirs, &|s| s.starts_with("clip_g")).ok_or_else(|| missing("CLIP-G (clip_g.safetensors)"))?;
        let t5 = part(T5_PREFIX, "text_encoder_3", &encoder_dirs, &|s| s.starts_with("t5xxl"));
        let tokenizers = components.map(Path::to_path_buf).filter(|c| c.join("tokenizer").is_dir()).or_else(|| {
            [parent.clone(), up.clone()].into_iter().find(|d| d.join("tokenizer_3").is_dir() || d.join("tokenizer").is_dir())
        });
        let sched = components.map(|c| c.join("scheduler").join("scheduler_config.json")).filter(|p| p.is_file());
        Ok(Self {
            transformer: Part::File { path: path.to_path_buf(), prefix: if has(MMDIT_PREFIX) { MMDIT_PREFIX.into() } else { String::new() } },
            vae,
            clip_l,
            clip_g,
            t5,
            tokenizers,
            configs: components.map(Path::to_path_buf),
            scheduler_config: sched,
        })
    }
}

/// Explains what a non-SD3 weights file seems to be, given its tensor names.
fn describe_foreign(names: &[String]) -> String {
    let has = |p: &str| names.iter().any(|n| n.contains(p));
    if has("double_blocks.") || has("single_transformer_blocks.") {
        "this is a FLUX transformer; load it as a FLUX model".into()
    } else if has("input_blocks.") || has("down_blocks.0.resnets.") {
        "this is a Stable Diffusion 1.x/2.x/XL checkpoint (UNet)".into()
    } else if has("lora_") || has(".lora_A") || has(".lora.down") {
        "this is a LoRA, not a model".into()
    } else {
        let examples: Vec<&str> = names.iter().take(3).map(String::as_str).collect();
        format!("no joint_blocks.* (Stability) or pos_embed.proj/transformer_blocks.* (diffusers) tensors; found e.g. {examples:?}")
    }
}

/// Maps safetensors files read-only.
pub(crate) fn mmap(files: &[PathBuf], what: &Path) -> Result<MmapedSafetensors> {
    for f in files {
        if !f.is_file() {
            return Err(Error::NotFound { what: "weights file".into(), path: f.clone(), hint: "check the path".into() });
        }
    }
    // SAFETY: read-only mapping; like every mmap-based loader we rely on the files not being truncated by
    // another process while they are mapped.
    unsafe { MmapedSafetensors::multi(files) }.map_err(|e| Error::NotSd3 {
        path: what.to_path_buf(),
        reason: format!("not a valid safetensors file ({}); re-download it, it may be truncated", innermost(&e)),
    })
}

fn folder_weights(dir: &Path) -> Result<MmapedSafetensors> {
    let files = sd_models::diffusers::find_weight_files(dir, false)?;
    mmap(&files, dir)
}

/// `vb` at `prefix` (`text_encoders.clip_l.transformer.` → `vb.pp("text_encoders.clip_l.transformer")`).
fn at<'a>(vb: VarBuilder<'a>, prefix: &str) -> VarBuilder<'a> {
    let p = prefix.trim_end_matches('.');
    if p.is_empty() {
        vb
    } else {
        vb.pp(p)
    }
}

fn bad(source: &Path, what: &str, e: candle_core::Error) -> Error {
    Error::BadWeights { source_desc: source.display().to_string(), reason: format!("{what}: {}", innermost(&e)) }
}

/// Loads the MMDiT from a diffusers `transformer/` folder, or a file with Stability's (optionally prefixed) or
/// diffusers' names. `configs` is a diffusers folder whose `transformer/config.json` describes a file.
pub fn load_transformer(part: &Part, configs: Option<&Path>, dtype: DType, device: &Device) -> Result<Mmdit> {
    Ok(load_transformer_with_loras(part, configs, dtype, device, &[])?.0)
}

/// [`load_transformer`] with `loras` merged into the weights as they load, returning what each adapter matched.
pub fn load_transformer_with_loras(
    part: &Part,
    configs: Option<&Path>,
    dtype: DType,
    device: &Device,
    loras: &[Sd3Lora],
) -> Result<(Mmdit, Vec<AdapterReport>)> {
    let (st, source) = match part {
        Part::Folder(dir) => (folder_weights(dir)?, dir.clone()),
        Part::File { path, .. } => (mmap(std::slice::from_ref(path), path)?, path.clone()),
    };
    let src = source.display().to_string();
    let names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
    let config_file = match part {
        Part::Folder(dir) => Some(dir.join("config.json")),
        Part::File { .. } => configs.map(|c| c.join("transformer").join("config.json")),
    }
    .filter(|p| p.is_file());
    let given = config_file.as_deref().map(Sd3Config::from_file).transpose()?;
    let diffusers_names = names.iter().any(|n| n == "pos_embed.proj.weight");
    let (vb, cfg, reports) = if diffusers_names {
        let layers = count_diffusers_blocks(names.iter().map(String::as_str));
        let backend = diffusers_backend(st, layers, src.clone());
        let cfg = match given {
            Some(c) => c,
            None => Sd3Config::from_shapes(&|n| backend.shape_of(n), layers, &src).map_err(|reason| Error::BadWeights { source_desc: src.clone(), reason })?,
        };
        // The renaming backend serves Stability names: the LoRA merge wraps it and sees those.
        let (backend, reports) = wrap_backend(Box::new(backend), &cfg, "", loras)?;
        (VarBuilder::from_backend(backend, dtype, device.clone()), cfg, reports)
    } else {
        let prefix = if names.iter().any(|n| n.starts_with(MMDIT_PREFIX)) { MMDIT_PREFIX } else { "" };
        if !names.iter().any(|n| n.starts_with(&format!("{prefix}joint_blocks."))) {
            return Err(Error::NotSd3 { path: source.clone(), reason: describe_foreign(&names) });
        }
        let layers = count_blocks(names.iter().filter(|n| n.starts_with(prefix)).map(String::as_str));
        let cfg = match given {
            Some(c) => c,
            None => Sd3Config::from_shapes(&|n| st.get(&format!("{prefix}{n}")).ok().map(|v| v.shape().to_vec()), layers, &src)
                .map_err(|reason| Error::BadWeights { source_desc: src.clone(), reason })?,
        };
        let (backend, reports) = wrap_backend(Box::new(MappedWeights::new(st)), &cfg, prefix, loras)?;
        (at(VarBuilder::from_backend(backend, dtype, device.clone()), prefix), cfg, reports)
    };
    let model = Mmdit::new(&cfg, vb).map_err(|e| {
        // A LoRA update that does not fit its weight surfaces here: name the LoRA, not the checkpoint.
        let msg = innermost(&e).to_string();
        match loras.iter().find(|l| msg.contains(&l.path.display().to_string())) {
            Some(l) => {
                let reason = msg.strip_prefix(&format!("LoRA {}: ", l.path.display())).unwrap_or(&msg);
                Error::LoraMismatch { path: l.path.clone(), reason: format!("{reason} (while merging it into {src})") }
            }
            None => bad(&source, "MMDiT", e),
        }
    })?;
    tracing::info!(layers = cfg.num_layers, width = cfg.hidden(), qk_norm = cfg.qk_norm, dual = cfg.dual_attention_layers.len(), loras = loras.len(), "loaded the SD 3.x MMDiT from {src}");
    Ok((model, reports))
}

/// The SD 3.x autoencoder config (`stabilityai/stable-diffusion-3.5-medium/vae/config.json`), for VAE files,
/// which carry none.
pub fn sd3_vae_config() -> VaeConfig {
    VaeConfig::sd3()
}

/// Loads the VAE from a diffusers `vae/` folder or a file (diffusers, LDM or `first_stage_model.*` names).
pub fn load_vae(part: &Part, configs: Option<&Path>, dtype: DType, device: &Device) -> Result<AutoencoderKL> {
    let cfg = match configs.map(|c| c.join("vae").join("config.json")).filter(|p| p.is_file()) {
        Some(p) => sd_models::diffusers::read_vae_config(&p)?,
        None => sd3_vae_config(),
    };
    let (vae, cfg) = sd_models::vae::load_vae_weights(part.path(), &cfg, dtype, device)?;
    if cfg.latent_channels != 16 {
        return Err(Error::NotSd3 {
            path: part.path().to_path_buf(),
            reason: format!("this VAE has {} latent channels; SD 3.x needs its 16-channel autoencoder", cfg.latent_channels),
        });
    }
    Ok(vae)
}

/// Loads a CLIP text encoder (with projection) from a transformers folder or a file; `config_dir` is a folder
/// whose `config.json` describes a file part.
pub fn load_clip(part: &Part, config_dir: Option<&Path>, dtype: DType, device: &Device) -> Result<ClipTextModel> {
    let (st, source, prefix, cfg_file) = match part {
        Part::Folder(dir) => (folder_weights(dir)?, dir.clone(), String::new(), Some(dir.join("config.json"))),
        Part::File { path, prefix } => (mmap(std::slice::from_ref(path), path)?, path.clone(), prefix.clone(), config_dir.map(|d| d.join("config.json"))),
    };
    let cfg = match cfg_file.filter(|p| p.is_file()) {
        Some(p) => sd_models::diffusers::read_clip_config(&p)?,
        None => {
            let names: Vec<String> = st.tensors().into_iter().filter_map(|(n, _)| n.strip_prefix(prefix.as_str()).map(str::to_string)).collect();
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            clip_config_from_shapes(&|n| st.get(&format!("{prefix}{n}")).ok().map(|v| v.shape().to_vec()), &refs, &source.display().to_string())?
        }
    };
    let vb = at(VarBuilder::from_backend(Box::new(MappedWeights::new(st)), dtype, device.clone()), &prefix);
    ClipTextModel::new(vb, &cfg).map_err(|e| bad(&source, "CLIP text encoder", e))
}

/// Loads T5-XXL from a transformers folder or a file (F16 becomes BF16: T5 overflows in F16).
pub fn load_t5(part: &Part, config_dir: Option<&Path>, dtype: DType, device: &Device) -> Result<T5Encoder> {
    let (st, source, prefix, cfg_file) = match part {
        Part::Folder(dir) => (folder_weights(dir)?, dir.clone(), String::new(), Some(dir.join("config.json"))),
        Part::File { path, prefix } => (mmap(std::slice::from_ref(path), path)?, path.clone(), prefix.clone(), config_dir.map(|d| d.join("config.json"))),
    };
    let cfg: T5Config = match cfg_file.filter(|p| p.is_file()) {
        Some(p) => {
            let text = std::fs::read_to_string(&p).map_err(|source| Error::Io { path: p.clone(), source })?;
            serde_json::from_str(&text).map_err(|e| Error::InvalidConfig { path: p.clone(), reason: format!("{e}; expected a transformers T5 config") })?
        }
        None => {
            let names: Vec<String> = st.tensors().into_iter().filter_map(|(n, _)| n.strip_prefix(prefix.as_str()).map(str::to_string)).collect();
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            sd_models::t5::config_from_shapes(&|n| st.get(&format!("{prefix}{n}")).ok().map(|v| v.shape().to_vec()), &refs, &source.display().to_string())?
        }
    };
    let dtype = if dtype == DType::F16 { DType::BF16 } else { dtype };
    let vb = at(VarBuilder::from_backend(Box::new(MappedWeights::new(st)), dtype, device.clone()), &prefix);
    T5Encoder::new(vb, &cfg).map_err(|e| bad(&source, "T5 encoder", e))
}

/// Every component of a loaded SD 3.x model.
pub struct Sd3Models {
    /// Which model it is (defaults, names).
    pub variant: Sd3Variant,
    /// The MMDiT.
    pub transformer: Mmdit,
    /// The text encoders and tokenizers.
    pub text: TextEncoders,
    /// The 16-channel autoencoder.
    pub vae: AutoencoderKL,
    /// Flow-matching schedule settings.
    pub scheduler: FlowMatchConfig,
    /// dtype of the transformer's activations and the text embeddings.
    pub dtype: DType,
    /// dtype the MMDiT's weights were loaded as (bf16 weights run with F32 activations on the CPU).
    pub weight_dtype: DType,
    /// Device of every component.
    pub device: Device,
    /// Where each component came from (LoRA changes reload the MMDiT from here).
    pub files: Sd3Files,
    /// What each LoRA of [`Sd3LoadOptions::loras`] matched (empty without LoRAs).
    pub lora_report: Vec<AdapterReport>,
}

impl std::fmt::Debug for Sd3Models {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sd3Models")
            .field("variant", &self.variant)
            .field("t5", &self.text.t5.is_some())
            .field("dtype", &self.dtype)
            .field("device", &self.device)
            .field("loras", &self.lora_report.len())
            .finish_non_exhaustive()
    }
}

// Loaded models are handed to engine threads; keep that a compile-time guarantee.
const _: fn() = || {
    fn assert<T: Send + Sync>() {}
    assert::<Sd3Models>();
};

impl Sd3Models {
    /// Image pixels per latent pixel (8 for SD 3.x).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.scale_factor()
    }
}

/// Whether a file or folder name says "turbo" (all that tells SD 3.5 Large Turbo from Large).
fn named_turbo(path: &Path) -> bool {
    path.components().rev().take(3).any(|c| c.as_os_str().to_string_lossy().to_ascii_lowercase().contains("turbo"))
}

/// Loads a diffusers folder or a single file (see [`Sd3Files::single_file`] for where a file's missing parts
/// are looked for).
pub fn load(path: &Path, opts: &Sd3LoadOptions) -> Result<Sd3Models> {
    let files = if path.is_dir() { Sd3Files::folder(path)? } else { Sd3Files::single_file(path, opts.components.as_deref())? };
    load_files(&files, opts, named_turbo(path))
}

/// Loads every component from `files`; `turbo` marks a Large-style model as Large Turbo.
pub fn load_files(files: &Sd3Files, opts: &Sd3LoadOptions, turbo: bool) -> Result<Sd3Models> {
    let dtype = opts.resolved_dtype()?;
    let device = &opts.device;
    let configs = files.configs.as_deref();
    // The MMDiT first: it tells a foreign file apart before anything heavy.
    let (transformer, lora_report) = load_transformer_with_loras(&files.transformer, configs, dtype, device, &opts.loras)?;
    // On the CPU the MMDiT and T5 keep half-precision weights (their dense layers multiply them panel by
    // panel in F32 and their activations are F32; T5's F16 is stored as BF16, see `load_t5`), which keeps
    // T5-XXL at 9.5 GB instead of 19. CLIP-L/G keep BF16 too (1.5 GB instead of 3.1; they compute in BF16,
    // as diffusers' bf16 pipeline does, and their outputs are widened to F32 before use); F16 CLIP on the
    // CPU loads in F32. The VAE loads in F32 on the CPU: candle has no half-precision CPU convolution.
    let dtype_rest = if device.is_cpu() { DType::F32 } else { dtype };
    let dtype_t5 = if device.is_cpu() && !matches!(dtype, DType::BF16 | DType::F16) { DType::F32 } else { dtype };
    let dtype_clip = if device.is_cpu() && dtype != DType::BF16 { DType::F32 } else { dtype };
    let sub = |name: &str| configs.map(|c| c.join(name)).filter(|p| p.is_dir());
    let clip_l = load_clip(&files.clip_l, sub("text_encoder").as_deref(), dtype_clip, device)?;
    let clip_g = load_clip(&files.clip_g, sub("text_encoder_2").as_deref(), dtype_clip, device)?;
    let tok_dir = |name: &str| files.tokenizers.as_ref().map(|d| d.join(name)).filter(|p| p.is_dir());
    let tokenizer_l = match tok_dir("tokenizer") {
        Some(d) => ClipTokenizer::from_folder(&d)?,
        None => ClipTokenizer::bundled(PadToken::EndOfText)?,
    };
    let tokenizer_g = match tok_dir("tokenizer_2") {
        Some(d) => ClipTokenizer::from_folder(&d)?,
        None => ClipTokenizer::bundled(PadToken::Exclamation)?,
    };
    let (t5, t5_tokenizer): (Option<T5Encoder>, Option<Tokenizer>) = match (&files.t5, opts.t5) {
        (Some(part), true) => {
            let tok = tok_dir("tokenizer_3").ok_or_else(|| Error::NotFound {
                what: "T5 tokenizer (tokenizer_3/)".into(),
                path: files.tokenizers.clone().unwrap_or_else(|| part.path().to_path_buf()),
                hint: "download tokenizer_3/ from stabilityai/stable-diffusion-3.5-medium and put it beside the model (or give --model-config an SD 3.x diffusers folder), or load without T5".into(),
            })?;
            (Some(load_t5(part, sub("text_encoder_3").as_deref(), dtype_t5, device)?), Some(sd_models::t5::load_tokenizer(&tok)?))
        }
        (None, true) => {
            tracing::warn!("no T5-XXL encoder found; SD 3.x runs without it (its prompt tokens are zeros), which follows prompts less closely");
            (None, None)
        }
        (_, false) => (None, None),
    };
    let vae = load_vae(&files.vae, configs, dtype_rest, device)?;
    let scheduler = match (&opts.scheduler, &files.scheduler_config) {
        (Some(s), _) => {
            s.check().map_err(|reason| Error::InvalidConfig { path: "Sd3LoadOptions::scheduler".into(), reason })?;
            s.clone()
        }
        (None, Some(p)) => FlowMatchConfig::from_file(p)?,
        (None, None) => sd35_scheduler(),
    };
    let variant = Sd3Variant::of(transformer.config(), turbo);
    Ok(Sd3Models {
        variant,
        text: TextEncoders { clip_l, clip_g, t5, tokenizer_l, tokenizer_g, t5_tokenizer },
        vae,
        scheduler,
        dtype: transformer.dtype(),
        weight_dtype: dtype,
        device: device.clone(),
        transformer,
        files: files.clone(),
        lora_report,
    })
}

/// SD 3.x's `scheduler_config.json`: flow matching with a static shift of 3.
pub fn sd35_scheduler() -> FlowMatchConfig {
    FlowMatchConfig { shift: 3.0, use_dynamic_shifting: false, ..FlowMatchConfig::dev() }
}

/// Loads a diffusers-format SD 3.x repo (e.g. `stabilityai/stable-diffusion-3.5-medium`) from the Hugging Face
/// hub, downloading only the pipeline's files into the hub cache (or, offline, reading them from there).
#[cfg(feature = "hub")]
pub fn load_from_hub(model: &sd_models::hub::HubModel, hub: &sd_models::hub::HubOptions, opts: &Sd3LoadOptions) -> Result<Sd3Models> {
    let path = sd_models::hub::download(model, hub)?;
    load(&path, opts)
}
