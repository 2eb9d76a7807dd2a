//! FLUX LoRAs (kohya with BFL names, PEFT with diffusers names) merged at load time equal a
//! transformer whose weights were merged by hand.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::flux::WithForward;
use common::{assert_close, diff, fixtures, folder, get, golden};
use sd_flux::transformer::{load_transformer, load_transformer_with_loras};
use sd_flux::{Error, FluxLora};

/// Deterministic, non-trivial values of a given shape.
fn values(rows: usize, cols: usize, phase: f64) -> Tensor {
    let t = Tensor::arange(0u32, (rows * cols) as u32, &Device::Cpu).expect("arange").to_dtype(DType::F32).expect("f32");
    ((t * 0.37).expect("mul") + phase).expect("add").sin().expect("sin").affine(0.1, 0.0).expect("scale").reshape((rows, cols)).expect("reshape")
}

fn save(tensors: &HashMap<String, Tensor>, path: &Path) {
    candle_core::safetensors::save(tensors, path).expect("save");
}

fn run(t: &sd_flux::FluxTransformer) -> Tensor {
    let g = golden("transformer_dev.safetensors");
    let u = |n: &str| get(&g, n).unsqueeze(0).expect("u");
    t.forward(
        &get(&g, "hidden_states"),
        &u("img_ids"),
        &get(&g, "encoder_hidden_states"),
        &u("txt_ids"),
        &get(&g, "timestep"),
        &get(&g, "pooled_projections"),
        g.get("guidance"),
    )
    .expect("forward")
}

fn add_rows(w: &Tensor, start: usize, delta: &Tensor) -> Tensor {
    let (rows, cols) = w.dims2().expect("dims");
    let n = delta.dim(0).expect("rows");
    let mut parts = Vec::new();
    if start > 0 {
        parts.push(Tensor::zeros((start, cols), DType::F32, &Device::Cpu).expect("z"));
    }
    parts.push(delta.clone());
    if start + n < rows {
        parts.push(Tensor::zeros((rows - start - n, cols), DType::F32, &Device::Cpu).expect("z"));
    }
    (w + Tensor::cat(&parts, 0).expect("cat")).expect("add")
}

#[test]
fn kohya_and_peft_loras_merge_like_a_hand_merge() {
    let dir = std::env::temp_dir().join(format!("sd-flux-lora-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let rank = 4;
    // PEFT (no alpha: scale 1) with diffusers names, strength 0.8.
    let peft_modules = [
        ("transformer.transformer_blocks.0.attn.to_k", 32, 32),
        ("transformer.single_transformer_blocks.1.proj_mlp", 128, 32),
        ("transformer.norm_out.linear", 64, 32),
        ("transformer.x_embedder", 32, 64),
    ];
    let mut peft = HashMap::new();
    for (i, (m, out, inp)) in peft_modules.iter().enumerate() {
        peft.insert(format!("{m}.lora_A.weight"), values(rank, *inp, i as f64));
        peft.insert(format!("{m}.lora_B.weight"), values(*out, rank, 10.0 + i as f64));
    }
    let peft_path = dir.join("peft.safetensors");
    save(&peft, &peft_path);
    // kohya with BFL names, alpha 2 (scale 0.5), strength −1; plus a CLIP module FLUX ignores.
    let mut kohya = HashMap::new();
    kohya.insert("lora_unet_double_blocks_0_txt_attn_qkv.lora_down.weight".to_string(), values(rank, 32, 3.0));
    kohya.insert("lora_unet_double_blocks_0_txt_attn_qkv.lora_up.weight".to_string(), values(96, rank, 4.0));
    kohya.insert("lora_unet_double_blocks_0_txt_attn_qkv.alpha".to_string(), Tensor::new(2f32, &Device::Cpu).expect("alpha"));
    kohya.insert("lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight".to_string(), values(rank, 32, 5.0));
    kohya.insert("lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight".to_string(), values(64, rank, 6.0));
    let kohya_path = dir.join("kohya.safetensors");
    save(&kohya, &kohya_path);

    // The same updates merged by hand into the BFL weights.
    let base_path = fixtures().join("flux/flux-tiny-dev.safetensors");
    let mut w = candle_core::safetensors::load(&base_path, &Device::Cpu).expect("base");
    let prod = |a: &str, b: &str, src: &HashMap<String, Tensor>| src[b].matmul(&src[a]).expect("matmul");
    let d = |m: &str| (prod(&format!("{m}.lora_A.weight"), &format!("{m}.lora_B.weight"), &peft) * 0.8).expect("scale");
    let qkv = "double_blocks.0.img_attn.qkv.weight".to_string();
    w.insert(qkv.clone(), add_rows(&w[&qkv], 32, &d(peft_modules[0].0)));
    let l1 = "single_blocks.1.linear1.weight".to_string();
    w.insert(l1.clone(), add_rows(&w[&l1], 96, &d(peft_modules[1].0)));
    let norm = d(peft_modules[2].0);
    let swapped = Tensor::cat(&[norm.narrow(0, 32, 32).expect("n"), norm.narrow(0, 0, 32).expect("n")], 0).expect("cat");
    let ada = "final_layer.adaLN_modulation.1.weight".to_string();
    w.insert(ada.clone(), (&w[&ada] + swapped).expect("add"));
    let img_in = "img_in.weight".to_string();
    w.insert(img_in.clone(), (&w[&img_in] + d(peft_modules[3].0)).expect("add"));
    let k = prod("lora_unet_double_blocks_0_txt_attn_qkv.lora_down.weight", "lora_unet_double_blocks_0_txt_attn_qkv.lora_up.weight", &kohya);
    let txt = "double_blocks.0.txt_attn.qkv.weight".to_string();
    w.insert(txt.clone(), (&w[&txt] + (k * -0.5).expect("scale")).expect("add"));
    let merged_path = dir.join("merged.safetensors");
    save(&w, &merged_path);
    let axes = [4usize, 6, 6];
    let expected = run(&load_transformer(&merged_path, DType::F32, &Device::Cpu, Some(&axes)).expect("merged"));
    let plain = run(&load_transformer(&base_path, DType::F32, &Device::Cpu, Some(&axes)).expect("plain"));
    assert!(diff(&expected, &plain).0 > 1e-3, "the LoRA must change the output");

    let loras = [FluxLora::new(&peft_path, 0.8), FluxLora::new(&kohya_path, -1.0)];
    for (what, source) in [("BFL file", base_path.clone()), ("diffusers folder", folder("dev"))] {
        let (t, reports) = load_transformer_with_loras(&source, DType::F32, &Device::Cpu, Some(&axes), &loras).expect("with loras");
        let (d, m) = diff(&run(&t), &expected);
        eprintln!("LoRA merge on the {what}: max diff {d:.3e} against the hand merge (max |out| {m:.3})");
        assert!(d <= 1e-5 * m.max(1.0), "{what}: {d}");
        assert_eq!(reports.len(), 2);
        assert_eq!(reports[0].applied.len(), 4);
        assert_eq!(reports[1].applied, vec!["lora_unet_double_blocks_0_txt_attn_qkv".to_string()]);
        assert_eq!(reports[1].unmatched, vec!["lora_te1_text_model_encoder_layers_0_mlp_fc1".to_string()]);
    }
    // Strength 0 serves the base weights.
    let (t, _) = load_transformer_with_loras(&base_path, DType::F32, &Device::Cpu, Some(&axes), &[FluxLora::new(&peft_path, 0.0)]).expect("zero");
    assert_eq!(diff(&run(&t), &plain).0, 0.0);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn loras_match_diffusers_fuse_lora() {
    // Goldens: FluxPipeline.load_lora_weights + set_adapters + fuse_lora (tools/flux_fixtures.py), with a
    // kohya file in BFL names (fused qkv split by diffusers' converter, per-module alphas) and a PEFT
    // file in diffusers names (q/k/v and proj_mlp rows of the fused weights, norm_out halves).
    let g = golden("lora_dev.safetensors");
    let kohya = fixtures().join("flux/lora/flux_kohya.safetensors");
    let peft = fixtures().join("flux/lora/flux_peft.safetensors");
    let axes = [4usize, 6, 6];
    let cases = [
        ("out_kohya_0.8", vec![FluxLora::new(&kohya, 0.8)]),
        ("out_peft_0.6", vec![FluxLora::new(&peft, 0.6)]),
        ("out_both_0.8_-0.5", vec![FluxLora::new(&kohya, 0.8), FluxLora::new(&peft, -0.5)]),
    ];
    for (name, loras) in cases {
        for source in [folder("dev"), fixtures().join("flux/flux-tiny-dev.safetensors")] {
            let (t, reports) = load_transformer_with_loras(&source, DType::F32, &Device::Cpu, Some(&axes), &loras).expect("with loras");
            assert!(reports.iter().all(|r| r.unmatched.is_empty()), "{reports:?}");
            assert_close(&format!("{name} ({})", source.display()), &run(&t), &get(&g, name), 1e-4);
        }
    }
}

#[test]
fn sd_loras_are_rejected() {
    let sd = fixtures().join("lora/sd15_kohya.safetensors");
    let e = load_transformer_with_loras(&folder("schnell"), DType::F32, &Device::Cpu, None, &[FluxLora::new(&sd, 1.0)])
        .expect_err("SD LoRA on FLUX");
    assert!(matches!(e, Error::LoraNoMatch { .. }), "{e:?}");
    assert!(e.to_string().contains("FLUX"), "{e}");
    let missing = load_transformer_with_loras(&folder("schnell"), DType::F32, &Device::Cpu, None, &[FluxLora::new("/nonexistent.safetensors", 1.0)])
        .expect_err("missing");
    assert!(missing.to_string().contains("/nonexistent.safetensors"), "{missing}");
}
