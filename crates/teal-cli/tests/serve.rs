//! `teal serve` end to end: the binary listens on a free port, answers a completion over a real
//! TCP connection with llama.cpp's greedy continuation behind an API key (TEAL_API_KEY), and
//! reports an address it cannot bind.
//! Uses the real SmolLM2 file (skips when it is not cached, unless TEAL_REQUIRE_ASSETS=1).

mod common;

use common::smollm2;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Kills the server when the test ends, however it ends.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

/// The API key the server is started with (through TEAL_API_KEY).
const KEY: &str = "test-key";

/// One HTTP/1.1 request over a new connection, with the API key; returns the status line and
/// the body.
fn http(addr: &str, method: &str, path: &str, body: &str) -> (String, String) {
    http_with(addr, method, path, body, &format!("Bearer {KEY}"))
}

/// Sends a request over a new connection with this `Authorization` header; the connection to
/// read the answer from.
fn send(addr: &str, method: &str, path: &str, body: &str, auth: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Authorization: {auth}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    s
}

/// [`http`] with this `Authorization` header.
fn http_with(addr: &str, method: &str, path: &str, body: &str, auth: &str) -> (String, String) {
    let mut s = send(addr, method, path, body, auth);
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// `teal serve` on `model` with context `ctx` on a free port, behind [`KEY`]; its address.
fn start(model: &Path, ctx: &str) -> (Server, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_teal"))
        .args([
            "serve",
            "-m",
            model.to_str().unwrap(),
            "--port",
            "0",
            "-c",
            ctx,
            "-t",
            "2",
        ])
        .env("TEAL_API_KEY", KEY)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let server = Server(child);
    let mut addr = None;
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("listening on http://") {
            addr = rest.split_whitespace().next().map(str::to_string);
            break;
        }
    }
    (server, addr.expect("teal serve never printed its address"))
}

#[test]
fn serve_answers_over_http() {
    let Some(model) = smollm2() else { return };
    let (_server, addr) = start(&model, "256");

    let (status, body) = http(
        &addr,
        "POST",
        "/v1/completions",
        r#"{"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}"#,
    );
    assert!(status.contains("200"), "{status}: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["choices"][0]["text"], " Paris.\n\nThe answer is: 201");

    let (status, body) = http(&addr, "POST", "/v1/chat/completions", "{\"messages\": [");
    assert!(status.contains("400"), "{status}: {body}");
    assert!(body.contains("malformed JSON"), "{body}");

    let (status, body) = http(&addr, "GET", "/v1/models", "");
    assert!(status.contains("200"), "{status}: {body}");
    assert!(body.contains("\"context_length\":256"), "{body}");

    // The key from TEAL_API_KEY guards the rest.
    let (status, body) = http_with(
        &addr,
        "POST",
        "/tokenize",
        r#"{"content": "Hi"}"#,
        "Bearer x",
    );
    assert!(status.contains("401"), "{status}: {body}");
    assert!(body.contains("invalid API key"), "{body}");
}

/// Ctrl-C stops the server at once, the request it is answering included (it used to wait
/// for the whole answer, here 480 tokens, and a second Ctrl-C did nothing).
#[test]
fn ctrl_c_stops_a_busy_server() {
    let Some(model) = smollm2() else { return };
    let (mut server, addr) = start(&model, "512");
    let body = r#"{"prompt": "Once upon a time,", "n_predict": 480, "temperature": 0,
                   "ignore_eos": true, "stream": true}"#;
    let mut s = send(&addr, "POST", "/completion", body, &format!("Bearer {KEY}"));
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    // Generation has started once an event has come.
    while !String::from_utf8_lossy(&raw).contains("data: ") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "{}", String::from_utf8_lossy(&raw));
        raw.extend_from_slice(&buf[..n]);
    }
    let interrupted = Command::new("kill")
        .args(["-INT", &server.0.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupted.success());
    // The answer is cut short: its last event (`"stop":true`) never comes.
    while let Ok(n @ 1..) = s.read(&mut buf) {
        raw.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&raw);
    assert!(!text.contains("\"stop\":true"), "{text}");
    let status = server.0.wait().unwrap();
    assert!(status.success(), "{status}");
}

#[test]
fn serve_names_an_address_it_cannot_listen_on() {
    let Some(model) = smollm2() else { return };
    let out = Command::new(env!("CARGO_BIN_EXE_teal"))
        .args([
            "serve",
            "-m",
            model.to_str().unwrap(),
            "--host",
            "203.0.113.7",
            "--port",
            "8080",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("cannot listen on 203.0.113.7:8080"), "{err}");
}
