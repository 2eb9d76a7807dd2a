//! Full-size models with random weights, for timing runs without downloading a checkpoint: a
//! weight backend for benches, and (through [`recording_vb`]) the tensors to save as a model folder.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::{Init, VarBuilder};

/// The tensors a [`recording_vb`] handed out, by name.
pub type Recorded = Arc<Mutex<BTreeMap<String, Tensor>>>;

/// Hands out a fresh random tensor for every weight a model asks for. Zeros would make every
/// activation trivially zero (and some kernels take shortcuts on it), so weights are drawn like a
/// trained network's scale: matrices/kernels `N(0, 1/fan_in)`, norm scales around 1, biases small.
struct RandomWeights {
    record: Option<Recorded>,
}

impl candle_nn::var_builder::SimpleBackend for RandomWeights {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let dims = s.dims();
        let t = if dims.len() >= 2 {
            let fan_in = s.elem_count() / dims[0].max(1);
            Tensor::randn(0f32, (1.0 / (fan_in.max(1) as f32)).sqrt(), s, dev)?
        } else if name.ends_with("weight") {
            (Tensor::randn(0f32, 0.02, s, dev)? + 1.0)?
        } else {
            Tensor::randn(0f32, 0.02, s, dev)?
        };
        let t = t.to_dtype(dtype)?;
        if let Some(record) = &self.record {
            if let Ok(mut map) = record.lock() {
                map.insert(name.to_string(), t.clone());
            }
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape; {name} was requested without one")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// A VarBuilder whose every tensor is random, on the CPU.
pub fn random_vb(dtype: DType) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(RandomWeights { record: None }), dtype, Device::Cpu)
}

/// Like [`random_vb`], and keeps every tensor it hands out under the name the model asked for
/// (the checkpoint name, since model paths mirror checkpoint names).
pub fn recording_vb(dtype: DType) -> (VarBuilder<'static>, Recorded) {
    let record: Recorded = Arc::default();
    let vb = VarBuilder::from_backend(Box::new(RandomWeights { record: Some(record.clone()) }), dtype, Device::Cpu);
    (vb, record)
}
