//! Name map between single-file LDM checkpoints (A1111 / civitai / original Stability releases)
//! and diffusers/transformers names.
//!
//! Every function works on module paths (`input_blocks.4.1.proj_in`) as well as tensor paths
//! (`input_blocks.4.1.proj_in.weight`), so LoRA loaders can reuse it for kohya keys once they
//! have turned `lora_unet_input_blocks_4_1_proj_in` back into a dotted path. The component
//! functions ([`unet_to_ldm`], [`vae_to_ldm`], [`openclip_to_ldm`], …) work on names rooted at the
//! component; [`KeyMap`] adds the component prefixes of a whole single-file checkpoint.
//!
//! Facts follow diffusers' `loaders/single_file_utils.py` (`convert_ldm_unet_checkpoint`,
//! `convert_ldm_vae_checkpoint`, `convert_open_clip_checkpoint`).

use crate::config::{UNetConfig, VaeConfig};
use crate::variant::ModelFamily;

/// Prefix of the UNet in a single-file checkpoint.
pub const LDM_UNET_PREFIX: &str = "model.diffusion_model.";
/// Prefix of the VAE in a single-file checkpoint.
pub const LDM_VAE_PREFIX: &str = "first_stage_model.";
/// Prefix of SD 1.x's OpenAI CLIP text encoder (followed by `text_model.`).
pub const LDM_SD1_CLIP_PREFIX: &str = "cond_stage_model.transformer.";
/// Prefix of SD 2.x's OpenCLIP text encoder.
pub const LDM_SD2_OPENCLIP_PREFIX: &str = "cond_stage_model.model.";
/// Prefix of SDXL's first (OpenAI CLIP-L) text encoder (followed by `text_model.`).
pub const LDM_SDXL_CLIP_PREFIX: &str = "conditioner.embedders.0.transformer.";
/// Prefix of SDXL's second (OpenCLIP bigG) text encoder.
pub const LDM_SDXL_OPENCLIP_PREFIX: &str = "conditioner.embedders.1.model.";

/// One of the weight-carrying components of a Stable Diffusion checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    /// The denoising UNet.
    Unet,
    /// The autoencoder.
    Vae,
    /// The first (or only) text encoder.
    TextEncoder,
    /// SDXL's second text encoder.
    TextEncoder2,
}

impl Component {
    /// All components, in loading order.
    pub const ALL: [Component; 4] = [Component::Unet, Component::Vae, Component::TextEncoder, Component::TextEncoder2];

    /// The diffusers sub-folder of this component.
    pub fn folder(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::Vae => "vae",
            Component::TextEncoder => "text_encoder",
            Component::TextEncoder2 => "text_encoder_2",
        }
    }
}

impl std::fmt::Display for Component {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.folder())
    }
}

/// How a tensor stored in the single file must be changed to become the diffusers tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transform {
    /// Used as stored (a 1×1-conv ↔ linear reshape may still apply, decided by shape).
    Identity,
    /// Chunk `0`, `1` or `2` (q, k, v) along dim 0 of OpenCLIP's fused `in_proj_weight/bias`.
    QkvChunk(usize),
    /// OpenCLIP's `text_projection` is stored `[hidden, proj]` for `x @ P`; diffusers wants `[proj, hidden]`.
    Transpose,
    /// VAE attention projections are 1×1 convs `[c, c, 1, 1]` in LDM files and linears `[c, c]` in diffusers.
    ConvToLinear,
}

/// Where a diffusers tensor lives in a single-file checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LdmKey {
    /// Full name in the single file, component prefix included.
    pub name: String,
    /// What to do to the stored tensor.
    pub transform: Transform,
}

/// Which text-encoder key layout a component uses in a single file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextEncoderLayout {
    /// transformers `CLIPTextModel` names (`text_model.*`) under a prefix.
    OpenAi,
    /// open_clip names (`transformer.resblocks.*`, fused `in_proj`).
    OpenClip,
}

fn split_first<'a>(segs: &'a [&'a str]) -> Option<(&'a str, &'a [&'a str])> {
    segs.split_first().map(|(a, b)| (*a, b))
}

fn join(head: &[String], rest: &[&str]) -> String {
    let mut parts: Vec<&str> = head.iter().map(String::as_str).collect();
    parts.extend_from_slice(rest);
    parts.join(".")
}

fn num(s: &str) -> Option<usize> {
    // Reject "+1", "01" and friends so the map stays a bijection on canonical names.
    if s.is_empty() || (s.len() > 1 && s.starts_with('0')) || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// UNet
// ---------------------------------------------------------------------------------------------

/// diffusers resnet sub-module → LDM resnet sub-path.
const UNET_RESNET: [(&str, &str); 6] = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
];

fn unet_resnet_to_ldm(head: Vec<String>, rest: &[&str]) -> Option<String> {
    let Some((first, tail)) = split_first(rest) else { return Some(join(&head, rest)) };
    let (_, ldm) = UNET_RESNET.iter().find(|(d, _)| *d == first)?;
    let mut head = head;
    head.extend(ldm.split('.').map(String::from));
    Some(join(&head, tail))
}

fn unet_resnet_from_ldm(head: Vec<String>, rest: &[&str]) -> Option<String> {
    if rest.is_empty() {
        return Some(join(&head, rest));
    }
    for (d, ldm) in UNET_RESNET {
        let l: Vec<&str> = ldm.split('.').collect();
        if rest.len() >= l.len() && rest[..l.len()] == l[..] {
            let mut head = head;
            head.push(d.to_string());
            return Some(join(&head, &rest[l.len()..]));
        }
    }
    None
}

fn s<T: ToString>(v: T) -> String {
    v.to_string()
}

/// Maps a diffusers UNet path (`down_blocks.1.attentions.0.proj_in`) to its LDM path
/// (`input_blocks.4.1.proj_in`), both without the `model.diffusion_model.` prefix.
///
/// Returns `None` for names that have no LDM counterpart under `cfg`.
pub fn unet_to_ldm(name: &str, cfg: &UNetConfig) -> Option<String> {
    let segs: Vec<&str> = name.split('.').collect();
    let lpb = cfg.layers_per_block;
    let n = cfg.block_out_channels.len();
    let (first, rest) = split_first(&segs)?;
    match first {
        "conv_in" => Some(join(&[s("input_blocks"), s(0), s(0)], rest)),
        "conv_norm_out" => Some(join(&[s("out"), s(0)], rest)),
        "conv_out" => Some(join(&[s("out"), s(2)], rest)),
        "time_embedding" | "add_embedding" => {
            let (lin, rest) = split_first(rest)?;
            let idx = match lin {
                "linear_1" => 0,
                "linear_2" => 2,
                _ => return None,
            };
            if first == "time_embedding" {
                Some(join(&[s("time_embed"), s(idx)], rest))
            } else {
                Some(join(&[s("label_emb"), s(0), s(idx)], rest))
            }
        }
        "down_blocks" => {
            let (b, rest) = split_first(rest)?;
            let b = num(b).filter(|b| *b < n)?;
            let (kind, rest) = split_first(rest)?;
            let (j, rest) = split_first(rest)?;
            let j = num(j)?;
            let base = 1 + b * (lpb + 1);
            match kind {
                "resnets" if j < lpb => unet_resnet_to_ldm(vec![s("input_blocks"), s(base + j), s(0)], rest),
                "attentions" if j < lpb && cfg.down_has_attn(b) => {
                    Some(join(&[s("input_blocks"), s(base + j), s(1)], rest))
                }
                "downsamplers" if j == 0 && b + 1 < n => {
                    let (conv, rest) = split_first(rest)?;
                    (conv == "conv").then(|| join(&[s("input_blocks"), s(base + lpb), s(0), s("op")], rest))
                }
                _ => None,
            }
        }
        "mid_block" => {
            let (kind, rest) = split_first(rest)?;
            let (j, rest) = split_first(rest)?;
            let j = num(j)?;
            match kind {
                "resnets" if j < 2 => unet_resnet_to_ldm(vec![s("middle_block"), s(2 * j)], rest),
                "attentions" if j == 0 => Some(join(&[s("middle_block"), s(1)], rest)),
                _ => None,
            }
        }
        "up_blocks" => {
            let (b, rest) = split_first(rest)?;
            let b = num(b).filter(|b| *b < n)?;
            let (kind, rest) = split_first(rest)?;
            let (j, rest) = split_first(rest)?;
            let j = num(j)?;
            let base = b * (lpb + 1);
            let attn = cfg.up_has_attn(b);
            match kind {
                "resnets" if j <= lpb => unet_resnet_to_ldm(vec![s("output_blocks"), s(base + j), s(0)], rest),
                "attentions" if j <= lpb && attn => Some(join(&[s("output_blocks"), s(base + j), s(1)], rest)),
                "upsamplers" if j == 0 && b + 1 < n => {
                    let (conv, rest) = split_first(rest)?;
                    let slot = if attn { 2 } else { 1 };
                    (conv == "conv").then(|| join(&[s("output_blocks"), s(base + lpb), s(slot), s("conv")], rest))
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// Maps an LDM UNet path (`output_blocks.2.1.conv`) to its diffusers path
/// (`up_blocks.0.upsamplers.0.conv`), both without the `model.diffusion_model.` prefix.
///
/// Returns `None` for names that have no diffusers counterpart under `cfg`.
pub fn unet_from_ldm(name: &str, cfg: &UNetConfig) -> Option<String> {
    let segs: Vec<&str> = name.split('.').collect();
    let lpb = cfg.layers_per_block;
    let n = cfg.block_out_channels.len();
    let (first, rest) = split_first(&segs)?;
    match first {
        "time_embed" => {
            let (i, rest) = split_first(rest)?;
            let lin = match i {
                "0" => "linear_1",
                "2" => "linear_2",
                _ => return None,
            };
            Some(join(&[s("time_embedding"), s(lin)], rest))
        }
        "label_emb" => {
            let (zero, rest) = split_first(rest)?;
            let (i, rest) = split_first(rest)?;
            let lin = match (zero, i) {
                ("0", "0") => "linear_1",
                ("0", "2") => "linear_2",
                _ => return None,
            };
            Some(join(&[s("add_embedding"), s(lin)], rest))
        }
        "out" => {
            let (i, rest) = split_first(rest)?;
            match i {
                "0" => Some(join(&[s("conv_norm_out")], rest)),
                "2" => Some(join(&[s("conv_out")], rest)),
                _ => None,
            }
        }
        "input_blocks" => {
            let (i, rest) = split_first(rest)?;
            let i = num(i)?;
            let (slot, rest) = split_first(rest)?;
            if i == 0 {
                return (slot == "0").then(|| join(&[s("conv_in")], rest));
            }
            let b = (i - 1) / (lpb + 1);
            let j = (i - 1) % (lpb + 1);
            if b >= n {
                return None;
            }
            match slot {
                "0" if j < lpb => unet_resnet_from_ldm(vec![s("down_blocks"), s(b), s("resnets"), s(j)], rest),
                "0" if b + 1 < n => {
                    let (op, rest) = split_first(rest)?;
                    (op == "op").then(|| join(&[s("down_blocks"), s(b), s("downsamplers"), s(0), s("conv")], rest))
                }
                "1" if j < lpb && cfg.down_has_attn(b) => {
                    Some(join(&[s("down_blocks"), s(b), s("attentions"), s(j)], rest))
                }
                _ => None,
            }
        }
        "middle_block" => {
            let (i, rest) = split_first(rest)?;
            match i {
                "0" => unet_resnet_from_ldm(vec![s("mid_block"), s("resnets"), s(0)], rest),
                "1" => Some(join(&[s("mid_block"), s("attentions"), s(0)], rest)),
                "2" => unet_resnet_from_ldm(vec![s("mid_block"), s("resnets"), s(1)], rest),
                _ => None,
            }
        }
        "output_blocks" => {
            let (i, rest) = split_first(rest)?;
            let i = num(i)?;
            let (slot, rest) = split_first(rest)?;
            let b = i / (lpb + 1);
            let j = i % (lpb + 1);
            if b >= n {
                return None;
            }
            let attn = cfg.up_has_attn(b);
            let upsample_slot = if attn { "2" } else { "1" };
            if slot == "0" {
                return unet_resnet_from_ldm(vec![s("up_blocks"), s(b), s("resnets"), s(j)], rest);
            }
            if slot == "1" && attn {
                return Some(join(&[s("up_blocks"), s(b), s("attentions"), s(j)], rest));
            }
            if slot == upsample_slot && j == lpb && b + 1 < n {
                let (conv, rest) = split_first(rest)?;
                return (conv == "conv").then(|| join(&[s("up_blocks"), s(b), s("upsamplers"), s(0), s("conv")], rest));
            }
            None
        }
        _ => None,
    }
}

/// Every weight-carrying module path of a diffusers UNet with this config (`conv_in`,
/// `down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k`, …), each holding a `.weight`.
///
/// LoRA loaders build their kohya-name lookup from this: `unet_to_ldm(path)` with `.` → `_` gives
/// the LDM-style key, `path` with `.` → `_` the diffusers-style one.
pub fn unet_modules(cfg: &UNetConfig) -> Vec<String> {
    let n = cfg.block_out_channels.len();
    let boc = &cfg.block_out_channels;
    if n == 0 {
        return Vec::new();
    }
    let lpb = cfg.layers_per_block;
    let mut v: Vec<String> =
        ["conv_in", "time_embedding.linear_1", "time_embedding.linear_2", "conv_norm_out", "conv_out"]
            .iter()
            .map(|m| m.to_string())
            .collect();
    if cfg.has_text_time() {
        v.push("add_embedding.linear_1".into());
        v.push("add_embedding.linear_2".into());
    }
    let resnet = |p: &str, c_in: usize, c_out: usize, v: &mut Vec<String>| {
        for m in ["norm1", "conv1", "time_emb_proj", "norm2", "conv2"] {
            v.push(format!("{p}.{m}"));
        }
        if c_in != c_out {
            v.push(format!("{p}.conv_shortcut"));
        }
    };
    let transformer = |p: &str, depth: usize, v: &mut Vec<String>| {
        for m in ["norm", "proj_in", "proj_out"] {
            v.push(format!("{p}.{m}"));
        }
        for k in 0..depth {
            for m in [
                "norm1",
                "attn1.to_q",
                "attn1.to_k",
                "attn1.to_v",
                "attn1.to_out.0",
                "norm2",
                "attn2.to_q",
                "attn2.to_k",
                "attn2.to_v",
                "attn2.to_out.0",
                "norm3",
                "ff.net.0.proj",
                "ff.net.2",
            ] {
                v.push(format!("{p}.transformer_blocks.{k}.{m}"));
            }
        }
    };
    let mut c_prev = boc[0];
    for (b, &c) in boc.iter().enumerate() {
        for j in 0..lpb {
            resnet(&format!("down_blocks.{b}.resnets.{j}"), if j == 0 { c_prev } else { c }, c, &mut v);
            if cfg.down_has_attn(b) {
                transformer(
                    &format!("down_blocks.{b}.attentions.{j}"),
                    cfg.transformer_layers_per_block.get(b),
                    &mut v,
                );
            }
        }
        if b + 1 < n {
            v.push(format!("down_blocks.{b}.downsamplers.0.conv"));
        }
        c_prev = c;
    }
    resnet("mid_block.resnets.0", c_prev, c_prev, &mut v);
    transformer("mid_block.attentions.0", cfg.transformer_layers_per_block.get(n - 1), &mut v);
    resnet("mid_block.resnets.1", c_prev, c_prev, &mut v);
    // Up blocks mirror diffusers' channel bookkeeping: skips come from the matching down level.
    let rev: Vec<usize> = boc.iter().rev().copied().collect();
    let mut prev_out = rev[0];
    for (b, &c_out) in rev.iter().enumerate() {
        let c_in = rev[(b + 1).min(n - 1)];
        for j in 0..=lpb {
            let skip = if j == lpb { c_in } else { c_out };
            let res_in = if j == 0 { prev_out } else { c_out };
            resnet(&format!("up_blocks.{b}.resnets.{j}"), res_in + skip, c_out, &mut v);
            if cfg.up_has_attn(b) {
                transformer(
                    &format!("up_blocks.{b}.attentions.{j}"),
                    cfg.transformer_layers_per_block.get(n - 1 - b),
                    &mut v,
                );
            }
        }
        if b + 1 < n {
            v.push(format!("up_blocks.{b}.upsamplers.0.conv"));
        }
        prev_out = c_out;
    }
    v
}

// ---------------------------------------------------------------------------------------------
// VAE
// ---------------------------------------------------------------------------------------------

/// diffusers VAE attention sub-module → LDM name.
const VAE_ATTN: [(&str, &str); 5] =
    [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")];

fn vae_resnet_to_ldm(head: Vec<String>, rest: &[&str]) -> Option<String> {
    let Some((first, tail)) = split_first(rest) else { return Some(join(&head, rest)) };
    let mut head = head;
    match first {
        "norm1" | "conv1" | "norm2" | "conv2" => head.push(s(first)),
        "conv_shortcut" => head.push(s("nin_shortcut")),
        _ => return None,
    }
    Some(join(&head, tail))
}

fn vae_resnet_from_ldm(head: Vec<String>, rest: &[&str]) -> Option<String> {
    let Some((first, tail)) = split_first(rest) else { return Some(join(&head, rest)) };
    let mut head = head;
    match first {
        "norm1" | "conv1" | "norm2" | "conv2" => head.push(s(first)),
        "nin_shortcut" => head.push(s("conv_shortcut")),
        _ => return None,
    }
    Some(join(&head, tail))
}

fn vae_attn_to_ldm(head: Vec<String>, rest: &[&str]) -> Option<String> {
    if rest.is_empty() {
        return Some(join(&head, rest));
    }
    for (d, l) in VAE_ATTN {
        let dsegs: Vec<&str> = d.split('.').collect();
        if rest.len() >= dsegs.len() && rest[..dsegs.len()] == dsegs[..] {
            let mut head = head;
            head.push(s(l));
            return Some(join(&head, &rest[dsegs.len()..]));
        }
    }
    None
}

fn vae_attn_from_ldm(head: Vec<String>, rest: &[&str]) -> Option<String> {
    let Some((first, tail)) = split_first(rest) else { return Some(join(&head, rest)) };
    let (d, _) = VAE_ATTN.iter().find(|(_, l)| *l == first)?;
    let mut head = head;
    head.extend(d.split('.').map(String::from));
    Some(join(&head, tail))
}

/// Maps a diffusers VAE path (`decoder.up_blocks.0.upsamplers.0.conv`) to its LDM path
/// (`decoder.up.3.upsample.conv` for 4 blocks), both without the `first_stage_model.` prefix.
///
/// `num_blocks` is `VaeConfig::block_out_channels.len()` (the decoder numbers blocks in reverse).
pub fn vae_to_ldm(name: &str, num_blocks: usize) -> Option<String> {
    let segs: Vec<&str> = name.split('.').collect();
    let (first, rest) = split_first(&segs)?;
    match first {
        "quant_conv" | "post_quant_conv" => Some(name.to_string()),
        "encoder" | "decoder" => {
            let enc = first == "encoder";
            let (part, rest) = split_first(rest)?;
            match part {
                "conv_in" | "conv_out" => Some(join(&[s(first), s(part)], rest)),
                "conv_norm_out" => Some(join(&[s(first), s("norm_out")], rest)),
                "mid_block" => {
                    let (kind, rest) = split_first(rest)?;
                    let (j, rest) = split_first(rest)?;
                    match (kind, j) {
                        ("resnets", "0") => vae_resnet_to_ldm(vec![s(first), s("mid"), s("block_1")], rest),
                        ("resnets", "1") => vae_resnet_to_ldm(vec![s(first), s("mid"), s("block_2")], rest),
                        ("attentions", "0") => vae_attn_to_ldm(vec![s(first), s("mid"), s("attn_1")], rest),
                        _ => None,
                    }
                }
                "down_blocks" | "up_blocks" => {
                    if enc != (part == "down_blocks") {
                        return None;
                    }
                    let (i, rest) = split_first(rest)?;
                    let i = num(i).filter(|i| *i < num_blocks)?;
                    let ldm_i = if enc { i } else { num_blocks - 1 - i };
                    let level = if enc { "down" } else { "up" };
                    let (kind, rest) = split_first(rest)?;
                    let (j, rest) = split_first(rest)?;
                    let j = num(j)?;
                    match kind {
                        "resnets" => vae_resnet_to_ldm(vec![s(first), s(level), s(ldm_i), s("block"), s(j)], rest),
                        "downsamplers" | "upsamplers" if j == 0 && (kind == "downsamplers") == enc => {
                            let (conv, rest) = split_first(rest)?;
                            let sampler = if enc { "downsample" } else { "upsample" };
                            (conv == "conv").then(|| join(&[s(first), s(level), s(ldm_i), s(sampler), s("conv")], rest))
                        }
                        _ => None,
                    }
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// Maps an LDM VAE path (`encoder.mid.attn_1.q`) to its diffusers path
/// (`encoder.mid_block.attentions.0.to_q`), both without the `first_stage_model.` prefix.
pub fn vae_from_ldm(name: &str, num_blocks: usize) -> Option<String> {
    let segs: Vec<&str> = name.split('.').collect();
    let (first, rest) = split_first(&segs)?;
    match first {
        "quant_conv" | "post_quant_conv" => Some(name.to_string()),
        "encoder" | "decoder" => {
            let enc = first == "encoder";
            let (part, rest) = split_first(rest)?;
            match part {
                "conv_in" | "conv_out" => Some(join(&[s(first), s(part)], rest)),
                "norm_out" => Some(join(&[s(first), s("conv_norm_out")], rest)),
                "mid" => {
                    let (kind, rest) = split_first(rest)?;
                    match kind {
                        "block_1" => vae_resnet_from_ldm(vec![s(first), s("mid_block"), s("resnets"), s(0)], rest),
                        "block_2" => vae_resnet_from_ldm(vec![s(first), s("mid_block"), s("resnets"), s(1)], rest),
                        "attn_1" => vae_attn_from_ldm(vec![s(first), s("mid_block"), s("attentions"), s(0)], rest),
                        _ => None,
                    }
                }
                "down" | "up" => {
                    if enc != (part == "down") {
                        return None;
                    }
                    let (i, rest) = split_first(rest)?;
                    let i = num(i).filter(|i| *i < num_blocks)?;
                    let d_i = if enc { i } else { num_blocks - 1 - i };
                    let blocks = if enc { "down_blocks" } else { "up_blocks" };
                    let (kind, rest) = split_first(rest)?;
                    match kind {
                        "block" => {
                            let (j, rest) = split_first(rest)?;
                            let j = num(j)?;
                            vae_resnet_from_ldm(vec![s(first), s(blocks), s(d_i), s("resnets"), s(j)], rest)
                        }
                        "downsample" | "upsample" if (kind == "downsample") == enc => {
                            let (conv, rest) = split_first(rest)?;
                            let samplers = if enc { "downsamplers" } else { "upsamplers" };
                            (conv == "conv")
                                .then(|| join(&[s(first), s(blocks), s(d_i), s(samplers), s(0), s("conv")], rest))
                        }
                        _ => None,
                    }
                }
                _ => None,
            }
        }
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// OpenCLIP text encoders
// ---------------------------------------------------------------------------------------------

/// diffusers CLIP layer sub-path → open_clip resblock sub-path (q/k/v handled separately).
const OPENCLIP_LAYER: [(&str, &str); 5] = [
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("self_attn.out_proj", "attn.out_proj"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
];

/// Maps a transformers CLIP tensor name (`text_model.encoder.layers.0.self_attn.k_proj.weight`)
/// to the open_clip name (`transformer.resblocks.0.attn.in_proj_weight`) and the transform that
/// turns the stored tensor into the requested one. Names are without the component prefix.
///
/// Only tensor names are mapped (q/k/v live inside one fused tensor, so their modules have no
/// open_clip counterpart).
pub fn openclip_to_ldm(name: &str) -> Option<(String, Transform)> {
    let id = |n: &str| Some((n.to_string(), Transform::Identity));
    match name {
        "text_model.embeddings.token_embedding.weight" => return id("token_embedding.weight"),
        "text_model.embeddings.position_embedding.weight" => return id("positional_embedding"),
        "text_model.final_layer_norm.weight" => return id("ln_final.weight"),
        "text_model.final_layer_norm.bias" => return id("ln_final.bias"),
        "text_projection.weight" => return Some(("text_projection".into(), Transform::Transpose)),
        _ => {}
    }
    let rest = name.strip_prefix("text_model.encoder.layers.")?;
    let (i, rest) = rest.split_once('.')?;
    let i = num(i)?;
    for (q, chunk) in [("self_attn.q_proj.", 0), ("self_attn.k_proj.", 1), ("self_attn.v_proj.", 2)] {
        if let Some(kind) = rest.strip_prefix(q) {
            let fused = match kind {
                "weight" => "in_proj_weight",
                "bias" => "in_proj_bias",
                _ => return None,
            };
            return Some((format!("transformer.resblocks.{i}.attn.{fused}"), Transform::QkvChunk(chunk)));
        }
    }
    for (d, o) in OPENCLIP_LAYER {
        if let Some(tail) = rest.strip_prefix(d).and_then(|t| t.strip_prefix('.')) {
            if tail == "weight" || tail == "bias" {
                return Some((format!("transformer.resblocks.{i}.{o}.{tail}"), Transform::Identity));
            }
        }
    }
    None
}

/// Maps an open_clip tensor name to the transformers CLIP tensor names it provides (three for a
/// fused `in_proj_*`, in q, k, v order), without the component prefix.
pub fn openclip_from_ldm(name: &str) -> Option<Vec<String>> {
    let one = |n: &str| Some(vec![n.to_string()]);
    match name {
        "token_embedding.weight" => return one("text_model.embeddings.token_embedding.weight"),
        "positional_embedding" => return one("text_model.embeddings.position_embedding.weight"),
        "ln_final.weight" => return one("text_model.final_layer_norm.weight"),
        "ln_final.bias" => return one("text_model.final_layer_norm.bias"),
        "text_projection" => return one("text_projection.weight"),
        _ => {}
    }
    let rest = name.strip_prefix("transformer.resblocks.")?;
    let (i, rest) = rest.split_once('.')?;
    let i = num(i)?;
    let layer = format!("text_model.encoder.layers.{i}");
    match rest {
        "attn.in_proj_weight" | "attn.in_proj_bias" => {
            let kind = if rest.ends_with("weight") { "weight" } else { "bias" };
            return Some(
                ["q_proj", "k_proj", "v_proj"].iter().map(|p| format!("{layer}.self_attn.{p}.{kind}")).collect(),
            );
        }
        _ => {}
    }
    for (d, o) in OPENCLIP_LAYER {
        if let Some(tail) = rest.strip_prefix(o).and_then(|t| t.strip_prefix('.')) {
            if tail == "weight" || tail == "bias" {
                return Some(vec![format!("{layer}.{d}.{tail}")]);
            }
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Whole-checkpoint map
// ---------------------------------------------------------------------------------------------

/// Single-file prefix and key layout of each component for one model family.
pub fn text_encoder_layout(family: ModelFamily, component: Component) -> Option<(&'static str, TextEncoderLayout)> {
    match (family, component) {
        (ModelFamily::Sd1, Component::TextEncoder) => Some((LDM_SD1_CLIP_PREFIX, TextEncoderLayout::OpenAi)),
        (ModelFamily::Sd2, Component::TextEncoder) => Some((LDM_SD2_OPENCLIP_PREFIX, TextEncoderLayout::OpenClip)),
        (ModelFamily::Sdxl, Component::TextEncoder) => Some((LDM_SDXL_CLIP_PREFIX, TextEncoderLayout::OpenAi)),
        (ModelFamily::Sdxl, Component::TextEncoder2) => Some((LDM_SDXL_OPENCLIP_PREFIX, TextEncoderLayout::OpenClip)),
        _ => None,
    }
}

/// The name map of one whole single-file checkpoint (all components, prefixes included).
#[derive(Debug, Clone)]
pub struct KeyMap {
    family: ModelFamily,
    unet: UNetConfig,
    vae_blocks: usize,
}

impl KeyMap {
    /// A map for a checkpoint of `family` whose UNet and VAE follow these configs.
    pub fn new(family: ModelFamily, unet: &UNetConfig, vae: &VaeConfig) -> Self {
        Self { family, unet: unet.clone(), vae_blocks: vae.block_out_channels.len() }
    }

    /// The model family this map was made for.
    pub fn family(&self) -> ModelFamily {
        self.family
    }

    /// Where the diffusers tensor `name` of `component` is stored in the single file.
    pub fn to_ldm(&self, component: Component, name: &str) -> Option<LdmKey> {
        match component {
            Component::Unet => unet_to_ldm(name, &self.unet)
                .map(|n| LdmKey { name: format!("{LDM_UNET_PREFIX}{n}"), transform: Transform::Identity }),
            Component::Vae => {
                let n = vae_to_ldm(name, self.vae_blocks)?;
                let attn_proj = name.contains(".mid_block.attentions.")
                    && !name.contains(".group_norm.")
                    && name.ends_with(".weight");
                let transform = if attn_proj { Transform::ConvToLinear } else { Transform::Identity };
                Some(LdmKey { name: format!("{LDM_VAE_PREFIX}{n}"), transform })
            }
            Component::TextEncoder | Component::TextEncoder2 => {
                let (prefix, layout) = text_encoder_layout(self.family, component)?;
                match layout {
                    TextEncoderLayout::OpenAi => name
                        .starts_with("text_model.")
                        .then(|| LdmKey { name: format!("{prefix}{name}"), transform: Transform::Identity }),
                    TextEncoderLayout::OpenClip => {
                        let (n, transform) = openclip_to_ldm(name)?;
                        Some(LdmKey { name: format!("{prefix}{n}"), transform })
                    }
                }
            }
        }
    }

    /// The diffusers names (with their component) that the single-file tensor `ldm_name` provides.
    pub fn from_ldm(&self, ldm_name: &str) -> Vec<(Component, String)> {
        if let Some(rest) = ldm_name.strip_prefix(LDM_UNET_PREFIX) {
            return unet_from_ldm(rest, &self.unet).map(|n| vec![(Component::Unet, n)]).unwrap_or_default();
        }
        if let Some(rest) = ldm_name.strip_prefix(LDM_VAE_PREFIX) {
            return vae_from_ldm(rest, self.vae_blocks).map(|n| vec![(Component::Vae, n)]).unwrap_or_default();
        }
        for component in [Component::TextEncoder, Component::TextEncoder2] {
            let Some((prefix, layout)) = text_encoder_layout(self.family, component) else { continue };
            let Some(rest) = ldm_name.strip_prefix(prefix) else { continue };
            return match layout {
                TextEncoderLayout::OpenAi => {
                    if rest.starts_with("text_model.") {
                        vec![(component, rest.to_string())]
                    } else {
                        Vec::new()
                    }
                }
                TextEncoderLayout::OpenClip => {
                    openclip_from_ldm(rest).unwrap_or_default().into_iter().map(|n| (component, n)).collect()
                }
            };
        }
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PerBlock;
    use proptest::prelude::*;

    fn sd15() -> UNetConfig {
        UNetConfig::sd15(4)
    }

    #[test]
    fn known_unet_names() {
        let c = sd15();
        let cases = [
            ("conv_in.weight", "input_blocks.0.0.weight"),
            ("time_embedding.linear_2.bias", "time_embed.2.bias"),
            ("down_blocks.0.resnets.0.norm1.weight", "input_blocks.1.0.in_layers.0.weight"),
            ("down_blocks.1.attentions.0.proj_in", "input_blocks.4.1.proj_in"),
            ("down_blocks.1.resnets.0.conv_shortcut.weight", "input_blocks.4.0.skip_connection.weight"),
            ("down_blocks.0.downsamplers.0.conv.weight", "input_blocks.3.0.op.weight"),
            ("down_blocks.3.resnets.1.time_emb_proj", "input_blocks.11.0.emb_layers.1"),
            ("mid_block.resnets.1.conv2", "middle_block.2.out_layers.3"),
            (
                "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight",
                "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
            ),
            ("up_blocks.0.upsamplers.0.conv.weight", "output_blocks.2.1.conv.weight"),
            ("up_blocks.1.upsamplers.0.conv.bias", "output_blocks.5.2.conv.bias"),
            ("up_blocks.3.attentions.2.proj_out.weight", "output_blocks.11.1.proj_out.weight"),
            ("conv_norm_out.weight", "out.0.weight"),
            ("conv_out.bias", "out.2.bias"),
        ];
        for (d, l) in cases {
            assert_eq!(unet_to_ldm(d, &c).as_deref(), Some(l), "{d}");
            assert_eq!(unet_from_ldm(l, &c).as_deref(), Some(d), "{l}");
        }
        let xl = UNetConfig::sdxl(4);
        assert_eq!(unet_to_ldm("add_embedding.linear_1.weight", &xl).as_deref(), Some("label_emb.0.0.weight"));
        assert_eq!(unet_to_ldm("down_blocks.0.attentions.0.proj_in", &xl), None);
        assert_eq!(unet_to_ldm("down_blocks.2.downsamplers.0.conv.weight", &xl), None);
        assert_eq!(
            unet_from_ldm("input_blocks.4.1.proj_in.weight", &xl).as_deref(),
            Some("down_blocks.1.attentions.0.proj_in.weight")
        );
        assert_eq!(unet_from_ldm("output_blocks.8.1.conv.weight", &xl), None);
    }

    #[test]
    fn known_vae_and_clip_names() {
        let cases = [
            ("encoder.conv_norm_out.weight", "encoder.norm_out.weight"),
            ("encoder.down_blocks.1.resnets.0.conv_shortcut.bias", "encoder.down.1.block.0.nin_shortcut.bias"),
            ("encoder.down_blocks.2.downsamplers.0.conv.weight", "encoder.down.2.downsample.conv.weight"),
            ("encoder.mid_block.attentions.0.to_out.0.weight", "encoder.mid.attn_1.proj_out.weight"),
            ("decoder.mid_block.attentions.0.group_norm.bias", "decoder.mid.attn_1.norm.bias"),
            ("decoder.mid_block.resnets.1.norm2.weight", "decoder.mid.block_2.norm2.weight"),
            ("decoder.up_blocks.0.resnets.2.conv1.weight", "decoder.up.3.block.2.conv1.weight"),
            ("decoder.up_blocks.0.upsamplers.0.conv.weight", "decoder.up.3.upsample.conv.weight"),
            ("post_quant_conv.weight", "post_quant_conv.weight"),
        ];
        for (d, l) in cases {
            assert_eq!(vae_to_ldm(d, 4).as_deref(), Some(l), "{d}");
            assert_eq!(vae_from_ldm(l, 4).as_deref(), Some(d), "{l}");
        }
        assert_eq!(
            openclip_to_ldm("text_model.encoder.layers.5.self_attn.v_proj.bias"),
            Some(("transformer.resblocks.5.attn.in_proj_bias".into(), Transform::QkvChunk(2)))
        );
        assert_eq!(
            openclip_to_ldm("text_model.encoder.layers.0.mlp.fc2.weight"),
            Some(("transformer.resblocks.0.mlp.c_proj.weight".into(), Transform::Identity))
        );
        let km = KeyMap::new(ModelFamily::Sdxl, &UNetConfig::sdxl(4), &VaeConfig::sdxl());
        assert_eq!(
            km.to_ldm(Component::TextEncoder2, "text_projection.weight"),
            Some(LdmKey {
                name: "conditioner.embedders.1.model.text_projection".into(),
                transform: Transform::Transpose
            })
        );
        assert_eq!(
            km.to_ldm(Component::TextEncoder, "text_model.embeddings.position_embedding.weight").map(|k| k.name),
            Some("conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight".into())
        );
        assert_eq!(km.from_ldm("conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight").len(), 3);
        assert!(km.from_ldm("cond_stage_model.model.ln_final.weight").is_empty());
    }

    /// Every diffusers tensor name of a UNet with this config (attention internals abbreviated:
    /// they are passed through unchanged, so a few representatives suffice).
    fn unet_names(c: &UNetConfig) -> Vec<String> {
        let mut v: Vec<String> =
            ["conv_in", "conv_norm_out", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]
                .iter()
                .map(|m| format!("{m}.weight"))
                .collect();
        if c.has_text_time() {
            v.push("add_embedding.linear_1.bias".into());
            v.push("add_embedding.linear_2.weight".into());
        }
        let resnet = |p: String, v: &mut Vec<String>| {
            for m in ["norm1", "conv1", "time_emb_proj", "norm2", "conv2", "conv_shortcut"] {
                v.push(format!("{p}.{m}.weight"));
            }
            v.push(p);
        };
        let attn = |p: String, v: &mut Vec<String>| {
            for m in [
                "norm.weight",
                "proj_in.weight",
                "transformer_blocks.0.attn1.to_q.weight",
                "transformer_blocks.1.ff.net.0.proj.bias",
                "proj_out.bias",
            ] {
                v.push(format!("{p}.{m}"));
            }
        };
        let n = c.block_out_channels.len();
        for b in 0..n {
            for j in 0..c.layers_per_block {
                resnet(format!("down_blocks.{b}.resnets.{j}"), &mut v);
                if c.down_has_attn(b) {
                    attn(format!("down_blocks.{b}.attentions.{j}"), &mut v);
                }
            }
            if b + 1 < n {
                v.push(format!("down_blocks.{b}.downsamplers.0.conv.weight"));
            }
            for j in 0..=c.layers_per_block {
                resnet(format!("up_blocks.{b}.resnets.{j}"), &mut v);
                if c.up_has_attn(b) {
                    attn(format!("up_blocks.{b}.attentions.{j}"), &mut v);
                }
            }
            if b + 1 < n {
                v.push(format!("up_blocks.{b}.upsamplers.0.conv.bias"));
            }
        }
        resnet("mid_block.resnets.0".into(), &mut v);
        resnet("mid_block.resnets.1".into(), &mut v);
        attn("mid_block.attentions.0".into(), &mut v);
        v
    }

    fn vae_names(n: usize, lpb: usize) -> Vec<String> {
        let mut v = vec!["quant_conv.weight".to_string(), "post_quant_conv.bias".to_string()];
        for part in ["encoder", "decoder"] {
            for m in ["conv_in.weight", "conv_out.bias", "conv_norm_out.weight"] {
                v.push(format!("{part}.{m}"));
            }
            for r in 0..2 {
                for m in ["norm1", "conv1", "norm2", "conv2", "conv_shortcut"] {
                    v.push(format!("{part}.mid_block.resnets.{r}.{m}.weight"));
                }
            }
            for m in ["group_norm", "to_q", "to_k", "to_v", "to_out.0"] {
                v.push(format!("{part}.mid_block.attentions.0.{m}.bias"));
            }
            let (blocks, samplers, layers) = if part == "encoder" {
                ("down_blocks", "downsamplers", lpb)
            } else {
                ("up_blocks", "upsamplers", lpb + 1)
            };
            for b in 0..n {
                for j in 0..layers {
                    for m in ["norm1", "conv1", "norm2", "conv2", "conv_shortcut"] {
                        v.push(format!("{part}.{blocks}.{b}.resnets.{j}.{m}.weight"));
                    }
                }
                if b + 1 < n {
                    v.push(format!("{part}.{blocks}.{b}.{samplers}.0.conv.weight"));
                }
            }
        }
        v
    }

    fn arb_unet() -> impl Strategy<Value = UNetConfig> {
        (2usize..5, 1usize..4, proptest::collection::vec(any::<bool>(), 4), any::<bool>()).prop_map(
            |(n, lpb, attn, xl)| {
                let down: Vec<String> =
                    (0..n).map(|i| if attn[i] { "CrossAttnDownBlock2D" } else { "DownBlock2D" }.to_string()).collect();
                let up: Vec<String> = down.iter().rev().map(|t| t.replace("Down", "Up")).collect();
                UNetConfig {
                    block_out_channels: vec![32; n],
                    down_block_types: down,
                    up_block_types: up,
                    layers_per_block: lpb,
                    transformer_layers_per_block: PerBlock::One(1),
                    addition_embed_type: xl.then(|| "text_time".to_string()),
                    ..UNetConfig::sd15(4)
                }
            },
        )
    }

    proptest! {
        #[test]
        fn unet_round_trip(cfg in arb_unet()) {
            let mut names = unet_names(&cfg);
            names.extend(unet_modules(&cfg));
            names.sort();
            names.dedup();
            let mut seen = std::collections::HashSet::new();
            for d in &names {
                let l = unet_to_ldm(d, &cfg);
                prop_assert!(l.is_some(), "no LDM name for {}", d);
                let l = l.unwrap_or_default();
                prop_assert!(seen.insert(l.clone()), "two diffusers names map to {}", l);
                let back = unet_from_ldm(&l, &cfg);
                prop_assert_eq!(back.as_deref(), Some(d.as_str()), "via {}", l);
            }
        }

        #[test]
        fn vae_round_trip(n in 1usize..6, lpb in 1usize..4) {
            let mut seen = std::collections::HashSet::new();
            for d in vae_names(n, lpb) {
                let l = vae_to_ldm(&d, n);
                prop_assert!(l.is_some(), "no LDM name for {}", d);
                let l = l.unwrap_or_default();
                prop_assert!(seen.insert(l.clone()), "two diffusers names map to {}", l);
                prop_assert_eq!(vae_from_ldm(&l, n), Some(d));
            }
        }

        #[test]
        fn openclip_round_trip(layer in 0usize..64, which in 0usize..9) {
            let subs = ["self_attn.q_proj.weight", "self_attn.k_proj.bias", "self_attn.v_proj.weight",
                "layer_norm1.weight", "layer_norm2.bias", "self_attn.out_proj.weight", "mlp.fc1.bias", "mlp.fc2.weight",
                "self_attn.out_proj.bias"];
            let d = format!("text_model.encoder.layers.{layer}.{}", subs[which]);
            let mapped = openclip_to_ldm(&d);
            prop_assert!(mapped.is_some(), "no open_clip name for {}", d);
            let (l, t) = mapped.unwrap_or_else(|| (String::new(), Transform::Identity));
            let back = openclip_from_ldm(&l).unwrap_or_default();
            match t {
                Transform::QkvChunk(i) => prop_assert_eq!(back.get(i), Some(&d)),
                _ => prop_assert_eq!(back, vec![d.clone()]),
            }
        }

        #[test]
        fn arbitrary_strings_never_panic(name in "[a-z_0-9.]{0,40}") {
            let c = UNetConfig::sdxl(4);
            let _ = unet_to_ldm(&name, &c);
            let _ = unet_from_ldm(&name, &c);
            let _ = vae_to_ldm(&name, 4);
            let _ = vae_from_ldm(&name, 4);
            let _ = openclip_to_ldm(&name);
            let _ = openclip_from_ldm(&name);
        }
    }
}
