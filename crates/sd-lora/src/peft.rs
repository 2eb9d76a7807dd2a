//! PEFT's `lora_alpha`, which diffusers keeps out of the tensors: `save_lora_weights` writes it into the
//! safetensors header (`lora_adapter_metadata`), and the factor `alpha / rank` it implies is one a merge must
//! apply for every module without an `.alpha` tensor.

use std::cell::RefCell;

use crate::adapter::{LoraAdapter, LoraFormat, LoraModule};

/// The `lora_alpha` settings diffusers writes into a PEFT LoRA's header (`lora_adapter_metadata`:
/// `transformer.lora_alpha`, `transformer.alpha_pattern`, `transformer.use_rslora`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PeftAlpha {
    alpha: Option<f32>,
    patterns: Vec<(String, f32)>,
    rslora: bool,
}

impl PeftAlpha {
    /// The settings of `adapter` (none unless it is a PEFT file with diffusers' metadata).
    pub fn of(adapter: &LoraAdapter) -> Self {
        if adapter.format() != LoraFormat::Peft {
            return Self::default();
        }
        let Some(v) = adapter.metadata().all.get("lora_adapter_metadata").and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok()) else {
            return Self::default();
        };
        let get = |k: &str| v.get(format!("transformer.{k}")).or_else(|| v.get(k));
        let mut patterns: Vec<(String, f32)> = get("alpha_pattern")
            .and_then(|p| p.as_object())
            .map(|o| o.iter().filter_map(|(k, a)| Some((k.clone(), a.as_f64()? as f32))).collect())
            .unwrap_or_default();
        // The longest (most specific) pattern first.
        patterns.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
        Self {
            alpha: get("lora_alpha").and_then(|a| a.as_f64()).map(|a| a as f32),
            patterns,
            rslora: get("use_rslora").and_then(|r| r.as_bool()).unwrap_or(false),
        }
    }

    /// The factor PEFT applies to `module`'s `B·A` that sd-lora does not: `alpha / rank` (`alpha / √rank` with
    /// rsLoRA) for modules without an `.alpha` tensor, 1 otherwise.
    pub fn factor(&self, module: &LoraModule) -> f32 {
        if module.alpha.is_some() || module.rank == 0 {
            return 1.0;
        }
        let key = module.key.strip_prefix("transformer.").unwrap_or(&module.key);
        // PEFT matches a pattern against the end of the module name (`(.*\.)?{pattern}$`).
        let pattern = self.patterns.iter().find(|(p, _)| key == p || key.ends_with(&format!(".{p}"))).map(|(_, a)| *a);
        match pattern.or(self.alpha) {
            Some(alpha) if self.rslora => alpha / (module.rank as f32).sqrt(),
            Some(alpha) => alpha / module.rank as f32,
            None => 1.0,
        }
    }
}

/// [`PeftAlpha`] of each adapter of a [`crate::TransformerLoras`] plan, read once per adapter: its `factor`
/// is what a family passes as the plan's `factor`.
#[derive(Debug, Default)]
pub struct PeftAlphas {
    cached: RefCell<Option<(usize, PeftAlpha)>>,
}

impl PeftAlphas {
    /// The PEFT factor of module `m` of adapter number `index`.
    pub fn factor(&self, index: usize, adapter: &LoraAdapter, m: &LoraModule) -> f32 {
        let mut cached = self.cached.borrow_mut();
        if cached.as_ref().map(|(i, _)| *i) != Some(index) {
            *cached = Some((index, PeftAlpha::of(adapter)));
        }
        cached.as_ref().map_or(1.0, |(_, alpha)| alpha.factor(m))
    }
}
