//! FLUX.1 text to image (image to image with `-i`, inpainting with `-i` and `--mask`, Kontext edits with
//! `--reference`):
//! `cargo run --release --example flux -- -m ~/models/FLUX.1-schnell -p "a red fox in the snow"`.

use std::path::{Path, PathBuf};

use clap::Parser;
use sd_core::run::{Edit, ImageToImage, Inpaint, RunContext, Task};
use sd_flux::pipeline::generate;
use sd_flux::lora::parse_lora_spec;
use sd_flux::{load, load_source, FluxFiles, FluxLoadOptions, FluxSource};
use sd_core::image_io::{image_to_tensor, infotext, mask_to_tensor};
use sd_core::run::{random_seed, NoiseKind};
use sd_toolkit::{device, model_name, parse_dtype, progress_bar, save_images, AnyResult};

/// Generate images with FLUX.1 [dev] or [schnell].
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// A diffusers FLUX folder, a transformer file (BFL `flux1-*.safetensors` or `.gguf`), or a
    /// diffusers FLUX repo on the hub, `hub:owner/name[@revision]` (gated repos need `HF_TOKEN`).
    #[arg(long, short = 'm')]
    model: PathBuf,
    /// For a transformer file: the diffusers folder holding the other components
    /// (default: the file's folder).
    #[arg(long)]
    components: Option<PathBuf>,
    /// For a transformer file: the autoencoder (`ae.safetensors` or a `vae/` folder).
    #[arg(long)]
    vae: Option<PathBuf>,
    /// Weight dtype: f32, f16 or bf16 (default: f32 on CPU, bf16 on GPUs).
    #[arg(long)]
    dtype: Option<String>,
    /// Run on the CPU even when a GPU backend is compiled in.
    #[arg(long)]
    cpu: bool,
    /// The prompt.
    #[arg(long, short = 'p', default_value = "")]
    prompt: String,
    /// Sampling steps (default: 28 for dev, 4 for schnell).
    #[arg(long)]
    steps: Option<usize>,
    /// Embedded guidance for dev (default 3.5); schnell ignores it.
    #[arg(long)]
    guidance: Option<f64>,
    /// Seed (default: random).
    #[arg(long)]
    seed: Option<u64>,
    /// Width in pixels (a multiple of 16).
    #[arg(long, default_value_t = 1024)]
    width: usize,
    /// Height in pixels (a multiple of 16).
    #[arg(long, default_value_t = 1024)]
    height: usize,
    /// Images to generate.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// T5 tokens (default: 512 for dev, 256 for schnell).
    #[arg(long)]
    max_sequence_length: Option<usize>,
    /// Noise generator behind the seed: `philox` or `torch` (a diffusers CPU seed reproduces its image).
    #[arg(long, default_value = "philox")]
    noise: String,
    /// An input image for image to image.
    #[arg(long, short = 'i')]
    init_image: Option<PathBuf>,
    /// A mask for inpainting (with `-i`): white pixels are repainted, black ones kept.
    #[arg(long)]
    mask: Option<PathBuf>,
    /// A reference image for a FLUX.1 Kontext edit (the prompt says what to change); it is resized to the
    /// Kontext resolution nearest its aspect ratio, as diffusers does.
    #[arg(long, conflicts_with_all = ["init_image", "mask"])]
    reference: Option<PathBuf>,
    /// Fraction of the schedule re-noised in image to image and inpainting (0 keeps the input, 1
    /// ignores it; default 0.6, or 1.0 when inpainting).
    #[arg(long)]
    strength: Option<f64>,
    /// A FLUX LoRA to merge, as `path.safetensors[:strength]` (strength defaults to 1); repeatable.
    #[arg(long = "lora", value_name = "PATH[:STRENGTH]")]
    loras: Vec<String>,
    /// Output PNG (with `-N` appended for batches).
    #[arg(long, short = 'o', default_value = "flux.png")]
    output: PathBuf,
}

#[cfg(feature = "hub")]
fn load_hub(spec: &str, opts: &FluxLoadOptions) -> AnyResult<sd_flux::FluxModels> {
    let model = sd_models::hub::HubModel::parse(spec)?;
    let hub = sd_toolkit::hub_options(&model, opts.dtype)?;
    Ok(sd_flux::load_from_hub(&model, &hub, opts)?)
}

#[cfg(not(feature = "hub"))]
fn load_hub(spec: &str, _opts: &FluxLoadOptions) -> AnyResult<sd_flux::FluxModels> {
    Err(format!("{spec} is a hub model, but this build has no hub support: build with the default features").into())
}

fn main() -> std::process::ExitCode {
    sd_toolkit::run(body)
}

fn body() -> AnyResult<()> {
    let cli = Cli::parse();
    let opts = FluxLoadOptions {
        dtype: cli.dtype.as_deref().map(parse_dtype).transpose()?,
        device: device(cli.cpu)?,
        loras: cli.loras.iter().map(|s| parse_lora_spec(s)).collect::<Result<_, _>>()?,
        ..FluxLoadOptions::default()
    };
    let t0 = std::time::Instant::now();
    let hub_spec = cli.model.to_str().filter(|s| s.starts_with("hub:"));
    let models = if let Some(spec) = hub_spec {
        load_hub(spec, &opts)?
    } else if cli.model.is_dir() || (cli.components.is_none() && cli.vae.is_none()) {
        load(&cli.model, &opts)?
    } else {
        let repo = cli.components.clone().unwrap_or_else(|| cli.model.parent().unwrap_or(Path::new(".")).to_path_buf());
        load_source(&FluxSource::Files(FluxFiles::with_components_from(&cli.model, cli.vae.clone(), &repo)), &opts)?
    };
    eprintln!("loaded {} in {:.1}s", models.variant, t0.elapsed().as_secs_f64());
    for r in &models.lora_report {
        eprintln!("LoRA {} (strength {}): {} modules merged, {} unmatched", r.path.display(), r.strength, r.applied.len(), r.unmatched.len());
    }

    let mut p = sd_flux::pipeline::default_params(&models, cli.prompt.clone());
    p.steps = cli.steps.unwrap_or(p.steps);
    p.guidance_scale = cli.guidance.unwrap_or(p.guidance_scale);
    p.width = cli.width;
    p.height = cli.height;
    p.batch_size = cli.batch;
    p.max_sequence_length = cli.max_sequence_length;
    p.seed = cli.seed.unwrap_or_else(random_seed);
    p.noise = cli.noise.parse::<NoiseKind>()?;

    let mut bar = progress_bar(p.steps);
    let open = |path: &Path| image::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()));
    let image = cli.init_image.as_deref().map(|path| Ok::<_, String>(image_to_tensor(&open(path)?, p.width, p.height))).transpose()?.transpose()?;
    let mask = cli.mask.as_deref().map(|path| Ok::<_, String>(mask_to_tensor(&open(path)?, p.width, p.height))).transpose()?.transpose()?;
    let strength = cli.strength.unwrap_or(if mask.is_some() { 1.0 } else { 0.6 });
    let references = match cli.reference.as_deref() {
        Some(path) => {
            let img = open(path)?;
            let (w, h) = sd_flux::pipeline::kontext_reference_size(img.width() as usize, img.height() as usize);
            vec![image_to_tensor(&img, w, h)?]
        }
        None => Vec::new(),
    };
    let task = match (&image, &mask) {
        _ if !references.is_empty() => Task::Edit(Edit { images: &references }),
        (Some(image), Some(mask)) => Task::Inpaint(Inpaint { image, mask, strength }),
        (Some(image), None) => Task::ImageToImage(ImageToImage { image, strength }),
        (None, Some(_)) => return Err("--mask needs an input image (-i)".into()),
        (None, None) => Task::TextToImage,
    };
    let t1 = std::time::Instant::now();
    let out = generate(&models, &p, &task, &mut RunContext::with_progress(&mut bar))?;
    // GPU work runs asynchronously: wait for it so the time covers the whole generation.
    models.device.synchronize()?;
    eprintln!("generate: {:.2} s", t1.elapsed().as_secs_f64());

    // A1111-style metadata; "Distilled CFG Scale" is the name Forge gives FLUX's embedded guidance.
    let mut fields = vec![
        ("Steps", p.steps.to_string()),
        ("Sampler", "Euler (flow matching)".to_string()),
        ("Distilled CFG Scale", p.guidance_scale.to_string()),
        ("Seed", out.seed.to_string()),
        ("Size", format!("{}x{}", p.width, p.height)),
        ("Model", model_name(&cli.model.to_string_lossy())),
    ];
    if cli.init_image.is_some() {
        fields.push(("Denoising strength", strength.to_string()));
    }
    let text = infotext(&p.prompt, "", &fields);
    for target in save_images(&out.images, &cli.output, &text)? {
        println!("{} (seed {})", target.display(), out.seed);
    }
    Ok(())
}
