//! The OpenAI images API subset: `POST /v1/images/generations` and `POST /v1/images/edits`
//! (multipart as OpenAI defines it, or JSON with base64 images).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::header;
use axum::Json;
use image::{DynamicImage, GenericImageView, GrayImage, Luma};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::api::{blocking, body_bytes, run_sync, St};
use crate::server::Caller;
use crate::error::{body_rejection, ApiError};
use crate::jobs::{unix_now, JobResult};
use crate::request::{build_job, decode_base64, decode_image_bytes, from_value, parse_json_object, CommonInput, FieldNames, OpInput};
use crate::state::{AppState, ModelInfo};

const NAMES: FieldNames = FieldNames {
    width: "size",
    height: "size",
    steps: "steps",
    guidance: "guidance_scale",
    sampler: "sampler",
    schedule: "schedule",
    batch: "n",
    clip_skip: "clip_skip",
    strength: "strength",
    seed: "seed",
    controlnet: crate::controlnet::NATIVE_CONTROLNET_NAMES,
    hires: crate::request::NATIVE_NAMES.hires,
};

/// OpenAI's fields, plus the diffusion settings it lacks (`negative_prompt`, `steps`, …).
#[derive(Debug, Deserialize)]
struct ImagesRequest {
    prompt: Option<String>,
    n: Option<u64>,
    size: Option<String>,
    response_format: Option<String>,
    output_format: Option<String>,
    negative_prompt: Option<String>,
    steps: Option<u64>,
    seed: Option<i64>,
    guidance_scale: Option<f64>,
    sampler: Option<String>,
    schedule: Option<String>,
    clip_skip: Option<u64>,
    strength: Option<f64>,
}

fn parse_size(s: Option<&str>) -> Result<(Option<u64>, Option<u64>), ApiError> {
    match s.map(str::trim) {
        None | Some("") | Some("auto") => Ok((None, None)),
        Some(s) => {
            let (w, h) = s
                .split_once(['x', 'X', '×'])
                .ok_or_else(|| ApiError::invalid("size", format!("{s:?} is not WIDTHxHEIGHT (e.g. \"512x512\") or \"auto\"")))?;
            let p = |v: &str| v.trim().parse::<u64>().map_err(|_| ApiError::invalid("size", format!("{s:?} is not WIDTHxHEIGHT (e.g. \"512x512\")")));
            Ok((Some(p(w)?), Some(p(h)?)))
        }
    }
}

fn common(r: &ImagesRequest) -> Result<CommonInput, ApiError> {
    if let Some(f) = r.response_format.as_deref() {
        if f != "b64_json" {
            return Err(ApiError::invalid("response_format", format!("{f:?} is not supported; this worker returns images inline: use \"b64_json\"")));
        }
    }
    if let Some(f) = r.output_format.as_deref() {
        if f != "png" {
            return Err(ApiError::invalid("output_format", format!("{f:?} is not supported; use \"png\"")));
        }
    }
    let prompt = r.prompt.clone().ok_or_else(|| ApiError::invalid("prompt", "missing; give a text description of the image"))?;
    let (width, height) = parse_size(r.size.as_deref())?;
    Ok(CommonInput {
        prompt,
        negative_prompt: r.negative_prompt.clone().unwrap_or_default(),
        width,
        height,
        steps: r.steps,
        guidance_scale: r.guidance_scale,
        seed: r.seed,
        sampler: r.sampler.clone(),
        schedule: r.schedule.clone(),
        batch: r.n,
        clip_skip: r.clip_skip,
        loras: Vec::new(),
        noise: None,
        variation: None,
        eta_noise_seed_delta: 0,
        seed_resize_from: None,
        controlnets: Vec::new(),
        hires: None,
        skip_layer_guidance: None,
    })
}

fn response(result: &JobResult, prompt: &str) -> Json<Value> {
    let data: Vec<Value> = result.images.iter().map(|b| json!({"b64_json": b, "revised_prompt": prompt})).collect();
    Json(json!({"created": unix_now(), "data": data, "output_format": "png"}))
}

/// `POST /v1/images/generations`.
pub async fn generations(State(st): St, caller: Caller, body: Result<Bytes, BytesRejection>) -> Result<Json<Value>, ApiError> {
    let body = body_bytes(&st, body)?;
    st.ready_model()?;
    let mut obj = blocking(move || parse_json_object(&body)).await?;
    // OpenAI's `model` ("dall-e-3", "gpt-image-1") means nothing here unless it names one of our checkpoints,
    // which this request then runs on.
    let model = match obj.remove("model") {
        Some(Value::String(name)) if st.resolve_model("model", &name).is_ok() => st.model_for("model", &name).await?,
        _ => st.active_model().await?,
    };
    let st2 = st.clone();
    let (spec, params, prompt) = blocking(move || {
        let r: ImagesRequest = from_value(Value::Object(obj))?;
        let input = common(&r)?;
        let prompt = input.prompt.clone();
        let (spec, params) = build_job(&st2, &model, input, &NAMES, OpInput::Generation)?;
        Ok((spec, params, prompt))
    })
    .await?;
    let result = run_sync(&st, caller, spec, params).await?;
    Ok(response(&result, &prompt))
}

/// The parts of an edits request, from multipart or JSON.
struct EditParts {
    fields: Map<String, Value>,
    image: Option<Vec<u8>>,
    mask: Option<Vec<u8>>,
}

const NUMERIC_FIELDS: [&str; 6] = ["n", "steps", "seed", "guidance_scale", "strength", "clip_skip"];

async fn read_multipart(st: &AppState, req: Request) -> Result<EditParts, ApiError> {
    let limit = st.config.limits.max_body_bytes;
    let mut mp = Multipart::from_request(req, &()).await.map_err(|r| body_rejection(r.status(), r.body_text(), limit))?;
    let mut parts = EditParts { fields: Map::new(), image: None, mask: None };
    while let Some(field) = mp.next_field().await.map_err(|e| body_rejection(e.status(), e.body_text(), limit))? {
        let name = field.name().unwrap_or_default().to_string();
        let data = field.bytes().await.map_err(|e| body_rejection(e.status(), e.body_text(), limit))?;
        match name.as_str() {
            "image" | "image[]" => {
                // OpenAI accepts several images for gpt-image models; the first is the one edited.
                if parts.image.is_none() {
                    parts.image = Some(data.to_vec());
                }
            }
            "mask" => parts.mask = Some(data.to_vec()),
            _ => {
                let text = String::from_utf8(data.to_vec()).map_err(|_| ApiError::invalid(name.clone(), "not UTF-8 text"))?;
                let v = if NUMERIC_FIELDS.contains(&name.as_str()) {
                    serde_json::from_str::<Value>(text.trim()).ok().filter(Value::is_number).ok_or_else(|| ApiError::invalid(name.clone(), format!("{text:?} is not a number")))?
                } else {
                    Value::String(text)
                };
                parts.fields.insert(name, v);
            }
        }
    }
    Ok(parts)
}

fn json_parts(body: &[u8]) -> Result<EditParts, ApiError> {
    let mut fields = parse_json_object(body)?;
    let mut take_image = |key: &str| -> Result<Option<Vec<u8>>, ApiError> {
        match fields.remove(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => decode_base64(key, &s).map(Some),
            Some(Value::Array(a)) => match a.into_iter().next() {
                Some(Value::String(s)) => decode_base64(key, &s).map(Some),
                _ => Err(ApiError::invalid(key, "expected a base64 image string")),
            },
            Some(_) => Err(ApiError::invalid(key, "expected a base64 image string")),
        }
    };
    let image = take_image("image")?;
    let mask = take_image("mask")?;
    Ok(EditParts { fields, image, mask })
}

/// OpenAI masks mark the area to edit as transparent; without transparency, white marks it.
fn openai_mask(mask: &DynamicImage) -> Option<GrayImage> {
    let rgba = mask.to_rgba8();
    let has_alpha = mask.color().has_alpha() && rgba.pixels().any(|p| p.0[3] < 255);
    if !has_alpha {
        return None;
    }
    Some(GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| Luma([if rgba.get_pixel(x, y).0[3] < 128 { 255 } else { 0 }])))
}

fn edit_job(st: &AppState, model: &ModelInfo, parts: EditParts) -> Result<(crate::jobs::JobSpec, Value, String), ApiError> {
    let r: ImagesRequest = from_value(Value::Object(parts.fields))?;
    let input = common(&r)?;
    let prompt = input.prompt.clone();
    let image_bytes = parts.image.ok_or_else(|| ApiError::invalid("image", "missing; send the image to edit"))?;
    let image = decode_image_bytes("image", &image_bytes)?;
    let mask = match parts.mask {
        Some(bytes) => {
            let m = decode_image_bytes("mask", &bytes)?;
            Some(openai_mask(&m).map(DynamicImage::ImageLuma8).unwrap_or(m))
        }
        // With no mask, the image's own transparent pixels are the area to edit.
        None => openai_mask(&image).map(DynamicImage::ImageLuma8),
    };
    let op = match mask {
        Some(mask) => {
            if mask.dimensions() != image.dimensions() {
                let (mw, mh) = mask.dimensions();
                let (iw, ih) = image.dimensions();
                return Err(ApiError::invalid("mask", format!("the mask is {mw}×{mh} but the image is {iw}×{ih}; send a mask of the image's size")));
            }
            OpInput::Inpaint { image, image_field: "image", mask, mask_field: "mask", strength: r.strength }
        }
        // A model that edits after a reference (FLUX.1 Kontext) does what OpenAI's edits do without a mask:
        // the prompt says what to change. Others re-generate the image (img2img).
        None if model.caps.runs(sd_core::run::TaskKind::Edit) => OpInput::Edit { images: vec![image], field: "image" },
        None => OpInput::Transform { image, image_field: "image", strength: r.strength },
    };
    let (spec, params) = build_job(st, model, input, &NAMES, op)?;
    Ok((spec, params, prompt))
}

/// `POST /v1/images/edits`: img2img without a mask, inpainting with one (or with a transparent image).
pub async fn edits(State(st): St, caller: Caller, req: Request) -> Result<Json<Value>, ApiError> {
    let is_multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("multipart/form-data"));
    let parts = if is_multipart {
        read_multipart(&st, req).await?
    } else {
        let body = body_bytes(&st, Bytes::from_request(req, &()).await)?;
        json_parts(&body)?
    };
    let model = st.active_model().await?;
    let st2: Arc<AppState> = st.clone();
    let (spec, params, prompt) = blocking(move || edit_job(&st2, &model, parts)).await?;
    let result = run_sync(&st, caller, spec, params).await?;
    Ok(response(&result, &prompt))
}
