//! LoRA adapters for the SD 3.x MMDiT, merged into the weights while it loads.
//!
//! sd-lora parses the files (kohya, PEFT, LyCORIS), computes each module's update and merges it
//! (`sd_lora::MergeBackend`, the one merge backend); this module is SD3's key table: which Stability weight
//! (and which rows of it) each module key updates. The naming schemes understood:
//!
//! - kohya sd-scripts (`sd3_train_network.py`) and ComfyUI with Stability names:
//!   `lora_unet_joint_blocks_0_x_block_attn_qkv`, `lora_unet_final_layer_adaLN_modulation_1` (also `lycoris_…`);
//! - ComfyUI's generic dotted Stability names: `diffusion_model.joint_blocks.0.x_block.attn.qkv`
//!   (or `model.diffusion_model.…`, or bare);
//! - PEFT / diffusers (`StableDiffusion3Pipeline.save_lora_weights`): `transformer.transformer_blocks.0.attn.to_q`,
//!   `base_model.model.transformer_blocks.0.attn.to_q`, with `lora_alpha` read from the `lora_adapter_metadata`
//!   header diffusers writes;
//! - OneTrainer / kohya with diffusers names: `lora_transformer_transformer_blocks_0_attn_to_q`.
//!
//! Updates to diffusers' separate q/k/v (`attn.to_q`, `attn.add_k_proj`, `attn2.to_v`) land in their rows
//! (`0`, `h`, `2h`) of the fused Stability `qkv` weight; updates to `norm_out.linear` and to the last block's
//! `norm1_context.linear` get their halves swapped, as `keymap::sai_to_diffusers` swaps the weights. Text
//! encoder modules (`lora_te1_`, `lora_te2_`, `lora_te3_`, `text_encoder.`) are reported unmatched.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_nn::var_builder::SimpleBackend;
use sd_lora::{AdapterReport, KeyTable, LoraAdapter, TransformerLoras};

use crate::config::Sd3Config;
use crate::error::{Error, Result};
use crate::keymap::sai_to_diffusers;

/// Where a LoRA module's update goes (sd-lora's merge target: a weight, the rows of a fused one, or
/// swapped halves).
pub use sd_lora::Target as LoraTarget;

/// The linear (and patch-embedding conv) layers of an MMDiT with `cfg`, as Stability module names (no `.weight`).
pub fn linear_modules(cfg: &Sd3Config) -> Vec<String> {
    let mut m: Vec<String> = ["x_embedder.proj", "context_embedder", "t_embedder.mlp.0", "t_embedder.mlp.2", "y_embedder.mlp.0", "y_embedder.mlp.2"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for i in 0..cfg.num_layers {
        let last = i + 1 == cfg.num_layers;
        let mut layers = vec!["x_block.attn.qkv", "x_block.attn.proj", "x_block.adaLN_modulation.1", "x_block.mlp.fc1", "x_block.mlp.fc2"];
        if cfg.dual_attention_layers.contains(&i) {
            layers.extend(["x_block.attn2.qkv", "x_block.attn2.proj"]);
        }
        layers.extend(["context_block.attn.qkv", "context_block.adaLN_modulation.1"]);
        if !last {
            layers.extend(["context_block.attn.proj", "context_block.mlp.fc1", "context_block.mlp.fc2"]);
        }
        m.extend(layers.into_iter().map(|l| format!("joint_blocks.{i}.{l}")));
    }
    m.extend(["final_layer.linear".to_string(), "final_layer.adaLN_modulation.1".to_string()]);
    m
}

/// The key table of `cfg`: every module name a LoRA may use (Stability and diffusers, dotted, without
/// prefixes) with its target; the target weights are named as the model asks for them, under `weight_prefix`
/// (`model.diffusion_model.` in Stability's single files, empty otherwise).
pub fn lora_targets(cfg: &Sd3Config, weight_prefix: &str) -> KeyTable {
    let mut out = HashMap::new();
    for module in linear_modules(cfg) {
        let source = sai_to_diffusers(&format!("{module}.weight"), cfg.num_layers);
        KeyTable::insert_renamed(&mut out, &module, &format!("{weight_prefix}{module}.weight"), cfg.hidden(), source);
    }
    KeyTable::new(out)
}

/// A LoRA to merge, with its strength (may be negative).
#[derive(Debug, Clone, PartialEq)]
pub struct Sd3Lora {
    /// The file.
    pub path: PathBuf,
    /// Multiplier of its update.
    pub strength: f32,
}

impl Sd3Lora {
    /// A LoRA at `path` with `strength`.
    pub fn new(path: impl Into<PathBuf>, strength: f32) -> Self {
        Self { path: path.into(), strength }
    }
}

/// Parses `path[:strength]` (strength defaults to 1 and may be negative), as sd-lora's specs.
pub fn parse_lora_spec(spec: &str) -> Result<Sd3Lora> {
    let (path, strength) = sd_lora::parse_spec(spec)?;
    Ok(Sd3Lora { path, strength })
}

/// What a LoRA that matches nothing here probably is, from its module keys.
fn foreign_hint(adapter: &LoraAdapter) -> String {
    let has = |p: &str| adapter.modules().iter().any(|m| m.key.contains(p));
    if has("double_blocks") || has("single_blocks") || has("single_transformer_blocks") {
        "it looks like a FLUX LoRA; use a LoRA trained for SD 3.x".into()
    } else if has("input_blocks") || has("down_blocks") || has("up_blocks") || has("mid_block") {
        let family = adapter.likely_family().unwrap_or_else(|| "SD 1.x/2.x/XL".into());
        format!("it looks like a LoRA for {family} (UNet modules); use a LoRA trained for SD 3.x")
    } else if adapter.modules().iter().all(|m| m.key.starts_with("lora_te") || m.key.starts_with("text_encoder")) {
        "it only adapts text encoders, which SD 3.x LoRAs are not merged into".into()
    } else {
        "is it an SDXL/FLUX LoRA? SD 3.x LoRAs name joint_blocks.N (lora_unet_joint_blocks_N_…) or transformer_blocks.N \
         (transformer.transformer_blocks.N.…)"
            .into()
    }
}

/// Opens `loras`, matches their modules against an MMDiT with `cfg` whose weights `inner` serves under
/// `weight_prefix`, and wraps `inner` so the merged weights are served; returns the backend and what each
/// adapter matched.
///
/// An adapter that matches nothing is an error; unmatched modules of a partly matching one (CLIP
/// `lora_te1_*` modules, for instance) are reported and logged.
pub fn wrap_backend(
    inner: Box<dyn SimpleBackend>,
    cfg: &Sd3Config,
    weight_prefix: &str,
    loras: &[Sd3Lora],
) -> Result<(Box<dyn SimpleBackend>, Vec<AdapterReport>)> {
    let table = lora_targets(cfg, weight_prefix);
    let peft = sd_lora::PeftAlphas::default();
    let plan = TransformerLoras {
        family: sd_models::ModelFamily::Sd3,
        model: "SD 3.x transformer",
        resolve: &|key| table.get(key).cloned(),
        factor: &|index, adapter, m| peft.factor(index, adapter, m),
    };
    let files: Vec<(PathBuf, f32)> = loras.iter().map(|l| (l.path.clone(), l.strength)).collect();
    plan.wrap(inner, &files, &|path, adapter| Error::Lora(sd_lora::Error::no_match(path, "SD 3.x transformer", adapter, foreign_hint(adapter))))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SD 3.5 Medium's layout at the tiny width: 3 blocks, dual attention in block 0.
    fn tiny() -> Sd3Config {
        serde_json::from_str(
            r#"{"num_layers": 3, "attention_head_dim": 8, "num_attention_heads": 4, "caption_projection_dim": 32,
                "joint_attention_dim": 64, "pooled_projection_dim": 56, "pos_embed_max_size": 16, "qk_norm": "rms_norm",
                "dual_attention_layers": [0]}"#,
        )
        .expect("config")
    }

    #[test]
    fn every_stability_linear_is_reachable_from_both_naming_schemes() {
        let cfg = tiny();
        let t = lora_targets(&cfg, "model.diffusion_model.");
        let modules = linear_modules(&cfg);
        // 6 embedders + 3 blocks (11 with attn2, 10, 7 in the last) + 2 final layers.
        assert_eq!(modules.len(), 6 + 12 + 10 + 7 + 2);
        for m in &modules {
            let weight = format!("model.diffusion_model.{m}.weight");
            let kohya = format!("lora_unet_{}", m.replace('.', "_"));
            assert_eq!(t.get(&kohya).map(|t| t.weight.as_str()), Some(weight.as_str()), "{kohya}");
            assert_eq!(t.get(&format!("diffusion_model.{m}")).map(|t| t.weight.as_str()), Some(weight.as_str()));
            // Every weight is reached by diffusers names too (all of them, for a fused qkv).
            let diffusers: Vec<&String> =
                t.targets().iter().filter(|(k, v)| v.weight == weight && (!modules.contains(k) || k.as_str() == "context_embedder")).map(|(k, _)| k).collect();
            assert!(!diffusers.is_empty(), "{m} has no diffusers name");
            for d in diffusers {
                assert_eq!(t.get(&format!("transformer.{d}")).map(|t| t.weight.as_str()), Some(weight.as_str()), "{d}");
                let onetrainer = format!("lora_transformer_{}", d.replace('.', "_"));
                assert_eq!(t.get(&onetrainer).map(|t| t.weight.as_str()), Some(weight.as_str()), "{onetrainer}");
            }
        }
    }

    #[test]
    fn qkv_rows_and_swapped_halves_land_where_the_keymap_puts_them() {
        let cfg = tiny();
        let t = lora_targets(&cfg, "");
        let r = |k: &str| t.get(k).cloned();
        let at = |w: &str, rows, swap_halves| Some(LoraTarget { weight: w.into(), rows, swap_halves });
        let qkv = "joint_blocks.0.x_block.attn.qkv.weight";
        assert_eq!(r("transformer.transformer_blocks.0.attn.to_q"), at(qkv, Some((0, 32)), false));
        assert_eq!(r("transformer.transformer_blocks.0.attn.to_k"), at(qkv, Some((32, 32)), false));
        assert_eq!(r("lora_transformer_transformer_blocks_0_attn_to_v"), at(qkv, Some((64, 32)), false));
        assert_eq!(r("lora_unet_joint_blocks_0_x_block_attn_qkv"), at(qkv, None, false));
        let ctx = "joint_blocks.2.context_block.attn.qkv.weight";
        assert_eq!(r("transformer.transformer_blocks.2.attn.add_k_proj"), at(ctx, Some((32, 32)), false));
        let attn2 = "joint_blocks.0.x_block.attn2.qkv.weight";
        assert_eq!(r("base_model.model.transformer_blocks.0.attn2.to_v"), at(attn2, Some((64, 32)), false));
        assert_eq!(r("transformer.transformer_blocks.1.attn2.to_q"), None, "block 1 has no attn2");
        // Halves: swapped between layouts for the final adaLN and the last block's context adaLN only.
        assert_eq!(r("transformer.norm_out.linear"), at("final_layer.adaLN_modulation.1.weight", None, true));
        assert_eq!(r("lora_unet_final_layer_adaLN_modulation_1"), at("final_layer.adaLN_modulation.1.weight", None, false));
        assert_eq!(r("transformer.transformer_blocks.2.norm1_context.linear"), at("joint_blocks.2.context_block.adaLN_modulation.1.weight", None, true));
        assert_eq!(r("transformer.transformer_blocks.1.norm1_context.linear"), at("joint_blocks.1.context_block.adaLN_modulation.1.weight", None, false));
        assert_eq!(r("transformer.transformer_blocks.0.ff.net.0.proj"), at("joint_blocks.0.x_block.mlp.fc1.weight", None, false));
        assert_eq!(r("transformer.time_text_embed.text_embedder.linear_2"), at("y_embedder.mlp.2.weight", None, false));
        assert_eq!(r("transformer.pos_embed.proj"), at("x_embedder.proj.weight", None, false));
        // The last block's context stream has no output projection or MLP; text encoders and FLUX are not here.
        assert_eq!(r("transformer.transformer_blocks.2.attn.to_add_out"), None);
        assert_eq!(r("lora_unet_joint_blocks_2_context_block_mlp_fc1"), None);
        assert_eq!(r("lora_te1_text_model_encoder_layers_0_mlp_fc1"), None);
        assert_eq!(r("lora_unet_double_blocks_0_img_attn_qkv"), None);
        assert_eq!(r("transformer.transformer_blocks.3.attn.to_q"), None);
    }
}
