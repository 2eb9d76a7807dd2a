//! What queue mode costs: the time to move a 1024² PNG through Redis (as a job's input entry and
//! as its stored result), and the latency queue mode adds to one job against a single process.
//!
//!     cargo bench -p sd-worker --bench queue
//!
//! Starts its own `redis-server` (skips without one) and real `sd-worker` processes on the tiny
//! SD 1.5 fixture: a 1-step 32² job, submitted over HTTP and followed over SSE to its end, once
//! through a self-contained worker and once through a front and a worker in queue mode. The
//! summary prints both medians and their difference.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use criterion::{criterion_group, Criterion};

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

fn redis_server() -> Option<(Kill, u16)> {
    let port = free_port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let r = Kill(child);
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/0")).ok()?;
    let t0 = Instant::now();
    while client.get_connection().and_then(|mut c| redis::cmd("PING").query::<String>(&mut c)).is_err() {
        if t0.elapsed() > Duration::from_secs(10) {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Some((r, port))
}

/// A 1024² RGB PNG of pseudo-random pixels: the worst case for PNG size (≈ 3 MiB).
fn png_1024() -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let img = image::RgbImage::from_fn(1024, 1024, |_, _| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        image::Rgb([state as u8, (state >> 8) as u8, (state >> 16) as u8])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img).write_to(&mut out, image::ImageFormat::Png).ok();
    out.into_inner()
}

fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> String {
    let Ok(mut s) = TcpStream::connect(addr) else { return String::new() };
    let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
    let req = format!("{method} {path} HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    let _ = s.write_all(req.as_bytes());
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn wait_ready(addr: SocketAddr) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(60) {
        if http(addr, "GET", "/ready", "").starts_with("HTTP/1.1 200") || http(addr, "GET", "/ready", "").starts_with("HTTP/1.0 200") {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// An `sd-worker` process with `args`, on a free port.
fn spawn(args: &[&str]) -> (Kill, SocketAddr) {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_sd-worker"))
        .args(["--port", &port.to_string()])
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start sd-worker: {e}"));
    (Kill(child), SocketAddr::from(([127, 0, 0, 1], port)))
}

/// A worker serving the tiny SD 1.5 fixture.
fn worker(extra: &[&str]) -> (Kill, SocketAddr) {
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/sd15");
    let fixture = fixture.to_string_lossy().into_owned();
    let mut args = vec!["--device", "cpu", "--preview-every", "0", "--model", fixture.as_str()];
    args.extend_from_slice(extra);
    spawn(&args)
}

/// Submits a 1-step 32² job and follows its SSE stream to the end.
fn one_job(addr: SocketAddr, seed: u64) {
    let body = format!(r#"{{"operation":"image_generation","prompt":"x","width":32,"height":32,"steps":1,"seed":{seed}}}"#);
    let answer = http(addr, "POST", "/v1/jobs", &body);
    let id = answer.split("\"job_id\":\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or_else(|| panic!("no job id in {answer}"));
    let events = http(addr, "GET", &format!("/v1/jobs/{id}/stream"), "");
    assert!(events.contains("event: complete"), "job {id} did not complete: {events}");
}

fn transport(c: &mut Criterion, port: u16) {
    let png = png_1024();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&png);
    let entry = format!(r#"{{"operation":"image_transform","image":"{b64}"}}"#);
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/0")).expect("client");
    let mut producer = client.get_connection().expect("connection");
    let mut consumer = client.get_connection().expect("connection");
    let _: redis::RedisResult<()> = redis::cmd("XGROUP").arg("CREATE").arg("bench:jobs").arg("workers").arg("0").arg("MKSTREAM").query(&mut producer);
    let mut g = c.benchmark_group("queue_transport");
    g.sample_size(30);
    g.bench_function(format!("png_1024_input_entry_{}KiB", entry.len() / 1024), |b| {
        b.iter(|| {
            let _: String = redis::cmd("XADD").arg("bench:jobs").arg("*").arg("id").arg("job_x").arg("spec").arg(&entry).query(&mut producer).expect("XADD");
            let read: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg("workers")
                .arg("bench")
                .arg("COUNT")
                .arg(1)
                .arg("STREAMS")
                .arg("bench:jobs")
                .arg(">")
                .query(&mut consumer)
                .expect("XREADGROUP");
            let e = &read.keys[0].ids[0];
            let spec: String = e.get("spec").expect("spec");
            assert_eq!(spec.len(), entry.len());
            let _: () = redis::pipe().cmd("XACK").arg("bench:jobs").arg("workers").arg(&e.id).ignore().cmd("XDEL").arg("bench:jobs").arg(&e.id).ignore().query(&mut consumer).expect("ack");
        })
    });
    g.bench_function("png_1024_result_store_and_read", |b| {
        b.iter(|| {
            let _: () = redis::cmd("HSET").arg("bench:job").arg("result").arg(&b64).query(&mut producer).expect("HSET");
            let back: String = redis::cmd("HGET").arg("bench:job").arg("result").query(&mut consumer).expect("HGET");
            assert_eq!(back.len(), b64.len());
        })
    });
    g.finish();
}

fn latency(c: &mut Criterion, port: u16) {
    let queue = format!("redis://127.0.0.1:{port}/1");
    let (_single, single_addr) = worker(&["--queue-capacity", "1000", "--max-stored-jobs", "2000"]);
    let (_front, front_addr) = spawn(&["--front-only", "--queue", &queue]);
    let (_queued, _) = worker(&["--queue", &queue]);
    assert!(wait_ready(single_addr) && wait_ready(front_addr), "workers never became ready");
    let mut seed = 0u64;
    let mut g = c.benchmark_group("job_latency_1_step_32px");
    g.sample_size(30).measurement_time(Duration::from_secs(15));
    g.bench_function("single_process", |b| {
        b.iter(|| {
            seed += 1;
            one_job(single_addr, seed)
        })
    });
    g.bench_function("queue_front_and_worker", |b| {
        b.iter(|| {
            seed += 1;
            one_job(front_addr, seed)
        })
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    let Some((_redis, port)) = redis_server() else {
        eprintln!("redis-server is not installed (apt-get install redis-server): skipping the queue benchmarks");
        return;
    };
    transport(c, port);
    latency(c, port);
}

criterion_group!(queue, benches);

fn median(name: &str) -> Option<f64> {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("../criterion").join(name).join("new/estimates.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir).ok()?).ok()?;
    v["median"]["point_estimate"].as_f64().map(|ns| ns / 1e6)
}

fn main() {
    queue();
    Criterion::default().configure_from_args().final_summary();
    if let (Some(a), Some(b)) = (median("job_latency_1_step_32px/single_process"), median("job_latency_1_step_32px/queue_front_and_worker")) {
        println!("median job latency: single process {a:.2} ms, queue mode {b:.2} ms, added by the queue {:.2} ms", b - a);
    }
}
