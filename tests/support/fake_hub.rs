//! A local stand-in for the Hugging Face hub's HTTP API, for tests that must never touch the
//! network: it answers the two requests hf-hub makes (`/api/models/{repo}/revision/{rev}` for the
//! file list, `/{repo}/resolve/{rev}/{file}` with `Range` for each file, with the `x-repo-commit`
//! and `etag` headers the cache layout is built from), and records every request.
//!
//! `sd_turbo_repo` lays out the real `stabilityai/sd-turbo` repository's file names (fp16 and fp32
//! weights, the 5 GB single file, README images…) with the tiny SD 2 fixture as their contents.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One repository the fake serves.
#[derive(Clone)]
pub struct FakeRepo {
    /// `owner/name`.
    pub id: String,
    /// The commit every file is served at.
    pub commit: String,
    /// Path in the repo → bytes.
    pub files: BTreeMap<String, Vec<u8>>,
    /// When set, requests without `Authorization: Bearer <token>` get 401, as gated repos do.
    pub token: Option<String>,
}

/// One request the fake received.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The request path.
    pub path: String,
    /// The `Range` header, if any.
    pub range: Option<String>,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
}

/// The running fake hub; stops when dropped.
pub struct FakeHub {
    addr: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Seen>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The hub's blob name for `bytes` (any stable content hash works: hf-hub only uses it as a name).
pub fn etag(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}{:08x}", bytes.len())
}

impl FakeHub {
    /// Serves `repos` on 127.0.0.1 at a free port.
    pub fn start(repos: Vec<FakeRepo>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fake hub");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let repos: Arc<BTreeMap<String, FakeRepo>> = Arc::new(repos.into_iter().map(|r| (r.id.clone(), r)).collect());
        let (stop2, seen2) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (repos, seen) = (repos.clone(), seen2.clone());
                        std::thread::spawn(move || {
                            let _ = serve(stream, &repos, &seen);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self { addr, stop, seen, thread: Some(thread) }
    }

    /// The base URL to put in `HF_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The files of `repo` that were downloaded (a `resolve` request past the 1-byte probe).
    pub fn downloaded(&self, repo: &str) -> Vec<String> {
        let prefix = format!("/{repo}/resolve/");
        let mut files: Vec<String> = self
            .seen()
            .into_iter()
            .filter(|s| s.range.as_deref() != Some("bytes=0-0"))
            .filter_map(|s| s.path.strip_prefix(&prefix).and_then(|rest| rest.split_once('/')).map(|(_, f)| f.to_string()))
            .collect();
        files.sort();
        files.dedup();
        files
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(stream: TcpStream, repos: &BTreeMap<String, FakeRepo>, seen: &Mutex<Vec<Seen>>) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let (mut range, mut authorization) = (None, None);
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "range" => range = Some(v.trim().to_string()),
                "authorization" => authorization = Some(v.trim().to_string()),
                _ => {}
            }
        }
    }
    if let Ok(mut s) = seen.lock() {
        s.push(Seen { path: path.clone(), range: range.clone(), authorization: authorization.clone() });
    }
    let mut out = stream;
    let respond = |out: &mut TcpStream, status: &str, headers: &[(String, String)], body: &[u8]| -> std::io::Result<()> {
        let mut head = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        out.write_all(head.as_bytes())?;
        out.write_all(body)?;
        out.flush()
    };
    let not_found = br#"{"error":"Repository Not Found"}"#;
    // /api/models/{owner}/{name}/revision/{rev}
    if let Some(rest) = path.strip_prefix("/api/models/") {
        let parts: Vec<&str> = rest.splitn(4, '/').collect();
        let Some(repo) = (parts.len() == 4 && parts[2] == "revision").then(|| format!("{}/{}", parts[0], parts[1])).and_then(|id| repos.get(&id)) else {
            return respond(&mut out, "404 Not Found", &[], not_found);
        };
        if !authorized(repo, authorization.as_deref()) {
            return respond(&mut out, "401 Unauthorized", &[], br#"{"error":"Access to model is restricted"}"#);
        }
        let siblings: Vec<String> = repo.files.keys().map(|f| format!(r#"{{"rfilename":"{f}"}}"#)).collect();
        let body = format!(r#"{{"id":"{}","sha":"{}","siblings":[{}]}}"#, repo.id, repo.commit, siblings.join(","));
        return respond(&mut out, "200 OK", &[("Content-Type".into(), "application/json".into())], body.as_bytes());
    }
    // /{owner}/{name}/resolve/{rev}/{file…}
    let parts: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
    let found = (parts.len() == 5 && parts[2] == "resolve")
        .then(|| repos.get(&format!("{}/{}", parts[0], parts[1])))
        .flatten()
        .map(|r| (r, r.files.get(parts[4])));
    let (repo, bytes) = match found {
        Some((repo, Some(bytes))) => (repo, bytes),
        _ => return respond(&mut out, "404 Not Found", &[], not_found),
    };
    if !authorized(repo, authorization.as_deref()) {
        return respond(&mut out, "401 Unauthorized", &[], b"");
    }
    let total = bytes.len();
    let mut headers = vec![("x-repo-commit".to_string(), repo.commit.clone()), ("etag".to_string(), format!("\"{}\"", etag(bytes)))];
    match range.as_deref().and_then(|r| r.strip_prefix("bytes=")).and_then(|r| r.split_once('-')) {
        Some((a, b)) => {
            let start: usize = a.parse().unwrap_or(0).min(total);
            let end: usize = if b.is_empty() { total.saturating_sub(1) } else { b.parse().unwrap_or(total).min(total.saturating_sub(1)) };
            let body = if total == 0 || start > end { &bytes[0..0] } else { &bytes[start..=end] };
            headers.push(("Content-Range".into(), format!("bytes {start}-{end}/{total}")));
            respond(&mut out, "206 Partial Content", &headers, body)
        }
        None => respond(&mut out, "200 OK", &headers, bytes),
    }
}

fn authorized(repo: &FakeRepo, authorization: Option<&str>) -> bool {
    match &repo.token {
        None => true,
        Some(t) => authorization == Some(format!("Bearer {t}").as_str()),
    }
}

/// The workspace's fixtures folder.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).ancestors().find(|p| p.join("fixtures/sd2").is_dir()).expect("fixtures/").join("fixtures")
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The commit the fake `stabilityai/sd-turbo` is served at (the hub's main at the time of writing).
pub const SD_TURBO_COMMIT: &str = "b261bac6fd2cf515557d5d0707481eafa0485ec2";

/// `stabilityai/sd-turbo` as the hub lists it, with the tiny SD 2 fixture's files as contents
/// (fp16-named files hold the same F32 tensors: only their names matter to the download logic).
pub fn sd_turbo_repo() -> FakeRepo {
    let sd2 = fixtures().join("sd2");
    let mut files = BTreeMap::new();
    let mut put = |name: &str, bytes: Vec<u8>| {
        files.insert(name.to_string(), bytes);
    };
    for f in [".gitattributes", "README.md", "LICENSE.md", "output_tile.jpg", "image_quality_one_step.png", "prompt_alignment_one_step.png"] {
        put(f, format!("placeholder for {f}\n").into_bytes());
    }
    put("model_index.json", read(&sd2.join("model_index.json")));
    // SD-Turbo's scheduler: Euler with trailing spacing, epsilon prediction.
    put(
        "scheduler/scheduler_config.json",
        br#"{"_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.24.0.dev0", "beta_end": 0.012,
"beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": false, "interpolation_type": "linear",
"num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": false,
"sigma_max": null, "sigma_min": null, "skip_prk_steps": true, "steps_offset": 1, "timestep_spacing": "trailing",
"timestep_type": "discrete", "trained_betas": null, "use_karras_sigmas": false}"#
            .to_vec(),
    );
    put("sd_turbo.safetensors", read(&fixtures().join("sd2.safetensors")));
    for (folder, weights) in [("text_encoder", "model"), ("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model")] {
        put(&format!("{folder}/config.json"), read(&sd2.join(folder).join("config.json")));
        let w = read(&sd2.join(folder).join(format!("{weights}.safetensors")));
        put(&format!("{folder}/{weights}.fp16.safetensors"), w.clone());
        put(&format!("{folder}/{weights}.safetensors"), w);
    }
    for f in ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"] {
        put(&format!("tokenizer/{f}"), read(&sd2.join("tokenizer").join(f)));
    }
    FakeRepo { id: "stabilityai/sd-turbo".into(), commit: SD_TURBO_COMMIT.into(), files, token: None }
}

/// The files a first run of SD-Turbo must download, and no others.
pub const SD_TURBO_NEEDED: [&str; 12] = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.fp16.safetensors",
];
