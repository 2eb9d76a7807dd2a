//! Loading every fixture through every path, and proof that the single-file key map is exact:
//! each tensor of each diffusers folder equals the tensor the single-file backend serves under
//! the same name.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use sd_models::keymap::{Component, KeyMap};
use sd_models::loader::{self, CheckpointFormat, LoadOptions};
use sd_models::single_file::{SingleFile, SingleFileBackend};
use sd_models::unet::{AddedCond, UNetConditioning};
use sd_models::{ModelConfig, ModelFamily, SdVariant};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures").join(name)
}

/// The config of the tiny model stored in a single file, read from its diffusers twin.
fn tiny_config(single_file: &str) -> ModelConfig {
    let (folder, inpaint_xl) = match single_file {
        "sd15.safetensors" | "sd15-fp16.safetensors" => ("sd15", false),
        "sd15-inpaint.safetensors" => ("sd15-inpaint", false),
        "sd2.safetensors" => ("sd2", false),
        "sdxl.safetensors" => ("sdxl", false),
        "sdxl-inpaint.safetensors" => ("sdxl", true),
        other => panic!("no folder twin for {other}"),
    };
    let mut cfg = loader::read_folder_config(&fixture(folder), None).expect("fixture config");
    if inpaint_xl {
        cfg.unet.in_channels = 9;
        cfg.variant = SdVariant::XlInpaint;
    }
    cfg
}

const FOLDERS: [(&str, SdVariant); 4] = [
    ("sd15", SdVariant::V1_5),
    ("sd15-inpaint", SdVariant::V1_5Inpaint),
    ("sd2", SdVariant::V2_1),
    ("sdxl", SdVariant::Xl),
];

const FILES: [(&str, SdVariant); 6] = [
    ("sd15.safetensors", SdVariant::V1_5),
    ("sd15-fp16.safetensors", SdVariant::V1_5),
    ("sd15-inpaint.safetensors", SdVariant::V1_5Inpaint),
    ("sd2.safetensors", SdVariant::V2_1),
    ("sdxl.safetensors", SdVariant::Xl),
    ("sdxl-inpaint.safetensors", SdVariant::XlInpaint),
];

#[test]
fn every_folder_loads() {
    for (name, variant) in FOLDERS {
        let m = loader::load(&fixture(name), &LoadOptions::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(m.config.variant, variant, "{name}");
        assert_eq!(m.dtype, DType::F32);
        assert_eq!(m.vae_dtype, DType::F32);
        assert_eq!(m.text_encoder_2.is_some(), variant.family() == ModelFamily::Sdxl, "{name}");
        assert_eq!(m.tokenizer_2.is_some(), variant.family() == ModelFamily::Sdxl, "{name}");
        // Folder configs drive the defaults: tiny UNet sample_size 16 × VAE factor 2.
        assert_eq!(m.config.default_width, 32, "{name}");
    }
    let sd2 = loader::load(&fixture("sd2"), &LoadOptions::default()).expect("sd2");
    assert_eq!(sd2.config.prediction_type(), sd_models::PredictionType::VPrediction);
    assert_eq!(sd2.tokenizer.pad_id(), sd2.tokenizer.encode("!").expect("encode")[1]);
}

#[test]
fn every_single_file_loads() {
    for (name, variant) in FILES {
        let opts = LoadOptions { config: Some(tiny_config(name)), ..LoadOptions::default() };
        let m = loader::load(&fixture(name), &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(m.config.variant, variant, "{name}");
        assert_eq!(m.config.is_inpaint(), variant.is_inpaint(), "{name}");
        assert_eq!(m.text_encoder_2.is_some(), variant.family() == ModelFamily::Sdxl, "{name}");
    }
}

#[test]
fn f16_keeps_upcast_vaes_in_f32() {
    let opts = LoadOptions { dtype: Some(DType::F16), ..LoadOptions::default() };
    let xl = loader::load(&fixture("sdxl"), &opts).expect("sdxl f16");
    assert_eq!((xl.dtype, xl.vae_dtype, xl.config.vae.force_upcast), (DType::F16, DType::F32, true));
    let sd = loader::load(&fixture("sd15"), &opts).expect("sd15 f16");
    assert_eq!(sd.vae_dtype, if sd.config.vae.force_upcast { DType::F32 } else { DType::F16 });
}

#[test]
fn detection_of_every_fixture() {
    for (name, variant) in FOLDERS {
        let info = loader::inspect(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(info.detection.variant, variant, "{name}");
        assert_eq!(info.format, CheckpointFormat::DiffusersFolder);
        assert_eq!(info.dtype, Some(DType::F32));
        let expected = if variant.family() == ModelFamily::Sdxl { 4 } else { 3 };
        assert_eq!(info.components.len(), expected, "{name}");
        assert!(info.components.iter().all(|c| c.parameters > 0 && c.tensors > 0), "{name}: {:?}", info.components);
    }
    for (name, variant) in FILES {
        let info = loader::inspect(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(info.detection.variant, variant, "{name}: {}", info.detection.evidence);
        assert_eq!(info.format, CheckpointFormat::SingleFile);
        assert_eq!(info.detection.in_channels, if variant.is_inpaint() { 9 } else { 4 }, "{name}");
        let dtype = if name.contains("fp16") { DType::F16 } else { DType::F32 };
        assert_eq!(info.dtype, Some(dtype), "{name}");
        let expected = if variant.family() == ModelFamily::Sdxl { 4 } else { 3 };
        assert_eq!(info.components.len(), expected, "{name}: {:?}", info.components);
    }
    // Single file and folder hold the same UNet, so the same parameter count.
    let count = |p: &str| {
        let info = loader::inspect(&fixture(p)).expect("inspect");
        info.components.iter().find(|c| c.component == Component::Unet).map(|c| c.parameters)
    };
    assert_eq!(count("sd15"), count("sd15.safetensors"));
    assert_eq!(count("sdxl"), count("sdxl.safetensors"));
}

/// Compares every tensor of `folder`'s components with what the single-file backend serves.
fn compare_folder_with_file(folder: &str, file: &str) -> usize {
    let cfg = tiny_config(file);
    let sf = Arc::new(SingleFile::open(&fixture(file)).expect("open single file"));
    let keymap = Arc::new(KeyMap::new(cfg.variant.family(), &cfg.unet, &cfg.vae));
    let fp16 = file.contains("fp16");
    let dev = Device::Cpu;
    let mut compared = 0;
    for c in Component::ALL {
        let path = fixture(folder).join(c.folder());
        if !path.is_dir() {
            continue;
        }
        let weights = ["diffusion_pytorch_model.safetensors", "model.safetensors"]
            .iter()
            .map(|f| path.join(f))
            .find(|p| p.is_file())
            .unwrap_or_else(|| panic!("no weights in {}", path.display()));
        // SAFETY: fixture files are not modified while the test runs.
        let st = unsafe { MmapedSafetensors::new(&weights) }.expect("folder weights");
        let backend = SingleFileBackend::new(sf.clone(), c, keymap.clone());
        for (name, view) in st.tensors() {
            let want = st.load(&name, &dev).expect("folder tensor");
            let want = if fp16 { want.to_dtype(DType::F16).expect("f16") } else { want };
            let want = want.to_dtype(DType::F32).expect("f32");
            let shape = candle_core::Shape::from(view.shape().to_vec());
            let got = backend
                .fetch(&name, Some(&shape), DType::F32, &dev)
                .unwrap_or_else(|e| panic!("{folder} vs {file}: {c}/{name}: {e}"));
            assert_eq!(got.dims(), want.dims(), "{c}/{name}");
            let diff = (got - &want)
                .and_then(|d| d.abs())
                .and_then(|d| d.flatten_all())
                .and_then(|d| d.max(0))
                .and_then(|d| d.to_scalar::<f32>())
                .expect("diff");
            assert_eq!(diff, 0.0, "{folder} vs {file}: {c}/{name} differs by {diff}");
            compared += 1;
        }
    }
    // The other direction: every single-file tensor is used, except the known leftovers.
    let folder_names: std::collections::HashSet<(Component, String)> = Component::ALL
        .iter()
        .flat_map(|c| {
            let path = fixture(folder).join(c.folder());
            ["diffusion_pytorch_model.safetensors", "model.safetensors"]
                .iter()
                .map(move |f| (*c, path.join(f)))
                .filter(|(_, p)| p.is_file())
                .collect::<Vec<_>>()
        })
        .flat_map(|(c, p)| {
            // SAFETY: as above.
            let st = unsafe { MmapedSafetensors::new(&p) }.expect("folder weights");
            st.tensors().into_iter().map(move |(n, _)| (c, n)).collect::<Vec<_>>()
        })
        .collect();
    for t in sf.tensors() {
        // SD 2 files carry OpenCLIP's last layer (unused by SD 2) and its projection.
        let ignorable = t.name.starts_with("cond_stage_model.model.transformer.resblocks.3.")
            || t.name == "cond_stage_model.model.text_projection"
            || t.name.ends_with("position_ids")
            || t.name.ends_with("logit_scale");
        let mapped = keymap.from_ldm(&t.name);
        if ignorable {
            continue;
        }
        assert!(!mapped.is_empty(), "{file}: {} has no diffusers name", t.name);
        for m in mapped {
            assert!(folder_names.contains(&m), "{file}: {} maps to {m:?}, absent from {folder}", t.name);
        }
    }
    compared
}

#[test]
fn single_file_tensors_equal_folder_tensors() {
    for (folder, file) in [
        ("sd15", "sd15.safetensors"),
        ("sd15", "sd15-fp16.safetensors"),
        ("sd15-inpaint", "sd15-inpaint.safetensors"),
        ("sd2", "sd2.safetensors"),
        ("sdxl", "sdxl.safetensors"),
    ] {
        let n = compare_folder_with_file(folder, file);
        assert!(n > 100, "{folder}: only {n} tensors compared");
    }
}

fn seeded(shape: &[usize], seed: u64) -> Tensor {
    // A fixed pseudo-random input so the test needs no RNG state.
    let n: usize = shape.iter().product();
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape.to_vec(), &Device::Cpu).expect("input")
}

#[test]
fn single_file_and_folder_give_the_same_outputs() {
    for (folder, file) in [
        ("sd15", "sd15.safetensors"),
        ("sd15-inpaint", "sd15-inpaint.safetensors"),
        ("sd2", "sd2.safetensors"),
        ("sdxl", "sdxl.safetensors"),
    ] {
        let a = loader::load(&fixture(folder), &LoadOptions::default()).expect("folder");
        let opts = LoadOptions { config: Some(tiny_config(file)), ..LoadOptions::default() };
        let b = loader::load(&fixture(file), &opts).expect("single file");
        let cfg = &a.config;
        let sample = seeded(&[1, cfg.unet.in_channels, 8, 8], 1);
        let ehs = seeded(&[1, 77, cfg.unet.cross_attention_dim], 2);
        let cond = if cfg.unet.has_text_time() {
            let pooled = cfg.unet.projection_class_embeddings_input_dim.unwrap_or(0)
                - 6 * cfg.unet.addition_time_embed_dim.unwrap_or(0);
            UNetConditioning {
                added: Some(AddedCond { text_embeds: seeded(&[1, pooled], 3), time_ids: seeded(&[1, 6], 4) }),
                ..UNetConditioning::default()
            }
        } else {
            UNetConditioning::default()
        };
        let out_a = a.unet.forward(&sample, 500.0, &ehs, &cond).expect("folder unet");
        let out_b = b.unet.forward(&sample, 500.0, &ehs, &cond).expect("single-file unet");
        let diff = (out_a - out_b)
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar::<f32>())
            .expect("diff");
        assert_eq!(diff, 0.0, "{folder} vs {file}: UNet outputs differ by {diff}");

        let ids = Tensor::new(&[[0u32, 5, 17, 999, 999, 999]], &Device::Cpu).expect("ids");
        let ta = a.text_encoder.forward(&ids).expect("folder text encoder");
        let tb = b.text_encoder.forward(&ids).expect("single-file text encoder");
        let d = (&ta.last_hidden_state - &tb.last_hidden_state)
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar::<f32>())
            .expect("diff");
        assert_eq!(d, 0.0, "{folder} vs {file}: text encoder outputs differ");
    }
}

#[test]
fn unet_module_list_matches_the_folders() {
    for folder in ["sd15", "sd15-inpaint", "sd2", "sdxl"] {
        let cfg = loader::read_folder_config(&fixture(folder), None).expect("config");
        let path = fixture(folder).join("unet/diffusion_pytorch_model.safetensors");
        // SAFETY: fixture files are not modified while the test runs.
        let st = unsafe { MmapedSafetensors::new(&path) }.expect("unet weights");
        let mut stored: Vec<String> =
            st.tensors().into_iter().filter_map(|(n, _)| n.strip_suffix(".weight").map(String::from)).collect();
        stored.sort();
        let mut listed = sd_models::keymap::unet_modules(&cfg.unet);
        listed.sort();
        assert_eq!(listed, stored, "{folder}");
    }
}
