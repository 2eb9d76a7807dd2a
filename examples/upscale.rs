//! Upscale an image with an ESRGAN-family model (ESRGAN, Real-ESRGAN, BSRGAN, 4x-UltraSharp, …):
//! `cargo run --release --example upscale -- --model RealESRGAN_x4plus.pth --input in.png --output out.png [--tile 192] [--overlap 32]`.

use std::ops::ControlFlow;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use clap::Parser;
use image::imageops::FilterType;
use sd_models::esrgan::{RrdbNet, TileOptions};
use sd_pipelines::image_io::{save_png, tensor_to_images};
use sd_toolkit::AnyResult;

/// Upscale an image with an ESRGAN/RRDBNet model (`.pth` or `.safetensors`).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// The upscaler model: old ESRGAN, BasicSR/Real-ESRGAN (`params_ema`) or BSRGAN layout.
    #[arg(long, short = 'm')]
    model: PathBuf,
    /// The image to upscale (PNG or JPEG; an alpha channel is dropped).
    #[arg(long, short = 'i')]
    input: PathBuf,
    /// Where to write the upscaled PNG.
    #[arg(long, short = 'o')]
    output: PathBuf,
    /// Tile side in input pixels (0: the whole image at once; memory grows with the tile).
    #[arg(long, default_value_t = TileOptions::default().tile)]
    tile: usize,
    /// Pixels neighbouring tiles share; larger hides seams better at some extra compute.
    #[arg(long, default_value_t = TileOptions::default().overlap)]
    overlap: usize,
    /// Final size as a multiple of the input (e.g. 2 with a 4x model), resized with Lanczos as A1111
    /// does; default: the model's own scale.
    #[arg(long)]
    scale: Option<f64>,
    /// Run on the CPU even when a GPU is available.
    #[arg(long)]
    cpu: bool,
}

fn main() -> std::process::ExitCode {
    sd_toolkit::run(body)
}

fn body() -> AnyResult<()> {
    let cli = Cli::parse();
    let device = sd_toolkit::device(cli.cpu)?;
    let net = RrdbNet::load(&cli.model, &device)?;
    println!("{}: {}", cli.model.display(), net.config());
    let input = image::open(&cli.input).map_err(|e| format!("cannot open {}: {e}", cli.input.display()))?.to_rgb8();
    let (w, h) = (input.width() as usize, input.height() as usize);
    // (3, H, W) in [0, 1].
    let mut planes = vec![0f32; 3 * w * h];
    for (i, px) in input.pixels().enumerate() {
        for c in 0..3 {
            planes[c * w * h + i] = px.0[c] as f32 / 255.0;
        }
    }
    let image = Tensor::from_vec(planes, (3, h, w), &Device::Cpu)?;

    let bar = indicatif::ProgressBar::new(1);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} tiles (eta {eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let options = TileOptions { tile: cli.tile, overlap: cli.overlap };
    let start = std::time::Instant::now();
    let out = net.upscale_tiled_with(&image, options, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        ControlFlow::Continue(())
    })?;
    bar.finish();
    let out = out.clamp(0f32, 1f32)?.unsqueeze(0)?;
    let mut result = tensor_to_images(&out)?.into_iter().next().ok_or("the upscaler returned no image")?;
    if let Some(scale) = cli.scale {
        if !(scale.is_finite() && scale > 0.0) {
            return Err(format!("--scale must be a positive number, got {scale}").into());
        }
        let (tw, th) = ((w as f64 * scale).round().max(1.0) as u32, (h as f64 * scale).round().max(1.0) as u32);
        if (tw, th) != result.dimensions() {
            result = image::imageops::resize(&result, tw, th, FilterType::Lanczos3);
        }
    }
    save_png(&result, &cli.output, None)?;
    println!(
        "{}: {w}×{h} → {}×{} in {:.1}s",
        cli.output.display(),
        result.width(),
        result.height(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
