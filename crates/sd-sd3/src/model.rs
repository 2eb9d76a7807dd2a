//! The SD 3.x MMDiT (diffusers' `SD3Transformer2DModel`), with Stability's module names.
//!
//! Written here rather than taken from candle-transformers' `mmdit`: that model runs its own attention
//! (so it would miss the workspace's one attention path, `sd_models::ops::attention_heads`, with its fused
//! CPU kernel and flash attention on GPUs), widens bf16 weights per matmul instead of going through
//! `sd_models::ops::Linear`, and has no skip-layer guidance. The names are the same as candle's and
//! Stability's (`joint_blocks.N.x_block.attn.qkv`), so single files load directly and diffusers folders
//! through `keymap`.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;
use sd_models::ops::{self, Conv2d, Linear};

use crate::config::Sd3Config;

/// Sinusoidal embedding of the timesteps (diffusers' `Timesteps(256, flip_sin_to_cos=True, shift 0)`:
/// cos first), computed in F32.
fn timestep_embedding(t: &Tensor, dim: usize, dtype: DType) -> Result<Tensor> {
    let half = dim / 2;
    let dev = t.device();
    let freqs: Vec<f32> = (0..half).map(|i| (-(10000f64.ln()) * i as f64 / half as f64).exp() as f32).collect();
    let freqs = Tensor::from_vec(freqs, (1, half), dev)?;
    let args = t.to_dtype(DType::F32)?.unsqueeze(1)?.broadcast_mul(&freqs)?;
    Tensor::cat(&[args.cos()?, args.sin()?], D::Minus1)?.to_dtype(dtype)
}

/// LayerNorm without affine parameters, eps 1e-6 (every norm of the MMDiT but the QK ones).
fn layer_norm(x: &Tensor) -> Result<Tensor> {
    let dim = x.dim(D::Minus1)?;
    let ones = Tensor::ones(dim, x.dtype(), x.device())?;
    let zeros = Tensor::zeros(dim, x.dtype(), x.device())?;
    candle_nn::ops::layer_norm(&x.contiguous()?, &ones, &zeros, 1e-6)
}

/// `norm(x) · (1 + scale) + shift` with per-sample `[b, 1, hidden]` vectors.
fn modulate(normed: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    normed.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(shift)
}

/// Two linear layers with SiLU between (`mlp.0`, `mlp.2`).
#[derive(Debug, Clone)]
struct Embedder {
    l0: Linear,
    l2: Linear,
}

impl Embedder {
    fn new(vb: VarBuilder, d_in: usize, hidden: usize) -> Result<Self> {
        Ok(Self { l0: ops::linear(vb.pp("mlp.0"), d_in, hidden, true)?, l2: ops::linear(vb.pp("mlp.2"), hidden, hidden, true)? })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.l2.forward(&ops::silu(&self.l0.forward(x)?)?)
    }
}

/// An attention's fused `qkv` projection, optional RMS norms of q and k (`ln_q`, `ln_k`) and, unless the
/// stream only feeds the others (the last block's context), its output projection.
#[derive(Debug, Clone)]
struct Attn {
    qkv: Linear,
    ln: Option<(Tensor, Tensor)>,
    proj: Option<Linear>,
    heads: usize,
}

impl Attn {
    fn new(vb: VarBuilder, cfg: &Sd3Config, with_proj: bool) -> Result<Self> {
        let h = cfg.hidden();
        let d = cfg.attention_head_dim;
        let ln = if cfg.qk_norm {
            let dt = compute_dtype(&vb);
            Some((vb.pp("ln_q").get(d, "weight")?.to_dtype(dt)?, vb.pp("ln_k").get(d, "weight")?.to_dtype(dt)?))
        } else {
            None
        };
        Ok(Self {
            qkv: ops::linear(vb.pp("qkv"), h, 3 * h, true)?,
            ln,
            proj: if with_proj { Some(ops::linear(vb.pp("proj"), h, h, true)?) } else { None },
            heads: cfg.num_attention_heads,
        })
    }

    /// q, k, v `[b, heads, seq, head_dim]` of the (modulated) tokens `x`, QK-normed.
    fn qkv(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let qkv = self.qkv.forward(x)?;
        let (b, seq, three_h) = qkv.dims3()?;
        let d = three_h / 3 / self.heads;
        let qkv = qkv.reshape((b, seq, 3, self.heads, d))?.permute((2, 0, 3, 1, 4))?;
        let (q, k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?);
        match &self.ln {
            Some((lq, lk)) => Ok((
                candle_nn::ops::rms_norm(&q.contiguous()?, lq, 1e-6)?,
                candle_nn::ops::rms_norm(&k.contiguous()?, lk, 1e-6)?,
                v.contiguous()?,
            )),
            None => Ok((q.contiguous()?, k.contiguous()?, v.contiguous()?)),
        }
    }

    fn project(&self, x: &Tensor) -> Result<Tensor> {
        match &self.proj {
            Some(p) => p.forward(x),
            None => candle_core::bail!("this attention has no output projection (the last block's context stream)"),
        }
    }
}

/// The dtype activations run in: the weights' on GPUs; F32 on the CPU, where half-precision weights are
/// multiplied panel by panel in F32 by `ops::Linear` and candle has no half-precision matmul for attention.
fn compute_dtype(vb: &VarBuilder) -> DType {
    if vb.device().is_cpu() {
        DType::F32
    } else {
        vb.dtype()
    }
}

/// `[b, heads, seq, d]` → `[b, seq, heads·d]`.
fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, heads, seq, d) = x.dims4()?;
    x.transpose(1, 2)?.reshape((b, seq, heads * d))
}

/// The feed-forward (`mlp.fc1`, tanh-approximated GELU, `mlp.fc2`).
#[derive(Debug, Clone)]
struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    fn new(vb: VarBuilder, h: usize) -> Result<Self> {
        Ok(Self { fc1: ops::linear(vb.pp("fc1"), h, 4 * h, true)?, fc2: ops::linear(vb.pp("fc2"), 4 * h, h, true)? })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.fc1.forward(x)?.gelu()?)
    }
}

/// The image half of a joint block (`x_block`), with MMDiT-X's second self-attention (`attn2`) in SD 3.5
/// Medium's first blocks.
#[derive(Debug, Clone)]
struct XBlock {
    ada: Linear,
    attn: Attn,
    attn2: Option<Attn>,
    mlp: Mlp,
}

/// The text half of a joint block (`context_block`); in the last block it only feeds the attention.
#[derive(Debug, Clone)]
struct ContextBlock {
    ada: Linear,
    attn: Attn,
    mlp: Option<Mlp>,
}

/// One joint block: image and text tokens keep their own weights and attend together.
#[derive(Debug, Clone)]
struct JointBlock {
    x: XBlock,
    context: ContextBlock,
}

impl JointBlock {
    fn new(vb: VarBuilder, cfg: &Sd3Config, index: usize) -> Result<Self> {
        let h = cfg.hidden();
        let last = index + 1 == cfg.num_layers;
        let dual = cfg.dual_attention_layers.contains(&index);
        let xb = vb.pp("x_block");
        let x = XBlock {
            ada: ops::linear(xb.pp("adaLN_modulation.1"), h, if dual { 9 } else { 6 } * h, true)?,
            attn: Attn::new(xb.pp("attn"), cfg, true)?,
            attn2: if dual { Some(Attn::new(xb.pp("attn2"), cfg, true)?) } else { None },
            mlp: Mlp::new(xb.pp("mlp"), h)?,
        };
        let cb = vb.pp("context_block");
        let context = ContextBlock {
            ada: ops::linear(cb.pp("adaLN_modulation.1"), h, if last { 2 } else { 6 } * h, true)?,
            attn: Attn::new(cb.pp("attn"), cfg, !last)?,
            mlp: if last { None } else { Some(Mlp::new(cb.pp("mlp"), h)?) },
        };
        Ok(Self { x, context })
    }

    /// Returns the updated image tokens and (but for the last block) text tokens.
    fn forward(&self, x: &Tensor, ctx: &Tensor, c: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let xm = self.x.ada.forward(c)?.unsqueeze(1)?.chunk(if self.x.attn2.is_some() { 9 } else { 6 }, D::Minus1)?;
        let cm = self.context.ada.forward(c)?.unsqueeze(1)?.chunk(if self.context.mlp.is_some() { 6 } else { 2 }, D::Minus1)?;
        let x_norm = layer_norm(x)?;
        let (xq, xk, xv) = self.x.attn.qkv(&modulate(&x_norm, &xm[0], &xm[1])?)?;
        let (cq, ck, cv) = self.context.attn.qkv(&modulate(&layer_norm(ctx)?, &cm[0], &cm[1])?)?;
        // Joint sequence: image tokens first, then text (diffusers' JointAttnProcessor2_0 order).
        let cat = |a: &Tensor, b: &Tensor| Tensor::cat(&[a, b], 2);
        let joint = merge_heads(&ops::attention_heads(&cat(&xq, &cq)?, &cat(&xk, &ck)?, &cat(&xv, &cv)?, false)?)?;
        let n_img = x.dim(1)?;
        let x_attn = joint.narrow(1, 0, n_img)?;
        let mut x = (x + self.x.attn.project(&x_attn)?.broadcast_mul(&xm[2])?)?;
        if let Some(attn2) = &self.x.attn2 {
            let (q, k, v) = attn2.qkv(&modulate(&x_norm, &xm[6], &xm[7])?)?;
            let a = merge_heads(&ops::attention_heads(&q, &k, &v, false)?)?;
            x = (x + attn2.project(&a)?.broadcast_mul(&xm[8])?)?;
        }
        let x = (&x + self.x.mlp.forward(&modulate(&layer_norm(&x)?, &xm[3], &xm[4])?)?.broadcast_mul(&xm[5])?)?;
        let Some(mlp) = &self.context.mlp else { return Ok((x, None)) };
        let c_attn = joint.narrow(1, n_img, joint.dim(1)? - n_img)?;
        let ctx = (ctx + self.context.attn.project(&c_attn)?.broadcast_mul(&cm[2])?)?;
        let ctx = (&ctx + mlp.forward(&modulate(&layer_norm(&ctx)?, &cm[3], &cm[4])?)?.broadcast_mul(&cm[5])?)?;
        Ok((x, Some(ctx)))
    }
}

/// The SD 3.x transformer.
#[derive(Debug, Clone)]
pub struct Mmdit {
    x_embedder: Conv2d,
    pos_embed: Tensor,
    t_embedder: Embedder,
    y_embedder: Embedder,
    context_embedder: Linear,
    blocks: Vec<JointBlock>,
    final_ada: Linear,
    final_linear: Linear,
    config: Sd3Config,
    dtype: DType,
}

impl Mmdit {
    /// Builds the model of `cfg` from weights with Stability's names (`vb` at the model's root).
    pub fn new(cfg: &Sd3Config, vb: VarBuilder) -> Result<Self> {
        cfg.check().map_err(candle_core::Error::Msg)?;
        let h = cfg.hidden();
        let p = cfg.patch_size;
        let dtype = compute_dtype(&vb);
        let weight = vb.pp("x_embedder.proj").get((h, cfg.in_channels, p, p), "weight")?.to_dtype(dtype)?;
        let bias = vb.pp("x_embedder.proj").get(h, "bias")?.to_dtype(dtype)?;
        let max = cfg.pos_embed_max_size;
        let blocks = (0..cfg.num_layers).map(|i| JointBlock::new(vb.pp(format!("joint_blocks.{i}")), cfg, i)).collect::<Result<Vec<_>>>()?;
        Ok(Self {
            x_embedder: Conv2d::new(weight, Some(bias), p, 0),
            pos_embed: vb.get((1, max * max, h), "pos_embed")?.to_dtype(dtype)?,
            t_embedder: Embedder::new(vb.pp("t_embedder"), 256, h)?,
            y_embedder: Embedder::new(vb.pp("y_embedder"), cfg.pooled_projection_dim, h)?,
            context_embedder: ops::linear(vb.pp("context_embedder"), cfg.joint_attention_dim, h, true)?,
            blocks,
            final_ada: ops::linear(vb.pp("final_layer.adaLN_modulation.1"), h, 2 * h, true)?,
            final_linear: ops::linear(vb.pp("final_layer.linear"), h, p * p * cfg.out_channels, true)?,
            config: cfg.clone(),
            dtype,
        })
    }

    /// The architecture.
    pub fn config(&self) -> &Sd3Config {
        &self.config
    }

    /// The dtype of the activations (the weights' on GPUs, F32 on the CPU).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The position embeddings of an `h × w`-patch image: the centre of the stored grid (diffusers'
    /// `PatchEmbed.cropped_pos_embed`).
    fn cropped_pos_embed(&self, h: usize, w: usize) -> Result<Tensor> {
        let max = self.config.pos_embed_max_size;
        if h > max || w > max {
            candle_core::bail!(
                "the latents are {h}×{w} patches but this model's position table covers at most {max}×{max}; ask for a smaller image"
            );
        }
        let hidden = self.config.hidden();
        let grid = self.pos_embed.reshape((1, max, max, hidden))?;
        grid.narrow(1, (max - h) / 2, h)?.narrow(2, (max - w) / 2, w)?.reshape((1, h * w, hidden))
    }

    /// Predicts the flow velocity `[b, out_channels, H, W]` for latents `x` `[b, in_channels, H, W]` at
    /// `timesteps` (`σ · 1000`, `[b]`), with text tokens `context` `[b, seq, joint_attention_dim]` and pooled
    /// CLIP embeddings `pooled` `[b, pooled_projection_dim]`. Blocks listed in `skip_layers` are left out
    /// (skip-layer guidance's extra call).
    pub fn forward(&self, x: &Tensor, timesteps: &Tensor, context: &Tensor, pooled: &Tensor, skip_layers: &[usize]) -> Result<Tensor> {
        let (b, _, height, width) = x.dims4()?;
        let p = self.config.patch_size;
        if height % p != 0 || width % p != 0 {
            candle_core::bail!("latents of {height}×{width} are not a whole number of {p}×{p} patches");
        }
        let (h, w) = (height / p, width / p);
        let dtype = self.dtype;
        let tokens = self.x_embedder.forward(&x.to_dtype(dtype)?)?.flatten_from(2)?.transpose(1, 2)?;
        let mut x = tokens.broadcast_add(&self.cropped_pos_embed(h, w)?)?;
        let c = (self.t_embedder.forward(&timestep_embedding(timesteps, 256, dtype)?)? + self.y_embedder.forward(&pooled.to_dtype(dtype)?)?)?;
        // Every modulation reads SiLU(c); computed once.
        let c = ops::silu(&c)?;
        let mut ctx = self.context_embedder.forward(&context.to_dtype(dtype)?)?;
        for (i, block) in self.blocks.iter().enumerate() {
            if skip_layers.contains(&i) {
                continue;
            }
            let (nx, nctx) = block.forward(&x, &ctx, &c)?;
            x = nx;
            if let Some(n) = nctx {
                ctx = n;
            }
        }
        let m = self.final_ada.forward(&c)?.unsqueeze(1)?.chunk(2, D::Minus1)?;
        let out = self.final_linear.forward(&modulate(&layer_norm(&x)?, &m[0], &m[1])?)?;
        let oc = self.config.out_channels;
        out.reshape((b, h, w, p, p, oc))?.permute((0, 5, 1, 3, 2, 4))?.reshape((b, oc, h * p, w * p))
    }
}
