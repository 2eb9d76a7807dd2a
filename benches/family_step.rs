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
//! - `flux2_klein`: FLUX.2 [klein] 4B's `Flux2Transformer2DModel` (5 double-stream + 20 single-stream
//!   blocks of width 3072, SwiGLU MLPs, four rotary axes; no guidance embedder; 3.88B parameters) in
//!   F32 (15.5 GB: one copy per process fits the 23 GiB machine, and the two sides run one after the
//!   other), a 512² image: packed latent tokens `[1, 1024, 128]` (64×64 VAE latents of 32 channels,
//!   2×2-patchified), 512 Qwen3 feature tokens `[1, 512, 7680]` (the pipeline pads the prompt to
//!   `max_sequence_length` 512), timestep 0.5 (`t / 1000` at t = 500, as `Flux2KleinPipeline` passes
//!   it), no guidance. Loaded with `sd_flux2::loader::load_transformer` and called as
//!   `sd_flux2::pipeline` calls it, with the position ids diffusers' pipeline built (checked to be
//!   ours: `latent_ids`, `text_ids`).
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
//! `SD_BENCH_STAGES` picks stages (`sd3_medium,zimage_turbo,flux2_klein`; all when unset); `SD_BENCH_SMALL=1` uses
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
use sd_flux2::model::{latent_ids, text_ids, PositionId};
use sd_flux2::{Flux2Config, Flux2Transformer};
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

/// FLUX.2 [klein] 4B's `transformer/config.json` (the values of `tools/bench_family_step.py`'s
/// `FLUX2_KLEIN_4B_CONFIG`, which says where they come from), or the tiny one. Read through serde, as
/// the loader reads `config.json`, so fields this list leaves out keep the loader's defaults.
fn flux2_config() -> Flux2Config {
    let mut cfg = serde_json::json!({
        "patch_size": 1, "in_channels": 128, "out_channels": null, "num_layers": 5, "num_single_layers": 20,
        "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 7680,
        "timestep_guidance_channels": 256, "mlp_ratio": 3.0, "axes_dims_rope": [32, 32, 32, 32],
        "rope_theta": 2000, "eps": 1e-6, "guidance_embeds": false,
    });
    if common::small() {
        let small = serde_json::json!({
            "in_channels": 32, "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 16,
            "num_attention_heads": 2, "joint_attention_dim": 48, "timestep_guidance_channels": 32,
            "axes_dims_rope": [4, 4, 4, 4],
        });
        for (k, v) in small.as_object().into_iter().flatten() {
            cfg[k] = v.clone();
        }
    }
    serde_json::from_value(cfg).unwrap_or_else(|e| panic!("FLUX.2 [klein] config: {e}"))
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
            same_config(chk.dir(), model.config(), &cfg, stage);
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
            same_config(chk.dir(), model.config(), &cfg, stage);
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

/// Position ids saved by the PyTorch side (`[1, n, 4]` or `[n, 4]`, integers) as our `PositionId`s.
fn saved_ids(chk: &common::Checked, name: &str) -> Vec<PositionId> {
    let t = chk.input(name);
    let t = if t.rank() == 3 { t.squeeze(0) } else { Ok(t) };
    let rows = t.and_then(|t| t.to_dtype(DType::I64)).and_then(|t| t.to_vec2::<i64>()).unwrap_or_else(|e| panic!("{name}: {e}"));
    rows.iter()
        .map(|r| match r.as_slice() {
            &[a, b, c, d] => [a, b, c, d].map(|v| u32::try_from(v).unwrap_or_else(|_| panic!("{name}: position {v} out of range"))),
            _ => panic!("{name}: rows of {} coordinates, not 4", r.len()),
        })
        .collect()
}

/// Stops the bench when the check folder holds another architecture than the stage runs.
fn same_config<C: PartialEq + std::fmt::Debug>(dir: &std::path::Path, got: &C, want: &C, stage: &str) {
    if got != want {
        panic!(
            "{} holds {got:?}, not the {stage} config this bench runs (SD_BENCH_SMALL={}); rerun tools/bench_family_step.py --check-dir",
            dir.display(),
            common::small() as u8
        );
    }
}

fn bench_flux2() {
    let stage = "flux2_klein";
    let cfg = flux2_config();
    let memory = Memory::start();
    let checked = common::checked(stage);
    let start = Instant::now();
    let model = match &checked {
        Some(chk) => {
            // One F32 copy: the loader memory-maps the shards and the mapping is dropped once the model is built.
            let model = sd_flux2::loader::load_transformer(chk.dir(), DType::F32, &Device::Cpu)
                .unwrap_or_else(|e| panic!("loading {}: {e}", chk.dir().display()));
            same_config(chk.dir(), model.config(), &cfg, stage);
            model
        }
        None => Flux2Transformer::new(&cfg, common::random_vb(DType::F32)).unwrap_or_else(|e| panic!("building our FLUX.2 transformer: {e}")),
    };
    let load_secs = start.elapsed().as_secs_f64();
    let (x, img_ids, txt, txt_ids, t) = match &checked {
        Some(chk) => {
            let (x, txt) = (chk.input("hidden_states"), chk.input("encoder_hidden_states"));
            let (img_ids, txt_ids) = (saved_ids(chk, "img_ids"), saved_ids(chk, "txt_ids"));
            // The ids diffusers' pipeline built must be the ones our pipeline builds for the same latent grid
            // and text length (it calls the transformer with `latent_ids(h, w)` and `text_ids(n)`).
            let side = |axis: usize| img_ids.iter().map(|p| p[axis] as usize + 1).max().unwrap_or(0);
            let (h, w) = (side(1), side(2));
            if img_ids != latent_ids(h, w) || txt_ids != text_ids(txt_ids.len()) {
                panic!("{stage}: the saved img_ids / txt_ids are not what sd_flux2's latent_ids({h}, {w}) / text_ids({}) give", txt_ids.len());
            }
            (x, img_ids, txt, txt_ids, chk.input("timestep"))
        }
        None => {
            let (side, n_txt) = if common::small() { (8, 24) } else { (32, 512) };
            let t = Tensor::new(&[0.5f32], &Device::Cpu).unwrap_or_else(|e| panic!("timestep: {e}"));
            let x = randn(&[1, side * side, cfg.in_channels], DType::F32);
            (x, latent_ids(side, side), randn(&[1, n_txt, cfg.joint_attention_dim], DType::F32), text_ids(n_txt), t)
        }
    };
    // As sd_flux2::pipeline's denoising loop: packed tokens, the ids, the features and σ = t / 1000; the
    // output's first n_img tokens (all of them here: no reference images).
    let n_img = img_ids.len();
    let forward = || {
        model.forward(&x, &img_ids, &txt, &txt_ids, &t).and_then(|o| o.narrow(1, 0, n_img)).unwrap_or_else(|e| panic!("our FLUX.2 forward: {e}"))
    };
    measure(stage, checked.as_ref(), load_secs, memory, &forward);
}

fn main() {
    common::print_machine();
    // One model at a time, dropped before the next is built.
    for (stage, run) in [("sd3_medium", bench_sd3 as fn()), ("zimage_turbo", bench_zimage), ("flux2_klein", bench_flux2)] {
        if common::stage_enabled(stage) {
            run();
        } else {
            println!("{stage}: not in SD_BENCH_STAGES; skipped");
        }
    }
}
