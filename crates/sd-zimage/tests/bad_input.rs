//! Refusals: every wrong path, file, config or request ends in an error that says what to do, never a panic.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{fixtures, folder, models};
use sd_core::run::{ImageToImage, Inpaint, RunContext, Task};
use sd_zimage::pipeline::{generate, ZImageParams};
use sd_zimage::transformer::load_transformer;
use sd_zimage::{load, Error, ZImageLoadOptions};

fn err<T>(r: Result<T, Error>) -> String {
    r.err().map(|e| e.to_string()).unwrap_or_else(|| "no error".into())
}

fn temp(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("sd-zimage-bad-{name}-{}", std::process::id()))
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).expect("copy");
        }
    }
}

#[test]
fn missing_and_foreign_paths() {
    let e = err(load("/nonexistent/z-image".as_ref(), &ZImageLoadOptions::default()));
    assert!(e.contains("not found"), "{e}");
    let e = err(load(&fixtures().join("sd15"), &ZImageLoadOptions::default()));
    assert!(e.contains("Stable Diffusion") || e.contains("transformer/"), "{e}");
    let e = err(load_transformer(&fixtures().join("flux/flux-tiny-dev.safetensors"), DType::F32, &Device::Cpu, None));
    assert!(e.contains("FLUX"), "{e}");
    let e = err(load(&folder(), &ZImageLoadOptions { dtype: Some(DType::U8), ..Default::default() }));
    assert!(e.contains("F32, F16 or BF16"), "{e}");
}

#[test]
fn truncated_weights_and_bad_configs() {
    // A truncated transformer file.
    let src = std::fs::read(fixtures().join("zimage/z_image_tiny_bf16.safetensors")).expect("read");
    let cut = temp("cut.safetensors");
    std::fs::write(&cut, &src[..src.len() / 2]).expect("write");
    let e = err(load_transformer(&cut, DType::F32, &Device::Cpu, None));
    assert!(e.contains("re-download"), "{e}");
    let _ = std::fs::remove_file(&cut);
    // Z-Image Omni (SigLIP features) and a text encoder of the wrong width.
    let dir = temp("omni");
    let _ = std::fs::remove_dir_all(&dir);
    copy_dir(&folder(), &dir);
    let cfg_path = dir.join("transformer/config.json");
    let cfg = std::fs::read_to_string(&cfg_path).expect("config");
    std::fs::write(&cfg_path, cfg.replace("\"siglip_feat_dim\": null", "\"siglip_feat_dim\": 1152")).expect("write");
    let e = err(load(&dir, &ZImageLoadOptions::default()));
    assert!(e.contains("Omni"), "{e}");
    std::fs::write(&cfg_path, cfg.replace("\"cap_feat_dim\": 32", "\"cap_feat_dim\": 48")).expect("write");
    let e = err(load(&dir, &ZImageLoadOptions::default()));
    assert!(e.contains("cap_embedder") || e.contains("shape"), "{e}");
    std::fs::write(&cfg_path, &cfg).expect("write");
    std::fs::remove_file(dir.join("tokenizer/tokenizer.json")).expect("rm");
    let e = err(load(&dir, &ZImageLoadOptions::default()));
    assert!(e.contains("tokenizer.json"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_requests() {
    let m = models();
    let p = ZImageParams { max_sequence_length: Some(64), ..ZImageParams::new("a cat", 16, 24, 2, 0.0) };
    let run = |p: &ZImageParams, t: &Task<'_>| err(generate(&m, p, t, &mut RunContext::default()));
    let image = Tensor::zeros((1, 3, 24, 16), DType::F32, &Device::Cpu).expect("zeros");
    let e = run(&p, &Task::ImageToImage(ImageToImage { image: &image, strength: 0.0 }));
    assert!(e.contains("strength"), "{e}");
    let small = Tensor::zeros((1, 1, 8, 8), DType::F32, &Device::Cpu).expect("zeros");
    let e = run(&p, &Task::Inpaint(Inpaint { image: &image, mask: &small, strength: 1.0 }));
    assert!(e.contains("mask"), "{e}");
    let mut q = p.clone();
    q.max_sequence_length = Some(10_000);
    let e = run(&q, &Task::TextToImage);
    assert!(e.contains("max_sequence_length"), "{e}");
    q.max_sequence_length = Some(0);
    assert!(run(&q, &Task::TextToImage).contains("max_sequence_length"));
    let mut q = p.clone();
    q.steps = 0;
    assert!(run(&q, &Task::TextToImage).contains("steps"));
}
