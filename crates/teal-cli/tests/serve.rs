//! `teal serve` end to end: the binary listens on a free port, answers a completion over a real
//! TCP connection with llama.cpp's greedy continuation behind an API key (TEAL_API_KEY), and
//! reports an address it cannot bind.
//! Uses the real SmolLM2 file (skips when it is not cached, unless TEAL_REQUIRE_ASSETS=1).

mod common;

use common::smollm2;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};

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

/// [`http`] with this `Authorization` header.
fn http_with(addr: &str, method: &str, path: &str, body: &str, auth: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Authorization: {auth}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

#[test]
fn serve_answers_over_http() {
    let Some(model) = smollm2() else { return };
    let mut child = Command::new(env!("CARGO_BIN_EXE_teal"))
        .args([
            "serve",
            "-m",
            model.to_str().unwrap(),
            "--port",
            "0",
            "-c",
            "256",
            "-t",
            "2",
        ])
        .env("TEAL_API_KEY", KEY)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let _server = Server(child);
    let mut addr = None;
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("listening on http://") {
            addr = rest.split_whitespace().next().map(str::to_string);
            break;
        }
    }
    let addr = addr.expect("teal serve never printed its address");

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
