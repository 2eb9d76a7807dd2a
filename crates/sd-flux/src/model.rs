//! The FLUX.1 transformer (Black Forest Labs' MMDiT: double-stream then single-stream blocks), written
//! here rather than taken from candle-transformers so that its attention runs through the workspace's
//! one attention function ([`sd_models::ops::attention_heads`]) and dense and GGUF-quantized weights
//! share one model. Module names mirror the BFL checkpoint (`double_blocks.0.img_attn.qkv`, …).

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;
use candle_transformers::models::flux::model::Config;
use candle_transformers::quantized_nn;
use candle_transformers::quantized_var_builder::VarBuilder as QuantizedVarBuilder;
use sd_models::ops;

/// Where the weights come from: a dense `VarBuilder` (safetensors, LoRAs merged by its backend) or a
/// GGUF one (quantized matmuls, F32 activations).
#[derive(Clone)]
pub enum Weights<'a> {
    /// F32/F16/BF16 weights.
    Dense(VarBuilder<'a>),
    /// GGUF weights.
    Quantized(QuantizedVarBuilder),
}

impl Weights<'_> {
    fn pp(&self, name: impl ToString) -> Self {
        match self {
            Weights::Dense(vb) => Weights::Dense(vb.pp(name.to_string())),
            Weights::Quantized(vb) => Weights::Quantized(vb.pp(name)),
        }
    }

    fn linear(&self, d_in: usize, d_out: usize, bias: bool) -> Result<Linear> {
        Ok(match self {
            Weights::Dense(vb) => Linear::Dense(ops::linear(vb.clone(), d_in, d_out, bias)?),
            Weights::Quantized(vb) => Linear::Quantized(quantized_nn::linear_b(d_in, d_out, bias, vb.clone())?),
        })
    }

    /// A 1-D weight (norm scales), dequantized for GGUF files.
    fn vector(&self, dim: usize, name: &str) -> Result<Tensor> {
        match self {
            Weights::Dense(vb) => vb.get(dim, name),
            Weights::Quantized(vb) => vb.get(dim, name)?.dequantize(vb.device()),
        }
    }

    fn dtype(&self) -> DType {
        match self {
            Weights::Dense(vb) => vb.dtype(),
            Weights::Quantized(_) => DType::F32,
        }
    }
}

/// A linear layer with dense or quantized weights.
#[derive(Debug, Clone)]
enum Linear {
    Dense(ops::Linear),
    Quantized(quantized_nn::Linear),
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Dense(l) => l.forward(x),
            Linear::Quantized(l) => l.forward(x),
        }
    }
}

/// Sinusoidal embedding of `t · 1000` (BFL's `timestep_embedding`: cos first), computed in F32.
fn timestep_embedding(t: &Tensor, dim: usize, dtype: DType) -> Result<Tensor> {
    let half = dim / 2;
    let dev = t.device();
    let freqs: Vec<f32> = (0..half).map(|i| (-(10000f64.ln()) * i as f64 / half as f64).exp() as f32).collect();
    let freqs = Tensor::from_vec(freqs, (1, half), dev)?;
    let args = (t.to_dtype(DType::F32)?.affine(1000.0, 0.0)?.unsqueeze(1)?.broadcast_mul(&freqs))?;
    Tensor::cat(&[args.cos()?, args.sin()?], D::Minus1)?.to_dtype(dtype)
}

/// The rotary tables `(cos, sin)` `[b, seq, head_dim/2]` (F32) of position ids `[b, seq, axes]`: each
/// axis rotates its own slice of the head dimension, adjacent pairs together (BFL's `EmbedND`).
fn rope_tables(ids: &Tensor, axes_dim: &[usize], theta: usize) -> Result<(Tensor, Tensor)> {
    let dev = ids.device();
    let ids = ids.to_dtype(DType::F32)?;
    let mut angles = Vec::with_capacity(axes_dim.len());
    for (axis, &d) in axes_dim.iter().enumerate() {
        let omega: Vec<f32> = (0..d / 2).map(|i| (1.0 / (theta as f64).powf(2.0 * i as f64 / d as f64)) as f32).collect();
        let omega = Tensor::from_vec(omega, (1, 1, d / 2), dev)?;
        angles.push(ids.narrow(D::Minus1, axis, 1)?.broadcast_mul(&omega)?);
    }
    let angles = Tensor::cat(&angles, D::Minus1)?.contiguous()?;
    Ok((angles.cos()?, angles.sin()?))
}

/// RoPE on `x` `[b, heads, seq, head_dim]` in F32, as BFL (which upcasts for it).
fn rope(x: &Tensor, (cos, sin): &(Tensor, Tensor)) -> Result<Tensor> {
    let dtype = x.dtype();
    candle_nn::rotary_emb::rope_i(&x.to_dtype(DType::F32)?.contiguous()?, cos, sin)?.to_dtype(dtype)
}

/// LayerNorm without affine parameters (eps 1e-6), as every FLUX norm but the QK ones (candle's fused
/// kernel, with unit scale and zero shift).
fn layer_norm(x: &Tensor) -> Result<Tensor> {
    let dim = x.dim(D::Minus1)?;
    let ones = Tensor::ones(dim, x.dtype(), x.device())?;
    let zeros = Tensor::zeros(dim, x.dtype(), x.device())?;
    candle_nn::ops::layer_norm(&x.contiguous()?, &ones, &zeros, 1e-6)
}

/// `(1 + scale) · layer_norm(x) + shift`.
fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    layer_norm(x)?.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(shift)
}

/// Two-layer MLP with SiLU (`in_layer`, `out_layer`).
#[derive(Debug, Clone)]
struct MlpEmbedder {
    in_layer: Linear,
    out_layer: Linear,
}

impl MlpEmbedder {
    fn new(w: &Weights, d_in: usize, hidden: usize) -> Result<Self> {
        Ok(Self { in_layer: w.pp("in_layer").linear(d_in, hidden, true)?, out_layer: w.pp("out_layer").linear(hidden, hidden, true)? })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.out_layer.forward(&ops::silu(&self.in_layer.forward(x)?)?)
    }
}

/// RMS norms of q and k per head (`norm.query_norm.scale`, `norm.key_norm.scale`).
#[derive(Debug, Clone)]
struct QkNorm {
    query: Tensor,
    key: Tensor,
}

impl QkNorm {
    fn new(w: &Weights, head_dim: usize) -> Result<Self> {
        let dtype = w.dtype();
        Ok(Self {
            query: w.pp("query_norm").vector(head_dim, "scale")?.to_dtype(dtype)?,
            key: w.pp("key_norm").vector(head_dim, "scale")?.to_dtype(dtype)?,
        })
    }

    fn forward(&self, q: &Tensor, k: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((candle_nn::ops::rms_norm(&q.contiguous()?, &self.query, 1e-6)?, candle_nn::ops::rms_norm(&k.contiguous()?, &self.key, 1e-6)?))
    }
}

/// `qkv` `[b, seq, 3·hidden]` → q, k, v `[b, heads, seq, head_dim]`.
fn split_qkv(qkv: &Tensor, heads: usize) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, seq, three_hidden) = qkv.dims3()?;
    let head_dim = three_hidden / 3 / heads;
    let qkv = qkv.reshape((b, seq, 3, heads, head_dim))?.permute((2, 0, 3, 1, 4))?;
    Ok((qkv.get(0)?, qkv.get(1)?, qkv.get(2)?))
}

/// Attention with RoPE over head-major q, k, v; returns `[b, seq, hidden]`.
fn attention(q: &Tensor, k: &Tensor, v: &Tensor, pe: &(Tensor, Tensor)) -> Result<Tensor> {
    let out = ops::attention_heads(&rope(q, pe)?, &rope(k, pe)?, &v.contiguous()?, false)?;
    let (b, heads, seq, d) = out.dims4()?;
    out.transpose(1, 2)?.reshape((b, seq, heads * d))
}

/// One stream's half of a double block (`img_*` or `txt_*` modules).
#[derive(Debug, Clone)]
struct Stream {
    modulation: Linear,
    qkv: Linear,
    norm: QkNorm,
    proj: Linear,
    mlp_in: Linear,
    mlp_out: Linear,
}

impl Stream {
    fn new(w: &Weights, prefix: &str, cfg: &Config) -> Result<Self> {
        let h = cfg.hidden_size;
        let mlp = (h as f64 * cfg.mlp_ratio) as usize;
        let attn = w.pp(format!("{prefix}_attn"));
        Ok(Self {
            modulation: w.pp(format!("{prefix}_mod")).pp("lin").linear(h, 6 * h, true)?,
            qkv: attn.pp("qkv").linear(h, 3 * h, cfg.qkv_bias)?,
            norm: QkNorm::new(&attn.pp("norm"), h / cfg.num_heads)?,
            proj: attn.pp("proj").linear(h, h, true)?,
            mlp_in: w.pp(format!("{prefix}_mlp")).pp("0").linear(h, mlp, true)?,
            mlp_out: w.pp(format!("{prefix}_mlp")).pp("2").linear(mlp, h, true)?,
        })
    }

    /// The six modulation vectors `[b, 1, hidden]` (shift, scale, gate for attention, then for the MLP).
    fn modulation(&self, vec: &Tensor) -> Result<Vec<Tensor>> {
        self.modulation.forward(&ops::silu(vec)?)?.unsqueeze(1)?.chunk(6, D::Minus1)
    }

    /// q, k, v of the modulated stream, QK-normed.
    fn qkv(&self, x: &Tensor, m: &[Tensor], heads: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let (q, k, v) = split_qkv(&self.qkv.forward(&modulate(x, &m[0], &m[1])?)?, heads)?;
        let (q, k) = self.norm.forward(&q, &k)?;
        Ok((q, k, v))
    }

    /// The residual updates after attention: projection and MLP, each gated.
    fn finish(&self, x: &Tensor, attn: &Tensor, m: &[Tensor]) -> Result<Tensor> {
        let x = (x + self.proj.forward(attn)?.broadcast_mul(&m[2])?)?;
        let mlp = self.mlp_out.forward(&self.mlp_in.forward(&modulate(&x, &m[3], &m[4])?)?.gelu()?)?;
        x + mlp.broadcast_mul(&m[5])?
    }
}

/// A double-stream block: image and text tokens keep their own weights and attend jointly.
#[derive(Debug, Clone)]
struct DoubleBlock {
    img: Stream,
    txt: Stream,
    heads: usize,
}

impl DoubleBlock {
    fn forward(&self, img: &Tensor, txt: &Tensor, vec: &Tensor, pe: &(Tensor, Tensor)) -> Result<(Tensor, Tensor)> {
        let (img_m, txt_m) = (self.img.modulation(vec)?, self.txt.modulation(vec)?);
        let (iq, ik, iv) = self.img.qkv(img, &img_m, self.heads)?;
        let (tq, tk, tv) = self.txt.qkv(txt, &txt_m, self.heads)?;
        // Joint sequence: text first, then image (the order the position ids were built in).
        let cat = |a: &Tensor, b: &Tensor| Tensor::cat(&[a, b], 2);
        let attn = attention(&cat(&tq, &iq)?, &cat(&tk, &ik)?, &cat(&tv, &iv)?, pe)?;
        let txt_len = txt.dim(1)?;
        let txt_attn = attn.narrow(1, 0, txt_len)?;
        let img_attn = attn.narrow(1, txt_len, attn.dim(1)? - txt_len)?;
        Ok((self.img.finish(img, &img_attn, &img_m)?, self.txt.finish(txt, &txt_attn, &txt_m)?))
    }
}

/// A single-stream block over the concatenated tokens: one fused linear makes q, k, v and the MLP input.
#[derive(Debug, Clone)]
struct SingleBlock {
    linear1: Linear,
    linear2: Linear,
    norm: QkNorm,
    modulation: Linear,
    heads: usize,
    hidden: usize,
    mlp: usize,
}

impl SingleBlock {
    fn new(w: &Weights, cfg: &Config) -> Result<Self> {
        let h = cfg.hidden_size;
        let mlp = (h as f64 * cfg.mlp_ratio) as usize;
        Ok(Self {
            linear1: w.pp("linear1").linear(h, 3 * h + mlp, true)?,
            linear2: w.pp("linear2").linear(h + mlp, h, true)?,
            norm: QkNorm::new(&w.pp("norm"), h / cfg.num_heads)?,
            modulation: w.pp("modulation").pp("lin").linear(h, 3 * h, true)?,
            heads: cfg.num_heads,
            hidden: h,
            mlp,
        })
    }

    fn forward(&self, x: &Tensor, vec: &Tensor, pe: &(Tensor, Tensor)) -> Result<Tensor> {
        let m = self.modulation.forward(&ops::silu(vec)?)?.unsqueeze(1)?.chunk(3, D::Minus1)?;
        let fused = self.linear1.forward(&modulate(x, &m[0], &m[1])?)?;
        let (q, k, v) = split_qkv(&fused.narrow(D::Minus1, 0, 3 * self.hidden)?, self.heads)?;
        let (q, k) = self.norm.forward(&q, &k)?;
        let attn = attention(&q, &k, &v, pe)?;
        let mlp = fused.narrow(D::Minus1, 3 * self.hidden, self.mlp)?.gelu()?;
        let out = self.linear2.forward(&Tensor::cat(&[attn, mlp], D::Minus1)?)?;
        x + out.broadcast_mul(&m[2])?
    }
}

/// The FLUX.1 transformer.
#[derive(Debug, Clone)]
pub struct FluxModel {
    img_in: Linear,
    txt_in: Linear,
    time_in: MlpEmbedder,
    vector_in: MlpEmbedder,
    guidance_in: Option<MlpEmbedder>,
    double_blocks: Vec<DoubleBlock>,
    single_blocks: Vec<SingleBlock>,
    final_modulation: Linear,
    final_linear: Linear,
    axes_dim: Vec<usize>,
    theta: usize,
    dtype: DType,
}

impl FluxModel {
    /// Builds the model of `cfg` from weights with BFL names; `out_channels` is the prediction's width per
    /// token (`cfg.in_channels` but for FLUX.1 Fill, whose input also carries the masked image and mask).
    pub fn new(cfg: &Config, out_channels: usize, w: &Weights) -> Result<Self> {
        let h = cfg.hidden_size;
        if cfg.num_heads == 0 || h % cfg.num_heads != 0 || cfg.axes_dim.iter().sum::<usize>() != h / cfg.num_heads {
            candle_core::bail!("hidden size {h} with {} heads does not match the rotary axes {:?}", cfg.num_heads, cfg.axes_dim);
        }
        let double_blocks = (0..cfg.depth)
            .map(|i| {
                let b = w.pp("double_blocks").pp(i);
                Ok(DoubleBlock { img: Stream::new(&b, "img", cfg)?, txt: Stream::new(&b, "txt", cfg)?, heads: cfg.num_heads })
            })
            .collect::<Result<Vec<_>>>()?;
        let single_blocks =
            (0..cfg.depth_single_blocks).map(|i| SingleBlock::new(&w.pp("single_blocks").pp(i), cfg)).collect::<Result<Vec<_>>>()?;
        let fl = w.pp("final_layer");
        Ok(Self {
            img_in: w.pp("img_in").linear(cfg.in_channels, h, true)?,
            txt_in: w.pp("txt_in").linear(cfg.context_in_dim, h, true)?,
            time_in: MlpEmbedder::new(&w.pp("time_in"), 256, h)?,
            vector_in: MlpEmbedder::new(&w.pp("vector_in"), cfg.vec_in_dim, h)?,
            guidance_in: if cfg.guidance_embed { Some(MlpEmbedder::new(&w.pp("guidance_in"), 256, h)?) } else { None },
            double_blocks,
            single_blocks,
            final_modulation: fl.pp("adaLN_modulation").pp("1").linear(h, 2 * h, true)?,
            final_linear: fl.pp("linear").linear(h, out_channels, true)?,
            axes_dim: cfg.axes_dim.clone(),
            theta: cfg.theta,
            dtype: w.dtype(),
        })
    }

    /// Predicts the flow velocity `[b, seq, in_channels]` for packed latents `img` `[b, seq, in]` with
    /// position ids `img_ids` `[b, seq, 3]`, text tokens `txt` `[b, txt_seq, ctx]` with ids
    /// `[b, txt_seq, 3]`, timesteps (σ) `[b]`, pooled CLIP `y` `[b, vec]` and, for guidance-distilled
    /// models, the guidance scale `[b]`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        img: &Tensor,
        img_ids: &Tensor,
        txt: &Tensor,
        txt_ids: &Tensor,
        timesteps: &Tensor,
        y: &Tensor,
        guidance: Option<&Tensor>,
    ) -> Result<Tensor> {
        let dtype = self.dtype;
        let mut vec = self.time_in.forward(&timestep_embedding(timesteps, 256, dtype)?)?;
        if let Some(g_in) = &self.guidance_in {
            let Some(g) = guidance else {
                candle_core::bail!("this FLUX model is guidance-distilled (dev): pass a guidance scale");
            };
            vec = (vec + g_in.forward(&timestep_embedding(g, 256, dtype)?)?)?;
        }
        vec = (vec + self.vector_in.forward(&y.to_dtype(dtype)?)?)?;
        let mut img = self.img_in.forward(&img.to_dtype(dtype)?)?;
        let mut txt = self.txt_in.forward(&txt.to_dtype(dtype)?)?;
        let ids = Tensor::cat(&[txt_ids, img_ids], 1)?;
        let pe = rope_tables(&ids, &self.axes_dim, self.theta)?;
        for block in &self.double_blocks {
            (img, txt) = block.forward(&img, &txt, &vec, &pe)?;
        }
        let txt_len = txt.dim(1)?;
        let mut x = Tensor::cat(&[&txt, &img], 1)?;
        for block in &self.single_blocks {
            x = block.forward(&x, &vec, &pe)?;
        }
        let x = x.narrow(1, txt_len, x.dim(1)? - txt_len)?;
        let m = self.final_modulation.forward(&ops::silu(&vec)?)?.unsqueeze(1)?.chunk(2, D::Minus1)?;
        self.final_linear.forward(&modulate(&x, &m[0], &m[1])?)
    }
}
