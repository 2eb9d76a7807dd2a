//! LoRAs on the tiny SD 3.5 Medium MMDiT against diffusers: a PEFT/diffusers LoRA (fused by diffusers'
//! `load_lora_weights` + `fuse_lora`) and a kohya LoRA with Stability names (merged into the Stability weights and
//! converted by diffusers' single-file converter), loaded from the diffusers folder and from the Stability single
//! file; see tools/sd3_lora_fixtures.py.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sd_sd3::loader::{load_transformer_with_loras, Part};
use sd_sd3::{load, Mmdit, Sd3LoadOptions, Sd3Lora};

const TOL: f32 = 1e-4;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn medium() -> PathBuf {
    fixtures().join("sd3/medium")
}

fn peft(strength: f32) -> Sd3Lora {
    Sd3Lora::new(fixtures().join("sd3/lora/sd3_peft.safetensors"), strength)
}

fn kohya(strength: f32) -> Sd3Lora {
    Sd3Lora::new(fixtures().join("sd3/lora/sd3_kohya.safetensors"), strength)
}

fn golden(name: &str) -> HashMap<String, Tensor> {
    let path = fixtures().join("goldens/sd3").join(name);
    candle_core::safetensors::load(&path, &Device::Cpu).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn get(g: &HashMap<String, Tensor>, name: &str) -> Tensor {
    g.get(name).unwrap_or_else(|| panic!("golden tensor {name} missing")).clone()
}

/// The folder and the Stability single file (`model.diffusion_model.*`, config from the folder).
fn parts() -> [(&'static str, Part, Option<PathBuf>); 2] {
    [
        ("folder", Part::Folder(medium().join("transformer")), None),
        ("single file", Part::File { path: fixtures().join("sd3/sd3.5-medium-tiny.safetensors"), prefix: String::new() }, Some(medium())),
    ]
}

fn forward(t: &Mmdit) -> Tensor {
    let g = golden("transformer.safetensors");
    t.forward(&get(&g, "hidden_states"), &get(&g, "timestep"), &get(&g, "encoder_hidden_states"), &get(&g, "pooled_projections"), &[])
        .expect("forward")
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

fn load_with(part: &Part, configs: Option<&PathBuf>, loras: &[Sd3Lora]) -> (Mmdit, Vec<sd_sd3::AdapterReport>) {
    load_transformer_with_loras(part, configs.map(PathBuf::as_path), DType::F32, &Device::Cpu, loras).unwrap_or_else(|e| panic!("{part:?}: {e}"))
}

#[test]
fn peft_lora_matches_diffusers() {
    let g = golden("lora.safetensors");
    for (name, part, configs) in parts() {
        for (strength, key) in [(1.0, "out_peft_1.0"), (0.5, "out_peft_0.5")] {
            let (t, reports) = load_with(&part, configs.as_ref(), &[peft(strength)]);
            assert_eq!(reports.len(), 1);
            assert_eq!((reports[0].applied.len(), reports[0].unmatched.len()), (31, 0), "{name}: {:?}", reports[0].unmatched);
            assert_close(&format!("PEFT LoRA at {strength} ({name})"), &forward(&t), &get(&g, key), TOL);
        }
    }
}

#[test]
fn kohya_lora_with_stability_names_matches_diffusers() {
    let g = golden("lora.safetensors");
    for (name, part, configs) in parts() {
        let (t, reports) = load_with(&part, configs.as_ref(), &[kohya(1.0)]);
        assert_eq!(reports[0].applied.len(), 16, "{name}");
        // Its CLIP modules name no transformer weight: reported, not merged.
        let mut unmatched = reports[0].unmatched.clone();
        unmatched.sort();
        assert_eq!(unmatched, ["lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te2_text_model_encoder_layers_1_mlp_fc1"]);
        assert_close(&format!("kohya LoRA ({name})"), &forward(&t), &get(&g, "out_kohya_1.0"), TOL);
    }
}

#[test]
fn two_loras_add_up() {
    let g = golden("lora.safetensors");
    for (name, part, configs) in parts() {
        let (t, reports) = load_with(&part, configs.as_ref(), &[kohya(1.0), peft(0.5)]);
        assert_eq!(reports.len(), 2);
        assert_close(&format!("kohya 1.0 + PEFT 0.5 ({name})"), &forward(&t), &get(&g, "out_kohya_1.0_peft_0.5"), TOL);
    }
    // The same adapter twice at 0.5 is the adapter at 1.0.
    let (t, _) = load_with(&parts()[0].1, None, &[peft(0.5), peft(0.5)]);
    assert_close("PEFT 0.5 + PEFT 0.5", &forward(&t), &get(&g, "out_peft_1.0"), TOL);
}

/// Through `load` and `Sd3LoadOptions::loras`, as an application would.
#[test]
fn load_options_merge_and_report() {
    let g = golden("lora.safetensors");
    let opts = Sd3LoadOptions { loras: vec![kohya(1.0)], ..Default::default() };
    let m = load(&medium(), &opts).expect("load with a LoRA");
    assert_eq!(m.lora_report.len(), 1);
    assert_eq!(m.lora_report[0].unmatched.len(), 2);
    assert_close("load() with a kohya LoRA", &forward(&m.transformer), &get(&g, "out_kohya_1.0"), TOL);
    let plain = load(&medium(), &Sd3LoadOptions::default()).expect("load");
    assert!(plain.lora_report.is_empty());
    assert_close("load() without LoRAs", &forward(&plain.transformer), &get(&golden("transformer.safetensors"), "out_medium"), TOL);
    let spec = sd_sd3::parse_lora_spec("a/b.safetensors:-0.25").expect("spec");
    assert_eq!(spec, Sd3Lora::new("a/b.safetensors", -0.25));
}

#[test]
fn loras_of_other_families_are_refused_with_a_reason() {
    let folder = Part::Folder(medium().join("transformer"));
    let cases = [("flux/lora/flux_kohya.safetensors", "FLUX"), ("lora/sdxl_kohya.safetensors", "SDXL"), ("lora/sd15_peft.safetensors", "UNet")];
    for (file, family) in cases {
        let lora = Sd3Lora::new(fixtures().join(file), 1.0);
        let err = load_transformer_with_loras(&folder, None, DType::F32, &Device::Cpu, &[lora]).expect_err(file);
        let msg = err.to_string();
        eprintln!("{file}: {msg}");
        assert!(msg.contains("matches no weight of the SD 3.x transformer"), "{msg}");
        assert!(msg.contains(family), "{file}: {msg}");
        assert!(msg.contains(file.rsplit('/').next().expect("name")), "{msg}");
    }
    // Through `load`, before anything else is read.
    let opts = Sd3LoadOptions { loras: vec![Sd3Lora::new(fixtures().join("flux/lora/flux_kohya.safetensors"), 1.0)], ..Default::default() };
    let err = load(&medium(), &opts).expect_err("a FLUX LoRA");
    assert!(err.to_string().contains("FLUX"), "{err}");
    // A missing file says so.
    let err = load_transformer_with_loras(&folder, None, DType::F32, &Device::Cpu, &[Sd3Lora::new("/nonexistent/x.safetensors", 1.0)]).expect_err("missing");
    assert!(err.to_string().contains("does not exist"), "{err}");
}

/// A LoRA for a wider SD 3.x (the kohya file on SD 3.5 Large's layout at another width) names the LoRA and both
/// shapes instead of blaming the checkpoint.
#[test]
fn a_lora_of_another_width_names_the_lora() {
    let dir = std::env::temp_dir().join(format!("sd3-lora-width-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let path = dir.join("wide.safetensors");
    let down = Tensor::zeros((4, 48), DType::F32, &Device::Cpu).expect("down");
    let up = Tensor::zeros((144, 4), DType::F32, &Device::Cpu).expect("up");
    let tensors: HashMap<String, Tensor> = [
        ("lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight".to_string(), down),
        ("lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight".to_string(), up),
    ]
    .into();
    candle_core::safetensors::save(&tensors, &path).expect("save");
    let err = load_transformer_with_loras(&Part::Folder(medium().join("transformer")), None, DType::F32, &Device::Cpu, &[Sd3Lora::new(&path, 1.0)])
        .expect_err("wrong width");
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(matches!(err, sd_sd3::Error::LoraMismatch { .. }), "{msg}");
    assert!(msg.contains("wide.safetensors") && msg.contains("x_block.attn.qkv"), "{msg}");
    let _ = std::fs::remove_dir_all(&dir);
}
