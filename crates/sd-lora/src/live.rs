//! LoRA sets patched into a loaded model's weights in place, and taken out again, without reloading
//! the model.
//!
//! Load the plain model with [`LivePatcher::recording_hook`]: it remembers the very tensors the model's
//! layers hold (no copy). [`LivePatcher::apply`] then writes `W + Σ strength·ΔW` into the weights a set
//! touches, after keeping a copy of their values, and the next `apply` (or [`LivePatcher::restore`])
//! writes those values back first. The merge is the one [`crate::MergeBackend`] applies while loading,
//! so a patched model computes what a model loaded with the same set computes (bit for bit when the
//! weights are F32, or half-precision on disk and in memory).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use sd_models::keymap::Component;
use sd_models::loader::BackendHook;
use sd_models::ModelConfig;

use crate::adapter::family_name;
use crate::error::Result;
use crate::merge::{add_updates, record_applied};
use crate::set::{poisoned, LoraReport, LoraSet};

/// The recorded weights: the tensors the model's layers hold, by component and weight name.
type WeightTable = HashMap<(Component, String), Tensor>;

/// Records the weights a model is built from, then patches LoRA sets into them in place.
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use sd_lora::{LivePatcher, LoraSet};
/// use sd_models::loader::{load, LoadOptions};
/// let mut patcher = LivePatcher::new();
/// let opts = LoadOptions { backend_hook: Some(patcher.recording_hook()), ..LoadOptions::default() };
/// let model = load("model.safetensors".as_ref(), &opts)?;
/// let mut set = LoraSet::new();
/// set.add_file("detail.safetensors", 0.8)?;
/// println!("{}", patcher.apply(&set, &model.config)?); // the model now runs with the LoRA
/// patcher.restore()?; // and now without it
/// # Ok(()) }
/// ```
#[derive(Default)]
pub struct LivePatcher {
    table: Arc<Mutex<WeightTable>>,
    /// Each weight the current set changed: the live tensor and a copy of its plain value.
    originals: HashMap<(Component, String), (Tensor, Tensor)>,
}

impl std::fmt::Debug for LivePatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LivePatcher").field("recorded", &self.recorded()).field("patched", &self.originals.len()).finish()
    }
}

impl LivePatcher {
    /// A patcher with nothing recorded.
    pub fn new() -> Self {
        Self::default()
    }

    /// A [`sd_models::loader::LoadOptions::backend_hook`] that records the UNet's and text encoders'
    /// matrix and convolution weights as the model loads (the tensors themselves, shared with the model).
    pub fn recording_hook(&self) -> BackendHook {
        let table = self.table.clone();
        Arc::new(move |component, _cfg, inner| {
            if component == Component::Vae {
                return Ok(inner);
            }
            Ok(Box::new(Recording { inner, component, table: table.clone() }) as Box<dyn SimpleBackend>)
        })
    }

    /// How many weights were recorded.
    pub fn recorded(&self) -> usize {
        self.table.lock().map(|t| t.len()).unwrap_or(0)
    }

    /// How many weights the current set changed.
    pub fn patched(&self) -> usize {
        self.originals.len()
    }

    /// Writes every patched weight's plain value back: the model is the plain one again.
    pub fn restore(&mut self) -> Result<()> {
        for (_, (live, original)) in self.originals.drain() {
            live.slice_set(&original, 0, 0)?;
        }
        Ok(())
    }

    /// Makes the model carry exactly `set` (an empty set leaves the plain model). `cfg` is the loaded
    /// model's config. A weight both sets touch is rewritten once, from its saved plain value; weights
    /// only the previous set touched get their plain value back. On error the model is left plain.
    pub fn apply(&mut self, set: &LoraSet, cfg: &ModelConfig) -> Result<LoraReport> {
        if set.is_empty() {
            self.restore()?;
            return Ok(LoraReport::default());
        }
        let (plan, mut report) = match set.build_plan(cfg) {
            Ok(p) => p,
            Err(e) => {
                self.restore()?;
                return Err(e);
            }
        };
        let adapters = set.shared_adapters();
        let family = family_name(cfg.variant.family());
        let table = self.table.lock().map_err(|_| poisoned())?.clone();
        let mut work: Vec<(&Component, &String, &Vec<crate::merge::Merge>)> = plan
            .iter()
            .flat_map(|(c, weights)| weights.iter().map(move |(name, merges)| (c, name, merges)))
            .filter(|(_, _, merges)| merges.iter().any(|m| m.strength != 0.0))
            .collect();
        work.sort_by_cached_key(|(c, name, _)| (format!("{c:?}"), (*name).clone()));
        let mut previous = std::mem::take(&mut self.originals);
        for (component, name, merges) in work {
            let key = (*component, name.clone());
            // A weight the model never asked for is one a load-time merge would not touch either.
            let Some(live) = table.get(&key) else { continue };
            let saved = previous.remove(&key);
            match patch(live, saved.as_ref().map(|(_, o)| o), &adapters, family, name, merges) {
                Ok(original) => {
                    self.originals.insert(key, (live.clone(), original));
                    record_applied(&mut report, &adapters, merges);
                }
                Err(e) => {
                    if let Some(s) = saved {
                        previous.insert(key, s);
                    }
                    self.originals.extend(previous);
                    self.restore()?;
                    return Err(e);
                }
            }
        }
        // What only the previous set changed goes back to its plain value.
        for (_, (live, original)) in previous {
            live.slice_set(&original, 0, 0)?;
        }
        Ok(report)
    }
}

/// Writes `plain + updates` into `live` and returns the plain value (`saved`, when an earlier set
/// already changed the weight, else a copy of `live`).
fn patch(
    live: &Tensor,
    saved: Option<&Tensor>,
    adapters: &[Arc<crate::LoraAdapter>],
    family: &'static str,
    name: &str,
    merges: &[crate::merge::Merge],
) -> Result<Tensor> {
    let original = match saved {
        Some(o) => o.clone(),
        None => live.copy()?,
    };
    // `to_dtype` of an F32 weight shares its storage; the sum below is a new tensor either way.
    let merged = add_updates(adapters, family, name, merges, original.to_dtype(DType::F32)?)?.to_dtype(live.dtype())?;
    // (candle refuses a source that shares the weight's storage, so an aliasing bug cannot pass silently.)
    live.slice_set(&merged.contiguous()?, 0, 0)?;
    Ok(original)
}

/// Serves `inner`'s weights and records the matrices and kernels among them.
struct Recording {
    inner: Box<dyn SimpleBackend>,
    component: Component,
    table: Arc<Mutex<WeightTable>>,
}

impl Recording {
    fn record(&self, name: &str, t: Tensor) -> candle_core::Result<Tensor> {
        if t.rank() < 2 || !name.ends_with(".weight") {
            return Ok(t);
        }
        // In-place writes need a contiguous tensor; the model then holds the same one.
        let t = if t.is_contiguous() { t } else { t.contiguous()? };
        if let Ok(mut table) = self.table.lock() {
            table.insert((self.component, name.to_string()), t.clone());
        }
        Ok(t)
    }
}

impl SimpleBackend for Recording {
    fn get(&self, s: Shape, name: &str, h: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.inner.get(s, name, h, dtype, dev)?;
        self.record(name, t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.inner.get_unchecked(name, dtype, dev)?;
        self.record(name, t)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}
