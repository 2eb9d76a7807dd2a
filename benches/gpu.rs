//! One forward of each component workload of `tools/gpu_bench.sh` through our models, on the GPU
//! by default, on the weights and inputs PyTorch used: the SD 1.5 and SDXL UNet steps, the VAE
//! decodes at 512² and 1024², and the FLUX.1-schnell transformer step.
//!
//! `tools/gpu_bench.py` saves each workload under `SD_BENCH_CHECK_DIR/<workload>/`: the diffusers
//! model folder (`model/`), `io.safetensors` (inputs and PyTorch's output) and `reference.json`
//! (the dtype PyTorch ran in and the relative-L2 limit for our output). This bench loads `model/`
//! through our loaders in that dtype, runs the same forward, exits with status 1 when the output is
//! further from PyTorch's than the limit, then times it. It writes `ours.json` beside the inputs
//! (device, dtype, load time and the wall-clock window of the check and the timed runs, which the
//! driver matches against its GPU memory samples). Medians land in
//! `target/criterion/gpu_<workload>/ours/new/estimates.json`.
//!
//! `SD_BENCH_DEVICE=cuda|cpu` (default `cuda`; a binary built without `--features cuda` says so and
//! stops), `SD_BENCH_ONLY=unet15,vae512,…` picks workloads (default: every one saved). Without
//! `SD_BENCH_CHECK_DIR` there is nothing to compare against, and the bench does nothing.

mod common;

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::flux::WithForward;
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use sd_models::unet::{AddedCond, UNet2DConditionModel, UNetConditioning};
use sd_models::weights::MappedWeights;
use sd_toolkit::AnyResult;

/// The workloads in the order the driver runs them: cheap ones first.
const WORKLOADS: [&str; 5] = ["unet15", "vae512", "vae1024", "unetxl", "flux"];

/// One loaded model with its inputs on the device, ready to run forwards.
type Forward = Box<dyn Fn() -> AnyResult<Tensor>>;

fn bench_gpu(c: &mut Criterion) {
    let Some(root) = std::env::var_os("SD_BENCH_CHECK_DIR").map(PathBuf::from) else {
        eprintln!("gpu bench: SD_BENCH_CHECK_DIR is not set, so there is nothing to compare against; tools/gpu_bench.sh runs this bench");
        return;
    };
    let device = bench_device();
    common::print_machine();
    // Which of the GPU paths in sd_models::ops this binary and environment use (SD_CUDA_CONV, SD_CUDA_ATTENTION).
    println!("gpu paths: convolutions {:?}, attention {:?}", sd_models::ops::cuda_conv(), sd_models::ops::cuda_attention());
    let only = std::env::var("SD_BENCH_ONLY").ok();
    for name in WORKLOADS {
        if only.as_deref().is_some_and(|list| !list.split(',').any(|w| w.trim() == name)) {
            continue;
        }
        if !root.join(name).join("io.safetensors").is_file() {
            if only.is_some() {
                panic!("{name}: SD_BENCH_CHECK_DIR has no {name}/io.safetensors; run the PyTorch side of tools/gpu_bench.py first");
            }
            continue;
        }
        if let Some(chk) = common::checked(name) {
            bench_workload(c, &device, name, &chk);
        }
    }
}

/// `SD_BENCH_DEVICE`'s device; exits with a sentence when it cannot be opened.
fn bench_device() -> Device {
    let wanted = std::env::var("SD_BENCH_DEVICE").unwrap_or_else(|_| "cuda".into());
    let fail = |why: String| -> ! {
        eprintln!("gpu bench: {why}");
        std::process::exit(2)
    };
    match wanted.as_str() {
        "cpu" => Device::Cpu,
        "cuda" if !candle_core::utils::cuda_is_available() => fail(
            "this binary was built without CUDA: build it with `cargo bench --features cuda --bench gpu` (tools/gpu_bench.sh prepare), or set SD_BENCH_DEVICE=cpu".into(),
        ),
        "cuda" => Device::new_cuda(0).unwrap_or_else(|e| fail(format!("CUDA device 0 cannot be opened: {}", sd_models::device::first_line(&e)))),
        other => fail(format!("SD_BENCH_DEVICE={other:?}: use cuda or cpu")),
    }
}

fn bench_workload(c: &mut Criterion, device: &Device, name: &str, chk: &common::Checked) {
    let dtype = chk.dtype();
    let label = format!("gpu_{name}/ours");
    let loaded = Instant::now();
    let forward = load(name, &chk.dir().join("model"), chk, dtype, device).unwrap_or_else(|e| panic!("{name}: loading our model: {e}"));
    device.synchronize().unwrap_or_else(|e| panic!("{name}: synchronize: {e}"));
    let load_s = loaded.elapsed().as_secs_f64();
    println!("{name}: loaded in {load_s:.2} s ({dtype:?} on {})", describe(device));

    let start = epoch_secs();
    // The first forward doubles as the warm-up: kernels are loaded and cuBLAS/cuDNN pick algorithms.
    let out = forward().unwrap_or_else(|e| panic!("{name}: our forward: {e}"));
    device.synchronize().unwrap_or_else(|e| panic!("{name}: synchronize: {e}"));
    chk.verify(&label, &out);
    drop(out);

    let mut group = c.benchmark_group(format!("gpu_{name}"));
    group.sample_size(10).sampling_mode(SamplingMode::Flat).warm_up_time(Duration::from_millis(1)).measurement_time(Duration::from_secs(3));
    group.bench_function("ours", |b| {
        b.iter(|| {
            let out = forward().unwrap_or_else(|e| panic!("{name}: our forward: {e}"));
            // CUDA runs asynchronously: without waiting, an iteration would time only the launches.
            device.synchronize().unwrap_or_else(|e| panic!("{name}: synchronize: {e}"));
            black_box(out)
        })
    });
    group.finish();
    let end = epoch_secs();

    let json = serde_json::json!({
        "device": describe(device),
        "dtype": format!("{dtype:?}").to_lowercase(),
        "load_s": load_s,
        "window": [start, end],
    });
    if let Err(e) = std::fs::write(chk.dir().join("ours.json"), format!("{json}\n")) {
        eprintln!("{name}: writing ours.json: {e}");
    }
}

/// Builds `name`'s model from the diffusers folder `dir` with our loaders and returns its forward
/// over the saved inputs (moved to `device` here, so the timed runs copy nothing).
fn load(name: &str, dir: &Path, chk: &common::Checked, dtype: DType, device: &Device) -> AnyResult<Forward> {
    let input = |n: &str| chk.input_on(n, device);
    Ok(match name {
        "unet15" | "unetxl" => {
            let unet = load_unet(dir, dtype, device)?;
            let (sample, timestep, context) = (input("sample"), input("timestep"), input("context"));
            let cond = if unet.config().has_text_time() {
                UNetConditioning {
                    added: Some(AddedCond { text_embeds: input("text_embeds"), time_ids: input("time_ids") }),
                    ..UNetConditioning::default()
                }
            } else {
                UNetConditioning::default()
            };
            Box::new(move || Ok(unet.forward_t(&sample, &timestep, &context, &cond)?))
        }
        "vae512" | "vae1024" => {
            // A folder brings its own config.json; the config passed here is only for bare files.
            let (vae, _) = sd_models::vae::load_vae_weights(dir, &sd_models::VaeConfig::sd(), dtype, device)?;
            if vae.dtype() != dtype {
                return Err(format!("the VAE loaded as {:?}, not {dtype:?} (force_upcast in its config?)", vae.dtype()).into());
            }
            let latents = input("latents");
            Box::new(move || Ok(vae.decode(&latents)?))
        }
        "flux" => {
            let transformer = sd_flux::transformer::load_transformer(dir, dtype, device, None)?;
            // diffusers takes the position ids as [seq, 3]; ours as [batch, seq, 3].
            let img_ids = input("img_ids").unsqueeze(0)?;
            let txt_ids = input("txt_ids").unsqueeze(0)?;
            let (img, txt, timestep, pooled) =
                (input("hidden_states"), input("encoder_hidden_states"), input("timestep"), input("pooled_projections"));
            Box::new(move || Ok(transformer.forward(&img, &img_ids, &txt, &txt_ids, &timestep, &pooled, None)?))
        }
        other => return Err(format!("unknown workload {other}").into()),
    })
}

/// A diffusers `unet/` folder through the pieces `sd_models::loader` assembles a pipeline's UNet from:
/// its config reader, its weight-file lookup and its memory-mapped weight backend.
fn load_unet(dir: &Path, dtype: DType, device: &Device) -> AnyResult<UNet2DConditionModel> {
    let cfg = sd_models::diffusers::read_unet_config(&dir.join("config.json"))?;
    let files = sd_models::diffusers::find_weight_files(dir, false)?;
    // SAFETY: read-only mapping of files the PyTorch side wrote; nothing changes them while the bench runs.
    let st = unsafe { MmapedSafetensors::multi(&files) }?;
    let vb = VarBuilder::from_backend(Box::new(MappedWeights::new(st)), dtype, device.clone());
    Ok(UNet2DConditionModel::new(vb, &cfg)?)
}

fn describe(device: &Device) -> &'static str {
    if device.is_cuda() {
        "cuda:0"
    } else {
        "cpu"
    }
}

/// Seconds since the Unix epoch, the clock the driver stamps its GPU memory samples with.
fn epoch_secs() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

criterion_group!(benches, bench_gpu);
criterion_main!(benches);
