//! Fetching diffusers-format repos (Stable Diffusion, and FLUX for sd-flux) from the Hugging Face
//! hub (feature `hub`).
//!
//! Only the files a pipeline needs are downloaded (configs, one weight variant per component,
//! tokenizers, scheduler), into the standard hub cache; the snapshot folder is then an ordinary
//! diffusers folder for [`crate::loader::load_diffusers_folder`].

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::{Api, ApiBuilder, ApiRepo};
use hf_hub::{Repo, RepoType};
use serde::Deserialize;

use crate::{Error, Result};

const WEIGHT_FOLDERS: [&str; 5] = ["unet", "transformer", "vae", "text_encoder", "text_encoder_2"];
const OTHER_FOLDERS: [&str; 3] = ["tokenizer", "tokenizer_2", "scheduler"];

fn hub_err(repo: &str, e: impl std::fmt::Display) -> Error {
    Error::Hub { repo: repo.to_string(), reason: e.to_string() }
}

/// Shard file names listed in a `*.safetensors.index.json`.
#[derive(Deserialize)]
struct ShardIndex {
    weight_map: std::collections::HashMap<String, String>,
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

fn fetch(repo: &ApiRepo, repo_id: &str, file: &str) -> Result<PathBuf> {
    tracing::info!("fetching {repo_id}/{file}");
    repo.get(file).map_err(|e| hub_err(repo_id, format!("downloading {file}: {e}")))
}

/// Downloads what a diffusers pipeline needs from `repo_id` (at `revision`, default `main`) and
/// returns the local snapshot folder.
pub fn download_diffusers_repo(repo_id: &str, revision: Option<&str>, prefer_fp16: bool) -> Result<PathBuf> {
    let api: Api = ApiBuilder::from_env().build().map_err(|e| hub_err(repo_id, e))?;
    let repo =
        api.repo(Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.unwrap_or("main").to_string()));
    let info = repo.info().map_err(|e| hub_err(repo_id, e))?;
    let files: BTreeSet<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    // The denoiser's config anchors the snapshot: a UNet (Stable Diffusion) or a transformer (FLUX).
    let Some(anchor) = ["unet/config.json", "transformer/config.json"].into_iter().find(|f| files.contains(*f)) else {
        return Err(hub_err(
            repo_id,
            "the repo has neither unet/config.json nor transformer/config.json; only diffusers-format repos can be \
             loaded by id (download a single-file checkpoint and pass its path instead)",
        ));
    };
    let anchor_config = fetch(&repo, repo_id, anchor)?;
    let root = anchor_config
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .ok_or_else(|| hub_err(repo_id, "unexpected hub cache layout"))?;
    if files.contains("model_index.json") {
        fetch(&repo, repo_id, "model_index.json")?;
    }
    for folder in WEIGHT_FOLDERS {
        let config = format!("{folder}/config.json");
        if !files.contains(&config) {
            continue;
        }
        fetch(&repo, repo_id, &config)?;
        let weights = pick_weights(&files, folder, prefer_fp16).ok_or_else(|| {
            hub_err(repo_id, format!("no safetensors weights in {folder}/ (pickle .bin weights are not loaded)"))
        })?;
        let local = fetch(&repo, repo_id, &weights)?;
        if weights.ends_with(".json") {
            let text = std::fs::read_to_string(&local).map_err(|e| Error::Io { path: local.clone(), source: e })?;
            let index: ShardIndex = serde_json::from_str(&text)
                .map_err(|e| Error::InvalidConfig { path: local.clone(), reason: e.to_string() })?;
            let shards: BTreeSet<String> = index.weight_map.into_values().collect();
            for shard in shards {
                fetch(&repo, repo_id, &format!("{folder}/{shard}"))?;
            }
        }
    }
    for folder in OTHER_FOLDERS {
        let prefix = format!("{folder}/");
        for f in files.iter().filter(|f| f.starts_with(&prefix) && !f[prefix.len()..].contains('/')) {
            fetch(&repo, repo_id, f)?;
        }
    }
    Ok(root)
}
