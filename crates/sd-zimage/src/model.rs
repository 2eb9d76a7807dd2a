//! `ZImageTransformer2DModel` (diffusers' `transformer_z_image.py`): a single-stream DiT. Image
//! patches and caption features are refined separately (noise refiner with timestep modulation,
//! context refiner without), then concatenated `[image, caption]` and run through the main blocks.
//!
//! Token runs are padded to multiples of 32 with learned pad tokens (`x_pad_token`, `cap_pad_token`),
//! which take part in attention like real tokens. diffusers pads *between* batch items whose captions
//! differ in length (prompt and negative prompt under CFG) and masks those keys; here such items run as
//! separate groups, which gives the same result without a mask.
//! Rotary positions: caption token `j` sits at `(1 + j, 0, 0)`, image patch `(h, w)` at
//! `(cap_len + 1, h, w)` where `cap_len` is the padded caption length, image pad tokens at `(0, 0, 0)`.

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::VarBuilder;
use sd_models::ops::{self, Linear};

use crate::config::{ZImageConfig, SEQ_MULTI_OF};
use crate::norm::{layer_norm_plain, rope_tables, RmsNorm};

fn padded(n: usize) -> usize {
    n.div_ceil(SEQ_MULTI_OF) * SEQ_MULTI_OF
}

/// q, k, v projections: separate (`to_q`/`to_k`/`to_v`, diffusers) or fused (`qkv`, the original layout).
#[derive(Debug, Clone)]
enum Qkv {
    Separate(Linear, Linear, Linear),
    Fused(Linear),
}

#[derive(Debug, Clone)]
struct Attention {
    qkv: Qkv,
    norm_q: Option<RmsNorm>,
    norm_k: Option<RmsNorm>,
    to_out: Linear,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(vb: VarBuilder, cfg: &ZImageConfig) -> Result<Self> {
        let dim = cfg.dim;
        let qkv = if vb.contains_tensor("to_q.weight") || !vb.contains_tensor("qkv.weight") {
            Qkv::Separate(ops::linear(vb.pp("to_q"), dim, dim, false)?, ops::linear(vb.pp("to_k"), dim, dim, false)?, ops::linear(vb.pp("to_v"), dim, dim, false)?)
        } else {
            Qkv::Fused(ops::linear(vb.pp("qkv"), dim, 3 * dim, false)?)
        };
        let hd = cfg.head_dim();
        let (norm_q, norm_k) = if cfg.qk_norm {
            (Some(RmsNorm::load(vb.pp("norm_q"), hd, 1e-5)?), Some(RmsNorm::load(vb.pp("norm_k"), hd, 1e-5)?))
        } else {
            (None, None)
        };
        Ok(Self { qkv, norm_q, norm_k, to_out: ops::linear(vb.pp("to_out").pp("0"), dim, dim, false)?, heads: cfg.n_heads, head_dim: hd })
    }

    /// `x` `[b, s, dim]`, rotary `cos`/`sin` `[b, s, hd/2]` (F32).
    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (b, s, dim) = x.dims3()?;
        let (q, k, v) = match &self.qkv {
            Qkv::Separate(q, k, v) => (q.forward(x)?, k.forward(x)?, v.forward(x)?),
            Qkv::Fused(l) => {
                let y = l.forward(x)?;
                (y.narrow(2, 0, dim)?, y.narrow(2, dim, dim)?, y.narrow(2, 2 * dim, dim)?)
            }
        };
        let dtype = x.dtype();
        let heads = |t: Tensor| t.reshape((b, s, self.heads, self.head_dim));
        let (mut q, mut k, v) = (heads(q)?, heads(k)?, heads(v)?);
        if let Some(n) = &self.norm_q {
            q = n.forward(&q)?;
        }
        if let Some(n) = &self.norm_k {
            k = n.forward(&k)?;
        }
        // Rotary in F32 on interleaved pairs (diffusers' complex multiply), back to the model dtype.
        let rot = |t: Tensor| -> Result<Tensor> {
            let t = t.to_dtype(DType::F32)?.transpose(1, 2)?.contiguous()?;
            candle_nn::rotary_emb::rope_i(&t, cos, sin)?.to_dtype(dtype)
        };
        let q = rot(q)?;
        let k = rot(k)?;
        let out = ops::attention_heads(&q, &k, &v.transpose(1, 2)?, false)?.transpose(1, 2)?.reshape((b, s, dim))?;
        self.to_out.forward(&out)
    }
}

#[derive(Debug, Clone)]
struct FeedForward {
    w1: Linear,
    w2: Linear,
    w3: Linear,
}

impl FeedForward {
    fn load(vb: VarBuilder, dim: usize, hidden: usize) -> Result<Self> {
        Ok(Self { w1: ops::linear(vb.pp("w1"), dim, hidden, false)?, w2: ops::linear(vb.pp("w2"), hidden, dim, false)?, w3: ops::linear(vb.pp("w3"), dim, hidden, false)? })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.w2.forward(&(ops::silu(&self.w1.forward(x)?)? * self.w3.forward(x)?)?)
    }
}

/// `ZImageTransformerBlock`: attention and SwiGLU, each sandwiched between RMSNorms, with tanh-gated
/// timestep modulation when `adaLN_modulation` is present.
#[derive(Debug, Clone)]
struct Block {
    attention: Attention,
    feed_forward: FeedForward,
    attention_norm1: RmsNorm,
    attention_norm2: RmsNorm,
    ffn_norm1: RmsNorm,
    ffn_norm2: RmsNorm,
    modulation: Option<Linear>,
}

impl Block {
    fn load(vb: VarBuilder, cfg: &ZImageConfig, modulation: bool) -> Result<Self> {
        let dim = cfg.dim;
        let eps = cfg.norm_eps;
        Ok(Self {
            attention: Attention::load(vb.pp("attention"), cfg)?,
            feed_forward: FeedForward::load(vb.pp("feed_forward"), dim, cfg.ffn_dim())?,
            attention_norm1: RmsNorm::load(vb.pp("attention_norm1"), dim, eps)?,
            attention_norm2: RmsNorm::load(vb.pp("attention_norm2"), dim, eps)?,
            ffn_norm1: RmsNorm::load(vb.pp("ffn_norm1"), dim, eps)?,
            ffn_norm2: RmsNorm::load(vb.pp("ffn_norm2"), dim, eps)?,
            modulation: if modulation { Some(ops::linear(vb.pp("adaLN_modulation").pp("0"), cfg.adaln_dim(), 4 * dim, true)?) } else { None },
        })
    }

    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, adaln: Option<&Tensor>) -> Result<Tensor> {
        match (&self.modulation, adaln) {
            (Some(m), Some(c)) => {
                let dim = x.dim(D::Minus1)?;
                let mods = m.forward(c)?.unsqueeze(1)?;
                let part = |i: usize| mods.narrow(2, i * dim, dim);
                let scale_msa = (part(0)? + 1.0)?;
                let gate_msa = part(1)?.tanh()?;
                let scale_mlp = (part(2)? + 1.0)?;
                let gate_mlp = part(3)?.tanh()?;
                let h = self.attention_norm1.forward(x)?.broadcast_mul(&scale_msa)?;
                let a = self.attention.forward(&h, cos, sin)?;
                let x = (x + self.attention_norm2.forward(&a)?.broadcast_mul(&gate_msa)?)?;
                let h = self.ffn_norm1.forward(&x)?.broadcast_mul(&scale_mlp)?;
                let f = self.ffn_norm2.forward(&self.feed_forward.forward(&h)?)?;
                x + f.broadcast_mul(&gate_mlp)?
            }
            (Some(_), None) => candle_core::bail!("a modulated Z-Image block needs the timestep embedding"),
            (None, _) => {
                let a = self.attention.forward(&self.attention_norm1.forward(x)?, cos, sin)?;
                let x = (x + self.attention_norm2.forward(&a)?)?;
                let f = self.ffn_norm2.forward(&self.feed_forward.forward(&self.ffn_norm1.forward(&x)?)?)?;
                x + f
            }
        }
    }
}

/// The Z-Image denoising transformer.
#[derive(Debug, Clone)]
pub struct ZImageModel {
    cfg: ZImageConfig,
    x_embedder: Linear,
    final_linear: Linear,
    final_modulation: Linear,
    noise_refiner: Vec<Block>,
    context_refiner: Vec<Block>,
    t_mlp0: Linear,
    t_mlp2: Linear,
    cap_norm: RmsNorm,
    cap_linear: Linear,
    x_pad_token: Tensor,
    cap_pad_token: Tensor,
    layers: Vec<Block>,
    dtype: DType,
    device: Device,
}

impl ZImageModel {
    /// Builds the model from diffusers-named weights under `vb` (`all_x_embedder.2-1.*`, `layers.N.*`, …).
    pub fn new(cfg: &ZImageConfig, vb: VarBuilder) -> Result<Self> {
        cfg.check().map_err(candle_core::Error::msg)?;
        let dim = cfg.dim;
        let p = cfg.patch_size();
        let key = format!("{p}-1");
        let patch_dim = p * p * cfg.in_channels;
        let fl = vb.pp("all_final_layer").pp(&key);
        let blocks = |name: &str, n: usize, modulation: bool| -> Result<Vec<Block>> {
            (0..n).map(|i| Block::load(vb.pp(name).pp(i.to_string()), cfg, modulation)).collect()
        };
        let adaln = cfg.adaln_dim();
        Ok(Self {
            x_embedder: ops::linear(vb.pp("all_x_embedder").pp(&key), patch_dim, dim, true)?,
            final_linear: ops::linear(fl.pp("linear"), dim, patch_dim, true)?,
            final_modulation: ops::linear(fl.pp("adaLN_modulation").pp("1"), adaln, dim, true)?,
            noise_refiner: blocks("noise_refiner", cfg.n_refiner_layers, true)?,
            context_refiner: blocks("context_refiner", cfg.n_refiner_layers, false)?,
            t_mlp0: ops::linear(vb.pp("t_embedder").pp("mlp").pp("0"), 256, 1024, true)?,
            t_mlp2: ops::linear(vb.pp("t_embedder").pp("mlp").pp("2"), 1024, adaln, true)?,
            cap_norm: RmsNorm::load(vb.pp("cap_embedder").pp("0"), cfg.cap_feat_dim, cfg.norm_eps)?,
            cap_linear: ops::linear(vb.pp("cap_embedder").pp("1"), cfg.cap_feat_dim, dim, true)?,
            x_pad_token: vb.get((1, dim), "x_pad_token")?,
            cap_pad_token: vb.get((1, dim), "cap_pad_token")?,
            layers: blocks("layers", cfg.n_layers, true)?,
            cfg: cfg.clone(),
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// The architecture.
    pub fn config(&self) -> &ZImageConfig {
        &self.cfg
    }

    /// dtype of the weights and activations.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// `t_embedder`: sinusoidal features `[cos, sin]` of `t · t_scale` (F32), then Linear–SiLU–Linear.
    fn timestep_embedding(&self, t: &Tensor) -> Result<Tensor> {
        let half = 128usize;
        let freqs: Vec<f32> = (0..half).map(|i| (-(10000f32.ln()) * i as f32 / half as f32).exp()).collect();
        let freqs = Tensor::from_vec(freqs, (1, half), &self.device)?;
        let t = (t.to_dtype(DType::F32)?.to_device(&self.device)? * self.cfg.t_scale)?;
        let args = t.unsqueeze(1)?.broadcast_mul(&freqs)?;
        let emb = Tensor::cat(&[args.cos()?, args.sin()?], 1)?.to_dtype(self.dtype)?;
        self.t_mlp2.forward(&ops::silu(&self.t_mlp0.forward(&emb)?)?)
    }

    /// Predicts the model output for latents `x` `[b, C, H, W]` (H and W multiples of the patch size) at
    /// timesteps `t` `[b]` (diffusers' `(1000 − t) / 1000`, i.e. `1 − σ`) with caption features `caps`
    /// (one `[len_i, cap_feat_dim]` per batch item). Returns `[b, C, H, W]` in the model dtype. The
    /// pipeline's velocity is the negative of this.
    ///
    /// Items whose captions pad to different lengths (a prompt and a negative prompt under CFG) run as
    /// separate groups: diffusers pads them to the longest and masks those keys, which gives the same
    /// result, and each group keeps the unmasked (fused where available) attention.
    pub fn forward(&self, x: &Tensor, t: &Tensor, caps: &[Tensor]) -> Result<Tensor> {
        let b = x.dim(0)?;
        if caps.len() != b || t.dims1()? != b {
            candle_core::bail!("Z-Image transformer: {b} latents, {} captions and {} timesteps", caps.len(), t.dims1()?);
        }
        let cap_p: Vec<usize> = caps.iter().map(|c| c.dim(0).map(padded)).collect::<Result<_>>()?;
        let mut lengths = cap_p.clone();
        lengths.sort_unstable();
        lengths.dedup();
        if lengths.len() <= 1 {
            return self.forward_uniform(x, t, caps);
        }
        let mut outs: Vec<Option<Tensor>> = vec![None; b];
        for len in lengths {
            let idx: Vec<u32> = (0..b).filter(|&i| cap_p[i] == len).map(|i| i as u32).collect();
            let ids = Tensor::new(idx.as_slice(), x.device())?;
            let group_caps: Vec<Tensor> = idx.iter().map(|&i| caps[i as usize].clone()).collect();
            let tids = ids.to_device(t.device())?;
            let out = self.forward_uniform(&x.index_select(&ids, 0)?, &t.index_select(&tids, 0)?, &group_caps)?;
            for (j, &i) in idx.iter().enumerate() {
                outs[i as usize] = Some(out.get(j)?);
            }
        }
        let outs: Vec<Tensor> = outs.into_iter().collect::<Option<_>>().ok_or_else(|| candle_core::Error::msg("Z-Image transformer: an item was not run"))?;
        Tensor::stack(&outs, 0)
    }

    /// [`Self::forward`] for a batch whose captions all pad to the same length.
    fn forward_uniform(&self, x: &Tensor, t: &Tensor, caps: &[Tensor]) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let p = self.cfg.patch_size();
        if caps.len() != b || t.dims1()? != b {
            candle_core::bail!("Z-Image transformer: {b} latents, {} captions and {} timesteps", caps.len(), t.dims1()?);
        }
        if h % p != 0 || w % p != 0 || c != self.cfg.in_channels {
            candle_core::bail!("Z-Image transformer: latents {:?} must have {} channels and a size divisible by {p}", x.dims(), self.cfg.in_channels);
        }
        let dtype = self.dtype;
        let dev = &self.device;
        let dim = self.cfg.dim;
        let adaln = self.timestep_embedding(t)?;

        // Patchify: [b, C, H, W] -> [b, Ht·Wt, pH·pW·C] (channels last within a patch).
        let (ht, wt) = (h / p, w / p);
        let n_img = ht * wt;
        let tokens = x
            .to_dtype(dtype)?
            .reshape((b, c, ht, p, wt, p))?
            .permute((0, 2, 4, 3, 5, 1))?
            .reshape((b, n_img, p * p * c))?;
        let n_img_p = padded(n_img);
        let mut xs = self.x_embedder.forward(&tokens)?;
        if n_img_p > n_img {
            let pad = self.x_pad_token.to_dtype(dtype)?.unsqueeze(0)?.broadcast_as((b, n_img_p - n_img, dim))?;
            xs = Tensor::cat(&[&xs, &pad], 1)?;
        }

        // Captions, each padded to a multiple of 32 (the same length for every item here).
        let cap_lens: Vec<usize> = caps.iter().map(|c| c.dim(0)).collect::<Result<_>>()?;
        if cap_lens.contains(&0) {
            candle_core::bail!("Z-Image transformer: a caption has no tokens");
        }
        let cp = padded(cap_lens.iter().copied().max().unwrap_or(0));
        if cap_lens.iter().any(|&l| padded(l) != cp) {
            candle_core::bail!("Z-Image transformer: captions of one uniform batch must pad to the same length");
        }

        // Image patches at (cp + 1, h, w), their pads at (0, 0, 0); caption tokens at (1 + j, 0, 0).
        let axes = &self.cfg.axes_dims;
        let theta = self.cfg.rope_theta;
        let mut pos = Vec::with_capacity(n_img_p + cp);
        for i in 0..ht {
            for j in 0..wt {
                pos.push([cp as u32 + 1, i as u32, j as u32]);
            }
        }
        pos.resize(n_img_p, [0, 0, 0]);
        pos.extend((0..cp).map(|j| [j as u32 + 1, 0, 0]));
        let (cos, sin) = rope_tables(&pos, axes, theta, dev)?;
        let (img_cos, img_sin) = (cos.narrow(0, 0, n_img_p)?, sin.narrow(0, 0, n_img_p)?);
        let (cap_cos, cap_sin) = (cos.narrow(0, n_img_p, cp)?.contiguous()?, sin.narrow(0, n_img_p, cp)?.contiguous()?);
        for block in &self.noise_refiner {
            xs = block.forward(&xs, &img_cos, &img_sin, Some(&adaln))?;
        }

        let cap_pad = self.cap_pad_token.to_dtype(dtype)?;
        let mut rows = Vec::with_capacity(b);
        for (cap, &l) in caps.iter().zip(&cap_lens) {
            let e = self.cap_linear.forward(&self.cap_norm.forward(&cap.to_device(dev)?.to_dtype(dtype)?)?)?;
            rows.push(if cp > l { Tensor::cat(&[e, cap_pad.broadcast_as((cp - l, dim))?.contiguous()?], 0)? } else { e });
        }
        let mut cap = Tensor::stack(&rows, 0)?;
        for block in &self.context_refiner {
            cap = block.forward(&cap, &cap_cos, &cap_sin, None)?;
        }

        // The unified sequence: [image (padded), caption (padded)].
        let mut uni = Tensor::cat(&[&xs, &cap], 1)?;
        for block in &self.layers {
            uni = block.forward(&uni, &cos, &sin, Some(&adaln))?;
        }

        // Final layer: LayerNorm (no affine) · (1 + Linear(SiLU(c))), Linear; keep the image tokens.
        let scale = (self.final_modulation.forward(&ops::silu(&adaln)?)? + 1.0)?.unsqueeze(1)?;
        let out = layer_norm_plain(&uni.narrow(1, 0, n_img)?, 1e-6)?.broadcast_mul(&scale)?;
        let out = self.final_linear.forward(&out)?;
        // Unpatchify: [b, Ht·Wt, pH·pW·C] -> [b, C, H, W].
        out.reshape((b, ht, wt, p, p, c))?.permute((0, 5, 1, 3, 2, 4))?.reshape((b, c, h, w))
    }
}
