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

/// What `torch.randn(shape, device="cuda")` draws after `torch.manual_seed(seed)` on an NVIDIA GPU,
/// computed on the CPU: A1111's "NV" random source, and its default "GPU" source on NVIDIA cards.
///
/// Each draw of `n` values runs Philox4x32-10 with key = the seed and counter `[draw, 0, i, 0]` for
/// value `i` (the draw number is PyTorch's offset, advanced by one per call as A1111's generator does),
/// and keeps the first Box–Muller value of the first two words, computed as A1111's NumPy
/// implementation does (double precision from the single-precision constants). Reference: the
/// expected output in the docstring of A1111's `modules/rng_philox.py`
/// (<https://github.com/AUTOMATIC1111/stable-diffusion-webui/blob/master/modules/rng_philox.py>), the
/// values `torch.randn(3, 4, device="cuda")` gives after `torch.manual_seed(0)`: matched to within a few
/// float ulps (the GPU computes Box–Muller in single precision).
#[derive(Debug, Clone)]
pub struct CudaPhiloxNoise {
    key: [u32; 2],
    offset: u32,
}

impl CudaPhiloxNoise {
    /// The generator of `seed`, before its first draw.
    pub fn new(seed: u64) -> Self {
        Self { key: [seed as u32, (seed >> 32) as u32], offset: 0 }
    }

    /// One draw of `n` standard normals.
    pub fn normals(&mut self, n: usize) -> Vec<f32> {
        // The single-precision constants A1111 uses, widened as NumPy widens them.
        let inv = f64::from(2.3283064e-10f64 as f32);
        let inv_2pi = f64::from((2.3283064e-10f64 * 6.2831855f64) as f32);
        let offset = self.offset;
        self.offset = self.offset.wrapping_add(1);
        (0..n)
            .map(|i| {
                let [x, y, _, _] = philox4x32_10([offset, 0, i as u32, 0], self.key);
                let u = f64::from(x) * inv + inv / 2.0;
                let v = f64::from(y) * inv_2pi + inv_2pi / 2.0;
                ((-2.0 * u.ln()).sqrt() * v.sin()) as f32
            })
            .collect()
    }
}

impl NoiseSource for CudaPhiloxNoise {
    fn randn(&mut self, shape: &Shape, dtype: DType, device: &Device) -> Result<Tensor> {
        let data = self.normals(shape.elem_count());
        Ok(Tensor::from_vec(data, shape.clone(), &Device::Cpu)?.to_dtype(dtype)?.to_device(device)?)
    }
}

/// A1111's per-image noise: image `i` of a batch draws from its own generator seeded `seed + i` (and,
/// with a variation seed, mixes in the first draw of `subseed + i`); after the initial latents, the
/// generators are re-seeded with `seed + i + eta_noise_seed_delta` when that setting is not 0. A draw
/// whose first dimension is not the batch (an img2img encoder sample) comes from the first image's
/// generator.
pub struct PerImageNoise {
    make: fn(u64) -> Box<dyn NoiseSource>,
    seeds: Vec<u64>,
    generators: Vec<Box<dyn NoiseSource>>,
    variation: Option<(Vec<u64>, f32)>,
    eta_noise_seed_delta: u64,
    /// A1111's "resize seed from" in pixels (height, width).
    seed_resize: Option<(usize, usize)>,
    drawn_first: bool,
}

impl std::fmt::Debug for PerImageNoise {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PerImageNoise").field("seeds", &self.seeds).field("variation", &self.variation).field("eta_noise_seed_delta", &self.eta_noise_seed_delta).finish()
    }
}

impl PerImageNoise {
    /// Generators made by `make` for `seed, seed + 1, …` (`batch` of them).
    pub fn new(make: fn(u64) -> Box<dyn NoiseSource>, seed: u64, batch: usize) -> Self {
        let seeds: Vec<u64> = (0..batch.max(1) as u64).map(|i| seed.wrapping_add(i)).collect();
        let generators = seeds.iter().map(|&s| make(s)).collect();
        Self { make, seeds, generators, variation: None, eta_noise_seed_delta: 0, seed_resize: None, drawn_first: false }
    }

    /// A variation seed (`subseed + i` per image) mixed into the initial latents by spherical
    /// interpolation at `strength` (A1111's `subseed_strength`; 0 leaves the seed's noise).
    pub fn with_variation(mut self, subseed: u64, strength: f32) -> Self {
        if strength != 0.0 {
            let subseeds = (0..self.seeds.len() as u64).map(|i| subseed.wrapping_add(i)).collect();
            self.variation = Some((subseeds, strength));
        }
        self
    }

    /// A1111's `eta_noise_seed_delta` (ENSD): what the sampler's noise after the initial latents is
    /// seeded with, on top of each image's seed.
    pub fn with_eta_noise_seed_delta(mut self, delta: u64) -> Self {
        self.eta_noise_seed_delta = delta;
        self
    }

    /// A1111's "resize seed from" (`seed_resize_from_h/w`, in pixels): the initial noise is the seed's at the
    /// size it was found at (`from / 8` latent pixels), pasted centred into the image's noise at the new size,
    /// so a seed keeps its composition across sizes.
    pub fn with_seed_resize(mut self, height: usize, width: usize) -> Self {
        self.seed_resize = (height > 0 && width > 0).then_some((height, width));
        self
    }

    fn first(&mut self, row: &Shape, dtype: DType, device: &Device) -> Result<Tensor> {
        let dims = row.dims().to_vec();
        // A1111 divides by 8 (the SD VAE factor) whatever the model.
        let small: Option<Shape> = match (self.seed_resize, dims.as_slice()) {
            (Some((h, w)), [c, rh, rw]) if (h / 8, w / 8) != (*rh, *rw) && h >= 8 && w >= 8 => Some((*c, h / 8, w / 8).into()),
            _ => None,
        };
        let mut rows = Vec::with_capacity(self.generators.len());
        for (i, g) in self.generators.iter_mut().enumerate() {
            let shape = small.as_ref().unwrap_or(row);
            // At another size the seed's noise comes from a fresh generator; the image's own still draws the
            // full size (what its later draws follow), as A1111's `ImageRNG.first`.
            let noise = match small {
                Some(_) => (self.make)(self.seeds[i]).randn(shape, DType::F32, &Device::Cpu)?,
                None => g.randn(row, DType::F32, &Device::Cpu)?,
            };
            let noise = match &self.variation {
                Some((subseeds, strength)) => {
                    let sub = (self.make)(subseeds[i]).randn(shape, DType::F32, &Device::Cpu)?;
                    slerp(*strength, &noise, &sub)?
                }
                None => noise,
            };
            let noise = match small {
                Some(_) => paste_centred(&g.randn(row, DType::F32, &Device::Cpu)?, &noise)?,
                None => noise,
            };
            rows.push(noise);
        }
        if self.eta_noise_seed_delta != 0 {
            self.generators = self.seeds.iter().map(|&s| (self.make)(s.wrapping_add(self.eta_noise_seed_delta))).collect();
        }
        Ok(Tensor::stack(&rows, 0)?.to_dtype(dtype)?.to_device(device)?)
    }
}

impl NoiseSource for PerImageNoise {
    fn randn(&mut self, shape: &Shape, dtype: DType, device: &Device) -> Result<Tensor> {
        let dims = shape.dims();
        if dims.first() != Some(&self.generators.len()) {
            return self.generators[0].randn(shape, dtype, device);
        }
        let row: Shape = dims[1..].to_vec().into();
        if !self.drawn_first {
            self.drawn_first = true;
            return self.first(&row, dtype, device);
        }
        let rows = self.generators.iter_mut().map(|g| g.randn(&row, DType::F32, &Device::Cpu)).collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&rows, 0)?.to_dtype(dtype)?.to_device(device)?)
    }
}

/// `noise` `[c, h, w]` pasted centred into `x` `[c, H, W]` (cropped where larger), with A1111's rounding
/// (Python's floor division).
fn paste_centred(x: &Tensor, noise: &Tensor) -> Result<Tensor> {
    let (_, big_h, big_w) = x.dims3()?;
    let (_, h, w) = noise.dims3()?;
    let span = |big: usize, small: usize| -> (usize, usize, usize) {
        // (target start, source start, length)
        let d = (big as i64 - small as i64).div_euclid(2);
        let len = if d >= 0 { small as i64 } else { small as i64 + 2 * d };
        let (to, from) = if d >= 0 { (d, 0) } else { (0, -d) };
        (to as usize, from as usize, len.max(0) as usize)
    };
    let (ty, dy, ph) = span(big_h, h);
    let (tx, dx, pw) = span(big_w, w);
    if ph == 0 || pw == 0 {
        return Ok(x.clone());
    }
    let part = noise.narrow(1, dy, ph)?.narrow(2, dx, pw)?;
    Ok(x.slice_assign(&[0..x.dim(0)?, ty..ty + ph, tx..tx + pw], &part.contiguous()?)?)
}

/// A1111's `slerp(val, low, high)` on one image's noise `[c, h, w]`: norms and dot products over the
/// second axis, the linear blend (with A1111's weights) when the two are nearly parallel.
fn slerp(val: f32, low: &Tensor, high: &Tensor) -> Result<Tensor> {
    let low_norm = low.broadcast_div(&low.sqr()?.sum_keepdim(1)?.sqrt()?)?;
    let high_norm = high.broadcast_div(&high.sqr()?.sum_keepdim(1)?.sqrt()?)?;
    let dot = (low_norm * high_norm)?.sum(1)?;
    if dot.mean_all()?.to_scalar::<f32>()? > 0.9995 {
        return Ok(((low * f64::from(val))? + (high * f64::from(1.0 - val))?)?);
    }
    let omega = dot.to_vec2::<f32>()?;
    let (a, b): (Vec<f32>, Vec<f32>) = omega
        .iter()
        .flatten()
        .map(|&d| {
            let o = d.clamp(-1.0, 1.0).acos();
            let so = o.sin();
            (((1.0 - val) * o).sin() / so, (val * o).sin() / so)
        })
        .unzip();
    let (c, w) = (omega.len(), omega.first().map_or(0, Vec::len));
    let a = Tensor::from_vec(a, (c, 1, w), low.device())?;
    let b = Tensor::from_vec(b, (c, 1, w), low.device())?;
    Ok((low.broadcast_mul(&a)? + high.broadcast_mul(&b)?)?)
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
    fn cuda_philox_noise_matches_a1111s_published_values() {
        // The expected output in the docstring of A1111's modules/rng_philox.py
        // (https://github.com/AUTOMATIC1111/stable-diffusion-webui/blob/master/modules/rng_philox.py) for
        // `Generator(seed=0).randn(shape=(3, 4))` — also what torch.randn(3, 4, device="cuda") gives after
        // torch.manual_seed(0).
        let want = [
            -0.92466259, -0.42534415, -2.6438457, 0.14518388, -0.12086647, -0.57972564, -0.62285122, -0.32838709, -1.07454231,
            -0.36314407, -1.67105067, 2.26550497,
        ];
        // The published values are the GPU's single-precision Box–Muller; A1111's NumPy code (which this
        // follows) computes it in double precision, and the two differ by a few float ulps (≤ 3e-7 here).
        let got = CudaPhiloxNoise::new(0).normals(12);
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((f64::from(*g) - w).abs() < 5e-7, "value {i}: {g} vs {w}");
        }
        // Each draw is a new offset: the second draw is not the first again.
        let mut g = CudaPhiloxNoise::new(0);
        let first = g.normals(4);
        assert_ne!(g.normals(4), first);
    }

    #[test]
    fn per_image_noise_seeds_each_image_and_reseeds_after_the_first_draw_with_ensd() {
        let shape: Shape = (2, 4, 3, 3).into();
        let row: Shape = (4, 3, 3).into();
        let one = |seed: u64, draws: usize| {
            let mut g = CudaPhiloxNoise::new(seed);
            (0..draws).map(|_| g.randn(&row, DType::F32, &Device::Cpu)).collect::<Result<Vec<_>>>().expect("draws")
        };
        let diff = |a: &Tensor, b: &Tensor| (a - b).and_then(|d| d.abs()).and_then(|d| d.flatten_all()).and_then(|d| d.max(0)).and_then(|d| d.to_scalar::<f32>()).expect("diff");
        let make: fn(u64) -> Box<dyn NoiseSource> = |s| Box::new(CudaPhiloxNoise::new(s));
        let mut n = PerImageNoise::new(make, 10, 2);
        let a = n.randn(&shape, DType::F32, &Device::Cpu).expect("first");
        let b = n.randn(&shape, DType::F32, &Device::Cpu).expect("second");
        let (s10, s11) = (one(10, 2), one(11, 2));
        assert_eq!(diff(&a.get(0).expect("row"), &s10[0]), 0.0);
        assert_eq!(diff(&a.get(1).expect("row"), &s11[0]), 0.0);
        assert_eq!(diff(&b.get(1).expect("row"), &s11[1]), 0.0, "the sampler's noise continues each image's stream");
        // ENSD: after the initial latents each image draws from seed + i + delta.
        let mut n = PerImageNoise::new(make, 10, 2).with_eta_noise_seed_delta(31337);
        let a2 = n.randn(&shape, DType::F32, &Device::Cpu).expect("first");
        let b2 = n.randn(&shape, DType::F32, &Device::Cpu).expect("second");
        assert_eq!(diff(&a2, &a), 0.0);
        assert_eq!(diff(&b2.get(0).expect("row"), &one(10 + 31337, 1)[0]), 0.0);
        // A variation seed at strength 1 gives the subseed's noise; at 0 the seed's.
        let mut v = PerImageNoise::new(make, 10, 2).with_variation(500, 1.0);
        let full = v.randn(&shape, DType::F32, &Device::Cpu).expect("variation");
        assert!(diff(&full.get(1).expect("row"), &one(501, 1)[0]) < 1e-5);
        let mut v = PerImageNoise::new(make, 10, 2).with_variation(500, 0.0);
        assert_eq!(diff(&v.randn(&shape, DType::F32, &Device::Cpu).expect("none"), &a), 0.0);
        let mut v = PerImageNoise::new(make, 10, 2).with_variation(500, 0.3);
        let mid = v.randn(&shape, DType::F32, &Device::Cpu).expect("mix");
        assert!(diff(&mid, &a) > 1e-3 && diff(&mid, &full) > 1e-3);
    }

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

    #[test]
    fn seed_resize_pastes_the_seeds_noise_as_a1111() {
        // tools/seed_resize_goldens.py: A1111's ImageRNG.first written out, torch's CPU generator.
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/goldens/seed_resize.safetensors");
        let g = candle_core::safetensors::load(path, &Device::Cpu).expect("goldens");
        let make: fn(u64) -> Box<dyn NoiseSource> = |s| Box::new(TorchCpuNoise::new(s));
        for name in ["smaller", "larger", "odd", "variation", "same"] {
            let args: Vec<i64> = g[&format!("{name}.args")].to_vec1().expect("args");
            let strength: Vec<f32> = g[&format!("{name}.strength")].to_vec1().expect("strength");
            let mut n = PerImageNoise::new(make, args[0] as u64, 1).with_seed_resize(args[1] as usize, args[2] as usize);
            if args[3] >= 0 {
                n = n.with_variation(args[3] as u64, strength[0]);
            }
            let shape: Shape = (1, 4, 8, 8).into();
            let first = n.randn(&shape, DType::F32, &Device::Cpu).expect("first").squeeze(0).expect("squeeze");
            let next = n.randn(&shape, DType::F32, &Device::Cpu).expect("next").squeeze(0).expect("squeeze");
            for (what, ours, want) in [("first", first, &g[&format!("{name}.first")]), ("next", next, &g[&format!("{name}.next")])] {
                let d = (ours - want).and_then(|d| d.abs()).and_then(|d| d.flatten_all()).and_then(|d| d.max(0)).and_then(|d| d.to_scalar::<f32>()).expect("diff");
                assert!(d < 1e-5, "{name} {what}: max diff {d}");
            }
        }
    }
}
