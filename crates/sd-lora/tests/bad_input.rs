//! Bad LoRA input gives a typed, actionable error and never a panic.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use sd_lora::{Error, LoraAdapter, LoraSet};
use sd_models::loader::{load, LoadOptions};

fn fixtures() -> PathBuf {
    std::env::var_os("SD_FIXTURES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures"))
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sd-lora-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join(name)
}

fn write(name: &str, tensors: Vec<(String, Tensor)>) -> PathBuf {
    let p = scratch(name);
    let map: HashMap<String, Tensor> = tensors.into_iter().collect();
    candle_core::safetensors::save(&map, &p).expect("write lora");
    p
}

fn zeros(shape: &[usize]) -> Tensor {
    Tensor::zeros(shape, candle_core::DType::F32, &Device::Cpu).expect("tensor")
}

fn open_err(p: &std::path::Path) -> (Error, String) {
    let e = LoraAdapter::open(p).expect_err("must fail");
    let msg = e.to_string();
    (e, msg)
}

/// Loads `model` with `lora` and returns the error text.
fn load_err(model: &str, lora: &str) -> String {
    let mut set = LoraSet::new();
    set.add_file(fixtures().join("lora").join(lora), 1.0).expect("fixture LoRA opens");
    let opts = LoadOptions { backend_hook: Some(set.backend_hook()), ..LoadOptions::default() };
    load(&fixtures().join(model), &opts).expect_err("must fail").to_string()
}

#[test]
fn path_that_does_not_exist() {
    let (e, msg) = open_err(&scratch("nope.safetensors"));
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
    assert!(msg.contains("nope.safetensors") && msg.contains("check the path"), "{msg}");
    let err = LoraSet::from_specs(&["/no/such/lora.safetensors:0.5"]).expect_err("missing");
    assert!(matches!(err, Error::NotFound { .. }));
    assert!(matches!(LoraSet::from_specs(&[":1"]), Err(Error::InvalidSpec(_))));
}

#[test]
fn corrupt_and_truncated_files() {
    let p = scratch("random.safetensors");
    std::fs::write(&p, (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect::<Vec<_>>())
        .expect("write");
    let (e, msg) = open_err(&p);
    assert!(matches!(e, Error::InvalidFile { .. }), "{e:?}");
    assert!(msg.contains("re-download"), "{msg}");

    let p = scratch("tiny.safetensors");
    std::fs::write(&p, b"abc").expect("write");
    assert!(matches!(open_err(&p).0, Error::InvalidFile { .. }));

    let full = std::fs::read(fixtures().join("lora/sd15_kohya.safetensors")).expect("fixture");
    let p = scratch("truncated.safetensors");
    std::fs::write(&p, &full[..full.len() / 2]).expect("write");
    let (e, msg) = open_err(&p);
    assert!(matches!(e, Error::InvalidFile { .. }), "{e:?}: {msg}");

    let p = scratch("dir.safetensors");
    std::fs::create_dir_all(&p).expect("dir");
    assert!(matches!(open_err(&p).0, Error::InvalidFile { .. }));
}

#[test]
fn rank_mismatch_between_up_and_down() {
    let k = "lora_unet_down_blocks_0_attentions_0_proj_in";
    let p = write(
        "rank.safetensors",
        vec![(format!("{k}.lora_down.weight"), zeros(&[4, 8])), (format!("{k}.lora_up.weight"), zeros(&[8, 3]))],
    );
    let (e, msg) = open_err(&p);
    assert!(matches!(e, Error::RankMismatch { .. }), "{e:?}");
    assert!(msg.contains(k) && msg.contains("[4, 8]") && msg.contains("[8, 3]"), "{msg}");
    let p = write("halfpair.safetensors", vec![(format!("{k}.lora_up.weight"), zeros(&[8, 4]))]);
    assert!(matches!(open_err(&p).0, Error::MissingPart { missing, .. } if missing.starts_with("down")));
}

#[test]
fn not_a_lora_and_unsupported_kinds() {
    let (e, msg) = open_err(&fixtures().join("sd15.safetensors"));
    assert!(matches!(e, Error::NotALora { .. }), "{e:?}");
    assert!(msg.contains("full checkpoint"), "{msg}");
    let k = "lora_unet_down_blocks_0_attentions_0_proj_in";
    let p = write(
        "dora.safetensors",
        vec![
            (format!("{k}.lora_down.weight"), zeros(&[2, 4])),
            (format!("{k}.lora_up.weight"), zeros(&[4, 2])),
            (format!("{k}.dora_scale"), zeros(&[4, 1])),
        ],
    );
    let (e, msg) = open_err(&p);
    assert!(matches!(e, Error::Unsupported { .. }), "{e:?}");
    assert!(msg.contains("DoRA"), "{msg}");
    let p = write("tucker_loha.safetensors", vec![(format!("{k}.hada_t1"), zeros(&[2, 2, 3, 3]))]);
    assert!(open_err(&p).1.contains("Tucker"));
    // An incomplete LoHa names the missing tensor.
    let p = write(
        "loha.safetensors",
        vec![(format!("{k}.hada_w1_a"), zeros(&[4, 2])), (format!("{k}.hada_w1_b"), zeros(&[2, 4]))],
    );
    let (e, msg) = open_err(&p);
    assert!(matches!(e, Error::MissingPart { missing: "hada_w2_a", .. }), "{e:?}");
    assert!(msg.contains("hada_w2_a"), "{msg}");
    // LoHa factors whose ranks do not chain.
    let p = write(
        "loha_rank.safetensors",
        vec![
            (format!("{k}.hada_w1_a"), zeros(&[4, 2])),
            (format!("{k}.hada_w1_b"), zeros(&[3, 4])),
            (format!("{k}.hada_w2_a"), zeros(&[4, 2])),
            (format!("{k}.hada_w2_b"), zeros(&[2, 4])),
        ],
    );
    assert!(matches!(open_err(&p).0, Error::RankMismatch { .. }));
}

#[test]
fn sdxl_lora_on_sd15_names_the_cause() {
    for lora in ["sdxl_kohya_ldm.safetensors", "sdxl_peft.safetensors"] {
        let msg = load_err("sd15", lora);
        assert!(msg.contains("SDXL") && msg.contains("SD 1.x"), "{lora}: {msg}");
    }
    // The SD 1.5 LoRA on the SDXL model: the cross-attention sizes differ.
    let msg = load_err("sdxl", "sd15_kohya.safetensors");
    assert!(msg.contains("SD 1.x") && msg.contains("SDXL"), "{msg}");
}

#[test]
fn lora_matching_nothing_is_an_error_and_partial_match_a_report() {
    let p = write(
        "flux.safetensors",
        vec![
            ("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight".into(), zeros(&[2, 8])),
            ("lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight".into(), zeros(&[24, 2])),
        ],
    );
    let mut set = LoraSet::new();
    set.add_file(&p, 1.0).expect("opens");
    let opts = LoadOptions { backend_hook: Some(set.backend_hook()), ..LoadOptions::default() };
    let err = load(&fixtures().join("sd15"), &opts).expect_err("matches nothing");
    let msg = err.to_string();
    assert!(msg.contains("matches no weight") && msg.contains("Flux"), "{msg}");

    // A real LoRA plus one module of another model: loads, and the report names the stray key.
    let mut tensors: Vec<(String, Tensor)> =
        candle_core::safetensors::load(fixtures().join("lora/sd15_peft.safetensors"), &Device::Cpu)
            .expect("fixture")
            .into_iter()
            .collect();
    tensors.push(("unet.single_blocks.0.linear1.lora_A.weight".into(), zeros(&[2, 8])));
    tensors.push(("unet.single_blocks.0.linear1.lora_B.weight".into(), zeros(&[8, 2])));
    let p = write("partial.safetensors", tensors);
    let mut set = LoraSet::new();
    set.add_file(&p, 0.5).expect("opens");
    let opts = LoadOptions { backend_hook: Some(set.backend_hook()), ..LoadOptions::default() };
    load(&fixtures().join("sd15"), &opts).expect("partial match loads");
    let report = set.report();
    assert_eq!(report.adapters[0].unmatched, vec!["unet.single_blocks.0.linear1".to_string()]);
    assert_eq!(
        report.adapters[0].applied.len(),
        set.adapters().next().map(|(a, _)| a.modules().len() - 1).unwrap_or(0)
    );
    assert!(report.to_string().contains("1 unmatched"));
}
