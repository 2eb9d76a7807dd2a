//! The configs of the Z-Image transformer and its Qwen3 text encoder, read from diffusers'
//! `transformer/config.json` and transformers' `text_encoder/config.json` (same field names).

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// `ZImageTransformer2DModel`'s constructor arguments (diffusers' `transformer/config.json`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ZImageConfig {
    /// Spatial patch sizes (Z-Image: `[2]`).
    #[serde(default = "d_patch")]
    pub all_patch_size: Vec<usize>,
    /// Temporal patch sizes (Z-Image: `[1]`).
    #[serde(default = "d_fpatch")]
    pub all_f_patch_size: Vec<usize>,
    /// Latent channels (16).
    #[serde(default = "d_in")]
    pub in_channels: usize,
    /// Hidden width (3840).
    #[serde(default = "d_dim")]
    pub dim: usize,
    /// Main single-stream blocks (30).
    #[serde(default = "d_layers")]
    pub n_layers: usize,
    /// Noise and context refiner blocks (2 each).
    #[serde(default = "d_refiner")]
    pub n_refiner_layers: usize,
    /// Attention heads (30).
    #[serde(default = "d_heads")]
    pub n_heads: usize,
    /// RMSNorm epsilon of the blocks.
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
    /// Whether q and k are RMS-normalised per head.
    #[serde(default = "d_true")]
    pub qk_norm: bool,
    /// Width of the caption features (the text encoder's hidden size, 2560).
    #[serde(default = "d_cap")]
    pub cap_feat_dim: usize,
    /// Rotary base (256).
    #[serde(default = "d_theta")]
    pub rope_theta: f64,
    /// The timestep multiplier (1000).
    #[serde(default = "d_t_scale")]
    pub t_scale: f64,
    /// Rotary widths of the (frame/caption, height, width) axes; they sum to the head dim.
    #[serde(default = "d_axes")]
    pub axes_dims: Vec<usize>,
    /// Largest position + 1 of each axis (diffusers' lookup tables).
    #[serde(default = "d_axes_lens")]
    pub axes_lens: Vec<usize>,
    /// SigLIP features of Z-Image Omni; not run here (must be absent).
    #[serde(default)]
    pub siglip_feat_dim: Option<usize>,
}

fn d_patch() -> Vec<usize> {
    vec![2]
}
fn d_fpatch() -> Vec<usize> {
    vec![1]
}
fn d_in() -> usize {
    16
}
fn d_dim() -> usize {
    3840
}
fn d_layers() -> usize {
    30
}
fn d_refiner() -> usize {
    2
}
fn d_heads() -> usize {
    30
}
fn d_eps() -> f64 {
    1e-5
}
fn d_true() -> bool {
    true
}
fn d_cap() -> usize {
    2560
}
fn d_theta() -> f64 {
    256.0
}
fn d_t_scale() -> f64 {
    1000.0
}
fn d_axes() -> Vec<usize> {
    vec![32, 48, 48]
}
fn d_axes_lens() -> Vec<usize> {
    vec![1024, 512, 512]
}

impl Default for ZImageConfig {
    /// Z-Image (Turbo and base): 30 layers of width 3840, Qwen3-4B captions.
    fn default() -> Self {
        Self {
            all_patch_size: d_patch(),
            all_f_patch_size: d_fpatch(),
            in_channels: d_in(),
            dim: d_dim(),
            n_layers: d_layers(),
            n_refiner_layers: d_refiner(),
            n_heads: d_heads(),
            norm_eps: d_eps(),
            qk_norm: true,
            cap_feat_dim: d_cap(),
            rope_theta: d_theta(),
            t_scale: d_t_scale(),
            axes_dims: d_axes(),
            axes_lens: d_axes_lens(),
            siglip_feat_dim: None,
        }
    }
}

impl ZImageConfig {
    /// Reads and checks a `transformer/config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: Self = read_json(path)?;
        cfg.check().map_err(|reason| Error::InvalidConfig { path: path.to_path_buf(), reason })?;
        Ok(cfg)
    }

    /// Rejects what this implementation does not run, saying what would work.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.patch_size() == 0 || self.all_f_patch_size.first() != Some(&1) {
            return Err(format!(
                "patch sizes {:?}/{:?} are not supported; Z-Image uses all_patch_size [2] and all_f_patch_size [1]",
                self.all_patch_size, self.all_f_patch_size
            ));
        }
        if self.siglip_feat_dim.is_some() {
            return Err("siglip_feat_dim is set: this is Z-Image Omni, which sd-zimage does not run; use Z-Image or Z-Image-Turbo".into());
        }
        if self.n_heads == 0 || self.dim % self.n_heads != 0 {
            return Err(format!("dim {} is not divisible by n_heads {}", self.dim, self.n_heads));
        }
        let head = self.dim / self.n_heads;
        if self.axes_dims.len() != 3 || self.axes_dims.iter().sum::<usize>() != head || self.axes_dims.iter().any(|a| a % 2 == 1) {
            return Err(format!("axes_dims {:?} must be three even widths summing to the head dim {head}", self.axes_dims));
        }
        if self.axes_lens.len() != 3 {
            return Err(format!("axes_lens {:?} must have three entries", self.axes_lens));
        }
        Ok(())
    }

    /// The spatial patch size (2).
    pub fn patch_size(&self) -> usize {
        self.all_patch_size.first().copied().unwrap_or(0)
    }

    /// Width of each attention head.
    pub fn head_dim(&self) -> usize {
        self.dim / self.n_heads.max(1)
    }

    /// Width of the timestep conditioning (`min(dim, 256)`).
    pub fn adaln_dim(&self) -> usize {
        self.dim.min(ADALN_EMBED_DIM)
    }

    /// Hidden width of the SwiGLU feed-forward (`int(dim / 3 * 8)`).
    pub fn ffn_dim(&self) -> usize {
        (self.dim as f64 / 3.0 * 8.0) as usize
    }

    /// The longest caption (in tokens) whose positions fit the rotary tables of the caption axis: the
    /// padded caption and the image after it must stay below `axes_lens[0]`.
    pub fn max_caption_tokens(&self) -> usize {
        let len = self.axes_lens.first().copied().unwrap_or(0);
        (len.saturating_sub(2) / SEQ_MULTI_OF) * SEQ_MULTI_OF
    }
}

/// diffusers' `ADALN_EMBED_DIM`: the timestep embedding is at most this wide.
pub const ADALN_EMBED_DIM: usize = 256;

/// diffusers' `SEQ_MULTI_OF`: image and caption token runs are padded to multiples of this.
pub const SEQ_MULTI_OF: usize = 32;

/// transformers' `Qwen3Config` (moved to [`sd_models::qwen3`], shared with FLUX.2 [klein]).
pub use sd_models::qwen3::Qwen3Config;

/// Reads a JSON config into `T`, naming the file and the field in errors.
pub(crate) fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    // Python's json writes Infinity/NaN; sd-core's cleaner turns them into JSON.
    let cleaned = sd_core::schedulers::config::python_json(&text);
    serde_json::from_str(&cleaned).map_err(|e| Error::InvalidConfig { path: path.to_path_buf(), reason: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_sizes() {
        let c = ZImageConfig::default();
        assert!(c.check().is_ok());
        assert_eq!((c.head_dim(), c.adaln_dim(), c.ffn_dim(), c.patch_size()), (128, 256, 10240, 2));
        assert_eq!(c.max_caption_tokens(), 992);
        let omni = ZImageConfig { siglip_feat_dim: Some(1152), ..ZImageConfig::default() };
        assert!(omni.check().is_err());
    }
}
