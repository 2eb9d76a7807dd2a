//! The transformer's architecture, read off its weights.
//!
//! Nothing about a FLUX transformer has to be configured by hand: widths come from the shapes of
//! `img_in`, `txt_in`, `vector_in` and the qk-norm scales, depths from the block indices, and the
//! dev/schnell distinction from the presence of the guidance embedder. Only the split of each
//! attention head over the three rotary axes is not visible in the weights; it is 16/56/56 for
//! every published FLUX.1 model and comes from `axes_dims_rope` in a diffusers config otherwise.

use sd_core::schedulers::flow_match::FlowMatchConfig;
use candle_transformers::models::flux::model::Config;

use crate::error::{Error, Result};

/// Which FLUX.1 model a transformer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FluxVariant {
    /// FLUX.1 [dev]: guidance-distilled (a guidance embedding, ~28–50 steps, time shift by resolution).
    Dev,
    /// FLUX.1 [schnell]: timestep-distilled (1–4 steps, no guidance, no time shift).
    Schnell,
}

impl FluxVariant {
    /// `dev` or `schnell`.
    pub fn name(self) -> &'static str {
        match self {
            FluxVariant::Dev => "dev",
            FluxVariant::Schnell => "schnell",
        }
    }

    /// The variant a config describes: models with a guidance embedder are dev-like.
    pub fn of(config: &Config) -> Self {
        if config.guidance_embed {
            FluxVariant::Dev
        } else {
            FluxVariant::Schnell
        }
    }

    /// Default sampling steps (diffusers' examples: 28 for dev, 4 for schnell).
    pub fn default_steps(self) -> usize {
        match self {
            FluxVariant::Dev => 28,
            FluxVariant::Schnell => 4,
        }
    }

    /// Default guidance scale (3.5 for dev; schnell ignores guidance).
    pub fn default_guidance(self) -> f64 {
        match self {
            FluxVariant::Dev => 3.5,
            FluxVariant::Schnell => 0.0,
        }
    }

    /// The variant's published `scheduler_config.json` (dev: dynamic shifting, mu from 0.5 to 1.15;
    /// schnell: no shift), for files that come without one.
    pub fn scheduler_config(self) -> FlowMatchConfig {
        match self {
            FluxVariant::Dev => FlowMatchConfig::dev(),
            FluxVariant::Schnell => FlowMatchConfig::schnell(),
        }
    }

    /// Default T5 sequence length (diffusers: 512 for dev, 256 for schnell).
    pub fn default_max_sequence_length(self) -> usize {
        match self {
            FluxVariant::Dev => 512,
            FluxVariant::Schnell => 256,
        }
    }
}

impl std::fmt::Display for FluxVariant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FLUX.1 [{}]", self.name())
    }
}

/// Rotary axes of the published FLUX.1 models (head dim 128).
pub const FLUX_AXES_DIM: [usize; 3] = [16, 56, 56];

/// Rotary base of every FLUX.1 model.
pub const FLUX_THETA: usize = 10_000;

/// Number of blocks `prefix.N.*` among `names` (highest index + 1).
pub fn count_blocks<'a>(names: impl IntoIterator<Item = &'a str>, prefix: &str) -> usize {
    names
        .into_iter()
        .filter_map(|n| n.strip_prefix(prefix)?.split('.').next()?.parse::<usize>().ok())
        .max()
        .map_or(0, |m| m + 1)
}

/// Builds candle's FLUX config from the shapes of BFL-named tensors.
///
/// `shape(name)` returns the shape of a stored tensor (BFL names, e.g. `img_in.weight`), `depth`
/// and `depth_single` the number of double and single blocks; `axes_dim` overrides the rotary split
/// (required when the head dim is not 128). `source` names the weights in errors.
pub fn config_from_shapes(
    shape: &dyn Fn(&str) -> Option<Vec<usize>>,
    depth: usize,
    depth_single: usize,
    axes_dim: Option<&[usize]>,
    source: &str,
) -> Result<Config> {
    let bad = |reason: String| Error::BadWeights { source_desc: source.to_string(), reason };
    let matrix = |name: &str| -> Result<(usize, usize)> {
        match shape(name).as_deref() {
            Some([o, i]) => Ok((*o, *i)),
            Some(s) => Err(bad(format!("{name} has shape {s:?}, expected a matrix"))),
            None => Err(bad(format!("{name} is missing"))),
        }
    };
    let (hidden, in_channels) = matrix("img_in.weight")?;
    let (_, context_in_dim) = matrix("txt_in.weight")?;
    let (_, vec_in_dim) = matrix("vector_in.in_layer.weight")?;
    if depth == 0 && depth_single == 0 {
        return Err(bad("no double_blocks.* or single_blocks.* tensors".into()));
    }
    let norm = if depth > 0 { "double_blocks.0.img_attn.norm.query_norm.scale" } else { "single_blocks.0.norm.query_norm.scale" };
    let head_dim = match shape(norm).as_deref() {
        Some([d]) if *d > 0 && hidden % d == 0 => *d,
        Some(s) => return Err(bad(format!("{norm} has shape {s:?}, expected [head_dim] dividing the hidden size {hidden}"))),
        None => return Err(bad(format!("{norm} is missing"))),
    };
    let mlp_hidden = if depth > 0 {
        matrix("double_blocks.0.img_mlp.0.weight")?.0
    } else {
        // linear1 packs q, k, v and the MLP input: [3·hidden + mlp, hidden].
        matrix("single_blocks.0.linear1.weight")?.0.saturating_sub(3 * hidden)
    };
    let qkv_bias = if depth > 0 {
        shape("double_blocks.0.img_attn.qkv.bias").is_some()
    } else {
        true
    };
    let axes_dim = match axes_dim {
        Some(a) => a.to_vec(),
        None if head_dim == FLUX_AXES_DIM.iter().sum::<usize>() => FLUX_AXES_DIM.to_vec(),
        None => {
            return Err(Error::InvalidConfig {
                path: source.into(),
                reason: format!(
                    "attention heads are {head_dim} wide, not the 128 of FLUX.1, so the rotary split cannot be guessed; \
                     pass the axes (diffusers' axes_dims_rope) in FluxLoadOptions::axes_dim"
                ),
            })
        }
    };
    if axes_dim.iter().sum::<usize>() != head_dim || axes_dim.iter().any(|a| a % 2 == 1) {
        return Err(Error::InvalidConfig {
            path: source.into(),
            reason: format!("rotary axes {axes_dim:?} must be even and sum to the head dim {head_dim}"),
        });
    }
    Ok(Config {
        in_channels,
        vec_in_dim,
        context_in_dim,
        hidden_size: hidden,
        mlp_ratio: mlp_hidden as f64 / hidden as f64,
        num_heads: hidden / head_dim,
        depth,
        depth_single_blocks: depth_single,
        axes_dim,
        theta: FLUX_THETA,
        qkv_bias,
        guidance_embed: shape("guidance_in.in_layer.weight").is_some(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn real_dev_shapes() -> HashMap<String, Vec<usize>> {
        let mut m = HashMap::new();
        m.insert("img_in.weight".to_string(), vec![3072, 64]);
        m.insert("txt_in.weight".to_string(), vec![3072, 4096]);
        m.insert("vector_in.in_layer.weight".to_string(), vec![3072, 768]);
        m.insert("guidance_in.in_layer.weight".to_string(), vec![3072, 256]);
        m.insert("double_blocks.0.img_attn.norm.query_norm.scale".to_string(), vec![128]);
        m.insert("double_blocks.0.img_mlp.0.weight".to_string(), vec![12288, 3072]);
        m.insert("double_blocks.0.img_attn.qkv.bias".to_string(), vec![9216]);
        m
    }

    #[test]
    fn real_sizes_give_the_published_configs() -> Result<()> {
        let m = real_dev_shapes();
        let cfg = config_from_shapes(&|n| m.get(n).cloned(), 19, 38, None, "test")?;
        let dev = Config::dev();
        assert_eq!(
            (cfg.hidden_size, cfg.num_heads, cfg.depth, cfg.depth_single_blocks, cfg.in_channels, cfg.vec_in_dim),
            (dev.hidden_size, dev.num_heads, dev.depth, dev.depth_single_blocks, dev.in_channels, dev.vec_in_dim)
        );
        assert_eq!((cfg.context_in_dim, cfg.mlp_ratio, &cfg.axes_dim, cfg.qkv_bias), (4096, 4.0, &dev.axes_dim, true));
        assert_eq!(FluxVariant::of(&cfg), FluxVariant::Dev);
        let mut s = m.clone();
        s.remove("guidance_in.in_layer.weight");
        let cfg = config_from_shapes(&|n| s.get(n).cloned(), 19, 38, None, "test")?;
        assert_eq!(FluxVariant::of(&cfg), FluxVariant::Schnell);
        Ok(())
    }

    #[test]
    fn odd_heads_need_explicit_axes() {
        let mut m = real_dev_shapes();
        m.insert("double_blocks.0.img_attn.norm.query_norm.scale".to_string(), vec![16]);
        let e = config_from_shapes(&|n| m.get(n).cloned(), 1, 1, None, "tiny").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("axes_dim"), "{e}");
        assert!(config_from_shapes(&|n| m.get(n).cloned(), 1, 1, Some(&[4, 6, 6]), "tiny").is_ok());
        assert!(config_from_shapes(&|n| m.get(n).cloned(), 1, 1, Some(&[4, 6, 5]), "tiny").is_err());
    }

    #[test]
    fn block_counting() {
        let names = ["double_blocks.0.a", "double_blocks.11.b", "single_blocks.3.x", "double_blocksX.99"];
        assert_eq!(count_blocks(names.iter().copied(), "double_blocks."), 12);
        assert_eq!(count_blocks(names.iter().copied(), "single_blocks."), 4);
        assert_eq!(count_blocks(names.iter().copied(), "final_layer."), 0);
    }
}
