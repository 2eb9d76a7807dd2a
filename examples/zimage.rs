//! Z-Image (Turbo and base) text to image (image to image with `-i`, inpainting with `-i` and `--mask`):
//! `cargo run --release --example zimage -- -m ~/models/Z-Image-Turbo -p "a red fox in the snow"`.
//!
//! `-m` takes a diffusers folder, a transformer `.safetensors` (diffusers or the original layout, as
//! ComfyUI keeps `z_image_turbo_bf16.safetensors`) with `--components` naming a diffusers folder for the
//! rest, or `hub:owner/name`.

use std::path::{Path, PathBuf};

use clap::Parser;
use sd_core::image_io::{image_to_tensor, infotext, mask_to_tensor};
use sd_core::run::{random_seed, ImageToImage, Inpaint, NoiseKind, RunContext, Task};
use sd_zimage::lora::parse_lora_spec;
use sd_zimage::pipeline::{capabilities, generate};
use sd_zimage::{load, load_files, ZImageConfig, ZImageFiles, ZImageLoadOptions, ZImageModels, ZImageVariant};
use sd_toolkit::{device, model_name, parse_dtype, progress_bar, save_images, AnyResult};

/// Generate images with Z-Image.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// A diffusers Z-Image folder, a transformer file, or a diffusers repo on the hub,
    /// `hub:owner/name[@revision]`.
    #[arg(long, short = 'm')]
    model: PathBuf,
    /// For a transformer file: the diffusers folder with the other components (default: the file's folder).
    #[arg(long)]
    components: Option<PathBuf>,
    /// `turbo` or `base` (default: read from the path; Turbo unless it names the base model).
    #[arg(long)]
    variant: Option<String>,
    /// Weight dtype: f32, f16 or bf16 (default: f32 on CPU, bf16 on GPUs; the 6B transformer needs bf16
    /// to fit 24 GB).
    #[arg(long)]
    dtype: Option<String>,
    /// Run on the CPU even when a GPU backend is compiled in.
    #[arg(long)]
    cpu: bool,
    /// The prompt.
    #[arg(long, short = 'p', default_value = "")]
    prompt: String,
    /// The negative prompt.
    #[arg(long, short = 'n', default_value = "")]
    negative_prompt: String,
    /// Sampling steps (default: 9 for Turbo, 50 for base).
    #[arg(long)]
    steps: Option<usize>,
    /// Classifier-free guidance scale (default: 0 for Turbo, 5 for base; 0 runs without CFG).
    #[arg(long)]
    guidance: Option<f64>,
    /// Seed (default: random).
    #[arg(long)]
    seed: Option<u64>,
    /// Width in pixels (a multiple of 16; default 1024).
    #[arg(long)]
    width: Option<usize>,
    /// Height in pixels (a multiple of 16; default 1024).
    #[arg(long)]
    height: Option<usize>,
    /// Images to generate.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Qwen3 prompt tokens (default 512).
    #[arg(long)]
    max_sequence_length: Option<usize>,
    /// A Z-Image LoRA to merge, as `path.safetensors[:strength]` (strength defaults to 1); repeatable.
    #[arg(long = "lora", value_name = "PATH[:STRENGTH]")]
    loras: Vec<String>,
    /// Noise generator behind the seed: `philox` or `torch` (a diffusers CPU seed reproduces its image).
    #[arg(long, default_value = "philox")]
    noise: String,
    /// An input image for image to image.
    #[arg(long, short = 'i')]
    init_image: Option<PathBuf>,
    /// A mask for inpainting (with `-i`): white pixels are repainted, black ones kept.
    #[arg(long)]
    mask: Option<PathBuf>,
    /// Fraction of the schedule re-noised in image to image and inpainting (default 0.6, or 1.0 inpainting).
    #[arg(long)]
    strength: Option<f64>,
    /// Output PNG (with `-N` appended for batches).
    #[arg(long, short = 'o', default_value = "zimage.png")]
    output: PathBuf,
}

#[cfg(feature = "hub")]
fn load_hub(spec: &str, opts: &ZImageLoadOptions) -> AnyResult<ZImageModels> {
    let model = sd_models::hub::HubModel::parse(spec)?;
    let hub = sd_toolkit::hub_options(&model, opts.dtype)?;
    Ok(sd_zimage::load_from_hub(&model, &hub, opts)?)
}

#[cfg(not(feature = "hub"))]
fn load_hub(spec: &str, _opts: &ZImageLoadOptions) -> AnyResult<ZImageModels> {
    Err(format!("{spec} is a hub model, but this build has no hub support: build with the default features").into())
}

fn main() -> std::process::ExitCode {
    sd_toolkit::run(body)
}

fn body() -> AnyResult<()> {
    let cli = Cli::parse();
    let variant = match cli.variant.as_deref() {
        None => None,
        Some("turbo") => Some(ZImageVariant::Turbo),
        Some("base") => Some(ZImageVariant::Base),
        Some(other) => return Err(format!("--variant {other:?}: use turbo or base").into()),
    };
    let mut opts = ZImageLoadOptions {
        dtype: cli.dtype.as_deref().map(parse_dtype).transpose()?,
        device: device(cli.cpu)?,
        variant,
        loras: cli.loras.iter().map(|s| parse_lora_spec(s)).collect::<Result<_, _>>()?,
        ..ZImageLoadOptions::default()
    };
    let t0 = std::time::Instant::now();
    let models = match (cli.model.to_str().filter(|s| s.starts_with("hub:")), &cli.components) {
        (Some(spec), _) => load_hub(spec, &opts)?,
        (None, Some(repo)) if !cli.model.is_dir() => {
            let cfg = repo.join("transformer").join("config.json");
            if cfg.is_file() {
                opts.transformer_config = Some(ZImageConfig::from_file(&cfg)?);
            }
            let files = ZImageFiles::with_components_from(&cli.model, None, repo);
            load_files(&files, variant.unwrap_or_else(|| ZImageVariant::from_path(&cli.model)), &opts)?
        }
        _ => load(&cli.model, &opts)?,
    };
    eprintln!("loaded z-image-{} in {:.1}s", models.variant.name(), t0.elapsed().as_secs_f64());
    for r in &models.lora_report {
        eprintln!("LoRA {} (strength {}): {} modules merged, {} unmatched", r.path.display(), r.strength, r.applied.len(), r.unmatched.len());
    }

    let mut p = capabilities(&models).request(cli.prompt.clone());
    p.negative_prompt = cli.negative_prompt.clone();
    p.steps = cli.steps.unwrap_or(p.steps);
    p.guidance_scale = cli.guidance.unwrap_or(p.guidance_scale);
    p.width = cli.width.unwrap_or(p.width);
    p.height = cli.height.unwrap_or(p.height);
    p.batch_size = cli.batch;
    p.max_sequence_length = cli.max_sequence_length;
    p.seed = cli.seed.unwrap_or_else(random_seed);
    p.noise = cli.noise.parse::<NoiseKind>()?;

    let mut bar = progress_bar(p.steps);
    let open = |path: &Path| image::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()));
    let image = cli.init_image.as_deref().map(|path| Ok::<_, String>(image_to_tensor(&open(path)?, p.width, p.height))).transpose()?.transpose()?;
    let mask = cli.mask.as_deref().map(|path| Ok::<_, String>(mask_to_tensor(&open(path)?, p.width, p.height))).transpose()?.transpose()?;
    let strength = cli.strength.unwrap_or(if mask.is_some() { 1.0 } else { 0.6 });
    let task = match (&image, &mask) {
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

    let mut fields = vec![
        ("Steps", p.steps.to_string()),
        ("Sampler", "Euler".to_string()),
        ("CFG scale", p.guidance_scale.to_string()),
        ("Seed", out.seed.to_string()),
        ("Size", format!("{}x{}", p.width, p.height)),
        ("Model", model_name(&cli.model.to_string_lossy())),
    ];
    if cli.init_image.is_some() {
        fields.push(("Denoising strength", strength.to_string()));
    }
    let text = infotext(&p.prompt, &p.negative_prompt, &fields);
    for target in save_images(&out.images, &cli.output, &text)? {
        println!("{} (seed {})", target.display(), out.seed);
    }
    Ok(())
}
