//! One full-size transformer step of each newer model family on the CPU, against diffusers on the same
//! weights, inputs and cores (`tools/bench_family_step.sh`; never run in CI):
//!
//! - `sd3_medium`: SD 3.5 Medium's MMDiT-X (24 blocks of width 1536, dual attention in blocks 0–12,
//!   QK RMS norm; 2.5B parameters) in F32, a 512² image without CFG: latent `[1, 16, 64, 64]`
//!   (1024 patches), 77 CLIP + 256 T5 tokens `[1, 333, 4096]`, pooled `[1, 2048]`, timestep 500
//!   (σ·1000, as the pipeline passes it). Loaded with `sd_sd3::loader::load_transformer`.
//! - `zimage_turbo`: Z-Image Turbo's single-stream DiT (30 + 2 + 2 blocks of width 3840; 6.2B
//!   parameters) with BF16 weights (F32 would take 24 GB), a 512² image: latent `[1, 16, 64, 64]`
//!   (1024 patches), 64 Qwen3 caption features `[64, 2560]`, timestep 0.5 (`(1000 − t) / 1000` at
//!   t = 500, as `ZImagePipeline` passes it). Loaded with `sd_zimage::transformer::load_transformer`
//!   in BF16. On the CPU our Z-Image model keeps BF16 activations and multiplies BF16 weights in F32
//!   panels (F32 accumulation, narrowed to BF16 after each product); PyTorch runs the whole model in
//!   BF16.
//!
//! With `SD_BENCH_CHECK_DIR` the weights and inputs are what `tools/bench_family_step.py --check-dir`
//! saved (a diffusers transformer folder plus `io.safetensors` per stage), and each stage stops unless
//! our output is within the relative L2 of `reference.json` (1e-4 for F32; for BF16 four times
//! PyTorch's own BF16-vs-F32 distance) before anything is timed. Without it the weights are random
//! (same architecture, no check). A step takes tens of seconds to minutes at full size, so instead of
//! criterion (ten samples at least) this is a plain loop: one untimed forward (the checked one), then
//! `SD_BENCH_RUNS` (default 3) timed ones; it prints `ours <stage>: median … ms (min …, max …)` and
//! the peak memory of the stage (VmHWM reset before loading, so mapped weight-file pages count; and
//! peak anonymous RSS sampled every 5 ms, which leaves the page cache out). With
//! `SD_BENCH_RESULT_DIR` each stage also writes `ours_<stage>.json` there.
//!
//! `SD_BENCH_STAGES` picks stages (`sd3_medium,zimage_turbo`; all when unset); `SD_BENCH_SMALL=1` uses
//! the tiny configs of `tools/bench_family_step.py --small` to check the harness in seconds.

mod common;

use std::hint::black_box;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use sd_sd3::config::Sd3Config;
use sd_sd3::loader::Part;
use sd_sd3::model::Mmdit;
use sd_zimage::{ZImageConfig, ZImageModel};

/// SD 3.5 Medium's architecture, or the tiny one of `bench_family_step.py --small`.
fn sd3_config() -> Sd3Config {
    let full = Sd3Config::sd35_medium();
    if common::small() {
        Sd3Config {
            num_layers: 2,
            attention_head_dim: 8,
            num_attention_heads: 4,
            joint_attention_dim: 32,
            caption_projection_dim: 32,
            pooled_projection_dim: 32,
            pos_embed_max_size: 16,
            sample_size: 16,
            dual_attention_layers: vec![0],
            ..full
        }
    } else {
        full
    }
}

/// Z-Image Turbo's published `transformer/config.json` (`axes_lens` `[1536, 512, 512]`), or the tiny one.
fn zimage_config() -> ZImageConfig {
    let full = ZImageConfig { axes_lens: vec![1536, 512, 512], ..ZImageConfig::default() };
    if common::small() {
        ZImageConfig { dim: 64, n_layers: 2, n_refiner_layers: 1, n_heads: 2, cap_feat_dim: 32, axes_dims: vec![8, 12, 12], axes_lens: vec![1536, 64, 64], ..full }
    } else {
        full
    }
}

/// (latent side, text tokens) of the inputs drawn when there is no check folder.
fn sizes() -> (usize, usize) {
    if common::small() {
        (16, 16)
    } else {
        (64, 77 + 256)
    }
}

fn status_kib(field: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':')?.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Peak memory of one stage: resets VmHWM and samples RssAnon every 5 ms until [`Memory::finish`].
struct Memory {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    hwm_reset: bool,
}

impl Memory {
    fn start() -> Self {
        // Writing 5 resets VmHWM to the current RSS, so a later stage's peak is its own.
        let hwm_reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
        let peak = Arc::new(AtomicU64::new(status_kib("RssAnon")));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(status_kib("RssAnon"), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Self { peak, stop, thread: Some(thread), hwm_reset }
    }

    /// (VmHWM KiB, peak RssAnon KiB, whether VmHWM covers this stage alone).
    fn finish(mut self) -> (u64, u64, bool) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.fetch_max(status_kib("RssAnon"), Ordering::Relaxed);
        (status_kib("VmHWM"), self.peak.load(Ordering::Relaxed), self.hwm_reset)
    }
}

fn runs() -> usize {
    match std::env::var("SD_BENCH_RUNS") {
        Ok(v) => v.trim().parse().ok().filter(|&n| n > 0).unwrap_or_else(|| panic!("SD_BENCH_RUNS={v:?} is not a positive number")),
        Err(_) => 3,
    }
}

/// Runs `forward` once untimed (checked against PyTorch when `checked` is set), then `runs()` timed
/// times, and prints and records the result.
fn measure(stage: &str, checked: Option<&common::Checked>, load_secs: f64, memory: Memory, forward: &dyn Fn() -> Tensor) {
    let out = forward();
    match checked {
        Some(chk) => chk.verify(&format!("{stage}/ours"), &out),
        None => println!("{stage}: random weights and inputs (no SD_BENCH_CHECK_DIR), output not checked"),
    }
    drop(out);
    let n = runs();
    let mut ms: Vec<f64> = (0..n)
        .map(|_| {
            let start = Instant::now();
            black_box(forward());
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    let median = if n % 2 == 1 { ms[n / 2] } else { (ms[n / 2 - 1] + ms[n / 2]) / 2.0 };
    let (hwm, anon, own) = memory.finish();
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "ours {stage}: median {median:.1} ms over {n} runs (min {:.1}, max {:.1}); loaded in {load_secs:.1} s; peak RSS {:.0} MiB (VmHWM{}), peak anon {:.0} MiB",
        ms[0],
        ms[n - 1],
        mib(hwm),
        if own { "" } else { ", whole process" },
        mib(anon)
    );
    if let Some(dir) = std::env::var_os("SD_BENCH_RESULT_DIR") {
        let json = serde_json::json!({
            "stage": stage, "median_ms": median, "samples_ms": ms, "load_s": load_secs,
            "vmhwm_kib": hwm, "vmhwm_stage_only": own, "peak_anon_kib": anon,
            "rel_l2": checked.and_then(|c| std::fs::read_to_string(c.dir().join("check.json")).ok())
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok()).and_then(|v| v.get("rel_l2").cloned()),
        });
        let path = Path::new(&dir).join(format!("ours_{stage}.json"));
        if let Err(e) = std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(&path, format!("{json}\n"))) {
            eprintln!("{stage}: writing {}: {e}", path.display());
        }
    }
}

fn randn(shape: &[usize], dtype: DType) -> Tensor {
    Tensor::randn(0f32, 1., shape, &Device::Cpu).and_then(|t| t.to_dtype(dtype)).unwrap_or_else(|e| panic!("random input {shape:?}: {e}"))
}

fn bench_sd3() {
    let stage = "sd3_medium";
    let cfg = sd3_config();
    let memory = Memory::start();
    let checked = common::checked(stage);
    let start = Instant::now();
    let model = match &checked {
        Some(chk) => {
            let model = sd_sd3::loader::load_transformer(&Part::Folder(chk.dir().to_path_buf()), None, DType::F32, &Device::Cpu)
                .unwrap_or_else(|e| panic!("loading {}: {e}", chk.dir().display()));
            if *model.config() != cfg {
                panic!(
                    "{} holds {:?}, not the {} config this bench runs (SD_BENCH_SMALL={}); rerun tools/bench_family_step.py --check-dir",
                    chk.dir().display(),
                    model.config(),
                    stage,
                    common::small() as u8
                );
            }
            model
        }
        None => Mmdit::new(&cfg, common::random_vb(DType::F32)).unwrap_or_else(|e| panic!("building our SD3 MMDiT: {e}")),
    };
    let load_secs = start.elapsed().as_secs_f64();
    let (x, t, ctx, pooled) = match &checked {
        Some(chk) => (chk.input("hidden_states"), chk.input("timestep"), chk.input("encoder_hidden_states"), chk.input("pooled_projections")),
        None => {
            let (side, txt) = sizes();
            let t = Tensor::new(&[500f32], &Device::Cpu).unwrap_or_else(|e| panic!("timestep: {e}"));
            (randn(&[1, cfg.in_channels, side, side], DType::F32), t, randn(&[1, txt, cfg.joint_attention_dim], DType::F32), randn(&[1, cfg.pooled_projection_dim], DType::F32))
        }
    };
    let forward = || model.forward(&x, &t, &ctx, &pooled, &[]).unwrap_or_else(|e| panic!("our SD3 forward: {e}"));
    measure(stage, checked.as_ref(), load_secs, memory, &forward);
}

fn bench_zimage() {
    let stage = "zimage_turbo";
    let cfg = zimage_config();
    let memory = Memory::start();
    let checked = common::checked(stage);
    let start = Instant::now();
    let model = match &checked {
        Some(chk) => {
            let model = sd_zimage::transformer::load_transformer(chk.dir(), DType::BF16, &Device::Cpu, None)
                .unwrap_or_else(|e| panic!("loading {}: {e}", chk.dir().display()));
            if *model.config() != cfg {
                panic!(
                    "{} holds {:?}, not the {} config this bench runs (SD_BENCH_SMALL={}); rerun tools/bench_family_step.py --check-dir",
                    chk.dir().display(),
                    model.config(),
                    stage,
                    common::small() as u8
                );
            }
            model
        }
        None => ZImageModel::new(&cfg, common::random_vb(DType::BF16)).unwrap_or_else(|e| panic!("building our Z-Image transformer: {e}")),
    };
    let load_secs = start.elapsed().as_secs_f64();
    let (x, t, cap) = match &checked {
        Some(chk) => {
            // diffusers takes one [C, F=1, H, W] latent per item; ours a [B, C, H, W] batch.
            let x = chk.input("hidden_states").squeeze(1).and_then(|x| x.unsqueeze(0)).unwrap_or_else(|e| panic!("hidden_states: {e}"));
            (x, chk.input("timestep"), chk.input("encoder_hidden_states"))
        }
        None => {
            let (side, _) = sizes();
            let cap_len = if common::small() { 24 } else { 64 };
            let t = Tensor::new(&[0.5f32], &Device::Cpu).unwrap_or_else(|e| panic!("timestep: {e}"));
            (randn(&[1, cfg.in_channels, side, side], DType::BF16), t, randn(&[cap_len, cfg.cap_feat_dim], DType::BF16))
        }
    };
    let caps = [cap];
    let forward = || model.forward(&x, &t, &caps).unwrap_or_else(|e| panic!("our Z-Image forward: {e}"));
    measure(stage, checked.as_ref(), load_secs, memory, &forward);
}

fn main() {
    common::print_machine();
    // One model at a time, dropped before the next is built.
    for (stage, run) in [("sd3_medium", bench_sd3 as fn()), ("zimage_turbo", bench_zimage)] {
        if common::stage_enabled(stage) {
            run();
        } else {
            println!("{stage}: not in SD_BENCH_STAGES; skipped");
        }
    }
}
