//! `ControlNetModel` config, deserialised from a diffusers `controlnet/config.json`.

use serde::{Deserialize, Serialize};
use sd_models::{PerBlock, UNetConfig};

use crate::error::{Error, Result};

/// Config of diffusers' `ControlNetModel`; field names as in its `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlNetConfig {
    /// Latent channels of the sample (4; the ControlNet never sees inpainting mask channels).
    #[serde(default = "default_4")]
    pub in_channels: usize,
    /// Channels of the pixel-space control image.
    #[serde(default = "default_3")]
    pub conditioning_channels: usize,
    /// Channels of each resolution level of the encoder copy.
    pub block_out_channels: Vec<usize>,
    /// Block kinds going down (`CrossAttnDownBlock2D` / `DownBlock2D`).
    pub down_block_types: Vec<String>,
    /// Resnets per down block.
    #[serde(default = "default_2")]
    pub layers_per_block: usize,
    /// Width of the text embeddings the cross-attention reads.
    pub cross_attention_dim: usize,
    /// diffusers' head count per block when `num_attention_heads` is absent.
    #[serde(default = "default_heads")]
    pub attention_head_dim: PerBlock,
    /// Head count per block (newer configs).
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    /// Transformer blocks per attention.
    #[serde(default = "default_one")]
    pub transformer_layers_per_block: PerBlock,
    /// Linear instead of 1×1 conv projections around the transformers.
    #[serde(default)]
    pub use_linear_projection: bool,
    /// GroupNorm groups.
    #[serde(default = "default_32")]
    pub norm_num_groups: usize,
    /// GroupNorm epsilon.
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    /// Sinusoidal embedding ordering.
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    /// Sinusoidal embedding frequency shift.
    #[serde(default)]
    pub freq_shift: f64,
    /// `"text_time"` for SDXL ControlNets.
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// Width of each sinusoidal time-id embedding (SDXL).
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    /// Input width of the add-embedding MLP (SDXL).
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    /// Compute attention scores in F32.
    #[serde(default)]
    pub upcast_attention: bool,
    /// Channels of the control-image embedding convolutions (each step after the first halves the size).
    #[serde(default = "default_cond_channels")]
    pub conditioning_embedding_out_channels: Vec<usize>,
    /// `"rgb"` or `"bgr"`: channel order the control image is expected in.
    #[serde(default = "default_rgb")]
    pub controlnet_conditioning_channel_order: String,
    /// Average the residuals over space (shuffle-style ControlNets).
    #[serde(default)]
    pub global_pool_conditions: bool,
    /// Mid block kind; only `UNetMidBlock2DCrossAttn` is supported.
    #[serde(default)]
    pub mid_block_type: Option<String>,
    /// Class embedding kind; must be absent.
    #[serde(default)]
    pub class_embed_type: Option<String>,
}

fn default_4() -> usize {
    4
}
fn default_3() -> usize {
    3
}
fn default_2() -> usize {
    2
}
fn default_32() -> usize {
    32
}
fn default_heads() -> PerBlock {
    PerBlock::One(8)
}
fn default_one() -> PerBlock {
    PerBlock::One(1)
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}
fn default_cond_channels() -> Vec<usize> {
    vec![16, 32, 96, 256]
}
fn default_rgb() -> String {
    "rgb".into()
}

impl ControlNetConfig {
    /// Parses a diffusers ControlNet `config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        let cfg: Self = serde_json::from_str(text).map_err(|e| Error::Config(format!("{e}; pass a diffusers ControlNetModel config.json")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Rejects configs this implementation would run wrongly.
    pub fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n {
            return Err(Error::Config(format!(
                "{n} block_out_channels but {} down_block_types; they must be equal and non-zero",
                self.down_block_types.len()
            )));
        }
        if self.conditioning_embedding_out_channels.is_empty() {
            return Err(Error::Config("conditioning_embedding_out_channels is empty".into()));
        }
        if !matches!(self.controlnet_conditioning_channel_order.as_str(), "rgb" | "bgr") {
            return Err(Error::Config(format!(
                "controlnet_conditioning_channel_order {:?} is neither \"rgb\" nor \"bgr\"",
                self.controlnet_conditioning_channel_order
            )));
        }
        if let Some(t) = self.mid_block_type.as_deref().filter(|t| *t != "UNetMidBlock2DCrossAttn") {
            return Err(Error::Config(format!("mid_block_type {t:?} is not supported; only UNetMidBlock2DCrossAttn")));
        }
        if let Some(t) = &self.class_embed_type {
            return Err(Error::Config(format!("class_embed_type {t:?} is not supported")));
        }
        Ok(())
    }

    /// The UNet config whose encoder half this ControlNet copies (up blocks mirrored, never built).
    pub fn unet_config(&self) -> UNetConfig {
        let up_block_types = self
            .down_block_types
            .iter()
            .rev()
            .map(|t| if t.contains("CrossAttn") { "CrossAttnUpBlock2D".to_string() } else { "UpBlock2D".to_string() })
            .collect();
        UNetConfig {
            in_channels: self.in_channels,
            out_channels: self.in_channels,
            block_out_channels: self.block_out_channels.clone(),
            down_block_types: self.down_block_types.clone(),
            up_block_types,
            layers_per_block: self.layers_per_block,
            cross_attention_dim: self.cross_attention_dim,
            attention_head_dim: self.attention_head_dim.clone(),
            num_attention_heads: self.num_attention_heads.clone(),
            transformer_layers_per_block: self.transformer_layers_per_block.clone(),
            use_linear_projection: self.use_linear_projection,
            norm_num_groups: self.norm_num_groups,
            norm_eps: self.norm_eps,
            flip_sin_to_cos: self.flip_sin_to_cos,
            freq_shift: self.freq_shift,
            addition_embed_type: self.addition_embed_type.clone(),
            addition_time_embed_dim: self.addition_time_embed_dim,
            projection_class_embeddings_input_dim: self.projection_class_embeddings_input_dim,
            upcast_attention: self.upcast_attention,
            sample_size: 64,
        }
    }

    /// Checks that this ControlNet's residuals fit `unet` (same encoder geometry and text width).
    pub fn check_compatible(&self, unet: &UNetConfig) -> Result<()> {
        let mismatch = |what: &str, ours: String, theirs: String| Err(Error::Incompatible(format!("{what} is {ours} but the UNet's is {theirs}")));
        if self.cross_attention_dim != unet.cross_attention_dim {
            return mismatch("cross_attention_dim", self.cross_attention_dim.to_string(), unet.cross_attention_dim.to_string());
        }
        if self.block_out_channels != unet.block_out_channels {
            return mismatch("block_out_channels", format!("{:?}", self.block_out_channels), format!("{:?}", unet.block_out_channels));
        }
        if self.layers_per_block != unet.layers_per_block {
            return mismatch("layers_per_block", self.layers_per_block.to_string(), unet.layers_per_block.to_string());
        }
        if self.in_channels != unet.out_channels {
            return mismatch("latent channel count", self.in_channels.to_string(), unet.out_channels.to_string());
        }
        let ours = self.addition_embed_type.as_deref() == Some("text_time");
        if ours != unet.has_text_time() {
            return mismatch("SDXL text_time conditioning", ours.to_string(), unet.has_text_time().to_string());
        }
        Ok(())
    }
}
