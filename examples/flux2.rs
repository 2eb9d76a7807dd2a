//! FLUX.2 [klein] text to image (edits after reference images with `--reference`, repeatable; inpainting with
//! `-i` and `--mask`): `cargo run --release --example flux2 -- -m ~/models/FLUX.2-klein-4B -p "a red fox"`.
//! BFL's or ComfyUI's transformer file works too, its text encoder and VAE beside it (or in ComfyUI's
//! `text_encoders/` and `vae/`) and the tokenizer from `--model-config` (a diffusers klein folder); LoRAs with
//! `--lora PATH[:STRENGTH]`.

use std::path::{Path, PathBuf};

use clap::Parser;
use sd_core::image_io::{image_to_tensor, infotext, mask_to_tensor};
use sd_core::run::{random_seed, Edit, Inpaint, NoiseKind, RunContext, Task};
use sd_flux2::pipeline::{capabilities, generate};
use sd_flux2::{load, Flux2LoadOptions, Flux2Models};
use sd_toolkit::{device, model_name, parse_dtype, progress_bar, save_images, AnyResult};

/// Generate and edit images with FLUX.2 [klein].
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// A diffusers FLUX.2 [klein] folder, a transformer file (BFL's `flux-2-klein-4b.safetensors` or ComfyUI's
    /// diffusion model), or a diffusers repo on the hub, `hub:owner/name[@revision]`.
    #[arg(long, short = 'm')]
    model: PathBuf,
    /// For a transformer file: a diffusers FLUX.2 [klein] folder giving the tokenizer (and whatever else the
    /// files beside it lack).
    #[arg(long)]
    model_config: Option<PathBuf>,
    /// A LoRA merged into the transformer, `PATH[:STRENGTH]` (repeatable; strength defaults to 1).
    #[arg(long = "lora", value_name = "PATH[:STRENGTH]")]
    loras: Vec<String>,
    /// Weight dtype: f32, f16 or bf16 (default: f32 on CPU, bf16 on GPUs).
    #[arg(long)]
    dtype: Option<String>,
    /// Run on the CPU even when a GPU backend is compiled in.
    #[arg(long)]
    cpu: bool,
    /// The prompt.
    #[arg(long, short = 'p', default_value = "")]
    prompt: String,
    /// The negative prompt (the base model's CFG; the distilled klein runs without CFG).
    #[arg(long, short = 'n', default_value = "")]
    negative_prompt: String,
    /// Sampling steps (default: 4 for the distilled klein, 50 for the base model).
    #[arg(long)]
    steps: Option<usize>,
    /// Guidance scale (default: 1 distilled, 4 base).
    #[arg(long)]
    guidance: Option<f64>,
    /// Seed (default: random).
    #[arg(long)]
    seed: Option<u64>,
    /// Width in pixels (a multiple of 16; default 1024, or the first reference's width for an edit).
    #[arg(long)]
    width: Option<usize>,
    /// Height in pixels (a multiple of 16; default 1024, or the first reference's height for an edit).
    #[arg(long)]
    height: Option<usize>,
    /// Images to generate.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Noise generator behind the seed: `philox` or `torch` (a diffusers CPU seed reproduces its image).
    #[arg(long, default_value = "philox")]
    noise: String,
    /// A reference image to edit after (repeatable: several references).
    #[arg(long, conflicts_with_all = ["init_image", "mask"])]
    reference: Vec<PathBuf>,
    /// An input image for inpainting (with `--mask`).
    #[arg(long, short = 'i', requires = "mask")]
    init_image: Option<PathBuf>,
    /// The inpainting mask: white pixels are repainted, black ones kept.
    #[arg(long, requires = "init_image")]
    mask: Option<PathBuf>,
    /// Fraction of the schedule re-noised when inpainting (default 1.0).
    #[arg(long, default_value_t = 1.0)]
    strength: f64,
    /// Output PNG (with `-N` appended for batches).
    #[arg(long, short = 'o', default_value = "flux2.png")]
    output: PathBuf,
}

#[cfg(feature = "hub")]
fn load_hub(spec: &str, opts: &Flux2LoadOptions) -> AnyResult<Flux2Models> {
    let model = sd_models::hub::HubModel::parse(spec)?;
    let hub = sd_toolkit::hub_options(&model, opts.dtype)?;
    Ok(sd_flux2::load_from_hub(&model, &hub, opts)?)
}

#[cfg(not(feature = "hub"))]
fn load_hub(spec: &str, _opts: &Flux2LoadOptions) -> AnyResult<Flux2Models> {
    Err(format!("{spec} is a hub model, but this build has no hub support: build with the default features").into())
}

fn main() -> std::process::ExitCode {
    sd_toolkit::run(body)
}

fn body() -> AnyResult<()> {
    let cli = Cli::parse();
    let opts = Flux2LoadOptions {
        dtype: cli.dtype.as_deref().map(parse_dtype).transpose()?,
        device: device(cli.cpu)?,
        components: cli.model_config.clone(),
        loras: cli.loras.iter().map(|s| sd_flux2::lora::parse_lora_spec(s)).collect::<Result<_, _>>()?,
        ..Flux2LoadOptions::default()
    };
    let t0 = std::time::Instant::now();
    let models = match cli.model.to_str().filter(|s| s.starts_with("hub:")) {
        Some(spec) => load_hub(spec, &opts)?,
        None => load(&cli.model, &opts)?,
    };
    eprintln!("loaded flux2-{} in {:.1}s", models.variant.name(), t0.elapsed().as_secs_f64());
    for r in &models.lora_report {
        eprintln!("LoRA {} ({}): {} modules merged, {} unmatched", r.path.display(), r.strength, r.applied.len(), r.unmatched.len());
    }

    let open = |path: &Path| image::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()));
    let refs = cli.reference.iter().map(|p| open(p)).collect::<Result<Vec<_>, _>>()?;
    let mut p = capabilities(&models).request(cli.prompt.clone());
    p.negative_prompt = cli.negative_prompt.clone();
    p.steps = cli.steps.unwrap_or(p.steps);
    p.guidance_scale = cli.guidance.unwrap_or(p.guidance_scale);
    // An edit defaults to its first reference's size, rounded down to the model's multiple.
    let (dw, dh) = refs.first().map_or((p.width, p.height), |r| ((r.width() as usize / 16) * 16, (r.height() as usize / 16) * 16));
    p.width = cli.width.unwrap_or(dw);
    p.height = cli.height.unwrap_or(dh);
    p.batch_size = cli.batch;
    p.seed = cli.seed.unwrap_or_else(random_seed);
    p.noise = cli.noise.parse::<NoiseKind>()?;

    // References keep their own size (the pipeline center-crops them to multiples of 16).
    let references = refs.iter().map(|r| image_to_tensor(r, r.width() as usize, r.height() as usize)).collect::<Result<Vec<_>, _>>()?;
    let image = cli.init_image.as_deref().map(|path| Ok::<_, String>(image_to_tensor(&open(path)?, p.width, p.height))).transpose()?.transpose()?;
    let mask = cli.mask.as_deref().map(|path| Ok::<_, String>(mask_to_tensor(&open(path)?, p.width, p.height))).transpose()?.transpose()?;
    let task = match (&image, &mask) {
        (Some(image), Some(mask)) => Task::Inpaint(Inpaint { image, mask, strength: cli.strength }),
        _ if !references.is_empty() => Task::Edit(Edit { images: &references }),
        _ => Task::TextToImage,
    };
    let mut bar = progress_bar(p.steps);
    let t1 = std::time::Instant::now();
    let out = generate(&models, &p, &task, &mut RunContext::with_progress(&mut bar))?;
    models.device.synchronize()?;
    eprintln!("generate: {:.2} s", t1.elapsed().as_secs_f64());

    let fields = vec![
        ("Steps", p.steps.to_string()),
        ("Sampler", "Euler".to_string()),
        ("CFG scale", p.guidance_scale.to_string()),
        ("Seed", out.seed.to_string()),
        ("Size", format!("{}x{}", p.width, p.height)),
        ("Model", model_name(&cli.model.to_string_lossy())),
    ];
    let text = infotext(&p.prompt, &p.negative_prompt, &fields);
    for target in save_images(&out.images, &cli.output, &text)? {
        println!("{} (seed {})", target.display(), out.seed);
    }
    Ok(())
}
