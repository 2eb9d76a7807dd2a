//! LoRA adapters for the FLUX.2 transformer, merged into the weights while it loads.
//!
//! sd-lora parses the files (kohya, PEFT, LyCORIS), computes each module's update and merges it
//! (`sd_lora::MergeBackend`, the one merge backend); this module is FLUX.2's key table: which BFL weight (and
//! which rows of it) each module key updates. The naming schemes understood, as diffusers'
//! `Flux2LoraLoaderMixin` reads them:
//!
//! - PEFT / diffusers (`Flux2KleinPipeline.save_lora_weights`): `transformer.transformer_blocks.0.attn.to_q`,
//!   `base_model.model.…`, with `lora_alpha` from the `lora_adapter_metadata` header diffusers writes;
//! - BFL names as ai-toolkit and ComfyUI write them: `diffusion_model.double_blocks.0.img_attn.qkv`
//!   (`lora_A`/`lora_B` or `lora_down`/`lora_up`, also under `model.diffusion_model.` or bare);
//! - kohya sd-scripts: `lora_unet_double_blocks_0_img_attn_qkv` with `.alpha`, and diffusers names the same
//!   way (`lora_transformer_transformer_blocks_0_attn_to_q`).
//!
//! The model holds BFL's fused `qkv` of each stream: updates to diffusers' separate q/k/v (`attn.to_q`,
//! `attn.add_k_proj`) land in their rows, as sd-flux does for FLUX.1; an update to diffusers'
//! `norm_out.linear` gets its halves swapped, as the weight itself. (diffusers' own BFL-LoRA converter maps
//! `final_layer.adaLN_modulation.1` onto `norm_out.linear` without the swap; BFL names are merged here into
//! the BFL weight they name, as ComfyUI does.)

use std::collections::HashMap;
use std::path::PathBuf;

use candle_nn::var_builder::SimpleBackend;
use sd_lora::{AdapterReport, KeyTable, LoraAdapter, PeftAlphas, TransformerLoras};

use crate::config::Flux2Config;
use crate::error::{Error, Result};
use crate::keymap::{bfl_to_diffusers, linear_modules};

/// A LoRA to merge, with its strength (may be negative).
#[derive(Debug, Clone, PartialEq)]
pub struct Flux2Lora {
    /// The file.
    pub path: PathBuf,
    /// Multiplier of its update.
    pub strength: f32,
}

impl Flux2Lora {
    /// A LoRA at `path` with `strength`.
    pub fn new(path: impl Into<PathBuf>, strength: f32) -> Self {
        Self { path: path.into(), strength }
    }
}

/// Parses `path[:strength]` (strength defaults to 1 and may be negative), as sd-lora's specs.
pub fn parse_lora_spec(spec: &str) -> Result<Flux2Lora> {
    let (path, strength) = sd_lora::parse_spec(spec)?;
    Ok(Flux2Lora { path, strength })
}

/// The key table of a transformer with `cfg`: every module name a LoRA may use (BFL and diffusers, dotted,
/// without prefixes) with its target; the weights are named as the model asks for them, under `weight_prefix`
/// (`model.diffusion_model.` in ComfyUI's files, empty otherwise).
pub fn lora_targets(cfg: &Flux2Config, weight_prefix: &str) -> KeyTable {
    let mut out = HashMap::new();
    for module in linear_modules(cfg.num_layers, cfg.num_single_layers) {
        let source = bfl_to_diffusers(&format!("{module}.weight"));
        KeyTable::insert_renamed(&mut out, &module, &format!("{weight_prefix}{module}.weight"), cfg.inner_dim(), source);
    }
    KeyTable::new(out)
}

/// What a LoRA that matches nothing here probably is, from its module keys.
fn foreign_hint(adapter: &LoraAdapter) -> String {
    let has = |p: &str| adapter.modules().iter().any(|m| m.key.contains(p));
    if has("img_mod") || has("txt_mod") || has("proj_mlp") || has("ff.net") || has("norm1.linear") || has("single_blocks.0.modulation") {
        "it looks like a FLUX.1 LoRA (per-block modulation); use a LoRA trained for FLUX.2 [klein]".into()
    } else if has("joint_blocks") {
        "it looks like an SD 3.x LoRA; use a LoRA trained for FLUX.2 [klein]".into()
    } else if has("input_blocks") || has("down_blocks") || has("up_blocks") || has("mid_block") {
        let family = adapter.likely_family().unwrap_or_else(|| "SD 1.x/2.x/XL".into());
        format!("it looks like a LoRA for {family} (UNet modules); use a LoRA trained for FLUX.2 [klein]")
    } else if has("noise_refiner") || has("context_refiner") {
        "it looks like a Z-Image LoRA; use a LoRA trained for FLUX.2 [klein]".into()
    } else if adapter.modules().iter().all(|m| m.key.starts_with("lora_te") || m.key.starts_with("text_encoder")) {
        "it only adapts text encoders, which FLUX.2 LoRAs are not merged into".into()
    } else {
        "FLUX.2 LoRAs name double_blocks.N / single_blocks.N (lora_unet_double_blocks_N_…, diffusion_model.double_blocks.N.…) \
         or transformer_blocks.N / single_transformer_blocks.N (transformer.transformer_blocks.N.…); is it for another model, \
         or for a klein of another size?"
            .into()
    }
}

/// Opens `loras`, matches their modules against a transformer with `cfg` whose weights `inner` serves (BFL
/// names under `weight_prefix`), and wraps `inner` so the merged weights are served; returns the backend and
/// what each adapter matched. An adapter that matches nothing is an error; unmatched modules of a partly
/// matching one (text-encoder modules, for instance) are reported and logged.
pub fn wrap_backend(
    inner: Box<dyn SimpleBackend>,
    cfg: &Flux2Config,
    weight_prefix: &str,
    loras: &[Flux2Lora],
) -> Result<(Box<dyn SimpleBackend>, Vec<AdapterReport>)> {
    let table = lora_targets(cfg, weight_prefix);
    let peft = PeftAlphas::default();
    let plan = TransformerLoras {
        family: sd_models::ModelFamily::Flux2,
        model: "FLUX.2 transformer",
        resolve: &|key| table.get(key).cloned(),
        factor: &|index, adapter, m| peft.factor(index, adapter, m),
    };
    let files: Vec<(PathBuf, f32)> = loras.iter().map(|l| (l.path.clone(), l.strength)).collect();
    plan.wrap(inner, &files, &|path, adapter| Error::Lora(sd_lora::Error::no_match(path, "FLUX.2 [klein] transformer", adapter, foreign_hint(adapter))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sd_lora::Target;

    fn tiny() -> Flux2Config {
        serde_json::from_str(r#"{"in_channels": 32, "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 48, "timestep_guidance_channels": 32, "axes_dims_rope": [4, 4, 4, 4]}"#)
            .expect("config")
    }

    #[test]
    fn keys_of_every_naming_scheme_resolve() {
        let cfg = tiny();
        let t = lora_targets(&cfg, "model.diffusion_model.");
        let r = |k: &str| t.get(k).cloned();
        let qkv = "model.diffusion_model.double_blocks.1.txt_attn.qkv.weight";
        assert_eq!(r("lora_unet_double_blocks_1_txt_attn_qkv"), Some(Target::whole(qkv)));
        assert_eq!(r("diffusion_model.double_blocks.1.txt_attn.qkv"), Some(Target::whole(qkv)));
        assert_eq!(r("transformer.transformer_blocks.1.attn.add_k_proj"), Some(Target { weight: qkv.into(), rows: Some((32, 32)), swap_halves: false }));
        assert_eq!(r("lora_transformer_transformer_blocks_1_attn_add_k_proj").map(|t| t.rows), Some(Some((32, 32))));
        assert_eq!(r("base_model.model.single_transformer_blocks.0.attn.to_qkv_mlp_proj").map(|t| t.weight), Some("model.diffusion_model.single_blocks.0.linear1.weight".into()));
        let norm_out = r("transformer.norm_out.linear").expect("norm_out");
        assert!(norm_out.swap_halves && norm_out.weight.ends_with("final_layer.adaLN_modulation.1.weight"));
        assert!(!r("diffusion_model.final_layer.adaLN_modulation.1").expect("adaLN").swap_halves);
        assert_eq!(r("transformer.double_stream_modulation_img.linear").map(|t| t.weight), Some("model.diffusion_model.double_stream_modulation_img.lin.weight".into()));
        assert_eq!(r("lora_unet_double_blocks_2_img_attn_qkv"), None);
        assert_eq!(r("lora_unet_double_blocks_0_img_mod_lin"), None);
        assert_eq!(r("lora_te1_text_model_encoder_layers_0_mlp_fc1"), None);
    }
}
