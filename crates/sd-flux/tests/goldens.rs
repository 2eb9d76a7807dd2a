//! sd-flux against diffusers: every component and both pipelines on the tiny fixtures.

mod common;

use std::ops::ControlFlow;

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::flux::WithForward;
use common::{assert_close, fixtures, folder, get, golden, models};
use sd_flux::latents::pack_latents;
use sd_core::run::{ImageToImage, Inpaint, RunContext, Task};
use sd_core::schedulers::flow_match::FlowMatchConfig;
use sd_flux::pipeline::{generate, FluxParams};
use sd_flux::text::{clip_pooled, t5_embeddings, t5_input_ids};
use sd_flux::transformer::load_transformer;
use sd_flux::{FluxTransformer, FluxVariant};
use sd_core::run::StepProgress;
use sd_core::schedulers::NoiseQueue;

const COMPONENT_TOL: f32 = 1e-4;
const E2E_TOL: f32 = 1e-3;

fn ids_u32(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_dtype(DType::U32).and_then(|t| t.to_vec2::<u32>()).expect("ids")
}

#[test]
fn prompt_embeddings_match() {
    let m = models("dev");
    let g = golden("prompt_embeds.safetensors");
    let prompts: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("goldens/flux/prompts.json")).expect("prompts")).expect("json");
    let prompts: Vec<String> =
        prompts["prompts"].as_array().expect("array").iter().map(|p| p.as_str().expect("str").to_string()).collect();
    let t5_ids = ids_u32(&get(&g, "t5_input_ids"));
    let clip_ids = ids_u32(&get(&g, "clip_input_ids"));
    for (i, prompt) in prompts.iter().enumerate() {
        assert_eq!(t5_input_ids(&m.t5_tokenizer, prompt, 32).expect("t5 ids"), t5_ids[i], "T5 ids of {prompt:?}");
        assert_eq!(m.clip_tokenizer.encode_padded(prompt, 77).expect("clip ids"), clip_ids[i], "CLIP ids of {prompt:?}");
    }
    let ids = get(&g, "t5_input_ids");
    let embeds = t5_embeddings(&m.t5, &ids, DType::F32).expect("t5");
    assert_close("T5 prompt_embeds", &embeds, &get(&g, "prompt_embeds"), COMPONENT_TOL);
    let pooled = clip_pooled(&m.clip, &get(&g, "clip_input_ids"), DType::F32).expect("clip");
    assert_close("CLIP pooled", &pooled, &get(&g, "pooled_prompt_embeds"), COMPONENT_TOL);
    // The full encode_prompt path for the first prompt.
    let e = sd_flux::text::encode_prompt(&m.t5, &m.t5_tokenizer, &m.clip, &m.clip_tokenizer, &prompts[0], 32, DType::F32, &Device::Cpu)
        .expect("encode");
    assert_close("encode_prompt T5", &e.prompt_embeds, &get(&g, "prompt_embeds").narrow(0, 0, 1).expect("row"), COMPONENT_TOL);
    assert_close("encode_prompt text_ids", &e.text_ids, &get(&g, "text_ids"), 0.0);
}

fn forward(t: &FluxTransformer, g: &std::collections::HashMap<String, Tensor>) -> Tensor {
    let u = |n: &str| get(g, n).unsqueeze(0).expect("unsqueeze");
    let guidance = g.get("guidance");
    t.forward(
        &get(g, "hidden_states"),
        &u("img_ids"),
        &get(g, "encoder_hidden_states"),
        &u("txt_ids"),
        &get(g, "timestep"),
        &get(g, "pooled_projections"),
        guidance,
    )
    .expect("forward")
}

#[test]
fn transformer_forward_matches_from_folder_and_bfl_file() {
    let axes = [4usize, 6, 6];
    for variant in ["dev", "schnell"] {
        let g = golden(&format!("transformer_{variant}.safetensors"));
        let from_folder = load_transformer(&folder(variant), DType::F32, &Device::Cpu, None).expect("folder");
        let bfl = fixtures().join(format!("flux/flux-tiny-{variant}.safetensors"));
        let from_file = load_transformer(&bfl, DType::F32, &Device::Cpu, Some(&axes)).expect("bfl file");
        let expected = if variant == "dev" { FluxVariant::Dev } else { FluxVariant::Schnell };
        for (what, t) in [("diffusers folder", &from_folder), ("BFL file", &from_file)] {
            assert_eq!(t.variant(), expected, "{variant} {what}");
            let c = t.config();
            assert_eq!((c.hidden_size, c.num_heads, c.depth, c.depth_single_blocks, c.in_channels), (32, 2, 1, 2, 64));
            assert_close(&format!("{variant} transformer ({what})"), &forward(t, &g), &get(&g, "out"), COMPONENT_TOL);
        }
    }
}

#[test]
fn bf16_file_loads_and_runs() {
    let path = fixtures().join("flux/flux-tiny-dev-bf16.safetensors");
    let g = golden("transformer_dev.safetensors");
    // Stored BF16, loaded as F32: the weights are the golden's rounded to BF16, so only a loose match.
    let t = load_transformer(&path, DType::F32, &Device::Cpu, Some(&[4, 6, 6])).expect("bf16 as f32");
    assert_eq!(t.variant(), FluxVariant::Dev);
    // Measured 2.4e-2 (0.4 % of max |out| 5.3).
    assert_close("dev transformer from BF16 weights", &forward(&t, &g), &get(&g, "out"), 1e-2);
    // Loaded as BF16 and run in BF16.
    let t = load_transformer(&path, DType::BF16, &Device::Cpu, Some(&[4, 6, 6])).expect("bf16");
    assert_eq!(t.dtype(), DType::BF16);
    let cast = |n: &str| get(&g, n).to_dtype(DType::BF16).expect("cast");
    let out = t
        .forward(
            &cast("hidden_states"),
            &cast("img_ids").unsqueeze(0).expect("u"),
            &cast("encoder_hidden_states"),
            &cast("txt_ids").unsqueeze(0).expect("u"),
            &get(&g, "timestep"),
            &cast("pooled_projections"),
            g.get("guidance"),
        )
        .expect("bf16 forward");
    assert_eq!(out.dtype(), DType::BF16);
    // Measured 7.5e-2 (1.4 % of max |out|): BF16 activations.
    assert_close("dev transformer in BF16", &out, &get(&g, "out"), 3e-2);
}

#[test]
fn sigma_schedules_match_diffusers() {
    let text = std::fs::read_to_string(fixtures().join("goldens/flux/schedule.json")).expect("schedule.json");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    let cases = v["cases"].as_array().expect("cases");
    assert!(cases.len() >= 6);
    for c in cases {
        let variant = c["variant"].as_str().expect("variant");
        let steps = c["steps"].as_u64().expect("steps") as usize;
        let (h, w, f) = (c["height"].as_u64().expect("h") as usize, c["width"].as_u64().expect("w") as usize, c["vae_scale_factor"].as_u64().expect("f") as usize);
        let seq = sd_flux::latents::image_seq_len(w, h, f);
        assert_eq!(seq as u64, c["image_seq_len"].as_u64().expect("seq"), "{c}");
        let cfg = if variant == "dev" { FlowMatchConfig::dev() } else { FlowMatchConfig::schnell() };
        let mu = c["mu"].as_f64().expect("mu");
        assert!((cfg.mu(seq) - mu).abs() < 1e-12, "mu {} vs {mu}", cfg.mu(seq));
        let ours = cfg.sigmas(steps, seq);
        let theirs: Vec<f64> = c["sigmas"].as_array().expect("sigmas").iter().map(|x| x.as_f64().expect("f")).collect();
        assert_eq!(ours.len(), theirs.len());
        for (a, b) in ours.iter().zip(&theirs) {
            assert!((a - b).abs() < 1e-6, "{variant} {steps} steps {h}x{w}: {ours:?} vs {theirs:?}");
        }
        let ts: Vec<f64> = c["timesteps"].as_array().expect("ts").iter().map(|x| x.as_f64().expect("f")).collect();
        for (a, b) in ours.iter().zip(&ts) {
            assert!((a * 1000.0 - b).abs() < 1e-3, "timesteps {ts:?}");
        }
    }
    // The folder's scheduler_config.json gives the same schedule as the built-in dev config.
    let from_file = FlowMatchConfig::from_file(&folder("dev").join("scheduler/scheduler_config.json")).expect("config");
    assert_eq!(from_file.sigmas(20, 4096), FlowMatchConfig::dev().sigmas(20, 4096));
}

fn tiny_params(variant: &str) -> FluxParams {
    FluxParams {
        seed: 42,
        max_sequence_length: Some(32),
        variation: None,
        eta_noise_seed_delta: 0,
        ..FluxParams::new("a photo of a cat", 16, 16, 4, if variant == "dev" { 3.5 } else { 0.0 })
    }
}

#[test]
fn txt2img_matches_diffusers() {
    for variant in ["dev", "schnell"] {
        let m = models(variant);
        let g = golden(&format!("txt2img_{variant}.safetensors"));
        let mut queue = NoiseQueue::new([get(&g, "noise")]);
        let mut steps = Vec::new();
        let mut cb = |s: &StepProgress<'_>| {
            steps.push((s.step, s.total, pack_latents(s.latents).expect("pack")));
            ControlFlow::Continue(())
        };
        let out = generate(&m, &tiny_params(variant), &Task::TextToImage, &mut RunContext::with_progress(&mut cb).noise(&mut queue))
            .expect("txt2img");
        assert_eq!(steps.len(), 4);
        let golden_steps = get(&g, "step_latents");
        for (i, (step, total, lat)) in steps.iter().enumerate() {
            assert_eq!((*step, *total), (i + 1, 4));
            assert_close(&format!("{variant} step {step} latents"), lat, &golden_steps.get(i).expect("step"), E2E_TOL);
        }
        assert_close(&format!("{variant} final latents"), &out.latents, &get(&g, "latents_final_unpacked"), E2E_TOL);
        assert_close(&format!("{variant} image"), &out.images, &get(&g, "image"), E2E_TOL);
        assert_eq!(out.seed, 42);
    }
}

#[test]
fn img2img_matches_diffusers() {
    let m = models("dev");
    let g = golden("img2img_dev.safetensors");
    let init = ((get(&g, "init_image") * 2.0).expect("x2") - 1.0).expect("-1");
    assert_close("vae input", &init, &get(&g, "vae_input"), 1e-6);
    let mut queue = NoiseQueue::new([get(&g, "posterior_noise"), get(&g, "noise")]);
    let mut seen = Vec::new();
    let mut cb = |s: &StepProgress<'_>| {
        seen.push((s.step, s.total, s.timestep));
        ControlFlow::Continue(())
    };
    let task = Task::ImageToImage(ImageToImage { image: &init, strength: 0.6 });
    let out = generate(&m, &tiny_params("dev"), &task, &mut RunContext::with_progress(&mut cb).noise(&mut queue)).expect("img2img");
    let ts: Vec<f32> = get(&g, "timesteps").to_vec1().expect("ts");
    assert_eq!(seen.len(), ts.len());
    for ((step, total, t), golden_t) in seen.iter().zip(&ts) {
        assert_eq!(*total, 3);
        assert!((*t as f32 - golden_t).abs() < 1e-3, "step {step}: timestep {t} vs {golden_t}");
    }
    assert_close("img2img final latents", &out.latents, &get(&g, "latents_final_unpacked"), E2E_TOL);
    assert_close("img2img image", &out.images, &get(&g, "image"), E2E_TOL);
    let mut q = NoiseQueue::new([get(&g, "posterior_noise")]);
    let z = sd_flux::pipeline::encode_image(&m, &init, &mut q).expect("encode");
    assert_close("img2img image_latents", &z, &get(&g, "image_latents"), COMPONENT_TOL);
}

/// `FluxInpaintPipeline` on both variants: dev at strength 0.6 (noised start, 3 of 4 steps), schnell at
/// 1.0 (pure noise); a soft mask, binarised by the pipeline.
#[test]
fn inpaint_matches_diffusers() {
    for (variant, strength, steps_run) in [("dev", 0.6, 3), ("schnell", 1.0, 4)] {
        let m = models(variant);
        let g = golden(&format!("inpaint_{variant}.safetensors"));
        let init = ((get(&g, "init_image") * 2.0).expect("x2") - 1.0).expect("-1");
        let mask = get(&g, "mask");
        let mut queue = NoiseQueue::new([get(&g, "posterior_noise"), get(&g, "noise"), get(&g, "masked_posterior_noise")]);
        let mut steps = Vec::new();
        let mut cb = |s: &StepProgress<'_>| {
            steps.push((s.step, s.total, s.timestep, pack_latents(s.latents).expect("pack")));
            ControlFlow::Continue(())
        };
        let task = Task::Inpaint(Inpaint { image: &init, mask: &mask, strength });
        let mut p = tiny_params(variant);
        p.seed = 11;
        let out = generate(&m, &p, &task, &mut RunContext::with_progress(&mut cb).noise(&mut queue)).expect("inpaint");
        let ts: Vec<f32> = get(&g, "timesteps").to_vec1().expect("ts");
        let golden_steps = get(&g, "step_latents");
        assert_eq!(steps.len(), steps_run);
        assert_eq!(ts.len(), steps_run);
        for (i, (step, total, t, lat)) in steps.iter().enumerate() {
            assert_eq!((*step, *total), (i + 1, steps_run));
            assert!((*t as f32 - ts[i]).abs() < 1e-3, "{variant} step {step}: timestep {t} vs {}", ts[i]);
            assert_close(&format!("{variant} inpaint step {step} latents"), lat, &golden_steps.get(i).expect("step"), E2E_TOL);
        }
        assert_close(&format!("{variant} inpaint final latents"), &out.latents, &get(&g, "latents_final_unpacked"), E2E_TOL);
        assert_close(&format!("{variant} inpaint image"), &out.images, &get(&g, "image"), E2E_TOL);
        // Only the masked area changed: outside it the final latents are the clean image latents.
        let mut q = NoiseQueue::new([get(&g, "posterior_noise")]);
        let clean = pack_latents(&sd_flux::pipeline::encode_image(&m, &init, &mut q).expect("encode")).expect("pack");
        let keep = (1.0 - get(&g, "mask_packed")).expect("1-m");
        let final_packed = pack_latents(&out.latents).expect("pack");
        let diff = ((final_packed - &clean).expect("sub") * keep).expect("mul").abs().expect("abs").max_all().expect("max");
        assert!(diff.to_scalar::<f32>().expect("scalar") < 1e-5, "{variant}: unmasked latents moved");
    }
}

/// A step callback may replace the latents: zeroing them after the last step decodes the zero latent.
#[test]
fn step_callback_edits_latents() {
    let m = models("schnell");
    let p = tiny_params("schnell");
    let mut edit = |s: &StepProgress<'_>| -> sd_core::Result<Option<Tensor>> {
        Ok((s.step == s.total).then(|| s.latents.zeros_like()).transpose()?)
    };
    let out = generate(&m, &p, &Task::TextToImage, &mut RunContext::default().edit(&mut edit)).expect("txt2img");
    assert_eq!(out.latents.abs().and_then(|t| t.max_all()).and_then(|t| t.to_scalar::<f32>()).expect("max"), 0.0);
    let zero = sd_flux::pipeline::decode_latents(&m, &out.latents, None).expect("decode");
    assert_close("decode of edited latents", &out.images, &zero, 0.0);
}

#[test]
fn vae_matches_from_folder_and_ae_file() {
    let g = golden("vae.safetensors");
    let cfg = sd_models::diffusers::read_vae_config(&folder("dev").join("vae/config.json")).expect("vae config");
    for (what, path) in [("folder", folder("dev").join("vae")), ("ae.safetensors", fixtures().join("flux/ae.safetensors"))] {
        let vae = sd_flux::vae::load_vae(&path, DType::F32, &Device::Cpu, Some(&cfg)).expect("vae");
        assert_eq!(vae.config().shift_factor, Some(0.1159));
        // The golden's image is already the VAE input in [-1, 1].
        let dist = vae.encode(&get(&g, "image")).expect("encode");
        assert_close(&format!("VAE posterior mean ({what})"), &dist.mean, &get(&g, "posterior_mean"), COMPONENT_TOL);
        assert_close(&format!("VAE posterior logvar ({what})"), &dist.logvar, &get(&g, "posterior_logvar"), COMPONENT_TOL);
        let decoded = vae.decode(&get(&g, "latent_in")).expect("decode");
        assert_close(&format!("VAE decode ({what})"), &decoded, &get(&g, "decoded"), COMPONENT_TOL);
    }
}

#[test]
fn bfl_files_load_through_flux_files() {
    // The BFL transformer and ae.safetensors with the text encoders of the dev folder.
    let files = sd_flux::FluxFiles::with_components_from(
        fixtures().join("flux/flux-tiny-dev.safetensors"),
        Some(fixtures().join("flux/ae.safetensors")),
        &folder("dev"),
    );
    let vae_config = sd_models::diffusers::read_vae_config(&folder("dev").join("vae/config.json")).expect("vae config");
    let opts = sd_flux::FluxLoadOptions { axes_dim: Some(vec![4, 6, 6]), vae_config: Some(vae_config), ..Default::default() };
    let m = sd_flux::load_source(&sd_flux::FluxSource::Files(files), &opts).expect("load");
    let g = golden("txt2img_dev.safetensors");
    let mut queue = NoiseQueue::new([get(&g, "noise")]);
    let out = generate(&m, &tiny_params("dev"), &Task::TextToImage, &mut RunContext::default().noise(&mut queue)).expect("txt2img");
    assert_close("txt2img from BFL files", &out.images, &get(&g, "image"), E2E_TOL);
}

/// `FluxKontextPipeline` (no auto-resize; a 12×20 reference, a 16×16 output): the reference encoded with the
/// posterior mode, its tokens appended with position index 1, their prediction dropped.
#[test]
fn kontext_edit_matches_diffusers() {
    use sd_core::run::{Edit, TaskKind};
    let dir = common::kontext_folder("kontext-golden");
    let m = sd_flux::load(&dir, &sd_flux::FluxLoadOptions::default()).expect("kontext loads");
    let caps = sd_flux::pipeline::capabilities(&m);
    assert!(m.kontext && caps.tasks.contains(&TaskKind::Edit) && caps.variant == "flux-kontext-dev", "{caps:?}");
    assert_eq!(caps.default_guidance, 2.5);
    assert!(!sd_flux::pipeline::capabilities(&models("dev")).tasks.contains(&TaskKind::Edit), "plain dev runs no edits");
    let g = golden("kontext_dev.safetensors");
    let reference = ((get(&g, "reference_image") * 2.0).expect("x2") - 1.0).expect("-1");
    assert_close("vae input", &reference, &get(&g, "vae_input"), 1e-6);
    let mut queue = NoiseQueue::new([get(&g, "noise")]);
    let mut steps = Vec::new();
    let mut cb = |s: &StepProgress<'_>| {
        steps.push(pack_latents(s.latents).expect("pack"));
        ControlFlow::Continue(())
    };
    let mut p = tiny_params("dev");
    p.guidance_scale = 2.5;
    let images = [reference];
    let task = Task::Edit(Edit { images: &images });
    let out = generate(&m, &p, &task, &mut RunContext::with_progress(&mut cb).noise(&mut queue)).expect("edit");
    assert_eq!(queue.remaining(), 0, "the edit draws only the initial noise");
    let golden_steps = get(&g, "step_latents");
    for (i, s) in steps.iter().enumerate() {
        assert_close(&format!("step {i}"), s, &golden_steps.get(i).expect("step"), E2E_TOL);
    }
    assert_close("kontext final latents", &out.latents, &get(&g, "latents_final_unpacked"), E2E_TOL);
    assert_close("kontext image", &out.images, &get(&g, "image"), E2E_TOL);
    // Refusals: no image, two images, a size off the model's multiple, and an edit on a plain dev model.
    let e = |task: &Task<'_>, m: &sd_flux::FluxModels| generate(m, &p, task, &mut RunContext::default()).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e(&Task::Edit(Edit { images: &[] }), &m).contains("images"));
    let two = [images[0].clone(), images[0].clone()];
    assert!(e(&Task::Edit(Edit { images: &two }), &m).contains("one reference image"));
    let odd = [Tensor::zeros((1, 3, 10, 20), DType::F32, &Device::Cpu).expect("zeros")];
    assert!(e(&Task::Edit(Edit { images: &odd }), &m).contains("images"));
    assert!(e(&task, &models("dev")).contains("task"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `FluxFillPipeline` on a tiny Fill transformer (144 input channels: noise, masked-image latents and the
/// mask folded into the latent grid), at strength 1.0 and 0.75.
#[test]
fn fill_matches_diffusers() {
    use sd_core::run::TaskKind;
    let m = models("fill");
    let caps = sd_flux::pipeline::capabilities(&m);
    assert!(m.fill && caps.variant == "flux-fill-dev" && caps.tasks == vec![TaskKind::Inpaint], "{caps:?}");
    assert_eq!((caps.default_steps, caps.default_guidance), (50, 30.0));
    for (name, strength, seed, steps_run) in [("fill_dev_s100.safetensors", 1.0, 13, 4), ("fill_dev_s75.safetensors", 0.75, 14, 3)] {
        let g = golden(name);
        let init = ((get(&g, "init_image") * 2.0).expect("x2") - 1.0).expect("-1");
        let mask = get(&g, "mask");
        let mut queue = NoiseQueue::new([get(&g, "posterior_noise"), get(&g, "noise"), get(&g, "masked_posterior_noise")]);
        let mut steps = Vec::new();
        let mut cb = |s: &StepProgress<'_>| {
            steps.push(pack_latents(s.latents).expect("pack"));
            ControlFlow::Continue(())
        };
        let mut p = tiny_params("dev");
        (p.guidance_scale, p.seed) = (30.0, seed);
        let task = Task::Inpaint(Inpaint { image: &init, mask: &mask, strength });
        let out = generate(&m, &p, &task, &mut RunContext::with_progress(&mut cb).noise(&mut queue)).expect("fill");
        assert_eq!(queue.remaining(), 0, "{name}: three draws, as diffusers");
        assert_eq!(steps.len(), steps_run);
        let golden_steps = get(&g, "step_latents");
        for (i, s) in steps.iter().enumerate() {
            assert_close(&format!("{name} step {i}"), s, &golden_steps.get(i).expect("step"), E2E_TOL);
        }
        assert_close(&format!("{name} final latents"), &out.latents, &get(&g, "latents_final_unpacked"), E2E_TOL);
        assert_close(&format!("{name} image"), &out.images, &get(&g, "image"), E2E_TOL);
    }
    // A Fill model needs a picture and a mask.
    let e = generate(&m, &tiny_params("dev"), &Task::TextToImage, &mut RunContext::default()).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("task") && e.contains("inpaint"), "{e}");
}
