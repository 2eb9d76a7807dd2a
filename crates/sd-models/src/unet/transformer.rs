//! diffusers' `Transformer2DModel` as the UNet uses it: GroupNorm, input projection, a stack of
//! `BasicTransformerBlock`s (self-attention, cross-attention, GEGLU feed-forward), output
//! projection and a residual.
//!
//! The blocks run on `[batch, h·w, channels]` so every Linear and LayerNorm works on contiguous
//! rows; the layout changes exactly twice per transformer (in and out), never per block.

use candle_core::{Module, Result, Tensor};
use candle_nn::{LayerNorm, VarBuilder};

use crate::ops::{self, Linear};

/// diffusers' `Attention` without masks: bias-free q/k/v projections, output projection with bias.
#[derive(Debug, Clone)]
struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    upcast: bool,
}

impl Attention {
    fn new(vb: VarBuilder, dim: usize, context_dim: usize, heads: usize, upcast: bool) -> Result<Self> {
        Ok(Self {
            to_q: ops::linear(vb.pp("to_q"), dim, dim, false)?,
            to_k: ops::linear(vb.pp("to_k"), context_dim, dim, false)?,
            to_v: ops::linear(vb.pp("to_v"), context_dim, dim, false)?,
            to_out: ops::linear(vb.pp("to_out.0"), dim, dim, true)?,
            heads,
            upcast,
        })
    }

    /// Self-attention when `context` is `None`, cross-attention on `context` otherwise.
    fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let context = context.unwrap_or(x);
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(context)?;
        let v = self.to_v.forward(context)?;
        let out = ops::attention(&q, &k, &v, self.heads, self.upcast)?;
        self.to_out.forward(&out)
    }
}

/// `FeedForward` with GEGLU: `net.2(a · gelu(gate))` where `[a, gate] = net.0.proj(x)`.
#[derive(Debug, Clone)]
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj: ops::linear(vb.pp("net.0.proj"), dim, inner * 2, true)?,
            out: ops::linear(vb.pp("net.2"), inner, dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Exact erf GELU as diffusers; the tanh approximation is off by ~3e-4.
        self.out.forward(&ops::geglu(&self.proj.forward(x)?)?)
    }
}

/// diffusers' `BasicTransformerBlock` with pre-LayerNorm residual sub-layers.
#[derive(Debug, Clone)]
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    fn new(vb: VarBuilder, dim: usize, context_dim: usize, heads: usize, upcast: bool) -> Result<Self> {
        Ok(Self {
            norm1: ops::layer_norm(vb.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::new(vb.pp("attn1"), dim, dim, heads, upcast)?,
            norm2: ops::layer_norm(vb.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::new(vb.pp("attn2"), dim, context_dim, heads, upcast)?,
            norm3: ops::layer_norm(vb.pp("norm3"), dim, 1e-5)?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None)? + x)?;
        let x = (self.attn2.forward(&self.norm2.forward(&x)?, Some(context))? + x)?;
        self.ff.forward(&self.norm3.forward(&x)?)? + x
    }
}

/// The input/output projections: 1×1 convolutions (SD 1.x) or Linear layers (SD 2.x, SDXL).
#[derive(Debug, Clone)]
enum Projection {
    Conv(ops::Conv2d),
    Linear(Linear),
}

/// Geometry and options of one `Transformer2DModel`.
#[derive(Debug, Clone, Copy)]
pub struct TransformerSpec {
    /// Channels in and out (also the attention width).
    pub channels: usize,
    /// Attention heads.
    pub heads: usize,
    /// Number of `BasicTransformerBlock`s.
    pub depth: usize,
    /// Width of the encoder hidden states.
    pub context_dim: usize,
    /// GroupNorm groups.
    pub groups: usize,
    /// Linear instead of 1×1 conv projections.
    pub linear_projection: bool,
    /// Compute attention in F32.
    pub upcast_attention: bool,
}

/// diffusers' `Transformer2DModel` (continuous input) on NCHW feature maps.
#[derive(Debug, Clone)]
pub struct Transformer2D {
    norm: ops::GroupNorm,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl Transformer2D {
    /// Loads `norm`, `proj_in`, `transformer_blocks.*` and `proj_out` from `vb`.
    pub fn new(vb: VarBuilder, spec: TransformerSpec) -> Result<Self> {
        let c = spec.channels;
        if spec.heads == 0 || c % spec.heads != 0 {
            candle_core::bail!(
                "{c} channels cannot be split into {} attention heads; check attention_head_dim / num_attention_heads in the UNet config",
                spec.heads
            );
        }
        let projection = |name: &str| -> Result<Projection> {
            if spec.linear_projection {
                Ok(Projection::Linear(ops::linear(vb.pp(name), c, c, true)?))
            } else {
                Ok(Projection::Conv(ops::Conv2d::load(vb.pp(name), c, c, 1, 1, 0)?))
            }
        };
        // diffusers hard-codes eps 1e-6 here, unlike the resnets' configurable norm_eps.
        let norm = ops::group_norm(vb.pp("norm"), spec.groups, c, 1e-6)?;
        let proj_in = projection("proj_in")?;
        let blocks_vb = vb.pp("transformer_blocks");
        let blocks = (0..spec.depth)
            .map(|k| BasicTransformerBlock::new(blocks_vb.pp(k), c, spec.context_dim, spec.heads, spec.upcast_attention))
            .collect::<Result<Vec<_>>>()?;
        let proj_out = projection("proj_out")?;
        Ok(Self { norm, proj_in, blocks, proj_out })
    }

    /// `x`: `[b, c, h, w]`, `context`: `[b, seq, context_dim]`; returns `[b, c, h, w]`.
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let normed = self.norm.forward(x)?;
        let mut hs = match &self.proj_in {
            // Project while still NCHW (a plain matmul), then one transposing copy to rows.
            Projection::Conv(conv) => conv.forward(&normed)?.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?,
            // The transposing copy must come first: Candle's CPU batched matmul mis-handles a
            // transposed left operand against a batch-broadcast weight.
            Projection::Linear(linear) => linear.forward(&normed.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?)?,
        };
        for block in &self.blocks {
            hs = block.forward(&hs, context)?;
        }
        let residual = x.reshape((b, c, h * w))?;
        let out = match &self.proj_out {
            // Adding the transposed view to the NCHW residual performs the layout change and the
            // residual sum in a single pass.
            Projection::Linear(linear) => (linear.forward(&hs)?.transpose(1, 2)? + residual)?,
            Projection::Conv(conv) => {
                let nchw = hs.transpose(1, 2)?.reshape((b, c, h, w))?;
                (conv.forward(&nchw)?.reshape((b, c, h * w))? + residual)?
            }
        };
        out.reshape((b, c, h, w))
    }
}
