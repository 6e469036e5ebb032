//! TEAL: activation statistics, threshold calibration, block-wise greedy allocation, and the
//! thresholds file that carries them (DESIGN §1).

pub mod calibrate;
pub mod fisher;
pub mod greedy;
pub mod histogram;
pub mod thresholds;

pub use thresholds::{Allocation, Mode, Quantile, SparsitySpec, Thresholds};

/// The seven projections in the order used everywhere (`Block::linears`).
pub const PROJ_NAMES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Site index (0 qkv, 1 o, 2 gate/up, 3 down) whose activations feed each projection.
pub const PROJ_SITE: [usize; 7] = [0, 0, 0, 1, 2, 2, 3];

/// Rows `rows` of each of the first `windows` windows of `len` rows (`width` values a row) in
/// `x`, one window's after another: the greedy search's block inputs and scored positions.
pub(crate) fn window_rows<T: Copy>(
    x: &[T],
    width: usize,
    len: usize,
    windows: usize,
    rows: std::ops::Range<usize>,
) -> Vec<T> {
    x.chunks(len * width)
        .take(windows)
        .flat_map(|w| &w[rows.start * width..rows.end * width])
        .copied()
        .collect()
}

/// Parameter count of each projection relative to `q_proj` (TEAL's size weights `w_p`,
/// derived from the config, not hard-coded).
pub fn size_weights(c: &crate::config::Config) -> [f64; 7] {
    let (d, ff, q, kv) = (
        c.hidden_size as f64,
        c.intermediate_size as f64,
        c.q_dim() as f64,
        c.kv_dim() as f64,
    );
    let base = q * d;
    [
        q * d / base,
        kv * d / base,
        kv * d / base,
        d * q / base,
        ff * d / base,
        ff * d / base,
        d * ff / base,
    ]
}

/// Parameter-weighted sparsity of one block: the fraction of its projection weights not read.
pub fn effective_sparsity(s: &[f64; 7], w: &[f64; 7]) -> f64 {
    s.iter().zip(w).map(|(s, w)| s * w).sum::<f64>() / w.iter().sum::<f64>()
}
