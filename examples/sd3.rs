//! Stable Diffusion 3 / 3.5 text to image (image to image with `-i`, inpainting with `-i` and `--mask`):
//! `cargo run --release --example sd3 -- -m ~/models/stable-diffusion-3.5-medium -p "a red fox in the snow"`.
//!
//! `-m` takes a diffusers folder, a Stability single file (`sd3.5_medium.safetensors`; its text encoders and
//! VAE are read from the file when it includes them, else from `clip_l*`, `clip_g*`, `t5xxl*` and `*vae*`
//! `.safetensors` files beside it or in ComfyUI's `text_encoders/` and `vae/` folders), or `hub:owner/name`.

use std::path::{Path, PathBuf};

use clap::Parser;
use sd_core::image_io::{image_to_tensor, infotext, mask_to_tensor};
use sd_core::run::{random_seed, ImageToImage, Inpaint, NoiseKind, RunContext, Task};
use sd_sd3::pipeline::{capabilities, generate, SkipLayerGuidance};
use sd_sd3::{load, Sd3LoadOptions, Sd3Models};
use sd_toolkit::{device, model_name, parse_dtype, progress_bar, save_images, AnyResult};

/// Generate images with Stable Diffusion 3 / 3.5.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// A diffusers SD 3.x folder, a Stability single file or a ComfyUI diffusion-model file, or a diffusers
    /// repo on the hub, `hub:owner/name[@revision]` (the SD 3.x repos are gated: set `HF_TOKEN`).
    #[arg(long, short = 'm')]
    model: PathBuf,
    /// For a single file: a diffusers SD 3.x folder with the parts the file lacks (text encoders, VAE,
    /// tokenizers, scheduler).
    #[arg(long)]
    components: Option<PathBuf>,
    /// Leave T5-XXL out (saves ≈ 9 GB in F16, 19 GB in F32; prompts are followed less closely).
    #[arg(long)]
    no_t5: bool,
    /// Weight dtype: f32, f16 or bf16 (default: f32 on CPU, f16 on GPUs; on the CPU bf16 keeps the MMDiT's
    /// weights in bf16 and computes in f32).
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
    /// Sampling steps (default: the model card's: 40 for 3.5 Medium, 28 for Large, 4 for Large Turbo).
    #[arg(long)]
    steps: Option<usize>,
    /// Classifier-free guidance scale (default: 4.5 Medium, 3.5 Large, 0 Large Turbo; ≤ 1 runs without CFG).
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
    /// T5 tokens (default 256, at most 512).
    #[arg(long)]
    max_sequence_length: Option<usize>,
    /// A1111's clip skip (1: diffusers' default, the penultimate CLIP layer).
    #[arg(long, default_value_t = 1)]
    clip_skip: usize,
    /// Skip-layer guidance: blocks to leave out of an extra call (SD 3.5 Medium: `7,8,9`); text to image with CFG.
    #[arg(long, value_delimiter = ',')]
    slg: Vec<usize>,
    /// Skip-layer guidance scale.
    #[arg(long, default_value_t = 2.8)]
    slg_scale: f64,
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
    #[arg(long, short = 'o', default_value = "sd3.png")]
    output: PathBuf,
}

#[cfg(feature = "hub")]
fn load_hub(spec: &str, opts: &Sd3LoadOptions) -> AnyResult<Sd3Models> {
    let model = sd_models::hub::HubModel::parse(spec)?;
    let hub = sd_toolkit::hub_options(&model, opts.dtype)?;
    Ok(sd_sd3::load_from_hub(&model, &hub, opts)?)
}

#[cfg(not(feature = "hub"))]
fn load_hub(spec: &str, _opts: &Sd3LoadOptions) -> AnyResult<Sd3Models> {
    Err(format!("{spec} is a hub model, but this build has no hub support: build with the default features").into())
}

fn main() -> std::process::ExitCode {
    sd_toolkit::run(body)
}

fn body() -> AnyResult<()> {
    let cli = Cli::parse();
    let opts = Sd3LoadOptions {
        dtype: cli.dtype.as_deref().map(parse_dtype).transpose()?,
        device: device(cli.cpu)?,
        components: cli.components.clone(),
        t5: !cli.no_t5,
        ..Sd3LoadOptions::default()
    };
    let t0 = std::time::Instant::now();
    let models = match cli.model.to_str().filter(|s| s.starts_with("hub:")) {
        Some(spec) => load_hub(spec, &opts)?,
        None => load(&cli.model, &opts)?,
    };
    eprintln!("loaded {} in {:.1}s", models.variant, t0.elapsed().as_secs_f64());

    let mut p = capabilities(&models).request(cli.prompt.clone());
    p.negative_prompt = cli.negative_prompt.clone();
    p.steps = cli.steps.unwrap_or(p.steps);
    p.guidance_scale = cli.guidance.unwrap_or(p.guidance_scale);
    p.width = cli.width.unwrap_or(p.width);
    p.height = cli.height.unwrap_or(p.height);
    p.batch_size = cli.batch;
    p.max_sequence_length = cli.max_sequence_length;
    p.clip_skip = cli.clip_skip;
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
    p.skip_layer_guidance = (!cli.slg.is_empty()).then(|| SkipLayerGuidance { scale: cli.slg_scale, ..SkipLayerGuidance::new(cli.slg.clone()) });
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
    if let Some(s) = &p.skip_layer_guidance {
        // Quoted, as A1111 quotes values with commas.
        fields.push(("SLG", format!("\"{}\"", s.summary())));
    }
    let text = infotext(&p.prompt, &p.negative_prompt, &fields);
    for target in save_images(&out.images, &cli.output, &text)? {
        println!("{} (seed {})", target.display(), out.seed);
    }
    Ok(())
}
