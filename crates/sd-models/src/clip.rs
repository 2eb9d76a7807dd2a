//! CLIP text encoder (transformers' `CLIPTextModel` / `CLIPTextModelWithProjection`).
//!
//! Written here rather than taken from candle-transformers because Stable Diffusion needs every
//! intermediate hidden state (clip skip, SDXL's penultimate layer), the pooled output picked at the
//! end-of-text position with transformers' exact rule, and the optional `text_projection`.

use candle_core::{bail, DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, LayerNorm, VarBuilder};

use crate::config::{ClipActivation, ClipConfig};
use crate::ops::{self, Linear};

/// Everything one forward pass of the text encoder produces.
#[derive(Debug, Clone)]
pub struct ClipOutput {
    /// The embeddings output followed by the output of every layer (`num_hidden_layers + 1`
    /// tensors `[batch, seq, hidden]`, before the final LayerNorm), as transformers'
    /// `output_hidden_states=True` returns them.
    pub hidden_states: Vec<Tensor>,
    /// The last layer's output after `final_layer_norm`, `[batch, seq, hidden]`.
    pub last_hidden_state: Tensor,
    /// `last_hidden_state` at each sequence's end-of-text position, `[batch, hidden]`.
    pub pooled: Tensor,
    /// `text_projection(pooled)`, `[batch, projection_dim]`, for models that have a projection.
    pub text_embeds: Option<Tensor>,
}

impl ClipOutput {
    /// The output of the layer `skip` layers before the last (0: last layer, 1: penultimate), before
    /// the final LayerNorm.
    ///
    /// SD 1.x "clip skip" feeds `final_layer_norm(hidden(skip))` to the UNet, as diffusers'
    /// `hidden_states[-(clip_skip + 1)]`; SDXL feeds `hidden(1)` without the LayerNorm.
    pub fn hidden(&self, skip: usize) -> crate::Result<&Tensor> {
        let layers = self.hidden_states.len().saturating_sub(1);
        if skip >= layers {
            return Err(crate::Error::InvalidInput(format!(
                "clip skip {skip} is too large for a text encoder with {layers} layers; use a value below {layers}"
            )));
        }
        Ok(&self.hidden_states[self.hidden_states.len() - 1 - skip])
    }
}

/// One pre-LayerNorm transformer block with causal self-attention.
#[derive(Debug, Clone)]
struct EncoderLayer {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm1: LayerNorm,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    activation: ClipActivation,
}

impl EncoderLayer {
    fn new(vb: VarBuilder, cfg: &ClipConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let attn = vb.pp("self_attn");
        let mlp = vb.pp("mlp");
        Ok(Self {
            q_proj: ops::linear(attn.pp("q_proj"), h, h, true)?,
            k_proj: ops::linear(attn.pp("k_proj"), h, h, true)?,
            v_proj: ops::linear(attn.pp("v_proj"), h, h, true)?,
            out_proj: ops::linear(attn.pp("out_proj"), h, h, true)?,
            layer_norm1: ops::layer_norm(vb.pp("layer_norm1"), h, cfg.layer_norm_eps)?,
            layer_norm2: ops::layer_norm(vb.pp("layer_norm2"), h, cfg.layer_norm_eps)?,
            fc1: ops::linear(mlp.pp("fc1"), h, cfg.intermediate_size, true)?,
            fc2: ops::linear(mlp.pp("fc2"), cfg.intermediate_size, h, true)?,
            heads: cfg.num_attention_heads,
            activation: cfg.hidden_act,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let h = self.layer_norm1.forward(x)?;
        let q = self.q_proj.forward(&h)?;
        let k = self.k_proj.forward(&h)?;
        let v = self.v_proj.forward(&h)?;
        let a = ops::attention_masked(&q, &k, &v, self.heads, false, Some(mask))?;
        let x = (x + self.out_proj.forward(&a)?)?;
        let h = self.fc1.forward(&self.layer_norm2.forward(&x)?)?;
        let h = match self.activation {
            ClipActivation::QuickGelu => (&h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?)?,
            ClipActivation::Gelu => ops::gelu_erf(&h)?,
        };
        x + self.fc2.forward(&h)?
    }
}

/// The CLIP text transformer, optionally with its `text_projection`.
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
    vocab_size: usize,
    eos_token_id: u32,
}

impl ClipTextModel {
    /// Loads the encoder from `vb` rooted at the component (`text_model.*`, `text_projection.weight`).
    ///
    /// `text_projection` is loaded when `cfg.projection_dim` is set and the checkpoint has it:
    /// transformers writes `projection_dim` into every CLIP text config, also for `CLIPTextModel`
    /// checkpoints that have no projection.
    pub fn new(vb: VarBuilder, cfg: &ClipConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        if cfg.num_attention_heads == 0 || h % cfg.num_attention_heads != 0 {
            bail!(
                "CLIP config: hidden_size {h} is not divisible by num_attention_heads {}; fix the text encoder config.json",
                cfg.num_attention_heads
            );
        }
        let tm = vb.pp("text_model");
        let emb = tm.pp("embeddings");
        let token_embedding = candle_nn::embedding(cfg.vocab_size, h, emb.pp("token_embedding"))?;
        let position_embedding = emb.pp("position_embedding").get((cfg.max_position_embeddings, h), "weight")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::new(tm.pp("encoder.layers").pp(i.to_string()), cfg))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = ops::layer_norm(tm.pp("final_layer_norm"), h, cfg.layer_norm_eps)?;
        let text_projection = match cfg.projection_dim {
            Some(p) if vb.contains_tensor("text_projection.weight") => {
                Some(ops::linear(vb.pp("text_projection"), h, p, false)?)
            }
            _ => None,
        };
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            text_projection,
            vocab_size: cfg.vocab_size,
            eos_token_id: cfg.eos_token_id,
        })
    }

    /// Whether the model has a `text_projection` (so `forward` returns `text_embeds`).
    pub fn has_projection(&self) -> bool {
        self.text_projection.is_some()
    }

    /// The number of transformer layers.
    pub fn layer_count(&self) -> usize {
        self.layers.len()
    }

    /// The device the weights are on.
    pub fn device(&self) -> &Device {
        self.position_embedding.device()
    }

    /// The dtype the weights were loaded in (the activations' dtype too).
    pub fn dtype(&self) -> DType {
        self.position_embedding.dtype()
    }

    /// The maximum sequence length (number of position embeddings).
    pub fn max_len(&self) -> usize {
        self.position_embedding.dim(0).unwrap_or(0)
    }

    /// Applies the model's final LayerNorm, e.g. to an earlier layer's output for clip skip.
    pub fn final_layer_norm(&self, x: &Tensor) -> Result<Tensor> {
        self.final_layer_norm.forward(x)
    }

    /// Runs the encoder on token ids `[batch, seq]` (U32 or I64).
    pub fn forward(&self, input_ids: &Tensor) -> Result<ClipOutput> {
        self.forward_with_vectors(input_ids, &[])
    }

    /// [`ClipTextModel::forward`] with token embeddings replaced: each `(position, vectors)` puts the
    /// `[n, hidden]` vectors at positions `position..position + n` of every sequence, before the position
    /// embeddings are added (textual inversion, as A1111's `EmbeddingsWithFixes`; vectors that would
    /// reach the last position are cut).
    pub fn forward_with_vectors(&self, input_ids: &Tensor, fixes: &[(usize, Tensor)]) -> Result<ClipOutput> {
        let rows = self.checked_ids(input_ids)?;
        let (b, seq) = (rows.len(), rows.first().map_or(0, Vec::len));
        let max_len = self.max_len();
        if seq == 0 || seq > max_len {
            bail!("CLIP input has {seq} tokens per sequence but the model accepts 1 to {max_len}; tokenize with max length {max_len}");
        }
        let device = self.position_embedding.device();
        let flat: Vec<u32> = rows.iter().flatten().copied().collect();
        let ids = Tensor::from_vec(flat, (b, seq), device)?;
        let positions = self.position_embedding.narrow(0, 0, seq)?;
        let mut tokens = self.token_embedding.forward(&ids)?;
        for (pos, vectors) in fixes {
            tokens = splice(&tokens, *pos, vectors)?;
        }
        let mut x = tokens.broadcast_add(&positions)?;
        let mask = causal_mask(seq, x.dtype(), device)?;

        let mut hidden_states = Vec::with_capacity(self.layers.len() + 1);
        hidden_states.push(x.clone());
        for layer in &self.layers {
            x = layer.forward(&x, &mask)?;
            hidden_states.push(x.clone());
        }
        let last_hidden_state = self.final_layer_norm.forward(&x)?;

        let pooled = rows
            .iter()
            .enumerate()
            .map(|(i, row)| last_hidden_state.get(i)?.get(eos_position(row, self.eos_token_id)))
            .collect::<Result<Vec<_>>>()?;
        let pooled = Tensor::stack(&pooled, 0)?;
        let text_embeds = self.text_projection.as_ref().map(|p| p.forward(&pooled)).transpose()?;
        Ok(ClipOutput { hidden_states, last_hidden_state, pooled, text_embeds })
    }

    /// Reads the ids to the host, checking dtype, rank and range, since an out-of-vocabulary id
    /// would otherwise surface as an opaque indexing failure.
    fn checked_ids(&self, input_ids: &Tensor) -> Result<Vec<Vec<u32>>> {
        if input_ids.rank() != 2 {
            bail!("CLIP input_ids must be [batch, seq], got shape {:?}", input_ids.dims());
        }
        let vocab = self.vocab_size;
        let out_of_vocab = |id: i64| {
            candle_core::Error::Msg(format!(
                "token id {id} is outside the text encoder's vocabulary of {vocab} tokens; was the prompt tokenized with this model's tokenizer?"
            ))
        };
        let rows: Vec<Vec<u32>> = match input_ids.dtype() {
            DType::U32 => input_ids.to_vec2::<u32>()?,
            DType::I64 => input_ids
                .to_vec2::<i64>()?
                .into_iter()
                .map(|row| row.into_iter().map(|id| u32::try_from(id).map_err(|_| out_of_vocab(id))).collect())
                .collect::<Result<_>>()?,
            other => bail!("CLIP input_ids must be U32 or I64 token ids, got {other:?}"),
        };
        if let Some(&bad) = rows.iter().flatten().find(|&&id| id as usize >= vocab) {
            return Err(out_of_vocab(i64::from(bad)));
        }
        Ok(rows)
    }
}

/// `x` `[batch, seq, hidden]` with `vectors` `[n, hidden]` written from `pos` on in every sequence, at
/// most up to the position before the last.
fn splice(x: &Tensor, pos: usize, vectors: &Tensor) -> Result<Tensor> {
    let (b, seq, hidden) = x.dims3()?;
    if pos == 0 || pos + 1 >= seq || vectors.rank() != 2 || vectors.dim(1)? != hidden {
        bail!("an embedding of shape {:?} cannot go at position {pos} of a {seq}-token, {hidden}-wide sequence", vectors.dims());
    }
    let n = vectors.dim(0)?.min(seq - pos - 1);
    let v = vectors.narrow(0, 0, n)?.to_dtype(x.dtype())?.to_device(x.device())?.unsqueeze(0)?.broadcast_as((b, n, hidden))?;
    Tensor::cat(&[&x.narrow(1, 0, pos)?, &v, &x.narrow(1, pos + n, seq - pos - n)?], 1)
}

/// The position whose final state is the pooled output, following transformers: with the legacy
/// `eos_token_id == 2` config it is the first maximal id (the end-of-text token has the largest id
/// in the CLIP vocabulary); otherwise the first `eos_token_id`, or position 0 when there is none.
fn eos_position(row: &[u32], eos_token_id: u32) -> usize {
    if eos_token_id == 2 {
        let max = row.iter().copied().max().unwrap_or(0);
        row.iter().position(|&id| id == max).unwrap_or(0)
    } else {
        row.iter().position(|&id| id == eos_token_id).unwrap_or(0)
    }
}

/// An additive `[len, len]` mask letting position `i` attend to positions `0..=i` only.
fn causal_mask(len: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> =
        (0..len).flat_map(|i| (0..len).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY })).collect();
    Tensor::from_vec(mask, (len, len), device)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_mask_blocks_only_the_future() -> Result<()> {
        let m = causal_mask(3, DType::F32, &Device::Cpu)?.to_vec2::<f32>()?;
        for (i, row) in m.iter().enumerate() {
            for (j, &v) in row.iter().enumerate() {
                assert_eq!(v == 0.0, j <= i, "mask[{i}][{j}] = {v}");
                assert!(v == 0.0 || v == f32::NEG_INFINITY);
            }
        }
        Ok(())
    }

    #[test]
    fn pooling_position_follows_transformers() {
        // Legacy config: the first occurrence of the largest id, even when padding repeats it.
        assert_eq!(eos_position(&[49406, 320, 49407, 49407, 49407], 2), 2);
        // The pad of SD2/SDXL's second tokenizer ("!" = 0) does not matter to argmax.
        assert_eq!(eos_position(&[49406, 320, 1125, 49407, 0, 0], 2), 3);
        // New config: the first eos id, not the largest id.
        assert_eq!(eos_position(&[998, 5, 999, 7, 0], 999), 2);
        assert_eq!(eos_position(&[998, 5, 6], 999), 0);
        // Textual-inversion placeholders (id 0, as A1111 writes them) keep the legacy pooling on
        // end-of-text, where A1111 pools (diffusers' added ids ≥ 49408 would win the argmax instead).
        assert_eq!(eos_position(&[49406, 320, 0, 0, 49407, 49407], 2), 4);
    }
}
