//! Checkpoints under `--models-dir`: the list A1111 clients read (`/sdapi/v1/sd-models`), and the
//! one way a name a client sends becomes a model to load.
//!
//! Clients name models (`sd15`, `sd15.safetensors`, A1111's title `sd15.safetensors [abcdef0123]`, or a
//! short hash); a name resolves only against the scanned list, never as a path or a hub id, so a
//! request cannot reach a file outside the folders. Symlinks are listed only when they resolve inside
//! a models folder.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use candle_core::DType;
use serde::{Deserialize, Serialize};

use crate::folders::AllowedFolders;

/// Folder depth scanned below each models folder.
const MAX_DEPTH: usize = 4;
/// Entries listed at most, and folder entries looked at at most (a models folder pointed at `/` must not
/// stall the worker).
const MAX_ENTRIES: usize = 4096;
const MAX_VISITED: usize = 50_000;

/// One checkpoint found in a models folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The name clients switch to: the path relative to its folder without the extension
    /// (`sd15`, `xl/juggernaut`), A1111's `model_name`.
    pub name: String,
    /// The path relative to its folder with the extension (`sd15.safetensors`, a diffusers folder's name).
    pub file_name: String,
    /// Canonical path (not sent to clients, nor through the queue: each worker finds the name in its own folders).
    #[serde(skip)]
    pub path: PathBuf,
    /// The file's SHA-256 when it was computed (the queue carries it to fronts, which read no files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

impl Checkpoint {
    /// A1111's title: `file_name [short hash]` once the file's hash is known (folders have none).
    pub fn title(&self) -> String {
        match self.cached_sha256() {
            Some(h) => format!("{} [{}]", self.file_name, short_hash(&h)),
            None => self.file_name.clone(),
        }
    }

    /// The file's SHA-256 if it was computed already (hashing a multi-GB file on every listing would
    /// stall clients; it is computed when the model loads).
    pub fn cached_sha256(&self) -> Option<String> {
        if self.path.as_os_str().is_empty() {
            return self.sha256.clone();
        }
        self.path.is_file().then(|| sd_models::hash::cached_sha256(&self.path)).flatten()
    }
}

/// The checkpoints of the `--models-dir` folders, rescanned by `/sdapi/v1/refresh-checkpoints`.
#[derive(Debug, Default)]
pub struct ModelCatalog {
    folders: AllowedFolders,
    entries: RwLock<Vec<Checkpoint>>,
}

impl ModelCatalog {
    /// Canonicalizes and scans `dirs` (missing ones are skipped with a warning).
    pub fn new(dirs: &[PathBuf]) -> Self {
        let c = Self { folders: AllowedFolders::new(dirs, "models"), entries: RwLock::new(Vec::new()) };
        c.refresh();
        c
    }

    /// Whether no models folder is configured.
    pub fn is_empty(&self) -> bool {
        self.folders.is_empty()
    }

    /// Rescans the folders; returns how many checkpoints they hold.
    pub fn refresh(&self) -> usize {
        let list = scan(&self.folders);
        let n = list.len();
        *self.entries.write().unwrap_or_else(|e| e.into_inner()) = list;
        n
    }

    /// Every checkpoint, sorted by name.
    pub fn list(&self) -> Vec<Checkpoint> {
        self.entries.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The checkpoint a client's name designates: its name, file name, A1111 title (`file [hash]`, the
    /// hash checked when known) or a hash prefix of at least 8 hex digits among the hashes computed so far.
    pub fn resolve(&self, requested: &str) -> Option<Checkpoint> {
        resolve_in(&self.entries.read().unwrap_or_else(|e| e.into_inner()), requested)
    }

    /// The checkpoint at an already canonical path, if it is one of the list.
    pub fn by_path(&self, canonical: &Path) -> Option<Checkpoint> {
        self.entries.read().unwrap_or_else(|e| e.into_inner()).iter().find(|c| c.path == canonical).cloned()
    }
}

/// [`ModelCatalog::resolve`] over any list (a front resolves names against the list its workers publish).
pub fn resolve_in(list: &[Checkpoint], requested: &str) -> Option<Checkpoint> {
    let (name, hash) = split_title(requested);
    let name = name.replace('\\', "/");
    let by_name = list.iter().find(|c| {
        let hash_ok = match (hash, c.cached_sha256()) {
            (Some(h), Some(full)) => full.starts_with(&h.to_ascii_lowercase()),
            _ => true,
        };
        // A1111's ids: the relative name with `/` as `_` (its `model_name`), the file name, the base name's stem.
        let base = c.file_name.rsplit('/').next().unwrap_or(&c.file_name);
        hash_ok && (c.name == name || c.file_name == name || file_stem(&c.file_name) == name || c.name.replace('/', "_") == name || file_stem(base) == name)
    });
    if let Some(c) = by_name {
        return Some(c.clone());
    }
    let h = hash.unwrap_or(requested.trim()).to_ascii_lowercase();
    if h.len() >= 8 && h.chars().all(|c| c.is_ascii_hexdigit()) {
        return list.iter().find(|c| c.cached_sha256().is_some_and(|full| full.starts_with(&h))).cloned();
    }
    None
}

/// A1111's short hash: the first 10 hex digits (the whole text when shorter, as from a foreign queue entry).
pub fn short_hash(sha256: &str) -> &str {
    sha256.get(..10).unwrap_or(sha256)
}

/// The VAEs of `--vae-dir` (A1111's `models/VAE`): `.safetensors` files and diffusers `vae/` folders, by the
/// names A1111's `sd_vae` takes (the file name, `vae-ft-mse-840000-ema-pruned.safetensors`, or its stem).
#[derive(Debug, Default)]
pub struct VaeFolders {
    folders: AllowedFolders,
}

/// A VAE found in the folders.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AvailableVae {
    /// The name `sd_vae` takes: the file name relative to its folder (`sub/x.safetensors`), a folder's name.
    pub name: String,
    /// Canonical path.
    #[serde(skip)]
    pub path: PathBuf,
}

impl VaeFolders {
    /// Canonicalizes `dirs` (missing ones are skipped with a warning).
    pub fn new(dirs: &[PathBuf]) -> Self {
        Self { folders: AllowedFolders::new(dirs, "VAE") }
    }

    /// Every VAE in the folders (two levels deep), by name.
    pub fn list(&self) -> Vec<AvailableVae> {
        let mut out: Vec<AvailableVae> = self
            .folders
            .walk(2, MAX_ENTRIES, &|dir| dir.join("config.json").is_file())
            .into_iter()
            .filter(|f| f.canonical.is_dir() || f.extension() == "safetensors")
            .map(|f| AvailableVae { name: f.relative, path: f.canonical })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// The VAE a request names: its name or the name's stem; only inside the folders.
    pub fn resolve(&self, name: &str) -> Option<AvailableVae> {
        let name = name.trim();
        self.list().into_iter().find(|v| v.name == name || file_stem(&v.name) == name)
    }
}

/// `name [hash]` → (`name`, `Some(hash)`); anything else → (`name`, `None`).
pub fn split_title(s: &str) -> (&str, Option<&str>) {
    let s = s.trim();
    if let Some(open) = s.rfind(" [") {
        if let Some(inner) = s[open + 2..].strip_suffix(']') {
            if !inner.is_empty() && inner.chars().all(|c| c.is_ascii_hexdigit()) {
                return (s[..open].trim_end(), Some(inner));
            }
        }
    }
    (s, None)
}

fn file_stem(file_name: &str) -> &str {
    match file_name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() && !ext.contains('/') => stem,
        _ => file_name,
    }
}

/// What a path in a models folder is: a model file, a diffusers folder, or a folder to descend into.
fn is_model_file(p: &Path) -> bool {
    matches!(p.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref(), Some("safetensors" | "gguf"))
}

fn scan(folders: &AllowedFolders) -> Vec<Checkpoint> {
    let mut out = Vec::new();
    let mut visited = 0;
    for root in folders.roots() {
        walk(folders, root, root, 0, &mut out, &mut visited);
    }
    out.sort_by(|a, b| a.name.cmp(&b.name).then(a.file_name.cmp(&b.file_name)));
    // The same checkpoint reached twice (two folders, or a symlink) is listed once.
    out.dedup_by(|a, b| a.path == b.path);
    // Names are keys: where a file and a folder (or two folders) share one, the files go by their file name.
    let mut seen = std::collections::HashMap::<String, usize>::new();
    for c in &out {
        *seen.entry(c.name.clone()).or_default() += 1;
    }
    for c in out.iter_mut().filter(|c| seen.get(&c.name).is_some_and(|&n| n > 1) && c.path.is_file()) {
        c.name = c.file_name.clone();
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn walk(folders: &AllowedFolders, root: &Path, dir: &Path, depth: usize, out: &mut Vec<Checkpoint>, visited: &mut usize) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut paths: Vec<PathBuf> = entries.flatten().take(MAX_VISITED).map(|e| e.path()).collect();
    paths.sort();
    for p in paths {
        *visited += 1;
        if out.len() >= MAX_ENTRIES || *visited > MAX_VISITED {
            tracing::warn!(folder = %root.display(), "more than {MAX_ENTRIES} checkpoints or {MAX_VISITED} folder entries; the rest are not listed");
            return;
        }
        if p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.')) {
            continue;
        }
        let Ok(canonical) = p.canonicalize() else { continue };
        if !folders.contains(&canonical) {
            continue;
        }
        let rel = p.strip_prefix(root).unwrap_or(&p).to_string_lossy().replace('\\', "/");
        if canonical.is_dir() {
            if canonical.join("model_index.json").is_file() {
                out.push(Checkpoint { name: rel.clone(), file_name: rel, path: canonical, sha256: None });
            } else if depth < MAX_DEPTH {
                walk(folders, root, &p, depth + 1, out, visited);
            }
        } else if is_model_file(&p) {
            out.push(Checkpoint { name: file_stem(&rel).to_string(), file_name: rel, path: canonical, sha256: None });
        }
    }
}

/// Bytes the weights of the model at `path` take in memory as `dtype`, from the safetensors headers
/// (other weight files count by their size on disk): what the model cache is bounded by. A diffusers
/// folder's `.fp16` copies of a component are counted once.
pub fn estimate_bytes(path: &Path, dtype: DType) -> u64 {
    let mut files = Vec::new();
    collect_weight_files(path, 0, &mut files);
    // One file per (folder, name without the .fp16/.bf16 variant tag).
    let mut chosen: BTreeMap<(PathBuf, String), PathBuf> = BTreeMap::new();
    for f in files {
        let name = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let plain = name.replace(".fp16.", ".").replace(".bf16.", ".");
        let dir = f.parent().map(Path::to_path_buf).unwrap_or_default();
        chosen.entry((dir, plain)).or_insert(f);
    }
    chosen.values().map(|f| file_bytes(f, dtype)).sum()
}

fn collect_weight_files(path: &Path, depth: usize, out: &mut Vec<PathBuf>) {
    if path.is_file() {
        out.push(path.to_path_buf());
        return;
    }
    if depth > 2 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(path) else { return };
    for e in entries.flatten() {
        let p = e.path();
        let weights = matches!(p.extension().and_then(|e| e.to_str()), Some("safetensors" | "bin" | "gguf" | "ckpt" | "pt"));
        if p.is_dir() {
            collect_weight_files(&p, depth + 1, out);
        } else if weights {
            out.push(p);
        }
    }
}

fn file_bytes(path: &Path, dtype: DType) -> u64 {
    let on_disk = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    if path.extension().and_then(|e| e.to_str()) != Some("safetensors") {
        return on_disk;
    }
    safetensors_elements(path).map_or(on_disk, |n| n.saturating_mul(dtype.size_in_bytes() as u64))
}

/// Elements of every tensor a safetensors file holds, read from its header only.
fn safetensors_elements(path: &Path) -> Option<u64> {
    let mut f = std::fs::File::open(path).ok()?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).ok()?;
    let n = u64::from_le_bytes(len);
    if n > 100 << 20 {
        return None;
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).ok()?;
    let v: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header).ok()?;
    let mut total = 0u64;
    for (k, t) in &v {
        if k == "__metadata__" {
            continue;
        }
        let shape = t.get("shape")?.as_array()?;
        total = total.saturating_add(shape.iter().map(|d| d.as_u64().unwrap_or(0)).product::<u64>());
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
    }

    #[test]
    fn titles_split_and_names_resolve_only_inside() {
        assert_eq!(split_title("sd15.safetensors [0123abcdef]"), ("sd15.safetensors", Some("0123abcdef")));
        assert_eq!(split_title("my [model]"), ("my [model]", None));
        assert_eq!(split_title(" sd15 "), ("sd15", None));
        let d = std::env::temp_dir().join(format!("sd-worker-models-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("models/xl")).expect("dir");
        std::fs::copy(fixtures().join("sd15.safetensors"), d.join("models/sd15.safetensors")).expect("copy");
        std::fs::copy(fixtures().join("sdxl.safetensors"), d.join("models/xl/tiny-xl.safetensors")).expect("copy");
        std::fs::write(d.join("models/notes.txt"), "x").expect("write");
        std::fs::copy(fixtures().join("sd15.safetensors"), d.join("outside.safetensors")).expect("copy");
        #[cfg(unix)]
        std::os::unix::fs::symlink(d.join("outside.safetensors"), d.join("models/link.safetensors")).expect("symlink");
        let cat = ModelCatalog::new(&[d.join("models")]);
        let names: Vec<String> = cat.list().into_iter().map(|c| c.name).collect();
        assert_eq!(names, ["sd15", "xl/tiny-xl"]);
        assert_eq!(cat.resolve("sd15").map(|c| c.file_name), Some("sd15.safetensors".into()));
        assert_eq!(cat.resolve("xl/tiny-xl.safetensors").map(|c| c.name), Some("xl/tiny-xl".into()));
        assert_eq!(cat.resolve("xl_tiny-xl").map(|c| c.name), Some("xl/tiny-xl".into()), "A1111's model_name");
        assert_eq!(cat.resolve("tiny-xl").map(|c| c.name), Some("xl/tiny-xl".into()), "the base name's stem");
        for escape in ["../outside", "link", "outside", "/etc/passwd", "../outside.safetensors"] {
            assert!(cat.resolve(escape).is_none(), "{escape}");
        }
        // The title with the right hash resolves once the hash is known; a wrong hash does not.
        let sd15 = cat.resolve("sd15").expect("sd15");
        let h = sd_models::hash::sha256(&sd15.path).expect("hash");
        assert_eq!(sd15.title(), format!("sd15.safetensors [{}]", &h[..10]));
        assert_eq!(cat.resolve(&format!("sd15.safetensors [{}]", &h[..10])).map(|c| c.name), Some("sd15".into()));
        assert!(cat.resolve("sd15.safetensors [ffffffffff]").is_none());
        assert_eq!(cat.resolve(&h[..10]).map(|c| c.name), Some("sd15".into()));
        // Refresh sees new files.
        std::fs::copy(fixtures().join("sd2.safetensors"), d.join("models/sd2.safetensors")).expect("copy");
        assert_eq!(cat.refresh(), 3);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn estimates_weight_bytes_from_headers() {
        let f = fixtures().join("sd15.safetensors");
        let on_disk = std::fs::metadata(&f).expect("meta").len();
        let f32 = estimate_bytes(&f, DType::F32);
        let f16 = estimate_bytes(&f, DType::F16);
        assert_eq!(f32, 2 * f16);
        // The fixture is stored in F32: its bytes in F32 are its size less the header.
        assert!(f32 <= on_disk && f32 > on_disk * 9 / 10, "{f32} vs {on_disk}");
        // A diffusers folder counts its weights (fixtures/sd15 has each component once).
        assert!(estimate_bytes(&fixtures().join("sd15"), DType::F32) > 0);
    }
}
