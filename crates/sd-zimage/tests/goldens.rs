//! sd-zimage against diffusers 0.42.1: every component and the three pipelines on the tiny fixtures
//! (`tools/zimage_fixtures.py`).

mod common;

use std::ops::ControlFlow;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixtures, folder, get, golden, golden_json, models};
use sd_core::run::{ImageToImage, Inpaint, RunContext, StepProgress, Task, TaskKind};
use sd_core::schedulers::flow_match::FlowMatchEulerScheduler;
use sd_core::schedulers::NoiseQueue;
use sd_zimage::pipeline::{capabilities, generate, ZImageParams};
use sd_zimage::transformer::load_transformer;
use sd_zimage::{ZImageConfig, ZImageModel, ZImageVariant};

const COMPONENT_TOL: f32 = 1e-4;
const E2E_TOL: f32 = 5e-4;

#[test]
fn prompt_embeddings_match() {
    let m = models();
    let g = golden("prompt_embeds.safetensors");
    let meta = golden_json("prompt_embeds.json");
    let prompts: Vec<String> = meta["prompts"].as_array().expect("prompts").iter().map(|p| p.as_str().expect("str").to_string()).collect();
    let templated: Vec<&str> = meta["templated"].as_array().expect("templated").iter().map(|p| p.as_str().expect("str")).collect();
    let ids = get(&g, "input_ids").to_dtype(DType::U32).and_then(|t| t.to_vec2::<u32>()).expect("ids");
    let mask = get(&g, "attention_mask").to_dtype(DType::U32).and_then(|t| t.to_vec2::<u32>()).expect("mask");
    for (i, prompt) in prompts.iter().enumerate() {
        assert_eq!(sd_zimage::text::chat_prompt(prompt), templated[i]);
        let n = mask[i].iter().filter(|&&x| x == 1).count();
        let ours = sd_zimage::text::input_ids(&m.tokenizer, prompt, 64).expect("ids");
        assert_eq!(ours, ids[i][..n].to_vec(), "ids of {prompt:?}");
        let e = sd_zimage::text::encode_prompt(&m.text_encoder, &m.tokenizer, prompt, 64).expect("encode");
        assert_close(&format!("prompt_embeds {i}"), &e, &get(&g, &format!("prompt_embeds_{i}")), COMPONENT_TOL);
    }
}

fn batch_forward(t: &ZImageModel, g: &std::collections::HashMap<String, Tensor>) -> Tensor {
    let x = Tensor::cat(&[get(g, "x0").squeeze(1).expect("sq"), get(g, "x1").squeeze(1).expect("sq")], 0).expect("cat");
    let x = x.reshape((2, 16, 6, 10)).expect("reshape").to_dtype(t.dtype()).expect("dtype");
    t.forward(&x, &get(g, "t"), &[get(g, "cap0"), get(g, "cap1")]).expect("forward")
}

fn golden_batch(g: &std::collections::HashMap<String, Tensor>) -> Tensor {
    Tensor::stack(&[get(g, "out0").squeeze(1).expect("sq"), get(g, "out1").squeeze(1).expect("sq")], 0).expect("stack")
}

/// Two items whose captions (7 and 40 tokens) pad to 32 and 64 (diffusers pads the batch and masks those
/// keys; here the items run as two groups), 15 image tokens padded to 32.
#[test]
fn transformer_matches_diffusers() {
    let t = load_transformer(&folder(), DType::F32, &Device::Cpu, None).expect("folder");
    let g = golden("transformer_batch.safetensors");
    assert_close("transformer (batch, captions padded to 32 and 64)", &batch_forward(&t, &g), &golden_batch(&g), COMPONENT_TOL);
    let g = golden("transformer_single.safetensors");
    let x = get(&g, "x").squeeze(1).and_then(|x| x.unsqueeze(0)).expect("x");
    let out = t.forward(&x, &get(&g, "t"), &[get(&g, "cap")]).expect("forward");
    let want = get(&g, "out").squeeze(1).and_then(|x| x.unsqueeze(0)).expect("out");
    assert_close("transformer (single)", &out, &want, COMPONENT_TOL);
}

/// The original-layout (ComfyUI / Tongyi names, fused qkv) file, stored in BF16, loaded as F32 and as BF16.
#[test]
fn original_layout_bf16_file_loads_and_runs() {
    let path = fixtures().join("zimage/z_image_tiny_bf16.safetensors");
    assert!(sd_zimage::detect::is_zimage(&path));
    let cfg = ZImageConfig::from_file(&folder().join("transformer/config.json")).expect("config");
    let g = golden("transformer_batch.safetensors");
    let want = golden_batch(&g);
    // Without a config the tiny head size (32) cannot give the rotary split: a clear error.
    let e = load_transformer(&path, DType::F32, &Device::Cpu, None).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("transformer_config"), "{e}");
    let t = load_transformer(&path, DType::F32, &Device::Cpu, Some(&cfg)).expect("bf16 as f32");
    // Measured 2.1e-2 (0.6 % of max |out| 3.5): the weights are the golden's rounded to BF16.
    let d = assert_close("transformer from BF16 weights (F32 compute)", &batch_forward(&t, &g), &want, 1.5e-2);
    assert!(d > 0.0);
    let t = load_transformer(&path, DType::BF16, &Device::Cpu, Some(&cfg)).expect("bf16");
    assert_eq!(t.dtype(), DType::BF16);
    let out = batch_forward(&t, &g);
    assert_eq!(out.dtype(), DType::BF16);
    // Measured 4.8e-2 (1.4 % of max |out|): BF16 activations too.
    assert_close("transformer in BF16", &out, &want, 3e-2);
}

/// The folder's transformer rewritten with the original names (fused qkv, `attention.out`, `q_norm`, …)
/// under `model.diffusion_model.`, in F32, in the system temp folder.
fn original_layout_f32(name: &str) -> std::path::PathBuf {
    let st = candle_core::safetensors::load(folder().join("transformer/diffusion_pytorch_model.safetensors"), &Device::Cpu).expect("weights");
    let mut out = std::collections::HashMap::new();
    for (k, v) in &st {
        if k.contains(".attention.to_k.") || k.contains(".attention.to_v.") {
            continue;
        }
        let n = if k.contains(".attention.to_q.") {
            let parts = ["to_q", "to_k", "to_v"].map(|p| st[&k.replace("to_q", p)].clone());
            out.insert(format!("model.diffusion_model.{}", k.replace("to_q", "qkv")), Tensor::cat(&parts, 0).expect("cat"));
            continue;
        } else {
            k.replace("all_final_layer.2-1.", "final_layer.")
                .replace("all_x_embedder.2-1.", "x_embedder.")
                .replace(".attention.to_out.0.", ".attention.out.")
                .replace(".attention.norm_q.", ".attention.q_norm.")
                .replace(".attention.norm_k.", ".attention.k_norm.")
        };
        out.insert(format!("model.diffusion_model.{n}"), v.clone());
    }
    let path = std::env::temp_dir().join(format!("sd-zimage-{name}-{}.safetensors", std::process::id()));
    candle_core::safetensors::save(&out, &path).expect("save");
    path
}

#[test]
fn original_layout_f32_file_matches() {
    let path = original_layout_f32("f32");
    assert!(sd_zimage::detect::is_zimage(&path));
    let cfg = ZImageConfig::from_file(&folder().join("transformer/config.json")).expect("config");
    let t = load_transformer(&path, DType::F32, &Device::Cpu, Some(&cfg)).expect("f32 file");
    let g = golden("transformer_batch.safetensors");
    assert_close("transformer (original-layout F32 file)", &batch_forward(&t, &g), &golden_batch(&g), COMPONENT_TOL);
    let _ = std::fs::remove_file(&path);
}

/// The whole pipeline loaded in BF16 runs txt2img close to the F32 golden.
#[test]
fn bf16_pipeline_runs() {
    let opts = sd_zimage::ZImageLoadOptions { dtype: Some(DType::BF16), ..Default::default() };
    let m = sd_zimage::load(&folder(), &opts).expect("bf16 load");
    assert_eq!((m.dtype, m.transformer.dtype(), m.text_encoder.dtype()), (DType::BF16, DType::BF16, DType::BF16));
    let g = golden("txt2img_turbo.safetensors");
    let mut queue = NoiseQueue::new([get(&g, "noise")]);
    let out = generate(&m, &params(0.0), &Task::TextToImage, &mut RunContext::default().noise(&mut queue)).expect("txt2img");
    assert_eq!(out.latents.dtype(), DType::F32);
    // Measured 2.9e-2 (0.7 % of max |latents| 4.2): BF16 transformer and text encoder, F32 VAE on the CPU.
    assert_close("BF16 txt2img latents", &out.latents, &get(&g, "latents_final"), 3e-2);
}

#[test]
fn vae_matches_diffusers() {
    let m = models();
    let g = golden("vae.safetensors");
    let cfg = m.vae.config();
    assert_eq!((cfg.scaling_factor, cfg.shift_factor, m.vae_scale_factor()), (0.3611, Some(0.1159), 2));
    let dist = m.vae.encode(&get(&g, "image")).expect("encode");
    assert_close("VAE posterior mean", &dist.mean, &get(&g, "posterior_mean"), COMPONENT_TOL);
    assert_close("VAE posterior logvar", &dist.logvar, &get(&g, "posterior_logvar"), COMPONENT_TOL);
    let decoded = m.vae.decode(&get(&g, "latent_in")).expect("decode");
    assert_close("VAE decode", &decoded, &get(&g, "decoded"), COMPONENT_TOL);
}

#[test]
fn schedules_match_diffusers() {
    let m = models();
    let v = golden_json("schedule.json");
    for c in v["cases"].as_array().expect("cases") {
        let steps = c["steps"].as_u64().expect("steps") as usize;
        let s = FlowMatchEulerScheduler::new(&m.scheduler, steps, 24).expect("schedule");
        let theirs: Vec<f64> = c["sigmas"].as_array().expect("sigmas").iter().map(|x| x.as_f64().expect("f")).collect();
        assert_eq!(s.sigmas().len(), theirs.len());
        for (a, b) in s.sigmas().iter().zip(&theirs) {
            assert!((a - b).abs() < 1e-6, "{steps} steps: {:?} vs {theirs:?}", s.sigmas());
        }
        let ts: Vec<f64> = c["timesteps"].as_array().expect("ts").iter().map(|x| x.as_f64().expect("f")).collect();
        for (a, b) in s.timesteps().iter().zip(&ts) {
            assert!((a - b).abs() < 1e-3, "timesteps {ts:?}");
        }
    }
    // The built-in Turbo config is the fixture's scheduler_config.json.
    assert_eq!(sd_zimage::loader::default_scheduler().sigmas(9, 4096), m.scheduler.sigmas(9, 4096));
}

fn params(guidance: f64) -> ZImageParams {
    ZImageParams {
        seed: 42,
        max_sequence_length: Some(64),
        negative_prompt: "blurry, low quality, watermark, text, extra fingers".into(),
        ..ZImageParams::new("a photo of a cat", 16, 24, 4, guidance)
    }
}

type Steps = Vec<(usize, usize, f64, Tensor)>;

fn run(m: &sd_zimage::ZImageModels, p: &ZImageParams, task: &Task<'_>, queue: &mut NoiseQueue) -> (sd_zimage::ZImageOutput, Steps) {
    let mut steps = Vec::new();
    let mut cb = |s: &StepProgress<'_>| {
        steps.push((s.step, s.total, s.timestep, s.latents.clone()));
        ControlFlow::Continue(())
    };
    let out = generate(m, p, task, &mut RunContext::with_progress(&mut cb).noise(queue)).expect("generate");
    (out, steps)
}

fn check_run(what: &str, out: &sd_zimage::ZImageOutput, steps: &Steps, g: &std::collections::HashMap<String, Tensor>) {
    let ts: Vec<f32> = get(g, "timesteps").to_vec1().expect("ts");
    let golden_steps = get(g, "step_latents");
    assert_eq!(steps.len(), ts.len(), "{what}: steps run");
    for (i, (step, total, t, lat)) in steps.iter().enumerate() {
        assert_eq!((*step, *total), (i + 1, ts.len()));
        assert!((*t as f32 - ts[i]).abs() < 1e-3, "{what} step {step}: timestep {t} vs {}", ts[i]);
        assert_close(&format!("{what} step {step} latents"), lat, &golden_steps.get(i).expect("step"), E2E_TOL);
    }
    assert_close(&format!("{what} final latents"), &out.latents, &get(g, "latents_final"), E2E_TOL);
    assert_close(&format!("{what} image"), &out.images, &get(g, "image"), E2E_TOL);
}

/// Turbo style (guidance 0: one forward per step, the negative prompt unused) and with CFG (guidance 4, a
/// negative prompt whose caption pads to a different length than the prompt's: two groups per step).
#[test]
fn txt2img_matches_diffusers() {
    let m = models();
    for (name, guidance) in [("txt2img_turbo", 0.0), ("txt2img_cfg", 4.0)] {
        let g = golden(&format!("{name}.safetensors"));
        let mut queue = NoiseQueue::new([get(&g, "noise")]);
        let mut p = params(guidance);
        if guidance == 0.0 {
            p.negative_prompt.clear();
        }
        let (out, steps) = run(&m, &p, &Task::TextToImage, &mut queue);
        assert_eq!(queue.remaining(), 0);
        check_run(name, &out, &steps, &g);
        assert_eq!(out.seed, 42);
    }
}

#[test]
fn img2img_matches_diffusers() {
    let m = models();
    let g = golden("img2img_turbo.safetensors");
    let init = ((get(&g, "init_image") * 2.0).expect("x2") - 1.0).expect("-1");
    let mut queue = NoiseQueue::new([get(&g, "posterior_noise"), get(&g, "noise")]);
    let mut p = params(0.0);
    p.negative_prompt.clear();
    let task = Task::ImageToImage(ImageToImage { image: &init, strength: 0.6 });
    let (out, steps) = run(&m, &p, &task, &mut queue);
    assert_eq!(queue.remaining(), 0);
    check_run("img2img", &out, &steps, &g);
}

#[test]
fn inpaint_matches_diffusers() {
    let m = models();
    let g = golden("inpaint_turbo.safetensors");
    let init = ((get(&g, "init_image") * 2.0).expect("x2") - 1.0).expect("-1");
    let mask = get(&g, "mask");
    let mut queue = NoiseQueue::new([get(&g, "posterior_noise"), get(&g, "noise"), get(&g, "masked_posterior_noise")]);
    let mut p = params(0.0);
    p.negative_prompt.clear();
    let task = Task::Inpaint(Inpaint { image: &init, mask: &mask, strength: 0.75 });
    let (out, steps) = run(&m, &p, &task, &mut queue);
    assert_eq!(queue.remaining(), 0, "three draws, as diffusers");
    check_run("inpaint", &out, &steps, &g);
    // Outside the mask the final latents are the clean image latents.
    let mut q = NoiseQueue::new([get(&g, "posterior_noise")]);
    let clean = sd_zimage::pipeline::encode_image(&m, &init, &mut q).expect("encode");
    let keep = (1.0 - mask.upsample_nearest2d(12, 8).expect("resize")).expect("1-m");
    let moved = (out.latents - clean).and_then(|d| d.broadcast_mul(&keep)).and_then(|d| d.abs()).and_then(|d| d.max_all()).expect("diff");
    assert!(moved.to_scalar::<f32>().expect("scalar") < 1e-5, "unmasked latents moved");
}

/// A step callback may replace the latents: zeroing them after the last step decodes the zero latent.
#[test]
fn step_callback_edits_latents() {
    let m = models();
    let mut p = params(0.0);
    p.steps = 2;
    let mut edit = |s: &StepProgress<'_>| -> sd_core::Result<Option<Tensor>> { Ok((s.step == s.total).then(|| s.latents.zeros_like()).transpose()?) };
    let out = generate(&m, &p, &Task::TextToImage, &mut RunContext::default().edit(&mut edit)).expect("txt2img");
    assert_eq!(out.latents.abs().and_then(|t| t.max_all()).and_then(|t| t.to_scalar::<f32>()).expect("max"), 0.0);
    let zero = sd_zimage::pipeline::decode_latents(&m, &out.latents, None).expect("decode");
    assert_close("decode of edited latents", &out.images, &zero, 0.0);
}

#[test]
fn capabilities_detection_and_refusals() {
    let m = models();
    assert_eq!(m.variant, ZImageVariant::Turbo);
    let caps = capabilities(&m);
    assert_eq!(caps.family, sd_core::ModelFamily::ZImage);
    assert_eq!(caps.variant, "z-image-turbo");
    assert_eq!(caps.tasks, vec![TaskKind::TextToImage, TaskKind::ImageToImage, TaskKind::Inpaint]);
    assert_eq!((caps.default_steps, caps.default_guidance, caps.size_multiple), (9, 0.0, 4));
    assert!(caps.negative_prompt && caps.lora && !caps.sampler_choice);
    assert_eq!(caps.sequence_length, Some((480, 480)));
    assert!(sd_zimage::detect::is_zimage(&folder()));
    assert!(sd_zimage::detect::is_zimage(&folder().join("transformer")));
    assert!(!sd_zimage::detect::is_zimage(&fixtures().join("flux/dev")));
    assert!(!sd_zimage::detect::is_zimage(&fixtures().join("sd15.safetensors")));
    assert_eq!(ZImageVariant::from_path("/m/models--Tongyi-MAI--Z-Image/snapshots/x".as_ref()), ZImageVariant::Base);
    assert_eq!(ZImageVariant::from_path("/m/Z-Image-Turbo".as_ref()), ZImageVariant::Turbo);
    // Refusals: a size off the multiple, a task it does not run, a foreign folder.
    let mut p = params(0.0);
    p.width = 18;
    let e = generate(&m, &p, &Task::TextToImage, &mut RunContext::default()).expect_err("size refused");
    assert_eq!(e.field(), Some("width"), "{e}");
    let p = params(0.0);
    let imgs = [Tensor::zeros((1, 3, 24, 16), DType::F32, &Device::Cpu).expect("zeros")];
    let e = generate(&m, &p, &Task::Edit(sd_core::run::Edit { images: &imgs }), &mut RunContext::default()).expect_err("edit refused");
    assert!(e.to_string().contains("edit"), "{e}");
    let e = sd_zimage::load(&fixtures().join("flux/dev"), &Default::default()).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("FLUX") || e.contains("Z-Image"), "{e}");
    let e = load_transformer(&fixtures().join("sd15.safetensors"), DType::F32, &Device::Cpu, None).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("Stable Diffusion"), "{e}");
}

/// A PEFT-named and a kohya-named LoRA (alpha 2, rank 4) at 0.8 and 1.2, as diffusers applies them; merged
/// into the diffusers folder and into the original-layout file (q/k/v updates into rows of the fused qkv).
#[test]
fn loras_match_diffusers() {
    let g = golden("lora.safetensors");
    let loras = [
        sd_zimage::ZImageLora::new(fixtures().join("zimage/lora_peft.safetensors"), 0.8),
        sd_zimage::ZImageLora::new(fixtures().join("zimage/lora_kohya.safetensors"), 1.2),
    ];
    let x = get(&g, "x").squeeze(1).and_then(|x| x.unsqueeze(0)).expect("x");
    let want = get(&g, "out").squeeze(1).and_then(|x| x.unsqueeze(0)).expect("out");
    let opts = sd_zimage::ZImageLoadOptions { loras: loras.to_vec(), ..Default::default() };
    let m = sd_zimage::load(&folder(), &opts).expect("load with LoRAs");
    assert_eq!(m.lora_report.len(), 2);
    assert!(m.lora_report.iter().all(|r| r.unmatched.is_empty()), "{:?}", m.lora_report);
    assert_eq!((m.lora_report[0].applied.len(), m.lora_report[1].applied.len()), (8, 4));
    let out = m.transformer.forward(&x, &get(&g, "t"), &[get(&g, "cap")]).expect("forward");
    assert_close("transformer with LoRAs (folder)", &out, &want, COMPONENT_TOL);
    // The original-layout BF16 file: the same updates, q/k/v landing in the fused qkv rows.
    let cfg = ZImageConfig::from_file(&folder().join("transformer/config.json")).expect("config");
    let path = fixtures().join("zimage/z_image_tiny_bf16.safetensors");
    let (t, reports) = sd_zimage::transformer::load_transformer_with_loras(&path, DType::F32, &Device::Cpu, Some(&cfg), &loras).expect("file with LoRAs");
    assert!(reports.iter().all(|r| r.unmatched.is_empty()));
    let out = t.forward(&x, &get(&g, "t"), &[get(&g, "cap")]).expect("forward");
    // BF16-rounded base weights, as in original_layout_bf16_file_loads_and_runs.
    assert_close("transformer with LoRAs (original-layout BF16 file)", &out, &want, 1.5e-2);
    // The same in F32 (the folder's weights rewritten in the original layout, under a ComfyUI prefix): exact.
    let f32_file = original_layout_f32("lora");
    let (t, _) = sd_zimage::transformer::load_transformer_with_loras(&f32_file, DType::F32, &Device::Cpu, Some(&cfg), &loras).expect("f32 file");
    let out = t.forward(&x, &get(&g, "t"), &[get(&g, "cap")]).expect("forward");
    assert_close("transformer with LoRAs (original-layout F32 file)", &out, &want, COMPONENT_TOL);
    let _ = std::fs::remove_file(&f32_file);
    // A LoRA for something else is refused with what to use.
    let other = sd_zimage::ZImageLora::new(fixtures().join("flux/lora/flux_kohya.safetensors"), 1.0);
    let opts = sd_zimage::ZImageLoadOptions { loras: vec![other], ..Default::default() };
    let e = sd_zimage::load(&folder(), &opts).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("matches no weight"), "{e}");
}

/// Separate component paths: the transformer file in the original layout and an LDM-named
/// `ae.safetensors` (FLUX.1's autoencoder format; here the tiny FLUX fixture's, checked against its golden),
/// with the text encoder and tokenizer of the folder.
#[test]
fn separate_files_load_through_zimage_files() {
    let vae_cfg = sd_models::diffusers::read_vae_config(&fixtures().join("flux/dev/vae/config.json")).expect("vae config");
    let files = sd_zimage::ZImageFiles::with_components_from(
        fixtures().join("zimage/z_image_tiny_bf16.safetensors"),
        Some(fixtures().join("flux/ae.safetensors")),
        &folder(),
    );
    let opts = sd_zimage::ZImageLoadOptions {
        transformer_config: Some(ZImageConfig::from_file(&folder().join("transformer/config.json")).expect("config")),
        vae_config: Some(vae_cfg),
        ..Default::default()
    };
    let m = sd_zimage::load_files(&files, ZImageVariant::Turbo, &opts).expect("separate files");
    let flux_vae = fixtures().join("goldens/flux/vae.safetensors");
    let g = candle_core::safetensors::load(&flux_vae, &Device::Cpu).expect("flux vae golden");
    let decoded = m.vae.decode(&get(&g, "latent_in")).expect("decode");
    assert_close("ae.safetensors decode", &decoded, &get(&g, "decoded"), COMPONENT_TOL);
    let mut p = params(0.0);
    p.steps = 1;
    let out = generate(&m, &p, &Task::TextToImage, &mut RunContext::default()).expect("txt2img");
    assert_eq!(out.images.dims(), &[1, 3, 24, 16]);
}

/// ComfyUI's stand-alone Qwen3 file (`qwen_3_*.safetensors`: `Qwen3ForCausalLM` names under `model.` with an
/// `lm_head.weight`) beside the transformer file is the text encoder; its architecture comes from its shapes.
#[test]
fn standalone_qwen3_file_beside_the_transformer_is_the_text_encoder() {
    let transformer = fixtures().join("zimage/z_image_tiny_bf16.safetensors");
    let files = sd_zimage::ZImageFiles::with_components_from(&transformer, None, &folder());
    assert_eq!(files.text_encoder, fixtures().join("zimage/qwen_3_tiny.safetensors"));
    let te = sd_zimage::text::load_text_encoder(&files.text_encoder, DType::F32, &Device::Cpu).expect("qwen file");
    let m = models();
    assert_eq!(te.config().hidden_size, m.text_encoder.config().hidden_size);
    let g = golden("prompt_embeds.safetensors");
    let meta = golden_json("prompt_embeds.json");
    let prompt = meta["prompts"][0].as_str().expect("prompt");
    let e = sd_zimage::text::encode_prompt(&te, &m.tokenizer, prompt, 64).expect("encode");
    assert_close("prompt_embeds from the Qwen3 file", &e, &get(&g, "prompt_embeds_0"), COMPONENT_TOL);
    let opts = sd_zimage::ZImageLoadOptions { transformer_config: Some(ZImageConfig::from_file(&folder().join("transformer/config.json")).expect("config")), ..Default::default() };
    let loaded = sd_zimage::load_files(&files, ZImageVariant::Turbo, &opts).expect("files");
    assert_eq!(loaded.text_encoder.config(), te.config());
    // A file that is no Qwen3 encoder says so.
    let e = sd_zimage::text::load_text_encoder(&transformer, DType::F32, &Device::Cpu).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("Qwen3"), "{e}");
}
