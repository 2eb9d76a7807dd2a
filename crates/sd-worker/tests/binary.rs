//! The real `sd-worker` binary: configured through flags and environment variables, serving on
//! 127.0.0.1, and exiting cleanly on SIGTERM.

#[path = "../../../tests/support/fake_hub.rs"]
mod fake_hub;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures").join(name)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

fn http(port: u16, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split(' ').nth(1)?.parse().ok()?;
    Some((status, out))
}

#[cfg(unix)]
#[test]
fn binary_serves_from_env_config_and_stops_on_sigterm() {
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sd-worker"))
        .env("SD_WORKER_MODEL", fixture("sd15"))
        .env("SD_WORKER_MAX_STEPS", "20")
        .env("RUST_LOG", "warn")
        .args(["--port", &port.to_string(), "--device", "cpu", "--max-width", "64", "--max-height", "64"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let t0 = Instant::now();
    loop {
        if let Some((200, _)) = http(port, "GET", "/ready", "") {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "never ready");
        assert!(child.try_wait().expect("wait").is_none(), "the worker exited early");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, text) = http(port, "POST", "/sdapi/v1/txt2img", r#"{"prompt":"x","width":32,"height":32,"steps":2}"#).expect("txt2img");
    assert_eq!(status, 200, "{text}");
    let (status, text) = http(port, "POST", "/v1/jobs", r#"{"operation":"image_generation","prompt":"x","width":32,"height":32,"steps":21}"#).expect("job");
    assert_eq!(status, 400, "the env limit applies: {text}");
    assert!(text.contains("\"field\":\"steps\""), "{text}");
    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    assert!(killed.success());
    let t0 = Instant::now();
    let exit = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "{exit:?}");
}

#[test]
fn binary_rejects_bad_configuration() {
    let out = Command::new(env!("CARGO_BIN_EXE_sd-worker"))
        .args(["--model", "whatever", "--variant", "sd99"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--variant"));

    let missing = fixture("no-such-model");
    let out = Command::new(env!("CARGO_BIN_EXE_sd-worker"))
        .env("RUST_LOG", "off")
        .args(["--model", &missing.to_string_lossy(), "--port", &free_port().to_string(), "--device", "cpu"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("failed to load"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Starts the binary with `args` and `env`, without any Hugging Face variable from the caller's
/// environment (CI exports HF_HUB_OFFLINE=1), stdout captured.
fn spawn_worker(port: u16, args: &[&str], env: &[(&str, String)]) -> std::process::Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sd-worker"));
    for k in ["SD_WORKER_MODEL", "HF_ENDPOINT", "HF_HOME", "HF_HUB_CACHE", "HF_TOKEN", "HF_TOKEN_PATH", "HF_HUB_OFFLINE", "RUST_LOG"] {
        cmd.env_remove(k);
    }
    cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .args(["--port", &port.to_string(), "--device", "cpu"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn")
}

fn wait_ready(port: u16, child: &mut std::process::Child) {
    let t0 = Instant::now();
    loop {
        if let Some((200, _)) = http(port, "GET", "/ready", "") {
            return;
        }
        if let Some(status) = child.try_wait().expect("wait") {
            let mut err = String::new();
            if let Some(e) = child.stderr.as_mut() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("the worker exited early ({status}): {err}");
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "never ready");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGTERM, then everything the worker wrote to stdout.
#[cfg(unix)]
fn stop_and_read_stdout(child: std::process::Child) -> String {
    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    assert!(killed.success());
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "{:?}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[cfg(unix)]
#[test]
fn binary_without_a_model_serves_the_default_hub_model_and_logs_without_colour_to_a_pipe() {
    let hub = fake_hub::FakeHub::start(vec![fake_hub::sd_turbo_repo()]);
    let home = std::env::temp_dir().join(format!("sd-worker-first-run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);
    let port = free_port();
    let env = [("HF_ENDPOINT", hub.endpoint()), ("HF_HOME", home.to_string_lossy().into_owned())];
    let mut child = spawn_worker(port, &[], &env);
    wait_ready(port, &mut child);
    let (status, models) = http(port, "GET", "/v1/models", "").expect("models");
    assert_eq!(status, 200, "{models}");
    assert!(models.contains("\"variant\":\"sd-turbo\"") && models.contains("hub:stabilityai/sd-turbo"), "{models}");
    assert!(models.contains("\"steps\":1,") && models.contains("\"guidance_scale\":0.0"), "SD-Turbo's defaults: {models}");
    let (status, text) = http(port, "POST", "/sdapi/v1/txt2img", r#"{"prompt":"a red fox","width":64,"height":64,"steps":1,"cfg_scale":0}"#).expect("txt2img");
    assert_eq!(status, 200, "{text}");
    assert!(home.join("hub/models--stabilityai--sd-turbo").is_dir());
    let log = stop_and_read_stdout(child);
    assert!(log.contains("listening"), "{log}");
    assert!(!log.contains('\x1b'), "no colour codes in a pipe: {log:?}");
}

#[cfg(unix)]
#[test]
fn binary_logs_one_json_object_per_line_when_asked() {
    let port = free_port();
    let mut child = spawn_worker(
        port,
        &["--model", &fixture("sd15").to_string_lossy(), "--log-format", "json"],
        &[("RUST_LOG", "info".to_string())],
    );
    wait_ready(port, &mut child);
    let log = stop_and_read_stdout(child);
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 2, "{log}");
    for line in lines {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v.get("level").is_some() && v.get("fields").is_some(), "{line}");
    }
    assert!(log.contains("listening") && !log.contains('\x1b'), "{log}");
}

#[test]
fn binary_refuses_an_unknown_log_format() {
    let out = Command::new(env!("CARGO_BIN_EXE_sd-worker")).args(["--log-format", "xml"]).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--log-format"), "{}", String::from_utf8_lossy(&out.stderr));
}
