//! SD 1.5's text encoder (CLIP ViT-L/14: 12 layers, width 768) on the CPU in F32: one forward of
//! `input_ids` `[2, 77]` — a 20-token prompt and the empty prompt, as classifier-free guidance
//! encodes them — through our `sd_models::clip`.
//!
//! `cargo bench --bench clip`; `SD_BENCH_SMALL=1` swaps in a tiny config to check the harness. With
//! `SD_BENCH_CHECK_DIR` (what `tools/bench_compare.sh` sets) the weights and token ids are the ones
//! `tools/bench_torch.py --check-dir` saved as a transformers `CLIPTextModel` folder, loaded through
//! our folder loader's config reader, weight-file lookup and mapped backend, and the bench stops
//! unless our `last_hidden_state` matches PyTorch's to a relative L2 of 1e-4 before it times
//! anything; otherwise the weights are random. `SD_BENCH_STAGES` without `clip` skips it.
//! The median lands in `target/criterion/clip_sd15_b2/ours/new/estimates.json`, which
//! `tools/bench_compare.sh` reads.

mod common;

use std::hint::black_box;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use sd_models::clip::ClipTextModel;
use sd_models::ClipConfig;

const SEQ: usize = 77;
const BOS: u32 = 49406;
const EOS: u32 = 49407;

/// The config `tools/bench_torch.py` builds, for the random-weight run (a checked run reads the saved one).
fn config() -> ClipConfig {
    if common::small() {
        ClipConfig { hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4, ..ClipConfig::vit_l14() }
    } else {
        ClipConfig::vit_l14()
    }
}

/// Token ids shaped like the tokenizer's: a 20-token prompt and the empty prompt, each padded with
/// end-of-text to 77 (SD 1.5's tokenizer pads with it). The ids themselves do not change the cost.
fn token_ids() -> Tensor {
    let prompt: Vec<u32> = (0..20u32).map(|i| (i * 7919 + 13) % BOS).collect();
    let mut ids = Vec::with_capacity(2 * SEQ);
    for row in [&prompt[..], &[]] {
        ids.push(BOS);
        ids.extend_from_slice(row);
        ids.resize(ids.len() + SEQ - 1 - row.len(), EOS);
    }
    Tensor::from_vec(ids, (2, SEQ), &Device::Cpu).unwrap_or_else(|e| panic!("input_ids: {e}"))
}

fn bench_clip(c: &mut Criterion) {
    if !common::stage_enabled("clip") {
        println!("clip: not in SD_BENCH_STAGES; skipped");
        return;
    }
    common::print_machine();
    // With SD_BENCH_CHECK_DIR: PyTorch's weights and token ids, and its output to match before timing.
    let checked = common::checked("clip");
    let (model, input_ids) = match &checked {
        Some(chk) => {
            let cfg_path = chk.dir().join("config.json");
            let cfg = sd_models::diffusers::read_clip_config(&cfg_path)
                .unwrap_or_else(|e| panic!("{}: {e}", cfg_path.display()));
            let model = ClipTextModel::new(chk.folder_vb(DType::F32, &Device::Cpu), &cfg)
                .unwrap_or_else(|e| panic!("building our CLIP from {}: {e}", chk.dir().display()));
            (model, chk.input("input_ids"))
        }
        None => {
            let model = ClipTextModel::new(common::random_vb(DType::F32), &config())
                .unwrap_or_else(|e| panic!("building our CLIP: {e}"));
            (model, token_ids())
        }
    };
    if let Some(chk) = &checked {
        let out = model.forward(&input_ids).unwrap_or_else(|e| panic!("our CLIP forward: {e}"));
        chk.verify("clip_sd15_b2/ours", &out.last_hidden_state);
    }

    let mut group = c.benchmark_group("clip_sd15_b2");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(5));
    group.bench_function("ours", |b| {
        b.iter(|| black_box(model.forward(&input_ids).unwrap_or_else(|e| panic!("our CLIP forward: {e}"))))
    });
    group.finish();
}

criterion_group!(benches, bench_clip);
criterion_main!(benches);
