//! Prompt weighting and chunking with the real CLIP vocabulary, against hand-computed token layouts.

use candle_core::{DType, Device, Tensor};
use sd_models::loader::{load, LoadOptions};
use sd_models::tokenizer::{ClipTokenizer, PadToken};
use sd_pipelines::conditioning::{encode_prompt, prompt_chunks};

const BOS: u32 = 49406;
const EOS: u32 = 49407;
const A: u32 = 320;
const CAT: u32 = 2368;
const COMMA: u32 = 267;
const DOG: u32 = 1929;

fn padded(content: &[u32], pad: u32) -> Vec<u32> {
    let mut v = vec![BOS];
    v.extend_from_slice(content);
    v.push(EOS);
    v.resize(77, pad);
    v
}

#[test]
fn weighted_prompt_layout() {
    let tok = ClipTokenizer::bundled(PadToken::EndOfText).expect("bundled vocab");
    let chunks = prompt_chunks(&tok, "a (cat:1.5), [dog]", 77).expect("chunks");
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].ids, padded(&[A, CAT, COMMA, DOG], EOS));
    let mut w = vec![1.0f32; 77];
    w[2] = 1.5;
    w[4] = 1.0 / 1.1;
    assert_eq!(chunks[0].weights.len(), 77);
    for (i, (a, b)) in chunks[0].weights.iter().zip(&w).enumerate() {
        assert!((a - b).abs() < 1e-6, "weight {i}: {a} vs {b}");
    }
    // OpenCLIP tokenizers pad with "!" (id 0) after the end token.
    let bang = ClipTokenizer::bundled(PadToken::Exclamation).expect("bundled vocab");
    assert_eq!(prompt_chunks(&bang, "a cat", 77).expect("chunks")[0].ids, padded(&[A, CAT], 0));
}

#[test]
fn long_prompt_splits_after_the_last_comma_and_at_break() {
    let tok = ClipTokenizer::bundled(PadToken::EndOfText).expect("bundled vocab");
    // 70 cats, a comma, 10 dogs: the 76th token overflows, the comma is 5 back, so the first
    // chunk ends after the comma and the dogs move to the second.
    let prompt = format!("{}, {}", vec!["cat"; 70].join(" "), ["dog"; 10].join(" "));
    let chunks = prompt_chunks(&tok, &prompt, 77).expect("chunks");
    assert_eq!(chunks.len(), 2);
    let mut first = vec![CAT; 70];
    first.push(COMMA);
    assert_eq!(chunks[0].ids, padded(&first, EOS));
    assert_eq!(chunks[1].ids, padded(&[DOG; 10], EOS));

    let chunks = prompt_chunks(&tok, "a cat BREAK a dog", 77).expect("chunks");
    assert_eq!(chunks.iter().map(|c| c.ids.clone()).collect::<Vec<_>>(), vec![padded(&[A, CAT], EOS), padded(&[A, DOG], EOS)]);
}

fn fixture_models() -> sd_models::loader::StableDiffusionModels {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/sd15");
    load(&dir, &LoadOptions::default()).expect("fixture loads")
}

fn mean(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32).and_then(|t| t.mean_all()).and_then(|t| t.to_scalar::<f32>()).expect("mean")
}

/// A1111 emphasis scales the weighted token's embedding and then rescales everything so the mean of
/// the whole conditioning is unchanged.
#[test]
fn emphasis_keeps_the_mean_and_scales_the_token() {
    let m = fixture_models();
    let plain = encode_prompt(&m, "red fox", 1).expect("plain").context;
    let weighted = encode_prompt(&m, "red (fox:1.4)", 1).expect("weighted").context;
    assert_eq!(plain.dims(), weighted.dims());
    assert!((mean(&plain) - mean(&weighted)).abs() < 1e-5 * mean(&plain).abs().max(1.0));
    let chunks = prompt_chunks(&m.tokenizer, "red (fox:1.4)", 77).expect("chunks");
    let ratio = {
        let z = plain.to_dtype(DType::F32).expect("f32");
        let w = Tensor::new(chunks[0].weights.as_slice(), &Device::Cpu).and_then(|w| w.reshape((1, 77, 1))).expect("w");
        mean(&z) / mean(&z.broadcast_mul(&w).expect("mul"))
    };
    for (pos, &weight) in chunks[0].weights.iter().enumerate() {
        let p = plain.get(0).and_then(|t| t.get(pos)).expect("row");
        let q = weighted.get(0).and_then(|t| t.get(pos)).expect("row");
        let expected = (p * (weight * ratio) as f64).expect("scale");
        let diff = (q - expected).and_then(|d| d.abs()).and_then(|d| d.max(0)).and_then(|d| d.to_scalar::<f32>()).expect("diff");
        assert!(diff < 1e-4, "position {pos}: {diff}");
    }
    assert!(chunks[0].weights.iter().any(|&w| (w - 1.4).abs() < 1e-6));
}

/// Positive and negative prompts of different chunk counts still batch together for guidance.
#[test]
fn long_positive_and_short_negative_share_a_batch() {
    let m = fixture_models();
    let long = vec!["fox"; 100].join(" ");
    let c = sd_pipelines::conditioning::build_conditioning(&m, &long, "blurry", 1, true, 2, (32, 32)).expect("conditioning");
    assert_eq!(c.context.dims()[0], 4);
    assert_eq!(c.context.dims()[1] % 77, 0);
    assert!(c.context.dims()[1] >= 154);
}
