//! Folders requests may take model files from (LoRAs, ControlNets), canonicalized once at startup,
//! and the one confinement check both use: a candidate is canonicalized (resolving symlinks and
//! `..`) and must still lie under a canonicalized allowed folder.

use std::path::{Path, PathBuf};

/// Canonicalized allowed folders (missing ones are dropped with a warning).
#[derive(Debug, Clone, Default)]
pub struct AllowedFolders {
    roots: Vec<PathBuf>,
}

impl AllowedFolders {
    /// Canonicalizes `dirs`; folders that do not exist or are not directories are skipped and
    /// logged as `what` folders ("LoRA", "ControlNet").
    pub fn new(dirs: &[PathBuf], what: &str) -> Self {
        let mut roots = Vec::new();
        for d in dirs {
            match d.canonicalize() {
                Ok(c) if c.is_dir() => roots.push(c),
                Ok(_) => tracing::warn!(path = %d.display(), "{what} folder is not a directory; ignored"),
                Err(e) => tracing::warn!(path = %d.display(), error = %e, "{what} folder cannot be opened; ignored"),
            }
        }
        Self { roots }
    }

    /// Whether no folder is configured.
    pub fn is_empty(&self) -> bool {
        self.roots.is_empty()
    }

    /// The canonical folders, in the configured order.
    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    /// Whether the already canonical path lies inside an allowed folder.
    pub fn contains(&self, canonical: &Path) -> bool {
        self.roots.iter().any(|r| canonical.starts_with(r))
    }

    /// The path of an already canonical `canonical` relative to the first allowed folder holding it.
    pub fn relative(&self, canonical: &Path) -> Option<PathBuf> {
        self.roots.iter().find_map(|r| canonical.strip_prefix(r).ok().map(Path::to_path_buf))
    }

    /// The canonical form of `candidate` if it exists and lies inside an allowed folder.
    pub fn confine(&self, candidate: &Path) -> Option<PathBuf> {
        let c = candidate.canonicalize().ok()?;
        self.contains(&c).then_some(c)
    }
}
