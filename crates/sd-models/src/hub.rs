//! Fetching models from the Hugging Face hub (feature `hub`): diffusers-format repos (Stable
//! Diffusion, and FLUX for sd-flux) and single-file repos (one `.safetensors` checkpoint, as many
//! civitai mirrors are).
//!
//! Only the files a pipeline needs are downloaded (configs, one weight variant per component,
//! tokenizers, scheduler) into the standard hub cache, resumably and with a progress bar per file;
//! the result is an ordinary diffusers folder or checkpoint file for [`crate::loader::load`].
//! [`HubOptions::from_env`] honours `HF_ENDPOINT`, `HF_HOME`/`HF_HUB_CACHE`, `HF_TOKEN` (or the
//! token file `huggingface-cli login` writes) and `HF_HUB_OFFLINE`, as the Python tools do. With
//! `HF_HUB_OFFLINE=1`, or when the hub cannot be reached, the cached snapshot is used without any
//! request.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};
use serde::Deserialize;

use crate::{Error, Result, DEFAULT_MODEL_REPO};

const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
const WEIGHT_FOLDERS: [&str; 5] = ["unet", "transformer", "vae", "text_encoder", "text_encoder_2"];
const OTHER_FOLDERS: [&str; 3] = ["tokenizer", "tokenizer_2", "scheduler"];
/// The denoiser's config anchors a diffusers snapshot: a UNet (Stable Diffusion) or a transformer (FLUX).
const ANCHORS: [&str; 2] = ["unet/config.json", "transformer/config.json"];

fn hub_err(repo: &str, e: impl std::fmt::Display) -> Error {
    Error::Hub { repo: repo.to_string(), reason: e.to_string() }
}

/// A model on the hub, written `owner/name[/path/in/repo.safetensors][@revision]` (optionally
/// prefixed `hub:`): a whole repo, or one checkpoint file of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubModel {
    /// `owner/name`.
    pub repo_id: String,
    /// Branch, tag or commit; `None` is `main`.
    pub revision: Option<String>,
    /// One file of the repo to load as a single-file checkpoint; `None` picks by the repo's layout.
    pub file: Option<String>,
}

impl HubModel {
    /// The model used when none is named ([`DEFAULT_MODEL_REPO`]).
    pub fn default_model() -> Self {
        Self { repo_id: DEFAULT_MODEL_REPO.to_string(), revision: None, file: None }
    }

    /// Parses `[hub:]owner/name[/file][@revision]`.
    pub fn parse(spec: &str) -> Result<Self> {
        let bad = |why: &str| {
            hub_err(
                spec,
                format!("{why}; write a hub model as hub:owner/name, hub:owner/name@revision or hub:owner/name/file.safetensors"),
            )
        };
        let body = spec.strip_prefix("hub:").unwrap_or(spec).trim();
        let (path, revision) = match body.rsplit_once('@') {
            Some((_, "")) => return Err(bad("empty revision after '@'")),
            Some((p, r)) => (p, Some(r)),
            None => (body, None),
        };
        let mut parts = path.split('/');
        let (Some(owner), Some(name)) = (parts.next(), parts.next()) else {
            return Err(bad("the repo id needs an owner and a name"));
        };
        let valid = |s: &str| !s.is_empty() && s != "." && s != ".." && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !valid(owner) || !valid(name) {
            return Err(bad("owner and name may hold only letters, digits, '-', '_' and '.'"));
        }
        let rest: Vec<&str> = parts.collect();
        let file = if rest.is_empty() {
            None
        } else {
            if rest.iter().any(|s| s.is_empty() || *s == "." || *s == "..") {
                return Err(bad("the file path inside the repo is malformed"));
            }
            Some(rest.join("/"))
        };
        Ok(Self { repo_id: format!("{owner}/{name}"), revision: revision.map(str::to_string), file })
    }

    /// Whether this is [`DEFAULT_MODEL_REPO`] as a whole repo.
    pub fn is_default_model(&self) -> bool {
        self.repo_id.eq_ignore_ascii_case(DEFAULT_MODEL_REPO) && self.file.is_none()
    }

    fn revision(&self) -> &str {
        self.revision.as_deref().unwrap_or("main")
    }
}

impl std::fmt::Display for HubModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "hub:{}", self.repo_id)?;
        if let Some(file) = &self.file {
            write!(f, "/{file}")?;
        }
        if let Some(rev) = &self.revision {
            write!(f, "@{rev}")?;
        }
        Ok(())
    }
}

/// How to reach the hub and where its cache lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubOptions {
    /// The hub's base URL (`HF_ENDPOINT`, default `https://huggingface.co`).
    pub endpoint: String,
    /// The hub cache folder (`HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`).
    pub cache_dir: PathBuf,
    /// Access token for gated or private repos (`HF_TOKEN`, else the token file).
    pub token: Option<String>,
    /// Never make a request; use only what the cache holds (`HF_HUB_OFFLINE`).
    pub offline: bool,
    /// Draw a progress bar per downloaded file on stderr (when it is a terminal).
    pub progress: bool,
    /// Fetch `*.fp16.safetensors` weights when a component has both (half the download; the
    /// loader converts them to the requested dtype).
    pub prefer_fp16: bool,
}

impl HubOptions {
    /// Options from the environment variables the Hugging Face tools use.
    pub fn from_env() -> Result<Self> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let hf_home = var("HF_HOME").map(PathBuf::from).or_else(|| {
            let cache = var("XDG_CACHE_HOME").map(PathBuf::from).or_else(|| home_dir().map(|h| h.join(".cache")))?;
            Some(cache.join("huggingface"))
        });
        let cache_dir = match var("HF_HUB_CACHE").map(PathBuf::from).or_else(|| hf_home.as_ref().map(|h| h.join("hub"))) {
            Some(dir) => dir,
            None => {
                return Err(hub_err(
                    "(cache)",
                    "no home folder to put the hub cache in: set HF_HOME or HF_HUB_CACHE to a writable folder",
                ))
            }
        };
        let token_file = var("HF_TOKEN_PATH").map(PathBuf::from).or_else(|| hf_home.map(|h| h.join("token")));
        let token = var("HF_TOKEN").or_else(|| {
            let text = std::fs::read_to_string(token_file?).ok()?;
            Some(text.trim().to_string()).filter(|t| !t.is_empty())
        });
        Ok(Self {
            endpoint: var("HF_ENDPOINT").map(|e| e.trim_end_matches('/').to_string()).unwrap_or_else(|| DEFAULT_ENDPOINT.into()),
            cache_dir,
            token,
            offline: var("HF_HUB_OFFLINE").is_some_and(|v| truthy(&v)),
            progress: true,
            prefer_fp16: true,
        })
    }
}

impl HubOptions {
    /// Picks the weight files for loading in `dtype`: fp16 files halve the download and are
    /// widened on load, unless f32 files were asked for explicitly.
    pub fn for_dtype(mut self, dtype: Option<candle_core::DType>) -> Self {
        self.prefer_fp16 = dtype != Some(candle_core::DType::F32);
        self
    }
}

/// huggingface_hub's reading of boolean environment variables.
fn truthy(v: &str) -> bool {
    matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "on" | "yes" | "true")
}

fn home_dir() -> Option<PathBuf> {
    std::env::var_os("HOME").or_else(|| std::env::var_os("USERPROFILE")).filter(|h| !h.is_empty()).map(PathBuf::from)
}

/// Shard file names listed in a `*.safetensors.index.json`.
#[derive(Deserialize)]
struct ShardIndex {
    weight_map: std::collections::HashMap<String, String>,
}

/// Where files come from: the hub (cache first, then a download) or the cache alone.
enum Source {
    Online { repo: Box<ApiRepo>, files: BTreeSet<String> },
    Cached { snapshot: PathBuf, files: BTreeSet<String> },
}

impl Source {
    fn files(&self) -> &BTreeSet<String> {
        match self {
            Source::Online { files, .. } | Source::Cached { files, .. } => files,
        }
    }

    fn fetch(&self, model: &HubModel, file: &str) -> Result<PathBuf> {
        match self {
            Source::Online { repo, .. } => {
                tracing::info!("fetching {}/{file}", model.repo_id);
                repo.get(file).map_err(|e| hub_err(&model.repo_id, format!("downloading {file}: {}", describe_api_error(&e))))
            }
            Source::Cached { snapshot, .. } => {
                let path = snapshot.join(file);
                if path.is_file() {
                    Ok(path)
                } else {
                    Err(hub_err(&model.repo_id, format!("{file} is not in the cached snapshot {}", snapshot.display())))
                }
            }
        }
    }
}

/// A sentence for an hf-hub error: what the status means for the user.
fn describe_api_error(e: &ApiError) -> String {
    if let ApiError::RequestError(inner) = e {
        if let ureq::Error::Status(code, _) = inner.as_ref() {
            return match code {
                401 | 403 => format!(
                    "the hub answered {code}: the repo is gated or private; accept its license on the hub and set HF_TOKEN \
                     (or run `huggingface-cli login`)"
                ),
                404 => "the hub answered 404: no such repo, revision or file".to_string(),
                _ => format!("the hub answered HTTP {code}"),
            };
        }
    }
    e.to_string()
}

/// Whether an error means the hub could not be reached at all (as opposed to an answer).
fn is_unreachable(e: &ApiError) -> bool {
    matches!(e, ApiError::RequestError(inner) if matches!(inner.as_ref(), ureq::Error::Transport(_)))
}

/// The cached snapshot of `model`'s revision, with every file it holds.
fn cached_source(model: &HubModel, opts: &HubOptions) -> Result<Source> {
    let repo = Repo::with_revision(model.repo_id.clone(), RepoType::Model, model.revision().to_string());
    let repo_dir = opts.cache_dir.join(repo.folder_name());
    let rev = model.revision();
    let commit = match std::fs::read_to_string(repo_dir.join("refs").join(rev)) {
        Ok(c) => c.trim().to_string(),
        // A commit hash is its own snapshot name.
        Err(_) if rev.len() == 40 && rev.chars().all(|c| c.is_ascii_hexdigit()) => rev.to_string(),
        Err(_) => {
            return Err(hub_err(
                &model.repo_id,
                format!(
                    "revision {rev} is not in the hub cache {} (offline); connect once without HF_HUB_OFFLINE to download it",
                    opts.cache_dir.display()
                ),
            ))
        }
    };
    let snapshot = repo_dir.join("snapshots").join(&commit);
    let mut files = BTreeSet::new();
    list_files(&snapshot, &snapshot, &mut files);
    if files.is_empty() {
        return Err(hub_err(&model.repo_id, format!("the cached snapshot {} is empty", snapshot.display())));
    }
    Ok(Source::Cached { snapshot, files })
}

fn list_files(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            list_files(root, &path, out);
        } else if path.is_file() {
            if let Ok(rel) = path.strip_prefix(root) {
                out.insert(rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/"));
            }
        }
    }
}

/// Downloads (or finds in the cache) what loading `model` needs and returns the local path: the
/// snapshot folder of a diffusers repo, or the checkpoint file of a single-file repo.
///
/// A single-file repo is one with no `unet/config.json` / `transformer/config.json`; its one
/// `.safetensors` file is taken, or the one [`HubModel::file`] names when it has several.
pub fn download(model: &HubModel, opts: &HubOptions) -> Result<PathBuf> {
    if opts.offline {
        return resolve(model, &cached_source(model, opts)?, opts.prefer_fp16);
    }
    let api = ApiBuilder::from_cache(Cache::new(opts.cache_dir.clone()))
        .with_endpoint(opts.endpoint.clone())
        .with_token(opts.token.clone())
        .with_progress(opts.progress)
        .with_retries(3)
        .build()
        .map_err(|e| hub_err(&model.repo_id, e))?;
    let repo = api.repo(Repo::with_revision(model.repo_id.clone(), RepoType::Model, model.revision().to_string()));
    let info = match repo.info() {
        Ok(info) => info,
        Err(e) if is_unreachable(&e) => {
            // As huggingface_hub does: without a connection, a complete cached snapshot still works.
            let fallback = cached_source(model, opts).and_then(|s| resolve(model, &s, opts.prefer_fp16));
            return match fallback {
                Ok(path) => {
                    tracing::warn!("cannot reach {} ({e}); using the cached snapshot of {model}", opts.endpoint);
                    Ok(path)
                }
                Err(_) => Err(hub_err(
                    &model.repo_id,
                    format!("cannot reach {} ({e}) and the model is not in the hub cache {}", opts.endpoint, opts.cache_dir.display()),
                )),
            };
        }
        Err(e) => return Err(hub_err(&model.repo_id, describe_api_error(&e))),
    };
    let files = info.siblings.into_iter().map(|s| s.rfilename).collect();
    resolve(model, &Source::Online { repo: Box::new(repo), files }, opts.prefer_fp16)
}

/// Picks and fetches the files of `model` from `source`.
fn resolve(model: &HubModel, source: &Source, prefer_fp16: bool) -> Result<PathBuf> {
    let files = source.files();
    if let Some(file) = &model.file {
        if !files.contains(file) {
            return Err(hub_err(
                &model.repo_id,
                format!("the repo has no file {file}; its checkpoints are: {}", checkpoint_list(files)),
            ));
        }
        return source.fetch(model, file);
    }
    match ANCHORS.into_iter().find(|f| files.contains(*f)) {
        Some(anchor) => fetch_diffusers(model, source, anchor, prefer_fp16),
        None => {
            let checkpoints: Vec<&String> = files.iter().filter(|f| is_checkpoint(f)).collect();
            match checkpoints.as_slice() {
                [one] => source.fetch(model, one),
                [] => Err(hub_err(
                    &model.repo_id,
                    "the repo has neither a diffusers layout (unet/config.json or transformer/config.json) nor a \
                     .safetensors checkpoint (pickle .ckpt/.bin files are not loaded)",
                )),
                _ => Err(hub_err(
                    &model.repo_id,
                    format!(
                        "the repo holds several checkpoints ({}); name one, e.g. hub:{}/{}",
                        checkpoint_list(files),
                        model.repo_id,
                        checkpoints[0]
                    ),
                )),
            }
        }
    }
}

fn is_checkpoint(file: &str) -> bool {
    file.to_ascii_lowercase().ends_with(".safetensors")
}

fn checkpoint_list(files: &BTreeSet<String>) -> String {
    let list: Vec<&str> = files.iter().filter(|f| is_checkpoint(f)).map(String::as_str).collect();
    if list.is_empty() {
        "none".into()
    } else {
        list.join(", ")
    }
}

/// Picks the weight files of one component folder among the repo's files, mirroring
/// [`crate::diffusers::find_weight_files`]: a single file or an index (whose shards are listed later).
fn pick_weights(files: &BTreeSet<String>, folder: &str, prefer_fp16: bool) -> Option<String> {
    let variants: [&str; 2] = if prefer_fp16 { [".fp16", ""] } else { ["", ".fp16"] };
    for variant in variants {
        for base in ["diffusion_pytorch_model", "model"] {
            for name in [
                format!("{folder}/{base}{variant}.safetensors"),
                format!("{folder}/{base}.safetensors.index{variant}.json"),
            ] {
                if files.contains(&name) {
                    return Some(name);
                }
            }
        }
    }
    None
}

/// Fetches what a diffusers pipeline needs and returns the snapshot folder.
fn fetch_diffusers(model: &HubModel, source: &Source, anchor: &str, prefer_fp16: bool) -> Result<PathBuf> {
    let repo_id = &model.repo_id;
    let files = source.files();
    let anchor_config = source.fetch(model, anchor)?;
    let root = anchor_config
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .ok_or_else(|| hub_err(repo_id, "unexpected hub cache layout"))?;
    if files.contains("model_index.json") {
        source.fetch(model, "model_index.json")?;
    }
    for folder in WEIGHT_FOLDERS {
        let config = format!("{folder}/config.json");
        if !files.contains(&config) {
            continue;
        }
        source.fetch(model, &config)?;
        let weights = pick_weights(files, folder, prefer_fp16).ok_or_else(|| match source {
            Source::Cached { snapshot, .. } => hub_err(
                repo_id,
                format!(
                    "{folder}/ has no weights in the cached snapshot {} (an interrupted download?); connect without \
                     HF_HUB_OFFLINE to finish it",
                    snapshot.display()
                ),
            ),
            Source::Online { .. } => {
                hub_err(repo_id, format!("no safetensors weights in {folder}/ (pickle .bin weights are not loaded)"))
            }
        })?;
        let local = source.fetch(model, &weights)?;
        if weights.ends_with(".json") {
            let text = std::fs::read_to_string(&local).map_err(|e| Error::Io { path: local.clone(), source: e })?;
            let index: ShardIndex = serde_json::from_str(&text)
                .map_err(|e| Error::InvalidConfig { path: local.clone(), reason: e.to_string() })?;
            let shards: BTreeSet<String> = index.weight_map.into_values().collect();
            for shard in shards {
                source.fetch(model, &format!("{folder}/{shard}"))?;
            }
        }
    }
    for folder in OTHER_FOLDERS {
        let prefix = format!("{folder}/");
        for f in files.iter().filter(|f| f.starts_with(&prefix) && !f[prefix.len()..].contains('/')) {
            source.fetch(model, f)?;
        }
    }
    Ok(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_repo_file_and_revision() {
        let m = HubModel::parse("hub:stabilityai/sd-turbo").unwrap();
        assert_eq!(m, HubModel::default_model());
        assert!(m.is_default_model());
        let m = HubModel::parse("owner/name@v1.0").unwrap();
        assert_eq!((m.repo_id.as_str(), m.revision.as_deref(), m.file.as_deref()), ("owner/name", Some("v1.0"), None));
        let m = HubModel::parse("hub:owner/name/sub/model.safetensors@abc").unwrap();
        assert_eq!(m.file.as_deref(), Some("sub/model.safetensors"));
        assert_eq!(m.revision.as_deref(), Some("abc"));
        assert_eq!(m.to_string(), "hub:owner/name/sub/model.safetensors@abc");
        assert!(!m.is_default_model());
        for bad in ["hub:", "hub:owner", "hub:owner/", "owner/na me", "owner/../x", "owner/name/../x", "owner/name@", "/name"] {
            assert!(HubModel::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn truthy_matches_huggingface_hub() {
        for v in ["1", "ON", "yes", "True"] {
            assert!(truthy(v));
        }
        for v in ["0", "off", "no", "false", ""] {
            assert!(!truthy(v));
        }
    }
}
