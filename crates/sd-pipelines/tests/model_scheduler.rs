//! A model folder's `scheduler_config.json` reaches the samplers whole: every field is honoured
//! (checked against diffusers' goldens through the real loading code) or refused by name.

#![cfg(unix)]

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sd_models::loader::{load, LoadOptions};
use sd_pipelines::pipeline::scheduler_config;
use sd_pipelines::schedulers::{build_scheduler, BetaSchedule, Sampler, SamplerKind, SigmaSchedule};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// The tiny SD 1.5 fixture with its scheduler config replaced by `config` (other components linked).
fn model_with_scheduler(tag: &str, config: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("model-scheduler-{tag}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("scheduler")).expect("dir");
    let src = fixtures().join("sd15");
    for entry in std::fs::read_dir(&src).expect("fixture") {
        let entry = entry.expect("entry");
        let name = entry.file_name();
        if name != "scheduler" {
            std::os::unix::fs::symlink(entry.path(), dir.join(&name)).expect("link");
        }
    }
    std::fs::write(dir.join("scheduler/scheduler_config.json"), config).expect("write");
    dir
}

fn golden_case(name: &str) -> (Value, Vec<f64>, Option<Vec<f64>>) {
    let dir = fixtures().join("goldens/schedulers");
    let cases: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).expect("cases")).expect("json");
    let case = cases["cases"].as_array().expect("cases").iter().find(|c| c["name"] == name).expect("case").clone();
    let family = case["family"].as_str().expect("family");
    let g = candle_core::safetensors::load(dir.join(format!("{family}.safetensors")), &Device::Cpu).expect("goldens");
    let v = |what: &str| -> Option<Vec<f64>> {
        g.get(&format!("{name}.{what}")).map(|t| t.to_dtype(DType::F64).and_then(|t: Tensor| t.flatten_all()).and_then(|t| t.to_vec1()).expect("tensor"))
    };
    (case, v("timesteps").expect("timesteps"), v("sigmas"))
}

fn close(what: &str, ours: &[f64], golden: &[f64]) {
    assert_eq!(ours.len(), golden.len(), "{what}: {ours:?} vs {golden:?}");
    let scale = golden.iter().fold(1.0f64, |m, g| m.max(g.abs()));
    for (a, b) in ours.iter().zip(golden) {
        assert!((a - b).abs() <= 1e-4 * scale, "{what}: {ours:?} vs diffusers {golden:?}");
    }
}

#[test]
fn every_field_of_the_model_s_scheduler_config_reaches_the_sampler() {
    // Karras sigmas and linspace/trailing spacing set in the model's own file (not by the sampler
    // name) give diffusers' schedules for that config.
    for name in ["euler_karras_eps_20", "euler_linspace_eps_4", "euler_trailing_eps_20", "dpmpp_2m_karras_eps_20", "ddim_trailing_eps_4"] {
        let (case, timesteps, sigmas) = golden_case(name);
        let dir = model_with_scheduler(name, case["config_json"].as_str().expect("config"));
        let models = load(&dir, &LoadOptions::default()).expect("loads");
        let cfg = scheduler_config(&models).expect("config");
        let sampler: Sampler = case["sampler"].as_str().expect("sampler").parse().expect("sampler");
        let sched = build_scheduler(sampler, &cfg, case["steps"].as_u64().expect("steps") as usize).expect("scheduler");
        close(&format!("{name} timesteps"), sched.timesteps(), &timesteps);
        assert_eq!(sched.sigmas().is_some(), sigmas.is_some(), "{name}: sigma-based or not");
        if let (Some(ours), Some(golden)) = (sched.sigmas(), &sigmas) {
            close(&format!("{name} sigmas"), ours, golden);
        }
    }
}

#[test]
fn a_linear_beta_schedule_is_honoured() {
    let text = r#"{"_class_name": "EulerDiscreteScheduler", "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
        "num_train_timesteps": 1000, "prediction_type": "epsilon", "timestep_spacing": "trailing", "steps_offset": 0}"#;
    let models = load(&model_with_scheduler("linear", text), &LoadOptions::default()).expect("loads");
    let cfg = scheduler_config(&models).expect("config");
    assert_eq!(cfg.beta_schedule, Some(BetaSchedule::Linear));
    let sched = build_scheduler(Sampler::from(SamplerKind::Euler), &cfg, 10).expect("scheduler");
    // Trailing spacing starts at t = 999, whose sigma follows from the betas alone:
    // sigma = sqrt((1 − ᾱ) / ᾱ) with ᾱ = Π (1 − β_i), β linear from 1e-4 to 0.02.
    let alpha_bar: f64 = (0..1000).map(|i| 1.0 - (0.0001 + (0.02 - 0.0001) * i as f64 / 999.0)).product();
    let expected = ((1.0 - alpha_bar) / alpha_bar).sqrt();
    let first = sched.sigmas().expect("sigmas")[0];
    assert!((first - expected).abs() <= 1e-4 * expected, "sigma_max {first} vs {expected} for linear betas");
    // The scaled-linear schedule (what the field used to be read as) is far from it.
    let scaled = text.replace(r#""linear""#, r#""scaled_linear""#);
    let other = load(&model_with_scheduler("scaled", &scaled), &LoadOptions::default()).expect("loads");
    let s2 = build_scheduler(Sampler::from(SamplerKind::Euler), &scheduler_config(&other).expect("config"), 10).expect("scheduler");
    assert!((s2.sigmas().expect("sigmas")[0] - first).abs() > 1.0, "the beta schedule changed nothing");
}

#[test]
fn karras_from_the_config_is_the_default_schedule_and_a_sampler_name_still_wins() {
    let (case, _, sigmas) = golden_case("euler_karras_eps_20");
    let models = load(&model_with_scheduler("karras", case["config_json"].as_str().expect("config")), &LoadOptions::default()).expect("loads");
    let cfg = scheduler_config(&models).expect("config");
    assert_eq!(Sampler::from(SamplerKind::Euler).resolved_schedule(&cfg), SigmaSchedule::Karras);
    let plain = build_scheduler(Sampler::new(SamplerKind::Euler, SigmaSchedule::Default), &cfg, 20).expect("scheduler");
    let karras = sigmas.expect("golden sigmas");
    let differs = plain.sigmas().expect("sigmas").iter().zip(&karras).any(|(a, b)| (a - b).abs() > 1e-3);
    assert!(differs, "an explicit default schedule must override use_karras_sigmas");
}

#[test]
fn values_no_scheduler_implements_are_refused_by_field_name() {
    let base = r#"{"_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "timestep_spacing": "leading", "steps_offset": 1}"#;
    // Loading refuses a spacing or beta schedule no scheduler implements, instead of reading it as another.
    let e = load(&model_with_scheduler("spacing", &base.replace(r#""leading""#, r#""middle""#)), &LoadOptions::default()).expect_err("unknown spacing");
    let msg = e.to_string();
    assert!(msg.contains("timestep_spacing") && msg.contains("middle") && msg.contains("scheduler_config.json"), "{msg}");
    let e = load(&model_with_scheduler("betas", &base.replace(r#""scaled_linear""#, r#""sigmoid""#)), &LoadOptions::default()).expect_err("unknown betas");
    assert!(e.to_string().contains("beta_schedule"), "{e}");
    // A wrongly typed field fails naming it.
    let bad = base.replace(r#""steps_offset": 1"#, r#""steps_offset": 1, "use_karras_sigmas": "yes""#);
    let models = load(&model_with_scheduler("typed", &bad), &LoadOptions::default()).expect("loads");
    let e = scheduler_config(&models).expect_err("string for a bool");
    assert!(e.to_string().contains("use_karras_sigmas"), "{e}");
    // A valid option no sampler here implements is refused, naming it, by the samplers whose
    // diffusers class has it; the others ignore it, as diffusers' `from_config` does.
    let thresholding = base.replace(r#""steps_offset": 1"#, r#""steps_offset": 1, "thresholding": true"#);
    let models = load(&model_with_scheduler("thresholding", &thresholding), &LoadOptions::default()).expect("loads");
    let cfg = scheduler_config(&models).expect("config");
    let Err(e) = build_scheduler(Sampler::from(SamplerKind::Ddim), &cfg, 10) else { panic!("thresholding was accepted") };
    assert!(e.to_string().contains("thresholding"), "{e}");
    assert!(build_scheduler(Sampler::from(SamplerKind::Euler), &cfg, 10).is_ok(), "Euler has no thresholding option to honour");
    // A schedule-defining field no sampler implements is refused by every sampler.
    // (use_beta_sigmas is implemented now: sd-core's beta sigma schedule.)
    let lu = base.replace(r#""steps_offset": 1"#, r#""steps_offset": 1, "use_lu_lambdas": true"#);
    let models = load(&model_with_scheduler("lu_lambdas", &lu), &LoadOptions::default()).expect("loads");
    let cfg = scheduler_config(&models).expect("config");
    let Err(e) = build_scheduler(Sampler::from(SamplerKind::Euler), &cfg, 10) else { panic!("use_lu_lambdas was accepted") };
    assert!(e.to_string().contains("use_lu_lambdas"), "{e}");
    // Python's -Infinity (DPM-Solver configs) reads as the default instead of failing the load.
    let python = base.replace(r#""steps_offset": 1"#, r#""steps_offset": 1, "lambda_min_clipped": -Infinity"#);
    let models = load(&model_with_scheduler("python", &python), &LoadOptions::default()).expect("loads");
    assert_eq!(scheduler_config(&models).expect("config").lambda_min_clipped, None);
}

/// NoobAI-XL-style SDXL single files carry empty `v_pred` and `ztsnr` tensors; they make the model
/// v-prediction with zero-terminal-SNR betas without flags, as in A1111 and ComfyUI.
#[test]
fn v_pred_and_ztsnr_markers_of_sdxl_single_files_are_read() {
    let plain = fixtures().join("sdxl.safetensors");
    let mut tensors = candle_core::safetensors::load(&plain, &Device::Cpu).expect("fixture");
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let config = sd_models::loader::read_folder_config(&fixtures().join("sdxl"), None).expect("tiny SDXL config");
    let models = |path: &Path| {
        load(path, &LoadOptions { config: Some(config.clone()), tokenizer_dir: Some(fixtures().join("sdxl")), ..Default::default() }).expect("load")
    };
    let base = scheduler_config(&models(&plain)).expect("config");
    assert_eq!(base.prediction_type, sd_pipelines::schedulers::PredictionType::Epsilon);
    assert!(!base.rescale_betas_zero_snr);
    tensors.insert("v_pred".into(), Tensor::zeros(0, DType::F32, &Device::Cpu).expect("marker"));
    let v = dir.join("sdxl-vpred.safetensors");
    candle_core::safetensors::save(&tensors, &v).expect("save");
    let c = scheduler_config(&models(&v)).expect("config");
    assert_eq!(c.prediction_type, sd_pipelines::schedulers::PredictionType::VPrediction);
    assert!(!c.rescale_betas_zero_snr);
    tensors.insert("ztsnr".into(), Tensor::zeros(0, DType::F32, &Device::Cpu).expect("marker"));
    let z = dir.join("sdxl-vpred-ztsnr.safetensors");
    candle_core::safetensors::save(&tensors, &z).expect("save");
    let c = scheduler_config(&models(&z)).expect("config");
    assert_eq!(c.prediction_type, sd_pipelines::schedulers::PredictionType::VPrediction);
    assert!(c.rescale_betas_zero_snr);
    // The samplers then end at zero SNR: the first sigma of a trailing schedule is infinite in diffusers;
    // ours clamps it as diffusers' Euler does for rescaled betas, so it is large but finite.
    let mut sched = c.clone();
    sched.timestep_spacing = Some(sd_pipelines::schedulers::TimestepSpacing::Trailing);
    let s = build_scheduler(Sampler::from(SamplerKind::Euler), &sched, 4).expect("scheduler");
    let sigmas = s.sigmas().expect("Euler has sigmas");
    assert!(sigmas[0] > 100.0, "{sigmas:?}");
    let _ = std::fs::remove_file(v);
    let _ = std::fs::remove_file(z);
}
