//! Text to image: `cargo run --release --example txt2img -- -m model.safetensors -p "a red fox in the snow"`.
//! A1111's hires fix: add `--hires-scale 2` (and `--hires-upscaler Latent|"Latent (nearest)"|Lanczos|Nearest`
//! or an ESRGAN-family model file such as `RealESRGAN_x4plus.pth`, `--hires-steps`, `--hires-strength`).

use clap::Parser;
use sd_pipelines::hires::{generate_hires, EsrganUpscaler, HiresFix, HiresUpscaler};
use sd_pipelines::pipeline::{generate, RunContext, Task};
use sd_toolkit::{load_model, model_name, params, progress_bar, save_outputs, AnyResult, GenArgs, ModelArgs};

/// Generate images from a prompt.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    gen: GenArgs,
    /// Hires fix: render at the size given, upscale by this factor and re-generate (A1111's `hr_scale`).
    #[arg(long)]
    hires_scale: Option<f64>,
    /// Hires fix upscaler: `Latent`, `Latent (nearest)`, `Lanczos`, `Nearest`, or the path of an ESRGAN-family
    /// model (`.pth` or `.safetensors`).
    #[arg(long, default_value = "Latent")]
    hires_upscaler: String,
    /// Hires fix second-pass steps (default: the first pass's).
    #[arg(long)]
    hires_steps: Option<usize>,
    /// Hires fix denoising strength.
    #[arg(long, default_value_t = 0.7)]
    hires_strength: f64,
}

fn main() -> std::process::ExitCode {
    sd_toolkit::run(body)
}

fn body() -> AnyResult<()> {
    let cli = Cli::parse();
    let t0 = std::time::Instant::now();
    let models = load_model(&cli.model)?;
    eprintln!("loaded {} in {:.1}s", models.config.variant, t0.elapsed().as_secs_f64());
    if models.device.is_cpu() {
        // Benchmarks (tools/bench_e2e.sh) record which instruction-set path produced their numbers.
        eprintln!("CPU kernels: {} path (CPU has: {})", sd_models::ops::cpu::cpu_path().name(), sd_models::ops::cpu::cpu_features());
    }
    let p = params(&models, &cli.gen)?;
    let mut bar = progress_bar(p.steps);
    let mut extra = Vec::new();
    let t1 = std::time::Instant::now();
    let out = match cli.hires_scale {
        Some(scale) => {
            let file = std::path::Path::new(&cli.hires_upscaler);
            let (upscaler, esrgan) = if file.is_file() {
                let net = sd_models::esrgan::RrdbNet::load(file, &models.device)?;
                let name = file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                (HiresUpscaler::Esrgan, Some(EsrganUpscaler { name, path: file.to_path_buf(), net: Some(std::sync::Arc::new(net)) }))
            } else {
                (cli.hires_upscaler.parse::<HiresUpscaler>()?, None)
            };
            let mut hr = HiresFix::scaled(&p, scale, upscaler, cli.hires_strength)?;
            hr.steps = cli.hires_steps;
            let upscaler_name = esrgan.as_ref().map_or_else(|| upscaler.name().to_string(), |e| e.name.clone());
            hr.esrgan = esrgan;
            extra.extend([
                ("Denoising strength", hr.strength.to_string()),
                ("Hires upscale", scale.to_string()),
                ("Hires upscaler", upscaler_name),
            ]);
            if let Some(s) = hr.steps {
                extra.push(("Hires steps", s.to_string()));
            }
            generate_hires(&models, &p, &hr, &mut RunContext::with_progress(&mut bar))?
        }
        None => generate(&models, &p, &Task::TextToImage, &mut RunContext::with_progress(&mut bar), Default::default())?,
    };
    // GPU work runs asynchronously: wait for it so the time covers the whole generation.
    models.device.synchronize()?;
    eprintln!("generate: {:.2} s", t1.elapsed().as_secs_f64());
    let extra: Vec<(&str, String)> = extra.into_iter().collect();
    for path in save_outputs(&out, &p, &model_name(&cli.model.spec()), &cli.gen.output, &extra)? {
        println!("{} (seed {})", path.display(), out.seed);
    }
    Ok(())
}
