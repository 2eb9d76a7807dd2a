//! Reading diffusers pipeline folders: configs and weight files of each component.
//!
//! Layout (as written by `DiffusionPipeline.save_pretrained`): optional `model_index.json`,
//! `unet/`, `vae/`, `text_encoder/`, optional `text_encoder_2/`, `tokenizer/`, optional
//! `tokenizer_2/`, `scheduler/scheduler_config.json`. Weights are
//! `diffusion_pytorch_model[.fp16].safetensors` (UNet, VAE) or `model[.fp16].safetensors`
//! (text encoders), possibly sharded with a `*.safetensors.index[.fp16].json`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::config::{ClipConfig, PredictionType, UNetConfig, VaeConfig};
use crate::keymap::Component;
use crate::variant::SchedulerDefaults;
use crate::{Error, Result};

/// Reads and deserialises a JSON file; errors name the file and serde's field/line.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::NotFound { what: "config file".into(), path: path.to_path_buf() }
        } else {
            Error::Io { path: path.to_path_buf(), source: e }
        }
    })?;
    serde_json::from_str(&text).map_err(|e| Error::InvalidConfig { path: path.to_path_buf(), reason: e.to_string() })
}

/// diffusers UNet options this UNet does not implement, with the values that mean "off". A config
/// that turns one on would otherwise load and silently compute something else.
const UNSUPPORTED_UNET_OPTIONS: &[(&str, &[&str])] = &[
    ("time_cond_proj_dim", &["null"]),
    ("class_embed_type", &["null"]),
    ("encoder_hid_dim", &["null"]),
    ("encoder_hid_dim_type", &["null"]),
    ("addition_embed_type_num_heads", &["null", "64"]),
    ("resnet_time_scale_shift", &["\"default\""]),
    ("conv_in_kernel", &["3"]),
    ("conv_out_kernel", &["3"]),
    ("mid_block_type", &["\"UNetMidBlock2DCrossAttn\""]),
    ("only_cross_attention", &["false"]),
    ("dual_cross_attention", &["false"]),
    ("num_class_embeds", &["null"]),
    ("time_embedding_type", &["\"positional\""]),
    ("timestep_post_act", &["null"]),
    ("time_embedding_act_fn", &["null"]),
    ("mid_block_only_cross_attention", &["null", "false"]),
    ("cross_attention_norm", &["null"]),
    ("attention_type", &["\"default\""]),
    ("reverse_transformer_layers_per_block", &["null"]),
];

/// Reads a diffusers `unet/config.json`.
pub fn read_unet_config(path: &Path) -> Result<UNetConfig> {
    let raw: serde_json::Value = read_json(path)?;
    let invalid = |reason: String| Error::InvalidConfig { path: path.to_path_buf(), reason };
    for (key, allowed) in UNSUPPORTED_UNET_OPTIONS {
        if let Some(value) = raw.get(*key) {
            let text = value.to_string();
            if !allowed.contains(&text.as_str()) {
                return Err(invalid(format!(
                    "{key} = {text} is not supported by this UNet (supported: {}); is this an LCM/UnCLIP/Kandinsky-style model rather than SD 1.x/2.x/XL?",
                    allowed.join(" or ")
                )));
            }
        }
    }
    let cfg: UNetConfig = serde_json::from_value(raw).map_err(|e| invalid(e.to_string()))?;
    let n = cfg.block_out_channels.len();
    if n == 0 || cfg.down_block_types.len() != n || cfg.up_block_types.len() != n {
        return Err(invalid(format!(
            "block_out_channels ({n}), down_block_types ({}) and up_block_types ({}) must have the same non-zero length",
            cfg.down_block_types.len(),
            cfg.up_block_types.len()
        )));
    }
    if cfg.layers_per_block == 0 {
        return Err(invalid("layers_per_block must be at least 1".into()));
    }
    Ok(cfg)
}

/// Reads a diffusers `vae/config.json`.
pub fn read_vae_config(path: &Path) -> Result<VaeConfig> {
    let cfg: VaeConfig = read_json(path)?;
    if cfg.block_out_channels.is_empty() || cfg.layers_per_block == 0 {
        return Err(Error::InvalidConfig {
            path: path.to_path_buf(),
            reason: "block_out_channels must be non-empty and layers_per_block at least 1".into(),
        });
    }
    Ok(cfg)
}

/// The fields of a transformers config that decide whether `text_projection` exists.
#[derive(Deserialize)]
struct ClipArchitectures {
    #[serde(default)]
    architectures: Option<Vec<String>>,
}

/// Reads a transformers `text_encoder/config.json`.
///
/// `CLIPTextConfig` always carries a `projection_dim`, but only `CLIPTextModelWithProjection`
/// has a `text_projection` weight, so the projection is kept only for that architecture.
pub fn read_clip_config(path: &Path) -> Result<ClipConfig> {
    let mut cfg: ClipConfig = read_json(path)?;
    let arch: ClipArchitectures = read_json(path)?;
    let with_projection =
        arch.architectures.as_deref().unwrap_or_default().iter().any(|a| a.contains("WithProjection"));
    if !with_projection {
        cfg.projection_dim = None;
    }
    if cfg.hidden_size == 0 || cfg.num_attention_heads == 0 || cfg.hidden_size % cfg.num_attention_heads != 0 {
        return Err(Error::InvalidConfig {
            path: path.to_path_buf(),
            reason: format!(
                "hidden_size ({}) must be a positive multiple of num_attention_heads ({})",
                cfg.hidden_size, cfg.num_attention_heads
            ),
        });
    }
    Ok(cfg)
}

/// `scheduler_config.json` fields, each optional (older files omit some).
#[derive(Deserialize)]
struct RawScheduler {
    beta_start: Option<f64>,
    beta_end: Option<f64>,
    beta_schedule: Option<String>,
    num_train_timesteps: Option<usize>,
    timestep_spacing: Option<String>,
    steps_offset: Option<usize>,
    prediction_type: Option<PredictionType>,
    rescale_betas_zero_snr: Option<bool>,
}

/// `timestep_spacing` values diffusers' discrete schedulers implement.
pub const TIMESTEP_SPACINGS: [&str; 3] = ["leading", "trailing", "linspace"];
/// `beta_schedule` values diffusers' discrete schedulers implement.
pub const BETA_SCHEDULES: [&str; 3] = ["linear", "scaled_linear", "squaredcos_cap_v2"];

/// Reads `scheduler/scheduler_config.json`, filling absent fields with the SD defaults, keeping the
/// whole file for the scheduler library, and refusing a spacing or beta schedule no scheduler
/// implements (by field name) rather than reading it as another.
pub fn read_scheduler_config(path: &Path) -> Result<SchedulerDefaults> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?;
    let raw: RawScheduler = serde_json::from_str(&sd_core::schedulers::config::python_json(&text)).map_err(|e| Error::InvalidConfig { path: path.to_path_buf(), reason: e.to_string() })?;
    for (field, value, known) in [("timestep_spacing", &raw.timestep_spacing, &TIMESTEP_SPACINGS), ("beta_schedule", &raw.beta_schedule, &BETA_SCHEDULES)] {
        if let Some(v) = value.as_deref().filter(|v| !known.contains(v)) {
            return Err(Error::InvalidConfig {
                path: path.to_path_buf(),
                reason: format!("{field} {v:?} is not one of {}; fix the file (diffusers would refuse it too)", known.join(", ")),
            });
        }
    }
    Ok(SchedulerDefaults {
        beta_start: raw.beta_start.unwrap_or(0.00085),
        beta_end: raw.beta_end.unwrap_or(0.012),
        beta_schedule: raw.beta_schedule.unwrap_or_else(|| "scaled_linear".into()),
        num_train_timesteps: raw.num_train_timesteps.unwrap_or(1000),
        timestep_spacing: raw.timestep_spacing,
        steps_offset: raw.steps_offset.unwrap_or(0),
        prediction_type: raw.prediction_type.unwrap_or_default(),
        rescale_betas_zero_snr: raw.rescale_betas_zero_snr.unwrap_or(false),
        file: Some(text),
    })
}

/// `model_index.json`'s pipeline class, when the file exists.
#[derive(Deserialize)]
struct ModelIndex {
    #[serde(rename = "_class_name")]
    class_name: Option<String>,
}

/// The configs of a diffusers pipeline folder.
#[derive(Debug, Clone)]
pub struct DiffusersFolder {
    /// The folder.
    pub root: PathBuf,
    /// `_class_name` of `model_index.json`, if present.
    pub pipeline_class: Option<String>,
    /// `unet/config.json`.
    pub unet: UNetConfig,
    /// `vae/config.json`.
    pub vae: VaeConfig,
    /// `text_encoder/config.json`.
    pub text_encoder: ClipConfig,
    /// `text_encoder_2/config.json` (SDXL).
    pub text_encoder_2: Option<ClipConfig>,
    /// `scheduler/scheduler_config.json` (SD defaults when absent).
    pub scheduler: SchedulerDefaults,
}

impl DiffusersFolder {
    /// Reads every config of the folder at `root`.
    pub fn open(root: &Path) -> Result<Self> {
        if !root.is_dir() {
            return Err(Error::NotFound { what: "model folder".into(), path: root.to_path_buf() });
        }
        let index = root.join("model_index.json");
        let pipeline_class = if index.is_file() { read_json::<ModelIndex>(&index)?.class_name } else { None };
        let unet_cfg = root.join("unet").join("config.json");
        if !unet_cfg.is_file() {
            let reason = match &pipeline_class {
                Some(c) if c.starts_with("Flux") => format!("model_index.json declares {c}: this is a FLUX pipeline folder; load it with sd-flux (sd_flux::load)"),
                Some(c) => format!("model_index.json declares {c} but there is no unet/config.json; only UNet-based Stable Diffusion pipelines (SD 1.x, 2.x, SDXL) are supported"),
                None => "no unet/config.json: this is not a diffusers Stable Diffusion folder".into(),
            };
            return Err(if pipeline_class.is_some() {
                Error::UnknownArchitecture { path: root.to_path_buf(), reason }
            } else {
                Error::NotFound { what: "unet/config.json".into(), path: unet_cfg }
            });
        }
        let unet = read_unet_config(&unet_cfg)?;
        let vae = read_vae_config(&root.join("vae").join("config.json"))?;
        let text_encoder = read_clip_config(&root.join("text_encoder").join("config.json"))?;
        let te2 = root.join("text_encoder_2").join("config.json");
        let text_encoder_2 = if te2.is_file() { Some(read_clip_config(&te2)?) } else { None };
        let sched = root.join("scheduler").join("scheduler_config.json");
        let scheduler = if sched.is_file() {
            read_scheduler_config(&sched)?
        } else {
            tracing::warn!("{} is missing; using the Stable Diffusion defaults", sched.display());
            SchedulerDefaults {
                beta_start: 0.00085,
                beta_end: 0.012,
                beta_schedule: "scaled_linear".into(),
                num_train_timesteps: 1000,
                timestep_spacing: None,
                steps_offset: 1,
                prediction_type: PredictionType::Epsilon,
                rescale_betas_zero_snr: false,
                file: None,
            }
        };
        Ok(Self { root: root.to_path_buf(), pipeline_class, unet, vae, text_encoder, text_encoder_2, scheduler })
    }

    /// The sub-folder of `component`.
    pub fn component_dir(&self, component: Component) -> PathBuf {
        self.root.join(component.folder())
    }

    /// The safetensors files holding `component`'s weights (several when sharded).
    pub fn weight_files(&self, component: Component, prefer_fp16: bool) -> Result<Vec<PathBuf>> {
        find_weight_files(&self.component_dir(component), prefer_fp16)
    }
}

/// Shard file names listed in a `*.safetensors.index.json`.
#[derive(Deserialize)]
struct ShardIndex {
    weight_map: std::collections::HashMap<String, String>,
}

/// Finds the safetensors weights in a component folder, preferring the `.fp16` variant when
/// `prefer_fp16` and falling back to the other one.
pub fn find_weight_files(dir: &Path, prefer_fp16: bool) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Err(Error::NotFound { what: format!("{} folder", dir_name(dir)), path: dir.to_path_buf() });
    }
    let variants: [&str; 2] = if prefer_fp16 { [".fp16", ""] } else { ["", ".fp16"] };
    for variant in variants {
        for base in ["diffusion_pytorch_model", "model"] {
            let single = dir.join(format!("{base}{variant}.safetensors"));
            if single.is_file() {
                return Ok(vec![single]);
            }
            let index = dir.join(format!("{base}.safetensors.index{variant}.json"));
            if index.is_file() {
                let idx: ShardIndex = read_json(&index)?;
                let files: BTreeSet<&String> = idx.weight_map.values().collect();
                let mut out = Vec::with_capacity(files.len());
                for f in files {
                    let p = dir.join(f);
                    if !p.is_file() {
                        return Err(Error::NotFound {
                            what: format!("weight shard listed in {}", index.display()),
                            path: p,
                        });
                    }
                    out.push(p);
                }
                if out.is_empty() {
                    return Err(Error::InvalidConfig { path: index, reason: "weight_map is empty".into() });
                }
                return Ok(out);
            }
        }
    }
    let has_pickle = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().any(|e| e.path().extension().is_some_and(|x| x == "bin" || x == "ckpt" || x == "pt")))
        .unwrap_or(false);
    if has_pickle {
        return Err(Error::UnsupportedFormat {
            path: dir.to_path_buf(),
            reason: "only PyTorch pickle weights (.bin) were found; pickles can run arbitrary code and are not loaded. \
                     Convert them to safetensors, e.g. `DiffusionPipeline.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`"
                .into(),
        });
    }
    Err(Error::NotFound {
        what: format!("{} weights (diffusion_pytorch_model.safetensors or model.safetensors)", dir_name(dir)),
        path: dir.to_path_buf(),
    })
}

fn dir_name(dir: &Path) -> String {
    dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| dir.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sd-models-diffusers-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    }

    #[test]
    fn weight_file_preference_and_shards() {
        let d = tmp("weights");
        std::fs::write(d.join("diffusion_pytorch_model.safetensors"), b"x").expect("write");
        assert_eq!(find_weight_files(&d, true).expect("found"), vec![d.join("diffusion_pytorch_model.safetensors")]);
        std::fs::write(d.join("diffusion_pytorch_model.fp16.safetensors"), b"x").expect("write");
        assert_eq!(
            find_weight_files(&d, true).expect("found"),
            vec![d.join("diffusion_pytorch_model.fp16.safetensors")]
        );
        assert_eq!(find_weight_files(&d, false).expect("found"), vec![d.join("diffusion_pytorch_model.safetensors")]);

        let s = tmp("shards");
        std::fs::write(
            s.join("model.safetensors.index.json"),
            r#"{"metadata":{},"weight_map":{"a":"model-00001-of-00002.safetensors","b":"model-00002-of-00002.safetensors","c":"model-00001-of-00002.safetensors"}}"#,
        )
        .expect("write");
        std::fs::write(s.join("model-00001-of-00002.safetensors"), b"x").expect("write");
        let err = find_weight_files(&s, false).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");
        std::fs::write(s.join("model-00002-of-00002.safetensors"), b"x").expect("write");
        assert_eq!(find_weight_files(&s, false).expect("found").len(), 2);

        let b = tmp("bin");
        std::fs::write(b.join("pytorch_model.bin"), b"x").expect("write");
        assert!(matches!(find_weight_files(&b, false), Err(Error::UnsupportedFormat { .. })));
        for d in [d, s, b] {
            let _ = std::fs::remove_dir_all(d);
        }
    }

    #[test]
    fn config_errors_name_file_and_field() {
        let d = tmp("cfg");
        let p = d.join("config.json");
        std::fs::write(&p, r#"{"in_channels": 4, "down_block_types": [], "up_block_types": []}"#).expect("write");
        let msg = read_unet_config(&p).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("config.json") && msg.contains("block_out_channels"), "{msg}");
        std::fs::write(&p, r#"{"architectures":["CLIPTextModel"],"hidden_size":32,"intermediate_size":64,"num_hidden_layers":2,"num_attention_heads":4,"projection_dim":512,"hidden_act":"quick_gelu"}"#).expect("write");
        assert_eq!(read_clip_config(&p).expect("clip").projection_dim, None);
        std::fs::write(&p, r#"{"architectures":["CLIPTextModel"],"hidden_size":32,"intermediate_size":64,"num_hidden_layers":2,"num_attention_heads":4,"hidden_act":"relu"}"#).expect("write");
        let msg = read_clip_config(&p).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("relu"), "{msg}");
        let _ = std::fs::remove_dir_all(d);
    }
}
