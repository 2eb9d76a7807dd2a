//! LoRA-merged tiny models against diffusers `load_lora_weights` + `fuse_lora` (tools/lora_fixtures.py).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sd_lora::{LoraFormat, LoraSet};
use sd_models::loader::{load, read_folder_config, LoadOptions, StableDiffusionModels};
use sd_models::unet::{AddedCond, UNetConditioning};
use sd_pipelines::pipeline::{generate, RunContext, SdExtras, Task};
use sd_pipelines::schedulers::{NoiseQueue, Sampler};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn fixtures() -> PathBuf {
    std::env::var_os("SD_FIXTURES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures"))
}

fn lora(name: &str) -> String {
    fixtures().join("lora").join(format!("{name}.safetensors")).display().to_string()
}

fn golden(name: &str) -> HashMap<String, Tensor> {
    let p = fixtures().join("goldens/lora").join(format!("{name}.safetensors"));
    candle_core::safetensors::load(&p, &Device::Cpu).unwrap_or_else(|e| panic!("golden {}: {e}", p.display()))
}

/// Loads `model` (a folder, or a single file configured from the matching folder) with the LoRAs.
fn load_with(
    model: &str,
    loras: &[(String, f32)],
) -> Result<(StableDiffusionModels, LoraSet), Box<dyn std::error::Error>> {
    let mut set = LoraSet::new();
    for (path, strength) in loras {
        set.add_file(path, *strength)?;
    }
    let path = fixtures().join(model);
    let config = match model.strip_suffix(".safetensors") {
        Some(folder) => Some(read_folder_config(&fixtures().join(folder), None)?),
        None => None,
    };
    let hook = (!set.is_empty()).then(|| set.backend_hook());
    let opts = LoadOptions { config, backend_hook: hook, ..LoadOptions::default() };
    Ok((load(&path, &opts)?, set))
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs().and_then(|t| t.flatten_all()).and_then(|t| t.max(0)).and_then(|t| t.to_scalar::<f32>()).unwrap_or(f32::NAN)
}

/// max|ours − golden| ≤ tol · max(1, max|golden|).
fn assert_close(what: &str, ours: &Tensor, golden: &Tensor, tol: f32) {
    assert_eq!(ours.dims(), golden.dims(), "{what}: shape");
    let ours = ours.to_dtype(DType::F32).expect("f32");
    let diff = max_abs(&(&ours - golden).expect("same shape"));
    let scale = max_abs(golden).max(1.0);
    assert!(diff <= tol * scale, "{what}: max diff {diff} > {tol} × {scale}");
}

/// UNet output, first encoder's last hidden state and (SDXL) the second encoder's outputs.
fn component_outputs(
    m: &StableDiffusionModels,
    g: &HashMap<String, Tensor>,
) -> Result<Vec<(&'static str, Tensor)>, Box<dyn std::error::Error>> {
    let t = g["timestep"].to_vec1::<f32>()?[0] as f64;
    let cond = UNetConditioning {
        added: g.get("text_embeds").map(|te| AddedCond { text_embeds: te.clone(), time_ids: g["time_ids"].clone() }),
        ..UNetConditioning::default()
    };
    let mut out = vec![
        ("unet_out", m.unet.forward(&g["sample"], t, &g["encoder_hidden_states"], &cond)?),
        ("te_last_hidden_state", m.text_encoder.forward(&g["input_ids"])?.last_hidden_state),
    ];
    if let Some(te2) = &m.text_encoder_2 {
        let o = te2.forward(&g["te2_input_ids"])?;
        out.push(("te2_last_hidden_state", o.last_hidden_state));
        if let Some(e) = o.text_embeds {
            out.push(("te2_text_embeds", e));
        }
    }
    Ok(out)
}

fn check_against_golden(model: &str, file: &str, golden_name: &str, strength: f32) -> TestResult {
    let g = golden(golden_name);
    let (m, set) = load_with(model, &[(lora(file), strength)])?;
    let outs = component_outputs(&m, &g)?;
    assert_eq!(outs.len(), if m.text_encoder_2.is_some() { 4 } else { 2 });
    for (name, t) in outs {
        assert_close(&format!("{model} + {file}: {name}"), &t, &g[name], 1e-4);
    }
    let report = set.report();
    let a = &report.adapters[0];
    let total = set.adapters().next().map(|(a, _)| a.modules().len()).unwrap_or(0);
    assert!(a.unmatched.is_empty(), "{file} on {model}: unmatched {:?}", &a.unmatched[..a.unmatched.len().min(5)]);
    assert_eq!(a.applied.len(), total, "{file} on {model}: every module merged once");
    Ok(())
}

#[test]
fn sd15_kohya_both_namings_folder_and_single_file() -> TestResult {
    for model in ["sd15", "sd15.safetensors"] {
        for file in ["sd15_kohya", "sd15_kohya_ldm"] {
            check_against_golden(model, file, "sd15_kohya", 0.8)?;
        }
    }
    Ok(())
}

#[test]
fn sd15_peft_and_legacy_diffusers_negative_strength() -> TestResult {
    for model in ["sd15", "sd15.safetensors"] {
        for file in ["sd15_peft", "sd15_diffusers_old"] {
            check_against_golden(model, file, "sd15_peft", -0.6)?;
        }
    }
    Ok(())
}

#[test]
fn sd2_linear_projections_and_openclip_single_file() -> TestResult {
    // The SD2 single file stores the text encoder as OpenCLIP with fused q/k/v (and one extra block).
    for model in ["sd2", "sd2.safetensors"] {
        for file in ["sd2_kohya", "sd2_kohya_ldm"] {
            check_against_golden(model, file, "sd2_kohya", 0.8)?;
        }
        check_against_golden(model, "sd2_peft", "sd2_peft", -0.6)?;
    }
    Ok(())
}

#[test]
fn sdxl_kohya_both_namings_folder_and_single_file() -> TestResult {
    // The single file stores the second encoder as OpenCLIP with fused q/k/v.
    for model in ["sdxl", "sdxl.safetensors"] {
        for file in ["sdxl_kohya_ldm", "sdxl_kohya"] {
            check_against_golden(model, file, "sdxl_kohya", 0.8)?;
        }
    }
    Ok(())
}

#[test]
fn sdxl_peft_folder_and_single_file() -> TestResult {
    for model in ["sdxl", "sdxl.safetensors"] {
        check_against_golden(model, "sdxl_peft", "sdxl_peft", -0.6)?;
    }
    Ok(())
}

#[test]
fn lycoris_loha_and_lokr_match_peft() -> TestResult {
    for model in ["sd15", "sd15.safetensors"] {
        check_against_golden(model, "sd15_loha", "sd15_loha", 0.7)?;
        check_against_golden(model, "sd15_lokr", "sd15_lokr", -0.8)?;
    }
    let a = sd_lora::LoraAdapter::open(lora("sd15_lokr"))?;
    assert!(a.modules().iter().all(|m| m.kind == sd_lora::AdapterKind::LoKr));
    Ok(())
}

#[test]
fn strength_zero_is_the_base_model_exactly() -> TestResult {
    let g = golden("sd15_kohya");
    let (base, _) = load_with("sd15", &[])?;
    let (zero, set) = load_with("sd15", &[(lora("sd15_kohya"), 0.0), (lora("sd15_peft"), 0.0)])?;
    for ((name, a), (_, b)) in component_outputs(&base, &g)?.into_iter().zip(component_outputs(&zero, &g)?) {
        let diff = max_abs(&(&a - &b)?);
        assert!(diff == 0.0, "{name}: strength 0 changed the output by {diff}");
    }
    assert!(set.report().adapters.iter().all(|a| a.unmatched.is_empty()));
    // And a non-zero strength does change it, so the comparison above can fail.
    let (one, _) = load_with("sd15", &[(lora("sd15_kohya"), 0.8)])?;
    let a = &component_outputs(&base, &g)?[0].1;
    let b = &component_outputs(&one, &g)?[0].1;
    assert!(max_abs(&(a - b)?) > 1e-2);
    Ok(())
}

#[test]
fn f16_weights_merge_in_f32_then_cast() -> TestResult {
    // F16 runs on the CPU only slowly; compare one merged weight instead of a full forward pass.
    let mut set = LoraSet::new();
    set.add_file(lora("sd15_kohya"), 0.8)?;
    let (m32, _) = load_with("sd15", &[(lora("sd15_kohya"), 0.8)])?;
    let opts =
        LoadOptions { dtype: Some(DType::F16), backend_hook: Some(set.backend_hook()), ..LoadOptions::default() };
    let m16 = load(&fixtures().join("sd15"), &opts)?;
    assert_eq!(m16.dtype, DType::F16);
    let g = golden("sd15_kohya");
    let ids = &g["input_ids"];
    let a = m32.text_encoder.forward(ids)?.last_hidden_state;
    let b = m16.text_encoder.forward(ids)?.last_hidden_state.to_dtype(DType::F32)?;
    assert_close("f16 text encoder with LoRA", &b, &a, 2e-2);
    Ok(())
}

#[test]
fn metadata_and_formats_are_read() -> TestResult {
    let a = sd_lora::LoraAdapter::open(lora("sdxl_kohya_ldm"))?;
    assert_eq!(a.format(), LoraFormat::Kohya);
    assert_eq!(a.metadata().network_dim, Some(4));
    assert_eq!(a.metadata().network_alpha, Some(1.0));
    assert_eq!(a.metadata().base_model_version.as_deref(), Some("sdxl_base_v1-0"));
    assert_eq!(a.likely_family().as_deref(), Some("SDXL"));
    assert!(a.modules().iter().any(|m| m.key.starts_with("lora_unet_input_blocks_4_1_")));
    assert!(a.modules().iter().any(|m| m.down_shape.len() == 4 && m.down_shape[2] == 3), "3×3 conv LoRAs present");
    assert_eq!(sd_lora::LoraAdapter::open(lora("sd15_peft"))?.format(), LoraFormat::Peft);
    assert_eq!(sd_lora::LoraAdapter::open(lora("sd15_diffusers_old"))?.format(), LoraFormat::DiffusersLegacy);
    let p = sd_lora::LoraAdapter::open(lora("sd15_peft"))?;
    assert!(p.modules().iter().all(|m| m.alpha.is_none() && m.scale() == 1.0), "PEFT without alpha: alpha = rank");
    Ok(())
}

#[test]
fn txt2img_with_two_loras_matches_diffusers() -> TestResult {
    let dir = fixtures().join("goldens/lora");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("sd15_txt2img_two_loras.json"))?)?;
    let g = golden("sd15_txt2img_two_loras");
    let loras: Vec<(String, f32)> = meta["loras"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|l| {
                    (
                        fixtures().join("lora").join(l[0].as_str().unwrap_or_default()).display().to_string(),
                        l[1].as_f64().unwrap_or(0.0) as f32,
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(loras.len(), 2);
    let (m, set) = load_with("sd15", &loras)?;
    assert_eq!(set.report().adapters.len(), 2);
    let n = meta["draws"].as_u64().unwrap_or(0) as usize;
    let mut noise = NoiseQueue::new((0..n).map(|i| g[&format!("draw_{i}")].clone()));
    // Start from the model defaults so fields added to GenerationParams later keep their defaults.
    let mut p = sd_pipelines::pipeline::default_params(&m, meta["prompt"].as_str().unwrap_or_default());
    p.negative_prompt = meta["negative_prompt"].as_str().unwrap_or_default().into();
    p.width = meta["width"].as_u64().unwrap_or(0) as usize;
    p.height = meta["height"].as_u64().unwrap_or(0) as usize;
    p.steps = meta["steps"].as_u64().unwrap_or(0) as usize;
    p.guidance_scale = meta["guidance_scale"].as_f64().unwrap_or(0.0);
    p.seed = meta["seed"].as_u64().unwrap_or(0);
    p.batch_size = 1;
    p.sampler = meta["sampler"].as_str().unwrap_or_default().parse::<Sampler>()?;
    p.clip_skip = 1;
    p.vae_tiling = Some(false);
    let out = generate(&m, &p, &Task::TextToImage, &mut RunContext::default().noise(&mut noise), SdExtras::default())?;
    assert_eq!(noise.remaining(), 0, "every diffusers draw is used");
    assert_close("latents", &out.latents, &g["latents"], 1e-3);
    assert_close("image", &out.images, &g["image"], 1e-3);
    Ok(())
}
