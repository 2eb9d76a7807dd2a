//! Helpers shared by the sd-flux2 integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sd_flux2::{load, Flux2LoadOptions, Flux2Models};

/// The workspace's `fixtures/` folder (or `SD_FIXTURES_DIR`).
pub fn fixtures() -> PathBuf {
    std::env::var_os("SD_FIXTURES_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures"))
}

/// The tiny diffusers FLUX.2 [klein] folder.
pub fn folder() -> PathBuf {
    fixtures().join("flux2").join("klein")
}

/// Tensors of a golden file.
pub fn golden(name: &str) -> HashMap<String, Tensor> {
    let path = fixtures().join("goldens/flux2").join(name);
    candle_core::safetensors::load(&path, &Device::Cpu).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// A JSON file of the goldens.
pub fn golden_json(name: &str) -> serde_json::Value {
    let path = fixtures().join("goldens/flux2").join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).expect("json")
}

/// One tensor of a golden file.
pub fn get(g: &HashMap<String, Tensor>, name: &str) -> Tensor {
    g.get(name).unwrap_or_else(|| panic!("golden tensor {name} missing")).clone()
}

/// Loads the tiny folder in F32 on the CPU.
pub fn models() -> Flux2Models {
    load(&folder(), &Flux2LoadOptions::default()).unwrap_or_else(|e| panic!("loading the tiny FLUX.2 [klein]: {e}"))
}

/// max |a − b| and max |b|, in F32.
pub fn diff(a: &Tensor, b: &Tensor) -> (f32, f32) {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let flat = |t: &Tensor| t.to_device(&Device::Cpu).and_then(|t| t.to_dtype(DType::F32)).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<f32>());
    let (a, b) = (flat(a).expect("ours"), flat(b).expect("golden"));
    let d = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let m = b.iter().map(|y| y.abs()).fold(0f32, f32::max);
    (d, m)
}

/// Asserts max|ours − golden| ≤ tol · max(1, max|golden|) and returns the max difference.
pub fn assert_close(what: &str, ours: &Tensor, golden: &Tensor, tol: f32) -> f32 {
    let (d, m) = diff(ours, golden);
    let bound = tol * m.max(1.0);
    eprintln!("{what}: max diff {d:.3e} (bound {bound:.1e}, max |golden| {m:.3})");
    assert!(d <= bound, "{what}: max diff {d} exceeds {bound}");
    d
}
