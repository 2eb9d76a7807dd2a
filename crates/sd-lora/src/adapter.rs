//! Reading one LoRA file: format detection, module pairing, validation, metadata, and the weight
//! update (`ΔW = alpha/rank · up · down`) of each module.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use sd_models::weights::load_view;
use sd_models::ModelFamily;

use crate::error::{Error, Result};

/// Pairs a module's tensors into one update, checking that their shapes chain.
fn build_module(path: &Path, key: String, mut g: Parts, alpha: Option<f32>) -> Result<LoraModule> {
    let missing =
        |what: &'static str| Error::MissingPart { path: path.to_path_buf(), module: key.clone(), missing: what };
    let scale = |rank: usize| alpha.unwrap_or(rank as f32) / rank as f32;
    if g.contains_key("hada_w1_a") || g.contains_key("hada_w1_b") {
        let mut take = |k: &'static str| g.remove(k).ok_or_else(|| missing(k));
        let (w1a, s1a) = take("hada_w1_a")?;
        let (w1b, s1b) = take("hada_w1_b")?;
        let (w2a, s2a) = take("hada_w2_a")?;
        let (w2b, s2b) = take("hada_w2_b")?;
        let ok = [&s1a, &s1b, &s2a, &s2b].iter().all(|s| s.len() == 2)
            && s1a[1] == s1b[0]
            && s2a[1] == s2b[0]
            && s1a[0] == s2a[0]
            && s1b[1] == s2b[1]
            && s1b[0] > 0;
        if !ok {
            return Err(Error::RankMismatch { path: path.to_path_buf(), module: key, down: s1b, up: s1a });
        }
        let rank = s1b[0];
        return Ok(LoraModule {
            kind: AdapterKind::LoHa,
            rank,
            alpha,
            scale: scale(rank),
            down_shape: s1b,
            up_shape: s1a,
            weights: Weights::LoHa { w1a, w1b, w2a, w2b },
            key,
        });
    }
    if g.keys().any(|k| k.starts_with("lokr_")) {
        let mut factor = |full: &'static str,
                          a: &'static str,
                          b: &'static str|
         -> Result<(Factor, Vec<usize>, Option<usize>)> {
            if let Some((n, s)) = g.remove(full) {
                return Ok((Factor::Full(n), s, None));
            }
            let (na, sa) = g.remove(a).ok_or_else(|| missing(full))?;
            let (nb, sb) = g.remove(b).ok_or_else(|| missing(b))?;
            if sa.len() != 2 || sb.len() < 2 || sa[1] != sb[0] || sb[0] == 0 {
                return Err(Error::RankMismatch { path: path.to_path_buf(), module: key.clone(), down: sb, up: sa });
            }
            let rank = sb[0];
            let mut shape = vec![sa[0]];
            shape.extend(&sb[1..]);
            Ok((Factor::Product(na, nb), shape, Some(rank)))
        };
        let (w1, s1, r1) = factor("lokr_w1", "lokr_w1_a", "lokr_w1_b")?;
        let (w2, s2, r2) = factor("lokr_w2", "lokr_w2_a", "lokr_w2_b")?;
        if s1.len() != 2 {
            return Err(Error::RankMismatch { path: path.to_path_buf(), module: key, down: s2, up: s1 });
        }
        // LyCORIS: alpha/rank of the decomposed factor (w2's first); no scaling when both are full.
        let (rank, scale) = match r2.or(r1) {
            Some(r) => (r, scale(r)),
            None => (s1[0].min(s1[1]), 1.0),
        };
        return Ok(LoraModule {
            kind: AdapterKind::LoKr,
            rank,
            alpha,
            scale,
            down_shape: s2,
            up_shape: s1,
            weights: Weights::LoKr { w1, w2 },
            key,
        });
    }
    let Some((down, down_shape)) = g.remove("down") else {
        return Err(missing(if g.contains_key("up") {
            "down (lora_down / lora_A)"
        } else {
            "down and up (lora_down / lora_up)"
        }));
    };
    let (up, up_shape) = g.remove("up").ok_or_else(|| missing("up (lora_up / lora_B)"))?;
    let mid = g.remove("mid");
    let rank_error = || Error::RankMismatch {
        path: path.to_path_buf(),
        module: key.clone(),
        down: down_shape.clone(),
        up: up_shape.clone(),
    };
    if down_shape.len() < 2 || up_shape.len() < 2 || up_shape[2..].iter().any(|&d| d != 1) || down_shape[0] == 0 {
        return Err(rank_error());
    }
    let rank = match &mid {
        Some((_, s)) if s.len() != 4 || s[0] != up_shape[1] || s[1] != down_shape[0] || down_shape.len() != 4 => {
            return Err(rank_error())
        }
        Some(_) => up_shape[1],
        None if up_shape[1] != down_shape[0] => return Err(rank_error()),
        None => down_shape[0],
    };
    Ok(LoraModule {
        kind: AdapterKind::Lora,
        rank,
        alpha,
        scale: scale(rank),
        down_shape,
        up_shape,
        weights: Weights::Lora { down, up, mid: mid.map(|(n, _)| n) },
        key,
    })
}

/// The key convention of a LoRA file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraFormat {
    /// kohya-ss / civitai / LyCORIS: `lora_unet_…​.lora_down.weight`, `…​.lora_up.weight`, `…​.alpha`
    /// (and LyCORIS `hada_*` / `lokr_*`).
    Kohya,
    /// diffusers ≥ 0.22 / PEFT: `unet.…​.lora_A.weight`, `…​.lora_B.weight`.
    Peft,
    /// Older diffusers: `…​.lora.down.weight`, `…​.lora_linear_layer.up.weight`, attention processors.
    DiffusersLegacy,
}

impl std::fmt::Display for LoraFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LoraFormat::Kohya => "kohya",
            LoraFormat::Peft => "PEFT/diffusers",
            LoraFormat::DiffusersLegacy => "diffusers (legacy)",
        })
    }
}

/// Training metadata kohya-ss writes into the safetensors header.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoraMetadata {
    /// `ss_network_dim`: the rank it was trained with.
    pub network_dim: Option<u32>,
    /// `ss_network_alpha`.
    pub network_alpha: Option<f32>,
    /// `ss_base_model_version` (`sd_v1`, `sd_v2`, `sdxl_base_v1-0`, …).
    pub base_model_version: Option<String>,
    /// `ss_network_module` (`networks.lora`, `lycoris.kohya`, …).
    pub network_module: Option<String>,
    /// Every metadata entry.
    pub all: BTreeMap<String, String>,
}

/// The kind of low-rank update a module carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterKind {
    /// `up · down` (LoRA, LyCORIS LoCon, optionally with a Tucker `lora_mid` core).
    Lora,
    /// LyCORIS LoHa: `(w1_a · w1_b) ⊙ (w2_a · w2_b)`.
    LoHa,
    /// LyCORIS LoKr: `w1 ⊗ w2`, each factor full or a rank-r product.
    LoKr,
}

impl std::fmt::Display for AdapterKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AdapterKind::Lora => "LoRA",
            AdapterKind::LoHa => "LoHa",
            AdapterKind::LoKr => "LoKr",
        })
    }
}

/// A LoKr factor: stored whole or as a low-rank product.
#[derive(Debug, Clone)]
enum Factor {
    Full(String),
    Product(String, String),
}

/// Tensor names of one module's update.
#[derive(Debug, Clone)]
enum Weights {
    Lora { down: String, up: String, mid: Option<String> },
    LoHa { w1a: String, w1b: String, w2a: String, w2b: String },
    LoKr { w1: Factor, w2: Factor },
}

/// One adapted layer of a LoRA file.
#[derive(Debug, Clone)]
pub struct LoraModule {
    /// The module key as written in the file (suffix removed), e.g. `lora_unet_input_blocks_4_1_proj_in`.
    pub key: String,
    /// LoRA, LoHa or LoKr.
    pub kind: AdapterKind,
    /// The rank (rows of the down matrix; of `w1_b` for LoHa; of the decomposed factor for LoKr).
    pub rank: usize,
    /// The alpha, when the file stores one (missing alpha means alpha = rank).
    pub alpha: Option<f32>,
    /// Shape of the input-side tensor (LoRA down / A, LoHa `w1_b`, LoKr `w2` or `w2_b`).
    pub down_shape: Vec<usize>,
    /// Shape of the output-side tensor (LoRA up / B, LoHa `w1_a`, LoKr `w1` or `w1_a`).
    pub up_shape: Vec<usize>,
    scale: f32,
    weights: Weights,
}

impl LoraModule {
    /// The factor applied to the raw product: `alpha / rank` (1 for a LoKr with two full factors).
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// Whether the module carries a LyCORIS Tucker `lora_mid` core.
    pub fn has_mid(&self) -> bool {
        matches!(self.weights, Weights::Lora { mid: Some(_), .. })
    }
}

/// Tensor-name endings and the part they hold, most specific first.
const SUFFIXES: [(&str, &str); 24] = [
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_mid.weight", "mid"),
    (".lora_A.default.weight", "down"),
    (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    ("_lora.down.weight", "down"),
    ("_lora.up.weight", "up"),
    (".alpha", "alpha"),
    (".hada_w1_a", "hada_w1_a"),
    (".hada_w1_b", "hada_w1_b"),
    (".hada_w2_a", "hada_w2_a"),
    (".hada_w2_b", "hada_w2_b"),
    (".lokr_w1_a", "lokr_w1_a"),
    (".lokr_w1_b", "lokr_w1_b"),
    (".lokr_w2_a", "lokr_w2_a"),
    (".lokr_w2_b", "lokr_w2_b"),
    (".lokr_w1", "lokr_w1"),
    (".lokr_w2", "lokr_w2"),
];

/// Name fragments of adapter kinds that are not merged.
const UNSUPPORTED: [(&str, &str); 8] = [
    (".hada_t1", "LyCORIS LoHa with Tucker cores (hada_t1/hada_t2)"),
    (".hada_t2", "LyCORIS LoHa with Tucker cores (hada_t1/hada_t2)"),
    (".lokr_t2", "LyCORIS LoKr with a Tucker core (lokr_t2)"),
    (".dora_scale", "DoRA"),
    ("lora_magnitude_vector", "DoRA"),
    (".oft_", "OFT"),
    (".diff_b", "LyCORIS full (diff)"),
    (".diff", "LyCORIS full (diff)"),
];

fn split_suffix(name: &str) -> Option<(String, &'static str)> {
    for (suffix, part) in SUFFIXES {
        if let Some(base) = name.strip_suffix(suffix) {
            // `to_q_lora.down.weight` keeps its `_lora` so the processor name can be mapped.
            let base = if suffix.starts_with('_') { format!("{base}_lora") } else { base.to_string() };
            return Some((base, part));
        }
    }
    None
}

/// A LoRA (or LyCORIS LoCon/LoHa/LoKr) file, parsed and validated; tensors stay memory-mapped until merged.
pub struct LoraAdapter {
    path: PathBuf,
    format: LoraFormat,
    metadata: LoraMetadata,
    modules: Vec<LoraModule>,
    ignored: Vec<String>,
    st: MmapedSafetensors,
}

impl std::fmt::Debug for LoraAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoraAdapter")
            .field("path", &self.path)
            .field("format", &self.format)
            .field("modules", &self.modules.len())
            .finish_non_exhaustive()
    }
}

/// Reads the `__metadata__` of a safetensors header without mapping the file.
fn read_metadata(path: &Path) -> Result<BTreeMap<String, String>> {
    let invalid = |reason: String| Error::InvalidFile { path: path.to_path_buf(), reason };
    let mut f = std::fs::File::open(path).map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?;
    let len = f.metadata().map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|_| invalid(format!("the file is {len} bytes, too short for a safetensors header")))?;
    let n = u64::from_le_bytes(n);
    if n > len.saturating_sub(8) || n > 100_000_000 {
        return Err(invalid(format!("the header claims {n} bytes but the file has {len}")));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| invalid(e.to_string()))?;
    let json: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| invalid(format!("unreadable header: {e}")))?;
    let mut out = BTreeMap::new();
    if let Some(meta) = json.get("__metadata__").and_then(|m| m.as_object()) {
        for (k, v) in meta {
            out.insert(k.clone(), v.as_str().map(String::from).unwrap_or_else(|| v.to_string()));
        }
    }
    Ok(out)
}

fn parse_metadata(all: BTreeMap<String, String>) -> LoraMetadata {
    let get = |k: &str| all.get(k).map(|v| v.trim().to_string()).filter(|v| !v.is_empty() && v != "None");
    LoraMetadata {
        network_dim: get("ss_network_dim").and_then(|v| v.parse().ok()),
        network_alpha: get("ss_network_alpha").and_then(|v| v.parse().ok()),
        base_model_version: get("ss_base_model_version"),
        network_module: get("ss_network_module"),
        all,
    }
}

/// The tensors of one module, by part name, with their shapes.
type Parts = BTreeMap<&'static str, (String, Vec<usize>)>;

impl LoraAdapter {
    /// Opens, parses and validates a LoRA `.safetensors` file (kohya, PEFT or legacy diffusers keys).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::NotFound { path: path.to_path_buf() }
            } else {
                Error::Io { path: path.to_path_buf(), source: e }
            }
        })?;
        if !meta.is_file() {
            return Err(Error::InvalidFile { path: path.to_path_buf(), reason: "not a regular file".into() });
        }
        let metadata = parse_metadata(read_metadata(path)?);
        // SAFETY: read-only mapping; like every mmap-based loader this relies on the file not being
        // truncated by another process while it is mapped.
        let st = unsafe { MmapedSafetensors::new(path) }
            .map_err(|e| Error::InvalidFile { path: path.to_path_buf(), reason: e.to_string() })?;
        let mut names: Vec<(String, Vec<usize>)> =
            st.tensors().into_iter().map(|(n, v)| (n, v.shape().to_vec())).collect();
        names.sort();
        if let Some((_, kind)) = UNSUPPORTED.iter().find(|(frag, _)| {
            // `.diff` only as an ending: full checkpoints contain `model.diffusion_model.`.
            names.iter().any(|(n, _)| if frag.starts_with(".diff") { n.ends_with(frag) } else { n.contains(frag) })
        }) {
            return Err(Error::Unsupported { path: path.to_path_buf(), kind: kind.to_string() });
        }
        let mut groups: BTreeMap<String, Parts> = BTreeMap::new();
        let mut ignored = Vec::new();
        let mut format = None;
        for (name, shape) in &names {
            let Some((base, part)) = split_suffix(name) else {
                ignored.push(name.clone());
                continue;
            };
            if name.contains(".lora_A.") || name.contains(".lora_B.") {
                format = Some(LoraFormat::Peft);
            } else if (name.contains(".lora_down.") || name.contains(".hada_") || name.contains(".lokr_"))
                && format.is_none()
            {
                format = Some(LoraFormat::Kohya);
            }
            groups.entry(base).or_default().insert(part, (name.clone(), shape.clone()));
        }
        let mut modules = Vec::new();
        for (key, mut g) in groups {
            let alpha = match g.remove("alpha") {
                Some((name, _)) => Some(scalar(&st, &name).map_err(|e| Error::InvalidFile {
                    path: path.to_path_buf(),
                    reason: format!("alpha {name}: {e}"),
                })?),
                None => None,
            };
            if g.is_empty() {
                // A lone alpha: nothing to merge.
                ignored.push(format!("{key}.alpha"));
                continue;
            }
            modules.push(build_module(path, key, g, alpha)?);
        }
        if modules.is_empty() {
            let sample = names.iter().take(3).map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ");
            return Err(Error::NotALora { path: path.to_path_buf(), sample });
        }
        let format = format.unwrap_or(LoraFormat::DiffusersLegacy);
        Ok(Self { path: path.to_path_buf(), format, metadata, modules, ignored, st })
    }

    /// The file this adapter was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The key convention of the file.
    pub fn format(&self) -> LoraFormat {
        self.format
    }

    /// kohya training metadata from the header.
    pub fn metadata(&self) -> &LoraMetadata {
        &self.metadata
    }

    /// Every adapted module.
    pub fn modules(&self) -> &[LoraModule] {
        &self.modules
    }

    /// Tensors that are not part of any LoRA module (bundled embeddings, training state, …).
    pub fn ignored_tensors(&self) -> &[String] {
        &self.ignored
    }

    /// The weight update of `module` (scale included), as F32 on `device`: `[out, in]` or
    /// `[out, in, kh, kw]` for LoRA, `[out, in·kh·kw]` for LoHa/LoKr (the merger reshapes).
    pub fn delta(&self, module: &LoraModule, device: &Device) -> Result<Tensor> {
        self.scaled_delta(module, device, 1.0)
    }

    /// [`LoraAdapter::delta`] times `strength`. For plain LoRA modules the factor is folded into the
    /// small `up` matrix before the product, so no pass over the full-size update is spent on scaling.
    pub fn scaled_delta(&self, module: &LoraModule, device: &Device, strength: f64) -> Result<Tensor> {
        let scale = module.scale() as f64 * strength;
        let load = |name: &str| -> Result<Tensor> { Ok(load_view(&self.st.get(name)?, DType::F32, device)?) };
        let flat = |t: Tensor| -> Result<Tensor> {
            let rows = t.dims().first().copied().unwrap_or(1);
            Ok(t.reshape((rows, t.elem_count() / rows.max(1)))?)
        };
        let d = match &module.weights {
            Weights::Lora { down, up, mid } => {
                let out = module.up_shape[0];
                let up = load(up)?.reshape((out, module.up_shape[1]))?;
                let down = load(down)?;
                match mid {
                    None => {
                        let rest: Vec<usize> = module.down_shape[1..].to_vec();
                        let w = (up * scale)?.matmul(&flat(down)?)?;
                        let mut shape = vec![out];
                        shape.extend(rest);
                        return Ok(w.reshape(shape)?);
                    }
                    Some(mid) => {
                        // W[o,i,h,w] = Σ_ab up[o,a] · mid[a,b,h,w] · down[b,i]: the 1×1 → k×k → 1×1 conv stack.
                        let mid = load(mid)?;
                        let (ra, rb, kh, kw) = mid.dims4()?;
                        let down = down.reshape((rb, module.down_shape[1]))?;
                        let core = mid.permute((2, 3, 0, 1))?.reshape((kh * kw, ra, rb))?;
                        let t = core.broadcast_matmul(&down)?;
                        let t = up.broadcast_matmul(&t)?;
                        t.reshape((kh, kw, out, module.down_shape[1]))?.permute((2, 3, 0, 1))?.contiguous()?
                    }
                }
            }
            Weights::LoHa { w1a, w1b, w2a, w2b } => {
                let a = load(w1a)?.matmul(&flat(load(w1b)?)?)?;
                let b = load(w2a)?.matmul(&flat(load(w2b)?)?)?;
                (a * b)?
            }
            Weights::LoKr { w1, w2 } => {
                let factor = |f: &Factor| -> Result<Tensor> {
                    match f {
                        Factor::Full(n) => flat(load(n)?),
                        Factor::Product(a, b) => Ok(load(a)?.matmul(&flat(load(b)?)?)?),
                    }
                };
                kron(&factor(w1)?, &factor(w2)?)?
            }
        };
        Ok((d * scale)?)
    }

    /// The model family the adapter was most likely trained for, from metadata and tensor shapes.
    pub fn likely_family(&self) -> Option<String> {
        if let Some(v) = &self.metadata.base_model_version {
            let v = v.to_ascii_lowercase();
            for (frag, fam) in
                [("sdxl", "SDXL"), ("sd_v1", "SD 1.x"), ("sd_v2", "SD 2.x"), ("flux", "Flux"), ("sd3", "SD3")]
            {
                if v.contains(frag) {
                    return Some(fam.into());
                }
            }
        }
        let keys = || self.modules.iter().map(|m| m.key.as_str());
        if keys().any(|k| {
            k.contains("double_blocks")
                || k.contains("single_blocks")
                || k.starts_with("lora_transformer_")
                || k.starts_with("transformer.")
        }) {
            return Some("Flux/SD3 (transformer)".into());
        }
        if keys().any(|k| k.starts_with("lora_te1_") || k.starts_with("lora_te2_") || k.starts_with("text_encoder_2."))
        {
            return Some("SDXL".into());
        }
        // The cross-attention key projection reads the text-encoder width: 768 SD 1.x, 1024 SD 2.x, 2048 SDXL.
        let ctx = self
            .modules
            .iter()
            .find(|m| {
                m.key.ends_with("attn2_to_k")
                    || m.key.ends_with("attn2.to_k")
                    || m.key.ends_with("attn2.processor.to_k_lora")
            })
            .and_then(|m| m.down_shape.get(1).copied());
        match ctx {
            Some(768) => Some("SD 1.x".into()),
            Some(1024) => Some("SD 2.x".into()),
            Some(2048) => Some("SDXL".into()),
            _ => None,
        }
    }
}

/// Human name of a model family, as [`LoraAdapter::likely_family`] spells it.
pub fn family_name(f: ModelFamily) -> &'static str {
    match f {
        ModelFamily::Sd1 => "SD 1.x",
        ModelFamily::Sd2 => "SD 2.x",
        ModelFamily::Sdxl => "SDXL",
        ModelFamily::Flux => "FLUX",
        ModelFamily::Sd3 => "SD 3.x",
        ModelFamily::ZImage => "Z-Image",
        ModelFamily::Flux2 => "FLUX.2",
    }
}

/// Kronecker product of two matrices: `[p, q] ⊗ [r, s] → [p·r, q·s]`.
pub fn kron(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let (p, q) = a.dims2()?;
    let (r, s) = b.dims2()?;
    a.reshape((p, 1, q, 1))?.broadcast_mul(&b.reshape((1, r, 1, s))?)?.reshape((p * r, q * s))
}

fn scalar(st: &MmapedSafetensors, name: &str) -> candle_core::Result<f32> {
    let t = load_view(&st.get(name)?, DType::F32, &Device::Cpu)?.flatten_all()?;
    if t.elem_count() != 1 {
        candle_core::bail!("expected one value, found shape {:?}", t.dims());
    }
    t.get(0)?.to_scalar::<f32>()
}
