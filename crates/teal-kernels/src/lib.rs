//! Kernels for teal. Every op has a plain scalar reference in [`reference`](mod@reference);
//! every fast path (SIMD, threads) in [`cpu`] is tested against it; [`pool`] runs the decode
//! kernels' threads. [`packed`] defines the weight formats.

pub mod batch;
pub mod cpu;
pub mod cuda;
pub mod packed;
pub mod pool;
pub mod quant;
pub mod rand;
pub mod reference;

use std::path::PathBuf;

/// teal's cache directory, shared by `scripts/fetch-assets.sh` (models, data) and the CUDA
/// backend (compiled kernels): `$TEAL_CACHE_DIR`, else `$XDG_CACHE_HOME/teal`, else
/// `~/.cache/teal`.
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
