//! Winograd F(2×2, 3×3) convolution for the CPU in F32: 16 multiplies per 2×2 output tile and
//! input channel instead of im2col's 36, so 3×3 stride-1 layers do 2.25× fewer multiply-adds.
//!
//! Per tile: the input transform V = Bᵀ d B, 16 GEMMs M[ξ] = U[ξ]·V[ξ] over channels, and the
//! output transform Y = Aᵀ M A straight into the output rows. The kernel transform U = G g Gᵀ
//! (16/9 of the weight's size) is redone every call rather than cached, so a loaded model keeps one
//! copy of its weights. Tiles are handled in chunks of whole tile rows (rows may span images) so V
//! and M stay a few MiB: a whole V for a 128-channel 512² VAE layer (65 536 tiles) would be 0.5 GiB.
//! Two schedules share these steps:
//!
//! - more tiles than output channels (most layers): the whole U once, then independent chunks in
//!   parallel, each with its own V and M;
//! - fewer (1280 channels at 16²): writing and streaming a whole U (105 MB) there costs about as
//!   much as the GEMMs, so chunks run one after the other, each transforming its input in parallel
//!   over channels and then running blocks of output channels in parallel, each transforming only
//!   its slice of U, in cache, right before its GEMMs.
//!
//! Layouts keep every transform loop on contiguous tiles (or channels, for U), so they vectorise;
//! the AVX2 path is the same code compiled with AVX2+FMA enabled. V is `[16][c_in][tiles]`, so each
//! V[ξ] is one dense matrix; with `tiles` as the GEMM's long side the `gemm` crate packs it once per
//! call.

use super::cpu::CpuPath;
use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::{Mutex, PoisonError};

/// Floats of V plus M one chunk may hold per thread (4 MiB) when chunks run in parallel.
const CHUNK_FLOATS: usize = 1 << 20;

/// Floats of the V all threads share (16 MiB) when output-channel blocks run in parallel.
const SHARED_V_FLOATS: usize = 1 << 22;

/// Output channels per block when blocks run in parallel: enough for an efficient GEMM, few enough
/// that the block's U (16·block·c_in floats) stays in cache.
const BLOCK: usize = 64;

/// Geometry of a 3×3 stride-1 convolution: input `[b, c_in, h, w]`, kernel `[c_out, c_in, 3, 3]`,
/// `pad` zeros on every side; the output is `[b, c_out, h + 2·pad − 2, w + 2·pad − 2]`.
#[derive(Debug, Clone, Copy)]
struct Conv3x3 {
    b: usize,
    c_in: usize,
    h: usize,
    w: usize,
    c_out: usize,
    pad: usize,
}

/// Whether Winograd beats tiled im2col for a layer with `c_in` input channels and `out_pixels`
/// output pixels over the whole batch.
pub(super) fn pays(c_in: usize, out_pixels: usize) -> bool {
    c_in >= 8 && out_pixels >= 128
}

/// The 3×3 stride-1 convolution of `x` `[b, c_in, h, w]` with `weight` `[c_out, c_in, 3, 3]` (no bias).
pub(super) fn conv3x3(x: &Tensor, weight: &Tensor, pad: usize) -> Result<Tensor> {
    x.contiguous()?.apply_op2_no_bwd(&weight.contiguous()?, &WinogradOp { pad })
}

struct WinogradOp {
    pad: usize,
}

impl candle_core::CustomOp2 for WinogradOp {
    fn name(&self) -> &'static str {
        "sd-winograd-f23"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, weight) = (super::contiguous_f32(s1, l1, "sd-winograd-f23")?, super::contiguous_f32(s2, l2, "sd-winograd-f23")?);
        let (b, c_in, h, w) = l1.shape().dims4()?;
        let (c_out, c_in_w, kh, kw) = l2.shape().dims4()?;
        if c_in_w != c_in || kh != 3 || kw != 3 {
            candle_core::bail!("sd-winograd-f23: kernel {:?} does not fit a {c_in}-channel 3×3 convolution", l2.dims());
        }
        let g = Conv3x3 { b, c_in, h, w, c_out, pad: self.pad };
        let y = run(x, weight, g, super::cpu::cpu_path(), None)?;
        Ok((CpuStorage::F32(y), Shape::from((b, c_out, h + 2 * g.pad - 2, w + 2 * g.pad - 2))))
    }
}

/// How [`run`] splits the work (chosen from the layer's shape unless a test forces one).
#[derive(Debug, Clone, Copy)]
enum Schedule {
    /// Parallel chunks of at most this many tile rows, sharing a whole U.
    Chunks(usize),
    /// Sequential chunks of at most this many tile rows, each over parallel blocks of this many
    /// output channels.
    Blocks(usize, usize),
}

/// NCHW output of the convolution `g` of the NCHW input `x` with the kernel `weight`, on `path`.
fn run(x: &[f32], weight: &[f32], g: Conv3x3, path: CpuPath, schedule: Option<Schedule>) -> Result<Vec<f32>> {
    let Conv3x3 { b, c_in, h, w, c_out, pad } = g;
    if h + 2 * pad < 3 || w + 2 * pad < 3 {
        candle_core::bail!("sd-winograd-f23: a {h}×{w} input with padding {pad} is smaller than the 3×3 kernel");
    }
    if x.len() != b * c_in * h * w || weight.len() != c_out * c_in * 9 {
        candle_core::bail!("sd-winograd-f23: {} input and {} kernel values do not match {g:?}", x.len(), weight.len());
    }
    let (ho, wo) = (h + 2 * pad - 2, w + 2 * pad - 2);
    let mut out = vec![0f32; b * c_out * ho * wo];
    if out.is_empty() || c_in == 0 {
        return Ok(out);
    }
    let (th, tw) = (ho.div_ceil(2), wo.div_ceil(2));
    let all_rows = b * th;
    let threads = rayon::current_num_threads();
    // With fewer tiles than output channels, U outweighs V: share V and split U (see the module docs).
    let schedule = schedule.unwrap_or(if c_out > all_rows * tw {
        Schedule::Blocks(SHARED_V_FLOATS / (16 * c_in * tw), BLOCK.min(c_out.div_ceil(2 * threads)))
    } else {
        // Enough chunks to keep every thread busy, even when the memory budget allows fewer.
        Schedule::Chunks((CHUNK_FLOATS / (16 * (c_in + c_out) * tw)).min(all_rows.div_ceil(threads)))
    });
    let ctx = Ctx { x, g, th, tw, ho, wo, out: SyncPtr(out.as_mut_ptr()) };
    match schedule {
        Schedule::Blocks(rows, block) => {
            let (rows, block) = (balanced(all_rows, rows), block.clamp(1, c_out));
            let pool = Pool::new(|| Scratch::new(tw, c_in, 16 * block * c_in, 0, 16 * block * rows * tw));
            let mut v = vec![0f32; 16 * c_in * rows * tw];
            for r0 in (0..all_rows).step_by(rows) {
                let nr = rows.min(all_rows - r0);
                let vp = SyncPtr(v.as_mut_ptr());
                (0..c_in).into_par_iter().for_each(|ci| pool.with(|s| ctx.work(path, s, Work::Channel { ci, r0, nr, v: vp })));
                let v = &v[..16 * c_in * nr * tw];
                (0..c_out.div_ceil(block)).into_par_iter().for_each(|k| {
                    let (co0, cb) = (k * block, block.min(c_out - k * block));
                    let weight = &weight[co0 * c_in * 9..][..cb * c_in * 9];
                    pool.with(|s| ctx.work(path, s, Work::Block { weight, co0, cb, r0, nr, v }));
                });
            }
        }
        Schedule::Chunks(rows) => {
            let rows = balanced(all_rows, rows);
            let tiles = rows * tw;
            let pool = Pool::new(|| Scratch::new(tw, c_in, 0, 16 * c_in * tiles, 16 * c_out * tiles));
            let mut u = vec![0f32; 16 * c_out * c_in];
            u.par_chunks_mut(16 * c_in)
                .zip(weight.par_chunks(9 * c_in))
                .for_each(|(u, weight)| pool.with(|s| ctx.work(path, s, Work::Weights { weight, u })));
            (0..all_rows.div_ceil(rows)).into_par_iter().for_each(|k| {
                let r0 = k * rows;
                pool.with(|s| ctx.work(path, s, Work::Chunk { u: &u, r0, nr: rows.min(all_rows - r0) }));
            });
        }
    }
    Ok(out)
}

/// One [`Scratch`] per worker thread for one call, built on the thread's first task and dropped
/// with the call, so a layer allocates its buffers once per thread however finely rayon splits.
struct Pool<F> {
    slots: Vec<Mutex<Option<Scratch>>>,
    make: F,
}

impl<F: Fn() -> Scratch + Sync> Pool<F> {
    fn new(make: F) -> Self {
        Self { slots: (0..rayon::current_num_threads()).map(|_| Mutex::new(None)).collect(), make }
    }

    fn with(&self, f: impl FnOnce(&mut Scratch)) {
        // Each worker takes its own slot, so the lock is uncontended.
        let i = rayon::current_thread_index().unwrap_or(0) % self.slots.len();
        let mut slot = self.slots[i].lock().unwrap_or_else(PoisonError::into_inner);
        f(slot.get_or_insert_with(&self.make));
    }
}

/// The chunk size at most `max` (and at least 1) that splits `n` into the fewest, most even chunks.
fn balanced(n: usize, max: usize) -> usize {
    n.div_ceil(n.div_ceil(max.max(1)))
}

/// U = G g Gᵀ for `weight` `[cb][c_in][3][3]` into `u` `[cb][16][c_in]`, so that each GEMM's U[ξ]
/// is a row-major `cb × c_in` matrix with row stride `16·c_in`; `t` holds 12·c_in floats.
///
/// G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]] goes along each kernel row first, scattering
/// into `t` `[3][4][c_in]`, so that the pass down the columns runs over contiguous channels.
#[inline(always)]
fn transform_weight(weight: &[f32], c_in: usize, u: &mut [f32], t: &mut [f32]) {
    let t = &mut t[..12 * c_in];
    for (uo, wo) in u.chunks_exact_mut(16 * c_in).zip(weight.chunks_exact(9 * c_in)) {
        // Eight channels at a time through a transposed block, so the row pass runs on vectors.
        let mut blocks = wo.chunks_exact(72);
        for (n, k8) in (&mut blocks).enumerate() {
            let mut g = [[0f32; 8]; 9];
            for (l, k) in k8.chunks_exact(9).enumerate() {
                for (q, &v) in k.iter().enumerate() {
                    g[q][l] = v;
                }
            }
            for ky in 0..3 {
                let (a, b, c) = (g[3 * ky], g[3 * ky + 1], g[3 * ky + 2]);
                let rows: [[f32; 8]; 4] = [
                    a,
                    std::array::from_fn(|l| 0.5 * (a[l] + b[l] + c[l])),
                    std::array::from_fn(|l| 0.5 * (a[l] - b[l] + c[l])),
                    c,
                ];
                for (j, r) in rows.iter().enumerate() {
                    t[(4 * ky + j) * c_in + 8 * n..][..8].copy_from_slice(r);
                }
            }
        }
        let done = c_in - blocks.remainder().len() / 9;
        for (ci, k) in blocks.remainder().chunks_exact(9).enumerate() {
            for (ky, k) in k.chunks_exact(3).enumerate() {
                let (a, b, c) = (k[0], k[1], k[2]);
                for (j, v) in [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c].into_iter().enumerate() {
                    t[(4 * ky + j) * c_in + done + ci] = v;
                }
            }
        }
        for j in 0..4 {
            let row = |ky: usize| &t[(4 * ky + j) * c_in..][..c_in];
            let (a, b, c) = (row(0), row(1), row(2));
            uo[j * c_in..][..c_in].copy_from_slice(a);
            for (((d, a), b), c) in uo[(4 + j) * c_in..][..c_in].iter_mut().zip(a).zip(b).zip(c) {
                *d = 0.5 * (a + b + c);
            }
            for (((d, a), b), c) in uo[(8 + j) * c_in..][..c_in].iter_mut().zip(a).zip(b).zip(c) {
                *d = 0.5 * (a - b + c);
            }
            uo[(12 + j) * c_in..][..c_in].copy_from_slice(c);
        }
    }
}

/// A buffer the workers of a parallel loop write to, each to its own rows.
#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);

// SAFETY: workers write through the pointer only to rows no other worker touches (see
// `Ctx::input_transform` and `Ctx::output_transform`), and the buffers outlive the parallel loops.
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

/// What every worker of one call reads, and where it writes. Tile rows are counted across images:
/// tile row `r` is row `r % th` of image `r / th`.
struct Ctx<'a> {
    x: &'a [f32],
    g: Conv3x3,
    th: usize,
    tw: usize,
    ho: usize,
    wo: usize,
    out: SyncPtr,
}

/// One thread's buffers.
struct Scratch {
    /// This worker's slice of U `[block][16][c_in]`.
    u: Vec<f32>,
    /// The weight transform's row pass `[3][4][c_in]`.
    t: Vec<f32>,
    /// Transformed input `[16][c_in][tiles]`.
    v: Vec<f32>,
    /// GEMM products `[16][c_out or block][tiles]`.
    m: Vec<f32>,
    /// Row-transformed input rows `[4][4][tw]`, input row y in slot y mod 4; reused by the output
    /// transform for its column sums `[2][4][tw]`.
    e: Vec<f32>,
    /// One zero-padded input row.
    pr: Vec<f32>,
    /// Its even columns.
    even: Vec<f32>,
    /// Its odd columns.
    odd: Vec<f32>,
}

impl Scratch {
    fn new(tw: usize, c_in: usize, u: usize, v: usize, m: usize) -> Self {
        Self {
            u: vec![0.0; u],
            t: vec![0.0; 12 * c_in],
            v: vec![0.0; v],
            m: vec![0.0; m],
            e: vec![0.0; 16 * tw],
            pr: vec![0.0; 2 * tw + 2],
            even: vec![0.0; tw + 1],
            odd: vec![0.0; tw + 1],
        }
    }
}

/// One worker's task.
enum Work<'a> {
    /// All of tile rows `r0 .. r0 + nr`, with the whole U.
    Chunk { u: &'a [f32], r0: usize, nr: usize },
    /// Input channel `ci` of tile rows `r0 .. r0 + nr` into its rows of V `[16][c_in][nr·tw]`.
    Channel { ci: usize, r0: usize, nr: usize, v: SyncPtr },
    /// Output channels `co0 .. co0 + cb` (kernel rows `weight`) of tile rows `r0 .. r0 + nr`, from
    /// their whole V.
    Block { weight: &'a [f32], co0: usize, cb: usize, r0: usize, nr: usize, v: &'a [f32] },
    /// U of the output channels whose kernels are `weight`.
    Weights { weight: &'a [f32], u: &'a mut [f32] },
}

impl Ctx<'_> {
    fn work(&self, path: CpuPath, s: &mut Scratch, w: Work) {
        #[cfg(target_arch = "x86_64")]
        if path == CpuPath::Avx2 && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: AVX2 and FMA were detected on this CPU just above.
            unsafe { self.work_avx2(s, w) };
            return;
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = path; // x86-64 is the only target with a second path
        self.work_impl(s, w);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn work_avx2(&self, s: &mut Scratch, w: Work) {
        self.work_impl(s, w);
    }

    #[inline(always)]
    fn work_impl(&self, s: &mut Scratch, w: Work) {
        let Conv3x3 { c_in, c_out, .. } = self.g;
        match w {
            Work::Chunk { u, r0, nr } => {
                let tiles = nr * self.tw;
                let mut v = std::mem::take(&mut s.v);
                for ci in 0..c_in {
                    // SAFETY: the pool sized `v` for the longest chunk, so it holds at least
                    // 16·c_in·tiles floats, and it is this worker's alone.
                    unsafe { self.input_transform(s, ci, r0, nr, SyncPtr(v.as_mut_ptr())) };
                }
                gemms(u, &v, &mut s.m, c_out, c_in, tiles);
                s.v = v;
                self.output_transform(s, 0, c_out, r0, nr);
            }
            // SAFETY: the caller's V holds 16·c_in·nr·tw floats and gives channel ci to this worker only.
            Work::Channel { ci, r0, nr, v } => unsafe { self.input_transform(s, ci, r0, nr, v) },
            Work::Weights { weight, u } => transform_weight(weight, c_in, u, &mut s.t),
            Work::Block { weight, co0, cb, r0, nr, v } => {
                transform_weight(weight, c_in, &mut s.u, &mut s.t);
                gemms(&s.u, v, &mut s.m, cb, c_in, nr * self.tw);
                self.output_transform(s, co0, cb, r0, nr);
            }
        }
    }

    /// V = Bᵀ d B of input channel `ci` for tile rows `r0 .. r0 + nr` into its rows of `v`
    /// `[16][c_in][nr·tw]`, with Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0], [0, 1, 0, −1]]
    /// applied along each input row first and then down the columns.
    ///
    /// # Safety
    /// `v` must point to 16·c_in·nr·tw floats whose rows of channel `ci` nothing else accesses.
    #[inline(always)]
    unsafe fn input_transform(&self, s: &mut Scratch, ci: usize, r0: usize, nr: usize, v: SyncPtr) {
        let Conv3x3 { c_in, h, w, pad, .. } = self.g;
        let tw = self.tw;
        let tiles = nr * tw;
        for r in 0..nr {
            let (bi, ty) = ((r0 + r) / self.th, (r0 + r) % self.th);
            let plane = &self.x[(bi * c_in + ci) * h * w..][..h * w];
            // Input row 2·ty + k (before padding) lives in slot (2·ty + k) mod 4, so the two rows a
            // tile row shares with the one above it in the same image are already transformed.
            let slot = |k: usize| (2 * ty + k) % 4;
            for k in if r == 0 || ty == 0 { 0 } else { 2 }..4 {
                let ek = &mut s.e[slot(k) * 4 * tw..][..4 * tw];
                // Rows above the image wrap to a huge index and read as padding, as rows below do.
                let iy = (2 * ty + k).wrapping_sub(pad);
                if iy >= h {
                    ek.fill(0.0);
                    continue;
                }
                let pr = &mut s.pr;
                pr[..pad].fill(0.0);
                pr[pad..pad + w].copy_from_slice(&plane[iy * w..][..w]);
                pr[pad + w..].fill(0.0);
                for ((p, a), b) in pr.chunks_exact(2).zip(s.even.iter_mut()).zip(s.odd.iter_mut()) {
                    *a = p[0];
                    *b = p[1];
                }
                // Tile tx reads padded columns 2tx .. 2tx + 3: even[tx], odd[tx], even[tx+1], odd[tx+1].
                let (d0, d1, d2, d3) = (&s.even[..tw], &s.odd[..tw], &s.even[1..], &s.odd[1..]);
                let (e0, rest) = ek.split_at_mut(tw);
                let (e1, rest) = rest.split_at_mut(tw);
                let (e2, e3) = rest.split_at_mut(tw);
                sub(e0, d0, d2);
                add(e1, d1, d2);
                sub(e2, d2, d1);
                sub(e3, d1, d3);
            }
            let row = |k: usize, j: usize| &s.e[(4 * slot(k) + j) * tw..][..tw];
            for xi in 0..16 {
                // SAFETY: in bounds by the caller's contract: (15·c_in + c_in − 1)·tiles + (nr−1)·tw + tw
                // ≤ 16·c_in·tiles; these are channel ci's rows, which only this call writes.
                let dst = unsafe { std::slice::from_raw_parts_mut(v.0.add((xi * c_in + ci) * tiles + r * tw), tw) };
                let j = xi % 4;
                match xi / 4 {
                    0 => sub(dst, row(0, j), row(2, j)),
                    1 => add(dst, row(1, j), row(2, j)),
                    2 => sub(dst, row(2, j), row(1, j)),
                    _ => sub(dst, row(1, j), row(3, j)),
                }
            }
        }
    }

    /// Y = Aᵀ M A with Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]] for output channels `co0 .. co0 + cb`
    /// (`s.m` is `[16][cb][nr·tw]`) into the output rows of tile rows `r0 .. r0 + nr`; a tile that
    /// overhangs the output's bottom or right edge drops its outside row or column.
    #[inline(always)]
    fn output_transform(&self, s: &mut Scratch, co0: usize, cb: usize, r0: usize, nr: usize) {
        let (tw, ho, wo, c_out) = (self.tw, self.ho, self.wo, self.g.c_out);
        let tiles = nr * tw;
        for c in 0..cb {
            for r in 0..nr {
                let (bi, ty) = ((r0 + r) / self.th, (r0 + r) % self.th);
                let m = |xi: usize| &s.m[(xi * cb + c) * tiles + r * tw..][..tw];
                let (top, bottom) = s.e[..8 * tw].split_at_mut(4 * tw);
                for (j, (t, b)) in top.chunks_exact_mut(tw).zip(bottom.chunks_exact_mut(tw)).enumerate() {
                    add3(t, m(j), m(4 + j), m(8 + j));
                    sub3(b, m(4 + j), m(8 + j), m(12 + j));
                }
                for (dy, sums) in s.e[..8 * tw].chunks_exact(4 * tw).enumerate() {
                    let oy = 2 * ty + dy;
                    if oy >= ho {
                        break;
                    }
                    // SAFETY: row `oy` < ho of channel co0 + c < c_out of image bi < b lies inside the
                    // output, and only the one worker holding this tile row and output channel writes it.
                    let row = unsafe {
                        std::slice::from_raw_parts_mut(self.out.0.add(((bi * c_out + co0 + c) * ho + oy) * wo), wo)
                    };
                    pairs(row, sums, tw);
                }
            }
        }
    }
}

/// The 16 products M[ξ] (`m` `[16][cb][tiles]`) = U[ξ] (`u` `[cb][16][c_in]`) · V[ξ] (`v`
/// `[16][c_in][tiles]`), each one single-threaded GEMM (the callers parallelise around them).
fn gemms(u: &[f32], v: &[f32], m: &mut [f32], cb: usize, c_in: usize, tiles: usize) {
    let ok = u.len() >= 16 * cb * c_in && v.len() >= 16 * c_in * tiles && m.len() >= 16 * cb * tiles;
    debug_assert!(ok, "winograd GEMM buffers too small");
    if !ok {
        return;
    }
    for xi in 0..16 {
        // SAFETY: checked above, the three matrices lie inside their buffers: M[ξ] ends at
        // (ξ+1)·cb·tiles; U[ξ]'s last element is ξ·c_in + (cb−1)·16·c_in + c_in − 1 < 16·cb·c_in;
        // V[ξ] ends at (ξ+1)·c_in·tiles. `m` is exclusive.
        unsafe {
            gemm::gemm(
                cb,
                tiles,
                c_in,
                m.as_mut_ptr().add(xi * cb * tiles),
                1,
                tiles as isize,
                false,
                u.as_ptr().add(xi * c_in),
                1,
                (16 * c_in) as isize,
                v.as_ptr().add(xi * c_in * tiles),
                1,
                tiles as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    }
}

#[inline(always)]
fn add(dst: &mut [f32], a: &[f32], b: &[f32]) {
    for ((d, a), b) in dst.iter_mut().zip(a).zip(b) {
        *d = a + b;
    }
}

#[inline(always)]
fn sub(dst: &mut [f32], a: &[f32], b: &[f32]) {
    for ((d, a), b) in dst.iter_mut().zip(a).zip(b) {
        *d = a - b;
    }
}

#[inline(always)]
fn add3(dst: &mut [f32], a: &[f32], b: &[f32], c: &[f32]) {
    for (((d, a), b), c) in dst.iter_mut().zip(a).zip(b).zip(c) {
        *d = a + b + c;
    }
}

#[inline(always)]
fn sub3(dst: &mut [f32], a: &[f32], b: &[f32], c: &[f32]) {
    for (((d, a), b), c) in dst.iter_mut().zip(a).zip(b).zip(c) {
        *d = a - b - c;
    }
}

/// One output row from its column sums `s` `[4][tw]`: tile tx gives columns 2tx (s0 + s1 + s2) and
/// 2tx + 1 (s1 − s2 − s3); an odd width keeps only the first column of the last tile.
#[inline(always)]
fn pairs(row: &mut [f32], s: &[f32], tw: usize) {
    let (s0, rest) = s.split_at(tw);
    let (s1, rest) = rest.split_at(tw);
    let (s2, s3) = rest.split_at(tw);
    let mut out = row.chunks_exact_mut(2);
    for ((((y, a), b), c), d) in (&mut out).zip(s0).zip(s1).zip(s2).zip(s3) {
        y[0] = a + b + c;
        y[1] = b - c - d;
    }
    if let [y] = out.into_remainder() {
        *y = s0[tw - 1] + s1[tw - 1] + s2[tw - 1];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module};

    const PATHS: [CpuPath; 2] = [CpuPath::Scalar, CpuPath::Avx2];

    struct Case {
        x: Tensor,
        w: Tensor,
        g: Conv3x3,
        expect: Vec<f32>,
    }

    fn case(b: usize, c_in: usize, c_out: usize, h: usize, w: usize, pad: usize) -> Result<Case> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (b, c_in, h, w), &dev)?;
        let wt = Tensor::randn(0f32, 0.3, (c_out, c_in, 3, 3), &dev)?;
        let expect = x.conv2d(&wt, pad, 1, 1, 1)?.flatten_all()?.to_vec1()?;
        Ok(Case { x, w: wt, g: Conv3x3 { b, c_in, h, w, c_out, pad }, expect })
    }

    impl Case {
        fn run(&self, path: CpuPath, schedule: Option<Schedule>) -> Result<Vec<f32>> {
            let x = self.x.flatten_all()?.to_vec1::<f32>()?;
            let w = self.w.flatten_all()?.to_vec1::<f32>()?;
            run(&x, &w, self.g, path, schedule)
        }

        fn max_diff(&self, path: CpuPath, schedule: Option<Schedule>) -> Result<f32> {
            let y = self.run(path, schedule)?;
            assert_eq!(y.len(), self.expect.len(), "{:?}", self.g);
            Ok(y.iter().zip(&self.expect).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max))
        }
    }

    #[test]
    fn matches_conv2d_on_odd_shapes_paddings_and_schedules() -> Result<()> {
        let sizes = [1, 2, 3, 4, 5, 6, 7, 8, 9, 17, 33];
        let channels = [(1, 1), (3, 5), (7, 2), (9, 13), (2, 17)];
        let schedules = [None, Some(Schedule::Chunks(1)), Some(Schedule::Chunks(2)), Some(Schedule::Blocks(1, 3)), Some(Schedule::Blocks(3, 5))];
        let mut n = 0;
        for pad in 0..=2 {
            for (i, &h) in sizes.iter().enumerate() {
                let w = sizes[(i * 7 + pad * 3) % sizes.len()];
                if h + 2 * pad < 3 || w + 2 * pad < 3 {
                    continue;
                }
                let (c_in, c_out) = channels[(i + pad) % channels.len()];
                let c = case(if i % 2 == 0 { 1 } else { 3 }, c_in, c_out, h, w, pad)?;
                for path in PATHS {
                    for schedule in schedules {
                        let d = c.max_diff(path, schedule)?;
                        assert!(d <= 1e-4, "{:?} {path:?} {schedule:?}: {d}", c.g);
                    }
                }
                n += 1;
            }
        }
        assert!(n >= 25, "only {n} shapes ran");
        Ok(())
    }

    #[test]
    fn chunks_and_blocks_cross_images_and_end_partial() -> Result<()> {
        // 3 images of 9 tile rows: 2-row chunks straddle images and leave a 1-row chunk; 7 output
        // channels in blocks of 3 leave a 1-channel block.
        let c = case(3, 5, 7, 17, 6, 1)?;
        for path in PATHS {
            for schedule in [Schedule::Chunks(2), Schedule::Chunks(4), Schedule::Blocks(2, 3), Schedule::Blocks(4, 3), Schedule::Blocks(100, 100)] {
                let d = c.max_diff(path, Some(schedule))?;
                assert!(d <= 1e-4, "{path:?} {schedule:?}: {d}");
            }
        }
        Ok(())
    }

    #[test]
    fn sd_like_layer_is_accurate() -> Result<()> {
        let c = case(1, 64, 64, 32, 32, 1)?;
        let norm = c.expect.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
        for path in PATHS {
            for schedule in [None, Some(Schedule::Blocks(16, 16))] {
                let y = c.run(path, schedule)?;
                let err = y.iter().zip(&c.expect).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>().sqrt();
                assert!(err / norm <= 1e-5, "{path:?} {schedule:?}: relative L2 {}", err / norm);
                let d = c.max_diff(path, schedule)?;
                assert!(d <= 1e-4, "{path:?} {schedule:?}: {d}");
            }
        }
        Ok(())
    }

    #[test]
    fn conv2d_dispatches_on_both_sides_of_the_threshold() -> Result<()> {
        let dev = Device::Cpu;
        // (batch, c_in, c_out, side): below the threshold (too few channels, too few pixels), above it.
        for (b, c_in, c_out, side, wino) in [(1, 4, 16, 16, false), (1, 16, 16, 8, false), (2, 8, 3, 9, true), (1, 16, 24, 16, true)] {
            assert_eq!(pays(c_in, b * side * side), wino, "{c_in} channels, {b}×{side}²");
            let x = Tensor::randn(0f32, 1., (b, c_in, side, side), &dev)?;
            let w = Tensor::randn(0f32, 0.3, (c_out, c_in, 3, 3), &dev)?;
            let bias = Tensor::randn(0f32, 0.3, c_out, &dev)?;
            let y = super::super::Conv2d::new(w.clone(), Some(bias.clone()), 1, 1).forward(&x)?;
            let e = x.conv2d(&w, 1, 1, 1, 1)?.broadcast_add(&bias.reshape((1, c_out, 1, 1))?)?;
            let d = (y - e)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(d <= 1e-4, "{c_in}→{c_out} {b}×{side}²: {d}");
        }
        Ok(())
    }

    #[test]
    fn rejects_inconsistent_shapes() {
        let g = Conv3x3 { b: 1, c_in: 2, h: 4, w: 4, c_out: 3, pad: 1 };
        assert!(run(&[0.0; 31], &[0.0; 54], g, CpuPath::Scalar, None).is_err());
        assert!(run(&[0.0; 32], &[0.0; 53], g, CpuPath::Scalar, None).is_err());
        let tiny = Conv3x3 { h: 1, w: 4, pad: 0, ..g };
        assert!(run(&[0.0; 8], &[0.0; 54], tiny, CpuPath::Scalar, None).is_err());
        assert_eq!(run(&[0.0; 32], &[0.0; 54], g, CpuPath::Scalar, None).map(|y| y.len()).ok(), Some(48));
    }
}
