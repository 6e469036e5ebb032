//! Where `scripts/fetch-assets.sh` keeps what it fetches, so the engine can find the default
//! model without being told.

use std::path::PathBuf;

/// File name of the default model (SmolLM2-135M-Instruct, GGUF Q4_1).
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The fetch script's cache: `$TEAL_CACHE_DIR`, else `$XDG_CACHE_HOME/teal`, else `~/.cache/teal`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TEAL_CACHE_DIR") {
        return d.into();
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("teal");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("teal")
}

/// The default model's path in the cache (it may not exist yet).
pub fn default_model_path() -> PathBuf {
    cache_dir().join("models").join(DEFAULT_MODEL_FILE)
}

/// Path of an asset the fetch script stores under `models/` or `data/`, if it is there.
pub fn cached(sub: &str, file: &str) -> Option<PathBuf> {
    let p = cache_dir().join(sub).join(file);
    p.exists().then_some(p)
}

/// Where `teal calibrate` keeps thresholds for a model by default: one file per model
/// fingerprint, so a cached file is never used with another model.
pub fn thresholds_path(fp: &crate::sparsity::thresholds::Fingerprint) -> PathBuf {
    cache_dir().join("thresholds").join(format!(
        "{}-{}L-{}.json",
        fp.arch, fp.num_hidden_layers, fp.tensor_hash
    ))
}
