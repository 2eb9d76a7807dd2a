//! Loads a Stable Diffusion model and reports what it is.
//!
//! ```text
//! cargo run --example load_model -- <path> [--variant sdxl] [--dtype f16] [--cpu] [--inspect-only]
//! cargo run --example load_model -- fixtures/sd15.safetensors --config-from fixtures/sd15
//! ```
//!
//! Prints the detected variant, the stored dtype, parameter counts per component (from the file
//! headers) and how long building every component took.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use sd_models::loader::{self, LoadOptions};
use sd_models::SdVariant;

/// Load a diffusers folder or single-file checkpoint and print what it contains.
#[derive(Debug, Parser)]
struct Args {
    /// A diffusers folder or a single-file `.safetensors` checkpoint.
    path: PathBuf,
    /// Force a variant (sd15, sd15-inpaint, sd21, sd2-inpaint, sd-turbo, sdxl, sdxl-inpaint, sdxl-turbo).
    #[arg(long)]
    variant: Option<String>,
    /// Weight dtype: f32, f16 or bf16 (default: f32 on CPU, f16 on GPUs).
    #[arg(long)]
    dtype: Option<String>,
    /// Stay on the CPU even when CUDA or Metal is available.
    #[arg(long)]
    cpu: bool,
    /// For a single file with a non-standard architecture: read the component configs from this
    /// diffusers folder (like diffusers' `from_single_file(..., config=...)`).
    #[arg(long)]
    config_from: Option<PathBuf>,
    /// Only read headers and configs; do not load weights.
    #[arg(long)]
    inspect_only: bool,
}

fn human(n: usize) -> String {
    if n >= 1_000_000_000 {
        format!("{:.2} B", n as f64 / 1e9)
    } else if n >= 1_000_000 {
        format!("{:.1} M", n as f64 / 1e6)
    } else if n >= 1_000 {
        format!("{:.1} k", n as f64 / 1e3)
    } else {
        n.to_string()
    }
}

fn run(args: Args) -> Result<(), String> {
    let variant = match &args.variant {
        Some(v) => Some(SdVariant::from_name(v).ok_or_else(|| format!("unknown variant {v:?}"))?),
        None => None,
    };
    let info = loader::inspect(&args.path).map_err(|e| e.to_string())?;
    println!("path:       {}", info.path.display());
    println!("format:     {:?}", info.format);
    println!("detected:   {} ({})", info.detection.variant, info.detection.evidence);
    println!("stored as:  {}", info.dtype.map(|d| format!("{d:?}")).unwrap_or_else(|| "unknown".into()));
    for c in &info.components {
        let dtype = c.dtype.map(|d| format!("{d:?}")).unwrap_or_else(|| "?".into());
        println!(
            "  {:<15} {:>10} parameters in {:>5} tensors ({dtype})",
            c.component.to_string(),
            human(c.parameters),
            c.tensors
        );
    }
    println!("  {:<15} {:>10} parameters", "total", human(info.total_parameters()));
    if info.other_tensors > 0 {
        println!("  ({} tensors belong to no component and are ignored)", info.other_tensors);
    }
    if args.inspect_only {
        return Ok(());
    }
    let config = match &args.config_from {
        Some(dir) => Some(loader::read_folder_config(dir, variant).map_err(|e| e.to_string())?),
        None => None,
    };
    let opts = LoadOptions {
        variant,
        dtype: args.dtype.as_deref().map(sd_models::device::parse_dtype).transpose().map_err(|e| e.to_string())?,
        device: sd_toolkit::device(args.cpu).map_err(|e| e.to_string())?,
        config,
        prefer_fp16_files: args.dtype.as_deref().is_some_and(|d| d.contains("16")),
        backend_hook: None,
        vae: None,
        tokenizer_dir: args.config_from.clone(),
    };
    let start = Instant::now();
    let models = loader::load(&args.path, &opts).map_err(|e| e.to_string())?;
    let elapsed = start.elapsed();
    println!("loaded:     {} on {:?} in {:.2?}", models.config.variant, models.device, elapsed);
    println!("dtype:      {:?} (VAE {:?})", models.dtype, models.vae_dtype);
    println!(
        "defaults:   {}x{} px, {} steps, guidance {}, {:?}",
        models.config.default_width,
        models.config.default_height,
        models.config.default_steps,
        models.config.default_guidance,
        models.config.prediction_type()
    );
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
