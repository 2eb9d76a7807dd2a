//! Helpers shared by the sd-flux integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sd_flux::{load, FluxLoadOptions, FluxModels};

/// The workspace's `fixtures/` folder.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// A tiny diffusers FLUX folder (`dev` or `schnell`).
pub fn folder(variant: &str) -> PathBuf {
    fixtures().join("flux").join(variant)
}

/// Tensors of a golden file.
pub fn golden(name: &str) -> HashMap<String, Tensor> {
    let path = fixtures().join("goldens/flux").join(name);
    candle_core::safetensors::load(&path, &Device::Cpu).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// One tensor of a golden file.
pub fn get(g: &HashMap<String, Tensor>, name: &str) -> Tensor {
    g.get(name).unwrap_or_else(|| panic!("golden tensor {name} missing")).clone()
}

/// Loads a tiny FLUX folder in F32 on the CPU.
pub fn models(variant: &str) -> FluxModels {
    load(&folder(variant), &FluxLoadOptions::default()).unwrap_or_else(|e| panic!("loading {variant}: {e}"))
}

/// max |a − b| and max |b|, in F32.
pub fn diff(a: &Tensor, b: &Tensor) -> (f32, f32) {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_device(&Device::Cpu).and_then(|t| t.to_dtype(DType::F32)).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<f32>());
    let b = b.to_device(&Device::Cpu).and_then(|t| t.to_dtype(DType::F32)).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<f32>());
    let (a, b) = (a.expect("ours"), b.expect("golden"));
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

/// A FLUX.1 Kontext folder: the tiny dev model (Kontext has its architecture) with the `model_index.json`
/// of diffusers' `FluxKontextPipeline`, copied under the system temp folder as `name`.
pub fn kontext_folder(name: &str) -> PathBuf {
    fn copy(from: &std::path::Path, to: &std::path::Path) {
        std::fs::create_dir_all(to).expect("mkdir");
        for e in std::fs::read_dir(from).expect("read_dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                copy(&p, &to.join(e.file_name()));
            } else {
                std::fs::copy(&p, to.join(e.file_name())).expect("copy");
            }
        }
    }
    let dir = std::env::temp_dir().join(format!("sd-flux-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    copy(&folder("dev"), &dir);
    let index = std::fs::read_to_string(dir.join("model_index.json")).expect("model_index");
    std::fs::write(dir.join("model_index.json"), index.replace("\"FluxPipeline\"", "\"FluxKontextPipeline\"")).expect("write");
    dir
}
