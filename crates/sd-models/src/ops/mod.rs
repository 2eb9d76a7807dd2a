//! The few primitives every model in this crate goes through: one attention function and one
//! convolution path. Speed work (fused kernels, cuDNN, better CPU loops) happens here, once.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

pub mod cpu;
mod cuda;
mod winograd;
mod flash;

pub use cuda::{cuda_attention, cuda_conv, CudaAttention, CudaConv};

/// Upper bound on the elements of one block of attention scores. Above it the queries are processed
/// in slices, so a 512² SD1.5 step never materialises its 1 GiB score matrix at once.
const MAX_SCORE_ELEMENTS: usize = 1 << 24;

/// Multi-head scaled dot-product attention.
///
/// `q`: `[batch, q_len, heads·dim]`, `k`/`v`: `[batch, kv_len, heads·dim]`; returns
/// `[batch, q_len, heads·dim]`. With `upcast`, half-precision inputs are computed in F32 (SD 2.1
/// overflows otherwise); F32 inputs are always computed in F32.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, upcast: bool) -> Result<Tensor> {
    let (b, q_len, inner) = q.dims3()?;
    let kv_len = k.dim(1)?;
    if heads == 0 || inner % heads != 0 {
        candle_core::bail!("attention: width {inner} is not divisible by {heads} heads");
    }
    let dim = inner / heads;
    // Views only: the fused GPU kernel in `attention_heads` transposes them back without a copy.
    let split = |t: &Tensor, len: usize| -> Result<Tensor> { t.reshape((b, len, heads, dim))?.transpose(1, 2) };
    let out = attention_heads(&split(q, q_len)?, &split(k, kv_len)?, &split(v, kv_len)?, upcast)?;
    out.transpose(1, 2)?.reshape((b, q_len, inner))
}

/// Scaled dot-product attention over head-major tensors: `q` `[batch, heads, q_len, dim]`, `k`/`v`
/// `[batch, heads, kv_len, dim]` (what models that rotate q and k per head hold, e.g. FLUX); returns
/// `[batch, heads, q_len, dim]` in the input dtype. [`attention`] is this after splitting the heads;
/// `upcast` as there.
pub fn attention_heads(q: &Tensor, k: &Tensor, v: &Tensor, upcast: bool) -> Result<Tensor> {
    let (b, heads, q_len, dim) = q.dims4()?;
    let kv_len = k.dim(2)?;
    let scale = 1.0 / (dim as f64).sqrt();
    // The fused GPU kernel takes `[batch, len, heads, dim]` views; its F32 accumulation makes
    // `upcast` unnecessary there.
    #[cfg(feature = "flash-attn")]
    if let Some(out) = cuda::flash_attention(&q.transpose(1, 2)?, &k.transpose(1, 2)?, &v.transpose(1, 2)?, scale)? {
        return out.transpose(1, 2);
    }
    let in_dtype = q.dtype();
    let work_dtype = if upcast { DType::F32 } else { in_dtype };
    let prep = |t: &Tensor| -> Result<Tensor> { t.to_dtype(work_dtype)?.contiguous() };
    // Scaling q before the product costs q_len·dim instead of q_len·kv_len multiplies.
    if q.device().is_cpu() && work_dtype == DType::F32 && kv_len > 0 {
        let flat = |t: &Tensor, len: usize| -> Result<Tensor> { prep(t)?.reshape((b * heads, len, dim)) };
        let op = flash::FlashCpu { scale: scale as f32 };
        let out = flat(q, q_len)?.apply_op3_no_bwd(&flat(k, kv_len)?, &flat(v, kv_len)?, &op)?;
        return out.reshape((b, heads, q_len, dim))?.to_dtype(in_dtype);
    }
    let q = (prep(q)? * scale)?;
    let k_t = prep(k)?.transpose(2, 3)?.contiguous()?;
    let v = prep(v)?;
    sliced(&q, &k_t, &v, MAX_SCORE_ELEMENTS)?.to_dtype(in_dtype)
}

/// The attention of every device and dtype without a fused kernel (GPUs without `flash-attn`,
/// half precision on the CPU): pre-scaled `q` `[b, h, n, d]`, `k_t` `[b, h, d, m]`, `v` `[b, h, m, d]`,
/// in slices of query rows whose score block holds at most `max_scores` elements.
fn sliced(q: &Tensor, k_t: &Tensor, v: &Tensor, max_scores: usize) -> Result<Tensor> {
    let (b, heads, q_len, _) = q.dims4()?;
    let kv_len = k_t.dim(3)?;
    let rows = (max_scores / (b * heads * kv_len).max(1)).max(1);
    if rows >= q_len {
        return attend(q, k_t, v);
    }
    let mut parts = Vec::with_capacity(q_len.div_ceil(rows));
    let mut start = 0;
    while start < q_len {
        let len = rows.min(q_len - start);
        parts.push(attend(&q.narrow(2, start, len)?, k_t, v)?);
        start += len;
    }
    Tensor::cat(&parts, 2)
}

fn attend(q: &Tensor, k_t: &Tensor, v: &Tensor) -> Result<Tensor> {
    let scores = q.matmul(k_t)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    probs.matmul(v)
}

/// [`attention`] with an additive score mask (e.g. CLIP's causal mask: 0 where allowed, −∞ where not).
///
/// `mask` has rank 2 to 4 and broadcasts to `[batch, heads, q_len, kv_len]` (a `[q_len, kv_len]`
/// mask is shared by every batch item and head). `None` is exactly [`attention`].
pub fn attention_masked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    upcast: bool,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let Some(mask) = mask else {
        return attention(q, k, v, heads, upcast);
    };
    let (b, q_len, inner) = q.dims3()?;
    let kv_len = k.dim(1)?;
    if heads == 0 || inner % heads != 0 {
        candle_core::bail!("attention: width {inner} is not divisible by {heads} heads");
    }
    let rank = mask.rank();
    let mask_dims = mask.dims();
    // The query-row dimension of the mask; it is sliced together with the queries below.
    let row_dim = rank.wrapping_sub(2);
    if !(2..=4).contains(&rank) || mask_dims[rank - 1] != kv_len || ![1, q_len].contains(&mask_dims[row_dim]) {
        candle_core::bail!(
            "attention mask of shape {mask_dims:?} does not broadcast to [{b}, {heads}, {q_len}, {kv_len}]"
        );
    }
    let dim = inner / heads;
    let scale = 1.0 / (dim as f64).sqrt();
    let in_dtype = q.dtype();
    let work_dtype = if upcast { DType::F32 } else { in_dtype };
    let split = |t: &Tensor, len: usize| -> Result<Tensor> {
        t.reshape((b, len, heads, dim))?.transpose(1, 2)?.to_dtype(work_dtype)?.contiguous()
    };
    let q = (split(q, q_len)? * scale)?;
    let k_t = split(k, kv_len)?.transpose(2, 3)?.contiguous()?;
    let v = split(v, kv_len)?;
    let mask = mask.to_dtype(work_dtype)?;
    let attend_masked = |q: &Tensor, mask: &Tensor| -> Result<Tensor> {
        let scores = q.matmul(&k_t)?.broadcast_add(mask)?;
        candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)
    };

    let rows = (MAX_SCORE_ELEMENTS / (b * heads * kv_len).max(1)).max(1);
    let out = if rows >= q_len {
        attend_masked(&q, &mask)?
    } else {
        let mut parts = Vec::with_capacity(q_len.div_ceil(rows));
        let mut start = 0;
        while start < q_len {
            let len = rows.min(q_len - start);
            let m = if mask_dims[row_dim] == 1 { mask.clone() } else { mask.narrow(row_dim, start, len)? };
            parts.push(attend_masked(&q.narrow(2, start, len)?, &m)?);
            start += len;
        }
        Tensor::cat(&parts, 2)?
    };
    out.transpose(1, 2)?.reshape((b, q_len, inner))?.to_dtype(in_dtype)
}

/// The f32 values of a contiguous CPU tensor, for the CPU kernels' custom ops; `op` names the
/// kernel in the error (they are only ever handed tensors they made contiguous themselves).
fn contiguous_f32<'a>(storage: &'a candle_core::CpuStorage, layout: &candle_core::Layout, op: &str) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (candle_core::CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{op}: expects a contiguous f32 tensor"),
    }
}

/// A 2-D convolution with optional bias: the single convolution path of every model here.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    /// Builds a convolution from its weight `[out, in, kh, kw]` and bias `[out]`.
    pub fn new(weight: Tensor, bias: Option<Tensor>, stride: usize, padding: usize) -> Self {
        Self { weight, bias, stride, padding }
    }

    /// Loads `weight` and `bias` from `vb` with the given geometry.
    pub fn load(vb: VarBuilder, c_in: usize, c_out: usize, kernel: usize, stride: usize, padding: usize) -> Result<Self> {
        let weight = vb.get((c_out, c_in, kernel, kernel), "weight")?;
        let bias = vb.get(c_out, "bias")?;
        Ok(Self::new(weight, Some(bias), stride, padding))
    }

    /// The kernel `[out, in, kh, kw]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Every other device and dtype: cuDNN with an algorithm measured once per shape where built
    /// with the `cudnn` feature (`ops/cuda.rs`), else candle's conv (im2col + GEMM on CUDA/Metal).
    fn forward_backend(&self, x: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cudnn")]
        if let Some(y) = cuda::cudnn_conv2d(x, &self.weight, self.stride, self.padding)? {
            return Ok(y);
        }
        x.conv2d(&self.weight, self.padding, self.stride, 1, 1)
    }

    /// im2col in tiles of output rows, each tile one GEMM `[out, in·kh·kw] × [in·kh·kw, rows·w_out]`.
    ///
    /// candle's CPU conv2d first transposes the whole input to NHWC on one thread and gathers im2col
    /// element by element, which costs more than the GEMM itself (measured 3.5× a bare matmul of the
    /// same size for a 128-channel 3×3 conv at 256²). Here the input stays NCHW, each im2col row is one
    /// (channel, ky, kx) tap filled by slice copies, and the tiles bound the column buffer's size.
    /// 3×3 stride-1 layers large enough to pay go through Winograd F(2×2, 3×3) instead (`winograd.rs`).
    fn forward_cpu_f32(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c_in, h, w) = x.dims4()?;
        let (c_out, c_in_w, kh, kw) = self.weight.dims4()?;
        let (s, p) = (self.stride, self.padding);
        if c_in != c_in_w || s == 0 || h + 2 * p < kh || w + 2 * p < kw {
            // Let candle report the shape error in its own words.
            return x.conv2d(&self.weight, p, s, 1, 1);
        }
        let (h_out, w_out) = ((h + 2 * p - kh) / s + 1, (w + 2 * p - kw) / s + 1);
        if kh == 3 && kw == 3 && s == 1 && winograd::pays(c_in, b * h_out * w_out) {
            return winograd::conv3x3(x, &self.weight, p);
        }
        let k = c_in * kh * kw;
        let wm = self.weight.contiguous()?.reshape((c_out, k))?;
        let rows_per_tile = (IM2COL_TILE_ELEMS / (k * w_out)).clamp(1, h_out);
        let x = x.contiguous()?;
        let mut images = Vec::with_capacity(b);
        for bi in 0..b {
            let img = x.get(bi)?;
            let mut tiles = Vec::with_capacity(h_out.div_ceil(rows_per_tile));
            let mut row0 = 0;
            while row0 < h_out {
                let rows = rows_per_tile.min(h_out - row0);
                let col = img.apply_op1_no_bwd(&Im2ColTile { kh, kw, stride: s, pad: p, row0, rows, w_out })?;
                tiles.push(wm.matmul(&col)?);
                row0 += rows;
            }
            let y = if tiles.len() == 1 { tiles.swap_remove(0) } else { Tensor::cat(&tiles, 1)? };
            images.push(y.reshape((c_out, h_out, w_out))?);
        }
        if images.len() == 1 {
            images.swap_remove(0).unsqueeze(0)
        } else {
            Tensor::stack(&images, 0)
        }
    }
}

/// Floats in one im2col tile (16 MiB): large enough for an efficient GEMM, small enough to stay
/// out of the allocator's page-fault path on 512² VAE layers (a whole im2col there is over 1 GiB).
const IM2COL_TILE_ELEMS: usize = 1 << 22;

/// The im2col matrix `[c_in·kh·kw, rows·w_out]` of output rows `row0..row0 + rows` of one image
/// `[c_in, h, w]`, zero where the kernel reads padding.
struct Im2ColTile {
    kh: usize,
    kw: usize,
    stride: usize,
    pad: usize,
    row0: usize,
    rows: usize,
    w_out: usize,
}

impl candle_core::CustomOp1 for Im2ColTile {
    fn name(&self) -> &'static str {
        "sd-im2col-tile"
    }

    fn cpu_fwd(&self, storage: &candle_core::CpuStorage, layout: &candle_core::Layout) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let src = contiguous_f32(storage, layout, "sd-im2col-tile")?;
        let (c_in, h, w) = layout.shape().dims3()?;
        let Self { kh, kw, stride, pad, row0, rows, w_out } = *self;
        let n = rows * w_out;
        let mut dst = vec![0f32; c_in * kh * kw * n];
        dst.par_chunks_mut(n).enumerate().for_each(|(r, out)| {
            let (ci, ky, kx) = (r / (kh * kw), (r / kw) % kh, r % kw);
            let plane = &src[ci * h * w..(ci + 1) * h * w];
            for (t, orow) in out.chunks_mut(w_out).enumerate() {
                let iy = (row0 + t) * stride + ky;
                if iy < pad || iy - pad >= h {
                    continue; // padding row: stays zero
                }
                let irow = &plane[(iy - pad) * w..(iy - pad + 1) * w];
                if stride == 1 {
                    // Output column ox reads input column ox + kx − pad: one contiguous run.
                    let lo = pad.saturating_sub(kx);
                    let hi = w_out.min((w + pad).saturating_sub(kx));
                    if lo < hi {
                        orow[lo..hi].copy_from_slice(&irow[lo + kx - pad..hi + kx - pad]);
                    }
                } else {
                    for (ox, o) in orow.iter_mut().enumerate() {
                        let ix = ox * stride + kx;
                        if ix >= pad && ix - pad < w {
                            *o = irow[ix - pad];
                        }
                    }
                }
            }
        });
        Ok((candle_core::CpuStorage::F32(dst), candle_core::Shape::from((c_in * kh * kw, n))))
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (c_out, c_in, kh, kw) = self.weight.dims4()?;
        let y = if kh == 1 && kw == 1 && self.stride == 1 && self.padding == 0 {
            // A 1×1 convolution is a matrix product over channels; no im2col needed.
            let (b, _, h, w) = x.dims4()?;
            let xs = x.reshape((b, c_in, h * w))?;
            let wm = self.weight.reshape((c_out, c_in))?;
            wm.broadcast_left(b)?.matmul(&xs)?.reshape((b, c_out, h, w))?
        } else if x.device().is_cpu() && x.dtype() == DType::F32 && self.weight.dtype() == DType::F32 {
            self.forward_cpu_f32(x)?
        } else {
            self.forward_backend(x)?
        };
        match &self.bias {
            Some(bias) => y.broadcast_add(&bias.reshape((1, c_out, 1, 1))?),
            None => Ok(y),
        }
    }
}

/// Loads a GroupNorm with `weight`/`bias` from `vb`.
pub fn group_norm(vb: VarBuilder, groups: usize, channels: usize, eps: f64) -> Result<GroupNorm> {
    let weight = vb.get(channels, "weight")?;
    let bias = vb.get(channels, "bias")?;
    GroupNorm::new(weight, bias, groups, eps)
}

/// GroupNorm over `[b, c, …]`, with a fused GroupNorm→SiLU variant because every resnet does both.
///
/// On the CPU in F32 it is one parallel pass over the data instead of candle-nn's chain of
/// whole-tensor ops (each a fresh allocation and a single-threaded sweep).
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
    cpu_params: Option<std::sync::Arc<(Vec<f32>, Vec<f32>)>>,
}

impl GroupNorm {
    /// Builds a GroupNorm from its per-channel affine parameters.
    pub fn new(weight: Tensor, bias: Tensor, groups: usize, eps: f64) -> Result<Self> {
        let channels = weight.elem_count();
        if groups == 0 || channels % groups != 0 {
            candle_core::bail!("group_norm: {channels} channels are not divisible into {groups} groups");
        }
        let cpu_params = if weight.device().is_cpu() {
            let w = weight.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let b = bias.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            Some(std::sync::Arc::new((w, b)))
        } else {
            None
        };
        Ok(Self { weight, bias, groups, eps, cpu_params })
    }

    /// GroupNorm followed by SiLU.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, true)
    }

    fn run(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        let c = x.dim(1)?;
        if c != self.weight.elem_count() {
            candle_core::bail!("group_norm: expected {} channels, got {c}", self.weight.elem_count());
        }
        if let (Some(params), true) = (&self.cpu_params, x.device().is_cpu() && x.dtype() == DType::F32) {
            let op = GroupNormCpu { params: params.clone(), groups: self.groups, eps: self.eps as f32, silu };
            return x.contiguous()?.apply_op1_no_bwd(&op);
        }
        let dims = x.dims().to_vec();
        let b = dims[0];
        let dtype = x.dtype();
        let xs = x.reshape((b, self.groups, ()))?.to_dtype(DType::F32)?;
        let mean = xs.mean_keepdim(2)?;
        let xs = xs.broadcast_sub(&mean)?;
        let var = xs.sqr()?.mean_keepdim(2)?;
        let xs = xs.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let mut shape = vec![1usize; dims.len()];
        shape[1] = c;
        let y = xs
            .reshape(dims.as_slice())?
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight.reshape(shape.as_slice())?)?
            .broadcast_add(&self.bias.reshape(shape.as_slice())?)?;
        if silu {
            candle_nn::ops::silu(&y)
        } else {
            Ok(y)
        }
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, false)
    }
}

struct GroupNormCpu {
    params: std::sync::Arc<(Vec<f32>, Vec<f32>)>,
    groups: usize,
    eps: f32,
    silu: bool,
}

impl candle_core::CustomOp1 for GroupNormCpu {
    fn name(&self) -> &'static str {
        "sd-group-norm"
    }

    fn cpu_fwd(&self, storage: &candle_core::CpuStorage, layout: &candle_core::Layout) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let src = contiguous_f32(storage, layout, "sd-group-norm")?;
        let dims = layout.dims();
        let c = dims[1];
        let spatial: usize = dims[2..].iter().product();
        let per_group = c / self.groups;
        let group_len = per_group * spatial;
        let (w, bias) = (&self.params.0, &self.params.1);
        let mut dst = vec![0f32; src.len()];
        dst.par_chunks_mut(group_len).zip(src.par_chunks(group_len)).enumerate().for_each(|(idx, (out, inp))| {
            let g = idx % self.groups;
            // Two passes in f64 keep the variance exact enough to match PyTorch at 1e-6.
            let mean = inp.iter().map(|&v| v as f64).sum::<f64>() / group_len as f64;
            let var = inp.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / group_len as f64;
            let inv = 1.0 / (var + self.eps as f64).sqrt();
            for ci in 0..per_group {
                let ch = g * per_group + ci;
                let scale = (w[ch] as f64 * inv) as f32;
                let shift = (bias[ch] as f64 - mean * w[ch] as f64 * inv) as f32;
                let (o, i) = (&mut out[ci * spatial..(ci + 1) * spatial], &inp[ci * spatial..(ci + 1) * spatial]);
                cpu::affine_silu(o, i, scale, shift, self.silu);
            }
        });
        Ok((candle_core::CpuStorage::F32(dst), layout.shape().clone()))
    }
}

/// GEGLU activation: splits the last dimension into `hidden, gate` halves and returns
/// `hidden · gelu_erf(gate)` (diffusers' feed-forward), fused into one parallel pass on the CPU.
pub fn geglu(x: &Tensor) -> Result<Tensor> {
    let last = x.dim(candle_core::D::Minus1)?;
    if last % 2 != 0 {
        candle_core::bail!("geglu: last dimension {last} is odd");
    }
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return x.contiguous()?.apply_op1_no_bwd(&GegluCpu);
    }
    let half = last / 2;
    let hidden = x.narrow(candle_core::D::Minus1, 0, half)?;
    let gate = x.narrow(candle_core::D::Minus1, half, half)?;
    hidden * gate.gelu_erf()?
}

struct GegluCpu;

impl candle_core::CustomOp1 for GegluCpu {
    fn name(&self) -> &'static str {
        "sd-geglu"
    }

    fn cpu_fwd(&self, storage: &candle_core::CpuStorage, layout: &candle_core::Layout) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let src = contiguous_f32(storage, layout, "sd-geglu")?;
        let mut dims = layout.dims().to_vec();
        let last = dims[dims.len() - 1];
        let half = last / 2;
        let rows = src.len() / last.max(1);
        let mut dst = vec![0f32; rows * half];
        dst.par_chunks_mut(half).zip(src.par_chunks(last)).for_each(|(out, row)| {
            let (h, g) = row.split_at(half);
            cpu::geglu(out, h, g);
        });
        let n = dims.len();
        dims[n - 1] = half;
        Ok((candle_core::CpuStorage::F32(dst), candle_core::Shape::from(dims)))
    }
}

/// Loads a LayerNorm with `weight`/`bias` from `vb`.
pub fn layer_norm(vb: VarBuilder, dim: usize, eps: f64) -> Result<candle_nn::LayerNorm> {
    candle_nn::layer_norm(dim, eps, vb)
}

mod linear;
pub use linear::Linear;

/// Loads a Linear layer (`weight` `[out, in]`, optional `bias`) from `vb`.
pub fn linear(vb: VarBuilder, d_in: usize, d_out: usize, bias: bool) -> Result<Linear> {
    let layer = if bias { candle_nn::linear(d_in, d_out, vb)? } else { candle_nn::linear_no_bias(d_in, d_out, vb)? };
    Ok(Linear::from(layer))
}

/// Exact (erf) GELU, as PyTorch's default `F.gelu` and diffusers use.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    x.gelu_erf()
}

/// SiLU (`x·sigmoid(x)`), parallel on the CPU where candle's unary ops run on one thread.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return x.contiguous()?.apply_op1_no_bwd(&SiluCpu);
    }
    candle_nn::ops::silu(x)
}

struct SiluCpu;

impl candle_core::CustomOp1 for SiluCpu {
    fn name(&self) -> &'static str {
        "sd-silu"
    }

    fn cpu_fwd(&self, storage: &candle_core::CpuStorage, layout: &candle_core::Layout) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let src = contiguous_f32(storage, layout, "sd-silu")?;
        let mut dst = vec![0f32; src.len()];
        dst.par_chunks_mut(1 << 14).zip(src.par_chunks(1 << 14)).for_each(|(o, i)| cpu::affine_silu(o, i, 1.0, 0.0, true));
        Ok((candle_core::CpuStorage::F32(dst), layout.shape().clone()))
    }
}

/// Softmax over the last dimension.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::softmax(x, D::Minus1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn naive(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
        let (b, n, inner) = q.dims3()?;
        let m = k.dim(1)?;
        let d = inner / heads;
        let q = q.reshape((b, n, heads, d))?.transpose(1, 2)?.contiguous()?;
        let k = k.reshape((b, m, heads, d))?.transpose(1, 2)?.contiguous()?;
        let v = v.reshape((b, m, heads, d))?.transpose(1, 2)?.contiguous()?;
        let s = (q.matmul(&k.t()?)? / (d as f64).sqrt())?;
        let p = softmax_last(&s)?;
        p.matmul(&v)?.transpose(1, 2)?.reshape((b, n, inner))
    }

    #[test]
    fn sliced_attention_matches_naive() -> Result<()> {
        let dev = Device::Cpu;
        // kv_len large enough that rows < q_len and slicing kicks in.
        let (b, n, m, heads, d) = (1, 40, 1 << 20, 1, 2);
        let q = Tensor::randn(0f32, 1., (b, n, heads * d), &dev)?;
        let k = Tensor::randn(0f32, 1., (b, m, heads * d), &dev)?;
        let v = Tensor::randn(0f32, 1., (b, m, heads * d), &dev)?;
        let a = attention(&q, &k, &v, heads, false)?;
        let e = naive(&q, &k, &v, heads)?;
        let diff = (a - e)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        Ok(())
    }

    /// The path GPUs without flash attention take, on both sides of its slicing threshold: one block,
    /// exact slices, a partial last slice, one row per slice.
    #[test]
    fn query_slices_match_one_block() -> Result<()> {
        let dev = Device::Cpu;
        let (b, heads, n, m, d) = (2, 3, 13, 11, 5);
        let q = Tensor::randn(0f32, 1., (b, heads, n, d), &dev)?;
        let k_t = Tensor::randn(0f32, 1., (b, heads, d, m), &dev)?;
        let v = Tensor::randn(0f32, 1., (b, heads, m, d), &dev)?;
        let whole = attend(&q, &k_t, &v)?;
        let per_row = b * heads * m;
        for rows in [n + 1, n, n - 1, 4, 1, 0] {
            let got = sliced(&q, &k_t, &v, rows * per_row)?;
            let diff = (&got - &whole)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-6, "{rows} rows per slice: {diff}");
        }
        Ok(())
    }

    /// Half-precision inputs take the sliced path on the CPU too (the GPU's path without flash
    /// attention), with and without `upcast`, from the head-major views FLUX passes.
    #[test]
    fn half_precision_attention_matches_f32() -> Result<()> {
        let dev = Device::Cpu;
        let (b, heads, n, m, d) = (1, 2, 9, 7, 8);
        let q = Tensor::randn(0f32, 1., (b, n, heads, d), &dev)?;
        let k = Tensor::randn(0f32, 1., (b, m, heads, d), &dev)?;
        let v = Tensor::randn(0f32, 1., (b, m, heads, d), &dev)?;
        let heads_view = |t: &Tensor, dt: DType| -> Result<Tensor> { t.to_dtype(dt)?.transpose(1, 2) };
        for dt in [DType::F16, DType::BF16] {
            // The reference sees the same rounded inputs.
            let r = |t: &Tensor| -> Result<Tensor> { heads_view(t, dt)?.to_dtype(DType::F32) };
            let want = attention_heads(&r(&q)?, &r(&k)?, &r(&v)?, false)?;
            for upcast in [false, true] {
                let got = attention_heads(&heads_view(&q, dt)?, &heads_view(&k, dt)?, &heads_view(&v, dt)?, upcast)?;
                assert_eq!(got.dtype(), dt);
                let diff = (got.to_dtype(DType::F32)? - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(diff < 3e-2, "{dt:?} upcast={upcast}: {diff}");
            }
        }
        Ok(())
    }

    #[test]
    fn one_by_one_conv_matches_conv2d() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1., (5, 3, 1, 1), &dev)?;
        let bias = Tensor::randn(0f32, 1., 5, &dev)?;
        let x = Tensor::randn(0f32, 1., (2, 3, 4, 6), &dev)?;
        let conv = Conv2d::new(w.clone(), Some(bias.clone()), 1, 0);
        let y = conv.forward(&x)?;
        let e = x.conv2d(&w, 0, 1, 1, 1)?.broadcast_add(&bias.reshape((1, 5, 1, 1))?)?;
        let diff = (y - e)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        Ok(())
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    #[test]
    fn fused_group_norm_matches_candle_nn() -> Result<()> {
        let dev = Device::Cpu;
        let x = ((Tensor::randn(0f32, 1., (2, 64, 5, 7), &dev)? * 3.0)? + 1.5)?;
        let w = Tensor::randn(0f32, 1., 64, &dev)?;
        let b = Tensor::randn(0f32, 1., 64, &dev)?;
        let ours = GroupNorm::new(w.clone(), b.clone(), 32, 1e-6)?;
        let reference = candle_nn::GroupNorm::new(w, b, 64, 32, 1e-6)?;
        let e = reference.forward(&x)?;
        assert!(max_diff(&ours.forward(&x)?, &e)? < 1e-5);
        let e_silu = candle_nn::ops::silu(&e)?;
        assert!(max_diff(&ours.forward_silu(&x)?, &e_silu)? < 1e-5);
        // Non-contiguous input takes the same path after a copy.
        let xt = x.transpose(2, 3)?;
        assert!(max_diff(&ours.forward(&xt)?, &reference.forward(&xt.contiguous()?)?)? < 1e-5);
        Ok(())
    }

    #[test]
    fn geglu_and_silu_match_reference() -> Result<()> {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 1., (2, 3, 8), &dev)? * 4.0)?;
        let h = x.narrow(2, 0, 4)?;
        let g = x.narrow(2, 4, 4)?;
        let e = (h * g.gelu_erf()?)?;
        // Values reach ~16 here, where one f32 ulp is ~2e-6: compare at a few ulps.
        assert!(max_diff(&geglu(&x)?, &e)? < 1e-5);
        assert!(max_diff(&silu(&x)?, &candle_nn::ops::silu(&x)?)? < 1e-5);
        Ok(())
    }

    #[test]
    fn tiled_im2col_conv_matches_candle_conv2d() -> Result<()> {
        let dev = Device::Cpu;
        // Kernel, stride, padding, batch, channels and sizes that hit borders, odd sizes, several
        // tiles (a 1-row tile budget via a tall image), stride 2 and an unpadded kernel.
        let cases = [(3, 1, 1, 2, 5, 7, 9, 11), (3, 2, 1, 1, 4, 6, 17, 10), (3, 1, 0, 1, 3, 2, 8, 8), (1, 2, 0, 2, 6, 4, 9, 7), (5, 1, 2, 1, 2, 3, 12, 6)];
        for (k, stride, pad, b, c_in, c_out, h, w) in cases {
            let x = Tensor::randn(0f32, 1., (b, c_in, h, w), &dev)?;
            let weight = Tensor::randn(0f32, 0.3, (c_out, c_in, k, k), &dev)?;
            let bias = Tensor::randn(0f32, 0.3, c_out, &dev)?;
            let ours = Conv2d::new(weight.clone(), Some(bias.clone()), stride, pad).forward(&x)?;
            let reference = x.conv2d(&weight, pad, stride, 1, 1)?.broadcast_add(&bias.reshape((1, c_out, 1, 1))?)?;
            assert_eq!(ours.dims(), reference.dims(), "k{k} s{stride} p{pad}");
            let diff = max_diff(&ours, &reference)?;
            assert!(diff < 1e-5, "k{k} s{stride} p{pad}: {diff}");
            // A non-contiguous input (a transposed view) gives the same result.
            let xt = x.transpose(2, 3)?.contiguous()?.transpose(2, 3)?;
            let diff = max_diff(&Conv2d::new(weight, Some(bias), stride, pad).forward(&xt)?, &reference)?;
            assert!(diff < 1e-5, "non-contiguous k{k}: {diff}");
        }
        // A tile budget of one output row: a 1-channel 3×3 conv over a wide image still assembles rows in order.
        let x = Tensor::randn(0f32, 1., (1, 256, 5, 4096), &dev)?;
        let weight = Tensor::randn(0f32, 0.05, (2, 256, 3, 3), &dev)?;
        let diff = max_diff(&Conv2d::new(weight.clone(), None, 1, 1).forward(&x)?, &x.conv2d(&weight, 1, 1, 1, 1)?)?;
        assert!(diff < 1e-4, "multi-tile: {diff}");
        Ok(())
    }

}
