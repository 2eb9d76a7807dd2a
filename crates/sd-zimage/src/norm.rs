//! The small building blocks both models share: RMSNorm computed in F32 (as diffusers' and
//! transformers' RMSNorms upcast), a LayerNorm without affine parameters, and rotary tables.

use candle_core::{DType, Device, Result, Tensor, D};

/// RMSNorm with a learned scale, computed in F32 (shared with the Qwen3 encoder in sd-models).
pub use sd_models::qwen3::RmsNorm;

/// LayerNorm over the last dimension without scale or bias, in F32, returned in the input dtype.
pub fn layer_norm_plain(x: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let mean = xf.mean_keepdim(D::Minus1)?;
    let centered = xf.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    centered.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)
}

/// cos/sin tables `[rows, Σ axes/2]` (F32) of multi-axis rotary positions, as diffusers' Z-Image
/// `RopeEmbedder`: per axis `freqs = 1 / theta^(2i/d)` and `angle = pos · freq` in f64, rounded to f32
/// before the cos/sin.
pub fn rope_tables(positions: &[[u32; 3]], axes: &[usize], theta: f64, device: &Device) -> Result<(Tensor, Tensor)> {
    let half: usize = axes.iter().map(|a| a / 2).sum();
    let mut cos = Vec::with_capacity(positions.len() * half);
    let mut sin = Vec::with_capacity(positions.len() * half);
    let freqs: Vec<Vec<f64>> =
        axes.iter().map(|&d| (0..d).step_by(2).map(|i| 1.0 / theta.powf(i as f64 / d as f64)).collect()).collect();
    for p in positions {
        for (axis, f) in freqs.iter().enumerate() {
            let pos = p[axis] as f64;
            for fr in f {
                let angle = (pos * fr) as f32;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
    }
    let n = positions.len();
    Ok((Tensor::from_vec(cos, (n, half), device)?, Tensor::from_vec(sin, (n, half), device)?))
}
