//! The real `sd-worker` binary: configured through flags and environment variables, serving on
//! 127.0.0.1, and exiting cleanly on SIGTERM.

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
