//! LoRA adapters for the Z-Image transformer, merged into the weights while it loads.
//!
//! sd-lora parses the files (kohya, PEFT, LyCORIS), computes each module's update and merges it
//! (`sd_lora::MergeBackend`); this module is Z-Image's key table. Understood names, as diffusers'
//! `ZImageLoraLoaderMixin` (with `_convert_non_diffusers_z_image_lora_to_diffusers`) reads them:
//! PEFT/diffusers (`transformer.layers.0.attention.to_q`, `diffusion_model.layers.0.attention.to_q`),
//! kohya (`lora_unet_layers_0_attention_to_q`), and the original layout's `attention.out`,
//! `attention.qkv`, `x_embedder`, `final_layer.*`. With a transformer file in the original layout, updates
//! to the separate `to_q`/`to_k`/`to_v` land in their rows of the fused `qkv` weight.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_nn::var_builder::SimpleBackend;
use sd_lora::{AdapterReport, KeyTable, Target, TransformerLoras};

use crate::config::ZImageConfig;
use crate::error::{Error, Result};

/// A LoRA to merge, with its strength (may be negative).
#[derive(Debug, Clone)]
pub struct ZImageLora {
    /// The file.
    pub path: PathBuf,
    /// Multiplier of its update.
    pub strength: f32,
}

impl ZImageLora {
    /// A LoRA at `path` with `strength`.
    pub fn new(path: impl Into<PathBuf>, strength: f32) -> Self {
        Self { path: path.into(), strength }
    }
}

/// Parses `path[:strength]` (strength defaults to 1 and may be negative), as sd-lora's specs.
pub fn parse_lora_spec(spec: &str) -> Result<ZImageLora> {
    let (path, strength) = sd_lora::parse_spec(spec)?;
    Ok(ZImageLora { path, strength })
}

/// Every module name a LoRA may use for a transformer with `cfg` (diffusers and original names, dotted),
/// with the weight it updates as the model asks for it (`fused_qkv`: the model holds `attention.qkv`).
pub fn lora_targets(cfg: &ZImageConfig, fused_qkv: bool) -> HashMap<String, Target> {
    let dim = cfg.dim;
    let mut out = HashMap::new();
    let whole = |out: &mut HashMap<String, Target>, alias: &str, weight: &str| {
        out.insert(alias.to_string(), Target::whole(format!("{weight}.weight")));
    };
    let key = format!("{}-1", cfg.patch_size());
    whole(&mut out, &format!("all_x_embedder.{key}"), &format!("all_x_embedder.{key}"));
    whole(&mut out, "x_embedder", &format!("all_x_embedder.{key}"));
    for (alias, weight) in [("linear", "linear"), ("adaLN_modulation.1", "adaLN_modulation.1")] {
        whole(&mut out, &format!("all_final_layer.{key}.{alias}"), &format!("all_final_layer.{key}.{weight}"));
        whole(&mut out, &format!("final_layer.{alias}"), &format!("all_final_layer.{key}.{weight}"));
    }
    for m in ["t_embedder.mlp.0", "t_embedder.mlp.2", "cap_embedder.1"] {
        whole(&mut out, m, m);
    }
    let mut blocks: Vec<(String, bool)> = Vec::new();
    for i in 0..cfg.n_layers {
        blocks.push((format!("layers.{i}"), true));
    }
    for i in 0..cfg.n_refiner_layers {
        blocks.push((format!("noise_refiner.{i}"), true));
        blocks.push((format!("context_refiner.{i}"), false));
    }
    for (b, modulated) in blocks {
        for m in ["feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "attention.to_out.0"] {
            whole(&mut out, &format!("{b}.{m}"), &format!("{b}.{m}"));
        }
        whole(&mut out, &format!("{b}.attention.out"), &format!("{b}.attention.to_out.0"));
        if modulated {
            whole(&mut out, &format!("{b}.adaLN_modulation.0"), &format!("{b}.adaLN_modulation.0"));
        }
        let qkv = format!("{b}.attention.qkv.weight");
        for (j, p) in ["to_q", "to_k", "to_v"].iter().enumerate() {
            let alias = format!("{b}.attention.{p}");
            let t = if fused_qkv { Target { weight: qkv.clone(), rows: Some((j * dim, dim)), swap_halves: false } } else { Target::whole(format!("{alias}.weight")) };
            out.insert(alias, t);
        }
        if fused_qkv {
            out.insert(format!("{b}.attention.qkv"), Target::whole(qkv));
        }
    }
    out
}

/// Opens `loras`, matches their modules against a transformer with `cfg`, and wraps `inner` so the merged
/// weights are served; returns the backend and what each adapter matched. An adapter that matches nothing
/// is an error; unmatched modules of a partly matching one are reported and logged.
pub fn wrap_backend(
    inner: Box<dyn SimpleBackend>,
    cfg: &ZImageConfig,
    fused_qkv: bool,
    loras: &[ZImageLora],
) -> Result<(Box<dyn SimpleBackend>, Vec<AdapterReport>)> {
    let table = KeyTable::new(lora_targets(cfg, fused_qkv));
    let plan = TransformerLoras {
        family: sd_core::ModelFamily::ZImage,
        model: "Z-Image transformer",
        resolve: &|key| table.get(key).cloned(),
        factor: &|_, _, _| 1.0,
    };
    let files: Vec<(PathBuf, f32)> = loras.iter().map(|l| (l.path.clone(), l.strength)).collect();
    plan.wrap(inner, &files, &|path, adapter| Error::LoraNoMatch {
        path: path.to_path_buf(),
        modules: adapter.modules().len(),
        example: adapter.modules().first().map(|m| m.key.clone()).unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_every_naming_scheme_resolve() {
        let cfg = ZImageConfig::default();
        for fused in [false, true] {
            let t = lora_targets(&cfg, fused);
            let t = KeyTable::new(t);
            let r = |k: &str| t.get(k).cloned();
            let q = r("transformer.layers.3.attention.to_k").expect("to_k");
            if fused {
                assert_eq!((q.weight.as_str(), q.rows), ("layers.3.attention.qkv.weight", Some((3840, 3840))));
            } else {
                assert_eq!((q.weight.as_str(), q.rows), ("layers.3.attention.to_k.weight", None));
            }
            assert_eq!(r("lora_unet_layers_3_attention_to_k"), Some(q));
            assert_eq!(r("diffusion_model.layers.0.attention.out").map(|t| t.weight), Some("layers.0.attention.to_out.0.weight".into()));
            assert_eq!(r("lora_unet_noise_refiner_1_adaLN_modulation_0").map(|t| t.weight), Some("noise_refiner.1.adaLN_modulation.0.weight".into()));
            assert_eq!(r("diffusion_model.final_layer.linear").map(|t| t.weight), Some("all_final_layer.2-1.linear.weight".into()));
            assert_eq!(r("context_refiner.0.adaLN_modulation.0"), None);
            assert_eq!(r("layers.30.attention.to_q"), None);
            assert_eq!(r("lora_te1_text_model_encoder_layers_0_mlp_fc1"), None);
        }
    }
}
