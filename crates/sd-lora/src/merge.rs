//! The one weight-merge backend every model family uses: a [`SimpleBackend`] that serves the base
//! weights with planned LoRA updates added. A family only supplies its key table — which weight (and
//! which rows of a fused weight) each LoRA module updates — as [`Target`]s; SD's comes from
//! [`crate::keys::KeyResolver`], FLUX's from `sd_flux::lora::lora_targets`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use sd_models::weights::Source;

use crate::adapter::LoraAdapter;
use crate::error::{Error, Result, ShapeMismatch};
use crate::set::LoraReport;

/// Where one LoRA module's update goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The weight the model asks for (`down_blocks.0.attentions.0.proj_in.weight`,
    /// `double_blocks.0.img_attn.qkv.weight`).
    pub weight: String,
    /// `(first row, rows)` inside a fused weight (diffusers' separate q/k/v landing in BFL's fused
    /// `qkv`), or `None` for the whole weight.
    pub rows: Option<(usize, usize)>,
    /// Whether the update's two halves are swapped (diffusers' `norm_out.linear` against BFL's order).
    pub swap_halves: bool,
}

impl Target {
    /// The whole of `weight`.
    pub fn whole(weight: impl Into<String>) -> Self {
        Self { weight: weight.into(), rows: None, swap_halves: false }
    }
}

/// A transformer family's LoRA key table: every module name a LoRA may use (dotted, without the prefixes
/// trainers put in front: `transformer.`, `diffusion_model.`, PEFT's `base_model.model.`) and the weight it
/// updates; kohya's underscored spellings (`lora_unet_double_blocks_0_img_attn_qkv`) resolve through it too.
#[derive(Debug, Clone, Default)]
pub struct KeyTable {
    targets: HashMap<String, Target>,
    underscored: HashMap<String, String>,
}

impl KeyTable {
    /// The table of `targets` (dotted module name → target).
    pub fn new(targets: HashMap<String, Target>) -> Self {
        let underscored = targets.keys().map(|k| (k.replace('.', "_"), k.clone())).collect();
        Self { targets, underscored }
    }

    /// Adds `module` (the model's own name) updating `weight`, and the stored names `source` gives for it (the
    /// family's model-name → diffusers-name map, as its renaming weight backend uses): a rename, a swapped
    /// pair of halves, or one `rows`-row block of the fused weight per concatenated part.
    pub fn insert_renamed(targets: &mut HashMap<String, Target>, module: &str, weight: &str, rows: usize, source: Option<Source>) {
        targets.insert(module.to_string(), Target::whole(weight));
        let strip = |d: &str| d.trim_end_matches(".weight").to_string();
        match source {
            Some(Source::Rename(d)) => {
                targets.insert(strip(&d), Target::whole(weight));
            }
            Some(Source::SwapHalves(d)) => {
                targets.insert(strip(&d), Target { weight: weight.into(), rows: None, swap_halves: true });
            }
            Some(Source::Concat(parts)) => {
                for (j, p) in parts.iter().enumerate() {
                    targets.insert(strip(p), Target { weight: weight.into(), rows: Some((j * rows, rows)), swap_halves: false });
                }
            }
            None => {}
        }
    }

    /// The target of a LoRA module key, after stripping the prefixes trainers put in front.
    pub fn get(&self, key: &str) -> Option<&Target> {
        for prefix in ["lora_unet_", "lora_transformer_", "lycoris_"] {
            if let Some(rest) = key.strip_prefix(prefix) {
                return self.underscored.get(rest).and_then(|k| self.targets.get(k));
            }
        }
        let mut k = key;
        for prefix in ["base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer."] {
            k = k.strip_prefix(prefix).unwrap_or(k);
        }
        self.targets.get(k)
    }

    /// Every dotted module name and its target.
    pub fn targets(&self) -> &HashMap<String, Target> {
        &self.targets
    }
}

/// One planned merge: which adapter's which module goes into a weight, how strongly, and where.
#[derive(Debug, Clone)]
pub struct Merge {
    /// Index of the adapter in the backend's list.
    pub adapter: usize,
    /// Index of the module in that adapter.
    pub module: usize,
    /// Multiplier of the update.
    pub strength: f32,
    /// Where it goes.
    pub target: Target,
}

/// Serves `inner`'s weights with the planned updates added (in F32, then cast to what was asked).
pub struct MergeBackend {
    inner: Box<dyn SimpleBackend>,
    merges: HashMap<String, Vec<Merge>>,
    adapters: Vec<Arc<LoraAdapter>>,
    /// Receives the keys of the modules merged, when the caller reports after loading.
    report: Option<Arc<Mutex<LoraReport>>>,
    /// The model family's name, for error hints.
    family: &'static str,
}

impl MergeBackend {
    /// Wraps `inner` so each weight named in `merges` (keyed by weight name) gets its updates.
    pub fn new(
        inner: Box<dyn SimpleBackend>,
        merges: HashMap<String, Vec<Merge>>,
        adapters: Vec<Arc<LoraAdapter>>,
        family: &'static str,
    ) -> Self {
        Self { inner, merges, adapters, report: None, family }
    }

    /// Records every merged module key into `report.adapters[merge.adapter].applied` as weights load.
    pub fn reporting_to(mut self, report: Arc<Mutex<LoraReport>>) -> Self {
        self.report = Some(report);
        self
    }

    /// `base` (F32) with every update of `merges` added, recorded in the report.
    fn merged(&self, name: &str, merges: &[Merge], base: Tensor) -> Result<Tensor> {
        let acc = add_updates(&self.adapters, self.family, name, merges, base)?;
        if let Some(report) = &self.report {
            if let Ok(mut r) = report.lock() {
                record_applied(&mut r, &self.adapters, merges);
            }
        }
        Ok(acc)
    }

    fn fetch(&self, name: &str, shape: Option<Shape>, h: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let get = |d: DType| match &shape {
            Some(s) => self.inner.get(s.clone(), name, h, d, dev),
            None => self.inner.get_unchecked(name, d, dev),
        };
        let Some(merges) = self.merges.get(name) else { return get(dtype) };
        let base = get(DType::F32)?;
        let merged = self.merged(name, merges, base).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        merged.to_dtype(dtype)
    }
}

impl SimpleBackend for MergeBackend {
    fn get(&self, s: Shape, name: &str, h: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.fetch(name, Some(s), h, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.fetch(name, None, candle_nn::Init::Const(0.), dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

/// `base` (F32) with every update of `merges` added: the one merge rule, for weights as they load
/// ([`MergeBackend`]) and for weights patched in place ([`crate::live::LivePatcher`]).
pub(crate) fn add_updates(adapters: &[Arc<LoraAdapter>], family: &'static str, name: &str, merges: &[Merge], base: Tensor) -> Result<Tensor> {
    let mut acc = base;
    for m in merges.iter().filter(|m| m.strength != 0.0) {
        let adapter = &adapters[m.adapter];
        let module = &adapter.modules()[m.module];
        let delta = adapter.scaled_delta(module, acc.device(), m.strength as f64)?;
        let lora_shape = delta.dims().to_vec();
        let delta = if m.target.swap_halves { swap_halves(&delta)? } else { delta };
        // The shape the update must have: the weight's, or its rows inside a fused weight.
        let want: Shape = match m.target.rows {
            Some((_, n)) => {
                let mut d = acc.dims().to_vec();
                d[0] = n;
                d.into()
            }
            None => acc.shape().clone(),
        };
        let delta = fit(delta, &want).ok_or_else(|| {
            Error::ShapeMismatch(Box::new(ShapeMismatch {
                path: adapter.path().to_path_buf(),
                module: module.key.clone(),
                weight: match m.target.rows {
                    Some((start, n)) => format!("{name} (rows {start}..{})", start + n),
                    None => name.to_string(),
                },
                lora: lora_shape,
                model: want.dims().to_vec(),
                hint: match adapter.likely_family() {
                    Some(f) if f != family => {
                        format!("it looks like a LoRA for {f} but the model is {family}; use a LoRA trained for {family}")
                    }
                    _ => format!("the LoRA was trained for a model with different layer sizes than this {family} model"),
                },
            }))
        })?;
        let delta = match m.target.rows {
            Some((start, n)) => pad_rows(&delta, start, n, acc.dim(0)?)?,
            None => delta,
        };
        acc = (acc + delta)?;
    }
    Ok(acc)
}

/// Adds the module keys of `merges` to their adapters' `applied` lists.
pub(crate) fn record_applied(report: &mut LoraReport, adapters: &[Arc<LoraAdapter>], merges: &[Merge]) {
    for m in merges {
        if let Some(a) = report.adapters.get_mut(m.adapter) {
            a.applied.push(adapters[m.adapter].modules()[m.module].key.clone());
        }
    }
}

/// The update with its first and second halves (along the output rows) exchanged.
fn swap_halves(delta: &Tensor) -> Result<Tensor> {
    let rows = delta.dim(0)?;
    Ok(Tensor::cat(&[delta.narrow(0, rows / 2, rows - rows / 2)?, delta.narrow(0, 0, rows / 2)?], 0)?)
}

/// An update of `n` rows placed at `start` of a `total`-row weight (zeros elsewhere).
fn pad_rows(delta: &Tensor, start: usize, n: usize, total: usize) -> Result<Tensor> {
    let rest = &delta.dims()[1..];
    let zeros = |rows: usize| {
        let mut d = vec![rows];
        d.extend_from_slice(rest);
        Tensor::zeros(d, delta.dtype(), delta.device())
    };
    let mut parts = Vec::with_capacity(3);
    if start > 0 {
        parts.push(zeros(start)?);
    }
    parts.push(delta.clone());
    if start + n < total {
        parts.push(zeros(total - start - n)?);
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// Reshapes a delta to the weight's shape when they differ only by layout: 1×1 conv ↔ linear, or
/// a LoHa/LoKr `[out, in·kh·kw]` matrix for a conv kernel.
fn fit(delta: Tensor, want: &Shape) -> Option<Tensor> {
    if delta.shape() == want {
        return Some(delta);
    }
    let ok = match (delta.dims(), want.dims()) {
        ([a, b, 1, 1], [c, d]) => a == c && b == d,
        ([a, _], [c, ..]) => a == c && delta.elem_count() == want.elem_count(),
        _ => false,
    };
    if ok {
        delta.reshape(want.clone()).ok()
    } else {
        None
    }
}

/// How a family turns its LoRA files into a [`MergeBackend`] over its transformer's weights.
pub struct TransformerLoras<'a> {
    /// The model family (for the merge backend's error hints).
    pub family: sd_models::ModelFamily,
    /// What the adapters are merged into, in warnings ("FLUX transformer").
    pub model: &'a str,
    /// The target of a module key (after the family's prefix rules), `None` when it names no weight.
    pub resolve: &'a dyn Fn(&str) -> Option<Target>,
    /// An extra strength factor per module of adapter `index` (PEFT's `lora_alpha` from file metadata); 1 for
    /// most families.
    pub factor: &'a dyn Fn(usize, &LoraAdapter, &crate::LoraModule) -> f32,
}

impl TransformerLoras<'_> {
    /// Opens `loras` (file, strength), matches each module, and wraps `inner` so the merged weights are
    /// served; returns the backend and what each adapter matched. An adapter that matches nothing becomes
    /// `no_match(path, adapter)` (the family's error, naming what the file seems to be for); unmatched modules
    /// of a partly matching one (text-encoder modules, for instance) are reported and logged.
    pub fn wrap<E: From<crate::Error>>(
        &self,
        inner: Box<dyn SimpleBackend>,
        loras: &[(std::path::PathBuf, f32)],
        no_match: &dyn Fn(&std::path::Path, &LoraAdapter) -> E,
    ) -> std::result::Result<(Box<dyn SimpleBackend>, Vec<crate::AdapterReport>), E> {
        if loras.is_empty() {
            return Ok((inner, Vec::new()));
        }
        let mut merges: HashMap<String, Vec<Merge>> = HashMap::new();
        let mut adapters = Vec::new();
        let mut reports = Vec::new();
        for (ai, (path, strength)) in loras.iter().enumerate() {
            let adapter = LoraAdapter::open(path)?;
            let mut report = crate::AdapterReport { path: path.clone(), strength: *strength, applied: Vec::new(), unmatched: Vec::new() };
            for (mi, m) in adapter.modules().iter().enumerate() {
                match (self.resolve)(&m.key) {
                    Some(target) => {
                        report.applied.push(m.key.clone());
                        let strength = strength * (self.factor)(ai, &adapter, m);
                        merges.entry(target.weight.clone()).or_default().push(Merge { adapter: ai, module: mi, strength, target });
                    }
                    None => report.unmatched.push(m.key.clone()),
                }
            }
            if report.applied.is_empty() {
                return Err(no_match(path, &adapter));
            }
            if let Some(first) = report.unmatched.first() {
                tracing::warn!(
                    "LoRA {}: {} of {} modules match no {} weight and are ignored (e.g. {first})",
                    path.display(),
                    report.unmatched.len(),
                    adapter.modules().len(),
                    self.model
                );
            }
            adapters.push(Arc::new(adapter));
            reports.push(report);
        }
        let family = crate::adapter::family_name(self.family);
        Ok((Box::new(MergeBackend::new(inner, merges, adapters, family)), reports))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_and_halves_land_where_the_target_says() -> Result<()> {
        let d = Tensor::arange(0f32, 6.0, &Device::Cpu)?.reshape((3, 2))?;
        let padded = pad_rows(&d, 2, 3, 6)?.to_vec2::<f32>()?;
        assert_eq!(padded, vec![vec![0., 0.], vec![0., 0.], vec![0., 1.], vec![2., 3.], vec![4., 5.], vec![0., 0.]]);
        let d = Tensor::arange(0f32, 8.0, &Device::Cpu)?.reshape((4, 2))?;
        assert_eq!(swap_halves(&d)?.to_vec2::<f32>()?, vec![vec![4., 5.], vec![6., 7.], vec![0., 1.], vec![2., 3.]]);
        let conv = Tensor::zeros((4, 3, 1, 1), DType::F32, &Device::Cpu)?;
        assert_eq!(fit(conv, &Shape::from((4, 3))).map(|t| t.dims().to_vec()), Some(vec![4, 3]));
        assert!(fit(Tensor::zeros((4, 3), DType::F32, &Device::Cpu)?, &Shape::from((3, 4))).is_none());
        Ok(())
    }
}
