//! The MMDiT's architecture, as diffusers' `SD3Transformer2DModel` config names it, and the SD 3.x
//! variants that share it.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// The transformer's architecture (the fields of diffusers' `transformer/config.json`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Sd3Config {
    /// Latent pixels per patch side (2).
    #[serde(default = "d2")]
    pub patch_size: usize,
    /// Latent channels in (16).
    #[serde(default = "d16")]
    pub in_channels: usize,
    /// Latent channels out (16).
    #[serde(default = "d16")]
    pub out_channels: usize,
    /// Joint blocks.
    pub num_layers: usize,
    /// Width of one attention head (64).
    #[serde(default = "d64")]
    pub attention_head_dim: usize,
    /// Attention heads; the model width is `heads · head_dim`.
    pub num_attention_heads: usize,
    /// Width of the text embeddings the context embedder takes (T5-XXL's 4096).
    #[serde(default = "d4096")]
    pub joint_attention_dim: usize,
    /// Width the text embeddings are projected to (the model width).
    pub caption_projection_dim: usize,
    /// Width of the pooled CLIP-L + CLIP-G embeddings (2048).
    #[serde(default = "d2048")]
    pub pooled_projection_dim: usize,
    /// Side of the stored position-embedding grid, in patches (192 for SD3 and 3.5 Large, 384 for 3.5 Medium).
    #[serde(default = "d192")]
    pub pos_embed_max_size: usize,
    /// Default latent side (`sample_size · 8` pixels by default).
    #[serde(default = "d128")]
    pub sample_size: usize,
    /// RMS-normalised queries and keys (SD 3.5); `None`/absent in SD 3.
    #[serde(default, deserialize_with = "qk_norm")]
    pub qk_norm: bool,
    /// Blocks with a second, image-only self-attention (SD 3.5 Medium's MMDiT-X: 0..=12).
    #[serde(default)]
    pub dual_attention_layers: Vec<usize>,
}

fn d2() -> usize {
    2
}
fn d16() -> usize {
    16
}
fn d64() -> usize {
    64
}
fn d128() -> usize {
    128
}
fn d192() -> usize {
    192
}
fn d2048() -> usize {
    2048
}
fn d4096() -> usize {
    4096
}

fn qk_norm<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<bool, D::Error> {
    let v: Option<String> = Option::deserialize(d)?;
    match v.as_deref() {
        None => Ok(false),
        Some("rms_norm") => Ok(true),
        Some(other) => Err(serde::de::Error::custom(format!("qk_norm {other:?} is not supported; SD 3.5 uses \"rms_norm\""))),
    }
}

impl Sd3Config {
    /// Stable Diffusion 3 Medium (2B, no QK norm).
    pub fn sd3_medium() -> Self {
        Self {
            patch_size: 2,
            in_channels: 16,
            out_channels: 16,
            num_layers: 24,
            attention_head_dim: 64,
            num_attention_heads: 24,
            joint_attention_dim: 4096,
            caption_projection_dim: 1536,
            pooled_projection_dim: 2048,
            pos_embed_max_size: 192,
            sample_size: 128,
            qk_norm: false,
            dual_attention_layers: Vec::new(),
        }
    }

    /// Stable Diffusion 3.5 Medium (2.5B MMDiT-X: QK norm, self-attention in the first 13 blocks).
    pub fn sd35_medium() -> Self {
        Self { pos_embed_max_size: 384, qk_norm: true, dual_attention_layers: (0..13).collect(), ..Self::sd3_medium() }
    }

    /// Stable Diffusion 3.5 Large and Large Turbo (8B, QK norm).
    pub fn sd35_large() -> Self {
        Self { num_layers: 38, num_attention_heads: 38, caption_projection_dim: 2432, qk_norm: true, ..Self::sd3_medium() }
    }

    /// The model width.
    pub fn hidden(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Reads a diffusers `transformer/config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::InvalidConfig { path: path.to_path_buf(), reason: e.to_string() })?;
        if let Some(class) = v.get("_class_name").and_then(|c| c.as_str()) {
            if class != "SD3Transformer2DModel" {
                return Err(Error::NotSd3 { path: path.to_path_buf(), reason: format!("its config declares {class}, not SD3Transformer2DModel") });
            }
        }
        let cfg: Self = serde_json::from_value(v).map_err(|e| Error::InvalidConfig { path: path.to_path_buf(), reason: e.to_string() })?;
        cfg.check().map_err(|reason| Error::InvalidConfig { path: path.to_path_buf(), reason })?;
        Ok(cfg)
    }

    /// Reads the architecture of a `num_layers`-block model off the tensor shapes of a checkpoint with
    /// Stability's names (`x_embedder.proj.weight`, `joint_blocks.N.…`); `shape` answers for a name without
    /// the file's prefix.
    /// The head width, which no shape shows without QK norm, is SD3's 64 there.
    pub fn from_shapes(shape: &dyn Fn(&str) -> Option<Vec<usize>>, num_layers: usize, source: &str) -> std::result::Result<Self, String> {
        let need = |n: &str| shape(n).ok_or_else(|| format!("{source} has no {n}"));
        let proj = need("x_embedder.proj.weight")?;
        let [hidden, in_channels, patch, _] = proj[..] else { return Err(format!("x_embedder.proj.weight has shape {proj:?}, not [hidden, in, p, p]")) };
        let pos = need("pos_embed")?;
        let max = (pos.get(1).copied().unwrap_or(0) as f64).sqrt().round() as usize;
        if max * max != pos.get(1).copied().unwrap_or(0) {
            return Err(format!("pos_embed has shape {pos:?}: not a square grid"));
        }
        let ctx = need("context_embedder.weight")?;
        let pooled = need("y_embedder.mlp.0.weight")?;
        let fin = need("final_layer.linear.weight")?;
        let qk_norm = shape("joint_blocks.0.x_block.attn.ln_q.weight").is_some();
        let head_dim = shape("joint_blocks.0.x_block.attn.ln_q.weight").and_then(|s| s.first().copied()).unwrap_or(64);
        let dual_attention_layers =
            (0..num_layers).filter(|i| shape(&format!("joint_blocks.{i}.x_block.attn2.qkv.weight")).is_some()).collect();
        let cfg = Self {
            patch_size: patch,
            in_channels,
            out_channels: fin.first().copied().unwrap_or(0) / (patch * patch).max(1),
            num_layers,
            attention_head_dim: head_dim,
            num_attention_heads: hidden / head_dim.max(1),
            joint_attention_dim: ctx.get(1).copied().unwrap_or(0),
            caption_projection_dim: hidden,
            pooled_projection_dim: pooled.get(1).copied().unwrap_or(0),
            pos_embed_max_size: max,
            sample_size: 128,
            qk_norm,
            dual_attention_layers,
        };
        cfg.check()?;
        Ok(cfg)
    }

    /// Rejects architectures the model cannot be built for.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.num_layers == 0 || self.num_attention_heads == 0 || self.attention_head_dim == 0 || self.patch_size == 0 {
            return Err("num_layers, num_attention_heads, attention_head_dim and patch_size must be positive".into());
        }
        if self.caption_projection_dim != self.hidden() {
            return Err(format!(
                "caption_projection_dim {} differs from heads·head_dim {}; the joint attention needs them equal",
                self.caption_projection_dim,
                self.hidden()
            ));
        }
        if let Some(i) = self.dual_attention_layers.iter().find(|&&i| i >= self.num_layers) {
            return Err(format!("dual attention layer {i} is beyond the {} blocks", self.num_layers));
        }
        Ok(())
    }
}

/// The SD 3.x model a checkpoint is, for defaults and names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sd3Variant {
    /// Stable Diffusion 3 Medium (no QK norm).
    Sd3Medium,
    /// Stable Diffusion 3.5 Medium (MMDiT-X).
    Sd35Medium,
    /// Stable Diffusion 3.5 Large.
    Sd35Large,
    /// Stable Diffusion 3.5 Large Turbo (Large's architecture, distilled for 4 steps without CFG).
    Sd35LargeTurbo,
}

impl Sd3Variant {
    /// The variant of an architecture; `turbo` (read from the file or folder name, which is all that tells
    /// Large Turbo from Large) picks Large Turbo for a Large-style model.
    pub fn of(cfg: &Sd3Config, turbo: bool) -> Self {
        match (cfg.qk_norm, cfg.dual_attention_layers.is_empty(), turbo) {
            (false, _, _) => Sd3Variant::Sd3Medium,
            (true, false, _) => Sd3Variant::Sd35Medium,
            (true, true, true) => Sd3Variant::Sd35LargeTurbo,
            (true, true, false) => Sd3Variant::Sd35Large,
        }
    }

    /// A short name (`sd3-medium`, `sd3.5-large` …).
    pub fn name(self) -> &'static str {
        match self {
            Sd3Variant::Sd3Medium => "sd3-medium",
            Sd3Variant::Sd35Medium => "sd3.5-medium",
            Sd3Variant::Sd35Large => "sd3.5-large",
            Sd3Variant::Sd35LargeTurbo => "sd3.5-large-turbo",
        }
    }

    /// Steps and guidance scale of the model card.
    pub fn defaults(self) -> (usize, f64) {
        match self {
            Sd3Variant::Sd3Medium => (28, 7.0),
            Sd3Variant::Sd35Medium => (40, 4.5),
            Sd3Variant::Sd35Large => (28, 3.5),
            Sd3Variant::Sd35LargeTurbo => (4, 0.0),
        }
    }
}

impl std::fmt::Display for Sd3Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
