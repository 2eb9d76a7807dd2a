//! Image to image: `cargo run --release --example img2img -- -m model.safetensors -i in.png -p "oil painting" --strength 0.6`.

use clap::Parser;
use sd_pipelines::image_io::image_to_tensor;
use sd_pipelines::pipeline::{generate, ImageToImage, RunContext, Task};
use sd_toolkit::{load_model, model_name, params, progress_bar, save_outputs, AnyResult, GenArgs, ModelArgs};

/// Re-generate an image guided by a prompt.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    gen: GenArgs,
    /// Input image (resized to --width × --height; default: its own size rounded down to a multiple of 8).
    #[arg(long, short = 'i')]
    image: std::path::PathBuf,
    /// Fraction of the schedule re-noised: 0 keeps the image, 1 ignores it.
    #[arg(long, default_value_t = 0.6)]
    strength: f64,
}

fn main() -> std::process::ExitCode {
    sd_toolkit::run(body)
}

fn body() -> AnyResult<()> {
    let mut cli = Cli::parse();
    let input = image::open(&cli.image).map_err(|e| format!("cannot open {}: {e}", cli.image.display()))?;
    cli.gen.width = cli.gen.width.or(Some(input.width() as usize / 8 * 8));
    cli.gen.height = cli.gen.height.or(Some(input.height() as usize / 8 * 8));
    let models = load_model(&cli.model)?;
    let p = params(&models, &cli.gen)?;
    let image = image_to_tensor(&input, p.width, p.height)?;
    let task = Task::ImageToImage(ImageToImage { image: &image, strength: cli.strength });
    let out = generate(&models, &p, &task, &mut RunContext::with_progress(&mut progress_bar(p.steps)), Default::default())?;
    let extra = [("Denoising strength", cli.strength.to_string())];
    for path in save_outputs(&out, &p, &model_name(&cli.model.spec()), &cli.gen.output, &extra)? {
        println!("{} (seed {})", path.display(), out.seed);
    }
    Ok(())
}
