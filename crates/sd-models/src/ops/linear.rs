//! The Linear layer every model here goes through, with a CPU product for half-precision weights.
//!
//! candle's CPU matmul has no BF16 kernel: it widens both operands to whole F32 copies, multiplies
//! and narrows back, so every matmul of a BF16 model allocates an F32 twin of its weight (and an
//! F16 or BF16 weight cannot multiply F32 activations at all). Here a BF16/F16 weight is widened
//! one panel of output rows at a time into a reused scratch buffer small enough to stay in cache,
//! and each panel goes through `gemm` in F32 straight into its columns of the output (bias added in
//! F32, then narrowed to the activations' dtype): the weight's transient is one panel per thread
//! instead of the whole matrix (a 12288×3072 FLUX layer: 8 MiB instead of 144 MiB). Every other
//! case (F32 weights, GPUs, other dtypes) is candle-nn's `Linear`, unchanged.

use std::borrow::Cow;
use std::cell::RefCell;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Module, Result, Shape, Tensor};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

/// Bytes of one widened panel when each thread takes whole panels (small batches, where the
/// product is memory-bound on the weight): about a core's share of L2, so the widened rows are
/// still cached when `gemm` packs them. Every thread keeps one such buffer, and one for the f32
/// rows a half-precision output goes through.
const SHARED_PANEL_BYTES: usize = 2 << 20;
/// Bytes of one widened panel when `gemm` spreads each panel over the threads (large batches):
/// `gemm` packs the activations again for every panel, so fewer, larger panels pay (a FLUX
/// 4608×3072 · 3072×12288 product on 2 busy cores: 59 GF/s with 48-row panels, 75–83 with
/// 336–672, 79 with F32 weights). One buffer per call.
const WIDE_PANEL_BYTES: usize = 8 << 20;
/// Panel rows are a multiple of this: `gemm`'s f32 micro-kernel height (48 with AVX-512, 24 with
/// AVX2; the weight rows become its rows once it transposes the row-major output), so no panel
/// ends in a partial tile but the last.
const PANEL_ALIGN: usize = 48;
/// Activation rows from which `gemm` spreads one panel over the threads; below it the threads
/// take whole panels each. Measured on 2 busy cores with k = n = 3072: whole panels are 20–55%
/// faster at 8–32 rows, 5–15% at 77–127, even at 200–300. Past that, one wide panel at a time
/// keeps the per-thread buffers small and stops `gemm` packing the activations again for every
/// one of the many panels a many-core machine would need to keep all its threads busy.
const SPLIT_WITHIN_ROWS: usize = 256;

/// A dense layer `y = x·wᵀ + b` with `weight` `[out, in]` and an optional `bias` `[out]`.
///
/// Activations `[…, in]` of any rank ≥ 2 give `[…, out]`. On the CPU a BF16 or F16 weight is
/// multiplied without widening it whole (see the module docs), for F32, BF16 or F16 activations,
/// accumulating in F32 and returning the activations' dtype; everything else is exactly
/// `candle_nn::Linear`.
#[derive(Debug, Clone)]
pub struct Linear {
    inner: candle_nn::Linear,
}

impl Linear {
    /// Builds a layer from its weight `[out, in]` and optional bias `[out]`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { inner: candle_nn::Linear::new(weight, bias) }
    }

    /// The weight `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    /// The bias `[out]`, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }

    /// Whether `x` goes through the panel product rather than candle's matmul.
    fn blocked(&self, x: &Tensor) -> bool {
        let w = self.weight();
        x.device().is_cpu()
            && w.device().is_cpu()
            && matches!(w.dtype(), DType::BF16 | DType::F16)
            && matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16)
            && x.rank() >= 2
            && w.rank() == 2
    }

    fn forward_blocked(&self, x: &Tensor) -> Result<Tensor> {
        let (n, k) = self.weight().dims2()?;
        let dims = x.dims();
        let last = dims[dims.len() - 1];
        if last != k {
            candle_core::bail!("linear: input {dims:?} does not match the weight [{n}, {k}] (last dimension must be {k})");
        }
        if let Some(b) = self.bias() {
            if b.dims() != [n] {
                candle_core::bail!("linear: bias {:?} does not match {n} outputs", b.dims());
            }
        }
        let m = dims[..dims.len() - 1].iter().product::<usize>();
        let x2 = x.contiguous()?.reshape((m, k))?;
        let w = self.weight().contiguous()?;
        let y = match self.bias() {
            Some(b) => x2.apply_op3_no_bwd(&w, &b.contiguous()?, &PanelProduct)?,
            None => x2.apply_op2_no_bwd(&w, &PanelProduct)?,
        };
        let mut out = dims.to_vec();
        out[dims.len() - 1] = n;
        y.reshape(out)
    }
}

impl From<candle_nn::Linear> for Linear {
    fn from(inner: candle_nn::Linear) -> Self {
        Self { inner }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.blocked(x) {
            return self.forward_blocked(x);
        }
        self.inner.forward(x)
    }
}

/// How the threads share one product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Split {
    /// Each thread widens and multiplies whole panels (`gemm` single-threaded inside).
    Panels,
    /// Panels one after another, `gemm` spreading each over the threads.
    WithinPanel,
}

/// Weight rows per panel and the split for an `[m, k] · [k, n]` product on `threads` threads.
///
/// A panel's widened rows (`panel × k`) and the f32 rows a half-precision output goes through
/// (`m × panel`) both keep to the split's byte budget.
pub(super) fn plan(m: usize, k: usize, n: usize, threads: usize) -> (usize, Split) {
    let rows = |bytes: usize| (bytes / (4 * k.max(m).max(1)) / PANEL_ALIGN * PANEL_ALIGN).max(PANEL_ALIGN);
    if m >= SPLIT_WITHIN_ROWS {
        return (rows(WIDE_PANEL_BYTES), Split::WithinPanel);
    }
    // A whole number of panels per thread, so none idles while another finishes an extra one.
    let cap = rows(SHARED_PANEL_BYTES);
    let panels = n.div_ceil(cap).max(1).next_multiple_of(threads.max(1));
    (n.div_ceil(panels).next_multiple_of(PANEL_ALIGN).min(cap), Split::Panels)
}

/// A half-precision weight element, widened a slice at a time.
pub(super) trait Widen: Copy + Send + Sync {
    /// Writes `src` as f32 into `dst` (same length).
    fn widen(src: &[Self], dst: &mut [f32]);
}

impl Widen for bf16 {
    fn widen(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
}

impl Widen for f16 {
    fn widen(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
}

/// An output element: f32 is written by `gemm` in place, half types through an f32 row buffer.
pub(super) trait Narrow: Copy + Send + Sync + 'static {
    /// Zero, to size the output.
    const ZERO: Self;
    /// `dst` viewed as f32, when it is f32.
    fn as_f32(dst: *mut Self) -> Option<*mut f32>;
    /// Writes `src` (plus `bias`, same length, if any) into `dst` (same length).
    fn narrow(src: &mut [f32], bias: Option<&[f32]>, dst: &mut [Self]);
}

impl Narrow for f32 {
    const ZERO: Self = 0.0;
    fn as_f32(dst: *mut Self) -> Option<*mut f32> {
        Some(dst)
    }
    fn narrow(src: &mut [f32], bias: Option<&[f32]>, dst: &mut [Self]) {
        add_bias(src, bias);
        dst.copy_from_slice(src);
    }
}

impl Narrow for bf16 {
    const ZERO: Self = bf16::ZERO;
    fn as_f32(_: *mut Self) -> Option<*mut f32> {
        None
    }
    fn narrow(src: &mut [f32], bias: Option<&[f32]>, dst: &mut [Self]) {
        add_bias(src, bias);
        dst.convert_from_f32_slice(src);
    }
}

impl Narrow for f16 {
    const ZERO: Self = f16::ZERO;
    fn as_f32(_: *mut Self) -> Option<*mut f32> {
        None
    }
    fn narrow(src: &mut [f32], bias: Option<&[f32]>, dst: &mut [Self]) {
        add_bias(src, bias);
        dst.convert_from_f32_slice(src);
    }
}

fn add_bias(row: &mut [f32], bias: Option<&[f32]>) {
    if let Some(b) = bias {
        row.iter_mut().zip(b).for_each(|(o, b)| *o += b);
    }
}

/// A buffer's base pointer, shared by tasks that write disjoint parts of it.
#[derive(Clone, Copy)]
struct OutPtr<O>(*mut O);
// SAFETY: the tasks given an `OutPtr` write only their own part (a panel's columns, a row), and
// the buffer outlives them (they run inside the scope that owns it).
unsafe impl<O: Send> Send for OutPtr<O> {}
// SAFETY: as above.
unsafe impl<O: Send> Sync for OutPtr<O> {}

impl<O> OutPtr<O> {
    /// The base pointer (a method, so closures capture the whole `Sync` wrapper, not the field).
    fn get(self) -> *mut O {
        self.0
    }
}

/// `x·wᵀ (+ bias)` for `x` `[m, k]` (f32), `w` `[n, k]` (half), `bias` `[n]`; `[m, n]` in `O`.
///
/// Weight rows are widened `panel` at a time; `split` says how the threads share the work.
#[allow(clippy::too_many_arguments)]
pub(super) fn product<W: Widen, O: Narrow>(x: &[f32], w: &[W], bias: Option<&[f32]>, m: usize, k: usize, n: usize, panel: usize, split: Split) -> Vec<O> {
    thread_local! {
        static PANEL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
        static ROWS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }
    let mut out = vec![O::ZERO; m * n];
    if out.is_empty() {
        return out;
    }
    let panel = panel.clamp(1, n);
    let panels = n.div_ceil(panel);
    let dst = OutPtr(out.as_mut_ptr());
    match split {
        Split::Panels => (0..panels).into_par_iter().for_each(|p| {
            let (j0, np) = (p * panel, panel.min(n - p * panel));
            // The two scratch buffers are only borrowed around single-threaded work, so a task
            // that rayon runs on this thread meanwhile never finds them borrowed.
            PANEL.with_borrow_mut(|wide| {
                let wide = grow(wide, np * k);
                W::widen(&w[j0 * k..(j0 + np) * k], wide);
                ROWS.with_borrow_mut(|rows| {
                    let rows = if O::as_f32(dst.get()).is_some() { &mut [][..] } else { grow(rows, m * np) };
                    // SAFETY: this task writes columns j0..j0 + np only; see `panel_into`.
                    unsafe { panel_into(x, wide, bias, m, k, n, j0, np, dst, rows, gemm::Parallelism::None) };
                });
            });
        }),
        Split::WithinPanel => {
            let par = match rayon::current_num_threads() {
                0 | 1 => gemm::Parallelism::None,
                threads => gemm::Parallelism::Rayon(threads),
            };
            // Per call rather than thread-local: `gemm` runs rayon jobs while these are in use.
            let mut wide = vec![0f32; panel * k];
            let mut rows = if O::as_f32(dst.get()).is_some() { Vec::new() } else { vec![0f32; m * panel] };
            for p in 0..panels {
                let (j0, np) = (p * panel, panel.min(n - p * panel));
                let wide = &mut wide[..np * k];
                let chunk = (k * PANEL_ALIGN).max(1);
                w[j0 * k..(j0 + np) * k].par_chunks(chunk).zip(wide.par_chunks_mut(chunk)).for_each(|(s, d)| W::widen(s, d));
                // SAFETY: one panel at a time; see `panel_into`.
                unsafe { panel_into(x, wide, bias, m, k, n, j0, np, dst, &mut rows, par) };
            }
        }
    }
    out
}

/// `buf` grown to at least `len` and cut to it.
fn grow(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    &mut buf[..len]
}

/// Columns `j0..j0 + np` of the `[m, n]` output at `dst`: `x` `[m, k]` times the widened panel
/// `wide` `[np, k]` transposed, plus the bias. f32 outputs are written by `gemm` in place (the bias
/// laid down first and read back by it); half outputs go through `rows` (`≥ m·np`) and are
/// narrowed row by row.
///
/// # Safety
/// `dst` must address `m·n` elements, and nothing else may access columns `j0..j0 + np` of them
/// during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn panel_into<O: Narrow>(
    x: &[f32],
    wide: &[f32],
    bias: Option<&[f32]>,
    m: usize,
    k: usize,
    n: usize,
    j0: usize,
    np: usize,
    dst: OutPtr<O>,
    rows: &mut [f32],
    par: gemm::Parallelism,
) {
    let bias = bias.map(|b| &b[j0..j0 + np]);
    // SAFETY: row r's columns j0..j0 + np of the output: inside it (the caller's promise), and no
    // other task of this call writes them (each row goes to one `each_row` task).
    let out_row = move |r: usize| unsafe { std::slice::from_raw_parts_mut(dst.get().add(r * n + j0), np) };
    if let Some(out) = O::as_f32(dst.get()) {
        let out = OutPtr(out);
        // SAFETY: as `out_row`, the same memory viewed as the f32 it is.
        let out_row = move |r: usize| unsafe { std::slice::from_raw_parts_mut(out.get().add(r * n + j0), np) };
        if let Some(b) = bias {
            each_row(m, par, |r| out_row(r).copy_from_slice(b));
        } else if k == 0 {
            each_row(m, par, |r| out_row(r).fill(0.0));
        }
        if k > 0 {
            // SAFETY: the output block is m×np with row stride n from column j0; `x` is m×k
            // row-major; `wide` is np×k row-major, read as its k×np transpose through the strides.
            unsafe {
                gemm::gemm(m, np, k, out.get().add(j0), 1, n as isize, bias.is_some(), x.as_ptr(), 1, k as isize, wide.as_ptr(), k as isize, 1, 1.0, 1.0, false, false, false, par);
            }
        }
        return;
    }
    let rows = &mut rows[..m * np];
    if k == 0 {
        rows.fill(0.0);
    } else {
        // SAFETY: `rows` is m×np row-major; `x` and `wide` as above.
        unsafe {
            gemm::gemm(m, np, k, rows.as_mut_ptr(), 1, np as isize, false, x.as_ptr(), 1, k as isize, wide.as_ptr(), k as isize, 1, 0.0, 1.0, false, false, false, par);
        }
    }
    let rows = OutPtr(rows.as_mut_ptr());
    // SAFETY: row r of `rows` (m×np) is touched by this task alone.
    let row = move |r: usize| unsafe { std::slice::from_raw_parts_mut(rows.get().add(r * np), np) };
    each_row(m, par, |r| O::narrow(row(r), bias, out_row(r)));
}

/// `f(r)` for every row `r < m`, over the threads when `par` says the caller may use them.
fn each_row(m: usize, par: gemm::Parallelism, f: impl Fn(usize) + Sync + Send) {
    match par {
        gemm::Parallelism::None => (0..m).for_each(f),
        _ => (0..m).into_par_iter().for_each(f),
    }
}

/// The panel product as a candle op: `x` `[m, k]`, `w` `[n, k]` (BF16/F16), optional `bias` `[n]`.
struct PanelProduct;

/// The f32 values of a contiguous float tensor, borrowed when it already is f32.
fn f32_values<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<Cow<'a, [f32]>> {
    let Some((a, b)) = layout.contiguous_offsets() else {
        candle_core::bail!("sd-linear: the {what} is not contiguous");
    };
    let widen = |len: usize, f: &(dyn Fn(usize, &mut [f32]) + Sync)| -> Vec<f32> {
        let mut v = vec![0f32; len];
        v.par_chunks_mut(1 << 16).enumerate().for_each(|(i, d)| f(i << 16, d));
        v
    };
    Ok(match storage {
        CpuStorage::F32(v) => Cow::Borrowed(&v[a..b]),
        CpuStorage::BF16(v) => Cow::Owned(widen(b - a, &|i, d| v[a + i..a + i + d.len()].convert_to_f32_slice(d))),
        CpuStorage::F16(v) => Cow::Owned(widen(b - a, &|i, d| v[a + i..a + i + d.len()].convert_to_f32_slice(d))),
        CpuStorage::F64(v) => Cow::Owned(v[a..b].iter().map(|&x| x as f32).collect()),
        other => candle_core::bail!("sd-linear: the {what} has unsupported dtype {:?}", other.dtype()),
    })
}

impl PanelProduct {
    fn run(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout, bias: Option<(&CpuStorage, &Layout)>) -> Result<(CpuStorage, Shape)> {
        let (m, k) = xl.shape().dims2()?;
        let (n, kw) = wl.shape().dims2()?;
        if k != kw {
            candle_core::bail!("sd-linear: input [{m}, {k}] does not match weight [{n}, {kw}]");
        }
        let bias = match bias {
            Some((s, l)) => {
                let b = f32_values(s, l, "bias")?;
                if b.len() != n {
                    candle_core::bail!("sd-linear: bias of {} values for {n} outputs", b.len());
                }
                Some(b)
            }
            None => None,
        };
        let x = f32_values(xs, xl, "input")?;
        let Some((wa, wb)) = wl.contiguous_offsets() else {
            candle_core::bail!("sd-linear: the weight is not contiguous");
        };
        let (panel, split) = plan(m, k, n, rayon::current_num_threads());
        let bias = bias.as_deref();
        let storage = match (ws, xs.dtype()) {
            (CpuStorage::BF16(w), DType::F32) => CpuStorage::F32(product::<_, f32>(&x, &w[wa..wb], bias, m, k, n, panel, split)),
            (CpuStorage::BF16(w), DType::BF16) => CpuStorage::BF16(product::<_, bf16>(&x, &w[wa..wb], bias, m, k, n, panel, split)),
            (CpuStorage::BF16(w), DType::F16) => CpuStorage::F16(product::<_, f16>(&x, &w[wa..wb], bias, m, k, n, panel, split)),
            (CpuStorage::F16(w), DType::F32) => CpuStorage::F32(product::<_, f32>(&x, &w[wa..wb], bias, m, k, n, panel, split)),
            (CpuStorage::F16(w), DType::BF16) => CpuStorage::BF16(product::<_, bf16>(&x, &w[wa..wb], bias, m, k, n, panel, split)),
            (CpuStorage::F16(w), DType::F16) => CpuStorage::F16(product::<_, f16>(&x, &w[wa..wb], bias, m, k, n, panel, split)),
            (w, x) => candle_core::bail!("sd-linear: no panel product for a {:?} weight and {x:?} input", w.dtype()),
        };
        Ok((storage, Shape::from((m, n))))
    }
}

impl candle_core::CustomOp2 for PanelProduct {
    fn name(&self) -> &'static str {
        "sd-linear"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run(xs, xl, ws, wl, None)
    }
}

impl candle_core::CustomOp3 for PanelProduct {
    fn name(&self) -> &'static str {
        "sd-linear"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout, bs: &CpuStorage, bl: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run(xs, xl, ws, wl, Some((bs, bl)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32 * 0.618 + seed as f32 * 1.7).sin() * 43758.547).fract() * 4.0 - 2.0).collect()
    }

    /// `x·wᵀ + b` in f64 and, per element, the bound on f32 accumulation error over `k` terms
    /// (`k·ε·Σ|x·w|`, the classic worst case, plus the bias).
    fn reference(x: &[f32], w: &[f32], bias: Option<&[f32]>, m: usize, k: usize, n: usize) -> (Vec<f64>, Vec<f64>) {
        let (mut out, mut tol) = (vec![0f64; m * n], vec![0f64; m * n]);
        for i in 0..m {
            for j in 0..n {
                let (mut s, mut a) = (0f64, 0f64);
                for c in 0..k {
                    let p = x[i * k + c] as f64 * w[j * k + c] as f64;
                    s += p;
                    a += p.abs();
                }
                let b = bias.map_or(0.0, |b| b[j] as f64);
                out[i * n + j] = s + b;
                tol[i * n + j] = (k as f64 + 2.0) * f32::EPSILON as f64 * (a + b.abs()) + 1e-30;
            }
        }
        (out, tol)
    }

    /// Checks `got` against the reference, allowing `rel` of |value| on top for a narrowed output.
    fn check(got: &[f64], expect: &[f64], tol: &[f64], rel: f64, what: &str) {
        assert_eq!(got.len(), expect.len(), "{what}");
        for (i, ((g, e), t)) in got.iter().zip(expect).zip(tol).enumerate() {
            let allowed = t + rel * e.abs();
            assert!((g - e).abs() <= allowed, "{what}: element {i}: {g} vs {e} (allowed {allowed})");
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn run<W: Widen, O: Narrow>(x: &[f32], w: &[W], bias: Option<&[f32]>, m: usize, k: usize, n: usize, panel: usize, split: Split, to64: fn(O) -> f64) -> Vec<f64> {
        product::<W, O>(x, w, bias, m, k, n, panel, split).into_iter().map(to64).collect()
    }

    #[test]
    fn panel_product_matches_f64_reference_on_odd_shapes_and_panel_edges() {
        let mut case = 0usize;
        for &m in &[1, 7, 77, 300] {
            for &k in &[3, 40, 320, 1000] {
                for &n in &[1, 5, 257] {
                    let x = data(m * k, 1);
                    let w32 = data(n * k, 2);
                    let b = data(n, 3);
                    let wb: Vec<bf16> = w32.iter().map(|&v| bf16::from_f32(v)).collect();
                    let wh: Vec<f16> = w32.iter().map(|&v| f16::from_f32(v)).collect();
                    let wb32: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
                    let wh32: Vec<f32> = wh.iter().map(|v| v.to_f32()).collect();
                    // Panels of one row, of n − 1 / n / n + 1 rows (n = panel ± 1), one tile high, one
                    // splitting 257 unevenly, and the planned ones on 2 and 64 threads.
                    let planned = [plan(m, k, n, 2).0, plan(m, k, n, 64).0];
                    for &panel in &[1, 16, n.saturating_sub(1).max(1), n, n + 1, PANEL_ALIGN, 256, planned[0], planned[1]] {
                        for split in [Split::Panels, Split::WithinPanel] {
                            case += 1;
                            let bias = if case % 2 == 0 { Some(&b[..]) } else { None };
                            let what = format!("m {m} k {k} n {n} panel {panel} {split:?} bias {}", bias.is_some());
                            let (eb, tb) = reference(&x, &wb32, bias, m, k, n);
                            let (eh, th) = reference(&x, &wh32, bias, m, k, n);
                            // Output dtypes rotate so every shape meets each over its panels.
                            match case % 3 {
                                0 => {
                                    check(&run::<_, f32>(&x, &wb, bias, m, k, n, panel, split, |v| v as f64), &eb, &tb, 0.0, &format!("bf16→f32 {what}"));
                                    check(&run::<_, f32>(&x, &wh, bias, m, k, n, panel, split, |v| v as f64), &eh, &th, 0.0, &format!("f16→f32 {what}"));
                                }
                                1 => {
                                    check(&run::<_, bf16>(&x, &wb, bias, m, k, n, panel, split, |v| v.to_f64()), &eb, &tb, 1.0 / 256.0, &format!("bf16→bf16 {what}"));
                                    check(&run::<_, f16>(&x, &wh, bias, m, k, n, panel, split, |v| v.to_f64()), &eh, &th, 1.0 / 2048.0, &format!("f16→f16 {what}"));
                                }
                                _ => {
                                    check(&run::<_, f16>(&x, &wb, bias, m, k, n, panel, split, |v| v.to_f64()), &eb, &tb, 1.0 / 2048.0, &format!("bf16→f16 {what}"));
                                    check(&run::<_, bf16>(&x, &wh, bias, m, k, n, panel, split, |v| v.to_f64()), &eh, &th, 1.0 / 256.0, &format!("f16→bf16 {what}"));
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn plan_follows_its_budgets() {
        // FLUX img+txt tokens and SD 1.5's 4096: the row buffer (m × panel f32) sets the size;
        // at 256 tokens of 320 channels the widened panel does (6528 × 320), cut to n later.
        assert_eq!(plan(4608, 3072, 12288, 2), (432, Split::WithinPanel));
        assert_eq!(plan(4096, 320, 1280, 2), (480, Split::WithinPanel));
        assert_eq!(plan(SPLIT_WITHIN_ROWS, 320, 1280, 2), (6528, Split::WithinPanel));
        assert_eq!(plan(SPLIT_WITHIN_ROWS, 3072, 1280, 2), (672, Split::WithinPanel));
        // A modulation vector: 2 MiB panels (144 rows of 3072), 128 of them.
        assert_eq!(plan(1, 3072, 18432, 2), (144, Split::Panels));
        // CLIP's MLP: 5 panels of 672 would leave a thread idle for the last; 6 of 528.
        assert_eq!(plan(SPLIT_WITHIN_ROWS - 1, 768, 3072, 2), (528, Split::Panels));
        assert_eq!(plan(77, 768, 3072, 64), (48, Split::Panels));
        // Tiny and huge widths: one tile-high panel at least.
        assert_eq!(plan(1, 3, 5, 2), (48, Split::Panels));
        assert_eq!(plan(1, 1 << 20, 100, 64), (48, Split::Panels));
        assert_eq!(plan(1000, 1 << 20, 100, 1), (48, Split::WithinPanel));
        assert_eq!(plan(1, 0, 7, 0), (48, Split::Panels));
        // Tiny widths with a batch: the f32 row buffer (m × panel) keeps to the 2 MiB too.
        assert_eq!(plan(100, 3, 1 << 20, 2), (5232, Split::Panels));
    }

    fn to64(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<f64>()).expect("to f64")
    }

    /// The layer's output against candle's F64 product of the same (widened) values.
    fn check_layer(layer: &Linear, x: &Tensor, what: &str) -> Result<()> {
        let y = layer.forward(x)?;
        assert_eq!(y.dtype(), x.dtype(), "{what}: output dtype");
        let (n, k) = layer.weight().dims2()?;
        let mut dims = x.dims().to_vec();
        *dims.last_mut().expect("rank ≥ 2") = n;
        assert_eq!(y.dims(), &dims[..], "{what}: output shape");
        let m = x.elem_count() / k;
        let xs: Vec<f32> = to64(x).into_iter().map(|v| v as f32).collect();
        let ws: Vec<f32> = to64(layer.weight()).into_iter().map(|v| v as f32).collect();
        let bs: Option<Vec<f32>> = layer.bias().map(|b| to64(b).into_iter().map(|v| v as f32).collect());
        let (e, t) = reference(&xs, &ws, bs.as_deref(), m, k, n);
        let rel = match x.dtype() {
            DType::BF16 => 1.0 / 256.0,
            DType::F16 => 1.0 / 2048.0,
            _ => 0.0,
        };
        check(&to64(&y), &e, &t, rel, what);
        Ok(())
    }

    #[test]
    fn layer_matches_reference_for_half_weights_any_rank_and_layout() -> Result<()> {
        let dev = Device::Cpu;
        // m on both sides of the split; panel edges are the product test's.
        let shapes = [(1, 1000, 5), (7, 1000, 263), (77, 320, 819), (300, 320, 97), (130, 40, 5), (2, 3, 257)];
        for (i, &(m, k, n)) in shapes.iter().enumerate() {
            for w_dtype in [DType::BF16, DType::F16] {
                for x_dtype in [DType::F32, DType::BF16] {
                    for with_bias in [false, true] {
                        let w = Tensor::from_vec(data(n * k, 5), (n, k), &dev)?.to_dtype(w_dtype)?;
                        let b = if with_bias { Some(Tensor::from_vec(data(n, 6), n, &dev)?.to_dtype(w_dtype)?) } else { None };
                        let layer = Linear::new(w, b);
                        let x = Tensor::from_vec(data(m * k, 7), (m, k), &dev)?.to_dtype(x_dtype)?;
                        let what = format!("m {m} k {k} n {n} w {w_dtype:?} x {x_dtype:?} bias {with_bias}");
                        // Rank 2, 3 and 4 views of the same rows (m split where it divides).
                        check_layer(&layer, &x, &format!("rank 2 {what}"))?;
                        check_layer(&layer, &x.reshape((1, m, k))?, &format!("rank 3 {what}"))?;
                        let (a, r) = if m % 7 == 0 { (7, m / 7) } else { (1, m) };
                        check_layer(&layer, &x.reshape((1, a, r, k))?, &format!("rank 4 {what}"))?;
                        // Strided views: [k, m] stored and read as [m, k]; row blocks swapped.
                        if i % 2 == 0 || m >= SPLIT_WITHIN_ROWS {
                            let xt = x.t()?.contiguous()?.t()?;
                            assert!(!xt.is_contiguous() || m == 1);
                            check_layer(&layer, &xt, &format!("non-contiguous {what}"))?;
                            let a = (2..=7).find(|d| m % d == 0).unwrap_or(1);
                            let (a, r) = (a, m / a);
                            let x3 = x.reshape((a, r, k))?.transpose(0, 1)?;
                            check_layer(&layer, &x3, &format!("transposed rank 3 {what}"))?;
                            let x4 = x.reshape((1, a, r, k))?.transpose(1, 2)?;
                            check_layer(&layer, &x4, &format!("transposed rank 4 {what}"))?;
                        }
                    }
                }
            }
        }
        // F16 activations against a BF16 weight.
        let w = Tensor::from_vec(data(9 * 40, 8), (9, 40), &dev)?.to_dtype(DType::BF16)?;
        let x = Tensor::from_vec(data(3 * 40, 9), (3, 40), &dev)?.to_dtype(DType::F16)?;
        check_layer(&Linear::new(w, None), &x, "f16 input, bf16 weight")?;
        Ok(())
    }

    #[test]
    fn f32_weights_are_bit_identical_to_candle_nn() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1., (37, 40), &dev)?;
        let b = Tensor::randn(0f32, 1., 37, &dev)?;
        let x = Tensor::randn(0f32, 1., (2, 3, 5, 40), &dev)?;
        let inputs = [
            x.clone(),
            x.reshape((6, 5, 40))?,
            x.reshape((30, 40))?,
            x.transpose(1, 2)?,
            x.reshape((6, 5, 40))?.transpose(0, 1)?,
        ];
        let mut compared = 0;
        for bias in [None, Some(b)] {
            let ours = Linear::new(w.clone(), bias.clone());
            let theirs = candle_nn::Linear::new(w.clone(), bias);
            for x in &inputs {
                // Same result or the same refusal: candle's matmul rejects some strided rank-4 views.
                match (ours.forward(x), theirs.forward(x)) {
                    (Ok(a), Ok(e)) => {
                        assert_eq!(a.dims(), e.dims());
                        let bits = |t: &Tensor| -> Result<Vec<u32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?.into_iter().map(f32::to_bits).collect()) };
                        assert_eq!(bits(&a)?, bits(&e)?, "input {:?}", x.dims());
                        compared += 1;
                    }
                    // The first line: candle appends a backtrace (which differs) when RUST_BACKTRACE is set.
                    (Err(a), Err(e)) => assert_eq!(a.to_string().lines().next(), e.to_string().lines().next()),
                    (a, e) => panic!("input {:?}: ours {:?}, candle-nn {:?}", x.dims(), a.map(|t| t.dims().to_vec()), e.map(|t| t.dims().to_vec())),
                }
            }
        }
        // Both contiguous ranks and the strided rank-3 view, with and without bias.
        assert!(compared >= 8, "{compared}");
        Ok(())
    }

    #[test]
    fn bad_shapes_are_errors_and_empty_widths_give_the_bias() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::zeros((4, 6), DType::BF16, &dev)?;
        let layer = Linear::new(w, Some(Tensor::ones(4, DType::BF16, &dev)?));
        assert!(layer.forward(&Tensor::zeros((2, 5), DType::F32, &dev)?).is_err());
        assert!(Linear::new(Tensor::zeros((4, 6), DType::BF16, &dev)?, Some(Tensor::ones(3, DType::BF16, &dev)?))
            .forward(&Tensor::zeros((2, 6), DType::F32, &dev)?)
            .is_err());
        let empty = Linear::new(Tensor::zeros((4, 0), DType::BF16, &dev)?, Some(Tensor::ones(4, DType::BF16, &dev)?));
        let y = empty.forward(&Tensor::zeros((3, 0), DType::F32, &dev)?)?;
        assert_eq!(y.to_vec2::<f32>()?, vec![vec![1f32; 4]; 3]);
        let y = Linear::new(Tensor::zeros((4, 0), DType::BF16, &dev)?, None).forward(&Tensor::zeros((3, 0), DType::BF16, &dev)?)?;
        assert_eq!(y.to_dtype(DType::F32)?.to_vec2::<f32>()?, vec![vec![0f32; 4]; 3]);
        assert_eq!(layer.forward(&Tensor::zeros((0, 6), DType::F32, &dev)?)?.dims(), &[0, 4]);
        // Zero-width inputs on the large-batch split too, in both output kinds.
        let m = SPLIT_WITHIN_ROWS + 3;
        let y = empty.forward(&Tensor::zeros((m, 0), DType::F32, &dev)?)?;
        assert_eq!(y.to_vec2::<f32>()?, vec![vec![1f32; 4]; m]);
        let y = empty.forward(&Tensor::zeros((m, 0), DType::BF16, &dev)?)?;
        assert_eq!(y.to_dtype(DType::F32)?.to_vec2::<f32>()?, vec![vec![1f32; 4]; m]);
        Ok(())
    }
}
