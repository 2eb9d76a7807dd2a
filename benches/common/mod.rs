//! Shared pieces of the criterion benches: random weights and the median export.

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::{Init, VarBuilder};

/// Hands out a fresh random tensor for every weight a model asks for, so full-size models can
/// be benchmarked without checkpoints. Zeros would make every activation trivially zero (and
/// some kernels take shortcuts on it), so weights are drawn like a trained network's scale:
/// matrices/kernels `N(0, 1/fan_in)`, norm scales around 1, biases small.
struct RandomWeights;

impl candle_nn::var_builder::SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let dims = s.dims();
        let t = if dims.len() >= 2 {
            let fan_in = s.elem_count() / dims[0].max(1);
            Tensor::randn(0f32, (1.0 / (fan_in.max(1) as f32)).sqrt(), s, dev)?
        } else if name.ends_with("weight") {
            (Tensor::randn(0f32, 0.02, s, dev)? + 1.0)?
        } else {
            Tensor::randn(0f32, 0.02, s, dev)?
        };
        t.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape; {name} was requested without one")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// A VarBuilder whose every tensor is random (see [`RandomWeights`]), on the CPU.
pub fn random_vb(dtype: DType) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(RandomWeights), dtype, Device::Cpu)
}

/// Whether `SD_BENCH_SMALL` asks for tiny shapes (to smoke-test the harness in seconds).
pub fn small() -> bool {
    std::env::var_os("SD_BENCH_SMALL").is_some_and(|v| v != "0")
}
