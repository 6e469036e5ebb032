//! `--allocation auto` (the default of run, ppl and serve; bench's when asked) takes the best
//! allocation the thresholds file supports: greedy where it has greedy tables, else fisher where
//! it has fisher tables (with no quantile asked, or fisher), else uniform; an unset `--quantile`
//! is fisher for the greedy allocation where the file has fisher tables, else the quantile
//! its greedy search ran with. Uses the real SmolLM2 file when it is cached (skips otherwise,
//! or fails under TEAL_REQUIRE_ASSETS=1).

mod common;

use common::{
    calibrate_small, calibrated_smollm2, fails, short_text, smollm2, teal_ok as teal, Calibrated,
};
use std::path::Path;

/// A greedy search on a few tokens, for `calibrate_small`.
const GREEDY_SMALL: [&str; 7] = [
    "--greedy",
    "--greedy-samples",
    "1",
    "--greedy-seq-len",
    "16",
    "--greedy-step",
    "0.3",
];
/// Loss gradients on a few tokens, for `calibrate_small`.
const FISHER_SMALL: [&str; 5] = [
    "--fisher",
    "--fisher-samples",
    "1",
    "--fisher-seq-len",
    "32",
];

/// `teal ppl` on one window of 64 tokens at 50 % with `th`, plus `extra` flags.
fn ppl_args<'a>(m: &'a str, text: &'a str, th: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let th = th.to_str().unwrap();
    let args = [
        "ppl",
        "-m",
        m,
        "-f",
        text,
        "-c",
        "64",
        "--chunks",
        "1",
        "--sparsity",
        "0.5",
        "--thresholds",
        th,
    ];
    [&args[..], extra].concat()
}

/// The `allocation` and `quantile` keys of `teal ppl --json` at 50 % with `th`, plus `extra`
/// flags, as `allocation/quantile`.
fn allocation(m: &str, text: &str, th: &Path, extra: &[&str]) -> String {
    allocation_of(&teal(
        &[&ppl_args(m, text, th, extra)[..], &["--json"]].concat(),
    ))
}

/// The same of `teal bench --json` (dense and 50 %, a few tokens).
fn bench_allocation(m: &str, th: &Path, extra: &[&str]) -> String {
    let args = [
        "bench",
        "-m",
        m,
        "--thresholds",
        th.to_str().unwrap(),
        "--sparsity",
        "0,0.5",
        "-n",
        "2",
        "-p",
        "4",
        "-r",
        "1",
        "--bandwidth-mib",
        "16",
        "--json",
    ];
    allocation_of(&teal(&[&args[..], extra].concat()))
}

/// `allocation/quantile` from a JSON result.
fn allocation_of(json: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    format!(
        "{}/{}",
        v["allocation"].as_str().unwrap(),
        v["quantile"].as_str().unwrap()
    )
}

#[test]
fn auto_allocation_is_the_best_the_file_has() {
    let Some(m) = smollm2() else { return };
    let m = m.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = short_text(dir.path());
    let calibrate = |name: &str, extra: &[&str]| {
        let th = dir.path().join(name);
        calibrate_small(m, &text, &th, extra);
        th
    };
    let text = text.to_str().unwrap();
    let plain = calibrate("plain.json", &[]);
    assert_eq!(allocation(m, text, &plain, &[]), "uniform/abs");
    // Greedy tables alone: their masks are read with the quantile the search ran with.
    let greedy_teal = calibrate(
        "greedy-teal.json",
        &[&GREEDY_SMALL[..], &["--quantile", "teal"]].concat(),
    );
    assert_eq!(allocation(m, text, &greedy_teal, &[]), "greedy/teal");
    let fisher = calibrate("fisher.json", &FISHER_SMALL);
    assert_eq!(allocation(m, text, &fisher, &[]), "fisher/fisher");
    // The fisher allocation picks the inputs itself, so an explicit quantile of another kind
    // keeps auto uniform, and asking the fisher allocation for one is an error.
    assert_eq!(
        allocation(m, text, &fisher, &["--quantile", "teal"]),
        "uniform/teal"
    );
    assert_eq!(
        allocation(m, text, &fisher, &["--quantile", "abs"]),
        "uniform/abs"
    );
    let err = fails(&ppl_args(
        m,
        text,
        &fisher,
        &["--allocation", "fisher", "--quantile", "abs"],
    ));
    assert!(err.contains("--allocation fisher --quantile abs"), "{err}");
    assert_eq!(
        allocation(m, text, &fisher, &["--allocation", "uniform"]),
        "uniform/abs"
    );

    // With greedy tables too: greedy, choosing its inputs by the fisher scores unless asked
    // otherwise.
    let both = calibrate(
        "greedy-fisher.json",
        &[&GREEDY_SMALL[..], &FISHER_SMALL].concat(),
    );
    assert_eq!(allocation(m, text, &both, &[]), "greedy/fisher");
    // Asking a fisher file for greedy tables (no --force) keeps its fisher tables, computed
    // again with the file's settings (1 x 32 tokens: the default 16 x 512 would not fit the
    // text).
    let added = dir.path().join("added.json");
    std::fs::copy(&fisher, &added).unwrap();
    calibrate_small(m, Path::new(text), &added, &GREEDY_SMALL);
    assert_eq!(allocation(m, text, &added, &[]), "greedy/fisher");
    assert_eq!(
        allocation(m, text, &both, &["--quantile", "abs"]),
        "greedy/abs"
    );
    assert_eq!(
        allocation(m, text, &both, &["--allocation", "fisher"]),
        "fisher/fisher"
    );
    assert_eq!(
        allocation(m, text, &both, &["--allocation", "uniform"]),
        "uniform/abs"
    );

    // `teal bench` keeps uniform unless asked, and takes what `run` would with auto.
    assert_eq!(bench_allocation(m, &fisher, &[]), "uniform/abs");
    assert_eq!(
        bench_allocation(m, &fisher, &["--allocation", "auto"]),
        "fisher/fisher"
    );
}

/// A thresholds file cached before the fingerprint sampled the weights (named without their
/// hash, and without it inside) is still the default; a file under the newer name wins.
#[test]
fn a_cache_file_named_before_the_weights_hash_is_found() {
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
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&th).unwrap()).unwrap();
    let fp = v["model"].clone();
    let weights = fp["weights_hash"].as_str().unwrap().to_string();
    v["model"].as_object_mut().unwrap().remove("weights_hash");
    let cache = dir.path().join("cache");
    std::fs::create_dir_all(cache.join("thresholds")).unwrap();
    let stem = format!(
        "{}-{}L-{}",
        fp["arch"].as_str().unwrap(),
        fp["num_hidden_layers"],
        fp["tensor_hash"].as_str().unwrap()
    );
    let legacy = cache.join(format!("thresholds/{stem}.json"));
    std::fs::write(&legacy, v.to_string()).unwrap();
    let used = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_teal"))
            .args(["ppl", "-m", m, "-f", text.to_str().unwrap(), "-c", "64"])
            .args(["--chunks", "1", "--sparsity", "0.5", "--json"])
            .env("TEAL_CACHE_DIR", &cache)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        j["thresholds"].as_str().unwrap().to_string()
    };
    assert_eq!(used(), legacy.to_str().unwrap());
    let newer = cache.join(format!("thresholds/{stem}-{weights}.json"));
    std::fs::copy(&th, &newer).unwrap();
    assert_eq!(used(), newer.to_str().unwrap());
}

/// Without `--force`, a file that lacks tables asked for is calibrated again with them,
/// keeping the kinds it had: the weight-aware tables too. A file made with `--no-wina` (as
/// scripts/demo.sh makes the cached one) gains them from a plain `teal calibrate`, which
/// once answered "already calibrated" and left `--quantile wina` refused; and asking such a
/// file for greedy tables with `--no-wina` keeps its wina tables.
#[test]
fn calibrate_adds_wina_tables_to_a_file_without_them_and_keeps_them() {
    let Some(Calibrated {
        model,
        dir: _dir,
        text,
        th,
    }) = calibrated_smollm2()
    else {
        return;
    };
    let m = model.as_str();
    let text = text.to_str().unwrap();
    let wina = ["--allocation", "uniform", "--quantile", "wina"];
    let err = fails(&ppl_args(m, text, &th, &wina));
    assert!(err.contains("no weight-aware (wina) tables"), "{err}");
    // The same calibration without --no-wina.
    let (th_s, base) = (th.to_str().unwrap(), ["calibrate", "-m", m, "--data", text]);
    teal(
        &[
            &base[..],
            &["--samples", "1", "--seq-len", "64", "-o", th_s],
        ]
        .concat(),
    );
    assert_eq!(allocation(m, text, &th, &wina), "uniform/wina");
    // Greedy tables asked for with --no-wina: the file keeps its wina tables.
    calibrate_small(m, Path::new(text), &th, &GREEDY_SMALL);
    assert_eq!(allocation(m, text, &th, &[]), "greedy/abs");
    assert_eq!(allocation(m, text, &th, &wina), "uniform/wina");
}
