//! What the HTTP test binaries share: a worker on a real socket (127.0.0.1), a plain HTTP/1.1
//! client, and the tiny fixtures.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine as _;
use sd_worker::{ModelSource, Worker, WorkerConfig};
use serde_json::{json, Value};

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures").join(name)
}

pub fn config(model: &str) -> WorkerConfig {
    let mut c = WorkerConfig::new(ModelSource::Path(fixture(model)));
    c.limits.max_width = 256;
    c.limits.max_height = 256;
    c.limits.max_batch = 4;
    c.limits.max_steps = 1000;
    c.limits.max_body_bytes = 256 * 1024;
    c
}

pub struct Server {
    pub addr: SocketAddr,
    rt: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Server {
    pub fn start(cfg: WorkerConfig) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        let worker = Worker::start(cfg).expect("worker");
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = rt.spawn(worker.serve(listener, async move {
            let _ = rx.await;
        }));
        let s = Self { addr, rt, stop: Some(tx), handle: Some(handle) };
        let t0 = Instant::now();
        loop {
            let r = s.get("/ready");
            if r.status == 200 {
                break;
            }
            assert_eq!(r.status, 503, "{}", r.text());
            assert!(t0.elapsed() < Duration::from_secs(120), "model never became ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    pub fn request(&self, method: &str, path: &str, content_type: &str, body: &[u8]) -> Resp {
        raw_request(self.addr, method, path, content_type, body)
    }
    pub fn get(&self, path: &str) -> Resp {
        self.request("GET", path, "application/json", b"")
    }
    pub fn post(&self, path: &str, body: &Value) -> Resp {
        self.request("POST", path, "application/json", body.to_string().as_bytes())
    }
    pub fn delete(&self, path: &str) -> Resp {
        self.request("DELETE", path, "application/json", b"")
    }

    /// Submits a native job and returns its id.
    pub fn submit(&self, body: &Value) -> String {
        let r = self.post("/v1/jobs", body);
        assert_eq!(r.status, 202, "{}", r.text());
        let v = r.json();
        let id = v["job_id"].as_str().expect("job_id").to_string();
        assert_eq!(v["sse_url"], format!("/v1/jobs/{id}/stream"));
        id
    }

    /// Reads a job's SSE stream to its end.
    pub fn stream(&self, id: &str) -> Vec<(String, Value)> {
        let r = self.get(&format!("/v1/jobs/{id}/stream"));
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.header("content-type").unwrap_or_default().starts_with("text/event-stream"));
        parse_sse(&r.text())
    }

    pub fn wait_status(&self, id: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let t0 = Instant::now();
        loop {
            let v = self.get(&format!("/v1/jobs/{id}")).json();
            if pred(&v) {
                return v;
            }
            assert!(t0.elapsed() < Duration::from_secs(120), "job never reached the state: {v}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The worker still answers and still runs jobs.
    pub fn assert_serving(&self) {
        assert_eq!(self.get("/health").status, 200);
        let id = self.submit(&json!({"operation": "image_generation", "prompt": "ok", "width": 32, "height": 32, "steps": 2, "seed": 1}));
        let ev = self.stream(&id);
        assert_eq!(ev.last().map(|e| e.0.as_str()), Some("complete"), "{ev:?}");
    }

    pub fn shutdown(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            let r = self.rt.block_on(h).expect("join");
            r.expect("serve");
        }
    }
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone())
    }
}

pub fn raw_request(addr: SocketAddr, method: &str, path: &str, content_type: &str, body: &[u8]) -> Resp {
    raw_request_with(addr, method, path, content_type, &[], body)
}

pub fn raw_request_with(addr: SocketAddr, method: &str, path: &str, content_type: &str, extra: &[(&str, &str)], body: &[u8]) -> Resp {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120))).expect("timeout");
    let extra: String = extra.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: {content_type}\r\n{extra}Content-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("write head");
    // The server may answer (413) before reading a too-large body; the answer is still readable.
    let _ = s.write_all(body);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && !buf.is_empty() => break,
            Err(e) => panic!("read: {e} after {} bytes", buf.len()),
        }
    }
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n").expect("response head");
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok()).expect("status");
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).collect();
    let raw = buf[split + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked { dechunk(&raw) } else { raw };
    Resp { status, headers, body }
}

pub fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&raw[..eol]).split(';').next().unwrap_or("0").trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = eol + 2;
        out.extend_from_slice(&raw[start..(start + size).min(raw.len())]);
        raw = &raw[(start + size + 2).min(raw.len())..];
    }
    out
}

pub fn parse_sse(text: &str) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for block in text.split("\n\n") {
        let mut event = None;
        let mut data = String::new();
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("event:") {
                event = Some(v.trim().to_string());
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push_str(v.trim_start());
            }
        }
        if let Some(e) = event {
            out.push((e, serde_json::from_str(&data).unwrap_or_else(|err| panic!("bad SSE data ({err}): {data}"))));
        }
    }
    out
}

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn unb64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(s).expect("base64")
}

pub fn png(w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 3]) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb(f(x, y)));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).expect("png");
    out.into_inner()
}

pub fn test_image() -> Vec<u8> {
    png(32, 32, |x, y| [(x * 8) as u8, (y * 8) as u8, 128])
}

pub fn test_mask(w: u32, h: u32) -> Vec<u8> {
    png(w, h, |x, _| if x >= w / 2 { [255, 255, 255] } else { [0, 0, 0] })
}

pub fn decode_png(b: &str) -> image::DynamicImage {
    image::load_from_memory(&unb64(b)).expect("decodable image")
}

pub fn assert_error(r: &Resp, status: u16, field: &str) -> Value {
    assert_eq!(r.status, status, "{}", r.text());
    let v = r.json();
    assert_eq!(v["error"]["field"], field, "{v}");
    assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(v["error"]["code"].is_string(), "{v}");
    v
}


/// Copies a folder tree (fixtures into a temporary models folder).
pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).expect("copy");
        }
    }
}
