//! `ControlNetModel` config, deserialised from a diffusers `controlnet/config.json`.

use serde::{Deserialize, Serialize};
use sd_models::UNetConfig;

use crate::error::{Error, Result};

/// Config of diffusers' `ControlNetModel`; field names as in its `config.json`. The encoder's geometry
/// is the UNet config's own fields (a ControlNet copies the UNet's encoder), read from the same JSON;
/// only what a ControlNet adds is declared here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlNetConfig {
    /// The encoder copy: every `UNet2DConditionModel` field the ControlNet's `config.json` shares
    /// (`in_channels` is the latent count: a ControlNet never sees inpainting mask channels). Its up
    /// blocks mirror the down blocks and are never built.
    #[serde(flatten)]
    pub unet: UNetConfig,
    /// Channels of the pixel-space control image.
    #[serde(default = "default_3")]
    pub conditioning_channels: usize,
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

fn default_3() -> usize {
    3
}
fn default_cond_channels() -> Vec<usize> {
    vec![16, 32, 96, 256]
}
fn default_rgb() -> String {
    "rgb".into()
}

/// The up block kinds a UNet with these down blocks has (a ControlNet config lists none).
fn mirrored_up_blocks(down: &[String]) -> Vec<String> {
    down.iter().rev().map(|t| if t.contains("CrossAttn") { "CrossAttnUpBlock2D".to_string() } else { "UpBlock2D".to_string() }).collect()
}

impl ControlNetConfig {
    /// Parses a diffusers ControlNet `config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        let mut cfg: Self = serde_json::from_str(text).map_err(|e| Error::Config(format!("{e}; pass a diffusers ControlNetModel config.json")))?;
        cfg.unet.up_block_types = mirrored_up_blocks(&cfg.unet.down_block_types);
        cfg.unet.out_channels = cfg.unet.in_channels;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The config of a ControlNet whose encoder copies `unet` (single files carry no config), with
    /// `in_channels` latent channels, a control image of `conditioning_channels` and the given
    /// conditioning-embedding widths.
    pub fn for_unet(unet: &UNetConfig, in_channels: usize, conditioning_channels: usize, conditioning_embedding_out_channels: Vec<usize>) -> Self {
        let mut unet = unet.clone();
        unet.in_channels = in_channels;
        unet.out_channels = in_channels;
        unet.up_block_types = mirrored_up_blocks(&unet.down_block_types);
        Self {
            unet,
            conditioning_channels,
            conditioning_embedding_out_channels,
            controlnet_conditioning_channel_order: "rgb".into(),
            global_pool_conditions: false,
            mid_block_type: None,
            class_embed_type: None,
        }
    }

    /// Rejects configs this implementation would run wrongly.
    pub fn validate(&self) -> Result<()> {
        let n = self.unet.block_out_channels.len();
        if n == 0 || self.unet.down_block_types.len() != n {
            return Err(Error::Config(format!(
                "{n} block_out_channels but {} down_block_types; they must be equal and non-zero",
                self.unet.down_block_types.len()
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

    /// Checks that this ControlNet's residuals fit `unet` (same encoder geometry and text width).
    pub fn check_compatible(&self, unet: &UNetConfig) -> Result<()> {
        let mismatch = |what: &str, ours: String, theirs: String| Err(Error::Incompatible(format!("{what} is {ours} but the UNet's is {theirs}")));
        let ours = &self.unet;
        if ours.cross_attention_dim != unet.cross_attention_dim {
            return mismatch("cross_attention_dim", ours.cross_attention_dim.to_string(), unet.cross_attention_dim.to_string());
        }
        if ours.block_out_channels != unet.block_out_channels {
            return mismatch("block_out_channels", format!("{:?}", ours.block_out_channels), format!("{:?}", unet.block_out_channels));
        }
        if ours.layers_per_block != unet.layers_per_block {
            return mismatch("layers_per_block", ours.layers_per_block.to_string(), unet.layers_per_block.to_string());
        }
        if ours.in_channels != unet.out_channels {
            return mismatch("latent channel count", ours.in_channels.to_string(), unet.out_channels.to_string());
        }
        let ours = ours.has_text_time();
        if ours != unet.has_text_time() {
            return mismatch("SDXL text_time conditioning", ours.to_string(), unet.has_text_time().to_string());
        }
        Ok(())
    }
}
