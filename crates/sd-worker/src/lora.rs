//! LoRA requests: names and paths resolved strictly inside the configured LoRA folders.
//!
//! Every candidate is canonicalized (resolving symlinks) and must still lie under a canonicalized
//! allowed folder, so neither `..`, absolute paths nor symlinks can reach other files.

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::folders::AllowedFolders;

/// Most LoRAs one request may stack.
pub const MAX_LORAS: usize = 8;
/// Largest absolute LoRA strength accepted.
pub const MAX_STRENGTH: f64 = 10.0;

/// One LoRA as a request names it: `name` (file stem in an allowed folder) or `path` (relative to
/// an allowed folder, or absolute inside one), and a strength.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraRequest {
    /// File name without `.safetensors`, looked up in the allowed folders in order.
    pub name: Option<String>,
    /// A path inside an allowed folder.
    pub path: Option<String>,
    /// Scale of the LoRA delta (default 1).
    pub strength: Option<f64>,
    /// Scale on the text encoders when it differs from `strength` (A1111's `<lora:name:te:unet>`).
    #[serde(default)]
    pub text_encoder_strength: Option<f64>,
}

/// A LoRA file confirmed to lie inside an allowed folder.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResolvedLora {
    /// Display name (file stem).
    pub name: String,
    /// Canonical path of the file.
    #[serde(skip)]
    pub path: PathBuf,
    /// Scale of the delta.
    pub strength: f64,
    /// Scale on the text encoders, when it differs from `strength`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text_encoder_strength: Option<f64>,
}

/// A LoRA found by listing the allowed folders.
#[derive(Debug, Clone, Serialize)]
pub struct AvailableLora {
    /// Name to request it by (file stem).
    pub name: String,
    /// Path relative to its folder (what `path` accepts).
    pub path: String,
}

/// The allowed folders, canonicalized once at startup (missing folders are dropped with a warning).
#[derive(Debug, Clone, Default)]
pub struct LoraFolders {
    folders: AllowedFolders,
}

impl LoraFolders {
    /// Canonicalizes `dirs`; folders that do not exist are skipped (and logged).
    pub fn new(dirs: &[PathBuf]) -> Self {
        Self { folders: AllowedFolders::new(dirs, "LoRA") }
    }

    /// Whether no folder is configured.
    pub fn is_empty(&self) -> bool {
        self.folders.is_empty()
    }

    /// The canonical `path` relative to the allowed folder holding it (how queue mode names it).
    pub fn relative(&self, path: &Path) -> Option<PathBuf> {
        self.folders.relative(path)
    }

    /// Resolves and validates every requested LoRA; errors name the field (`loras[i].path` …).
    pub fn resolve_all(&self, reqs: &[LoraRequest]) -> Result<Vec<ResolvedLora>, ApiError> {
        if reqs.len() > MAX_LORAS {
            return Err(ApiError::invalid("loras", format!("{} LoRAs requested; at most {MAX_LORAS} may be stacked", reqs.len())));
        }
        reqs.iter().enumerate().map(|(i, r)| self.resolve(i, r)).collect()
    }

    fn resolve(&self, i: usize, r: &LoraRequest) -> Result<ResolvedLora, ApiError> {
        let strength = r.strength.unwrap_or(1.0);
        if !strength.is_finite() || strength.abs() > MAX_STRENGTH {
            return Err(ApiError::invalid(format!("loras[{i}].strength"), format!("{strength} is outside -{MAX_STRENGTH}..={MAX_STRENGTH}")));
        }
        if let Some(te) = r.text_encoder_strength.filter(|te| !te.is_finite() || te.abs() > MAX_STRENGTH) {
            return Err(ApiError::invalid(format!("loras[{i}].text_encoder_strength"), format!("{te} is outside -{MAX_STRENGTH}..={MAX_STRENGTH}")));
        }
        let text_encoder_strength = r.text_encoder_strength.filter(|&te| te != strength);
        let (field, path) = match (&r.name, &r.path) {
            (Some(name), None) => (format!("loras[{i}].name"), self.by_name(i, name)?),
            (None, Some(path)) => (format!("loras[{i}].path"), self.by_path(i, path)?),
            _ => return Err(ApiError::invalid(format!("loras[{i}]"), "give exactly one of `name` or `path`")),
        };
        let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        if path.extension().and_then(|e| e.to_str()) != Some("safetensors") {
            return Err(ApiError::invalid(field, "LoRAs must be .safetensors files"));
        }
        // The header is read now (no tensor data), so a corrupt or foreign file is a 400 at
        // submission rather than a failed job later.
        sd_lora::LoraAdapter::open(&path).map_err(|e| ApiError::invalid(field, e.to_string()))?;
        Ok(ResolvedLora { name, path, strength, text_encoder_strength })
    }

    fn no_folders(field: String) -> ApiError {
        ApiError::invalid(field, "this worker has no LoRA folder configured (start it with --lora-dir)")
    }

    fn by_name(&self, i: usize, name: &str) -> Result<PathBuf, ApiError> {
        let field = format!("loras[{i}].name");
        if self.folders.is_empty() {
            return Err(Self::no_folders(field));
        }
        let plain = !name.is_empty() && !name.contains(['/', '\\', '\0']) && name != "." && name != "..";
        if !plain {
            return Err(ApiError::invalid(field, format!("{name:?} is not a plain file name; use `path` for files in subfolders")));
        }
        let file = if name.ends_with(".safetensors") { name.to_string() } else { format!("{name}.safetensors") };
        for root in self.folders.roots() {
            if let Some(p) = self.confined(&root.join(&file)) {
                return Ok(p);
            }
        }
        Err(ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "lora_not_found",
            Some(field),
            format!("no LoRA named {name:?} in the allowed folders; GET /v1/models lists them"),
        ))
    }

    fn by_path(&self, i: usize, raw: &str) -> Result<PathBuf, ApiError> {
        let field = format!("loras[{i}].path");
        if self.folders.is_empty() {
            return Err(Self::no_folders(field));
        }
        let p = Path::new(raw);
        if raw.is_empty() || raw.contains('\0') {
            return Err(ApiError::invalid(field, "the path is empty"));
        }
        if p.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(ApiError::invalid(field, "`..` is not allowed in LoRA paths; give a path inside an allowed LoRA folder"));
        }
        let candidates: Vec<PathBuf> = if p.is_absolute() { vec![p.to_path_buf()] } else { self.folders.roots().iter().map(|r| r.join(p)).collect() };
        for c in &candidates {
            if let Some(found) = self.confined(c) {
                return Ok(found);
            }
        }
        if p.is_absolute() && !candidates.iter().any(|c| self.folders.confine(c).is_some()) {
            return Err(ApiError::invalid(field, "the path is outside the allowed LoRA folders"));
        }
        Err(ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "lora_not_found",
            Some(field),
            format!("no LoRA file at {raw:?} inside the allowed folders; GET /v1/models lists them"),
        ))
    }

    /// The canonical path of `candidate` if it is an existing file inside an allowed folder.
    fn confined(&self, candidate: &Path) -> Option<PathBuf> {
        self.folders.confine(candidate).filter(|c| c.is_file())
    }

    /// Every `.safetensors` file in the folders (three levels deep), sorted by name.
    pub fn list(&self) -> Vec<AvailableLora> {
        let mut out: Vec<AvailableLora> = self
            .folders
            .walk(3, usize::MAX, &|_| false)
            .into_iter()
            .filter(|f| f.path.extension().and_then(|e| e.to_str()) == Some("safetensors"))
            .map(|f| AvailableLora { name: f.stem(), path: f.relative })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name).then(a.path.cmp(&b.path)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sd-worker-lora-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("loras/sub")).expect("temp dir");
        let lora = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/lora/sd15_kohya.safetensors")).expect("fixture");
        std::fs::write(d.join("loras/a.safetensors"), &lora).expect("write");
        std::fs::write(d.join("loras/sub/b.safetensors"), &lora).expect("write");
        std::fs::write(d.join("loras/corrupt.safetensors"), b"x").expect("write");
        std::fs::write(d.join("secret.safetensors"), &lora).expect("write");
        d
    }

    fn req(name: Option<&str>, path: Option<&str>) -> LoraRequest {
        LoraRequest { name: name.map(Into::into), path: path.map(Into::into), strength: None, text_encoder_strength: None }
    }

    #[test]
    fn resolves_inside_and_rejects_escapes() {
        let d = tmp("esc");
        let f = LoraFolders::new(&[d.join("loras")]);
        assert_eq!(f.resolve_all(&[req(Some("a"), None)]).expect("a")[0].name, "a");
        assert_eq!(f.resolve_all(&[req(None, Some("sub/b.safetensors"))]).expect("b")[0].name, "b");
        let err = f.resolve_all(&[req(None, Some("../secret.safetensors"))]).expect_err("dotdot");
        assert_eq!(err.field.as_deref(), Some("loras[0].path"));
        let abs = d.join("secret.safetensors").to_string_lossy().into_owned();
        let err = f.resolve_all(&[req(None, Some(&abs))]).expect_err("abs");
        assert_eq!(err.status, axum::http::StatusCode::BAD_REQUEST);
        let err = f.resolve_all(&[req(Some("../secret"), None)]).expect_err("name");
        assert_eq!(err.field.as_deref(), Some("loras[0].name"));
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(d.join("secret.safetensors"), d.join("loras/link.safetensors")).expect("symlink");
            assert!(f.resolve_all(&[req(Some("link"), None)]).is_err());
            assert!(f.list().iter().all(|l| l.name != "link"));
        }
        // A file that is not a LoRA is refused when the request is validated, naming the field.
        let err = f.resolve_all(&[req(Some("a"), None), req(Some("corrupt"), None)]).expect_err("corrupt");
        assert_eq!(err.field.as_deref(), Some("loras[1].name"));
        let names: Vec<String> = f.list().into_iter().map(|l| l.name).collect();
        assert_eq!(names, ["a", "b", "corrupt"]);
        let bad = LoraRequest { name: Some("a".into()), path: None, strength: Some(f64::NAN), text_encoder_strength: None };
        assert_eq!(f.resolve_all(&[bad]).expect_err("nan").field.as_deref(), Some("loras[0].strength"));
        let _ = std::fs::remove_dir_all(&d);
    }
}
