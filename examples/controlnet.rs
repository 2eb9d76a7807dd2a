//! Text to image with one or more ControlNets:
//! `cargo run --release --example controlnet -- -m sd15.safetensors --controlnet ./control_canny --control-image edges.png --preprocessor canny -p "a house"`.

use clap::Parser;
use sd_controlnet::preprocess::{prepare_image, tensor_to_rgb, Preprocessor};
use sd_controlnet::{ControlNetHook, ControlNetModel, ControlUnit};
use sd_pipelines::pipeline::{generate, RunContext, SdExtras, Task};
use sd_toolkit::{load_model, model_name, params, progress_bar, save_outputs, AnyResult, GenArgs, ModelArgs};

/// Generate images from a prompt guided by control images.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    gen: GenArgs,
    /// ControlNet: a diffusers folder or a single .safetensors file (A1111/civitai); repeat for several.
    #[arg(long = "controlnet", required = true)]
    controlnets: Vec<std::path::PathBuf>,
    /// Control image for each --controlnet, in the same order.
    #[arg(long = "control-image", required = true)]
    images: Vec<std::path::PathBuf>,
    /// Conditioning scale for each --controlnet (0–2; missing ones default to 1).
    #[arg(long = "control-scale")]
    scales: Vec<f64>,
    /// Preprocessor applied to every control image: none, canny, threshold, scribble, softedge.
    #[arg(long, default_value = "none")]
    preprocessor: String,
    /// Canny thresholds (with --preprocessor canny).
    #[arg(long, num_args = 2, value_names = ["LOW", "HIGH"])]
    canny: Option<Vec<f32>>,
    /// Fraction of the schedule where control starts.
    #[arg(long, default_value_t = 0.0)]
    control_start: f64,
    /// Fraction of the schedule where control ends.
    #[arg(long, default_value_t = 1.0)]
    control_end: f64,
    /// Also save each preprocessed control map next to the output (`<output>.control<i>.png`).
    #[arg(long)]
    save_control: bool,
}

fn main() -> std::process::ExitCode {
    sd_toolkit::run(body)
}

fn body() -> AnyResult<()> {
    let cli = Cli::parse();
    if cli.controlnets.len() != cli.images.len() {
        return Err(format!("{} --controlnet but {} --control-image; give one image per ControlNet", cli.controlnets.len(), cli.images.len()).into());
    }
    let mut pre: Preprocessor = cli.preprocessor.parse()?;
    if let (Preprocessor::Canny { .. }, Some(t)) = (pre, &cli.canny) {
        pre = Preprocessor::Canny { low: t[0], high: t[1] };
    }
    let models = load_model(&cli.model)?;
    let p = params(&models, &cli.gen)?;
    let mut units = Vec::with_capacity(cli.controlnets.len());
    for (i, (dir, path)) in cli.controlnets.iter().zip(&cli.images).enumerate() {
        let model = ControlNetModel::load(dir, models.unet.config(), models.dtype, &models.device)?;
        let picture = image::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let image = prepare_image(&pre.apply(&picture)?, p.width, p.height)?;
        if cli.save_control {
            let out = cli.gen.output.with_extension(format!("control{i}.png"));
            tensor_to_rgb(&image)?.save(&out).map_err(|e| format!("cannot write {}: {e}", out.display()))?;
        }
        let scale = cli.scales.get(i).copied().unwrap_or(1.0);
        units.push(ControlUnit { model, image, scale, start: cli.control_start, end: cli.control_end });
    }
    let mut hook = ControlNetHook::new(units, models.unet.config())?;
    let mut bar = progress_bar(p.steps);
    let extras = SdExtras { control: Some(&mut hook), scheduler: None };
    let out = generate(&models, &p, &Task::TextToImage, &mut RunContext::with_progress(&mut bar), extras)?;
    let extra = [("ControlNet", format!("{} unit(s), preprocessor {}", cli.controlnets.len(), cli.preprocessor))];
    for path in save_outputs(&out, &p, &model_name(&cli.model.spec()), &cli.gen.output, &extra)? {
        println!("{} (seed {})", path.display(), out.seed);
    }
    Ok(())
}
