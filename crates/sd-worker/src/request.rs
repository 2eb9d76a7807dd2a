//! Turning requests of every API into validated [`JobSpec`]s; every error names the field as the
//! client spelled it.

use std::io::Cursor;

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use image::{DynamicImage, GenericImageView};
use sd_pipelines::pipeline::{GenerationParams, NoiseKind};
use sd_core::prompt::extract_lora_tags;
use sd_core::run::{SkipLayerGuidance, TaskKind};
use sd_pipelines::hires::{HiresFix, HiresUpscaler};
use sd_pipelines::schedulers::{Sampler, SamplerKind, SigmaSchedule};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::controlnet::{ControlNetNames, ControlNetRequest, NATIVE_CONTROLNET_NAMES};
use crate::jobs::{JobSpec, Operation};
use crate::lora::LoraRequest;
use crate::state::{AppState, ModelInfo};

/// Largest side of an uploaded image, in pixels (checked from the header, before decoding).
pub const MAX_INPUT_SIDE: u32 = 8192;
/// Most pixels of one uploaded image (4096², checked from the header before any pixel is decoded).
pub const MAX_INPUT_PIXELS: u64 = 4096 * 4096;
/// Most decoded input pixels in one job: its image, mask and ControlNet pictures together.
pub const MAX_JOB_INPUT_PIXELS: u64 = 4 * MAX_INPUT_PIXELS;

/// How an API names the shared fields, so errors name them as the client sent them.
#[derive(Debug, Clone, Copy)]
pub struct FieldNames {
    /// Width.
    pub width: &'static str,
    /// Height.
    pub height: &'static str,
    /// Steps.
    pub steps: &'static str,
    /// Guidance scale.
    pub guidance: &'static str,
    /// Sampler.
    pub sampler: &'static str,
    /// Sigma schedule.
    pub schedule: &'static str,
    /// Batch size.
    pub batch: &'static str,
    /// Clip skip.
    pub clip_skip: &'static str,
    /// Strength (img2img / inpaint).
    pub strength: &'static str,
    /// Seed.
    pub seed: &'static str,
    /// The ControlNet list and its fields.
    pub controlnet: ControlNetNames,
    /// The hires-fix fields.
    pub hires: HiresNames,
}

/// How an API names the hires-fix fields.
#[derive(Debug, Clone, Copy)]
pub struct HiresNames {
    /// The switch (or the object).
    pub enable: &'static str,
    /// Scale factor.
    pub scale: &'static str,
    /// Target width.
    pub resize_x: &'static str,
    /// Target height.
    pub resize_y: &'static str,
    /// Upscaler.
    pub upscaler: &'static str,
    /// Second-pass steps.
    pub steps: &'static str,
    /// Second-pass strength.
    pub strength: &'static str,
}

/// A1111's hires-fix names (`/sdapi/v1/txt2img`).
pub const A1111_HIRES_NAMES: HiresNames = HiresNames {
    enable: "enable_hr",
    scale: "hr_scale",
    resize_x: "hr_resize_x",
    resize_y: "hr_resize_y",
    upscaler: "hr_upscaler",
    steps: "hr_second_pass_steps",
    strength: "denoising_strength",
};

/// The native API's names.
pub const NATIVE_NAMES: FieldNames = FieldNames {
    width: "width",
    height: "height",
    steps: "steps",
    guidance: "guidance_scale",
    sampler: "sampler",
    schedule: "schedule",
    batch: "batch",
    clip_skip: "clip_skip",
    strength: "strength",
    seed: "seed",
    controlnet: NATIVE_CONTROLNET_NAMES,
    hires: HiresNames {
        enable: "hires",
        scale: "hires.scale",
        resize_x: "hires.width",
        resize_y: "hires.height",
        upscaler: "hires.upscaler",
        steps: "hires.steps",
        strength: "hires.strength",
    },
};

/// Request fields every operation shares, before defaults.
#[derive(Debug, Clone, Default)]
pub struct CommonInput {
    /// Prompt.
    pub prompt: String,
    /// Negative prompt.
    pub negative_prompt: String,
    /// Width in pixels.
    pub width: Option<u64>,
    /// Height in pixels.
    pub height: Option<u64>,
    /// Steps.
    pub steps: Option<u64>,
    /// Guidance scale.
    pub guidance_scale: Option<f64>,
    /// Seed; negative or absent means random.
    pub seed: Option<i64>,
    /// Sampler name.
    pub sampler: Option<String>,
    /// Sigma schedule name.
    pub schedule: Option<String>,
    /// Images per job.
    pub batch: Option<u64>,
    /// Clip skip (0 and 1 both mean the last layer).
    pub clip_skip: Option<u64>,
    /// LoRAs.
    pub loras: Vec<LoraRequest>,
    /// Noise generator: `philox` (default, the same on every device), `torch` (diffusers' CPU generator),
    /// `a1111-cpu` or `a1111-nv` (A1111's CPU and NV/GPU sources, one generator per image).
    pub noise: Option<String>,
    /// A1111's variation seed (`subseed`, negative: random) and `subseed_strength`.
    pub variation: Option<(i64, f64)>,
    /// A1111's eta noise seed delta.
    pub eta_noise_seed_delta: u64,
    /// A1111's "resize seed from" `(height, width)` in pixels.
    pub seed_resize_from: Option<(usize, usize)>,
    /// ControlNets, each with its index in the client's list.
    pub controlnets: Vec<(usize, ControlNetRequest)>,
    /// A1111's hires fix, when asked for (`enable_hr`).
    pub hires: Option<HiresInput>,
    /// Skip-layer guidance (native API only; SD 3.x models), values already parsed.
    pub skip_layer_guidance: Option<SkipLayerGuidance>,
}

/// A1111's hires-fix fields, before defaults (names as in A1111's txt2img API).
#[derive(Debug, Clone, Default)]
pub struct HiresInput {
    /// `hr_scale` (2 when neither it nor a resize is given).
    pub scale: Option<f64>,
    /// `hr_resize_x` (0 or absent: from the scale, or the aspect ratio with `hr_resize_y`).
    pub resize_x: Option<u64>,
    /// `hr_resize_y`.
    pub resize_y: Option<u64>,
    /// `hr_upscaler` ("Latent" by default).
    pub upscaler: Option<String>,
    /// `hr_second_pass_steps` (0 or absent: the first pass's).
    pub steps: Option<u64>,
    /// `denoising_strength` (0.7, A1111's UI default, when absent).
    pub strength: Option<f64>,
}

/// The target size of a hires fix: `hr_resize_x/y` when given (one of them: the other keeps the aspect
/// ratio; both: exactly that size, where A1111 would crop), else the size times `hr_scale`; each side
/// rounded down to a multiple of `multiple`.
fn hires_target(h: &HiresInput, width: usize, height: usize, multiple: usize, names: &HiresNames) -> Result<(usize, usize), ApiError> {
    let round = |v: f64| ((v as usize) / multiple) * multiple;
    let (x, y) = (h.resize_x.unwrap_or(0) as f64, h.resize_y.unwrap_or(0) as f64);
    let (w, hh) = (width as f64, height as f64);
    Ok(match (x > 0.0, y > 0.0) {
        (false, false) => HiresFix::scaled_size(width, height, h.scale.unwrap_or(2.0), multiple).map_err(|e| {
            let reason = match e {
                sd_pipelines::Error::Core(sd_core::Error::InvalidRequest { reason, .. }) => reason,
                other => other.to_string(),
            };
            ApiError::invalid(names.scale, reason)
        })?,
        (true, false) => (round(x), round(x * hh / w)),
        (false, true) => (round(y * w / hh), round(y)),
        (true, true) => (round(x), round(y)),
    })
}

/// The operation-specific part of a request, images already decoded.
#[derive(Debug, Clone)]
pub enum OpInput {
    /// txt2img.
    Generation,
    /// img2img.
    Transform {
        /// The image.
        image: DynamicImage,
        /// Its field name.
        image_field: &'static str,
        /// Requested strength.
        strength: Option<f64>,
    },
    /// Inpaint.
    Inpaint {
        /// The image.
        image: DynamicImage,
        /// Its field name.
        image_field: &'static str,
        /// The mask (white = repaint).
        mask: DynamicImage,
        /// Its field name.
        mask_field: &'static str,
        /// Requested strength.
        strength: Option<f64>,
    },
    /// An edit after reference images (FLUX.1 Kontext).
    Edit {
        /// The reference images.
        images: Vec<DynamicImage>,
        /// Their field name (`images`, OpenAI's `image`).
        field: &'static str,
    },
}

/// Most reference images an edit may carry.
pub const MAX_EDIT_IMAGES: usize = 4;

/// Default img2img strength (A1111's `denoising_strength` default).
pub const DEFAULT_TRANSFORM_STRENGTH: f64 = 0.75;
/// Default inpainting strength (repaint the masked area from noise, as diffusers does).
pub const DEFAULT_INPAINT_STRENGTH: f64 = 1.0;

fn base64_engine() -> GeneralPurpose {
    GeneralPurpose::new(&base64::alphabet::STANDARD, GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent))
}

/// Decodes base64 (an optional `data:…;base64,` prefix and whitespace allowed).
pub fn decode_base64(field: &str, s: &str) -> Result<Vec<u8>, ApiError> {
    let s = s.trim();
    let s = match s.strip_prefix("data:") {
        Some(rest) => rest.split_once(',').map(|(_, d)| d).ok_or_else(|| ApiError::invalid(field, "a data URL without a `,` before its data"))?,
        None => s,
    };
    let clean: String = s.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    if clean.is_empty() {
        return Err(ApiError::invalid(field, "the image is empty; send a base64-encoded PNG or JPEG"));
    }
    base64_engine().decode(clean.as_bytes()).map_err(|e| ApiError::invalid(field, format!("not valid base64 ({e}); send a base64-encoded PNG or JPEG")))
}

/// Decodes image bytes (PNG or JPEG) with size limits: the dimensions are read from the header
/// and refused before a single pixel is allocated.
pub fn decode_image_bytes(field: &str, bytes: &[u8]) -> Result<DynamicImage, ApiError> {
    let open = || {
        image::ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| ApiError::invalid(field, format!("cannot read the image: {e}")))
    };
    let (w, h) = open()?.into_dimensions().map_err(|e| ApiError::invalid(field, format!("not a readable PNG or JPEG image ({e})")))?;
    if w == 0 || h == 0 {
        return Err(ApiError::invalid(field, "the image has no pixels"));
    }
    if w > MAX_INPUT_SIDE || h > MAX_INPUT_SIDE || u64::from(w) * u64::from(h) > MAX_INPUT_PIXELS {
        return Err(ApiError::invalid(
            field,
            format!("the image is {w}×{h}; images may have at most {MAX_INPUT_SIDE} px a side and {MAX_INPUT_PIXELS} pixels (4096×4096): scale it down"),
        ));
    }
    let mut reader = open()?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_INPUT_SIDE);
    limits.max_image_height = Some(MAX_INPUT_SIDE);
    // 16-bit RGBA is the widest decoded layout: 8 bytes a pixel.
    limits.max_alloc = Some(MAX_INPUT_PIXELS * 8 + (1 << 20));
    reader.limits(limits);
    let img = reader.decode().map_err(|e| ApiError::invalid(field, format!("not a decodable PNG or JPEG image ({e})")))?;
    if img.width() == 0 || img.height() == 0 {
        return Err(ApiError::invalid(field, "the image has no pixels"));
    }
    Ok(img)
}

/// Decodes a base64 PNG/JPEG.
pub fn decode_image(field: &str, s: &str) -> Result<DynamicImage, ApiError> {
    decode_image_bytes(field, &decode_base64(field, s)?)
}

/// Deserializes `v` naming the failing field in the error.
pub fn from_value<T: DeserializeOwned>(v: Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize::<_, T>(v).map_err(|e| {
        let path = e.path().to_string();
        let msg = e.inner().to_string();
        let field = if path.is_empty() || path == "." {
            // Unknown and missing fields are reported on the parent; the name is in backticks.
            msg.split('`').nth(1).unwrap_or("body").to_string()
        } else {
            path
        };
        ApiError::invalid(field, msg)
    })
}

/// Deepest JSON nesting a request may use.
pub const MAX_JSON_DEPTH: usize = 32;
/// Most items of one JSON array (`loras`, `controlnets`, A1111 `script_args`, …).
pub const MAX_JSON_ARRAY_ITEMS: usize = 1024;
/// Most JSON values in one body.
pub const MAX_JSON_VALUES: usize = 100_000;

/// Bounds a JSON body's shape in one linear pass over its bytes, before it is parsed: a 50 MB body
/// of `[0,0,…]` would otherwise become a 25-million-element tree. Errors name the array or object
/// as a path (`alwayson_scripts.controlnet.args`).
pub fn check_json_shape(body: &[u8]) -> Result<(), ApiError> {
    struct Level {
        array: bool,
        items: usize,
        path: String,
    }
    let too_big = |field: &str, msg: String| ApiError::new(axum::http::StatusCode::BAD_REQUEST, "request_too_complex", Some(field.to_string()), msg);
    let mut stack: Vec<Level> = Vec::new();
    let mut last_string = (0, 0);
    let mut key = String::new();
    let mut values = 0usize;
    let mut i = 0;
    while i < body.len() {
        match body[i] {
            b'"' => {
                let start = i + 1;
                i += 1;
                while i < body.len() && body[i] != b'"' {
                    i += if body[i] == b'\\' { 2 } else { 1 };
                }
                last_string = (start, i.min(body.len()));
            }
            b':' => key = String::from_utf8_lossy(&body[last_string.0..last_string.1.min(last_string.0 + 64)]).into_owned(),
            c @ (b'[' | b'{') => {
                let path = match stack.last() {
                    None => String::new(),
                    Some(l) if l.array => format!("{}[{}]", l.path, l.items),
                    Some(l) if l.path.is_empty() => key.clone(),
                    Some(l) => format!("{}.{key}", l.path),
                };
                if stack.len() >= MAX_JSON_DEPTH {
                    return Err(too_big(if path.is_empty() { "body" } else { &path }, format!("JSON nested more than {MAX_JSON_DEPTH} deep")));
                }
                stack.push(Level { array: c == b'[', items: 0, path });
            }
            b']' | b'}' => {
                stack.pop();
            }
            b',' => {
                // n commas separate at least n + 1 values.
                values += 1;
                if values >= MAX_JSON_VALUES {
                    return Err(too_big("body", format!("more than {MAX_JSON_VALUES} JSON values")));
                }
                if let Some(top) = stack.last_mut().filter(|l| l.array) {
                    top.items += 1;
                    if top.items >= MAX_JSON_ARRAY_ITEMS {
                        let field = if top.path.is_empty() { "body" } else { top.path.as_str() };
                        return Err(too_big(field, format!("more than {MAX_JSON_ARRAY_ITEMS} items in one list")));
                    }
                }
            }
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// Parses a body as a JSON object (its shape bounded first by [`check_json_shape`]).
pub fn parse_json_object(body: &[u8]) -> Result<serde_json::Map<String, Value>, ApiError> {
    check_json_shape(body)?;
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(axum::http::StatusCode::BAD_REQUEST, "malformed_json", Some("body".into()), format!("the body is not valid JSON: {e}"))
    })?;
    match v {
        Value::Object(m) => Ok(m),
        _ => Err(ApiError::new(axum::http::StatusCode::BAD_REQUEST, "malformed_json", Some("body".into()), "the body must be a JSON object")),
    }
}

/// The native API's hires fix (`image_generation` only): `scale` (2) or `width`/`height`, `upscaler`
/// ("Latent"), `steps` (the first pass's), `strength` (0.7).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NativeHires {
    scale: Option<f64>,
    width: Option<u64>,
    height: Option<u64>,
    upscaler: Option<String>,
    steps: Option<u64>,
    strength: Option<f64>,
}

/// The native `POST /v1/jobs` body, minus `operation`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NativeRequest {
    prompt: Option<String>,
    negative_prompt: Option<String>,
    width: Option<u64>,
    height: Option<u64>,
    steps: Option<u64>,
    guidance_scale: Option<f64>,
    seed: Option<i64>,
    sampler: Option<String>,
    schedule: Option<String>,
    batch: Option<u64>,
    clip_skip: Option<u64>,
    loras: Option<Vec<LoraRequest>>,
    noise: Option<String>,
    controlnets: Option<Vec<ControlNetRequest>>,
    hires: Option<NativeHires>,
    skip_layer_guidance: Option<Value>,
    input_image: Option<String>,
    init_image: Option<String>,
    mask_image: Option<String>,
    strength: Option<f64>,
    images: Option<Vec<String>>,
}

/// The native field of skip-layer guidance; every error about it names this.
const SLG: &str = "skip_layer_guidance";

/// The native `skip_layer_guidance` object: `layers` (required, non-negative integers), `scale` (2.8),
/// `start` (0.01), `stop` (0.2) as diffusers' defaults; the values are checked here
/// ([`SkipLayerGuidance::check`]) and which layers exist by the model when it runs.
pub fn parse_skip_layer_guidance(v: &Value) -> Result<SkipLayerGuidance, ApiError> {
    const SHAPE: &str = r#"{"layers": [7, 8, 9], "scale": 2.8, "start": 0.01, "stop": 0.2}"#;
    let Value::Object(o) = v else {
        return Err(ApiError::invalid(SLG, format!("expected an object such as {SHAPE} (scale, start and stop optional); got {v}")));
    };
    if let Some(k) = o.keys().find(|k| !["layers", "scale", "start", "stop"].contains(&k.as_str())) {
        return Err(ApiError::invalid(SLG, format!("unknown key `{k}`; use layers, scale, start and stop")));
    }
    let layers = match o.get("layers") {
        None | Some(Value::Null) => return Err(ApiError::invalid(SLG, format!("`layers` is missing; name the blocks to skip, as in {SHAPE}"))),
        Some(Value::Array(a)) => a
            .iter()
            .map(|l| match l.as_u64().and_then(|n| usize::try_from(n).ok()) {
                Some(n) => Ok(n),
                None => Err(ApiError::invalid(SLG, format!("`layers` holds block indices, non-negative integers; got {l}"))),
            })
            .collect::<Result<Vec<usize>, _>>()?,
        Some(other) => return Err(ApiError::invalid(SLG, format!("`layers` must be a list of block indices such as [7, 8, 9]; got {other}"))),
    };
    let mut slg = SkipLayerGuidance::new(layers);
    for (key, slot) in [("scale", &mut slg.scale), ("start", &mut slg.start), ("stop", &mut slg.stop)] {
        match o.get(key) {
            None | Some(Value::Null) => {}
            Some(x) => *slot = x.as_f64().ok_or_else(|| ApiError::invalid(SLG, format!("`{key}` must be a number; got {x}")))?,
        }
    }
    slg.check().map_err(|e| match e {
        sd_core::Error::InvalidRequest { reason, .. } => ApiError::invalid(SLG, reason),
        other => ApiError::invalid(SLG, other.to_string()),
    })?;
    Ok(slg)
}

const OPERATIONS: &str = "image_generation, image_transform, image_inpaint, image_edit";

/// Parses and validates a native job request.
pub fn native_job(state: &AppState, model: &ModelInfo, body: &[u8]) -> Result<(JobSpec, Value), ApiError> {
    native_job_object(state, model, parse_json_object(body)?)
}

/// Validates a native job request already parsed into a JSON object (its `model` taken out).
pub fn native_job_object(state: &AppState, model: &ModelInfo, mut obj: serde_json::Map<String, Value>) -> Result<(JobSpec, Value), ApiError> {
    let op = match obj.remove("operation") {
        None => return Err(ApiError::invalid("operation", format!("missing; use one of {OPERATIONS}"))),
        Some(Value::String(s)) => s,
        Some(other) => return Err(ApiError::invalid("operation", format!("expected a string, got {other}; use one of {OPERATIONS}"))),
    };
    if !["image_generation", "image_transform", "image_inpaint", "image_edit"].contains(&op.as_str()) {
        return Err(ApiError::new(
            axum::http::StatusCode::BAD_REQUEST,
            "unknown_operation",
            Some("operation".into()),
            format!("unknown operation {op:?}; use one of {OPERATIONS}"),
        ));
    }
    let r: NativeRequest = from_value(Value::Object(obj))?;
    type Presence<'a> = &'a [(&'a str, bool)];
    let (needed, forbidden): (Presence, Presence) = match op.as_str() {
        "image_generation" => (&[], &[("input_image", r.input_image.is_some()), ("init_image", r.init_image.is_some()), ("mask_image", r.mask_image.is_some()), ("strength", r.strength.is_some())]),
        "image_transform" => (&[("input_image", r.input_image.is_some())], &[("init_image", r.init_image.is_some()), ("mask_image", r.mask_image.is_some()), ("images", r.images.is_some())]),
        "image_edit" => (
            &[("images", r.images.is_some())],
            &[("input_image", r.input_image.is_some()), ("init_image", r.init_image.is_some()), ("mask_image", r.mask_image.is_some()), ("strength", r.strength.is_some())],
        ),
        _ => (&[("init_image", r.init_image.is_some()), ("mask_image", r.mask_image.is_some())], &[("input_image", r.input_image.is_some()), ("images", r.images.is_some())]),
    };
    if op == "image_generation" && r.images.is_some() {
        return Err(ApiError::invalid("images", "`images` is not a field of image_generation; use image_edit"));
    }
    if let Some((f, _)) = forbidden.iter().find(|(_, present)| *present) {
        return Err(ApiError::invalid(*f, format!("`{f}` is not a field of {op}")));
    }
    if let Some((f, _)) = needed.iter().find(|(_, present)| !*present) {
        return Err(ApiError::invalid(*f, format!("missing; {op} needs a base64 PNG or JPEG `{f}`")));
    }
    if op != "image_generation" && r.skip_layer_guidance.is_some() {
        return Err(ApiError::invalid(SLG, format!("skip-layer guidance applies to image_generation only (diffusers runs it in text to image); this is {op}")));
    }
    let skip_layer_guidance = r.skip_layer_guidance.as_ref().map(parse_skip_layer_guidance).transpose()?;
    let prompt = r.prompt.ok_or_else(|| ApiError::invalid("prompt", "missing; give the text to generate (an empty string is allowed)"))?;
    let input = CommonInput {
        prompt,
        negative_prompt: r.negative_prompt.unwrap_or_default(),
        width: r.width,
        height: r.height,
        steps: r.steps,
        guidance_scale: r.guidance_scale,
        seed: r.seed,
        sampler: r.sampler,
        schedule: r.schedule,
        batch: r.batch,
        clip_skip: r.clip_skip,
        loras: r.loras.unwrap_or_default(),
        noise: r.noise,
        variation: None,
        eta_noise_seed_delta: 0,
        seed_resize_from: None,
        controlnets: r.controlnets.unwrap_or_default().into_iter().enumerate().collect(),
        hires: r.hires.map(|h| HiresInput { scale: h.scale, resize_x: h.width, resize_y: h.height, upscaler: h.upscaler, steps: h.steps, strength: h.strength }),
        skip_layer_guidance,
    };
    let op_input = match op.as_str() {
        "image_generation" => OpInput::Generation,
        "image_transform" => OpInput::Transform {
            image: decode_image("input_image", r.input_image.as_deref().unwrap_or_default())?,
            image_field: "input_image",
            strength: r.strength,
        },
        "image_edit" => {
            let list = r.images.as_deref().unwrap_or_default();
            if list.is_empty() || list.len() > MAX_EDIT_IMAGES {
                return Err(ApiError::invalid("images", format!("{} images; send 1 to {MAX_EDIT_IMAGES} base64 reference images", list.len())));
            }
            let images = list.iter().enumerate().map(|(i, b)| decode_image(&format!("images[{i}]"), b)).collect::<Result<Vec<_>, _>>()?;
            OpInput::Edit { images, field: "images" }
        }
        _ => OpInput::Inpaint {
            image: decode_image("init_image", r.init_image.as_deref().unwrap_or_default())?,
            image_field: "init_image",
            mask: decode_image("mask_image", r.mask_image.as_deref().unwrap_or_default())?,
            mask_field: "mask_image",
            strength: r.strength,
        },
    };
    build_job(state, model, input, &NATIVE_NAMES, op_input)
}

/// The operator's size limit (the model's own rules, multiples included, are the library's).
fn check_side(field: &str, v: u64, max: usize) -> Result<usize, ApiError> {
    if v == 0 || v > max as u64 {
        return Err(ApiError::invalid(field, format!("{v} px is outside 1..={max} (this worker's limit)")));
    }
    Ok(v as usize)
}

impl FieldNames {
    /// The API's name of a request field as the libraries name it ([`sd_core::run::Request`]).
    fn api_name(&self, library: &'static str) -> &'static str {
        match library {
            "width" => self.width,
            "height" => self.height,
            "steps" => self.steps,
            "guidance_scale" => self.guidance,
            "sampler" => self.sampler,
            "schedule" => self.schedule,
            "batch_size" => self.batch,
            "clip_skip" => self.clip_skip,
            "strength" => self.strength,
            "task" => "operation",
            other => other,
        }
    }

    /// A library error about the request as a 400 naming the client's field (errors about no field
    /// come from building the sampler).
    fn library_error(&self, e: sd_core::Error) -> ApiError {
        let field = self.api_name(e.field().unwrap_or("sampler"));
        match e {
            sd_core::Error::InvalidRequest { reason, .. } => ApiError::invalid(field, reason),
            e => ApiError::invalid(field, e.to_string()),
        }
    }
}

/// Applies defaults and the operator's limits to a request of any API, then checks it against the
/// model's own rules ([`sd_core::family::Capabilities`], the library's, so a front without the model
/// checks exactly what the engine would).
pub fn build_job(state: &AppState, model: &ModelInfo, input: CommonInput, names: &FieldNames, op: OpInput) -> Result<(JobSpec, Value), ApiError> {
    let limits = &state.config.limits;
    let caps = &model.caps;
    let multiple = caps.size_multiple;
    // A1111's `<lora:name:weight>` tags come out of the prompt and join the request's LoRAs; the
    // parameters (and the PNG's infotext) keep the prompt as written, as A1111 does.
    let written_prompt = input.prompt.clone();
    let (prompt, tags) = extract_lora_tags("prompt", &input.prompt).map_err(|e| names.library_error(e))?;
    let mut input = input;
    input.prompt = prompt;
    // Fields the model does not read (FLUX: negative prompt, sampler, clip skip) are accepted, since
    // front ends always send them, and listed as ignored in the result.
    let mut ignored: Vec<&str> = Vec::new();
    if !caps.controlnet && !input.controlnets.is_empty() {
        return Err(ApiError::invalid(names.controlnet.list, format!("ControlNets do not work with {} models; this worker serves one", caps.variant)));
    }
    let wants_loras = !input.loras.is_empty() || !tags.is_empty();
    if !caps.lora && wants_loras {
        return Err(ApiError::invalid("loras", format!("this {} model takes no LoRAs (a quantized transformer); merge the LoRA before quantizing", caps.variant)));
    }
    if !caps.negative_prompt && !input.negative_prompt.trim().is_empty() {
        ignored.push("negative_prompt");
    }
    if !caps.sampler_choice {
        if input.sampler.as_deref().is_some_and(|s| !s.trim().is_empty()) {
            ignored.push(names.sampler);
        }
        if input.schedule.is_some() {
            ignored.push(names.schedule);
        }
    }
    if caps.clip_skip_layers == 0 && input.clip_skip.is_some_and(|c| c > 1) {
        ignored.push(names.clip_skip);
    }
    // Kontext's references go to the trained resolution nearest their aspect ratio (diffusers'
    // `_auto_resize`) when it fits this worker's limits, else to their own size rounded down to the multiple.
    let op = match op {
        OpInput::Edit { images, field } => {
            if images.is_empty() || images.len() > MAX_EDIT_IMAGES {
                return Err(ApiError::invalid(field, format!("{} reference images; send 1 to {MAX_EDIT_IMAGES}", images.len())));
            }
            let round = |v: u32| ((v as usize / multiple) * multiple).max(multiple) as u32;
            let images = images
                .into_iter()
                .map(|img| {
                    let (w, h) = img.dimensions();
                    let (kw, kh) = sd_flux::pipeline::kontext_reference_size(w as usize, h as usize);
                    let (tw, th) = if caps.variant.contains("kontext") && kw <= limits.max_width && kh <= limits.max_height {
                        (kw as u32, kh as u32)
                    } else {
                        (round(w).min(limits.max_width as u32), round(h).min(limits.max_height as u32))
                    };
                    if (tw, th) == (w, h) { img } else { img.resize_exact(tw, th, image::imageops::FilterType::Lanczos3) }
                })
                .collect();
            OpInput::Edit { images, field }
        }
        other => other,
    };
    // img2img and inpaint default to the input image's size, rounded down to the size multiple; an edit to
    // its (first) reference's.
    let (def_w, def_h) = match &op {
        OpInput::Generation => (caps.default_width as u64, caps.default_height as u64),
        OpInput::Transform { image, .. } | OpInput::Inpaint { image, .. } => {
            let (w, h) = image.dimensions();
            let round = |v: u32| (v as u64 / multiple as u64) * multiple as u64;
            (round(w).max(multiple as u64), round(h).max(multiple as u64))
        }
        OpInput::Edit { images, .. } => images.first().map_or((caps.default_width as u64, caps.default_height as u64), |i| (u64::from(i.width()), u64::from(i.height()))),
    };
    let width = check_side(names.width, input.width.unwrap_or(def_w), limits.max_width)?;
    let height = check_side(names.height, input.height.unwrap_or(def_h), limits.max_height)?;
    let steps = input.steps.unwrap_or(caps.default_steps as u64);
    if steps == 0 || steps > limits.max_steps as u64 {
        return Err(ApiError::invalid(names.steps, format!("{steps} is outside 1..={} (this worker's limit)", limits.max_steps)));
    }
    let steps = steps as usize;
    let batch = input.batch.unwrap_or(1);
    if batch == 0 || batch > limits.max_batch as u64 {
        return Err(ApiError::invalid(names.batch, format!("{batch} is outside 1..={} (this worker's limit)", limits.max_batch)));
    }
    let guidance = input.guidance_scale.unwrap_or(caps.default_guidance);
    let clip_skip = if caps.clip_skip_layers == 0 { 1 } else { input.clip_skip.unwrap_or(1).max(1) };
    let mut sampler: Sampler = match input.sampler.as_deref().map(str::trim).filter(|_| caps.sampler_choice) {
        None | Some("") => SamplerKind::Euler.into(),
        Some(name) => name.parse().map_err(|e: sd_core::Error| ApiError::invalid(names.sampler, e.to_string()))?,
    };
    if let Some(s) = input.schedule.as_deref().filter(|_| caps.sampler_choice) {
        let schedule: SigmaSchedule = s.parse().map_err(|e: sd_core::Error| ApiError::invalid(names.schedule, e.to_string()))?;
        if schedule != SigmaSchedule::Default {
            if !sampler.kind.supports_sigma_schedules() {
                return Err(ApiError::invalid(
                    names.schedule,
                    format!(
                        "{} has no {} schedule; the k-diffusion-style samplers take one ({})",
                        sampler.kind,
                        schedule.as_str(),
                        SamplerKind::ALL.iter().filter(|k| k.supports_sigma_schedules()).map(|k| k.display_name()).collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
            sampler.schedule = Some(schedule);
        }
    }
    let seed = match input.seed {
        Some(s) if s >= 0 => s as u64,
        _ => sd_pipelines::pipeline::random_seed(),
    };
    let noise = match input.noise.as_deref() {
        None => NoiseKind::Philox,
        Some(n) => n.parse::<NoiseKind>().map_err(|e| names.library_error(e))?,
    };
    let params = GenerationParams {
        prompt: input.prompt,
        negative_prompt: if caps.negative_prompt { input.negative_prompt } else { String::new() },
        width,
        height,
        steps,
        guidance_scale: guidance,
        seed,
        batch_size: batch as usize,
        sampler,
        clip_skip: clip_skip as usize,
        vae_tiling: None,
        noise,
        max_sequence_length: None,
        variation: match input.variation {
            Some((_, 0.0)) => None,
            Some((subseed, strength)) => Some(sd_core::run::Variation {
                subseed: if subseed >= 0 { subseed as u64 } else { sd_pipelines::pipeline::random_seed() },
                strength: strength as f32,
            }),
            None => None,
        },
        eta_noise_seed_delta: input.eta_noise_seed_delta,
        seed_resize_from: input.seed_resize_from,
        skip_layer_guidance: input.skip_layer_guidance,
    };
    // The model's own rules: size multiple, guidance, clip skip, prompt syntax, the sampler's limits.
    caps.validate(&params).map_err(|e| names.library_error(e))?;
    let mut resolved = state.loras.resolve_all(&input.loras)?;
    let tag_requests: Vec<LoraRequest> =
        tags.iter().map(|t| LoraRequest { name: Some(t.name.clone()), path: None, strength: Some(t.weight), text_encoder_strength: Some(t.text_encoder_weight) }).collect();
    for (t, r) in tags.iter().zip(&tag_requests) {
        let found = state.loras.resolve_all(std::slice::from_ref(r)).map_err(|e| {
            ApiError::invalid("prompt", format!("<lora:{}:{}> in the prompt: {}", t.name, t.weight, e.message))
        })?;
        resolved.extend(found);
    }
    if resolved.len() > crate::lora::MAX_LORAS {
        return Err(ApiError::invalid("loras", format!("{} LoRAs (with the prompt's <lora:…> tags); at most {} may be stacked", resolved.len(), crate::lora::MAX_LORAS)));
    }
    let controlnets = state.controlnets.resolve_all(&input.controlnets, &names.controlnet, model.unet.as_ref())?;
    let pixels = |img: &DynamicImage| u64::from(img.width()) * u64::from(img.height());
    let mut job_pixels: u64 = controlnets.iter().map(|c| pixels(&c.image)).sum();
    match &op {
        OpInput::Generation => {}
        OpInput::Transform { image, .. } => job_pixels += pixels(image),
        OpInput::Inpaint { image, mask, .. } => job_pixels += pixels(image) + pixels(mask),
        OpInput::Edit { images, .. } => job_pixels += images.iter().map(pixels).sum::<u64>(),
    }
    if job_pixels > MAX_JOB_INPUT_PIXELS {
        return Err(ApiError::invalid(
            names.controlnet.list,
            format!("the job's images have {job_pixels} pixels together; at most {MAX_JOB_INPUT_PIXELS}: send smaller or fewer pictures"),
        ));
    }
    let control_summary: Vec<_> = controlnets.iter().map(|c| c.summary()).collect();
    let task = |kind: TaskKind, strength: Option<f64>| caps.check_task_kind(kind, strength, steps).map_err(|e| names.library_error(e));
    let (operation, strength) = match op {
        OpInput::Generation => {
            task(TaskKind::TextToImage, None)?;
            (Operation::Generation, None)
        }
        OpInput::Transform { image, strength, .. } => {
            let s = strength.unwrap_or(DEFAULT_TRANSFORM_STRENGTH);
            task(TaskKind::ImageToImage, Some(s))?;
            (Operation::Transform { image, strength: s }, Some(s))
        }
        OpInput::Inpaint { image, image_field: _, mask, mask_field, strength } => {
            if mask.dimensions() != image.dimensions() {
                let (mw, mh) = mask.dimensions();
                let (iw, ih) = image.dimensions();
                return Err(ApiError::invalid(mask_field, format!("the mask is {mw}×{mh} but the image is {iw}×{ih}; send a mask of the image's size")));
            }
            let s = strength.unwrap_or(DEFAULT_INPAINT_STRENGTH);
            task(TaskKind::Inpaint, Some(s))?;
            (Operation::Inpaint { image, mask, strength: s }, Some(s))
        }
        OpInput::Edit { images, .. } => {
            task(TaskKind::Edit, None)?;
            (Operation::Edit { images }, None)
        }
    };
    let parameters = json!({
        "operation": operation.name(),
        "model": model.name,
        "prompt": written_prompt,
        "negative_prompt": params.negative_prompt,
        "width": width,
        "height": height,
        "steps": steps,
        "guidance_scale": guidance,
        "seed": seed,
        "sampler": sampler.to_string(),
        "schedule": sampler.schedule.map(|s| s.as_str()).unwrap_or("default"),
        "batch": batch,
        "clip_skip": clip_skip,
        "strength": strength,
        "loras": resolved,
        "controlnets": control_summary,
        "noise": noise.name(),
        "subseed": params.variation.map_or(json!(-1), |v| json!(v.subseed)),
        "subseed_strength": params.variation.map_or(0.0, |v| f64::from(v.strength)),
        "eta_noise_seed_delta": params.eta_noise_seed_delta,
    });
    let mut parameters = parameters;
    if let Some(slg) = &params.skip_layer_guidance {
        parameters["skip_layer_guidance"] = json!({"layers": slg.layers, "scale": slg.scale, "start": slg.start, "stop": slg.stop});
    }
    if !caps.sampler_choice {
        parameters["sampler"] = json!("Euler (flow matching)");
    }
    if !ignored.is_empty() || !caps.sampler_choice {
        parameters["ignored"] = json!(ignored);
    }
    let hn = &names.hires;
    let hires = match input.hires {
        None => None,
        Some(h) => {
            if !matches!(operation, Operation::Generation) {
                return Err(ApiError::invalid(hn.enable, "hires fix applies to txt2img only"));
            }
            if !caps.hires_fix {
                return Err(ApiError::invalid(hn.enable, format!("{} models have no hires fix here", caps.variant)));
            }
            let (w, hh) = hires_target(&h, width, height, multiple, hn)?;
            if w > limits.max_width || hh > limits.max_height || w < width || hh < height {
                return Err(ApiError::invalid(
                    if h.resize_x.is_some() || h.resize_y.is_some() { hn.resize_x } else { hn.scale },
                    format!("the hires target {w}×{hh} must lie between the first pass {width}×{height} and this worker's limit {}×{}", limits.max_width, limits.max_height),
                ));
            }
            let name = h.upscaler.as_deref().unwrap_or("Latent");
            // A1111's built-in names first, then the ESRGAN-family models of --upscaler-dir by file stem.
            let (upscaler, esrgan) = match name.parse::<HiresUpscaler>() {
                Ok(u) => (u, None),
                Err(e) => match state.upscalers.resolve(name) {
                    Some(model) => (HiresUpscaler::Esrgan, Some(model)),
                    None if state.upscalers.is_empty() => return Err(ApiError::invalid(hn.upscaler, format!("{e}; this worker has no upscaler models (start it with --upscaler-dir)"))),
                    None => return Err(ApiError::invalid(hn.upscaler, e.to_string())),
                },
            };
            let hr_steps = match h.steps.filter(|s| *s > 0) {
                Some(s) if s > limits.max_steps as u64 => {
                    return Err(ApiError::invalid(hn.steps, format!("{s} is outside 1..={} (this worker's limit)", limits.max_steps)))
                }
                other => other.map(|s| s as usize),
            };
            let hr = HiresFix { width: w, height: hh, upscaler, steps: hr_steps, strength: h.strength.unwrap_or(0.7), esrgan };
            let second = hr.second_pass(&params);
            let hr_names = |e: sd_core::Error| {
                let field = match e.field() {
                    Some("width") => hn.resize_x,
                    Some("height") => hn.resize_y,
                    Some("steps") => hn.steps,
                    Some("strength") => hn.strength,
                    Some(other) => other,
                    None => hn.upscaler,
                };
                ApiError::invalid(field, e.to_string())
            };
            caps.validate(&second).map_err(hr_names)?;
            caps.check_task_kind(TaskKind::ImageToImage, Some(hr.strength), second.steps).map_err(hr_names)?;
            parameters["hires"] = json!({
                "width": w, "height": hh, "upscaler": hr.upscaler_name(), "steps": second.steps, "denoising_strength": hr.strength,
            });
            Some(hr)
        }
    };
    Ok((JobSpec { operation, params, loras: resolved, controlnets, hires, partial_on_cancel: false, model: model.key.clone(), vae: None }, parameters))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(body: &str) -> Option<String> {
        check_json_shape(body.as_bytes()).err().and_then(|e| e.field)
    }

    #[test]
    fn json_shape_limits_name_the_list() {
        assert_eq!(field_of(r#"{"prompt":"a, b, [c] {d}","loras":[{"name":"x"}]}"#), None);
        let many = format!(r#"{{"loras":[{}]}}"#, vec!["0"; MAX_JSON_ARRAY_ITEMS + 1].join(","));
        assert_eq!(field_of(&many).as_deref(), Some("loras"));
        let nested = format!(r#"{{"alwayson_scripts":{{"controlnet":{{"args":[{}]}}}}}}"#, vec!["{}"; MAX_JSON_ARRAY_ITEMS + 1].join(","));
        assert_eq!(field_of(&nested).as_deref(), Some("alwayson_scripts.controlnet.args"));
        let deep = "[".repeat(MAX_JSON_DEPTH + 1);
        assert!(field_of(&deep).is_some());
        assert_eq!(field_of(&"[".repeat(MAX_JSON_DEPTH)), None);
        // Commas and brackets inside strings (with escaped quotes) do not count.
        let text = format!(r#"{{"prompt":"{}\" ,[[["}}"#, ",".repeat(MAX_JSON_VALUES + 5));
        assert_eq!(field_of(&text), None);
        let flat = format!(r#"{{{}}}"#, (0..MAX_JSON_VALUES + 1).map(|i| format!(r#""k{i}":0"#)).collect::<Vec<_>>().join(","));
        assert_eq!(field_of(&flat).as_deref(), Some("body"));
    }
}
