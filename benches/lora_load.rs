//! Time to build an SD 1.5-sized UNet (860 M parameters, stored F16, loaded as F32 on the CPU)
//! from a memory-mapped safetensors file, without and with one rank-64 kohya LoRA on every
//! attention, feed-forward and transformer projection layer — the merge overhead of `sd-lora` —
//! and the time to switch LoRA sets on the loaded UNet in place (`sd_lora::LivePatcher`: the
//! previous set taken out, the next patched in), which is what a server pays per change of set.
//!
//! Random weights, written once to `target/lora_bench/` (≈1.7 GB + 50 MB). Never run in CI:
//! `cargo bench --bench lora_load`; `SD_BENCH_SMALL=1` swaps in a tiny config to check the harness.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use sd_lora::keys::{kohya_key, UnetNaming};
use sd_lora::{LivePatcher, LoraSet};
use sd_models::keymap::{unet_modules, Component};
use sd_models::unet::UNet2DConditionModel;
use sd_models::{ModelConfig, PerBlock, SdVariant, UNetConfig};

const RANK: usize = 64;

fn small() -> bool {
    std::env::var_os("SD_BENCH_SMALL").is_some()
}

fn config() -> ModelConfig {
    let mut cfg = SdVariant::V1_5.config();
    if small() {
        cfg.unet = UNetConfig {
            block_out_channels: vec![32, 64, 64, 64],
            cross_attention_dim: 32,
            attention_head_dim: PerBlock::One(2),
            ..UNetConfig::sd15(4)
        };
    }
    cfg
}

/// Draws a random tensor for every weight the UNet asks for and keeps it, to be saved.
#[derive(Default)]
struct Recorder(Mutex<HashMap<String, Tensor>>);

impl SimpleBackend for Recorder {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let dims = s.dims().to_vec();
        let t = if dims.len() >= 2 {
            let fan_in = s.elem_count() / dims[0].max(1);
            Tensor::randn(0f32, (1.0 / fan_in.max(1) as f32).sqrt(), s, dev)?
        } else {
            (Tensor::randn(0f32, 0.02, s, dev)? + if name.ends_with("weight") { 1.0 } else { 0.0 })?
        };
        let t = t.to_dtype(DType::F16)?;
        if let Ok(mut m) = self.0.lock() {
            m.insert(name.to_string(), t.clone());
        }
        t.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape; {name} was requested without one")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// Lets the UNet builder own a backend while the recorder stays readable.
struct Shared(Arc<Recorder>);

impl SimpleBackend for Shared {
    fn get(&self, s: Shape, n: &str, h: Init, d: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.get(s, n, h, d, dev)
    }

    fn get_unchecked(&self, n: &str, d: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.get_unchecked(n, d, dev)
    }

    fn contains_tensor(&self, n: &str) -> bool {
        self.0.contains_tensor(n)
    }
}

/// Writes the random UNet and a rank-64 LoRA for it, once per config.
fn prepare(cfg: &ModelConfig) -> candle_core::Result<(PathBuf, PathBuf)> {
    let dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("target/lora_bench").join(if small() { "small" } else { "sd15" });
    let (unet, lora_file) = (dir.join("unet.safetensors"), dir.join("lora.safetensors"));
    if unet.exists() && lora_file.exists() {
        return Ok((unet, lora_file));
    }
    std::fs::create_dir_all(&dir)?;
    let shared = Arc::new(Recorder::default());
    let vb = VarBuilder::from_backend(Box::new(Shared(shared.clone())), DType::F16, Device::Cpu);
    UNet2DConditionModel::new(vb, &cfg.unet)?;
    let weights = shared.0.lock().map(|m| m.clone()).unwrap_or_default();
    candle_core::safetensors::save(&weights, &unet)?;
    let targets = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"];
    let mut lora = HashMap::new();
    for m in unet_modules(&cfg.unet) {
        if !targets.iter().any(|t| m.ends_with(&format!(".{t}"))) {
            continue;
        }
        let Some(w) = weights.get(&format!("{m}.weight")) else { continue };
        let Some(key) = kohya_key(Component::Unet, &m, UnetNaming::Diffusers, &cfg.unet, false) else { continue };
        let dims = w.dims();
        let (out, inp) = (dims[0], dims[1]);
        let mut down_shape = vec![RANK, inp];
        let mut up_shape = vec![out, RANK];
        if dims.len() == 4 {
            down_shape.extend([1, 1]);
            up_shape.extend([1, 1]);
        }
        let down = (Tensor::randn(0f32, 1.0, down_shape, &Device::Cpu)? / (inp as f64).sqrt())?;
        let up = (Tensor::randn(0f32, 0.1, up_shape, &Device::Cpu)? / (RANK as f64).sqrt())?;
        lora.insert(format!("{key}.lora_down.weight"), down.to_dtype(DType::F16)?);
        lora.insert(format!("{key}.lora_up.weight"), up.to_dtype(DType::F16)?);
        lora.insert(format!("{key}.alpha"), Tensor::new(RANK as f32 / 2.0, &Device::Cpu)?.to_dtype(DType::F16)?);
    }
    candle_core::safetensors::save(&lora, &lora_file)?;
    Ok((unet, lora_file))
}

fn build(unet: &Path, cfg: &ModelConfig, loras: Option<&LoraSet>) -> candle_core::Result<UNet2DConditionModel> {
    // SAFETY: the bench's own files, not modified while mapped.
    let st = unsafe { MmapedSafetensors::new(unet)? };
    let backend: Box<dyn SimpleBackend> = match loras {
        Some(set) => {
            set.wrap(Component::Unet, cfg, Box::new(st)).map_err(|e| candle_core::Error::Msg(e.to_string()))?
        }
        None => Box::new(st),
    };
    UNet2DConditionModel::new(VarBuilder::from_backend(backend, DType::F32, Device::Cpu), &cfg.unet)
}

fn bench(c: &mut Criterion) {
    let cfg = config();
    let (unet, lora) = match prepare(&cfg) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("cannot prepare the LoRA bench files: {e}");
            return;
        }
    };
    let mut set = LoraSet::new();
    if let Err(e) = set.add_file(&lora, 0.8) {
        eprintln!("cannot open the bench LoRA: {e}");
        return;
    }
    let mut g = c.benchmark_group("lora_load_sd15_unet");
    g.sampling_mode(SamplingMode::Flat).sample_size(10).measurement_time(Duration::from_secs(20));
    g.bench_function("base", |b| b.iter(|| build(&unet, &cfg, None).map(drop)));
    g.bench_function("with_rank64_lora", |b| b.iter(|| build(&unet, &cfg, Some(&set)).map(drop)));
    g.finish();

    // The same file at another strength: a switch rewrites every weight the LoRA touches.
    let mut other = LoraSet::new();
    if let Err(e) = other.add_file(&lora, -0.5) {
        eprintln!("cannot open the bench LoRA: {e}");
        return;
    }
    let mut patcher = LivePatcher::new();
    let model = match live_build(&unet, &cfg, &patcher) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("cannot build the UNet: {e}");
            return;
        }
    };
    let mut g = c.benchmark_group("lora_switch_sd15_unet");
    g.sampling_mode(SamplingMode::Flat).sample_size(20).measurement_time(Duration::from_secs(20));
    let mut flip = false;
    g.bench_function("switch_rank64_set_in_place", |b| {
        b.iter(|| {
            flip = !flip;
            patcher.apply(if flip { &set } else { &other }, &cfg).map(drop)
        })
    });
    g.finish();
    eprintln!("{} weights recorded, {} patched per switch", patcher.recorded(), patcher.patched());
    drop(model);
}

/// The plain UNet, its weights recorded for in-place patching.
fn live_build(unet: &Path, cfg: &ModelConfig, patcher: &LivePatcher) -> candle_core::Result<UNet2DConditionModel> {
    // SAFETY: the bench's own files, not modified while mapped.
    let st = unsafe { MmapedSafetensors::new(unet)? };
    let backend = patcher.recording_hook()(Component::Unet, cfg, Box::new(st)).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    UNet2DConditionModel::new(VarBuilder::from_backend(backend, DType::F32, Device::Cpu), &cfg.unet)
}

criterion_group!(benches, bench);
criterion_main!(benches);
