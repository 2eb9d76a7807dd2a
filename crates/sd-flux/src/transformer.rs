//! The FLUX transformer, dense or GGUF-quantized, loaded from any of the formats FLUX ships in.

use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::flux::model::Config;
use candle_transformers::models::flux::WithForward;
use candle_transformers::quantized_var_builder::VarBuilder as QuantizedVarBuilder;

use crate::config::{config_from_shapes, count_blocks, FluxVariant};
use crate::error::{Error, Result};
use crate::keymap::diffusers_backend;
use sd_models::weights::RenamedWeights;
use crate::lora::{wrap_backend, FluxLora};
use crate::model::{FluxModel, Weights};
use sd_lora::AdapterReport;
use sd_models::single_file::innermost;
use sd_models::weights::MappedWeights;

/// A FLUX.1 transformer ([`FluxModel`]) with dense or GGUF-quantized weights.
///
/// Both are plain data (tensors behind `Arc`s), so the enum is `Send + Sync` and can be moved into
/// an engine thread or shared across threads without any wrapper.
// One transformer exists per loaded model; boxing the larger variant would only add an indirection.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum FluxTransformer {
    /// F32/F16/BF16 weights (BFL single files and diffusers folders).
    Dense {
        /// The model.
        model: FluxModel,
        /// Its architecture, read off the weights.
        config: Config,
        /// dtype of the weights and of the activations it expects.
        dtype: DType,
    },
    /// GGUF weights (q8_0, q4_K, …); activations are F32.
    Quantized {
        /// The model.
        model: FluxModel,
        /// Its architecture, read off the weights.
        config: Config,
    },
}

// The engine moves loaded models into worker threads: keep that a compile-time guarantee.
const _: fn() = || {
    fn assert<T: Send + Sync>() {}
    assert::<FluxTransformer>();
};

impl FluxTransformer {
    /// The architecture.
    pub fn config(&self) -> &Config {
        match self {
            FluxTransformer::Dense { config, .. } | FluxTransformer::Quantized { config, .. } => config,
        }
    }

    /// Dev (guidance embedding) or schnell.
    pub fn variant(&self) -> FluxVariant {
        FluxVariant::of(self.config())
    }

    /// The dtype the inputs must have (F32 for quantized models).
    pub fn dtype(&self) -> DType {
        match self {
            FluxTransformer::Dense { dtype, .. } => *dtype,
            FluxTransformer::Quantized { .. } => DType::F32,
        }
    }

    /// Whether the weights are GGUF-quantized.
    pub fn is_quantized(&self) -> bool {
        matches!(self, FluxTransformer::Quantized { .. })
    }
}

impl WithForward for FluxTransformer {
    /// Predicts the flow velocity for packed latents `img` `[b, seq, 64]` with their ids
    /// `[b, seq, 3]`, T5 embeddings `txt` `[b, txt_seq, ctx]` and ids `[b, txt_seq, 3]`, timesteps
    /// (= sigma, `[b]`), pooled CLIP `y` `[b, vec]` and (dev) the guidance scale `[b]`.
    fn forward(
        &self,
        img: &Tensor,
        img_ids: &Tensor,
        txt: &Tensor,
        txt_ids: &Tensor,
        timesteps: &Tensor,
        y: &Tensor,
        guidance: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        match self {
            FluxTransformer::Dense { model, .. } | FluxTransformer::Quantized { model, .. } => {
                model.forward(img, img_ids, txt, txt_ids, timesteps, y, guidance)
            }
        }
    }
}

fn bad_weights(source: &Path, e: candle_core::Error) -> Error {
    Error::BadWeights { source_desc: source.display().to_string(), reason: innermost(&e).to_string() }
}

/// Maps safetensors files read-only.
pub(crate) fn mmap(files: &[std::path::PathBuf], what: &Path) -> Result<MmapedSafetensors> {
    for f in files {
        if !f.is_file() {
            return Err(Error::NotFound { what: "weights file".into(), path: f.clone(), hint: "check the path".into() });
        }
    }
    // SAFETY: read-only mapping; like every mmap-based loader we rely on the files not being
    // truncated by another process while they are mapped.
    unsafe { MmapedSafetensors::multi(files) }.map_err(|e| Error::NotFlux {
        path: what.to_path_buf(),
        reason: format!("not a valid safetensors file ({}); re-download it, it may be truncated", innermost(&e)),
    })
}

/// Whether tensor names are FLUX.2's (one modulation shared by all blocks, where FLUX.1 modulates each).
fn is_flux2(names: &[String]) -> bool {
    names.iter().any(|n| n.contains("double_stream_modulation_img."))
}

/// Explains what a non-FLUX weights file seems to be, given its tensor names.
fn describe_foreign(names: &[String]) -> String {
    let has = |p: &str| names.iter().any(|n| n.starts_with(p) || n.contains(p));
    if is_flux2(names) {
        "this is a FLUX.2 transformer (shared double_stream_modulation_img); load it as a FLUX.2 model (sd-flux2)".into()
    } else if has("model.diffusion_model.input_blocks.") || has("down_blocks.0.resnets.") {
        "this is a Stable Diffusion checkpoint (UNet input_blocks/down_blocks); load it with sd-models (sd_models::loader::load)".into()
    } else if has("lora_") || has(".lora_A") || has(".lora.down") {
        "this is a LoRA, not a transformer".into()
    } else if has("joint_blocks.") {
        "this is an SD3 MMDiT (joint_blocks.*), which sd-flux does not run".into()
    } else if has("encoder.down.") || has("decoder.up.") {
        "this is an autoencoder (pass it as the VAE, not as the transformer)".into()
    } else {
        let examples: Vec<&str> = names.iter().take(3).map(String::as_str).collect();
        format!("no double_blocks.*/single_blocks.* (BFL) or transformer_blocks.* (diffusers) tensors; found e.g. {examples:?}")
    }
}

/// Loads a FLUX transformer from a BFL `.safetensors` file, a diffusers `transformer/` folder
/// (or a pipeline folder containing one), a single diffusers-named `.safetensors` file, or a `.gguf`.
///
/// Dense weights are converted to `dtype`; GGUF models ignore it and compute in F32. `axes_dim`
/// overrides the rotary split (needed only for non-standard head sizes; folders read it from
/// `config.json`).
pub fn load_transformer(path: &Path, dtype: DType, device: &Device, axes_dim: Option<&[usize]>) -> Result<FluxTransformer> {
    Ok(load_transformer_with_loras(path, dtype, device, axes_dim, &[])?.0)
}

/// [`load_transformer`] with LoRAs merged into the weights (dense models only), returning what
/// each adapter matched.
pub fn load_transformer_with_loras(
    path: &Path,
    dtype: DType,
    device: &Device,
    axes_dim: Option<&[usize]>,
    loras: &[FluxLora],
) -> Result<(FluxTransformer, Vec<AdapterReport>)> {
    if path.is_dir() {
        let sub = path.join("transformer");
        let dir = if sub.is_dir() { sub } else { path.to_path_buf() };
        return load_diffusers_transformer(&dir, dtype, device, axes_dim, loras);
    }
    if !path.exists() {
        return Err(Error::NotFound {
            what: "FLUX transformer".into(),
            path: path.to_path_buf(),
            hint: "pass flux1-dev.safetensors / flux1-schnell.safetensors, a .gguf, or a diffusers folder".into(),
        });
    }
    let ext = path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
    match ext.as_str() {
        "gguf" if !loras.is_empty() => Err(Error::LoraMismatch {
            path: loras[0].path.clone(),
            reason: format!(
                "LoRAs cannot be merged into the quantized weights of {}; use the .safetensors transformer",
                path.display()
            ),
        }),
        "gguf" => Ok((load_gguf(path, device, axes_dim)?, Vec::new())),
        "ckpt" | "pt" | "pth" | "bin" => Err(Error::NotFlux {
            path: path.to_path_buf(),
            reason: "PyTorch pickles are not loaded (unpickling can run arbitrary code); convert it to .safetensors".into(),
        }),
        _ => load_safetensors_file(path, dtype, device, axes_dim, loras),
    }
}

/// Loads a single `.safetensors` transformer with BFL names (optionally under
/// `model.diffusion_model.`, as ComfyUI saves them) or diffusers names.
pub fn load_safetensors_file(
    path: &Path,
    dtype: DType,
    device: &Device,
    axes_dim: Option<&[usize]>,
    loras: &[FluxLora],
) -> Result<(FluxTransformer, Vec<AdapterReport>)> {
    let st = mmap(&[path.to_path_buf()], path)?;
    let names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
    if names.iter().any(|n| n == "x_embedder.weight") {
        let backend = diffusers_backend(st, path.display().to_string());
        return build_diffusers(backend, path, dtype, device, axes_dim, loras);
    }
    const PREFIX: &str = "model.diffusion_model.";
    let prefixed = names.iter().any(|n| n.starts_with(PREFIX) && n.contains("double_blocks."));
    let prefix = if prefixed { PREFIX } else { "" };
    let blocks: Vec<&str> = names.iter().filter_map(|n| n.strip_prefix(prefix)).collect();
    let depth = count_blocks(blocks.iter().copied(), "double_blocks.");
    let depth_single = count_blocks(blocks.iter().copied(), "single_blocks.");
    if depth + depth_single == 0 || is_flux2(&names) {
        return Err(Error::NotFlux { path: path.to_path_buf(), reason: describe_foreign(&names) });
    }
    let shape = |n: &str| st.get(&format!("{prefix}{n}")).ok().map(|v| v.shape().to_vec());
    let config = config_from_shapes(&shape, depth, depth_single, axes_dim, &path.display().to_string())?;
    let out = out_channels(&shape, &config);
    check_dtype(dtype)?;
    if prefixed {
        if let Some(lora) = loras.first() {
            return Err(Error::LoraMismatch {
                path: lora.path.clone(),
                reason: format!("{} is a full ComfyUI checkpoint (model.diffusion_model.*); LoRAs need the bare transformer file", path.display()),
            });
        }
        let vb = VarBuilder::from_backend(Box::new(MappedWeights::new(st)), dtype, device.clone()).pp("model.diffusion_model");
        let model = FluxModel::new(&config, out, &Weights::Dense(vb)).map_err(|e| bad_weights(path, e))?;
        tracing::info!("loaded {} transformer from {}", FluxVariant::of(&config), path.display());
        return Ok((FluxTransformer::Dense { model, config, dtype }, Vec::new()));
    }
    let (backend, reports) = wrap_backend(Box::new(MappedWeights::new(st)), &config, loras)?;
    let vb = VarBuilder::from_backend(backend, dtype, device.clone());
    let model = FluxModel::new(&config, out, &Weights::Dense(vb)).map_err(|e| bad_weights(path, e))?;
    tracing::info!("loaded {} transformer from {}", FluxVariant::of(&config), path.display());
    Ok((FluxTransformer::Dense { model, config, dtype }, reports))
}

fn check_dtype(dtype: DType) -> Result<()> {
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 => Ok(()),
        other => Err(Error::UnsupportedDtype { dtype: other, reason: "use F32, F16 or BF16".into() }),
    }
}

/// The rotary axes a diffusers `transformer/config.json` in `dir` declares, if any.
pub fn folder_axes(dir: &Path) -> Result<Option<Vec<usize>>> {
    let cfg = dir.join("config.json");
    if !cfg.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&cfg).map_err(|source| Error::Io { path: cfg.clone(), source })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::InvalidConfig { path: cfg.clone(), reason: e.to_string() })?;
    if let Some(class) = v.get("_class_name").and_then(|c| c.as_str()) {
        if !class.starts_with("Flux") {
            return Err(Error::NotFlux { path: dir.to_path_buf(), reason: format!("its config.json declares {class}, not FluxTransformer2DModel") });
        }
    }
    Ok(v.get("axes_dims_rope").and_then(|a| a.as_array()).map(|a| a.iter().filter_map(|x| x.as_u64()).map(|x| x as usize).collect()))
}

/// Loads a diffusers `transformer/` folder (one file or shards with an index).
pub fn load_diffusers_transformer(
    dir: &Path,
    dtype: DType,
    device: &Device,
    axes_dim: Option<&[usize]>,
    loras: &[FluxLora],
) -> Result<(FluxTransformer, Vec<AdapterReport>)> {
    if dir.join("unet").is_dir() || dir.file_name().is_some_and(|n| n == "unet") {
        return Err(Error::NotFlux {
            path: dir.to_path_buf(),
            reason: "this is a Stable Diffusion folder (unet/); load it with sd-models (sd_models::loader::load)".into(),
        });
    }
    let files = sd_models::diffusers::find_weight_files(dir, false)?;
    let st = mmap(&files, dir)?;
    let from_config = folder_axes(dir)?;
    let axes = axes_dim.map(<[usize]>::to_vec).or(from_config);
    build_diffusers(diffusers_backend(st, dir.display().to_string()), dir, dtype, device, axes.as_deref(), loras)
}

fn build_diffusers(
    backend: RenamedWeights,
    source: &Path,
    dtype: DType,
    device: &Device,
    axes_dim: Option<&[usize]>,
    loras: &[FluxLora],
) -> Result<(FluxTransformer, Vec<AdapterReport>)> {
    let names = backend.stored_names();
    let depth = count_blocks(names.iter().map(String::as_str), "transformer_blocks.");
    let depth_single = count_blocks(names.iter().map(String::as_str), "single_transformer_blocks.");
    if depth + depth_single == 0 || !names.iter().any(|n| n == "x_embedder.weight") || is_flux2(&names) {
        return Err(Error::NotFlux { path: source.to_path_buf(), reason: describe_foreign(&names) });
    }
    let config =
        config_from_shapes(&|n| backend.shape_of(n), depth, depth_single, axes_dim, &source.display().to_string())?;
    check_dtype(dtype)?;
    let out = out_channels(&|n| backend.shape_of(n), &config);
    let (backend, reports) = wrap_backend(Box::new(backend), &config, loras)?;
    let vb = VarBuilder::from_backend(backend, dtype, device.clone());
    let model = FluxModel::new(&config, out, &Weights::Dense(vb)).map_err(|e| bad_weights(source, e))?;
    tracing::info!("loaded {} transformer (diffusers layout) from {}", FluxVariant::of(&config), source.display());
    Ok((FluxTransformer::Dense { model, config, dtype }, reports))
}

/// Loads a GGUF-quantized transformer with BFL tensor names (as city96's FLUX GGUFs and
/// stable-diffusion.cpp conversions store them).
pub fn load_gguf(path: &Path, device: &Device, axes_dim: Option<&[usize]>) -> Result<FluxTransformer> {
    let mut file = std::fs::File::open(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| Error::NotFlux {
        path: path.to_path_buf(),
        reason: format!("not a readable GGUF file ({}); re-download it", innermost(&e)),
    })?;
    let names: Vec<String> = content.tensor_infos.keys().cloned().collect();
    let depth = count_blocks(names.iter().map(String::as_str), "double_blocks.");
    let depth_single = count_blocks(names.iter().map(String::as_str), "single_blocks.");
    if depth + depth_single == 0 {
        return Err(Error::NotFlux { path: path.to_path_buf(), reason: describe_foreign(&names) });
    }
    let shape = |n: &str| content.tensor_infos.get(n).map(|t| t.shape.dims().to_vec());
    let config = config_from_shapes(&shape, depth, depth_single, axes_dim, &path.display().to_string())?;
    let out = out_channels(&shape, &config);
    drop(file);
    let vb = QuantizedVarBuilder::from_gguf(path, device).map_err(|e| bad_weights(path, e))?;
    let model = FluxModel::new(&config, out, &Weights::Quantized(vb)).map_err(|e| bad_weights(path, e))?;
    tracing::info!("loaded {} transformer (GGUF) from {}", FluxVariant::of(&config), path.display());
    Ok(FluxTransformer::Quantized { model, config })
}

/// The prediction's width per token: `final_layer.linear`'s rows (64 for every FLUX.1 model; Fill's input is
/// wider), or the input width when the shape is not readable (the build then reports what is wrong).
fn out_channels(shape: &dyn Fn(&str) -> Option<Vec<usize>>, config: &Config) -> usize {
    match shape("final_layer.linear.weight").as_deref() {
        Some([out, _]) => *out,
        _ => config.in_channels,
    }
}
