//! Wrong files, wrong requests, cancellation and seeds.

mod common;

use std::ops::ControlFlow;

use common::{fixtures, folder, models};
use candle_core::Tensor;
use sd_core::run::{ImageToImage, ProgressFn, RunContext, StepProgress, Task};
use sd_flux::pipeline::{generate, FluxOutput, FluxParams};
use sd_flux::{load, load_source, Error, FluxFiles, FluxLoadOptions, FluxModels, FluxSource};

fn text_to_image(m: &FluxModels, p: &FluxParams, cb: &mut ProgressFn<'_>) -> Result<FluxOutput, Error> {
    generate(m, p, &Task::TextToImage, &mut RunContext::with_progress(cb))
}

fn image_to_image(m: &FluxModels, p: &FluxParams, image: &Tensor, strength: f64, cb: &mut ProgressFn<'_>) -> Result<FluxOutput, Error> {
    generate(m, p, &Task::ImageToImage(ImageToImage { image, strength }), &mut RunContext::with_progress(cb))
}

fn params(steps: usize, guidance: f64) -> FluxParams {
    FluxParams {
        seed: 3,
        max_sequence_length: Some(32),
        variation: None,
        eta_noise_seed_delta: 0,
        ..FluxParams::new("a photo of a cat", 16, 16, steps, guidance)
    }
}

fn go() -> impl FnMut(&StepProgress<'_>) -> ControlFlow<()> {
    |_: &StepProgress<'_>| ControlFlow::Continue(())
}

fn err_text<T: std::fmt::Debug>(r: Result<T, Error>) -> (Error, String) {
    let e = r.expect_err("expected an error");
    let msg = e.to_string();
    (e, msg)
}

#[test]
fn sd_checkpoint_given_to_the_flux_loader() {
    let (e, msg) = err_text(load(&fixtures().join("sd15.safetensors"), &FluxLoadOptions::default()));
    assert!(matches!(e, Error::NotFlux { .. }), "{e:?}");
    assert!(msg.contains("Stable Diffusion") && msg.contains("sd-models"), "{msg}");
    let (e, msg) = err_text(load(&fixtures().join("sd15"), &FluxLoadOptions::default()));
    assert!(matches!(e, Error::NotFlux { .. }), "{e:?}");
    assert!(msg.contains("sd-models"), "{msg}");
}

#[test]
fn flux_detection_from_headers() {
    use sd_flux::detect::is_flux;
    assert!(is_flux(&folder("dev")) && is_flux(&folder("schnell").join("transformer")));
    assert!(is_flux(&fixtures().join("flux/flux-tiny-schnell.safetensors")));
    assert!(!is_flux(&fixtures().join("sd15.safetensors")) && !is_flux(&fixtures().join("sd15")));
    assert!(!is_flux(&fixtures().join("flux/ae.safetensors")) && !is_flux(&fixtures().join("missing.safetensors")));
    // FLUX.2 [klein] shares the BFL block names; it is told apart by its shared modulation and sent to sd-flux2.
    let flux2 = fixtures().join("flux2/flux-2-klein-base-tiny.safetensors");
    assert!(!is_flux(&flux2));
    let e = sd_flux::transformer::load_transformer(&flux2, candle_core::DType::F32, &candle_core::Device::Cpu, None).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("FLUX.2"), "{e}");
}

#[test]
fn flux_files_given_to_the_sd_loader() {
    let opts = sd_models::loader::LoadOptions::default();
    let msg = sd_models::loader::load(&fixtures().join("flux/flux-tiny-dev.safetensors"), &opts).expect_err("file").to_string();
    assert!(msg.contains("FLUX checkpoint (double_blocks.*)") && msg.contains("sd-flux"), "{msg}");
    let msg = sd_models::loader::load(&folder("schnell"), &opts).expect_err("folder").to_string();
    assert!(msg.contains("FLUX") && msg.contains("sd-flux"), "{msg}");
}

#[test]
fn missing_t5_names_the_file_and_the_download() {
    let dir = std::env::temp_dir().join(format!("sd-flux-no-t5-{}", std::process::id()));
    let mut files = FluxFiles::with_components_from(folder("schnell").join("transformer"), None, &folder("schnell"));
    files.t5 = dir.join("text_encoder_2");
    let (e, msg) = err_text(load_source(&FluxSource::Files(files.clone()), &FluxLoadOptions::default()));
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
    assert!(msg.contains("text_encoder_2") && msg.contains("T5") && msg.contains("FLUX.1-schnell"), "{msg}");
    // A folder without weights: the message names the weights file that is expected.
    std::fs::create_dir_all(dir.join("text_encoder_2")).expect("mkdir");
    std::fs::copy(folder("schnell").join("text_encoder_2/config.json"), dir.join("text_encoder_2/config.json")).expect("copy");
    let (_, msg) = err_text(load_source(&FluxSource::Files(files.clone()), &FluxLoadOptions::default()));
    assert!(msg.contains("model.safetensors") && msg.contains("T5"), "{msg}");
    files.t5 = folder("schnell").join("text_encoder_2");
    files.t5_tokenizer = dir.join("tokenizer_2");
    let (_, msg) = err_text(load_source(&FluxSource::Files(files), &FluxLoadOptions::default()));
    assert!(msg.contains("tokenizer.json"), "{msg}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn schnell_ignores_guidance() {
    let m = models("schnell");
    let a = text_to_image(&m, &params(2, 0.0), &mut go()).expect("no guidance");
    let b = text_to_image(&m, &params(2, 7.5), &mut go()).expect("guidance");
    let d = common::diff(&a.images, &b.images).0.max(common::diff(&a.latents, &b.latents).0);
    assert_eq!(d, 0.0);
    // Dev does use it.
    let m = models("dev");
    let a = text_to_image(&m, &params(2, 1.0), &mut go()).expect("dev 1");
    let b = text_to_image(&m, &params(2, 7.5), &mut go()).expect("dev 7.5");
    assert!(common::diff(&a.latents, &b.latents).0 > 1e-4);
}

#[test]
fn sizes_must_be_multiples_of_the_patch() {
    let m = models("schnell");
    for (w, h, field) in [(18, 16, "width"), (16, 6, "height"), (0, 16, "width")] {
        let p = FluxParams { width: w, height: h, ..params(1, 0.0) };
        let (e, msg) = err_text(text_to_image(&m, &p, &mut go()));
        assert!(matches!(e, Error::Core(sd_core::Error::InvalidRequest { field: f, .. }) if f == field), "{e:?}");
        assert!(msg.contains(field), "{msg}");
    }
    let (_, msg) = err_text(text_to_image(&m, &FluxParams { width: 22, ..params(1, 0.0) }, &mut go()));
    assert!(msg.contains("multiple of 4"), "{msg}");
    let (_, msg) = err_text(text_to_image(&m, &FluxParams { max_sequence_length: Some(513), ..params(1, 0.0) }, &mut go()));
    assert!(msg.contains("max_sequence_length"), "{msg}");
    let image = candle_core::Tensor::zeros((1, 3, 16, 16), candle_core::DType::F32, &candle_core::Device::Cpu).expect("img");
    let (_, msg) = err_text(image_to_image(&m, &params(4, 0.0), &image, 0.0, &mut go()));
    assert!(msg.contains("strength") && msg.contains("no step"), "{msg}");
    let (_, msg) = err_text(image_to_image(&m, &params(4, 0.0), &image, 1.5, &mut go()));
    assert!(msg.contains("strength"), "{msg}");
    let wrong = candle_core::Tensor::zeros((1, 3, 8, 16), candle_core::DType::F32, &candle_core::Device::Cpu).expect("img");
    let (_, msg) = err_text(image_to_image(&m, &params(4, 0.0), &wrong, 0.5, &mut go()));
    assert!(msg.contains("image"), "{msg}");
}

#[test]
fn cancellation_stops_after_the_requested_step() {
    let m = models("dev");
    let mut calls = Vec::new();
    let mut cb = |s: &StepProgress<'_>| {
        calls.push(s.step);
        assert_eq!(s.family, sd_models::ModelFamily::Flux);
        assert_eq!(s.latents.dims(), &[1, 16, 8, 8]);
        if s.step == 2 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    let (e, _) = err_text(text_to_image(&m, &params(4, 3.5), &mut cb));
    assert!(matches!(e, Error::Core(sd_core::Error::Cancelled { step: 2, total: 4 })), "{e:?}");
    // The callback runs once per transformer call, so no call happened after the stop.
    assert_eq!(calls, vec![1, 2]);
}

#[test]
fn seeds_are_deterministic() {
    let m = models("schnell");
    let a = text_to_image(&m, &params(2, 0.0), &mut go()).expect("a");
    let b = text_to_image(&m, &params(2, 0.0), &mut go()).expect("b");
    let c = text_to_image(&m, &FluxParams { seed: 4, ..params(2, 0.0) }, &mut go()).expect("c");
    assert_eq!(a.seed, 3);
    assert_eq!(common::diff(&a.images, &b.images).0, 0.0);
    assert!(common::diff(&a.latents, &c.latents).0 > 1e-3);
    // Batches draw one noise tensor for all images: every image differs.
    let batch = text_to_image(&m, &FluxParams { batch_size: 2, ..params(1, 0.0) }, &mut go()).expect("batch");
    assert_eq!(batch.images.dims(), &[2, 3, 16, 16]);
    let (i0, i1) = (batch.latents.get(0).expect("0"), batch.latents.get(1).expect("1"));
    assert!(common::diff(&i0, &i1).0 > 1e-3);
}

#[test]
fn previews_project_flux_latents() {
    let m = models("schnell");
    let mut sizes = Vec::new();
    let mut cb = |s: &StepProgress<'_>| {
        let img = sd_core::preview::latents_to_rgb(s.latents, s.family).expect("preview");
        sizes.push(img.dimensions());
        ControlFlow::Continue(())
    };
    text_to_image(&m, &params(2, 0.0), &mut cb).expect("run");
    assert_eq!(sizes, vec![(8, 8), (8, 8)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_move_into_blocking_tasks() {
    use candle_transformers::models::flux::WithForward;
    let m = models("schnell");
    let out = tokio::task::spawn_blocking(move || text_to_image(&m, &params(1, 0.0), &mut go()).map(|o| o.images.dims().to_vec()))
        .await
        .expect("join")
        .expect("run");
    assert_eq!(out, vec![1, 3, 16, 16]);
    let t = sd_flux::transformer::load_transformer(&folder("schnell"), candle_core::DType::F32, &candle_core::Device::Cpu, None)
        .expect("transformer");
    let g = common::golden("transformer_schnell.safetensors");
    let dims = tokio::task::spawn_blocking(move || {
        let u = |n: &str| common::get(&g, n).unsqueeze(0).expect("u");
        t.forward(
            &common::get(&g, "hidden_states"),
            &u("img_ids"),
            &common::get(&g, "encoder_hidden_states"),
            &u("txt_ids"),
            &common::get(&g, "timestep"),
            &common::get(&g, "pooled_projections"),
            None,
        )
        .map(|o| o.dims().to_vec())
    })
    .await
    .expect("join")
    .expect("forward");
    assert_eq!(dims, vec![1, 16, 64]);
}
