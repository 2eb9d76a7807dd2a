//! Time to load a diffusers SD 1.5 folder (fp16 on disk) into F32 on the CPU, and the memory it
//! takes, for `tools/bench_load.sh`, which runs this once per process, interleaved with diffusers.
//!
//! ```text
//! target/release/deps/load-* DIR [ours|candle] [--runs N]
//! ```
//!
//! `ours` is `sd_models::loader::load` (what the examples call); `candle` builds the same three
//! models from candle's own `VarBuilder::from_mmaped_safetensors` (a copy as stored, then a
//! single-threaded `to_dtype` per tensor), which is how our loader read folders before
//! `sd_models::weights`. Prints one JSON line: `secs` per run, `vmhwm_kib` (peak RSS, mapped file
//! pages included) and `peak_anon_kib` (peak anonymous RSS sampled every 5 ms: the memory the
//! process holds, without the page cache it maps). Never run in CI.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use sd_models::clip::ClipTextModel;
use sd_models::diffusers::DiffusersFolder;
use sd_models::keymap::Component;
use sd_models::loader::{self, LoadOptions};
use sd_models::unet::UNet2DConditionModel;
use sd_models::vae::AutoencoderKL;

type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

fn status_kib(field: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':')?.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Samples RssAnon on a thread until dropped.
struct AnonPeak {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AnonPeak {
    fn start() -> Self {
        let peak = Arc::new(AtomicU64::new(status_kib("RssAnon")));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(status_kib("RssAnon"), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Self { peak, stop, thread: Some(thread) }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.fetch_max(status_kib("RssAnon"), Ordering::Relaxed);
        self.peak.load(Ordering::Relaxed)
    }
}

/// The pre-`sd_models::weights` path: candle's mmap backend converting with `Tensor::to_dtype`.
fn load_candle(dir: &Path) -> AnyResult<()> {
    let folder = DiffusersFolder::open(dir)?;
    let dev = Device::Cpu;
    let vb = |c: Component| -> AnyResult<VarBuilder<'static>> {
        let files = folder.weight_files(c, true)?;
        // SAFETY: read-only mapping of files nothing writes during the bench.
        Ok(unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, &dev)? })
    };
    let unet = UNet2DConditionModel::new(vb(Component::Unet)?, &folder.unet)?;
    let vae = AutoencoderKL::new(vb(Component::Vae)?, &folder.vae)?;
    let te = ClipTextModel::new(vb(Component::TextEncoder)?, &folder.text_encoder)?;
    black_box((&unet, &vae, &te));
    Ok(())
}

fn load_ours(dir: &Path) -> AnyResult<()> {
    let opts = LoadOptions { dtype: Some(DType::F32), device: Device::Cpu, ..LoadOptions::default() };
    let models = loader::load(dir, &opts)?;
    if models.dtype != DType::F32 || models.vae_dtype != DType::F32 {
        return Err(format!("loaded as {:?}/{:?}, not F32", models.dtype, models.vae_dtype).into());
    }
    black_box(&models);
    Ok(())
}

fn main() -> AnyResult<()> {
    // `cargo bench` appends `--bench`; the script runs the binary directly.
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let mut dir = None;
    let mut mode = "ours".to_string();
    let mut runs = 1usize;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" => runs = it.next().and_then(|n| n.parse().ok()).ok_or("--runs needs a number")?,
            "ours" | "candle" => mode = a.clone(),
            other if dir.is_none() => dir = Some(PathBuf::from(other)),
            other => return Err(format!("unexpected argument {other:?}").into()),
        }
    }
    let dir = dir.ok_or("usage: load DIR [ours|candle] [--runs N] (tools/bench_load.sh makes DIR)")?;
    let peak = AnonPeak::start();
    let mut secs = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        match mode.as_str() {
            "candle" => load_candle(&dir)?,
            _ => load_ours(&dir)?,
        }
        secs.push(start.elapsed().as_secs_f64());
    }
    let peak_anon = peak.finish();
    println!(
        "{{\"side\": \"{mode}\", \"secs\": {}, \"runs\": {secs:?}, \"vmhwm_kib\": {}, \"peak_anon_kib\": {peak_anon}, \"cpus\": {}}}",
        secs.iter().copied().fold(f64::INFINITY, f64::min),
        status_kib("VmHWM"),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    Ok(())
}
