//! Shared pieces of the criterion benches: random weights (from `sd_toolkit::random`), the
//! full-size correctness check against PyTorch, and the machine/instruction-set line.

use std::path::PathBuf;

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

/// The largest relative L2 distance from PyTorch's output that a timed row may have (F32).
pub const MAX_REL_L2: f64 = 1e-4;

/// What `tools/bench_torch.py --check-dir DIR` saved for one workload: the diffusers model folder
/// (weights and config) and `io.safetensors` with its inputs and PyTorch's output.
pub struct Checked {
    /// The PyTorch model's weights, memory-mapped, under the checkpoint names.
    pub vb: VarBuilder<'static>,
    /// Inputs by name (`sample`, `context`, `latents`) and PyTorch's `output`.
    pub io: std::collections::HashMap<String, Tensor>,
    dir: PathBuf,
}

/// With `SD_BENCH_CHECK_DIR` set, loads the weights and inputs saved for `name` there; `None` runs
/// the bench on weights drawn here (no correctness check).
pub fn checked(name: &str) -> Option<Checked> {
    let root = PathBuf::from(std::env::var_os("SD_BENCH_CHECK_DIR")?);
    let dir = root.join(name);
    let weights = dir.join("diffusion_pytorch_model.safetensors");
    // SAFETY: the bench only reads files the torch script wrote and nothing modifies them while it runs.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, &Device::Cpu) }
        .unwrap_or_else(|e| panic!("{}: {e}; run tools/bench_torch.py --check-dir first", weights.display()));
    let io = candle_core::safetensors::load(dir.join("io.safetensors"), &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}/io.safetensors: {e}", dir.display()));
    Some(Checked { vb, io, dir })
}

impl Checked {
    /// The saved input `name`.
    pub fn input(&self, name: &str) -> Tensor {
        self.io.get(name).cloned().unwrap_or_else(|| panic!("{}/io.safetensors has no `{name}`", self.dir.display()))
    }

    /// Compares `ours` with PyTorch's output, writes `check.json` beside the weights and exits the
    /// bench with status 1 when the relative L2 distance is above [`MAX_REL_L2`].
    pub fn verify(&self, label: &str, ours: &Tensor) {
        let expect = self.input("output");
        let rel = rel_l2(ours, &expect).unwrap_or_else(|e| panic!("{label}: comparing outputs: {e}"));
        let ok = rel <= MAX_REL_L2;
        println!("check {label}: relative L2 to PyTorch {rel:.3e} (limit {MAX_REL_L2:.0e}) {}", if ok { "ok" } else { "MISMATCH" });
        let json = format!("{{\"rel_l2\": {rel:e}, \"ok\": {ok}}}\n");
        if let Err(e) = std::fs::write(self.dir.join("check.json"), json) {
            eprintln!("{label}: writing check.json: {e}");
        }
        if !ok {
            eprintln!("{label}: our output differs from PyTorch's on the same weights and inputs; not timing a wrong result");
            std::process::exit(1);
        }
    }
}

fn rel_l2(a: &Tensor, b: &Tensor) -> candle_core::Result<f64> {
    let (a, b) = (a.to_dtype(DType::F64)?, b.to_dtype(DType::F64)?.reshape(a.shape())?);
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
