//! Serving diffusers-named weights straight out of a memory-mapped single-file checkpoint.
//!
//! A [`SingleFileBackend`] is a `candle_nn` [`SimpleBackend`] for one component: the model asks
//! for `down_blocks.1.attentions.0.proj_in.weight`, the backend looks up
//! `model.diffusion_model.input_blocks.4.1.proj_in.weight` through the [`KeyMap`], applies the
//! layout transform (q/k/v slicing, transposing, 1×1-conv ↔ linear reshape), checks the shape and
//! converts the dtype straight from the mapping ([`crate::weights`]). Nothing is converted ahead of
//! time, so loading costs one pass over the tensors actually used.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;

use crate::keymap::{text_encoder_layout, Component, KeyMap, TextEncoderLayout, Transform};
use crate::{Error, Result};

/// Name, shape and dtype of one stored tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// Full name in the file.
    pub name: String,
    /// Stored shape.
    pub shape: Vec<usize>,
    /// Stored dtype (`None` for dtypes Candle cannot hold).
    pub dtype: Option<DType>,
}

/// Opens a safetensors file, turning every failure into a readable [`Error`].
pub(crate) fn open_safetensors(path: &Path) -> Result<MmapedSafetensors> {
    let meta = std::fs::metadata(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::NotFound { what: "checkpoint file".into(), path: path.to_path_buf() }
        } else {
            Error::Io { path: path.to_path_buf(), source: e }
        }
    })?;
    if !meta.is_file() {
        return Err(Error::InvalidSafetensors { path: path.to_path_buf(), reason: "not a regular file".into() });
    }
    if meta.len() < 8 {
        return Err(Error::InvalidSafetensors {
            path: path.to_path_buf(),
            reason: format!("the file is {} bytes, too short for a safetensors header", meta.len()),
        });
    }
    // SAFETY: the mapping is read-only; like every mmap-based loader we rely on the file not being
    // truncated by another process while it is mapped.
    unsafe { MmapedSafetensors::new(path) }
        .map_err(|e| Error::InvalidSafetensors { path: path.to_path_buf(), reason: innermost(&e).to_string() })
}

/// The error inside candle's path/backtrace/context wrappers, for readable messages.
pub fn innermost(e: &candle_core::Error) -> &candle_core::Error {
    match e {
        candle_core::Error::WithPath { inner, .. }
        | candle_core::Error::WithBacktrace { inner, .. }
        | candle_core::Error::Context { inner, .. } => innermost(inner),
        other => other,
    }
}

/// Name, shape and dtype of every tensor in `st`, sorted by name.
pub(crate) fn tensor_infos(st: &MmapedSafetensors) -> Vec<TensorInfo> {
    let mut v: Vec<TensorInfo> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| TensorInfo {
            name,
            shape: view.shape().to_vec(),
            dtype: DType::try_from(view.dtype()).ok(),
        })
        .collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

/// A memory-mapped single-file checkpoint (`.safetensors`).
pub struct SingleFile {
    path: PathBuf,
    st: MmapedSafetensors,
}

impl std::fmt::Debug for SingleFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SingleFile").field("path", &self.path).finish_non_exhaustive()
    }
}

impl SingleFile {
    /// Maps `path` and parses its safetensors header (no tensor data is read).
    pub fn open(path: &Path) -> Result<Self> {
        Ok(Self { path: path.to_path_buf(), st: open_safetensors(path)? })
    }

    /// The file this checkpoint was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Name, shape and dtype of every stored tensor, sorted by name.
    pub fn tensors(&self) -> Vec<TensorInfo> {
        tensor_infos(&self.st)
    }

    /// Shape of the stored tensor `name`, if present.
    pub fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        self.st.get(name).ok().map(|v| v.shape().to_vec())
    }

    /// Whether the file stores a tensor called `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.st.get(name).is_ok()
    }

    /// Loads the stored tensor `name` as `dtype` onto `dev`, converted straight from the mapping ([`crate::weights::load_view`]).
    pub fn load(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.st.get(name).map_err(|_| Error::MissingTensor { name: name.to_string(), source_desc: self.path.display().to_string() })?;
        Ok(crate::weights::load_mapped(&self.st, name, dtype, dev)?)
    }
}

/// Where a [`SingleFileBackend`] leaves the typed error behind the `candle_core::Error` it must return.
pub type ErrorSlot = Arc<Mutex<Option<Error>>>;

/// Takes the typed error behind `failure`, if the backend recorded it (matched by message, so a
/// stale error from a probe the model recovered from is never reported instead).
pub fn take_error(slot: &ErrorSlot, failure: &candle_core::Error) -> Option<Error> {
    let candle_core::Error::Msg(msg) = innermost(failure) else { return None };
    let recorded = slot.lock().ok().and_then(|mut e| e.take())?;
    (recorded.to_string() == *msg).then_some(recorded)
}

/// A [`SimpleBackend`] serving one component's diffusers names from a single-file checkpoint.
pub struct SingleFileBackend {
    file: Arc<SingleFile>,
    component: Component,
    keymap: Arc<KeyMap>,
    errors: ErrorSlot,
}

impl SingleFileBackend {
    /// A backend for `component` of `file`, translating names with `keymap`.
    pub fn new(file: Arc<SingleFile>, component: Component, keymap: Arc<KeyMap>) -> Self {
        Self { file, component, keymap, errors: Arc::new(Mutex::new(None)) }
    }

    /// The slot where the first failure is kept as a typed [`Error`] (candle only carries text).
    pub fn error_slot(&self) -> ErrorSlot {
        self.errors.clone()
    }

    fn describe(&self) -> String {
        format!("{} (single-file checkpoint, {} component)", self.file.path.display(), self.component)
    }

    /// Stored names to try for a diffusers name, best first.
    fn candidates(&self, name: &str) -> Option<(Vec<String>, Transform)> {
        let key = self.keymap.to_ldm(self.component, name)?;
        let mut names = vec![key.name.clone()];
        // Old SD 1.x files predate transformers' `text_model.` level: `cond_stage_model.transformer.embeddings.*`.
        if let Some((prefix, TextEncoderLayout::OpenAi)) = text_encoder_layout(self.keymap.family(), self.component) {
            if let Some(rest) = key.name.strip_prefix(prefix).and_then(|r| r.strip_prefix("text_model.")) {
                names.push(format!("{prefix}{rest}"));
            }
        }
        Some((names, key.transform))
    }

    /// Loads `name` (diffusers naming) as `dtype` on `dev`, checking it against `expected` when given.
    pub fn fetch(&self, name: &str, expected: Option<&Shape>, dtype: DType, dev: &Device) -> Result<Tensor> {
        let missing = |stored: &str| Error::MissingTensor {
            name: format!("{}/{name} (stored as {stored})", self.component),
            source_desc: self.describe(),
        };
        let Some((names, transform)) = self.candidates(name) else {
            return Err(missing("<no single-file equivalent>"));
        };
        let Some(stored) = names.iter().find(|n| self.file.contains(n)) else {
            return Err(missing(&names[0]));
        };
        let view = self.file.st.get(stored)?;
        let stored_dims = view.shape().to_vec();
        // The served shape is worked out from the header first, so a mismatch fails before any
        // data is read, and only the rows a q/k/v chunk needs are converted.
        let mut rows = None;
        let mut transpose = false;
        let dims = match transform {
            Transform::Identity => stored_dims,
            Transform::Transpose => match stored_dims[..] {
                [a, b] => {
                    transpose = true;
                    vec![b, a]
                }
                _ => return Err(self.shape_error(name, expected, &stored_dims)),
            },
            Transform::QkvChunk(i) => {
                let total = stored_dims.first().copied().unwrap_or(0);
                if total == 0 || total % 3 != 0 || i > 2 {
                    return Err(self.shape_error(name, expected, &stored_dims));
                }
                let n = total / 3;
                rows = Some(i * n..(i + 1) * n);
                let mut d = stored_dims;
                d[0] = n;
                d
            }
            Transform::ConvToLinear => match stored_dims[..] {
                [a, b, 1, 1] => vec![a, b],
                _ => stored_dims,
            },
        };
        let served = match expected {
            Some(s) if dims != s.dims() => {
                if !same_but_1x1(&dims, s.dims()) {
                    return Err(self.shape_error(name, expected, &dims));
                }
                s.dims().to_vec()
            }
            _ => dims,
        };
        let t = match rows {
            Some(r) => crate::weights::load_view_rows(&view, r, dtype, dev)?,
            None => crate::weights::load_view(&view, dtype, dev)?,
        };
        // SAFETY: `view` is a view of `self.st`, a file mapping.
        unsafe { crate::weights::release_file_pages(view.data()) };
        // Only text projections are transposed, and they are small: one extra copy is fine.
        let t = if transpose { t.t()?.contiguous()? } else { t };
        Ok(t.reshape(served)?)
    }

    fn shape_error(&self, name: &str, expected: Option<&Shape>, actual: &[usize]) -> Error {
        Error::ShapeMismatch {
            name: format!("{}/{name}", self.component),
            source_desc: self.describe(),
            expected: expected.map(|s| s.dims().to_vec()).unwrap_or_default(),
            actual: actual.to_vec(),
        }
    }

    fn record(&self, e: Error) -> candle_core::Error {
        let msg = e.to_string();
        // Keep the latest: a model may probe an optional tensor and recover before the real failure.
        if let Ok(mut slot) = self.errors.lock() {
            *slot = Some(e);
        }
        candle_core::Error::Msg(msg)
    }
}

/// Whether `have` and `want` differ only as a 1×1 conv kernel `[o, i, 1, 1]` and a linear weight
/// `[o, i]` (LDM files and diffusers disagree on this for `proj_in/proj_out` and VAE attention).
fn same_but_1x1(have: &[usize], want: &[usize]) -> bool {
    match (have, want) {
        ([a, b, 1, 1], [c, d]) | ([a, b], [c, d, 1, 1]) => a == c && b == d,
        _ => false,
    }
}

impl SimpleBackend for SingleFileBackend {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.fetch(name, Some(&s), dtype, dev).map_err(|e| self.record(e))
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.fetch(name, None, dtype, dev).map_err(|e| self.record(e))
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.candidates(name).is_some_and(|(names, _)| names.iter().any(|n| self.file.contains(n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{UNetConfig, VaeConfig};
    use crate::variant::ModelFamily;
    use std::collections::HashMap;

    fn write(dir: &Path, name: &str, tensors: &HashMap<String, Tensor>) -> PathBuf {
        let p = dir.join(name);
        candle_core::safetensors::save(tensors, &p).expect("writing a test file");
        p
    }

    #[test]
    fn openclip_transforms() {
        let dir = std::env::temp_dir().join(format!("sd-models-single-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let dev = Device::Cpu;
        let in_proj = Tensor::arange(0f32, 24., &dev).and_then(|t| t.reshape((6, 4))).expect("tensor");
        let proj = Tensor::arange(0f32, 6., &dev).and_then(|t| t.reshape((2, 3))).expect("tensor");
        let vae_q = Tensor::ones((4, 4, 1, 1), DType::F16, &dev).expect("tensor");
        let mut m = HashMap::new();
        m.insert(
            "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight".to_string(),
            in_proj.clone(),
        );
        m.insert("conditioner.embedders.1.model.text_projection".to_string(), proj.clone());
        m.insert("first_stage_model.encoder.mid.attn_1.q.weight".to_string(), vae_q);
        let p = write(&dir, "t.safetensors", &m);
        let file = Arc::new(SingleFile::open(&p).expect("open"));
        let km = Arc::new(KeyMap::new(ModelFamily::Sdxl, &UNetConfig::sdxl(4), &VaeConfig::sdxl()));
        let te2 = SingleFileBackend::new(file.clone(), Component::TextEncoder2, km.clone());
        let k = te2
            .fetch("text_model.encoder.layers.0.self_attn.k_proj.weight", Some(&Shape::from((2, 4))), DType::F32, &dev)
            .expect("k");
        assert_eq!(
            k.to_vec2::<f32>().expect("vec"),
            in_proj.narrow(0, 2, 2).and_then(|t| t.to_vec2::<f32>()).expect("vec")
        );
        let p2 = te2.fetch("text_projection.weight", Some(&Shape::from((3, 2))), DType::F32, &dev).expect("proj");
        assert_eq!(p2.to_vec2::<f32>().expect("vec"), proj.t().and_then(|t| t.to_vec2::<f32>()).expect("vec"));
        let wrong = te2.fetch("text_projection.weight", Some(&Shape::from((2, 3))), DType::F32, &dev);
        assert!(matches!(wrong, Err(Error::ShapeMismatch { .. })), "{wrong:?}");
        let vae = SingleFileBackend::new(file, Component::Vae, km);
        let q = vae
            .fetch("encoder.mid_block.attentions.0.to_q.weight", Some(&Shape::from((4, 4))), DType::F32, &dev)
            .expect("q");
        assert_eq!(q.dtype(), DType::F32);
        let missing = vae.get_unchecked("decoder.conv_in.weight", DType::F32, &dev);
        let msg = missing.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("first_stage_model.decoder.conv_in.weight") && msg.contains("variant"), "{msg}");
        let failure = vae.get_unchecked("decoder.conv_in.weight", DType::F32, &dev).expect_err("still missing");
        assert!(matches!(take_error(&vae.error_slot(), &failure), Some(Error::MissingTensor { .. })));
        let other = candle_core::Error::Msg("something else".into());
        let _ = vae.get_unchecked("decoder.conv_in.weight", DType::F32, &dev);
        assert!(take_error(&vae.error_slot(), &other).is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
