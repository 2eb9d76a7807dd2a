//! UNet2DConditionModel against diffusers goldens (tiny random-weight fixtures) plus input
//! validation and full-size construction.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use sd_models::unet::{AddedCond, UNet2DConditionModel, UNetConditioning};
use sd_models::{Error, UNetConfig};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// `SD_FIXTURES_DIR` lets the goldens be regenerated elsewhere without touching the repo copy.
fn fixtures() -> PathBuf {
    match std::env::var_os("SD_FIXTURES_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures"),
    }
}

fn load_unet(folder: &str) -> Result<(UNet2DConditionModel, UNetConfig), Box<dyn std::error::Error>> {
    load_unet_as(folder, DType::F32)
}

fn load_unet_as(folder: &str, dtype: DType) -> Result<(UNet2DConditionModel, UNetConfig), Box<dyn std::error::Error>> {
    let dir = fixtures().join(folder).join("unet");
    let cfg: UNetConfig = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
    let weights = dir.join("diffusion_pytorch_model.safetensors");
    // SAFETY: the fixture file is not modified while the test runs.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], dtype, &Device::Cpu)? };
    Ok((UNet2DConditionModel::new(vb, &cfg)?, cfg))
}

struct Golden(std::collections::HashMap<String, Tensor>);

impl Golden {
    fn load(name: &str) -> Result<Self, Box<dyn std::error::Error>> {
        let path = fixtures().join("goldens").join(format!("{name}_unet.safetensors"));
        Ok(Self(candle_core::safetensors::load(path, &Device::Cpu)?))
    }

    fn get(&self, key: &str) -> Result<&Tensor, Box<dyn std::error::Error>> {
        self.0.get(key).ok_or_else(|| format!("golden tensor {key} missing").into())
    }

    fn f32(&self, key: &str) -> Result<Tensor, Box<dyn std::error::Error>> {
        Ok(self.get(key)?.to_dtype(DType::F32)?)
    }

    fn timestep(&self) -> Result<f64, Box<dyn std::error::Error>> {
        Ok(self.f32("timestep")?.flatten_all()?.to_vec1::<f32>()?[0] as f64)
    }

    fn added(&self, time_ids_key: &str) -> Result<Option<AddedCond>, Box<dyn std::error::Error>> {
        if !self.0.contains_key("text_embeds") {
            return Ok(None);
        }
        Ok(Some(AddedCond { text_embeds: self.f32("text_embeds")?, time_ids: self.f32(time_ids_key)? }))
    }

    /// `down_residual_0`, `down_residual_1`, … in index order.
    fn down_residuals(&self) -> Result<Vec<Tensor>, Box<dyn std::error::Error>> {
        let mut out = Vec::new();
        while let Some(t) = self.0.get(&format!("down_residual_{}", out.len())) {
            out.push(t.to_dtype(DType::F32)?);
        }
        if out.is_empty() {
            return Err("golden has no down_residual_* tensors".into());
        }
        Ok(out)
    }
}

fn max_abs(t: &Tensor) -> Result<f32, candle_core::Error> {
    t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

/// Max |ours − golden| ≤ 1e-4 × max(1, max|golden|).
fn assert_close(ours: &Tensor, golden: &Tensor, what: &str) -> TestResult {
    assert_eq!(ours.dims(), golden.dims(), "{what}: shape");
    let diff = max_abs(&(ours - golden)?)?;
    let tol = 1e-4 * max_abs(golden)?.max(1.0);
    assert!(diff <= tol, "{what}: max abs diff {diff} > tolerance {tol}");
    Ok(())
}

fn check_model(folder: &str, golden: &str) -> TestResult {
    let (unet, _) = load_unet(folder)?;
    let g = Golden::load(golden)?;
    let (sample, ehs, t) = (g.f32("sample")?, g.f32("encoder_hidden_states")?, g.timestep()?);
    let cond = UNetConditioning { added: g.added("time_ids")?, ..Default::default() };
    let out = unet.forward(&sample, t, &ehs, &cond)?;
    assert_close(&out, &g.f32("out")?, &format!("{golden} out"))?;

    // The per-batch tensor path must agree with the scalar one.
    let ts = Tensor::new(&[t as f32, t as f32], &Device::Cpu)?;
    let out_t = unet.forward_t(&sample, &ts, &ehs, &cond)?;
    assert_close(&out_t, &out, &format!("{golden} forward_t"))?;

    let with_res = UNetConditioning { down_residuals: Some(g.down_residuals()?), mid_residual: Some(g.f32("mid_residual")?), ..cond };
    let out_res = unet.forward(&sample, t, &ehs, &with_res)?;
    assert_close(&out_res, &g.f32("out_with_residuals")?, &format!("{golden} out_with_residuals"))?;
    Ok(())
}

#[test]
fn sd15_matches_diffusers() -> TestResult {
    check_model("sd15", "sd15")
}

#[test]
fn sd15_inpaint_matches_diffusers() -> TestResult {
    check_model("sd15-inpaint", "sd15_inpaint")
}

#[test]
fn sd2_matches_diffusers() -> TestResult {
    check_model("sd2", "sd2")
}

#[test]
fn sdxl_matches_diffusers() -> TestResult {
    check_model("sdxl", "sdxl")
}

/// Half-precision weights take F32 inputs (converted internally) and stay near the F32 result;
/// the SDXL model also exercises the F32-computed add-embedding cast down to F16.
#[test]
fn f16_weights_track_the_f32_golden() -> TestResult {
    for (folder, golden) in [("sd15", "sd15"), ("sdxl", "sdxl")] {
        let (unet, _) = load_unet_as(folder, DType::F16)?;
        assert_eq!(unet.dtype(), DType::F16);
        let g = Golden::load(golden)?;
        let cond = UNetConditioning { added: g.added("time_ids")?, ..Default::default() };
        let out = unet.forward(&g.f32("sample")?, g.timestep()?, &g.f32("encoder_hidden_states")?, &cond)?;
        assert_eq!(out.dtype(), DType::F16);
        let golden_out = g.f32("out")?;
        let diff = max_abs(&(out.to_dtype(DType::F32)? - &golden_out)?)?;
        let tol = 1e-2 * max_abs(&golden_out)?.max(1.0);
        assert!(diff <= tol, "{golden} in F16: max abs diff {diff} > {tol}");
    }
    Ok(())
}

#[test]
fn sdxl_time_ids_change_the_output() -> TestResult {
    let (unet, _) = load_unet("sdxl")?;
    let g = Golden::load("sdxl")?;
    let (sample, ehs, t) = (g.f32("sample")?, g.f32("encoder_hidden_states")?, g.timestep()?);
    let cond = UNetConditioning { added: g.added("time_ids_changed")?, ..Default::default() };
    let changed = unet.forward(&sample, t, &ehs, &cond)?;
    let golden_changed = g.f32("out_time_ids_changed")?;
    assert_close(&changed, &golden_changed, "sdxl out_time_ids_changed")?;
    let moved = max_abs(&(golden_changed - g.f32("out")?)?)?;
    assert!(moved > 1e-3, "changing time_ids must change the output (max diff {moved})");
    Ok(())
}

#[test]
fn per_batch_timesteps_match_single_steps() -> TestResult {
    let (unet, _) = load_unet("sd15")?;
    let g = Golden::load("sd15")?;
    let (sample, ehs) = (g.f32("sample")?, g.f32("encoder_hidden_states")?);
    let ts = Tensor::new(&[10f32, 700.], &Device::Cpu)?;
    let both = unet.forward_t(&sample, &ts, &ehs, &UNetConditioning::default())?;
    for (i, t) in [10.0, 700.0].into_iter().enumerate() {
        let one = unet.forward_simple(&sample.narrow(0, i, 1)?, t, &ehs.narrow(0, i, 1)?)?;
        assert_close(&both.narrow(0, i, 1)?, &one, &format!("batch item {i}"))?;
    }
    Ok(())
}

fn expect_invalid_input<T: std::fmt::Debug>(r: sd_models::Result<T>, needle: &str) {
    match r {
        Err(Error::InvalidInput(msg)) => assert!(msg.contains(needle), "message {msg:?} should mention {needle:?}"),
        other => panic!("expected Error::InvalidInput mentioning {needle:?}, got {other:?}"),
    }
}

#[test]
fn wrong_channel_count_is_an_error() -> TestResult {
    let (unet, _) = load_unet("sd15")?;
    let ehs = Tensor::zeros((1, 77, 32), DType::F32, &Device::Cpu)?;
    let sample = Tensor::zeros((1, 9, 16, 16), DType::F32, &Device::Cpu)?;
    expect_invalid_input(unet.forward_simple(&sample, 1.0, &ehs), "channels");
    Ok(())
}

#[test]
fn bad_spatial_size_and_context_are_errors() -> TestResult {
    let (unet, _) = load_unet("sd15")?;
    let ehs = Tensor::zeros((1, 77, 32), DType::F32, &Device::Cpu)?;
    let empty = Tensor::zeros((1, 4, 0, 16), DType::F32, &Device::Cpu)?;
    expect_invalid_input(unet.forward_simple(&empty, 1.0, &ehs), "non-empty");
    let sample = Tensor::zeros((1, 4, 16, 16), DType::F32, &Device::Cpu)?;
    let wide = Tensor::zeros((1, 77, 64), DType::F32, &Device::Cpu)?;
    expect_invalid_input(unet.forward_simple(&sample, 1.0, &wide), "encoder_hidden_states");
    let two_batch = Tensor::zeros((2, 77, 32), DType::F32, &Device::Cpu)?;
    expect_invalid_input(unet.forward_simple(&sample, 1.0, &two_batch), "encoder_hidden_states");
    let ts = Tensor::new(&[1f32, 2., 3.], &Device::Cpu)?;
    expect_invalid_input(unet.forward_t(&sample, &ts, &ehs, &UNetConditioning::default()), "timesteps");
    Ok(())
}

#[test]
fn sdxl_without_text_time_is_an_error() -> TestResult {
    let (unet, _) = load_unet("sdxl")?;
    let g = Golden::load("sdxl")?;
    let (sample, ehs) = (g.f32("sample")?, g.f32("encoder_hidden_states")?);
    expect_invalid_input(unet.forward_simple(&sample, 1.0, &ehs), "text_time");
    // A pooled embedding of the wrong width must be rejected rather than fail deep inside a matmul.
    let bad = UNetConditioning {
        added: Some(AddedCond { text_embeds: Tensor::zeros((2, 16), DType::F32, &Device::Cpu)?, time_ids: g.f32("time_ids")? }),
        ..Default::default()
    };
    expect_invalid_input(unet.forward(&sample, 1.0, &ehs, &bad), "text_embeds");
    Ok(())
}

#[test]
fn text_time_on_a_non_sdxl_unet_is_an_error() -> TestResult {
    let (unet, _) = load_unet("sd15")?;
    let sample = Tensor::zeros((1, 4, 16, 16), DType::F32, &Device::Cpu)?;
    let ehs = Tensor::zeros((1, 77, 32), DType::F32, &Device::Cpu)?;
    let cond = UNetConditioning {
        added: Some(AddedCond {
            text_embeds: Tensor::zeros((1, 32), DType::F32, &Device::Cpu)?,
            time_ids: Tensor::zeros((1, 6), DType::F32, &Device::Cpu)?,
        }),
        ..Default::default()
    };
    expect_invalid_input(unet.forward(&sample, 1.0, &ehs, &cond), "text_time");
    Ok(())
}

#[test]
fn wrong_residuals_are_errors() -> TestResult {
    let (unet, _) = load_unet("sd15")?;
    let g = Golden::load("sd15")?;
    let (sample, ehs) = (g.f32("sample")?, g.f32("encoder_hidden_states")?);
    let mut residuals = g.down_residuals()?;
    assert_eq!(residuals.len(), unet.down_residual_shapes(2, 16, 16).len());
    for (r, e) in residuals.iter().zip(unet.down_residual_shapes(2, 16, 16)) {
        assert_eq!(r.dims(), e, "down_residual_shapes must describe diffusers' skips");
    }
    let last = residuals.pop().ok_or("no residuals")?;
    let short = UNetConditioning { down_residuals: Some(residuals.clone()), ..Default::default() };
    expect_invalid_input(unet.forward(&sample, 1.0, &ehs, &short), "down residuals");

    // Right count, one wrong shape.
    residuals.push(Tensor::zeros((2, 3, 4, 4), DType::F32, &Device::Cpu)?);
    let misshaped = UNetConditioning { down_residuals: Some(residuals.clone()), ..Default::default() };
    expect_invalid_input(unet.forward(&sample, 1.0, &ehs, &misshaped), "down residual");
    residuals.pop();
    residuals.push(last);

    let bad_mid = UNetConditioning {
        down_residuals: Some(residuals),
        mid_residual: Some(Tensor::zeros((2, 64, 8, 8), DType::F32, &Device::Cpu)?),
        ..Default::default()
    };
    expect_invalid_input(unet.forward(&sample, 1.0, &ehs, &bad_mid), "mid residual");
    Ok(())
}

#[test]
fn invalid_configs_are_rejected_at_load() {
    let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
    let mut cfg = UNetConfig::sd15(4);
    cfg.block_out_channels = vec![32, 64, 64];
    assert!(UNet2DConditionModel::new(vb.clone(), &cfg).is_err(), "block count mismatch must fail");
    let mut cfg = UNetConfig::sd15(4);
    cfg.down_block_types[0] = "SimpleCrossAttnDownBlock2D".into();
    assert!(UNet2DConditionModel::new(vb.clone(), &cfg).is_err(), "unknown block type must fail");
    let mut cfg = UNetConfig::sdxl(4);
    cfg.addition_time_embed_dim = None;
    assert!(UNet2DConditionModel::new(vb, &cfg).is_err(), "text_time without its dims must fail");
}

/// Full-size configs must wire up with the real channel/head counts. Zero F32 weights are
/// lazily-mapped zero pages, so this costs address space, not memory — as long as every model
/// stays alive: freed weights would be recycled by the allocator and zeroed by hand, touching
/// gigabytes.
#[test]
fn full_size_configs_construct() -> TestResult {
    let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
    let models = [UNetConfig::sd15(9), UNetConfig::sd2(4, 96), UNetConfig::sdxl(4)]
        .iter()
        .map(|cfg| UNet2DConditionModel::new(vb.clone(), cfg))
        .collect::<Result<Vec<_>, _>>()?;
    assert_eq!(models[2].down_residual_shapes(1, 128, 128).len(), 9, "SDXL has 9 skip connections");
    Ok(())
}

/// A full-size SD 1.5 forward on an 8×8 latent runs in well under a second and checks that every
/// shape lines up at the real sizes (zero weights give a zero output).
#[test]
fn full_size_sd15_forward_on_small_latent() -> TestResult {
    let dev = Device::Cpu;
    let unet = UNet2DConditionModel::new(VarBuilder::zeros(DType::F32, &dev), &UNetConfig::sd15(4))?;
    let sample = Tensor::randn(0f32, 1., (2, 4, 8, 8), &dev)?;
    let ehs = Tensor::randn(0f32, 1., (2, 77, 768), &dev)?;
    let out = unet.forward_simple(&sample, 500.0, &ehs)?;
    assert_eq!(out.dims(), &[2, 4, 8, 8]);
    Ok(())
}


/// Latents whose sides are not multiples of 2^(levels−1) (images that are multiples of 8 but not
/// of 64) work as in diffusers: the up path resizes to each skip's size.
#[test]
fn odd_latent_sizes_match_diffusers() -> TestResult {
    for name in ["sd15", "sdxl"] {
        let (unet, _) = load_unet(name)?;
        let g = Golden::load(name)?;
        let ehs = g.f32("encoder_hidden_states")?.narrow(0, 0, 1)?;
        let added = g.added("time_ids")?.map(|a| -> Result<AddedCond, candle_core::Error> {
            Ok(AddedCond { text_embeds: a.text_embeds.narrow(0, 0, 1)?, time_ids: a.time_ids.narrow(0, 0, 1)? })
        });
        let cond = UNetConditioning { added: added.transpose()?, ..Default::default() };
        let out = unet.forward(&g.f32("sample_odd")?, g.timestep()?, &ehs, &cond)?;
        assert_close(&out, &g.f32("out_odd")?, &format!("{name} odd-size output"))?;
        let shapes = unet.down_residual_shapes(1, 10, 14);
        assert_eq!(shapes.last().map(|s| [s[2], s[3]]), Some([3, 4]), "{name}: residual shapes round up");
    }
    Ok(())
}
