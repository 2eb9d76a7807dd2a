//! Queue mode with a real Redis: real `sd-worker` processes (workers and fronts) sharing jobs
//! through a Redis Stream, killed and restarted as an operator's fleet would be.
//!
//! Each test starts its own `redis-server` on a free loopback port. When `redis-server` is not
//! installed the tests say so loudly and pass without running, unless `SD_REQUIRE_REDIS` is set
//! (`.ci/run` installs it and sets that, so CI always runs them).

#![cfg(all(unix, feature = "queue"))]

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{copy_dir, fixture, parse_sse, raw_request, Resp};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

fn log_dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("queue-logs");
    std::fs::create_dir_all(&d).expect("log dir");
    d
}

/// A child process killed when dropped.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([sig, &self.child.id().to_string()]).status().expect("kill");
        assert!(ok.success());
    }

    fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            assert!(t0.elapsed() < limit, "{} did not exit\n{}", self.name, self.log_tail());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

struct Redis {
    proc: Proc,
    port: u16,
}

impl Redis {
    /// A fresh `redis-server` on a free port, or `None` (after a loud message) when it is not installed.
    fn start(test: &str) -> Option<Self> {
        let found = Command::new("redis-server").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
        if !found {
            assert!(std::env::var_os("SD_REQUIRE_REDIS").is_none(), "SD_REQUIRE_REDIS is set but `redis-server` is not installed");
            eprintln!("\n\n*** SKIPPED {test}: `redis-server` is not installed (apt-get install redis-server); .ci/run installs it ***\n");
            return None;
        }
        let port = free_port();
        let log = log_dir().join(format!("{test}-redis.log"));
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--logfile", &log.display().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        let r = Self { proc: Proc { name: "redis".into(), child, log }, port };
        let t0 = Instant::now();
        while r.client().get_connection().and_then(|mut c| redis::cmd("PING").query::<String>(&mut c)).is_err() {
            assert!(t0.elapsed() < Duration::from_secs(20), "redis-server never answered");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(r)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn client(&self) -> redis::Client {
        redis::Client::open(format!("redis://127.0.0.1:{}/0", self.port)).expect("client")
    }

    fn conn(&self) -> redis::Connection {
        self.client().get_connection().expect("redis connection")
    }

    fn job_field(&self, id: &str, field: &str) -> Option<String> {
        redis::cmd("HGET").arg(format!("sdw:test:job:{id}")).arg(field).query(&mut self.conn()).expect("HGET")
    }

    /// Final events (`complete` or `error`) the job published.
    fn final_events(&self, id: &str) -> usize {
        let range: redis::streams::StreamRangeReply = redis::cmd("XRANGE").arg(format!("sdw:test:events:{id}")).arg("-").arg("+").query(&mut self.conn()).expect("XRANGE");
        range.ids.iter().filter(|e| matches!(e.get::<String>("event").as_deref(), Some("complete") | Some("error"))).count()
    }
}

/// An `sd-worker` process in queue mode: a worker (model loaded) or a front (`--front-only`).
struct Node {
    proc: Proc,
    addr: SocketAddr,
}

impl Node {
    fn start(redis: &Redis, name: &str, front_only: bool, extra: &[&str]) -> Self {
        let port = free_port();
        let log = log_dir().join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sd-worker"));
        cmd.args(["--port", &port.to_string(), "--queue", &redis.url(), "--queue-name", "test", "--max-steps", "1000"]);
        cmd.args(["--max-width", "256", "--max-height", "256"]);
        if front_only {
            cmd.arg("--front-only");
        } else {
            cmd.args(["--device", "cpu", "--model"]).arg(fixture("sd15"));
        }
        let child = cmd.args(extra).env("RUST_LOG", "info").stdout(file.try_clone().expect("log")).stderr(file).spawn().expect("spawn sd-worker");
        let node = Self { proc: Proc { name: name.into(), child, log }, addr: SocketAddr::from(([127, 0, 0, 1], port)) };
        // A front is ready once a worker has described the model; until then it is only up.
        node.wait_until(if front_only { "/health" } else { "/ready" });
        node
    }

    fn wait_ready(&self) {
        self.wait_until("/ready");
    }

    fn wait_until(&self, probe: &str) {
        let t0 = Instant::now();
        loop {
            if std::net::TcpStream::connect(self.addr).is_ok() && self.get(probe).status == 200 {
                return;
            }
            assert!(t0.elapsed() < Duration::from_secs(120), "{} never became ready\n{}", self.proc.name, self.proc.log_tail());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn get(&self, path: &str) -> Resp {
        raw_request(self.addr, "GET", path, "application/json", b"")
    }

    fn post(&self, path: &str, body: &Value) -> Resp {
        raw_request(self.addr, "POST", path, "application/json", body.to_string().as_bytes())
    }

    fn submit(&self, body: &Value) -> String {
        let r = self.post("/v1/jobs", body);
        assert_eq!(r.status, 202, "{}\n{}", r.text(), self.proc.log_tail());
        r.json()["job_id"].as_str().expect("job_id").to_string()
    }

    fn status(&self, id: &str) -> Value {
        let r = self.get(&format!("/v1/jobs/{id}"));
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    }

    fn wait_status(&self, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let t0 = Instant::now();
        loop {
            let v = self.status(id);
            if pred(&v) {
                return v;
            }
            assert!(t0.elapsed() < Duration::from_secs(120), "job {id} never became {what}: {v}\n{}", self.proc.log_tail());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn metric(&self, line_prefix: &str) -> u64 {
        let text = self.get("/metrics").text();
        text.lines().find_map(|l| l.strip_prefix(line_prefix)).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
    }

    fn completed(&self) -> u64 {
        self.metric("sd_worker_jobs_total{outcome=\"completed\"}")
    }
}

/// Reads SSE events `(id, event, data)` from `path` (HTTP/1.0, so the body is plain text), sending
/// `Last-Event-ID` when given, and stops after `limit` events or at the end of the stream.
fn sse(addr: SocketAddr, path: &str, last_event_id: Option<&str>, limit: usize) -> Vec<(String, String, Value)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
    let extra = last_event_id.map(|id| format!("Last-Event-ID: {id}\r\n")).unwrap_or_default();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\nAccept: text/event-stream\r\n{extra}\r\n").expect("send");
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    let mut events = loop {
        let n = s.read(&mut buf).expect("read");
        raw.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&raw).into_owned();
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        let mut blocks: Vec<&str> = body.split("\n\n").collect();
        // The last block may still be arriving.
        if n > 0 {
            blocks.pop();
        }
        let events: Vec<(String, String, Value)> = blocks
            .iter()
            .filter_map(|b| {
                let field = |name: &str| b.lines().find_map(|l| l.strip_prefix(name)).map(str::to_string);
                let event = field("event: ")?;
                Some((field("id: ").unwrap_or_default(), event, serde_json::from_str(&field("data: ").unwrap_or_default()).unwrap_or(Value::Null)))
            })
            .collect();
        if n == 0 || events.len() >= limit {
            break events;
        }
    };
    events.truncate(limit);
    events
}

fn stream_order(id: &str) -> (u64, u64) {
    let (a, b) = id.split_once('-').expect("a stream id");
    (a.parse().expect("ms"), b.parse().expect("seq"))
}

fn job(steps: u64, seed: u64) -> Value {
    json!({"operation": "image_generation", "prompt": "a fleet", "width": 32, "height": 32, "steps": steps, "seed": seed})
}

fn done(v: &Value) -> bool {
    matches!(v["status"].as_str(), Some("completed" | "failed" | "cancelled"))
}

#[test]
fn two_workers_and_a_front_run_every_job_exactly_once() {
    let Some(redis) = Redis::start("exactly_once") else { return };
    let front = Node::start(&redis, "once-front", true, &["--queue-capacity", "64"]);
    let w1 = Node::start(&redis, "once-w1", false, &[]);
    let w2 = Node::start(&redis, "once-w2", false, &[]);
    let r = front.get("/ready");
    assert!(r.status == 200 || r.json()["status"] == "no_worker", "{}", r.text());
    front.wait_ready();

    // SSE through the front shows the progress and previews a worker publishes.
    let id = front.submit(&job(4, 7));
    let r = front.get(&format!("/v1/jobs/{id}/stream"));
    assert_eq!(r.status, 200, "{}", r.text());
    let events = parse_sse(&r.text());
    let names: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
    assert!(names.contains(&"progress") && names.contains(&"preview"), "{names:?}");
    assert_eq!(names.last(), Some(&"complete"), "{names:?}");
    let last = &events.last().expect("events").1;
    assert_eq!(last["images"].as_array().map(Vec::len), Some(1), "{last}");
    let steps: Vec<u64> = events.iter().filter(|e| e.0 == "progress").filter_map(|e| e.1["step"].as_u64()).collect();
    assert_eq!(steps.last(), Some(&4), "{steps:?}");

    // A client that loses its stream resumes after its Last-Event-ID, on another node, with nothing
    // lost or repeated.
    let id = front.submit(&job(12, 8));
    let first = sse(front.addr, &format!("/v1/jobs/{id}/stream"), None, 5);
    assert_eq!(first.len(), 5, "{first:?}");
    let last_id = first.last().map(|e| e.0.clone()).expect("id");
    let rest = sse(w1.addr, &format!("/v1/jobs/{id}/stream"), Some(&last_id), usize::MAX);
    assert_eq!(rest.last().map(|e| e.1.as_str()), Some("complete"), "{rest:?}");
    assert!(rest.iter().all(|e| stream_order(&e.0) > stream_order(&last_id)), "resumed before its Last-Event-ID");
    let steps: Vec<u64> = first.iter().chain(&rest).filter(|e| e.1 == "progress").filter_map(|e| e.2["step"].as_u64()).collect();
    assert_eq!(steps, (1..=12).collect::<Vec<u64>>(), "progress lost or repeated across the reconnect");
    let whole = sse(front.addr, &format!("/v1/jobs/{id}/stream"), None, usize::MAX);
    assert_eq!(whole.len(), first.len() + rest.len(), "a late subscriber sees the whole stream");

    // A batch through the front: every job completes once, and both workers take part.
    let t0 = Instant::now();
    let ids: Vec<String> = (0..12).map(|i| front.submit(&job(2, 100 + i))).collect();
    for id in &ids {
        let v = front.wait_status(id, "finished", done);
        assert_eq!(v["status"], "completed", "{v}");
        assert_eq!(v["result"]["image_urls"].as_array().map(Vec::len), Some(1), "{v}");
    }
    let secs = t0.elapsed().as_secs_f64();
    eprintln!("12 jobs of 2 steps at 32² on two workers: {secs:.1} s ({:.0} jobs/min)", 12.0 * 60.0 / secs);
    for id in ids.iter().chain(std::iter::once(&id)) {
        assert_eq!(redis.job_field(id, "attempts").as_deref(), Some("1"), "job {id} ran more than once");
        assert_eq!(redis.final_events(id), 1, "job {id} was reported other than once");
    }
    let (c1, c2) = (w1.completed(), w2.completed());
    assert_eq!(c1 + c2, 14, "workers completed {c1} + {c2} jobs");
    assert!(c1 > 0 && c2 > 0, "one worker took every job: {c1} / {c2}");
    let depth: usize = redis::cmd("XLEN").arg("sdw:test:jobs").query(&mut redis.conn()).expect("XLEN");
    assert_eq!(depth, 0, "finished jobs leave the stream");

    // The same image for the same seed, whichever worker ran it; any node serves any job.
    let a = w1.status(&ids[0]);
    let b = w2.status(&ids[0]);
    assert_eq!(a["result"]["seed"], b["result"]["seed"]);
    let png = w2.get(&format!("/v1/jobs/{}/images/0", ids[0]));
    assert_eq!(png.status, 200);
    assert_eq!(&png.body[1..4], b"PNG");

    // The synchronous A1111 and OpenAI routes work through the front.
    let r = front.post("/sdapi/v1/txt2img", &json!({"prompt": "x", "width": 32, "height": 32, "steps": 2, "seed": 3}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["images"].as_array().map(Vec::len), Some(1));
    let r = front.post("/v1/images/generations", &json!({"prompt": "x", "size": "32x32", "n": 1, "steps": 2}));
    assert_eq!(r.status, 200, "{}", r.text());

    // Cancel through the front stops the job on the worker running it.
    let long = front.submit(&job(400, 9));
    front.wait_status(&long, "running", |v| v["status"] == "running" && v["progress"]["step"].as_u64().unwrap_or(0) >= 1);
    let cancelled_before = w1.metric("sd_worker_jobs_total{outcome=\"cancelled\"}") + w2.metric("sd_worker_jobs_total{outcome=\"cancelled\"}");
    let r = raw_request(front.addr, "DELETE", &format!("/v1/jobs/{long}"), "application/json", b"");
    assert_eq!(r.status, 202, "{}", r.text());
    let t0 = Instant::now();
    let v = front.wait_status(&long, "cancelled", done);
    assert!(t0.elapsed() < Duration::from_secs(10), "cancel took {:?}", t0.elapsed());
    assert_eq!(v["status"], "cancelled", "{v}");
    assert!(v["progress"]["step"].as_u64().unwrap_or(400) < 400, "{v}");
    let cancelled_after = w1.metric("sd_worker_jobs_total{outcome=\"cancelled\"}") + w2.metric("sd_worker_jobs_total{outcome=\"cancelled\"}");
    assert_eq!(cancelled_after, cancelled_before + 1, "the worker did not stop the job");

    // A full stream answers 429 with Retry-After (a front with a capacity of 1, one job running).
    let small = Node::start(&redis, "once-small-front", true, &["--queue-capacity", "1"]);
    small.wait_ready();
    let busy = front.submit(&job(400, 11));
    front.wait_status(&busy, "running", |v| v["status"] == "running");
    let r = small.post("/v1/jobs", &job(2, 12));
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "queue_full", "{}", r.text());
    assert!(r.header("retry-after").and_then(|v| v.parse::<u64>().ok()).is_some_and(|s| s >= 1), "{:?}", r.headers);
    assert_eq!(raw_request(front.addr, "DELETE", &format!("/v1/jobs/{busy}"), "application/json", b"").status, 202);
    front.wait_status(&busy, "cancelled", done);

    // A front restart loses nothing: a job submitted through one front is served by a new one.
    let mut front = front;
    let kept = front.submit(&job(3, 21));
    front.proc.kill9();
    let front2 = Node::start(&redis, "once-front2", true, &[]);
    front2.wait_ready();
    let v = front2.wait_status(&kept, "completed", done);
    assert_eq!(v["status"], "completed", "{v}");
    assert_eq!(v["parameters"]["seed"], 21);
    let r = front2.get(&format!("/v1/jobs/{kept}?include_images=true"));
    assert_eq!(r.json()["result"]["images"].as_array().map(Vec::len), Some(1));
    assert!(front2.get("/metrics").text().contains("sd_worker_fleet_workers 2"));
}

#[test]
fn a_dead_worker_s_job_is_taken_over_and_a_draining_one_hands_its_job_back() {
    let Some(mut redis) = Redis::start("takeover") else { return };
    let front = Node::start(&redis, "takeover-front", true, &[]);
    let mut w1 = Node::start(&redis, "takeover-w1", false, &["--queue-claim-idle-secs", "1.5"]);
    front.wait_ready();

    // SIGKILL mid-job: the job stays pending until another worker takes it over.
    let id = front.submit(&job(30, 5));
    front.wait_status(&id, "running", |v| v["status"] == "running" && v["progress"]["step"].as_u64().unwrap_or(0) >= 2);
    let first = redis.job_field(&id, "worker").expect("worker");
    w1.proc.kill9();
    let w2 = Node::start(&redis, "takeover-w2", false, &["--queue-claim-idle-secs", "1.5", "--shutdown-grace-secs", "0"]);
    let v = front.wait_status(&id, "completed", done);
    assert_eq!(v["status"], "completed", "{v}\n{}", w2.proc.log_tail());
    let second = redis.job_field(&id, "worker").expect("worker");
    assert_ne!(first, second, "the job finished on the killed worker?");
    assert_eq!(redis.job_field(&id, "attempts").as_deref(), Some("2"));
    assert_eq!(redis.final_events(&id), 1);

    // SIGTERM with no grace: the worker stops its job, hands it back, exits cleanly; another finishes it.
    let mut w2 = w2;
    let id = front.submit(&job(400, 6));
    front.wait_status(&id, "running", |v| v["status"] == "running");
    w2.proc.signal("-TERM");
    let exit = w2.proc.wait_exit(Duration::from_secs(60));
    assert!(exit.success(), "{exit:?}\n{}", w2.proc.log_tail());
    assert_eq!(redis.job_field(&id, "status").as_deref(), Some("queued"), "\n{}", w2.proc.log_tail());
    assert_eq!(redis.final_events(&id), 0);
    let w3 = Node::start(&redis, "takeover-w3", false, &[]);
    front.wait_status(&id, "running again", |v| v["status"] == "running");
    assert_eq!(raw_request(front.addr, "DELETE", &format!("/v1/jobs/{id}"), "application/json", b"").status, 202);
    let v = front.wait_status(&id, "cancelled", done);
    assert_eq!(v["status"], "cancelled", "{v}");
    assert_eq!(redis.job_field(&id, "attempts").as_deref(), Some("1"), "a hand-back is not a failed attempt");
    drop(w3);

    // Without Redis the front is not ready and submissions get a 503 naming the queue.
    redis.proc.kill9();
    let t0 = Instant::now();
    while front.get("/ready").status == 200 {
        assert!(t0.elapsed() < Duration::from_secs(15), "still ready without Redis");
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = front.get("/ready");
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["status"], "queue_unavailable");
    let r = front.post("/v1/jobs", &job(2, 1));
    assert_eq!(r.status, 503, "{}", r.text());
}

#[test]
fn a_job_ten_times_longer_than_the_claim_idle_time_is_neither_stolen_nor_run_twice() {
    let Some(redis) = Redis::start("long_job") else { return };
    let idle = ["--queue-claim-idle-secs", "1"];
    let front = Node::start(&redis, "long-front", true, &[]);
    let w1 = Node::start(&redis, "long-w1", false, &idle);
    front.wait_ready();
    let w2 = Node::start(&redis, "long-w2", false, &idle);
    // A job far longer than the test watches it (1000 steps at 64²): watched for over ten idle
    // periods while running, then cancelled.
    let id = front.submit(&json!({"operation": "image_generation", "prompt": "long", "width": 64, "height": 64, "steps": 1000, "seed": 2}));
    front.wait_status(&id, "running", |v| v["status"] == "running");
    let owner = redis.job_field(&id, "worker").expect("worker");
    let t0 = Instant::now();
    let mut last_step = 0;
    while t0.elapsed() < Duration::from_secs(11) {
        let v = front.status(&id);
        assert_eq!(v["status"], "running", "the job ended early (make it longer on this machine): {v}");
        let step = v["progress"]["step"].as_u64().unwrap_or(0);
        assert!(step >= last_step, "progress went back from {last_step} to {step}: the job restarted");
        last_step = step;
        assert_eq!(redis.job_field(&id, "worker").as_deref(), Some(owner.as_str()), "the job changed workers");
        assert_eq!(redis.job_field(&id, "attempts").as_deref(), Some("1"), "the job was taken over while its worker lived");
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(last_step > 0, "no progress in 11 s");
    assert_eq!(raw_request(front.addr, "DELETE", &format!("/v1/jobs/{id}"), "application/json", b"").status, 202);
    let v = front.wait_status(&id, "cancelled", done);
    assert_eq!(v["status"], "cancelled", "{v}");
    assert_eq!(redis.job_field(&id, "attempts").as_deref(), Some("1"));
    assert_eq!(redis.final_events(&id), 1);
    for w in [&w1, &w2] {
        let log = std::fs::read_to_string(&w.proc.log).unwrap_or_default();
        assert!(!log.contains("took over a job") && !log.contains("another worker took this job over"), "{}", w.proc.log_tail());
    }
}

#[test]
fn queue_flags_are_checked() {
    let out = Command::new(env!("CARGO_BIN_EXE_sd-worker")).args(["--front-only"]).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--front-only needs --queue"));
    let out = Command::new(env!("CARGO_BIN_EXE_sd-worker")).args(["--queue", "redis://x", "--queue-name", "a b", "--front-only"]).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--queue-name"));
}

#[test]
fn a_checkpoint_chosen_through_one_front_is_what_every_node_serves() {
    let Some(redis) = Redis::start("fleet-models") else { return };
    let models = log_dir().join(format!("fleet-models-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&models);
    copy_dir(&fixture("sd2"), &models.join("v2/sd2"));
    let dir = models.display().to_string();
    let worker = Node::start(&redis, "fleet-models-worker", false, &["--models-dir", &dir]);
    let front = Node::start(&redis, "fleet-models-front", true, &[]);
    let other = Node::start(&redis, "fleet-models-other", true, &[]);
    front.wait_ready();
    other.wait_ready();
    // A front without the folders lists the checkpoints its workers publish.
    let t0 = Instant::now();
    loop {
        let listed = front.get("/sdapi/v1/sd-models").json();
        if listed.as_array().is_some_and(|l| l.iter().any(|m| m["title"] == "v2/sd2" && m["model_name"] == "v2_sd2")) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "the front never listed the workers' checkpoints: {listed}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = front.post("/sdapi/v1/options", &json!({"sd_model_checkpoint": "nowhere"}));
    assert_eq!(r.status, 400, "{}", r.text());
    let r = front.post("/sdapi/v1/options", &json!({"sd_model_checkpoint": "v2/sd2"}));
    assert_eq!(r.status, 200, "{}", r.text());
    // At once, behind another front (no sticky sessions), requests run on it.
    let txt = json!({"prompt": "a fox", "width": 32, "height": 32, "steps": 1, "seed": 7});
    let r = other.post("/sdapi/v1/txt2img", &txt);
    assert_eq!(r.status, 200, "{}\n{}", r.text(), worker.proc.log_tail());
    let info: Value = serde_json::from_str(r.json()["info"].as_str().expect("info")).expect("info json");
    assert_eq!(info["sd_model_name"], "v2/sd2", "{info}");
    assert!(worker.proc.log_tail().contains("v2/sd2"), "the worker loaded the chosen checkpoint");
    let r = worker.post("/sdapi/v1/txt2img", &txt);
    assert_eq!(r.status, 200, "{}", r.text());
    let info: Value = serde_json::from_str(r.json()["info"].as_str().expect("info")).expect("info json");
    assert_eq!(info["sd_model_name"], "v2/sd2");
    // Once a worker described it, every node validates against the model itself.
    let t0 = Instant::now();
    while other.get("/v1/models").json()["data"][0]["variant"] != "sd21" {
        assert!(t0.elapsed() < Duration::from_secs(20), "the front never took the chosen model's description");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(other.get("/sdapi/v1/options").json()["sd_model_checkpoint"], "v2/sd2");
    // A front runs a request naming a checkpoint (as A1111 clients do with override_settings) from the
    // description the workers published, without loading anything itself.
    let r = other.post("/sdapi/v1/txt2img", &json!({"prompt": "x", "width": 32, "height": 32, "steps": 1, "override_settings": {"sd_model_checkpoint": "sd15"}}));
    assert_eq!(r.status, 200, "{}", r.text());
    let info: Value = serde_json::from_str(r.json()["info"].as_str().expect("info")).expect("info json");
    assert_eq!(info["sd_model_name"], "sd15");
    // Switching back through the worker's own API is fleet-wide too.
    assert_eq!(worker.post("/sdapi/v1/options", &json!({"sd_model_checkpoint": "sd15"})).status, 200);
    let info: Value = serde_json::from_str(other.post("/sdapi/v1/txt2img", &txt).json()["info"].as_str().expect("info")).expect("info json");
    assert_eq!(info["sd_model_name"], "sd15");
    let _ = std::fs::remove_dir_all(&models);
}
