//! The GPU side of the one attention function and the one convolution path.
//!
//! - Attention: with the `flash-attn` feature, F16/BF16 attention on an sm80+ GPU goes through
//!   `candle-flash-attn` (fused, no score matrix, F32 accumulation and softmax, so it is also safe
//!   where SD 2.1 needs `upcast`); everything else takes the chunked matmul + softmax path in
//!   `ops/mod.rs`, which bounds the score matrix per slice.
//! - Convolution: with the `cudnn` feature, convolutions go through cuDNN with the algorithm
//!   *measured* once per shape (`cudnnFindConvolutionForwardAlgorithm`) and one workspace per device
//!   reused across calls. candle's own `cudnn` path picks by heuristic and allocates a workspace on
//!   every call, and measured slower than its im2col + cuBLAS path in F16 on an H100
//!   (../shared/cuda/README.md); without the feature, or with `SD_CUDA_CONV=im2col`, candle's
//!   im2col + cuBLAS path runs.
//!
//! Both choices can be switched at run time (`SD_CUDA_ATTENTION=flash|chunked`,
//! `SD_CUDA_CONV=cudnn|im2col`), so one binary measures both sides (tools/gpu_bench.sh).

use std::sync::OnceLock;

#[cfg(any(feature = "flash-attn", feature = "cudnn"))]
use candle_core::{Result, Tensor};

/// The attention kernel CUDA tensors take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CudaAttention {
    /// `candle-flash-attn` (needs the `flash-attn` feature, F16/BF16, sm80+, head dim a multiple of 8 up to 512).
    Flash,
    /// Matmul + softmax + matmul over slices of query rows (every build, every dtype).
    Chunked,
}

/// The convolution path CUDA tensors take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CudaConv {
    /// cuDNN with a measured algorithm per shape and a reused workspace (needs the `cudnn` feature).
    Cudnn,
    /// candle's im2col + cuBLAS GEMM.
    Im2col,
}

/// The attention kernel this build uses on CUDA: `Flash` when built with `flash-attn` unless
/// `SD_CUDA_ATTENTION=chunked`.
pub fn cuda_attention() -> CudaAttention {
    static CHOICE: OnceLock<CudaAttention> = OnceLock::new();
    *CHOICE.get_or_init(|| {
        let fast = cfg!(feature = "flash-attn").then_some(CudaAttention::Flash);
        switch("SD_CUDA_ATTENTION", "flash-attn", ("flash", fast), ("chunked", CudaAttention::Chunked))
    })
}

/// The convolution path this build uses on CUDA: `Cudnn` when built with `cudnn` unless
/// `SD_CUDA_CONV=im2col`.
pub fn cuda_conv() -> CudaConv {
    static CHOICE: OnceLock<CudaConv> = OnceLock::new();
    *CHOICE.get_or_init(|| {
        let fast = cfg!(feature = "cudnn").then_some(CudaConv::Cudnn);
        switch("SD_CUDA_CONV", "cudnn", ("cudnn", fast), ("im2col", CudaConv::Im2col))
    })
}

/// Reads the two-way switch `var`: the fast side (`None` when this build lacks `feature`) unless the
/// variable names the plain side; an unknown value or an unavailable fast side gets a warning.
fn switch<T: Copy>(var: &str, feature: &str, (fast_name, fast): (&str, Option<T>), (plain_name, plain): (&str, T)) -> T {
    match std::env::var(var).ok().as_deref() {
        Some(v) if v == plain_name => plain,
        Some(v) if v == fast_name && fast.is_none() => {
            tracing::warn!("{var}={v}, but this build lacks the `{feature}` feature; using {plain_name}");
            plain
        }
        Some(v) if v != fast_name => {
            tracing::warn!("{var}={v} is not `{fast_name}` or `{plain_name}`; using the default");
            fast.unwrap_or(plain)
        }
        _ => fast.unwrap_or(plain),
    }
}

/// Fused attention over `[batch, len, heads, dim]` views (any strides but a contiguous last dim),
/// returning `[batch, q_len, heads, dim]`; `None` when this build, the device, the dtype or the
/// shape cannot take the fused kernel and the caller should run the chunked path.
#[cfg(feature = "flash-attn")]
pub(super) fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Option<Tensor>> {
    use candle_core::DType;
    if !q.device().is_cuda() || cuda_attention() != CudaAttention::Flash {
        return Ok(None);
    }
    let dtype = q.dtype();
    if !matches!(dtype, DType::F16 | DType::BF16) || k.dtype() != dtype || v.dtype() != dtype {
        return Ok(None);
    }
    let dim = q.dim(3)?;
    if dim % 8 != 0 || dim > 512 || !sm80(q.device())? {
        return Ok(None);
    }
    let last_contiguous = |t: &Tensor| -> Result<Tensor> {
        if t.stride()[3] == 1 { Ok(t.clone()) } else { t.contiguous() }
    };
    let out = candle_flash_attn::flash_attn(&last_contiguous(q)?, &last_contiguous(k)?, &last_contiguous(v)?, scale as f32, false)?;
    Ok(Some(out))
}

/// Whether flash attention's kernels (built for sm80 and later) can run on this CUDA device;
/// asked of the driver once per device.
#[cfg(feature = "flash-attn")]
fn sm80(device: &candle_core::Device) -> Result<bool> {
    use std::collections::HashMap;
    use std::sync::Mutex;
    static CAPS: OnceLock<Mutex<HashMap<usize, bool>>> = OnceLock::new();
    let candle_core::Device::Cuda(dev) = device else { return Ok(false) };
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    let ordinal = ctx.ordinal();
    let caps = CAPS.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(&ok) = caps.lock().map_err(|_| candle_core::Error::Msg("flash-attn capability cache poisoned".into()))?.get(&ordinal) {
        return Ok(ok);
    }
    let (major, minor) = ctx.compute_capability().map_err(candle_core::Error::wrap)?;
    let ok = major >= 8;
    if !ok {
        tracing::info!("CUDA device {ordinal} is sm{major}{minor}; flash attention needs sm80+, using chunked attention");
    }
    caps.lock().map_err(|_| candle_core::Error::Msg("flash-attn capability cache poisoned".into()))?.insert(ordinal, ok);
    Ok(ok)
}

/// The cuDNN convolution of `x` `[b, c, h, w]` with `w` `[k, c, r, s]` (no bias), or `None` when this
/// build, the device or the dtype leave it to candle's im2col path. A cuDNN failure (an unsupported
/// shape, no algorithm within the workspace limit) also returns `None`, after one warning.
#[cfg(feature = "cudnn")]
pub(super) fn cudnn_conv2d(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Option<Tensor>> {
    use candle_core::DType;
    if !x.device().is_cuda() || cuda_conv() != CudaConv::Cudnn {
        return Ok(None);
    }
    if !matches!(x.dtype(), DType::F16 | DType::BF16 | DType::F32) || w.dtype() != x.dtype() {
        return Ok(None);
    }
    match x.contiguous()?.apply_op2_no_bwd(&w.contiguous()?, &cudnn::Conv { stride, padding }) {
        Ok(y) => Ok(Some(y)),
        Err(e) => {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| tracing::warn!("cuDNN convolution failed ({e}); using im2col for convolutions cuDNN rejects"));
            Ok(None)
        }
    }
}

#[cfg(feature = "cudnn")]
mod cudnn {
    use std::collections::HashMap;
    use std::ffi::c_void;
    use std::sync::{Mutex, OnceLock};

    use candle_core::cuda_backend::cudarc::cudnn::{result, sys};
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::{CudaDType, CudaDevice};
    use candle_core::{bail, CpuStorage, CudaStorage, DType, Layout, Result, Shape};

    /// The largest workspace an algorithm may ask for; faster algorithms that need more are skipped
    /// (the UNet's weights and activations need the memory more).
    const MAX_WORKSPACE: usize = 1 << 30;

    /// A stride-`stride`, zero-padding-`padding` 2-D convolution through cuDNN.
    pub(super) struct Conv {
        pub(super) stride: usize,
        pub(super) padding: usize,
    }

    /// What decides a convolution's algorithm: the device, the dtype and every size.
    #[derive(Clone, Copy, PartialEq, Eq, Hash)]
    struct Key {
        ordinal: usize,
        dtype: DType,
        x: [usize; 4],
        w: [usize; 4],
        stride: usize,
        padding: usize,
    }

    /// The measured-fastest algorithm of one shape and the workspace it needs.
    #[derive(Clone, Copy)]
    struct Plan {
        algo: sys::cudnnConvolutionFwdAlgo_t,
        workspace: usize,
    }

    /// One cuDNN handle per device and the workspace its convolutions share.
    struct DeviceState {
        handle: sys::cudnnHandle_t,
        workspace: Option<CudaSlice<u8>>,
    }

    // SAFETY: a cuDNN handle may be used from any thread as long as calls do not overlap; every
    // use happens with the `STATE` mutex held.
    unsafe impl Send for DeviceState {}

    #[derive(Default)]
    struct State {
        devices: HashMap<usize, DeviceState>,
        plans: HashMap<Key, Plan>,
    }

    fn state() -> &'static Mutex<State> {
        static STATE: OnceLock<Mutex<State>> = OnceLock::new();
        STATE.get_or_init(|| Mutex::new(State::default()))
    }

    fn check(what: &str, r: std::result::Result<(), result::CudnnError>) -> Result<()> {
        r.map_err(|e| candle_core::Error::Msg(format!("cuDNN {what}: {e:?}")))
    }

    /// Tensor, filter and convolution descriptors, destroyed on drop.
    struct Descriptors {
        x: sys::cudnnTensorDescriptor_t,
        w: sys::cudnnFilterDescriptor_t,
        y: sys::cudnnTensorDescriptor_t,
        conv: sys::cudnnConvolutionDescriptor_t,
    }

    impl Drop for Descriptors {
        fn drop(&mut self) {
            // SAFETY: each non-null one was created by `Descriptors::new` and is destroyed once, here.
            unsafe {
                if !self.x.is_null() {
                    let _ = result::destroy_tensor_descriptor(self.x);
                }
                if !self.y.is_null() {
                    let _ = result::destroy_tensor_descriptor(self.y);
                }
                if !self.w.is_null() {
                    let _ = result::destroy_filter_descriptor(self.w);
                }
                if !self.conv.is_null() {
                    let _ = result::destroy_convolution_descriptor(self.conv);
                }
            }
        }
    }

    fn int(v: usize) -> Result<i32> {
        i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("cuDNN convolution: size {v} exceeds i32")))
    }

    impl Descriptors {
        fn new(dtype: DType, x: [usize; 4], w: [usize; 4], y: [usize; 4], stride: usize, padding: usize) -> Result<Self> {
            use sys::cudnnDataType_t as D;
            let (data, math) = match dtype {
                DType::F16 => (D::CUDNN_DATA_HALF, sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH),
                DType::BF16 => (D::CUDNN_DATA_BFLOAT16, sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH),
                DType::F32 => (D::CUDNN_DATA_FLOAT, sys::cudnnMathType_t::CUDNN_DEFAULT_MATH),
                dt => bail!("cuDNN convolution: unsupported dtype {dt:?}"),
            };
            let i4 = |d: [usize; 4]| -> Result<[i32; 4]> { Ok([int(d[0])?, int(d[1])?, int(d[2])?, int(d[3])?]) };
            let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
            let created = |what: &str, e: result::CudnnError| candle_core::Error::Msg(format!("cuDNN {what}: {e:?}"));
            let mut d = Descriptors {
                x: std::ptr::null_mut(),
                w: std::ptr::null_mut(),
                y: std::ptr::null_mut(),
                conv: std::ptr::null_mut(),
            };
            // Each is stored as soon as it exists, so a later failure still destroys it on drop.
            d.x = result::create_tensor_descriptor().map_err(|e| created("tensor descriptor", e))?;
            d.y = result::create_tensor_descriptor().map_err(|e| created("tensor descriptor", e))?;
            d.w = result::create_filter_descriptor().map_err(|e| created("filter descriptor", e))?;
            d.conv = result::create_convolution_descriptor().map_err(|e| created("convolution descriptor", e))?;
            let (p, s) = (int(padding)?, int(stride)?);
            // SAFETY: every descriptor was created above and is alive until `d` drops.
            unsafe {
                check("input descriptor", result::set_tensor4d_descriptor(d.x, nchw, data, i4(x)?))?;
                check("output descriptor", result::set_tensor4d_descriptor(d.y, nchw, data, i4(y)?))?;
                check("filter descriptor", result::set_filter4d_descriptor(d.w, data, nchw, i4(w)?))?;
                // F32 accumulation for every input type, as PyTorch does for half convolutions.
                check(
                    "convolution descriptor",
                    result::set_convolution2d_descriptor(
                        d.conv,
                        p,
                        p,
                        s,
                        s,
                        1,
                        1,
                        sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                        D::CUDNN_DATA_FLOAT,
                    ),
                )?;
                check("math type", result::set_convolution_math_type(d.conv, math))?;
            }
            Ok(d)
        }
    }

    /// Times every algorithm cuDNN offers for this shape (once) and keeps the fastest that succeeds
    /// within [`MAX_WORKSPACE`].
    fn measure(handle: sys::cudnnHandle_t, d: &Descriptors) -> Result<Plan> {
        const N: usize = 8;
        let mut returned: i32 = 0;
        // SAFETY: the perf structs are plain C data that cuDNN fills; zero is a valid bit pattern.
        let mut perf: [sys::cudnnConvolutionFwdAlgoPerf_t; N] = unsafe { std::mem::zeroed() };
        // SAFETY: the handle and descriptors are alive; the output arrays hold N entries.
        let status = unsafe { sys::cudnnFindConvolutionForwardAlgorithm(handle, d.x, d.w, d.conv, d.y, N as i32, &mut returned, perf.as_mut_ptr()) };
        check("algorithm search", status.result())?;
        perf.iter()
            .take(returned.clamp(0, N as i32) as usize)
            .find(|p| p.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS && p.memory <= MAX_WORKSPACE)
            .map(|p| Plan { algo: p.algo, workspace: p.memory })
            .ok_or_else(|| candle_core::Error::Msg("cuDNN found no convolution algorithm for this shape".into()))
    }

    impl Conv {
        fn forward<T: CudaDType + DeviceRepr>(&self, x: &CudaStorage, xl: &Layout, w: &CudaStorage, wl: &Layout) -> Result<(CudaStorage, Shape)> {
            let (b, c, h, wd) = xl.shape().dims4()?;
            let (k, c_w, r, s) = wl.shape().dims4()?;
            let (p, st) = (self.padding, self.stride);
            if c != c_w || st == 0 || h + 2 * p < r || wd + 2 * p < s {
                bail!("cuDNN convolution: input {:?} and kernel {:?} do not fit (stride {st}, padding {p})", xl.dims(), wl.dims());
            }
            let (ho, wo) = ((h + 2 * p - r) / st + 1, (wd + 2 * p - s) / st + 1);
            if !xl.is_contiguous() || !wl.is_contiguous() {
                bail!("cuDNN convolution: expects contiguous input and kernel");
            }
            let dev: &CudaDevice = x.device();
            let stream = dev.cuda_stream();
            let ordinal = stream.context().ordinal();
            let dtype = x.dtype();
            let xs = x.as_cuda_slice::<T>()?.slice(xl.start_offset()..);
            let ws = w.as_cuda_slice::<T>()?.slice(wl.start_offset()..);
            // SAFETY: cuDNN writes every element of the output before anything reads it.
            let mut y = unsafe { dev.alloc::<T>(b * k * ho * wo)? };
            let desc = Descriptors::new(dtype, [b, c, h, wd], [k, c, r, s], [b, k, ho, wo], st, p)?;
            let key = Key { ordinal, dtype, x: [b, c, h, wd], w: [k, c, r, s], stride: st, padding: p };

            let mut guard = state().lock().map_err(|_| candle_core::Error::Msg("cuDNN state poisoned by an earlier panic".into()))?;
            let State { devices, plans } = &mut *guard;
            if !devices.contains_key(&ordinal) {
                stream.context().bind_to_thread().map_err(candle_core::Error::wrap)?;
                let handle = result::create_handle().map_err(|e| candle_core::Error::Msg(format!("cuDNN handle: {e:?}")))?;
                devices.insert(ordinal, DeviceState { handle, workspace: None });
            }
            let Some(ds) = devices.get_mut(&ordinal) else { bail!("cuDNN handle for device {ordinal} missing") };
            // SAFETY: the handle is alive; the stream is candle's stream of this device.
            check("set stream", unsafe { result::set_stream(ds.handle, stream.cu_stream() as sys::cudaStream_t) })?;
            let plan = match plans.get(&key) {
                Some(plan) => *plan,
                None => {
                    let plan = measure(ds.handle, &desc)?;
                    plans.insert(key, plan);
                    plan
                }
            };
            if ds.workspace.as_ref().map_or(0, |w| w.len()) < plan.workspace {
                // The old buffer is freed in stream order, after the convolutions queued with it.
                ds.workspace = Some(dev.alloc_zeros::<u8>(plan.workspace)?);
            }
            let (alpha, beta) = (1f32, 0f32);
            {
                let (x_ptr, _gx) = xs.device_ptr(&stream);
                let (w_ptr, _gw) = ws.device_ptr(&stream);
                let (y_ptr, _gy) = y.device_ptr_mut(&stream);
                let (ws_ptr, ws_len, _gws) = match ds.workspace.as_mut() {
                    Some(buf) if plan.workspace > 0 => {
                        let len = buf.len();
                        let (ptr, g) = buf.device_ptr_mut(&stream);
                        (ptr as *mut c_void, len, Some(g))
                    }
                    _ => (std::ptr::null_mut(), 0, None),
                };
                // SAFETY: descriptors match the buffers' dtype and sizes (checked above); the
                // scaling factors are f32 because the compute type is F32; the pointers stay valid
                // for the call (their guards live to the end of this block).
                check("convolution", unsafe {
                    result::convolution_forward(
                        ds.handle,
                        &alpha as *const f32 as *const c_void,
                        desc.x,
                        x_ptr as *const c_void,
                        desc.w,
                        w_ptr as *const c_void,
                        desc.conv,
                        plan.algo,
                        ws_ptr,
                        ws_len,
                        &beta as *const f32 as *const c_void,
                        desc.y,
                        y_ptr as *mut c_void,
                    )
                })?;
            }
            drop(guard);
            Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), Shape::from((b, k, ho, wo))))
        }
    }

    impl candle_core::CustomOp2 for Conv {
        fn name(&self) -> &'static str {
            "sd-cudnn-conv2d"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            bail!("sd-cudnn-conv2d runs on CUDA tensors only")
        }

        fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout, w: &CudaStorage, wl: &Layout) -> Result<(CudaStorage, Shape)> {
            match x.dtype() {
                DType::F16 => self.forward::<half::f16>(x, xl, w, wl),
                DType::BF16 => self.forward::<half::bf16>(x, xl, w, wl),
                DType::F32 => self.forward::<f32>(x, xl, w, wl),
                dt => bail!("cuDNN convolution: unsupported dtype {dt:?}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_build() {
        // The environment switches are read once per process; the test binary never sets them.
        if std::env::var_os("SD_CUDA_ATTENTION").is_none() {
            let want = if cfg!(feature = "flash-attn") { CudaAttention::Flash } else { CudaAttention::Chunked };
            assert_eq!(cuda_attention(), want);
        }
        if std::env::var_os("SD_CUDA_CONV").is_none() {
            let want = if cfg!(feature = "cudnn") { CudaConv::Cudnn } else { CudaConv::Im2col };
            assert_eq!(cuda_conv(), want);
        }
    }

    /// CPU tensors never take a GPU path, whatever the build.
    #[cfg(any(feature = "flash-attn", feature = "cudnn"))]
    #[test]
    fn cpu_tensors_stay_on_the_cpu_paths() -> Result<()> {
        use candle_core::{DType, Device};
        #[cfg(feature = "flash-attn")]
        {
            let q = Tensor::zeros((1, 4, 2, 8), DType::F16, &Device::Cpu)?;
            assert!(flash_attention(&q, &q, &q, 1.0)?.is_none());
        }
        #[cfg(feature = "cudnn")]
        {
            let x = Tensor::zeros((1, 2, 4, 4), DType::F32, &Device::Cpu)?;
            let w = Tensor::zeros((3, 2, 3, 3), DType::F32, &Device::Cpu)?;
            assert!(cudnn_conv2d(&x, &w, 1, 1)?.is_none());
        }
        Ok(())
    }
}
