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

    /// Every file under the folders, and every folder `is_leaf` accepts (not walked into), down to
    /// `max_depth` levels below each folder: folders in the configured order, entries sorted, at most
    /// `max_entries` in all. Symlinks count only when they resolve inside an allowed folder.
    pub fn walk(&self, max_depth: usize, max_entries: usize, is_leaf: &dyn Fn(&Path) -> bool) -> Vec<Found> {
        let mut out = Vec::new();
        for root in &self.roots {
            self.walk_dir(root, root, 0, max_depth, max_entries, is_leaf, &mut out);
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn walk_dir(&self, root: &Path, dir: &Path, depth: usize, max_depth: usize, max: usize, is_leaf: &dyn Fn(&Path) -> bool, out: &mut Vec<Found>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for path in paths {
            if out.len() >= max {
                return;
            }
            let Some(canonical) = self.confine(&path) else { continue };
            if canonical.is_dir() && !is_leaf(&canonical) {
                if depth < max_depth {
                    self.walk_dir(root, &path, depth + 1, max_depth, max, is_leaf, out);
                }
                continue;
            }
            let relative = path.strip_prefix(root).unwrap_or(&path).to_string_lossy().replace('\\', "/");
            out.push(Found { path, canonical, relative });
        }
    }
}

/// A file (or leaf folder) [`AllowedFolders::walk`] found.
#[derive(Debug, Clone)]
pub struct Found {
    /// As reached through the folder (a symlink's own name).
    pub path: PathBuf,
    /// Canonical.
    pub canonical: PathBuf,
    /// Relative to its folder, with `/`.
    pub relative: String,
}

impl Found {
    /// The extension, lower-case.
    pub fn extension(&self) -> String {
        self.path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default()
    }

    /// The file stem.
    pub fn stem(&self) -> String {
        self.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
    }
}
