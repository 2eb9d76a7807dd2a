//! Where stochastic samplers (and pipelines) get their Gaussian noise from.
//!
//! [`SeededNoise`] draws on the CPU with a counter-based generator (Philox4x32-10) and moves
//! the result to the requested device, so one seed gives the same image on every device and
//! platform. [`TorchCpuNoise`] reproduces PyTorch's CPU generator instead, to match diffusers
//! runs seeded with `torch.Generator().manual_seed(seed)`. Tests inject exact noise tensors with
//! [`NoiseQueue`].

use std::collections::VecDeque;

use candle_core::{DType, Device, Shape, Tensor};

use crate::error::{Error, Result};

/// A source of standard-normal noise tensors.
pub trait NoiseSource {
    /// Draws a tensor of independent N(0, 1) values.
    fn randn(&mut self, shape: &Shape, dtype: DType, device: &Device) -> Result<Tensor>;
}

impl<F> NoiseSource for F
where
    F: FnMut(&Shape, DType, &Device) -> Result<Tensor>,
{
    fn randn(&mut self, shape: &Shape, dtype: DType, device: &Device) -> Result<Tensor> {
        self(shape, dtype, device)
    }
}

/// Seeded, platform-independent Gaussian noise (Philox4x32-10 + Box–Muller, drawn on the CPU).
///
/// Successive draws continue one stream, so a pipeline that draws its initial latents and then
/// every sampler step from the same `SeededNoise` is fully determined by the seed.
#[derive(Debug, Clone)]
pub struct SeededNoise {
    key: [u32; 2],
    counter: u128,
}

impl SeededNoise {
    /// Starts the stream of `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            key: [seed as u32, (seed >> 32) as u32],
            counter: 0,
        }
    }

    /// Draws `n` standard normals as f32.
    pub fn normals(&mut self, n: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(n + 3);
        while out.len() < n {
            let block = self.next_block();
            for pair in block.chunks_exact(2) {
                // (x + 0.5) / 2^32 lies strictly inside (0, 1), so ln never sees 0.
                let u1 = (pair[0] as f64 + 0.5) / 4_294_967_296.0;
                let u2 = (pair[1] as f64 + 0.5) / 4_294_967_296.0;
                let r = (-2.0 * u1.ln()).sqrt();
                let theta = std::f64::consts::TAU * u2;
                out.push((r * theta.cos()) as f32);
                out.push((r * theta.sin()) as f32);
            }
        }
        out.truncate(n);
        out
    }

    fn next_block(&mut self) -> [u32; 4] {
        let c = self.counter;
        self.counter = self.counter.wrapping_add(1);
        philox4x32_10(
            [
                c as u32,
                (c >> 32) as u32,
                (c >> 64) as u32,
                (c >> 96) as u32,
            ],
            self.key,
        )
    }
}

impl NoiseSource for SeededNoise {
    fn randn(&mut self, shape: &Shape, dtype: DType, device: &Device) -> Result<Tensor> {
        let data = self.normals(shape.elem_count());
        Ok(Tensor::from_vec(data, shape.clone(), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?)
    }
}

/// Gaussian noise identical (to float rounding) to PyTorch's CPU generator:
/// `torch.randn(shape, generator=torch.Generator().manual_seed(seed))`.
///
/// Use it to reproduce a diffusers run that passed a CPU `torch.Generator`: the same seed gives
/// the same initial latents and the same sampler noise. It follows ATen's `normal_fill`
/// (mt19937, 24-bit uniforms, Box–Muller over blocks of 16) and, for tensors of fewer than 16
/// values, its double-precision `normal_distribution` with the cached second sample.
#[derive(Debug, Clone)]
pub struct TorchCpuNoise {
    mt: Mt19937,
    next_double: Option<f64>,
}

impl TorchCpuNoise {
    /// The state of `torch.Generator().manual_seed(seed)`.
    pub fn new(seed: u64) -> Self {
        Self {
            mt: Mt19937::new(seed),
            next_double: None,
        }
    }

    /// Draws `n` values like `torch.randn(n, dtype=torch.float32, generator=…)`.
    pub fn normals(&mut self, n: usize) -> Vec<f32> {
        if n < 16 {
            return (0..n).map(|_| self.normal_f64() as f32).collect();
        }
        let mut data: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        for i in (0..n - 15).step_by(16) {
            box_muller_16(&mut data[i..i + 16]);
        }
        if n % 16 != 0 {
            // ATen redraws and transforms the last 16 values when n is not a multiple of 16.
            let tail = &mut data[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            box_muller_16(tail);
        }
        data
    }

    fn uniform_f32(&mut self) -> f32 {
        ((self.mt.next_u32() & 0x00ff_ffff) as f64 / 16_777_216.0) as f32
    }

    fn uniform_f64(&mut self) -> f64 {
        let hi = self.mt.next_u32() as u64;
        let lo = self.mt.next_u32() as u64;
        (((hi << 32) | lo) & ((1u64 << 53) - 1)) as f64 / 9_007_199_254_740_992.0
    }

    fn normal_f64(&mut self) -> f64 {
        if let Some(v) = self.next_double.take() {
            return v;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = std::f64::consts::TAU * u1;
        self.next_double = Some(r * theta.sin());
        r * theta.cos()
    }
}

impl NoiseSource for TorchCpuNoise {
    fn randn(&mut self, shape: &Shape, dtype: DType, device: &Device) -> Result<Tensor> {
        let data = self.normals(shape.elem_count());
        Ok(Tensor::from_vec(data, shape.clone(), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?)
    }
}

/// ATen's `NormalFill16`: uniforms in `d` become 16 standard normals, in place.
fn box_muller_16(d: &mut [f32]) {
    for j in 0..8 {
        let u1 = 1.0f32 - d[j];
        let u2 = d[j + 8];
        let radius = (-2.0f32 * u1.ln()).sqrt();
        let theta = (std::f64::consts::TAU * u2 as f64) as f32;
        d[j] = radius * theta.cos();
        d[j + 8] = radius * theta.sin();
    }
}

/// The 32-bit Mersenne Twister as seeded by PyTorch (`init_genrand` with the low 32 seed bits).
#[derive(Clone)]
struct Mt19937 {
    state: Box<[u32; 624]>,
    index: usize,
}

impl std::fmt::Debug for Mt19937 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mt19937")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl Mt19937 {
    fn new(seed: u64) -> Self {
        let mut state = Box::new([0u32; 624]);
        state[0] = seed as u32;
        for i in 1..624 {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Self { state, index: 624 }
    }

    fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    fn twist(&mut self) {
        for i in 0..624 {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % 624] & 0x7fff_ffff);
            let mut v = self.state[(i + 397) % 624] ^ (y >> 1);
            if y & 1 != 0 {
                v ^= 0x9908_b0df;
            }
            self.state[i] = v;
        }
        self.index = 0;
    }
}

/// One Philox4x32 block with 10 rounds (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3").
fn philox4x32_10(mut ctr: [u32; 4], mut key: [u32; 2]) -> [u32; 4] {
    const M0: u64 = 0xD251_1F53;
    const M1: u64 = 0xCD9E_8D57;
    const W0: u32 = 0x9E37_79B9;
    const W1: u32 = 0xBB67_AE85;
    for round in 0..10 {
        if round > 0 {
            key[0] = key[0].wrapping_add(W0);
            key[1] = key[1].wrapping_add(W1);
        }
        let p0 = M0 * ctr[0] as u64;
        let p1 = M1 * ctr[2] as u64;
        ctr = [
            ((p1 >> 32) as u32) ^ ctr[1] ^ key[0],
            p1 as u32,
            ((p0 >> 32) as u32) ^ ctr[3] ^ key[1],
            p0 as u32,
        ];
    }
    ctr
}

/// Prepared noise tensors handed out in order (e.g. the exact draws of a reference run).
#[derive(Debug, Clone, Default)]
pub struct NoiseQueue {
    queue: VecDeque<Tensor>,
}

impl NoiseQueue {
    /// A queue holding `tensors`, first drawn first.
    pub fn new(tensors: impl IntoIterator<Item = Tensor>) -> Self {
        Self {
            queue: tensors.into_iter().collect(),
        }
    }

    /// How many tensors are left.
    pub fn remaining(&self) -> usize {
        self.queue.len()
    }
}

impl NoiseSource for NoiseQueue {
    fn randn(&mut self, shape: &Shape, dtype: DType, device: &Device) -> Result<Tensor> {
        let t = self.queue.pop_front().ok_or_else(|| Error::NoiseQueue {
            reason: "no tensor left".into(),
        })?;
        if t.shape() != shape {
            return Err(Error::NoiseQueue {
                reason: format!("next tensor has shape {:?}, wanted {:?}", t.shape(), shape),
            });
        }
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }
}

/// A noise source for deterministic samplers: asking it for noise is an error.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoNoise;

impl NoiseSource for NoNoise {
    fn randn(&mut self, _shape: &Shape, _dtype: DType, _device: &Device) -> Result<Tensor> {
        Err(Error::NoiseRequired {
            scheduler: "this sampler",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_known_answer() {
        // The 10000th output of std::mt19937 seeded with 5489 (C++ [rand.predef]).
        let mut mt = Mt19937::new(5489);
        let v = (0..10_000).map(|_| mt.next_u32()).last();
        assert_eq!(v, Some(4_123_659_995));
    }

    #[test]
    fn philox_known_answer() {
        // Random123 known-answer vectors for philox4x32_10.
        assert_eq!(
            philox4x32_10([0, 0, 0, 0], [0, 0]),
            [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]
        );
        assert_eq!(
            philox4x32_10([0xffff_ffff; 4], [0xffff_ffff; 2]),
            [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
                [0xa409_3822, 0x299f_31d0]
            ),
            [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1]
        );
    }

    #[test]
    fn seeded_noise_is_standard_normal_and_repeatable() {
        let a = SeededNoise::new(42).normals(20_000);
        let b = SeededNoise::new(42).normals(20_000);
        assert_eq!(a, b);
        let c = SeededNoise::new(43).normals(16);
        assert_ne!(&a[..16], &c[..]);
        let n = a.len() as f64;
        let mean = a.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "var {var}");
    }

    #[test]
    fn draws_continue_the_stream() {
        let mut s = SeededNoise::new(7);
        let first = s.normals(5);
        let second = s.normals(5);
        let all = SeededNoise::new(7).normals(13);
        assert_eq!(&first[..], &all[..5]);
        // A draw consumes whole 4-value blocks, so the second draw starts at value 8.
        assert_eq!(&second[..], &all[8..13]);
    }
}
