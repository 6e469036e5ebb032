//! The thresholds file: versioned, self-describing JSON that carries the model's fingerprint,
//! the calibration provenance, per-site quantile tables (both TEAL's signed-histogram reading and
//! the exact |x| quantile) and the greedy per-layer tables, so one file serves any target
//! sparsity. Written atomically.

use super::fisher::FisherLabels;
use super::{effective_sparsity, size_weights, PROJ_SITE};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::linear::InputMask;
use crate::loader::{TensorDesc, TensorSource};
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const FORMAT: &str = "teal-thresholds";
pub const VERSION: u32 = 1;

/// How a threshold is read from the calibration statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quantile {
    /// TEAL's reading: the signed quantile icdf(0.5 + s/2) of its 10,000-bin histogram.
    Teal,
    /// The exact |x| quantile: P(|x| <= t) = s.
    Abs,
    /// Weight-aware (WINA): the exact quantile of `|x_j| * ||W[:, j]||`, per projection; the
    /// mask keeps the inputs whose contribution to the output is largest in norm.
    Wina,
    /// Loss-aware: the exact quantile of `|x_j| w_j`, per projection, with the channel weights
    /// `w_j = sqrt(F_j / out)` of the fisher tables (`calibrate --fisher`); the mask drops the
    /// inputs whose expected loss per weight skipped is smallest, whatever allocation sets
    /// each projection's sparsity.
    Fisher,
}

/// How the model-wide target is spread over the seven projections of each block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Allocation {
    /// The same sparsity at every projection.
    Uniform,
    /// TEAL's block-wise greedy search on dense block inputs.
    Greedy,
    /// Loss-aware, with no search: one threshold for the whole model on `|x_j| w_j`, with
    /// `w_j = sqrt(F_j / out)` from the diagonal Fisher `F_j` of each projection input (the
    /// expected loss increase per weight skipped), placed so that the parameter-weighted
    /// sparsity over the calibration activations is the target.
    Fisher,
}

/// Which positions are sparsified (DESIGN §1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Every position, prompt included.
    All,
    /// In evaluation, the last half of each window (TEAL's quality protocol).
    Half,
    /// Prompt (prefill) dense, generated tokens sparse.
    DecodeOnly,
}

impl Quantile {
    pub fn name(self) -> &'static str {
        match self {
            Quantile::Teal => "teal",
            Quantile::Abs => "abs",
            Quantile::Wina => "wina",
            Quantile::Fisher => "fisher",
        }
    }
}
impl Allocation {
    pub fn name(self) -> &'static str {
        match self {
            Allocation::Uniform => "uniform",
            Allocation::Greedy => "greedy",
            Allocation::Fisher => "fisher",
        }
    }
}
impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::All => "all",
            Mode::Half => "half",
            Mode::DecodeOnly => "decode-only",
        }
    }
}

/// A request for sparsity: target, allocation, quantile reading, mode.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SparsitySpec {
    pub target: f64,
    pub allocation: Allocation,
    pub quantile: Quantile,
    pub mode: Mode,
}

/// Identifies the model a thresholds file belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub arch: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub vocab_size: usize,
    /// FNV-1a 64 of the sorted tensor names and shapes.
    pub tensor_hash: String,
    /// FNV-1a 64 of a sample of the weights' values ([`weights_hash`]): tells apart models of
    /// one architecture, such as a base model and its fine-tune or two quantizations of one
    /// model. Absent from files written before it and for random-weights models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights_hash: Option<String>,
}

/// FNV-1a 64 of `bytes`, continuing from `h`.
fn fnv1a(mut h: u64, bytes: impl IntoIterator<Item = u8>) -> u64 {
    for b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// A hash of a sample of the weights' values as loaded (f32): the first rows of the token
/// embedding, and in every block its `input_layernorm` and the first row of `v_proj`,
/// `o_proj`, `gate_proj`, `up_proj` and `down_proj` (not q's and k's, which a GGUF file
/// stores permuted, so that reading one row would convert the whole tensor). The same for one
/// file; different for other weights of the same shapes that differ in any sampled row (a
/// fine-tune of the whole model, another quantization; a fine-tune of q and k alone would
/// hash alike).
pub fn weights_hash(c: &Config, src: &dyn TensorSource) -> Result<String> {
    let (d, ff, q) = (c.hidden_size, c.intermediate_size, c.q_dim());
    let mut h = FNV_OFFSET;
    let mut add = |v: Vec<f32>| h = fnv1a(h, v.iter().flat_map(|x| x.to_le_bytes()));
    add(src.load_rows("model.embed_tokens.weight", [c.vocab_size, d], 0..4)?);
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        add(src.load(&format!("{p}.input_layernorm.weight"), &[d])?);
        let rows = [
            ("self_attn.v_proj", [c.kv_dim(), d]),
            ("self_attn.o_proj", [d, q]),
            ("mlp.gate_proj", [ff, d]),
            ("mlp.up_proj", [ff, d]),
            ("mlp.down_proj", [d, ff]),
        ];
        for (name, shape) in rows {
            add(src.load_rows(&format!("{p}.{name}.weight"), shape, 0..1)?);
        }
    }
    Ok(format!("{h:016x}"))
}

impl Fingerprint {
    /// Of a model's configuration and its tensor list ([`crate::ModelFiles::tensors`],
    /// [`crate::loader::TensorSource::describe`]).
    pub fn of(c: &Config, tensors: &[TensorDesc]) -> Fingerprint {
        let mut t: Vec<String> = tensors
            .iter()
            .map(|(n, s, _)| format!("{n}:{s:?}"))
            .collect();
        t.sort();
        let h = fnv1a(FNV_OFFSET, t.join("\n").bytes());
        Fingerprint::with_hash(c, format!("{h:016x}"))
    }

    /// Of a model's configuration, with `tensor_hash` naming its weights (a hash of the tensor
    /// list, or the seed of a random-weights model).
    pub fn with_hash(c: &Config, tensor_hash: String) -> Fingerprint {
        Fingerprint {
            arch: c.arch.name().into(),
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads: c.num_key_value_heads,
            vocab_size: c.vocab_size,
            tensor_hash,
            weights_hash: None,
        }
    }
}

/// Where the statistics came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    pub text: String,
    pub text_bytes: usize,
    pub samples: usize,
    pub seq_len: usize,
    pub tokens: usize,
    pub engine: String,
    /// FNV-1a 64 of the whole tokenized calibration text (its ids as little-endian u32):
    /// tells apart two texts of one name and size. Absent from files written before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_hash: Option<String>,
}

impl Provenance {
    /// The [`Provenance::tokens_hash`] of `tokens`.
    pub fn hash_tokens(tokens: &[u32]) -> String {
        format!(
            "{:016x}",
            fnv1a(FNV_OFFSET, tokens.iter().flat_map(|t| t.to_le_bytes()))
        )
    }

    /// How this record differs from one of the same calibration asked for again (`want`): the
    /// text, its size, the windows; the tokens' hash where both have one. Empty if it is the
    /// same. The engine is not compared, nor `tokens` (the windows' product).
    pub fn differences(&self, want: &Provenance) -> Vec<String> {
        // Every field named: a field added to the record fails to compile here until it is
        // compared too (or said not to be).
        let Provenance {
            text: _,
            text_bytes: _,
            samples: _,
            seq_len: _,
            tokens: _,
            engine: _,
            tokens_hash: _,
        } = self;
        let (a, b) = (self, want);
        let mut fields = vec![
            ("text", a.text.clone(), b.text.clone()),
            (
                "text_bytes",
                a.text_bytes.to_string(),
                b.text_bytes.to_string(),
            ),
            ("samples", a.samples.to_string(), b.samples.to_string()),
            ("seq_len", a.seq_len.to_string(), b.seq_len.to_string()),
        ];
        if let (Some(x), Some(y)) = (&a.tokens_hash, &b.tokens_hash) {
            fields.push(("tokens_hash", x.clone(), y.clone()));
        }
        differing(&fields, |name, have, asked| {
            format!("{name} {have} (asked {asked})")
        })
    }
}

/// The fields of `(name, one value, the other)` whose values differ, each as `describe` writes
/// it (what the model and calibration checks report).
fn differing(
    fields: &[(&str, String, String)],
    describe: impl Fn(&str, &str, &str) -> String,
) -> Vec<String> {
    fields
        .iter()
        .filter(|(_, x, y)| x != y)
        .map(|(name, x, y)| describe(name, x, y))
        .collect()
}

/// Quantile tables of one site: thresholds at each of [`Thresholds::levels`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SiteTable {
    pub teal: Vec<f32>,
    pub abs: Vec<f32>,
    /// TEAL histogram bounds (1% and 99% order statistics).
    pub hist_lo: f32,
    pub hist_hi: f32,
}

impl SiteTable {
    /// The threshold for sparsity `s` read with `q` (TEAL's or the |x| quantile), interpolated
    /// linearly between the stored `levels`; `None` for s = 0 (dense).
    pub fn threshold(&self, levels: &[f64], s: f64, q: Quantile) -> Option<f32> {
        let tab = match q {
            Quantile::Teal => &self.teal,
            Quantile::Abs | Quantile::Wina | Quantile::Fisher => &self.abs,
        };
        interpolate(levels, tab, s)
    }
}

/// A quantile table read at sparsity `s`, linearly between the stored `levels`; `None` for
/// s = 0 (dense). The level-0 entry is a placeholder below every |x| (-1): it counts as 0, so
/// that between it and the first level the threshold rises from 0 instead of from below 0,
/// where it would zero nothing. (Other entries are read as stored: TEAL's signed reading may be
/// negative at low levels.)
pub(crate) fn interpolate(levels: &[f64], tab: &[f32], s: f64) -> Option<f32> {
    if s <= 0.0 {
        return None;
    }
    let i = levels
        .partition_point(|&x| x <= s)
        .clamp(1, levels.len() - 1);
    let f = ((s - levels[i - 1]) / (levels[i] - levels[i - 1])).clamp(0.0, 1.0);
    let lo = if i == 1 { tab[0].max(0.0) } else { tab[i - 1] } as f64;
    let hi = tab[i] as f64;
    Some((lo + f * (hi - lo)) as f32)
}

/// One step of the greedy search in one block.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GreedyStep {
    /// Parameter-weighted block sparsity after this step.
    pub sparsity: f64,
    /// The block output's error against dense as TEAL measures it: per window and output
    /// channel the L2 norm over the last 25 % of positions, averaged, relative to the same of
    /// the dense output.
    pub error: f64,
    /// The seven sparsities, `PROJ_NAMES` order.
    pub s: [f64; 7],
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GreedyTables {
    pub step: f64,
    pub quantile: Quantile,
    /// Dense-input positions per sample and samples used for the search.
    pub samples: usize,
    pub seq_len: usize,
    pub size_weights: [f64; 7],
    /// Per layer, the steps from all-zero up to 0.9.
    pub layers: Vec<Vec<GreedyStep>>,
}

/// The loss-aware allocation's statistics ([`Allocation::Fisher`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FisherTables {
    /// Windows and tokens per window of the loss gradients, and whose next tokens.
    pub samples: usize,
    pub seq_len: usize,
    #[serde(default)]
    pub labels: FisherLabels,
    /// Parameters of each projection relative to q_proj (the allocation's weights).
    pub size_weights: [f64; 7],
    /// `[layer][projection][channel]`: the channel weights `sqrt(F_j / out)`.
    pub weights: Vec<[Vec<f32>; 7]>,
    /// `[layer][projection]`: exact quantiles of the score `|x_j| w_j` over the calibration
    /// activations at each level.
    pub scores: Vec<[Vec<f32>; 7]>,
}

impl FisherTables {
    /// The one score threshold whose parameter-weighted sparsity over the calibration
    /// activations is `s`, and the sparsity it gives each projection of each layer.
    fn global(&self, levels: &[f64], s: f64) -> (f32, Vec<[f64; 7]>) {
        let sizes = &self.size_weights;
        let fractions = |t: f32| -> Vec<[f64; 7]> {
            self.scores
                .iter()
                .map(|row| std::array::from_fn(|p| fraction_below(levels, &row[p], t)))
                .collect()
        };
        let total = sizes.iter().sum::<f64>() * self.scores.len() as f64;
        let sparsity = |f: &[[f64; 7]]| {
            f.iter()
                .map(|r| r.iter().zip(sizes).map(|(a, b)| a * b).sum::<f64>())
                .sum::<f64>()
                / total
        };
        let top = self
            .scores
            .iter()
            .flat_map(|r| r.iter().filter_map(|t| t.last()))
            .fold(0.0f32, |a, &b| a.max(b));
        let (mut lo, mut hi) = (0.0f32, top);
        for _ in 0..60 {
            let mid = 0.5 * (lo + hi);
            if sparsity(&fractions(mid)) < s {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        (hi, fractions(hi))
    }
}

/// The loss-aware mask of one projection for sparsity `s` over its calibration activations
/// (`None`: dense): `t` the quantile of its scores `|x_j| w_j` (table `scores`, read at the
/// `levels`), applied per channel as [`channel_mask`].
pub(crate) fn loss_aware_mask(
    levels: &[f64],
    scores: &[f32],
    weights: &[f32],
    s: f64,
) -> Option<InputMask> {
    interpolate(levels, scores, s).map(|t| channel_mask(weights, t))
}

/// Per-channel input thresholds `t / w_j` for a score threshold `t` on `|x_j| w_j` (a channel
/// of weight 0, on which the loss does not depend, is always zeroed).
fn channel_mask(weights: &[f32], t: f32) -> InputMask {
    let per_channel = weights
        .iter()
        .map(|&w| if w > 0.0 { t / w } else { f32::INFINITY })
        .collect();
    InputMask::Channels(std::sync::Arc::new(per_channel))
}

/// The fraction of values at or below `t` in a quantile table (`tab[i]`: the value at level
/// `levels[i]`), linear between levels; the last level's fraction above its value.
fn fraction_below(levels: &[f64], tab: &[f32], t: f32) -> f64 {
    let i = tab.partition_point(|&v| v <= t);
    if i == 0 {
        return 0.0;
    }
    if i == tab.len() {
        return *levels.last().expect("validated levels");
    }
    let (a, b) = ((tab[i - 1] as f64).max(0.0), tab[i] as f64);
    levels[i - 1] + (levels[i] - levels[i - 1]) * ((t as f64 - a) / (b - a)).clamp(0.0, 1.0)
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    pub format: String,
    pub version: u32,
    pub model: Fingerprint,
    pub calibration: Provenance,
    /// Sparsity levels of the site tables, ascending, starting at 0.
    pub levels: Vec<f64>,
    /// `[layer][site]`, sites: qkv, o, gate/up, down.
    pub sites: Vec<[SiteTable; 4]>,
    /// `[layer][projection]`: exact quantiles of the weight-aware score `|x_j| * ||W[:, j]||`
    /// at each level (absent in files calibrated without them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wina: Option<Vec<[Vec<f32>; 7]>>,
    pub greedy: Option<GreedyTables>,
    /// The loss-aware allocation's tables (absent in files calibrated without `--fisher`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fisher: Option<FisherTables>,
}

/// The sparsity levels at which site tables are stored: 0 to 0.995 by 0.005.
pub fn default_levels() -> Vec<f64> {
    (0..200).map(|i| i as f64 * 0.005).collect()
}

impl Thresholds {
    /// Reads and checks a thresholds file.
    pub fn load(path: &Path) -> Result<Thresholds> {
        let text = crate::error::read_text(path)?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.into(),
            source,
        })?;
        let bad = |m: String| Error::Invalid(format!("{}: {m}", path.display()));
        if v.get("format").and_then(|f| f.as_str()) != Some(FORMAT) {
            return Err(bad(format!(
                "not a teal thresholds file (\"format\" is not \"{FORMAT}\")"
            )));
        }
        match v.get("version") {
            Some(x) if x.as_u64() == Some(VERSION as u64) => {}
            Some(other) => {
                return Err(bad(format!(
                    "unsupported thresholds file version {other} (this teal reads {VERSION})"
                )))
            }
            None => return Err(bad("no \"version\" field".into())),
        }
        let t: Thresholds = serde_json::from_value(v).map_err(|source| Error::Json {
            path: path.into(),
            source,
        })?;
        t.validate().map_err(bad)?;
        Ok(t)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if self.model.num_hidden_layers == 0 {
            return Err("a model of 0 layers".into());
        }
        let n = self.levels.len();
        if n < 2
            || self.levels[0] != 0.0
            || self.levels.windows(2).any(|w| w[1] <= w[0])
            || *self.levels.last().unwrap() >= 1.0
        {
            return Err("levels must ascend from 0 to below 1".into());
        }
        if self.sites.len() != self.model.num_hidden_layers {
            return Err(format!(
                "{} layers of site tables for a {}-layer model",
                self.sites.len(),
                self.model.num_hidden_layers
            ));
        }
        for (l, row) in self.sites.iter().enumerate() {
            for (s, t) in row.iter().enumerate() {
                if t.teal.len() != n || t.abs.len() != n {
                    return Err(format!(
                        "layer {l} site {s}: table length differs from levels"
                    ));
                }
                if t.teal.iter().chain(&t.abs).any(|v| !v.is_finite()) {
                    return Err(format!("layer {l} site {s}: non-finite threshold"));
                }
                // Level 0's entry is -1 (nothing zeroed); the rest rise with the level, and
                // |x| quantiles are not negative (TEAL's signed reading may be, at low levels).
                let falls = |v: &[f32]| v[1..].windows(2).any(|w| w[1] < w[0]);
                if falls(&t.teal) || falls(&t.abs) || t.abs[1..].iter().any(|&v| v < 0.0) {
                    return Err(format!(
                        "layer {l} site {s}: thresholds that fall as the level rises, or a \
                         negative |x| quantile"
                    ));
                }
            }
        }
        if let Some(w) = &self.wina {
            if w.len() != self.model.num_hidden_layers {
                return Err("wina tables: one row per layer expected".into());
            }
            for (l, row) in w.iter().enumerate() {
                for (p, t) in row.iter().enumerate() {
                    if t.len() != n || t.iter().any(|v| !v.is_finite()) {
                        return Err(format!(
                            "layer {l} projection {p}: bad wina table (length or non-finite)"
                        ));
                    }
                }
            }
        }
        if let Some(f) = &self.fisher {
            if f.weights.len() != self.model.num_hidden_layers
                || f.scores.len() != self.model.num_hidden_layers
            {
                return Err("fisher tables: one row per layer expected".into());
            }
            self.check_size_weights("fisher", &f.size_weights)?;
            // Each projection's channels: q, k, v, gate and up read the hidden state, down the
            // MLP's; o reads the attention output (the same width in every layer).
            let (d, ff) = (self.model.hidden_size, self.model.intermediate_size);
            let o_width = f.weights[0][3].len();
            for (l, w) in f.weights.iter().enumerate() {
                let widths = [d, d, d, o_width, d, d, ff];
                if let Some(p) = (0..7).find(|&p| w[p].len() != widths[p]) {
                    return Err(format!(
                        "fisher tables: layer {l} projection {p} has {} channel weights, its \
                         input has {}",
                        w[p].len(),
                        widths[p]
                    ));
                }
                if let Some(p) = (0..7).find(|&p| w[p].iter().all(|&v| v == 0.0)) {
                    return Err(format!(
                        "fisher tables: layer {l} projection {p}: every channel weight is 0"
                    ));
                }
            }
            for (l, (w, t)) in f.weights.iter().zip(&f.scores).enumerate() {
                for p in 0..7 {
                    // Level 0's entry is -1 (nothing zeroed), as in the site tables.
                    if t[p].len() != n
                        || t[p].windows(2).any(|v| v[1] < v[0])
                        || w[p]
                            .iter()
                            .chain(&t[p][1..])
                            .any(|v| !v.is_finite() || *v < 0.0)
                    {
                        return Err(format!(
                            "layer {l} projection {p}: bad fisher table (length, order or a \
                             negative or non-finite value)"
                        ));
                    }
                }
            }
        }
        if let Some(g) = &self.greedy {
            if g.layers.len() != self.model.num_hidden_layers
                || g.layers.iter().any(|l| l.is_empty())
            {
                return Err("greedy tables: one non-empty table per layer expected".into());
            }
            if !(g.step > 0.0 && g.step <= 1.0) {
                return Err(format!("greedy tables: step {} outside (0, 1]", g.step));
            }
            self.check_size_weights("greedy", &g.size_weights)?;
            let fraction = |x: f64| (0.0..1.0).contains(&x);
            for (l, steps) in g.layers.iter().enumerate() {
                if let Some(i) = steps
                    .iter()
                    .position(|st| !fraction(st.sparsity) || !st.s.iter().all(|&x| fraction(x)))
                {
                    return Err(format!(
                        "greedy tables: layer {l} step {i}: a sparsity outside [0, 1)"
                    ));
                }
            }
        }
        Ok(())
    }

    /// A table's size weights: finite and positive, q's 1, k's and v's alike (their share
    /// of q's heads), o's 1 and gate's, up's and down's alike, as `sparsity::size_weights`
    /// derives them from the configuration.
    fn check_size_weights(&self, what: &str, w: &[f64; 7]) -> std::result::Result<(), String> {
        let m = &self.model;
        let kv = m.num_key_value_heads as f64 / m.num_attention_heads.max(1) as f64;
        let near = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs().max(1.0);
        let ok = w.iter().all(|&x| x.is_finite() && x > 0.0)
            && near(w[0], 1.0)
            && near(w[1], kv)
            && near(w[2], kv)
            && near(w[3], 1.0)
            && near(w[4], w[6])
            && near(w[5], w[6]);
        if ok {
            Ok(())
        } else {
            Err(format!(
                "{what} tables: size weights {w:?} do not fit the model (q and o 1, k and v \
                 {kv}, gate, up and down alike, all positive)"
            ))
        }
    }

    /// Writes the file atomically: a temporary file of its own in the same directory, synced
    /// to disk, then renamed over `path` (removed again if anything fails), so a reader sees
    /// the old file or the whole new one, and two writers never share the temporary file.
    pub fn save(&self, path: &Path) -> Result<()> {
        use std::io::Write;
        let text = serde_json::to_string(self).map_err(|source| Error::Json {
            path: path.into(),
            source,
        })?;
        let io = |source| Error::Io {
            path: path.into(),
            source,
        };
        let mut tmp = temp_file_beside(path).map_err(io)?;
        tmp.write_all(text.as_bytes()).map_err(io)?;
        tmp.as_file().sync_all().map_err(io)?;
        tmp.persist(path).map_err(|e| io(e.error))?;
        // The rename itself reaches the disk with the directory's entry.
        #[cfg(unix)]
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
        }
        Ok(())
    }

    /// Fails unless a thresholds file can be written at `path` (not a directory, in a
    /// directory that exists and can be written): checked before a calibration spends minutes.
    pub fn check_writable(path: &Path) -> Result<()> {
        let io = |source| Error::Io {
            path: path.into(),
            source,
        };
        if path.is_dir() {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::IsADirectory,
                "is a directory",
            )));
        }
        temp_file_beside(path).map(drop).map_err(io)
    }

    /// Fails with a clear error, naming each field that differs, when the file was made for a
    /// model of another architecture or shapes. (Other weights of the same shapes are
    /// [`Thresholds::other_weights`].)
    pub fn check_model(&self, fp: &Fingerprint) -> Result<()> {
        let (a, b) = (&self.model, fp);
        // Every field compared below; a field added to the fingerprint fails to compile here
        // until it is compared too (or, as the weights hash, left to `other_weights`).
        let Fingerprint {
            arch: _,
            hidden_size: _,
            intermediate_size: _,
            num_hidden_layers: _,
            num_attention_heads: _,
            num_key_value_heads: _,
            vocab_size: _,
            tensor_hash: _,
            weights_hash: _,
        } = a;
        let fields = [
            ("arch", a.arch.clone(), b.arch.clone()),
            (
                "hidden_size",
                a.hidden_size.to_string(),
                b.hidden_size.to_string(),
            ),
            (
                "intermediate_size",
                a.intermediate_size.to_string(),
                b.intermediate_size.to_string(),
            ),
            (
                "num_hidden_layers",
                a.num_hidden_layers.to_string(),
                b.num_hidden_layers.to_string(),
            ),
            (
                "num_attention_heads",
                a.num_attention_heads.to_string(),
                b.num_attention_heads.to_string(),
            ),
            (
                "num_key_value_heads",
                a.num_key_value_heads.to_string(),
                b.num_key_value_heads.to_string(),
            ),
            (
                "vocab_size",
                a.vocab_size.to_string(),
                b.vocab_size.to_string(),
            ),
            (
                "tensor_hash (tensor names and shapes)",
                a.tensor_hash.clone(),
                b.tensor_hash.clone(),
            ),
        ];
        let differ = differing(&fields, |name, x, y| {
            format!("{name} {x} in the file, {y} in the model")
        });
        if !differ.is_empty() {
            return Err(Error::Invalid(format!(
                "thresholds file was calibrated for another model: {}",
                differ.join("; ")
            )));
        }
        Ok(())
    }

    /// Whether the file was calibrated on other weights of the same shapes (both fingerprints
    /// sample the weights, and the samples differ): another fine-tune or quantization of the
    /// model, whose activations, and so thresholds, are close but not the same.
    pub fn other_weights(&self, fp: &Fingerprint) -> bool {
        matches!((&self.model.weights_hash, &fp.weights_hash), (Some(a), Some(b)) if a != b)
    }

    /// The threshold of `site` in `layer` for sparsity `s`, interpolated linearly between the
    /// stored levels. `None` for s = 0 (dense).
    pub fn site_threshold(&self, layer: usize, site: usize, s: f64, q: Quantile) -> Option<f32> {
        self.sites[layer][site].threshold(&self.levels, s, q)
    }

    /// Fails unless the file holds the tables that reading `q` needs.
    pub fn check_quantile(&self, q: Quantile) -> Result<()> {
        if q == Quantile::Wina && self.wina.is_none() {
            return Err(Error::Invalid(
                "this thresholds file has no weight-aware (wina) tables: calibrate without --no-wina"
                    .into(),
            ));
        }
        if q == Quantile::Fisher {
            self.fisher_tables()?;
        }
        Ok(())
    }

    /// The mask of projection `proj` (`PROJ_NAMES` order) in `layer` for sparsity `s`
    /// (`None`: dense). Call [`Thresholds::check_quantile`] first.
    pub fn mask(&self, layer: usize, proj: usize, s: f64, q: Quantile) -> Option<InputMask> {
        match (q, &self.wina, &self.fisher) {
            (Quantile::Wina, Some(w), _) => {
                interpolate(&self.levels, &w[layer][proj], s).map(InputMask::WeightAware)
            }
            (Quantile::Fisher, _, Some(f)) => loss_aware_mask(
                &self.levels,
                &f.scores[layer][proj],
                &f.weights[layer][proj],
                s,
            ),
            _ => self
                .site_threshold(layer, PROJ_SITE[proj], s, q)
                .map(InputMask::Threshold),
        }
    }

    /// The seven per-projection sparsities of each layer for a spec.
    pub fn allocate(&self, spec: &SparsitySpec) -> Result<Vec<[f64; 7]>> {
        check_target(spec.target)?;
        let n = self.model.num_hidden_layers;
        match spec.allocation {
            Allocation::Uniform => Ok(vec![[spec.target; 7]; n]),
            Allocation::Greedy => {
                let g = self.greedy.as_ref().ok_or_else(|| {
                    Error::Invalid(
                        "this thresholds file has no greedy tables: calibrate with --greedy".into(),
                    )
                })?;
                g.layers
                    .iter()
                    .enumerate()
                    .map(|(l, steps)| {
                        let best = steps
                            .iter()
                            .min_by(|a, b| {
                                (a.sparsity - spec.target)
                                    .abs()
                                    .total_cmp(&(b.sparsity - spec.target).abs())
                            })
                            .expect("validated non-empty");
                        // Each step of the search raises the block's sparsity by at most
                        // step / (sum of the size weights): a target beyond the last row by
                        // more than that is one the search never reached.
                        let gap = g.step / g.size_weights.iter().sum::<f64>();
                        if spec.target > best.sparsity + gap + 1e-9 {
                            return Err(Error::Invalid(format!(
                                "the greedy table of layer {l} reaches block sparsity {:.3} at \
                                 most, short of the target {}: use a lower target or another \
                                 allocation",
                                best.sparsity, spec.target
                            )));
                        }
                        Ok(best.s)
                    })
                    .collect()
            }
            Allocation::Fisher => Ok(self.fisher_tables()?.global(&self.levels, spec.target).1),
        }
    }

    fn fisher_tables(&self) -> Result<&FisherTables> {
        self.fisher.as_ref().ok_or_else(|| {
            Error::Invalid(
                "this thresholds file has no fisher tables: calibrate with --fisher".into(),
            )
        })
    }

    /// The mask of every projection of every layer (`None`: dense).
    pub fn resolve(&self, spec: &SparsitySpec) -> Result<Vec<[Option<InputMask>; 7]>> {
        check_target(spec.target)?;
        let top = self.levels.last().copied().unwrap_or(0.0);
        if spec.target > top {
            return Err(Error::Invalid(format!(
                "sparsity {} is beyond this thresholds file's highest calibrated level {top}",
                spec.target
            )));
        }
        if spec.allocation == Allocation::Fisher {
            if matches!(spec.quantile, Quantile::Teal | Quantile::Wina) {
                return Err(Error::Invalid(format!(
                    "the fisher allocation picks each projection's inputs by its own loss-aware \
                     scores: the {} quantile does not apply to it (use it with the uniform or \
                     greedy allocation)",
                    spec.quantile.name()
                )));
            }
            let f = self.fisher_tables()?;
            if spec.target == 0.0 {
                return Ok(vec![Default::default(); f.weights.len()]);
            }
            let (t, _) = f.global(&self.levels, spec.target);
            return Ok(f
                .weights
                .iter()
                .map(|row| std::array::from_fn(|p| Some(channel_mask(&row[p], t))))
                .collect());
        }
        self.check_quantile(spec.quantile)?;
        let alloc = self.allocate(spec)?;
        Ok(alloc
            .iter()
            .enumerate()
            .map(|(l, s)| std::array::from_fn(|p| self.mask(l, p, s[p], spec.quantile)))
            .collect())
    }

    /// Planned parameter-weighted sparsity of a spec (mean over blocks).
    pub fn planned_sparsity(&self, spec: &SparsitySpec, c: &Config) -> Result<f64> {
        let w = size_weights(c);
        let a = self.allocate(spec)?;
        Ok(a.iter().map(|s| effective_sparsity(s, &w)).sum::<f64>() / a.len() as f64)
    }
}

/// An empty temporary file in `path`'s directory, readable by all as most tools write files
/// (mode 0644 before the umask; tempfile's own are the owner's only), removed when dropped
/// unless persisted.
fn temp_file_beside(path: &Path) -> std::io::Result<tempfile::NamedTempFile> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut b = tempfile::Builder::new();
    b.prefix(".teal-thresholds-").suffix(".tmp");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        b.permissions(std::fs::Permissions::from_mode(0o644));
    }
    b.tempfile_in(dir)
}

/// Sparsity must lie in [0, 1).
pub fn check_target(s: f64) -> Result<()> {
    if !(0.0..1.0).contains(&s) {
        return Err(Error::Invalid(format!("sparsity {s} is outside [0, 1)")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{interpolate, Provenance};

    #[test]
    fn provenance_differences_name_the_fields() {
        let p = Provenance {
            text: "c4.utf8".into(),
            text_bytes: 100,
            samples: 10,
            seq_len: 2048,
            tokens: 20480,
            engine: "teal".into(),
            tokens_hash: Some(Provenance::hash_tokens(&[1, 2, 3])),
        };
        let same = Provenance {
            engine: "teal on a GPU".into(),
            ..p.clone()
        };
        assert!(p.differences(&same).is_empty());
        let other = Provenance {
            samples: 5,
            tokens_hash: Some(Provenance::hash_tokens(&[1, 2, 4])),
            ..p.clone()
        };
        let d = p.differences(&other);
        assert_eq!(d.len(), 2, "{d:?}");
        assert_eq!(d[0], "samples 10 (asked 5)");
        assert!(d[1].starts_with("tokens_hash "), "{d:?}");
        let old_file = Provenance {
            tokens_hash: None,
            ..p.clone()
        };
        assert!(old_file.differences(&other).len() == 1);
        assert_ne!(
            Provenance::hash_tokens(&[1, 2]),
            Provenance::hash_tokens(&[2, 1])
        );
    }

    #[test]
    fn interpolation_below_the_first_level_rises_from_zero() {
        let (levels, tab) = ([0.0, 0.005, 0.01], [-1.0f32, 0.2, 0.4]);
        assert_eq!(interpolate(&levels, &tab, 0.0), None);
        assert!((interpolate(&levels, &tab, 0.0025).unwrap() - 0.1).abs() < 1e-6);
        assert!((interpolate(&levels, &tab, 0.0075).unwrap() - 0.3).abs() < 1e-6);
        assert_eq!(interpolate(&levels, &tab, 0.01), Some(0.4));
        assert_eq!(interpolate(&levels, &tab, 0.5), Some(0.4));
        // Only the placeholder counts as 0: a stored negative entry (TEAL's signed reading at
        // a low level) is read as it is.
        let tab = [-1.0f32, -0.2, 0.4];
        assert!((interpolate(&levels, &tab, 0.0075).unwrap() - 0.1).abs() < 1e-6);
        assert!((interpolate(&levels, &tab, 0.0025).unwrap() + 0.1).abs() < 1e-6);
    }
}
