//! The configs of the FLUX.2 transformer and autoencoder, read from diffusers' `config.json` files
//! (`Flux2Transformer2DModel`, `AutoencoderKLFlux2`).

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// diffusers' `Flux2Transformer2DModel` config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Flux2Config {
    /// Patch size (1: the VAE latents are already 2×2-patchified).
    #[serde(default = "d_one")]
    pub patch_size: usize,
    /// Channels of a latent token (128: 32 VAE channels × 2×2).
    #[serde(default = "d_in")]
    pub in_channels: usize,
    /// Output channels (`in_channels` when absent).
    #[serde(default)]
    pub out_channels: Option<usize>,
    /// Double-stream blocks (klein 4B: 5, 9B: 8).
    #[serde(default = "d_layers")]
    pub num_layers: usize,
    /// Single-stream blocks (klein 4B: 20, 9B: 24).
    #[serde(default = "d_single")]
    pub num_single_layers: usize,
    /// Width of an attention head.
    #[serde(default = "d_head")]
    pub attention_head_dim: usize,
    /// Attention heads.
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    /// Width of the text features (3 × the Qwen3 hidden size).
    #[serde(default = "d_joint")]
    pub joint_attention_dim: usize,
    /// Width of the sinusoidal timestep embedding.
    #[serde(default = "d_tgc")]
    pub timestep_guidance_channels: usize,
    /// MLP width as a multiple of the model width.
    #[serde(default = "d_mlp")]
    pub mlp_ratio: f64,
    /// Rotary dimensions of the four position axes (T, H, W, L); they sum to the head width.
    #[serde(default = "d_axes")]
    pub axes_dims_rope: Vec<usize>,
    /// Rotary base.
    #[serde(default = "d_theta")]
    pub rope_theta: f64,
    /// LayerNorm / RMSNorm epsilon.
    #[serde(default = "d_eps")]
    pub eps: f64,
    /// Whether the model has a guidance embedder (klein does not; the pipeline never passes guidance).
    #[serde(default)]
    pub guidance_embeds: bool,
}

fn d_one() -> usize {
    1
}
fn d_in() -> usize {
    128
}
fn d_layers() -> usize {
    8
}
fn d_single() -> usize {
    48
}
fn d_head() -> usize {
    128
}
fn d_heads() -> usize {
    48
}
fn d_joint() -> usize {
    15360
}
fn d_tgc() -> usize {
    256
}
fn d_mlp() -> f64 {
    3.0
}
fn d_axes() -> Vec<usize> {
    vec![32, 32, 32, 32]
}
fn d_theta() -> f64 {
    2000.0
}
fn d_eps() -> f64 {
    1e-6
}

impl Flux2Config {
    /// Reads and checks a `transformer/config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: Self = read_json(path)?;
        cfg.check().map_err(|reason| Error::InvalidConfig { path: path.to_path_buf(), reason })?;
        Ok(cfg)
    }

    /// Whether this crate can run the config; the reason when not.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.patch_size != 1 {
            return Err(format!("patch_size {} is not supported; FLUX.2 uses 1", self.patch_size));
        }
        if self.num_attention_heads == 0 || self.attention_head_dim == 0 || self.in_channels == 0 {
            return Err("num_attention_heads, attention_head_dim and in_channels must be positive".into());
        }
        if self.axes_dims_rope.len() != 4 || self.axes_dims_rope.iter().any(|d| d % 2 == 1) {
            return Err(format!("axes_dims_rope {:?} must be four even sizes (T, H, W, L)", self.axes_dims_rope));
        }
        if self.axes_dims_rope.iter().sum::<usize>() != self.attention_head_dim {
            return Err(format!("axes_dims_rope {:?} must sum to attention_head_dim {}", self.axes_dims_rope, self.attention_head_dim));
        }
        if self.in_channels % 4 != 0 {
            return Err(format!("in_channels {} must be 4 × the VAE's latent channels", self.in_channels));
        }
        Ok(())
    }

    /// The architecture of BFL-named weights read off their shapes (`shape` of un-prefixed names), for single
    /// files, which carry no config: widths from `img_in`, `txt_in`, `time_in` and the MLPs, the head width
    /// from the per-head norms, the rotary split as four equal axes (klein's 32/32/32/32 at head width 128),
    /// klein's rotary base 2000 and epsilon 1e-6.
    pub fn from_bfl_shapes(shape: &dyn Fn(&str) -> Option<Vec<usize>>, num_layers: usize, num_single_layers: usize) -> std::result::Result<Self, String> {
        let need = |n: &str| -> std::result::Result<Vec<usize>, String> {
            shape(n).filter(|s| !s.is_empty()).ok_or_else(|| format!("{n} is missing"))
        };
        let two = |n: &str| -> std::result::Result<(usize, usize), String> {
            let s = need(n)?;
            match s[..] {
                [a, b] => Ok((a, b)),
                _ => Err(format!("{n} has shape {s:?}, expected a matrix")),
            }
        };
        if shape("guidance_in.in_layer.weight").is_some() {
            return Err("it has a guidance embedder (guidance_in), so it is FLUX.2 [dev], whose Mistral text encoder is not supported; use FLUX.2 [klein]".into());
        }
        if num_layers == 0 || num_single_layers == 0 {
            return Err(format!("{num_layers} double_blocks.* and {num_single_layers} single_blocks.*; a FLUX.2 transformer has both"));
        }
        let (dim, in_channels) = two("img_in.weight")?;
        let (_, joint_attention_dim) = two("txt_in.weight")?;
        let (_, timestep_guidance_channels) = two("time_in.in_layer.weight")?;
        let (mlp2, _) = two("double_blocks.0.img_mlp.0.weight")?;
        let (out_channels, _) = two("final_layer.linear.weight")?;
        let norm = ["double_blocks.0.img_attn.norm.query_norm.scale", "double_blocks.0.img_attn.norm.query_norm.weight"];
        let head = norm.iter().find_map(|n| shape(n)).and_then(|s| s.first().copied()).ok_or("double_blocks.0.img_attn.norm.query_norm.scale is missing")?;
        if head == 0 || dim % head != 0 || head % 8 != 0 {
            return Err(format!("a {dim}-wide model with {head}-wide heads (from the query norm) is not a FLUX.2 transformer"));
        }
        let cfg = Self {
            patch_size: 1,
            in_channels,
            out_channels: Some(out_channels),
            num_layers,
            num_single_layers,
            attention_head_dim: head,
            num_attention_heads: dim / head,
            joint_attention_dim,
            timestep_guidance_channels,
            mlp_ratio: mlp2 as f64 / 2.0 / dim as f64,
            axes_dims_rope: vec![head / 4; 4],
            rope_theta: d_theta(),
            eps: d_eps(),
            guidance_embeds: false,
        };
        cfg.check()?;
        Ok(cfg)
    }

    /// Model width (`heads × head_dim`).
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Output channels of a token.
    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// Hidden width of the feed-forward layers (`int(dim · mlp_ratio)`).
    pub fn mlp_hidden(&self) -> usize {
        (self.inner_dim() as f64 * self.mlp_ratio) as usize
    }
}

/// The parts of diffusers' `AutoencoderKLFlux2` config beyond the plain `AutoencoderKL` ones.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Flux2VaeExtra {
    /// Epsilon of the latent batch-norm statistics.
    #[serde(default = "d_bn_eps")]
    pub batch_norm_eps: f64,
    /// Latent patch (2×2).
    #[serde(default = "d_patch")]
    pub patch_size: Vec<usize>,
}

fn d_bn_eps() -> f64 {
    1e-4
}
fn d_patch() -> Vec<usize> {
    vec![2, 2]
}

impl Flux2VaeExtra {
    /// Reads the extra fields of a `vae/config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: Self = read_json(path)?;
        if cfg.patch_size != [2, 2] {
            return Err(Error::InvalidConfig { path: path.to_path_buf(), reason: format!("patch_size {:?} is not supported; FLUX.2 uses [2, 2]", cfg.patch_size) });
        }
        Ok(cfg)
    }
}

/// Reads a JSON config into `T`, naming the file and the field in errors.
pub(crate) fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::NotFound { what: "config".into(), path: path.to_path_buf(), hint: format!("{e}; pass a diffusers FLUX.2 [klein] folder") })?;
    let cleaned = sd_core::schedulers::config::python_json(&text);
    serde_json::from_str(&cleaned).map_err(|e| Error::InvalidConfig { path: path.to_path_buf(), reason: e.to_string() })
}
