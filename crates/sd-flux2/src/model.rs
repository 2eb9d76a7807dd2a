//! The FLUX.2 transformer (`Flux2Transformer2DModel`): double-stream blocks over text and image tokens
//! with shared modulation, single-stream blocks with a fused QKV+MLP projection and SwiGLU, four-axis
//! rotary positions (T, H, W, L), bias-free layers throughout. The model asks for Black Forest Labs' original
//! weight names (fused q/k/v per stream; see [`crate::keymap`] for how a diffusers folder serves them).

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::VarBuilder;
use sd_models::ops::{self, Linear};
use sd_models::qwen3::RmsNorm;

use crate::config::Flux2Config;

/// A token's four position coordinates (T, H, W, L), as the pipeline's `*_ids` tensors hold them.
pub type PositionId = [u32; 4];

/// Position ids of a packed `h × w` latent grid: `(0, row, col, 0)`, rows outer.
pub fn latent_ids(h: usize, w: usize) -> Vec<PositionId> {
    (0..h).flat_map(|r| (0..w).map(move |c| [0, r as u32, c as u32, 0])).collect()
}

/// Position ids of `len` text tokens: `(0, 0, 0, i)`.
pub fn text_ids(len: usize) -> Vec<PositionId> {
    (0..len).map(|i| [0, 0, 0, i as u32]).collect()
}

/// Position ids of reference-image latent grids `(h, w)`: image `i` gets T = 10 + 10·i (diffusers'
/// `_prepare_image_ids(scale=10)`), then its rows and columns.
pub fn reference_ids(sizes: &[(usize, usize)]) -> Vec<PositionId> {
    let mut out = Vec::new();
    for (i, &(h, w)) in sizes.iter().enumerate() {
        let t = 10 + 10 * i as u32;
        out.extend((0..h).flat_map(|r| (0..w).map(move |c| [t, r as u32, c as u32, 0])));
    }
    out
}

/// Rotary tables `(cos, sin)` `[seq, head_dim/2]` (F32) of position ids, as diffusers' `Flux2PosEmbed`:
/// per axis `freq = 1/θ^(2i/d)` and `angle = pos · freq` in f64, cos/sin in f64, rounded to f32.
pub fn rope_tables(ids: &[PositionId], axes: &[usize], theta: f64, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let half: usize = axes.iter().map(|a| a / 2).sum();
    let freqs: Vec<Vec<f64>> = axes.iter().map(|&d| (0..d).step_by(2).map(|i| 1.0 / theta.powf(i as f64 / d as f64)).collect()).collect();
    let mut cos = Vec::with_capacity(ids.len() * half);
    let mut sin = Vec::with_capacity(ids.len() * half);
    for p in ids {
        for (axis, f) in freqs.iter().enumerate() {
            let pos = p[axis] as f32 as f64;
            for fr in f {
                let a = pos * fr;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
    }
    let n = ids.len();
    Ok((Tensor::from_vec(cos, (n, half), device)?, Tensor::from_vec(sin, (n, half), device)?))
}

/// RoPE on `x` `[b, heads, seq, head_dim]` with adjacent pairs rotated together, in F32.
fn rope(x: &Tensor, (cos, sin): &(Tensor, Tensor)) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    candle_nn::rotary_emb::rope_i(&x.to_dtype(DType::F32)?.contiguous()?, cos, sin)?.to_dtype(dtype)
}

/// LayerNorm without affine parameters, computed in F32.
fn layer_norm(x: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?.contiguous()?;
    let dim = xf.dim(D::Minus1)?;
    let ones = Tensor::ones(dim, DType::F32, x.device())?;
    let zeros = Tensor::zeros(dim, DType::F32, x.device())?;
    candle_nn::ops::layer_norm(&xf, &ones, &zeros, eps as f32)?.to_dtype(dtype)
}

/// `(1 + scale) · LN(x) + shift` with `[b, 1, dim]` parameters.
fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    layer_norm(x, eps)?.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(shift)
}

/// `silu(a) · b` over the two halves of the last dimension (diffusers' `Flux2SwiGLU`).
fn swiglu(x: &Tensor) -> candle_core::Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    ops::silu(&x.narrow(D::Minus1, 0, half)?)? * x.narrow(D::Minus1, half, half)?
}

/// Splits `[b, seq, heads·d]` into `[b, heads, seq, d]`.
fn heads(x: &Tensor, h: usize) -> candle_core::Result<Tensor> {
    let (b, n, w) = x.dims3()?;
    x.reshape((b, n, h, w / h))?.transpose(1, 2)
}

/// Merges `[b, heads, seq, d]` back into `[b, seq, heads·d]`.
fn merge(x: &Tensor) -> candle_core::Result<Tensor> {
    let (b, h, n, d) = x.dims4()?;
    x.transpose(1, 2)?.reshape((b, n, h * d))
}

/// The `[b, 1, dim]` chunks of a modulation vector `[b, k·dim]`.
fn chunks(m: &Tensor, k: usize) -> candle_core::Result<Vec<Tensor>> {
    let dim = m.dim(D::Minus1)? / k;
    (0..k).map(|i| m.narrow(D::Minus1, i * dim, dim)?.unsqueeze(1)).collect()
}

/// `linear_in` → SwiGLU → `linear_out`.
#[derive(Debug, Clone)]
struct FeedForward {
    linear_in: Linear,
    linear_out: Linear,
}

impl FeedForward {
    /// BFL's `*_mlp.0` (in) and `*_mlp.2` (out).
    fn new(vb: VarBuilder, dim: usize, hidden: usize) -> candle_core::Result<Self> {
        Ok(Self { linear_in: ops::linear(vb.pp("0"), dim, 2 * hidden, false)?, linear_out: ops::linear(vb.pp("2"), hidden, dim, false)? })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.linear_out.forward(&swiglu(&self.linear_in.forward(x)?)?)
    }
}

/// A per-head RMSNorm: BFL's files name its weight `scale`; some re-saved files name it `weight`.
fn qk_norm(vb: VarBuilder, dim: usize, eps: f64) -> candle_core::Result<RmsNorm> {
    let name = if vb.contains_tensor("scale") || !vb.contains_tensor("weight") { "scale" } else { "weight" };
    RmsNorm::from_weight(&vb.get(dim, name)?, eps)
}

/// One stream's attention projections and norms in a double-stream block (`img_attn` / `txt_attn`).
#[derive(Debug, Clone)]
struct StreamAttn {
    qkv: Linear,
    proj: Linear,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
}

impl StreamAttn {
    fn new(vb: VarBuilder, dim: usize, hd: usize, eps: f64) -> candle_core::Result<Self> {
        Ok(Self {
            qkv: ops::linear(vb.pp("qkv"), dim, 3 * dim, false)?,
            proj: ops::linear(vb.pp("proj"), dim, dim, false)?,
            norm_q: qk_norm(vb.pp("norm").pp("query_norm"), hd, eps)?,
            norm_k: qk_norm(vb.pp("norm").pp("key_norm"), hd, eps)?,
        })
    }

    /// Normed q, k and v `[b, heads, seq, d]` of the modulated stream `x`.
    fn qkv(&self, x: &Tensor, h: usize) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let y = self.qkv.forward(x)?;
        let dim = y.dim(D::Minus1)? / 3;
        let q = self.norm_q.forward(&heads(&y.narrow(D::Minus1, 0, dim)?, h)?)?;
        let k = self.norm_k.forward(&heads(&y.narrow(D::Minus1, dim, dim)?, h)?)?;
        let v = heads(&y.narrow(D::Minus1, 2 * dim, dim)?, h)?;
        Ok((q, k, v))
    }
}

/// A double-stream block (`double_blocks.N`).
#[derive(Debug, Clone)]
struct DoubleBlock {
    img_attn: StreamAttn,
    txt_attn: StreamAttn,
    img_mlp: FeedForward,
    txt_mlp: FeedForward,
}

impl DoubleBlock {
    fn new(vb: VarBuilder, cfg: &Flux2Config) -> candle_core::Result<Self> {
        let (dim, hd, eps) = (cfg.inner_dim(), cfg.attention_head_dim, cfg.eps);
        Ok(Self {
            img_attn: StreamAttn::new(vb.pp("img_attn"), dim, hd, eps)?,
            txt_attn: StreamAttn::new(vb.pp("txt_attn"), dim, hd, eps)?,
            img_mlp: FeedForward::new(vb.pp("img_mlp"), dim, cfg.mlp_hidden())?,
            txt_mlp: FeedForward::new(vb.pp("txt_mlp"), dim, cfg.mlp_hidden())?,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn forward(&self, img: &Tensor, txt: &Tensor, mi: &[Tensor], mt: &[Tensor], pe: &(Tensor, Tensor), h: usize, eps: f64) -> candle_core::Result<(Tensor, Tensor)> {
        let n_txt = txt.dim(1)?;
        let x = modulate(img, &mi[0], &mi[1], eps)?;
        let c = modulate(txt, &mt[0], &mt[1], eps)?;
        let (q, k, v) = self.img_attn.qkv(&x, h)?;
        let (cq, ck, cv) = self.txt_attn.qkv(&c, h)?;
        let q = rope(&Tensor::cat(&[&cq, &q], 2)?, pe)?;
        let k = rope(&Tensor::cat(&[&ck, &k], 2)?, pe)?;
        let v = Tensor::cat(&[&cv, &v], 2)?.contiguous()?;
        let attn = merge(&ops::attention_heads(&q, &k, &v, false)?)?;
        let n_img = attn.dim(1)? - n_txt;
        let txt_attn = self.txt_attn.proj.forward(&attn.narrow(1, 0, n_txt)?)?;
        let img_attn = self.img_attn.proj.forward(&attn.narrow(1, n_txt, n_img)?)?;
        let img = (img + img_attn.broadcast_mul(&mi[2])?)?;
        let ff = self.img_mlp.forward(&modulate(&img, &mi[3], &mi[4], eps)?)?;
        let img = (&img + ff.broadcast_mul(&mi[5])?)?;
        let txt = (txt + txt_attn.broadcast_mul(&mt[2])?)?;
        let ff = self.txt_mlp.forward(&modulate(&txt, &mt[3], &mt[4], eps)?)?;
        let txt = (&txt + ff.broadcast_mul(&mt[5])?)?;
        Ok((img, txt))
    }
}

/// A single-stream block (`single_blocks.N`): `linear1` is the fused q/k/v + MLP input, `linear2` the output.
#[derive(Debug, Clone)]
struct SingleBlock {
    proj: Linear,
    to_out: Linear,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
}

impl SingleBlock {
    fn new(vb: VarBuilder, cfg: &Flux2Config) -> candle_core::Result<Self> {
        let (dim, hd, eps, mlp) = (cfg.inner_dim(), cfg.attention_head_dim, cfg.eps, cfg.mlp_hidden());
        Ok(Self {
            proj: ops::linear(vb.pp("linear1"), dim, 3 * dim + 2 * mlp, false)?,
            to_out: ops::linear(vb.pp("linear2"), dim + mlp, dim, false)?,
            norm_q: qk_norm(vb.pp("norm").pp("query_norm"), hd, eps)?,
            norm_k: qk_norm(vb.pp("norm").pp("key_norm"), hd, eps)?,
        })
    }

    fn forward(&self, x: &Tensor, m: &[Tensor], pe: &(Tensor, Tensor), h: usize, eps: f64) -> candle_core::Result<Tensor> {
        let dim = x.dim(D::Minus1)?;
        let y = self.proj.forward(&modulate(x, &m[0], &m[1], eps)?)?;
        let mlp_w = y.dim(D::Minus1)? - 3 * dim;
        let per_head = |t: Tensor, norm: Option<&RmsNorm>| -> candle_core::Result<Tensor> {
            let t = heads(&t, h)?;
            match norm {
                Some(n) => n.forward(&t),
                None => Ok(t),
            }
        };
        let q = rope(&per_head(y.narrow(D::Minus1, 0, dim)?, Some(&self.norm_q))?, pe)?;
        let k = rope(&per_head(y.narrow(D::Minus1, dim, dim)?, Some(&self.norm_k))?, pe)?;
        let v = per_head(y.narrow(D::Minus1, 2 * dim, dim)?, None)?.contiguous()?;
        let attn = merge(&ops::attention_heads(&q, &k, &v, false)?)?;
        let mlp = swiglu(&y.narrow(D::Minus1, 3 * dim, mlp_w)?)?;
        let out = self.to_out.forward(&Tensor::cat(&[&attn, &mlp], D::Minus1)?)?;
        x + out.broadcast_mul(&m[2])?
    }
}

/// The FLUX.2 transformer.
#[derive(Debug, Clone)]
pub struct Flux2Transformer {
    cfg: Flux2Config,
    t_lin1: Linear,
    t_lin2: Linear,
    mod_img: Linear,
    mod_txt: Linear,
    mod_single: Linear,
    x_embedder: Linear,
    context_embedder: Linear,
    double: Vec<DoubleBlock>,
    single: Vec<SingleBlock>,
    norm_out: Linear,
    proj_out: Linear,
    dtype: DType,
    device: Device,
}

impl Flux2Transformer {
    /// Builds the model from BFL-named weights (a diffusers folder serves them through
    /// [`crate::keymap::diffusers_backend`]).
    pub fn new(cfg: &Flux2Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let dim = cfg.inner_dim();
        let tg = cfg.timestep_guidance_channels;
        let te = vb.pp("time_in");
        Ok(Self {
            t_lin1: ops::linear(te.pp("in_layer"), tg, dim, false)?,
            t_lin2: ops::linear(te.pp("out_layer"), dim, dim, false)?,
            mod_img: ops::linear(vb.pp("double_stream_modulation_img").pp("lin"), dim, 6 * dim, false)?,
            mod_txt: ops::linear(vb.pp("double_stream_modulation_txt").pp("lin"), dim, 6 * dim, false)?,
            mod_single: ops::linear(vb.pp("single_stream_modulation").pp("lin"), dim, 3 * dim, false)?,
            x_embedder: ops::linear(vb.pp("img_in"), cfg.in_channels, dim, false)?,
            context_embedder: ops::linear(vb.pp("txt_in"), cfg.joint_attention_dim, dim, false)?,
            double: (0..cfg.num_layers).map(|i| DoubleBlock::new(vb.pp("double_blocks").pp(i.to_string()), cfg)).collect::<candle_core::Result<_>>()?,
            single: (0..cfg.num_single_layers).map(|i| SingleBlock::new(vb.pp("single_blocks").pp(i.to_string()), cfg)).collect::<candle_core::Result<_>>()?,
            norm_out: ops::linear(vb.pp("final_layer").pp("adaLN_modulation").pp("1"), dim, 2 * dim, false)?,
            proj_out: ops::linear(vb.pp("final_layer").pp("linear"), dim, cfg.out_channels(), false)?,
            cfg: cfg.clone(),
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// The model's config.
    pub fn config(&self) -> &Flux2Config {
        &self.cfg
    }

    /// dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Device of the weights.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The timestep embedding of `t` `[b]` (σ, the pipeline's `timestep / 1000`): `t · 1000` through a
    /// flip-sin-to-cos sinusoid (computed in F32) and the two-layer SiLU MLP.
    fn time_embedding(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        let half = self.cfg.timestep_guidance_channels / 2;
        let dev = t.device();
        let freqs: Vec<f32> = (0..half).map(|i| (-(10000f32.ln()) * i as f32 / half as f32).exp()).collect();
        let freqs = Tensor::from_vec(freqs, (1, half), dev)?;
        let t = (t.to_dtype(self.dtype)?.to_dtype(DType::F32)? * 1000.0)?;
        let args = t.unsqueeze(1)?.broadcast_mul(&freqs)?;
        let emb = Tensor::cat(&[args.cos()?, args.sin()?], D::Minus1)?.to_dtype(self.dtype)?;
        self.t_lin2.forward(&ops::silu(&self.t_lin1.forward(&emb)?)?)
    }

    /// The velocity `[b, n_img, out_channels]` for image tokens `x` `[b, n_img, in_channels]` (target
    /// tokens followed by any reference tokens; the output covers all of them), text features `txt`
    /// `[b, n_txt, joint_attention_dim]`, timesteps `t` `[b]` (σ) and the tokens' positions
    /// (`img_ids` for `x`, `txt_ids` for `txt`, shared by the batch).
    pub fn forward(&self, x: &Tensor, img_ids: &[PositionId], txt: &Tensor, txt_ids: &[PositionId], t: &Tensor) -> candle_core::Result<Tensor> {
        let (b, n_img, _) = x.dims3()?;
        let n_txt = txt.dim(1)?;
        if img_ids.len() != n_img || txt_ids.len() != n_txt {
            candle_core::bail!("FLUX.2 transformer: {} image / {} text position ids for {n_img} / {n_txt} tokens", img_ids.len(), txt_ids.len());
        }
        if t.dims1()? != b {
            candle_core::bail!("FLUX.2 transformer: {} timesteps for a batch of {b}", t.dims1()?);
        }
        let eps = self.cfg.eps;
        let h = self.cfg.num_attention_heads;
        let temb = self.time_embedding(t)?;
        let silu_t = ops::silu(&temb)?;
        let mi = chunks(&self.mod_img.forward(&silu_t)?, 6)?;
        let mt = chunks(&self.mod_txt.forward(&silu_t)?, 6)?;
        let ms = chunks(&self.mod_single.forward(&silu_t)?, 3)?;
        let mut img = self.x_embedder.forward(&x.to_dtype(self.dtype)?)?;
        let mut txt = self.context_embedder.forward(&txt.to_dtype(self.dtype)?)?;
        let ids: Vec<PositionId> = txt_ids.iter().chain(img_ids).copied().collect();
        let pe = rope_tables(&ids, &self.cfg.axes_dims_rope, self.cfg.rope_theta, &self.device)?;
        for block in &self.double {
            (img, txt) = block.forward(&img, &txt, &mi, &mt, &pe, h, eps)?;
        }
        let mut x = Tensor::cat(&[&txt, &img], 1)?;
        for block in &self.single {
            x = block.forward(&x, &ms, &pe, h, eps)?;
        }
        let x = x.narrow(1, n_txt, n_img)?;
        let m = chunks(&self.norm_out.forward(&silu_t)?, 2)?;
        // BFL's final modulation emits (shift, scale); diffusers' `norm_out` stores the swapped halves.
        let x = modulate(&x, &m[0], &m[1], eps)?;
        self.proj_out.forward(&x)
    }
}
