//! ESRGAN-family upscalers (RRDBNet) against spandrel goldens in every key layout (fixtures from
//! tools/esrgan_goldens.py), tiled against untiled upscaling, and the errors for files that are not one.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sd_models::esrgan::{KeyLayout, RrdbNet, TileOptions};
use sd_models::Error;

type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

/// Largest difference accepted against spandrel's float32 outputs.
const TOLERANCE: f32 = 1e-4;

/// The fixtures folder; `SD_FIXTURES_DIR` points elsewhere, e.g. at a freshly generated set.
fn fixtures() -> PathBuf {
    match std::env::var_os("SD_FIXTURES_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures"),
    }
}

fn model_path(name: &str) -> PathBuf {
    fixtures().join("esrgan").join(name)
}

fn load(name: &str) -> std::result::Result<RrdbNet, Box<dyn std::error::Error>> {
    let path = model_path(name);
    RrdbNet::load(&path, &Device::Cpu).map_err(|e| format!("{}: {e}; generate fixtures with tools/esrgan_goldens.py", path.display()).into())
}

fn goldens(file: &str) -> std::result::Result<HashMap<String, Tensor>, Box<dyn std::error::Error>> {
    let path = fixtures().join("goldens").join("esrgan").join(file);
    Ok(candle_core::safetensors::load(&path, &Device::Cpu).map_err(|e| format!("{}: {e}; run tools/esrgan_goldens.py", path.display()))?)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> std::result::Result<f32, Box<dyn std::error::Error>> {
    if a.dims() != b.dims() {
        return Err(format!("shapes differ: {:?} vs {:?}", a.dims(), b.dims()).into());
    }
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// A deterministic image in [0, 1] with some structure (`(1, 3, h, w)`).
fn test_image(h: usize, w: usize) -> candle_core::Result<Tensor> {
    let data: Vec<f32> = (0..3 * h * w)
        .map(|i| {
            let (c, y, x) = (i / (h * w), (i / w) % h, i % w);
            let smooth = 0.5 + 0.3 * ((x as f32 * 0.21 + c as f32).sin() * (y as f32 * 0.17).cos());
            let noise = ((i as f32 * 12.9898).sin() * 43758.547).fract().abs();
            (0.8 * smooth + 0.2 * noise).clamp(0.0, 1.0)
        })
        .collect();
    Tensor::from_vec(data, (1, 3, h, w), &Device::Cpu)
}

#[test]
fn every_layout_matches_spandrel() -> TestResult {
    let manifest_path = fixtures().join("goldens/esrgan/manifest.json");
    let manifest: serde_json::Map<String, serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(&manifest_path).map_err(|e| format!("{}: {e}; run tools/esrgan_goldens.py", manifest_path.display()))?,
    )?;
    assert!(manifest.len() >= 7, "manifest lists {} fixtures", manifest.len());
    for (file, info) in &manifest {
        let net = load(file)?;
        let cfg = net.config();
        let field = |k: &str| info.get(k).and_then(|v| v.as_u64()).map(|v| v as usize);
        assert_eq!(Some(net.scale()), field("scale"), "{file}: scale");
        assert_eq!(Some(cfg.in_channels), field("input_channels"), "{file}: input channels");
        assert_eq!(Some(cfg.out_channels), field("output_channels"), "{file}: output channels");
        assert_eq!(Some(cfg.num_feat), field("num_feat"), "{file}: num_feat");
        assert_eq!(Some(cfg.num_block), field("num_block"), "{file}: num_block");
        assert_eq!(Some(cfg.num_grow_ch), field("num_grow_ch"), "{file}: num_grow_ch");
        assert_eq!(Some(cfg.unshuffle), field("unshuffle"), "{file}: unshuffle");
        assert_eq!(Some(cfg.plus), info.get("plus").and_then(|v| v.as_bool()), "{file}: ESRGAN+");
        let layout = match info.get("layout").and_then(|v| v.as_str()) {
            Some("old") => KeyLayout::OldEsrgan,
            Some("basicsr") => KeyLayout::BasicSr,
            Some("bsrgan") => KeyLayout::Bsrgan,
            other => return Err(format!("{file}: unknown layout {other:?} in the manifest").into()),
        };
        assert_eq!(cfg.layout, layout, "{file}: layout");
        assert_eq!(RrdbNet::inspect(&model_path(file))?, *cfg, "{file}: inspect() must agree with load()");

        let golden_file = info.get("golden").and_then(|v| v.as_str()).ok_or("manifest entry without golden")?;
        let g = goldens(golden_file)?;
        let get = |k: &str| g.get(k).ok_or_else(|| format!("{golden_file} has no {k}"));
        let input = get("input")?;
        let raw = net.forward(input)?;
        let d_raw = max_abs_diff(&raw, get("raw")?)?;
        let clamped = net.upscale(input, TileOptions { tile: 0, overlap: 0 })?;
        let d_clamped = max_abs_diff(&clamped, get("clamped")?)?;
        println!("{file}: {cfg}; max|Δ| raw {d_raw:.2e}, clamped {d_clamped:.2e}");
        assert!(d_raw <= TOLERANCE, "{file}: raw output differs from spandrel by {d_raw}");
        assert!(d_clamped <= TOLERANCE, "{file}: clamped output differs from spandrel by {d_clamped}");
        if let Some(odd) = g.get("input_odd") {
            let d_odd = max_abs_diff(&net.forward(odd)?, get("raw_odd")?)?;
            println!("{file}: odd-sized input (padded for pixel-unshuffle) max|Δ| {d_odd:.2e}");
            assert!(d_odd <= TOLERANCE, "{file}: odd-sized output differs from spandrel by {d_odd}");
        }
    }
    Ok(())
}

#[test]
fn the_model_can_be_shared_across_threads() {
    fn send_sync<T: Send + Sync + Clone>() {}
    send_sync::<RrdbNet>();
}

#[test]
fn state_dict_with_module_prefix_loads_the_same() -> TestResult {
    let net = load("esrgan_x4_basicsr.safetensors")?;
    let tensors = candle_core::safetensors::load(model_path("esrgan_x4_basicsr.safetensors"), &Device::Cpu)?;
    let prefixed: Vec<(String, Tensor)> = tensors.into_iter().map(|(k, t)| (format!("module.{k}"), t.to_dtype(DType::F16).unwrap_or(t))).collect();
    let from_dict = RrdbNet::from_state_dict(prefixed, &Device::Cpu)?;
    assert_eq!(from_dict.config(), net.config());
    let x = test_image(6, 5)?;
    // F16 weights are upcast: close to, not equal to, the F32 file.
    let d = max_abs_diff(&from_dict.forward(&x)?, &net.forward(&x)?)?;
    assert!(d < 2e-2, "F16 state dict differs by {d}");
    Ok(())
}

/// With an overlap four times the receptive radius, every blended pixel comes from tiles that saw all
/// of its context: tiled and untiled agree to float rounding, at the tile borders too.
#[test]
fn tiled_equals_untiled_when_the_overlap_covers_the_receptive_field() -> TestResult {
    // 1 RRDB block (15 convs) + first/body convs: a radius of about 19 input pixels for this ×2 model.
    let net = load("bsrgan_x2.pth")?;
    let x = test_image(170, 250)?;
    let whole = net.forward(&x)?;
    let mut calls = Vec::new();
    let tiled = net.upscale_tiled_with(&x, TileOptions { tile: 160, overlap: 80 }, &mut |done, total| {
        calls.push((done, total));
        ControlFlow::Continue(())
    })?;
    assert_eq!(calls, (1..=6).map(|i| (i, 6)).collect::<Vec<_>>(), "2×3 tiles, reported in order");
    let d = max_abs_diff(&tiled, &whole)?;
    println!("tiled (160/80) vs untiled, bsrgan_x2: max|Δ| {d:.2e}");
    assert!(d <= TOLERANCE, "tiled output differs from untiled by {d}");
    Ok(())
}

/// With a small overlap the deep model's tiles see less context, but the cross-fade leaves no seam:
/// the error at tile borders is of the same order as elsewhere and small in absolute terms.
#[test]
fn tiles_blend_without_seams() -> TestResult {
    let net = load("esrgan_x4_old.pth")?;
    let (h, w) = (60, 100);
    let x = test_image(h, w)?;
    let whole = net.forward(&x)?;
    let tiled = net.upscale_tiled(&x, 40, 16)?;
    let diff = (&tiled - &whole)?.abs()?;
    let d = diff.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let mean = diff.mean_all()?.to_scalar::<f32>()?;
    let range = whole.flatten_all()?.max(0)?.to_scalar::<f32>()? - whole.flatten_all()?.min(0)?.to_scalar::<f32>()?;
    // Largest jump between neighbouring output columns/rows, tiled vs untiled: a seam would add one.
    let jump = |t: &Tensor, dim: usize| -> candle_core::Result<f32> {
        let n = t.dim(dim)?;
        (t.narrow(dim, 1, n - 1)? - t.narrow(dim, 0, n - 1)?)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    };
    let (jw, jt) = (jump(&whole, 3)?.max(jump(&whole, 2)?), jump(&tiled, 3)?.max(jump(&tiled, 2)?));
    println!("tiled (40/16) vs untiled, esrgan_x4: max|Δ| {d:.2e}, mean|Δ| {mean:.2e}, output range {range:.3}, max neighbour jump {jw:.3} → {jt:.3}");
    // Measured: 4.2e-5 max, 5.9e-7 mean (output range 0.84).
    assert!(d < 1e-3, "tiled output differs from untiled by {d} (range {range})");
    assert!(mean < 2e-5, "tiled output differs from untiled by {mean} on average");
    assert!(jt <= jw * 1.05 + 1e-3, "tiling adds a seam: neighbour jump {jt} vs {jw}");
    Ok(())
}

#[test]
fn tiles_of_a_pixel_unshuffle_model_and_a_3d_image() -> TestResult {
    let net = load("realesrgan_x2_params.pth")?;
    assert_eq!(net.scale(), 2);
    let x = test_image(71, 93)?.squeeze(0)?;
    // 41 is rounded down to 40, a multiple of the unshuffle factor, so tiles need no padding.
    let tiled = net.upscale_tiled(&x, 41, 20)?;
    assert_eq!(tiled.dims(), &[3, 142, 186]);
    let whole = net.forward(&x.unsqueeze(0)?)?.squeeze(0)?;
    let d = max_abs_diff(&tiled, &whole)?;
    println!("tiled (40/20) vs untiled, realesrgan_x2: max|Δ| {d:.2e}");
    // Measured: 1.0e-3 (the overlap is smaller than this model's receptive field).
    assert!(d < 1e-2, "tiled output differs from untiled by {d}");
    let clamped = net.upscale(&x, TileOptions { tile: 40, overlap: 20 })?;
    let (lo, hi) = (clamped.flatten_all()?.min(0)?.to_scalar::<f32>()?, clamped.flatten_all()?.max(0)?.to_scalar::<f32>()?);
    assert!((0.0..=1.0).contains(&lo) && (0.0..=1.0).contains(&hi), "upscale() must clamp to [0, 1]: {lo}..{hi}");
    Ok(())
}

#[test]
fn a_tile_larger_than_the_image_is_the_plain_forward() -> TestResult {
    let net = load("realesrgan_x1.safetensors")?;
    let x = test_image(13, 21)?;
    let d = max_abs_diff(&net.upscale_tiled(&x, 64, 8)?, &net.forward(&x)?)?;
    assert_eq!(d, 0.0);
    Ok(())
}

#[test]
fn cancelling_between_tiles_stops_with_cancelled() -> TestResult {
    let net = load("bsrgan_x2.pth")?;
    let x = test_image(40, 40)?;
    let mut seen = 0;
    let r = net.upscale_tiled_with(&x, TileOptions { tile: 16, overlap: 4 }, &mut |done, _| {
        seen = done;
        if done == 2 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    assert!(matches!(r, Err(Error::Cancelled)), "expected Cancelled, got {r:?}");
    assert_eq!(seen, 2);
    Ok(())
}

#[test]
fn bad_images_and_tile_options_are_rejected() -> TestResult {
    let net = load("bsrgan_x2.pth")?;
    let gray = Tensor::zeros((1, 1, 8, 8), DType::F32, &Device::Cpu)?;
    let e = net.upscale(&gray, TileOptions::default()).err().ok_or("a 1-channel image was accepted")?;
    assert!(matches!(e, Error::InvalidInput(_)) && e.to_string().contains("3-channel"), "{e}");
    let flat = Tensor::zeros((8, 8), DType::F32, &Device::Cpu)?;
    assert!(matches!(net.upscale(&flat, TileOptions::default()), Err(Error::InvalidInput(_))));
    let x = test_image(40, 40)?;
    let e = net.upscale_tiled(&x, 32, 20).err().ok_or("an overlap over half the tile was accepted")?;
    assert!(e.to_string().contains("half the tile"), "{e}");
    assert!(net.forward(&gray).is_err());
    Ok(())
}

/// Writes `tensors` as a safetensors file in a fresh temporary folder.
fn write_safetensors(name: &str, tensors: &[(&str, &[usize])]) -> std::result::Result<PathBuf, Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("sd-esrgan-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let map: HashMap<String, Tensor> =
        tensors.iter().map(|(k, s)| Ok((k.to_string(), Tensor::zeros(*s, DType::F32, &Device::Cpu)?))).collect::<candle_core::Result<_>>()?;
    let path = dir.join(name);
    candle_core::safetensors::save(&map, &path)?;
    Ok(path)
}

fn load_err(path: &Path) -> std::result::Result<Error, String> {
    match RrdbNet::load(path, &Device::Cpu) {
        Ok(_) => Err(format!("{} loaded as an upscaler", path.display())),
        Err(e) => Ok(e),
    }
}

#[test]
fn files_that_are_not_rrdbnets_say_what_they_are() -> TestResult {
    // A Stable Diffusion checkpoint.
    let e = load_err(&fixtures().join("sd15.safetensors"))?;
    let msg = e.to_string();
    assert!(matches!(e, Error::NotAnUpscaler { .. }), "{msg}");
    assert!(msg.contains("is not an ESRGAN/RRDBNet upscaler") && msg.contains("Stable Diffusion"), "{msg}");

    // A SwinIR-style transformer upscaler.
    let swinir = write_safetensors(
        "swinir.safetensors",
        &[("conv_first.weight", &[60, 3, 3, 3]), ("layers.0.residual_group.blocks.0.norm1.weight", &[60]), ("conv_after_body.weight", &[60, 60, 3, 3])],
    )?;
    let msg = load_err(&swinir)?.to_string();
    assert!(msg.contains("SwinIR") && msg.contains("not supported"), "{msg}");
    assert!(RrdbNet::inspect(&swinir).is_err());

    // A Real-ESRGAN compact model.
    let compact = write_safetensors("compact.safetensors", &[("body.0.weight", &[64, 3, 3, 3]), ("body.0.bias", &[64]), ("body.1.weight", &[64])])?;
    let msg = load_err(&compact)?.to_string();
    assert!(msg.contains("SRVGGNetCompact"), "{msg}");

    // Something else entirely.
    let other = write_safetensors("other.safetensors", &[("encoder.weight", &[4, 4])])?;
    let msg = load_err(&other)?.to_string();
    assert!(msg.contains("no conv_first/model.0 weight") && msg.contains("encoder.weight"), "{msg}");

    // An RRDBNet with a tensor missing (a truncated conversion).
    let tensors = candle_core::safetensors::load(model_path("esrgan_x4_basicsr.safetensors"), &Device::Cpu)?;
    let partial: Vec<(String, Tensor)> = tensors.into_iter().filter(|(k, _)| k != "body.1.rdb2.conv3.weight").collect();
    let e = RrdbNet::from_state_dict(partial, &Device::Cpu).err().ok_or("a state dict with a missing tensor loaded")?;
    assert!(e.to_string().contains("body.1.rdb2.conv3.weight") && e.to_string().contains("missing"), "{e}");

    // Not a PyTorch zip file, a missing file and an unknown extension.
    let dir = std::env::temp_dir().join(format!("sd-esrgan-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let legacy = dir.join("legacy.pth");
    std::fs::write(&legacy, b"\x80\x02not a zip archive")?;
    let e = load_err(&legacy)?;
    assert!(matches!(e, Error::UnsupportedFormat { .. }) && e.to_string().contains("safetensors"), "{e}");
    assert!(matches!(load_err(&dir.join("absent.pth"))?, Error::NotFound { .. }));
    let onnx = dir.join("model.onnx");
    std::fs::write(&onnx, b"x")?;
    assert!(matches!(load_err(&onnx)?, Error::UnsupportedFormat { .. }));
    Ok(())
}
