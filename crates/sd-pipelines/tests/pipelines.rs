//! End-to-end runs of the tiny fixture models against diffusers, replaying diffusers' random draws.

use std::ops::ControlFlow;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use sd_models::loader::{load, LoadOptions, StableDiffusionModels};
use sd_pipelines::pipeline::{generate, GenerationParams, ImageToImage, Inpaint, NoiseKind, RunContext, SdExtras, StepProgress, Task};
use sd_pipelines::schedulers::{NoiseQueue, Sampler};
use sd_pipelines::Error;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn model(name: &str) -> StableDiffusionModels {
    load(&root().join(name), &LoadOptions::default()).expect("fixture model loads")
}

struct Golden {
    meta: serde_json::Value,
    tensors: std::collections::HashMap<String, Tensor>,
}

fn golden(label: &str) -> Golden {
    let dir = root().join("goldens/pipelines");
    let meta = match std::fs::read_to_string(dir.join(format!("{label}.json"))) {
        Ok(text) => serde_json::from_str(&text).expect("golden json parses"),
        Err(_) => serde_json::Value::Null,
    };
    let tensors = candle_core::safetensors::load(dir.join(format!("{label}.safetensors")), &Device::Cpu).expect("golden tensors");
    Golden { meta, tensors }
}

impl Golden {
    fn draws(&self) -> NoiseQueue {
        let n = self.meta["draws"].as_u64().unwrap_or(0) as usize;
        NoiseQueue::new((0..n).map(|i| self.tensors[&format!("draw_{i}")].clone()))
    }

    fn params(&self) -> GenerationParams {
        let m = &self.meta;
        let sampler = match m["sampler"].as_str().unwrap_or_default() {
            "dpmpp_2m_karras" => "DPM++ 2M Karras",
            "euler_a" => "Euler a",
            other => other,
        };
        GenerationParams {
            prompt: m["prompt"].as_str().unwrap_or_default().into(),
            negative_prompt: m["negative_prompt"].as_str().unwrap_or_default().into(),
            width: m["width"].as_u64().unwrap_or(0) as usize,
            height: m["height"].as_u64().unwrap_or(0) as usize,
            steps: m["steps"].as_u64().unwrap_or(0) as usize,
            guidance_scale: m["guidance_scale"].as_f64().unwrap_or(0.0),
            seed: m["seed"].as_u64().unwrap_or(0),
            batch_size: m["batch"].as_u64().unwrap_or(1) as usize,
            sampler: sampler.parse::<Sampler>().expect("sampler name"),
            clip_skip: 1,
            vae_tiling: Some(false),
            noise: NoiseKind::Philox,
            max_sequence_length: None,
            variation: None,
            eta_noise_seed_delta: 0,
            seed_resize_from: None,
            skip_layer_guidance: None,
        }
    }

    fn check(&self, label: &str, latents: &Tensor, images: &Tensor) {
        assert_close(&format!("{label} latents"), latents, &self.tensors["latents"], 1e-3);
        assert_close(&format!("{label} image"), images, &self.tensors["image"], 1e-3);
    }
}

/// max|ours − golden| ≤ tol · max(1, max|golden|).
fn assert_close(what: &str, ours: &Tensor, golden: &Tensor, tol: f32) {
    assert_eq!(ours.dims(), golden.dims(), "{what}: shape");
    let diff = (ours.to_dtype(candle_core::DType::F32).unwrap() - golden).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    let diff = diff.to_scalar::<f32>().unwrap();
    let scale = golden.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1.0);
    assert!(diff <= tol * scale, "{what}: max diff {diff} > {tol} × {scale}");
}


#[test]
fn sd15_txt2img_matches_diffusers_for_each_sampler() {
    let m = model("sd15");
    for label in ["sd15_txt2img_ddim", "sd15_txt2img_euler", "sd15_txt2img_dpmpp_2m_karras", "sd15_txt2img_euler_a", "sd15_txt2img_batch2"] {
        let g = golden(label);
        let mut noise = g.draws();
        let out = generate(&m, &g.params(), &Task::TextToImage, &mut RunContext::default().noise(&mut noise), SdExtras::default()).expect(label);
        assert_eq!(noise.remaining(), 0, "{label}: every diffusers draw is used");
        g.check(label, &out.latents, &out.images);
    }
}

#[test]
fn sd15_img2img_matches_diffusers() {
    let m = model("sd15");
    let input = golden("input_image");
    let image = ((&input.tensors["image"] * 2.0).unwrap() - 1.0).unwrap();
    for label in ["sd15_img2img_ddim", "sd15_img2img_euler_a"] {
        let g = golden(label);
        let mut noise = g.draws();
        let strength = g.meta["strength"].as_f64().unwrap_or(0.0);
        let out = generate(&m, &g.params(), &Task::ImageToImage(ImageToImage { image: &image, strength }), &mut RunContext::default().noise(&mut noise), SdExtras::default())
            .expect(label);
        assert_eq!(noise.remaining(), 0, "{label}");
        g.check(label, &out.latents, &out.images);
    }
}

#[test]
fn inpaint_matches_diffusers_for_4_and_9_channel_models() {
    let input = golden("input_image");
    let image = ((&input.tensors["image"] * 2.0).unwrap() - 1.0).unwrap();
    let mask = &input.tensors["mask"];
    for (model_name, label) in [("sd15", "sd15_inpaint4"), ("sd15-inpaint", "sd15_inpaint9")] {
        let m = model(model_name);
        let g = golden(label);
        let mut noise = g.draws();
        let strength = g.meta["strength"].as_f64().unwrap_or(0.0);
        let out = generate(&m, &g.params(), &Task::Inpaint(Inpaint { image: &image, mask, strength }), &mut RunContext::default().noise(&mut noise), SdExtras::default()).expect(label);
        assert_eq!(noise.remaining(), 0, "{label}");
        g.check(label, &out.latents, &out.images);
    }
}

#[test]
fn sd2_v_prediction_and_sdxl_match_diffusers() {
    for (model_name, labels) in [("sd2", vec!["sd2_txt2img_ddim"]), ("sdxl", vec!["sdxl_txt2img_euler", "sdxl_txt2img_negative"])] {
        let m = model(model_name);
        for label in labels {
            let g = golden(label);
            let mut noise = g.draws();
            let out = generate(&m, &g.params(), &Task::TextToImage, &mut RunContext::default().noise(&mut noise), SdExtras::default()).expect(label);
            g.check(label, &out.latents, &out.images);
        }
    }
}

#[test]
fn cancellation_stops_within_one_step() {
    let m = model("sd15");
    let mut p = sd_pipelines::pipeline::default_params(&m, "a fox");
    p.width = 32;
    p.height = 32;
    p.steps = 6;
    let mut seen = Vec::new();
    let mut cb = |s: &StepProgress<'_>| {
        seen.push(s.step);
        if s.step == 2 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    let r = generate(&m, &p, &Task::TextToImage, &mut RunContext::with_progress(&mut cb), SdExtras::default());
    assert!(matches!(r, Err(Error::Core(sd_core::Error::Cancelled { step: 2, total: 6 }))), "{r:?}");
    assert_eq!(seen, vec![1, 2], "no UNet step runs after the cancel");
}

#[test]
fn same_seed_same_bytes_other_seed_other_image() {
    let m = model("sd15");
    let mut p = sd_pipelines::pipeline::default_params(&m, "a fox");
    (p.width, p.height, p.steps, p.seed) = (32, 32, 3, 1234);
    p.sampler = "Euler a".parse().expect("sampler");
    let a = generate(&m, &p, &Task::TextToImage, &mut RunContext::default(), SdExtras::default()).expect("run a");
    let b = generate(&m, &p, &Task::TextToImage, &mut RunContext::default(), SdExtras::default()).expect("run b");
    let bytes = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
    assert_eq!(bytes(&a.images), bytes(&b.images));
    assert_eq!(a.seed, 1234);
    p.seed = 1235;
    let c = generate(&m, &p, &Task::TextToImage, &mut RunContext::default(), SdExtras::default()).expect("run c");
    assert_ne!(bytes(&a.images), bytes(&c.images));
}

#[test]
fn bad_requests_are_rejected_with_the_field_named() {
    let m = model("sd15");
    let base = {
        let mut p = sd_pipelines::pipeline::default_params(&m, "");
        (p.width, p.height, p.steps) = (32, 32, 2);
        p
    };
    let field_of = |r: sd_pipelines::Result<sd_pipelines::pipeline::GenerationOutput>| match r {
        Err(Error::Core(sd_core::Error::InvalidRequest { field, .. })) => field,
        other => panic!("expected InvalidRequest, got {other:?}"),
    };
    let run = |p: &GenerationParams| generate(&m, p, &Task::TextToImage, &mut RunContext::default(), SdExtras::default());
    let mut p = base.clone();
    p.steps = 0;
    assert_eq!(field_of(run(&p)), "steps");
    let mut p = base.clone();
    p.width = 36;
    assert_eq!(field_of(run(&p)), "width");
    let mut p = base.clone();
    p.height = 1 << 20;
    assert_eq!(field_of(run(&p)), "height");
    let mut p = base.clone();
    p.batch_size = 0;
    assert_eq!(field_of(run(&p)), "batch_size");
    // An empty prompt is allowed.
    assert!(run(&base).is_ok());

    let image = Tensor::zeros((1, 3, 32, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
    for strength in [-0.1, 1.5, f64::NAN] {
        let r = generate(&m, &base, &Task::ImageToImage(ImageToImage { image: &image, strength }), &mut RunContext::default(), SdExtras::default());
        assert_eq!(field_of(r), "strength");
    }
    let small_mask = Tensor::zeros((1, 1, 16, 16), candle_core::DType::F32, &Device::Cpu).unwrap();
    let r = generate(&m, &base, &Task::Inpaint(Inpaint { image: &image, mask: &small_mask, strength: 1.0 }), &mut RunContext::default(), SdExtras::default());
    assert_eq!(field_of(r), "mask");
    assert!(matches!("Nonsense Sampler".parse::<Sampler>(), Err(sd_core::Error::UnknownSampler { .. })));
}

/// With the torch-compatible generator, the seed alone reproduces diffusers' run: no injected draws.
#[test]
fn torch_noise_seed_reproduces_diffusers_runs() {
    let m = model("sd15");
    for label in ["sd15_txt2img_euler_a", "sd15_txt2img_dpmpp_2m_karras"] {
        let g = golden(label);
        let mut p = g.params();
        p.noise = NoiseKind::Torch;
        let out = generate(&m, &p, &Task::TextToImage, &mut RunContext::default(), SdExtras::default()).expect(label);
        g.check(label, &out.latents, &out.images);
    }
    let input = golden("input_image");
    let image = ((&input.tensors["image"] * 2.0).unwrap() - 1.0).unwrap();
    let g = golden("sd15_img2img_euler_a");
    let mut p = g.params();
    p.noise = NoiseKind::Torch;
    let out = generate(&m, &p, &Task::ImageToImage(ImageToImage { image: &image, strength: 0.6 }), &mut RunContext::default(), SdExtras::default()).expect("img2img");
    g.check("sd15_img2img_euler_a (torch seed)", &out.latents, &out.images);
}

/// `SdExtras::scheduler` replaces the sampler the request names, and a step callback may edit the latents.
#[test]
fn own_scheduler_and_latent_edits() {
    use sd_pipelines::schedulers::{build_scheduler, SamplerKind};
    let m = model("sd15");
    let mut p = sd_pipelines::pipeline::default_params(&m, "a fox");
    (p.width, p.height, p.steps, p.seed) = (32, 32, 3, 7);
    p.sampler = SamplerKind::Ddim.into();
    let ddim = generate(&m, &p, &Task::TextToImage, &mut RunContext::default(), SdExtras::default()).expect("ddim");
    let cfg = sd_pipelines::pipeline::scheduler_config(&m).expect("config");
    let own = build_scheduler(sd_pipelines::schedulers::Sampler::from(SamplerKind::Ddim), &cfg, 3).expect("scheduler");
    p.sampler = SamplerKind::Euler.into();
    let extras = SdExtras { scheduler: Some(own), ..SdExtras::default() };
    let out = generate(&m, &p, &Task::TextToImage, &mut RunContext::default(), extras).expect("own scheduler");
    let same = (&out.latents - &ddim.latents).and_then(|d| d.abs()).and_then(|d| d.max_all()).and_then(|d| d.to_scalar::<f32>()).expect("diff");
    assert_eq!(same, 0.0, "the caller's DDIM scheduler ran instead of Euler");

    let mut steps = 0;
    let mut edit = |s: &StepProgress<'_>| -> sd_core::Result<Option<Tensor>> {
        steps += 1;
        Ok((s.step == s.total).then(|| s.latents.zeros_like()).transpose()?)
    };
    let out = generate(&m, &p, &Task::TextToImage, &mut RunContext::default().edit(&mut edit), SdExtras::default()).expect("edited");
    assert_eq!(steps, 3);
    let max = out.latents.abs().and_then(|t| t.max_all()).and_then(|t| t.to_scalar::<f32>()).expect("max");
    assert_eq!(max, 0.0, "the last step's edit is what gets decoded");
}

/// Hires fix against diffusers' txt2img chained into img2img (tools/hires_goldens.py): the latent
/// upscaler end to end; the Lanczos one pass by pass (PIL's Lanczos and the `image` crate's differ by a
/// few levels, so the second pass starts from the image diffusers got).
#[test]
fn hires_fix_matches_diffusers_chained_pipelines() {
    use sd_pipelines::hires::{generate_hires, HiresFix, HiresUpscaler};
    let m = model("sd15");
    let g = golden("sd15_hires_latent");
    let p = g.params();
    let hr = HiresFix { width: 64, height: 64, upscaler: HiresUpscaler::Latent, steps: Some(5), strength: 0.6, esrgan: None };
    let mut noise = g.draws();
    let mut steps = Vec::new();
    let mut cb = |s: &StepProgress<'_>| {
        steps.push((s.step, s.total, s.latents.dims().to_vec()));
        ControlFlow::Continue(())
    };
    let out = generate_hires(&m, &p, &hr, &mut RunContext::with_progress(&mut cb).noise(&mut noise)).expect("hires");
    assert_eq!(noise.remaining(), 0, "every diffusers draw is used, in order");
    g.check("sd15_hires_latent", &out.latents, &out.images);
    let seen: Vec<(usize, usize)> = steps.iter().map(|s| (s.0, s.1)).collect();
    assert_eq!(seen, [(1, 4), (2, 4), (3, 4), (4, 4), (1, 3), (2, 3), (3, 3)], "both passes report their steps");
    assert_eq!((steps[0].2.clone(), steps[6].2.clone()), (vec![1, 4, 16, 16], vec![1, 4, 32, 32]));

    let g = golden("sd15_hires_lanczos");
    let p = g.params();
    let draws = g.draws();
    let mut first_noise = sd_pipelines::schedulers::NoiseQueue::new([g.tensors["draw_0"].clone()]);
    let first = generate(&m, &p, &Task::TextToImage, &mut RunContext::default().noise(&mut first_noise), SdExtras::default()).expect("first");
    assert_close("first pass latents", &first.latents, &g.tensors["first_latents"], 1e-3);
    assert_close("first pass image", &first.images, &g.tensors["first_image"], 1e-3);
    let upscaled = &g.tensors["upscaled_image"];
    // Our Lanczos against PIL's on the same picture: close, not equal.
    let ours = sd_pipelines::image_io::tensor_to_images(&first.images).expect("rgb");
    let ours = image::DynamicImage::ImageRgb8(ours[0].clone()).resize_exact(64, 64, image::imageops::FilterType::Lanczos3);
    let ours = ((sd_pipelines::image_io::image_to_tensor(&ours, 64, 64).expect("tensor") + 1.0).expect("+1") / 2.0).expect("/2");
    let diff = (&ours - upscaled).expect("diff").abs().expect("abs");
    let (mean, max) = (diff.mean_all().expect("mean").to_scalar::<f32>().expect("f32"), diff.max_all().expect("max").to_scalar::<f32>().expect("f32"));
    eprintln!("Lanczos, image crate vs PIL: mean |diff| {mean:.4}, max {max:.4}");
    assert!(mean < 0.02 && max < 0.2, "Lanczos: mean {mean}, max {max}");
    let second = HiresFix { width: 64, height: 64, upscaler: HiresUpscaler::Lanczos, steps: Some(5), strength: 0.6, esrgan: None }.second_pass(&p);
    let image = ((upscaled * 2.0).expect("x2") - 1.0).expect("-1");
    let mut second_noise = sd_pipelines::schedulers::NoiseQueue::new([g.tensors["draw_1"].clone(), g.tensors["draw_2"].clone()]);
    let task = Task::ImageToImage(ImageToImage { image: &image, strength: 0.6 });
    let out = generate(&m, &second, &task, &mut RunContext::default().noise(&mut second_noise), SdExtras::default()).expect("second");
    g.check("sd15_hires_lanczos", &out.latents, &out.images);
    // The whole Lanczos hires fix runs through the same draws and lands at the target size.
    let mut all = draws;
    let hr = HiresFix { width: 64, height: 64, upscaler: HiresUpscaler::Lanczos, steps: Some(5), strength: 0.6, esrgan: None };
    let whole = generate_hires(&m, &p, &hr, &mut RunContext::default().noise(&mut all)).expect("hires lanczos");
    assert_eq!((whole.images.dims().to_vec(), all.remaining()), (vec![1, 3, 64, 64], 0));
    // Refusals name the hires fields.
    let bad = HiresFix { width: 60, ..hr.clone() };
    let e = generate_hires(&m, &p, &bad, &mut RunContext::default()).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("hr_width"), "{e}");
    let bad = HiresFix { strength: 0.1, steps: Some(5), ..hr };
    let e = generate_hires(&m, &p, &bad, &mut RunContext::default()).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("denoising_strength"), "{e}");
}
