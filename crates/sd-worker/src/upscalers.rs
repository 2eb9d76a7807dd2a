//! ESRGAN-family upscaler models from `--upscaler-dir` (A1111's `models/ESRGAN` and `models/RealESRGAN`):
//! listed by file stem at `/sdapi/v1/upscalers`, named by `hr_upscaler` and the extras routes' `upscaler_1/2`.
//! Names resolve only against the listed files (canonicalized inside the folders), never as paths.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::folders::AllowedFolders;

/// Upscaler file extensions.
const EXTENSIONS: [&str; 4] = ["pth", "pt", "safetensors", "bin"];

/// A1111's names for the Real-ESRGAN models it downloads itself, and their files' stems: clients (webuiapi's
/// `HiResUpscaler`) send these names, and the files keep their release names in the folder.
const A1111_NAMES: [(&str, &str); 3] =
    [("R-ESRGAN 4x+", "RealESRGAN_x4plus"), ("R-ESRGAN 4x+ Anime6B", "RealESRGAN_x4plus_anime_6B"), ("R-ESRGAN 2x+", "RealESRGAN_x2plus")];

/// The name a file is listed by: A1111's for its known Real-ESRGAN releases, else the file stem.
fn listed_name(stem: &str) -> String {
    A1111_NAMES.iter().find(|(_, s)| s.eq_ignore_ascii_case(stem)).map_or_else(|| stem.to_string(), |(n, _)| n.to_string())
}

/// An upscaler model found in the folders.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AvailableUpscaler {
    /// The name requests use (file stem).
    pub name: String,
    /// Path relative to its folder.
    pub path: String,
    /// Scale factor read from the weights' shapes (`None` when the file is not an RRDBNet).
    pub scale: Option<usize>,
}

/// The canonical upscaler folders.
#[derive(Debug, Clone, Default)]
pub struct UpscalerFolders {
    folders: AllowedFolders,
}

impl UpscalerFolders {
    /// Canonicalizes `dirs` (missing ones are skipped with a warning).
    pub fn new(dirs: &[PathBuf]) -> Self {
        Self { folders: AllowedFolders::new(dirs, "upscaler") }
    }

    /// Whether no folder is configured.
    pub fn is_empty(&self) -> bool {
        self.folders.is_empty()
    }

    /// Every model file in the folders (two levels deep), by name.
    pub fn list(&self) -> Vec<AvailableUpscaler> {
        let mut out = Vec::new();
        for root in self.folders.roots() {
            self.walk(root, root, 0, &mut out);
        }
        out.sort_by(|a, b| a.name.cmp(&b.name).then(a.path.cmp(&b.path)));
        out
    }

    fn walk(&self, root: &Path, dir: &Path, depth: usize, out: &mut Vec<AvailableUpscaler>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let p = e.path();
            let Some(canonical) = self.folders.confine(&p) else { continue };
            if canonical.is_dir() {
                if depth < 2 {
                    self.walk(root, &p, depth + 1, out);
                }
            } else if p.extension().and_then(|e| e.to_str()).is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str())) {
                let name = listed_name(&p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default());
                let rel = p.strip_prefix(root).unwrap_or(&p).to_string_lossy().replace('\\', "/");
                let scale = sd_models::esrgan::RrdbNet::inspect(&canonical).ok().map(|c| c.scale());
                out.push(AvailableUpscaler { name, path: rel, scale });
            }
        }
    }

    /// The model file a request names (its file stem, any case, or A1111's name for a Real-ESRGAN release),
    /// canonical and inside the folders, and an RRDBNet (checked from its shapes, so a foreign file is refused
    /// when the request is validated).
    pub fn resolve(&self, name: &str) -> Option<sd_pipelines::hires::EsrganUpscaler> {
        let name = name.trim();
        let wanted = A1111_NAMES.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map_or(name, |(_, stem)| *stem);
        if wanted.is_empty() {
            return None;
        }
        let mut found = None;
        for root in self.folders.roots() {
            self.find(root, wanted, 0, &mut found);
            if found.is_some() {
                break;
            }
        }
        let (stem, path) = found?;
        sd_models::esrgan::RrdbNet::inspect(&path).ok()?;
        Some(sd_pipelines::hires::EsrganUpscaler { name: listed_name(&stem), path, net: None })
    }

    fn find(&self, dir: &Path, wanted: &str, depth: usize, found: &mut Option<(String, PathBuf)>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for p in paths {
            if found.is_some() {
                return;
            }
            let Some(canonical) = self.folders.confine(&p) else { continue };
            if canonical.is_dir() {
                if depth < 2 {
                    self.find(&p, wanted, depth + 1, found);
                }
                continue;
            }
            let ext_ok = p.extension().and_then(|e| e.to_str()).is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()));
            let stem = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            if ext_ok && stem.eq_ignore_ascii_case(wanted) {
                *found = Some((stem, canonical));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upscalers_are_listed_with_their_scale_and_resolve_only_inside() {
        let d = std::env::temp_dir().join(format!("sd-worker-upscalers-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("ups/sub")).expect("dir");
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/esrgan");
        let first = std::fs::read_dir(&fixtures).expect("fixtures").flatten().map(|e| e.path()).find(|p| p.extension().is_some_and(|e| e == "pth"));
        let first = first.expect("an ESRGAN fixture");
        std::fs::copy(&first, d.join("ups/sub/4x-Tiny.pth")).expect("copy");
        std::fs::copy(&first, d.join("outside.pth")).expect("copy");
        let f = UpscalerFolders::new(&[d.join("ups")]);
        let list = f.list();
        assert_eq!(list.len(), 1, "{list:?}");
        assert_eq!((list[0].name.as_str(), list[0].path.as_str()), ("4x-Tiny", "sub/4x-Tiny.pth"));
        assert!(list[0].scale.is_some());
        assert_eq!(f.resolve("4x-tiny").map(|u| u.name), Some("4x-Tiny".to_string()));
        // A1111's names for the Real-ESRGAN releases find the files by their release names.
        std::fs::copy(&first, d.join("ups/RealESRGAN_x4plus.pth")).expect("copy");
        assert_eq!(f.resolve("R-ESRGAN 4x+").map(|u| u.name), Some("R-ESRGAN 4x+".to_string()));
        assert!(f.list().iter().any(|u| u.name == "R-ESRGAN 4x+" && u.path == "RealESRGAN_x4plus.pth"));
        // A file that is not an RRDBNet is neither listed with a scale nor resolvable.
        std::fs::write(d.join("ups/broken.pth"), b"not a pickle").expect("write");
        assert!(f.resolve("broken").is_none());
        for bad in ["outside", "../outside", "", "sub/4x-Tiny"] {
            assert!(f.resolve(bad).is_none(), "{bad}");
        }
        let _ = std::fs::remove_dir_all(&d);
    }
}
