//! Broken or wrong inputs must give a clear `Err` naming the cause, never a panic.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sd_models::loader::{self, LoadOptions};
use sd_models::{Error, SdVariant};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures").join(name)
}

/// A fresh scratch folder for one test.
fn scratch(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sd-models-bad-input-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

fn sd15_opts() -> LoadOptions {
    let config = loader::read_folder_config(&fixture("sd15"), None).expect("sd15 config");
    LoadOptions { config: Some(config), ..LoadOptions::default() }
}

/// Loads `path`, expecting an error; returns it with its message.
fn load_err(path: &Path, opts: &LoadOptions) -> (Error, String) {
    match loader::load(path, opts) {
        Ok(_) => panic!("{} loaded but should have failed", path.display()),
        Err(e) => {
            let msg = e.to_string();
            (e, msg)
        }
    }
}

/// The tensors of the sd15 single file, for building broken variants of it.
fn sd15_tensors() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("sd15.safetensors"), &Device::Cpu).expect("sd15 tensors")
}

#[test]
fn missing_folder() {
    let (e, msg) = load_err(&fixture("no-such-model"), &LoadOptions::default());
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
    assert!(msg.contains("not found") && msg.contains("no-such-model"), "{msg}");
}

#[test]
fn missing_file() {
    let (e, msg) = load_err(&fixture("no-such-model.safetensors"), &LoadOptions::default());
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
    assert!(msg.contains("no-such-model.safetensors"), "{msg}");
}

#[test]
fn folder_without_component_configs() {
    let d = scratch("half-folder");
    std::fs::create_dir_all(d.join("unet")).expect("mkdir");
    std::fs::copy(fixture("sd15/unet/config.json"), d.join("unet/config.json")).expect("copy");
    let (e, msg) = load_err(&d, &LoadOptions::default());
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
    assert!(msg.contains("vae") && msg.contains("config.json"), "{msg}");
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn truncated_safetensors() {
    let d = scratch("truncated");
    let bytes = std::fs::read(fixture("sd15.safetensors")).expect("read fixture");
    let p = d.join("truncated.safetensors");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).expect("write");
    let (e, msg) = load_err(&p, &sd15_opts());
    assert!(matches!(e, Error::InvalidSafetensors { .. }), "{e:?}");
    assert!(msg.contains("truncated") && msg.contains("truncated.safetensors"), "{msg}");
    // Truncated inside the header too.
    std::fs::write(&p, &bytes[..20]).expect("write");
    let (e, _) = load_err(&p, &sd15_opts());
    assert!(matches!(e, Error::InvalidSafetensors { .. }), "{e:?}");
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn random_bytes() {
    let d = scratch("random");
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let bytes: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    let p = d.join("random.safetensors");
    std::fs::write(&p, bytes).expect("write");
    let (e, msg) = load_err(&p, &LoadOptions::default());
    assert!(matches!(e, Error::InvalidSafetensors { .. }), "{e:?}");
    assert!(msg.contains("not a valid safetensors file"), "{msg}");
    let tiny = d.join("tiny.safetensors");
    std::fs::write(&tiny, b"abc").expect("write");
    let (e, _) = load_err(&tiny, &LoadOptions::default());
    assert!(matches!(e, Error::InvalidSafetensors { .. }), "{e:?}");
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn unrelated_tensors_are_an_unknown_architecture() {
    let d = scratch("unrelated");
    let p = d.join("classifier.safetensors");
    let mut m = HashMap::new();
    m.insert("classifier.fc.weight".to_string(), Tensor::zeros((10, 4), DType::F32, &Device::Cpu).expect("t"));
    candle_core::safetensors::save(&m, &p).expect("save");
    let (e, msg) = load_err(&p, &LoadOptions::default());
    assert!(matches!(e, Error::UnknownArchitecture { .. }), "{e:?}");
    assert!(msg.contains("classifier.fc.weight") && msg.contains("input_blocks.0.0.weight"), "{msg}");

    let flux = d.join("flux.safetensors");
    m.insert(
        "double_blocks.0.img_attn.qkv.weight".to_string(),
        Tensor::zeros((6, 2), DType::F32, &Device::Cpu).expect("t"),
    );
    candle_core::safetensors::save(&m, &flux).expect("save");
    let (e, msg) = load_err(&flux, &LoadOptions::default());
    assert!(matches!(e, Error::UnknownArchitecture { .. }), "{e:?}");
    assert!(msg.contains("FLUX") && msg.contains("sd-flux"), "{msg}");
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn tensor_with_a_wrong_shape() {
    let d = scratch("wrong-shape");
    let mut m = sd15_tensors();
    let name = "first_stage_model.decoder.conv_out.weight";
    let old = m.get(name).map(|t| t.dims().to_vec()).expect("fixture has the VAE conv_out");
    m.insert(name.to_string(), Tensor::zeros((old[0], old[1], 1, 1), DType::F32, &Device::Cpu).expect("t"));
    let p = d.join("wrong-shape.safetensors");
    candle_core::safetensors::save(&m, &p).expect("save");
    let (e, msg) = load_err(&p, &sd15_opts());
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e:?}");
    assert!(msg.contains("decoder.conv_out.weight") && msg.contains("shape"), "{msg}");
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn missing_tensor_names_it_and_suggests_a_variant_mismatch() {
    let d = scratch("missing-tensor");
    let mut m = sd15_tensors();
    m.remove("model.diffusion_model.out.2.weight").expect("fixture has the UNet conv_out");
    let p = d.join("missing.safetensors");
    candle_core::safetensors::save(&m, &p).expect("save");
    let (e, msg) = load_err(&p, &sd15_opts());
    assert!(matches!(e, Error::MissingTensor { .. }), "{e:?}");
    assert!(
        msg.contains("conv_out.weight")
            && msg.contains("model.diffusion_model.out.2.weight")
            && msg.contains("variant"),
        "{msg}"
    );
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn sdxl_file_forced_as_sd15() {
    let opts = LoadOptions { variant: Some(SdVariant::V1_5), ..LoadOptions::default() };
    let (e, msg) = load_err(&fixture("sdxl.safetensors"), &opts);
    assert!(matches!(e, Error::VariantMismatch { .. }), "{e:?}");
    assert!(msg.contains("sdxl") && msg.contains("sd15"), "{msg}");
    // The same for a folder, and for inpainting-ness.
    let (e, _) = load_err(&fixture("sdxl"), &opts);
    assert!(matches!(e, Error::VariantMismatch { .. }), "{e:?}");
    let opts = LoadOptions { variant: Some(SdVariant::V1_5Inpaint), ..sd15_opts() };
    let (e, _) = load_err(&fixture("sd15.safetensors"), &opts);
    assert!(matches!(e, Error::VariantMismatch { .. }), "{e:?}");
}

#[test]
fn ckpt_is_refused_with_advice() {
    let d = scratch("ckpt");
    let p = d.join("model.ckpt");
    std::fs::write(&p, b"PK\x03\x04 not really a zip").expect("write");
    let (e, msg) = load_err(&p, &LoadOptions::default());
    assert!(matches!(e, Error::UnsupportedFormat { .. }), "{e:?}");
    assert!(msg.contains("safetensors") && msg.contains("convert"), "{msg}");
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn unsupported_dtype() {
    let opts = LoadOptions { dtype: Some(DType::U8), ..LoadOptions::default() };
    let (e, msg) = load_err(&fixture("sd15"), &opts);
    assert!(matches!(e, Error::UnsupportedDtype { .. }), "{e:?}");
    assert!(msg.contains("U8"), "{msg}");
}

/// A UNet config that turns on a diffusers option this UNet does not implement (here LCM's
/// `time_cond_proj_dim`) is refused instead of loading and computing something else.
#[test]
fn unsupported_unet_option_is_refused() {
    let d = scratch("lcm-unet");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("sd15/unet/config.json")).expect("read")).expect("json");
    cfg["time_cond_proj_dim"] = serde_json::json!(256);
    std::fs::write(d.join("config.json"), cfg.to_string()).expect("write");
    let e = sd_models::diffusers::read_unet_config(&d.join("config.json")).expect_err("must refuse");
    let msg = e.to_string();
    assert!(matches!(e, Error::InvalidConfig { .. }) && msg.contains("time_cond_proj_dim"), "{msg}");
    // A UNet config without up blocks (what a ControlNet config looks like) is refused by name.
    cfg.as_object_mut().map(|o| (o.remove("time_cond_proj_dim"), o.remove("up_block_types")));
    std::fs::write(d.join("config.json"), cfg.to_string()).expect("write");
    let msg = sd_models::diffusers::read_unet_config(&d.join("config.json")).expect_err("must refuse").to_string();
    assert!(msg.contains("up_block_types"), "{msg}");
    // The unmodified fixture config is accepted.
    assert!(sd_models::diffusers::read_unet_config(&fixture("sd15/unet/config.json")).is_ok());
    let _ = std::fs::remove_dir_all(d);
}
