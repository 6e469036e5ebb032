//! Where `scripts/fetch-assets.sh` keeps what it fetches, so the engine can find the default
//! model without being told.

use std::path::PathBuf;

/// File name of the default model (SmolLM2-135M-Instruct, GGUF Q4_1).
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The fetch script's cache (and the CUDA kernels'): `$TEAL_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/teal`, else `~/.cache/teal`.
pub use teal_kernels::cache_dir;

/// The default model's path in the cache (it may not exist yet).
pub fn default_model_path() -> PathBuf {
    cache_dir().join("models").join(DEFAULT_MODEL_FILE)
}

/// Path of an asset the fetch script stores under `models/` or `data/`, if it is there.
pub fn cached(sub: &str, file: &str) -> Option<PathBuf> {
    let p = cache_dir().join(sub).join(file);
    p.exists().then_some(p)
}

/// A real model for a test: `$env` where set, else `models/<file>` in the cache. `Ok(None)`, with
/// a note on stderr, when it is missing, so the test can skip; an error instead under
/// `TEAL_REQUIRE_ASSETS=1` (scripts/test.sh and CI), where a test must not pass by skipping.
pub fn test_model(env: &str, file: &str) -> Result<Option<PathBuf>, String> {
    let p = std::env::var_os(env)
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("models").join(file));
    if p.exists() {
        Ok(Some(p))
    } else if std::env::var("TEAL_REQUIRE_ASSETS").as_deref() == Ok("1") {
        Err(format!(
            "{} is missing: run scripts/fetch-assets.sh (or set {env})",
            p.display()
        ))
    } else {
        eprintln!(
            "skipped: {} not found (set {env} or run scripts/fetch-assets.sh)",
            p.display()
        );
        Ok(None)
    }
}

/// Where `teal calibrate` keeps thresholds for a model by default: one file per model
/// fingerprint, so a cached file is never used with another model. A file cached before the
/// fingerprint sampled the weights (named without their hash) is still found: the path of
/// the fingerprint without its weights hash, where that file exists and the newer one does
/// not.
pub fn thresholds_path(fp: &crate::sparsity::thresholds::Fingerprint) -> PathBuf {
    let path = thresholds_path_of(fp);
    if fp.weights_hash.is_some() && !path.exists() {
        let mut older = fp.clone();
        older.weights_hash = None;
        let legacy = thresholds_path_of(&older);
        if legacy.exists() {
            return legacy;
        }
    }
    path
}

/// The cache file named by `fp` alone.
fn thresholds_path_of(fp: &crate::sparsity::thresholds::Fingerprint) -> PathBuf {
    let weights = fp
        .weights_hash
        .as_ref()
        .map(|h| format!("-{h}"))
        .unwrap_or_default();
    cache_dir().join("thresholds").join(format!(
        "{}-{}L-{}{weights}.json",
        fp.arch, fp.num_hidden_layers, fp.tensor_hash
    ))
}
