//! diffusers' `AutoencoderKL`: the VAE that maps images to SD latents and back, with tiled
//! encode/decode for images too large to process at once.
//!
//! Half precision: the original SDXL VAE overflows in F16 (`VaeConfig::force_upcast`). This module
//! computes in whatever dtype its weights were loaded in (see [`AutoencoderKL::dtype`]); callers
//! that honour `force_upcast` load the VAE in F32 and cast latents/images at the boundary, which
//! the loader does.

use std::path::Path;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Module, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::config::VaeConfig;
use crate::error::{Error, Result};
use crate::keymap::{vae_to_ldm, LDM_VAE_PREFIX};
use crate::ops::{self, Conv2d, GroupNorm, Linear};


/// Latent pixels above which a VAE decode is tiled when the request does not say (more than 1024² pixels at
/// the usual factor 8).
pub const AUTO_TILE_LATENT_PIXELS: usize = 128 * 128;
/// Side of a decode tile in latent pixels (512-pixel tiles at factor 8).
pub const TILE: usize = 64;
/// Overlap of neighbouring tiles in latent pixels.
pub const TILE_OVERLAP: usize = 16;

/// GroupNorm epsilon used everywhere in the SD VAE.
const NORM_EPS: f64 = 1e-6;
/// diffusers clamps the posterior log-variance so `exp` can never overflow or vanish.
const LOGVAR_MIN: f64 = -30.0;
const LOGVAR_MAX: f64 = 20.0;

/// A ResnetBlock2D without time embedding.
#[derive(Debug, Clone)]
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn new(vb: VarBuilder, c_in: usize, c_out: usize, groups: usize) -> candle_core::Result<Self> {
        let conv_shortcut = if c_in != c_out {
            Some(Conv2d::load(vb.pp("conv_shortcut"), c_in, c_out, 1, 1, 0)?)
        } else {
            None
        };
        Ok(Self {
            norm1: ops::group_norm(vb.pp("norm1"), groups, c_in, NORM_EPS)?,
            conv1: Conv2d::load(vb.pp("conv1"), c_in, c_out, 3, 1, 1)?,
            norm2: ops::group_norm(vb.pp("norm2"), groups, c_out, NORM_EPS)?,
            conv2: Conv2d::load(vb.pp("conv2"), c_out, c_out, 3, 1, 1)?,
            conv_shortcut,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let skip = match &self.conv_shortcut {
            Some(conv) => conv.forward(x)?,
            None => x.clone(),
        };
        skip + h
    }
}

/// The single-head spatial self-attention of the VAE mid block.
#[derive(Debug, Clone)]
struct MidAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl MidAttention {
    fn new(vb: VarBuilder, channels: usize, groups: usize) -> candle_core::Result<Self> {
        Ok(Self {
            group_norm: ops::group_norm(vb.pp("group_norm"), groups, channels, NORM_EPS)?,
            to_q: ops::linear(vb.pp("to_q"), channels, channels, true)?,
            to_k: ops::linear(vb.pp("to_k"), channels, channels, true)?,
            to_v: ops::linear(vb.pp("to_v"), channels, channels, true)?,
            to_out: ops::linear(vb.pp("to_out.0"), channels, channels, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let tokens = self
            .group_norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = self.to_q.forward(&tokens)?;
        let k = self.to_k.forward(&tokens)?;
        let v = self.to_v.forward(&tokens)?;
        // diffusers upcasts this softmax (upcast_softmax=True); it only matters in half precision.
        let out = self.to_out.forward(&ops::attention(&q, &k, &v, 1, true)?)?;
        let out = out.transpose(1, 2)?.reshape((b, c, h, w))?;
        out + x
    }
}

/// resnet → attention → resnet at the lowest resolution.
#[derive(Debug, Clone)]
struct MidBlock {
    resnet0: ResnetBlock,
    attention: MidAttention,
    resnet1: ResnetBlock,
}

impl MidBlock {
    fn new(vb: VarBuilder, channels: usize, groups: usize) -> candle_core::Result<Self> {
        Ok(Self {
            resnet0: ResnetBlock::new(vb.pp("resnets.0"), channels, channels, groups)?,
            attention: MidAttention::new(vb.pp("attentions.0"), channels, groups)?,
            resnet1: ResnetBlock::new(vb.pp("resnets.1"), channels, channels, groups)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.resnet0.forward(x)?;
        let x = self.attention.forward(&x)?;
        self.resnet1.forward(&x)
    }
}

/// DownEncoderBlock2D: resnets, then (except in the last block) a stride-2 convolution.
#[derive(Debug, Clone)]
struct DownBlock {
    resnets: Vec<ResnetBlock>,
    downsampler: Option<Conv2d>,
}

impl DownBlock {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = x.clone();
        for resnet in &self.resnets {
            x = resnet.forward(&x)?;
        }
        match &self.downsampler {
            // The VAE's Downsample2D pads only right and bottom (F.pad (0,1,0,1)), then convolves
            // with padding 0; symmetric padding would shift the latent grid by half a pixel.
            Some(conv) => conv.forward(&x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?),
            None => Ok(x),
        }
    }
}

/// UpDecoderBlock2D: resnets, then (except in the last block) nearest 2× upsampling and a convolution.
#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<ResnetBlock>,
    upsampler: Option<Conv2d>,
}

impl UpBlock {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = x.clone();
        for resnet in &self.resnets {
            x = resnet.forward(&x)?;
        }
        match &self.upsampler {
            Some(conv) => {
                let (_, _, h, w) = x.dims4()?;
                conv.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)
            }
            None => Ok(x),
        }
    }
}

/// Image → latent moments (mean and log-variance stacked on the channel axis).
#[derive(Debug, Clone)]
struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(vb: VarBuilder, cfg: &VaeConfig) -> candle_core::Result<Self> {
        let chans = &cfg.block_out_channels;
        let groups = cfg.norm_num_groups;
        let conv_in = Conv2d::load(vb.pp("conv_in"), cfg.in_channels, chans[0], 3, 1, 1)?;
        let mut down_blocks = Vec::with_capacity(chans.len());
        let mut c_prev = chans[0];
        for (i, &c_out) in chans.iter().enumerate() {
            let vb_b = vb.pp(format!("down_blocks.{i}"));
            let mut resnets = Vec::with_capacity(cfg.layers_per_block);
            for j in 0..cfg.layers_per_block {
                let c_in = if j == 0 { c_prev } else { c_out };
                resnets.push(ResnetBlock::new(
                    vb_b.pp(format!("resnets.{j}")),
                    c_in,
                    c_out,
                    groups,
                )?);
            }
            let downsampler = if i + 1 < chans.len() {
                Some(Conv2d::load(
                    vb_b.pp("downsamplers.0.conv"),
                    c_out,
                    c_out,
                    3,
                    2,
                    0,
                )?)
            } else {
                None
            };
            down_blocks.push(DownBlock {
                resnets,
                downsampler,
            });
            c_prev = c_out;
        }
        Ok(Self {
            conv_in,
            down_blocks,
            mid_block: MidBlock::new(vb.pp("mid_block"), c_prev, groups)?,
            conv_norm_out: ops::group_norm(vb.pp("conv_norm_out"), groups, c_prev, NORM_EPS)?,
            conv_out: Conv2d::load(vb.pp("conv_out"), c_prev, 2 * cfg.latent_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = self.conv_in.forward(x)?;
        for block in &self.down_blocks {
            x = block.forward(&x)?;
        }
        let x = self.mid_block.forward(&x)?;
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&x)?)
    }
}

/// Latent → image.
#[derive(Debug, Clone)]
struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(vb: VarBuilder, cfg: &VaeConfig) -> candle_core::Result<Self> {
        let chans: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let groups = cfg.norm_num_groups;
        let conv_in = Conv2d::load(vb.pp("conv_in"), cfg.latent_channels, chans[0], 3, 1, 1)?;
        let mid_block = MidBlock::new(vb.pp("mid_block"), chans[0], groups)?;
        let mut up_blocks = Vec::with_capacity(chans.len());
        let mut c_prev = chans[0];
        for (i, &c_out) in chans.iter().enumerate() {
            let vb_b = vb.pp(format!("up_blocks.{i}"));
            let mut resnets = Vec::with_capacity(cfg.layers_per_block + 1);
            for j in 0..=cfg.layers_per_block {
                let c_in = if j == 0 { c_prev } else { c_out };
                resnets.push(ResnetBlock::new(
                    vb_b.pp(format!("resnets.{j}")),
                    c_in,
                    c_out,
                    groups,
                )?);
            }
            let upsampler = if i + 1 < chans.len() {
                Some(Conv2d::load(
                    vb_b.pp("upsamplers.0.conv"),
                    c_out,
                    c_out,
                    3,
                    1,
                    1,
                )?)
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, upsampler });
            c_prev = c_out;
        }
        Ok(Self {
            conv_in,
            mid_block,
            up_blocks,
            conv_norm_out: ops::group_norm(vb.pp("conv_norm_out"), groups, c_prev, NORM_EPS)?,
            conv_out: Conv2d::load(vb.pp("conv_out"), c_prev, cfg.out_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.conv_in.forward(z)?;
        let mut x = self.mid_block.forward(&x)?;
        for block in &self.up_blocks {
            x = block.forward(&x)?;
        }
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&x)?)
    }
}

/// The posterior `N(mean, exp(logvar))` the encoder predicts for each latent pixel.
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    /// Posterior mean `[b, latent_channels, h/f, w/f]` (the deterministic "mode" latent).
    pub mean: Tensor,
    /// Posterior log-variance, clamped to [-30, 20] as diffusers does.
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    /// Splits encoder moments `[b, 2c, h, w]` into mean and clamped log-variance.
    fn from_moments(moments: &Tensor) -> candle_core::Result<Self> {
        let c = moments.dim(1)? / 2;
        let mean = moments.narrow(1, 0, c)?.contiguous()?;
        let logvar = moments.narrow(1, c, c)?.clamp(LOGVAR_MIN, LOGVAR_MAX)?;
        Ok(Self { mean, logvar })
    }

    /// Standard deviation `exp(logvar / 2)`.
    pub fn std(&self) -> Result<Tensor> {
        Ok((&self.logvar * 0.5)?.exp()?)
    }

    /// The posterior mean, which img2img pipelines often use instead of a sample.
    pub fn mode(&self) -> &Tensor {
        &self.mean
    }

    /// Draws `mean + std · noise` for standard-normal `noise` of the mean's shape.
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        if noise.dims() != self.mean.dims() {
            return Err(Error::InvalidInput(format!(
                "posterior sample noise has shape {:?} but the posterior has shape {:?}; draw the noise with the mean's shape",
                noise.dims(),
                self.mean.dims()
            )));
        }
        let noise = noise.to_dtype(self.mean.dtype())?;
        Ok((&self.mean + (self.std()? * noise)?)?)
    }
}

/// diffusers' `AutoencoderKL`.
///
/// Weights live at the diffusers names under the given VarBuilder (`encoder.*`, `quant_conv.*`,
/// `post_quant_conv.*`, `decoder.*`). Inputs are cast to the weights' dtype; for the original SDXL
/// VAE (`force_upcast`) load the weights in F32, because F16 activations overflow to NaN.
#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    cfg: VaeConfig,
    dtype: DType,
    device: Device,
}

impl AutoencoderKL {
    /// Builds the VAE from `vb` (rooted at the `vae/` component) and its config.
    pub fn new(vb: VarBuilder, cfg: &VaeConfig) -> candle_core::Result<Self> {
        if cfg.block_out_channels.is_empty() {
            candle_core::bail!("VAE config has an empty block_out_channels; check vae/config.json");
        }
        if cfg.norm_num_groups == 0 {
            candle_core::bail!("VAE config has norm_num_groups 0; check vae/config.json");
        }
        if let Some(c) = cfg
            .block_out_channels
            .iter()
            .find(|&&c| c % cfg.norm_num_groups != 0)
        {
            candle_core::bail!(
                "VAE config: {c} channels cannot be split into {} GroupNorm groups; check block_out_channels/norm_num_groups in vae/config.json",
                cfg.norm_num_groups
            );
        }
        let latent2 = 2 * cfg.latent_channels;
        let quant_conv = if cfg.use_quant_conv {
            Some(Conv2d::load(
                vb.pp("quant_conv"),
                latent2,
                latent2,
                1,
                1,
                0,
            )?)
        } else {
            None
        };
        let post_quant_conv = if cfg.use_post_quant_conv {
            Some(Conv2d::load(
                vb.pp("post_quant_conv"),
                cfg.latent_channels,
                cfg.latent_channels,
                1,
                1,
                0,
            )?)
        } else {
            None
        };
        Ok(Self {
            encoder: Encoder::new(vb.pp("encoder"), cfg)?,
            decoder: Decoder::new(vb.pp("decoder"), cfg)?,
            quant_conv,
            post_quant_conv,
            cfg: cfg.clone(),
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// The config the VAE was built with.
    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }

    /// The dtype of the weights and of every activation; when `config().force_upcast` is set and
    /// this is F16, outputs will overflow: reload in F32 (the loader does so automatically).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Image pixels per latent pixel along each axis (8 for SD).
    pub fn scale_factor(&self) -> usize {
        1 << (self.cfg.block_out_channels.len() - 1)
    }

    /// Encodes images `[b, in_channels, h, w]` in [-1, 1] (`h`, `w` multiples of
    /// [`Self::scale_factor`]) into the latent posterior.
    pub fn encode(&self, image: &Tensor) -> Result<DiagonalGaussian> {
        let image = self.check_image(image, "encode")?;
        Ok(DiagonalGaussian::from_moments(&self.moments(&image)?)?)
    }

    /// Decodes raw latents `[b, latent_channels, h, w]` (already divided by `scaling_factor`) into
    /// images `[b, out_channels, h·f, w·f]` in roughly [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let latents = self.check_latents(latents, "decode")?;
        Ok(self.decode_raw(&latents)?)
    }

    /// Decodes whole, or in [`TILE`]-latent tiles overlapping by [`TILE_OVERLAP`] when `tiling` says so
    /// (`None`: when the latents have more than [`AUTO_TILE_LATENT_PIXELS`] pixels) — the one rule every
    /// family's `Request::vae_tiling` follows.
    pub fn decode_auto(&self, latents: &Tensor, tiling: Option<bool>) -> Result<Tensor> {
        let (h, w) = (latents.dim(2)?, latents.dim(3)?);
        if tiling.unwrap_or(h * w > AUTO_TILE_LATENT_PIXELS) {
            self.decode_tiled(latents, TILE, TILE_OVERLAP)
        } else {
            self.decode(latents)
        }
    }

    /// Decodes like [`Self::decode`] but in overlapping `tile`×`tile` latent-pixel tiles that
    /// overlap by `overlap` latent pixels and are cross-faded linearly, bounding peak memory by the
    /// tile size. Each tile is normalised on its own, so results differ slightly from `decode`;
    /// a larger overlap gives smoother transitions. Latents no larger than `tile` are decoded whole.
    pub fn decode_tiled(&self, latents: &Tensor, tile: usize, overlap: usize) -> Result<Tensor> {
        let latents = self.check_latents(latents, "decode_tiled")?;
        check_tiling(tile, overlap, 1, "decode_tiled", "latent")?;
        let f = self.scale_factor();
        Ok(tiled(
            &latents,
            tile,
            overlap,
            f,
            |t| self.decode_raw(t),
            true,
        )?)
    }

    /// Encodes like [`Self::encode`] but in overlapping `tile`×`tile` image-pixel tiles that overlap
    /// by `overlap` image pixels (both multiples of [`Self::scale_factor`]); the latent moments of
    /// neighbouring tiles are cross-faded linearly over the overlap, as diffusers does.
    pub fn encode_tiled(
        &self,
        image: &Tensor,
        tile: usize,
        overlap: usize,
    ) -> Result<DiagonalGaussian> {
        let image = self.check_image(image, "encode_tiled")?;
        let f = self.scale_factor();
        check_tiling(tile, overlap, f, "encode_tiled", "image")?;
        let moments = tiled(&image, tile, overlap, f, |t| self.moments(t), false)?;
        Ok(DiagonalGaussian::from_moments(&moments)?)
    }

    fn moments(&self, image: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.encoder.forward(image)?;
        match &self.quant_conv {
            Some(conv) => conv.forward(&h),
            None => Ok(h),
        }
    }

    fn decode_raw(&self, latents: &Tensor) -> candle_core::Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(conv) => conv.forward(latents)?,
            None => latents.clone(),
        };
        self.decoder.forward(&z)
    }

    fn check_image(&self, image: &Tensor, what: &str) -> Result<Tensor> {
        let f = self.scale_factor();
        let dims = image.dims();
        let ok = dims.len() == 4 && dims[1] == self.cfg.in_channels && dims[0] > 0;
        if !ok {
            return Err(Error::InvalidInput(format!(
                "VAE {what} expects an image batch [batch, {}, height, width] but got shape {dims:?}",
                self.cfg.in_channels
            )));
        }
        if dims[2] == 0 || dims[3] == 0 || dims[2] % f != 0 || dims[3] % f != 0 {
            return Err(Error::InvalidInput(format!(
                "VAE {what}: image size {}×{} must be a positive multiple of {f} on both sides; resize or crop the image",
                dims[3], dims[2]
            )));
        }
        Ok(image.to_dtype(self.dtype)?)
    }

    fn check_latents(&self, latents: &Tensor, what: &str) -> Result<Tensor> {
        let dims = latents.dims();
        let ok =
            dims.len() == 4 && dims[1] == self.cfg.latent_channels && dims.iter().all(|&d| d > 0);
        if !ok {
            return Err(Error::InvalidInput(format!(
                "VAE {what} expects latents [batch, {}, height, width] but got shape {dims:?}",
                self.cfg.latent_channels
            )));
        }
        Ok(latents.to_dtype(self.dtype)?)
    }
}

fn check_tiling(
    tile: usize,
    overlap: usize,
    multiple: usize,
    what: &str,
    unit: &str,
) -> Result<()> {
    if tile == 0 || overlap >= tile {
        return Err(Error::InvalidInput(format!(
            "VAE {what}: tile {tile} and overlap {overlap} ({unit} pixels) need 0 ≤ overlap < tile; e.g. tile {} overlap {}",
            64 * multiple,
            16 * multiple
        )));
    }
    if tile % multiple != 0 || overlap % multiple != 0 {
        return Err(Error::InvalidInput(format!(
            "VAE {what}: tile {tile} and overlap {overlap} must be multiples of the VAE scale factor {multiple}"
        )));
    }
    Ok(())
}

/// Start offsets of tiles of length `tile` with stride `tile - overlap` that cover `size`; the last
/// tile is aligned to the end so every tile is full-sized (a lone tile may be shorter when `size < tile`).
fn tile_starts(size: usize, tile: usize, overlap: usize) -> Vec<usize> {
    if size <= tile {
        return vec![0];
    }
    let stride = tile - overlap;
    let mut starts = Vec::new();
    let mut s = 0;
    while s + tile < size {
        starts.push(s);
        s += stride;
    }
    starts.push(size - tile);
    starts
}

/// Per-tile blending weights along one output axis, normalised so they sum to one at every
/// position: each tile ramps linearly from ~0 to 1 over `ramp` pixels on sides that have a
/// neighbour, so two tiles overlapping by exactly `ramp` pixels cross-fade linearly.
fn axis_weights(starts: &[usize], len: usize, size: usize, ramp: usize) -> Vec<Vec<f32>> {
    let raw: Vec<Vec<f32>> = starts
        .iter()
        .map(|&s| {
            (0..len)
                .map(|i| {
                    let denom = (ramp + 1) as f32;
                    let left = if s > 0 {
                        ((i + 1) as f32 / denom).min(1.0)
                    } else {
                        1.0
                    };
                    let right = if s + len < size {
                        ((len - i) as f32 / denom).min(1.0)
                    } else {
                        1.0
                    };
                    left.min(right)
                })
                .collect()
        })
        .collect();
    let mut total = vec![0f32; size];
    for (&s, w) in starts.iter().zip(&raw) {
        for (i, v) in w.iter().enumerate() {
            total[s + i] += v;
        }
    }
    starts
        .iter()
        .zip(raw)
        .map(|(&s, w)| {
            w.into_iter()
                .enumerate()
                .map(|(i, v)| v / total[s + i])
                .collect()
        })
        .collect()
}

/// Runs `f` on overlapping tiles of `x` and blends the outputs. Tile geometry is given in input
/// pixels; `scale` relates input and output pixels (output = input·scale when `upscale`, else
/// input/scale).
fn tiled<F>(
    x: &Tensor,
    tile: usize,
    overlap: usize,
    scale: usize,
    f: F,
    upscale: bool,
) -> candle_core::Result<Tensor>
where
    F: Fn(&Tensor) -> candle_core::Result<Tensor>,
{
    let (_, _, h, w) = x.dims4()?;
    if h <= tile && w <= tile {
        return f(x);
    }
    let to_out = |v: usize| if upscale { v * scale } else { v / scale };
    let ys = tile_starts(h, tile, overlap);
    let xs = tile_starts(w, tile, overlap);
    let (th, tw) = (tile.min(h), tile.min(w));
    let (oh, ow) = (to_out(h), to_out(w));
    let ys_out: Vec<usize> = ys.iter().map(|&s| to_out(s)).collect();
    let xs_out: Vec<usize> = xs.iter().map(|&s| to_out(s)).collect();
    let wy = axis_weights(&ys_out, to_out(th), oh, to_out(overlap));
    let wx = axis_weights(&xs_out, to_out(tw), ow, to_out(overlap));

    let mut result: Option<Tensor> = None;
    for (iy, &y0) in ys.iter().enumerate() {
        let wy_t = Tensor::from_slice(&wy[iy], (1, 1, to_out(th), 1), x.device())?;
        let mut strip: Option<Tensor> = None;
        for (ix, &x0) in xs.iter().enumerate() {
            let out = f(&x.narrow(2, y0, th)?.narrow(3, x0, tw)?)?;
            let wx_t = Tensor::from_slice(&wx[ix], (1, 1, 1, to_out(tw)), x.device())?;
            let weight = wy_t.broadcast_mul(&wx_t)?.to_dtype(out.dtype())?;
            let left = xs_out[ix];
            let placed =
                out.broadcast_mul(&weight)?
                    .pad_with_zeros(3, left, ow - left - to_out(tw))?;
            strip = Some(match strip {
                Some(s) => (s + placed)?,
                None => placed,
            });
        }
        let top = ys_out[iy];
        let strip = match strip {
            Some(s) => s.pad_with_zeros(2, top, oh - top - to_out(th))?,
            None => candle_core::bail!("tiling produced no tiles for width {w}"),
        };
        result = Some(match result {
            Some(r) => (r + strip)?,
            None => strip,
        });
    }
    match result {
        Some(r) => Ok(r),
        None => candle_core::bail!("tiling produced no tiles for height {h}"),
    }
}

/// Serves diffusers VAE names (what `sd_models::vae::AutoencoderKL` asks for) from an LDM-named
/// autoencoder: a VAE file with bare LDM names (`encoder.down.0.block.0.…`, as BFL's `ae.safetensors` or a
/// stripped `vae-ft-mse-840000`) or with a full checkpoint's `first_stage_model.*` names.
pub struct LdmVaeBackend {
    st: MmapedSafetensors,
    blocks: usize,
    source: String,
}

impl LdmVaeBackend {
    /// Wraps the mapped file of a VAE with `blocks` resolution levels.
    pub fn new(st: MmapedSafetensors, blocks: usize, source: impl Into<String>) -> Self {
        Self { st, blocks, source: source.into() }
    }

    fn stored(&self, name: &str) -> Option<String> {
        let ldm = vae_to_ldm(name, self.blocks)?;
        [format!("{}{ldm}", LDM_VAE_PREFIX), ldm].into_iter().find(|n| self.st.get(n).is_ok())
    }

    fn load(&self, name: &str, expected: Option<&Shape>, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let stored = self
            .stored(name)
            .ok_or_else(|| msg(format!("{}: the VAE tensor {name} is missing; is this a VAE (or a checkpoint with first_stage_model.* tensors) of this architecture?", self.source)))?;
        let view = self.st.get(&stored)?;
        let have = Shape::from(view.shape());
        let served = match expected {
            // LDM keeps the mid-block attention projections as 1×1 convolutions; diffusers as linears.
            Some(s) if &have != s && have.elem_count() == s.elem_count() && have.rank() != s.rank() => s.clone(),
            Some(s) if &have != s => {
                return Err(msg(format!("{}: {stored} has shape {:?}, expected {:?}", self.source, have.dims(), s.dims())))
            }
            _ => have,
        };
        crate::weights::load_mapped(&self.st, &stored, dtype, dev)?.reshape(served)
    }
}

impl SimpleBackend for LdmVaeBackend {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, Some(&s), dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, None, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.stored(name).is_some()
    }
}

fn msg(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// Loads a VAE by itself, as users keep them next to checkpoints: a diffusers `vae/` folder (its own
/// `config.json` is returned and wins), or one `.safetensors` file with diffusers names, bare LDM names
/// (`encoder.down.0.block.0.…`, e.g. `vae-ft-mse-840000-ema-pruned.safetensors`, BFL's `ae.safetensors`) or
/// a checkpoint's `first_stage_model.*` — for a file, `config` describes the architecture (the model's
/// own VAE config, when the file replaces it). Weights are loaded in `dtype` (F32 instead of F16 when the
/// config says the VAE overflows in F16). PyTorch pickles are refused.
pub fn load_vae_weights(path: &Path, config: &VaeConfig, dtype: DType, device: &Device) -> Result<(AutoencoderKL, VaeConfig)> {
    let source = path.display().to_string();
    let (cfg, files) = if path.is_dir() {
        let cfg = crate::diffusers::read_vae_config(&path.join("config.json"))?;
        (cfg, crate::diffusers::find_weight_files(path, false)?)
    } else if path.is_file() {
        if path.extension().is_some_and(|e| ["ckpt", "pt", "pth", "bin"].iter().any(|p| e.eq_ignore_ascii_case(p))) {
            return Err(Error::UnsupportedFormat {
                path: path.to_path_buf(),
                reason: "PyTorch pickles are not loaded (unpickling can run arbitrary code); use the .safetensors version of this VAE".into(),
            });
        }
        (config.clone(), vec![path.to_path_buf()])
    } else {
        return Err(Error::NotFound { what: "VAE file or folder".into(), path: path.to_path_buf() });
    };
    for f in &files {
        crate::single_file::open_safetensors(f)?;
    }
    // SAFETY: read-only mapping; the files must not be truncated while the model is loading.
    let st = unsafe { MmapedSafetensors::multi(&files) }.map_err(|e| Error::InvalidSafetensors { path: path.to_path_buf(), reason: e.to_string() })?;
    let dtype = crate::loader::vae_dtype_for(dtype, &cfg);
    // `decoder.conv_in` has the same name in both layouts; the blocks tell them apart.
    let diffusers_names = st.get("decoder.up_blocks.0.resnets.0.conv1.weight").is_ok();
    let backend: Box<dyn SimpleBackend> =
        if diffusers_names { Box::new(crate::weights::MappedWeights::new(st)) } else { Box::new(LdmVaeBackend::new(st, cfg.block_out_channels.len(), source.clone())) };
    let vae = AutoencoderKL::new(VarBuilder::from_backend(backend, dtype, device.clone()), &cfg).map_err(|e| Error::InvalidConfig {
        path: path.to_path_buf(),
        reason: format!(
            "not a VAE of this architecture ({} latent channels, {} levels): {}",
            cfg.latent_channels,
            cfg.block_out_channels.len(),
            crate::single_file::innermost(&e)
        ),
    })?;
    Ok((vae, cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tile_starts_cover_and_end_aligned() {
        assert_eq!(tile_starts(10, 16, 4), vec![0]);
        assert_eq!(tile_starts(16, 16, 4), vec![0]);
        assert_eq!(tile_starts(20, 8, 2), vec![0, 6, 12]);
        assert_eq!(tile_starts(10, 8, 2), vec![0, 2]);
    }

    fn ramp_input(h: usize, w: usize) -> candle_core::Result<Tensor> {
        let data: Vec<f32> = (0..2 * h * w)
            .map(|i| ((i * 37) % 101) as f32 / 101.0 - 0.5)
            .collect();
        Tensor::from_vec(data, (1, 2, h, w), &Device::Cpu)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> candle_core::Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    #[test]
    fn tiling_a_local_upscaling_op_is_exact() -> candle_core::Result<()> {
        // Nearest upsampling sees no context, so tiled and whole results must agree everywhere.
        let up = |t: &Tensor| -> candle_core::Result<Tensor> {
            let (_, _, h, w) = t.dims4()?;
            (t.upsample_nearest2d(2 * h, 2 * w)? * 3.0)? + 1.0
        };
        let x = ramp_input(13, 22)?;
        for (tile, overlap) in [(4, 1), (5, 2), (8, 0), (8, 7), (13, 3), (30, 4)] {
            let d = max_diff(&tiled(&x, tile, overlap, 2, up, true)?, &up(&x)?)?;
            assert!(d < 1e-5, "tile {tile} overlap {overlap}: {d}");
        }
        Ok(())
    }

    #[test]
    fn tiling_a_local_downscaling_op_is_exact() -> candle_core::Result<()> {
        let down = |t: &Tensor| t.avg_pool2d(2);
        let x = ramp_input(16, 24)?;
        for (tile, overlap) in [(4, 2), (8, 2), (8, 4), (10, 6)] {
            let d = max_diff(&tiled(&x, tile, overlap, 2, down, false)?, &down(&x)?)?;
            assert!(d < 1e-5, "tile {tile} overlap {overlap}: {d}");
        }
        Ok(())
    }

    #[test]
    fn tiles_that_disagree_are_cross_faded_without_seams() -> candle_core::Result<()> {
        // Each tile outputs a constant (its mean), as a per-tile normalisation drift would: the
        // blend must turn the steps between tiles into ramps over the overlap.
        let x = Tensor::arange(0f32, 40., &Device::Cpu)?
            .reshape((1, 1, 1, 40))?
            .repeat((1, 1, 8, 1))?;
        let constant = |t: &Tensor| t.mean_all()?.broadcast_as(t.shape())?.contiguous();
        let (tile, overlap) = (16, 4);
        let out = tiled(&x, tile, overlap, 1, constant, true)?;
        let row = out.get(0)?.get(0)?.get(0)?.to_vec1::<f32>()?;
        // Tiles start at 0, 12, 24, so their means step by 12; a hard seam would jump by 12, a
        // linear cross-fade over the 4-pixel overlap by 12/5 per pixel.
        let step = (tile - overlap) as f32;
        let max_jump = row
            .windows(2)
            .map(|p| (p[1] - p[0]).abs())
            .fold(0f32, f32::max);
        assert!(
            max_jump <= step / (overlap as f32 + 1.0) + 1e-4,
            "max jump {max_jump} in {row:?}"
        );
        Ok(())
    }

    #[test]
    fn axis_weights_partition_unity_and_crossfade() {
        let starts = [0, 6, 12];
        let w = axis_weights(&starts, 8, 20, 2);
        let mut total = vec![0f32; 20];
        for (s, wt) in starts.iter().zip(&w) {
            for (i, v) in wt.iter().enumerate() {
                total[s + i] += v;
            }
        }
        assert!(total.iter().all(|t| (t - 1.0).abs() < 1e-6), "{total:?}");
        // Overlap of tile 0 (positions 6, 7) fades out linearly while tile 1 fades in.
        assert!(
            (w[0][6] - 2.0 / 3.0).abs() < 1e-6 && (w[1][0] - 1.0 / 3.0).abs() < 1e-6,
            "{w:?}"
        );
        assert!((w[0][5] - 1.0).abs() < 1e-6);
    }
}
