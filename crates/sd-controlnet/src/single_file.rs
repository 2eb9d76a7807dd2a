//! Single-file ControlNets as A1111/civitai users have them: `control_*.safetensors` with the original
//! ControlNet names (`control_model.input_blocks.*`, `zero_convs.*`, `input_hint_block.*`,
//! `middle_block_out.*`, with or without the `control_model.` prefix), or a lone diffusers
//! `diffusion_pytorch_model.safetensors` renamed (most SDXL ControlNets on civitai).
//!
//! Such files carry no config; the geometry is read from the tensors and the attention head counts,
//! which no tensor shape reveals, come from the base UNet the ControlNet was trained against.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use sd_models::keymap::unet_from_ldm;
use sd_models::single_file::SingleFile;
use sd_models::{PerBlock, UNetConfig};

use crate::config::ControlNetConfig;
use crate::error::{Error, Result};
use crate::model::ControlNetModel;

/// Prefix of ControlNet tensors in A1111 files (stripped when present).
pub const LDM_CONTROLNET_PREFIX: &str = "control_model.";

/// Maps an original ControlNet tensor name (without `control_model.`) to its diffusers name.
///
/// `hint_convs` is the number of convolutions in `input_hint_block` (8 in every released ControlNet);
/// the first is diffusers' `conv_in`, the last `conv_out`, the ones between `blocks.*`. The UNet-copy
/// part reuses sd-models' UNet map, so LoRA-style tooling and this loader agree on names.
pub fn controlnet_from_ldm(name: &str, unet: &UNetConfig, hint_convs: usize) -> Option<String> {
    let (head, rest) = name.split_once('.')?;
    match head {
        "zero_convs" => {
            let (i, rest) = rest.split_once('.')?;
            let rest = rest.strip_prefix("0.")?;
            Some(format!("controlnet_down_blocks.{}.{rest}", i.parse::<usize>().ok()?))
        }
        "middle_block_out" => Some(format!("controlnet_mid_block.{}", rest.strip_prefix("0.")?)),
        "input_hint_block" => {
            let (k, rest) = rest.split_once('.')?;
            let k = k.parse::<usize>().ok()?;
            // Odd indices are the SiLU activations of the original nn.Sequential: no weights.
            if k % 2 == 1 || hint_convs < 2 || k / 2 >= hint_convs {
                return None;
            }
            let conv = match k / 2 {
                0 => "conv_in".to_string(),
                i if i + 1 == hint_convs => "conv_out".to_string(),
                i => format!("blocks.{}", i - 1),
            };
            Some(format!("controlnet_cond_embedding.{conv}.{rest}"))
        }
        // The encoder copy and the embeddings are named exactly as in the UNet.
        "input_blocks" | "middle_block" | "time_embed" | "label_emb" => unet_from_ldm(name, unet),
        _ => None,
    }
}

/// A single-file ControlNet's tensor names (stored → diffusers) and its config, read from the header only.
struct Scan {
    file: SingleFile,
    names: Vec<(String, String)>,
    cfg: ControlNetConfig,
}

fn scan(path: &Path, base: &UNetConfig) -> Result<Scan> {
    let file = SingleFile::open(path)?;
    let infos = file.tensors();
    let prefixed = infos.iter().any(|t| t.name.starts_with(LDM_CONTROLNET_PREFIX));
    // Old full-model files also carry the UNet (`model.diffusion_model.*`); keep only the ControlNet.
    let stored: Vec<(&str, &str, &[usize])> = infos
        .iter()
        .filter_map(|t| {
            let short = if prefixed { t.name.strip_prefix(LDM_CONTROLNET_PREFIX)? } else { t.name.as_str() };
            Some((t.name.as_str(), short, t.shape.as_slice()))
        })
        .collect();
    let is_diffusers = stored.iter().any(|(_, n, _)| n.starts_with("controlnet_cond_embedding."));
    let is_ldm = stored.iter().any(|(_, n, _)| n.starts_with("input_hint_block."));
    if !is_diffusers && !is_ldm {
        let lora = stored.iter().any(|(_, n, _)| n.contains("lora"));
        return Err(Error::Incompatible(format!(
            "{} holds no ControlNet tensors (neither `input_hint_block.*` nor `controlnet_cond_embedding.*`){}",
            path.display(),
            if lora { "; it looks like a LoRA (control-LoRAs are not supported)" } else { "; is it a checkpoint rather than a ControlNet?" }
        )));
    }
    let hint_convs = stored
        .iter()
        .filter_map(|(_, n, _)| n.strip_prefix("input_hint_block.")?.split('.').next()?.parse::<usize>().ok())
        .max()
        .map_or(0, |k| k / 2 + 1);
    let mut names = Vec::with_capacity(stored.len());
    let mut shapes = HashMap::with_capacity(stored.len());
    for (stored_name, short, shape) in stored {
        let name = if is_diffusers { Some(short.to_string()) } else { controlnet_from_ldm(short, base, hint_convs) };
        if let Some(name) = name {
            shapes.insert(name.clone(), shape.to_vec());
            names.push((stored_name.to_string(), name));
        }
    }
    let cfg = config_from_shapes(&shapes, base, path)?;
    Ok(Scan { file, names, cfg })
}

/// The config a single-file ControlNet would get with `base`, from the file header alone (no tensor
/// is read), so a server can refuse an unfit ControlNet before queueing work.
pub fn inspect_single_file(path: &Path, base: &UNetConfig) -> Result<ControlNetConfig> {
    Ok(scan(path, base)?.cfg)
}

/// Loads a single-file ControlNet for a pipeline whose UNet is `base`, as `dtype` on `device`.
pub fn load_single_file(path: &Path, base: &UNetConfig, dtype: DType, device: &Device) -> Result<ControlNetModel> {
    let Scan { file, names, cfg } = scan(path, base)?;
    let mut tensors = HashMap::with_capacity(names.len());
    for (stored, name) in names {
        let t = file.load(&stored, dtype, device)?;
        tensors.insert(name, t);
    }
    let vb = VarBuilder::from_tensors(tensors, dtype, device);
    ControlNetModel::new(vb, &cfg).map_err(|e| match e {
        Error::Candle(e) => Error::Incompatible(format!(
            "{} does not have the layout of a ControlNet for this base model ({e}); use a ControlNet trained for it",
            path.display()
        )),
        other => other,
    })
}

fn dims<'a>(t: &'a HashMap<String, Vec<usize>>, name: &str, path: &Path) -> Result<&'a [usize]> {
    t.get(name)
        .map(Vec::as_slice)
        .ok_or_else(|| Error::Incompatible(format!("{} has no tensor for `{name}`; the file is not a complete ControlNet", path.display())))
}

/// The ControlNet config of a config-less file: geometry from the tensors, head counts from `base`.
fn config_from_shapes(t: &HashMap<String, Vec<usize>>, base: &UNetConfig, path: &Path) -> Result<ControlNetConfig> {
    let conv_in = dims(t, "conv_in.weight", path)?;
    let (c0, in_channels) = match conv_in {
        [o, i, _, _] => (*o, *i),
        d => return Err(Error::Incompatible(format!("conv_in.weight has shape {d:?}, not a convolution kernel"))),
    };
    if c0 != base.block_out_channels.first().copied().unwrap_or(0) {
        return Err(Error::Incompatible(format!(
            "{} starts with {c0} channels but the UNet with {:?}; it was trained for another base model",
            path.display(),
            base.block_out_channels
        )));
    }
    if let Some(ctx) = t.iter().find(|(k, _)| k.ends_with("attn2.to_k.weight")).and_then(|(_, v)| v.get(1).copied()) {
        if ctx != base.cross_attention_dim {
            return Err(Error::Incompatible(format!(
                "{} reads {ctx}-wide text embeddings but the UNet gives {} (768: SD 1.x, 1024: SD 2.x, 2048: SDXL)",
                path.display(),
                base.cross_attention_dim
            )));
        }
    }
    let sdxl = t.contains_key("add_embedding.linear_1.weight");
    if sdxl != base.has_text_time() {
        return Err(Error::Incompatible(format!(
            "{} is {} ControlNet but the UNet is {}",
            path.display(),
            if sdxl { "an SDXL" } else { "an SD 1.x/2.x" },
            if base.has_text_time() { "SDXL" } else { "SD 1.x/2.x" }
        )));
    }
    let hint_in = dims(t, "controlnet_cond_embedding.conv_in.weight", path)?;
    let mut cond_channels = vec![hint_in.first().copied().unwrap_or(0)];
    let mut i = 1;
    while let Some(d) = t.get(&format!("controlnet_cond_embedding.blocks.{i}.weight")) {
        cond_channels.push(d.first().copied().unwrap_or(0));
        i += 2;
    }
    // Transformer depth per down block (SDXL "mid"/"small" ControlNets have fewer than their UNet).
    let n = base.block_out_channels.len();
    let depth: Vec<usize> = (0..n)
        .map(|b| {
            let prefix = format!("down_blocks.{b}.attentions.0.transformer_blocks.");
            t.keys()
                .filter_map(|k| k.strip_prefix(&prefix)?.split('.').next()?.parse::<usize>().ok())
                .max()
                .map_or(base.transformer_layers_per_block.get(b), |m| m + 1)
        })
        .collect();
    let mut cfg = ControlNetConfig::for_unet(base, in_channels, hint_in.get(1).copied().unwrap_or(3), cond_channels);
    cfg.unet.transformer_layers_per_block = PerBlock::Many(depth);
    cfg.validate()?;
    Ok(cfg)
}
