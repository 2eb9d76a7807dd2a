//! The UNet's resolution levels: ResNet blocks, down/up samplers, and the down, mid and up blocks
//! that combine them with transformers.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::transformer::{Transformer2D, TransformerSpec};
use crate::ops::{self, Linear};

/// diffusers' `ResnetBlock2D` (default time-embedding norm, output scale 1).
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: ops::GroupNorm,
    conv1: ops::Conv2d,
    time_emb_proj: Linear,
    norm2: ops::GroupNorm,
    conv2: ops::Conv2d,
    conv_shortcut: Option<ops::Conv2d>,
}

impl ResnetBlock2D {
    /// Loads a block mapping `c_in` to `c_out` channels.
    pub fn new(vb: VarBuilder, c_in: usize, c_out: usize, temb_dim: usize, groups: usize, eps: f64) -> Result<Self> {
        let conv_shortcut = if c_in != c_out { Some(ops::Conv2d::load(vb.pp("conv_shortcut"), c_in, c_out, 1, 1, 0)?) } else { None };
        Ok(Self {
            norm1: ops::group_norm(vb.pp("norm1"), groups, c_in, eps)?,
            conv1: ops::Conv2d::load(vb.pp("conv1"), c_in, c_out, 3, 1, 1)?,
            time_emb_proj: ops::linear(vb.pp("time_emb_proj"), temb_dim, c_out, true)?,
            norm2: ops::group_norm(vb.pp("norm2"), groups, c_out, eps)?,
            conv2: ops::Conv2d::load(vb.pp("conv2"), c_out, c_out, 3, 1, 1)?,
            conv_shortcut,
        })
    }

    /// `temb_act` is `silu(emb)` `[b, temb_dim]`, computed once per step by the caller since every
    /// block would otherwise recompute the same activation.
    pub fn forward(&self, x: &Tensor, temb_act: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        let t = self.time_emb_proj.forward(temb_act)?;
        let (b, c) = t.dims2()?;
        let h = h.broadcast_add(&t.reshape((b, c, 1, 1))?)?;
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        match &self.conv_shortcut {
            Some(conv) => conv.forward(x)? + h,
            None => x + h,
        }
    }
}

/// What every resnet of a UNet shares.
#[derive(Debug, Clone, Copy)]
pub struct ResnetSpec {
    /// Width of the time embedding.
    pub temb_dim: usize,
    /// GroupNorm groups.
    pub groups: usize,
    /// GroupNorm epsilon.
    pub eps: f64,
}

/// One down level: `layers` × (resnet [+ transformer]) then an optional stride-2 convolution.
#[derive(Debug, Clone)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    downsampler: Option<ops::Conv2d>,
}

impl DownBlock {
    /// Loads `resnets.*`, `attentions.*` (when `attn` is given) and `downsamplers.0.conv`.
    pub fn new(
        vb: VarBuilder,
        c_in: usize,
        c_out: usize,
        layers: usize,
        resnet: ResnetSpec,
        attn: Option<TransformerSpec>,
        downsample: bool,
    ) -> Result<Self> {
        let mut resnets = Vec::with_capacity(layers);
        let mut attentions = Vec::new();
        for j in 0..layers {
            let c = if j == 0 { c_in } else { c_out };
            resnets.push(ResnetBlock2D::new(vb.pp("resnets").pp(j), c, c_out, resnet.temb_dim, resnet.groups, resnet.eps)?);
            if let Some(spec) = attn {
                attentions.push(Transformer2D::new(vb.pp("attentions").pp(j), spec)?);
            }
        }
        let downsampler =
            if downsample { Some(ops::Conv2d::load(vb.pp("downsamplers.0.conv"), c_out, c_out, 3, 2, 1)?) } else { None };
        Ok(Self { resnets, attentions, downsampler })
    }

    /// Runs the level, pushing every intermediate output onto `skips` for the up path.
    pub fn forward(&self, x: &Tensor, temb_act: &Tensor, context: &Tensor, skips: &mut Vec<Tensor>) -> Result<Tensor> {
        let mut x = x.clone();
        for (j, resnet) in self.resnets.iter().enumerate() {
            x = resnet.forward(&x, temb_act)?;
            if let Some(attn) = self.attentions.get(j) {
                x = attn.forward(&x, context)?;
            }
            skips.push(x.clone());
        }
        if let Some(conv) = &self.downsampler {
            x = conv.forward(&x)?;
            skips.push(x.clone());
        }
        Ok(x)
    }
}

/// `UNetMidBlock2DCrossAttn` with one layer: resnet, transformer, resnet.
#[derive(Debug, Clone)]
pub struct MidBlock {
    resnet0: ResnetBlock2D,
    attention: Transformer2D,
    resnet1: ResnetBlock2D,
}

impl MidBlock {
    /// Loads `resnets.0`, `attentions.0`, `resnets.1`.
    pub fn new(vb: VarBuilder, c: usize, resnet: ResnetSpec, attn: TransformerSpec) -> Result<Self> {
        let res = |j: usize| ResnetBlock2D::new(vb.pp("resnets").pp(j), c, c, resnet.temb_dim, resnet.groups, resnet.eps);
        Ok(Self { resnet0: res(0)?, attention: Transformer2D::new(vb.pp("attentions.0"), attn)?, resnet1: res(1)? })
    }

    /// Runs the bottleneck.
    pub fn forward(&self, x: &Tensor, temb_act: &Tensor, context: &Tensor) -> Result<Tensor> {
        let x = self.resnet0.forward(x, temb_act)?;
        let x = self.attention.forward(&x, context)?;
        self.resnet1.forward(&x, temb_act)
    }
}

/// One up level: `layers` × (concat skip, resnet [+ transformer]) then an optional nearest 2×
/// upsampling followed by a 3×3 convolution.
#[derive(Debug, Clone)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    upsampler: Option<ops::Conv2d>,
}

/// Channel bookkeeping of an up level, named as in diffusers' `get_up_block`.
#[derive(Debug, Clone, Copy)]
pub struct UpChannels {
    /// Channels of the matching down level's input (the last skip this level consumes).
    pub c_in: usize,
    /// Channels this level produces.
    pub c_out: usize,
    /// Channels coming from the previous up level (or the mid block).
    pub c_prev: usize,
}

impl UpBlock {
    /// Loads `resnets.*`, `attentions.*` (when `attn` is given) and `upsamplers.0.conv`.
    pub fn new(
        vb: VarBuilder,
        ch: UpChannels,
        layers: usize,
        resnet: ResnetSpec,
        attn: Option<TransformerSpec>,
        upsample: bool,
    ) -> Result<Self> {
        let mut resnets = Vec::with_capacity(layers);
        let mut attentions = Vec::new();
        for j in 0..layers {
            let skip = if j + 1 == layers { ch.c_in } else { ch.c_out };
            let prev = if j == 0 { ch.c_prev } else { ch.c_out };
            resnets.push(ResnetBlock2D::new(
                vb.pp("resnets").pp(j),
                prev + skip,
                ch.c_out,
                resnet.temb_dim,
                resnet.groups,
                resnet.eps,
            )?);
            if let Some(spec) = attn {
                attentions.push(Transformer2D::new(vb.pp("attentions").pp(j), spec)?);
            }
        }
        let upsampler =
            if upsample { Some(ops::Conv2d::load(vb.pp("upsamplers.0.conv"), ch.c_out, ch.c_out, 3, 1, 1)?) } else { None };
        Ok(Self { resnets, attentions, upsampler })
    }

    /// Number of skip tensors this level consumes.
    pub fn num_skips(&self) -> usize {
        self.resnets.len()
    }

    /// Runs the level, popping its skips from the end of `skips`.
    pub fn forward(&self, x: &Tensor, temb_act: &Tensor, context: &Tensor, skips: &mut Vec<Tensor>) -> Result<Tensor> {
        let mut x = x.clone();
        for (j, resnet) in self.resnets.iter().enumerate() {
            let Some(skip) = skips.pop() else {
                candle_core::bail!("UNet up block ran out of skip connections; the down and up block configs do not match");
            };
            x = Tensor::cat(&[&x, &skip], 1)?;
            x = resnet.forward(&x, temb_act)?;
            if let Some(attn) = self.attentions.get(j) {
                x = attn.forward(&x, context)?;
            }
        }
        if let Some(conv) = &self.upsampler {
            // Upsample to the next skip's size rather than 2×: latents that are not a multiple of
            // 2^(levels−1) (e.g. 520 px images) were rounded up on the way down (diffusers'
            // `forward_upsample_size`).
            let (h, w) = match skips.last() {
                Some(skip) => (skip.dim(2)?, skip.dim(3)?),
                None => {
                    let (_, _, h, w) = x.dims4()?;
                    (2 * h, 2 * w)
                }
            };
            x = conv.forward(&x.upsample_nearest2d(h, w)?)?;
        }
        Ok(x)
    }
}
