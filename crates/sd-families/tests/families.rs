//! The family seam on the tiny fixtures: detection from files, loading through one entry, runs equal to
//! each family's own `generate`, and LoRA / ControlNet / hires requests checked and named by field.

use std::path::PathBuf;

use sd_core::run::{ImageToImage, RunContext, Task};
use sd_families::{detect, ControlNetUnit, Extras, Family, HiresFix, HiresUpscaler, LoadSpec, LoadedModel, LoraWeight};

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures").join(rel)
}

fn max_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b).and_then(|d| d.abs()).and_then(|d| d.flatten_all()).and_then(|d| d.max(0)).and_then(|d| d.to_scalar::<f32>()).expect("diff")
}

fn load(rel: &str) -> LoadedModel {
    LoadedModel::load(&fixture(rel), &LoadSpec::default()).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn small(model: &LoadedModel, prompt: &str) -> sd_core::run::Request {
    let mut p = model.capabilities().request(prompt);
    p.width = 64;
    p.height = 64;
    p.steps = 2;
    p.seed = 7;
    p
}

#[test]
fn the_family_is_read_from_folders_and_single_files() {
    assert_eq!(detect(&fixture("sd15")), Family::StableDiffusion);
    assert_eq!(detect(&fixture("sd15.safetensors")), Family::StableDiffusion);
    assert_eq!(detect(&fixture("sdxl")), Family::StableDiffusion);
    assert_eq!(detect(&fixture("flux/schnell")), Family::Flux);
    assert_eq!(detect(&fixture("flux/dev/transformer")), Family::Flux);
    assert_eq!(detect(&fixture("flux/flux-tiny-schnell.safetensors")), Family::Flux);
    // Something that is neither goes to Stable Diffusion, whose loader says what is wrong with it.
    let err = LoadedModel::load(&fixture("schedulers"), &LoadSpec::default()).expect_err("not a model");
    assert!(err.to_string().contains("model_index.json") || err.to_string().contains("schedulers"), "{err}");
}

#[test]
fn a_stable_diffusion_run_through_the_seam_equals_the_family_entry() {
    let mut model = load("sd15");
    assert_eq!(model.family(), Family::StableDiffusion);
    assert!(model.unet_config().is_some());
    assert!(model.capabilities().controlnet && model.capabilities().hires_fix);
    let p = small(&model, "a red fox");
    let ours = model.generate(&p, &Task::TextToImage, &mut RunContext::default(), &Extras::default()).expect("seam");
    let LoadedModel::StableDiffusion(sd) = &model else { panic!("family") };
    let direct = sd_pipelines::pipeline::generate(&sd.models, &p, &Task::TextToImage, &mut RunContext::default(), Default::default()).expect("direct");
    assert_eq!(max_diff(&ours.images, &direct.images), 0.0);
    assert_eq!(ours.seed, 7);
    let text = model.infotext(&p, "a red fox <lora:x:1>", "sd15", &Extras::default(), &[("Model hash", "0123456789".into())]);
    assert!(text.starts_with("a red fox <lora:x:1>\n"), "{text}");
    assert!(text.contains("Seed: 7") && text.contains("Size: 64x64") && text.contains("Model hash: 0123456789"), "{text}");
}

#[test]
fn a_flux_run_through_the_seam_equals_the_family_entry_and_refuses_sd_extras_by_field() {
    let mut model = load("flux/schnell");
    assert_eq!(model.family(), Family::Flux);
    assert!(model.unet_config().is_none());
    let p = small(&model, "a red fox");
    let ours = model.generate(&p, &Task::TextToImage, &mut RunContext::default(), &Extras::default()).expect("seam");
    let LoadedModel::Flux(flux) = &model else { panic!("family") };
    let direct = sd_flux::pipeline::generate(&flux.models, &p, &Task::TextToImage, &mut RunContext::default()).expect("direct");
    assert_eq!(max_diff(&ours.images, &direct.images), 0.0);

    let image = image::DynamicImage::new_rgb8(64, 64);
    let units = [ControlNetUnit { path: &fixture("controlnet/sd15"), image: &image, scale: 1.0, start: 0.0, end: 1.0 }];
    let err = model
        .generate(&p, &Task::TextToImage, &mut RunContext::default(), &Extras { controlnets: &units, ..Extras::default() })
        .expect_err("no ControlNet on FLUX");
    assert_eq!(err.field().as_deref(), Some("controlnets"), "{err}");
    let hr = HiresFix { width: 128, height: 128, upscaler: HiresUpscaler::Latent, steps: None, strength: 0.5, esrgan: None };
    let err = model.generate(&p, &Task::TextToImage, &mut RunContext::default(), &Extras { hires: Some(&hr), ..Extras::default() }).expect_err("no hires");
    assert_eq!(err.field().as_deref(), Some("hires"), "{err}");
    let spec = LoadSpec { vae: Some(fixture("sd15/vae")), ..LoadSpec::default() };
    let err = LoadedModel::load(&fixture("flux/schnell"), &spec).expect_err("no separate VAE for FLUX");
    assert_eq!(err.field().as_deref(), Some("vae"), "{err}");
}

#[test]
fn flux_dev_writes_its_distilled_guidance_in_the_infotext() {
    let model = load("flux/dev");
    let mut p = small(&model, "a red fox");
    p.guidance_scale = 4.0;
    let text = model.infotext(&p, "a red fox", "flux-dev", &Extras::default(), &[]);
    assert!(text.contains("Distilled CFG Scale: 4") && text.contains("Sampler: Euler") && text.contains("CFG scale: 1"), "{text}");
}

#[test]
fn a_lora_that_does_not_fit_names_its_index_and_leaves_the_model_serving() {
    let mut model = load("sd15");
    let p = small(&model, "a cat");
    let plain = model.generate(&p, &Task::TextToImage, &mut RunContext::default(), &Extras::default()).expect("plain");
    let fits = [LoraWeight { path: fixture("lora/sd15_kohya.safetensors"), strength: 1.0, text_encoder_strength: None }];
    let with = model.generate(&p, &Task::TextToImage, &mut RunContext::default(), &Extras { loras: &fits, ..Extras::default() }).expect("lora");
    assert!(max_diff(&with.images, &plain.images) > 1e-4, "the LoRA changed nothing");
    let wrong = [
        LoraWeight { path: fixture("lora/sd15_kohya.safetensors"), strength: 1.0, text_encoder_strength: None },
        LoraWeight { path: fixture("lora/sdxl_kohya.safetensors"), strength: 1.0, text_encoder_strength: None },
    ];
    let err = model.generate(&p, &Task::TextToImage, &mut RunContext::default(), &Extras { loras: &wrong, ..Extras::default() }).expect_err("SDXL LoRA");
    assert_eq!(err.field().as_deref(), Some("loras[1]"), "{err}");
    let missing = [LoraWeight { path: fixture("lora/none.safetensors"), strength: 1.0, text_encoder_strength: None }];
    let err = model.set_loras(&missing).expect_err("missing");
    assert_eq!(err.field().as_deref(), Some("loras[0]"), "{err}");
    // The failed sets changed nothing: the last good set is still merged, and removing it restores the model.
    let again = model.generate(&p, &Task::TextToImage, &mut RunContext::default(), &Extras { loras: &fits, ..Extras::default() }).expect("lora");
    assert_eq!(max_diff(&again.images, &with.images), 0.0);
    let back = model.generate(&p, &Task::TextToImage, &mut RunContext::default(), &Extras::default()).expect("plain again");
    assert_eq!(max_diff(&back.images, &plain.images), 0.0);
}

#[test]
fn controlnets_and_the_hires_fix_run_on_stable_diffusion_and_bad_ones_name_their_field() {
    let mut model = load("sd15");
    let p = small(&model, "a house");
    let image = image::DynamicImage::new_rgb8(64, 64);
    let plain = model.generate(&p, &Task::TextToImage, &mut RunContext::default(), &Extras::default()).expect("plain");
    let units = [ControlNetUnit { path: &fixture("controlnet/sd15"), image: &image, scale: 1.0, start: 0.0, end: 1.0 }];
    let controlled =
        model.generate(&p, &Task::TextToImage, &mut RunContext::default(), &Extras { controlnets: &units, ..Extras::default() }).expect("controlnet");
    assert!(max_diff(&controlled.images, &plain.images) > 1e-5, "the ControlNet changed nothing");
    let bad = [units[0], ControlNetUnit { path: &fixture("controlnet/sdxl"), ..units[0] }];
    let err = model.generate(&p, &Task::TextToImage, &mut RunContext::default(), &Extras { controlnets: &bad, ..Extras::default() }).expect_err("SDXL ControlNet");
    assert_eq!(err.field().as_deref(), Some("controlnets[1].model"), "{err}");

    let hr = HiresFix { width: 96, height: 96, upscaler: HiresUpscaler::Latent, steps: Some(2), strength: 0.5, esrgan: None };
    let extras = Extras { hires: Some(&hr), ..Extras::default() };
    let two_pass = model.generate(&p, &Task::TextToImage, &mut RunContext::default(), &extras).expect("hires");
    assert_eq!(two_pass.images.dims(), &[1, 3, 96, 96]);
    let text = model.infotext(&p, &p.prompt, "sd15", &extras, &[]);
    assert!(text.contains("Hires resize: 96x96") && text.contains("Hires upscaler: Latent") && text.contains("Hires steps: 2"), "{text}");
    // ControlNets steer both passes of a hires fix (the control image resized to each pass's size).
    let control_extras = Extras { hires: Some(&hr), controlnets: &units, ..Extras::default() };
    let controlled_two_pass = model.generate(&p, &Task::TextToImage, &mut RunContext::default(), &control_extras).expect("hires + ControlNet");
    assert_eq!(controlled_two_pass.images.dims(), &[1, 3, 96, 96]);
    assert!(max_diff(&controlled_two_pass.images, &two_pass.images) > 1e-5, "the ControlNet changed nothing in the hires fix");
    let init = candle_core::Tensor::zeros((1, 3, 64, 64), candle_core::DType::F32, &candle_core::Device::Cpu).expect("image");
    let task = Task::ImageToImage(ImageToImage { image: &init, strength: 0.5 });
    let err = model.generate(&p, &task, &mut RunContext::default(), &extras).expect_err("hires is txt2img");
    assert_eq!(err.field().as_deref(), Some("hires"), "{err}");
}

/// The model `rel` loaded with `loras` merged while it loads (the reference for in-place patching).
fn loaded_with(rel: &str, components: Option<&str>, loras: &[LoraWeight]) -> sd_models::loader::StableDiffusionModels {
    let mut set = sd_lora::LoraSet::new();
    for l in loras {
        set.add_file(&l.path, l.strength as f32).expect("lora");
    }
    let config = components.map(|c| sd_models::loader::read_folder_config(&fixture(c), None).expect("config"));
    let opts = sd_models::loader::LoadOptions {
        backend_hook: Some(set.backend_hook()),
        config,
        tokenizer_dir: components.map(fixture),
        ..Default::default()
    };
    sd_models::loader::load(&fixture(rel), &opts).expect("load with LoRAs")
}

/// A model (and the folder that completes a single file) with LoRA files and strengths.
type PatchCase<'a> = (&'a str, Option<&'a str>, &'a [(&'a str, f64)]);

#[test]
fn loras_patched_in_place_compute_what_loras_merged_at_load_compute() {
    let cases: &[PatchCase<'_>] = &[
        ("sd15", None, &[("lora/sd15_kohya.safetensors", 0.8)]),
        ("sd15", None, &[("lora/sd15_peft.safetensors", 1.0)]),
        ("sd15", None, &[("lora/sd15_loha.safetensors", 0.7)]),
        ("sd15", None, &[("lora/sd15_lokr.safetensors", 1.2)]),
        ("sd15", None, &[("lora/sd15_kohya_ldm.safetensors", 1.0), ("lora/sd15_diffusers_old.safetensors", -0.6)]),
        // A single file: OpenCLIP's fused in_proj is split into q/k/v views that are patched in place.
        ("sd2.safetensors", Some("sd2"), &[("lora/sd2_kohya.safetensors", 0.9), ("lora/sd2_peft.safetensors", 0.5)]),
        ("sdxl", None, &[("lora/sdxl_kohya.safetensors", 1.0)]),
    ];
    for (rel, components, loras) in cases {
        let spec = LoadSpec { components: components.map(fixture), ..LoadSpec::default() };
        let mut model = LoadedModel::load(&fixture(rel), &spec).expect("load");
        let p = small(&model, "a red fox");
        let run = |model: &mut LoadedModel, loras: &[LoraWeight]| {
            model.generate(&p, &Task::TextToImage, &mut RunContext::default(), &Extras { loras, ..Extras::default() }).expect("run").latents
        };
        let plain = run(&mut model, &[]);
        let weights: Vec<LoraWeight> = loras.iter().map(|(f, s)| LoraWeight { path: fixture(f), strength: *s, text_encoder_strength: None }).collect();
        let patched = run(&mut model, &weights);
        let reference = loaded_with(rel, *components, &weights);
        let want = sd_pipelines::pipeline::generate(&reference, &p, &Task::TextToImage, &mut RunContext::default(), Default::default()).expect("reference").latents;
        assert_eq!(max_diff(&patched, &want), 0.0, "{rel} with {loras:?}");
        assert!(max_diff(&patched, &plain) > 0.0, "{rel}: the LoRAs changed nothing");
        // Taking the set out restores the plain weights exactly.
        assert_eq!(max_diff(&run(&mut model, &[]), &plain), 0.0, "{rel}: restore");
        // Switching straight from one set to another equals the other alone.
        let one = &weights[..1];
        let first = run(&mut model, one);
        let _ = run(&mut model, &weights);
        assert_eq!(max_diff(&run(&mut model, one), &first), 0.0, "{rel}: switching back");
    }
}

#[test]
fn separate_text_encoder_and_unet_strengths_patch_each_part_with_its_own() {
    let mut model = load("sd15");
    let p = small(&model, "a red fox");
    let lora = fixture("lora/sd15_kohya.safetensors");
    let mut run = |te: Option<f64>| {
        let loras = [LoraWeight { path: lora.clone(), strength: 1.0, text_encoder_strength: te }];
        model.generate(&p, &Task::TextToImage, &mut RunContext::default(), &Extras { loras: &loras, ..Extras::default() }).expect("run").latents
    };
    let both = run(None);
    let unet_only = run(Some(0.0));
    assert!(max_diff(&both, &unet_only) > 0.0, "the text encoders' part of the LoRA counts");
    assert_eq!(max_diff(&run(Some(1.0)), &both), 0.0);
    // The same rule as merging while loading.
    let mut set = sd_lora::LoraSet::new();
    set.add_file_split(&lora, 1.0, 0.0).expect("lora");
    let opts = sd_models::loader::LoadOptions { backend_hook: Some(set.backend_hook()), ..Default::default() };
    let reference = sd_models::loader::load(&fixture("sd15"), &opts).expect("load");
    let want = sd_pipelines::pipeline::generate(&reference, &p, &Task::TextToImage, &mut RunContext::default(), Default::default()).expect("reference").latents;
    assert_eq!(max_diff(&unet_only, &want), 0.0);
}

#[test]
fn the_hires_fix_second_pass_is_steered_by_its_own_controlnet_hook() {
    use sd_controlnet::{ControlNetHook, ControlNetModel, ControlUnit};
    use sd_pipelines::control::ResidualHook;
    let m = sd_models::loader::load(&fixture("sd15"), &sd_models::loader::LoadOptions::default()).expect("load");
    let mut p = sd_pipelines::pipeline::default_params(&m, "a house");
    (p.width, p.height, p.steps, p.seed) = (64, 64, 2, 7);
    let hr = HiresFix { width: 96, height: 96, upscaler: HiresUpscaler::Latent, steps: Some(2), strength: 0.6, esrgan: None };
    let model = ControlNetModel::load(&fixture("controlnet/sd15"), m.unet.config(), m.dtype, &m.device).expect("controlnet");
    let picture = image::DynamicImage::new_rgb8(64, 64);
    let hook = |w: usize, h: usize| {
        let image = sd_controlnet::preprocess::prepare_image(&picture, w, h).expect("image");
        ControlNetHook::new(vec![ControlUnit::new(model.clone(), image, 1.0)], m.unet.config()).expect("hook")
    };
    let run = |first: bool, second: bool| {
        let (mut a, mut b) = (hook(64, 64), hook(96, 96));
        let hooks = [first.then_some(&mut a as &mut dyn ResidualHook), second.then_some(&mut b as &mut dyn ResidualHook)];
        sd_pipelines::hires::generate_hires_controlled(&m, &p, &hr, &mut RunContext::default(), hooks).expect("hires").latents
    };
    let both = run(true, true);
    assert!(max_diff(&both, &run(true, false)) > 1e-5, "the second pass's hook acts");
    assert!(max_diff(&both, &run(false, true)) > 1e-5, "the first pass's hook acts");
    assert_eq!(max_diff(&run(false, false), &sd_pipelines::hires::generate_hires(&m, &p, &hr, &mut RunContext::default()).expect("plain").latents), 0.0);
}

/// FLUX.2 [klein] from BFL's and ComfyUI's files: detected before FLUX.1 (both have `double_blocks.*`), loaded
/// with the split text encoder and VAE beside it, and LoRAs from `Extras` reach the transformer.
#[test]
fn flux2_files_are_detected_loaded_and_take_loras() {
    let comfy = fixture("flux2/comfy/diffusion_models/flux-2-klein-base-tiny.safetensors");
    assert_eq!(detect(&fixture("flux2/flux-2-klein-base-tiny.safetensors")), Family::Flux2);
    assert_eq!(detect(&comfy), Family::Flux2);
    assert_eq!(detect(&fixture("flux/flux-tiny-dev.safetensors")), Family::Flux);
    let spec = LoadSpec { components: Some(fixture("flux2/klein")), ..LoadSpec::default() };
    let mut model = LoadedModel::load(&comfy, &spec).expect("split files");
    assert_eq!(model.family(), Family::Flux2);
    assert!(model.capabilities().lora);
    let mut p = model.capabilities().request("a cat");
    (p.width, p.height, p.steps, p.seed) = (16, 24, 2, 3);
    let plain = model.generate(&p, &Task::TextToImage, &mut RunContext::default(), &Extras::default()).expect("plain");
    let loras = [LoraWeight { path: fixture("flux2/lora/flux2_peft.safetensors"), strength: 0.7, text_encoder_strength: None }];
    let with = model.generate(&p, &Task::TextToImage, &mut RunContext::default(), &Extras { loras: &loras, ..Extras::default() }).expect("lora");
    assert!(max_diff(&with.images, &plain.images) > 1e-4, "the LoRA changed nothing");
    let wrong = [LoraWeight { path: fixture("sd3/lora/sd3_peft.safetensors"), strength: 1.0, text_encoder_strength: None }];
    let err = model.generate(&p, &Task::TextToImage, &mut RunContext::default(), &Extras { loras: &wrong, ..Extras::default() }).expect_err("SD3 LoRA");
    assert!(err.field().is_some_and(|f| f.starts_with("loras")), "{err}");
    let back = model.generate(&p, &Task::TextToImage, &mut RunContext::default(), &Extras::default()).expect("plain again");
    assert_eq!(max_diff(&back.images, &plain.images), 0.0);
}
