//! Where the parts of a model split over several files are: ComfyUI users keep a diffusion-model file in
//! `models/diffusion_models/` (or `unet/`) with its text encoders in the sibling `text_encoders/` (or `clip/`)
//! and its autoencoder in `vae/`; others put every file in one folder. The families that load such split
//! files (SD 3.x, FLUX.2 [klein], Z-Image) find them here the same way.

use std::path::{Path, PathBuf};

/// Where one component's weights are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// A diffusers / transformers component folder (`config.json` and weights).
    Folder(PathBuf),
    /// A `.safetensors` file, its tensors under `prefix` (empty for a file of one component).
    File {
        /// The file.
        path: PathBuf,
        /// The prefix of the component's tensor names.
        prefix: String,
    },
}

impl Part {
    /// The folder or file.
    pub fn path(&self) -> &Path {
        match self {
            Part::Folder(p) | Part::File { path: p, .. } => p,
        }
    }

    /// A whole-file part, or a folder part when `path` is a folder.
    pub fn of(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        if path.is_dir() {
            Part::Folder(path)
        } else {
            Part::File { path, prefix: String::new() }
        }
    }
}

/// The folders searched for the text encoders and for the autoencoder of the model file `model`: its own
/// folder, then ComfyUI's siblings (`../text_encoders`, `../clip`; `../vae`).
pub fn sibling_dirs(model: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let parent = model.parent().map(Path::to_path_buf).unwrap_or_default();
    let up = parent.parent().map(Path::to_path_buf).unwrap_or_default();
    (vec![parent.clone(), up.join("text_encoders"), up.join("clip")], vec![parent, up.join("vae")])
}

/// The first `.safetensors` file (by name) in `dirs`, other than `skip`, whose lower-case file stem
/// satisfies `pick`.
pub fn find_sibling(dirs: &[PathBuf], skip: &Path, pick: &dyn Fn(&str) -> bool) -> Option<PathBuf> {
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        let mut files: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        files.sort();
        if let Some(f) = files.into_iter().find(|f| {
            f.is_file()
                && f.as_path() != skip
                && f.extension().is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
                && f.file_stem().is_some_and(|s| pick(&s.to_string_lossy().to_ascii_lowercase()))
        }) {
            return Some(f);
        }
    }
    None
}

/// Counts the numbered blocks `{prefix}N.` among `names` (one more than the highest `N`).
pub fn count_blocks<'a>(names: impl IntoIterator<Item = &'a str>, prefix: &str) -> usize {
    names
        .into_iter()
        .filter_map(|n| n.strip_prefix(prefix)?.split('.').next()?.parse::<usize>().ok())
        .map(|i| i + 1)
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_counted_by_their_highest_index() {
        let names = ["double_blocks.0.a", "double_blocks.11.b", "double_blocksX.3", "single_blocks.2.c"];
        assert_eq!(count_blocks(names, "double_blocks."), 12);
        assert_eq!(count_blocks(names, "single_blocks."), 3);
        assert_eq!(count_blocks(names, "final_layer."), 0);
    }

    #[test]
    fn comfy_sibling_folders_are_searched() {
        let (enc, vae) = sibling_dirs(Path::new("/m/diffusion_models/x.safetensors"));
        assert_eq!(enc, vec![PathBuf::from("/m/diffusion_models"), PathBuf::from("/m/text_encoders"), PathBuf::from("/m/clip")]);
        assert_eq!(vae, vec![PathBuf::from("/m/diffusion_models"), PathBuf::from("/m/vae")]);
    }
}
