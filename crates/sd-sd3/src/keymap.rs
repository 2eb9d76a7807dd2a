//! Weight names: the model is written with Stability's names (`joint_blocks.N.x_block.attn.qkv`, as the
//! official single files store them); diffusers folders are served to it through a renaming backend
//! (`sd_models::weights::RenamedWeights`) with the map below, the inverse of diffusers'
//! `convert_sd3_transformer_checkpoint_to_diffusers`.

use candle_core::safetensors::MmapedSafetensors;
use sd_models::weights::{RenamedWeights, Source};

/// The number of joint blocks among tensor names (`joint_blocks.N.…`, with or without a prefix).
pub fn count_blocks<'a>(names: impl Iterator<Item = &'a str>) -> usize {
    names
        .filter_map(|n| {
            let rest = &n[n.find("joint_blocks.")? + "joint_blocks.".len()..];
            rest.split('.').next()?.parse::<usize>().ok()
        })
        .max()
        .map_or(0, |m| m + 1)
}

/// Where the Stability tensor `name` lives in a diffusers `SD3Transformer2DModel` state dict of
/// `num_layers` blocks; `None` for names SD3 does not have.
///
/// The last block's context half only projects (`context_pre_only`): its adaLN emits (shift, scale) in
/// Stability's files and (scale, shift) in diffusers', as does the final layer's.
pub fn sai_to_diffusers(name: &str, num_layers: usize) -> Option<Source> {
    if name == "pos_embed" {
        return Some(Source::Rename("pos_embed.pos_embed".into()));
    }
    let (stem, param) = name.rsplit_once('.')?;
    let top = |d: &str| Some(Source::Rename(format!("{d}.{param}")));
    match stem {
        "x_embedder.proj" => return top("pos_embed.proj"),
        "context_embedder" => return top("context_embedder"),
        "t_embedder.mlp.0" => return top("time_text_embed.timestep_embedder.linear_1"),
        "t_embedder.mlp.2" => return top("time_text_embed.timestep_embedder.linear_2"),
        "y_embedder.mlp.0" => return top("time_text_embed.text_embedder.linear_1"),
        "y_embedder.mlp.2" => return top("time_text_embed.text_embedder.linear_2"),
        "final_layer.linear" => return top("proj_out"),
        "final_layer.adaLN_modulation.1" => return Some(Source::SwapHalves(format!("norm_out.linear.{param}"))),
        _ => {}
    }
    let rest = stem.strip_prefix("joint_blocks.")?;
    let (index, rest) = rest.split_once('.')?;
    let i: usize = index.parse().ok()?;
    let p = format!("transformer_blocks.{i}.");
    let one = |d: &str| Some(Source::Rename(format!("{p}{d}.{param}")));
    let three = |a: &str, b: &str, c: &str| Some(Source::Concat([a, b, c].iter().map(|x| format!("{p}{x}.{param}")).collect()));
    match rest {
        "x_block.attn.qkv" => three("attn.to_q", "attn.to_k", "attn.to_v"),
        "x_block.attn.proj" => one("attn.to_out.0"),
        "x_block.attn.ln_q" => one("attn.norm_q"),
        "x_block.attn.ln_k" => one("attn.norm_k"),
        "x_block.attn2.qkv" => three("attn2.to_q", "attn2.to_k", "attn2.to_v"),
        "x_block.attn2.proj" => one("attn2.to_out.0"),
        "x_block.attn2.ln_q" => one("attn2.norm_q"),
        "x_block.attn2.ln_k" => one("attn2.norm_k"),
        "x_block.adaLN_modulation.1" => one("norm1.linear"),
        "x_block.mlp.fc1" => one("ff.net.0.proj"),
        "x_block.mlp.fc2" => one("ff.net.2"),
        "context_block.attn.qkv" => three("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
        "context_block.attn.proj" => one("attn.to_add_out"),
        "context_block.attn.ln_q" => one("attn.norm_added_q"),
        "context_block.attn.ln_k" => one("attn.norm_added_k"),
        "context_block.adaLN_modulation.1" if i + 1 == num_layers => {
            Some(Source::SwapHalves(format!("{p}norm1_context.linear.{param}")))
        }
        "context_block.adaLN_modulation.1" => one("norm1_context.linear"),
        "context_block.mlp.fc1" => one("ff_context.net.0.proj"),
        "context_block.mlp.fc2" => one("ff_context.net.2"),
        _ => None,
    }
}

/// The number of blocks a diffusers state dict has (`transformer_blocks.N.…`).
pub fn count_diffusers_blocks<'a>(names: impl Iterator<Item = &'a str>) -> usize {
    names
        .filter_map(|n| n.strip_prefix("transformer_blocks.")?.split('.').next()?.parse::<usize>().ok())
        .max()
        .map_or(0, |m| m + 1)
}

/// Serves Stability names from a diffusers `transformer/` state dict (one file or all shards) of
/// `num_layers` blocks.
pub fn diffusers_backend(st: MmapedSafetensors, num_layers: usize, source: impl Into<String>) -> RenamedWeights {
    RenamedWeights::new(st, Box::new(move |n: &str| sai_to_diffusers(n, num_layers)), source, "an SD 3.x transformer folder")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_diffusers_converter() {
        use Source::*;
        assert_eq!(sai_to_diffusers("pos_embed", 24), Some(Rename("pos_embed.pos_embed".into())));
        assert_eq!(sai_to_diffusers("x_embedder.proj.weight", 24), Some(Rename("pos_embed.proj.weight".into())));
        assert_eq!(
            sai_to_diffusers("joint_blocks.3.context_block.attn.qkv.bias", 24),
            Some(Concat(vec![
                "transformer_blocks.3.attn.add_q_proj.bias".into(),
                "transformer_blocks.3.attn.add_k_proj.bias".into(),
                "transformer_blocks.3.attn.add_v_proj.bias".into()
            ]))
        );
        assert_eq!(
            sai_to_diffusers("joint_blocks.22.context_block.adaLN_modulation.1.weight", 24),
            Some(Rename("transformer_blocks.22.norm1_context.linear.weight".into()))
        );
        assert_eq!(
            sai_to_diffusers("joint_blocks.23.context_block.adaLN_modulation.1.weight", 24),
            Some(SwapHalves("transformer_blocks.23.norm1_context.linear.weight".into()))
        );
        assert_eq!(sai_to_diffusers("final_layer.adaLN_modulation.1.bias", 24), Some(SwapHalves("norm_out.linear.bias".into())));
        assert_eq!(sai_to_diffusers("joint_blocks.0.x_block.attn2.ln_k.weight", 24), Some(Rename("transformer_blocks.0.attn2.norm_k.weight".into())));
        assert_eq!(sai_to_diffusers("joint_blocks.x.x_block.attn.qkv.weight", 24), None);
        assert_eq!(sai_to_diffusers("double_blocks.0.img_attn.qkv.weight", 24), None);
        assert_eq!(count_blocks(["model.diffusion_model.joint_blocks.23.x_block.mlp.fc1.weight", "joint_blocks.2.x"].into_iter()), 24);
    }
}
