//! Inpainting: `cargo run --release --example inpaint -- -m sd-v1-5-inpainting.safetensors -i in.png --mask mask.png -p "a cat"`.
//! White mask pixels are repainted. 9-channel inpainting models and ordinary models both work.

use clap::Parser;
use sd_pipelines::image_io::{image_to_tensor, mask_to_tensor};
use sd_pipelines::pipeline::{generate, Inpaint, RunContext, Task};
use sd_toolkit::{load_model, model_name, params, progress_bar, save_outputs, AnyResult, GenArgs, ModelArgs};

/// Repaint the white part of a mask.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    gen: GenArgs,
    /// Input image.
    #[arg(long, short = 'i')]
    image: std::path::PathBuf,
    /// Mask image (white = repaint), resized to the image size.
    #[arg(long)]
    mask: std::path::PathBuf,
    /// Fraction of the schedule re-noised (1 repaints from pure noise).
    #[arg(long, default_value_t = 1.0)]
    strength: f64,
}

fn main() -> std::process::ExitCode {
    sd_toolkit::run(body)
}

fn body() -> AnyResult<()> {
    let mut cli = Cli::parse();
    let input = image::open(&cli.image).map_err(|e| format!("cannot open {}: {e}", cli.image.display()))?;
    let mask = image::open(&cli.mask).map_err(|e| format!("cannot open {}: {e}", cli.mask.display()))?;
    cli.gen.width = cli.gen.width.or(Some(input.width() as usize / 8 * 8));
    cli.gen.height = cli.gen.height.or(Some(input.height() as usize / 8 * 8));
    let models = load_model(&cli.model)?;
    let p = params(&models, &cli.gen)?;
    let image = image_to_tensor(&input, p.width, p.height)?;
    let mask = mask_to_tensor(&mask, p.width, p.height)?;
    let task = Task::Inpaint(Inpaint { image: &image, mask: &mask, strength: cli.strength });
    let out = generate(&models, &p, &task, &mut RunContext::with_progress(&mut progress_bar(p.steps)), Default::default())?;
    let extra = [("Denoising strength", cli.strength.to_string())];
    for path in save_outputs(&out, &p, &model_name(&cli.model.spec()), &cli.gen.output, &extra)? {
        println!("{} (seed {})", path.display(), out.seed);
    }
    Ok(())
}
