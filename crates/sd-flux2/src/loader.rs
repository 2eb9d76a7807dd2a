//! Loading every FLUX.2 [klein] component into one [`Flux2Models`], from the layouts people download: a
//! diffusers `Flux2KleinPipeline` folder, BFL's single transformer file (`flux-2-klein-4b.safetensors`:
//! original names, bf16), and ComfyUI's split files (the diffusion model under `model.diffusion_model.`, in
//! bf16, fp8 or fp8-scaled, with `qwen_3_4b.safetensors` / `qwen_3_8b.safetensors` and `flux2-vae.safetensors`
//! beside it or in ComfyUI's sibling `text_encoders/` and `vae/` folders). What a file lacks (the tokenizer,
//! configs of tiny or custom models, the scheduler) comes from a components folder, a diffusers klein folder.

use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use sd_core::schedulers::flow_match::FlowMatchConfig;
use sd_lora::AdapterReport;
use sd_models::qwen3::Qwen3Encoder;
use sd_models::single_file::innermost;
use sd_models::split::{count_blocks, find_sibling, sibling_dirs};
use sd_models::weights::MappedWeights;
use tokenizers::Tokenizer;

pub use sd_models::split::Part;

use crate::config::{read_json, Flux2Config};
use crate::error::{Error, Result};
use crate::keymap::diffusers_backend;
use crate::lora::{wrap_backend, Flux2Lora};
use crate::model::Flux2Transformer;
use crate::text::{load_text_encoder, load_tokenizer, OUT_LAYERS};
use crate::vae::{load_vae, Flux2Vae};

/// The prefix of ComfyUI's diffusion-model files.
const COMFY_PREFIX: &str = "model.diffusion_model.";

/// What to download when a component is missing.
const HINT: &str = "FLUX.2 [klein] needs the transformer, the Qwen3 text encoder, the FLUX.2 VAE and Qwen's tokenizer: pass a diffusers \
                    folder (black-forest-labs/FLUX.2-klein-4B), or put qwen_3_4b.safetensors (text_encoders/) and flux2-vae.safetensors \
                    (vae/) beside the diffusion model and give --model-config a diffusers FLUX.2 [klein] folder for the tokenizer";

/// Which klein: the step-distilled models (guidance-free, 4 steps) or the base models (CFG).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Flux2Variant {
    /// FLUX.2 [klein] 4B / 9B: step-distilled (`is_distilled: true`); guidance is ignored, 4 steps.
    Klein,
    /// FLUX.2 [klein] base 4B / 9B: classifier-free guidance with the empty prompt (pipeline defaults:
    /// 50 steps, guidance 4.0).
    KleinBase,
}

impl Flux2Variant {
    /// The variant a single file's name says: `base` in it (`flux-2-klein-base-4b.safetensors`) is the base
    /// model, anything else the distilled one BFL names `flux-2-klein-4b.safetensors`.
    pub fn from_file_name(path: &Path) -> Self {
        let stem = path.file_stem().map(|s| s.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
        if stem.contains("base") {
            Flux2Variant::KleinBase
        } else {
            Flux2Variant::Klein
        }
    }

    /// `klein` or `klein-base`.
    pub fn name(self) -> &'static str {
        match self {
            Flux2Variant::Klein => "klein",
            Flux2Variant::KleinBase => "klein-base",
        }
    }

    /// Whether the model is step-distilled (the pipeline's `is_distilled`: no CFG).
    pub fn is_distilled(self) -> bool {
        self == Flux2Variant::Klein
    }

    /// Default steps (the klein model card: 4; `Flux2KleinPipeline`'s default: 50).
    pub fn default_steps(self) -> usize {
        match self {
            Flux2Variant::Klein => 4,
            Flux2Variant::KleinBase => 50,
        }
    }

    /// Default guidance (the klein model card: 1.0, i.e. none; `Flux2KleinPipeline`'s default: 4.0).
    pub fn default_guidance(self) -> f64 {
        match self {
            Flux2Variant::Klein => 1.0,
            Flux2Variant::KleinBase => 4.0,
        }
    }
}

/// FLUX.2 [klein]'s `scheduler_config.json` (dynamic shifting; the pipeline passes its own `mu`).
pub fn default_scheduler() -> FlowMatchConfig {
    FlowMatchConfig { shift: 3.0, use_dynamic_shifting: true, base_shift: Some(0.5), max_shift: Some(1.15), ..FlowMatchConfig::dev() }
}

/// How to load.
#[derive(Debug, Clone)]
pub struct Flux2LoadOptions {
    /// Weight dtype; `None` means F32 on the CPU and BF16 on GPUs (klein ships in BF16).
    pub dtype: Option<DType>,
    /// Where the weights go.
    pub device: Device,
    /// Distilled or base; `None` reads `is_distilled` from `model_index.json` (absent: base, the
    /// pipeline's default).
    pub variant: Option<Flux2Variant>,
    /// Scheduler settings; `None` reads `scheduler/scheduler_config.json` or uses klein's.
    pub scheduler: Option<FlowMatchConfig>,
    /// For a single file: a diffusers FLUX.2 [klein] folder supplying what the file lacks (tokenizer, text
    /// encoder and VAE when none lie beside it, configs, scheduler), as diffusers' `from_single_file(config=…)`.
    pub components: Option<PathBuf>,
    /// LoRAs merged into the transformer as it loads.
    pub loras: Vec<Flux2Lora>,
}

impl Default for Flux2LoadOptions {
    fn default() -> Self {
        Self { dtype: None, device: Device::Cpu, variant: None, scheduler: None, components: None, loras: Vec::new() }
    }
}

impl Flux2LoadOptions {
    /// The dtype the weights will be loaded as.
    pub fn resolved_dtype(&self) -> Result<DType> {
        let dtype = self.dtype.unwrap_or(if self.device.is_cpu() { DType::F32 } else { DType::BF16 });
        match dtype {
            DType::F32 | DType::F16 | DType::BF16 => Ok(dtype),
            other => Err(Error::UnsupportedDtype { dtype: other, reason: "use F32, F16 or BF16".into() }),
        }
    }
}

/// Every loaded component.
#[derive(Debug, Clone)]
pub struct Flux2Models {
    /// The transformer.
    pub transformer: Flux2Transformer,
    /// The Qwen3 text encoder (its first 27 layers).
    pub text_encoder: Qwen3Encoder,
    /// The Qwen tokenizer.
    pub tokenizer: Tokenizer,
    /// Where each component came from (LoRA changes reload the transformer from here).
    pub files: Flux2Files,
    /// What each LoRA of [`Flux2LoadOptions::loras`] matched (empty without LoRAs).
    pub lora_report: Vec<AdapterReport>,
    /// The autoencoder and its latent statistics.
    pub vae: Flux2Vae,
    /// Scheduler settings.
    pub scheduler: FlowMatchConfig,
    /// Distilled or base.
    pub variant: Flux2Variant,
    /// The text encoder's hidden states the prompt features stack (9, 18, 27).
    pub text_layers: Vec<usize>,
    /// Where the transformer runs.
    pub device: Device,
}

impl Flux2Models {
    /// Image pixels per VAE latent pixel (8 for FLUX.2; a latent token covers 2× that).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.scale_factor()
    }
}

/// The parts of `model_index.json` the loader reads.
#[derive(serde::Deserialize)]
struct ModelIndex {
    #[serde(rename = "_class_name", default)]
    class_name: String,
    #[serde(default)]
    is_distilled: bool,
}

/// Where every component comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flux2Files {
    /// The transformer: a diffusers `transformer/` folder or a file (BFL or diffusers names, optionally
    /// under ComfyUI's `model.diffusion_model.`).
    pub transformer: Part,
    /// The Qwen3 text encoder: a `text_encoder/` folder or a stand-alone file.
    pub text_encoder: Part,
    /// The FLUX.2 autoencoder: a `vae/` folder or a file (BFL's original or diffusers' names, with the
    /// batch-norm statistics `bn.running_mean` / `bn.running_var`).
    pub vae: Part,
    /// A `tokenizer/` folder (or its `tokenizer.json`).
    pub tokenizer: PathBuf,
    /// A diffusers folder whose component `config.json` files describe file parts (without it the
    /// architectures are read off the tensor shapes).
    pub configs: Option<PathBuf>,
    /// `scheduler_config.json`, if any.
    pub scheduler_config: Option<PathBuf>,
    /// Distilled or base, as the folder's `model_index.json` or the file's name says.
    pub variant: Flux2Variant,
}

fn sub(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// Maps safetensors files read-only.
pub(crate) fn mmap(files: &[PathBuf], what: &Path) -> Result<MmapedSafetensors> {
    for f in files {
        if !f.is_file() {
            return Err(Error::NotFound { what: "weights file".into(), path: f.clone(), hint: HINT.into() });
        }
    }
    // SAFETY: read-only mapping; like every mmap-based loader we rely on the files not being truncated by
    // another process while they are mapped.
    unsafe { MmapedSafetensors::multi(files) }.map_err(|e| Error::NotFlux2 {
        path: what.to_path_buf(),
        reason: format!("not a valid safetensors file ({}); re-download it, it may be truncated", innermost(&e)),
    })
}

/// Whether tensor names are a FLUX.2 transformer's (BFL or diffusers names, with or without a prefix): its
/// modulation is shared by all blocks (`double_stream_modulation_img`), where FLUX.1 modulates per block
/// (`double_blocks.N.img_mod`).
pub fn names_are_flux2<'a>(names: impl IntoIterator<Item = &'a str>) -> bool {
    names.into_iter().any(|n| n.contains("double_stream_modulation_img."))
}

/// Explains what a non-FLUX.2 weights file seems to be, given its tensor names.
pub(crate) fn describe_foreign(names: &[String]) -> String {
    let has = |p: &str| names.iter().any(|n| n.contains(p));
    if has("double_blocks.") || has("single_transformer_blocks.") {
        "this is a FLUX.1 transformer (per-block img_mod modulation); load it as a FLUX model".into()
    } else if has("joint_blocks.") {
        "this is an SD 3.x MMDiT; load it as an SD 3 model".into()
    } else if has("noise_refiner.") || has("cap_embedder.") {
        "this is a Z-Image transformer; load it as a Z-Image model".into()
    } else if has("input_blocks.") || has("down_blocks.0.resnets.") {
        "this is a Stable Diffusion checkpoint (UNet)".into()
    } else if has("lora_") || has(".lora_A") || has(".lora.down") {
        "this is a LoRA, not a model; pass it as a LoRA".into()
    } else if has("encoder.down.") || has("decoder.up.") || has("decoder.up_blocks.") {
        "this is an autoencoder; put it beside the diffusion model (or in ComfyUI's vae/ folder)".into()
    } else if has("embed_tokens.") {
        "this is a text encoder; put it beside the diffusion model (or in ComfyUI's text_encoders/ folder)".into()
    } else {
        let examples: Vec<&str> = names.iter().take(3).map(String::as_str).collect();
        format!("no double_stream_modulation_img / double_blocks.* tensors of a FLUX.2 transformer; found e.g. {examples:?}")
    }
}

impl Flux2Files {
    /// The components of a diffusers `Flux2KleinPipeline` folder.
    pub fn folder(path: &Path) -> Result<Self> {
        let index_path = path.join("model_index.json");
        let index: Option<ModelIndex> = if index_path.is_file() { Some(read_json(&index_path)?) } else { None };
        if let Some(ix) = &index {
            if !ix.class_name.starts_with("Flux2Klein") {
                return Err(Error::NotFlux2 {
                    path: path.to_path_buf(),
                    reason: format!("model_index.json names {:?}; this crate runs Flux2KleinPipeline folders (FLUX.2 [dev] with its Mistral encoder is not supported)", ix.class_name),
                });
            }
        }
        let sched = path.join("scheduler").join("scheduler_config.json");
        Ok(Self {
            transformer: Part::Folder(sub(path, "transformer")),
            text_encoder: Part::Folder(sub(path, "text_encoder")),
            vae: Part::Folder(sub(path, "vae")),
            tokenizer: sub(path, "tokenizer"),
            configs: Some(path.to_path_buf()),
            scheduler_config: sched.is_file().then_some(sched),
            variant: if index.as_ref().is_some_and(|i| i.is_distilled) { Flux2Variant::Klein } else { Flux2Variant::KleinBase },
        })
    }

    /// The components of a transformer file: the Qwen3 text encoder (`qwen*.safetensors`) and the VAE
    /// (`*vae*.safetensors`) found beside it or in ComfyUI's sibling `text_encoders/`, `clip/` and `vae/`
    /// folders, else in `components` (a diffusers FLUX.2 [klein] folder, which also gives the tokenizer,
    /// scheduler and the configs of tiny or custom architectures).
    pub fn single_file(path: &Path, components: Option<&Path>) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::NotFound { what: "FLUX.2 [klein] transformer file".into(), path: path.to_path_buf(), hint: HINT.into() });
        }
        let names: Vec<String> = mmap(&[path.to_path_buf()], path)?.tensors().into_iter().map(|(n, _)| n).collect();
        if !names_are_flux2(names.iter().map(String::as_str)) {
            return Err(Error::NotFlux2 { path: path.to_path_buf(), reason: describe_foreign(&names) });
        }
        let prefix = if names.iter().any(|n| n.starts_with(COMFY_PREFIX)) { COMFY_PREFIX } else { "" };
        let (encoder_dirs, vae_dirs) = sibling_dirs(path);
        let comp = |name: &str| components.map(|c| c.join(name)).filter(|p| p.is_dir());
        let missing = |what: &str| Error::NotFound { what: what.into(), path: path.to_path_buf(), hint: HINT.into() };
        // Split files beside the model are what the user keeps with it; a components folder fills in.
        let text_encoder = find_sibling(&encoder_dirs, path, &|s| s.starts_with("qwen"))
            .map(Part::of)
            .or_else(|| comp("text_encoder").map(Part::Folder))
            .ok_or_else(|| missing("the Qwen3 text encoder (qwen_3_4b.safetensors)"))?;
        let vae = find_sibling(&vae_dirs, path, &|s| s.contains("vae"))
            .map(Part::of)
            .or_else(|| comp("vae").map(Part::Folder))
            .ok_or_else(|| missing("the FLUX.2 VAE (flux2-vae.safetensors)"))?;
        let parent = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let up = parent.parent().map(Path::to_path_buf).unwrap_or_default();
        let tokenizer = comp("tokenizer")
            .or_else(|| [parent.join("tokenizer"), up.join("tokenizer")].into_iter().find(|d| d.join("tokenizer.json").is_file()))
            .ok_or_else(|| missing("Qwen's tokenizer (tokenizer/tokenizer.json)"))?;
        let sched = components.map(|c| c.join("scheduler").join("scheduler_config.json")).filter(|p| p.is_file());
        Ok(Self {
            transformer: Part::File { path: path.to_path_buf(), prefix: prefix.into() },
            text_encoder,
            vae,
            tokenizer,
            configs: components.map(Path::to_path_buf),
            scheduler_config: sched,
            variant: Flux2Variant::from_file_name(path),
        })
    }
}

/// Loads a diffusers `Flux2KleinPipeline` folder (`model_index.json`, `transformer/`, `text_encoder/`,
/// `tokenizer/`, `vae/`, `scheduler/`) or a transformer file (see [`Flux2Files::single_file`] for where its
/// other components are looked for).
pub fn load(path: &Path, options: &Flux2LoadOptions) -> Result<Flux2Models> {
    let files = if path.is_dir() { Flux2Files::folder(path)? } else { Flux2Files::single_file(path, options.components.as_deref())? };
    load_files(&files, options)
}

/// Loads every component from `files`.
pub fn load_files(files: &Flux2Files, options: &Flux2LoadOptions) -> Result<Flux2Models> {
    let path = files.transformer.path();
    let variant = options.variant.unwrap_or(files.variant);
    let dtype = options.resolved_dtype()?;
    let device = &options.device;
    let configs = files.configs.as_deref();
    // The transformer first: it tells a foreign file apart before anything heavy.
    let (transformer, lora_report) = load_transformer_with_loras(&files.transformer, configs, dtype, device, &options.loras)?;
    let text_layers = OUT_LAYERS.to_vec();
    let te_config = configs.map(|c| c.join("text_encoder").join("config.json"));
    let text_encoder = load_text_encoder(&files.text_encoder, te_config.as_deref(), &text_layers, dtype, device)?;
    let width = 3 * text_encoder.config().hidden_size;
    if width != transformer.config().joint_attention_dim {
        return Err(Error::NotFlux2 {
            path: path.to_path_buf(),
            reason: format!("the text encoder gives {width}-wide features but the transformer takes {}; the components belong to different models (klein 4B uses Qwen3-4B, 9B Qwen3-8B)", transformer.config().joint_attention_dim),
        });
    }
    let tokenizer = load_tokenizer(&files.tokenizer)?;
    let vae = load_vae(&files.vae, configs, dtype, device)?;
    if 4 * vae.latent_channels() != transformer.config().in_channels {
        return Err(Error::NotFlux2 {
            path: path.to_path_buf(),
            reason: format!("the VAE has {} latent channels but the transformer takes {} (= 4 × 32 for FLUX.2)", vae.latent_channels(), transformer.config().in_channels),
        });
    }
    let scheduler = match (&options.scheduler, &files.scheduler_config) {
        (Some(s), _) => s.clone(),
        (None, Some(p)) => FlowMatchConfig::from_file(p)?,
        (None, None) => default_scheduler(),
    };
    Ok(Flux2Models {
        transformer,
        text_encoder,
        tokenizer,
        files: files.clone(),
        lora_report,
        vae,
        scheduler,
        variant,
        text_layers,
        device: device.clone(),
    })
}

/// Loads the transformer from a diffusers `transformer/` folder.
pub fn load_transformer(dir: &Path, dtype: DType, device: &Device) -> Result<Flux2Transformer> {
    Ok(load_transformer_with_loras(&Part::Folder(dir.to_path_buf()), None, dtype, device, &[])?.0)
}

/// `vb` at `prefix` (`model.diffusion_model.` → `vb.pp("model.diffusion_model")`).
fn at<'a>(vb: VarBuilder<'a>, prefix: &str) -> VarBuilder<'a> {
    let p = prefix.trim_end_matches('.');
    if p.is_empty() {
        vb
    } else {
        vb.pp(p)
    }
}

/// Loads the transformer from a diffusers `transformer/` folder or a file (BFL names, as BFL and ComfyUI
/// ship it, optionally under `model.diffusion_model.`; or diffusers names), with `loras` merged into the
/// weights as they load; returns what each adapter matched. `configs` is a diffusers folder whose
/// `transformer/config.json` describes a file; without it the architecture is read off the shapes.
pub fn load_transformer_with_loras(part: &Part, configs: Option<&Path>, dtype: DType, device: &Device, loras: &[Flux2Lora]) -> Result<(Flux2Transformer, Vec<AdapterReport>)> {
    let (st, source, prefix, config_file) = match part {
        Part::Folder(dir) => {
            let cfg_path = dir.join("config.json");
            if !cfg_path.is_file() {
                return Err(Error::NotFound { what: "transformer config.json".into(), path: cfg_path, hint: "pass the transformer/ folder of a FLUX.2 [klein] repo".into() });
            }
            let files = sd_models::diffusers::find_weight_files(dir, false)?;
            (mmap(&files, dir)?, dir.clone(), String::new(), Some(cfg_path))
        }
        Part::File { path, prefix } => {
            let cfg = configs.map(|c| c.join("transformer").join("config.json")).filter(|p| p.is_file());
            (mmap(std::slice::from_ref(path), path)?, path.clone(), prefix.clone(), cfg)
        }
    };
    let src = source.display().to_string();
    let names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
    if !names_are_flux2(names.iter().map(String::as_str)) {
        return Err(Error::NotFlux2 { path: source.clone(), reason: describe_foreign(&names) });
    }
    let given = config_file.as_deref().map(Flux2Config::from_file).transpose()?;
    let bad_cfg = |reason: String| Error::BadWeights { source_desc: src.clone(), reason, component: "FLUX.2 transformer" };
    let diffusers_names = names.iter().any(|n| n.starts_with("double_stream_modulation_img.linear."));
    let (backend, cfg): (Box<dyn SimpleBackend>, Flux2Config) = if diffusers_names {
        let backend = diffusers_backend(st, src.clone());
        let cfg = match given {
            Some(c) => c,
            None => {
                let (d, s) = (count_blocks(names.iter().map(String::as_str), "transformer_blocks."), count_blocks(names.iter().map(String::as_str), "single_transformer_blocks."));
                Flux2Config::from_bfl_shapes(&|n| backend.shape_of(n), d, s).map_err(bad_cfg)?
            }
        };
        (Box::new(backend), cfg)
    } else {
        let cfg = match given {
            Some(c) => c,
            None => {
                let ours = names.iter().filter_map(|n| n.strip_prefix(prefix.as_str()));
                let ours: Vec<&str> = ours.collect();
                let (d, s) = (count_blocks(ours.iter().copied(), "double_blocks."), count_blocks(ours.iter().copied(), "single_blocks."));
                Flux2Config::from_bfl_shapes(&|n| st.get(&format!("{prefix}{n}")).ok().map(|v| v.shape().to_vec()), d, s).map_err(bad_cfg)?
            }
        };
        (Box::new(MappedWeights::new(st)), cfg)
    };
    let weight_prefix = if diffusers_names { "" } else { prefix.as_str() };
    let (backend, reports) = wrap_backend(backend, &cfg, weight_prefix, loras)?;
    let vb = at(VarBuilder::from_backend(backend, dtype, device.clone()), weight_prefix);
    let model = Flux2Transformer::new(&cfg, vb).map_err(|e| {
        // A LoRA update that does not fit its weight surfaces here: name the LoRA, not the checkpoint.
        let msg = innermost(&e).to_string();
        match loras.iter().find(|l| msg.contains(&l.path.display().to_string())) {
            Some(l) => {
                let reason = msg.strip_prefix(&format!("LoRA {}: ", l.path.display())).unwrap_or(&msg);
                Error::LoraMismatch { path: l.path.clone(), reason: format!("{reason} (while merging it into {src})") }
            }
            None => Error::BadWeights { source_desc: src.clone(), reason: msg, component: "FLUX.2 transformer" },
        }
    })?;
    tracing::info!(double = cfg.num_layers, single = cfg.num_single_layers, width = cfg.inner_dim(), loras = loras.len(), "loaded the FLUX.2 transformer from {src}");
    Ok((model, reports))
}

/// Loads a diffusers-format FLUX.2 [klein] repo (e.g. `black-forest-labs/FLUX.2-klein-4B`) from the Hugging Face
/// hub, downloading only the pipeline's files into the hub cache (or, offline, reading them from there).
#[cfg(feature = "hub")]
pub fn load_from_hub(model: &sd_models::hub::HubModel, hub: &sd_models::hub::HubOptions, options: &Flux2LoadOptions) -> Result<Flux2Models> {
    let path = sd_models::hub::download(model, hub)?;
    load(&path, options)
}
