//! A validated [`JobSpec`] as JSON, for queue mode: the front that validated a request puts it in
//! the stream, and the worker that takes it rebuilds the spec.
//!
//! Images travel as lossless PNGs. Model files travel as paths relative to the allowed folder that
//! holds them and are resolved again inside the taking worker's own folders, so a stream entry can
//! never make a worker open a file outside its configured folders.

use std::io::Cursor;

use image::DynamicImage;
use sd_pipelines::pipeline::{GenerationParams, NoiseKind};
use sd_pipelines::schedulers::{Sampler, SigmaSchedule};
use serde::{Deserialize, Serialize};

use crate::controlnet::{ControlNetFolders, ResolvedControlNet};
use crate::error::JobError;
use crate::jobs::{JobSpec, Operation};
use crate::lora::{LoraFolders, LoraRequest};
use sd_pipelines::hires::{HiresFix, HiresUpscaler};

use crate::upscalers::UpscalerFolders;

/// The JSON form of a [`JobSpec`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireSpec {
    /// `image_generation`, `image_transform` or `image_inpaint`.
    pub operation: String,
    /// Base64 PNG of the input image (img2img, inpaint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Base64 PNG of the mask (inpaint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<String>,
    /// Strength (img2img, inpaint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strength: Option<f64>,
    /// Base64 PNGs of an edit's reference images.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<String>,
    /// The generation parameters.
    pub params: WireParams,
    /// LoRAs by path relative to their folder.
    pub loras: Vec<WireLora>,
    /// ControlNets with their already preprocessed pictures.
    pub controlnets: Vec<WireControlNet>,
    /// Hires fix of a generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hires: Option<WireHires>,
    /// An interrupted run returns its last step's images (A1111 routes).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub partial_on_cancel: bool,
    /// The model's key (a `--models-dir` name); empty: the worker's own model.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub model: String,
    /// A `--vae-dir` VAE by name (found in the worker's own folders).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vae: Option<String>,
}

/// [`HiresFix`] as JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireHires {
    /// Target width.
    pub width: usize,
    /// Target height.
    pub height: usize,
    /// A1111 upscaler name.
    pub upscaler: String,
    /// Second-pass steps.
    #[serde(default)]
    pub steps: Option<usize>,
    /// Denoising strength.
    pub strength: f64,
}

/// [`GenerationParams`] as JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireParams {
    /// Prompt.
    pub prompt: String,
    /// Negative prompt.
    pub negative_prompt: String,
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Steps.
    pub steps: usize,
    /// Guidance scale.
    pub guidance_scale: f64,
    /// Seed.
    pub seed: u64,
    /// Images per job.
    pub batch_size: usize,
    /// Sampler id (`dpmpp_2m`, …).
    pub sampler: String,
    /// Forced sigma schedule, if any.
    pub schedule: Option<String>,
    /// Clip skip.
    pub clip_skip: usize,
    /// `philox`, `torch`, `a1111-cpu` or `a1111-nv`.
    pub noise: String,
    /// A1111 variation seed and its strength.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variation: Option<(u64, f32)>,
    /// A1111 eta noise seed delta.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub eta_noise_seed_delta: u64,
    /// A1111's "resize seed from" (height, width).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed_resize_from: Option<(usize, usize)>,
    /// Skip-layer guidance (SD 3.x).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip_layer_guidance: Option<WireSkipLayerGuidance>,
}

/// [`sd_core::run::SkipLayerGuidance`] as JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireSkipLayerGuidance {
    /// Blocks left out of the extra call.
    pub layers: Vec<usize>,
    /// Its weight.
    pub scale: f64,
    /// Start fraction of the steps.
    pub start: f64,
    /// Stop fraction of the steps.
    pub stop: f64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// One LoRA.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireLora {
    /// Path relative to the allowed folder holding it.
    pub path: String,
    /// Strength.
    pub strength: f64,
    /// Text encoders' strength, when it differs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_encoder_strength: Option<f64>,
}

/// One ControlNet unit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireControlNet {
    /// Display name.
    pub name: String,
    /// Path relative to the allowed folder holding it.
    pub path: String,
    /// Base64 PNG of the preprocessed control picture.
    pub image: String,
    /// Preprocessor name (for the infotext).
    pub preprocessor: String,
    /// Scale.
    pub scale: f64,
    /// Start fraction.
    pub start: f64,
    /// End fraction.
    pub end: f64,
}

fn png_b64(img: &DynamicImage) -> Result<String, String> {
    let mut buf = Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png).map_err(|e| format!("cannot encode an input image as PNG: {e}"))?;
    Ok(crate::engine::b64(buf.get_ref()))
}

fn bad(field: &str, message: impl Into<String>) -> JobError {
    JobError { code: "invalid_request", message: message.into(), field: Some(field.to_string()) }
}

fn image_from(field: &str, b64: &str) -> Result<DynamicImage, JobError> {
    let bytes = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64.as_bytes())
        .map_err(|e| bad(field, format!("the queued image is not base64: {e}")))?;
    image::load_from_memory_with_format(&bytes, image::ImageFormat::Png).map_err(|e| bad(field, format!("the queued image is not a PNG: {e}")))
}

impl WireSpec {
    /// Encodes `spec`; `loras` and `controlnets` give each file's path relative to its folder.
    pub fn encode(spec: &JobSpec, loras: &LoraFolders, controlnets: &ControlNetFolders) -> Result<Self, String> {
        let p = &spec.params;
        let (image, mask, strength) = match &spec.operation {
            Operation::Generation | Operation::Edit { .. } => (None, None, None),
            Operation::Transform { image, strength } => (Some(png_b64(image)?), None, Some(*strength)),
            Operation::Inpaint { image, mask, strength } => (Some(png_b64(image)?), Some(png_b64(mask)?), Some(*strength)),
        };
        let images = match &spec.operation {
            Operation::Edit { images } => images.iter().map(png_b64).collect::<Result<Vec<_>, _>>()?,
            _ => Vec::new(),
        };
        let relative = |rel: Option<std::path::PathBuf>, what: &str, name: &str| {
            rel.map(|r| r.to_string_lossy().into_owned()).ok_or_else(|| format!("the {what} {name:?} is not inside an allowed folder"))
        };
        let wire_loras = spec
            .loras
            .iter()
            .map(|l| Ok(WireLora { path: relative(loras.relative(&l.path), "LoRA", &l.name)?, strength: l.strength, text_encoder_strength: l.text_encoder_strength }))
            .collect::<Result<Vec<_>, String>>()?;
        let wire_controlnets = spec
            .controlnets
            .iter()
            .map(|c| {
                Ok(WireControlNet {
                    name: c.name.clone(),
                    path: relative(controlnets.relative(&c.path), "ControlNet", &c.name)?,
                    image: png_b64(&c.image)?,
                    preprocessor: c.preprocessor_name.clone(),
                    scale: c.scale,
                    start: c.start,
                    end: c.end,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let hires = spec.hires.as_ref().map(|h| WireHires {
            width: h.width,
            height: h.height,
            upscaler: h.upscaler_name().to_string(),
            steps: h.steps,
            strength: h.strength,
        });
        Ok(Self {
            operation: spec.operation.name().to_string(),
            image,
            mask,
            strength,
            images,
            hires,
            partial_on_cancel: spec.partial_on_cancel,
            model: spec.model.clone(),
            vae: spec.vae.clone(),
            params: WireParams {
                prompt: p.prompt.clone(),
                negative_prompt: p.negative_prompt.clone(),
                width: p.width,
                height: p.height,
                steps: p.steps,
                guidance_scale: p.guidance_scale,
                seed: p.seed,
                batch_size: p.batch_size,
                sampler: p.sampler.kind.id().to_string(),
                schedule: p.sampler.schedule.map(|s| s.as_str().to_string()),
                clip_skip: p.clip_skip,
                noise: p.noise.name().to_string(),
                variation: p.variation.map(|v| (v.subseed, v.strength)),
                eta_noise_seed_delta: p.eta_noise_seed_delta,
                seed_resize_from: p.seed_resize_from,
                skip_layer_guidance: p
                    .skip_layer_guidance
                    .as_ref()
                    .map(|g| WireSkipLayerGuidance { layers: g.layers.clone(), scale: g.scale, start: g.start, stop: g.stop }),
            },
            loras: wire_loras,
            controlnets: wire_controlnets,
        })
    }

    /// Rebuilds the spec, resolving every file inside this worker's own folders (a file missing
    /// here fails the job naming the field).
    pub fn decode(self, loras: &LoraFolders, controlnets: &ControlNetFolders, upscalers: &UpscalerFolders) -> Result<JobSpec, JobError> {
        let p = self.params;
        let mut sampler: Sampler = p.sampler.parse().map_err(|e: sd_core::Error| bad("sampler", e.to_string()))?;
        if let Some(s) = &p.schedule {
            sampler.schedule = Some(s.parse().map_err(|e: sd_core::Error| bad("schedule", e.to_string()))?);
        }
        if sampler.schedule == Some(SigmaSchedule::Default) {
            sampler.schedule = None;
        }
        let noise = p.noise.parse::<NoiseKind>().map_err(|e| bad("noise", e.to_string()))?;
        let params = GenerationParams {
            prompt: p.prompt,
            negative_prompt: p.negative_prompt,
            width: p.width,
            height: p.height,
            steps: p.steps,
            guidance_scale: p.guidance_scale,
            seed: p.seed,
            batch_size: p.batch_size,
            sampler,
            clip_skip: p.clip_skip,
            vae_tiling: None,
            noise,
            max_sequence_length: None,
            variation: p.variation.map(|(subseed, strength)| sd_core::run::Variation { subseed, strength }),
            eta_noise_seed_delta: p.eta_noise_seed_delta,
            seed_resize_from: p.seed_resize_from,
            skip_layer_guidance: p.skip_layer_guidance.map(|g| sd_core::run::SkipLayerGuidance { layers: g.layers, scale: g.scale, start: g.start, stop: g.stop }),
        };
        let strength = || self.strength.ok_or_else(|| bad("strength", "missing from the queued job"));
        let image = || image_from("image", self.image.as_deref().unwrap_or_default());
        let operation = match self.operation.as_str() {
            "image_generation" => Operation::Generation,
            "image_transform" => Operation::Transform { image: image()?, strength: strength()? },
            "image_inpaint" => Operation::Inpaint { image: image()?, mask: image_from("mask_image", self.mask.as_deref().unwrap_or_default())?, strength: strength()? },
            "image_edit" => Operation::Edit {
                images: self.images.iter().enumerate().map(|(i, b)| image_from(&format!("images[{i}]"), b)).collect::<Result<Vec<_>, _>>()?,
            },
            other => return Err(bad("operation", format!("unknown operation {other:?} in the queued job"))),
        };
        let requests: Vec<LoraRequest> = self.loras.iter().map(|l| LoraRequest { name: None, path: Some(l.path.clone()), strength: Some(l.strength), text_encoder_strength: l.text_encoder_strength }).collect();
        let resolved = loras.resolve_all(&requests).map_err(|e| JobError { code: "invalid_lora", message: e.message, field: e.field })?;
        let mut units = Vec::with_capacity(self.controlnets.len());
        for (i, c) in self.controlnets.into_iter().enumerate() {
            let field = format!("controlnets[{i}].model");
            let path = controlnets.resolve_model(&field, &c.path).map_err(|e| JobError { code: "invalid_controlnet", message: e.message, field: e.field })?;
            units.push(ResolvedControlNet {
                name: c.name,
                path,
                image: image_from(&format!("controlnets[{i}].image"), &c.image)?,
                preprocessor_name: c.preprocessor,
                scale: c.scale,
                start: c.start,
                end: c.end,
            });
        }
        let hires = match self.hires {
            None => None,
            Some(h) => {
                // A model upscaler travels by name and is found in this worker's own upscaler folders.
                let esrgan = match h.upscaler.parse::<HiresUpscaler>() {
                    Ok(_) => None,
                    Err(_) => Some(upscalers.resolve(&h.upscaler).ok_or_else(|| bad("hr_upscaler", format!("no upscaler {:?} in this worker's --upscaler-dir folders", h.upscaler)))?),
                };
                let upscaler = if esrgan.is_some() { HiresUpscaler::Esrgan } else { h.upscaler.parse::<HiresUpscaler>().map_err(|e| bad("hr_upscaler", e.to_string()))? };
                Some(HiresFix { width: h.width, height: h.height, upscaler, steps: h.steps, strength: h.strength, esrgan })
            }
        };
        Ok(JobSpec { operation, params, loras: resolved, controlnets: units, hires, partial_on_cancel: self.partial_on_cancel, model: self.model.clone(), vae: self.vae.clone() })
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use image::{DynamicImage, RgbImage};
    use sd_pipelines::schedulers::SamplerKind;

    use super::*;
    use crate::lora::ResolvedLora;

    fn fixtures() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
    }

    fn picture(seed: u8) -> DynamicImage {
        DynamicImage::ImageRgb8(RgbImage::from_fn(24, 16, |x, y| image::Rgb([x as u8 * 9 + seed, y as u8 * 13, seed ^ 0x5a])))
    }

    #[test]
    fn a_spec_survives_the_queue_and_files_resolve_inside_the_folders() {
        let loras = LoraFolders::new(&[fixtures().join("lora")]);
        let controlnets = ControlNetFolders::new(&[fixtures().join("controlnet")]);
        let lora_path = fixtures().join("lora/sd15_kohya.safetensors").canonicalize().expect("lora");
        let cn_path = fixtures().join("controlnet/sd15").canonicalize().expect("controlnet");
        let spec = JobSpec {
            operation: Operation::Inpaint { image: picture(1), mask: picture(2), strength: 0.6 },
            params: GenerationParams {
                prompt: "a (cat:1.2)".into(),
                negative_prompt: "blurry".into(),
                width: 64,
                height: 48,
                steps: 7,
                guidance_scale: 6.5,
                seed: 9_007_199_254_740_991,
                batch_size: 2,
                sampler: Sampler::new(SamplerKind::DpmPp2m, SigmaSchedule::Karras),
                clip_skip: 2,
                vae_tiling: None,
                noise: NoiseKind::A1111Nv,
                max_sequence_length: None,
                variation: Some(sd_core::run::Variation { subseed: 77, strength: 0.25 }),
                eta_noise_seed_delta: 31337,
                seed_resize_from: Some((512, 768)),
                skip_layer_guidance: Some(sd_core::run::SkipLayerGuidance { layers: vec![7, 8, 9], scale: 3.0, start: 0.05, stop: 0.25 }),
            },
            loras: vec![ResolvedLora { name: "sd15_kohya".into(), path: lora_path.clone(), strength: -0.5, text_encoder_strength: Some(0.25) }],
            hires: Some(HiresFix { width: 128, height: 96, upscaler: HiresUpscaler::LatentNearest, steps: Some(9), strength: 0.55, esrgan: None }),
            partial_on_cancel: true,
            model: "xl/other".into(),
            vae: Some("xl-vae".into()),
            controlnets: vec![ResolvedControlNet {
                name: "sd15".into(),
                path: cn_path.clone(),
                image: picture(3),
                preprocessor_name: "canny".into(),
                scale: 0.8,
                start: 0.1,
                end: 0.9,
            }],
        };
        let wire = WireSpec::encode(&spec, &loras, &controlnets).expect("encode");
        assert_eq!(wire.loras[0].path, "sd15_kohya.safetensors", "paths travel relative to their folder");
        let text = serde_json::to_string(&wire).expect("json");
        let back = serde_json::from_str::<WireSpec>(&text).expect("parse").decode(&loras, &controlnets, &UpscalerFolders::default()).expect("decode");
        let (p, q) = (&spec.params, &back.params);
        assert_eq!((&p.prompt, &p.negative_prompt, p.width, p.height, p.steps), (&q.prompt, &q.negative_prompt, q.width, q.height, q.steps));
        assert_eq!((p.guidance_scale, p.seed, p.batch_size, p.sampler, p.clip_skip, p.noise), (q.guidance_scale, q.seed, q.batch_size, q.sampler, q.clip_skip, q.noise));
        assert_eq!((p.variation, p.eta_noise_seed_delta, p.seed_resize_from), (q.variation, q.eta_noise_seed_delta, q.seed_resize_from));
        assert_eq!(p.skip_layer_guidance, q.skip_layer_guidance, "skip-layer guidance travels");
        match (&spec.operation, &back.operation) {
            (Operation::Inpaint { image: a, mask: m, strength: s }, Operation::Inpaint { image: b, mask: n, strength: t }) => {
                assert_eq!(a.to_rgb8(), b.to_rgb8(), "images travel losslessly");
                assert_eq!(m.to_rgb8(), n.to_rgb8());
                assert_eq!(s, t);
            }
            other => panic!("operation changed: {other:?}"),
        }
        assert_eq!(back.loras, spec.loras);
        assert_eq!(back.hires, spec.hires, "the hires fix travels");
        assert_eq!(back.model, "xl/other", "the model travels");
        assert_eq!(back.vae.as_deref(), Some("xl-vae"), "the VAE travels");
        let (c, d) = (&spec.controlnets[0], &back.controlnets[0]);
        assert_eq!((&c.path, &c.preprocessor_name, c.scale, c.start, c.end), (&d.path, &d.preprocessor_name, d.scale, d.start, d.end));
        assert_eq!(c.image.to_rgb8(), d.image.to_rgb8());

        // A worker without the file (or whose folders do not hold it) fails the job naming the field.
        let elsewhere = LoraFolders::new(&[fixtures().join("controlnet")]);
        let e = serde_json::from_str::<WireSpec>(&text).expect("parse").decode(&elsewhere, &controlnets, &UpscalerFolders::default()).expect_err("missing LoRA");
        assert_eq!((e.code, e.field.as_deref()), ("invalid_lora", Some("loras[0].path")));
        let mut escape: WireSpec = serde_json::from_str(&text).expect("parse");
        escape.loras[0].path = "../lora/sd15_kohya.safetensors".into();
        assert!(escape.decode(&elsewhere, &controlnets, &UpscalerFolders::default()).is_err(), "`..` never leaves the folders");
        let mut escape: WireSpec = serde_json::from_str(&text).expect("parse");
        escape.controlnets[0].path = "/etc".into();
        let e = escape.decode(&loras, &controlnets, &UpscalerFolders::default()).expect_err("absolute ControlNet path");
        assert_eq!(e.field.as_deref(), Some("controlnets[0].model"));
    }
}
