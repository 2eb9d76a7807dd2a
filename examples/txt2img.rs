//! Text to image: `cargo run --release --example txt2img -- -m model.safetensors -p "a red fox in the snow"`.

use clap::Parser;
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
}

fn main() -> std::process::ExitCode {
    sd_toolkit::run(body)
}

fn body() -> AnyResult<()> {
    let cli = Cli::parse();
    let t0 = std::time::Instant::now();
    let models = load_model(&cli.model)?;
    eprintln!("loaded {} in {:.1}s", models.config.variant, t0.elapsed().as_secs_f64());
    let p = params(&models, &cli.gen)?;
    let mut bar = progress_bar(p.steps);
    let out = generate(&models, &p, &Task::TextToImage, &mut RunContext::with_progress(&mut bar), Default::default())?;
    for path in save_outputs(&out, &p, &model_name(&cli.model.spec()), &cli.gen.output, &[])? {
        println!("{} (seed {})", path.display(), out.seed);
    }
    Ok(())
}
