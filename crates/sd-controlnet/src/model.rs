//! diffusers' `ControlNetModel`: a trainable copy of the UNet encoder fed with the UNet's latents plus
//! an embedding of the control image, whose per-skip outputs pass through zero-initialised 1×1
//! convolutions to become residuals for the UNet.

use std::path::Path;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use sd_models::ops;
use sd_models::unet::blocks::{DownBlock, MidBlock, ResnetSpec};
use sd_models::unet::embeddings::TimeEmbedding;
use sd_models::unet::transformer::TransformerSpec;
use sd_models::unet::AddedCond;
use sd_models::weights::MappedWeights;

use crate::config::ControlNetConfig;
use crate::error::{Error, Result};

/// `ControlNetConditioningEmbedding`: pixel-space control image → `block_out_channels[0]` features at latent size.
#[derive(Debug, Clone)]
struct ConditioningEmbedding {
    conv_in: ops::Conv2d,
    blocks: Vec<ops::Conv2d>,
    conv_out: ops::Conv2d,
}

impl ConditioningEmbedding {
    fn new(vb: VarBuilder, c_in: usize, channels: &[usize], c_out: usize) -> candle_core::Result<Self> {
        let conv_in = ops::Conv2d::load(vb.pp("conv_in"), c_in, channels[0], 3, 1, 1)?;
        let mut blocks = Vec::with_capacity(2 * channels.len().saturating_sub(1));
        for (i, pair) in channels.windows(2).enumerate() {
            blocks.push(ops::Conv2d::load(vb.pp("blocks").pp(2 * i), pair[0], pair[0], 3, 1, 1)?);
            blocks.push(ops::Conv2d::load(vb.pp("blocks").pp(2 * i + 1), pair[0], pair[1], 3, 2, 1)?);
        }
        let last = channels[channels.len() - 1];
        let conv_out = ops::Conv2d::load(vb.pp("conv_out"), last, c_out, 3, 1, 1)?;
        Ok(Self { conv_in, blocks, conv_out })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = ops::silu(&self.conv_in.forward(x)?)?;
        for block in &self.blocks {
            x = ops::silu(&block.forward(&x)?)?;
        }
        self.conv_out.forward(&x)
    }
}

/// A loaded ControlNet.
#[derive(Debug, Clone)]
pub struct ControlNetModel {
    cfg: ControlNetConfig,
    time_embedding: TimeEmbedding,
    conv_in: ops::Conv2d,
    cond_embedding: ConditioningEmbedding,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    zero_convs: Vec<ops::Conv2d>,
    mid_zero_conv: ops::Conv2d,
    dtype: DType,
    device: Device,
}

impl ControlNetModel {
    /// Builds the model from `vb` rooted at the ControlNet weights (`conv_in.weight`, `controlnet_down_blocks.0…`).
    pub fn new(vb: VarBuilder, cfg: &ControlNetConfig) -> Result<Self> {
        cfg.validate()?;
        let ucfg = &cfg.unet;
        let boc = &ucfg.block_out_channels;
        let n = boc.len();
        let device = vb.device().clone();
        let dtype = vb.dtype();
        let temb_dim = boc[0] * 4;
        let resnet = ResnetSpec { temb_dim, groups: ucfg.norm_num_groups, eps: ucfg.norm_eps };
        let transformer = |channels: usize, block: usize| TransformerSpec {
            channels,
            heads: ucfg.heads(block),
            depth: ucfg.transformer_layers_per_block.get(block),
            context_dim: ucfg.cross_attention_dim,
            groups: ucfg.norm_num_groups,
            linear_projection: ucfg.use_linear_projection,
            upcast_attention: ucfg.upcast_attention,
        };
        let time_embedding = TimeEmbedding::new(vb.clone(), ucfg)?;
        let conv_in = ops::Conv2d::load(vb.pp("conv_in"), ucfg.in_channels, boc[0], 3, 1, 1)?;
        let cond_embedding = ConditioningEmbedding::new(
            vb.pp("controlnet_cond_embedding"),
            cfg.conditioning_channels,
            &cfg.conditioning_embedding_out_channels,
            boc[0],
        )?;

        let mut down_blocks = Vec::with_capacity(n);
        // One zero conv per UNet skip, with that skip's channel count, in diffusers' order.
        let mut skip_channels = vec![boc[0]];
        for i in 0..n {
            let c_in = if i == 0 { boc[0] } else { boc[i - 1] };
            let attn = ucfg.down_has_attn(i).then(|| transformer(boc[i], i));
            let last = i + 1 == n;
            down_blocks.push(DownBlock::new(vb.pp("down_blocks").pp(i), c_in, boc[i], ucfg.layers_per_block, resnet, attn, !last)?);
            skip_channels.extend(std::iter::repeat_n(boc[i], ucfg.layers_per_block + usize::from(!last)));
        }
        let mid_block = MidBlock::new(vb.pp("mid_block"), boc[n - 1], resnet, transformer(boc[n - 1], n - 1))?;
        let zero_convs = skip_channels
            .iter()
            .enumerate()
            .map(|(j, &c)| ops::Conv2d::load(vb.pp("controlnet_down_blocks").pp(j), c, c, 1, 1, 0))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mid_zero_conv = ops::Conv2d::load(vb.pp("controlnet_mid_block"), boc[n - 1], boc[n - 1], 1, 1, 0)?;
        Ok(Self {
            cfg: cfg.clone(),
            time_embedding,
            conv_in,
            cond_embedding,
            down_blocks,
            mid_block,
            zero_convs,
            mid_zero_conv,
            dtype,
            device,
        })
    }

    /// Loads a diffusers ControlNet folder (`config.json` + `diffusion_pytorch_model[.fp16].safetensors`,
    /// sharded or not; the `.fp16` file is preferred when `dtype` is F16).
    pub fn from_folder(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let config = dir.join("config.json");
        let text = std::fs::read_to_string(&config).map_err(|source| Error::Io { path: config, source })?;
        let cfg = ControlNetConfig::from_json(&text)?;
        let weights = sd_models::diffusers::find_weight_files(dir, dtype == DType::F16)?;
        // SAFETY: the files are memory-mapped read-only; a concurrent writer would be a user error, as with every safetensors loader.
        let st = unsafe { MmapedSafetensors::multi(&weights) }
            .map_err(|e| sd_models::Error::InvalidSafetensors { path: dir.to_path_buf(), reason: e.to_string() })?;
        let vb = VarBuilder::from_backend(Box::new(MappedWeights::new(st)), dtype, device.clone());
        Self::new(vb, &cfg)
    }

    /// Loads a ControlNet for a pipeline whose UNet is `base`: a diffusers folder, or a single
    /// `.safetensors` file with original (`control_model.*`) or diffusers names. Fails with
    /// [`Error::Incompatible`] when it was trained for another base model.
    pub fn load(path: &Path, base: &sd_models::UNetConfig, dtype: DType, device: &Device) -> Result<Self> {
        let model = if path.is_dir() {
            Self::from_folder(path, dtype, device)?
        } else {
            crate::single_file::load_single_file(path, base, dtype, device)?
        };
        model.cfg.check_compatible(base)?;
        Ok(model)
    }

    /// The config `path` (folder or single file) would load with, checked against `base`, without
    /// reading any weights: a cheap test a server can run before it queues a job.
    pub fn inspect(path: &Path, base: &sd_models::UNetConfig) -> Result<ControlNetConfig> {
        let cfg = if path.is_dir() {
            let config = path.join("config.json");
            let text = std::fs::read_to_string(&config).map_err(|source| Error::Io { path: config, source })?;
            ControlNetConfig::from_json(&text)?
        } else {
            crate::single_file::inspect_single_file(path, base)?
        };
        cfg.check_compatible(base)?;
        Ok(cfg)
    }

    /// The config the model was built from.
    pub fn config(&self) -> &ControlNetConfig {
        &self.cfg
    }

    /// The dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Residuals for `sample` `[b, 4, h, w]` at `timestep`, with text embeddings `[b, seq, ctx]`, the
    /// control image `[b, 3, H, W]` in [0, 1] at pixel size, and SDXL's `added` conditioning.
    ///
    /// Returns `(down residuals, mid residual)` multiplied by `conditioning_scale`, in the order
    /// `sd_models::unet::UNetConditioning` expects.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        controlnet_cond: &Tensor,
        added: Option<&AddedCond>,
        conditioning_scale: f64,
    ) -> Result<(Vec<Tensor>, Tensor)> {
        let (b, _, h, w) = self.validate(sample, encoder_hidden_states, controlnet_cond, added)?;
        let sample = sample.to_device(&self.device)?.to_dtype(self.dtype)?;
        let context = encoder_hidden_states.to_device(&self.device)?.to_dtype(self.dtype)?;
        let mut cond = controlnet_cond.to_device(&self.device)?.to_dtype(self.dtype)?;
        if self.cfg.controlnet_conditioning_channel_order == "bgr" {
            let c = cond.dim(1)?;
            let idx = Tensor::new((0..c as u32).rev().collect::<Vec<_>>(), &self.device)?;
            cond = cond.index_select(&idx, 1)?;
        }

        let t = Tensor::new(&[timestep as f32], &self.device)?.broadcast_as(b)?;
        let emb = self.time_embedding.forward(&t, added)?;
        let temb_act = ops::silu(&emb)?;

        let hint = self.cond_embedding.forward(&cond)?;
        if hint.dims()[2..] != [h, w] {
            return Err(Error::InvalidInput {
                field: "control image",
                reason: format!(
                    "its embedding is {:?} but the latents are {h}×{w}; the control image must be the generation size in pixels",
                    &hint.dims()[2..]
                ),
            });
        }
        let mut x = (self.conv_in.forward(&sample)? + hint)?;
        let mut skips = Vec::with_capacity(self.zero_convs.len());
        skips.push(x.clone());
        for block in &self.down_blocks {
            x = block.forward(&x, &temb_act, &context, &mut skips)?;
        }
        x = self.mid_block.forward(&x, &temb_act, &context)?;

        let pool = |t: Tensor| -> candle_core::Result<Tensor> {
            if self.cfg.global_pool_conditions {
                t.mean_keepdim(2)?.mean_keepdim(3)
            } else {
                Ok(t)
            }
        };
        let down = skips
            .iter()
            .zip(&self.zero_convs)
            .map(|(s, conv)| pool((conv.forward(s)? * conditioning_scale)?))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mid = pool((self.mid_zero_conv.forward(&x)? * conditioning_scale)?)?;
        Ok((down, mid))
    }

    fn validate(&self, sample: &Tensor, context: &Tensor, cond: &Tensor, added: Option<&AddedCond>) -> Result<(usize, usize, usize, usize)> {
        let invalid = |field: &'static str, reason: String| Err(Error::InvalidInput { field, reason });
        let &[b, c, h, w] = sample.dims() else {
            return invalid("sample", format!("must be [batch, channels, height, width], got {:?}", sample.dims()));
        };
        if c != self.cfg.unet.in_channels || b == 0 || h == 0 || w == 0 {
            return invalid("sample", format!("got shape {:?}; this ControlNet takes [batch, {}, h, w] latents", sample.dims(), self.cfg.unet.in_channels));
        }
        match context.dims() {
            &[cb, _, cd] if cb == b && cd == self.cfg.unet.cross_attention_dim => {}
            dims => {
                return Err(Error::Incompatible(format!(
                    "text embeddings have shape {dims:?} but this ControlNet expects [batch = {b}, seq, {}]",
                    self.cfg.unet.cross_attention_dim
                )))
            }
        }
        match cond.dims() {
            &[cb, cc, _, _] if cb == b && cc == self.cfg.conditioning_channels => {}
            dims => {
                return invalid(
                    "control image",
                    format!("got shape {dims:?}; expected [batch = {b}, {}, height, width]", self.cfg.conditioning_channels),
                )
            }
        }
        match (self.time_embedding.add_dims(), added) {
            (Some(add), Some(added)) => {
                let ok = matches!((added.text_embeds.dims(), added.time_ids.dims()), (&[tb, td], &[ib, ni]) if tb == b && ib == b && td + ni * add.time_dim == add.in_dim);
                if !ok {
                    return Err(Error::Incompatible(format!(
                        "SDXL conditioning text_embeds {:?} / time_ids {:?} do not fit the add-embedding input width {} (batch {b})",
                        added.text_embeds.dims(),
                        added.time_ids.dims(),
                        add.in_dim
                    )));
                }
            }
            (Some(_), None) => return Err(Error::Incompatible("this is an SDXL ControlNet; it needs SDXL text_time conditioning".into())),
            (None, Some(_)) => return Err(Error::Incompatible("this ControlNet has no SDXL text_time embedding but got SDXL conditioning".into())),
            (None, None) => {}
        }
        Ok((b, c, h, w))
    }
}
