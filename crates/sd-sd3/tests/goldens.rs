//! SD 3.x against diffusers 0.42.1 on the tiny random-weight fixtures of `tools/sd3_fixtures.py`: each text
//! encoder and the combined prompt embeddings, the three MMDiT styles (3.5 Medium with MMDiT-X, 3.5 Large,
//! SD 3 without QK norm) from every file layout, the VAE, the schedule, and txt2img / img2img / inpaint end to
//! end with diffusers' recorded noise.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sd_core::run::{ImageToImage, Inpaint, Request, RunContext, StepProgress, Task};
use sd_core::schedulers::flow_match::FlowMatchEulerScheduler;
use sd_core::schedulers::NoiseQueue;
use sd_sd3::loader::{load_transformer, Part};
use sd_sd3::pipeline::generate;
use sd_sd3::text::encode_prompt;
use sd_sd3::{load, Sd3LoadOptions, Sd3Models, Sd3Variant};

const COMPONENT_TOL: f32 = 1e-4;
const E2E_TOL: f32 = 1e-3;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn medium() -> PathBuf {
    fixtures().join("sd3/medium")
}

fn golden(name: &str) -> HashMap<String, Tensor> {
    let path = fixtures().join("goldens/sd3").join(name);
    candle_core::safetensors::load(&path, &Device::Cpu).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn get(g: &HashMap<String, Tensor>, name: &str) -> Tensor {
    g.get(name).unwrap_or_else(|| panic!("golden tensor {name} missing")).clone()
}

fn models() -> Sd3Models {
    load(&medium(), &Sd3LoadOptions::default()).unwrap_or_else(|e| panic!("loading the tiny SD 3.5 folder: {e}"))
}

fn assert_close(what: &str, ours: &Tensor, golden: &Tensor, tol: f32) -> f32 {
    assert_eq!(ours.dims(), golden.dims(), "{what}: shape");
    let f = |t: &Tensor| t.to_dtype(DType::F32).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<f32>()).expect("values");
    let (a, b) = (f(ours), f(golden));
    let d = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let m = b.iter().map(|y| y.abs()).fold(0f32, f32::max);
    let bound = tol * m.max(1.0);
    eprintln!("{what}: max diff {d:.3e} (bound {bound:.1e}, max |golden| {m:.3})");
    assert!(d <= bound, "{what}: max diff {d} exceeds {bound}");
    d
}

fn tiny_request(seed: u64, guidance: f64) -> Request {
    let mut p = Request::new("a photo of a cat", 32, 24, 4, guidance);
    p.negative_prompt = "blurry".into();
    p.max_sequence_length = Some(16);
    p.seed = seed;
    p
}

#[test]
fn folder_loads_as_sd35_medium() {
    let m = models();
    assert_eq!(m.variant, Sd3Variant::Sd35Medium);
    let c = m.transformer.config();
    assert_eq!((c.num_layers, c.hidden(), c.dual_attention_layers.as_slice(), c.qk_norm), (3, 32, &[0usize][..], true));
    assert!(m.text.t5.is_some());
    assert!(sd_sd3::detect::is_sd3(&medium()));
    assert!(sd_sd3::detect::is_sd3(&fixtures().join("sd3/sd3.5-medium-tiny.safetensors")));
    assert!(!sd_sd3::detect::is_sd3(&fixtures().join("sd15")));
    assert!(!sd_sd3::detect::is_sd3(&fixtures().join("flux/dev")));
}

#[test]
fn prompt_embeddings_match() {
    let m = models();
    let g = golden("text_encoders.safetensors");
    let texts = ["a photo of a cat", "", "blurry"];
    for (i, text) in texts.iter().enumerate() {
        let ids_l: Vec<u32> = get(&g, "clip_l_ids").get(i).and_then(|t| t.to_dtype(DType::U32)).and_then(|t| t.to_vec1()).expect("ids");
        let ids_g: Vec<u32> = get(&g, "clip_g_ids").get(i).and_then(|t| t.to_dtype(DType::U32)).and_then(|t| t.to_vec1()).expect("ids");
        let ids_t5: Vec<u32> = get(&g, "t5_ids").get(i).and_then(|t| t.to_dtype(DType::U32)).and_then(|t| t.to_vec1()).expect("ids");
        assert_eq!(m.text.tokenizer_l.encode_padded(text, 77).expect("ids"), ids_l, "CLIP-L ids of {text:?}");
        assert_eq!(m.text.tokenizer_g.encode_padded(text, 77).expect("ids"), ids_g, "CLIP-G ids of {text:?}");
        let tok = m.text.t5_tokenizer.as_ref().expect("T5 tokenizer");
        assert_eq!(sd_models::t5::input_ids(tok, text, 16).expect("ids"), ids_t5, "T5 ids of {text:?}");
        let e = encode_prompt(&m.text, text, 0, 16, 64, DType::F32).expect("encode");
        let row = |name: &str| get(&g, name).get(i).and_then(|t| t.unsqueeze(0)).expect("row");
        assert_close(&format!("prompt_embeds[{text:?}]"), &e.context, &row("prompt_embeds"), COMPONENT_TOL);
        assert_close(&format!("pooled[{text:?}]"), &e.pooled, &row("pooled_prompt_embeds"), COMPONENT_TOL);
        // A1111's clip skip 2 is diffusers' clip_skip=1 (one layer before the penultimate).
        let skipped = encode_prompt(&m.text, text, 2, 16, 64, DType::F32).expect("encode");
        assert_close(&format!("clip skip[{text:?}]"), &skipped.context, &row("prompt_embeds_clip_skip1"), COMPONENT_TOL);
    }
    // Without T5 its rows are zeros, as diffusers' `text_encoder_3=None`.
    let no_t5 = load(&medium(), &Sd3LoadOptions { t5: false, ..Default::default() }).expect("load without T5");
    let e = encode_prompt(&no_t5.text, texts[0], 0, 16, 64, DType::F32).expect("encode");
    assert_close("prompt_embeds without T5", &e.context, &get(&g, "prompt_embeds_no_t5").get(0).and_then(|t| t.unsqueeze(0)).expect("row"), COMPONENT_TOL);
}

/// The three MMDiT styles from the three file layouts they come in, on square and non-square latents.
#[test]
fn transformers_match() {
    let g = golden("transformer.safetensors");
    let dev = Device::Cpu;
    // SD 3's heads (8 wide here) show in no tensor without QK norm: its config comes from a folder, as
    // diffusers' `from_single_file(config=…)`; the others are read off their weights alone.
    let sd3_config = std::env::temp_dir().join(format!("sd3-medium-config-{}", std::process::id()));
    std::fs::create_dir_all(sd3_config.join("transformer")).expect("mkdir");
    std::fs::write(
        sd3_config.join("transformer/config.json"),
        r#"{"_class_name": "SD3Transformer2DModel", "num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 4,
            "caption_projection_dim": 32, "joint_attention_dim": 64, "pooled_projection_dim": 56, "pos_embed_max_size": 16,
            "sample_size": 16, "qk_norm": null}"#,
    )
    .expect("config");
    let file = |name: &str| Part::File { path: fixtures().join("sd3").join(name), prefix: String::new() };
    let cases = [
        ("medium", Part::Folder(medium().join("transformer")), None),
        ("large", file("large-transformer.safetensors"), None),
        ("sd3_medium", file("sd3-medium-transformer.safetensors"), Some(sd3_config.clone())),
        ("medium", file("sd3.5-medium-tiny.safetensors"), None),
    ];
    for (name, part, configs) in cases {
        let t = load_transformer(&part, configs.as_deref(), DType::F32, &dev).unwrap_or_else(|e| panic!("{name}: {e}"));
        let out = t
            .forward(&get(&g, "hidden_states"), &get(&g, "timestep"), &get(&g, "encoder_hidden_states"), &get(&g, "pooled_projections"), &[])
            .expect("forward");
        assert_close(&format!("{name} from {part:?}"), &out, &get(&g, &format!("out_{name}")), COMPONENT_TOL);
        let ns = t
            .forward(&get(&g, "ns_hidden_states"), &get(&g, "ns_timestep"), &get(&g, "ns_encoder_hidden_states"), &get(&g, "ns_pooled_projections"), &[])
            .expect("forward");
        assert_close(&format!("{name} non-square"), &ns, &get(&g, &format!("ns_out_{name}")), COMPONENT_TOL);
    }
    let _ = std::fs::remove_dir_all(&sd3_config);
}

#[test]
fn skip_layers_and_bf16_split_file_match() {
    let g = golden("transformer.safetensors");
    let dev = Device::Cpu;
    let t = load_transformer(&Part::Folder(medium().join("transformer")), None, DType::F32, &dev).expect("medium");
    let out = t
        .forward(&get(&g, "hidden_states"), &get(&g, "timestep"), &get(&g, "encoder_hidden_states"), &get(&g, "pooled_projections"), &[1])
        .expect("forward");
    assert_close("skip_layers=[1]", &out, &get(&g, "out_medium_skip1"), COMPONENT_TOL);
    // ComfyUI's bf16 diffusion-model file (prefixed names) run in F32, and kept in BF16.
    let part = Part::File { path: fixtures().join("sd3/split/sd3.5_medium_tiny.safetensors"), prefix: String::new() };
    let t = load_transformer(&part, Some(&medium()), DType::F32, &dev).expect("split bf16");
    let out = t
        .forward(&get(&g, "hidden_states"), &get(&g, "timestep"), &get(&g, "encoder_hidden_states"), &get(&g, "pooled_projections"), &[])
        .expect("forward");
    assert_close("bf16 file in F32", &out, &get(&g, "out_medium_bf16"), COMPONENT_TOL);
    let t = load_transformer(&part, Some(&medium()), DType::BF16, &dev).expect("split bf16 as bf16");
    let out = t
        .forward(&get(&g, "hidden_states"), &get(&g, "timestep"), &get(&g, "encoder_hidden_states"), &get(&g, "pooled_projections"), &[])
        .expect("forward");
    // On the CPU the weights stay bf16 (multiplied panel by panel) and the activations run in F32.
    assert_eq!(t.dtype(), DType::F32);
    assert_close("bf16 weights kept in bf16", &out, &get(&g, "out_medium_bf16"), COMPONENT_TOL);
}

#[test]
fn vae_matches() {
    let m = models();
    let g = golden("vae.safetensors");
    let dist = m.vae.encode(&get(&g, "image")).expect("encode");
    assert_close("posterior mean", &dist.mean, &get(&g, "posterior_mean"), COMPONENT_TOL);
    let dec = m.vae.decode(&get(&g, "latent_in")).expect("decode");
    assert_close("decode", &dec, &get(&g, "decoded"), COMPONENT_TOL);
}

#[test]
fn schedule_matches() {
    let m = models();
    let text = std::fs::read_to_string(fixtures().join("goldens/sd3/schedule.json")).expect("schedule.json");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    let cases = v["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), 5);
    for want in cases {
        let n = want["steps"].as_u64().expect("steps") as usize;
        let want_sigmas: Vec<f64> = want["sigmas"].as_array().expect("sigmas").iter().filter_map(|x| x.as_f64()).collect();
        let want_ts: Vec<f64> = want["timesteps"].as_array().expect("timesteps").iter().filter_map(|x| x.as_f64()).collect();
        let s = FlowMatchEulerScheduler::spaced(&m.scheduler, n, 48).expect("schedule");
        assert_eq!(s.sigmas().len(), want_sigmas.len(), "{n} steps");
        for (a, b) in s.sigmas().iter().zip(&want_sigmas) {
            assert!((a - b).abs() < 1e-6, "{n} steps: sigma {a} vs {b}");
        }
        for (a, b) in s.timesteps().iter().zip(&want_ts) {
            assert!((a - b).abs() < 1e-3, "{n} steps: timestep {a} vs {b}");
        }
    }
}

/// Runs `task` on `m` with the golden's recorded draws and compares the steps, latents and image.
fn check_run(what: &str, m: &Sd3Models, g: &HashMap<String, Tensor>, p: &Request, task: &Task<'_>, draws: Vec<Tensor>, image_key: &str) {
    let mut queue = NoiseQueue::new(draws);
    let mut steps = Vec::new();
    let mut cb = |s: &StepProgress<'_>| {
        steps.push(s.latents.clone());
        ControlFlow::Continue(())
    };
    let out = generate(m, p, task, &mut RunContext::with_progress(&mut cb).noise(&mut queue)).unwrap_or_else(|e| panic!("{what}: {e}"));
    let golden_steps = get(g, "step_latents");
    assert_eq!(steps.len(), golden_steps.dim(0).expect("steps"), "{what}: step count");
    for (i, s) in steps.iter().enumerate() {
        assert_close(&format!("{what} step {i}"), s, &golden_steps.get(i).expect("step"), E2E_TOL);
    }
    assert_close(&format!("{what} latents"), &out.latents, &get(g, "latents_final"), E2E_TOL);
    assert_close(&format!("{what} image"), &out.images, &get(g, image_key), E2E_TOL);
}

#[test]
fn txt2img_matches_diffusers() {
    let m = models();
    let g = golden("txt2img.safetensors");
    check_run("txt2img (CFG 4.5)", &m, &g, &tiny_request(42, 4.5), &Task::TextToImage, vec![get(&g, "noise")], "image");
    let g = golden("txt2img_no_cfg.safetensors");
    check_run("txt2img (no CFG)", &m, &g, &tiny_request(42, 1.0), &Task::TextToImage, vec![get(&g, "noise")], "image");
}

/// `--dtype bf16` on the CPU: the MMDiT, T5 and CLIP-L/G keep bf16 weights (the VAE F32) and the whole
/// txt2img run stays near diffusers' F32 golden, at a tolerance bf16 rounding explains (the F32 run is
/// held to 1e-4 above).
#[test]
fn bf16_weights_run_txt2img_near_the_f32_golden() {
    let opts = Sd3LoadOptions { dtype: Some(DType::BF16), ..Sd3LoadOptions::default() };
    let m = load(&medium(), &opts).expect("bf16 load");
    assert_eq!(m.text.clip_l.dtype(), DType::BF16);
    assert_eq!(m.text.t5.as_ref().map(|t| t.dtype()), Some(DType::BF16));
    let g = golden("txt2img.safetensors");
    let mut queue = NoiseQueue::new(vec![get(&g, "noise")]);
    let out = generate(&m, &tiny_request(42, 4.5), &Task::TextToImage, &mut RunContext::default().noise(&mut queue)).expect("bf16 run");
    let diff = assert_close("bf16 txt2img image", &out.images, &get(&g, "image"), 0.1);
    assert!(diff > 0.0, "a bf16 run that equals the F32 golden bit for bit did not run in bf16");
}

#[test]
fn img2img_matches_diffusers() {
    let m = models();
    let g = golden("img2img.safetensors");
    let init = ((get(&g, "init_image") * 2.0).expect("x2") - 1.0).expect("-1");
    let task = Task::ImageToImage(ImageToImage { image: &init, strength: 0.6 });
    check_run("img2img 0.6", &m, &g, &tiny_request(7, 4.5), &task, vec![get(&g, "posterior_noise"), get(&g, "noise")], "image");
}

#[test]
fn inpaint_matches_diffusers() {
    let m = models();
    for (file, strength, seed) in [("inpaint.safetensors", 1.0, 11), ("inpaint_0.7.safetensors", 0.7, 12)] {
        let g = golden(file);
        let init = ((get(&g, "init_image") * 2.0).expect("x2") - 1.0).expect("-1");
        let mask = get(&g, "mask");
        let task = Task::Inpaint(Inpaint { image: &init, mask: &mask, strength });
        let draws = vec![get(&g, "posterior_noise"), get(&g, "noise"), get(&g, "masked_posterior_noise")];
        check_run(&format!("inpaint {strength}"), &m, &g, &tiny_request(seed, 4.5), &task, draws, "image");
    }
}

/// The Stability single file (MMDiT, VAE and the three encoders in one file) gives the folder's images, and
/// so do ComfyUI's split files (bf16 diffusion model, clip_l/clip_g/t5xxl and VAE files side by side).
#[test]
fn single_file_and_split_files_match_the_folder() {
    let g = golden("txt2img.safetensors");
    let opts = Sd3LoadOptions { components: Some(medium()), ..Default::default() };
    let single = load(&fixtures().join("sd3/sd3.5-medium-tiny.safetensors"), &opts).expect("single file");
    check_run("single file txt2img", &single, &g, &tiny_request(42, 4.5), &Task::TextToImage, vec![get(&g, "noise")], "image");
    let split = load(&fixtures().join("sd3/split/sd3.5_medium_tiny.safetensors"), &opts).expect("split files");
    for (part, file) in [(&split.files.clip_l, "clip_l"), (&split.files.clip_g, "clip_g"), (&split.files.vae, "vae")] {
        assert_eq!(part, &Part::File { path: fixtures().join(format!("sd3/split/{file}.safetensors")), prefix: String::new() });
    }
    // bf16-rounded transformer weights: the same image within bf16's reach.
    let mut queue = NoiseQueue::new([get(&g, "noise")]);
    let out = generate(&split, &tiny_request(42, 4.5), &Task::TextToImage, &mut RunContext::default().noise(&mut queue)).expect("split txt2img");
    assert_close("split files txt2img image", &out.images, &get(&g, "image"), 5e-2);
}

#[test]
fn foreign_files_are_refused_with_a_reason() {
    let err = load(&fixtures().join("sd15"), &Sd3LoadOptions::default()).expect_err("an SD 1.5 folder");
    assert!(err.to_string().contains("Stable Diffusion 1.x/2.x/XL"), "{err}");
    let err = load(&fixtures().join("sd15.safetensors"), &Sd3LoadOptions::default()).expect_err("an SD 1.5 file");
    assert!(err.to_string().contains("UNet"), "{err}");
    let err = load(&fixtures().join("flux/flux-tiny-dev.safetensors"), &Sd3LoadOptions::default()).expect_err("a FLUX file");
    assert!(err.to_string().contains("FLUX"), "{err}");
    // A bare MMDiT file with nothing beside it names what is missing.
    let err = load(&fixtures().join("sd3/large-transformer.safetensors"), &Sd3LoadOptions::default()).expect_err("no VAE");
    assert!(err.to_string().contains("VAE"), "{err}");
}

/// ComfyUI's "fp8 scaled" diffusion-model files store each linear weight as `weight / scale` in float8 with a
/// `scale_weight` beside it; they load dequantised (`weight · scale`), close to the bf16 model, where reading
/// the float8 values alone would be far off.
#[test]
fn fp8_scaled_files_are_dequantised() {
    let g = golden("transformer.safetensors");
    let dev = Device::Cpu;
    let src = fixtures().join("sd3/split/sd3.5_medium_tiny.safetensors");
    let tensors = candle_core::safetensors::load(&src, &dev).expect("split file");
    let mut scaled = HashMap::new();
    let mut unscaled = HashMap::new();
    for (name, t) in &tensors {
        let t = t.to_dtype(DType::F32).expect("f32");
        if name.ends_with(".weight") && t.rank() == 2 {
            let max = t.abs().and_then(|a| a.max_all()).and_then(|m| m.to_scalar::<f32>()).expect("max");
            let scale = (max / 448.0).max(1e-12);
            let q = (&t / scale as f64).and_then(|q| q.to_dtype(DType::F8E4M3)).expect("fp8");
            let stem = name.trim_end_matches(".weight");
            scaled.insert(format!("{stem}.scale_weight"), Tensor::new(&[scale], &dev).expect("scale"));
            scaled.insert(name.clone(), q.clone());
            unscaled.insert(name.clone(), q);
        } else {
            scaled.insert(name.clone(), t.clone());
            unscaled.insert(name.clone(), t);
        }
    }
    scaled.insert("model.diffusion_model.scaled_fp8".into(), Tensor::zeros(0, DType::F8E4M3, &dev).expect("marker"));
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let run = |map: &HashMap<String, Tensor>, file: &str| {
        let path = dir.join(file);
        candle_core::safetensors::save(map, &path).expect("save");
        let t = load_transformer(&Part::File { path: path.clone(), prefix: String::new() }, Some(&medium()), DType::F32, &dev).expect("fp8 file");
        let out = t
            .forward(&get(&g, "hidden_states"), &get(&g, "timestep"), &get(&g, "encoder_hidden_states"), &get(&g, "pooled_projections"), &[])
            .expect("forward");
        let _ = std::fs::remove_file(path);
        (out - get(&g, "out_medium_bf16")).and_then(|d| d.abs()).and_then(|d| d.max_all()).and_then(|d| d.to_scalar::<f32>()).expect("diff")
    };
    let with_scales = run(&scaled, "sd3-fp8-scaled.safetensors");
    let without = run(&unscaled, "sd3-fp8-unscaled.safetensors");
    eprintln!("fp8 scaled: max diff {with_scales:.3e}; the same float8 values without their scales: {without:.3e}");
    // float8 keeps 3 mantissa bits: a few per cent of the output's range (max |golden| 3.8) on this tiny model.
    assert!(with_scales < 0.4, "fp8 scaled weights should stay near the bf16 model: {with_scales}");
    // Without the scales the values overflow (NaN) or are far off.
    assert!(without.is_nan() || without > 4.0 * with_scales, "ignoring the scales should be far off: {without} vs {with_scales}");
}

/// Skip-layer guidance (`skip_guidance_layers=[1]`, scale 2.8, from 1 % to 60 % of the steps): an extra call
/// on the prompt alone with block 1 left out, on steps 1 and 2 of 4.
#[test]
fn skip_layer_guidance_matches_diffusers() {
    let m = models();
    let g = golden("txt2img_slg.safetensors");
    let slg = sd_sd3::SkipLayerGuidance { layers: vec![1], scale: 2.8, start: 0.01, stop: 0.6 };
    let mut queue = NoiseQueue::new([get(&g, "noise")]);
    let mut steps = Vec::new();
    let mut cb = |s: &StepProgress<'_>| {
        steps.push(s.latents.clone());
        ControlFlow::Continue(())
    };
    let mut p = tiny_request(42, 4.5);
    p.skip_layer_guidance = Some(slg);
    let out = generate(&m, &p, &Task::TextToImage, &mut RunContext::with_progress(&mut cb).noise(&mut queue)).expect("txt2img with SLG");
    let golden_steps = get(&g, "step_latents");
    for (i, s) in steps.iter().enumerate() {
        assert_close(&format!("SLG step {i}"), s, &golden_steps.get(i).expect("step"), E2E_TOL);
    }
    assert_close("SLG latents", &out.latents, &get(&g, "latents_final"), E2E_TOL);
    assert_close("SLG image", &out.images, &get(&g, "image"), E2E_TOL);
    // It changes the run (so the golden is not the plain one), and is refused where diffusers has none.
    let plain = golden("txt2img.safetensors");
    let (d, _) = {
        let a = out.latents.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("ours");
        let b = get(&plain, "latents_final").flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("plain");
        (a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max), ())
    };
    assert!(d > 1e-2, "skip-layer guidance changed nothing ({d})");
    let init = Tensor::zeros((1, 3, 24, 32), DType::F32, &Device::Cpu).expect("image");
    let task = Task::ImageToImage(ImageToImage { image: &init, strength: 0.5 });
    let err = generate(&m, &p, &task, &mut RunContext::default()).expect_err("img2img with SLG");
    assert_eq!(err.field(), Some("skip_layer_guidance"), "{err}");
    let mut no_cfg = p.clone();
    no_cfg.guidance_scale = 1.0;
    let err = generate(&m, &no_cfg, &Task::TextToImage, &mut RunContext::default()).expect_err("SLG without CFG");
    assert_eq!(err.field(), Some("skip_layer_guidance"), "{err}");
    p.skip_layer_guidance = Some(sd_sd3::SkipLayerGuidance::new(vec![3]));
    let err = generate(&m, &p, &Task::TextToImage, &mut RunContext::default()).expect_err("layer 3 of 3");
    assert!(err.to_string().contains("3 blocks"), "{err}");
}
