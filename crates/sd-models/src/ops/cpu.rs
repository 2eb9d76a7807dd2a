//! Instruction-set dispatch and the vector math the CPU kernels share (exp, softmax rows, SiLU).
//!
//! Every kernel picks its path once from [`cpu_path`]: AVX2+FMA where the CPU has it (also on
//! AVX-512 machines, so the speed we report is the one every x86-64 of the last decade gets), a
//! plain scalar loop otherwise. `SD_CPU_PATH=scalar` forces the scalar loops (to compare or to rule
//! the SIMD code out when hunting a wrong pixel); `SD_CPU_PATH=avx2` is the default where supported.
//! GEMMs go through the `gemm` crate, which dispatches on its own (AVX2/FMA kernels on x86-64).

use std::sync::OnceLock;

/// The instruction-set path the CPU kernels of this module run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuPath {
    /// 256-bit AVX2 with fused multiply-add.
    Avx2,
    /// Portable scalar Rust (any CPU, or forced with `SD_CPU_PATH=scalar`).
    Scalar,
}

impl CpuPath {
    /// A short name for logs and benchmark tables.
    pub fn name(self) -> &'static str {
        match self {
            CpuPath::Avx2 => "avx2+fma",
            CpuPath::Scalar => "scalar",
        }
    }
}

/// The path chosen for this process: detected once, honouring `SD_CPU_PATH` (`avx2` or `scalar`).
pub fn cpu_path() -> CpuPath {
    static PATH: OnceLock<CpuPath> = OnceLock::new();
    *PATH.get_or_init(|| {
        let forced = std::env::var("SD_CPU_PATH").ok().map(|s| s.trim().to_ascii_lowercase());
        if forced.as_deref() == Some("scalar") {
            return CpuPath::Scalar;
        }
        if has_avx2_fma() {
            CpuPath::Avx2
        } else {
            CpuPath::Scalar
        }
    })
}

fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The vector extensions this CPU reports (whether or not a kernel uses them), for benchmark output.
pub fn cpu_features() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        let mut f = Vec::new();
        macro_rules! probe {
            ($($name:tt),*) => {$(if std::arch::is_x86_feature_detected!($name) { f.push($name); })*};
        }
        probe!("avx2", "fma", "f16c", "avx512f", "avx512bf16", "avx512fp16");
        f.join(" ")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        std::env::consts::ARCH.to_string()
    }
}

/// Sets `row[i] = exp(row[i] − max)` and returns the sum: the middle of a numerically stable softmax.
pub fn exp_sub_sum(row: &mut [f32], max: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if cpu_path() == CpuPath::Avx2 {
        // SAFETY: `cpu_path` returns Avx2 only after detecting AVX2 and FMA.
        return unsafe { avx2::exp_sub_sum(row, max) };
    }
    let mut sum = 0f32;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    sum
}

/// The largest element (−∞ for an empty slice; NaN-free input assumed, as in a softmax).
pub fn max(row: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if cpu_path() == CpuPath::Avx2 {
        // SAFETY: see `exp_sub_sum`.
        return unsafe { avx2::max(row) };
    }
    row.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// `dst[i] = y · sigmoid(y)` with `y = src[i]·scale + shift` (GroupNorm's affine step fused with SiLU
/// when `silu`, the affine step alone otherwise).
pub fn affine_silu(dst: &mut [f32], src: &[f32], scale: f32, shift: f32, silu: bool) {
    #[cfg(target_arch = "x86_64")]
    if cpu_path() == CpuPath::Avx2 {
        // SAFETY: see `exp_sub_sum`.
        unsafe { avx2::affine_silu(dst, src, scale, shift, silu) };
        return;
    }
    for (o, &i) in dst.iter_mut().zip(src) {
        let y = i * scale + shift;
        *o = if silu { y / (1.0 + (-y).exp()) } else { y };
    }
}

/// GEGLU's product `out[i] = h[i] · gelu_erf(g[i])` with the erf of [`erf`] (f64 inside, so the
/// vector and scalar paths agree with libm's `erff` to 3e-7).
pub fn geglu(out: &mut [f32], h: &[f32], g: &[f32]) {
    let n = out.len().min(h.len()).min(g.len());
    // SAFETY: see `exp_sub_sum`.
    #[cfg(target_arch = "x86_64")]
    let start = if cpu_path() == CpuPath::Avx2 { unsafe { avx2::geglu(&mut out[..n], &h[..n], &g[..n]) } } else { 0 };
    #[cfg(not(target_arch = "x86_64"))]
    let start = 0;
    for i in start..n {
        out[i] = h[i] * 0.5 * g[i] * (1.0 + erf(g[i] * std::f32::consts::FRAC_1_SQRT_2));
    }
}

/// The Numerical Recipes coefficients of erfc's Chebyshev fit (relative error < 1.2e-7), lowest first.
const ERFC_FIT: [f64; 10] = [
    -1.265_512_23, 1.000_023_68, 0.374_091_96, 0.096_784_18, -0.186_288_06, 0.278_868_07, -1.135_203_98, 1.488_515_87,
    -0.822_152_23, 0.170_872_77,
];

/// erf through the Numerical Recipes Chebyshev fit of erfc, evaluated in f64 so the result is within
/// 3e-7 of libm's `erff` while staying branch-light inside fused loops.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs() as f64;
    let t = 1.0 / (1.0 + 0.5 * a);
    let poly = ERFC_FIT[1..].iter().rev().fold(0.0, |acc, &c| acc * t + c);
    let y = 1.0 - t * (-a * a + ERFC_FIT[0] + t * poly).exp();
    (if x < 0.0 { -y } else { y }) as f32
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// exp of 8 lanes: range reduction by ln 2 (two-constant Cody–Waite), a degree-6 polynomial on
    /// [−ln2/2, ln2/2], scaling by 2ⁿ through the exponent bits. Relative error ≤ 2 ulp over the f32
    /// range; inputs below −87.3 give 0 and above 88.7 give +∞, as `f32::exp`; NaN stays NaN.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub fn exp8(x: __m256) -> __m256 {
        let hi = _mm256_set1_ps(88.722_84);
        let lo = _mm256_set1_ps(-87.336_55);
        let under = _mm256_cmp_ps::<_CMP_LT_OQ>(x, lo);
        let over = _mm256_cmp_ps::<_CMP_GT_OQ>(x, hi);
        let xc = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
            xc,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_145_75), xc);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.398_199_9e-3));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.333_452e-3));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.166_579_6e-2));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.166_666_66));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5));
        p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0)));
        // 2ⁿ split in two factors so n = 128 (x near the top of the range) does not overflow the
        // exponent field before the final multiply.
        let ni = _mm256_cvtps_epi32(n);
        let half = _mm256_srai_epi32::<1>(ni);
        let pow = |e: __m256i| _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(e, _mm256_set1_epi32(127))));
        let y = _mm256_mul_ps(_mm256_mul_ps(p, pow(half)), pow(_mm256_sub_epi32(ni, half)));
        let y = _mm256_blendv_ps(y, _mm256_setzero_ps(), under);
        let y = _mm256_blendv_ps(y, _mm256_set1_ps(f32::INFINITY), over);
        // NaN in, NaN out (the clamp above would have turned it into a number).
        _mm256_blendv_ps(y, x, _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x))
    }

    /// exp of 4 f64 lanes to ~1e-15 relative: reduction by ln 2 (fdlibm's hi/lo split, given as bits so
    /// n·hi is exact), Taylor to r¹¹ on
    /// |r| ≤ ln2/2, 2ⁿ through the exponent bits. Inputs are clamped to [−700, 700] (callers here
    /// pass erfc's exponent, which lies in [−∞, 0]).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp4d(x: __m256d) -> __m256d {
        let x = _mm256_min_pd(_mm256_max_pd(x, _mm256_set1_pd(-700.0)), _mm256_set1_pd(700.0));
        let n = _mm256_round_pd::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_pd(
            x,
            _mm256_set1_pd(std::f64::consts::LOG2_E),
        ));
        let r = _mm256_fnmadd_pd(n, _mm256_set1_pd(f64::from_bits(0x3fe6_2e42_fee0_0000)), x);
        let r = _mm256_fnmadd_pd(n, _mm256_set1_pd(f64::from_bits(0x3dea_39ef_3579_3c76)), r);
        let mut p = _mm256_set1_pd(1.0 / 39_916_800.0);
        for c in [3_628_800.0, 362_880.0, 40_320.0, 5_040.0, 720.0, 120.0, 24.0, 6.0, 2.0, 1.0, 1.0] {
            p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(1.0 / c));
        }
        let e = _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_cvtpd_epi32(n)), _mm256_set1_epi64x(1023));
        _mm256_mul_pd(p, _mm256_castsi256_pd(_mm256_slli_epi64::<52>(e)))
    }

    /// The vector part of [`super::geglu`]; returns how many leading elements it wrote.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn geglu(out: &mut [f32], h: &[f32], g: &[f32]) -> usize {
        let n = out.len();
        let sign = _mm256_set1_pd(-0.0);
        let one = _mm256_set1_pd(1.0);
        let mut i = 0;
        while i + 4 <= n {
            let gv = _mm256_cvtps_pd(_mm_loadu_ps(g.as_ptr().add(i)));
            let x = _mm256_mul_pd(gv, _mm256_set1_pd(std::f64::consts::FRAC_1_SQRT_2));
            let a = _mm256_andnot_pd(sign, x);
            let t = _mm256_div_pd(one, _mm256_fmadd_pd(a, _mm256_set1_pd(0.5), one));
            let mut poly = _mm256_setzero_pd();
            for &c in super::ERFC_FIT[1..].iter().rev() {
                poly = _mm256_fmadd_pd(poly, t, _mm256_set1_pd(c));
            }
            let arg = _mm256_fmadd_pd(t, poly, _mm256_sub_pd(_mm256_set1_pd(super::ERFC_FIT[0]), _mm256_mul_pd(a, a)));
            let y = _mm256_fnmadd_pd(t, exp4d(arg), one);
            let erf = _mm256_or_pd(y, _mm256_and_pd(x, sign));
            let res = _mm256_mul_pd(
                _mm256_mul_pd(_mm256_cvtps_pd(_mm_loadu_ps(h.as_ptr().add(i))), _mm256_mul_pd(gv, _mm256_set1_pd(0.5))),
                _mm256_add_pd(one, erf),
            );
            _mm_storeu_ps(out.as_mut_ptr().add(i), _mm256_cvtpd_ps(res));
            i += 4;
        }
        i
    }

    fn hsum(v: __m256) -> f32 {
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` holds exactly 8 f32.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
        lanes.iter().sum()
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_sub_sum(row: &mut [f32], max: f32) -> f32 {
        let m = _mm256_set1_ps(max);
        let mut acc = _mm256_setzero_ps();
        let mut chunks = row.chunks_exact_mut(8);
        for c in &mut chunks {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), m));
            _mm256_storeu_ps(c.as_mut_ptr(), e);
            acc = _mm256_add_ps(acc, e);
        }
        let mut sum = hsum(acc);
        let tail = chunks.into_remainder();
        if !tail.is_empty() {
            let mut buf = [f32::NEG_INFINITY; 8];
            buf[..tail.len()].copy_from_slice(tail);
            let mut out = [0f32; 8];
            _mm256_storeu_ps(out.as_mut_ptr(), exp8(_mm256_sub_ps(_mm256_loadu_ps(buf.as_ptr()), m)));
            tail.copy_from_slice(&out[..tail.len()]);
            sum += out[..tail.len()].iter().sum::<f32>();
        }
        sum
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn max(row: &[f32]) -> f32 {
        let mut acc = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut chunks = row.chunks_exact(8);
        for c in &mut chunks {
            acc = _mm256_max_ps(acc, _mm256_loadu_ps(c.as_ptr()));
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        lanes.iter().chain(chunks.remainder()).copied().fold(f32::NEG_INFINITY, f32::max)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn affine_silu(dst: &mut [f32], src: &[f32], scale: f32, shift: f32, silu: bool) {
        let n = dst.len().min(src.len());
        let (s, t, one) = (_mm256_set1_ps(scale), _mm256_set1_ps(shift), _mm256_set1_ps(1.0));
        let mut i = 0;
        while i + 8 <= n {
            let y = _mm256_fmadd_ps(_mm256_loadu_ps(src.as_ptr().add(i)), s, t);
            let o = if silu {
                let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), y));
                _mm256_div_ps(y, _mm256_add_ps(one, e))
            } else {
                y
            };
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), o);
            i += 8;
        }
        for j in i..n {
            let y = src[j] * scale + shift;
            dst[j] = if silu { y / (1.0 + (-y).exp()) } else { y };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_exp_matches_libm() {
        // Every path (AVX2 chunks and the scalar tail) over the whole useful range and past its ends.
        let xs: Vec<f32> = (-2000..=2000).map(|i| i as f32 * 0.0449).chain([-1e4, -104.0, -87.0, 88.5, 89.0, 1e4, 0.0]).collect();
        let mut row = xs.clone();
        let sum = exp_sub_sum(&mut row, 0.0);
        let mut expect_sum = 0f64;
        for (&x, &y) in xs.iter().zip(&row) {
            let e = x.exp();
            expect_sum += e as f64;
            if e.is_infinite() {
                assert!(y.is_infinite(), "exp({x}) = {y}");
            } else if e < 1e-30 {
                assert!(y.abs() < 1e-30, "exp({x}) = {y} vs {e}");
            } else {
                assert!(((y - e) / e).abs() < 4e-7, "exp({x}) = {y} vs {e}");
            }
        }
        assert!(sum.is_infinite() && expect_sum.is_infinite());
        for len in [0, 1, 7, 8, 9, 31] {
            let v: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin() * 5.0).collect();
            let m = max(&v);
            assert_eq!(m, v.iter().copied().fold(f32::NEG_INFINITY, f32::max));
            let mut r = v.clone();
            let s = exp_sub_sum(&mut r, m);
            let e: f32 = v.iter().map(|&x| (x - m).exp()).sum();
            assert!((s - e).abs() <= 1e-5 * e.max(1.0), "len {len}: {s} vs {e}");
        }
    }

    #[test]
    fn geglu_matches_scalar_and_erf_is_accurate() {
        for i in -400..=400 {
            let x = i as f32 / 80.0;
            let e = candle_core::cpu::erf::erf_f32(x);
            assert!((erf(x) - e).abs() < 3e-7, "erf({x}) = {} vs {e}", erf(x));
        }
        // Gates across erf's whole range (and far past it), lengths with and without a scalar tail.
        for len in [1, 4, 7, 64, 1001] {
            let g: Vec<f32> = (0..len).map(|i| (i as f32 - len as f32 / 2.0) * 0.031 * if i % 7 == 0 { 300.0 } else { 1.0 }).collect();
            let h: Vec<f32> = (0..len).map(|i| (i as f32 * 0.91).cos() * 3.0).collect();
            let mut out = vec![0f32; len];
            geglu(&mut out, &h, &g);
            for i in 0..len {
                let e = h[i] * 0.5 * g[i] * (1.0 + erf(g[i] * std::f32::consts::FRAC_1_SQRT_2));
                assert!((out[i] - e).abs() <= 2e-6 * e.abs().max(1.0), "g {} h {}: {} vs {e}", g[i], h[i], out[i]);
            }
        }
    }

    #[test]
    fn affine_silu_matches_scalar() {
        for len in [1, 8, 13, 64] {
            let src: Vec<f32> = (0..len).map(|i| (i as f32 * 0.77).cos() * 12.0).collect();
            for silu in [false, true] {
                let mut dst = vec![0f32; len];
                affine_silu(&mut dst, &src, 1.7, -0.3, silu);
                for (&o, &i) in dst.iter().zip(&src) {
                    let y = i * 1.7 - 0.3;
                    let e = if silu { y / (1.0 + (-y).exp()) } else { y };
                    assert!((o - e).abs() <= 2e-6 * e.abs().max(1.0), "{o} vs {e}");
                }
            }
        }
    }
}
