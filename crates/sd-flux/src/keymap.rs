//! Weight names: serving the Black Forest Labs names candle's FLUX model asks for out of files
//! stored with diffusers names (the `transformer/` folder) or LDM names (`ae.safetensors`).
//!
//! Both are `candle_nn` `SimpleBackend`s ([`RenamedWeights`]), so nothing is converted ahead of time: each tensor is
//! renamed, fused (q/k/v → `qkv`, single blocks' q/k/v/MLP-in → `linear1`) or reordered
//! (`norm_out.linear` halves) when the model asks for it.

use candle_core::safetensors::MmapedSafetensors;
use sd_models::weights::RenamedWeights;

/// How one BFL tensor is assembled from diffusers tensors (fused q/k/v and single blocks' `linear1` are
/// concatenations; BFL's final adaLN emits (shift, scale), diffusers' `AdaLayerNormContinuous` (scale, shift)).
pub use sd_models::weights::Source as DiffusersSource;

/// Where the BFL tensor `name` (e.g. `double_blocks.3.img_attn.qkv.weight`) lives in a diffusers
/// `FluxTransformer2DModel` state dict; `None` for names FLUX does not have.
///
/// The inverse of diffusers' `convert_flux_transformer_checkpoint_to_diffusers`.
pub fn bfl_to_diffusers(name: &str) -> Option<DiffusersSource> {
    use DiffusersSource::*;
    let (stem, param) = name.rsplit_once('.')?;
    // qk-norm gains are `scale` in BFL files and `weight` in diffusers.
    let dparam = if param == "scale" { "weight" } else { param };
    let top = |d: &str| Some(Rename(format!("{d}.{dparam}")));
    match stem {
        "img_in" => return top("x_embedder"),
        "txt_in" => return top("context_embedder"),
        "time_in.in_layer" => return top("time_text_embed.timestep_embedder.linear_1"),
        "time_in.out_layer" => return top("time_text_embed.timestep_embedder.linear_2"),
        "vector_in.in_layer" => return top("time_text_embed.text_embedder.linear_1"),
        "vector_in.out_layer" => return top("time_text_embed.text_embedder.linear_2"),
        "guidance_in.in_layer" => return top("time_text_embed.guidance_embedder.linear_1"),
        "guidance_in.out_layer" => return top("time_text_embed.guidance_embedder.linear_2"),
        "final_layer.linear" => return top("proj_out"),
        "final_layer.adaLN_modulation.1" => return Some(SwapHalves(format!("norm_out.linear.{dparam}"))),
        _ => {}
    }
    let (kind, rest) = stem.split_once('.')?;
    let (index, rest) = rest.split_once('.')?;
    let index: usize = index.parse().ok()?;
    let (prefix, one): (String, &str) = match (kind, rest) {
        ("double_blocks", r) => (
            format!("transformer_blocks.{index}."),
            match r {
                "img_mod.lin" => "norm1.linear",
                "txt_mod.lin" => "norm1_context.linear",
                "img_attn.norm.query_norm" => "attn.norm_q",
                "img_attn.norm.key_norm" => "attn.norm_k",
                "txt_attn.norm.query_norm" => "attn.norm_added_q",
                "txt_attn.norm.key_norm" => "attn.norm_added_k",
                "img_attn.proj" => "attn.to_out.0",
                "txt_attn.proj" => "attn.to_add_out",
                "img_mlp.0" => "ff.net.0.proj",
                "img_mlp.2" => "ff.net.2",
                "txt_mlp.0" => "ff_context.net.0.proj",
                "txt_mlp.2" => "ff_context.net.2",
                "img_attn.qkv" => {
                    let p = format!("transformer_blocks.{index}.attn.");
                    return Some(Concat(["to_q", "to_k", "to_v"].iter().map(|x| format!("{p}{x}.{dparam}")).collect()));
                }
                "txt_attn.qkv" => {
                    let p = format!("transformer_blocks.{index}.attn.");
                    return Some(Concat(
                        ["add_q_proj", "add_k_proj", "add_v_proj"].iter().map(|x| format!("{p}{x}.{dparam}")).collect(),
                    ));
                }
                _ => return None,
            },
        ),
        ("single_blocks", r) => (
            format!("single_transformer_blocks.{index}."),
            match r {
                "modulation.lin" => "norm.linear",
                "linear2" => "proj_out",
                "norm.query_norm" => "attn.norm_q",
                "norm.key_norm" => "attn.norm_k",
                "linear1" => {
                    let p = format!("single_transformer_blocks.{index}.");
                    return Some(Concat(
                        ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"].iter().map(|x| format!("{p}{x}.{dparam}")).collect(),
                    ));
                }
                _ => return None,
            },
        ),
        _ => return None,
    };
    Some(Rename(format!("{prefix}{one}.{dparam}")))
}

/// Serves BFL names from a diffusers `transformer/` state dict (one file or all shards).
pub fn diffusers_backend(st: MmapedSafetensors, source: impl Into<String>) -> RenamedWeights {
    RenamedWeights::new(st, Box::new(bfl_to_diffusers), source, "a FLUX transformer folder")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_diffusers_converter() {
        use DiffusersSource::*;
        assert_eq!(bfl_to_diffusers("img_in.weight"), Some(Rename("x_embedder.weight".into())));
        assert_eq!(
            bfl_to_diffusers("double_blocks.2.txt_attn.norm.key_norm.scale"),
            Some(Rename("transformer_blocks.2.attn.norm_added_k.weight".into()))
        );
        assert_eq!(
            bfl_to_diffusers("double_blocks.0.img_attn.qkv.bias"),
            Some(Concat(vec![
                "transformer_blocks.0.attn.to_q.bias".into(),
                "transformer_blocks.0.attn.to_k.bias".into(),
                "transformer_blocks.0.attn.to_v.bias".into()
            ]))
        );
        assert_eq!(
            bfl_to_diffusers("single_blocks.37.linear1.weight"),
            Some(Concat(vec![
                "single_transformer_blocks.37.attn.to_q.weight".into(),
                "single_transformer_blocks.37.attn.to_k.weight".into(),
                "single_transformer_blocks.37.attn.to_v.weight".into(),
                "single_transformer_blocks.37.proj_mlp.weight".into()
            ]))
        );
        assert_eq!(
            bfl_to_diffusers("final_layer.adaLN_modulation.1.bias"),
            Some(SwapHalves("norm_out.linear.bias".into()))
        );
        assert_eq!(bfl_to_diffusers("single_blocks.1.linear2.weight"), Some(Rename("single_transformer_blocks.1.proj_out.weight".into())));
        assert_eq!(bfl_to_diffusers("double_blocks.x.img_mod.lin.weight"), None);
        assert_eq!(bfl_to_diffusers("model.diffusion_model.input_blocks.0.0.weight"), None);
    }
}
