//! ControlNet requests: models resolved strictly inside the configured ControlNet folders, control
//! images decoded and parameters checked before a job is queued.
//!
//! A ControlNet is a diffusers folder (with `config.json`) or a single `.safetensors` file, confined
//! to the allowed folders by [`crate::folders::AllowedFolders`] as LoRA paths are.

use std::path::{Component, Path, PathBuf};

use image::DynamicImage;
use sd_controlnet::hook::MAX_CONDITIONING_SCALE;
use sd_controlnet::preprocess::Preprocessor;
use sd_controlnet::ControlNetModel;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::folders::AllowedFolders;
use crate::request::decode_image;

/// Most ControlNets one request may stack.
pub const MAX_CONTROLNETS: usize = 4;

/// One ControlNet as a request names it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlNetRequest {
    /// Folder name or `.safetensors` file (stem or relative path) inside an allowed ControlNet folder.
    pub model: Option<String>,
    /// Control image, base64 PNG or JPEG (resized to the generation size).
    pub image: Option<String>,
    /// `none` (default), `canny`, `threshold`, `scribble` or `softedge`.
    pub preprocessor: Option<String>,
    /// Conditioning scale, 0–2 (default 1).
    pub scale: Option<f64>,
    /// Fraction of the schedule where the ControlNet starts acting (default 0).
    pub start: Option<f64>,
    /// Fraction of the schedule after which it stops (default 1).
    pub end: Option<f64>,
    /// Canny lower threshold (with `preprocessor: canny`; default 100).
    pub low_threshold: Option<f32>,
    /// Canny upper threshold (with `preprocessor: canny`; default 200).
    pub high_threshold: Option<f32>,
}

/// How an API names the ControlNet list and its fields, so errors name them as the client sent them.
#[derive(Debug, Clone, Copy)]
pub struct ControlNetNames {
    /// The list (`controlnets`).
    pub list: &'static str,
    /// Model.
    pub model: &'static str,
    /// Control image.
    pub image: &'static str,
    /// Preprocessor.
    pub preprocessor: &'static str,
    /// Conditioning scale.
    pub scale: &'static str,
    /// Start fraction.
    pub start: &'static str,
    /// End fraction.
    pub end: &'static str,
    /// Canny lower threshold.
    pub low: &'static str,
    /// Canny upper threshold.
    pub high: &'static str,
}

/// The native API's names.
pub const NATIVE_CONTROLNET_NAMES: ControlNetNames = ControlNetNames {
    list: "controlnets",
    model: "model",
    image: "image",
    preprocessor: "preprocessor",
    scale: "scale",
    start: "start",
    end: "end",
    low: "low_threshold",
    high: "high_threshold",
};

/// A validated ControlNet unit, ready for the engine.
#[derive(Debug, Clone)]
pub struct ResolvedControlNet {
    /// Display name (folder name or file stem).
    pub name: String,
    /// Canonical path of the folder or file.
    pub path: PathBuf,
    /// The control picture, already preprocessed (while the request was validated, off the
    /// engine thread and before the job was queued).
    pub image: DynamicImage,
    /// The preprocessor's name as requested (lower case).
    pub preprocessor_name: String,
    /// Conditioning scale.
    pub scale: f64,
    /// Start fraction.
    pub start: f64,
    /// End fraction.
    pub end: f64,
}

/// What the job parameters record about a unit.
#[derive(Debug, Clone, Serialize)]
pub struct ControlNetSummary {
    /// Name.
    pub model: String,
    /// Preprocessor as requested.
    pub preprocessor: String,
    /// Scale.
    pub scale: f64,
    /// Start fraction.
    pub start: f64,
    /// End fraction.
    pub end: f64,
}

/// A ControlNet found by listing the allowed folders.
#[derive(Debug, Clone, Serialize)]
pub struct AvailableControlNet {
    /// Name to request it by.
    pub name: String,
    /// `folder` or `file`.
    pub kind: &'static str,
}

/// The allowed ControlNet folders, canonicalized once at startup.
#[derive(Debug, Clone, Default)]
pub struct ControlNetFolders {
    folders: AllowedFolders,
}

impl ControlNetFolders {
    /// Canonicalizes `dirs`; folders that do not exist are skipped (and logged).
    pub fn new(dirs: &[PathBuf]) -> Self {
        Self { folders: AllowedFolders::new(dirs, "ControlNet") }
    }

    /// The canonical path of `candidate` if it is a ControlNet (folder with config.json, or
    /// `.safetensors` file) inside an allowed folder.
    fn confined(&self, candidate: &Path) -> Option<PathBuf> {
        self.folders.confine(candidate).filter(|c| {
            (c.is_dir() && c.join("config.json").is_file()) || (c.is_file() && c.extension().is_some_and(|e| e == "safetensors"))
        })
    }

    /// Resolves a request's `model` to a ControlNet inside the allowed folders.
    /// The canonical `path` relative to the allowed folder holding it (how queue mode names it).
    pub fn relative(&self, path: &Path) -> Option<PathBuf> {
        self.folders.relative(path)
    }

    /// The canonical path of the ControlNet `raw` names (a name or a relative path) inside an
    /// allowed folder; errors name `field`.
    pub fn resolve_model(&self, field: &str, raw: &str) -> Result<PathBuf, ApiError> {
        if self.folders.is_empty() {
            return Err(ApiError::invalid(field, "this worker has no ControlNet folder configured (start it with --controlnet-dir)"));
        }
        let p = Path::new(raw);
        if raw.trim().is_empty() || raw.contains('\0') {
            return Err(ApiError::invalid(field, "the ControlNet name is empty"));
        }
        if p.is_absolute() || p.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(ApiError::invalid(field, "give a name or relative path inside an allowed ControlNet folder (no `..`, no absolute paths)"));
        }
        for root in self.folders.roots() {
            let base = root.join(p);
            let with_ext = root.join(format!("{raw}.safetensors"));
            if let Some(found) = self.confined(&base).or_else(|| self.confined(&with_ext)) {
                return Ok(found);
            }
        }
        Err(ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "controlnet_not_found",
            Some(field.to_string()),
            format!("no ControlNet {raw:?} in the allowed folders; GET /v1/models lists them"),
        ))
    }

    /// Validates every unit of a request against the loaded UNet; each unit comes with its index
    /// in the client's list, and errors name the field as the client spelled it (`controlnets[1].scale` …).
    pub fn resolve_all(
        &self,
        reqs: &[(usize, ControlNetRequest)],
        names: &ControlNetNames,
        unet: Option<&sd_models::UNetConfig>,
    ) -> Result<Vec<ResolvedControlNet>, ApiError> {
        if reqs.len() > MAX_CONTROLNETS {
            return Err(ApiError::invalid(names.list, format!("{} ControlNets requested; at most {MAX_CONTROLNETS} may be stacked", reqs.len())));
        }
        if !reqs.is_empty() && unet.is_none() {
            return Err(ApiError::invalid(names.list, "ControlNets work with Stable Diffusion models; this worker serves FLUX"));
        }
        reqs.iter()
            .map(|(i, r)| {
                let f = |name: &str| format!("{}[{i}].{name}", names.list);
                let raw = r.model.as_deref().ok_or_else(|| ApiError::invalid(f(names.model), "missing; name a ControlNet from GET /v1/models"))?;
                let path = self.resolve_model(&f(names.model), raw)?;
                if let Some(unet) = unet {
                    ControlNetModel::inspect(&path, unet).map_err(|e| ApiError::invalid(f(names.model), e.to_string()))?;
                }
                let image = r.image.as_deref().ok_or_else(|| ApiError::invalid(f(names.image), "missing; send the control image as base64 PNG or JPEG"))?;
                let image = decode_image(&f(names.image), image)?;
                let preprocessor_name = r.preprocessor.as_deref().unwrap_or("none").trim().to_ascii_lowercase();
                let mut preprocessor: Preprocessor =
                    preprocessor_name.parse().map_err(|e: sd_controlnet::Error| ApiError::invalid(f(names.preprocessor), e.to_string()))?;
                if let Preprocessor::Canny { low, high } = preprocessor {
                    preprocessor = Preprocessor::Canny { low: r.low_threshold.unwrap_or(low), high: r.high_threshold.unwrap_or(high) };
                    preprocessor.validate().map_err(|e| {
                        let high = matches!(e, sd_controlnet::Error::InvalidInput { field: "canny high threshold", .. });
                        let field = if high { names.high } else { names.low };
                        ApiError::invalid(f(field), e.to_string())
                    })?;
                } else if r.low_threshold.is_some() || r.high_threshold.is_some() {
                    return Err(ApiError::invalid(f(names.low), "thresholds apply to the canny preprocessor only"));
                }
                let scale = r.scale.unwrap_or(1.0);
                if !scale.is_finite() || !(0.0..=MAX_CONDITIONING_SCALE).contains(&scale) {
                    return Err(ApiError::invalid(f(names.scale), format!("{scale} is outside 0..={MAX_CONDITIONING_SCALE}")));
                }
                let (start, end) = (r.start.unwrap_or(0.0), r.end.unwrap_or(1.0));
                if !start.is_finite() || !(0.0..1.0).contains(&start) {
                    return Err(ApiError::invalid(f(names.start), format!("{start} is outside [0, 1)")));
                }
                if !(end.is_finite() && end > start && end <= 1.0) {
                    return Err(ApiError::invalid(f(names.end), format!("{end} must be above start ({start}) and at most 1")));
                }
                let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                let image = preprocessor.apply(&image).map_err(|e| ApiError::invalid(f(names.preprocessor), e.to_string()))?;
                Ok(ResolvedControlNet { name, path, image, preprocessor_name, scale, start, end })
            })
            .collect()
    }

    /// Every ControlNet in the folders (folders with config.json and `.safetensors` files, one level deep).
    pub fn list(&self) -> Vec<AvailableControlNet> {
        let mut out = Vec::new();
        for root in self.folders.roots() {
            let Ok(entries) = std::fs::read_dir(root) else { continue };
            for e in entries.flatten() {
                let Some(c) = self.confined(&e.path()) else { continue };
                let kind = if c.is_dir() { "folder" } else { "file" };
                let name = e.path().file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                out.push(AvailableControlNet { name, kind });
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

impl ResolvedControlNet {
    /// What the job's parameters record.
    pub fn summary(&self) -> ControlNetSummary {
        ControlNetSummary {
            model: self.name.clone(),
            preprocessor: self.preprocessor_name.clone(),
            scale: self.scale,
            start: self.start,
            end: self.end,
        }
    }
}
