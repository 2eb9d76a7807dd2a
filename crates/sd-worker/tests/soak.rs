//! A bounded soak of the worker, alone in its process so that its resident memory is its own:
//! a thousand submits with cancels and subscribers lose no job and keep memory flat.

mod support;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;


fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()).unwrap_or(0) * 4096
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse::<f64>().ok())).unwrap_or(f64::NAN) as u64
}

#[cfg(target_os = "linux")]
#[test]
fn soak_of_a_thousand_submits_loses_no_job_and_keeps_memory_flat() {
    let mut cfg = config("sd15");
    cfg.store.max_jobs = 48;
    cfg.store.max_bytes = 192 * 1024;
    let s = Server::start(cfg);
    let (mut accepted, mut streamed) = (0u64, 0u64);
    let mut warm = 0u64;
    for i in 0..1000u64 {
        if i == 300 {
            warm = rss_bytes();
        }
        let r = s.post("/v1/jobs", &json!({"operation": "image_generation", "prompt": format!("soak {i}"), "width": 32, "height": 32, "steps": 1, "seed": i}));
        if r.status == 429 {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        assert_eq!(r.status, 202, "{}", r.text());
        accepted += 1;
        let id = r.json()["job_id"].as_str().expect("id").to_string();
        match i % 10 {
            // Runs to the end with a subscriber watching.
            0 => {
                let ev = s.stream(&id);
                assert!(ev.last().is_some_and(|e| e.0 == "complete" || e.1["code"] == "cancelled"), "{ev:?}");
                streamed += 1;
            }
            // A subscriber that leaves at once, then a cancel.
            9 => {
                let mut c = TcpStream::connect(s.addr).expect("connect");
                c.write_all(format!("GET /v1/jobs/{id}/stream HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).expect("write");
                drop(c);
                let d = s.delete(&format!("/v1/jobs/{id}")).status;
                assert!(d == 202 || d == 409, "{d}");
            }
            _ => {
                let d = s.delete(&format!("/v1/jobs/{id}")).status;
                assert!(d == 202 || d == 409, "{d}");
            }
        }
        if i % 50 == 0 {
            let m = s.get("/metrics").text();
            assert!(metric(&m, "sd_worker_stored_bytes") <= 192 * 1024, "{m}");
            assert!(metric(&m, "sd_worker_stored_jobs") <= 48, "{m}");
        }
    }
    // Every accepted job ends, completed or cancelled, none failed or lost.
    let t0 = Instant::now();
    loop {
        let m = s.get("/metrics").text();
        let done = metric(&m, "sd_worker_jobs_total{outcome=\"completed\"}") + metric(&m, "sd_worker_jobs_total{outcome=\"cancelled\"}");
        assert_eq!(metric(&m, "sd_worker_jobs_total{outcome=\"failed\"}"), 0, "{m}");
        if done == accepted {
            break;
        }
        assert!(done < accepted && t0.elapsed() < Duration::from_secs(60), "{done} of {accepted} ended: {m}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let grown = rss_bytes().saturating_sub(warm);
    eprintln!("soak: {accepted} accepted, {streamed} streamed to the end, RSS grew {:.1} MiB after warm-up", grown as f64 / 1048576.0);
    assert!(accepted >= 900, "{accepted}");
    assert!(grown <= 64 * 1024 * 1024, "RSS grew {grown} bytes after warm-up");
    s.assert_serving();
    s.shutdown();
}
