//! Sinusoidal embeddings of timesteps and of SDXL's size/crop ids.

use candle_core::{DType, Device, Result, Tensor, D};

/// diffusers' `Timesteps` module (`get_timestep_embedding` with `max_period` 10000).
///
/// The frequencies are computed once, at load time, and always in F32 because diffusers computes
/// the embedding in F32 whatever the model dtype is; a half-precision `t · freq` near t = 1000
/// would lose the phase entirely.
#[derive(Debug, Clone)]
pub(crate) struct SinusoidalEmbedding {
    /// `[1, dim / 2]` F32 frequencies.
    freqs: Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
}

impl SinusoidalEmbedding {
    /// Builds the embedding of width `dim`.
    pub(crate) fn new(dim: usize, flip_sin_to_cos: bool, freq_shift: f64, device: &Device) -> Result<Self> {
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
    pub(crate) fn forward(&self, t: &Tensor) -> Result<Tensor> {
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
