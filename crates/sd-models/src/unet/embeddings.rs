//! Sinusoidal embeddings of timesteps and of SDXL's size/crop ids.

use candle_core::{DType, Device, Module, Result, Tensor, D};

/// diffusers' `Timesteps` module (`get_timestep_embedding` with `max_period` 10000).
///
/// The frequencies are computed once, at load time, and always in F32 because diffusers computes
/// the embedding in F32 whatever the model dtype is; a half-precision `t · freq` near t = 1000
/// would lose the phase entirely.
#[derive(Debug, Clone)]
pub struct SinusoidalEmbedding {
    /// `[1, dim / 2]` F32 frequencies.
    freqs: Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
}

impl SinusoidalEmbedding {
    /// Builds the embedding of width `dim`.
    pub fn new(dim: usize, flip_sin_to_cos: bool, freq_shift: f64, device: &Device) -> Result<Self> {
        let half = dim / 2;
        if half == 0 {
            candle_core::bail!("timestep embedding width {dim} is too small; it needs at least 2 channels");
        }
        let denom = half as f32 - freq_shift as f32;
        if denom == 0.0 {
            candle_core::bail!("freq_shift {freq_shift} equals half the embedding width {half}; the frequencies would divide by zero");
        }
        // Each step is rounded to F32 in the same order as torch (`-ln(P)·i`, then `/ denom`, then
        // `exp`), so the phases at t ≈ 1000 agree with diffusers to the last bit where possible.
        let neg_log_period = -(10000f64.ln()) as f32;
        let freqs: Vec<f32> = (0..half).map(|i| ((neg_log_period * i as f32) / denom).exp()).collect();
        let freqs = Tensor::from_vec(freqs, (1, half), device)?;
        Ok(Self { freqs, dim, flip_sin_to_cos })
    }

    /// Embeds `t` (`[n]`, any float or integer dtype) into F32 `[n, dim]`.
    pub fn forward(&self, t: &Tensor) -> Result<Tensor> {
        let n = t.dim(0)?;
        let args = t.to_dtype(DType::F32)?.reshape((n, 1))?.broadcast_mul(&self.freqs)?;
        let (sin, cos) = (args.sin()?, args.cos()?);
        let emb = if self.flip_sin_to_cos { Tensor::cat(&[&cos, &sin], D::Minus1)? } else { Tensor::cat(&[&sin, &cos], D::Minus1)? };
        if self.dim % 2 == 1 {
            // Odd widths are zero-padded on the right, as diffusers does.
            emb.pad_with_zeros(D::Minus1, 0, 1)
        } else {
            Ok(emb)
        }
    }
}

/// SDXL's `add_embedding` inputs: the width of one time-id embedding and of the MLP input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddEmbeddingDims {
    /// Width of each sinusoidal time-id embedding (`addition_time_embed_dim`).
    pub time_dim: usize,
    /// Input width of the MLP: pooled text width + time ids × `time_dim`.
    pub in_dim: usize,
}

#[derive(Debug, Clone)]
struct AddEmbedding {
    time_proj: SinusoidalEmbedding,
    dims: AddEmbeddingDims,
    linear_1: crate::ops::Linear,
    linear_2: crate::ops::Linear,
}

/// A UNet's timestep embedding (`time_proj` → `time_embedding.linear_1/2`) plus SDXL's
/// `text_time` `add_embedding`; the UNet and ControlNets (which copy it) share this one module.
#[derive(Debug, Clone)]
pub struct TimeEmbedding {
    time_proj: SinusoidalEmbedding,
    linear_1: crate::ops::Linear,
    linear_2: crate::ops::Linear,
    add: Option<AddEmbedding>,
    dtype: DType,
}

impl TimeEmbedding {
    /// Loads from `vb` rooted at the model (`time_embedding.*`, `add_embedding.*`); the output width is
    /// `4 × block_out_channels[0]`.
    pub fn new(vb: candle_nn::VarBuilder, cfg: &crate::config::UNetConfig) -> Result<Self> {
        let c0 = cfg.block_out_channels.first().copied().unwrap_or(0);
        let temb_dim = c0 * 4;
        let device = vb.device().clone();
        let time_proj = SinusoidalEmbedding::new(c0, cfg.flip_sin_to_cos, cfg.freq_shift, &device)?;
        let linear_1 = crate::ops::linear(vb.pp("time_embedding.linear_1"), c0, temb_dim, true)?;
        let linear_2 = crate::ops::linear(vb.pp("time_embedding.linear_2"), temb_dim, temb_dim, true)?;
        let add = match (cfg.has_text_time(), cfg.addition_time_embed_dim, cfg.projection_class_embeddings_input_dim) {
            (true, Some(time_dim), Some(in_dim)) => Some(AddEmbedding {
                time_proj: SinusoidalEmbedding::new(time_dim, cfg.flip_sin_to_cos, cfg.freq_shift, &device)?,
                dims: AddEmbeddingDims { time_dim, in_dim },
                linear_1: crate::ops::linear(vb.pp("add_embedding.linear_1"), in_dim, temb_dim, true)?,
                linear_2: crate::ops::linear(vb.pp("add_embedding.linear_2"), temb_dim, temb_dim, true)?,
            }),
            (true, _, _) => candle_core::bail!(
                "addition_embed_type \"text_time\" needs addition_time_embed_dim and projection_class_embeddings_input_dim in the config"
            ),
            (false, _, _) => None,
        };
        Ok(Self { time_proj, linear_1, linear_2, add, dtype: vb.dtype() })
    }

    /// The SDXL add-embedding's input widths, or `None` for models without `text_time`.
    pub fn add_dims(&self) -> Option<AddEmbeddingDims> {
        self.add.as_ref().map(|a| a.dims)
    }

    /// `emb` for `timesteps` `[b]` (on the model's device), with SDXL's `added` conditioning when the
    /// model has an add-embedding; callers validate shapes first.
    pub fn forward(&self, timesteps: &Tensor, added: Option<&super::AddedCond>) -> Result<Tensor> {
        let device = timesteps.device();
        let t_emb = self.time_proj.forward(timesteps)?.to_dtype(self.dtype)?;
        let emb = self.linear_2.forward(&crate::ops::silu(&self.linear_1.forward(&t_emb)?)?)?;
        let (Some(add), Some(added)) = (&self.add, added) else { return Ok(emb) };
        // SDXL's `aug_emb`: embeds each time id, flattens, appends to the pooled text and projects.
        let (b, n_ids) = added.time_ids.dims2()?;
        let ids = added.time_ids.to_device(device)?.flatten_all()?;
        let time_embeds = add.time_proj.forward(&ids)?.reshape((b, n_ids * add.dims.time_dim))?;
        // diffusers concatenates in F32 (the time embeds are F32) and casts the result once.
        let text = added.text_embeds.to_device(device)?.to_dtype(DType::F32)?;
        let add_embeds = Tensor::cat(&[&text, &time_embeds], 1)?.to_dtype(self.dtype)?;
        emb + add.linear_2.forward(&crate::ops::silu(&add.linear_1.forward(&add_embeds)?)?)?
    }
}
