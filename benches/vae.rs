//! SD VAE decode of one 64×64 latent into a 512² image on the CPU in F32 through our
//! `sd_models::vae` (and candle-transformers' stock implementation with `SD_BENCH_STOCK=1`).
//!
//! `cargo bench --bench vae`; `SD_BENCH_SMALL=1` swaps in a tiny config to check the harness.
//! With `SD_BENCH_CHECK_DIR` (what `tools/bench_compare.sh` sets) the weights and latents are the
//! ones `tools/bench_torch.py --check-dir` saved, and the bench stops unless our image matches
//! PyTorch's to a relative L2 of 1e-4 before it times anything; otherwise the weights are random.
//! Medians land in `target/criterion/vae_sd_decode/{ours,stock}/new/estimates.json`, which
//! `tools/bench_compare.sh` reads.

mod common;

use std::hint::black_box;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::stable_diffusion::vae as stock;
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use sd_models::vae::AutoencoderKL;
use sd_models::VaeConfig;

fn bench_vae(c: &mut Criterion) {
    let (cfg, side) = if common::small() {
        (
            VaeConfig {
                block_out_channels: vec![32, 32, 64, 64],
                layers_per_block: 1,
                ..VaeConfig::sd()
            },
            16,
        )
    } else {
        (VaeConfig::sd(), 64)
    };
    let stock_cfg = stock::AutoEncoderKLConfig {
        block_out_channels: cfg.block_out_channels.clone(),
        layers_per_block: cfg.layers_per_block,
        latent_channels: cfg.latent_channels,
        norm_num_groups: cfg.norm_num_groups,
        use_quant_conv: cfg.use_quant_conv,
        use_post_quant_conv: cfg.use_post_quant_conv,
    };
    common::print_machine();
    // With SD_BENCH_CHECK_DIR: PyTorch's weights and latents, and its image to match before timing.
    let checked = common::checked("vae");
    let latents = match &checked {
        Some(chk) => chk.input("latents"),
        None => Tensor::randn(0f32, 1., (1, cfg.latent_channels, side, side), &Device::Cpu)
            .unwrap_or_else(|e| panic!("latents: {e}")),
    };

    let mut group = c.benchmark_group("vae_sd_decode");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(5));
    {
        let vb = checked.as_ref().map_or_else(|| common::random_vb(DType::F32), |chk| chk.vb(DType::F32, &Device::Cpu));
        let vae = AutoencoderKL::new(vb, &cfg).unwrap_or_else(|e| panic!("building our VAE: {e}"));
        if let Some(chk) = &checked {
            let out = vae.decode(&latents).unwrap_or_else(|e| panic!("our VAE decode: {e}"));
            chk.verify("vae_sd_decode/ours", &out);
        }
        group.bench_function("ours", |b| {
            b.iter(|| {
                black_box(
                    vae.decode(&latents)
                        .unwrap_or_else(|e| panic!("our VAE decode: {e}")),
                )
            })
        });
    }
    if common::with_stock() {
        let vae = stock::AutoEncoderKL::new(common::random_vb(DType::F32), 3, 3, stock_cfg)
            .unwrap_or_else(|e| panic!("building the stock VAE: {e}"));
        group.bench_function("stock", |b| {
            b.iter(|| {
                black_box(
                    vae.decode(&latents)
                        .unwrap_or_else(|e| panic!("stock VAE decode: {e}")),
                )
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_vae);
criterion_main!(benches);
