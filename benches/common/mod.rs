//! Shared pieces of the criterion benches: random weights (from `sd_toolkit::random`), the
//! full-size correctness check against PyTorch, and the machine/instruction-set line.

// Each bench compiles its own copy of this module and uses a different subset of it.
#![allow(dead_code, unused_imports)]

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
pub use sd_toolkit::random::random_vb;

/// Whether `SD_BENCH_SMALL` asks for tiny shapes (to smoke-test the harness in seconds).
pub fn small() -> bool {
    std::env::var_os("SD_BENCH_SMALL").is_some_and(|v| v != "0")
}

/// Whether to bench candle-transformers' stock models as well (`SD_BENCH_STOCK=1`).
pub fn with_stock() -> bool {
    std::env::var_os("SD_BENCH_STOCK").is_some_and(|v| v != "0")
}

/// Whether `SD_BENCH_STAGES` (comma-separated stage names, e.g. `clip,flux_double`; every stage when
/// unset or empty) selects `stage`, so `tools/bench_compare.sh` can split a full run into parts.
pub fn stage_enabled(stage: &str) -> bool {
    match std::env::var("SD_BENCH_STAGES") {
        Ok(list) if !list.trim().is_empty() => list.split(',').any(|s| s.trim() == stage),
        _ => true,
    }
}

/// The largest relative L2 distance from PyTorch's output that a timed row may have when the
/// check folder names no limit of its own (F32 on both sides).
pub const MAX_REL_L2: f64 = 1e-4;

/// What a PyTorch script saved for one workload under `SD_BENCH_CHECK_DIR/<name>`: `io.safetensors`
/// with the inputs and PyTorch's `output`, the model's weights (`tools/bench_torch.py` puts the
/// diffusers folder's files beside it, `tools/gpu_bench.py` in `model/`), and optionally
/// `reference.json` with the workload's dtype and the relative-L2 limit for our output.
pub struct Checked {
    /// Inputs by name (`sample`, `context`, `latents`, …) and PyTorch's `output`, on the CPU as stored.
    pub io: std::collections::HashMap<String, Tensor>,
    dir: PathBuf,
    reference: serde_json::Value,
}

/// With `SD_BENCH_CHECK_DIR` set, loads the inputs saved for `name` there; `None` runs the bench on
/// weights drawn here (no correctness check).
pub fn checked(name: &str) -> Option<Checked> {
    let root = PathBuf::from(std::env::var_os("SD_BENCH_CHECK_DIR")?);
    let dir = root.join(name);
    let io = candle_core::safetensors::load(dir.join("io.safetensors"), &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}/io.safetensors: {e}; run the PyTorch side first", dir.display()));
    let reference = match std::fs::read_to_string(dir.join("reference.json")) {
        Ok(text) => serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}/reference.json: {e}", dir.display())),
        Err(_) => serde_json::Value::Null,
    };
    Some(Checked { io, dir, reference })
}

impl Checked {
    /// The folder this workload was saved in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The weights `tools/bench_torch.py` saved beside `io.safetensors`, memory-mapped, as `dtype` on `device`.
    pub fn vb(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        let weights = self.dir.join("diffusion_pytorch_model.safetensors");
        // SAFETY: the bench only reads files the torch script wrote and nothing modifies them while it runs.
        unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], dtype, device) }
            .unwrap_or_else(|e| panic!("{}: {e}; run tools/bench_torch.py --check-dir first", weights.display()))
    }

    /// The weights saved in this workload's folder under whatever name the saving library gave them
    /// (`model.safetensors` for transformers, shards with an index), found by the lookup our folder
    /// loaders use and served through their memory-mapped backend, as `dtype` on `device`.
    pub fn folder_vb(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        let files = sd_models::diffusers::find_weight_files(&self.dir, false)
            .unwrap_or_else(|e| panic!("{}: {e}; run tools/bench_torch.py --check-dir first", self.dir.display()));
        // SAFETY: the bench only reads files the torch script wrote and nothing modifies them while it runs.
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }
            .unwrap_or_else(|e| panic!("{}: {e}", self.dir.display()));
        VarBuilder::from_backend(Box::new(sd_models::weights::MappedWeights::new(st)), dtype, device.clone())
    }

    /// The saved input `name`, on the CPU.
    pub fn input(&self, name: &str) -> Tensor {
        self.io.get(name).cloned().unwrap_or_else(|| panic!("{}/io.safetensors has no `{name}`", self.dir.display()))
    }

    /// The saved input `name`, moved to `device` (outside any timed region).
    pub fn input_on(&self, name: &str, device: &Device) -> Tensor {
        self.input(name).to_device(device).unwrap_or_else(|e| panic!("moving `{name}` to the device: {e}"))
    }

    /// The dtype PyTorch ran the workload in (`reference.json`'s `dtype`; F32 when absent).
    pub fn dtype(&self) -> DType {
        match self.reference.get("dtype").and_then(|d| d.as_str()) {
            None => DType::F32,
            Some(name) => sd_toolkit::parse_dtype(name).unwrap_or_else(|e| panic!("{}/reference.json: {e}", self.dir.display())),
        }
    }

    /// The largest relative L2 distance to PyTorch's output our output may have: `reference.json`'s
    /// `rel_l2_limit`, else [`MAX_REL_L2`].
    pub fn limit(&self) -> f64 {
        self.reference.get("rel_l2_limit").and_then(|l| l.as_f64()).unwrap_or(MAX_REL_L2)
    }

    /// Compares `ours` with PyTorch's output, writes `check.json` beside the inputs and exits the
    /// bench with status 1 when the relative L2 distance is above [`Checked::limit`].
    pub fn verify(&self, label: &str, ours: &Tensor) {
        let expect = self.input("output");
        let limit = self.limit();
        let rel = rel_l2(ours, &expect).unwrap_or_else(|e| panic!("{label}: comparing outputs: {e}"));
        let ok = rel <= limit;
        println!("check {label}: relative L2 to PyTorch {rel:.3e} (limit {limit:.1e}) {}", if ok { "ok" } else { "MISMATCH" });
        let json = serde_json::json!({ "rel_l2": rel, "limit": limit, "ok": ok });
        if let Err(e) = std::fs::write(self.dir.join("check.json"), format!("{json}\n")) {
            eprintln!("{label}: writing check.json: {e}");
        }
        if !ok {
            eprintln!("{label}: our output differs from PyTorch's on the same weights and inputs; not timing a wrong result");
            std::process::exit(1);
        }
    }
}

fn rel_l2(a: &Tensor, b: &Tensor) -> candle_core::Result<f64> {
    // On the CPU in F64: a GPU output is compared after one copy, and F16 sums would overflow.
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let b = b.to_dtype(DType::F64)?.reshape(a.shape())?;
    let num = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
    let den = b.sqr()?.sum_all()?.to_scalar::<f64>()?;
    Ok((num / den.max(f64::MIN_POSITIVE)).sqrt())
}

/// Prints the CPU, the instruction-set path our kernels take and the thread count, once per bench.
pub fn print_machine() {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).map(|m| m.trim().to_string()))
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    println!(
        "machine: {model}; cpu features: {}; our kernels: {} path; threads: {}",
        sd_models::ops::cpu::cpu_features(),
        sd_models::ops::cpu::cpu_path().name(),
        candle_core::utils::get_num_threads()
    );
}
