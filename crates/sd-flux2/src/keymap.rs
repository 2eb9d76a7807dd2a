//! The two names of every FLUX.2 transformer weight. The model asks for Black Forest Labs' original names
//! (`double_blocks.N.img_attn.qkv.weight`, `single_blocks.N.linear1.weight`, RMSNorm weights as `.scale`),
//! which BFL's and ComfyUI's single files store; a diffusers folder stores diffusers' names, which
//! [`bfl_to_diffusers`] maps to, as the exact inverse of diffusers'
//! `convert_flux2_transformer_checkpoint_to_diffusers`: the fused `qkv` of each stream is diffusers' separate
//! q, k and v concatenated, and `final_layer.adaLN_modulation.1` (shift, scale) is `norm_out.linear`
//! (scale, shift) with its halves swapped.

use candle_core::safetensors::MmapedSafetensors;
use sd_models::weights::{RenamedWeights, Source};

/// Top-level weights: BFL name, diffusers name.
const TOP: [(&str, &str); 8] = [
    ("img_in.weight", "x_embedder.weight"),
    ("txt_in.weight", "context_embedder.weight"),
    ("time_in.in_layer.weight", "time_guidance_embed.timestep_embedder.linear_1.weight"),
    ("time_in.out_layer.weight", "time_guidance_embed.timestep_embedder.linear_2.weight"),
    ("double_stream_modulation_img.lin.weight", "double_stream_modulation_img.linear.weight"),
    ("double_stream_modulation_txt.lin.weight", "double_stream_modulation_txt.linear.weight"),
    ("single_stream_modulation.lin.weight", "single_stream_modulation.linear.weight"),
    ("final_layer.linear.weight", "proj_out.weight"),
];

/// Weights inside `double_blocks.N.` / `transformer_blocks.N.`, besides the fused q/k/v.
const DOUBLE: [(&str, &str); 10] = [
    ("img_attn.norm.query_norm.scale", "attn.norm_q.weight"),
    ("img_attn.norm.key_norm.scale", "attn.norm_k.weight"),
    ("img_attn.proj.weight", "attn.to_out.0.weight"),
    ("img_mlp.0.weight", "ff.linear_in.weight"),
    ("img_mlp.2.weight", "ff.linear_out.weight"),
    ("txt_attn.norm.query_norm.scale", "attn.norm_added_q.weight"),
    ("txt_attn.norm.key_norm.scale", "attn.norm_added_k.weight"),
    ("txt_attn.proj.weight", "attn.to_add_out.weight"),
    ("txt_mlp.0.weight", "ff_context.linear_in.weight"),
    ("txt_mlp.2.weight", "ff_context.linear_out.weight"),
];

/// The fused q/k/v of each stream and the diffusers projections they concatenate.
const QKV: [(&str, [&str; 3]); 2] = [
    ("img_attn.qkv.weight", ["attn.to_q.weight", "attn.to_k.weight", "attn.to_v.weight"]),
    ("txt_attn.qkv.weight", ["attn.add_q_proj.weight", "attn.add_k_proj.weight", "attn.add_v_proj.weight"]),
];

/// Weights inside `single_blocks.N.` / `single_transformer_blocks.N.`.
const SINGLE: [(&str, &str); 4] = [
    ("linear1.weight", "attn.to_qkv_mlp_proj.weight"),
    ("linear2.weight", "attn.to_out.weight"),
    ("norm.query_norm.scale", "attn.norm_q.weight"),
    ("norm.key_norm.scale", "attn.norm_k.weight"),
];

const FINAL_MOD: (&str, &str) = ("final_layer.adaLN_modulation.1.weight", "norm_out.linear.weight");

/// Splits `double_blocks.3.rest` into `(3, "rest")` for `prefix` `double_blocks.`.
fn block<'a>(name: &'a str, prefix: &str) -> Option<(usize, &'a str)> {
    let rest = name.strip_prefix(prefix)?;
    let (i, rest) = rest.split_once('.')?;
    Some((i.parse().ok()?, rest))
}

/// Where the diffusers files store the weight the model asks for by its BFL name `name`.
pub fn bfl_to_diffusers(name: &str) -> Option<Source> {
    if let Some((_, d)) = TOP.iter().find(|(b, _)| *b == name) {
        return Some(Source::Rename((*d).to_string()));
    }
    if name == FINAL_MOD.0 {
        return Some(Source::SwapHalves(FINAL_MOD.1.to_string()));
    }
    if let Some((i, rest)) = block(name, "double_blocks.") {
        let d = format!("transformer_blocks.{i}.");
        if let Some((_, parts)) = QKV.iter().find(|(b, _)| *b == rest) {
            return Some(Source::Concat(parts.iter().map(|p| format!("{d}{p}")).collect()));
        }
        return DOUBLE.iter().find(|(b, _)| *b == rest).map(|(_, p)| Source::Rename(format!("{d}{p}")));
    }
    if let Some((i, rest)) = block(name, "single_blocks.") {
        return SINGLE.iter().find(|(b, _)| *b == rest).map(|(_, p)| Source::Rename(format!("single_transformer_blocks.{i}.{p}")));
    }
    None
}

/// A backend serving BFL names out of a diffusers `transformer/` folder's weights.
pub fn diffusers_backend(st: MmapedSafetensors, source: impl Into<String>) -> RenamedWeights {
    RenamedWeights::new(st, Box::new(bfl_to_diffusers), source, "a diffusers FLUX.2 transformer folder")
}

/// The BFL names of the linear layers of a transformer with `layers` double and `single` single blocks
/// (module names, without `.weight`): what LoRAs may update.
pub fn linear_modules(layers: usize, single: usize) -> Vec<String> {
    let mut m: Vec<String> = TOP.iter().map(|(b, _)| b.trim_end_matches(".weight").to_string()).collect();
    m.push(FINAL_MOD.0.trim_end_matches(".weight").to_string());
    let double = QKV.iter().map(|(b, _)| *b).chain(DOUBLE.iter().map(|(b, _)| *b)).filter(|b| b.ends_with(".weight"));
    let double: Vec<&str> = double.collect();
    for i in 0..layers {
        m.extend(double.iter().map(|b| format!("double_blocks.{i}.{}", b.trim_end_matches(".weight"))));
    }
    for i in 0..single {
        for (b, _) in SINGLE.iter().filter(|(b, _)| b.ends_with(".weight")) {
            m.push(format!("single_blocks.{i}.{}", b.trim_end_matches(".weight")));
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bfl_name_has_its_diffusers_source() {
        assert_eq!(bfl_to_diffusers("img_in.weight"), Some(Source::Rename("x_embedder.weight".into())));
        assert_eq!(
            bfl_to_diffusers("double_blocks.1.txt_attn.qkv.weight"),
            Some(Source::Concat(vec!["transformer_blocks.1.attn.add_q_proj.weight".into(), "transformer_blocks.1.attn.add_k_proj.weight".into(), "transformer_blocks.1.attn.add_v_proj.weight".into()]))
        );
        assert_eq!(bfl_to_diffusers("single_blocks.12.norm.key_norm.scale"), Some(Source::Rename("single_transformer_blocks.12.attn.norm_k.weight".into())));
        assert_eq!(bfl_to_diffusers("final_layer.adaLN_modulation.1.weight"), Some(Source::SwapHalves("norm_out.linear.weight".into())));
        assert_eq!(bfl_to_diffusers("guidance_in.in_layer.weight"), None);
        assert_eq!(bfl_to_diffusers("double_blocks.x.img_mlp.0.weight"), None);
        let m = linear_modules(2, 1);
        assert!(m.contains(&"double_blocks.1.img_attn.qkv".to_string()) && m.contains(&"double_blocks.0.txt_mlp.2".to_string()));
        assert!(m.contains(&"single_blocks.0.linear1".to_string()) && !m.iter().any(|n| n.contains("norm")));
        assert_eq!(m.len(), 9 + 2 * 8 + 2);
    }
}
