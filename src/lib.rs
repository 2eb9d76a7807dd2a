//! Shared command-line plumbing for the workspace examples (not published): model/device/dtype
//! arguments, the generation arguments every example takes, and an indicatif progress bar.

pub mod random;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use candle_core::{DType, Device};
use clap::Args;
use sd_models::loader::{load, LoadOptions, StableDiffusionModels};
use sd_lora::LoraSet;
use sd_models::{SdVariant, DEFAULT_MODEL_REPO};
use sd_pipelines::image_io::{a1111_parameters, save_png, tensor_to_images};
use sd_pipelines::pipeline::{GenerationOutput, GenerationParams, NoiseKind, StepProgress};
use sd_pipelines::schedulers::Sampler;

/// Boxed error for example `main`s.
pub type AnyResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Runs an example's body and turns its error into a sentence on stderr (the error's `Display`
/// and its causes, never a `Debug` dump) and a non-zero exit status.
pub fn run(body: impl FnOnce() -> AnyResult<()>) -> ExitCode {
    match body() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", error_report(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// `error: <message>` plus one `caused by:` line per source whose text the message does not
/// already contain (most of our errors quote their cause).
pub fn error_report(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = format!("error: {e}");
    let mut shown = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !shown.contains(&text) {
            out.push_str(&format!("\n  caused by: {text}"));
            shown.push_str(&text);
        }
        source = cause.source();
    }
    out
}

/// Where the model comes from and how it is placed.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// A diffusers folder, a single-file `.safetensors` checkpoint, or a Hugging Face model
    /// `hub:owner/name[/file.safetensors][@revision]` (a diffusers repo or a single-file repo).
    /// Default: hub:stabilityai/sd-turbo (downloaded once, ≈ 2.6 GB; non-commercial license).
    #[arg(long, short = 'm')]
    pub model: Option<String>,
    /// Force a variant (sd15, sd15-inpaint, sd21, sd2-inpaint, sd-turbo, sdxl, sdxl-inpaint, sdxl-turbo); default: detect.
    #[arg(long)]
    pub variant: Option<String>,
    /// Weight dtype: f32, f16 or bf16 (default: f32 on CPU, f16 on GPUs).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Run on the CPU even when a GPU backend is compiled in.
    #[arg(long)]
    pub cpu: bool,
    /// A LoRA to merge, as `path.safetensors[:strength]` (strength defaults to 1, may be negative); repeatable.
    #[arg(long = "lora", value_name = "PATH[:STRENGTH]")]
    pub loras: Vec<String>,
    /// A VAE to use instead of the model's own: a diffusers `vae/` folder or a `.safetensors` file
    /// (e.g. `vae-ft-mse-840000-ema-pruned.safetensors`, `sdxl_vae_fp16_fix`).
    #[arg(long)]
    pub vae: Option<std::path::PathBuf>,
    /// Textual-inversion embeddings prompts may name by file stem (A1111 `.pt`, `.safetensors`, diffusers
    /// `.bin`): a file, or a folder searched recursively; repeatable. Those for another model are skipped.
    #[arg(long = "embeddings", value_name = "FILE_OR_DIR")]
    pub embeddings: Vec<std::path::PathBuf>,
}

/// The generation settings every example shares.
#[derive(Debug, Args)]
pub struct GenArgs {
    /// The prompt (A1111 weights like `(word:1.3)` and `BREAK` work).
    #[arg(long, short = 'p', default_value = "")]
    pub prompt: String,
    /// The negative prompt.
    #[arg(long, short = 'n', default_value = "")]
    pub negative: String,
    /// Sampling steps (default: the model's).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Sampler, A1111 names accepted: "Euler a", "DPM++ 2M Karras", "DDIM", "UniPC", …
    #[arg(long, default_value = "Euler")]
    pub sampler: String,
    /// Guidance scale (default: the model's; ≤ 1 disables guidance).
    #[arg(long)]
    pub guidance: Option<f64>,
    /// Seed (default: random).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Width in pixels (default: the model's).
    #[arg(long)]
    pub width: Option<usize>,
    /// Height in pixels (default: the model's).
    #[arg(long)]
    pub height: Option<usize>,
    /// Images to generate.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Clip skip, A1111 style (1 = last layer).
    #[arg(long, default_value_t = 1)]
    pub clip_skip: usize,
    /// Noise generator behind the seed: `philox` (same image on every device) or `torch`
    /// (PyTorch's CPU generator: a diffusers seed reproduces its image).
    #[arg(long, default_value = "philox")]
    pub noise: String,
    /// Output PNG (with `-N` appended for batches).
    #[arg(long, short = 'o', default_value = "out.png")]
    pub output: PathBuf,
}

/// Picks the device: CUDA or Metal when compiled in and present, unless `cpu`; a GPU build on a
/// machine without a usable GPU says so and runs on the CPU.
pub fn device(cpu: bool) -> AnyResult<Device> {
    if cpu {
        return Ok(Device::Cpu);
    }
    let (device, fallback) = sd_models::device::auto_device(0);
    if let Some(why) = fallback {
        eprintln!("note: {why}");
    }
    Ok(device)
}

/// Parses `f32`/`f16`/`bf16` (the one parser, shared with the worker).
pub use sd_models::device::parse_dtype;

impl ModelArgs {
    /// The model as given, or the default hub model's `hub:` name.
    pub fn spec(&self) -> String {
        match &self.model {
            Some(m) => m.clone(),
            None => format!("hub:{DEFAULT_MODEL_REPO}"),
        }
    }
}

/// Loads the model the arguments name.
pub fn load_model(args: &ModelArgs) -> AnyResult<StableDiffusionModels> {
    let variant = match &args.variant {
        Some(v) => Some(SdVariant::from_name(v).ok_or_else(|| format!("unknown variant {v:?}"))?),
        None => None,
    };
    let loras = LoraSet::from_specs(&args.loras).map_err(|e| e.to_string())?;
    let opts = LoadOptions {
        variant,
        dtype: args.dtype.as_deref().map(parse_dtype).transpose()?,
        device: device(args.cpu)?,
        backend_hook: (!loras.is_empty()).then(|| loras.backend_hook()),
        vae: args.vae.clone(),
        ..LoadOptions::default()
    };
    let mut models = load_with(args, opts)?;
    for file in sd_families::embedding_files(&args.embeddings) {
        match models.add_embedding(&file) {
            Ok(e) => eprintln!("embedding {} ({} vectors)", e.name, e.len()),
            Err(e) => eprintln!("embedding {} skipped: {e}", file.display()),
        }
    }
    for a in loras.report().adapters {
        eprintln!(
            "LoRA {} (strength {}): {} modules merged{}",
            a.path.display(),
            a.strength,
            a.applied.len(),
            if a.unmatched.is_empty() { String::new() } else { format!(", {} unmatched (ignored)", a.unmatched.len()) }
        );
    }
    Ok(models)
}

fn load_with(args: &ModelArgs, opts: LoadOptions) -> AnyResult<StableDiffusionModels> {
    let spec = args.spec();
    if spec.starts_with("hub:") {
        return load_hub(&spec, opts);
    }
    Ok(load(Path::new(&spec), &opts)?)
}

#[cfg(feature = "hub")]
fn load_hub(spec: &str, mut opts: LoadOptions) -> AnyResult<StableDiffusionModels> {
    let model = sd_models::hub::HubModel::parse(spec)?;
    if model.is_default_model() && opts.variant.is_none() {
        opts.variant = Some(sd_models::DEFAULT_MODEL_VARIANT);
    }
    let hub = hub_options(&model, opts.dtype)?;
    Ok(sd_models::loader::load_from_hub(&model, &hub, &opts)?)
}

/// Hub options from the environment for fetching `model`, announced on stderr.
#[cfg(feature = "hub")]
pub fn hub_options(model: &sd_models::hub::HubModel, dtype: Option<DType>) -> AnyResult<sd_models::hub::HubOptions> {
    let hub = sd_models::hub::HubOptions::from_env()?.for_dtype(dtype);
    eprintln!("model {model} (Hugging Face cache: {}{})", hub.cache_dir.display(), if hub.offline { ", offline" } else { "" });
    Ok(hub)
}

#[cfg(not(feature = "hub"))]
fn load_hub(spec: &str, _opts: LoadOptions) -> AnyResult<StableDiffusionModels> {
    Err(format!("{spec} is a hub model, but this build has no hub support: build with the default features, or pass a local path with -m").into())
}

/// Generation parameters from the arguments, with the model's defaults filling the gaps.
pub fn params(models: &StableDiffusionModels, g: &GenArgs) -> AnyResult<GenerationParams> {
    let mut p = sd_pipelines::pipeline::default_params(models, g.prompt.clone());
    p.negative_prompt = g.negative.clone();
    p.steps = g.steps.unwrap_or(p.steps);
    p.guidance_scale = g.guidance.unwrap_or(p.guidance_scale);
    p.width = g.width.unwrap_or(p.width);
    p.height = g.height.unwrap_or(p.height);
    p.batch_size = g.batch;
    p.clip_skip = g.clip_skip;
    p.sampler = g.sampler.parse::<Sampler>()?;
    p.seed = g.seed.unwrap_or_else(sd_pipelines::pipeline::random_seed);
    p.noise = g.noise.parse::<NoiseKind>()?;
    Ok(p)
}

/// A progress callback that drives an indicatif bar (and never cancels).
pub fn progress_bar(total: usize) -> impl FnMut(&StepProgress<'_>) -> ControlFlow<()> {
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} steps ({per_sec}, eta {eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    move |s: &StepProgress<'_>| {
        bar.set_length(s.total as u64);
        bar.set_position(s.step as u64);
        if s.step == s.total {
            bar.finish();
        }
        ControlFlow::Continue(())
    }
}

/// Writes every image of a run as PNG with A1111 `parameters` metadata; returns the paths.
pub fn save_outputs(out: &GenerationOutput, p: &GenerationParams, model: &str, path: &Path, extra: &[(&str, String)]) -> AnyResult<Vec<PathBuf>> {
    let mut params = p.clone();
    params.seed = out.seed;
    save_images(&out.images, path, &a1111_parameters(&params, model, extra))
}

/// Writes the images `[b, 3, h, w]` in [0, 1] as PNGs carrying `parameters` text: at `path` for one image,
/// else as `<stem>-<i>.png` beside it; returns the paths.
pub fn save_images(images: &candle_core::Tensor, path: &Path, parameters: &str) -> AnyResult<Vec<PathBuf>> {
    let images = tensor_to_images(images)?;
    let mut paths = Vec::new();
    for (i, img) in images.iter().enumerate() {
        let target = if images.len() == 1 {
            path.to_path_buf()
        } else {
            let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("out");
            path.with_file_name(format!("{stem}-{i}.png"))
        };
        save_png(img, &target, Some(parameters))?;
        paths.push(target);
    }
    Ok(paths)
}

/// The model's name for metadata: the file or folder name.
pub fn model_name(model: &str) -> String {
    Path::new(model).file_stem().and_then(|s| s.to_str()).unwrap_or(model).to_string()
}
