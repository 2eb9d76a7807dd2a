//! One FLUX.1 double-stream block and one single-stream block at full width (24 heads of 128, T5
//! width 4096, pooled CLIP 768) on the CPU in F32, on 4096 image tokens (a 1024² image: its 128²
//! latent packed 2×2) and 512 T5 tokens, through our `sd_flux` transformer. The full model
//! (19 + 38 blocks, ≈ 48 GB in F32) does not fit this machine's memory, so each bench runs the whole
//! transformer with a single block: its input embedders and final layer are timed too, under 2 % of
//! one block's work at 4608 tokens, on both sides alike. Timestep 0.5 (σ, as the pipeline passes it),
//! no guidance embedding (schnell-like).
//!
//! `cargo bench --bench flux_block`; `SD_BENCH_SMALL=1` swaps in a tiny width and 64 + 16 tokens to
//! check the harness. With `SD_BENCH_CHECK_DIR` (what `tools/bench_compare.sh` sets) the weights and
//! inputs are the ones `tools/bench_torch.py --check-dir` saved as diffusers `FluxTransformer2DModel`
//! folders (`flux_double`: one double block, `flux_single`: one single block), loaded through
//! `sd_flux::transformer::load_transformer`, and each bench stops unless our output matches PyTorch's
//! to a relative L2 of 1e-4 before it times anything; otherwise the weights are random.
//! `SD_BENCH_STAGES` picks `flux_double` and/or `flux_single`. Medians land in
//! `target/criterion/flux_{double,single}_block/ours/new/estimates.json`, which
//! `tools/bench_compare.sh` reads.

mod common;

use std::hint::black_box;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::flux::model::Config;
use candle_transformers::models::flux::WithForward;
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use sd_flux::model::{FluxModel, Weights};
use sd_flux::FluxTransformer;

const TIMESTEP: f32 = 0.5;

/// The architecture `tools/bench_torch.py` builds, with `double` or single blocks, plus the latent
/// grid side and the T5 length, for the random-weight run (a checked run reads the saved folder).
fn config(double: bool) -> (Config, usize, usize) {
    let (depth, depth_single) = if double { (1, 0) } else { (0, 1) };
    let full = Config { depth, depth_single_blocks: depth_single, ..Config::schnell() };
    if common::small() {
        let cfg = Config { hidden_size: 32, num_heads: 2, context_in_dim: 32, vec_in_dim: 32, axes_dim: vec![4, 6, 6], ..full };
        (cfg, 8, 16)
    } else {
        (full, 64, 512)
    }
}

/// The inputs of one forward (diffusers' names, ids with a batch axis as ours takes them).
struct Inputs {
    img: Tensor,
    img_ids: Tensor,
    txt: Tensor,
    txt_ids: Tensor,
    timestep: Tensor,
    pooled: Tensor,
}

impl Inputs {
    fn saved(chk: &common::Checked) -> Self {
        // diffusers takes the position ids as [seq, 3]; ours as [batch, seq, 3].
        let ids = |n: &str| chk.input(n).unsqueeze(0).unwrap_or_else(|e| panic!("{n}: {e}"));
        Self {
            img: chk.input("hidden_states"),
            img_ids: ids("img_ids"),
            txt: chk.input("encoder_hidden_states"),
            txt_ids: ids("txt_ids"),
            timestep: chk.input("timestep"),
            pooled: chk.input("pooled_projections"),
        }
    }

    fn random(cfg: &Config, grid: usize, txt_len: usize) -> Self {
        let dev = Device::Cpu;
        let randn = |shape: (usize, usize, usize), what: &str| {
            Tensor::randn(0f32, 1., shape, &dev).unwrap_or_else(|e| panic!("{what}: {e}"))
        };
        // FluxPipeline._prepare_latent_image_ids: (0, row, column) per packed token.
        let ids: Vec<f32> = (0..grid * grid).flat_map(|i| [0.0, (i / grid) as f32, (i % grid) as f32]).collect();
        let made = |t: candle_core::Result<Tensor>, what: &str| t.unwrap_or_else(|e| panic!("{what}: {e}"));
        Self {
            img: randn((1, grid * grid, cfg.in_channels), "hidden_states"),
            img_ids: made(Tensor::from_vec(ids, (1, grid * grid, 3), &dev), "img_ids"),
            txt: randn((1, txt_len, cfg.context_in_dim), "encoder_hidden_states"),
            txt_ids: made(Tensor::zeros((1, txt_len, 3), DType::F32, &dev), "txt_ids"),
            timestep: made(Tensor::new(&[TIMESTEP], &dev), "timestep"),
            pooled: made(Tensor::randn(0f32, 1., (1, cfg.vec_in_dim), &dev), "pooled_projections"),
        }
    }

    fn forward(&self, model: &FluxTransformer) -> Tensor {
        model
            .forward(&self.img, &self.img_ids, &self.txt, &self.txt_ids, &self.timestep, &self.pooled, None)
            .unwrap_or_else(|e| panic!("our FLUX forward: {e}"))
    }
}

/// Loads (or draws) the one-block transformer of `stage`, checks it against PyTorch when the check
/// folder is set, and times it as `group/ours`.
fn bench_block(c: &mut Criterion, stage: &str, group_name: &str, double: bool) {
    if !common::stage_enabled(stage) {
        println!("{stage}: not in SD_BENCH_STAGES; skipped");
        return;
    }
    let (cfg, grid, txt_len) = config(double);
    let checked = common::checked(stage);
    let (model, inputs) = match &checked {
        Some(chk) => {
            let model = sd_flux::transformer::load_transformer(chk.dir(), DType::F32, &Device::Cpu, None)
                .unwrap_or_else(|e| panic!("loading {}: {e}", chk.dir().display()));
            let blocks = (model.config().depth, model.config().depth_single_blocks);
            if blocks != (cfg.depth, cfg.depth_single_blocks) {
                panic!(
                    "{} holds {} double and {} single blocks, not the one {} block this bench times; rerun tools/bench_torch.py --check-dir",
                    chk.dir().display(),
                    blocks.0,
                    blocks.1,
                    if double { "double" } else { "single" }
                );
            }
            (model, Inputs::saved(chk))
        }
        None => {
            let model = FluxModel::new(&cfg, cfg.in_channels, &Weights::Dense(common::random_vb(DType::F32)))
                .unwrap_or_else(|e| panic!("building our FLUX transformer: {e}"));
            (FluxTransformer::Dense { model, config: cfg.clone(), dtype: DType::F32 }, Inputs::random(&cfg, grid, txt_len))
        }
    };
    if let Some(chk) = &checked {
        chk.verify(&format!("{group_name}/ours"), &inputs.forward(&model));
    }

    let mut group = c.benchmark_group(group_name);
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(5));
    group.bench_function("ours", |b| b.iter(|| black_box(inputs.forward(&model))));
    group.finish();
}

fn bench_flux_blocks(c: &mut Criterion) {
    common::print_machine();
    // One model at a time, dropped before the next is built.
    bench_block(c, "flux_double", "flux_double_block", true);
    bench_block(c, "flux_single", "flux_single_block", false);
}

criterion_group!(benches, bench_flux_blocks);
criterion_main!(benches);
