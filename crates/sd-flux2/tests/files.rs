//! sd-flux2 from the files people download, against diffusers 0.42.1 (`tools/flux2_fixtures.py`): BFL's single
//! transformer file, ComfyUI's split files (bf16 and fp8-scaled diffusion model, stand-alone Qwen3, the VAE in
//! BFL's names), PEFT / kohya / ai-toolkit LoRAs, and clear refusals of files for other models.

mod common;

use std::ops::ControlFlow;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixtures, folder, get, golden, golden_json};
use sd_core::run::{RunContext, StepProgress, Task};
use sd_core::schedulers::NoiseQueue;
use sd_flux2::loader::{load_transformer_with_loras, Part};
use sd_flux2::model::{latent_ids, text_ids};
use sd_flux2::pipeline::{generate, Flux2Params};
use sd_flux2::vae::pack;
use sd_flux2::{load, Flux2Files, Flux2LoadOptions, Flux2Lora, Flux2Transformer, Flux2Variant};

const COMPONENT_TOL: f32 = 1e-4;
const E2E_TOL: f32 = 5e-4;

fn bfl_file() -> PathBuf {
    fixtures().join("flux2/flux-2-klein-base-tiny.safetensors")
}

fn comfy(sub: &str) -> PathBuf {
    fixtures().join("flux2/comfy").join(sub)
}

fn lora(name: &str) -> PathBuf {
    fixtures().join("flux2/lora").join(name)
}

fn file(path: PathBuf, prefix: &str) -> Part {
    Part::File { path, prefix: prefix.into() }
}

fn transformer(part: &Part, loras: &[Flux2Lora]) -> Flux2Transformer {
    load_transformer_with_loras(part, None, DType::F32, &Device::Cpu, loras).unwrap_or_else(|e| panic!("{}: {e}", part.path().display())).0
}

/// The transformer's output on the inputs of `transformer.safetensors`.
fn forward(t: &Flux2Transformer) -> Tensor {
    let g = golden("transformer.safetensors");
    t.forward(&get(&g, "x"), &latent_ids(6, 4), &get(&g, "txt"), &text_ids(10), &get(&g, "t")).expect("forward")
}

#[test]
fn bfl_single_file_matches_the_folder() {
    let folder_t = sd_flux2::loader::load_transformer(&folder().join("transformer"), DType::F32, &Device::Cpu).expect("folder");
    // No config: the architecture is read off the shapes.
    let t = transformer(&file(bfl_file(), ""), &[]);
    let (a, b) = (t.config(), folder_t.config());
    assert_eq!(
        (a.num_layers, a.num_single_layers, a.inner_dim(), a.attention_head_dim, a.joint_attention_dim, a.in_channels, a.out_channels(), &a.axes_dims_rope, a.mlp_hidden()),
        (b.num_layers, b.num_single_layers, b.inner_dim(), b.attention_head_dim, b.joint_attention_dim, b.in_channels, b.out_channels(), &b.axes_dims_rope, b.mlp_hidden())
    );
    assert_close("BFL single file", &forward(&t), &get(&golden("transformer.safetensors"), "out"), COMPONENT_TOL);
    assert!(sd_flux2::detect::is_flux2(&bfl_file()));
}

#[test]
fn comfy_diffusion_models_match_diffusers() {
    let g = golden("transformer_comfy.safetensors");
    let prefix = "model.diffusion_model.";
    let bf16 = transformer(&file(comfy("diffusion_models/flux-2-klein-base-tiny.safetensors"), prefix), &[]);
    assert_close("ComfyUI bf16 file", &forward(&bf16), &get(&g, "out_bf16"), COMPONENT_TOL);
    let fp8 = transformer(&file(comfy("diffusion_models/flux-2-klein-base-tiny-fp8-scaled.safetensors"), prefix), &[]);
    assert_close("ComfyUI fp8-scaled file", &forward(&fp8), &get(&g, "out_fp8_scaled"), COMPONENT_TOL);
    assert!(sd_flux2::detect::is_flux2(&comfy("diffusion_models/flux-2-klein-base-tiny-fp8-scaled.safetensors")));
}

/// ComfyUI's newer quantized files (`comfy_quant`): a float8 weight beside `<layer>.weight_scale` and a
/// `<layer>.comfy_quant` record naming the format. Written here from the fp8-scaled fixture (the same float8
/// values and scales under the newer names), so diffusers' golden for that file holds; a format the loader
/// cannot dequantize is refused by name.
#[test]
fn comfy_quant_float8_files_match_diffusers() {
    let dev = Device::Cpu;
    let src = comfy("diffusion_models/flux-2-klein-base-tiny-fp8-scaled.safetensors");
    let tensors = candle_core::safetensors::load(&src, &dev).expect("fp8-scaled fixture");
    let write = |format: &str, file: &str| {
        let record = format!("{{\"format\": \"{format}\"}}").into_bytes();
        let mut out = std::collections::HashMap::new();
        for (name, t) in &tensors {
            if let Some(stem) = name.strip_suffix(".scale_weight") {
                out.insert(format!("{stem}.weight_scale"), t.clone());
                out.insert(format!("{stem}.comfy_quant"), Tensor::new(record.as_slice(), &dev).expect("record"));
            } else if !name.ends_with("scaled_fp8") {
                out.insert(name.clone(), t.clone());
            }
        }
        assert!(out.keys().any(|k| k.ends_with(".comfy_quant")), "the fixture has no scale_weight tensors");
        let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(file);
        candle_core::safetensors::save(&out, &path).expect("save");
        path
    };
    let path = write("float8_e4m3fn", "flux2-comfy-quant-fp8.safetensors");
    let t = transformer(&file(path.clone(), "model.diffusion_model."), &[]);
    assert_close("ComfyUI comfy_quant float8 file", &forward(&t), &get(&golden("transformer_comfy.safetensors"), "out_fp8_scaled"), COMPONENT_TOL);
    let _ = std::fs::remove_file(path);

    let path = write("nvfp4", "flux2-comfy-quant-nvfp4.safetensors");
    let refused = load_transformer_with_loras(&file(path.clone(), "model.diffusion_model."), None, DType::F32, &dev, &[]);
    let _ = std::fs::remove_file(path);
    let Err(err) = refused else { panic!("an nvfp4 comfy_quant file should be refused") };
    assert!(err.to_string().contains("nvfp4"), "{err}");
}

#[test]
fn split_files_run_txt2img() {
    let model = comfy("diffusion_models/flux-2-klein-base-tiny.safetensors");
    let files = Flux2Files::single_file(&model, Some(&folder())).expect("files");
    assert_eq!(files.transformer, file(model.clone(), "model.diffusion_model."));
    assert_eq!(files.text_encoder, file(comfy("text_encoders/qwen_3_tiny.safetensors"), ""));
    assert_eq!(files.vae, file(comfy("vae/flux2-vae.safetensors"), ""));
    assert_eq!((files.tokenizer.clone(), files.variant), (folder().join("tokenizer"), Flux2Variant::KleinBase));
    let m = load(&model, &Flux2LoadOptions { components: Some(folder()), ..Default::default() }).expect("split files");
    let g = golden("split_txt2img.safetensors");
    let meta = golden_json("split_txt2img.json");
    let e = sd_flux2::text::encode_prompt(&m.text_encoder, &m.tokenizer, "a photo of a cat", 64, &m.text_layers).expect("encode");
    assert_close("split Qwen3 file: prompt embeddings", &e, &get(&g, "prompt_embeds"), COMPONENT_TOL);
    // The stand-alone Qwen3 file without any config.json: its architecture from the shapes.
    let te = sd_flux2::text::load_text_encoder(&Part::of(comfy("text_encoders/qwen_3_tiny.safetensors")), None, &m.text_layers, DType::F32, &Device::Cpu).expect("qwen file");
    let e = sd_flux2::text::encode_prompt(&te, &m.tokenizer, "a photo of a cat", 64, &m.text_layers).expect("encode");
    assert_close("Qwen3 file, config from shapes", &e, &get(&g, "prompt_embeds"), COMPONENT_TOL);

    let mut steps = Vec::new();
    let mut cb = |s: &StepProgress<'_>| {
        steps.push(s.latents.clone());
        ControlFlow::Continue(())
    };
    let mut queue = NoiseQueue::new([get(&g, "noise")]);
    let p = Flux2Params { max_sequence_length: Some(64), ..Flux2Params::new("a photo of a cat", 16, 24, 3, 4.0) };
    let out = generate(&m, &p, &Task::TextToImage, &mut RunContext::with_progress(&mut cb).noise(&mut queue)).expect("generate");
    let golden_steps = get(&g, "step_latents");
    assert_eq!(steps.len(), golden_steps.dim(0).expect("steps"));
    for (i, lat) in steps.iter().enumerate() {
        assert_close(&format!("split files step {} latents", i + 1), &pack(lat).expect("pack"), &golden_steps.get(i).expect("step"), E2E_TOL);
    }
    assert_close("split files final latents", &out.latents, &get(&g, "latents_final"), E2E_TOL);
    assert_close("split files image", &out.images, &get(&g, "image"), E2E_TOL);
    assert_eq!(meta["guidance_scale"].as_f64(), Some(4.0));
}

#[test]
fn loras_match_diffusers() {
    let g = golden("lora.safetensors");
    let folder_part = Part::Folder(folder().join("transformer"));
    let bfl = file(bfl_file(), "");
    let cases: [(&str, &Part, Vec<Flux2Lora>); 6] = [
        ("out_peft_1.0", &folder_part, vec![Flux2Lora::new(lora("flux2_peft.safetensors"), 1.0)]),
        ("out_peft_1.0", &bfl, vec![Flux2Lora::new(lora("flux2_peft.safetensors"), 1.0)]),
        ("out_kohya_0.8", &folder_part, vec![Flux2Lora::new(lora("flux2_kohya.safetensors"), 0.8)]),
        ("out_kohya_0.8", &bfl, vec![Flux2Lora::new(lora("flux2_kohya.safetensors"), 0.8)]),
        ("out_aitk_1.0", &folder_part, vec![Flux2Lora::new(lora("flux2_aitk.safetensors"), 1.0)]),
        (
            "out_peft_0.6_kohya_-0.5",
            &bfl,
            vec![Flux2Lora::new(lora("flux2_peft.safetensors"), 0.6), Flux2Lora::new(lora("flux2_kohya.safetensors"), -0.5)],
        ),
    ];
    for (name, part, loras) in cases {
        let (t, reports) = load_transformer_with_loras(part, None, DType::F32, &Device::Cpu, &loras).expect("load with LoRAs");
        assert!(reports.iter().all(|r| r.unmatched.is_empty() && !r.applied.is_empty()), "{name}: {reports:?}");
        assert_close(&format!("{name} on {}", part.path().display()), &forward(&t), &get(&g, name), COMPONENT_TOL);
    }
    // Through the pipeline loader too.
    let m = load(&folder(), &Flux2LoadOptions { loras: vec![Flux2Lora::new(lora("flux2_kohya.safetensors"), 0.8)], ..Default::default() }).expect("load");
    assert_eq!(m.lora_report.len(), 1);
    assert_close("kohya through load", &forward(&m.transformer), &get(&g, "out_kohya_0.8"), COMPONENT_TOL);
}

fn load_err(path: PathBuf, opts: &Flux2LoadOptions) -> String {
    match load(&path, opts) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn wrong_files_are_refused_clearly() {
    let comps = Flux2LoadOptions { components: Some(folder()), ..Default::default() };
    let flux1 = fixtures().join("flux/flux-tiny-dev.safetensors");
    assert!(!sd_flux2::detect::is_flux2(&flux1));
    let e = load_err(flux1, &comps);
    assert!(e.contains("FLUX.1"), "{e}");
    let e = load_err(comfy("text_encoders/qwen_3_tiny.safetensors"), &comps);
    assert!(e.contains("text encoder"), "{e}");
    let e = load_err(comfy("vae/flux2-vae.safetensors"), &comps);
    assert!(e.contains("autoencoder"), "{e}");
    let e = load_err(fixtures().join("sd3/lora/sd3_kohya.safetensors"), &comps);
    assert!(e.contains("LoRA"), "{e}");
    // Without a components folder the tokenizer is missing: say where to get it.
    let e = load_err(comfy("diffusion_models/flux-2-klein-base-tiny.safetensors"), &Flux2LoadOptions::default());
    assert!(e.contains("tokenizer") && e.contains("--model-config"), "{e}");
    // LoRAs for other models match nothing and say what they are for.
    for (path, what) in [("sd3/lora/sd3_kohya.safetensors", "SD3"), ("flux/lora/flux_kohya.safetensors", "Flux/SD3"), ("zimage/lora_peft.safetensors", "Z-Image")] {
        let l = vec![Flux2Lora::new(fixtures().join(path), 1.0)];
        let e = load_transformer_with_loras(&file(bfl_file(), ""), None, DType::F32, &Device::Cpu, &l).err().map(|e| e.to_string()).unwrap_or_default();
        eprintln!("{path}: {e}");
        assert!(e.contains(what) && e.contains("FLUX.2"), "{path}: {e}");
    }
    // A FLUX.1 VAE has no batch-norm statistics.
    let e = sd_flux2::vae::load_vae(&Part::of(fixtures().join("flux/ae.safetensors")), None, DType::F32, &Device::Cpu).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("latent channels") || e.contains("bn.running_mean"), "{e}");
}
