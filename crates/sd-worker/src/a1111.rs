//! The AUTOMATIC1111 web UI API subset front ends use: txt2img, img2img, progress with the current
//! preview, interrupt, samplers, schedulers, models and options. Field names and defaults follow
//! A1111's `StableDiffusionProcessing*` API models.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::Json;
use sd_pipelines::schedulers::SamplerKind;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::api::{blocking, body_bytes, run_sync, St};
use crate::server::Caller;
use crate::controlnet::{ControlNetNames, ControlNetRequest};
use crate::error::{ApiError, JobError};
use crate::jobs::{unix_now, JobResult};
use crate::request::{build_job, decode_base64, decode_image, from_value, parse_json_object, CommonInput, FieldNames, HiresInput, OpInput};
use crate::state::{AppState, ModelInfo};

const NAMES: FieldNames = FieldNames {
    width: "width",
    height: "height",
    steps: "steps",
    guidance: "cfg_scale",
    sampler: "sampler_name",
    schedule: "scheduler",
    batch: "batch_size",
    clip_skip: "override_settings.CLIP_stop_at_last_layers",
    strength: "denoising_strength",
    seed: "seed",
    controlnet: ControlNetNames {
        list: "alwayson_scripts.controlnet.args",
        model: "model",
        image: "image",
        preprocessor: "module",
        scale: "weight",
        start: "guidance_start",
        end: "guidance_end",
        low: "threshold_a",
        high: "threshold_b",
    },
    hires: crate::request::A1111_HIRES_NAMES,
};

/// A1111 API defaults.
const DEFAULT_STEPS: u64 = 50;
const DEFAULT_CFG: f64 = 7.0;
const DEFAULT_SIZE: u64 = 512;
const DEFAULT_SAMPLER: &str = "Euler";
const DEFAULT_DENOISING: f64 = 0.75;

/// The fields of `/sdapi/v1/txt2img` and `/sdapi/v1/img2img` this worker honours (others are accepted and ignored).
#[derive(Debug, Deserialize)]
struct A1111Request {
    prompt: Option<String>,
    negative_prompt: Option<String>,
    seed: Option<i64>,
    subseed: Option<i64>,
    subseed_strength: Option<f64>,
    seed_resize_from_h: Option<i64>,
    seed_resize_from_w: Option<i64>,
    sampler_name: Option<String>,
    sampler_index: Option<String>,
    scheduler: Option<String>,
    batch_size: Option<u64>,
    n_iter: Option<u64>,
    steps: Option<u64>,
    cfg_scale: Option<f64>,
    width: Option<u64>,
    height: Option<u64>,
    override_settings: Option<Map<String, Value>>,
    send_images: Option<bool>,
    // img2img
    init_images: Option<Vec<String>>,
    mask: Option<String>,
    denoising_strength: Option<f64>,
    inpainting_mask_invert: Option<u64>,
    // txt2img hires fix
    enable_hr: Option<bool>,
    hr_scale: Option<f64>,
    hr_upscaler: Option<String>,
    hr_resize_x: Option<u64>,
    hr_resize_y: Option<u64>,
    hr_second_pass_steps: Option<u64>,
    // Extensions; only the ControlNet extension's units are read.
    alwayson_scripts: Option<Map<String, Value>>,
}

/// The units of A1111's ControlNet extension (`alwayson_scripts.controlnet.args`), disabled ones
/// left out, each with its index in the client's list.
fn controlnet_units(r: &A1111Request) -> Result<Vec<(usize, ControlNetRequest)>, ApiError> {
    let list = NAMES.controlnet.list;
    let Some(cn) = r.alwayson_scripts.as_ref().and_then(|s| s.get("controlnet").or_else(|| s.get("ControlNet"))) else {
        return Ok(Vec::new());
    };
    let args = cn.get("args").and_then(Value::as_array).ok_or_else(|| ApiError::invalid(list, "expected a list of ControlNet units"))?;
    let mut out = Vec::with_capacity(args.len());
    for (i, a) in args.iter().enumerate() {
        let f = |k: &str| format!("{list}[{i}].{k}");
        let o = a.as_object().ok_or_else(|| ApiError::invalid(format!("{list}[{i}]"), "expected an object"))?;
        if o.get("enabled").and_then(Value::as_bool) == Some(false) {
            continue;
        }
        let text = |k: &str| -> Result<Option<String>, ApiError> {
            match o.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(ApiError::invalid(f(k), "expected a string")),
            }
        };
        let num = |k: &str| -> Result<Option<f64>, ApiError> {
            match o.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v.as_f64().map(Some).ok_or_else(|| ApiError::invalid(f(k), "expected a number")),
            }
        };
        // The extension lists models as "name [hash]"; the hash is not part of the file name.
        let model = text("model")?.map(|m| match m.rsplit_once(" [") {
            Some((name, hash)) if hash.ends_with(']') => name.to_string(),
            _ => m,
        });
        // `image` is base64, or `{"image": base64, "mask": …}` in newer versions; `input_image` is the old name.
        let image = match o.get("image").or_else(|| o.get("input_image")) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Object(m)) => m.get("image").and_then(Value::as_str).map(String::from),
            Some(_) => return Err(ApiError::invalid(f("image"), "expected a base64 PNG or JPEG")),
        };
        let module = text("module")?;
        // Clients send threshold_a/b (often -1) for every module; they mean Canny's thresholds only there.
        let canny = module.as_deref().is_some_and(|m| m.eq_ignore_ascii_case("canny"));
        let threshold = |k: &str| -> Result<Option<f32>, ApiError> { Ok(num(k)?.filter(|v| canny && *v >= 0.0).map(|v| v as f32)) };
        out.push((
            i,
            ControlNetRequest {
                model,
                image,
                preprocessor: module,
                scale: num("weight")?,
                start: num("guidance_start")?,
                end: num("guidance_end")?,
                low_threshold: threshold("threshold_a")?,
                high_threshold: threshold("threshold_b")?,
            },
        ));
    }
    Ok(out)
}

/// Whether `requested` names `model` as A1111 clients write it: its name, its key, its file name, or its
/// title `file [hash]` (the hash, when given, must be the model's).
pub fn names_model(requested: &str, model: &ModelInfo) -> bool {
    let requested = requested.trim();
    let (name, hash) = match requested.rsplit_once(" [") {
        Some((n, h)) if h.ends_with(']') => (n.trim(), Some(h.trim_end_matches(']'))),
        _ => (requested, None),
    };
    let file = model_file_name(model).unwrap_or_default();
    let stem = file_stem_of(name);
    let name_ok = name == model.name || name == model.key || name == file || stem == model.name || stem == model.key;
    let hash_ok = match (hash, &model.sha256) {
        (Some(h), Some(full)) => full.starts_with(&h.to_ascii_lowercase()),
        _ => true,
    };
    name_ok && hash_ok
}

/// What `override_settings` asks for besides the checkpoint.
struct Overrides {
    /// The noise kind, when given.
    noise: Option<String>,
    /// Eta noise seed delta.
    ensd: u64,
    /// The VAE, when given (`Some(None)`: the model's loaded one).
    vae: Option<Option<String>>,
}

/// The `override_settings` this worker honours besides `sd_model_checkpoint` (resolved before): `sd_vae`
/// ("Automatic" or "None": the model's loaded VAE, else a `--vae-dir` VAE by name); `randn_source` picks
/// A1111's noise ("GPU" and "NV": what an NVIDIA GPU draws, "CPU": PyTorch's CPU generator, each image from
/// its own seed); `eta_noise_seed_delta` (ENSD) re-seeds the sampler's noise as A1111 does.
fn check_override_settings(st: &AppState, o: &Map<String, Value>) -> Result<Overrides, ApiError> {
    let text = |k: &str| o.get(k).and_then(Value::as_str);
    let vae = match text("sd_vae") {
        None => None,
        Some(v) => Some(resolve_vae(st, "override_settings.sd_vae", v)?),
    };
    let ensd = match o.get("eta_noise_seed_delta").filter(|d| !d.is_null()) {
        None => 0,
        Some(d) => d
            .as_u64()
            .or_else(|| d.as_str().and_then(|s| s.trim().parse().ok()))
            .ok_or_else(|| ApiError::invalid("override_settings.eta_noise_seed_delta", format!("{d} is not a non-negative integer")))?,
    };
    let noise = match text("randn_source").map(|s| s.to_ascii_uppercase()) {
        None => None,
        Some(s) if s == "CPU" => Some("a1111-cpu".into()),
        Some(s) if s == "GPU" || s == "NV" => Some("a1111-nv".into()),
        Some(s) => return Err(ApiError::invalid("override_settings.randn_source", format!("{s:?}: use \"GPU\", \"NV\" or \"CPU\""))),
    };
    Ok(Overrides { noise, ensd, vae })
}

/// A1111's `sd_vae` value: "Automatic" and "None" are the VAE each model loaded with (its own, or `--vae`),
/// anything else a `--vae-dir` VAE by file name or stem (or the `--vae` file's name).
fn resolve_vae(st: &AppState, field: &str, v: &str) -> Result<Option<String>, ApiError> {
    let v = v.trim();
    if v.is_empty() || v.eq_ignore_ascii_case("Automatic") || v.eq_ignore_ascii_case("None") {
        return Ok(None);
    }
    if let Some(p) = st.config.vae.as_deref() {
        if Some(std::ffi::OsStr::new(v)) == p.file_name() || std::path::Path::new(v).file_stem() == p.file_stem() {
            return Ok(None);
        }
    }
    match st.vaes.resolve(v) {
        Some(found) => Ok(Some(found.name)),
        None => {
            let known: Vec<String> = st.vaes.list().into_iter().map(|v| v.name).collect();
            Err(ApiError::invalid(field, format!("no VAE {v:?}; use \"Automatic\", \"None\" or one of the --vae-dir VAEs: [{}]", known.join(", "))))
        }
    }
}

fn common(r: &A1111Request) -> Result<CommonInput, ApiError> {
    // A1111's "resize seed from": both positive, else off (A1111 treats -1 and 0 as off).
    let mut seed_resize_from = None;
    if let (Some(h), Some(w)) = (r.seed_resize_from_h.filter(|v| *v > 0), r.seed_resize_from_w.filter(|v| *v > 0)) {
        for (field, v) in [("seed_resize_from_h", h), ("seed_resize_from_w", w)] {
            if v < 8 || v > sd_core::run::MAX_SIDE as i64 {
                return Err(ApiError::invalid(field, format!("{v} is outside 8..={} px", sd_core::run::MAX_SIDE)));
            }
        }
        seed_resize_from = Some((h as usize, w as usize));
    }
    if let Some(s) = r.subseed_strength {
        if !(0.0..=1.0).contains(&s) {
            return Err(ApiError::invalid("subseed_strength", format!("{s} is outside [0, 1]")));
        }
    }
    let batch = r.batch_size.unwrap_or(1);
    let n_iter = r.n_iter.unwrap_or(1);
    if n_iter == 0 {
        return Err(ApiError::invalid("n_iter", "must be at least 1"));
    }
    let clip_skip = match r.override_settings.as_ref().and_then(|o| o.get("CLIP_stop_at_last_layers")) {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_u64().ok_or_else(|| ApiError::invalid(NAMES.clip_skip, "expected a positive integer"))?),
    };
    Ok(CommonInput {
        prompt: r.prompt.clone().unwrap_or_default(),
        negative_prompt: r.negative_prompt.clone().unwrap_or_default(),
        width: Some(r.width.unwrap_or(DEFAULT_SIZE)),
        height: Some(r.height.unwrap_or(DEFAULT_SIZE)),
        steps: Some(r.steps.unwrap_or(DEFAULT_STEPS)),
        guidance_scale: Some(r.cfg_scale.unwrap_or(DEFAULT_CFG)),
        seed: r.seed,
        sampler: Some(r.sampler_name.clone().or_else(|| r.sampler_index.clone()).unwrap_or_else(|| DEFAULT_SAMPLER.into())),
        schedule: r.scheduler.clone(),
        // n_iter batches run as one larger batch.
        batch: Some(batch.saturating_mul(n_iter)),
        clip_skip,
        loras: Vec::new(),
        // A1111's default random source is "GPU": on NVIDIA cards, the noise `a1111-nv` reproduces.
        noise: Some("a1111-nv".into()),
        variation: r.subseed_strength.map(|s| (r.subseed.unwrap_or(-1), s)),
        eta_noise_seed_delta: 0,
        seed_resize_from,
        controlnets: controlnet_units(r)?,
        hires: r.enable_hr.unwrap_or(false).then(|| HiresInput {
            scale: r.hr_scale,
            resize_x: r.hr_resize_x,
            resize_y: r.hr_resize_y,
            upscaler: r.hr_upscaler.clone(),
            steps: r.hr_second_pass_steps,
            strength: r.denoising_strength,
        }),
        // A1111 and Forge have no standard field for it; the native API offers it.
        skip_layer_guidance: None,
    })
}

fn response(result: &JobResult, request: Value, model: &ModelInfo, send_images: bool) -> Json<Value> {
    let p = &result.parameters;
    let n = result.images.len();
    let info = json!({
        "prompt": p["prompt"],
        "all_prompts": vec![p["prompt"].clone(); n],
        "negative_prompt": p["negative_prompt"],
        "all_negative_prompts": vec![p["negative_prompt"].clone(); n],
        "seed": result.seed,
        "all_seeds": vec![result.seed; n],
        "subseed": p["subseed"],
        "all_subseeds": (0..n).map(|i| p["subseed"].as_i64().map_or(-1, |s| s + i as i64)).collect::<Vec<_>>(),
        "subseed_strength": p["subseed_strength"],
        "width": p["width"],
        "height": p["height"],
        "sampler_name": p["sampler"],
        "cfg_scale": p["guidance_scale"],
        "steps": p["steps"],
        "batch_size": n,
        "restore_faces": false,
        "sd_model_name": model.name,
        "sd_model_hash": model.sha256.as_ref().map(|h| crate::models::short_hash(h).to_string()),
        "denoising_strength": p["strength"],
        "clip_skip": p["clip_skip"],
        "infotexts": vec![result.infotext.clone(); n],
        "styles": [],
        "job_timestamp": unix_now().to_string(),
        "is_using_inpainting_conditioning": model.caps.inpaint_model && p["operation"] == "image_inpaint",
    });
    let images: &[String] = if send_images { &result.images } else { &[] };
    Json(json!({"images": images, "parameters": request, "info": info.to_string()}))
}

async fn run(st: Arc<AppState>, caller: Caller, body: Bytes, img2img: bool) -> Result<Json<Value>, ApiError> {
    st.ready_model()?;
    let (request, r) = blocking(move || {
        let obj = parse_json_object(&body)?;
        let request = Value::Object(obj.clone());
        let r: A1111Request = from_value(Value::Object(obj))?;
        Ok((request, r))
    })
    .await?;
    // As A1111: `override_settings.sd_model_checkpoint` runs this request on that checkpoint (loading it if
    // needed) without changing the model later requests get.
    let model = match r.override_settings.as_ref().and_then(|o| o.get("sd_model_checkpoint")).filter(|v| !v.is_null()) {
        None => st.active_model().await?,
        Some(v) => {
            let field = "override_settings.sd_model_checkpoint";
            let name = v.as_str().ok_or_else(|| ApiError::invalid(field, "expected a string"))?;
            st.model_for(field, name).await?
        }
    };
    let (st2, model2) = (st.clone(), model.clone());
    let (spec, params, request, send_images) = blocking(move || {
        let mut input = common(&r)?;
        let mut vae = st2.active_vae();
        if let Some(o) = &r.override_settings {
            let over = check_override_settings(&st2, o)?;
            if let Some(noise) = over.noise {
                input.noise = Some(noise);
            }
            input.eta_noise_seed_delta = over.ensd;
            if let Some(chosen) = over.vae {
                vae = chosen;
            }
        }
        let op = if img2img {
            let first = r.init_images.as_ref().and_then(|v| v.first()).ok_or_else(|| ApiError::invalid("init_images", "missing; send one base64 image"))?;
            let image = decode_image("init_images[0]", first)?;
            match r.mask.as_deref().filter(|m| !m.is_empty()) {
                Some(m) => {
                    let mut mask = decode_image("mask", m)?;
                    if r.inpainting_mask_invert.unwrap_or(0) == 1 {
                        mask.invert();
                    }
                    OpInput::Inpaint { image, image_field: "init_images[0]", mask, mask_field: "mask", strength: Some(r.denoising_strength.unwrap_or(DEFAULT_DENOISING)) }
                }
                None => OpInput::Transform { image, image_field: "init_images[0]", strength: Some(r.denoising_strength.unwrap_or(DEFAULT_DENOISING)) },
            }
        } else {
            OpInput::Generation
        };
        let (mut spec, mut params) = build_job(&st2, &model2, input, &NAMES, op)?;
        // As A1111: an interrupted (or skipped) generation answers with the images of its last step.
        spec.partial_on_cancel = true;
        // A1111's `sd_vae` swaps the VAE of SD 1.x/2.x/XL models; the newer families decode with their own.
        if vae.is_some() && matches!(model2.caps.family, sd_core::ModelFamily::Sd1 | sd_core::ModelFamily::Sd2 | sd_core::ModelFamily::Sdxl) {
            params["vae"] = json!(vae);
            spec.vae = vae;
        }
        Ok((spec, params, request, r.send_images.unwrap_or(true)))
    })
    .await?;
    let result = run_sync(&st, caller, spec, params).await?;
    Ok(response(&result, request, &model, send_images))
}

/// `POST /sdapi/v1/txt2img`.
pub async fn txt2img(State(st): St, caller: Caller, body: Result<Bytes, BytesRejection>) -> Result<Json<Value>, ApiError> {
    let body = body_bytes(&st, body)?;
    run(st, caller, body, false).await
}

/// `POST /sdapi/v1/img2img` (inpainting when `mask` is set; white repaints, as in A1111).
pub async fn img2img(State(st): St, caller: Caller, body: Result<Bytes, BytesRejection>) -> Result<Json<Value>, ApiError> {
    let body = body_bytes(&st, body)?;
    run(st, caller, body, true).await
}

/// Query of `/sdapi/v1/progress`.
#[derive(Debug, Deserialize)]
pub struct ProgressQuery {
    skip_current_image: Option<bool>,
}

/// `GET /sdapi/v1/progress`: the running job's progress and current preview.
pub async fn progress(State(st): St, q: Result<Query<ProgressQuery>, QueryRejection>) -> Json<Value> {
    let skip_image = q.ok().and_then(|Query(q)| q.skip_current_image).unwrap_or(false);
    let waiting = st.queue_depth();
    let Some(job) = st.current() else {
        return Json(json!({
            "progress": 0.0, "eta_relative": 0.0,
            "state": {"skipped": false, "interrupted": false, "stopping_generation": false, "job": "", "job_count": waiting,
                      "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0},
            "current_image": Value::Null, "textinfo": Value::Null, "current_task": Value::Null,
        }));
    };
    let (step, total, preview, started) = job.with_inner(|g| {
        (g.progress.map_or(0, |p| p.step), g.progress.map_or(0, |p| p.total), g.preview.as_ref().map(|p| p.image.clone()), g.started_at)
    });
    let fraction = if total == 0 { 0.0 } else { step as f64 / total as f64 };
    let elapsed = started.map_or(0.0, |s| unix_now().saturating_sub(s) as f64);
    let eta = if fraction > 0.0 { elapsed * (1.0 - fraction) / fraction } else { 0.0 };
    Json(json!({
        "progress": fraction,
        "eta_relative": eta,
        "state": {"skipped": false, "interrupted": job.cancel_requested(), "stopping_generation": false, "job": job.id,
                  "job_count": waiting + 1, "job_timestamp": job.created_at.to_string(), "job_no": 0,
                  "sampling_step": step, "sampling_steps": total},
        "current_image": if skip_image { Value::Null } else { preview.map_or(Value::Null, Value::String) },
        "textinfo": Value::Null,
        "current_task": job.id,
    }))
}

/// `GET /sdapi/v1/loras`: the LoRAs of the configured folders, by the names `<lora:name:weight>` takes.
pub async fn loras(State(st): St) -> Json<Value> {
    let list = st.loras.list().into_iter().map(|l| json!({"name": l.name, "alias": l.name, "path": l.path, "metadata": {}}));
    Json(Value::Array(list.collect()))
}

/// `POST /sdapi/v1/refresh-loras`, `/refresh-vae`: nothing to rescan — the LoRA folders are listed afresh on
/// every request, and the VAE is the one given at startup — so they answer as A1111 does (`null`) once the
/// model is ready.
pub async fn refresh(State(st): St) -> Result<Json<Value>, ApiError> {
    st.ready_model()?;
    Ok(Json(Value::Null))
}

/// `POST /sdapi/v1/refresh-embeddings`: reads `--embeddings-dir` afresh into the loaded models (files added,
/// changed or removed since are picked up without reloading the model).
pub async fn refresh_embeddings(State(st): St) -> Result<Json<Value>, ApiError> {
    st.ready_model()?;
    st.reload_embeddings().await?;
    Ok(Json(Value::Null))
}

/// `POST /sdapi/v1/refresh-checkpoints`: rescans `--models-dir`.
pub async fn refresh_checkpoints(State(st): St) -> Result<Json<Value>, ApiError> {
    st.ready_model()?;
    let st2 = st.clone();
    let n = blocking(move || Ok(st2.catalog.refresh())).await?;
    tracing::info!(checkpoints = n, "models folders rescanned");
    Ok(Json(Value::Null))
}

/// `GET /sdapi/v1/embeddings`: the textual-inversion embeddings of `--embeddings-dir` loaded with the
/// model, and those skipped (another model's), in A1111's shape.
pub async fn embeddings(State(st): St) -> Result<Json<Value>, ApiError> {
    let model = st.ready_model()?;
    let entry = |e: &crate::state::EmbeddingEntry| {
        json!({"step": Value::Null, "sd_checkpoint": Value::Null, "sd_checkpoint_name": Value::Null, "shape": e.width, "vectors": e.vectors})
    };
    let loaded: serde_json::Map<String, Value> = model.embeddings.loaded.iter().map(|e| (e.name.clone(), entry(e))).collect();
    let skipped: serde_json::Map<String, Value> = model.embeddings.skipped.iter().map(|e| (e.name.clone(), entry(e))).collect();
    Ok(Json(json!({"loaded": loaded, "skipped": skipped})))
}

/// `GET /sdapi/v1/sd-vae`: the VAE given with `--vae`, if any, and the `--vae-dir` VAEs `sd_vae` may name.
pub async fn sd_vae(State(st): St) -> Result<Json<Value>, ApiError> {
    let mut list: Vec<Value> = st
        .config
        .vae
        .iter()
        .map(|p| {
            let name = p.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            json!({"model_name": name, "filename": p.display().to_string()})
        })
        .collect();
    let found = blocking(move || Ok(st.vaes.list())).await?;
    list.extend(found.into_iter().map(|v| json!({"model_name": v.name, "filename": v.path.display().to_string()})));
    Ok(Json(Value::Array(list)))
}

/// `GET /sdapi/v1/upscalers`: A1111's built-in "None", "Lanczos" and "Nearest", then the ESRGAN-family
/// models of `--upscaler-dir` by file stem, with the scale read from their weights.
pub async fn upscalers(State(st): St) -> Result<Json<Value>, ApiError> {
    let list = blocking(move || Ok(st.upscalers.list())).await?;
    let mut out = vec![
        json!({"name": "None", "model_name": Value::Null, "model_path": Value::Null, "model_url": Value::Null, "scale": 4}),
        json!({"name": "Lanczos", "model_name": Value::Null, "model_path": Value::Null, "model_url": Value::Null, "scale": 4}),
        json!({"name": "Nearest", "model_name": Value::Null, "model_path": Value::Null, "model_url": Value::Null, "scale": 4}),
    ];
    out.extend(list.into_iter().filter(|u| u.scale.is_some()).map(|u| {
        json!({"name": u.name, "model_name": "ESRGAN", "model_path": u.path, "model_url": Value::Null, "scale": u.scale})
    }));
    Ok(Json(Value::Array(out)))
}

/// `GET /sdapi/v1/latent-upscale-modes`: the latent upscalers `hr_upscaler` takes.
pub async fn latent_upscale_modes() -> Json<Value> {
    Json(json!([{"name": "Latent"}, {"name": "Latent (nearest)"}]))
}

/// A1111's extras request fields (single image and batch).
#[derive(Debug, Deserialize)]
struct ExtrasRequest {
    resize_mode: Option<u8>,
    gfpgan_visibility: Option<f64>,
    codeformer_visibility: Option<f64>,
    upscaling_resize: Option<f64>,
    upscaling_resize_w: Option<u32>,
    upscaling_resize_h: Option<u32>,
    upscaling_crop: Option<bool>,
    upscaler_1: Option<String>,
    upscaler_2: Option<String>,
    extras_upscaler_2_visibility: Option<f64>,
    image: Option<String>,
    #[serde(rename = "imageList")]
    image_list: Option<Vec<ExtrasBatchImage>>,
}

/// One picture of `/sdapi/v1/extra-batch-images`.
#[derive(Debug, Deserialize)]
struct ExtrasBatchImage {
    data: String,
}

fn upscaler_choice(st: &AppState, field: &str, name: Option<&str>) -> Result<Option<crate::state::UpscalerChoice>, ApiError> {
    use crate::state::UpscalerChoice;
    let name = name.unwrap_or("None").trim();
    Ok(match name.to_ascii_lowercase().as_str() {
        "none" | "" => None,
        "lanczos" => Some(UpscalerChoice::Lanczos),
        "nearest" => Some(UpscalerChoice::Nearest),
        _ => Some(UpscalerChoice::Model(st.upscalers.resolve(name).ok_or_else(|| {
            let known: Vec<String> = st.upscalers.list().into_iter().map(|u| u.name).collect();
            ApiError::invalid(field, format!("no upscaler {name:?}; use None, Lanczos, Nearest or one of the models of --upscaler-dir: [{}]", known.join(", ")))
        })?)),
    })
}

/// Validates an extras request into the engine's work and the `html_info` line A1111 answers with; `None`
/// when `upscaler_1` is "None" (A1111 then returns the pictures unchanged, whatever `upscaler_2` says).
fn extras_request(st: &AppState, r: ExtrasRequest, images: Vec<(String, String)>) -> Result<(Option<crate::state::UpscaleRequest>, Vec<image::DynamicImage>, String), ApiError> {
    use crate::state::UpscalerChoice;
    for (field, v) in [("gfpgan_visibility", r.gfpgan_visibility), ("codeformer_visibility", r.codeformer_visibility)] {
        if v.is_some_and(|v| v > 0.0) {
            return Err(ApiError::invalid(field, "face restoration (GFPGAN, CodeFormer) is not available here; send 0"));
        }
    }
    let first = upscaler_choice(st, "upscaler_1", r.upscaler_1.as_deref())?;
    let visibility = r.extras_upscaler_2_visibility.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&visibility) {
        return Err(ApiError::invalid("extras_upscaler_2_visibility", format!("{visibility} is outside [0, 1]")));
    }
    let second = match upscaler_choice(st, "upscaler_2", r.upscaler_2.as_deref())? {
        Some(c) if visibility > 0.0 => Some((c, visibility as f32)),
        _ => None,
    };
    let mode = r.resize_mode.unwrap_or(0);
    if mode > 1 {
        return Err(ApiError::invalid("resize_mode", format!("{mode} is not 0 (scale by upscaling_resize) or 1 (to upscaling_resize_w × upscaling_resize_h)")));
    }
    let by = r.upscaling_resize.unwrap_or(2.0);
    if mode == 0 && (!by.is_finite() || !(1.0..=8.0).contains(&by)) {
        return Err(ApiError::invalid("upscaling_resize", format!("{by} is outside 1..=8")));
    }
    let (tw, th) = (r.upscaling_resize_w.unwrap_or(512), r.upscaling_resize_h.unwrap_or(512));
    let limit = (st.config.limits.max_width.max(st.config.limits.max_height) * 2) as u32;
    if mode == 1 {
        for (field, v) in [("upscaling_resize_w", tw), ("upscaling_resize_h", th)] {
            if v == 0 || v > limit {
                return Err(ApiError::invalid(field, format!("{v} is outside 1..={limit}")));
            }
        }
    }
    let decoded = images.iter().map(|(field, b64)| decode_image(field, b64)).collect::<Result<Vec<_>, _>>()?;
    let Some(first) = first else { return Ok((None, decoded, String::new())) };
    let mut work = Vec::with_capacity(decoded.len());
    for img in decoded {
        // A1111's postprocessing upscale: "to" a size is "by" the larger ratio (then centre-cropped when asked).
        let scale = if mode == 1 { (f64::from(tw) / f64::from(img.width())).max(f64::from(th) / f64::from(img.height())) } else { by };
        let side = |v: u32| (f64::from(v) * scale / 8.0).floor() * 8.0;
        let (w, h) = (side(img.width()), side(img.height()));
        if w > f64::from(limit) * 2.0 || h > f64::from(limit) * 2.0 || (mode == 0 && (w > f64::from(limit) || h > f64::from(limit))) {
            let field = if mode == 1 { "upscaling_resize_w" } else { "upscaling_resize" };
            return Err(ApiError::invalid(field, format!("the result would be {w}×{h}; this worker makes at most {limit}×{limit}")));
        }
        work.push((img, scale));
    }
    let crop = (mode == 1 && r.upscaling_crop.unwrap_or(true)).then_some((tw, th));
    let name = |c: &UpscalerChoice| match c {
        UpscalerChoice::Lanczos => "Lanczos".to_string(),
        UpscalerChoice::Nearest => "Nearest".to_string(),
        UpscalerChoice::Model(m) => m.name.clone(),
    };
    let mut info = if mode == 1 { format!("Postprocess upscale to: {tw}x{th}") } else { format!("Postprocess upscale by: {by}") };
    info.push_str(&format!(", Postprocess upscaler: {}", name(&first)));
    if let Some((c, v)) = &second {
        info.push_str(&format!(", Postprocess upscaler 2: {}, Postprocess upscaler 2 visibility: {v}", name(c)));
    }
    Ok((Some(crate::state::UpscaleRequest { images: work, crop, first, second }), Vec::new(), info))
}

async fn extras(st: Arc<AppState>, body: Bytes, batch: bool) -> Result<(Vec<String>, String), ApiError> {
    st.ready_model()?;
    let st2 = st.clone();
    let (request, unchanged, info) = blocking(move || {
        let r: ExtrasRequest = from_value(Value::Object(parse_json_object(&body)?))?;
        let images: Vec<(String, String)> = if batch {
            let list = r.image_list.as_deref().unwrap_or_default();
            if list.is_empty() {
                return Err(ApiError::invalid("imageList", "missing; send [{\"data\": base64 image, \"name\": ...}]"));
            }
            if list.len() > st2.config.limits.max_batch {
                return Err(ApiError::invalid("imageList", format!("{} images; at most {} per request", list.len(), st2.config.limits.max_batch)));
            }
            list.iter().enumerate().map(|(i, b)| (format!("imageList[{i}].data"), b.data.clone())).collect()
        } else {
            let image = r.image.clone().filter(|s| !s.is_empty()).ok_or_else(|| ApiError::invalid("image", "missing; send a base64 PNG or JPEG"))?;
            vec![("image".to_string(), image)]
        };
        extras_request(&st2, r, images)
    })
    .await?;
    let pictures = match request {
        Some(request) => st.upscale(request).await?,
        None => unchanged,
    };
    let encoded = blocking(move || {
        pictures
            .iter()
            .map(|p| sd_core::image_io::encode_png(&p.to_rgb8(), None).map(|png| crate::engine::b64(&png)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, "internal_error", None, e.to_string()))
    })
    .await?;
    Ok((encoded, if info.is_empty() { String::new() } else { format!("<p>{info}</p>") }))
}

/// `POST /sdapi/v1/extra-single-image`: A1111's extras upscale of one picture — `upscaler_1` (None, Lanczos,
/// Nearest or an `--upscaler-dir` model, applied as A1111 does: repeatedly until the target is reached, then
/// Lanczos to the exact size), `upscaler_2` blended in at `extras_upscaler_2_visibility`, `resize_mode` 0
/// (`upscaling_resize`, 2) or 1 (`upscaling_resize_w`×`_h`, centre-cropped with `upscaling_crop`). Face
/// restoration is refused by field. Runs on the engine between jobs; answers `{"html_info", "image"}`.
pub async fn extra_single_image(State(st): St, body: Result<Bytes, BytesRejection>) -> Result<Json<Value>, ApiError> {
    let body = body_bytes(&st, body)?;
    let (mut images, info) = extras(st, body, false).await?;
    Ok(Json(json!({"html_info": info, "image": images.pop().unwrap_or_default()})))
}

/// `POST /sdapi/v1/extra-batch-images`: [`extra_single_image`] over `imageList` (`[{"data", "name"}]`);
/// answers `{"html_info", "images"}`.
pub async fn extra_batch_images(State(st): St, body: Result<Bytes, BytesRejection>) -> Result<Json<Value>, ApiError> {
    let body = body_bytes(&st, body)?;
    let (images, info) = extras(st, body, true).await?;
    Ok(Json(json!({"html_info": info, "images": images})))
}

/// `POST /sdapi/v1/png-info` `{"image": base64 PNG}`: the PNG's `parameters` text (`info`) and, as A1111,
/// its fields parsed (`parameters`: `Prompt`, `Negative prompt`, `Steps`, …, `Size-1`/`Size-2`).
pub async fn png_info(State(st): St, body: Result<Bytes, BytesRejection>) -> Result<Json<Value>, ApiError> {
    let body = body_bytes(&st, body)?;
    blocking(move || {
        let obj = parse_json_object(&body)?;
        let image = obj.get("image").and_then(Value::as_str).ok_or_else(|| ApiError::invalid("image", "send the PNG as a base64 string"))?;
        let bytes = decode_base64("image", image)?;
        let text = if bytes.starts_with(b"\x89PNG") {
            sd_core::image_io::read_png_parameters(&bytes).map_err(|e| ApiError::invalid("image", e.to_string()))?.unwrap_or_default()
        } else {
            String::new()
        };
        let parameters = parse_infotext(&text);
        Ok(Json(json!({"info": text, "items": {"parameters": text}, "parameters": parameters})))
    })
    .await
}

/// A1111's infotext as fields: the prompt lines, `Negative prompt:` lines, then `Key: value` pairs
/// (values may be quoted and contain commas).
pub fn parse_infotext(text: &str) -> Map<String, Value> {
    let mut out = Map::new();
    if text.trim().is_empty() {
        return out;
    }
    let mut lines: Vec<&str> = text.lines().collect();
    let settings = match lines.last() {
        Some(last) if last.contains("Steps:") || (lines.len() > 1 && last.contains(": ")) => lines.pop().unwrap_or_default(),
        _ => "",
    };
    let (mut prompt, mut negative, mut in_negative) = (Vec::new(), Vec::new(), false);
    for l in lines {
        if let Some(rest) = l.strip_prefix("Negative prompt:") {
            in_negative = true;
            negative.push(rest.trim_start());
        } else if in_negative {
            negative.push(l);
        } else {
            prompt.push(l);
        }
    }
    out.insert("Prompt".into(), json!(prompt.join("\n")));
    out.insert("Negative prompt".into(), json!(negative.join("\n")));
    let mut rest = settings.trim();
    while let Some((key, after)) = rest.split_once(':') {
        let after = after.trim_start();
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            let mut end = None;
            let mut escaped = false;
            for (i, c) in quoted.char_indices() {
                match c {
                    '\\' if !escaped => escaped = true,
                    '"' if !escaped => {
                        end = Some(i);
                        break;
                    }
                    _ => escaped = false,
                }
            }
            match end {
                Some(i) => (format!("\"{}\"", &quoted[..i]), quoted[i + 1..].trim_start().strip_prefix(',').unwrap_or("")),
                None => (after.to_string(), ""),
            }
        } else {
            match after.split_once(',') {
                Some((v, n)) => (v.trim().to_string(), n),
                None => (after.trim().to_string(), ""),
            }
        };
        let key = key.trim();
        if key == "Size" {
            if let Some((w, h)) = value.split_once('x') {
                out.insert("Size-1".into(), json!(w));
                out.insert("Size-2".into(), json!(h));
            }
        }
        out.insert(key.to_string(), json!(value.trim_matches('"')));
        rest = next.trim_start();
    }
    out
}

/// `GET /controlnet/model_list`: the ControlNets of the configured folders, as the extension lists them.
pub async fn controlnet_models(State(st): St) -> Json<Value> {
    Json(json!({"model_list": st.controlnets.list().into_iter().map(|c| c.name).collect::<Vec<_>>()}))
}

/// `GET /controlnet/module_list`: the preprocessors this worker runs.
pub async fn controlnet_modules() -> Json<Value> {
    Json(json!({"module_list": sd_controlnet::preprocess::PREPROCESSOR_NAMES}))
}

/// `GET /controlnet/version`: the extension API version this worker's ControlNet fields follow.
pub async fn controlnet_version() -> Json<Value> {
    Json(json!({"version": 2}))
}

/// `POST /sdapi/v1/skip`: as A1111's skip of the current image; a job here is one batch, so it ends the
/// running job as an interrupt does (an A1111 request gets the images of its last step).
pub async fn skip(st: State<Arc<AppState>>, caller: Caller) -> Json<Value> {
    interrupt(st, caller).await
}

/// `POST /sdapi/v1/interrupt`: stops the running job within one step (an A1111 request then answers
/// with the images of its last step, as A1111 does; native and OpenAI jobs end cancelled).
pub async fn interrupt(State(st): St, caller: Caller) -> Json<Value> {
    // Only the caller's own job: another client's generation is not theirs to stop.
    if let Some(job) = st.current().filter(|j| j.owner == caller.0) {
        st.cancel(&job, JobError::new("cancelled", "interrupted"));
    }
    Json(json!({}))
}

/// `GET /sdapi/v1/samplers`.
pub async fn samplers() -> Json<Value> {
    let mut out = Vec::new();
    for k in SamplerKind::ALL {
        out.push(json!({"name": k.display_name(), "aliases": [k.id()], "options": {}}));
        if k.supports_sigma_schedules() {
            out.push(json!({"name": format!("{} Karras", k.display_name()), "aliases": [format!("{}_karras", k.id())], "options": {"scheduler": "karras"}}));
        }
    }
    Json(Value::Array(out))
}

/// `GET /sdapi/v1/schedulers`: A1111's names and labels of the sigma schedules the samplers take (the
/// `scheduler` field accepts either).
pub async fn schedulers() -> Json<Value> {
    use sd_pipelines::schedulers::SigmaSchedule;
    let mut out: Vec<Value> = Vec::new();
    for s in SigmaSchedule::ALL {
        let (name, label) = s.a1111();
        if out.iter().any(|v| v["name"] == name) {
            continue;
        }
        let rho = if s == SigmaSchedule::Karras { json!(7.0) } else { json!(-1) };
        let inner = matches!(s, SigmaSchedule::SgmUniform | SigmaSchedule::Simple | SigmaSchedule::DdimUniform | SigmaSchedule::Beta);
        out.push(json!({"name": name, "label": label, "aliases": Value::Null, "default_rho": rho, "need_inner_model": inner}));
    }
    Json(Value::Array(out))
}

/// `GET /sdapi/v1/sd-models`: the `-m` model and the checkpoints of `--models-dir` (hashes once computed:
/// a checkpoint is hashed when it first loads, as A1111 does).
pub async fn sd_models(State(st): St) -> Result<Json<Value>, ApiError> {
    let m = st.ready_model()?;
    // Each listed file's hash cache lookup reads its metadata: off the async threads.
    blocking(move || Ok(sd_model_list(&st, &m))).await
}

fn sd_model_list(st: &AppState, m: &ModelInfo) -> Json<Value> {
    // One entry in A1111's shape.
    let entry = |title: String, model_name: &str, sha256: Option<&String>, filename: String| {
        json!({
            "title": title, "model_name": model_name, "hash": sha256.map(|h| crate::models::short_hash(h).to_string()),
            "sha256": sha256, "filename": filename, "config": Value::Null,
        })
    };
    let model = |m: &ModelInfo| entry(title(m), &m.name, m.sha256.as_ref(), m.source.clone());
    let mut out = Vec::new();
    let checkpoints = st.checkpoints();
    let primary = st.model_info(&st.primary_key);
    if let Some(p) = primary.as_ref().filter(|_| checkpoints.iter().all(|c| c.name != st.primary_key)) {
        out.push(model(p));
    }
    for c in checkpoints {
        let filename = if c.path.as_os_str().is_empty() { c.file_name.clone() } else { c.path.display().to_string() };
        out.push(entry(c.title(), &c.name.replace('/', "_"), c.cached_sha256().as_ref(), filename));
    }
    if out.is_empty() {
        out.push(model(m));
    }
    Json(Value::Array(out))
}

/// A1111's title of the model: `file.safetensors [short hash]` for a single file, else its name.
fn title(m: &ModelInfo) -> String {
    match &m.sha256 {
        Some(h) => format!("{} [{}]", model_file_name(m).unwrap_or_else(|| m.name.clone()), crate::models::short_hash(h)),
        None => m.name.clone(),
    }
}

/// The model's file name as A1111 lists it: relative to its models folder (`xl/juggernaut.safetensors`), or
/// the source's file name.
fn model_file_name(m: &ModelInfo) -> Option<String> {
    if let Some(f) = &m.file_name {
        return Some(f.clone());
    }
    let source = std::path::Path::new(&m.source);
    if m.key.is_empty() {
        return source.file_name().map(|f| f.to_string_lossy().into_owned());
    }
    Some(match source.extension().filter(|_| source.is_file()) {
        Some(ext) => format!("{}.{}", m.key, ext.to_string_lossy()),
        None => m.key.clone(),
    })
}

/// `dir/name.ext` → `dir/name`.
fn file_stem_of(name: &str) -> &str {
    match name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() && !ext.contains('/') => stem,
        _ => name,
    }
}

/// `POST /sdapi/v1/options`: how A1111 clients pick a checkpoint. `sd_model_checkpoint` names the `-m` model
/// or a `--models-dir` checkpoint (name, file name or `file [hash]` title); as in A1111 the call returns once
/// it is loaded, after the jobs queued before it (which keep the model they were submitted for), and later
/// requests use it. An unknown name is a 400 naming the field; a checkpoint that fails to load a 422, and the
/// model in use stays. Other settings are accepted and have no effect here.
pub async fn set_options(State(st): St, body: Result<Bytes, BytesRejection>) -> Result<Json<Value>, ApiError> {
    let body = body_bytes(&st, body)?;
    st.ready_model()?;
    let obj = parse_json_object(&body)?;
    let vae = match obj.get("sd_vae").filter(|v| !v.is_null()) {
        None => None,
        Some(v) => Some(resolve_vae(&st, "sd_vae", v.as_str().ok_or_else(|| ApiError::invalid("sd_vae", "expected a string"))?)?),
    };
    if let Some(v) = obj.get("sd_model_checkpoint").filter(|v| !v.is_null()) {
        let requested = v.as_str().ok_or_else(|| ApiError::invalid("sd_model_checkpoint", "expected a string"))?;
        let key = st.resolve_model("sd_model_checkpoint", requested)?;
        st.switch_model("sd_model_checkpoint", &key).await?;
    }
    if let Some(vae) = vae {
        st.set_active_vae(vae);
    }
    Ok(Json(Value::Null))
}

/// `GET /sdapi/v1/options`: the settings front ends read at startup.
pub async fn options(State(st): St) -> Result<Json<Value>, ApiError> {
    let m = st.active_model().await?;
    let vae = st.active_vae().unwrap_or_else(|| "Automatic".into());
    Ok(Json(json!({"sd_model_checkpoint": title(&m), "sd_vae": vae, "CLIP_stop_at_last_layers": 1, "samples_format": "png"})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn infotext_parses_as_a1111_does() {
        let text = "a cat, (red:1.2)\nsecond line\nNegative prompt: blurry, low\nSteps: 20, Sampler: DPM++ 2M, CFG scale: 7, Seed: 42, Size: 512x768, Lora weights: \"a: 1, b: 0.5\", Model: sd15";
        let m = parse_infotext(text);
        assert_eq!(m["Prompt"], "a cat, (red:1.2)\nsecond line");
        assert_eq!(m["Negative prompt"], "blurry, low");
        assert_eq!(m["Steps"], "20");
        assert_eq!(m["Sampler"], "DPM++ 2M");
        assert_eq!((m["Size-1"].clone(), m["Size-2"].clone()), (json!("512"), json!("768")));
        assert_eq!(m["Lora weights"], "a: 1, b: 0.5");
        assert_eq!(m["Model"], "sd15");
        assert!(parse_infotext("").is_empty());
        assert_eq!(parse_infotext("just a prompt")["Prompt"], "just a prompt");
    }
}
