//! GGUF: the tiny transformer quantized to q8_0 with Candle, loaded as the quantized variant.

mod common;

use std::collections::HashMap;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use candle_transformers::models::flux::WithForward;
use common::{diff, fixtures, get, golden};
use sd_flux::transformer::load_transformer;
use sd_flux::FluxVariant;

/// q8_0 stores 8 bits per weight and Candle's q8_0 matmul also quantizes the activations to 8
/// bits. On the tiny random-weight transformer the forward measured max differences of 9.8e-2
/// (dev) and 1.1e-1 (schnell) against F32 with max |out| of 5.3 and 4.6, i.e. 1.8 % and 2.4 % of
/// the output range; 5e-2 · max(1, max |golden|) keeps a 2× margin, and a wrong name or layout
/// (checked exactly by the unquantized GGUF above) would give errors of the order of |out|.
const Q8_TOL: f32 = 5e-2;

fn write_gguf(src: &std::path::Path, dst: &std::path::Path, quantized: GgmlDType) {
    let tensors: HashMap<String, Tensor> = candle_core::safetensors::load(src, &Device::Cpu).expect("load");
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    // Matrices whose rows fill whole 32-wide blocks are quantized; norms and biases stay F32,
    // as real FLUX GGUFs keep them.
    let q: Vec<(String, QTensor)> = names
        .iter()
        .map(|n| {
            let t = &tensors[*n];
            let dtype = if t.rank() == 2 && t.dim(1).expect("dim") % 32 == 0 { quantized } else { GgmlDType::F32 };
            ((*n).clone(), QTensor::quantize(t, dtype).expect("quantize"))
        })
        .collect();
    let refs: Vec<(&str, &QTensor)> = q.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut f = std::fs::File::create(dst).expect("create");
    gguf_file::write(&mut f, &[], &refs).expect("write gguf");
}

fn run(path: &std::path::Path, variant: &str) -> (f32, f32) {
    let t = load_transformer(path, DType::F32, &Device::Cpu, Some(&[4, 6, 6])).expect("gguf");
    assert!(t.is_quantized());
    assert_eq!(t.variant(), if variant == "dev" { FluxVariant::Dev } else { FluxVariant::Schnell });
    let g = golden(&format!("transformer_{variant}.safetensors"));
    let u = |n: &str| get(&g, n).unsqueeze(0).expect("u");
    let out = t
        .forward(
            &get(&g, "hidden_states"),
            &u("img_ids"),
            &get(&g, "encoder_hidden_states"),
            &u("txt_ids"),
            &get(&g, "timestep"),
            &get(&g, "pooled_projections"),
            g.get("guidance"),
        )
        .expect("forward");
    diff(&out, &get(&g, "out"))
}

#[test]
fn gguf_transformers_match_f32() {
    let dir = std::env::temp_dir().join(format!("sd-flux-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    for variant in ["dev", "schnell"] {
        let src = fixtures().join(format!("flux/flux-tiny-{variant}.safetensors"));
        // Unquantized GGUF: proves names and layouts, so it must match the golden exactly.
        let f32_path = dir.join(format!("flux-tiny-{variant}-f32.gguf"));
        write_gguf(&src, &f32_path, GgmlDType::F32);
        let (d, m) = run(&f32_path, variant);
        eprintln!("{variant} F32 GGUF vs golden: max diff {d:.3e}, max |golden| {m:.3}");
        assert!(d <= 1e-4 * m.max(1.0), "{variant} F32 GGUF: {d}");
        let q8_path = dir.join(format!("flux-tiny-{variant}-q8_0.gguf"));
        write_gguf(&src, &q8_path, GgmlDType::Q8_0);
        let (d, m) = run(&q8_path, variant);
        eprintln!("{variant} q8_0 GGUF vs F32 golden: max diff {d:.3e}, max |golden| {m:.3}");
        assert!(d > 0.0, "quantization should change something");
        assert!(d <= Q8_TOL * m.max(1.0), "{variant}: {d}");
    }
    let _ = std::fs::remove_dir_all(dir);
}
