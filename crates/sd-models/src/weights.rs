//! Turning memory-mapped safetensors bytes into tensors of the requested dtype in one parallel pass.
//!
//! candle's own path (`MmapedSafetensors::load`, then `Tensor::to_dtype`) first copies each tensor
//! into memory as stored and then converts it element by element on one thread: a second copy alive
//! per tensor and a single-core loop, which made loading an fp16 SD 1.5 folder as F32 2–3× slower
//! than diffusers. Here every tensor is converted straight from the mapped pages into the buffer the
//! model keeps, in parallel chunks (F16C-vectorised for f16), so the only resident copy of the
//! weights is the one in the requested dtype: the mapped pages are file-backed and the OS can drop
//! them. The model loaders of this crate (diffusers folders, single-file checkpoints, separate VAEs)
//! all read weights through [`load_view`], [`load_view_rows`] or [`MappedWeights`], and so do sd-flux
//! (transformer, T5, CLIP), sd-controlnet and sd-lora, so every model family loads the same way.

use std::mem::MaybeUninit;
use std::ops::Range;

use candle_core::safetensors::{Load, MmapedSafetensors};
use candle_core::{DType, Device, Shape, Tensor, WithDType};
use candle_nn::var_builder::SimpleBackend;
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;
use safetensors::tensor::TensorView;

/// Elements per parallel task: enough to amortise rayon's scheduling, few enough that even a
/// mid-sized tensor spreads over every core.
const CHUNK: usize = 1 << 16;

/// Elements converted at a time inside a task; the stack buffers of one block stay in L1.
const BLOCK: usize = 2048;

/// A float type the loaders convert between, always through f32 (exact from f16/bf16, so the
/// results match candle's `to_dtype` bit for bit).
///
/// # Safety
///
/// Every bit pattern of `size_of::<Self>()` bytes must be a valid value, because stored bytes are
/// reinterpreted as `Self`.
unsafe trait Float: Copy + Default + Send + Sync + 'static {
    fn to_f32(src: &[Self], dst: &mut [f32]);
    fn from_f32(src: &[f32], dst: &mut [Self]);
}

// SAFETY: f32 has no invalid bit patterns.
unsafe impl Float for f32 {
    fn to_f32(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src)
    }
    fn from_f32(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src)
    }
}

// SAFETY: f16 is a transparent u16.
unsafe impl Float for f16 {
    fn to_f32(src: &[f16], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst)
    }
    fn from_f32(src: &[f32], dst: &mut [f16]) {
        dst.convert_from_f32_slice(src)
    }
}

// SAFETY: bf16 is a transparent u16.
unsafe impl Float for bf16 {
    fn to_f32(src: &[bf16], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst)
    }
    fn from_f32(src: &[f32], dst: &mut [bf16]) {
        dst.convert_from_f32_slice(src)
    }
}

/// Faults in the whole pages of the `len` bytes at `ptr` (memory about to be written) in one system
/// call instead of one page fault per 4 KiB page.
///
/// Measured loading SD 1.5 (4.3 GB of F32) on a 2-core VM: faulting the destination page by page
/// cost 2.6–3.2 s of kernel time against 0.5–0.7 s of conversion; populating each chunk's range
/// first brought that to 1.7–2.0 s. (Transparent huge pages cut it further on an idle machine but
/// made a load several times slower right after another process had freed its memory, because the
/// VM's host had taken those pages back; so they are not requested.)
#[cfg(target_os = "linux")]
fn prefault(ptr: usize, len: usize) {
    const PAGE: usize = 4096;
    let start = ptr.next_multiple_of(PAGE);
    let end = (ptr + len) / PAGE * PAGE;
    if end > start {
        // SAFETY: the range lies inside an allocation the caller owns; MADV_POPULATE_WRITE only
        // faults its pages in and never changes their contents. Kernels before 5.14 refuse it,
        // leaving the pages to be faulted in as they are written, so the result is ignored.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_POPULATE_WRITE) };
    }
}

#[cfg(not(target_os = "linux"))]
fn prefault(_ptr: usize, _len: usize) {}

/// A vector of `n` elements, each chunk of `CHUNK` written by `fill(first_index, chunk)` on rayon's pool.
///
/// `fill` must write every slot of the chunk it is given.
fn par_fill<T: Send>(n: usize, fill: impl Fn(usize, &mut [MaybeUninit<T>]) + Sync) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    let spare = &mut v.spare_capacity_mut()[..n];
    if n <= CHUNK {
        fill(0, spare);
    } else {
        spare.par_chunks_mut(CHUNK).enumerate().for_each(|(i, c)| {
            prefault(c.as_ptr() as usize, std::mem::size_of_val(c));
            fill(i * CHUNK, c)
        });
    }
    // SAFETY: the chunks cover all `n` slots and `fill` initialised each of them.
    unsafe { v.set_len(n) };
    v
}

/// Converts `src`, the bytes of `dst.len()` values of `S` at any alignment, into `dst`.
fn convert_block<S: Float, T: Float>(src: &[u8], dst: &mut [MaybeUninit<T>]) {
    let size = std::mem::size_of::<S>();
    let mut unaligned = [S::default(); BLOCK];
    let mut wide = [0f32; BLOCK];
    let mut out = [T::default(); BLOCK];
    for (b, dst) in dst.chunks_mut(BLOCK).enumerate() {
        let n = dst.len();
        let bytes = &src[b * BLOCK * size..(b * BLOCK + n) * size];
        let values: &[S] = if bytes.as_ptr().align_offset(std::mem::align_of::<S>()) == 0 {
            // SAFETY: aligned, `n` values long, and every bit pattern is a valid `S` (trait contract).
            unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<S>(), n) }
        } else {
            // safetensors does not promise aligned offsets; copy the block to an aligned buffer.
            // SAFETY: `unaligned` holds BLOCK >= n values of `S`, i.e. `bytes.len()` bytes.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), unaligned.as_mut_ptr().cast::<u8>(), bytes.len()) };
            &unaligned[..n]
        };
        S::to_f32(values, &mut wide[..n]);
        T::from_f32(&wide[..n], &mut out[..n]);
        // SAFETY: `MaybeUninit<T>` has `T`'s layout and `dst` is `n` slots disjoint from `out`.
        unsafe { std::ptr::copy_nonoverlapping(out.as_ptr(), dst.as_mut_ptr().cast::<T>(), n) };
    }
}

/// The values of `S` in `data` as a vector of `T`, converted in parallel.
fn convert<S: Float, T: Float>(data: &[u8]) -> Vec<T> {
    let size = std::mem::size_of::<S>();
    par_fill(data.len() / size, |start, chunk| convert_block::<S, T>(&data[start * size..(start + chunk.len()) * size], chunk))
}

/// The values of `T` in `data` (any alignment) as a vector, copied in parallel.
fn copy<T: WithDType>(data: &[u8]) -> Vec<T> {
    let size = std::mem::size_of::<T>();
    par_fill(data.len() / size, |start, chunk: &mut [MaybeUninit<T>]| {
        let bytes = &data[start * size..(start + chunk.len()) * size];
        // SAFETY: `chunk` is `bytes.len()` bytes of writable memory; a byte copy needs no alignment,
        // and candle's stored dtypes accept every bit pattern.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), chunk.as_mut_ptr().cast::<u8>(), bytes.len()) };
    })
}

/// A tensor of `dtype` and `shape` on `dev` from `data`, the little-endian bytes of `shape`'s
/// elements stored as `stored` (a slice of a memory map, at any alignment).
///
/// On the CPU, F16/BF16/F32 in any combination and same-dtype copies are done in parallel straight
/// into the tensor's buffer; other pairs and other devices take candle's path (a copy as stored,
/// then `to_dtype`), so every dtype candle loads still loads.
pub fn tensor_from_bytes(data: &[u8], stored: DType, shape: impl Into<Shape>, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
    let shape = shape.into();
    let fallback = || Tensor::from_raw_buffer(data, stored, shape.dims(), dev)?.to_dtype(dtype);
    if !dev.is_cpu() {
        return fallback();
    }
    let fast = matches!(stored, DType::F16 | DType::BF16 | DType::F32) && matches!(dtype, DType::F16 | DType::BF16 | DType::F32)
        || stored == dtype && matches!(stored, DType::U8 | DType::U32 | DType::I64 | DType::F64);
    if !fast {
        return fallback();
    }
    let need = shape.elem_count() * stored.size_in_bytes();
    if data.len() != need {
        candle_core::bail!(
            "stored tensor data is {} bytes but a {stored:?} tensor of shape {:?} needs {need}; the file is corrupt or truncated, re-download it",
            data.len(),
            shape.dims()
        );
    }
    match (stored, dtype) {
        (DType::F16, DType::F32) => Tensor::from_vec(convert::<f16, f32>(data), shape, dev),
        (DType::BF16, DType::F32) => Tensor::from_vec(convert::<bf16, f32>(data), shape, dev),
        (DType::F32, DType::F16) => Tensor::from_vec(convert::<f32, f16>(data), shape, dev),
        (DType::F32, DType::BF16) => Tensor::from_vec(convert::<f32, bf16>(data), shape, dev),
        (DType::F16, DType::BF16) => Tensor::from_vec(convert::<f16, bf16>(data), shape, dev),
        (DType::BF16, DType::F16) => Tensor::from_vec(convert::<bf16, f16>(data), shape, dev),
        (DType::F16, DType::F16) => Tensor::from_vec(copy::<f16>(data), shape, dev),
        (DType::BF16, DType::BF16) => Tensor::from_vec(copy::<bf16>(data), shape, dev),
        (DType::F32, DType::F32) => Tensor::from_vec(copy::<f32>(data), shape, dev),
        (DType::F64, DType::F64) => Tensor::from_vec(copy::<f64>(data), shape, dev),
        (DType::U8, DType::U8) => Tensor::from_vec(copy::<u8>(data), shape, dev),
        (DType::U32, DType::U32) => Tensor::from_vec(copy::<u32>(data), shape, dev),
        (DType::I64, DType::I64) => Tensor::from_vec(copy::<i64>(data), shape, dev),
        _ => fallback(),
    }
}

/// Tensors smaller than this keep their mapped pages: a syscall each would cost more than it saves.
const RELEASE_MIN_BYTES: usize = 1 << 20;

/// Drops the page-table entries of `data` once its tensor has been copied out of the mapping, so the
/// file's pages stop counting towards the process's resident set. Without this a model's peak RSS
/// while loading is its weights plus every page of the files touched so far (a 4 B-parameter bf16
/// model loaded as bf16: 7 GiB of copies and 7 GiB of mapped file). The pages stay in the page cache,
/// so reading the tensor again (a LoRA reload) is a memory copy, not a disk read. Linux only; a
/// no-op elsewhere and for small tensors.
///
/// # Safety
///
/// `data` must lie in a shared or read-only file mapping (candle's `MmapedSafetensors`): there
/// `MADV_DONTNEED` only unmaps pages the next access maps again from the file, while on private
/// anonymous memory it would zero them.
pub(crate) unsafe fn release_file_pages(data: &[u8]) {
    #[cfg(target_os = "linux")]
    {
        if data.len() < RELEASE_MIN_BYTES {
            return;
        }
        // SAFETY: sysconf has no preconditions.
        let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
            p if p > 0 => p as usize,
            _ => return,
        };
        // Whole pages inside the slice only, so a neighbouring tensor's pages stay as they are.
        let start = (data.as_ptr() as usize).next_multiple_of(page);
        let end = (data.as_ptr() as usize + data.len()) / page * page;
        if end > start {
            // SAFETY: [start, end) lies inside `data`, a file mapping (the caller's contract). The result
            // is ignored: failing to release only leaves the pages resident, as before.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = data;
}

/// [`load_view`] for a view of a file mapping (candle's `MmapedSafetensors`), releasing the view's
/// mapped pages once they are copied ([`release_file_pages`]).
pub(crate) fn load_mapped(st: &MmapedSafetensors, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
    let view = st.get(name)?;
    let t = load_view(&view, dtype, dev)?;
    // SAFETY: every `MmapedSafetensors` view is a slice of a read-only shared file mapping.
    unsafe { release_file_pages(view.data()) };
    Ok(t)
}

/// Loads the stored tensor `view` as `dtype` on `dev` (see [`tensor_from_bytes`]).
pub fn load_view(view: &TensorView<'_>, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
    match DType::try_from(view.dtype()) {
        Ok(stored) => tensor_from_bytes(view.data(), stored, view.shape(), dtype, dev),
        // Stored dtypes candle widens on load (U16) or refuses: its own loader says which.
        Err(_) => view.load(dev)?.to_dtype(dtype),
    }
}

/// Loads rows `rows` (along dim 0) of the stored tensor `view` as `dtype` on `dev`, converting only
/// those rows.
pub fn load_view_rows(view: &TensorView<'_>, rows: Range<usize>, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
    let dims = view.shape();
    let Some(&total) = dims.first() else {
        candle_core::bail!("cannot take rows {rows:?} of a scalar tensor");
    };
    if rows.start > rows.end || rows.end > total {
        candle_core::bail!("rows {rows:?} are out of range for a tensor of shape {dims:?}");
    }
    let mut shape = dims.to_vec();
    shape[0] = rows.len();
    match DType::try_from(view.dtype()) {
        Ok(stored) => {
            let row_bytes = dims[1..].iter().product::<usize>() * stored.size_in_bytes();
            let data = view.data().get(rows.start * row_bytes..rows.end * row_bytes).ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "stored tensor data is {} bytes, too short for shape {dims:?}; the file is corrupt or truncated, re-download it",
                    view.data().len()
                ))
            })?;
            tensor_from_bytes(data, stored, shape, dtype, dev)
        }
        Err(_) => view.load(dev)?.narrow(0, rows.start, rows.len())?.to_dtype(dtype)?.contiguous(),
    }
}

/// A [`SimpleBackend`] serving the tensors of memory-mapped safetensors files by their stored names,
/// converted straight from the mapping (see [`load_view`]). Diffusers folders and diffusers-named VAE
/// files load through it; its errors are the ones candle's `MmapedSafetensors` backend gives.
pub struct MappedWeights {
    st: MmapedSafetensors,
}

impl MappedWeights {
    /// Serves the tensors of `st`.
    pub fn new(st: MmapedSafetensors) -> Self {
        Self { st }
    }

    /// The stored tensor `name`, unconverted.
    pub fn view(&self, name: &str) -> candle_core::Result<TensorView<'_>> {
        self.st.get(name)
    }
}

impl MappedWeights {
    /// `t` (the stored tensor `name`) times its scale, for ComfyUI's float8 files. Its older "fp8 scaled"
    /// files store each linear weight as `weight / scale` in float8 beside a `<module>.scale_weight` (one
    /// scale, or one per output row); its newer quantized files (`comfy_quant`) store a float8 weight beside
    /// `<module>.weight_scale` and a `<module>.comfy_quant` record naming the format. The true weight is
    /// their product. Tensors without a scale come back as loaded; formats other than float8 (int8 blocks,
    /// nvfp4, mxfp8) are refused rather than read as if they were plain weights.
    fn dequantize(&self, name: &str, t: Tensor, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let Some(stem) = name.strip_suffix(".weight") else {
            return Ok(t);
        };
        if let Ok(record) = self.st.get(&format!("{stem}.comfy_quant")) {
            check_comfy_quant(name, record.data())?;
        }
        let scale = self.st.get(&format!("{stem}.scale_weight")).or_else(|_| self.st.get(&format!("{stem}.weight_scale")));
        let Ok(scale) = scale else {
            return Ok(t);
        };
        let scale = load_view(&scale, DType::F32, dev)?;
        let rows = t.dims().first().copied().unwrap_or(1);
        let scale = match scale.elem_count() {
            1 => scale.flatten_all()?,
            n if n == rows => {
                let mut shape = vec![1; t.rank()];
                shape[0] = rows;
                scale.reshape(shape)?
            }
            n => candle_core::bail!(
                "{name}: its scale has {n} values, neither one nor one per output row ({rows}); this block-wise \
                 quantized file is not supported, use a bf16, fp16 or float8 file of the model"
            ),
        };
        t.to_dtype(DType::F32)?.broadcast_mul(&scale)?.to_dtype(dtype)
    }
}

/// Checks the `comfy_quant` record (UTF-8 JSON such as `{"format": "float8_e4m3fn"}`, stored as a byte
/// tensor) of the weight `name`: only float8 with one scale per tensor or per row can be dequantized here.
fn check_comfy_quant(name: &str, record: &[u8]) -> candle_core::Result<()> {
    let format = serde_json::from_slice::<serde_json::Value>(record)
        .ok()
        .and_then(|v| v.get("format").and_then(|f| f.as_str()).map(str::to_string));
    match format.as_deref() {
        Some("float8_e4m3fn") => Ok(()),
        Some(other) => candle_core::bail!(
            "{name} is quantized in ComfyUI's {other:?} format, which this loader cannot dequantize (it reads \
             float8_e4m3fn with per-tensor scales); use a bf16, fp16 or fp8 file of this model"
        ),
        None => candle_core::bail!(
            "{name} has a comfy_quant record this loader cannot read ({} bytes, no \"format\"); use a bf16, fp16 \
             or fp8 file of this model",
            record.len()
        ),
    }
}

impl SimpleBackend for MappedWeights {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let view = self.st.get(name)?;
        // Checked before converting, so a wrong checkpoint fails without touching its data.
        if view.shape() != s.dims() {
            Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: view.shape().into(),
            }
            .bt())?
        }
        self.dequantize(name, load_mapped(&self.st, name, dtype, dev)?, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.dequantize(name, load_mapped(&self.st, name, dtype, dev)?, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.st.get(name).is_ok()
    }
}

/// How one tensor a model asks for is assembled from the tensors a file stores under other names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The same tensor under another name.
    Rename(String),
    /// Several tensors concatenated along dim 0 (fused q/k/v projections).
    Concat(Vec<String>),
    /// One tensor with its two halves along dim 0 swapped (adaLN layers that emit (shift, scale) in one
    /// layout and (scale, shift) in the other).
    SwapHalves(String),
}

/// The name map of a [`RenamedWeights`]: the stored source of each name the model asks for.
pub type NameMap = Box<dyn Fn(&str) -> Option<Source> + Send + Sync>;

/// A [`SimpleBackend`] serving a model's tensor names out of files stored with another layout's names
/// (FLUX's and SD3's diffusers folders for models written with the original names): nothing is converted
/// ahead of time, each tensor is renamed, concatenated or reordered when the model asks for it, and
/// converted straight from the mapping as [`MappedWeights`] does.
pub struct RenamedWeights {
    st: MmapedSafetensors,
    map: NameMap,
    source: String,
    hint: String,
}

impl RenamedWeights {
    /// Serves `map`'s names from `st`; `source` describes the files in errors, `hint` says what they should
    /// be ("a FLUX transformer folder").
    pub fn new(st: MmapedSafetensors, map: NameMap, source: impl Into<String>, hint: impl Into<String>) -> Self {
        Self { st, map, source: source.into(), hint: hint.into() }
    }

    /// Every stored tensor name.
    pub fn stored_names(&self) -> Vec<String> {
        self.st.tensors().into_iter().map(|(n, _)| n).collect()
    }

    fn stored_shape(&self, name: &str) -> Option<Vec<usize>> {
        self.st.get(name).ok().map(|v| v.shape().to_vec())
    }

    /// The shape the tensor `name` will have, if all its parts are stored.
    pub fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        match (self.map)(name)? {
            Source::Rename(n) | Source::SwapHalves(n) => self.stored_shape(&n),
            Source::Concat(parts) => {
                let shapes: Option<Vec<Vec<usize>>> = parts.iter().map(|p| self.stored_shape(p)).collect();
                let shapes = shapes?;
                let mut out = shapes.first()?.clone();
                // A scalar part (a broken file) has no rows to concatenate: no shape, not a panic.
                *out.first_mut()? = shapes.iter().map(|s| s.first().copied().unwrap_or(0)).sum();
                Some(out)
            }
        }
    }

    /// Loads the tensor `name` as `dtype` on `dev`, each stored part converted straight from the mapping.
    pub fn load(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let msg = |m: String| candle_core::Error::Msg(m);
        let src = (self.map)(name).ok_or_else(|| msg(format!("{}: the model has no tensor {name}", self.source)))?;
        let view = |n: &str| {
            self.st.get(n).map_err(|_| msg(format!("{}: tensor {n} (for {name}) is missing; is this {}?", self.source, self.hint)))
        };
        match src {
            Source::Rename(n) => {
                view(&n)?;
                load_mapped(&self.st, &n, dtype, dev)
            }
            Source::Concat(parts) => {
                let ts = parts
                    .iter()
                    .map(|p| {
                        view(p)?;
                        load_mapped(&self.st, p, dtype, dev)
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&ts, 0)
            }
            Source::SwapHalves(n) => {
                let v = view(&n)?;
                let rows = v.shape().first().copied().unwrap_or(0);
                if rows % 2 != 0 {
                    return Err(msg(format!("{}: {n} has an odd number of rows ({rows}), so it is no adaLN output layer; is this {}?", self.source, self.hint)));
                }
                let half = rows / 2;
                let t = Tensor::cat(&[load_view_rows(&v, half..rows, dtype, dev)?, load_view_rows(&v, 0..half, dtype, dev)?], 0)?;
                // SAFETY: `v` is a view of `self.st`, a file mapping.
                unsafe { release_file_pages(v.data()) };
                Ok(t)
            }
        }
    }
}

impl SimpleBackend for RenamedWeights {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        // Checked from the headers first, so a wrong checkpoint fails before any data is converted.
        if let Some(have) = self.shape_of(name) {
            if have != s.dims() {
                return Err(candle_core::Error::Msg(format!("{}: {name} has shape {have:?} but the model expects {:?}", self.source, s.dims())));
            }
        }
        self.load(name, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.shape_of(name).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLOATS: [DType; 3] = [DType::F16, DType::BF16, DType::F32];

    /// Values that exercise rounding, subnormals, signed zero, infinities and f16 overflow.
    fn values(n: usize) -> Vec<f32> {
        let special = [0.0, -0.0, 1.0, -1.5, 65504.0, 70000.0, 1e-8, -6.1e-5, 3.4e38, f32::INFINITY, f32::NEG_INFINITY, f32::MIN_POSITIVE];
        (0..n)
            .map(|i| match special.get(i % 97) {
                Some(v) => *v,
                None => ((i as f32 * 0.618_034).fract() - 0.5) * 10f32.powi((i % 13) as i32 - 6),
            })
            .collect()
    }

    fn bytes_of(t: &Tensor) -> Vec<u8> {
        match t.dtype() {
            DType::F16 => t.flatten_all().and_then(|t| t.to_vec1::<f16>()).expect("vec").iter().flat_map(|v| v.to_le_bytes()).collect(),
            DType::BF16 => t.flatten_all().and_then(|t| t.to_vec1::<bf16>()).expect("vec").iter().flat_map(|v| v.to_le_bytes()).collect(),
            DType::F32 => t.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("vec").iter().flat_map(|v| v.to_le_bytes()).collect(),
            other => panic!("no bytes for {other:?}"),
        }
    }

    fn assert_same(ours: &Tensor, want: &Tensor, what: &str) {
        assert_eq!(ours.dtype(), want.dtype(), "{what}");
        assert_eq!(ours.dims(), want.dims(), "{what}");
        assert!(bytes_of(ours) == bytes_of(want), "{what}: values differ from candle's to_dtype");
    }

    #[test]
    fn every_float_pair_matches_candle_at_any_length_and_offset() {
        // Lengths around the block and chunk sizes, and offsets that misalign every source dtype.
        for n in [0, 1, 7, BLOCK - 1, BLOCK + 3, CHUNK, CHUNK + 5, 3 * CHUNK + BLOCK + 1] {
            let src = Tensor::from_vec(values(n), n, &Device::Cpu).expect("tensor");
            for stored in FLOATS {
                let stored_t = src.to_dtype(stored).expect("stored");
                let raw = bytes_of(&stored_t);
                for offset in [0, 1, 2, 3] {
                    let mut buf = vec![0u8; offset];
                    buf.extend_from_slice(&raw);
                    for dtype in FLOATS {
                        let ours = tensor_from_bytes(&buf[offset..], stored, n, dtype, &Device::Cpu).expect("converted");
                        let want = stored_t.to_dtype(dtype).expect("candle");
                        assert_same(&ours, &want, &format!("{stored:?} -> {dtype:?}, n {n}, offset {offset}"));
                    }
                }
            }
        }
    }

    #[test]
    fn nan_stays_nan() {
        let nan = Tensor::from_vec(vec![f32::NAN, -f32::NAN, 1.0], 3, &Device::Cpu).expect("tensor");
        for stored in FLOATS {
            let raw = bytes_of(&nan.to_dtype(stored).expect("stored"));
            for dtype in FLOATS {
                let ours = tensor_from_bytes(&raw, stored, 3, dtype, &Device::Cpu).expect("converted");
                let v = ours.to_dtype(DType::F32).and_then(|t| t.to_vec1::<f32>()).expect("vec");
                assert!(v[0].is_nan() && v[1].is_nan() && v[2] == 1.0, "{stored:?} -> {dtype:?}: {v:?}");
            }
        }
    }

    #[test]
    fn other_dtypes_copy_or_fall_back() {
        let raw: Vec<u8> = (0..=255u8).cycle().take(8 * (CHUNK + 3) + 1).collect();
        for (stored, dtype) in [(DType::I64, DType::I64), (DType::F64, DType::F64), (DType::U32, DType::U32), (DType::U8, DType::U8), (DType::F64, DType::F32), (DType::U8, DType::F32)] {
            let count = (raw.len() - 1) / stored.size_in_bytes();
            // One byte in, so the multi-byte dtypes are misaligned.
            let data = &raw[1..=count * stored.size_in_bytes()];
            let ours = tensor_from_bytes(data, stored, count, dtype, &Device::Cpu);
            let want = Tensor::from_raw_buffer(data, stored, &[count], &Device::Cpu).and_then(|t| t.to_dtype(dtype));
            // Widened to F64 bit patterns: exact for every dtype here, and NaNs compare too.
            let bits = |t: candle_core::Result<Tensor>| {
                t.and_then(|t| t.to_dtype(DType::F64)).and_then(|t| t.to_vec1::<f64>()).map(|v| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>()).expect("bits")
            };
            assert!(bits(ours) == bits(want), "{stored:?} -> {dtype:?}");
        }
    }

    #[test]
    fn wrong_length_is_an_error_not_a_panic() {
        let err = tensor_from_bytes(&[0u8; 6], DType::F16, (2, 2), DType::F32, &Device::Cpu).expect_err("short");
        assert!(err.to_string().contains("re-download"), "{err}");
    }

    #[test]
    fn views_rows_and_backend_match_candle() {
        let dir = std::env::temp_dir().join(format!("sd-models-weights-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let rows = 3 * 7;
        let w = Tensor::from_vec(values(rows * 5), (rows, 5), &Device::Cpu).and_then(|t| t.to_dtype(DType::F16)).expect("w");
        let b = Tensor::from_vec(values(9), 9, &Device::Cpu).expect("b");
        // Written by hand: writers sort tensors so every offset is aligned, but the format does not
        // require it. Three bytes of U8 first leave the F16 and F32 data at odd addresses.
        let (w_bytes, b_bytes) = (bytes_of(&w), bytes_of(&b));
        let (w_end, b_end) = (3 + w_bytes.len(), 3 + w_bytes.len() + b_bytes.len());
        let mut header = format!(
            r#"{{"a.odd":{{"dtype":"U8","shape":[3],"data_offsets":[0,3]}},"b.w":{{"dtype":"F16","shape":[{rows},5],"data_offsets":[3,{w_end}]}},"c.b":{{"dtype":"F32","shape":[9],"data_offsets":[{w_end},{b_end}]}}}}"#
        );
        while header.len() % 8 != 0 {
            header.push(' ');
        }
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(header.as_bytes());
        file.extend_from_slice(&[1, 2, 3]);
        file.extend_from_slice(&w_bytes);
        file.extend_from_slice(&b_bytes);
        let path = dir.join("w.safetensors");
        std::fs::write(&path, file).expect("write");
        // SAFETY: a test file nobody else writes.
        let st = unsafe { MmapedSafetensors::new(&path) }.expect("map");
        let backend = MappedWeights::new(st);
        assert_eq!(backend.view("b.w").expect("view").data().as_ptr() as usize % 2, 1, "the test data should be misaligned");
        let whole = backend.get(Shape::from((rows, 5)), "b.w", candle_nn::Init::Const(0.), DType::F32, &Device::Cpu).expect("w");
        assert_same(&whole, &w.to_dtype(DType::F32).expect("f32"), "whole");
        let bias = backend.get_unchecked("c.b", DType::BF16, &Device::Cpu).expect("b");
        assert_same(&bias, &b.to_dtype(DType::BF16).expect("bf16"), "bias");
        let view = backend.view("b.w").expect("view");
        for i in 0..3 {
            let part = load_view_rows(&view, i * 7..(i + 1) * 7, DType::F32, &Device::Cpu).expect("rows");
            let want = w.narrow(0, i * 7, 7).and_then(|t| t.to_dtype(DType::F32)).expect("narrow");
            assert_same(&part, &want, "rows");
        }
        assert!(load_view_rows(&view, 20..22, DType::F32, &Device::Cpu).is_err());
        let wrong = backend.get(Shape::from((5, rows)), "b.w", candle_nn::Init::Const(0.), DType::F32, &Device::Cpu);
        assert!(matches!(wrong, Err(ref e) if matches!(crate::single_file::innermost(e), candle_core::Error::UnexpectedShape { .. })), "{wrong:?}");
        assert!(backend.contains_tensor("c.b") && !backend.contains_tensor("nope"));
        assert!(backend.get_unchecked("nope", DType::F32, &Device::Cpu).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Resident kilobytes of this process's mappings of `path` (Linux `/proc/self/smaps`).
    #[cfg(target_os = "linux")]
    fn resident_kib_of(path: &std::path::Path) -> usize {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        let name = path.to_string_lossy();
        let mut inside = false;
        let mut kib = 0;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
                inside = line.ends_with(name.as_ref());
            } else if inside && line.starts_with("Rss:") {
                kib += line.split_whitespace().nth(1).and_then(|v| v.parse::<usize>().ok()).unwrap_or(0);
            }
        }
        kib
    }

    /// Tensors above the release threshold give up their mapped pages once copied (the file's resident
    /// share falls), read the same values when loaded again from the released pages, and leave their
    /// small, misaligned neighbours intact.
    #[test]
    fn released_pages_reload_the_same_values() {
        let dir = std::env::temp_dir().join(format!("sd-models-release-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let n = RELEASE_MIN_BYTES / 2 + 4099;
        let big = Tensor::from_vec(values(n), n, &Device::Cpu).and_then(|t| t.to_dtype(DType::BF16)).expect("big");
        let small = Tensor::from_vec(values(5), 5, &Device::Cpu).expect("small");
        let (big_bytes, small_bytes) = (bytes_of(&big), bytes_of(&small));
        // One byte of U8 first, so the big tensor's data starts mid-page and its edges are partial pages.
        let big_end = 1 + big_bytes.len();
        let small_end = big_end + small_bytes.len();
        let mut header = format!(
            r#"{{"a":{{"dtype":"U8","shape":[1],"data_offsets":[0,1]}},"big":{{"dtype":"BF16","shape":[{n}],"data_offsets":[1,{big_end}]}},"small":{{"dtype":"F32","shape":[5],"data_offsets":[{big_end},{small_end}]}}}}"#
        );
        while header.len() % 8 != 0 {
            header.push(' ');
        }
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(header.as_bytes());
        file.push(7);
        file.extend_from_slice(&big_bytes);
        file.extend_from_slice(&small_bytes);
        let path = dir.join("big.safetensors");
        std::fs::write(&path, file).expect("write");
        // SAFETY: a test file nobody else writes.
        let st = unsafe { MmapedSafetensors::new(&path) }.expect("map");
        let backend = MappedWeights::new(st);
        let want = big.to_dtype(DType::F32).expect("f32");
        for round in 0..3 {
            let got = backend.get_unchecked("big", DType::F32, &Device::Cpu).expect("big");
            assert_same(&got, &want, &format!("big, load {round}"));
            #[cfg(target_os = "linux")]
            assert!(resident_kib_of(&path) < 64, "round {round}: {} KiB of the file still mapped in", resident_kib_of(&path));
            let small_got = backend.get_unchecked("small", DType::F32, &Device::Cpu).expect("small");
            assert_same(&small_got, &small, "small neighbour");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
