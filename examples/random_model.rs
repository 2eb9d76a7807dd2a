//! Writes a full-size model with random weights as a diffusers folder, fp16 files as the hub ships
//! them, for timing and memory runs without downloading a checkpoint:
//! `cargo run --release --example random_model -- --variant sd-turbo -o /tmp/sd-turbo-random`, then
//! `cargo run --release --example txt2img -- -m /tmp/sd-turbo-random --variant sd-turbo -p "a fox"`.

use std::path::{Path, PathBuf};

use candle_core::DType;
use clap::Parser;
use sd_models::clip::ClipTextModel;
use sd_models::unet::UNet2DConditionModel;
use sd_models::vae::AutoencoderKL;
use sd_models::SdVariant;
use sd_toolkit::random::{recording_vb, Recorded};
use sd_toolkit::{parse_dtype, AnyResult};

/// Write a random-weight model in the diffusers layout.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// The variant whose published architecture to build (sd15, sd21, sd-turbo, sdxl, …).
    #[arg(long, default_value = "sd-turbo")]
    variant: String,
    /// Stored dtype: f16 (written as `*.fp16.safetensors`, as on the hub), bf16 or f32.
    #[arg(long, default_value = "f16")]
    dtype: String,
    /// Output folder.
    #[arg(long, short = 'o')]
    output: PathBuf,
}

fn main() -> std::process::ExitCode {
    sd_toolkit::run(body)
}

fn save(record: &Recorded, dtype: DType, dir: &Path, base: &str) -> AnyResult<()> {
    std::fs::create_dir_all(dir)?;
    let suffix = if dtype == DType::F16 { ".fp16" } else { "" };
    let map = record.lock().map_err(|_| "weight recorder poisoned")?;
    let converted = map.iter().map(|(k, t)| Ok((k.clone(), t.to_dtype(dtype)?))).collect::<candle_core::Result<Vec<_>>>()?;
    candle_core::safetensors::save(&converted.into_iter().collect(), dir.join(format!("{base}{suffix}.safetensors")))?;
    Ok(())
}

fn write_json(path: &Path, value: &impl serde::Serialize) -> AnyResult<()> {
    std::fs::create_dir_all(path.parent().unwrap_or(Path::new(".")))?;
    std::fs::write(path, serde_json::to_string_pretty(value)?)?;
    Ok(())
}

fn body() -> AnyResult<()> {
    let cli = Cli::parse();
    let variant = SdVariant::from_name(&cli.variant).ok_or_else(|| format!("unknown variant {:?}", cli.variant))?;
    let dtype = parse_dtype(&cli.dtype)?;
    let cfg = variant.config();
    let out = &cli.output;
    let t0 = std::time::Instant::now();

    let (vb, rec) = recording_vb(DType::F32);
    UNet2DConditionModel::new(vb, &cfg.unet)?;
    save(&rec, dtype, &out.join("unet"), "diffusion_pytorch_model")?;
    drop(rec);
    write_json(&out.join("unet/config.json"), &cfg.unet)?;

    let (vb, rec) = recording_vb(DType::F32);
    AutoencoderKL::new(vb, &cfg.vae)?;
    save(&rec, dtype, &out.join("vae"), "diffusion_pytorch_model")?;
    write_json(&out.join("vae/config.json"), &cfg.vae)?;

    let encoders = [Some(&cfg.text_encoder), cfg.text_encoder_2.as_ref()];
    for (folder, enc) in ["text_encoder", "text_encoder_2"].into_iter().zip(encoders) {
        let Some(enc) = enc else { continue };
        let (vb, rec) = recording_vb(DType::F32);
        ClipTextModel::new(vb, enc)?;
        save(&rec, dtype, &out.join(folder), "model")?;
        write_json(&out.join(folder).join("config.json"), enc)?;
    }
    write_json(&out.join("scheduler/scheduler_config.json"), &cfg.scheduler)?;
    write_json(
        &out.join("model_index.json"),
        &serde_json::json!({
            "_class_name": if cfg.text_encoder_2.is_some() { "StableDiffusionXLPipeline" } else { "StableDiffusionPipeline" },
            "note": format!("random weights in the {variant} architecture, written by sd-toolkit's random_model example")
        }),
    )?;
    println!("{} ({variant}, {:?} files) in {:.1}s", out.display(), dtype, t0.elapsed().as_secs_f64());
    Ok(())
}
