//! Bad input through the `teal` binary: a clear error naming the problem, a non-zero exit code,
//! never a panic. Uses the real SmolLM2 file when it is cached (skips otherwise, or fails under
//! TEAL_REQUIRE_ASSETS=1).

mod common;

use common::{
    calibrate_small, calibrated_smollm2, fails, fails_with_stdout, short_text, smollm2, teal_ok,
    Calibrated,
};
use std::path::Path;

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

    // A layer count that contradicts the tensors (llama.cpp refuses it too): one layer fewer
    // than the file holds ran on the first 29 and printed nonsense.
    let path = dir.path().join("layers.gguf");
    std::fs::write(&path, patch_u32(&bytes, "llama.block_count", 29)).unwrap();
    let e = fails(&["run", "-m", path.to_str().unwrap(), "-p", "hi", "-n", "1"]);
    assert!(
        e.contains("layers.gguf: tensors of layer 29, but the metadata gives 29 layers"),
        "{e}"
    );
}

/// `gguf` with the 32-bit integer value of metadata `key` replaced by `value`.
fn patch_u32(gguf: &[u8], key: &str, value: u32) -> Vec<u8> {
    let at = gguf
        .windows(key.len())
        .position(|w| w == key.as_bytes())
        .unwrap_or_else(|| panic!("no {key} in the file"))
        + key.len();
    let ty = u32::from_le_bytes(gguf[at..at + 4].try_into().unwrap());
    // GGUF value types 4 and 5: UINT32 and INT32.
    assert!(ty == 4 || ty == 5, "{key} has value type {ty}");
    let mut out = gguf.to_vec();
    out[at + 4..at + 8].copy_from_slice(&value.to_le_bytes());
    out
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
    assert!(
        e.contains("unsupported thresholds file version 7 (this teal reads"),
        "{e}"
    );

    let e = fails(&["run", "-m", m, "-p", "hi", "-t", "0"]);
    assert!(e.contains("at least 1"), "{e}");
}

/// `ppl --chunks N` beyond the windows the text has scores all of them, as llama-perplexity caps
/// `--chunks` (`n_chunk = min(n_chunks, n_chunk_max)`), with a one-line note on stderr, and
/// gives what scoring every window gives; asking for no more than there are prints no note.
/// The minimums stay errors: a text shorter than two windows with `--scoring llama-cpp`, one
/// shorter than one window with the default scoring.
#[test]
fn ppl_chunks_beyond_the_text_are_capped() {
    let Some(m) = smollm2() else { return };
    let m = m.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = short_text(dir.path());
    let text = text.to_str().unwrap();
    let ppl = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_teal"))
            .args(["ppl", "-m", m, "-f", text, "-c", "64", "--json"])
            .args(extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{extra:?}: {err}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (v, err)
    };
    let (all, err) = ppl(&[]);
    assert!(!err.contains("note: --chunks"), "{err}");
    let n = all["chunks"].as_u64().unwrap();
    assert!(n >= 2, "{all}");
    let (capped, err) = ppl(&["--chunks", "99"]);
    let note =
        format!("note: --chunks 99: the text has {n} windows of 64 tokens; scoring those {n}");
    let notes: Vec<&str> = err.lines().filter(|l| l.contains("--chunks")).collect();
    assert_eq!(notes, [note.as_str()], "{err}");
    assert_eq!(capped["chunks"], n);
    assert_eq!(capped["tokens_scored"], all["tokens_scored"]);
    assert_eq!(capped["ppl"], all["ppl"]);
    let (exact, err) = ppl(&["--chunks", &n.to_string()]);
    assert!(!err.contains("note: --chunks"), "{err}");
    assert_eq!(exact["ppl"], all["ppl"]);
    let e = fails(&[
        "ppl",
        "-m",
        m,
        "-f",
        text,
        "-c",
        "512",
        "--chunks",
        "99",
        "--scoring",
        "llama-cpp",
    ]);
    assert!(e.contains("needs at least two windows"), "{e}");
    let e = fails(&["ppl", "-m", m, "-f", text, "-c", "4096", "--chunks", "99"]);
    assert!(e.contains("fewer than one window"), "{e}");
}

/// Limits checked before any work, with the flag named: contexts of no positions or beyond
/// memory, thread counts that cannot be started, a greedy step that calibrates nothing, bench
/// counts of zero, report layers the model lacks; and llama.cpp's -1 for `-n` and `--seed`.
#[test]
fn limits_are_checked_before_any_work() {
    let Some(m) = smollm2() else { return };
    let m = m.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = short_text(dir.path());
    let text = text.to_str().unwrap();
    let run = |extra: &[&str]| fails(&[&["run", "-m", m, "-p", "hi"][..], extra].concat());

    let e = run(&["-c", "0"]);
    assert!(e.contains("-c 0: a context of 0 positions"), "{e}");
    // About 2 PB of f16 keys and values: more than any machine has (this once aborted in the
    // allocator), and 2^58 positions, whose bytes do not fit 64 bits (this once wrapped to 0).
    let e = run(&["-c", "100000000000"]);
    assert!(
        e.contains("-c 100000000000: 100000000000 positions need") && e.contains("GiB available"),
        "{e}"
    );
    let e = run(&["-c", "288230376151711744"]);
    assert!(e.contains("more than 2^64 bytes"), "{e}");
    // A perplexity window keeps its logits: counted with the KV cache.
    let e = fails(&["ppl", "-m", m, "-f", text, "-c", "400000"]);
    assert!(
        e.contains("-c 400000: 400000 positions need") && e.contains("and logits"),
        "{e}"
    );
    let e = fails(&["serve", "-m", m, "-c", "0"]);
    assert!(e.contains("-c 0: a context of 0 positions"), "{e}");
    let e = run(&["-t", "100000"]);
    assert!(e.contains("-t 100000: at most"), "{e}");
    let e = run(&["--system", "be brief"]);
    assert!(e.contains("--system") && e.contains("--chat"), "{e}");
    let e = run(&["--gpu-dtype", "f32"]);
    assert!(e.contains("--gpu-dtype"), "{e}");
    let e = run(&["-n", "-2"]);
    assert!(e.contains("-1 for no limit"), "{e}");

    let e = fails(&[
        "calibrate",
        "-m",
        m,
        "--data",
        text,
        "--samples",
        "1",
        "--seq-len",
        "64",
        "--greedy",
        "--greedy-step",
        "0",
        "-o",
        dir.path().join("never.json").to_str().unwrap(),
    ]);
    assert!(e.contains("greedy step 0: must be in (0, 1]"), "{e}");
    assert!(!dir.path().join("never.json").exists());

    let bench =
        |extra: &[&str]| fails(&[&["bench", "-m", m, "--sparsity", "0"][..], extra].concat());
    let e = bench(&["-n", "0"]);
    assert!(e.contains("-n 0 -r 5 -p 64: bench needs"), "{e}");
    let e = bench(&["--bandwidth-mib", "0"]);
    assert!(e.contains("--bandwidth-mib 0"), "{e}");
    // A probe buffer beyond memory (this aborted in the allocator after loading the model),
    // and one of 2^64 bytes (this wrapped to an empty buffer and a bandwidth of 0).
    let e = bench(&["--bandwidth-mib", "100000000"]);
    assert!(
        e.contains("--bandwidth-mib 100000000: the probe's buffer does not fit"),
        "{e}"
    );
    let e = bench(&["--bandwidth-mib", "17592186044416"]);
    assert!(
        e.contains("--bandwidth-mib 17592186044416: the probe's buffer does not fit"),
        "{e}"
    );
    let e = bench(&["-p", "100000000000"]);
    assert!(
        e.contains("-p 100000000000 + -n 128: 100000000128 positions need"),
        "{e}"
    );
    // -p + -n beyond usize: this wrapped to one position, then panicked with "capacity
    // overflow" building the prompt.
    let e = bench(&["-p", "18446744073709551615", "-n", "2"]);
    assert!(
        e.contains("-p 18446744073709551615 + -n 2: more positions than any context holds"),
        "{e}"
    );
    let e = bench(&["--allocation", "fisher", "--quantile", "abs"]);
    assert!(e.contains("--allocation fisher --quantile abs"), "{e}");

    let th = dir.path().join("th.json");
    calibrate_small(m, Path::new(text), &th, &[]);
    // The same calibration again keeps the file; other windows or text are refused, not
    // answered with the old file.
    calibrate_small(m, Path::new(text), &th, &[]);
    let th_s = th.to_str().unwrap();
    let again = |extra: &[&str]| {
        let base = [
            "calibrate",
            "-m",
            m,
            "--seq-len",
            "64",
            "--no-wina",
            "-o",
            th_s,
        ];
        fails(&[&base[..], extra].concat())
    };
    let e = again(&["--data", text, "--samples", "2"]);
    assert!(
        e.contains("samples 1 (asked 2)") && e.contains("--force"),
        "{e}"
    );
    // The same name and size, other words.
    std::fs::create_dir(dir.path().join("other")).unwrap();
    let other = dir
        .path()
        .join("other")
        .join(Path::new(text).file_name().unwrap());
    std::fs::write(
        &other,
        std::fs::read_to_string(text).unwrap().replace('e', "a"),
    )
    .unwrap();
    let e = again(&["--data", other.to_str().unwrap(), "--samples", "1"]);
    assert!(
        e.contains("tokens_hash") && !e.contains("text_bytes"),
        "{e}"
    );
    let out = dir.path().join("report");
    let e = fails(&[
        "report",
        "-m",
        m,
        "--thresholds",
        th.to_str().unwrap(),
        "-f",
        text,
        "--sparsities",
        "0.5",
        "--layers",
        "99",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(e.contains("--layers: layer 99 does not exist"), "{e}");
    assert!(
        !out.exists(),
        "the report wrote {} before failing",
        out.display()
    );

    // llama.cpp's -1s: no limit on -n (here the context ends it), a random seed (printed).
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_teal"))
        .args(["run", "-m", m, "-p", "one two", "-c", "12", "-n", "-1"])
        .args(["--seed", "-1", "--ignore-eos"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("stop: ContextFull") && err.contains("seed: "),
        "{err}"
    );
}

/// `teal report --device cuda:0 --mode half` is a clear error naming the device: where there is
/// no GPU, why it cannot be opened; on a GPU, the mode (mode `all` only, as `ppl`).
#[test]
fn report_on_a_gpu_refuses_other_modes() {
    let Some(Calibrated {
        model,
        dir,
        text,
        th,
    }) = calibrated_smollm2()
    else {
        return;
    };
    let m = model.as_str();
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

/// `teal report --layers` naming a layer twice plots it once (the second plot of it found no
/// values left, and plotters panicked on the NaN range of their empty fit).
#[test]
fn report_plots_a_layer_named_twice_once() {
    let Some(Calibrated {
        model,
        dir,
        text,
        th,
    }) = calibrated_smollm2()
    else {
        return;
    };
    let m = model.as_str();
    let out = dir.path().join("report");
    let (th, text) = (th.to_str().unwrap(), text.to_str().unwrap());
    let base = ["report", "-m", m, "--thresholds", th, "-f", text];
    let md = teal_ok(
        &[
            &base[..],
            &["-o", out.to_str().unwrap(), "--sparsities", "0.5,0.25,0.5"],
            &["--chunks", "1", "-c", "64", "--layers", "3,1,3"],
        ]
        .concat(),
    );
    let figures: Vec<&str> = md
        .lines()
        .filter(|l| l.starts_with("![activations"))
        .collect();
    assert_eq!(
        figures,
        [
            "![activations_layer1.png](activations_layer1.png)",
            "![activations_layer3.png](activations_layer3.png)"
        ]
    );
    assert!(out.join("activations_layer3.png").exists());
    // The sparsities in order, each once (the plot joins its points in the order given).
    let targets: Vec<&str> = md
        .lines()
        .filter(|l| l.starts_with("| uniform / teal"))
        .filter_map(|l| l.split('|').nth(2).map(str::trim))
        .collect();
    assert_eq!(targets, ["0.25", "0.5"], "{md}");
    // An output directory that cannot be written is found before any work.
    let e = fails(&[&base[..], &["-o", "/proc/self"]].concat());
    assert!(e.contains("-o /proc/self: cannot write there"), "{e}");
}

/// Flags that would be ignored or overflow: `bench --seed` without `--random-weights`,
/// `calibrate --collect-mib` beyond the address space.
#[test]
fn ignored_and_overflowing_flags_are_refused() {
    let e = fails(&["bench", "--seed", "3", "-n", "1"]);
    assert!(e.contains("--random-weights"), "{e}");
    let e = fails(&["calibrate", "--collect-mib", "18446744073709551615"]);
    assert!(e.contains("--collect-mib 18446744073709551615"), "{e}");
}

/// `teal bench --random-weights` benchmarks a model and thresholds of its own: a model file or
/// a thresholds file given with it is refused (both were ignored without a word, the results
/// read as if for them).
#[test]
fn bench_random_weights_refuses_model_and_thresholds_files() {
    let base = [
        "bench",
        "--random-weights",
        "qwen2-tiny",
        "-n",
        "2",
        "-r",
        "1",
        "-p",
        "2",
    ];
    let e = fails(&[&base[..], &["--thresholds", "th.json", "--sparsity", "0.5"]].concat());
    assert!(
        e.contains("'--random-weights <SHAPE>' cannot be used with '--thresholds <THRESHOLDS>'"),
        "{e}"
    );
    let e = fails(&[&base[..], &["-m", "model.gguf"]].concat());
    assert!(
        e.contains("'--random-weights <SHAPE>' cannot be used with '--model <MODEL>'"),
        "{e}"
    );
}

/// `teal bench --sparsity` checks its thresholds before it loads the model and probes the
/// bandwidth (a missing file was reported after both), as run and ppl do.
#[test]
fn bench_checks_thresholds_before_loading() {
    let Some(m) = smollm2() else { return };
    let e = fails(&[
        "bench",
        "-m",
        m.to_str().unwrap(),
        "--sparsity",
        "0,0.5",
        "--thresholds",
        "/no/such.json",
    ]);
    assert_eq!(
        e.lines().collect::<Vec<_>>(),
        ["error: /no/such.json: No such file or directory (os error 2)"]
    );
}

/// An empty API key (`--api-key ""`, or TEAL_API_KEY set to nothing) is refused before the
/// model loads: it was taken as a key, and any request sending an empty `X-Api-Key` header
/// passed the server's check. (The address cannot be bound: a server that starts fails too.)
#[test]
fn serve_refuses_an_empty_api_key() {
    let Some(m) = smollm2() else { return };
    let m = m.to_str().unwrap();
    let e = fails(&["serve", "-m", m, "--host", "256.0.0.1", "--api-key", ""]);
    assert!(e.contains("--api-key: an empty key"), "{e}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_teal"))
        .args(["serve", "-m", m, "--host", "256.0.0.1"])
        .env("TEAL_API_KEY", "")
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{e}");
    assert!(e.contains("--api-key: an empty key"), "{e}");
}
