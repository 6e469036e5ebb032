//! Bad input through the `teal` binary: a clear error naming the problem, a non-zero exit code,
//! never a panic. Uses the real SmolLM2 file when it is cached (skips otherwise, or fails under
//! TEAL_REQUIRE_ASSETS=1).

mod common;

use common::{calibrate_small, short_text, smollm2};
use std::process::Command;

/// Runs teal and returns its stderr; asserts it failed without panicking.
fn fails(args: &[&str]) -> String {
    fails_with_stdout(args).0
}

/// [`fails`], also returning what it wrote on standard output.
fn fails_with_stdout(args: &[&str]) -> (String, String) {
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

#[test]
fn corrupt_model_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let bad_magic = dir.path().join("bad.gguf");
    std::fs::write(&bad_magic, b"NOPE\x03\x00\x00\x00 and some more bytes").unwrap();
    let e = fails(&["inspect", "-m", bad_magic.to_str().unwrap()]);
    assert!(
        e.contains("bad.gguf") && e.to_lowercase().contains("magic"),
        "{e}"
    );

    let missing = dir.path().join("missing.gguf");
    let e = fails(&["run", "-m", missing.to_str().unwrap(), "-p", "hi"]);
    assert!(e.contains("missing.gguf"), "{e}");

    let Some(real) = smollm2() else { return };
    let bytes = std::fs::read(&real).unwrap();
    let cut = dir.path().join("truncated.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = fails(&["run", "-m", cut.to_str().unwrap(), "-p", "hi", "-n", "1"]);
    assert!(e.contains("truncated.gguf"), "{e}");
}

#[test]
fn bad_prompts_and_texts_are_clear_errors() {
    let Some(m) = smollm2() else { return };
    let m = m.to_str().unwrap();
    let e = fails(&["run", "-m", m, "-p", "", "-n", "4"]);
    assert!(e.contains("prompt is empty"), "{e}");

    // Negative numbers reach the checks (not clap's "unexpected argument '-0'").
    let e = fails(&["run", "-m", m, "-p", "hi", "--sparsity", "-0.1"]);
    assert!(e.contains("sparsity -0.1 is outside [0, 1)"), "{e}");
    let e = fails(&["run", "-m", m, "-p", "hi", "--temp", "-1"]);
    assert!(e.contains("temperature = -1"), "{e}");

    let long = "word ".repeat(300);
    let (e, out) = fails_with_stdout(&["run", "-m", m, "-p", &long, "-c", "64", "-n", "4"]);
    assert!(e.contains("longer than the context of 64"), "{e}");
    // Refused before the prompt is echoed: nothing on standard output.
    assert!(out.is_empty(), "{out}");

    // More tokens asked for than any context holds: generation ends at the context (this
    // once reserved room for all of them and panicked with "capacity overflow").
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_teal"))
        .args([
            "run",
            "-m",
            m,
            "-p",
            "one two three",
            "-c",
            "32",
            "-n",
            "1000000000000",
        ])
        .args(["--temp", "0", "--ignore-eos"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("stop: ContextFull"), "{err}");

    // Sampling settings and server slots are checked before the model loads.
    let e = fails(&["run", "-m", m, "-p", "x", "--min-p", "1.5"]);
    assert!(e.contains("min_p = 1.5: must be in [0, 1]"), "{e}");
    let e = fails(&["run", "-m", m, "-p", "x", "--repeat-penalty", "0"]);
    assert!(e.contains("repeat_penalty = 0"), "{e}");
    let e = fails(&["serve", "-m", m, "--slots", "0"]);
    assert!(e.contains("--slots 0: at least 1"), "{e}");
    let e = fails(&["run", "-m", m, "-p", "x", "--logit-bias", "12"]);
    assert!(e.contains("'12': expected TOKEN_ID=BIAS"), "{e}");
    let e = fails(&["run", "-m", m, "-p", "x", "--logit-bias", "5=inf"]);
    assert!(e.contains("logit_bias of token 5 = inf"), "{e}");
    let e = fails(&["run", "-m", m, "-p", "x", "--logit-bias", "99999=1"]);
    assert!(
        e.contains("token 99999 is not in the vocabulary (49152 tokens)"),
        "{e}"
    );
    // Grammars and JSON schemas: the flag and the place of the problem.
    let e = fails(&["run", "-m", m, "-p", "x", "--grammar", "root ::= \"a"]);
    assert!(
        e.contains("--grammar: line 1 column 10: unterminated literal"),
        "{e}"
    );
    let e = fails(&[
        "run",
        "-m",
        m,
        "-p",
        "x",
        "-j",
        r#"{"type": "string", "pattern": "a+"}"#,
    ]);
    assert!(
        e.contains("--json-schema: /: keyword 'pattern' is not supported"),
        "{e}"
    );
    let e = fails(&["run", "-m", m, "-p", "x", "-j", "{\"type\": "]);
    assert!(e.contains("--json-schema: not valid JSON"), "{e}");
    let e = fails(&["run", "-m", m, "-p", "x", "--grammar-file", "/no/such.gbnf"]);
    assert!(e.contains("grammar file /no/such.gbnf"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("latin1.txt");
    std::fs::write(&bin, b"caf\xe9 au lait").unwrap();
    let e = fails(&["ppl", "-m", m, "-f", bin.to_str().unwrap()]);
    assert!(
        e.contains("latin1.txt") && e.contains("not valid UTF-8"),
        "{e}"
    );

    let short = dir.path().join("short.txt");
    std::fs::write(&short, "only a few words").unwrap();
    let e = fails(&["ppl", "-m", m, "-f", short.to_str().unwrap()]);
    assert!(e.contains("fewer than one window"), "{e}");

    let e = fails(&[
        "ppl",
        "-m",
        m,
        "-f",
        short.to_str().unwrap(),
        "--sparsity",
        "1.5",
    ]);
    assert!(e.contains("outside [0, 1)"), "{e}");

    let th = dir.path().join("t.json");
    std::fs::write(&th, "{\"format\": \"teal-thresholds\", \"version\": 7}").unwrap();
    let e = fails(&[
        "run",
        "-m",
        m,
        "-p",
        "hi",
        "--sparsity",
        "0.5",
        "--thresholds",
        th.to_str().unwrap(),
    ]);
    assert!(e.contains("unsupported thresholds file version"), "{e}");

    let e = fails(&["run", "-m", m, "-p", "hi", "-t", "0"]);
    assert!(e.contains("at least 1"), "{e}");
}

/// `teal report --device cuda:0 --mode half` is a clear error naming the device: where there is
/// no GPU, why it cannot be opened; on a GPU, the mode (mode `all` only, as `ppl`).
#[test]
fn report_on_a_gpu_refuses_other_modes() {
    let Some(m) = smollm2() else { return };
    let m = m.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = short_text(dir.path());
    let th = dir.path().join("th.json");
    calibrate_small(m, &text, &th, &[]);
    let (text_s, th_s) = (text.to_str().unwrap(), th.to_str().unwrap());
    let out = dir.path().join("report");
    let e = fails(&[
        "report",
        "-m",
        m,
        "--thresholds",
        th_s,
        "-f",
        text_s,
        "--sparsities",
        "0.5",
        "--chunks",
        "1",
        "-c",
        "64",
        "--mode",
        "half",
        "--device",
        "cuda:0",
        "-o",
        out.to_str().unwrap(),
    ]);
    let gpu = e.contains("--device cuda:0 supports --mode all only (got half)");
    assert!(gpu || e.starts_with("error: --device cuda:0: "), "{e}");
}
