//! diffusers' `UNet2DConditionModel` for SD 1.x, SD 2.x, SDXL and their 9-channel inpainting
//! variants, with SDXL's `text_time` add-embedding and ControlNet residual inputs.
//!
//! Written here rather than taken from candle-transformers because that UNet has neither the
//! SDXL add-embedding nor residual inputs, and its GEGLU uses tanh-GELU where diffusers uses exact
//! erf GELU. Every convolution goes through [`crate::ops::Conv2d`] and every attention through
//! [`crate::ops::attention`] so performance work happens in one place.

pub mod blocks;
pub mod embeddings;
pub mod transformer;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use self::blocks::{DownBlock, MidBlock, ResnetSpec, UpBlock, UpChannels};
use self::embeddings::TimeEmbedding;
use self::transformer::TransformerSpec;
use crate::config::UNetConfig;
use crate::ops;
use crate::{Error, Result};

/// SDXL's extra conditioning (`added_cond_kwargs` in diffusers).
#[derive(Debug, Clone)]
pub struct AddedCond {
    /// Pooled, projected text embedding of the second text encoder, `[batch, pooled_dim]`.
    pub text_embeds: Tensor,
    /// Size/crop conditioning `[batch, n]` (SDXL base: original h, w, crop top, left, target h, w).
    pub time_ids: Tensor,
}

/// Optional inputs of a UNet step beyond sample, timestep and text embeddings.
#[derive(Debug, Clone, Default)]
pub struct UNetConditioning {
    /// SDXL's `text_time` conditioning; required exactly when the config has `addition_embed_type = "text_time"`.
    pub added: Option<AddedCond>,
    /// ControlNet residuals, one per skip connection (conv_in output, every resnet/attention
    /// output, every downsampler output), added to the skips as diffusers does. Always read as
    /// ControlNet residuals, even without `mid_residual` (where diffusers would switch to T2I-Adapter
    /// semantics, which this UNet does not implement).
    pub down_residuals: Option<Vec<Tensor>>,
    /// ControlNet residual added to the mid-block output.
    pub mid_residual: Option<Tensor>,
}

/// The denoising UNet of Stable Diffusion (diffusers `UNet2DConditionModel`).
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    cfg: UNetConfig,
    time_embedding: TimeEmbedding,
    conv_in: ops::Conv2d,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: ops::GroupNorm,
    conv_out: ops::Conv2d,
    dtype: DType,
    device: Device,
}

const DOWN_TYPES: [&str; 2] = ["CrossAttnDownBlock2D", "DownBlock2D"];
const UP_TYPES: [&str; 2] = ["CrossAttnUpBlock2D", "UpBlock2D"];

impl UNet2DConditionModel {
    /// Loads the UNet from `vb` (rooted at the `unet/` weights: `conv_in.weight`, `down_blocks.0…`).
    pub fn new(vb: VarBuilder, cfg: &UNetConfig) -> candle_core::Result<Self> {
        validate_config(cfg)?;
        let n = cfg.block_out_channels.len();
        let boc = &cfg.block_out_channels;
        let device = vb.device().clone();
        let dtype = vb.dtype();
        let temb_dim = boc[0] * 4;
        let resnet = ResnetSpec { temb_dim, groups: cfg.norm_num_groups, eps: cfg.norm_eps };
        let transformer = |channels: usize, block: usize| TransformerSpec {
            channels,
            heads: cfg.heads(block),
            depth: cfg.transformer_layers_per_block.get(block),
            context_dim: cfg.cross_attention_dim,
            groups: cfg.norm_num_groups,
            linear_projection: cfg.use_linear_projection,
            upcast_attention: cfg.upcast_attention,
        };

        let time_embedding = TimeEmbedding::new(vb.clone(), cfg)?;
        let conv_in = ops::Conv2d::load(vb.pp("conv_in"), cfg.in_channels, boc[0], 3, 1, 1)?;

        let mut down_blocks = Vec::with_capacity(n);
        for i in 0..n {
            let c_in = if i == 0 { boc[0] } else { boc[i - 1] };
            let attn = cfg.down_has_attn(i).then(|| transformer(boc[i], i));
            let vb_i = vb.pp("down_blocks").pp(i);
            down_blocks.push(DownBlock::new(vb_i, c_in, boc[i], cfg.layers_per_block, resnet, attn, i + 1 < n)?);
        }

        // diffusers gives the mid block the last down level's heads and depth.
        let mid_block = MidBlock::new(vb.pp("mid_block"), boc[n - 1], resnet, transformer(boc[n - 1], n - 1))?;

        let mut up_blocks = Vec::with_capacity(n);
        for i in 0..n {
            // Up level i mirrors down level n-1-i and inherits its heads and depth.
            let level = n - 1 - i;
            let ch = UpChannels {
                c_in: boc[level.saturating_sub(1)],
                c_out: boc[level],
                c_prev: if i == 0 { boc[n - 1] } else { boc[level + 1] },
            };
            let attn = cfg.up_has_attn(i).then(|| transformer(boc[level], level));
            let vb_i = vb.pp("up_blocks").pp(i);
            up_blocks.push(UpBlock::new(vb_i, ch, cfg.layers_per_block + 1, resnet, attn, i + 1 < n)?);
        }

        let conv_norm_out = ops::group_norm(vb.pp("conv_norm_out"), cfg.norm_num_groups, boc[0], cfg.norm_eps)?;
        let conv_out = ops::Conv2d::load(vb.pp("conv_out"), boc[0], cfg.out_channels, 3, 1, 1)?;
        Ok(Self {
            cfg: cfg.clone(),
            time_embedding,
            conv_in,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
            dtype,
            device,
        })
    }

    /// The config the model was built from.
    pub fn config(&self) -> &UNetConfig {
        &self.cfg
    }

    /// The dtype of the weights (inputs are converted to it).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device of the weights.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The `[b, c, h, w]` shapes a ControlNet's down residuals must have for a `[batch, _, height, width]` sample,
    /// in the order diffusers lists them; the mid residual has the shape of the last entry.
    pub fn down_residual_shapes(&self, batch: usize, height: usize, width: usize) -> Vec<[usize; 4]> {
        let boc = &self.cfg.block_out_channels;
        let n = boc.len();
        let mut shapes = vec![[batch, boc[0], height, width]];
        let (mut h, mut w) = (height, width);
        for (i, &c) in boc.iter().enumerate() {
            shapes.extend(std::iter::repeat_n([batch, c, h, w], self.cfg.layers_per_block));
            if i + 1 < n {
                // A stride-2, padding-1, 3×3 convolution rounds odd sizes up.
                (h, w) = (h.div_ceil(2), w.div_ceil(2));
                shapes.push([batch, c, h, w]);
            }
        }
        shapes
    }

    /// The `[b, c, h, w]` shape the ControlNet mid residual must have.
    pub fn mid_residual_shape(&self, batch: usize, height: usize, width: usize) -> [usize; 4] {
        let boc = &self.cfg.block_out_channels;
        let down = boc.len() - 1;
        let (h, w) = (0..down).fold((height, width), |(h, w), _| (h.div_ceil(2), w.div_ceil(2)));
        [batch, boc[down], h, w]
    }

    /// Predicts noise (or v / x0, per the scheduler config) for `sample` `[b, in_channels, h, w]` at
    /// one `timestep` shared by the batch, with text embeddings `[b, seq, cross_attention_dim]`.
    pub fn forward(&self, sample: &Tensor, timestep: f64, encoder_hidden_states: &Tensor, cond: &UNetConditioning) -> Result<Tensor> {
        // diffusers casts the timestep to F32 before embedding it, so F32 here loses nothing.
        let t = Tensor::new(&[timestep as f32], &self.device)?;
        self.forward_t(sample, &t, encoder_hidden_states, cond)
    }

    /// [`Self::forward`] without SDXL or ControlNet conditioning.
    pub fn forward_simple(&self, sample: &Tensor, timestep: f64, encoder_hidden_states: &Tensor) -> Result<Tensor> {
        self.forward(sample, timestep, encoder_hidden_states, &UNetConditioning::default())
    }

    /// [`Self::forward`] with `timesteps` as a tensor: a scalar, `[1]`, or `[b]` (one per sample).
    pub fn forward_t(&self, sample: &Tensor, timesteps: &Tensor, encoder_hidden_states: &Tensor, cond: &UNetConditioning) -> Result<Tensor> {
        let (b, _, _) = self.validate_inputs(sample, encoder_hidden_states, cond)?;
        let timesteps = self.batch_timesteps(timesteps, b)?;
        // Both conversions are free when the caller already matches the weights.
        let sample = sample.to_device(&self.device)?.to_dtype(self.dtype)?;
        let context = encoder_hidden_states.to_device(&self.device)?.to_dtype(self.dtype)?;

        let emb = self.time_embedding.forward(&timesteps, cond.added.as_ref())?;
        // Every resnet projects silu(emb); computing it once saves a pass per resnet.
        let temb_act = ops::silu(&emb)?;

        let mut x = self.conv_in.forward(&sample)?;
        let mut skips = Vec::with_capacity(self.up_blocks.iter().map(UpBlock::num_skips).sum());
        skips.push(x.clone());
        for block in &self.down_blocks {
            x = block.forward(&x, &temb_act, &context, &mut skips)?;
        }
        if let Some(residuals) = &cond.down_residuals {
            // ControlNet residuals touch only the skips; the sample entering the mid block is untouched.
            for (skip, residual) in skips.iter_mut().zip(residuals) {
                *skip = (&*skip + residual.to_device(&self.device)?.to_dtype(self.dtype)?)?;
            }
        }
        x = self.mid_block.forward(&x, &temb_act, &context)?;
        if let Some(residual) = &cond.mid_residual {
            x = (x + residual.to_device(&self.device)?.to_dtype(self.dtype)?)?;
        }
        for block in &self.up_blocks {
            x = block.forward(&x, &temb_act, &context, &mut skips)?;
        }
        let x = self.conv_norm_out.forward_silu(&x)?;
        Ok(self.conv_out.forward(&x)?)
    }

    /// Turns a scalar, `[1]` or `[b]` timestep tensor into `[b]` on the model's device.
    fn batch_timesteps(&self, timesteps: &Tensor, b: usize) -> Result<Tensor> {
        let t = timesteps.to_device(&self.device)?;
        let t = match t.dims() {
            [] => t.reshape(1)?,
            [n] if *n == 1 || *n == b => t,
            dims => {
                return Err(Error::InvalidInput(format!(
                    "timesteps must be a scalar, [1] or [batch = {b}], got shape {dims:?}"
                )))
            }
        };
        Ok(if t.dim(0)? == b { t } else { t.broadcast_as(b)? })
    }

    /// Checks every input against the config before any compute, returning `(batch, height, width)`.
    fn validate_inputs(&self, sample: &Tensor, context: &Tensor, cond: &UNetConditioning) -> Result<(usize, usize, usize)> {
        let cfg = &self.cfg;
        let invalid = |msg: String| Err(Error::InvalidInput(msg));
        let &[b, c, h, w] = sample.dims() else {
            return invalid(format!("sample must be [batch, channels, height, width], got shape {:?}", sample.dims()));
        };
        if c != cfg.in_channels {
            return invalid(format!(
                "sample has {c} channels but this UNet takes {}; inpainting UNets take 9 (latents, mask, masked-image latents), others 4",
                cfg.in_channels
            ));
        }
        if b == 0 || h == 0 || w == 0 {
            return invalid(format!("latent size {h}×{w} (batch {b}) must be non-empty"));
        }
        match context.dims() {
            &[cb, _, cd] if cb == b && cd == cfg.cross_attention_dim => {}
            dims => {
                return invalid(format!(
                    "encoder_hidden_states must be [batch = {b}, seq, {}], got shape {dims:?}; was it produced by the text encoder of this model?",
                    cfg.cross_attention_dim
                ))
            }
        }
        match (self.time_embedding.add_dims(), &cond.added) {
            (Some(add), Some(added)) => {
                let (tb, td) = match added.text_embeds.dims() {
                    &[tb, td] => (tb, td),
                    dims => return invalid(format!("text_embeds must be [batch, dim], got shape {dims:?}")),
                };
                let (ib, n_ids) = match added.time_ids.dims() {
                    &[ib, n] => (ib, n),
                    dims => return invalid(format!("time_ids must be [batch, n] (SDXL: n = 6), got shape {dims:?}")),
                };
                if tb != b || ib != b {
                    return invalid(format!("text_embeds (batch {tb}) and time_ids (batch {ib}) must have the sample's batch {b}"));
                }
                if td + n_ids * add.time_dim != add.in_dim {
                    return invalid(format!(
                        "text_embeds width {td} + {n_ids} time ids × {} must equal the add-embedding input {}; use the pooled output of the second text encoder and 6 time ids",
                        add.time_dim, add.in_dim
                    ));
                }
            }
            (Some(_), None) => {
                return invalid(
                    "this SDXL-style UNet needs text_time conditioning: pass UNetConditioning::added with text_embeds and time_ids".into(),
                )
            }
            (None, Some(_)) => {
                return invalid("this UNet has no text_time add-embedding; leave UNetConditioning::added as None".into())
            }
            (None, None) => {}
        }
        if let Some(residuals) = &cond.down_residuals {
            let expected = self.down_residual_shapes(b, h, w);
            if residuals.len() != expected.len() {
                return invalid(format!(
                    "got {} ControlNet down residuals but this UNet has {} skip connections; the ControlNet must match the UNet architecture",
                    residuals.len(),
                    expected.len()
                ));
            }
            for (i, (r, e)) in residuals.iter().zip(&expected).enumerate() {
                if r.dims() != e {
                    return invalid(format!("ControlNet down residual {i} has shape {:?}, expected {e:?}", r.dims()));
                }
            }
        }
        if let Some(r) = &cond.mid_residual {
            let e = self.mid_residual_shape(b, h, w);
            if r.dims() != e {
                return invalid(format!("ControlNet mid residual has shape {:?}, expected {e:?}", r.dims()));
            }
        }
        Ok((b, h, w))
    }
}

/// Rejects configs this implementation would load wrongly, before any weight is read.
fn validate_config(cfg: &UNetConfig) -> candle_core::Result<()> {
    let n = cfg.block_out_channels.len();
    if n == 0 || cfg.down_block_types.len() != n || cfg.up_block_types.len() != n {
        candle_core::bail!(
            "UNet config has {n} block_out_channels, {} down_block_types and {} up_block_types; they must be equal and non-zero",
            cfg.down_block_types.len(),
            cfg.up_block_types.len()
        );
    }
    if let Some(t) = cfg.down_block_types.iter().find(|t| !DOWN_TYPES.contains(&t.as_str())) {
        candle_core::bail!("unsupported down block type {t:?}; supported: {DOWN_TYPES:?}");
    }
    if let Some(t) = cfg.up_block_types.iter().find(|t| !UP_TYPES.contains(&t.as_str())) {
        candle_core::bail!("unsupported up block type {t:?}; supported: {UP_TYPES:?}");
    }
    if cfg.layers_per_block == 0 {
        candle_core::bail!("UNet config has layers_per_block 0; Stable Diffusion UNets use 2");
    }
    match cfg.addition_embed_type.as_deref() {
        Some("text_time") if cfg.addition_time_embed_dim.is_none() || cfg.projection_class_embeddings_input_dim.is_none() => {
            candle_core::bail!(
                "addition_embed_type \"text_time\" needs addition_time_embed_dim and projection_class_embeddings_input_dim in the UNet config"
            )
        }
        None | Some("text_time") => {}
        Some(other) => candle_core::bail!("unsupported addition_embed_type {other:?}; only \"text_time\" (SDXL) is supported"),
    }
    Ok(())
}
