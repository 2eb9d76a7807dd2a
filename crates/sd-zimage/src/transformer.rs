//! Loading the Z-Image transformer: a diffusers `transformer/` folder, or one `.safetensors` file with the
//! original (Tongyi / ComfyUI `z_image_turbo_bf16.safetensors`) tensor names, which diffusers'
//! `convert_z_image_transformer_checkpoint_to_diffusers` maps: `x_embedder.` → `all_x_embedder.2-1.`,
//! `final_layer.` → `all_final_layer.2-1.`, `attention.out` → `attention.to_out.0`, `attention.q_norm`/`k_norm`
//! → `norm_q`/`norm_k`, the fused `attention.qkv` (split into q, k, v; run fused here) and an optional
//! `model.diffusion_model.` prefix. Weights stay memory-mapped until each is converted to the load dtype.

use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use sd_models::single_file::innermost;
use sd_models::weights::{MappedWeights, RenamedWeights, Source};

use crate::config::ZImageConfig;
use crate::error::{Error, Result};
use crate::lora::{wrap_backend, ZImageLora};
use crate::model::ZImageModel;
use sd_lora::AdapterReport;

/// Maps safetensors files read-only.
pub(crate) fn mmap(files: &[PathBuf], what: &Path) -> Result<MmapedSafetensors> {
    for f in files {
        if !f.is_file() {
            return Err(Error::NotFound { what: "weights file".into(), path: f.clone(), hint: "check the path".into() });
        }
    }
    // SAFETY: read-only mapping; like every mmap-based loader we rely on the files not being truncated by
    // another process while they are mapped.
    unsafe { MmapedSafetensors::multi(files) }.map_err(|e| Error::NotZImage {
        path: what.to_path_buf(),
        reason: format!("not a valid safetensors file ({}); re-download it, it may be truncated", innermost(&e)),
    })
}

pub(crate) fn check_dtype(dtype: DType) -> Result<()> {
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 => Ok(()),
        other => Err(Error::UnsupportedDtype { dtype: other, reason: "use F32, F16 or BF16".into() }),
    }
}

fn bad_weights(source: &Path, e: candle_core::Error) -> Error {
    Error::BadWeights { source_desc: source.display().to_string(), reason: innermost(&e).to_string(), component: "Z-Image transformer" }
}

/// Whether tensor names are a Z-Image transformer's (either layout, with or without a prefix).
pub fn names_are_zimage<'a>(names: impl IntoIterator<Item = &'a str>) -> bool {
    let (mut refiner, mut cap) = (false, false);
    for n in names {
        refiner |= n.contains("noise_refiner.") || n.contains("context_refiner.");
        cap |= n.contains("cap_embedder.");
    }
    refiner && cap
}

/// Explains what a non-Z-Image weights file seems to be, given its tensor names.
fn describe_foreign(names: &[String]) -> String {
    let has = |p: &str| names.iter().any(|n| n.contains(p));
    if has("input_blocks.") || has("down_blocks.0.resnets.") {
        "this is a Stable Diffusion checkpoint; load it with sd-models (sd_models::loader::load)".into()
    } else if has("double_blocks.") || has("single_transformer_blocks.") {
        "this is a FLUX transformer; load it with sd-flux".into()
    } else if has("joint_blocks.") {
        "this is an SD3 MMDiT; load it with sd-sd3".into()
    } else if has("lora_") || has(".lora_A") || has(".lora.down") {
        "this is a LoRA, not a transformer".into()
    } else if has("encoder.down.") || has("decoder.up.") || has("decoder.up_blocks.") {
        "this is an autoencoder (pass it as the VAE, not as the transformer)".into()
    } else if has("embed_tokens.") {
        "this is a text encoder (Qwen3), not the transformer".into()
    } else {
        let examples: Vec<&str> = names.iter().take(3).map(String::as_str).collect();
        format!("no noise_refiner.*/context_refiner.*/cap_embedder.* tensors; found e.g. {examples:?}")
    }
}

/// Loads a Z-Image transformer from a diffusers `transformer/` folder (or a pipeline folder holding one)
/// or a single `.safetensors` file in either layout, in `dtype` on `device`.
///
/// `config` replaces what the weights or `config.json` say (for a single file, the architecture is read off
/// the tensor shapes, with the published rotary split `[32, 48, 48]` and `axes_lens` `[1024, 512, 512]`).
pub fn load_transformer(path: &Path, dtype: DType, device: &Device, config: Option<&ZImageConfig>) -> Result<ZImageModel> {
    Ok(load_transformer_with_loras(path, dtype, device, config, &[])?.0)
}

/// [`load_transformer`] with LoRAs merged into the weights as they load, returning what each adapter matched.
pub fn load_transformer_with_loras(
    path: &Path,
    dtype: DType,
    device: &Device,
    config: Option<&ZImageConfig>,
    loras: &[ZImageLora],
) -> Result<(ZImageModel, Vec<AdapterReport>)> {
    check_dtype(dtype)?;
    if path.is_dir() {
        let sub = path.join("transformer");
        let dir = if sub.is_dir() { sub } else { path.to_path_buf() };
        return load_folder(&dir, dtype, device, config, loras);
    }
    if !path.exists() {
        return Err(Error::NotFound {
            what: "Z-Image transformer".into(),
            path: path.to_path_buf(),
            hint: "pass z_image_turbo_bf16.safetensors or a diffusers Z-Image folder (transformer/)".into(),
        });
    }
    let ext = path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
    if matches!(ext.as_str(), "ckpt" | "pt" | "pth" | "bin") {
        return Err(Error::NotZImage {
            path: path.to_path_buf(),
            reason: "PyTorch pickles are not loaded (unpickling can run arbitrary code); convert it to .safetensors".into(),
        });
    }
    if ext == "gguf" {
        return Err(Error::NotZImage { path: path.to_path_buf(), reason: "GGUF Z-Image transformers are not supported; use the .safetensors file".into() });
    }
    load_file(path, dtype, device, config, loras)
}

fn load_folder(dir: &Path, dtype: DType, device: &Device, config: Option<&ZImageConfig>, loras: &[ZImageLora]) -> Result<(ZImageModel, Vec<AdapterReport>)> {
    let cfg_path = dir.join("config.json");
    let cfg = match config {
        Some(c) => c.clone(),
        None if cfg_path.is_file() => {
            let class: Option<String> = crate::config::read_json::<serde_json::Value>(&cfg_path)?
                .get("_class_name")
                .and_then(|c| c.as_str())
                .map(str::to_string);
            if let Some(class) = class {
                if !class.starts_with("ZImage") {
                    return Err(Error::NotZImage { path: dir.to_path_buf(), reason: format!("its config.json declares {class}, not ZImageTransformer2DModel") });
                }
            }
            ZImageConfig::from_file(&cfg_path)?
        }
        None => {
            return Err(Error::NotFound {
                what: "transformer config.json".into(),
                path: cfg_path,
                hint: "a diffusers Z-Image transformer/ folder has config.json beside its weights".into(),
            })
        }
    };
    let files = sd_models::diffusers::find_weight_files(dir, false)?;
    let st = mmap(&files, dir)?;
    let names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
    if !names_are_zimage(names.iter().map(String::as_str)) {
        return Err(Error::NotZImage { path: dir.to_path_buf(), reason: describe_foreign(&names) });
    }
    let (backend, reports) = wrap_backend(Box::new(MappedWeights::new(st)), &cfg, false, loras)?;
    let vb = VarBuilder::from_backend(backend, dtype, device.clone());
    let model = ZImageModel::new(&cfg, vb).map_err(|e| bad_weights(dir, e))?;
    tracing::info!("loaded Z-Image transformer (diffusers layout) from {}", dir.display());
    Ok((model, reports))
}

/// The stored (original-layout) name of a diffusers tensor name.
fn original_name(name: &str, prefix: &str) -> String {
    let n = name
        .replace("all_final_layer.2-1.", "final_layer.")
        .replace("all_x_embedder.2-1.", "x_embedder.")
        .replace(".attention.to_out.0.", ".attention.out.")
        .replace(".attention.norm_q.", ".attention.q_norm.")
        .replace(".attention.norm_k.", ".attention.k_norm.");
    format!("{prefix}{n}")
}

fn load_file(path: &Path, dtype: DType, device: &Device, config: Option<&ZImageConfig>, loras: &[ZImageLora]) -> Result<(ZImageModel, Vec<AdapterReport>)> {
    let st = mmap(&[path.to_path_buf()], path)?;
    let names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
    if !names_are_zimage(names.iter().map(String::as_str)) {
        return Err(Error::NotZImage { path: path.to_path_buf(), reason: describe_foreign(&names) });
    }
    const PREFIX: &str = "model.diffusion_model.";
    let prefix = if names.iter().any(|n| n.starts_with(PREFIX)) { PREFIX } else { "" };
    let diffusers_layout = names.iter().any(|n| n.starts_with(&format!("{prefix}all_x_embedder.")));
    let shape = |n: &str| st.get(n).ok().map(|v| v.shape().to_vec());
    let cfg = match config {
        Some(c) => c.clone(),
        None => {
            let stored = |n: &str| if diffusers_layout { format!("{prefix}{n}") } else { original_name(n, prefix) };
            config_from_shapes(&|n: &str| shape(&stored(n)), &names, prefix, path)?
        }
    };
    let fused = !diffusers_layout && names.iter().any(|n| n.contains(".attention.qkv."));
    let backend: Box<dyn candle_nn::var_builder::SimpleBackend> = if diffusers_layout && prefix.is_empty() {
        Box::new(MappedWeights::new(st))
    } else {
        let p = prefix.to_string();
        let keep = diffusers_layout;
        let map = move |n: &str| Some(Source::Rename(if keep { format!("{p}{n}") } else { original_name(n, &p) }));
        Box::new(RenamedWeights::new(st, Box::new(map), path.display().to_string(), "a Z-Image transformer file"))
    };
    let (backend, reports) = wrap_backend(backend, &cfg, fused, loras)?;
    let vb = VarBuilder::from_backend(backend, dtype, device.clone());
    let model = ZImageModel::new(&cfg, vb).map_err(|e| bad_weights(path, e))?;
    tracing::info!("loaded Z-Image transformer from {}", path.display());
    Ok((model, reports))
}

/// Reads the architecture off the shapes of a single file (diffusers names asked through `shape`).
fn config_from_shapes(shape: &dyn Fn(&str) -> Option<Vec<usize>>, names: &[String], prefix: &str, path: &Path) -> Result<ZImageConfig> {
    let bad = |reason: String| Error::BadWeights { source_desc: path.display().to_string(), reason, component: "Z-Image transformer" };
    let (dim, patch_in) = match shape("all_x_embedder.2-1.weight").as_deref() {
        Some([d, i]) => (*d, *i),
        _ => return Err(bad("x_embedder.weight is missing or not a matrix".into())),
    };
    let cap = match shape("cap_embedder.1.weight").as_deref() {
        Some([_, c]) => *c,
        _ => return Err(bad("cap_embedder.1.weight is missing or not a matrix".into())),
    };
    let count = |block: &str| {
        names
            .iter()
            .filter_map(|n| n.strip_prefix(prefix)?.strip_prefix(block)?.split('.').next()?.parse::<usize>().ok())
            .max()
            .map_or(0, |m| m + 1)
    };
    let head_dim = match shape("layers.0.attention.norm_q.weight").as_deref() {
        Some([h]) if *h > 0 && dim % h == 0 => *h,
        _ => return Err(bad("layers.0.attention.q_norm.weight is missing or does not divide the width".into())),
    };
    let defaults = ZImageConfig::default();
    if head_dim != defaults.head_dim() {
        return Err(Error::InvalidConfig {
            path: path.to_path_buf(),
            reason: format!(
                "attention heads are {head_dim} wide, not Z-Image's 128, so the rotary split cannot be guessed; pass the transformer config.json (ZImageLoadOptions::transformer_config)"
            ),
        });
    }
    let cfg = ZImageConfig {
        in_channels: patch_in / 4,
        dim,
        n_layers: count("layers."),
        n_refiner_layers: count("noise_refiner."),
        n_heads: dim / head_dim,
        cap_feat_dim: cap,
        ..defaults
    };
    cfg.check().map_err(|reason| Error::InvalidConfig { path: path.to_path_buf(), reason })?;
    Ok(cfg)
}
