//! Component configs, deserialisable from the `config.json` files of diffusers/transformers folders,
//! with constructors for the full-size published models.

use serde::{Deserialize, Serialize};

/// A value that diffusers lets be either a single number for every block or one per block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    /// The same value for every block.
    One(usize),
    /// One value per down block.
    Many(Vec<usize>),
}

impl PerBlock {
    /// The value for block `i` (the last value repeats when the list is short).
    pub fn get(&self, i: usize) -> usize {
        match self {
            PerBlock::One(v) => *v,
            PerBlock::Many(v) => v.get(i).or(v.last()).copied().unwrap_or(1),
        }
    }
}

/// What the UNet predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    /// The added noise (SD 1.x, SDXL).
    #[default]
    Epsilon,
    /// The velocity `alpha·noise − sigma·x0` (SD 2.x 768 models).
    #[serde(rename = "v_prediction")]
    VPrediction,
    /// The denoised sample itself.
    Sample,
}

/// Config of `UNet2DConditionModel`, field names as in diffusers' `unet/config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UNetConfig {
    /// Latent channels in (4, or 9 for inpainting models).
    #[serde(default = "default_4")]
    pub in_channels: usize,
    /// Latent channels out.
    #[serde(default = "default_4")]
    pub out_channels: usize,
    /// Channels of each resolution level.
    pub block_out_channels: Vec<usize>,
    /// Block kinds going down (`CrossAttnDownBlock2D` / `DownBlock2D`).
    pub down_block_types: Vec<String>,
    /// Block kinds going up (`CrossAttnUpBlock2D` / `UpBlock2D`). Required in a UNet's config
    /// (`read_unet_config` refuses a config without them); a ControlNet's config has none.
    #[serde(default)]
    pub up_block_types: Vec<String>,
    /// Resnets per down block (up blocks have one more).
    #[serde(default = "default_2")]
    pub layers_per_block: usize,
    /// Width of the text embeddings the cross-attention reads.
    pub cross_attention_dim: usize,
    /// diffusers' (misnamed) head count per block when `num_attention_heads` is absent.
    #[serde(default = "default_heads")]
    pub attention_head_dim: PerBlock,
    /// Head count per block (newer configs).
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    /// Transformer blocks per attention (SDXL: 1, 2, 10).
    #[serde(default = "default_one")]
    pub transformer_layers_per_block: PerBlock,
    /// Linear instead of 1×1 conv projections around the transformers (SD 2.x, SDXL).
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
    /// `"text_time"` for SDXL's pooled-text + size/crop conditioning.
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// Width of each sinusoidal time-id embedding (SDXL: 256).
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    /// Input width of the add-embedding MLP (SDXL: 2816 = 1280 pooled + 6·256).
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    /// Compute attention scores in F32 (SD 2.1 needs it in F16).
    #[serde(default)]
    pub upcast_attention: bool,
    /// Native sample size in latent pixels (64 for 512², 96 for 768², 128 for 1024²).
    #[serde(default = "default_64")]
    pub sample_size: usize,
}

fn default_4() -> usize {
    4
}
fn default_2() -> usize {
    2
}
fn default_32() -> usize {
    32
}
fn default_64() -> usize {
    64
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

impl UNetConfig {
    /// Attention heads of down block `i` (diffusers: `num_attention_heads or attention_head_dim`).
    pub fn heads(&self, i: usize) -> usize {
        self.num_attention_heads.as_ref().unwrap_or(&self.attention_head_dim).get(i)
    }

    /// Whether down block `i` has cross-attention.
    pub fn down_has_attn(&self, i: usize) -> bool {
        self.down_block_types.get(i).is_some_and(|t| t.contains("CrossAttn"))
    }

    /// Whether up block `i` has cross-attention.
    pub fn up_has_attn(&self, i: usize) -> bool {
        self.up_block_types.get(i).is_some_and(|t| t.contains("CrossAttn"))
    }

    /// Whether this UNet has SDXL's `text_time` add-embedding.
    pub fn has_text_time(&self) -> bool {
        self.addition_embed_type.as_deref() == Some("text_time")
    }

    fn sd(in_channels: usize, cross: usize, heads: PerBlock, linear: bool, upcast: bool, sample: usize) -> Self {
        Self {
            in_channels,
            out_channels: 4,
            block_out_channels: vec![320, 640, 1280, 1280],
            down_block_types: ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
                .map(String::from)
                .to_vec(),
            up_block_types: ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
                .map(String::from)
                .to_vec(),
            layers_per_block: 2,
            cross_attention_dim: cross,
            attention_head_dim: heads,
            num_attention_heads: None,
            transformer_layers_per_block: PerBlock::One(1),
            use_linear_projection: linear,
            norm_num_groups: 32,
            norm_eps: 1e-5,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            projection_class_embeddings_input_dim: None,
            upcast_attention: upcast,
            sample_size: sample,
        }
    }

    /// SD 1.5 (`in_channels` 4, or 9 for the inpainting model).
    pub fn sd15(in_channels: usize) -> Self {
        Self::sd(in_channels, 768, PerBlock::One(8), false, false, 64)
    }

    /// SD 2.x (`in_channels` 4, or 9 for the inpainting model); 768 px for 2.1, 512 px for 2-inpainting.
    pub fn sd2(in_channels: usize, sample_size: usize) -> Self {
        Self::sd(in_channels, 1024, PerBlock::Many(vec![5, 10, 20, 20]), true, sample_size == 96, sample_size)
    }

    /// SDXL base (`in_channels` 4, or 9 for the inpainting model).
    pub fn sdxl(in_channels: usize) -> Self {
        Self {
            in_channels,
            out_channels: 4,
            block_out_channels: vec![320, 640, 1280],
            down_block_types: ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"].map(String::from).to_vec(),
            up_block_types: ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"].map(String::from).to_vec(),
            layers_per_block: 2,
            cross_attention_dim: 2048,
            attention_head_dim: PerBlock::Many(vec![5, 10, 20]),
            num_attention_heads: None,
            transformer_layers_per_block: PerBlock::Many(vec![1, 2, 10]),
            use_linear_projection: true,
            norm_num_groups: 32,
            norm_eps: 1e-5,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            addition_embed_type: Some("text_time".into()),
            addition_time_embed_dim: Some(256),
            projection_class_embeddings_input_dim: Some(2816),
            upcast_attention: false,
            sample_size: 128,
        }
    }
}

/// Config of `AutoencoderKL`, field names as in diffusers' `vae/config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VaeConfig {
    /// Image channels (3).
    #[serde(default = "default_3")]
    pub in_channels: usize,
    /// Image channels out (3).
    #[serde(default = "default_3")]
    pub out_channels: usize,
    /// Latent channels (4).
    #[serde(default = "default_4")]
    pub latent_channels: usize,
    /// Channels per resolution level.
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder block (decoder blocks have one more).
    #[serde(default = "default_2")]
    pub layers_per_block: usize,
    /// GroupNorm groups.
    #[serde(default = "default_32")]
    pub norm_num_groups: usize,
    /// Latent scaling applied before the UNet (0.18215 SD1/2, 0.13025 SDXL).
    #[serde(default = "default_scaling")]
    pub scaling_factor: f64,
    /// Latent shift (FLUX-style VAEs; absent for SD).
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// Whether the VAE has `quant_conv`/`post_quant_conv`.
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    /// Whether the VAE has `post_quant_conv`.
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    /// Native image size.
    #[serde(default = "default_512")]
    pub sample_size: usize,
    /// Whether the VAE overflows in F16 (true for the original SDXL VAE; false for the fp16-fix one).
    #[serde(default)]
    pub force_upcast: bool,
}

fn default_3() -> usize {
    3
}
fn default_512() -> usize {
    512
}
fn default_scaling() -> f64 {
    0.18215
}

impl VaeConfig {
    /// The SD 1.x / 2.x VAE.
    pub fn sd() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            latent_channels: 4,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
            shift_factor: None,
            use_quant_conv: true,
            use_post_quant_conv: true,
            sample_size: 512,
            force_upcast: false,
        }
    }

    /// The SDXL VAE (same architecture, another scale, overflows in F16).
    pub fn sdxl() -> Self {
        Self { scaling_factor: 0.13025, sample_size: 1024, force_upcast: true, ..Self::sd() }
    }

    /// FLUX.1's 16-channel autoencoder (`ae.safetensors`; Z-Image decodes with it too): no quant convs, a
    /// latent scale and shift.
    pub fn flux1() -> Self {
        Self {
            latent_channels: 16,
            scaling_factor: 0.3611,
            shift_factor: Some(0.1159),
            use_quant_conv: false,
            use_post_quant_conv: false,
            sample_size: 1024,
            force_upcast: true,
            ..Self::sd()
        }
    }

    /// SD 3.x's 16-channel autoencoder: FLUX.1's architecture with its own scale and shift.
    pub fn sd3() -> Self {
        Self { scaling_factor: 1.5305, shift_factor: Some(0.0609), ..Self::flux1() }
    }
}

/// Activation inside the CLIP MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClipActivation {
    /// `x·sigmoid(1.702x)` (OpenAI CLIP).
    QuickGelu,
    /// Exact GELU (OpenCLIP).
    Gelu,
}

/// Config of a CLIP text encoder, field names as in transformers' `text_encoder/config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipConfig {
    /// Vocabulary size.
    #[serde(default = "default_vocab")]
    pub vocab_size: usize,
    /// Width of the transformer.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Transformer layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Maximum sequence length (77).
    #[serde(default = "default_77")]
    pub max_position_embeddings: usize,
    /// MLP activation.
    #[serde(default = "default_act")]
    pub hidden_act: ClipActivation,
    /// LayerNorm epsilon.
    #[serde(default = "default_ln_eps")]
    pub layer_norm_eps: f64,
    /// Output width of `text_projection` (only `CLIPTextModelWithProjection`).
    #[serde(default)]
    pub projection_dim: Option<usize>,
    /// End-of-text token id; 2 means "legacy: take the argmax id" as transformers does.
    #[serde(default = "default_eos")]
    pub eos_token_id: u32,
}

fn default_vocab() -> usize {
    49408
}
fn default_77() -> usize {
    77
}
fn default_act() -> ClipActivation {
    ClipActivation::QuickGelu
}
fn default_ln_eps() -> f64 {
    1e-5
}
fn default_eos() -> u32 {
    2
}

impl ClipConfig {
    /// OpenAI CLIP ViT-L/14 text encoder (SD 1.x, SDXL's first encoder).
    pub fn vit_l14() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: ClipActivation::QuickGelu,
            layer_norm_eps: 1e-5,
            projection_dim: None,
            eos_token_id: 2,
        }
    }

    /// OpenCLIP ViT-H/14 text encoder as SD 2.x uses it: 23 of its 24 layers (the "penultimate" output).
    pub fn vit_h14_sd2() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 23,
            num_attention_heads: 16,
            max_position_embeddings: 77,
            hidden_act: ClipActivation::Gelu,
            layer_norm_eps: 1e-5,
            projection_dim: None,
            eos_token_id: 2,
        }
    }

    /// OpenCLIP ViT-bigG/14 text encoder with projection (SDXL's second encoder).
    pub fn vit_bigg14() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 1280,
            intermediate_size: 5120,
            num_hidden_layers: 32,
            num_attention_heads: 20,
            max_position_embeddings: 77,
            hidden_act: ClipActivation::Gelu,
            layer_norm_eps: 1e-5,
            projection_dim: Some(1280),
            eos_token_id: 49407,
        }
    }
}
