//! ESRGAN-family upscaler models from `--upscaler-dir` (A1111's `models/ESRGAN` and `models/RealESRGAN`):
//! listed by file stem at `/sdapi/v1/upscalers`, named by `hr_upscaler` and the extras routes' `upscaler_1/2`.
//! Names resolve only against the listed files (canonicalized inside the folders), never as paths.

use std::path::PathBuf;

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
        let mut out: Vec<AvailableUpscaler> = self
            .files()
            .into_iter()
            .map(|f| {
                let scale = sd_models::esrgan::RrdbNet::inspect(&f.canonical).ok().map(|c| c.scale());
                AvailableUpscaler { name: listed_name(&f.stem()), path: f.relative, scale }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name).then(a.path.cmp(&b.path)));
        out
    }

    /// The model files, in the folders' order and sorted within each.
    fn files(&self) -> Vec<crate::folders::Found> {
        self.folders.walk(2, usize::MAX, &|_| false).into_iter().filter(|f| EXTENSIONS.contains(&f.extension().as_str())).collect()
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
        let found = self.files().into_iter().find(|f| f.stem().eq_ignore_ascii_case(wanted))?;
        sd_models::esrgan::RrdbNet::inspect(&found.canonical).ok()?;
        Some(sd_pipelines::hires::EsrganUpscaler { name: listed_name(&found.stem()), path: found.canonical, net: None })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

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
