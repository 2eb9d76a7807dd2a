//! LoRA adapters for the FLUX transformer, merged into the weights while it loads.
//!
//! sd-lora parses the files (kohya, PEFT, LyCORIS), computes each module's update and merges it
//! (`sd_lora::MergeBackend`, the one merge backend); this module is FLUX's key table: which BFL weight
//! (and which rows of it) each module key updates. Three naming schemes are
//! understood: kohya with BFL names (`lora_unet_double_blocks_0_img_attn_qkv`), kohya with
//! diffusers names (`lora_transformer_single_transformer_blocks_0_attn_to_q`) and PEFT/diffusers
//! (`transformer.transformer_blocks.0.attn.to_q`). Updates to diffusers' separate q/k/v (and the
//! single blocks' `proj_mlp`) land in their rows of the fused BFL weight; updates to
//! `norm_out.linear` get their halves swapped, as the weight itself.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_nn::var_builder::SimpleBackend;
use candle_transformers::models::flux::model::Config;
use sd_lora::{AdapterReport, KeyTable, TransformerLoras};

use crate::error::{Error, Result};
use crate::keymap::{bfl_to_diffusers, DiffusersSource};

/// Where a LoRA module's update goes (sd-lora's merge target: a weight, the rows of a fused one, or
/// swapped halves).
pub use sd_lora::Target as LoraTarget;

/// The linear layers of a FLUX transformer with `config`, as BFL module names (no `.weight`).
pub fn linear_modules(config: &Config) -> Vec<String> {
    let mut m: Vec<String> = ["img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "vector_in.out_layer"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if config.guidance_embed {
        m.extend(["guidance_in.in_layer".to_string(), "guidance_in.out_layer".to_string()]);
    }
    for i in 0..config.depth {
        for l in ["img_mod.lin", "txt_mod.lin", "img_attn.qkv", "txt_attn.qkv", "img_attn.proj", "txt_attn.proj", "img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2"] {
            m.push(format!("double_blocks.{i}.{l}"));
        }
    }
    for i in 0..config.depth_single_blocks {
        for l in ["linear1", "linear2", "modulation.lin"] {
            m.push(format!("single_blocks.{i}.{l}"));
        }
    }
    m.extend(["final_layer.linear".to_string(), "final_layer.adaLN_modulation.1".to_string()]);
    m
}

/// Every module name a LoRA may use for `config` (BFL and diffusers, dotted), with its target.
pub fn lora_targets(config: &Config) -> HashMap<String, LoraTarget> {
    let hidden = config.hidden_size;
    let mlp = (hidden as f64 * config.mlp_ratio) as usize;
    let mut out = HashMap::new();
    for module in linear_modules(config) {
        let weight = format!("{module}.weight");
        out.insert(module.clone(), LoraTarget { weight: weight.clone(), rows: None, swap_halves: false });
        match bfl_to_diffusers(&weight) {
            Some(DiffusersSource::Rename(d)) => {
                let d = d.trim_end_matches(".weight").to_string();
                out.insert(d, LoraTarget { weight, rows: None, swap_halves: false });
            }
            Some(DiffusersSource::SwapHalves(d)) => {
                let d = d.trim_end_matches(".weight").to_string();
                out.insert(d, LoraTarget { weight, rows: None, swap_halves: true });
            }
            Some(DiffusersSource::Concat(parts)) => {
                let mut start = 0;
                for p in parts {
                    // q, k and v are `hidden` rows each; the single blocks' MLP input follows them.
                    let rows = if p.contains("proj_mlp") { mlp } else { hidden };
                    let d = p.trim_end_matches(".weight").to_string();
                    out.insert(d, LoraTarget { weight: weight.clone(), rows: Some((start, rows)), swap_halves: false });
                    start += rows;
                }
            }
            None => {}
        }
    }
    out
}

/// A LoRA to merge, with its strength (may be negative).
#[derive(Debug, Clone)]
pub struct FluxLora {
    /// The file.
    pub path: PathBuf,
    /// Multiplier of its update.
    pub strength: f32,
}

impl FluxLora {
    /// A LoRA at `path` with `strength`.
    pub fn new(path: impl Into<PathBuf>, strength: f32) -> Self {
        Self { path: path.into(), strength }
    }
}

/// Opens `loras`, matches their modules against a transformer with `config`, and wraps `inner`
/// so the merged weights are served; returns the backend and what each adapter matched.
///
/// An adapter that matches nothing is an error; unmatched modules of a partly matching one (CLIP
/// `lora_te1_*` modules, for instance) are reported and logged.
pub fn wrap_backend(
    inner: Box<dyn SimpleBackend>,
    config: &Config,
    loras: &[FluxLora],
) -> Result<(Box<dyn SimpleBackend>, Vec<AdapterReport>)> {
    let table = KeyTable::new(lora_targets(config));
    let plan = TransformerLoras {
        family: sd_models::ModelFamily::Flux,
        model: "FLUX transformer",
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

/// Parses `path[:strength]` (strength defaults to 1 and may be negative), as sd-lora's specs.
pub fn parse_lora_spec(spec: &str) -> Result<FluxLora> {
    let (path, strength) = sd_lora::parse_spec(spec)?;
    Ok(FluxLora { path, strength })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_every_naming_scheme_resolve() {
        let cfg = Config::dev();
        let t = lora_targets(&cfg);
        let t = KeyTable::new(t);
        let r = |k: &str| t.get(k).cloned();
        let qkv = |rows| Some(LoraTarget { weight: "double_blocks.3.img_attn.qkv.weight".into(), rows, swap_halves: false });
        assert_eq!(r("lora_unet_double_blocks_3_img_attn_qkv"), qkv(None));
        assert_eq!(r("transformer.transformer_blocks.3.attn.to_k"), qkv(Some((3072, 3072))));
        assert_eq!(r("lora_transformer_transformer_blocks_3_attn_to_v"), qkv(Some((6144, 3072))));
        let mlp = r("transformer.single_transformer_blocks.37.proj_mlp").expect("proj_mlp");
        assert_eq!((mlp.weight.as_str(), mlp.rows), ("single_blocks.37.linear1.weight", Some((9216, 12288))));
        assert!(r("transformer.norm_out.linear").expect("norm_out").swap_halves);
        assert_eq!(r("lora_unet_final_layer_adaLN_modulation_1").map(|t| t.swap_halves), Some(false));
        assert_eq!(r("lora_te1_text_model_encoder_layers_0_mlp_fc1"), None);
        assert_eq!(r("transformer.transformer_blocks.19.attn.to_q"), None);
    }
}
