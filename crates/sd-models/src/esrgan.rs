//! ESRGAN-family super-resolution upscalers (RRDBNet), as A1111 and ComfyUI users have them: ESRGAN,
//! Real-ESRGAN (x4plus, x2plus with pixel-unshuffle, anime 6B), BSRGAN/RealSR, ESRGAN+ and the community
//! models trained with them (4x-UltraSharp, 4x-AnimeSharp, …).
//!
//! Every hyper-parameter (channels, features, blocks, growth channels, scale, pixel-unshuffle, ESRGAN+
//! paths) is read from the weights, whichever of the three key layouts a file uses: old ESRGAN
//! (`model.0`, `model.1.sub.N.RDB1.conv1.0`, …), BasicSR/Real-ESRGAN (`conv_first`, `body.N.rdb1.conv1`,
//! `conv_body`, `conv_up1`, `conv_hr`, `conv_last`, optionally wrapped under `params_ema`/`params`) or
//! BSRGAN (`RRDB_trunk`, `trunk_conv`, `upconv1`, `HRconv`). Weights are renamed to BasicSR's names,
//! which the model's [`VarBuilder`] paths mirror.
//!
//! ```no_run
//! # fn main() -> sd_models::Result<()> {
//! use sd_models::esrgan::{RrdbNet, TileOptions};
//! let net = RrdbNet::load(std::path::Path::new("RealESRGAN_x4plus.pth"), &candle_core::Device::Cpu)?;
//! let image = candle_core::Tensor::zeros((3, 64, 64), candle_core::DType::F32, &candle_core::Device::Cpu)?;
//! let big = net.upscale(&image, TileOptions::default())?; // (3, 256, 256) in [0, 1]
//! # Ok(()) }
//! ```

use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use crate::error::{Error, Result};
use crate::ops::Conv2d;

/// Negative slope of every LeakyReLU in the network.
const LEAKY_SLOPE: f64 = 0.2;
/// Scale of the residual branch of each dense block and each RRDB.
const RESIDUAL_SCALE: f64 = 0.2;
/// Keys a PyTorch file may wrap its state dict under, tried in this order before the bare dict.
const PTH_WRAPPERS: [&str; 7] = ["params_ema", "params-ema", "params", "state_dict", "model_state_dict", "net", "model"];

/// The key names a checkpoint uses for the same network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyLayout {
    /// The original ESRGAN repository: one `model` sequential (`model.0`, `model.1.sub.N.RDBk.convj.0`,
    /// upsampling convs at `model.3`, `model.6`, …); most community models (4x-UltraSharp, …).
    OldEsrgan,
    /// BasicSR's RRDBNet, as Real-ESRGAN ships it: `conv_first`, `body.N.rdbk.convj`, `conv_body`,
    /// `conv_upK`, `conv_hr`, `conv_last`.
    BasicSr,
    /// BSRGAN/RealSR: `RRDB_trunk.N.RDBk.convj`, `trunk_conv`, `upconvK`, `HRconv`.
    Bsrgan,
}

impl KeyLayout {
    /// A short name for logs and listings.
    pub fn name(self) -> &'static str {
        match self {
            KeyLayout::OldEsrgan => "ESRGAN",
            KeyLayout::BasicSr => "BasicSR/Real-ESRGAN",
            KeyLayout::Bsrgan => "BSRGAN/RealSR",
        }
    }
}

/// The hyper-parameters of an RRDBNet, as read from its weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RrdbConfig {
    /// Channels of the images it takes (3 for RGB), before any pixel-unshuffle.
    pub in_channels: usize,
    /// Channels of the images it returns.
    pub out_channels: usize,
    /// Feature channels of the trunk (`num_feat`, 64 in most models).
    pub num_feat: usize,
    /// RRDB blocks in the trunk (`num_block`, 23 in RealESRGAN_x4plus, 6 in the anime 6B model).
    pub num_block: usize,
    /// Growth channels of each dense block (`num_grow_ch`, 32 in every released model).
    pub num_grow_ch: usize,
    /// Nearest-2× + conv upsampling stages (2 for the ×4 network).
    pub upsample_stages: usize,
    /// Pixel-unshuffle factor at the input: 1, or 2 / 4 for Real-ESRGAN's ×2 / ×1 models.
    pub unshuffle: usize,
    /// Whether the dense blocks have ESRGAN+'s extra 1×1 residual paths.
    pub plus: bool,
    /// The key names the weights came with.
    pub layout: KeyLayout,
}

impl RrdbConfig {
    /// How many times larger the output is than the input (1, 2, 4 or 8).
    pub fn scale(&self) -> usize {
        (1usize << self.upsample_stages) / self.unshuffle
    }

    /// Channels the first convolution takes (`in_channels · unshuffle²`).
    pub fn first_conv_channels(&self) -> usize {
        self.in_channels * self.unshuffle * self.unshuffle
    }

    /// Reads the hyper-parameters from BasicSR-named tensor shapes (see [`KeyLayout::BasicSr`]).
    fn from_shapes(shapes: &HashMap<String, Vec<usize>>, layout: KeyLayout) -> std::result::Result<Self, String> {
        let conv = |name: &str| -> std::result::Result<&[usize], String> {
            match shapes.get(&format!("{name}.weight")) {
                Some(s) if s.len() == 4 => Ok(s.as_slice()),
                Some(s) => Err(format!("{name}.weight has shape {s:?}; expected a convolution kernel [out, in, kh, kw]")),
                None => Err(format!("it has no {name}.weight")),
            }
        };
        let first = conv("conv_first")?;
        let last = conv("conv_last")?;
        let grow = conv("body.0.rdb1.conv1")?;
        let (num_feat, first_in, out_channels, num_grow_ch) = (first[0], first[1], last[0], grow[0]);
        let num_block = (0..).take_while(|i| shapes.contains_key(&format!("body.{i}.rdb1.conv1.weight"))).count();
        let upsample_stages = (1..).take_while(|i| shapes.contains_key(&format!("conv_up{i}.weight"))).count();
        if upsample_stages > 4 {
            return Err(format!("it has {upsample_stages} upsampling stages; at most 4 (×16) are supported"));
        }
        // Real-ESRGAN's ×2 and ×1 models pixel-unshuffle the image first (as spandrel detects them).
        let unshuffle = if out_channels > 0 && first_in == out_channels * 4 && upsample_stages >= 1 {
            2
        } else if out_channels > 0 && first_in == out_channels * 16 && upsample_stages >= 2 {
            4
        } else {
            1
        };
        let plus = shapes.contains_key("body.0.rdb1.conv1x1.weight");
        let cfg = Self {
            in_channels: first_in / (unshuffle * unshuffle),
            out_channels,
            num_feat,
            num_block,
            num_grow_ch,
            upsample_stages,
            unshuffle,
            plus,
            layout,
        };
        if num_feat == 0 || num_grow_ch == 0 || out_channels == 0 || cfg.in_channels == 0 {
            return Err("it has a zero-sized convolution".into());
        }
        Ok(cfg)
    }

    /// Every tensor this configuration needs, with its shape, under BasicSR names.
    fn expected_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (nf, gc) = (self.num_feat, self.num_grow_ch);
        let mut v = Vec::new();
        let mut conv = |name: String, c_in: usize, c_out: usize| {
            v.push((format!("{name}.weight"), vec![c_out, c_in, 3, 3]));
            v.push((format!("{name}.bias"), vec![c_out]));
        };
        conv("conv_first".into(), self.first_conv_channels(), nf);
        for b in 0..self.num_block {
            for r in 1..=3 {
                for j in 1..=5 {
                    let c_out = if j == 5 { nf } else { gc };
                    conv(format!("body.{b}.rdb{r}.conv{j}"), nf + (j - 1) * gc, c_out);
                }
            }
        }
        conv("conv_body".into(), nf, nf);
        for k in 1..=self.upsample_stages {
            conv(format!("conv_up{k}"), nf, nf);
        }
        conv("conv_hr".into(), nf, nf);
        conv("conv_last".into(), nf, self.out_channels);
        if self.plus {
            for b in 0..self.num_block {
                for r in 1..=3 {
                    v.push((format!("body.{b}.rdb{r}.conv1x1.weight"), vec![gc, nf, 1, 1]));
                }
            }
        }
        v
    }
}

impl std::fmt::Display for RrdbConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}x {}RRDBNet ({} layout, {} features, {} blocks, {} growth channels{}, {}→{} channels)",
            self.scale(),
            if self.plus { "ESRGAN+ " } else { "" },
            self.layout.name(),
            self.num_feat,
            self.num_block,
            self.num_grow_ch,
            if self.unshuffle > 1 { format!(", pixel-unshuffle {}", self.unshuffle) } else { String::new() },
            self.in_channels,
            self.out_channels,
        )
    }
}

/// How an image is split into tiles by [`RrdbNet::upscale`] (sizes in input pixels).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileOptions {
    /// Tile side; 0 processes the whole image at once. Rounded down to a multiple of the model's
    /// pixel-unshuffle factor.
    pub tile: usize,
    /// Pixels neighbouring tiles share (at least; tiles are spread evenly). The outer quarter of each
    /// overlap is dropped and the middle half cross-faded, so seams vanish once an overlap is about four
    /// times what a tile edge disturbs. At most half the tile.
    pub overlap: usize,
}

impl Default for TileOptions {
    /// 192-pixel tiles (A1111's default ESRGAN tile) with a 32-pixel overlap.
    fn default() -> Self {
        Self { tile: 192, overlap: 32 }
    }
}

/// One dense block: five 3×3 convs over the concatenation of all earlier outputs.
#[derive(Debug, Clone)]
struct DenseBlock {
    convs: Vec<Conv2d>,
    /// ESRGAN+'s extra path from the block input to the second and fourth outputs.
    conv1x1: Option<Conv2d>,
}

impl DenseBlock {
    fn new(vb: VarBuilder, nf: usize, gc: usize, plus: bool) -> candle_core::Result<Self> {
        let convs = (1..=5)
            .map(|j| Conv2d::load(vb.pp(format!("conv{j}")), nf + (j - 1) * gc, if j == 5 { nf } else { gc }, 3, 1, 1))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let conv1x1 = if plus {
            Some(Conv2d::new(vb.pp("conv1x1").get((gc, nf, 1, 1), "weight")?, None, 1, 0))
        } else {
            None
        };
        Ok(Self { convs, conv1x1 })
    }
}

impl Module for DenseBlock {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut feats = vec![x.clone()];
        for (j, conv) in self.convs.iter().enumerate() {
            let input = Tensor::cat(&feats, 1)?;
            let mut y = conv.forward(&input)?;
            if j == 4 {
                return (y * RESIDUAL_SCALE)? + x;
            }
            y = leaky_relu(&y)?;
            if let Some(c) = &self.conv1x1 {
                if j == 1 {
                    y = (y + c.forward(x)?)?;
                } else if j == 3 {
                    y = (y + &feats[2])?;
                }
            }
            feats.push(y);
        }
        candle_core::bail!("a dense block needs five convolutions")
    }
}

/// Residual-in-residual dense block: three dense blocks and a scaled skip.
#[derive(Debug, Clone)]
struct Rrdb {
    blocks: Vec<DenseBlock>,
}

impl Module for Rrdb {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut y = x.clone();
        for b in &self.blocks {
            y = b.forward(&y)?;
        }
        (y * RESIDUAL_SCALE)? + x
    }
}

/// An ESRGAN-family upscaler: RRDBNet with nearest-neighbour upsampling, computed in F32.
#[derive(Debug, Clone)]
pub struct RrdbNet {
    config: RrdbConfig,
    conv_first: Conv2d,
    body: Vec<Rrdb>,
    conv_body: Conv2d,
    conv_up: Vec<Conv2d>,
    conv_hr: Conv2d,
    conv_last: Conv2d,
    device: Device,
}

impl RrdbNet {
    /// Builds the network from BasicSR-named weights (`conv_first`, `body.N.rdbk.convj`, `conv_body`,
    /// `conv_upK`, `conv_hr`, `conv_last`) in `vb`, which should hold F32 tensors.
    pub fn new(config: RrdbConfig, vb: VarBuilder) -> Result<Self> {
        let nf = config.num_feat;
        let conv = |name: &str, c_in: usize, c_out: usize| Conv2d::load(vb.pp(name), c_in, c_out, 3, 1, 1);
        let body = (0..config.num_block)
            .map(|b| {
                let vb = vb.pp(format!("body.{b}"));
                let blocks = (1..=3)
                    .map(|r| DenseBlock::new(vb.pp(format!("rdb{r}")), nf, config.num_grow_ch, config.plus))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Ok(Rrdb { blocks })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            conv_first: conv("conv_first", config.first_conv_channels(), nf)?,
            body,
            conv_body: conv("conv_body", nf, nf)?,
            conv_up: (1..=config.upsample_stages).map(|k| conv(&format!("conv_up{k}"), nf, nf)).collect::<candle_core::Result<_>>()?,
            conv_hr: conv("conv_hr", nf, nf)?,
            conv_last: conv("conv_last", nf, config.out_channels)?,
            device: vb.device().clone(),
            config,
        })
    }

    /// Loads an upscaler from a `.pth`/`.pt` (bare state dict, or wrapped under `params_ema`/`params`)
    /// or `.safetensors` file in any of the supported key layouts, onto `device`.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let file = StateFile::open(path)?;
        let (config, names) = plan(path, file.shapes())?;
        let mut tensors = HashMap::with_capacity(names.len());
        for (canonical, original) in names {
            let t = file.tensor(&original)?;
            tensors.insert(canonical, t.to_dtype(DType::F32)?.to_device(device)?);
        }
        Self::new(config, VarBuilder::from_tensors(tensors, DType::F32, device))
    }

    /// Builds an upscaler from an in-memory state dict in any of the supported key layouts.
    pub fn from_state_dict(tensors: Vec<(String, Tensor)>, device: &Device) -> Result<Self> {
        let source = Path::new("the state dict");
        let shapes = tensors.iter().map(|(k, t)| (k.clone(), t.dims().to_vec())).collect();
        let (config, names) = plan(source, shapes)?;
        let mut by_name: HashMap<String, Tensor> = tensors.into_iter().collect();
        let mut renamed = HashMap::with_capacity(names.len());
        for (canonical, original) in names {
            let t = by_name.remove(&original).ok_or_else(|| not_rrdb(source, format!("it has no {original}")))?;
            renamed.insert(canonical, t.to_dtype(DType::F32)?.to_device(device)?);
        }
        Self::new(config, VarBuilder::from_tensors(renamed, DType::F32, device))
    }

    /// Reads a file's hyper-parameters (scale, channels, blocks, …) from its tensor shapes, without
    /// loading the weights: enough to list upscalers.
    pub fn inspect(path: &Path) -> Result<RrdbConfig> {
        let file = StateFile::open(path)?;
        Ok(plan(path, file.shapes())?.0)
    }

    /// The hyper-parameters read from the weights.
    pub fn config(&self) -> &RrdbConfig {
        &self.config
    }

    /// How many times larger the output is than the input.
    pub fn scale(&self) -> usize {
        self.config.scale()
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The network on a whole batch: `x` is `(B, C, H, W)` with values in [0, 1] on the model's device;
    /// returns `(B, C_out, H·scale, W·scale)` in F32, not clamped. Pixel-unshuffle models pad the input
    /// (reflect) to a multiple of their factor and crop the result, as Real-ESRGAN and spandrel do.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (_, c, h, w) = x.dims4()?;
        if c != self.config.in_channels {
            candle_core::bail!("the upscaler takes {}-channel images, got {c} channels", self.config.in_channels)
        }
        let u = self.config.unshuffle;
        let mut x = x.to_dtype(DType::F32)?;
        if u > 1 {
            x = pad_end(&x, 2, (u - h % u) % u)?;
            x = pad_end(&x, 3, (u - w % u) % u)?;
            x = candle_nn::ops::pixel_unshuffle(&x, u)?;
        }
        let feat = self.conv_first.forward(&x)?;
        let mut trunk = feat.clone();
        for block in &self.body {
            trunk = block.forward(&trunk)?;
        }
        let mut feat = (feat + self.conv_body.forward(&trunk)?)?;
        for conv in &self.conv_up {
            let (_, _, fh, fw) = feat.dims4()?;
            feat = leaky_relu(&conv.forward(&feat.upsample_nearest2d(2 * fh, 2 * fw)?)?)?;
        }
        let out = self.conv_last.forward(&leaky_relu(&self.conv_hr.forward(&feat)?)?)?;
        let s = self.scale();
        if u > 1 {
            out.narrow(2, 0, h * s)?.narrow(3, 0, w * s)
        } else {
            Ok(out)
        }
    }

    /// Upscales an image `(C, H, W)` or `(B, C, H, W)` in [0, 1] (any device and float dtype) tile by tile,
    /// with `tile`-pixel tiles sharing `overlap` pixels (`tile` 0: at once); returns the raw network
    /// output (not clamped) with the input's rank, in F32 on the input's device.
    pub fn upscale_tiled(&self, image: &Tensor, tile: usize, overlap: usize) -> Result<Tensor> {
        self.upscale_tiled_with(image, TileOptions { tile, overlap }, &mut |_, _| ControlFlow::Continue(()))
    }

    /// [`RrdbNet::upscale_tiled`], calling `on_tile(done, total)` after each tile; returning
    /// `ControlFlow::Break` stops with [`Error::Cancelled`].
    pub fn upscale_tiled_with(
        &self,
        image: &Tensor,
        options: TileOptions,
        on_tile: &mut dyn FnMut(usize, usize) -> ControlFlow<()>,
    ) -> Result<Tensor> {
        let rank = image.rank();
        let batched = match rank {
            3 => image.unsqueeze(0)?,
            4 => image.clone(),
            _ => return Err(Error::InvalidInput(format!("an image to upscale is (C, H, W) or (B, C, H, W), got shape {:?}", image.dims()))),
        };
        let (b, c, h, w) = batched.dims4()?;
        if c != self.config.in_channels {
            return Err(Error::InvalidInput(format!(
                "the upscaler takes {}-channel images, got {c} channels (shape {:?})",
                self.config.in_channels,
                image.dims()
            )));
        }
        if h == 0 || w == 0 {
            return Err(Error::InvalidInput(format!("cannot upscale an empty image (shape {:?})", image.dims())));
        }
        let x = batched.to_dtype(DType::F32)?.to_device(&self.device)?;
        let u = self.config.unshuffle;
        let tile = options.tile / u * u;
        let whole = options.tile == 0 || (h <= tile && w <= tile);
        if !whole {
            if tile < 8 {
                return Err(Error::InvalidInput(format!("tile size {} is too small; use at least 8 pixels (or 0 for no tiling)", options.tile)));
            }
            if options.overlap * 2 > tile {
                return Err(Error::InvalidInput(format!("tile overlap {} is more than half the tile ({tile})", options.overlap)));
            }
        }
        let out = if whole {
            let out = self.forward(&x)?;
            if on_tile(1, 1).is_break() {
                return Err(Error::Cancelled);
            }
            out
        } else {
            self.tiled(&x, (b, c, h, w), tile, options.overlap, on_tile)?
        };
        let out = if rank == 3 { out.squeeze(0)? } else { out };
        Ok(out.to_device(image.device())?)
    }

    /// Upscales an RGB image `(3, H, W)` or `(B, 3, H, W)` in [0, 1] for pipelines: tiled, clamped to
    /// [0, 1], F32, with the input's rank and device. This is what A1111's "extras" and hires fix want.
    pub fn upscale(&self, image: &Tensor, options: TileOptions) -> Result<Tensor> {
        Ok(self.upscale_tiled_with(image, options, &mut |_, _| ControlFlow::Continue(()))?.clamp(0f32, 1f32)?)
    }

    /// Tiles of `x` (`(B, C, H, W)` on the model's device), blended into one output on the host.
    fn tiled(
        &self,
        x: &Tensor,
        (b, _, h, w): (usize, usize, usize, usize),
        tile: usize,
        overlap: usize,
        on_tile: &mut dyn FnMut(usize, usize) -> ControlFlow<()>,
    ) -> Result<Tensor> {
        let s = self.scale();
        let c_out = self.config.out_channels;
        let u = self.config.unshuffle;
        let rows = Axis::new(h, tile, overlap, u, s)?;
        let cols = Axis::new(w, tile, overlap, u, s)?;
        let (oh, ow) = (h * s, w * s);
        let mut acc = vec![0f32; b * c_out * oh * ow];
        let total = rows.tiles.len() * cols.tiles.len();
        let mut done = 0;
        for (ti, &(y0, th)) in rows.tiles.iter().enumerate() {
            for (tj, &(x0, tw)) in cols.tiles.iter().enumerate() {
                let part = x.narrow(2, y0, th)?.narrow(3, x0, tw)?;
                let out = self.forward(&part)?.to_device(&Device::Cpu)?;
                let (th, tw) = (th * s, tw * s);
                let data = out.flatten_all()?.to_vec1::<f32>()?;
                let (wy, wx) = (&rows.weights[ti], &cols.weights[tj]);
                for plane in 0..b * c_out {
                    let src = &data[plane * th * tw..(plane + 1) * th * tw];
                    let dst = &mut acc[plane * oh * ow..(plane + 1) * oh * ow];
                    for (r, (src_row, &wr)) in src.chunks_exact(tw).zip(wy).enumerate() {
                        if wr == 0.0 {
                            continue;
                        }
                        let start = (y0 * s + r) * ow + x0 * s;
                        for ((d, &v), &wc) in dst[start..start + tw].iter_mut().zip(src_row).zip(wx) {
                            *d += v * wr * wc;
                        }
                    }
                }
                done += 1;
                if on_tile(done, total).is_break() {
                    return Err(Error::Cancelled);
                }
            }
        }
        for plane in acc.chunks_exact_mut(oh * ow) {
            for (r, row) in plane.chunks_exact_mut(ow).enumerate() {
                for (v, &cs) in row.iter_mut().zip(&cols.sums) {
                    *v /= rows.sums[r] * cs;
                }
            }
        }
        Ok(Tensor::from_vec(acc, (b, c_out, oh, ow), &Device::Cpu)?.to_device(&self.device)?)
    }
}

/// The tiles along one image axis as `(start, length)`, and per tile the blending weight of each
/// output pixel; `sums` is the total weight at each output pixel.
struct Axis {
    tiles: Vec<(usize, usize)>,
    weights: Vec<Vec<f32>>,
    sums: Vec<f32>,
}

impl Axis {
    /// Tiles of `tile` pixels over `size`, overlapping by at least `overlap` and spread evenly, starting
    /// at multiples of `align` (a pixel-unshuffle network is only shift-equivariant by its factor; the
    /// last tile then runs to the end); the output is `scale` times larger.
    fn new(size: usize, tile: usize, overlap: usize, align: usize, scale: usize) -> Result<Self> {
        let tiles = if size <= tile {
            vec![(0, size)]
        } else {
            let stride = tile - overlap;
            let n = (size - tile).div_ceil(stride) + 1;
            let span = size - tile;
            (0..n)
                .map(|i| {
                    let start = (i * span + (n - 1) / 2) / (n - 1) / align * align;
                    (start, if i + 1 == n { size - start } else { tile })
                })
                .collect::<Vec<_>>()
        };
        // Rounding starts down to the alignment can give two tiles the same start: keep the longer.
        let mut tiles = tiles;
        tiles.dedup_by(|later, earlier| {
            let same = later.0 == earlier.0;
            if same {
                earlier.1 = earlier.1.max(later.1);
            }
            same
        });
        let n = tiles.len();
        let mut weights = Vec::with_capacity(n);
        let mut sums = vec![0f32; size * scale];
        for (i, &(p, len)) in tiles.iter().enumerate() {
            let before = if i > 0 { Some((tiles[i - 1].0 + tiles[i - 1].1).saturating_sub(p)) } else { None };
            let after = if i + 1 < n { Some((p + len).saturating_sub(tiles[i + 1].0)) } else { None };
            let wts: Vec<f32> = (0..len * scale)
                .map(|j| {
                    let d = (j as f64 + 0.5) / scale as f64;
                    let left = before.map_or(1.0, |o| ramp(d, o));
                    let right = after.map_or(1.0, |o| ramp(len as f64 - d, o));
                    (left * right) as f32
                })
                .collect();
            for (j, &wt) in wts.iter().enumerate() {
                sums[p * scale + j] += wt;
            }
            weights.push(wts);
        }
        if sums.iter().any(|&s| s <= 0.0) {
            return Err(Error::InvalidInput(format!(
                "tiles of {tile} pixels overlapping by {overlap} leave gaps along a {size}-pixel side; use a larger overlap"
            )));
        }
        Ok(Self { tiles, weights, sums })
    }
}

/// Blending weight at distance `d` from a tile edge shared over `overlap` pixels: 0 over the outer
/// quarter (where the tile's own border disturbs it), a linear ramp over the middle half, then 1.
fn ramp(d: f64, overlap: usize) -> f64 {
    if overlap == 0 {
        return 1.0;
    }
    let o = overlap as f64;
    ((d - o / 4.0) / (o / 2.0)).clamp(0.0, 1.0)
}

/// LeakyReLU with slope 0.2.
fn leaky_relu(x: &Tensor) -> candle_core::Result<Tensor> {
    x.maximum(&(x * LEAKY_SLOPE)?)
}

/// Pads `pad` pixels at the end of dimension `dim`: reflection (as far as the size allows), then
/// replication, as spandrel pads images for pixel-unshuffle models.
fn pad_end(x: &Tensor, dim: usize, pad: usize) -> candle_core::Result<Tensor> {
    if pad == 0 {
        return Ok(x.clone());
    }
    let n = x.dim(dim)?;
    let reflect = pad.min(n.saturating_sub(1));
    let idx: Vec<u32> = (0..pad).map(|i| if i < reflect { n - 2 - i } else { n - 1 - reflect } as u32).collect();
    let idx = Tensor::new(idx.as_slice(), x.device())?;
    let x = x.contiguous()?;
    let tail = x.index_select(&idx, dim)?;
    Tensor::cat(&[x, tail], dim)
}

/// The error for a file that is not an RRDBNet upscaler.
fn not_rrdb(path: &Path, reason: String) -> Error {
    Error::NotAnUpscaler { path: path.to_path_buf(), reason }
}

/// Maps a file's tensor names onto BasicSR's and reads the configuration: returns it with
/// `(BasicSR name, name in the file)` for every tensor the model needs, after checking every shape.
fn plan(path: &Path, shapes: Vec<(String, Vec<usize>)>) -> Result<(RrdbConfig, Vec<(String, String)>)> {
    let names: Vec<String> = shapes.iter().map(|(k, _)| k.clone()).collect();
    let (layout, renamed) = canonical_names(&names).map_err(|r| not_rrdb(path, r))?;
    let by_original: HashMap<&str, &Vec<usize>> = shapes.iter().map(|(k, s)| (k.as_str(), s)).collect();
    let mut canonical_shapes = HashMap::with_capacity(renamed.len());
    let mut original_of = HashMap::with_capacity(renamed.len());
    for (canonical, original) in &renamed {
        if let Some(s) = by_original.get(original.as_str()) {
            canonical_shapes.insert(canonical.clone(), (*s).clone());
        }
        original_of.insert(canonical.clone(), original.clone());
    }
    let config = RrdbConfig::from_shapes(&canonical_shapes, layout).map_err(|r| not_rrdb(path, r))?;
    let expected = config.expected_shapes();
    let in_file = |canonical: &str| original_of.get(canonical).cloned().unwrap_or_else(|| canonical.to_string());
    for (name, shape) in &expected {
        match canonical_shapes.get(name) {
            None => return Err(not_rrdb(path, format!("tensor {} is missing for {config}; the file is truncated or not an RRDBNet", layout_name(name, layout)))),
            Some(s) if s != shape => {
                return Err(not_rrdb(
                    path,
                    format!("tensor {} has shape {s:?} but {config} needs {shape:?}; the file is damaged or an RRDBNet variant that is not supported", in_file(name)),
                ))
            }
            Some(_) => {}
        }
    }
    let wanted: BTreeSet<&str> = expected.iter().map(|(k, _)| k.as_str()).collect();
    let extra: Vec<String> = renamed.iter().filter(|(c, _)| !wanted.contains(c.as_str())).map(|(_, o)| o.clone()).collect();
    if !extra.is_empty() {
        return Err(not_rrdb(
            path,
            format!(
                "it has tensors an RRDBNet does not ({}{}); this ESRGAN variant (e.g. with normalisation layers or a pixel-shuffle upsampler) is not supported",
                extra.iter().take(5).cloned().collect::<Vec<_>>().join(", "),
                if extra.len() > 5 { ", …" } else { "" }
            ),
        ));
    }
    let names = expected.into_iter().map(|(c, _)| (c.clone(), in_file(&c))).collect();
    Ok((config, names))
}

/// How a BasicSR name is spelled in a file of `layout`, for messages about missing tensors.
fn layout_name(canonical: &str, layout: KeyLayout) -> String {
    match layout {
        KeyLayout::BasicSr => canonical.to_string(),
        _ => format!("{canonical} (BasicSR name)"),
    }
}

/// The file's layout, and `(BasicSR name, name in the file)` for every tensor name.
fn canonical_names(names: &[String]) -> std::result::Result<(KeyLayout, Vec<(String, String)>), String> {
    // Training frameworks sometimes save the whole state dict under a module prefix.
    let prefix = ["module.", "netG."].into_iter().find(|p| !names.is_empty() && names.iter().all(|n| n.starts_with(p))).unwrap_or("");
    let stripped: Vec<(&str, &String)> = names.iter().map(|n| (&n[prefix.len()..], n)).collect();
    let has = |k: &str| stripped.iter().any(|(n, _)| *n == k);
    let layout = if has("model.0.weight") && stripped.iter().any(|(n, _)| n.starts_with("model.1.sub.0.RDB1.")) {
        KeyLayout::OldEsrgan
    } else if has("conv_first.weight") && has("body.0.rdb1.conv1.weight") {
        KeyLayout::BasicSr
    } else if has("conv_first.weight") && has("RRDB_trunk.0.RDB1.conv1.weight") {
        KeyLayout::Bsrgan
    } else {
        return Err(diagnose(&stripped.iter().map(|(n, _)| *n).collect::<Vec<_>>()));
    };
    let mut out = Vec::with_capacity(names.len());
    match layout {
        KeyLayout::OldEsrgan => {
            // Top-level `model.I` convs: 0 first, then upsampling convs at 3, 6, …, the HR conv at L−2 and
            // the last conv at L (spandrel's reading of the sequential).
            let top: BTreeSet<usize> = stripped
                .iter()
                .filter_map(|(n, _)| n.strip_prefix("model.")?.split_once('.').and_then(|(i, rest)| if rest == "weight" { i.parse().ok() } else { None }))
                .collect();
            let last = top.iter().next_back().copied().unwrap_or(0);
            if last < 4 || (last - 4) % 3 != 0 {
                return Err(format!("its last layer is model.{last}, which does not fit an ESRGAN sequential (model.4, model.7, model.10, …)"));
            }
            let hr = last - 2;
            let stages = (last - 4) / 3;
            let trunk_end = stripped
                .iter()
                .filter_map(|(n, _)| n.strip_prefix("model.1.sub.")?.split_once('.').and_then(|(i, rest)| if rest.starts_with("RDB") { None } else { i.parse::<usize>().ok() }))
                .max();
            for (n, original) in &stripped {
                let canonical = if let Some(rest) = n.strip_prefix("model.1.sub.") {
                    let (i, rest) = rest.split_once('.').unwrap_or((rest, ""));
                    match rest.strip_prefix("RDB") {
                        Some(r) => {
                            // `RDBk.convj.0.weight` → `rdbk.convj.weight`; `RDBk.conv1x1.weight` stays.
                            let r = r.replacen(".0.", ".", 1);
                            format!("body.{i}.rdb{r}")
                        }
                        None if i.parse::<usize>().ok() == trunk_end => format!("conv_body.{rest}"),
                        None => n.to_string(),
                    }
                } else if let Some((i, kind)) = n.strip_prefix("model.").and_then(|r| r.split_once('.')) {
                    match i.parse::<usize>() {
                        Ok(0) => format!("conv_first.{kind}"),
                        Ok(i) if i == last => format!("conv_last.{kind}"),
                        Ok(i) if i == hr => format!("conv_hr.{kind}"),
                        Ok(i) if i % 3 == 0 && (1..=stages).contains(&(i / 3)) => format!("conv_up{}.{kind}", i / 3),
                        _ => n.to_string(),
                    }
                } else {
                    n.to_string()
                };
                out.push((canonical, (*original).clone()));
            }
        }
        KeyLayout::BasicSr => out.extend(stripped.iter().map(|(n, o)| (n.to_string(), (*o).clone()))),
        KeyLayout::Bsrgan => {
            for (n, original) in &stripped {
                let canonical = if let Some(rest) = n.strip_prefix("RRDB_trunk.") {
                    let (i, rest) = rest.split_once('.').unwrap_or((rest, ""));
                    format!("body.{i}.{}", rest.replacen("RDB", "rdb", 1))
                } else if let Some(rest) = n.strip_prefix("trunk_conv.") {
                    format!("conv_body.{rest}")
                } else if let Some(rest) = n.strip_prefix("upconv") {
                    format!("conv_up{rest}")
                } else if let Some(rest) = n.strip_prefix("HRconv.") {
                    format!("conv_hr.{rest}")
                } else {
                    n.to_string()
                };
                out.push((canonical, (*original).clone()));
            }
        }
    }
    Ok((layout, out))
}

/// Why a state dict is not an RRDBNet, naming the architecture when its keys give it away.
fn diagnose(names: &[&str]) -> String {
    let any = |p: &str| names.iter().any(|n| n.starts_with(p));
    let has = |k: &str| names.contains(&k);
    let what = if names.is_empty() {
        "it holds no tensors".to_string()
    } else if any("model.diffusion_model.") || any("first_stage_model.") || any("down_blocks.") || any("conditioner.") {
        "it is a Stable Diffusion model, not an upscaler".to_string()
    } else if any("lora_") || names.iter().any(|n| n.contains(".lora_") || n.contains("lora_down")) {
        "it is a LoRA, not an upscaler".to_string()
    } else if any("layers.0.residual_group") || (has("conv_first.weight") && any("layers.")) {
        "it looks like a transformer upscaler (SwinIR/HAT/DAT: `layers.*`)".to_string()
    } else if has("body.0.weight") && !any("body.0.rdb") {
        "it looks like a Real-ESRGAN compact model (SRVGGNetCompact: realesr-general-x4v3, animevideo)".to_string()
    } else {
        let mut sample: Vec<&str> = names.to_vec();
        sample.sort_unstable();
        sample.truncate(4);
        format!("no conv_first/model.0 weight with RRDB blocks among its {} tensors ({}, …)", names.len(), sample.join(", "))
    };
    format!("{what}; SwinIR/DAT/HAT/SPAN/Compact upscalers are not supported, only ESRGAN-family (RRDBNet) ones")
}

/// An upscaler file opened for reading: safetensors, or a PyTorch zip pickle with the key its state
/// dict sits under.
enum StateFile {
    Safetensors(candle_core::safetensors::MmapedSafetensors),
    Pth(PathBuf, candle_core::pickle::PthTensors),
}

impl StateFile {
    fn open(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::NotFound { what: "upscaler model file".into(), path: path.to_path_buf() });
        }
        let ext = path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
        match ext.as_str() {
            "safetensors" => Ok(Self::Safetensors(crate::single_file::open_safetensors(path)?)),
            "pth" | "pt" | "bin" | "ckpt" => {
                let mut last_err = None;
                for key in PTH_WRAPPERS.iter().map(|k| Some(*k)).chain([None]) {
                    match candle_core::pickle::PthTensors::new(path, key) {
                        Ok(p) if !p.tensor_infos().is_empty() => return Ok(Self::Pth(path.to_path_buf(), p)),
                        Ok(_) => {}
                        Err(e) => last_err = Some(e),
                    }
                }
                Err(match last_err {
                    Some(e) if !is_zip(path) => Error::UnsupportedFormat {
                        path: path.to_path_buf(),
                        reason: format!(
                            "cannot read it as a PyTorch file ({e}); files saved by PyTorch before 1.6 must be re-saved \
                             (torch.save(torch.load(f), f)) or converted to .safetensors"
                        ),
                    },
                    _ => not_rrdb(path, "it holds no state dict of tensors (nor one under params_ema/params/state_dict)".into()),
                })
            }
            _ => Err(Error::UnsupportedFormat {
                path: path.to_path_buf(),
                reason: format!("unknown upscaler file extension {ext:?}; use .pth, .pt or .safetensors"),
            }),
        }
    }

    /// Every tensor's name and shape.
    fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        match self {
            Self::Pth(_, p) => p.tensor_infos().iter().map(|(k, t)| (k.clone(), t.layout.shape().dims().to_vec())).collect(),
            Self::Safetensors(st) => st.tensors().into_iter().map(|(k, v)| (k, v.shape().to_vec())).collect(),
        }
    }

    /// One tensor, on the CPU.
    fn tensor(&self, name: &str) -> Result<Tensor> {
        match self {
            Self::Pth(path, p) => p.get(name)?.ok_or_else(|| not_rrdb(path, format!("tensor {name} cannot be read"))),
            Self::Safetensors(st) => Ok(st.load(name, &Device::Cpu)?),
        }
    }
}

/// Whether the file starts like a zip archive (PyTorch ≥ 1.6 `.pth`).
fn is_zip(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && magic == *b"PK\x03\x04"
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every pixel of every side gets weight from some tile, tiles stay inside the image, start at
    /// multiples of the alignment, and a tile's weight is zero within a quarter overlap of a shared edge.
    #[test]
    fn tile_weights_cover_every_side() -> Result<()> {
        for align in [1, 2, 4] {
            for scale in [1, 2, 4] {
                for tile in (8..=40).filter(|t| t % align == 0) {
                    for overlap in 0..=tile / 2 {
                        for size in 1..=130 {
                            let axis = Axis::new(size, tile, overlap, align, scale)?;
                            let mut end = 0;
                            for (i, &(p, len)) in axis.tiles.iter().enumerate() {
                                assert!(p % align == 0 && p + len <= size && p >= end.min(p), "{size}/{tile}/{overlap}: tile {i} at {p}+{len}");
                                assert!(i == 0 || p > axis.tiles[i - 1].0, "{size}/{tile}/{overlap}: repeated start");
                                end = p + len;
                            }
                            assert_eq!(end, size, "{size}/{tile}/{overlap}: tiles end at {end}");
                            assert!(axis.sums.iter().all(|&s| s > 0.0));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn reflect_then_replicate_padding() -> candle_core::Result<()> {
        let x = Tensor::new(&[[[[1f32, 2., 3.]]]], &Device::Cpu)?;
        assert_eq!(pad_end(&x, 3, 2)?.flatten_all()?.to_vec1::<f32>()?, [1., 2., 3., 2., 1.]);
        assert_eq!(pad_end(&x, 3, 3)?.flatten_all()?.to_vec1::<f32>()?, [1., 2., 3., 2., 1., 1.]);
        assert_eq!(pad_end(&x, 2, 1)?.dims(), &[1, 1, 2, 3]);
        Ok(())
    }
}
