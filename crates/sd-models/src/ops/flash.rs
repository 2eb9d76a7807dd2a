//! Fused scaled-dot-product attention for the CPU in F32.
//!
//! The unfused form writes the whole `[heads, q_len, kv_len]` score matrix to memory, reads it back
//! for a scalar-`exp` softmax and again for the second product: at SD 1.5's 4096-token self-attention
//! that is 1 GiB per layer streamed through DRAM (and page-faulted in fresh on every call). Here each
//! task takes a block of query rows of one head, so its scores (≤ 1 MiB) stay in the core's cache:
//! one GEMM for the block's scores, a vectorised softmax in place, one GEMM into the output rows, and
//! the softmax's division deferred to the `dim`-wide output instead of the `kv_len`-wide
//! probabilities.

use std::cell::RefCell;

use candle_core::{CpuStorage, Layout, Result, Shape};
use rayon::prelude::*;

use super::cpu;

/// Score elements per task: a block of query rows against every key, sized to stay in L2.
const BLOCK_SCORES: usize = 1 << 18;
/// The most query rows in one block (more only adds scratch without saving work).
const MAX_BLOCK_ROWS: usize = 128;

/// Query rows per block for `kv_len` keys.
pub(super) fn block_rows(kv_len: usize) -> usize {
    (BLOCK_SCORES / kv_len.max(1)).clamp(1, MAX_BLOCK_ROWS)
}

/// `softmax(q·kᵀ·scale)·v` over contiguous `q` `[bh, lq, d]`, `k`/`v` `[bh, lk, d]`, in query
/// blocks of `rows`; returns `[bh, lq, d]`.
#[allow(clippy::too_many_arguments)]
pub(super) fn attention(q: &[f32], k: &[f32], v: &[f32], bh: usize, lq: usize, lk: usize, d: usize, scale: f32, rows: usize) -> Vec<f32> {
    thread_local! {
        static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }
    let mut out = vec![0f32; bh * lq * d];
    if out.is_empty() {
        return out;
    }
    let rows = rows.clamp(1, MAX_BLOCK_ROWS);
    let tasks = out.par_chunks_mut(lq * d).enumerate().flat_map_iter(|(h, o)| o.chunks_mut(rows * d).enumerate().map(move |(blk, ob)| (h, blk, ob)));
    tasks.for_each(|(h, blk, ob)| {
        let n = ob.len() / d;
        let q = &q[(h * lq + blk * rows) * d..][..n * d];
        let (k, v) = (&k[h * lk * d..][..lk * d], &v[h * lk * d..][..lk * d]);
        SCORES.with_borrow_mut(|s| {
            if s.len() < n * lk {
                s.resize(n * lk, 0.0);
            }
            let s = &mut s[..n * lk];
            // SAFETY: every pointer/stride pair below addresses inside its slice: `s` is n×lk
            // row-major, `q` n×d row-major, `k` and `v` lk×d row-major (k read transposed through its
            // strides), `ob` n×d row-major; `gemm` reads lhs/rhs and writes dst only in those bounds.
            unsafe {
                gemm::gemm(
                    n, lk, d,
                    s.as_mut_ptr(), 1, lk as isize, false,
                    q.as_ptr(), 1, d as isize,
                    k.as_ptr(), d as isize, 1,
                    0.0, scale, false, false, false, gemm::Parallelism::None,
                );
            }
            let mut inv = [0f32; MAX_BLOCK_ROWS];
            for (r, row) in s.chunks_exact_mut(lk).enumerate() {
                let m = cpu::max(row);
                inv[r] = 1.0 / cpu::exp_sub_sum(row, m);
            }
            // SAFETY: as above.
            unsafe {
                gemm::gemm(
                    n, d, lk,
                    ob.as_mut_ptr(), 1, d as isize, false,
                    s.as_ptr(), 1, lk as isize,
                    v.as_ptr(), 1, d as isize,
                    0.0, 1.0, false, false, false, gemm::Parallelism::None,
                );
            }
            for (r, orow) in ob.chunks_exact_mut(d).enumerate() {
                orow.iter_mut().for_each(|o| *o *= inv[r]);
            }
        });
    });
    out
}

/// The fused attention as a candle op over `[bh, lq, d]` / `[bh, lk, d]` / `[bh, lk, d]` F32 tensors.
pub(super) struct FlashCpu {
    /// Multiplier of the scores (1/√d).
    pub scale: f32,
}

impl candle_core::CustomOp3 for FlashCpu {
    fn name(&self) -> &'static str {
        "sd-flash-attention"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let (bh, lq, d) = l1.shape().dims3()?;
        let (bk, lk, dk) = l2.shape().dims3()?;
        if l3.shape().dims3()? != (bk, lk, dk) || bk != bh || dk != d {
            candle_core::bail!("sd-flash-attention: q {:?}, k {:?} and v {:?} do not match", l1.dims(), l2.dims(), l3.dims());
        }
        let get = |s, l| super::contiguous_f32(s, l, "sd-flash-attention");
        let out = attention(get(s1, l1)?, get(s2, l2)?, get(s3, l3)?, bh, lq, lk, d, self.scale, block_rows(lk));
        Ok((CpuStorage::F32(out), Shape::from((bh, lq, d))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scores, softmax and product in f64, one row at a time.
    #[allow(clippy::too_many_arguments)]
    fn reference(q: &[f32], k: &[f32], v: &[f32], bh: usize, lq: usize, lk: usize, d: usize, scale: f32) -> Vec<f32> {
        let mut out = vec![0f32; bh * lq * d];
        for h in 0..bh {
            for i in 0..lq {
                let s: Vec<f64> = (0..lk)
                    .map(|j| (0..d).map(|c| q[(h * lq + i) * d + c] as f64 * k[(h * lk + j) * d + c] as f64).sum::<f64>() * scale as f64)
                    .collect();
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..d {
                    out[(h * lq + i) * d + c] = ((0..lk).map(|j| e[j] * v[(h * lk + j) * d + c] as f64).sum::<f64>() / z) as f32;
                }
            }
        }
        out
    }

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32 * 0.618 + seed as f32 * 1.7).sin() * 43758.547).fract() * 4.0 - 2.0).collect()
    }

    #[test]
    fn matches_reference_on_odd_shapes_and_block_edges() {
        // Head counts, lengths and widths off every multiple of 8, single rows and keys, and block
        // sizes below, at and above the query length (partial last blocks, one-row blocks).
        for &(bh, lq, lk, d) in &[(1, 1, 1, 1), (3, 5, 7, 3), (2, 130, 77, 40), (1, 33, 300, 64), (2, 9, 1, 8), (1, 64, 64, 80)] {
            let (q, k, v) = (data(bh * lq * d, 1), data(bh * lk * d, 2), data(bh * lk * d, 3));
            let scale = 1.0 / (d as f32).sqrt();
            let expect = reference(&q, &k, &v, bh, lq, lk, d, scale);
            for rows in [1, 4, lq.saturating_sub(1).max(1), lq, block_rows(lk), MAX_BLOCK_ROWS] {
                let got = attention(&q, &k, &v, bh, lq, lk, d, scale, rows);
                let diff = got.iter().zip(&expect).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(diff < 5e-5, "bh {bh} lq {lq} lk {lk} d {d} rows {rows}: {diff}");
            }
        }
    }

    #[test]
    fn block_rows_bound_the_scratch() {
        assert_eq!(block_rows(4096), 64);
        assert_eq!(block_rows(77), MAX_BLOCK_ROWS);
        assert_eq!(block_rows(1 << 20), 1);
        assert_eq!(block_rows(0), MAX_BLOCK_ROWS);
    }
}
