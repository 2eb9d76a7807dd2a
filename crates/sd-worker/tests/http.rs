//! Integration tests: the real router on a real socket (127.0.0.1), the tiny fixture models, and a
//! plain HTTP/1.1 client, so every byte goes over the wire as a client would send it.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use sd_worker::WorkerConfig;
use serde_json::{json, Value};
use support::*;

#[test]
fn txt2img_streams_progress_previews_and_a_png_with_metadata() {
    let s = Server::start(config("sd15"));
    let models = s.get("/v1/models").json();
    assert_eq!(models["data"][0]["variant"], "sd15");
    let id = s.submit(&json!({"operation": "image_generation", "prompt": "a red fox", "negative_prompt": "blurry",
        "width": 32, "height": 48, "steps": 6, "seed": 42, "sampler": "Euler a", "batch": 2, "guidance_scale": 5.0}));
    let events = s.stream(&id);
    let progress: Vec<usize> = events.iter().filter(|e| e.0 == "progress").map(|e| e.1["step"].as_u64().expect("step") as usize).collect();
    assert!(!progress.is_empty(), "{events:?}");
    assert!(progress.windows(2).all(|w| w[0] < w[1]), "progress out of order: {progress:?}");
    assert_eq!(progress.last(), Some(&6));
    for e in events.iter().filter(|e| e.0 == "progress") {
        assert_eq!(e.1["total"], 6);
        assert!(e.1["percent"].as_f64().is_some());
    }
    let previews: Vec<&Value> = events.iter().filter(|e| e.0 == "preview").map(|e| &e.1).collect();
    assert!(!previews.is_empty());
    for p in &previews {
        let img = decode_png(p["image"].as_str().expect("preview image"));
        assert!(img.width() <= 32 && img.height() <= 48 && img.width() > 0);
    }
    let (last, complete) = events.last().expect("events");
    assert_eq!(last, "complete");
    assert_eq!(complete["seed"], 42);
    assert_eq!(complete["parameters"]["sampler"], "Euler a");
    let images = complete["images"].as_array().expect("images");
    assert_eq!(images.len(), 2);
    for b in images {
        let bytes = unb64(b.as_str().expect("b64"));
        let img = image::load_from_memory(&bytes).expect("png");
        assert_eq!((img.width(), img.height()), (32, 48));
        let meta = sd_pipelines::image_io::read_png_parameters(&bytes).expect("png").expect("parameters chunk");
        assert!(meta.starts_with("a red fox\nNegative prompt: blurry\n"), "{meta}");
        assert!(meta.contains("Steps: 6") && meta.contains("Seed: 42") && meta.contains("Size: 32x48") && meta.contains("Sampler: Euler a"), "{meta}");
    }
    // Status and result by id; a late subscriber gets the final state instead of a 404.
    let st = s.get(&format!("/v1/jobs/{id}?include_images=true")).json();
    assert_eq!(st["status"], "completed");
    assert_eq!(st["result"]["images"].as_array().map(Vec::len), Some(2));
    // Without include_images a status poll carries each image's URL, not its bytes.
    let plain = s.get(&format!("/v1/jobs/{id}")).json();
    assert!(plain["result"].get("images").is_none(), "{plain}");
    let urls = plain["result"]["image_urls"].as_array().cloned().unwrap_or_default();
    assert_eq!(urls.len(), 2, "{plain}");
    for (url, b64) in urls.iter().zip(complete["images"].as_array().cloned().unwrap_or_default()) {
        let r = s.get(url.as_str().expect("url"));
        assert_eq!(r.status, 200);
        assert_eq!(r.body, unb64(b64.as_str().expect("b64")), "the PNG at {url} is the streamed one");
    }
    assert_eq!(s.get(&format!("/v1/jobs/{id}/images/2")).status, 404);
    assert_eq!(s.get(&format!("/v1/jobs/{id}?include_images=maybe")).status, 400);
    let late = s.stream(&id);
    assert_eq!(late.last().map(|e| e.0.as_str()), Some("complete"));
    assert_eq!(late.last().map(|e| &e.1["images"]), Some(&complete["images"]));
    // Same seed, same images.
    let id2 = s.submit(&json!({"operation": "image_generation", "prompt": "a red fox", "negative_prompt": "blurry",
        "width": 32, "height": 48, "steps": 6, "seed": 42, "sampler": "Euler a", "batch": 2, "guidance_scale": 5.0}));
    assert_eq!(s.stream(&id2).last().map(|e| &e.1["images"]), Some(&complete["images"]));
    let metrics = s.get("/metrics");
    assert!(metrics.header("content-type").unwrap_or_default().starts_with("text/plain"));
    let m = metrics.text();
    assert!(m.contains("sd_worker_jobs_total{outcome=\"completed\"} 2"), "{m}");
    assert!(m.contains("sd_worker_step_seconds_count 12"), "{m}");
    assert!(m.contains("sd_worker_queue_depth 0"), "{m}");
    s.shutdown();
}

#[test]
fn img2img_and_inpaint_jobs_complete() {
    let s = Server::start(config("sd15"));
    let id = s.submit(&json!({"operation": "image_transform", "prompt": "a painting", "input_image": b64(&test_image()),
        "strength": 0.5, "steps": 4, "seed": 3}));
    let ev = s.stream(&id);
    let (name, done) = ev.last().expect("events");
    assert_eq!(name, "complete", "{ev:?}");
    // strength 0.5 of 4 steps runs 2.
    assert_eq!(ev.iter().rfind(|e| e.0 == "progress").map(|e| e.1["total"].clone()), Some(json!(2)));
    let img = decode_png(done["images"][0].as_str().expect("image"));
    assert_eq!((img.width(), img.height()), (32, 32), "size defaults to the input's");
    let bytes = unb64(done["images"][0].as_str().expect("image"));
    let meta = sd_pipelines::image_io::read_png_parameters(&bytes).expect("png").expect("meta");
    assert!(meta.contains("Denoising strength: 0.5"), "{meta}");

    let id = s.submit(&json!({"operation": "image_inpaint", "prompt": "a cat", "init_image": b64(&test_image()),
        "mask_image": b64(&test_mask(32, 32)), "steps": 3, "seed": 4}));
    let ev = s.stream(&id);
    assert_eq!(ev.last().map(|e| e.0.as_str()), Some("complete"), "{ev:?}");
    s.shutdown();

    // A 9-channel inpainting model.
    let s = Server::start(config("sd15-inpaint"));
    let id = s.submit(&json!({"operation": "image_inpaint", "prompt": "a cat", "init_image": b64(&test_image()),
        "mask_image": b64(&test_mask(32, 32)), "steps": 3, "seed": 4, "strength": 0.9}));
    let ev = s.stream(&id);
    let (name, done) = ev.last().expect("events");
    assert_eq!(name, "complete", "{ev:?}");
    assert_eq!(decode_png(done["images"][0].as_str().expect("image")).width(), 32);
    s.shutdown();
}

#[test]
fn cancelling_a_running_job_stops_it_within_a_step() {
    let s = Server::start(config("sd15"));
    let id = s.submit(&json!({"operation": "image_generation", "prompt": "long", "width": 32, "height": 32, "steps": 1000, "seed": 1}));
    s.wait_status(&id, |v| v["status"] == "running" && v["progress"]["step"].as_u64().unwrap_or(0) >= 2);
    let r = s.delete(&format!("/v1/jobs/{id}"));
    assert_eq!(r.status, 202, "{}", r.text());
    let ev = s.stream(&id);
    let (name, err) = ev.last().expect("events");
    assert_eq!(name, "error");
    assert_eq!(err["code"], "cancelled");
    let st = s.get(&format!("/v1/jobs/{id}")).json();
    assert_eq!(st["status"], "cancelled");
    assert!(st["progress"]["step"].as_u64().expect("step") < 1000);
    // Cancelling again is a conflict, not a crash; unknown ids are 404 JSON.
    assert_error(&s.delete(&format!("/v1/jobs/{id}")), 409, "id");
    assert_error(&s.delete("/v1/jobs/job_nope"), 404, "id");
    assert_error(&s.get("/v1/jobs/job_nope/stream"), 404, "id");
    s.assert_serving();
    assert!(s.get("/metrics").text().contains("sd_worker_jobs_total{outcome=\"cancelled\"} 1"));
    s.shutdown();
}

#[test]
fn a_full_queue_answers_429_with_retry_after() {
    let mut cfg = config("sd15");
    cfg.queue_capacity = 1;
    let s = Server::start(cfg);
    let long = json!({"operation": "image_generation", "prompt": "long", "width": 32, "height": 32, "steps": 1000, "seed": 1});
    let a = s.submit(&long);
    s.wait_status(&a, |v| v["status"] == "running");
    let b = s.submit(&json!({"operation": "image_generation", "prompt": "b", "width": 32, "height": 32, "steps": 2, "seed": 2}));
    let r = s.post("/v1/jobs", &long);
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(r.header("retry-after").and_then(|v| v.parse::<u64>().ok()).is_some_and(|v| v >= 1));
    assert_eq!(r.json()["error"]["code"], "queue_full");
    assert!(s.get("/metrics").text().contains("sd_worker_queue_depth 1"));
    assert_eq!(s.get(&format!("/v1/jobs/{b}")).json()["status"], "queued");
    assert_eq!(s.delete(&format!("/v1/jobs/{a}")).status, 202);
    assert_eq!(s.stream(&b).last().map(|e| e.0.as_str()), Some("complete"));
    assert!(s.get("/metrics").text().contains("sd_worker_rejected_total 1"));
    s.shutdown();
}

#[test]
fn cancelling_a_queued_job_frees_its_slot() {
    let mut cfg = config("sd15");
    cfg.queue_capacity = 1;
    let s = Server::start(cfg);
    let long = json!({"operation": "image_generation", "prompt": "long", "width": 32, "height": 32, "steps": 1000, "seed": 1});
    let a = s.submit(&long);
    s.wait_status(&a, |v| v["status"] == "running");
    let b = s.submit(&long);
    assert_eq!(s.delete(&format!("/v1/jobs/{b}")).status, 202);
    let ev = s.stream(&b);
    assert_eq!(ev.last().map(|e| (e.0.as_str(), e.1["code"].clone())), Some(("error", json!("cancelled"))));
    // The slot is free again.
    let c = s.submit(&json!({"operation": "image_generation", "prompt": "c", "width": 32, "height": 32, "steps": 2, "seed": 2}));
    assert_eq!(s.delete(&format!("/v1/jobs/{a}")).status, 202);
    assert_eq!(s.stream(&c).last().map(|e| e.0.as_str()), Some("complete"));
    s.shutdown();
}

#[test]
fn two_subscribers_watch_one_job() {
    let s = Server::start(config("sd15"));
    let id = s.submit(&json!({"operation": "image_generation", "prompt": "shared", "width": 32, "height": 32, "steps": 40, "seed": 9}));
    let addr = s.addr;
    let watchers: Vec<_> = (0..2)
        .map(|_| {
            let path = format!("/v1/jobs/{id}/stream");
            std::thread::spawn(move || parse_sse(&raw_request(addr, "GET", &path, "application/json", b"").text()))
        })
        .collect();
    let results: Vec<Vec<(String, Value)>> = watchers.into_iter().map(|h| h.join().expect("watcher")).collect();
    for ev in &results {
        let steps: Vec<u64> = ev.iter().filter(|e| e.0 == "progress").filter_map(|e| e.1["step"].as_u64()).collect();
        assert!(steps.windows(2).all(|w| w[0] < w[1]), "{steps:?}");
        assert_eq!(ev.last().map(|e| e.0.as_str()), Some("complete"));
    }
    assert_eq!(results[0].last().map(|e| &e.1["images"]), results[1].last().map(|e| &e.1["images"]));
    s.shutdown();
}

#[test]
fn openai_routes_return_decodable_images() {
    let s = Server::start(config("sd15"));
    let r = s.post("/v1/images/generations", &json!({"prompt": "a lighthouse", "n": 2, "size": "32x32", "response_format": "b64_json", "steps": 2, "seed": 5}));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert!(v["created"].as_u64().is_some());
    let data = v["data"].as_array().expect("data");
    assert_eq!(data.len(), 2);
    for d in data {
        let img = decode_png(d["b64_json"].as_str().expect("b64_json"));
        assert_eq!((img.width(), img.height()), (32, 32));
    }
    assert_error(&s.post("/v1/images/generations", &json!({"prompt": "x", "size": "32x32", "response_format": "url"})), 400, "response_format");
    assert_error(&s.post("/v1/images/generations", &json!({"prompt": "x", "size": "big"})), 400, "size");
    assert_error(&s.post("/v1/images/generations", &json!({"size": "32x32"})), 400, "prompt");

    // Edits as OpenAI sends them: multipart with an image file and a transparent-area mask.
    let mask = {
        let m = image::RgbaImage::from_fn(32, 32, |x, _| image::Rgba([0, 0, 0, if x < 16 { 0 } else { 255 }]));
        let mut out = std::io::Cursor::new(Vec::new());
        m.write_to(&mut out, image::ImageFormat::Png).expect("png");
        out.into_inner()
    };
    let boundary = "XyZboundary";
    let mut body = Vec::new();
    let mut field = |name: &str, filename: Option<&str>, data: &[u8]| {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match filename {
            Some(f) => body.extend_from_slice(format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: image/png\r\n\r\n").as_bytes()),
            None => body.extend_from_slice(format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes()),
        }
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    };
    field("image", Some("image.png"), &test_image());
    field("mask", Some("mask.png"), &mask);
    field("prompt", None, b"a window");
    field("n", None, b"1");
    field("steps", None, b"2");
    field("response_format", None, b"b64_json");
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    let r = s.request("POST", "/v1/images/edits", &format!("multipart/form-data; boundary={boundary}"), &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let img = decode_png(r.json()["data"][0]["b64_json"].as_str().expect("b64_json"));
    assert_eq!((img.width(), img.height()), (32, 32));

    // JSON edits without a mask are img2img.
    let r = s.post("/v1/images/edits", &json!({"image": b64(&test_image()), "prompt": "x", "steps": 4, "strength": 0.5}));
    assert_eq!(r.status, 200, "{}", r.text());
    decode_png(r.json()["data"][0]["b64_json"].as_str().expect("b64_json"));
    assert_error(&s.post("/v1/images/edits", &json!({"prompt": "x"})), 400, "image");
    s.shutdown();
}

#[test]
fn a1111_routes_return_decodable_images() {
    let s = Server::start(config("sd15"));
    let r = s.post("/sdapi/v1/txt2img", &json!({"prompt": "a boat", "negative_prompt": "", "steps": 3, "width": 32, "height": 32,
        "cfg_scale": 6, "sampler_name": "DPM++ 2M", "scheduler": "Karras", "seed": 11, "batch_size": 1, "n_iter": 2,
        "override_settings": {"CLIP_stop_at_last_layers": 2}}));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let images = v["images"].as_array().expect("images");
    assert_eq!(images.len(), 2);
    for b in images {
        let bytes = unb64(b.as_str().expect("b64"));
        image::load_from_memory(&bytes).expect("png");
        let meta = sd_pipelines::image_io::read_png_parameters(&bytes).expect("png").expect("meta");
        assert!(meta.contains("Sampler: DPM++ 2M") && meta.contains("Clip skip: 2") && meta.contains("CFG scale: 6"), "{meta}");
    }
    let info: Value = serde_json::from_str(v["info"].as_str().expect("info string")).expect("info JSON");
    assert_eq!(info["seed"], 11);
    assert_eq!(v["parameters"]["prompt"], "a boat");

    let r = s.post("/sdapi/v1/img2img", &json!({"prompt": "a boat", "init_images": [format!("data:image/png;base64,{}", b64(&test_image()))],
        "denoising_strength": 0.5, "steps": 4, "width": 32, "height": 32, "seed": 1}));
    assert_eq!(r.status, 200, "{}", r.text());
    decode_png(r.json()["images"][0].as_str().expect("image"));
    let r = s.post("/sdapi/v1/img2img", &json!({"prompt": "a boat", "init_images": [b64(&test_image())], "mask": b64(&test_mask(32, 32)),
        "denoising_strength": 1.0, "steps": 2, "width": 32, "height": 32}));
    assert_eq!(r.status, 200, "{}", r.text());
    decode_png(r.json()["images"][0].as_str().expect("image"));
    // A1111 defaults are 512×512, over this worker's limit: the error names the field.
    assert_error(&s.post("/sdapi/v1/txt2img", &json!({"prompt": "x"})), 400, "width");
    assert_error(&s.post("/sdapi/v1/txt2img", &json!({"prompt": "x", "width": 32, "height": 32, "sampler_name": "Nope"})), 400, "sampler_name");

    let samplers = s.get("/sdapi/v1/samplers").json();
    assert!(samplers.as_array().is_some_and(|a| a.iter().any(|x| x["name"] == "Euler a")));
    let models = s.get("/sdapi/v1/sd-models").json();
    assert_eq!(models[0]["model_name"], "sd15");
    let idle = s.get("/sdapi/v1/progress").json();
    assert_eq!(idle["progress"], 0.0);

    // Progress with a preview while a job runs, then interrupt.
    let id = s.submit(&json!({"operation": "image_generation", "prompt": "long", "width": 32, "height": 32, "steps": 1000, "seed": 1}));
    s.wait_status(&id, |v| v["progress"]["step"].as_u64().unwrap_or(0) >= 2);
    let p = s.get("/sdapi/v1/progress").json();
    assert!(p["progress"].as_f64().is_some_and(|f| f > 0.0 && f < 1.0), "{p}");
    assert_eq!(p["state"]["sampling_steps"], 1000);
    decode_png(p["current_image"].as_str().expect("current_image"));
    assert!(s.get("/sdapi/v1/progress?skip_current_image=true").json()["current_image"].is_null());
    assert_eq!(s.post("/sdapi/v1/interrupt", &json!({})).status, 200);
    assert_eq!(s.stream(&id).last().map(|e| e.1["code"].clone()), Some(json!("cancelled")));
    s.shutdown();
}

#[test]
fn finished_jobs_expire() {
    let mut cfg = config("sd15");
    cfg.job_expiry = Duration::from_millis(300);
    let s = Server::start(cfg);
    let id = s.submit(&json!({"operation": "image_generation", "prompt": "x", "width": 32, "height": 32, "steps": 1, "seed": 1}));
    assert_eq!(s.stream(&id).last().map(|e| e.0.as_str()), Some("complete"));
    let t0 = Instant::now();
    while s.get(&format!("/v1/jobs/{id}")).status == 200 {
        assert!(t0.elapsed() < Duration::from_secs(10), "the job never expired");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_error(&s.get(&format!("/v1/jobs/{id}")), 404, "id");
    s.shutdown();
}

#[test]
fn shutdown_cancels_queued_jobs_and_finishes_the_running_one() {
    let mut cfg = config("sd15");
    // A grace far beyond the job's run time, so a loaded machine cannot turn "finishes" into "cut off".
    cfg.shutdown_grace = Duration::from_secs(600);
    let s = Server::start(cfg);
    // Long enough that it is still running when shutdown begins, so `b` is still queued then.
    let a = s.submit(&json!({"operation": "image_generation", "prompt": "a", "width": 32, "height": 32, "steps": 150, "seed": 1}));
    s.wait_status(&a, |v| v["status"] == "running");
    let b = s.submit(&json!({"operation": "image_generation", "prompt": "b", "width": 32, "height": 32, "steps": 2, "seed": 1}));
    let addr = s.addr;
    let watch = |id: &str| {
        let path = format!("/v1/jobs/{id}/stream");
        std::thread::spawn(move || parse_sse(&raw_request(addr, "GET", &path, "application/json", b"").text()))
    };
    let (wa, wb) = (watch(&a), watch(&b));
    std::thread::sleep(Duration::from_millis(50));
    s.shutdown();
    let ea = wa.join().expect("a");
    let eb = wb.join().expect("b");
    assert_eq!(ea.last().map(|e| e.0.as_str()), Some("complete"), "the running job finishes: {ea:?}");
    assert_eq!(eb.last().map(|e| e.1["code"].clone()), Some(json!("shutdown")), "{eb:?}");
}

#[test]
fn model_listing_health_and_unknown_routes() {
    let s = Server::start(config("sdxl"));
    assert_eq!(s.get("/health").json()["status"], "ok");
    assert_eq!(s.get("/ready").json()["status"], "ready");
    let m = s.get("/v1/models").json();
    assert_eq!(m["object"], "list");
    assert_eq!(m["data"][0]["variant"], "sdxl");
    assert!(m["loras"].as_array().is_some());
    let r = s.get("/nope");
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "not_found");
    let r = s.get("/v1/jobs");
    assert_eq!(r.status, 405);
    assert_eq!(r.json()["error"]["code"], "method_not_allowed");
    let id = s.submit(&json!({"operation": "image_generation", "prompt": "xl", "width": 32, "height": 32, "steps": 2, "seed": 1}));
    assert_eq!(s.stream(&id).last().map(|e| e.0.as_str()), Some("complete"));
    s.shutdown();
}

// ---- bad input: each a 4xx JSON error naming the field, and the worker keeps serving ----

fn bad(body: &[u8], status: u16, field: &str) {
    let s = Server::start(config("sd15"));
    let r = s.request("POST", "/v1/jobs", "application/json", body);
    assert_error(&r, status, field);
    s.assert_serving();
    s.shutdown();
}

fn gen(extra: Value) -> Vec<u8> {
    let mut v = json!({"operation": "image_generation", "prompt": "p", "width": 32, "height": 32, "steps": 2});
    if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        for (k, x) in e {
            if x.is_null() {
                o.remove(k);
            } else {
                o.insert(k.clone(), x.clone());
            }
        }
    }
    v.to_string().into_bytes()
}

#[test]
fn bad_malformed_json() {
    bad(br#"{"operation": "image_generation", "prompt": "#, 400, "body");
}

#[test]
fn bad_unknown_operation() {
    bad(&gen(json!({"operation": "video_generation"})), 400, "operation");
}

#[test]
fn bad_missing_operation() {
    bad(&gen(json!({"operation": null})), 400, "operation");
}

#[test]
fn bad_missing_prompt() {
    bad(&gen(json!({"prompt": null})), 400, "prompt");
}

#[test]
fn bad_unknown_field() {
    bad(&gen(json!({"stepz": 3})), 400, "stepz");
}

#[test]
fn bad_steps_zero() {
    bad(&gen(json!({"steps": 0})), 400, "steps");
}

#[test]
fn bad_steps_huge() {
    bad(&gen(json!({"steps": 1_000_000_000u64})), 400, "steps");
}

#[test]
fn bad_steps_not_a_number() {
    bad(&gen(json!({"steps": "many"})), 400, "steps");
}

#[test]
fn bad_size_over_limit() {
    bad(&gen(json!({"width": 4096})), 400, "width");
}

#[test]
fn bad_size_not_multiple_of_8() {
    bad(&gen(json!({"height": 36})), 400, "height");
}

#[test]
fn bad_batch_over_limit() {
    bad(&gen(json!({"batch": 64})), 400, "batch");
}

#[test]
fn bad_unknown_sampler() {
    bad(&gen(json!({"sampler": "Warp Drive"})), 400, "sampler");
}

#[test]
fn bad_schedule_for_sampler() {
    bad(&gen(json!({"sampler": "DDIM", "schedule": "karras"})), 400, "schedule");
}

#[test]
fn bad_invalid_base64() {
    let body = json!({"operation": "image_transform", "prompt": "p", "input_image": "%%%not base64%%%"}).to_string();
    bad(body.as_bytes(), 400, "input_image");
}

#[test]
fn bad_non_image() {
    let body = json!({"operation": "image_transform", "prompt": "p", "input_image": b64(b"just some text, not a picture")}).to_string();
    bad(body.as_bytes(), 400, "input_image");
}

#[test]
fn bad_mask_of_another_size() {
    let body = json!({"operation": "image_inpaint", "prompt": "p", "init_image": b64(&test_image()), "mask_image": b64(&test_mask(16, 32))}).to_string();
    bad(body.as_bytes(), 400, "mask_image");
}

#[test]
fn bad_missing_mask() {
    let body = json!({"operation": "image_inpaint", "prompt": "p", "init_image": b64(&test_image())}).to_string();
    bad(body.as_bytes(), 400, "mask_image");
}

#[test]
fn bad_strength() {
    let body = json!({"operation": "image_transform", "prompt": "p", "input_image": b64(&test_image()), "strength": 1.5}).to_string();
    bad(body.as_bytes(), 400, "strength");
}

#[test]
fn bad_body_over_limit() {
    let big = "A".repeat(400 * 1024);
    let body = json!({"operation": "image_transform", "prompt": "p", "input_image": big}).to_string();
    bad(body.as_bytes(), 413, "body");
}

fn lora_dirs() -> (PathBuf, PathBuf) {
    let d = std::env::temp_dir().join(format!("sd-worker-http-lora-{}-{:?}", std::process::id(), std::thread::current().id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("loras")).expect("dir");
    std::fs::write(d.join("loras/style.safetensors"), b"not really").expect("write");
    std::fs::write(d.join("secret.safetensors"), b"outside").expect("write");
    (d.join("loras"), d)
}

fn bad_lora(lora: Value, field: &str) {
    let (loras, root) = lora_dirs();
    let mut cfg = config("sd15");
    cfg.lora_dirs = vec![loras];
    let s = Server::start(cfg);
    let listed = s.get("/v1/models").json();
    assert_eq!(listed["loras"][0]["name"], "style");
    let r = s.request("POST", "/v1/jobs", "application/json", &gen(json!({"loras": [lora]})));
    assert_error(&r, 400, field);
    s.assert_serving();
    s.shutdown();
    let _ = std::fs::remove_dir_all(root);
}

#[test]
fn bad_lora_path_with_dotdot() {
    bad_lora(json!({"path": "../secret.safetensors", "strength": 0.8}), "loras[0].path");
}

#[test]
fn bad_lora_absolute_path_outside() {
    let (_, root) = lora_dirs();
    let abs = root.join("secret.safetensors").to_string_lossy().into_owned();
    bad_lora(json!({"path": abs}), "loras[0].path");
}

#[cfg(unix)]
#[test]
fn bad_lora_symlink_escape() {
    let (loras, root) = lora_dirs();
    let _ = std::os::unix::fs::symlink(root.join("secret.safetensors"), loras.join("escape.safetensors"));
    let mut cfg = config("sd15");
    cfg.lora_dirs = vec![loras];
    let s = Server::start(cfg);
    let r = s.request("POST", "/v1/jobs", "application/json", &gen(json!({"loras": [{"name": "escape"}]})));
    assert!(r.status == 400 || r.status == 404, "{}", r.text());
    assert_eq!(r.json()["error"]["field"], "loras[0].name");
    s.assert_serving();
    s.shutdown();
    let _ = std::fs::remove_dir_all(root);
}

#[test]
fn bad_lora_strength() {
    bad_lora(json!({"name": "style", "strength": 1e9}), "loras[0].strength");
}

#[test]
fn loras_are_applied_per_request_and_removed_again() {
    let mut cfg = config("sd15");
    cfg.lora_dirs = vec![fixture("lora")];
    let s = Server::start(cfg);
    let listed = s.get("/v1/models").json();
    assert!(listed["loras"].as_array().is_some_and(|l| l.iter().any(|x| x["name"] == "sd15_kohya")), "{listed}");
    let job = |loras: Value| {
        let id = s.submit(&json!({"operation": "image_generation", "prompt": "a tree", "width": 32, "height": 32, "steps": 3, "seed": 7, "loras": loras}));
        let ev = s.stream(&id);
        let (name, data) = ev.last().cloned().expect("events");
        assert_eq!(name, "complete", "{ev:?}");
        data
    };
    let plain = job(json!([]));
    let with = job(json!([{"name": "sd15_kohya", "strength": 1.0}]));
    assert_ne!(plain["images"], with["images"], "the LoRA changed nothing");
    let bytes = unb64(with["images"][0].as_str().expect("image"));
    let meta = sd_pipelines::image_io::read_png_parameters(&bytes).expect("png").expect("meta");
    assert!(meta.contains("Lora weights: \"sd15_kohya: 1\""), "{meta}");
    // A1111's "addnet" hash (first 12 hex of the SHA-256 after the safetensors header; Python hashlib gives 5f59d4c77694).
    assert!(meta.contains("Lora hashes: \"sd15_kohya: 5f59d4c77694\""), "{meta}");
    assert_eq!(with["parameters"]["loras"][0]["name"], "sd15_kohya");
    let by_path = job(json!([{"path": "sd15_kohya.safetensors", "strength": 1.0}]));
    assert_eq!(by_path["images"], with["images"]);
    let again = job(json!([]));
    assert_eq!(again["images"], plain["images"], "removing the LoRA restores the model");
    // A1111's prompt tag does the same as the request field; the infotext keeps the prompt as written.
    let id = s.submit(&json!({"operation": "image_generation", "prompt": "a tree <lora:sd15_kohya:1>", "width": 32, "height": 32, "steps": 3, "seed": 7}));
    let tagged = s.stream(&id).last().cloned().expect("events").1;
    assert_eq!(pixels_of(&tagged), pixels_of(&with), "<lora:…> in the prompt applies the LoRA");
    assert_eq!(tagged["parameters"]["prompt"], "a tree <lora:sd15_kohya:1>");
    assert_eq!(tagged["parameters"]["loras"][0]["name"], "sd15_kohya");
    let meta = sd_pipelines::image_io::read_png_parameters(&unb64(tagged["images"][0].as_str().expect("image"))).expect("png").expect("meta");
    assert!(meta.starts_with("a tree <lora:sd15_kohya:1>\n"), "{meta}");
    // A1111's split weights, `<lora:name:te:unet>`: the text encoders' part at 0 differs from both at 1.
    let split = s.submit(&json!({"operation": "image_generation", "prompt": "a tree <lora:sd15_kohya:0:1>", "width": 32, "height": 32, "steps": 3, "seed": 7}));
    let (name, split) = s.stream(&split).last().cloned().expect("events");
    assert_eq!(name, "complete", "{split}");
    assert_eq!(split["parameters"]["loras"][0]["text_encoder_strength"], 0.0);
    assert_ne!(pixels_of(&split), pixels_of(&tagged));
    for prompt in ["a tree <lora:missing:1>", "a tree <hypernet:h:1>", "<lora:sd15_kohya:1:big>"] {
        let r = s.post("/v1/jobs", &json!({"operation": "image_generation", "prompt": prompt, "width": 32, "height": 32, "steps": 2}));
        assert_error(&r, 400, "prompt");
    }
    // The A1111 route reads the same tags.
    let a1111 = json!({"prompt": "a tree <lora:sd15_kohya:1>", "width": 32, "height": 32, "steps": 3, "seed": 7, "sampler_name": "Euler",
        "cfg_scale": with["parameters"]["guidance_scale"]});
    let r = s.post("/sdapi/v1/txt2img", &a1111);
    assert_eq!(r.status, 200, "{}", r.text());
    // A1111 routes draw A1111's default (GPU/NV) noise: the native API gives the same with `noise: a1111-nv`.
    let id = s.submit(&json!({"operation": "image_generation", "prompt": "a tree", "width": 32, "height": 32, "steps": 3, "seed": 7,
        "noise": "a1111-nv", "loras": [{"name": "sd15_kohya", "strength": 1.0}]}));
    let (_, native_nv) = s.stream(&id).last().cloned().expect("events");
    assert_eq!(pixels_of(&r.json()), pixels_of(&native_nv));
    // The routes A1111 clients call to list LoRAs and read a PNG back.
    let listed = s.get("/sdapi/v1/loras").json();
    assert!(listed.as_array().is_some_and(|l| l.iter().any(|x| x["name"] == "sd15_kohya")), "{listed}");
    let info = s.post("/sdapi/v1/png-info", &json!({"image": tagged["images"][0]}));
    assert_eq!(info.status, 200, "{}", info.text());
    let info = info.json();
    assert_eq!(info["parameters"]["Prompt"], "a tree <lora:sd15_kohya:1>", "{info}");
    assert_eq!(info["parameters"]["Seed"], "7");
    assert_eq!(info["info"], meta.as_str());
    assert_error(&s.post("/sdapi/v1/png-info", &json!({"image": 5})), 400, "image");
    for route in ["/sdapi/v1/embeddings", "/sdapi/v1/sd-vae", "/sdapi/v1/upscalers", "/controlnet/model_list", "/controlnet/module_list", "/controlnet/version"] {
        assert_eq!(s.get(route).status, 200, "{route}");
    }
    for route in ["/sdapi/v1/refresh-loras", "/sdapi/v1/refresh-checkpoints", "/sdapi/v1/refresh-vae"] {
        let r = s.post(route, &json!({}));
        assert_eq!((r.status, r.text().trim()), (200, "null"), "{route}");
    }
    s.shutdown();
}

#[test]
fn a_broken_lora_file_is_refused_and_a_lora_for_another_model_fails_its_job_only() {
    let (loras, root) = lora_dirs();
    // A LoRA for SDXL: a well-formed file, which only the loaded model can tell does not fit.
    std::fs::copy(fixture("lora/sdxl_diffusers_old.safetensors"), loras.join("xl.safetensors")).expect("copy");
    let mut cfg = config("sd15");
    cfg.lora_dirs = vec![loras];
    let s = Server::start(cfg);
    // A file that is not a LoRA at all is refused before the job is queued.
    let r = s.post("/v1/jobs", &json!({"operation": "image_generation", "prompt": "p", "width": 32, "height": 32, "steps": 2, "loras": [{"name": "style"}]}));
    assert_error(&r, 400, "loras[0].name");
    let id = s.submit(&json!({"operation": "image_generation", "prompt": "p", "width": 32, "height": 32, "steps": 2, "loras": [{"name": "xl"}]}));
    let ev = s.stream(&id);
    let (name, err) = ev.last().expect("events");
    assert_eq!(name, "error");
    assert_eq!(err["code"], "invalid_lora");
    assert_eq!(err["field"], "loras[0]", "{err}");
    assert_eq!(s.get(&format!("/v1/jobs/{id}")).json()["status"], "failed");
    s.assert_serving();
    assert!(s.get("/metrics").text().contains("sd_worker_jobs_total{outcome=\"failed\"} 1"));
    s.shutdown();
    let _ = std::fs::remove_dir_all(root);
}

#[test]
fn a_synchronous_request_whose_client_half_closes_still_gets_its_answer() {
    let s = Server::start(config("sd15"));
    let body = json!({"prompt": "half", "width": 32, "height": 32, "steps": 3}).to_string();
    let mut conn = TcpStream::connect(s.addr).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(120))).expect("timeout");
    let head = format!("POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len());
    conn.write_all(head.as_bytes()).expect("head");
    conn.write_all(body.as_bytes()).expect("body");
    // "Nothing more to send": the request is complete and the answer is still wanted.
    conn.shutdown(std::net::Shutdown::Write).expect("half-close");
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).expect("read the answer");
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 200"), "{}", &text[..text.len().min(300)]);
    assert!(text.contains("\"images\""), "{}", &text[..text.len().min(300)]);
    s.assert_serving();
    s.shutdown();
}

#[test]
fn a_synchronous_request_whose_client_leaves_does_not_block_the_worker() {
    // A client that closes its socket cannot be told from one that only half-closed it until the
    // answer is written, so its job runs to the end; the worker keeps serving meanwhile.
    let s = Server::start(config("sd15"));
    let body = json!({"prompt": "gone", "size": "32x32", "steps": 4}).to_string();
    let mut conn = TcpStream::connect(s.addr).expect("connect");
    let head = format!("POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len());
    conn.write_all(head.as_bytes()).expect("head");
    conn.write_all(body.as_bytes()).expect("body");
    drop(conn);
    let c = s.submit(&json!({"operation": "image_generation", "prompt": "c", "width": 32, "height": 32, "steps": 2, "seed": 2}));
    assert_eq!(s.stream(&c).last().map(|e| e.0.as_str()), Some("complete"));
    s.assert_serving();
    s.shutdown();
}

#[test]
fn a_single_file_checkpoint_loads_with_its_config_folder() {
    let mut cfg = config("sd15.safetensors");
    cfg.model_config = Some(fixture("sd15"));
    let s = Server::start(cfg);
    let m = s.get("/v1/models").json();
    assert_eq!(m["data"][0]["id"], "sd15");
    assert_eq!(m["data"][0]["variant"], "sd15");
    // A1111's model hash and title (SHA-256 of the file from Python's hashlib: 3895e39d401cf66ca8581385f4e919e65cfcd876f7b64d2cb011073d67bc6cc5).
    let listed = s.get("/sdapi/v1/sd-models").json();
    assert_eq!(listed[0]["sha256"], "3895e39d401cf66ca8581385f4e919e65cfcd876f7b64d2cb011073d67bc6cc5", "{listed}");
    assert_eq!(listed[0]["hash"], "3895e39d40");
    assert_eq!(listed[0]["title"], "sd15.safetensors [3895e39d40]");
    // Picking the loaded model by any of its names works; another model is refused by name.
    for name in ["sd15.safetensors [3895e39d40]", "sd15", "sd15.safetensors"] {
        let r = s.post("/sdapi/v1/options", &json!({"sd_model_checkpoint": name, "CLIP_stop_at_last_layers": 1}));
        assert_eq!(r.status, 200, "{name}: {}", r.text());
    }
    assert_eq!(s.get("/sdapi/v1/options").json()["sd_model_checkpoint"], "sd15.safetensors [3895e39d40]");
    for name in ["other.safetensors", "sd15.safetensors [0000000000]"] {
        assert_error(&s.post("/sdapi/v1/options", &json!({"sd_model_checkpoint": name})), 400, "sd_model_checkpoint");
    }
    let txt = |o: Value| json!({"prompt": "x", "width": 32, "height": 32, "steps": 1, "override_settings": o});
    assert_error(&s.post("/sdapi/v1/txt2img", &txt(json!({"sd_model_checkpoint": "other"}))), 400, "override_settings.sd_model_checkpoint");
    assert_error(&s.post("/sdapi/v1/txt2img", &txt(json!({"randn_source": "TPU"}))), 400, "override_settings.randn_source");
    assert_error(&s.post("/sdapi/v1/txt2img", &txt(json!({"eta_noise_seed_delta": "x"}))), 400, "override_settings.eta_noise_seed_delta");
    // A1111's default "GPU" source on NVIDIA cards, and its "NV" source, are the same noise here.
    let gpu = s.post("/sdapi/v1/txt2img", &json!({"prompt": "x", "width": 32, "height": 32, "steps": 1, "seed": 3, "override_settings": {"randn_source": "GPU"}}));
    let nv = s.post("/sdapi/v1/txt2img", &json!({"prompt": "x", "width": 32, "height": 32, "steps": 1, "seed": 3, "override_settings": {"randn_source": "NV"}}));
    let default = s.post("/sdapi/v1/txt2img", &json!({"prompt": "x", "width": 32, "height": 32, "steps": 1, "seed": 3}));
    assert_eq!(gpu.status, 200, "{}", gpu.text());
    assert_eq!(pixels_of(&gpu.json()), pixels_of(&nv.json()));
    assert_eq!(pixels_of(&gpu.json()), pixels_of(&default.json()));
    assert_error(&s.post("/sdapi/v1/txt2img", &txt(json!({"sd_vae": "vae-ft-mse.safetensors"}))), 400, "override_settings.sd_vae");
    let r = s.post("/sdapi/v1/txt2img", &txt(json!({"randn_source": "CPU", "sd_vae": "Automatic", "sd_model_checkpoint": "sd15"})));
    assert_eq!(r.status, 200, "{}", r.text());
    // The config folder's tokenizer is used (DECISIONS: not the bundled vocabulary, whose ids the tiny
    // fixture's 1000-token text encoder could not embed), so the file generates as the folder does.
    let r = s.post("/v1/images/generations", &json!({"prompt": "file", "size": "32x32", "steps": 2, "seed": 4}));
    assert_eq!(r.status, 200, "{}", r.text());
    let from_file = r.json()["data"][0]["b64_json"].as_str().map(|b| decode_png(b).to_rgb8().into_raw());
    s.shutdown();
    let folder = Server::start(config("sd15"));
    let r = folder.post("/v1/images/generations", &json!({"prompt": "file", "size": "32x32", "steps": 2, "seed": 4}));
    let from_folder = r.json()["data"][0]["b64_json"].as_str().map(|b| decode_png(b).to_rgb8().into_raw());
    assert!(from_file.is_some() && from_file == from_folder, "the single file and its folder give the same picture");
    folder.shutdown();
}

// ---- ControlNets ----

fn control_png(w: u32, h: u32) -> Vec<u8> {
    png(w, h, |x, y| {
        let (dx, dy) = (x as f32 - w as f32 / 2.0, y as f32 - h as f32 / 2.0);
        if (dx * dx + dy * dy).sqrt() < w as f32 / 4.0 { [230, 230, 230] } else { [20, 20, 20] }
    })
}

fn controlnet_config() -> WorkerConfig {
    let mut cfg = config("sd15");
    cfg.controlnet_dirs = vec![fixture("controlnet")];
    cfg
}

#[test]
fn controlnet_jobs_run_in_every_operation() {
    let s = Server::start(controlnet_config());
    let listed = s.get("/v1/models").json();
    let names: Vec<&str> = listed["controlnets"].as_array().expect("controlnets").iter().filter_map(|c| c["name"].as_str()).collect();
    assert_eq!(names, ["control_sd15_ldm", "sd15", "sd15b", "sdxl"], "{listed}");
    let run = |body: Value| {
        let id = s.submit(&body);
        let ev = s.stream(&id);
        let (name, data) = ev.last().cloned().expect("events");
        assert_eq!(name, "complete", "{ev:?}");
        data
    };
    let base = json!({"operation": "image_generation", "prompt": "a tree", "width": 32, "height": 32, "steps": 3, "seed": 7});
    let with = |units: Value| {
        let mut b = base.clone();
        b["controlnets"] = units;
        b
    };
    let plain = run(base.clone());
    let unit = json!({"model": "sd15", "image": b64(&control_png(32, 32)), "preprocessor": "canny", "scale": 0.8,
        "low_threshold": 50, "high_threshold": 120});
    let controlled = run(with(json!([unit])));
    assert_ne!(plain["images"], controlled["images"], "the ControlNet changed nothing");
    assert_eq!(controlled["parameters"]["controlnets"][0]["model"], "sd15");
    assert_eq!(controlled["parameters"]["controlnets"][0]["preprocessor"], "canny");
    let meta = sd_pipelines::image_io::read_png_parameters(&unb64(controlled["images"][0].as_str().expect("image"))).expect("png").expect("meta");
    assert!(meta.contains("ControlNet 0: \"Module: canny, Model: sd15, Weight: 0.8"), "{meta}");
    // The same weights as an A1111 single file give the same image; a loaded ControlNet is reused.
    let mut single = unit.clone();
    single["model"] = json!("control_sd15_ldm");
    let pixels = |v: &Value| decode_png(v["images"][0].as_str().expect("image")).to_rgb8().into_raw();
    assert_eq!(pixels(&run(with(json!([single])))), pixels(&controlled));
    assert_eq!(run(with(json!([unit.clone()])))["images"], controlled["images"]);
    // Two units, a control image of another size (resized to the generation size), start/end.
    let second = json!({"model": "sd15b", "image": b64(&control_png(48, 40)), "scale": 0.5, "start": 0.2, "end": 0.8});
    let two = run(with(json!([unit.clone(), second])));
    assert_ne!(two["images"], controlled["images"]);
    assert_eq!(two["parameters"]["controlnets"][1]["end"], 0.8);
    // img2img and inpainting take ControlNets too.
    let mut t = json!({"operation": "image_transform", "prompt": "a painting", "input_image": b64(&test_image()), "strength": 0.7, "steps": 3, "seed": 3});
    t["controlnets"] = json!([unit.clone()]);
    run(t);
    let mut i = json!({"operation": "image_inpaint", "prompt": "a cat", "init_image": b64(&test_image()), "mask_image": b64(&test_mask(32, 32)), "steps": 3, "seed": 4});
    i["controlnets"] = json!([unit]);
    run(i);
    s.shutdown();
}

#[test]
fn bad_controlnet_requests_name_the_field() {
    let s = Server::start(controlnet_config());
    let img = b64(&control_png(32, 32));
    let outside = fixture("sd15.safetensors").to_string_lossy().into_owned();
    let cases: Vec<(Value, u16, &str)> = vec![
        (json!([{"model": "nope", "image": img}]), 404, "controlnets[0].model"),
        (json!([{"model": "../sd15.safetensors", "image": img}]), 400, "controlnets[0].model"),
        (json!([{"model": outside, "image": img}]), 400, "controlnets[0].model"),
        (json!([{"image": img}]), 400, "controlnets[0].model"),
        // An SDXL ControlNet on an SD 1.5 model is refused before the job is queued.
        (json!([{"model": "sdxl", "image": img}]), 400, "controlnets[0].model"),
        (json!([{"model": "sd15", "image": img, "scale": 3.0}]), 400, "controlnets[0].scale"),
        (json!([{"model": "sd15", "image": img, "scale": -1}]), 400, "controlnets[0].scale"),
        (json!([{"model": "sd15", "image": img, "start": 0.8, "end": 0.2}]), 400, "controlnets[0].end"),
        (json!([{"model": "sd15", "image": img, "start": 1.5}]), 400, "controlnets[0].start"),
        (json!([{"model": "sd15", "image": img, "preprocessor": "depth_midas"}]), 400, "controlnets[0].preprocessor"),
        (json!([{"model": "sd15", "image": img, "preprocessor": "canny", "low_threshold": 300, "high_threshold": 100}]), 400, "controlnets[0].low_threshold"),
        // A zero threshold used to panic inside the edge detector (an internal error, 500 on sync routes).
        (json!([{"model": "sd15", "image": img, "preprocessor": "canny", "low_threshold": 0}]), 400, "controlnets[0].low_threshold"),
        (json!([{"model": "sd15", "image": img, "preprocessor": "canny", "low_threshold": 0, "high_threshold": 0}]), 400, "controlnets[0].low_threshold"),
        (json!([{"model": "sd15", "image": "%%%not base64"}]), 400, "controlnets[0].image"),
        (json!([{"model": "sd15", "image": b64(b"plain text, not an image")}]), 400, "controlnets[0].image"),
        (json!([{"model": "sd15"}]), 400, "controlnets[0].image"),
        (json!([{"model": "sd15", "image": img, "scale": "high"}]), 400, "controlnets[0].scale"),
        (json!(vec![json!({"model": "sd15", "image": img}); 5]), 400, "controlnets"),
    ];
    for (units, status, field) in cases {
        let r = s.request("POST", "/v1/jobs", "application/json", &gen(json!({ "controlnets": units })));
        assert_error(&r, status, field);
    }
    s.assert_serving();
    s.shutdown();
    // Without a configured folder, ControlNet requests are refused.
    let s = Server::start(config("sd15"));
    let r = s.request("POST", "/v1/jobs", "application/json", &gen(json!({"controlnets": [{"model": "sd15", "image": img}]})));
    assert_error(&r, 400, "controlnets[0].model");
    s.shutdown();
}

// ---- FLUX ----

#[test]
fn flux_models_serve_generation_and_transform_jobs() {
    let s = Server::start(config("flux/schnell"));
    let m = s.get("/v1/models").json();
    assert_eq!(m["data"][0]["variant"], "flux-schnell", "{m}");
    assert_eq!(m["data"][0]["family"], "flux", "{m}");
    let id = s.submit(&json!({"operation": "image_generation", "prompt": "a photo of a cat", "width": 16, "height": 16,
        "steps": 3, "seed": 5, "negative_prompt": "blurry", "sampler": "DPM++ 2M"}));
    let ev = s.stream(&id);
    let (name, done) = ev.last().cloned().expect("events");
    assert_eq!(name, "complete", "{ev:?}");
    let steps: Vec<u64> = ev.iter().filter(|e| e.0 == "progress").filter_map(|e| e.1["step"].as_u64()).collect();
    assert_eq!(steps, [1, 2, 3]);
    let preview = ev.iter().find(|e| e.0 == "preview").expect("a preview");
    let p = decode_png(preview.1["image"].as_str().expect("preview image"));
    assert_eq!((p.width(), p.height()), (8, 8), "previews are at latent size");
    let img = decode_png(done["images"][0].as_str().expect("image"));
    assert_eq!((img.width(), img.height()), (16, 16));
    assert_eq!(done["parameters"]["ignored"], json!(["negative_prompt", "sampler"]), "{done}");
    let meta = sd_pipelines::image_io::read_png_parameters(&unb64(done["images"][0].as_str().expect("image"))).expect("png").expect("meta");
    assert!(meta.starts_with("a photo of a cat\nSteps: 3, Sampler: Euler"), "{meta}");
    // The same seed gives the same image.
    let again = s.submit(&json!({"operation": "image_generation", "prompt": "a photo of a cat", "width": 16, "height": 16, "steps": 3, "seed": 5}));
    let again = s.stream(&again).last().cloned().expect("events");
    assert_eq!(pixels_of(&again.1), pixels_of(&done));
    // img2img: 0.5 of 4 steps runs 2.
    let id = s.submit(&json!({"operation": "image_transform", "prompt": "a painting", "input_image": b64(&test_image()),
        "width": 16, "height": 16, "strength": 0.5, "steps": 4, "seed": 3}));
    let ev = s.stream(&id);
    assert_eq!(ev.last().map(|e| e.0.as_str()), Some("complete"), "{ev:?}");
    assert_eq!(ev.iter().rfind(|e| e.0 == "progress").map(|e| e.1["total"].clone()), Some(json!(2)));
    // Inpainting (FluxInpaintPipeline semantics): the default strength 1.0 runs every step.
    let inpaint = json!({"operation": "image_inpaint", "prompt": "x", "init_image": b64(&test_image()), "mask_image": b64(&test_mask(32, 32)),
        "width": 16, "height": 16, "steps": 4, "seed": 2});
    let ev = s.stream(&s.submit(&inpaint));
    assert_eq!(ev.last().map(|e| e.0.as_str()), Some("complete"), "{ev:?}");
    assert_eq!(ev.iter().rfind(|e| e.0 == "progress").map(|e| e.1["total"].clone()), Some(json!(4)));
    let img = decode_png(ev.last().and_then(|e| e.1["images"][0].as_str()).expect("image"));
    assert_eq!((img.width(), img.height()), (16, 16));
    // What FLUX cannot do is refused before queueing, naming the field.
    let cn = json!({"operation": "image_generation", "prompt": "x", "width": 16, "height": 16, "controlnets": [{"model": "a"}]});
    assert_error(&s.post("/v1/jobs", &cn), 400, "controlnets");
    let odd = json!({"operation": "image_generation", "prompt": "x", "width": 18, "height": 16});
    assert_error(&s.post("/v1/jobs", &odd), 400, "width");
    // Cancelling a running FLUX job stops it within a step.
    let id = s.submit(&json!({"operation": "image_generation", "prompt": "long", "width": 16, "height": 16, "steps": 1000, "seed": 1}));
    s.wait_status(&id, |v| v["status"] == "running" && v["progress"]["step"].as_u64().unwrap_or(0) >= 2);
    assert_eq!(s.delete(&format!("/v1/jobs/{id}")).status, 202);
    assert_eq!(s.stream(&id).last().map(|e| e.1["code"].clone()), Some(json!("cancelled")));
    // OpenAI route on FLUX.
    let r = s.post("/v1/images/generations", &json!({"prompt": "a cat", "size": "16x16", "n": 1, "response_format": "b64_json"}));
    assert_eq!(r.status, 200, "{}", r.text());
    decode_png(r.json()["data"][0]["b64_json"].as_str().expect("b64"));
    s.shutdown();
}

// ---- SD 3.x ----

#[test]
fn sd3_models_serve_every_task_and_route() {
    let s = Server::start(config("sd3/medium"));
    let m = s.get("/v1/models").json();
    assert_eq!(m["data"][0]["variant"], "sd3.5-medium", "{m}");
    assert_eq!(m["data"][0]["family"], "sd3", "{m}");
    let gen = json!({"operation": "image_generation", "prompt": "a photo of a cat", "negative_prompt": "blurry", "width": 32, "height": 24,
        "steps": 3, "seed": 5, "guidance_scale": 4.5});
    let ev = s.stream(&s.submit(&gen));
    let (name, done) = ev.last().cloned().expect("events");
    assert_eq!(name, "complete", "{ev:?}");
    let steps: Vec<u64> = ev.iter().filter(|e| e.0 == "progress").filter_map(|e| e.1["step"].as_u64()).collect();
    assert_eq!(steps, [1, 2, 3]);
    let preview = ev.iter().find(|e| e.0 == "preview").expect("a preview");
    let p = decode_png(preview.1["image"].as_str().expect("preview image"));
    assert_eq!((p.width(), p.height()), (16, 12), "previews are at latent size");
    let img = decode_png(done["images"][0].as_str().expect("image"));
    assert_eq!((img.width(), img.height()), (32, 24));
    let meta = sd_pipelines::image_io::read_png_parameters(&unb64(done["images"][0].as_str().expect("image"))).expect("png").expect("meta");
    assert!(meta.starts_with("a photo of a cat\nNegative prompt: blurry\nSteps: 3, Sampler: Euler"), "{meta}");
    assert!(meta.contains("CFG scale: 4.5"), "{meta}");
    // The same seed gives the same image; the negative prompt matters (true CFG).
    assert_eq!(pixels_of(&s.stream(&s.submit(&gen)).last().cloned().expect("events").1), pixels_of(&done));
    let mut other = gen.clone();
    other["negative_prompt"] = json!("a dog");
    assert_ne!(pixels_of(&s.stream(&s.submit(&other)).last().cloned().expect("events").1), pixels_of(&done));
    // img2img: 0.5 of 4 steps runs 2; inpainting at the default strength runs all.
    let id = s.submit(&json!({"operation": "image_transform", "prompt": "a painting", "input_image": b64(&test_image()),
        "width": 32, "height": 24, "strength": 0.5, "steps": 4, "seed": 3}));
    let ev = s.stream(&id);
    assert_eq!(ev.last().map(|e| e.0.as_str()), Some("complete"), "{ev:?}");
    assert_eq!(ev.iter().rfind(|e| e.0 == "progress").map(|e| e.1["total"].clone()), Some(json!(2)));
    let inpaint = json!({"operation": "image_inpaint", "prompt": "x", "init_image": b64(&test_image()), "mask_image": b64(&test_mask(32, 32)),
        "width": 32, "height": 24, "steps": 4, "seed": 2});
    let ev = s.stream(&s.submit(&inpaint));
    assert_eq!(ev.last().map(|e| e.0.as_str()), Some("complete"), "{ev:?}");
    assert_eq!(ev.iter().rfind(|e| e.0 == "progress").map(|e| e.1["total"].clone()), Some(json!(4)));
    // What SD 3.x cannot do is refused before queueing, naming the field.
    let cn = json!({"operation": "image_generation", "prompt": "x", "width": 32, "height": 24, "controlnets": [{"model": "a"}]});
    assert_error(&s.post("/v1/jobs", &cn), 400, "controlnets");
    let odd = json!({"operation": "image_generation", "prompt": "x", "width": 30, "height": 24});
    assert_error(&s.post("/v1/jobs", &odd), 400, "width");
    // Cancelling a running SD 3.x job stops it within a step.
    let id = s.submit(&json!({"operation": "image_generation", "prompt": "long", "width": 32, "height": 24, "steps": 1000, "seed": 1}));
    s.wait_status(&id, |v| v["status"] == "running" && v["progress"]["step"].as_u64().unwrap_or(0) >= 2);
    assert_eq!(s.delete(&format!("/v1/jobs/{id}")).status, 202);
    assert_eq!(s.stream(&id).last().map(|e| e.1["code"].clone()), Some(json!("cancelled")));
    // The OpenAI and A1111 routes.
    let r = s.post("/v1/images/generations", &json!({"prompt": "a cat", "size": "32x24", "n": 1, "response_format": "b64_json"}));
    assert_eq!(r.status, 200, "{}", r.text());
    decode_png(r.json()["data"][0]["b64_json"].as_str().expect("b64"));
    let r = s.post("/sdapi/v1/txt2img", &json!({"prompt": "a cat", "negative_prompt": "blurry", "width": 32, "height": 24, "steps": 2, "cfg_scale": 3, "seed": 4}));
    assert_eq!(r.status, 200, "{}", r.text());
    let info: Value = serde_json::from_str(r.json()["info"].as_str().expect("info")).expect("info json");
    assert_eq!(info["seed"], 4, "{info}");
    s.shutdown();
}

#[test]
fn sd3_loras_are_applied_per_request() {
    let mut cfg = config("sd3/medium");
    cfg.lora_dirs = vec![fixture("sd3/lora"), fixture("flux/lora")];
    let s = Server::start(cfg);
    let job = |loras: Value| {
        let id = s.submit(&json!({"operation": "image_generation", "prompt": "a cat", "width": 32, "height": 24, "steps": 2, "seed": 9, "loras": loras}));
        s.stream(&id).last().cloned().expect("events")
    };
    let (name, plain) = job(json!([]));
    assert_eq!(name, "complete", "{plain}");
    let (name, with) = job(json!([{"name": "sd3_peft", "strength": 0.6}, {"name": "sd3_kohya", "strength": -0.4}]));
    assert_eq!(name, "complete", "{with}");
    assert_ne!(pixels_of(&with), pixels_of(&plain), "the LoRAs changed nothing");
    let meta = sd_pipelines::image_io::read_png_parameters(&unb64(with["images"][0].as_str().expect("image"))).expect("png").expect("meta");
    assert!(meta.contains("Lora weights: \"sd3_peft: 0.6, sd3_kohya: -0.4\""), "{meta}");
    assert_eq!(pixels_of(&job(json!([])).1), pixels_of(&plain));
    // A FLUX LoRA fails its job only, naming the field and the family it is for.
    let (name, err) = job(json!([{"name": "flux_kohya"}]));
    assert_eq!(name, "error");
    assert_eq!(err["code"], "invalid_lora");
    assert_eq!(err["field"], "loras");
    assert!(err["message"].as_str().is_some_and(|m| m.contains("FLUX")), "{err}");
    assert_eq!(pixels_of(&job(json!([])).1), pixels_of(&plain));
    s.shutdown();
}

/// ComfyUI's split files: a bf16 diffusion-model file with clip_l, clip_g, t5xxl and VAE files beside it
/// (the tiny encoders' configs and tokenizers from `--model-config`).
#[test]
fn sd3_split_files_load_beside_the_diffusion_model() {
    let mut cfg = config("sd3/split/sd3.5_medium_tiny.safetensors");
    cfg.model_config = Some(fixture("sd3/medium"));
    let s = Server::start(cfg);
    assert_eq!(s.get("/v1/models").json()["data"][0]["variant"], "sd3.5-medium");
    let id = s.submit(&json!({"operation": "image_generation", "prompt": "a cat", "width": 32, "height": 24, "steps": 2, "seed": 1}));
    let (name, done) = s.stream(&id).last().cloned().expect("events");
    assert_eq!(name, "complete", "{done}");
    s.shutdown();
}

/// Skip-layer guidance on the tiny SD 3.5 Medium (3 blocks): block 1 skipped on steps 1 and 2 of 4 (stop 0.6;
/// diffusers' default 0.2 of 4 steps would cover none). It changes the image, equals what the library's
/// `generate` gives for the same request, and is recorded in the parameters and the PNG's infotext.
#[test]
fn sd3_skip_layer_guidance_is_served_and_matches_the_library() {
    let s = Server::start(config("sd3/medium"));
    let models = s.get("/v1/models").json();
    assert_eq!(models["data"][0]["skip_layer_guidance"], true, "{models}");
    let plain = json!({"operation": "image_generation", "prompt": "a photo of a cat", "width": 32, "height": 24, "steps": 4, "seed": 7,
        "guidance_scale": 4.5});
    let mut slg = plain.clone();
    slg["skip_layer_guidance"] = json!({"layers": [1], "stop": 0.6});
    let (name, without) = s.stream(&s.submit(&plain)).last().cloned().expect("events");
    assert_eq!(name, "complete", "{without}");
    let (name, with) = s.stream(&s.submit(&slg)).last().cloned().expect("events");
    assert_eq!(name, "complete", "{with}");
    assert_ne!(pixels_of(&with), pixels_of(&without), "skip-layer guidance changed nothing");
    assert_eq!(with["parameters"]["skip_layer_guidance"], json!({"layers": [1], "scale": 2.8, "start": 0.01, "stop": 0.6}), "{with}");
    let meta = sd_pipelines::image_io::read_png_parameters(&unb64(with["images"][0].as_str().expect("image"))).expect("png").expect("meta");
    assert!(meta.contains(r#"SLG: "1 x2.8 (0.01-0.6)""#), "{meta}");

    // The library, given the same request, draws the same image.
    let mut model = sd_families::LoadedModel::load(&fixture("sd3/medium"), &sd_families::LoadSpec::default()).expect("load");
    let mut request = model.capabilities().request("a photo of a cat");
    (request.width, request.height, request.steps, request.seed, request.guidance_scale) = (32, 24, 4, 7, 4.5);
    request.skip_layer_guidance = Some(sd_core::run::SkipLayerGuidance { stop: 0.6, ..sd_core::run::SkipLayerGuidance::new(vec![1]) });
    let out = model
        .generate(&request, &sd_core::run::Task::TextToImage, &mut sd_core::run::RunContext::default(), &sd_families::Extras::default())
        .expect("library run");
    let ours = sd_core::image_io::tensor_to_images(&out.images).expect("images");
    assert_eq!(ours[0].as_raw(), &pixels_of(&with), "the worker and the library differ");

    // What SD 3.x refuses: another operation and a run without CFG (before queueing), a layer the MMDiT lacks
    // (the job fails naming the field: the block count is the loaded model's).
    let img2img = json!({"operation": "image_transform", "prompt": "x", "input_image": b64(&test_image()), "width": 32, "height": 24, "steps": 2,
        "skip_layer_guidance": {"layers": [1]}});
    assert_error(&s.post("/v1/jobs", &img2img), 400, "skip_layer_guidance");
    let mut no_cfg = plain.clone();
    no_cfg["skip_layer_guidance"] = json!({"layers": [1]});
    no_cfg["guidance_scale"] = json!(1.0);
    let v = assert_error(&s.post("/v1/jobs", &no_cfg), 400, "skip_layer_guidance");
    assert!(v["error"]["message"].as_str().is_some_and(|m| m.contains("guidance")), "{v}");
    let mut missing_layer = plain.clone();
    missing_layer["skip_layer_guidance"] = json!({"layers": [3]});
    let (name, err) = s.stream(&s.submit(&missing_layer)).last().cloned().expect("events");
    assert_eq!(name, "error", "{err}");
    assert_eq!(err["field"], "skip_layer_guidance", "{err}");
    assert!(err["message"].as_str().is_some_and(|m| m.contains("3 blocks")), "{err}");
    s.shutdown();
}

#[test]
fn skip_layer_guidance_is_refused_on_sd15_and_malformed_values_name_the_field() {
    let s = Server::start(config("sd15"));
    let r = s.request("POST", "/v1/jobs", "application/json", &gen(json!({"skip_layer_guidance": {"layers": [7, 8, 9]}})));
    let v = assert_error(&r, 400, "skip_layer_guidance");
    assert!(v["error"]["message"].as_str().is_some_and(|m| m.contains("SD 3.x")), "{v}");
    for bad_value in [
        json!({"layers": [-1]}),
        json!({"layers": [1.5]}),
        json!({"layers": ["7"]}),
        json!({"layers": []}),
        json!({"scale": 2.8}),
        json!({"layers": [7], "start": 0.5, "stop": 0.2}),
        json!({"layers": [7], "scale": -1}),
        json!({"layers": [7], "stop": 1.5}),
        json!({"layers": [7], "scale": "high"}),
        json!({"layers": [7], "skip": 1}),
        json!({"layers": 7}),
        json!(true),
        json!([7, 8, 9]),
    ] {
        let r = s.request("POST", "/v1/jobs", "application/json", &gen(json!({"skip_layer_guidance": bad_value.clone()})));
        assert_eq!(r.status, 400, "{bad_value}: {}", r.text());
        assert_error(&r, 400, "skip_layer_guidance");
    }
    // A number too large for a double is refused by the JSON parser, never a panic.
    let huge = br#"{"operation": "image_generation", "prompt": "p", "width": 32, "height": 32, "steps": 2, "skip_layer_guidance": {"layers": [7], "scale": 1e999}}"#;
    assert!(s.request("POST", "/v1/jobs", "application/json", huge).status / 100 == 4);
    s.assert_serving();
    s.shutdown();
}

// ---- Z-Image ----

#[test]
fn z_image_models_serve_every_task_with_loras() {
    let mut cfg = config("zimage/turbo");
    cfg.lora_dirs = vec![fixture("zimage")];
    let s = Server::start(cfg);
    let m = s.get("/v1/models").json();
    assert_eq!(m["data"][0]["variant"], "z-image-turbo", "{m}");
    assert_eq!(m["data"][0]["family"], "zimage", "{m}");
    let job = |extra: Value| {
        let mut req = json!({"operation": "image_generation", "prompt": "a photo of a cat", "width": 16, "height": 24, "steps": 3, "seed": 5});
        if let (Some(r), Some(e)) = (req.as_object_mut(), extra.as_object()) {
            r.extend(e.clone());
        }
        s.stream(&s.submit(&req))
    };
    let ev = job(json!({}));
    let (name, plain) = ev.last().cloned().expect("events");
    assert_eq!(name, "complete", "{ev:?}");
    let steps: Vec<u64> = ev.iter().filter(|e| e.0 == "progress").filter_map(|e| e.1["step"].as_u64()).collect();
    assert_eq!(steps, [1, 2, 3]);
    let preview = ev.iter().find(|e| e.0 == "preview").expect("a preview");
    let p = decode_png(preview.1["image"].as_str().expect("preview image"));
    assert_eq!((p.width(), p.height()), (8, 12), "previews are at latent size");
    let img = decode_png(plain["images"][0].as_str().expect("image"));
    assert_eq!((img.width(), img.height()), (16, 24));
    // Turbo runs without CFG by default; a guidance scale turns CFG with the negative prompt on.
    let (_, cfg_run) = job(json!({"guidance_scale": 3.0, "negative_prompt": "blurry"})).last().cloned().expect("events");
    assert_ne!(pixels_of(&cfg_run), pixels_of(&plain));
    // A LoRA changes the image; removing it restores the model.
    let (name, with) = job(json!({"loras": [{"name": "lora_peft", "strength": 0.8}]})).last().cloned().expect("events");
    assert_eq!(name, "complete", "{with}");
    assert_ne!(pixels_of(&with), pixels_of(&plain));
    let meta = sd_pipelines::image_io::read_png_parameters(&unb64(with["images"][0].as_str().expect("image"))).expect("png").expect("meta");
    assert!(meta.contains("Lora weights: \"lora_peft: 0.8\""), "{meta}");
    assert_eq!(pixels_of(&job(json!({})).last().cloned().expect("events").1), pixels_of(&plain));
    // img2img and inpainting.
    let id = s.submit(&json!({"operation": "image_transform", "prompt": "a painting", "input_image": b64(&test_image()),
        "width": 16, "height": 24, "strength": 0.5, "steps": 4, "seed": 3}));
    let ev = s.stream(&id);
    assert_eq!(ev.last().map(|e| e.0.as_str()), Some("complete"), "{ev:?}");
    assert_eq!(ev.iter().rfind(|e| e.0 == "progress").map(|e| e.1["total"].clone()), Some(json!(2)));
    let inpaint = json!({"operation": "image_inpaint", "prompt": "x", "init_image": b64(&test_image()), "mask_image": b64(&test_mask(32, 32)),
        "width": 16, "height": 24, "steps": 4, "seed": 2});
    let ev = s.stream(&s.submit(&inpaint));
    assert_eq!(ev.last().map(|e| e.0.as_str()), Some("complete"), "{ev:?}");
    // Refused before queueing, naming the field.
    let cn = json!({"operation": "image_generation", "prompt": "x", "width": 16, "height": 24, "controlnets": [{"model": "a"}]});
    assert_error(&s.post("/v1/jobs", &cn), 400, "controlnets");
    // Cancelling stops within a step; the OpenAI and A1111 routes answer.
    let id = s.submit(&json!({"operation": "image_generation", "prompt": "long", "width": 16, "height": 24, "steps": 1000, "seed": 1}));
    s.wait_status(&id, |v| v["status"] == "running" && v["progress"]["step"].as_u64().unwrap_or(0) >= 2);
    assert_eq!(s.delete(&format!("/v1/jobs/{id}")).status, 202);
    assert_eq!(s.stream(&id).last().map(|e| e.1["code"].clone()), Some(json!("cancelled")));
    let r = s.post("/v1/images/generations", &json!({"prompt": "a cat", "size": "16x24", "n": 1, "response_format": "b64_json"}));
    assert_eq!(r.status, 200, "{}", r.text());
    let r = s.post("/sdapi/v1/txt2img", &json!({"prompt": "a cat", "width": 16, "height": 24, "steps": 2, "seed": 4}));
    assert_eq!(r.status, 200, "{}", r.text());
    s.shutdown();
}

/// A Z-Image transformer file in the original (ComfyUI) layout, bf16, with the rest from `--model-config`.
#[test]
fn a_z_image_transformer_file_loads_with_components_from_model_config() {
    let mut cfg = config("zimage/z_image_tiny_bf16.safetensors");
    cfg.model_config = Some(fixture("zimage/turbo"));
    let s = Server::start(cfg);
    assert_eq!(s.get("/v1/models").json()["data"][0]["family"], "zimage");
    let id = s.submit(&json!({"operation": "image_generation", "prompt": "a cat", "width": 16, "height": 24, "steps": 2, "seed": 1}));
    let (name, done) = s.stream(&id).last().cloned().expect("events");
    assert_eq!(name, "complete", "{done}");
    s.shutdown();
}

// ---- FLUX.2 [klein] ----

#[test]
fn flux2_klein_generates_edits_after_references_and_inpaints() {
    let s = Server::start(config("flux2/klein"));
    let m = s.get("/v1/models").json();
    assert_eq!(m["data"][0]["family"], "flux2", "{m}");
    assert_eq!(m["data"][0]["variant"], "flux2-klein-base", "{m}");
    let tasks = m["data"][0]["tasks"].as_array().cloned().unwrap_or_default();
    for t in ["txt2img", "edit", "inpaint"] {
        assert!(tasks.contains(&json!(t)), "{t} missing: {m}");
    }
    assert!(!tasks.contains(&json!("img2img")), "{m}");
    let gen = json!({"operation": "image_generation", "prompt": "a photo of a cat", "negative_prompt": "blurry", "width": 16, "height": 24,
        "steps": 3, "seed": 5, "guidance_scale": 4.0});
    let ev = s.stream(&s.submit(&gen));
    let (name, done) = ev.last().cloned().expect("events");
    assert_eq!(name, "complete", "{ev:?}");
    let steps: Vec<u64> = ev.iter().filter(|e| e.0 == "progress").filter_map(|e| e.1["step"].as_u64()).collect();
    assert_eq!(steps, [1, 2, 3]);
    assert!(ev.iter().any(|e| e.0 == "preview"), "{ev:?}");
    assert_eq!(decode_png(done["images"][0].as_str().expect("image")).to_rgb8().dimensions(), (16, 24));
    assert_eq!(pixels_of(&s.stream(&s.submit(&gen)).last().cloned().expect("events").1), pixels_of(&done), "same seed, same image");
    // Editing after one or two reference images (each at least 64 px a side).
    let first = png(64, 80, |x, y| [(x * 3) as u8, (y * 3) as u8, 128]);
    let second = png(80, 64, |x, y| [255 - (x * 3) as u8, (y * 2) as u8, 30]);
    let edit = |images: Vec<String>| {
        let id = s.submit(&json!({"operation": "image_edit", "prompt": "make it blue", "images": images, "steps": 2, "seed": 4}));
        let ev = s.stream(&id);
        let (name, done) = ev.last().cloned().expect("events");
        assert_eq!(name, "complete", "{ev:?}");
        done
    };
    let one = edit(vec![b64(&first)]);
    assert_eq!(decode_png(one["images"][0].as_str().expect("image")).to_rgb8().dimensions(), (64, 80), "an edit takes its first reference's size");
    let two = edit(vec![b64(&first), b64(&second)]);
    assert_ne!(pixels_of(&one), pixels_of(&two), "the second reference steers the result");
    // Inpainting; no strength-based img2img (diffusers has none for klein).
    let inpaint = json!({"operation": "image_inpaint", "prompt": "x", "init_image": b64(&test_image()), "mask_image": b64(&test_mask(32, 32)),
        "width": 32, "height": 32, "steps": 3, "seed": 2});
    let ev = s.stream(&s.submit(&inpaint));
    assert_eq!(ev.last().map(|e| e.0.as_str()), Some("complete"), "{ev:?}");
    let i2i = json!({"operation": "image_transform", "prompt": "x", "input_image": b64(&test_image()), "width": 32, "height": 32, "strength": 0.5});
    assert_eq!(s.post("/v1/jobs", &i2i).status, 400);
    let r = s.post("/v1/images/generations", &json!({"prompt": "a cat", "size": "16x24", "n": 1, "response_format": "b64_json"}));
    assert_eq!(r.status, 200, "{}", r.text());
    s.shutdown();
}

/// ComfyUI's FLUX.2 [klein] split files: a bf16 diffusion-model file with qwen_3 and flux2-vae files in the
/// sibling text_encoders/ and vae/ folders (tokenizer, configs and scheduler from `--model-config`), with
/// per-request LoRAs in PEFT and kohya layouts.
#[test]
fn flux2_split_files_serve_with_per_request_loras() {
    let mut cfg = config("flux2/comfy/diffusion_models/flux-2-klein-base-tiny.safetensors");
    cfg.model_config = Some(fixture("flux2/klein"));
    cfg.lora_dirs = vec![fixture("flux2/lora"), fixture("sd3/lora")];
    let s = Server::start(cfg);
    let m = s.get("/v1/models").json();
    assert_eq!((m["data"][0]["family"].clone(), m["data"][0]["variant"].clone()), (json!("flux2"), json!("flux2-klein-base")), "{m}");
    let job = |loras: Value| {
        let id = s.submit(&json!({"operation": "image_generation", "prompt": "a cat", "width": 16, "height": 24, "steps": 2, "seed": 9, "loras": loras}));
        s.stream(&id).last().cloned().expect("events")
    };
    let (name, plain) = job(json!([]));
    assert_eq!(name, "complete", "{plain}");
    let (name, with) = job(json!([{"name": "flux2_peft", "strength": 0.6}, {"name": "flux2_kohya", "strength": -0.4}]));
    assert_eq!(name, "complete", "{with}");
    assert_ne!(pixels_of(&with), pixels_of(&plain), "the LoRAs changed nothing");
    let meta = sd_pipelines::image_io::read_png_parameters(&unb64(with["images"][0].as_str().expect("image"))).expect("png").expect("meta");
    assert!(meta.contains("Lora weights: \"flux2_peft: 0.6, flux2_kohya: -0.4\""), "{meta}");
    // Removing them restores the model; an SD 3.x LoRA fails its job only, naming the field.
    assert_eq!(pixels_of(&job(json!([])).1), pixels_of(&plain));
    let (name, err) = job(json!([{"name": "sd3_kohya"}]));
    assert_eq!(name, "error", "{err}");
    assert_eq!((err["code"].clone(), err["field"].clone()), (json!("invalid_lora"), json!("loras")), "{err}");
    assert!(err["message"].as_str().is_some_and(|m| m.contains("SD3")), "{err}");
    assert_eq!(pixels_of(&job(json!([])).1), pixels_of(&plain));
    s.shutdown();
}

#[test]
fn flux_loras_are_applied_per_request() {
    let mut cfg = config("flux/dev");
    cfg.lora_dirs = vec![fixture("flux/lora"), fixture("lora")];
    let s = Server::start(cfg);
    let job = |loras: Value| {
        let id = s.submit(&json!({"operation": "image_generation", "prompt": "a cat", "width": 16, "height": 16, "steps": 2, "seed": 9, "loras": loras}));
        s.stream(&id).last().cloned().expect("events")
    };
    let (name, plain) = job(json!([]));
    assert_eq!(name, "complete");
    let (name, with) = job(json!([{"name": "flux_peft", "strength": 0.6}, {"name": "flux_kohya", "strength": -0.4}]));
    assert_eq!(name, "complete", "{with}");
    assert_ne!(pixels_of(&with), pixels_of(&plain), "the LoRAs changed nothing");
    let meta = sd_pipelines::image_io::read_png_parameters(&unb64(with["images"][0].as_str().expect("image"))).expect("png").expect("meta");
    assert!(meta.contains("Lora weights: \"flux_peft: 0.6, flux_kohya: -0.4\""), "{meta}");
    // Removing them restores the model; an SD LoRA fails its job only, naming the field.
    assert_eq!(pixels_of(&job(json!([])).1), pixels_of(&plain));
    let (name, err) = job(json!([{"name": "sd15_kohya"}]));
    assert_eq!(name, "error");
    assert_eq!(err["code"], "invalid_lora");
    assert_eq!(err["field"], "loras");
    assert!(err["message"].as_str().is_some_and(|m| m.contains("FLUX")), "{err}");
    assert_eq!(pixels_of(&job(json!([])).1), pixels_of(&plain));
    s.shutdown();
}

#[test]
fn a_flux_transformer_file_loads_with_components_from_model_config() {
    let mut cfg = config("flux/flux-tiny-dev.safetensors");
    cfg.model_config = Some(fixture("flux/dev"));
    let s = Server::start(cfg);
    assert_eq!(s.get("/v1/models").json()["data"][0]["variant"], "flux-dev");
    let id = s.submit(&json!({"operation": "image_generation", "prompt": "a cat", "width": 16, "height": 16, "steps": 2, "seed": 1, "guidance_scale": 4.0}));
    let (name, done) = s.stream(&id).last().cloned().expect("events");
    assert_eq!(name, "complete");
    let meta = sd_pipelines::image_io::read_png_parameters(&unb64(done["images"][0].as_str().expect("image"))).expect("png").expect("meta");
    assert!(meta.contains("Distilled CFG Scale: 4"), "{meta}");
    s.shutdown();
}

fn pixels_of(done: &Value) -> Vec<u8> {
    decode_png(done["images"][0].as_str().expect("image")).to_rgb8().into_raw()
}

#[test]
fn a1111_controlnet_extension_units_are_honoured() {
    let s = Server::start(controlnet_config());
    let img = b64(&control_png(32, 32));
    let base = json!({"prompt": "a tree", "steps": 3, "width": 32, "height": 32, "seed": 7, "cfg_scale": 7.5, "sampler_name": "Euler"});
    let with = |units: Value| {
        let mut b = base.clone();
        b["alwayson_scripts"] = json!({"controlnet": {"args": units}});
        b
    };
    let first_image = |r: &Resp| decode_png(r.json()["images"][0].as_str().expect("image")).to_rgb8().into_raw();
    let plain = s.post("/sdapi/v1/txt2img", &base);
    assert_eq!(plain.status, 200, "{}", plain.text());
    // A disabled unit (even a broken one) is skipped; the enabled one is named as the extension lists it.
    let units = json!([
        {"enabled": false, "model": "nope", "module": "depth_midas"},
        {"enabled": true, "image": img, "module": "canny", "model": "sd15 [0123abcd]", "weight": 0.8,
         "guidance_start": 0.0, "guidance_end": 1.0, "threshold_a": 50, "threshold_b": 120, "resize_mode": "Crop and Resize"}
    ]);
    let controlled = s.post("/sdapi/v1/txt2img", &with(units));
    assert_eq!(controlled.status, 200, "{}", controlled.text());
    assert_ne!(first_image(&controlled), first_image(&plain), "the ControlNet unit changed nothing");
    // The native API with the same unit gives the same pixels.
    let id = s.submit(&json!({"operation": "image_generation", "prompt": "a tree", "steps": 3, "width": 32, "height": 32, "seed": 7,
        "guidance_scale": 7.5, "noise": "a1111-nv", "controlnets": [{"model": "sd15", "image": img, "preprocessor": "canny", "scale": 0.8,
        "low_threshold": 50, "high_threshold": 120}]}));
    let (_, native) = s.stream(&id).last().cloned().expect("events");
    assert_eq!(pixels_of(&native), first_image(&controlled));
    // Thresholds of -1 (the extension's "unset") on a non-canny module are not an error.
    let r = s.post("/sdapi/v1/txt2img", &with(json!([{"image": img, "module": "none", "model": "sd15", "threshold_a": -1, "threshold_b": -1}])));
    assert_eq!(r.status, 200, "{}", r.text());
    // Errors name the extension's fields.
    let r = s.post("/sdapi/v1/txt2img", &with(json!([{"image": img, "module": "depth_midas", "model": "sd15"}])));
    assert_error(&r, 400, "alwayson_scripts.controlnet.args[0].module");
    let r = s.post("/sdapi/v1/txt2img", &with(json!([{"enabled": false}, {"image": img, "model": "sd15", "weight": 5}])));
    assert_error(&r, 400, "alwayson_scripts.controlnet.args[1].weight");
    let r = s.post("/sdapi/v1/txt2img", &with(json!([{"image": img, "model": "../sd15.safetensors"}])));
    assert_error(&r, 400, "alwayson_scripts.controlnet.args[0].model");
    s.assert_serving();
    s.shutdown();
}

// ---- Hardening: every limit is checked before a job is queued, nothing can hang or exhaust the worker ----

#[test]
fn sampler_step_limits_are_refused_before_queueing_on_every_route() {
    let s = Server::start(config("sd15"));
    // LCM runs at most its original 50 steps: a 400 naming steps, never a 202 then a failed job.
    let r = s.post("/sdapi/v1/txt2img", &json!({"prompt": "x", "sampler_name": "LCM", "steps": 60, "width": 32, "height": 32}));
    assert_error(&r, 400, "steps");
    let r = s.post("/v1/jobs", &json!({"operation": "image_generation", "prompt": "x", "sampler": "LCM", "steps": 60, "width": 32, "height": 32}));
    assert_error(&r, 400, "steps");
    let r = s.post("/v1/jobs", &json!({"operation": "image_generation", "prompt": "x", "sampler": "LCM", "steps": 4, "width": 32, "height": 32}));
    assert_eq!(r.status, 202, "{}", r.text());
    s.assert_serving();
    s.shutdown();
}

#[test]
fn hostile_prompts_are_refused_with_the_field_named() {
    let s = Server::start(config("sd15"));
    let huge_weight = format!("(a:{})", "9".repeat(40));
    let cases: Vec<(Value, &str)> = vec![
        // f32 infinity used to give an all-black image with no error.
        (json!({"prompt": huge_weight}), "prompt"),
        (json!({"prompt": "(a:1e39)"}), "prompt"),
        (json!({"prompt": "(a:1000)"}), "prompt"),
        (json!({"prompt": "ok", "negative_prompt": "(".repeat(40) + "deep"}), "negative_prompt"),
        (json!({"prompt": "x".repeat(sd_pipelines::prompt::MAX_PROMPT_BYTES + 1)}), "prompt"),
        (json!({"prompt": vec!["a"; 40].join(" BREAK ")}), "prompt"),
    ];
    for (fields, field) in cases {
        let mut body = json!({"operation": "image_generation", "width": 32, "height": 32, "steps": 2});
        for (k, v) in fields.as_object().expect("object") {
            body[k] = v.clone();
        }
        assert_error(&s.post("/v1/jobs", &body), 400, field);
        body.as_object_mut().expect("object").remove("operation");
        assert_error(&s.post("/sdapi/v1/txt2img", &body), 400, field);
    }
    // A long, bracket-heavy prompt within the limits is accepted and runs.
    let id = s.submit(&json!({"operation": "image_generation", "prompt": "(a)[b]".repeat(300), "width": 32, "height": 32, "steps": 1}));
    assert_eq!(s.stream(&id).last().map(|e| e.0.as_str()), Some("complete"));
    s.assert_serving();
    s.shutdown();
}

#[test]
fn a_malformed_job_id_gets_a_json_error() {
    let s = Server::start(config("sd15"));
    for (method, path) in [("GET", "/v1/jobs/%FF"), ("DELETE", "/v1/jobs/%FF"), ("GET", "/v1/jobs/%FF/stream")] {
        let r = s.request(method, path, "application/json", b"");
        assert_error(&r, 400, "id");
    }
    s.shutdown();
}

/// A minimal PNG whose header declares `w`×`h` and whose pixel data is a few bytes: only a check
/// of the header can refuse it without allocating the pixels.
fn png_header_only(w: u32, h: u32) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut c = 0xffff_ffffu32;
        for b in bytes {
            c ^= u32::from(*b);
            for _ in 0..8 {
                c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
            }
        }
        !c
    }
    fn chunk(out: &mut Vec<u8>, kind: &[u8], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[16, 6, 0, 0, 0]); // 16-bit RGBA: 8 bytes a pixel once decoded
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    chunk(&mut out, b"IEND", &[]);
    out
}

#[test]
fn image_dimensions_are_checked_from_the_header_before_decoding() {
    let s = Server::start(config("sd15"));
    // 30000² × 8 bytes would be 7.2 GB decoded; 5000×4000 passes the side limit but not the pixel cap.
    for (w, h) in [(30000, 30000), (5000, 4000), (8192, 8192)] {
        let bytes = png_header_only(w, h);
        assert!(bytes.len() < 100 * 1024);
        let r = s.post("/v1/jobs", &json!({"operation": "image_transform", "prompt": "x", "input_image": b64(&bytes), "steps": 2}));
        let v = assert_error(&r, 400, "input_image");
        assert!(v["error"]["message"].as_str().unwrap_or_default().contains(&format!("{w}×{h}")), "{v}");
        let r = s.post("/sdapi/v1/img2img", &json!({"prompt": "x", "init_images": [b64(&bytes)], "steps": 2}));
        assert_eq!(r.status, 400, "{}", r.text());
    }
    s.assert_serving();
    s.shutdown();
}

#[test]
fn oversized_json_lists_are_refused_before_parsing() {
    let s = Server::start(config("sd15"));
    let loras: Vec<Value> = (0..5000).map(|i| json!({"name": format!("l{i}")})).collect();
    let r = s.post("/v1/jobs", &json!({"operation": "image_generation", "prompt": "x", "loras": loras}));
    assert_error(&r, 400, "loras");
    let args: Vec<Value> = (0..5000).map(|_| json!({})).collect();
    let r = s.post("/sdapi/v1/txt2img", &json!({"prompt": "x", "alwayson_scripts": {"controlnet": {"args": args}}}));
    assert_error(&r, 400, "alwayson_scripts.controlnet.args");
    s.assert_serving();
    s.shutdown();
}

fn quick_timeouts(mut cfg: WorkerConfig) -> WorkerConfig {
    cfg.http.header_timeout = Duration::from_millis(500);
    cfg.http.body_timeout = Duration::from_millis(500);
    cfg
}

#[test]
fn a_huge_announced_body_is_refused_at_once() {
    let s = Server::start(config("sd15"));
    let mut conn = TcpStream::connect(s.addr).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let head = "POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000000000000\r\n\r\n{";
    conn.write_all(head.as_bytes()).expect("head");
    let mut buf = vec![0u8; 4096];
    let n = conn.read(&mut buf).expect("an answer without sending the terabyte");
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("\"field\":\"body\""), "{text}");
    s.assert_serving();
    s.shutdown();
}

#[test]
fn slow_headers_and_slow_bodies_are_cut_off() {
    let s = Server::start(quick_timeouts(config("sd15")));
    // Headers that never end: the connection is closed after the header timeout.
    let mut slow = TcpStream::connect(s.addr).expect("connect");
    slow.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n").expect("partial head");
    let t0 = Instant::now();
    let mut buf = Vec::new();
    let _ = slow.read_to_end(&mut buf);
    assert!(t0.elapsed() < Duration::from_secs(5), "held for {:?}", t0.elapsed());
    // An idle keep-alive connection goes the same way.
    let mut idle = TcpStream::connect(s.addr).expect("connect");
    idle.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let t0 = Instant::now();
    let _ = idle.read_to_end(&mut Vec::new());
    assert!(t0.elapsed() < Duration::from_secs(5), "idle connection held for {:?}", t0.elapsed());
    // A body that stops arriving: a JSON error naming the body.
    let mut conn = TcpStream::connect(s.addr).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    conn.write_all(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\":").expect("partial body");
    let mut buf = Vec::new();
    let _ = conn.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 4"), "{text}");
    assert!(text.contains("\"field\":\"body\""), "{text}");
    s.assert_serving();
    s.shutdown();
}

#[test]
fn connections_beyond_the_cap_get_a_503_and_the_worker_recovers() {
    let mut cfg = config("sd15");
    cfg.http.max_connections = 2;
    cfg.http.header_timeout = Duration::from_secs(1);
    let s = Server::start(cfg);
    let held: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(s.addr).expect("connect")).collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut third = TcpStream::connect(s.addr).expect("connect");
    third.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let mut buf = Vec::new();
    let _ = third.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 503") && text.contains("too_many_connections"), "{text}");
    drop(held);
    let t0 = Instant::now();
    while s.get("/metrics").status != 200 {
        assert!(t0.elapsed() < Duration::from_secs(10), "never recovered");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!s.get("/metrics").text().contains("sd_worker_refused_connections_total 0"));
    s.assert_serving();
    s.shutdown();
}

#[test]
fn the_job_store_is_bounded_in_count_and_bytes_oldest_finished_first() {
    let mut cfg = config("sd15");
    cfg.queue_capacity = 1;
    cfg.store.max_jobs = 3;
    let s = Server::start(cfg);
    let mut ids = Vec::new();
    for i in 0..5 {
        let id = s.submit(&json!({"operation": "image_generation", "prompt": "x", "width": 32, "height": 32, "steps": 1, "seed": i}));
        s.stream(&id);
        ids.push(id);
    }
    let kept: Vec<bool> = ids.iter().map(|id| s.get(&format!("/v1/jobs/{id}")).status == 200).collect();
    assert_eq!(kept, [false, false, true, true, true]);
    assert!(s.get("/metrics").text().contains("sd_worker_evicted_jobs_total 2"));
    s.shutdown();

    // A job whose result alone is over the byte cap goes as soon as it has finished (its
    // subscribers already have the images); the engine trims right after the final event.
    let mut cfg = config("sd15");
    cfg.store.max_bytes = 1;
    let s = Server::start(cfg);
    let a = s.submit(&json!({"operation": "image_generation", "prompt": "a", "width": 32, "height": 32, "steps": 1}));
    assert_eq!(s.stream(&a).last().map(|e| e.0.as_str()), Some("complete"));
    let t0 = Instant::now();
    while s.get(&format!("/v1/jobs/{a}")).status != 404 {
        assert!(t0.elapsed() < Duration::from_secs(10), "over the byte cap on its own, yet kept");
        std::thread::sleep(Duration::from_millis(10));
    }
    s.shutdown();
}

#[test]
fn event_streams_are_capped_per_job_and_in_total() {
    let mut cfg = config("sd15");
    cfg.http.max_subscribers_per_job = 1;
    cfg.http.max_subscribers = 2;
    let s = Server::start(cfg);
    let a = s.submit(&json!({"operation": "image_generation", "prompt": "long", "width": 32, "height": 32, "steps": 1000, "seed": 1}));
    let open = |id: &str| {
        let mut c = TcpStream::connect(s.addr).expect("connect");
        c.write_all(format!("GET /v1/jobs/{id}/stream HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).expect("write");
        c.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let mut buf = [0u8; 12];
        c.read_exact(&mut buf).expect("status line");
        assert_eq!(&buf, b"HTTP/1.1 200");
        c
    };
    let first = open(&a);
    assert_error(&s.get(&format!("/v1/jobs/{a}/stream")), 429, "id");
    let b = s.submit(&json!({"operation": "image_generation", "prompt": "b", "width": 32, "height": 32, "steps": 1, "seed": 2}));
    let second = open(&b);
    let c = s.submit(&json!({"operation": "image_generation", "prompt": "c", "width": 32, "height": 32, "steps": 1, "seed": 3}));
    assert_error(&s.get(&format!("/v1/jobs/{c}/stream")), 429, "id");
    // A closed stream frees its place once the worker notices (at its next event or keep-alive).
    drop((first, second));
    assert_eq!(s.delete(&format!("/v1/jobs/{a}")).status, 202);
    s.wait_status(&b, |v| v["status"] == "completed");
    let t0 = Instant::now();
    loop {
        let r = s.get(&format!("/v1/jobs/{c}/stream"));
        if r.status == 200 {
            break;
        }
        assert_error(&r, 429, "id");
        assert!(t0.elapsed() < Duration::from_secs(30), "closed streams were never released");
        std::thread::sleep(Duration::from_millis(50));
    }
    s.shutdown();
}

fn b64_basic(user: &str, pass: &str) -> String {
    format!("Basic {}", b64(format!("{user}:{pass}").as_bytes()))
}

#[test]
fn api_keys_and_basic_auth_guard_every_route_but_the_probes_and_jobs_belong_to_their_caller() {
    let mut cfg = config("sd15");
    cfg.auth.api_keys = vec!["key-one".into(), "key-two".into()];
    cfg.auth.basic = vec![("webui".into(), "secret".into())];
    let s = Server::start(cfg);
    let call = |method: &str, path: &str, auth: Option<&str>, body: &[u8]| {
        let h: Vec<(&str, &str)> = auth.map(|a| vec![("Authorization", a)]).unwrap_or_default();
        raw_request_with(s.addr, method, path, "application/json", &h, body)
    };
    assert_eq!(call("GET", "/health", None, b"").status, 200);
    assert_eq!(call("GET", "/ready", None, b"").status, 200);
    for (method, path) in [("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/jobs"), ("GET", "/sdapi/v1/progress"), ("POST", "/sdapi/v1/interrupt"), ("GET", "/v1/jobs/x")] {
        let r = call(method, path, None, b"{}");
        assert_error(&r, 401, "authorization");
        assert!(r.header("www-authenticate").is_some_and(|v| v.contains("Basic")), "{method} {path}");
        assert_error(&call(method, path, Some("Bearer key-three"), b"{}"), 401, "authorization");
        assert_error(&call(method, path, Some(&b64_basic("webui", "wrong")), b"{}"), 401, "authorization");
    }
    assert_eq!(call("GET", "/v1/models", Some("Bearer key-two"), b"").status, 200);
    assert_eq!(call("GET", "/sdapi/v1/sd-models", Some(&b64_basic("webui", "secret")), b"").status, 200);
    // A job submitted with one credential is not another's to cancel or interrupt.
    let body = json!({"operation": "image_generation", "prompt": "mine", "width": 32, "height": 32, "steps": 1000}).to_string();
    let r = call("POST", "/v1/jobs", Some("Bearer key-one"), body.as_bytes());
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["job_id"].as_str().expect("id").to_string();
    let t0 = Instant::now();
    while call("GET", &format!("/v1/jobs/{id}"), Some("Bearer key-one"), b"").json()["status"] != "running" {
        assert!(t0.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_error(&call("DELETE", &format!("/v1/jobs/{id}"), Some("Bearer key-two"), b""), 403, "id");
    assert_eq!(call("POST", "/sdapi/v1/interrupt", Some(&b64_basic("webui", "secret")), b"").status, 200);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(call("GET", &format!("/v1/jobs/{id}"), Some("Bearer key-one"), b"").json()["status"], "running", "someone else's interrupt");
    assert_eq!(call("POST", "/sdapi/v1/interrupt", Some("Bearer key-one"), b"").status, 200);
    let t0 = Instant::now();
    while call("GET", &format!("/v1/jobs/{id}"), Some("Bearer key-one"), b"").json()["status"] != "cancelled" {
        assert!(t0.elapsed() < Duration::from_secs(60), "the owner's interrupt stops it");
        std::thread::sleep(Duration::from_millis(10));
    }
    s.shutdown();
}

#[test]
fn cors_is_off_by_default_and_answers_only_configured_origins() {
    let s = Server::start(config("sd15"));
    let r = raw_request_with(s.addr, "GET", "/health", "application/json", &[("Origin", "https://app.example")], b"");
    assert!(r.header("access-control-allow-origin").is_none());
    s.shutdown();

    let mut cfg = config("sd15");
    cfg.cors_origins = vec!["https://app.example".into()];
    cfg.auth.api_keys = vec!["k".into()];
    let s = Server::start(cfg);
    // A preflight carries no credentials and is answered before authentication.
    let pre = [("Origin", "https://app.example"), ("Access-Control-Request-Method", "POST")];
    let r = raw_request_with(s.addr, "OPTIONS", "/v1/jobs", "application/json", &pre, b"");
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(r.header("access-control-allow-origin"), Some("https://app.example".to_string()));
    assert!(r.header("access-control-allow-headers").is_some_and(|h| h.contains("authorization")));
    let r = raw_request_with(s.addr, "GET", "/v1/models", "application/json", &[("Origin", "https://app.example"), ("Authorization", "Bearer k")], b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("access-control-allow-origin"), Some("https://app.example".to_string()));
    let r = raw_request_with(s.addr, "GET", "/v1/models", "application/json", &[("Origin", "https://evil.example"), ("Authorization", "Bearer k")], b"");
    assert!(r.header("access-control-allow-origin").is_none());
    s.shutdown();
}

// ---- Property: well-formed requests with valid and hostile field values on every route ----

mod property {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};

    /// A field that is absent (1 in 5), valid (most often) or hostile (about 1 in 12).
    fn field(valid: BoxedStrategy<Value>, hostile: BoxedStrategy<Value>) -> BoxedStrategy<Option<Value>> {
        prop_oneof![3 => Just(None), 12 => valid.prop_map(Some), 1 => hostile.prop_map(Some)].boxed()
    }

    fn any_hostile() -> BoxedStrategy<Value> {
        prop_oneof![
            Just(json!(-1)),
            Just(json!(0)),
            Just(json!(u64::MAX)),
            Just(json!(1e308)),
            Just(json!(-1e308)),
            Just(json!("NaN")),
            Just(json!("")),
            Just(json!(true)),
            Just(json!([1, 2, 3])),
            Just(json!({"nested": {"deeper": [[[]]]}})),
            Just(json!("x".repeat(20_000))),
            Just(json!("\u{0}\u{202e}💥")),
        ]
        .boxed()
    }

    fn prompt() -> BoxedStrategy<Value> {
        prop_oneof![
            Just(json!("a red fox")),
            Just(json!("")),
            Just(json!("(a:1.2) [b] BREAK c, d")),
            Just(json!("\\(literal\\) :3)")),
            "[a-z ,()\\[\\]:.0-9]{0,60}".prop_map(|s| json!(s)),
        ]
        .boxed()
    }

    fn hostile_prompt() -> BoxedStrategy<Value> {
        prop_oneof![
            Just(json!("(".repeat(200))),
            Just(json!(format!("(a:{})", "9".repeat(40)))),
            Just(json!("(a:1e3)".repeat(3))),
            Just(json!(vec!["x"; 64].join(" BREAK "))),
            any_hostile(),
        ]
        .boxed()
    }

    fn side() -> BoxedStrategy<Value> {
        prop_oneof![Just(json!(32)), Just(json!(48)), Just(json!(64))].boxed()
    }

    fn steps() -> BoxedStrategy<Value> {
        (1u64..=3).prop_map(|s| json!(s)).boxed()
    }

    fn sampler() -> BoxedStrategy<Value> {
        prop_oneof![Just("Euler"), Just("Euler a"), Just("DDIM"), Just("DPM++ 2M"), Just("DPM++ 2M Karras"), Just("UniPC"), Just("LCM"), Just("Heun")]
            .prop_map(|s| json!(s))
            .boxed()
    }

    fn image_b64() -> BoxedStrategy<Value> {
        Just(json!(b64(&test_image()))).boxed()
    }

    fn hostile_image() -> BoxedStrategy<Value> {
        prop_oneof![
            Just(json!("%%% not base64")),
            Just(json!(b64(b"plain text"))),
            Just(json!(b64(&png_header_only(30000, 30000)))),
            Just(json!(b64(&test_mask(16, 16)))),
            proptest::collection::vec(any::<u8>(), 0..200).prop_map(|b| json!(b64(&b))),
        ]
        .boxed()
    }

    fn object(fields: Vec<(&'static str, Option<Value>)>) -> Value {
        Value::Object(fields.into_iter().filter_map(|(k, v)| v.map(|v| (k.to_string(), v))).collect())
    }

    fn loras() -> BoxedStrategy<Value> {
        prop_oneof![Just(json!([{"name": "good", "strength": 0.5}])), Just(json!([])), Just(json!([{"name": "good"}, {"name": "good", "strength": -0.3}]))].boxed()
    }

    fn hostile_loras() -> BoxedStrategy<Value> {
        prop_oneof![
            Just(json!([{"name": "noise"}])),
            Just(json!([{"name": "truncated"}])),
            Just(json!([{"name": "missing"}])),
            Just(json!([{"path": "../good.safetensors"}])),
            Just(json!([{"name": "good", "strength": 1e9}])),
            Just(json!(vec![json!({"name": "good"}); 40])),
            any_hostile(),
        ]
        .boxed()
    }

    /// (route, body) pairs over every POST route.
    fn request() -> impl Strategy<Value = (&'static str, Value)> {
        let common = (
            field(prompt(), hostile_prompt()),
            field(prompt(), hostile_prompt()),
            field(side(), any_hostile()),
            field(side(), any_hostile()),
            field(steps(), any_hostile()),
            field((0.0f64..9.0).prop_map(|g| json!(g)).boxed(), any_hostile()),
            field(any::<i64>().prop_map(|s| json!(s)).boxed(), any_hostile()),
            field(sampler(), any_hostile()),
        );
        let extra = (
            field((1u64..=2).prop_map(|b| json!(b)).boxed(), any_hostile()),
            field(image_b64(), hostile_image()),
            field((0.5f64..=1.0).prop_map(|s| json!(s)).boxed(), any_hostile()),
            field(Just(json!(b64(&test_mask(32, 32)))).boxed(), hostile_image()),
            field(prop_oneof![Just(json!("philox")), Just(json!("torch"))].boxed(), any_hostile()),
            field(prop_oneof![Just(json!("default")), Just(json!("karras")), Just(json!("exponential"))].boxed(), any_hostile()),
        );
        (0usize..7, common, extra, field(loras(), hostile_loras())).prop_map(|(route, (prompt, negative, w, h, steps, guidance, seed, sampler), (batch, image, strength, mask, noise, schedule), loras)| {
            match route {
                0..=2 => {
                    let op = ["image_generation", "image_transform", "image_inpaint"][route];
                    let mut v = object(vec![
                        ("prompt", prompt.or(Some(json!("p")))),
                        ("negative_prompt", negative),
                        ("width", w),
                        ("height", h),
                        ("steps", steps.or(Some(json!(2)))),
                        ("guidance_scale", guidance),
                        ("seed", seed),
                        ("sampler", sampler),
                        ("schedule", schedule),
                        ("batch", batch),
                        ("noise", noise),
                        ("loras", loras),
                    ]);
                    v["operation"] = json!(op);
                    if route == 1 {
                        v["input_image"] = image.unwrap_or_else(|| json!(b64(&test_image())));
                        if let Some(s) = strength {
                            v["strength"] = s;
                        }
                    } else if route == 2 {
                        v["init_image"] = image.unwrap_or_else(|| json!(b64(&test_image())));
                        v["mask_image"] = mask.unwrap_or_else(|| json!(b64(&test_mask(32, 32))));
                    }
                    ("/v1/jobs", v)
                }
                3 => {
                    let size = match (w, h) {
                        (Some(w), Some(h)) if w.is_u64() && h.is_u64() => Some(json!(format!("{w}x{h}"))),
                        (Some(w), _) => Some(w),
                        _ => None,
                    };
                    ("/v1/images/generations", object(vec![("prompt", prompt.or(Some(json!("p")))), ("size", size.or(Some(json!("32x32")))), ("n", batch), ("steps", steps.or(Some(json!(2)))), ("seed", seed), ("guidance_scale", guidance), ("negative_prompt", negative)]))
                }
                4 => ("/v1/images/edits", object(vec![("prompt", prompt.or(Some(json!("p")))), ("image", image.or(Some(json!(b64(&test_image()))))), ("size", Some(json!("32x32"))), ("steps", steps.or(Some(json!(2)))), ("strength", strength), ("seed", seed)])),
                5 => ("/sdapi/v1/txt2img", object(vec![("prompt", prompt), ("negative_prompt", negative), ("width", w.or(Some(json!(32)))), ("height", h.or(Some(json!(32)))), ("steps", steps.or(Some(json!(2)))), ("cfg_scale", guidance), ("seed", seed), ("sampler_name", sampler), ("batch_size", batch)])),
                _ => ("/sdapi/v1/img2img", object(vec![("prompt", prompt), ("init_images", Some(json!([image.unwrap_or_else(|| json!(b64(&test_image())))]))), ("width", w.or(Some(json!(32)))), ("height", h.or(Some(json!(32)))), ("steps", steps.or(Some(json!(2)))), ("denoising_strength", strength), ("seed", seed), ("sampler_name", sampler)])),
            }
        })
    }

    #[test]
    fn every_route_answers_2xx_or_a_4xx_json_error_naming_a_field() {
        // A LoRA folder with a real LoRA, random bytes and a truncated header under .safetensors names.
        let dir = std::env::temp_dir().join(format!("sd-worker-prop-loras-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("lora dir");
        std::fs::copy(fixture("lora/sd15_kohya.safetensors"), dir.join("good.safetensors")).expect("copy");
        std::fs::write(dir.join("noise.safetensors"), (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect::<Vec<u8>>()).expect("noise");
        std::fs::write(dir.join("truncated.safetensors"), 1_000_000u64.to_le_bytes()).expect("truncated");
        let mut cfg = config("sd15");
        cfg.lora_dirs = vec![dir.clone()];
        let s = Server::start(cfg);
        // Bodies that are not JSON at all.
        for body in [&b"\xff\xfe\x00garbage"[..], b"", b"[]", b"{\"operation\": \"image_generation\", \"prompt\": \"unterminated"] {
            assert_error(&s.request("POST", "/v1/jobs", "application/json", body), 400, "body");
        }
        let mut runner = TestRunner::new(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() });
        let accepted = std::cell::Cell::new(0usize);
        let total = std::cell::Cell::new(0usize);
        let t0 = Instant::now();
        let outcome = runner.run(&request(), |(route, body)| {
            total.set(total.get() + 1);
            let r = s.post(route, &body);
            let brief = || format!("{route} {} → {} {}", &body.to_string()[..body.to_string().len().min(300)], r.status, &r.text()[..r.text().len().min(300)]);
            prop_assert!(r.status < 500, "{}", brief());
            if r.status >= 400 {
                let v: Value = serde_json::from_slice(&r.body).map_err(|e| TestCaseError::fail(format!("not JSON ({e}): {}", brief())))?;
                let field = v["error"]["field"].as_str().unwrap_or_default();
                prop_assert!(!field.is_empty(), "no field named: {}", brief());
                return Ok(());
            }
            if route == "/v1/jobs" {
                let id = r.json()["job_id"].as_str().unwrap_or_default().to_string();
                let ev = s.stream(&id);
                prop_assert_eq!(ev.last().map(|e| e.0.as_str()), Some("complete"), "an accepted job failed: {} {:?}", brief(), ev.last());
            }
            accepted.set(accepted.get() + 1);
            Ok(())
        });
        if let Err(e) = outcome {
            panic!("{e}");
        }
        eprintln!("{} of {} requests accepted and completed in {:.1}s", accepted.get(), total.get(), t0.elapsed().as_secs_f64());
        assert!(accepted.get() * 10 >= total.get(), "only {} of {} accepted", accepted.get(), total.get());
        s.assert_serving();
        s.shutdown();
        let _ = std::fs::remove_dir_all(dir);
    }
}


#[test]
fn a_job_whose_images_together_exceed_the_pixel_budget_is_refused() {
    let s = Server::start({
        let mut c = controlnet_config();
        c.limits.max_body_bytes = 4 * 1024 * 1024;
        c
    });
    // Five 4096² pictures (each at the per-image cap) are more than the job's 4 × 4096².
    let big = b64(&png(4096, 4096, |_, _| [40, 80, 120]));
    let mask = b64(&png(4096, 4096, |x, _| if x > 2048 { [255, 255, 255] } else { [0, 0, 0] }));
    let units: Vec<Value> = (0..3).map(|_| json!({"model": "sd15", "image": big})).collect();
    let r = s.post("/v1/jobs", &json!({"operation": "image_inpaint", "prompt": "x", "init_image": big, "mask_image": mask, "width": 32, "height": 32, "steps": 1, "controlnets": units}));
    let v = assert_error(&r, 400, "controlnets");
    assert!(v["error"]["message"].as_str().unwrap_or_default().contains("pixels together"), "{v}");
    s.assert_serving();
    s.shutdown();
}

#[test]
fn shutdown_does_not_wait_for_slow_or_idle_sockets_beyond_the_grace_period() {
    let mut cfg = config("sd15");
    cfg.shutdown_grace = Duration::from_millis(500);
    let s = Server::start(cfg);
    let mut slow = TcpStream::connect(s.addr).expect("connect");
    slow.write_all(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{").expect("partial body");
    let idle = TcpStream::connect(s.addr).expect("connect");
    std::thread::sleep(Duration::from_millis(100));
    let t0 = Instant::now();
    s.shutdown();
    assert!(t0.elapsed() < Duration::from_secs(5), "shutdown took {:?}", t0.elapsed());
    drop((slow, idle));
}

/// `(id, event)` of every SSE event in `text`.
fn sse_ids(text: &str) -> Vec<(u64, String)> {
    text.split("\n\n")
        .filter_map(|b| {
            let field = |name: &str| b.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_string());
            Some((field("id:")?.parse().ok()?, field("event:")?))
        })
        .collect()
}

#[test]
fn sse_ids_grow_and_last_event_id_resumes_after_them() {
    let s = Server::start(config("sd15"));
    let id = s.submit(&json!({"operation": "image_generation", "prompt": "ids", "width": 32, "height": 32, "steps": 4, "seed": 5}));
    // Every event carries an id, growing (whether the job is still running or already done).
    let whole = sse_ids(&s.get(&format!("/v1/jobs/{id}/stream")).text());
    assert_eq!(whole.last().map(|e| e.1.as_str()), Some("complete"), "{whole:?}");
    assert!(whole.windows(2).all(|w| w[0].0 < w[1].0), "ids do not grow: {whole:?}");
    // A client that saw the first progress event gets only later events (from the job's current state).
    let first_progress = whole.iter().find(|e| e.1 == "progress").map(|e| e.0).expect("progress");
    let path = format!("/v1/jobs/{id}/stream");
    let resumed = raw_request_with(s.addr, "GET", &path, "application/json", &[("Last-Event-ID", &first_progress.to_string())], b"");
    let resumed = sse_ids(&resumed.text());
    assert_eq!(resumed.last().map(|e| e.1.as_str()), Some("complete"), "{resumed:?}");
    assert!(resumed.iter().all(|e| e.0 > first_progress), "{resumed:?}");
    // A client that saw the final event gets nothing more.
    let last = whole.last().map(|e| e.0).expect("last");
    let done = raw_request_with(s.addr, "GET", &path, "application/json", &[("Last-Event-ID", &last.to_string())], b"");
    assert_eq!(done.status, 200);
    assert!(sse_ids(&done.text()).is_empty(), "{}", done.text());
}

/// `--vae`: the worker decodes with the given VAE (here the tiny SDXL one, same architecture) instead of
/// the model's own (the refusals are sd-models' tests).
#[test]
fn a_separate_vae_is_used_for_decoding() {
    let job = json!({"operation": "image_generation", "prompt": "a tree", "width": 32, "height": 32, "steps": 2, "seed": 3});
    let run = |cfg| {
        let s = Server::start(cfg);
        let done = s.stream(&s.submit(&job)).last().cloned().expect("events").1;
        s.shutdown();
        pixels_of(&done)
    };
    let own = run(config("sd15"));
    let mut cfg = config("sd15");
    cfg.vae = Some(fixture("sdxl/vae"));
    let other = run(cfg);
    assert_ne!(own, other, "the VAE override changed nothing");
}

/// A1111's hires fix on `/sdapi/v1/txt2img`: `enable_hr` with `hr_scale`, `hr_upscaler`,
/// `hr_second_pass_steps` and `denoising_strength` gives the upscaled image and A1111's infotext keys;
/// bad hires fields are 400s naming them.
#[test]
fn a1111_hires_fix_renders_the_second_pass() {
    let s = Server::start(config("sd15"));
    let base = json!({"prompt": "a tree", "width": 32, "height": 32, "steps": 3, "seed": 5, "sampler_name": "Euler", "cfg_scale": 7});
    let mut hr = base.clone();
    hr["enable_hr"] = json!(true);
    hr["hr_scale"] = json!(2);
    hr["hr_upscaler"] = json!("Latent");
    hr["hr_second_pass_steps"] = json!(4);
    hr["denoising_strength"] = json!(0.5);
    let r = s.post("/sdapi/v1/txt2img", &hr);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let img = decode_png(v["images"][0].as_str().expect("image"));
    assert_eq!((img.width(), img.height()), (64, 64));
    let info: Value = serde_json::from_str(v["info"].as_str().expect("info")).expect("info json");
    let text = info["infotexts"][0].as_str().expect("infotext");
    assert!(text.contains("Size: 32x32") && text.contains("Hires upscaler: Latent") && text.contains("Hires steps: 4"), "{text}");
    // Pixel upscaler and an explicit target.
    let mut px = hr.clone();
    px["hr_upscaler"] = json!("Lanczos");
    px["hr_resize_x"] = json!(48);
    let r = s.post("/sdapi/v1/txt2img", &px);
    assert_eq!(r.status, 200, "{}", r.text());
    let img = decode_png(r.json()["images"][0].as_str().expect("image"));
    assert_eq!((img.width(), img.height()), (48, 48));
    for (field, value, named) in [
        ("hr_upscaler", json!("R-ESRGAN 4x+"), "hr_upscaler"),
        ("hr_scale", json!(20), "hr_scale"),
        ("denoising_strength", json!(0.01), "denoising_strength"),
    ] {
        let mut bad = hr.clone();
        bad[field] = value;
        assert_error(&s.post("/sdapi/v1/txt2img", &bad), 400, named);
    }
    // The native API's `hires` object, with its own field names.
    let native = json!({"operation": "image_generation", "prompt": "a tree", "width": 32, "height": 32, "steps": 3, "seed": 5,
        "hires": {"scale": 2, "upscaler": "Latent (nearest)", "steps": 4, "strength": 0.5}});
    let ev = s.stream(&s.submit(&native));
    let (name, done) = ev.last().cloned().expect("events");
    assert_eq!(name, "complete", "{ev:?}");
    let img = decode_png(done["images"][0].as_str().expect("image"));
    assert_eq!((img.width(), img.height()), (64, 64));
    assert_eq!(done["parameters"]["hires"]["upscaler"], "Latent (nearest)");
    let totals: Vec<u64> = ev.iter().filter(|e| e.0 == "progress").filter_map(|e| e.1["total"].as_u64()).collect();
    assert_eq!((totals.first(), totals.last()), (Some(&3), Some(&2)), "both passes report progress: {totals:?}");
    let mut bad = native.clone();
    bad["hires"]["upscaler"] = json!("4x-UltraSharp");
    assert_error(&s.post("/v1/jobs", &bad), 400, "hires.upscaler");
    let mut bad = native.clone();
    bad["hires"]["sharpen"] = json!(true);
    assert_eq!(s.post("/v1/jobs", &bad).status, 400);
    s.shutdown();
}

#[test]
fn embeddings_from_the_embeddings_dir_are_listed_used_by_name_and_hashed_in_the_infotext() {
    let mut cfg = config("sd15");
    cfg.embedding_dirs = vec![fixture("embeddings")];
    let s = Server::start(cfg);
    let list = s.get("/sdapi/v1/embeddings").json();
    for name in ["mystyle", "badhand", "cattoy"] {
        assert_eq!(list["loaded"][name]["shape"], 32, "{list}");
    }
    assert_eq!(list["loaded"]["mystyle"]["vectors"], 2);
    assert!(list["skipped"]["xlstyle"].is_object(), "the SDXL embedding does not fit SD 1.5: {list}");
    let txt2img = |prompt: &str, negative: &str| {
        let r = s.post("/sdapi/v1/txt2img", &json!({"prompt": prompt, "negative_prompt": negative, "steps": 2, "width": 32, "height": 32, "seed": 5}));
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["images"][0].as_str().expect("image").to_string()
    };
    let with = txt2img("a mystyle cat", "BadHand");
    let meta = sd_pipelines::image_io::read_png_parameters(&unb64(&with)).expect("png").expect("meta");
    // First 12 hex digits of each file's SHA-256 (as `sha256sum` prints it), as A1111 writes them.
    assert!(meta.contains("TI hashes: \"mystyle: c62b57cce65c, badhand: b66172badbf3\""), "{meta}");
    assert_ne!(with, txt2img("a cat", ""), "the embeddings changed nothing");
    s.shutdown();
}

#[test]
fn a1111_variation_seeds_and_eta_noise_seed_delta_change_the_noise_as_asked() {
    let s = Server::start(config("sd15"));
    let run = |extra: Value| {
        let mut body = json!({"prompt": "a fox", "width": 32, "height": 32, "steps": 3, "seed": 12, "sampler_name": "Euler a"});
        for (k, v) in extra.as_object().expect("object") {
            body[k] = v.clone();
        }
        let r = s.post("/sdapi/v1/txt2img", &body);
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        let meta = sd_pipelines::image_io::read_png_parameters(&unb64(v["images"][0].as_str().expect("image"))).expect("png").expect("meta");
        (pixels_of(&v), meta, v)
    };
    let (plain, _, _) = run(json!({}));
    let (varied, meta, v) = run(json!({"subseed": 99, "subseed_strength": 0.5}));
    assert_ne!(varied, plain);
    assert!(meta.contains("Variation seed: 99, Variation seed strength: 0.5"), "{meta}");
    let info: Value = serde_json::from_str(v["info"].as_str().expect("info")).expect("json");
    assert_eq!((info["subseed"].as_u64(), info["subseed_strength"].as_f64()), (Some(99), Some(0.5)));
    assert_eq!(run(json!({"subseed": 99, "subseed_strength": 0.5})).0, varied, "a variation seed is reproducible");
    assert_eq!(run(json!({"subseed": 99, "subseed_strength": 0})).0, plain);
    let (ensd, meta, _) = run(json!({"override_settings": {"eta_noise_seed_delta": 31337}}));
    assert_ne!(ensd, plain, "an ancestral sampler's noise comes from seed + ENSD");
    assert!(meta.contains("ENSD: 31337"), "{meta}");
    let (cpu, meta, _) = run(json!({"override_settings": {"randn_source": "CPU"}}));
    assert_ne!(cpu, plain);
    assert!(meta.contains("RNG: CPU"), "{meta}");
    // A1111's "resize seed from": the seed's noise as at 64x48 (8x6 latents), centred in this size's.
    let (resized, meta, _) = run(json!({"seed_resize_from_h": 48, "seed_resize_from_w": 64}));
    assert_ne!(resized, plain);
    assert!(meta.contains("Seed resize from: 64x48"), "{meta}");
    assert_eq!(run(json!({"seed_resize_from_h": 48, "seed_resize_from_w": 64})).0, resized, "reproducible");
    assert_eq!(run(json!({"seed_resize_from_h": -1, "seed_resize_from_w": -1})).0, plain, "-1 is off");
    for (body, field) in [(json!({"subseed_strength": 2}), "subseed_strength"), (json!({"seed_resize_from_h": 4, "seed_resize_from_w": 64}), "seed_resize_from_h")] {
        let mut b = json!({"prompt": "a fox", "width": 32, "height": 32, "steps": 2});
        for (k, v) in body.as_object().expect("object") {
            b[k] = v.clone();
        }
        assert_error(&s.post("/sdapi/v1/txt2img", &b), 400, field);
    }
    s.shutdown();
}

#[test]
fn an_interrupted_or_skipped_a1111_request_answers_200_with_its_last_steps_images() {
    let s = Server::start(config("sd15"));
    for route in ["/sdapi/v1/interrupt", "/sdapi/v1/skip"] {
        let addr = s.addr;
        let body = json!({"prompt": "a long one", "width": 32, "height": 32, "steps": 1000, "seed": 4});
        let waiting = std::thread::spawn(move || raw_request(addr, "POST", "/sdapi/v1/txt2img", "application/json", body.to_string().as_bytes()));
        let t0 = std::time::Instant::now();
        while s.get("/sdapi/v1/progress").json()["state"]["sampling_step"].as_u64().unwrap_or(0) < 2 {
            assert!(t0.elapsed() < Duration::from_secs(60), "the job never started");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(s.post(route, &json!({})).status, 200);
        let r = waiting.join().expect("request thread");
        assert_eq!(r.status, 200, "{route}: {}", r.text());
        let v = r.json();
        let img = decode_png(v["images"][0].as_str().expect("image"));
        assert_eq!((img.width(), img.height()), (32, 32));
        let meta = sd_pipelines::image_io::read_png_parameters(&unb64(v["images"][0].as_str().expect("image"))).expect("png").expect("meta");
        assert!(meta.contains("Steps: 1000") && meta.contains("Seed: 4"), "{meta}");
    }
    s.shutdown();
}

#[test]
fn a1111_hires_fix_with_a_controlnet_unit_steers_both_passes() {
    let s = Server::start(controlnet_config());
    let img = b64(&control_png(32, 32));
    let body = |units: Value| {
        json!({"prompt": "a tree", "steps": 2, "width": 32, "height": 32, "seed": 7, "enable_hr": true, "hr_scale": 1.5,
            "denoising_strength": 0.6, "alwayson_scripts": {"controlnet": {"args": units}}})
    };
    let plain = s.post("/sdapi/v1/txt2img", &body(json!([])));
    let controlled = s.post("/sdapi/v1/txt2img", &body(json!([{"image": img, "module": "canny", "model": "sd15", "threshold_a": 50, "threshold_b": 120}])));
    assert_eq!(controlled.status, 200, "{}", controlled.text());
    let pic = |r: &Resp| decode_png(r.json()["images"][0].as_str().expect("image"));
    assert_eq!((pic(&controlled).width(), pic(&controlled).height()), (48, 48));
    assert_ne!(pic(&controlled).to_rgb8().into_raw(), pic(&plain).to_rgb8().into_raw());
    let meta = sd_pipelines::image_io::read_png_parameters(&unb64(controlled.json()["images"][0].as_str().expect("image"))).expect("png").expect("meta");
    assert!(meta.contains("Hires resize: 48x48") && meta.contains("ControlNet 0"), "{meta}");
    s.shutdown();
}

#[test]
fn models_dir_checkpoints_switch_without_dropping_queued_jobs() {
    let dir = std::env::temp_dir().join(format!("sd-worker-models-dir-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let models = dir.join("models");
    copy_dir(&fixture("sd15"), &models.join("sd15"));
    copy_dir(&fixture("sd2"), &models.join("v2/sd2"));
    std::fs::write(dir.join("outside.safetensors"), b"not a model").expect("write");
    let mut cfg = config("sd15");
    cfg.model = sd_worker::ModelSource::Path(models.join("sd15"));
    cfg.models_dirs = vec![models.clone()];
    let s = Server::start(cfg);
    let listed = s.get("/sdapi/v1/sd-models").json();
    let titles: Vec<&str> = listed.as_array().expect("list").iter().filter_map(|m| m["title"].as_str()).collect();
    assert_eq!(titles, ["sd15", "v2/sd2"], "{listed}");
    let metric = |s: &Server, name: &str| -> u64 {
        let m = s.get("/metrics").text();
        m.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).and_then(|v| v.parse().ok()).unwrap_or(u64::MAX)
    };
    assert_eq!(metric(&s, "sd_worker_models_loaded"), 1);
    let txt = |seed: u64, o: Value| json!({"prompt": "a fox", "width": 32, "height": 32, "steps": 2, "seed": seed, "override_settings": o});
    let on_sd15 = s.post("/sdapi/v1/txt2img", &txt(5, json!({})));
    assert_eq!(on_sd15.status, 200, "{}", on_sd15.text());

    // A long job queued on sd15, then a switch: the switch waits for it, and it finishes on sd15.
    let long = s.submit(&json!({"operation": "image_generation", "prompt": "long", "width": 32, "height": 32, "steps": 40, "seed": 1}));
    let r = s.post("/sdapi/v1/options", &json!({"sd_model_checkpoint": "v2/sd2.safetensors"}));
    assert_error(&r, 400, "sd_model_checkpoint");
    let r = s.post("/sdapi/v1/options", &json!({"sd_model_checkpoint": "v2/sd2"}));
    assert_eq!(r.status, 200, "{}", r.text());
    let done = s.wait_status(&long, |v| v["status"] == "completed");
    assert_eq!(done["result"]["parameters"]["model"], "sd15", "{done}");
    assert_eq!(s.get("/sdapi/v1/options").json()["sd_model_checkpoint"], "v2/sd2");
    assert_eq!(s.get("/v1/models").json()["data"][0]["variant"], "sd21");
    // The cache holds only the model in use by default.
    assert_eq!(metric(&s, "sd_worker_models_loaded"), 1);
    let r = s.post("/sdapi/v1/txt2img", &txt(5, json!({})));
    assert_eq!(r.status, 200, "{}", r.text());
    let info: Value = serde_json::from_str(r.json()["info"].as_str().expect("info")).expect("info json");
    assert_eq!(info["sd_model_name"], "v2/sd2");
    assert!(info["infotexts"][0].as_str().is_some_and(|t| t.contains("Model: v2/sd2")), "{info}");
    // override_settings runs one request on another checkpoint and leaves the choice alone.
    let back = s.post("/sdapi/v1/txt2img", &txt(5, json!({"sd_model_checkpoint": "sd15"})));
    assert_eq!(back.status, 200, "{}", back.text());
    assert_eq!(pixels_of(&back.json()), pixels_of(&on_sd15.json()), "the same seed on sd15 gives the same picture after switching back");
    assert_eq!(s.get("/sdapi/v1/options").json()["sd_model_checkpoint"], "v2/sd2");
    // The native API's `model` does the same.
    let id = s.submit(&json!({"operation": "image_generation", "prompt": "x", "width": 32, "height": 32, "steps": 1, "seed": 2, "model": "sd15"}));
    assert_eq!(s.stream(&id).last().map(|e| e.1["parameters"]["model"].clone()), Some(json!("sd15")));
    // Names resolve only inside the models folders.
    for bad in ["../sd15", "outside", "/etc/passwd", "hub:stabilityai/sd-turbo", "v2/../../sd15"] {
        assert_error(&s.post("/sdapi/v1/options", &json!({"sd_model_checkpoint": bad})), 400, "sd_model_checkpoint");
        assert_error(&s.post("/sdapi/v1/txt2img", &txt(1, json!({"sd_model_checkpoint": bad}))), 400, "override_settings.sd_model_checkpoint");
    }
    assert_error(&s.post("/v1/jobs", &json!({"operation": "image_generation", "prompt": "x", "model": 3})), 400, "model");
    // A new checkpoint appears after a refresh; one that fails to load is a 422 and the choice stays.
    std::fs::write(models.join("broken.safetensors"), b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ").expect("write");
    assert_error(&s.post("/sdapi/v1/options", &json!({"sd_model_checkpoint": "broken"})), 400, "sd_model_checkpoint");
    assert_eq!(s.post("/sdapi/v1/refresh-checkpoints", &json!({})).status, 200);
    let r = s.post("/sdapi/v1/options", &json!({"sd_model_checkpoint": "broken"}));
    assert_error(&r, 422, "sd_model_checkpoint");
    assert_eq!(s.get("/sdapi/v1/options").json()["sd_model_checkpoint"], "v2/sd2");
    // sd15, sd2, sd15 for the override (the native job found it loaded); the broken file counts no load.
    assert_eq!(metric(&s, "sd_worker_model_loads_total"), 3);
    let r = s.post("/sdapi/v1/txt2img", &txt(5, json!({})));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(metric(&s, "sd_worker_models_loaded"), 1);
    s.shutdown();

    // With room for both, switching back and forth loads each once.
    let mut cfg = config("sd15");
    cfg.model = sd_worker::ModelSource::Path(models.join("sd15"));
    cfg.models_dirs = vec![models.clone()];
    cfg.model_cache_bytes = 1 << 30;
    let s = Server::start(cfg);
    for name in ["v2/sd2", "sd15", "v2/sd2", "sd15"] {
        assert_eq!(s.post("/sdapi/v1/options", &json!({"sd_model_checkpoint": name})).status, 200);
    }
    assert_eq!(metric(&s, "sd_worker_models_loaded"), 2);
    assert_eq!(metric(&s, "sd_worker_model_loads_total"), 2);
    s.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn refresh_embeddings_picks_up_added_and_removed_files_without_a_reload() {
    let dir = std::env::temp_dir().join(format!("sd-worker-refresh-emb-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::copy(fixture("embeddings/mystyle.pt"), dir.join("mystyle.pt")).expect("copy");
    let mut cfg = config("sd15");
    cfg.embedding_dirs = vec![dir.clone()];
    let s = Server::start(cfg);
    let names = |s: &Server| -> (Vec<String>, Vec<String>) {
        let v = s.get("/sdapi/v1/embeddings").json();
        let keys = |k: &str| v[k].as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
        (keys("loaded"), keys("skipped"))
    };
    assert_eq!(names(&s), (vec!["mystyle".to_string()], vec![]));
    let txt = json!({"prompt": "a badhand cat", "width": 32, "height": 32, "steps": 1, "seed": 1});
    let before = s.post("/sdapi/v1/txt2img", &txt);
    std::fs::copy(fixture("embeddings/badhand.safetensors"), dir.join("badhand.safetensors")).expect("copy");
    std::fs::copy(fixture("embeddings/xlstyle.safetensors"), dir.join("xlstyle.safetensors")).expect("copy");
    std::fs::remove_file(dir.join("mystyle.pt")).expect("remove");
    assert_eq!(s.post("/sdapi/v1/refresh-embeddings", &json!({})).status, 200);
    assert_eq!(names(&s), (vec!["badhand".to_string()], vec!["xlstyle".to_string()]));
    // The prompt now reads the new embedding (a different picture, and its hash in the infotext).
    let after = s.post("/sdapi/v1/txt2img", &txt);
    assert_ne!(pixels_of(&before.json()), pixels_of(&after.json()));
    let info: Value = serde_json::from_str(after.json()["info"].as_str().expect("info")).expect("info json");
    assert!(info["infotexts"][0].as_str().is_some_and(|t| t.contains("TI hashes: \"badhand: ")), "{info}");
    let m = s.get("/metrics").text();
    assert!(m.contains("sd_worker_model_loads_total 1"), "no reload: {m}");
    s.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn esrgan_upscalers_serve_the_extras_routes_and_the_hires_fix() {
    use sd_pipelines::hires::{upscale_by, PixelUpscale};
    let mut cfg = config("sd15");
    cfg.upscaler_dirs = vec![fixture("esrgan")];
    let s = Server::start(cfg);
    let listed = s.get("/sdapi/v1/upscalers").json();
    let names: Vec<&str> = listed.as_array().expect("list").iter().filter_map(|u| u["name"].as_str()).collect();
    assert!(names.starts_with(&["None", "Lanczos", "Nearest"]) && names.contains(&"realesrgan_x4_params_ema"), "{listed}");
    let x4 = listed.as_array().and_then(|l| l.iter().find(|u| u["name"] == "realesrgan_x4_params_ema").cloned()).expect("x4");
    assert_eq!(x4["scale"], 4);

    let input = png(16, 12, |x, y| [(x * 15) as u8, (y * 20) as u8, ((x + y) * 7) as u8]);
    let net = sd_models::esrgan::RrdbNet::load(&fixture("esrgan/realesrgan_x4_params_ema.pth"), &candle_core::Device::Cpu).expect("net");
    let src = image::load_from_memory(&input).expect("png");
    let expected = upscale_by(&src, 2.0, PixelUpscale::Model(&net)).expect("upscale").to_rgb8();
    let r = s.post("/sdapi/v1/extra-single-image", &json!({"image": b64(&input), "upscaler_1": "realesrgan_x4_params_ema", "upscaling_resize": 2}));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let got = decode_png(v["image"].as_str().expect("image")).to_rgb8();
    assert_eq!(got.dimensions(), (32, 24));
    assert_eq!(got.as_raw(), expected.as_raw(), "the route runs the model as the library does");
    assert!(v["html_info"].as_str().is_some_and(|i| i.contains("Postprocess upscale by: 2") && i.contains("realesrgan_x4_params_ema")), "{v}");
    // upscaler_2 blended at half visibility, as PIL's Image.blend.
    let nearest = upscale_by(&src, 2.0, PixelUpscale::Nearest).expect("nearest").to_rgb8();
    let r = s.post("/sdapi/v1/extra-single-image", &json!({"image": b64(&input), "upscaler_1": "realesrgan_x4_params_ema", "upscaler_2": "Nearest",
        "extras_upscaler_2_visibility": 0.5, "upscaling_resize": 2}));
    let blended = decode_png(r.json()["image"].as_str().expect("image")).to_rgb8();
    for ((b, a), n) in blended.pixels().zip(expected.pixels()).zip(nearest.pixels()) {
        for c in 0..3 {
            assert_eq!(b.0[c], (f32::from(a.0[c]) * 0.5 + f32::from(n.0[c]) * 0.5) as u8);
        }
    }
    // To a size, centre-cropped; a batch; "None" leaves the picture as it is.
    let r = s.post("/sdapi/v1/extra-single-image", &json!({"image": b64(&input), "upscaler_1": "Lanczos", "resize_mode": 1, "upscaling_resize_w": 40, "upscaling_resize_h": 20}));
    assert_eq!(decode_png(r.json()["image"].as_str().expect("image")).to_rgb8().dimensions(), (40, 20));
    let r = s.post("/sdapi/v1/extra-batch-images", &json!({"imageList": [{"data": b64(&input), "name": "a"}, {"data": b64(&input), "name": "b"}], "upscaler_1": "Nearest"}));
    assert_eq!(r.json()["images"].as_array().map(Vec::len), Some(2), "{}", r.text());
    for body in [json!({"image": b64(&input)}), json!({"image": b64(&input), "upscaler_2": "Nearest", "extras_upscaler_2_visibility": 1})] {
        let r = s.post("/sdapi/v1/extra-single-image", &body);
        assert_eq!(decode_png(r.json()["image"].as_str().expect("image")).to_rgb8().as_raw(), src.to_rgb8().as_raw(), "upscaler_1 None: unchanged");
    }
    // "to" a size without the crop keeps the aspect ratio (A1111 scales by the larger ratio).
    let r = s.post("/sdapi/v1/extra-single-image", &json!({"image": b64(&input), "upscaler_1": "Lanczos", "resize_mode": 1, "upscaling_resize_w": 40, "upscaling_resize_h": 20, "upscaling_crop": false}));
    assert_eq!(decode_png(r.json()["image"].as_str().expect("image")).to_rgb8().dimensions(), (40, 24));
    // Refusals name the field.
    for (body, field) in [
        (json!({"image": b64(&input), "gfpgan_visibility": 1}), "gfpgan_visibility"),
        (json!({"image": b64(&input), "upscaler_1": "../esrgan/realesrgan_x4_params_ema"}), "upscaler_1"),
        (json!({"image": b64(&input), "resize_mode": 3}), "resize_mode"),
        (json!({"image": b64(&input), "upscaling_resize": 100}), "upscaling_resize"),
        (json!({"upscaler_1": "Lanczos"}), "image"),
        (json!({"image": "not base64!"}), "image"),
    ] {
        assert_error(&s.post("/sdapi/v1/extra-single-image", &body), 400, field);
    }
    assert_error(&s.post("/sdapi/v1/extra-batch-images", &json!({"imageList": []})), 400, "imageList");

    // Hires fix through an ESRGAN model: the target size, and A1111's infotext.
    let r = s.post("/sdapi/v1/txt2img", &json!({"prompt": "a fox", "width": 32, "height": 32, "steps": 2, "seed": 3,
        "enable_hr": true, "hr_scale": 2, "hr_upscaler": "realesrgan_x4_params_ema", "denoising_strength": 0.5}));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(decode_png(v["images"][0].as_str().expect("image")).to_rgb8().dimensions(), (64, 64));
    let info: Value = serde_json::from_str(v["info"].as_str().expect("info")).expect("info json");
    assert!(info["infotexts"][0].as_str().is_some_and(|t| t.contains("Hires upscaler: realesrgan_x4_params_ema")), "{info}");
    let r = s.post("/sdapi/v1/txt2img", &json!({"prompt": "a fox", "width": 32, "height": 32, "steps": 2, "enable_hr": true, "hr_upscaler": "4x-Missing"}));
    assert_error(&r, 400, "hr_upscaler");
    s.shutdown();
}

#[test]
fn kontext_models_edit_after_a_reference_image() {
    // FLUX.1 Kontext has the [dev] architecture: the tiny dev model under FluxKontextPipeline's model_index.
    let dir = std::env::temp_dir().join(format!("sd-worker-kontext-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    copy_dir(&fixture("flux/dev"), &dir);
    let index = std::fs::read_to_string(dir.join("model_index.json")).expect("index");
    std::fs::write(dir.join("model_index.json"), index.replace("\"FluxPipeline\"", "\"FluxKontextPipeline\"")).expect("write");
    let mut cfg = config("flux/dev");
    cfg.model = sd_worker::ModelSource::Path(dir.clone());
    let s = Server::start(cfg);
    let m = s.get("/v1/models").json();
    assert_eq!(m["data"][0]["variant"], "flux-kontext-dev", "{m}");
    assert!(m["data"][0]["tasks"].as_array().is_some_and(|t| t.contains(&json!("edit"))), "{m}");
    let reference = png(20, 12, |x, y| [(x * 12) as u8, (y * 20) as u8, 128]);
    let other = png(20, 12, |x, y| [255 - (x * 12) as u8, (y * 9) as u8, 30]);
    let edit = |img: &[u8], seed: u64| {
        let id = s.submit(&json!({"operation": "image_edit", "prompt": "make it blue", "images": [b64(img)], "steps": 3, "seed": seed}));
        let ev = s.stream(&id);
        let (name, done) = ev.last().cloned().expect("events");
        assert_eq!(name, "complete", "{ev:?}");
        assert_eq!(ev.iter().rfind(|e| e.0 == "progress").map(|e| e.1["total"].clone()), Some(json!(3)));
        done
    };
    let done = edit(&reference, 4);
    assert_eq!(done["parameters"]["operation"], "image_edit");
    // The output takes the reference's size (within this worker's 256 px limit Kontext's trained
    // resolutions do not fit, so the reference keeps its own).
    assert_eq!(decode_png(done["images"][0].as_str().expect("image")).to_rgb8().dimensions(), (20, 12));
    assert_eq!(pixels_of(&edit(&reference, 4)), pixels_of(&done), "same seed, same edit");
    assert_ne!(pixels_of(&edit(&other, 4)), pixels_of(&done), "the reference steers the result");
    // OpenAI's edits without a mask are Kontext edits.
    let r = s.post("/v1/images/edits", &json!({"prompt": "make it blue", "image": b64(&reference), "steps": 3, "seed": 4}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(decode_png(r.json()["data"][0]["b64_json"].as_str().expect("image")).to_rgb8().dimensions(), (20, 12));
    // Refusals name the field.
    let many: Vec<String> = (0..5).map(|_| b64(&reference)).collect();
    assert_error(&s.post("/v1/jobs", &json!({"operation": "image_edit", "prompt": "x", "images": many})), 400, "images");
    assert_error(&s.post("/v1/jobs", &json!({"operation": "image_edit", "prompt": "x"})), 400, "images");
    assert_error(&s.post("/v1/jobs", &json!({"operation": "image_edit", "prompt": "x", "images": [b64(&reference)], "strength": 0.5})), 400, "strength");
    assert_error(&s.post("/v1/jobs", &json!({"operation": "image_generation", "prompt": "x", "images": [b64(&reference)]})), 400, "images");
    s.shutdown();
    // A model that does not edit refuses the operation.
    let s = Server::start(config("sd15"));
    let r = s.post("/v1/jobs", &json!({"operation": "image_edit", "prompt": "x", "images": [b64(&reference)]}));
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("edit"), "{}", r.text());
    s.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn flux_fill_models_inpaint_and_refuse_txt2img() {
    let s = Server::start(config("flux/fill"));
    let m = s.get("/v1/models").json();
    assert_eq!(m["data"][0]["variant"], "flux-fill-dev", "{m}");
    assert_eq!(m["data"][0]["tasks"], json!(["inpaint"]), "{m}");
    assert_eq!(m["data"][0]["inpainting"], true, "{m}");
    let id = s.submit(&json!({"operation": "image_inpaint", "prompt": "a red hat", "init_image": b64(&test_image()),
        "mask_image": b64(&test_mask(32, 32)), "width": 32, "height": 32, "steps": 3, "seed": 2}));
    let ev = s.stream(&id);
    let (name, done) = ev.last().cloned().expect("events");
    assert_eq!(name, "complete", "{ev:?}");
    assert_eq!(decode_png(done["images"][0].as_str().expect("image")).to_rgb8().dimensions(), (32, 32));
    assert_eq!(done["parameters"]["guidance_scale"], 30.0, "Fill's default guidance");
    let r = s.post("/v1/jobs", &json!({"operation": "image_generation", "prompt": "x", "width": 32, "height": 32}));
    assert_eq!(r.status, 400, "{}", r.text());
    s.shutdown();
}

#[test]
fn sd_vae_switches_to_a_vae_of_the_vae_folder_and_back() {
    let dir = std::env::temp_dir().join(format!("sd-worker-vae-dir-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    copy_dir(&fixture("sdxl/vae"), &dir.join("xl-vae"));
    let txt = json!({"prompt": "a tree", "width": 32, "height": 32, "steps": 2, "seed": 3});
    // The reference: a worker started with that VAE.
    let mut cfg = config("sd15");
    cfg.vae = Some(fixture("sdxl/vae"));
    let s = Server::start(cfg);
    let with_vae = pixels_of(&s.post("/sdapi/v1/txt2img", &txt).json());
    s.shutdown();
    let mut cfg = config("sd15");
    cfg.vae_dirs = vec![dir.clone()];
    let s = Server::start(cfg);
    let listed = s.get("/sdapi/v1/sd-vae").json();
    assert_eq!(listed[0]["model_name"], "xl-vae", "{listed}");
    let own = pixels_of(&s.post("/sdapi/v1/txt2img", &txt).json());
    assert_ne!(own, with_vae);
    // Per request, then as the option; each decodes exactly as a worker loaded with that VAE.
    let mut o = txt.clone();
    o["override_settings"] = json!({"sd_vae": "xl-vae"});
    let r = s.post("/sdapi/v1/txt2img", &o);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(pixels_of(&r.json()), with_vae);
    let info: Value = serde_json::from_str(r.json()["info"].as_str().expect("info")).expect("info json");
    assert!(info["infotexts"][0].as_str().is_some_and(|t| t.contains("VAE: xl-vae")), "{info}");
    assert_eq!(pixels_of(&s.post("/sdapi/v1/txt2img", &txt).json()), own, "the override did not stick");
    assert_eq!(s.post("/sdapi/v1/options", &json!({"sd_vae": "xl-vae"})).status, 200);
    assert_eq!(s.get("/sdapi/v1/options").json()["sd_vae"], "xl-vae");
    assert_eq!(pixels_of(&s.post("/sdapi/v1/txt2img", &txt).json()), with_vae);
    assert_eq!(s.post("/sdapi/v1/options", &json!({"sd_vae": "Automatic"})).status, 200);
    assert_eq!(pixels_of(&s.post("/sdapi/v1/txt2img", &txt).json()), own, "back to the model's own VAE");
    // Names resolve only inside the folders.
    for bad in ["../xl-vae", "missing.safetensors", "/etc/passwd"] {
        assert_error(&s.post("/sdapi/v1/options", &json!({"sd_vae": bad})), 400, "sd_vae");
        let mut o = txt.clone();
        o["override_settings"] = json!({"sd_vae": bad});
        assert_error(&s.post("/sdapi/v1/txt2img", &o), 400, "override_settings.sd_vae");
    }
    s.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}
