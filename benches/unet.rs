//! One SD 1.5 UNet step on the CPU in F32 — batch 2 (classifier-free guidance), 64×64 latent
//! (512² image), timestep 500, context [2, 77, 768] — with random weights, through our
//! `sd_models::unet` and through candle-transformers' stock implementation of the same network.
//!
//! `cargo bench --bench unet`; `SD_BENCH_SMALL=1` swaps in a tiny config to check the harness;
//! the stock model runs only with `SD_BENCH_STOCK=1`. With `SD_BENCH_CHECK_DIR` (what
//! `tools/bench_compare.sh` sets) the weights and inputs are the ones `tools/bench_torch.py
//! --check-dir` saved, and the bench stops unless our output matches PyTorch's to a relative L2 of
//! 1e-4 before it times anything; otherwise the weights are random.
//! Medians land in `target/criterion/unet_sd15_step/{ours,stock}/new/estimates.json`, which
//! `tools/bench_compare.sh` reads.

mod common;

use std::hint::black_box;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::stable_diffusion::unet_2d as stock;
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use sd_models::unet::UNet2DConditionModel;
use sd_models::{PerBlock, UNetConfig};

const TIMESTEP: f64 = 500.0;

/// Our config and the equivalent stock one, plus the latent side and context width.
fn configs() -> (UNetConfig, stock::UNet2DConditionModelConfig, usize) {
    let ours = if common::small() {
        UNetConfig {
            block_out_channels: vec![32, 64, 64, 64],
            cross_attention_dim: 32,
            attention_head_dim: PerBlock::One(2),
            ..UNetConfig::sd15(4)
        }
    } else {
        UNetConfig::sd15(4)
    };
    let blocks = ours
        .block_out_channels
        .iter()
        .enumerate()
        .map(|(i, &out_channels)| stock::BlockConfig {
            out_channels,
            use_cross_attn: ours.down_has_attn(i).then_some(1),
            attention_head_dim: ours.heads(i),
        })
        .collect();
    // Field for field the SD 1.5 values of `StableDiffusionConfig::v1_5`, whose UNet config is private.
    let theirs = stock::UNet2DConditionModelConfig {
        blocks,
        center_input_sample: false,
        cross_attention_dim: ours.cross_attention_dim,
        downsample_padding: 1,
        flip_sin_to_cos: true,
        freq_shift: 0.,
        layers_per_block: ours.layers_per_block,
        mid_block_scale_factor: 1.,
        norm_eps: ours.norm_eps,
        norm_num_groups: ours.norm_num_groups,
        sliced_attention_size: None,
        use_linear_projection: false,
    };
    let side = if common::small() { 16 } else { 64 };
    (ours, theirs, side)
}

fn bench_unet(c: &mut Criterion) {
    common::print_machine();
    let (ours_cfg, stock_cfg, side) = configs();
    let dev = Device::Cpu;
    // With SD_BENCH_CHECK_DIR: PyTorch's weights and inputs, and its output to match before timing.
    let checked = common::checked("unet");
    let (sample, context) = match &checked {
        Some(chk) => (chk.input("sample"), chk.input("context")),
        None => (
            Tensor::randn(0f32, 1., (2, 4, side, side), &dev).unwrap_or_else(|e| panic!("sample: {e}")),
            Tensor::randn(0f32, 1., (2, 77, ours_cfg.cross_attention_dim), &dev).unwrap_or_else(|e| panic!("context: {e}")),
        ),
    };

    let mut group = c.benchmark_group("unet_sd15_step");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(5));

    // One model at a time: two full-size F32 UNets would hold ~7 GB.
    {
        let vb = checked.as_ref().map_or_else(|| common::random_vb(DType::F32), |chk| chk.vb(DType::F32, &Device::Cpu));
        let unet = UNet2DConditionModel::new(vb, &ours_cfg).unwrap_or_else(|e| panic!("building our UNet: {e}"));
        if let Some(chk) = &checked {
            let out = unet.forward_simple(&sample, TIMESTEP, &context).unwrap_or_else(|e| panic!("our UNet forward: {e}"));
            chk.verify("unet_sd15_step/ours", &out);
        }
        group.bench_function("ours", |b| {
            b.iter(|| {
                black_box(
                    unet.forward_simple(&sample, TIMESTEP, &context)
                        .unwrap_or_else(|e| panic!("our UNet forward: {e}")),
                )
            })
        });
    }
    if common::with_stock() {
        let unet =
            stock::UNet2DConditionModel::new(common::random_vb(DType::F32), 4, 4, false, stock_cfg)
                .unwrap_or_else(|e| panic!("building the stock UNet: {e}"));
        group.bench_function("stock", |b| {
            b.iter(|| {
                black_box(
                    unet.forward(&sample, TIMESTEP, &context)
                        .unwrap_or_else(|e| panic!("stock UNet forward: {e}")),
                )
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_unet);
criterion_main!(benches);
