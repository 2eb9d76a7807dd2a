//! Textual-inversion embeddings against diffusers' `load_textual_inversion` + `encode_prompt`
//! (fixtures/goldens/embeddings, written by tools/ti_goldens.py): A1111 `.pt`, A1111 `.safetensors`,
//! diffusers `.bin` and SDXL `clip_l`/`clip_g` files, matched by name as A1111 matches them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use sd_models::loader::{load, LoadOptions, StableDiffusionModels};
use sd_pipelines::conditioning::encode_prompt;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures").join(rel)
}

fn model(name: &str, embeddings: &[&str]) -> StableDiffusionModels {
    let mut m = load(&fixture(name), &LoadOptions::default()).expect("fixture loads");
    for e in embeddings {
        m.add_embedding(&fixture(&format!("embeddings/{e}"))).unwrap_or_else(|err| panic!("{e}: {err}"));
    }
    m
}

fn golden(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(&format!("goldens/embeddings/{name}.safetensors")), &Device::Cpu).expect("golden")
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).and_then(|d| d.abs()).and_then(|d| d.flatten_all()).and_then(|d| d.max(0)).and_then(|d| d.to_scalar::<f32>()).expect("diff")
}

#[test]
fn sd15_embeddings_in_every_format_match_diffusers() {
    let m = model("sd15", &["mystyle.pt", "badhand.safetensors", "cattoy.bin"]);
    assert_eq!(m.embeddings.iter().map(|e| (e.name.as_str(), e.len())).collect::<Vec<_>>(), [("mystyle", 2), ("badhand", 1), ("cattoy", 1)]);
    let g = golden("sd15");
    let pe = encode_prompt(&m, "a mystyle photo of a cattoy, sharp", 1).expect("prompt").context;
    assert!(max_diff(&pe, &g["prompt_embeds"]) < 1e-5);
    let ne = encode_prompt(&m, "badhand, blurry mystyle", 1).expect("negative").context;
    assert!(max_diff(&ne, &g["negative_embeds"]) < 1e-5);
    // Names match case-insensitively (by their CLIP tokens), with every vector.
    let shouted = encode_prompt(&m, "a MYSTYLE photo of a CatToy, sharp", 1).expect("prompt").context;
    assert_eq!(max_diff(&shouted, &pe), 0.0);
    // Without the embeddings the names are just words.
    let plain = encode_prompt(&model("sd15", &[]), "a mystyle photo of a cattoy, sharp", 1).expect("plain").context;
    assert!(max_diff(&plain, &pe) > 1e-3);
}

#[test]
fn sdxl_embeddings_match_diffusers_and_pool_at_end_of_text_as_a1111() {
    let m = model("sdxl", &["xlstyle.safetensors"]);
    let g = golden("sdxl");
    let out = encode_prompt(&m, "a xlstyle photo, sharp", 1).expect("prompt");
    assert!(max_diff(&out.context, &g["prompt_embeds"]) < 1e-5);
    let pooled = out.pooled.expect("pooled");
    assert!(max_diff(&pooled, &g["pooled_a1111"]) < 1e-5);
    // diffusers pools at argmax(input_ids) only under the legacy `eos_token_id = 2` config of the real
    // SDXL encoder (then on the embedding's added ids); this fixture's encoder names its end-of-text
    // id, so both pool there (sd-models' `eos_position` test covers the legacy case).
    assert!(max_diff(&pooled, &g["pooled_diffusers"]) < 1e-5);
}

#[test]
fn embeddings_for_another_model_are_refused_by_name() {
    let mut sd15 = model("sd15", &[]);
    let err = sd15.add_embedding(&fixture("embeddings/xlstyle.safetensors")).expect_err("SDXL embedding on SD 1.5").to_string();
    assert!(err.contains("SDXL"), "{err}");
    let mut xl = model("sdxl", &[]);
    let err = xl.add_embedding(&fixture("embeddings/badhand.safetensors")).expect_err("SD 1.5 embedding on SDXL").to_string();
    assert!(err.contains("clip_l") && err.contains("SD 1.x/2.x"), "{err}");
    let err = sd15.add_embedding(&fixture("embeddings/none.pt")).expect_err("missing").to_string();
    assert!(err.contains("not found"), "{err}");
    let err = sd15.add_embedding(&fixture("sd15/model_index.json")).expect_err("not an embedding").to_string();
    assert!(err.contains("extension"), "{err}");
}
