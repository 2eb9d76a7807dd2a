//! Several adapters at once: resolving their keys against a model, merging them into the weights
//! as the model asks for them, and reporting what was applied.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_nn::var_builder::SimpleBackend;
use sd_models::keymap::Component;
use sd_models::loader::BackendHook;
use sd_models::ModelConfig;

use crate::adapter::{family_name, LoraAdapter};
use crate::error::{Error, Result};
use crate::keys::KeyResolver;
use crate::merge::{Merge, MergeBackend, Target};

/// What one adapter did to the loaded model.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterReport {
    /// The adapter file.
    pub path: PathBuf,
    /// Its strength.
    pub strength: f32,
    /// Module keys (as written in the file) merged into a model weight.
    pub applied: Vec<String>,
    /// Module keys that name no weight of the model; they were ignored.
    pub unmatched: Vec<String>,
}

/// What every adapter of a [`LoraSet`] did during the last load.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoraReport {
    /// One entry per adapter, in the order they were added.
    pub adapters: Vec<AdapterReport>,
}

impl std::fmt::Display for LoraReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for a in &self.adapters {
            writeln!(
                f,
                "{} (strength {}): {} modules applied, {} unmatched",
                a.path.display(),
                a.strength,
                a.applied.len(),
                a.unmatched.len()
            )?;
        }
        Ok(())
    }
}

/// Parses a `path[:strength]` argument (strength defaults to 1 and may be negative).
pub fn parse_spec(spec: &str) -> Result<(PathBuf, f32)> {
    if spec.is_empty() {
        return Err(Error::InvalidSpec(spec.into()));
    }
    if let Some((path, s)) = spec.rsplit_once(':') {
        if let Ok(strength) = s.trim().parse::<f32>() {
            if path.is_empty() || !strength.is_finite() {
                return Err(Error::InvalidSpec(spec.into()));
            }
            return Ok((PathBuf::from(path), strength));
        }
    }
    Ok((PathBuf::from(spec), 1.0))
}

/// Which merges each weight of each component gets.
pub(crate) type Plan = HashMap<Component, HashMap<String, Vec<Merge>>>;

/// Adapters with their strengths, merged into a model while it loads.
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use sd_lora::LoraSet;
/// use sd_models::loader::{load, LoadOptions};
/// let mut loras = LoraSet::new();
/// loras.add_file("detail.safetensors", 0.8)?;
/// let opts = LoadOptions { backend_hook: Some(loras.backend_hook()), ..LoadOptions::default() };
/// let model = load("model.safetensors".as_ref(), &opts)?;
/// println!("{}", loras.report());
/// # Ok(()) }
/// ```
#[derive(Clone, Default)]
pub struct LoraSet {
    /// Each adapter with its strength and, when it differs, its text encoders' strength.
    adapters: Vec<(Arc<LoraAdapter>, f32, Option<f32>)>,
    plan: Arc<Mutex<Option<Arc<Plan>>>>,
    report: Arc<Mutex<LoraReport>>,
}

impl std::fmt::Debug for LoraSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.adapters.iter().map(|(a, s, te)| (a.path(), s, te))).finish()
    }
}

impl LoraSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Opens every `path[:strength]` spec.
    pub fn from_specs<S: AsRef<str>>(specs: &[S]) -> Result<Self> {
        let mut set = Self::new();
        for s in specs {
            let (path, strength) = parse_spec(s.as_ref())?;
            set.add_file(&path, strength)?;
        }
        Ok(set)
    }

    /// Adds an opened adapter with a strength.
    pub fn add(&mut self, adapter: LoraAdapter, strength: f32) {
        self.adapters.push((Arc::new(adapter), strength, None));
    }

    /// Opens and adds the adapter at `path`.
    pub fn add_file(&mut self, path: impl AsRef<Path>, strength: f32) -> Result<()> {
        self.add(LoraAdapter::open(path)?, strength);
        Ok(())
    }

    /// Adds the adapter at `path` with one strength for the UNet and another for the text encoders
    /// (A1111's `<lora:name:te_weight:unet_weight>`).
    pub fn add_file_split(&mut self, path: impl AsRef<Path>, unet: f32, text_encoders: f32) -> Result<()> {
        let adapter = LoraAdapter::open(path)?;
        self.adapters.push((Arc::new(adapter), unet, (text_encoders != unet).then_some(text_encoders)));
        Ok(())
    }

    /// The adapters and their (UNet) strengths.
    pub fn adapters(&self) -> impl Iterator<Item = (&LoraAdapter, f32)> {
        self.adapters.iter().map(|(a, s, _)| (a.as_ref(), *s))
    }

    /// Whether the set has no adapters.
    pub fn is_empty(&self) -> bool {
        self.adapters.is_empty()
    }

    /// What each adapter matched and merged during the last load.
    pub fn report(&self) -> LoraReport {
        self.report.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// A [`sd_models::loader::LoadOptions::backend_hook`] that merges this set into every component.
    pub fn backend_hook(&self) -> BackendHook {
        let set = self.clone();
        Arc::new(move |c, cfg, backend| set.wrap(c, cfg, backend).map_err(sd_models::Error::from))
    }

    /// Resolves every adapter against `cfg`: errors for adapters that match nothing, a warning for
    /// partial matches. Resets the report.
    pub fn plan(&self, cfg: &ModelConfig) -> Result<()> {
        let (plan, report) = self.build_plan(cfg)?;
        *self.plan.lock().map_err(|_| poisoned())? = Some(Arc::new(plan));
        *self.report.lock().map_err(|_| poisoned())? = report;
        Ok(())
    }

    /// The adapters, shared.
    pub(crate) fn shared_adapters(&self) -> Vec<Arc<LoraAdapter>> {
        self.adapters.iter().map(|(a, _, _)| a.clone()).collect()
    }

    /// Which merges each weight of each component gets, and a report with every adapter's unmatched
    /// modules (nothing applied yet).
    pub(crate) fn build_plan(&self, cfg: &ModelConfig) -> Result<(Plan, LoraReport)> {
        let resolver = KeyResolver::new(cfg);
        let mut plan: Plan = HashMap::new();
        let mut report = LoraReport::default();
        for (ai, (adapter, strength, te_strength)) in self.adapters.iter().enumerate() {
            let mut unmatched = Vec::new();
            let mut matched = 0;
            for (mi, m) in adapter.modules().iter().enumerate() {
                match resolver.resolve(&m.key) {
                    Some((c, module)) => {
                        matched += 1;
                        let weight = format!("{module}.weight");
                        let text_encoder = matches!(c, Component::TextEncoder | Component::TextEncoder2);
                        let strength = match te_strength {
                            Some(te) if text_encoder => *te,
                            _ => *strength,
                        };
                        plan.entry(c).or_default().entry(weight.clone()).or_default().push(Merge {
                            adapter: ai,
                            module: mi,
                            strength,
                            target: Target::whole(weight),
                        });
                    }
                    None => unmatched.push(m.key.clone()),
                }
            }
            let total = adapter.modules().len();
            if matched == 0 {
                return Err(Error::NoMatch {
                    path: adapter.path().to_path_buf(),
                    model: cfg.variant.to_string(),
                    modules: total,
                    example: adapter.modules().first().map(|m| m.key.clone()).unwrap_or_default(),
                    hint: hint(adapter, cfg),
                });
            }
            if !unmatched.is_empty() {
                tracing::warn!(
                    "LoRA {}: {} of {} modules match no weight of the {} model and are ignored (e.g. {})",
                    adapter.path().display(),
                    unmatched.len(),
                    total,
                    cfg.variant,
                    unmatched[0]
                );
            }
            report.adapters.push(AdapterReport {
                path: adapter.path().to_path_buf(),
                strength: *strength,
                applied: Vec::new(),
                unmatched,
            });
        }
        Ok((plan, report))
    }

    /// Wraps the weight backend of `component` so the adapters are merged into the weights it serves.
    ///
    /// The UNet, which loaders build first, re-plans against `cfg`; other components reuse that plan.
    pub fn wrap(
        &self,
        component: Component,
        cfg: &ModelConfig,
        inner: Box<dyn SimpleBackend>,
    ) -> Result<Box<dyn SimpleBackend>> {
        let have_plan = self.plan.lock().map_err(|_| poisoned())?.is_some();
        if component == Component::Unet || !have_plan {
            self.plan(cfg)?;
        }
        let plan = self.plan.lock().map_err(|_| poisoned())?.clone();
        let merges = plan.and_then(|p| p.get(&component).cloned()).unwrap_or_default();
        if merges.values().all(|v| v.iter().all(|m| m.strength == 0.0)) {
            // Nothing to add: serve the base weights untouched (bit-exact).
            return Ok(inner);
        }
        let adapters = self.adapters.iter().map(|(a, _, _)| a.clone()).collect();
        let backend = MergeBackend::new(inner, merges, adapters, family_name(cfg.variant.family())).reporting_to(self.report.clone());
        Ok(Box::new(backend))
    }
}

pub(crate) fn poisoned() -> Error {
    Error::Candle(candle_core::Error::Msg("LoRA state lock poisoned by an earlier panic".into()))
}

fn hint(adapter: &LoraAdapter, cfg: &ModelConfig) -> String {
    let model = family_name(cfg.variant.family());
    match adapter.likely_family() {
        Some(f) if f != model => format!("it looks like a LoRA for {f} but the model is {model}; use a LoRA trained for {model}"),
        _ => format!(
            "it was probably trained for a different architecture than this {model} model, or uses module names this loader does not know"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        assert_eq!(parse_spec("a.safetensors:0.5").ok(), Some((PathBuf::from("a.safetensors"), 0.5)));
        assert_eq!(parse_spec("a.safetensors:-1").ok(), Some((PathBuf::from("a.safetensors"), -1.0)));
        assert_eq!(parse_spec("a.safetensors").ok(), Some((PathBuf::from("a.safetensors"), 1.0)));
        assert_eq!(parse_spec("C:\\x\\a.safetensors:2").ok(), Some((PathBuf::from("C:\\x\\a.safetensors"), 2.0)));
        assert!(parse_spec("").is_err());
        assert!(parse_spec(":0.5").is_err());
        assert!(parse_spec("a:NaN").is_err());
    }
}
