//! What the CLI's integration tests share: the real SmolLM2 file, a short text, and a
//! thresholds file calibrated on it in seconds. (Each test file uses some of them.)
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The cached SmolLM2 file (`None`: the test skips, or fails under TEAL_REQUIRE_ASSETS=1).
pub fn smollm2() -> Option<PathBuf> {
    teal::assets::test_model("TEAL_SMOLLM2_GGUF", teal::assets::DEFAULT_MODEL_FILE).unwrap()
}

/// Runs teal, asserts it succeeded and returns its standard output.
pub fn teal_ok(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_teal"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "teal {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs teal and returns its stderr; asserts it failed without panicking.
pub fn fails(args: &[&str]) -> String {
    fails_with_stdout(args).0
}

/// [`fails`], also returning what it wrote on standard output.
pub fn fails_with_stdout(args: &[&str]) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_teal"))
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "teal {args:?} succeeded; stderr: {err}"
    );
    assert_ne!(
        out.status.code(),
        Some(101),
        "teal {args:?} panicked: {err}"
    );
    assert!(!err.contains("panicked"), "teal {args:?} panicked: {err}");
    (err, String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A short English text in `dir` (about 400 tokens).
pub fn short_text(dir: &Path) -> PathBuf {
    let text = dir.join("text.txt");
    std::fs::write(
        &text,
        "The quick brown fox jumps over the lazy dog. ".repeat(40),
    )
    .unwrap();
    text
}

/// Thresholds of `model` calibrated on one window of 64 tokens of `text` into `out`, with the
/// `extra` flags of `teal calibrate`.
pub fn calibrate_small(model: &str, text: &Path, out: &Path, extra: &[&str]) {
    let (text, out) = (text.to_str().unwrap(), out.to_str().unwrap());
    let base = ["calibrate", "-m", model, "--data", text, "--samples", "1"];
    let rest = ["--seq-len", "64", "--no-wina", "-o", out];
    teal_ok(&[&base[..], &rest[..], extra].concat());
}

/// SmolLM2 with thresholds calibrated in seconds ([`calibrate_small`], no extra flags) on a
/// [`short_text`], all in a fresh directory.
pub struct Calibrated {
    /// The model file's path.
    pub model: String,
    /// Holds the text and the thresholds (removed when dropped).
    pub dir: tempfile::TempDir,
    pub text: PathBuf,
    pub th: PathBuf,
}

/// [`Calibrated`] for the cached SmolLM2 (`None` as [`smollm2`]).
pub fn calibrated_smollm2() -> Option<Calibrated> {
    let model = smollm2()?.to_str().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let text = short_text(dir.path());
    let th = dir.path().join("th.json");
    calibrate_small(&model, &text, &th, &[]);
    Some(Calibrated {
        model,
        dir,
        text,
        th,
    })
}
