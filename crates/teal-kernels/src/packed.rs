//! Input-major weight formats for decode (`wt[in, out]`: the weights of one input channel are
//! contiguous, so a zeroed input skips a whole row, its scales included).
//!
//! - `f32`, `f16`, `bf16`: one value per weight.
//! - `q8`: groups of [`GROUP`] consecutive outputs within one input row share an f16 scale `d`;
//!   `w = d * q`, `q` in `[-127, 127]` (symmetric), 34 bytes a group (8.5 bits per weight,
//!   GGML's Q8_0, but along the output dimension). A row is cut into super-blocks of
//!   [`Q4_SUPER`] groups as q4's are: `[d of its k groups, 32 bytes per group]`
//!   ([`q8_offsets`]).
//! - `q4`: groups of [`GROUP`] consecutive outputs within one input row share an f16 scale `d`
//!   and an f16 minimum `m`; `w = d * q + m`, `q` in `[0, 15]`, 20 bytes a group (5 bits per
//!   weight like Q4_1). A row is cut into super-blocks of [`Q4_SUPER`] groups (the last one may
//!   have fewer, `k`): `[d of its k groups, m of its k groups, 16 bytes per group]`, so that a
//!   kernel converts eight scales with one instruction ([`q4_offsets`]). In a group's 16 bytes,
//!   byte `b` holds output `b` in its low nibble and output `b + 16` in its high one.
//!
//! Rows of the quantized formats are whole blocks (a partial last group is padded with zeros),
//! so one kept input row is one contiguous run of blocks, scales inline.
//!
//! Matrices that are never sparsified (the LM head, the token embeddings) use [`PackedRows`]
//! instead: output-major, quantized along the input like GGML's Q8_0 / Q4_1.

use half::{bf16, f16};
use rayon::prelude::*;

/// Consecutive outputs of one input row that share a scale in `q8` and `q4`.
pub const GROUP: usize = 32;
/// Bytes of one q8 group: f16 scale, 32 values.
pub const Q8_BLOCK: usize = 2 + GROUP;
/// Bytes of one q4 group: f16 scale, f16 minimum, 32 nibbles.
pub const Q4_BLOCK: usize = 4 + GROUP / 2;
/// Groups of a q8 or q4 row whose scales (and minimums) are stored together.
pub const Q4_SUPER: usize = 8;

/// Byte offsets, within a q8 row of `ng` groups, of group `g`'s scale and 32 values. A row is
/// `ng * Q8_BLOCK` bytes whatever `ng`; super-block `s` starts at byte `s * Q4_SUPER *
/// Q8_BLOCK`.
pub fn q8_offsets(ng: usize, g: usize) -> (usize, usize) {
    let (s, i) = (g / Q4_SUPER, g % Q4_SUPER);
    let k = Q4_SUPER.min(ng - s * Q4_SUPER);
    let base = s * Q4_SUPER * Q8_BLOCK;
    (base + 2 * i, base + 2 * k + GROUP * i)
}

/// Byte offsets, within a q4 row of `ng` groups, of group `g`'s scale, minimum and 16 bytes of
/// nibbles. A row is `ng * Q4_BLOCK` bytes whatever `ng`; super-block `s` starts at byte
/// `s * Q4_SUPER * Q4_BLOCK`.
pub fn q4_offsets(ng: usize, g: usize) -> (usize, usize, usize) {
    let (s, i) = (g / Q4_SUPER, g % Q4_SUPER);
    let k = Q4_SUPER.min(ng - s * Q4_SUPER);
    let base = s * Q4_SUPER * Q4_BLOCK;
    (base + 2 * i, base + 2 * k + 2 * i, base + 4 * k + 16 * i)
}

/// Value `i` (0..32) of a q4 group from its 16 bytes: byte `i` holds value `i` in its low
/// nibble and value `i + 16` in its high one.
fn q4_value(nibbles: &[u8], i: usize) -> u8 {
    let byte = nibbles[i % 16];
    if i < 16 {
        byte & 15
    } else {
        byte >> 4
    }
}

/// A weight format chosen at load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    F32,
    F16,
    Bf16,
    Q8,
    Q4,
}

impl Dtype {
    pub const ALL: [Dtype; 5] = [Dtype::F32, Dtype::F16, Dtype::Bf16, Dtype::Q8, Dtype::Q4];

    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
            Dtype::Q8 => "q8",
            Dtype::Q4 => "q4",
        }
    }

    pub fn parse(s: &str) -> Option<Dtype> {
        Dtype::ALL.into_iter().find(|d| d.name() == s)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("weight {index} = {value} is not finite")]
    NotFinite { index: usize, value: f32 },
    #[error("weight {index} = {value} does not fit in {dtype} (largest finite f16 is 65504)")]
    OutOfRange {
        index: usize,
        value: f32,
        dtype: &'static str,
    },
    #[error("weights of {got} values for a {n_in} x {n_out} matrix")]
    Size {
        got: usize,
        n_in: usize,
        n_out: usize,
    },
}

/// Weights of one matrix in a packed format, input-major.
#[derive(Debug)]
pub enum Data {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
    /// Row `j` at byte `j * groups * Q8_BLOCK`, laid out as [`q8_offsets`] says.
    Q8(Vec<u8>),
    /// Row `j` at byte `j * groups * Q4_BLOCK`, laid out as [`q4_offsets`] says.
    Q4(Vec<u8>),
}

impl Data {
    pub fn dtype(&self) -> Dtype {
        match self {
            Data::F32(_) => Dtype::F32,
            Data::F16(_) => Dtype::F16,
            Data::Bf16(_) => Dtype::Bf16,
            Data::Q8(_) => Dtype::Q8,
            Data::Q4(_) => Dtype::Q4,
        }
    }

    /// A borrowed view of the values.
    pub fn view(&self) -> View<'_> {
        match self {
            Data::F32(w) => View::F32(w),
            Data::F16(w) => View::F16(w),
            Data::Bf16(w) => View::Bf16(w),
            Data::Q8(b) => View::Q8(b),
            Data::Q4(b) => View::Q4(b),
        }
    }

    /// Bytes stored (values, scales and minimums).
    pub fn bytes(&self) -> usize {
        match self {
            Data::F32(w) => w.len() * 4,
            Data::F16(w) => w.len() * 2,
            Data::Bf16(w) => w.len() * 2,
            Data::Q8(b) | Data::Q4(b) => b.len(),
        }
    }
}

/// A packed input-major matrix.
#[derive(Debug)]
pub struct PackedT {
    pub n_in: usize,
    pub n_out: usize,
    pub data: Data,
}

/// A borrowed view of packed weights: what the kernels take, so plain `&[f32]` matrices and
/// [`PackedT`] share one code path.
#[derive(Clone, Copy, Debug)]
pub enum View<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Bf16(&'a [bf16]),
    Q8(&'a [u8]),
    Q4(&'a [u8]),
}

impl View<'_> {
    /// Bytes of one input row of `n_out` outputs (its scales included).
    pub fn bytes_per_row(&self, n_out: usize) -> usize {
        match self {
            View::F32(_) => n_out * 4,
            View::F16(_) | View::Bf16(_) => n_out * 2,
            View::Q8(_) => groups(n_out) * Q8_BLOCK,
            View::Q4(_) => groups(n_out) * Q4_BLOCK,
        }
    }
}

impl View<'_> {
    /// What the view holds: values for f32, f16 and bf16, bytes for q8 and q4.
    fn stored(&self) -> usize {
        match self {
            View::F32(w) => w.len(),
            View::F16(w) => w.len(),
            View::Bf16(w) => w.len(),
            View::Q8(b) | View::Q4(b) => b.len(),
        }
    }

    /// Panics unless the view holds exactly `rows` rows of `n` weights each in its format
    /// (values for the float formats, whole blocks for q8 and q4). The kernels' SIMD paths
    /// index a view by its matrix's sizes without bounds checks, and [`Mat`]'s and
    /// [`RowsMat`]'s fields are public, so every kernel that takes one checks it first.
    fn assert_holds(&self, rows: usize, n: usize, what: &str) {
        let (per_row, unit, format) = match self {
            View::F32(_) => (Some(n), "values", "f32"),
            View::F16(_) => (Some(n), "values", "f16"),
            View::Bf16(_) => (Some(n), "values", "bf16"),
            View::Q8(_) => (groups(n).checked_mul(Q8_BLOCK), "bytes", "q8"),
            View::Q4(_) => (groups(n).checked_mul(Q4_BLOCK), "bytes", "q4"),
        };
        let need = per_row.and_then(|p| p.checked_mul(rows));
        assert!(
            need == Some(self.stored()),
            "{what}: {rows} rows of {n} {format} weights need {} {unit}, the view holds {}",
            need.map_or("more than usize::MAX".to_string(), |b| b.to_string()),
            self.stored()
        );
    }
}

/// Weights plus dimensions, as the kernels see them.
#[derive(Clone, Copy, Debug)]
pub struct Mat<'a> {
    pub n_in: usize,
    pub n_out: usize,
    pub view: View<'a>,
}

/// Groups (blocks) per row of `n_out` outputs.
pub(crate) fn groups(n_out: usize) -> usize {
    n_out.div_ceil(GROUP)
}

/// The first index of `v` whose value meets `bad`, searched on all threads (these checks scan
/// every weight of a model once at load).
pub fn first_where(v: &[f32], bad: impl Fn(f32) -> bool + Sync) -> Option<usize> {
    const CHUNK: usize = 1 << 16;
    v.par_chunks(CHUNK)
        .position_first(|c| c.iter().any(|&x| bad(x)))
        .and_then(|c| {
            let start = c * CHUNK;
            v[start..].iter().position(|&x| bad(x)).map(|i| start + i)
        })
}

/// What every packing checks before it converts: `n_in * n_out` values, all finite, and within
/// f16's range for the formats that store f16 values or scales (f16, q8, q4).
fn check_packable(w: &[f32], n_in: usize, n_out: usize, dtype: Dtype) -> Result<(), PackError> {
    if w.len() != n_in * n_out {
        return Err(PackError::Size {
            got: w.len(),
            n_in,
            n_out,
        });
    }
    if let Some(index) = first_where(w, |v| !v.is_finite()) {
        return Err(PackError::NotFinite {
            index,
            value: w[index],
        });
    }
    if dtype != Dtype::F32 && dtype != Dtype::Bf16 {
        if let Some(index) = first_where(w, |v| v.abs() > 65504.0) {
            return Err(PackError::OutOfRange {
                index,
                value: w[index],
                dtype: dtype.name(),
            });
        }
    }
    Ok(())
}

/// `1 / d`, or 0 for a group whose values are all equal (`d = 0`: every level is 0).
fn q4_inverse(d: f32) -> f32 {
    if d > 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

/// The q4 level of `v` on the grid `d q + m` (`inv = 1 / d`): the nearest of 0..=15, halves to
/// even. (Rounded by adding and subtracting 2^23, which vectorizes: `f32::round` is a call to
/// libm on x86-64 without SSE4.1; and limited by `max`/`min`, which vectorize where
/// `f32::clamp` compiled to a branch per lane.)
#[inline(always)]
#[allow(clippy::manual_clamp)]
fn q4_level(v: f32, m: f32, inv: f32) -> f32 {
    const ROUND: f32 = 8_388_608.0;
    (((v - m) * inv).max(0.0).min(15.0) + ROUND) - ROUND
}

/// `N` sums over a group of the terms `f(x)`, in four lanes each (so that the loop vectorizes,
/// one SSE register per sum).
#[inline(always)]
fn lane_sums<const N: usize>(v: &[f32], f: impl Fn(f32) -> [f32; N]) -> [f32; N] {
    const LANES: usize = 4;
    let mut acc = [[0.0f32; LANES]; N];
    let mut add = |l: usize, x: f32| {
        for (a, t) in acc.iter_mut().zip(f(x)) {
            a[l] += t;
        }
    };
    let chunks = v.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (l, &x) in c.iter().enumerate() {
            add(l, x);
        }
    }
    for (l, &x) in rest.iter().enumerate() {
        add(l, x);
    }
    acc.map(|a| a.iter().sum())
}

/// Sum of squared errors of a group stored as `(d, m)` with each value at its nearest level.
#[inline(always)]
fn q4_sq_err(v: &[f32], d: f32, m: f32) -> f32 {
    let inv = q4_inverse(d);
    lane_sums(v, |x| {
        let e = d * q4_level(x, m, inv) + m - x;
        [e * e]
    })[0]
}

/// The least-squares `(d, m)` of `v ~ d q + m` for the levels `q` of `v` on the grid through
/// `m0` with step `1 / inv`; `None` where that fit has no positive step.
#[inline(always)]
fn q4_fit(v: &[f32], m0: f32, inv: f32) -> Option<(f32, f32)> {
    let [sq, sqq, sx, sqx] = lane_sums(v, |x| {
        let q = q4_level(x, m0, inv);
        [q, q * q, x, q * x]
    });
    let n = v.len() as f32;
    let det = n * sqq - sq * sq;
    let d = if det > 0.0 {
        (n * sqx - sq * sx) / det
    } else {
        0.0
    };
    (d > 0.0 && d.is_finite()).then(|| (d, (sx - d * sq) / n))
}

/// Scale and minimum (`w = d q + m`, `q` in 0..=15, both stored as f16) of one q4 group, chosen
/// for a small squared error rather than spanning the group's range as GGML's `Q4_1` does. The
/// candidates: that min/max grid, and grids of 15, 16 and 17 steps across the range (the
/// last two let the extreme values be clipped), each refitted by least squares, its levels
/// re-rounded and refitted once more; the one with the least squared error after rounding to
/// f16 is kept, so a group is never stored worse than on the min/max grid, and values already
/// on a 16-level grid are stored exactly. On SmolLM2-135M (whose weights are a Q4_1 file,
/// grouped along the inputs, so that the grouping along the outputs quantizes them afresh)
/// perplexity over 8 WikiText-2 windows went 38.24 -> 35.43 (f32 30.07); more candidates or
/// refits gained at most 0.4 more (docs/PERFORMANCE.md, section 2).
fn q4_scale_min(v: &[f32]) -> (f16, f16) {
    // A whole group's length known at compile time: its loops unroll (4 % faster than the
    // body for any length; the vectorizing came from `q4_level`'s max/min and the lane sums).
    match <&[f32; GROUP]>::try_from(v) {
        Ok(group) => q4_search(group),
        Err(_) => q4_search(v),
    }
}

/// GGML's `Q4_1` grid of a group: `d` its range over 15 and `m` its smallest value (both f16),
/// with the group's smallest and largest values.
#[inline(always)]
fn q4_min_max(v: &[f32]) -> (f16, f16, f32, f32) {
    let lo = v.iter().fold(f32::INFINITY, |a, &x| a.min(x));
    let hi = v.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
    let m = f16::from_f32(lo);
    (f16::from_f32((hi - m.to_f32()).max(0.0) / 15.0), m, lo, hi)
}

/// [`q4_scale_min`]'s search.
#[inline(always)]
fn q4_search(v: &[f32]) -> (f16, f16) {
    let (d, m, lo, hi) = q4_min_max(v);
    let mut best = (q4_sq_err(v, d.to_f32(), m.to_f32()), d, m);
    if hi <= lo {
        return (best.1, best.2);
    }
    for steps in [15.0f32, 16.0, 17.0] {
        let Some((d, m)) =
            q4_fit(v, lo, steps / (hi - lo)).and_then(|(d, m)| q4_fit(v, m, 1.0 / d))
        else {
            continue;
        };
        let (d, m) = (f16::from_f32(d), f16::from_f32(m));
        let e = q4_sq_err(v, d.to_f32(), m.to_f32());
        if e < best.0 {
            best = (e, d, m);
        }
    }
    (best.1, best.2)
}

impl PackedT {
    /// Packs an input-major f32 matrix `wt[n_in, n_out]`.
    pub fn from_input_major(
        dtype: Dtype,
        wt: &[f32],
        n_in: usize,
        n_out: usize,
    ) -> Result<PackedT, PackError> {
        check_packable(wt, n_in, n_out, dtype)?;
        let ng = groups(n_out);
        let data = match dtype {
            Dtype::F32 => Data::F32(wt.to_vec()),
            Dtype::F16 => Data::F16(wt.par_iter().map(|&v| f16::from_f32(v)).collect()),
            Dtype::Bf16 => Data::Bf16(wt.par_iter().map(|&v| bf16::from_f32(v)).collect()),
            Dtype::Q8 => {
                let mut blocks = vec![0u8; n_in * ng * Q8_BLOCK];
                for (row, out) in wt
                    .chunks(n_out.max(1))
                    .zip(blocks.chunks_mut(ng * Q8_BLOCK))
                {
                    for (g, chunk) in row.chunks(GROUP).enumerate() {
                        let (od, oq) = q8_offsets(ng, g);
                        let amax = chunk.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                        let d = f16::from_f32(amax / 127.0);
                        out[od..od + 2].copy_from_slice(&d.to_le_bytes());
                        let inv = if d.to_f32() > 0.0 {
                            1.0 / d.to_f32()
                        } else {
                            0.0
                        };
                        for (qv, &v) in out[oq..oq + GROUP].iter_mut().zip(chunk) {
                            *qv = ((v * inv).round().clamp(-127.0, 127.0) as i8) as u8;
                        }
                    }
                }
                Data::Q8(blocks)
            }
            Dtype::Q4 => {
                let mut blocks = vec![0u8; n_in * ng * Q4_BLOCK];
                // Rows on all threads: the scale search is most of a q4 load's work.
                wt.par_chunks(n_out.max(1))
                    .zip(blocks.par_chunks_mut(ng * Q4_BLOCK))
                    .for_each(|(row, out)| {
                        for (g, chunk) in row.chunks(GROUP).enumerate() {
                            let (od, om, oq) = q4_offsets(ng, g);
                            let (d, m) = q4_scale_min(chunk);
                            out[od..od + 2].copy_from_slice(&d.to_le_bytes());
                            out[om..om + 2].copy_from_slice(&m.to_le_bytes());
                            let (m, inv) = (m.to_f32(), q4_inverse(d.to_f32()));
                            for (i, &v) in chunk.iter().enumerate() {
                                let n = q4_level(v, m, inv) as u8;
                                out[oq + i % 16] |= if i < 16 { n } else { n << 4 };
                            }
                        }
                    });
                Data::Q4(blocks)
            }
        };
        Ok(PackedT { n_in, n_out, data })
    }

    pub fn dtype(&self) -> Dtype {
        self.data.dtype()
    }

    pub fn mat(&self) -> Mat<'_> {
        let view = self.data.view();
        Mat {
            n_in: self.n_in,
            n_out: self.n_out,
            view,
        }
    }

    /// Bytes stored (values, scales and minimums).
    pub fn bytes(&self) -> usize {
        self.data.bytes()
    }
}

impl<'a> Mat<'a> {
    /// A plain input-major f32 matrix.
    pub fn f32(wt: &'a [f32], n_in: usize, n_out: usize) -> Mat<'a> {
        assert_eq!(wt.len(), n_in * n_out, "f32 matrix size");
        Mat {
            n_in,
            n_out,
            view: View::F32(wt),
        }
    }

    /// Panics unless the view holds exactly `n_in` rows of `n_out` weights (what every
    /// kernel that takes a `Mat` checks first; see [`View::assert_holds`]).
    pub(crate) fn assert_sized(&self, what: &str) {
        self.view.assert_holds(self.n_in, self.n_out, what);
    }

    /// Input rows `j0..j1` as a matrix of their own (row `j0` becomes row 0).
    pub fn rows(&self, j0: usize, j1: usize) -> Mat<'a> {
        assert!(
            j0 <= j1 && j1 <= self.n_in,
            "rows {j0}..{j1} of {}",
            self.n_in
        );
        let (n, b) = (self.n_out, self.view.bytes_per_row(self.n_out));
        let view = match self.view {
            View::F32(w) => View::F32(&w[j0 * n..j1 * n]),
            View::F16(w) => View::F16(&w[j0 * n..j1 * n]),
            View::Bf16(w) => View::Bf16(&w[j0 * n..j1 * n]),
            View::Q8(w) => View::Q8(&w[j0 * b..j1 * b]),
            View::Q4(w) => View::Q4(&w[j0 * b..j1 * b]),
        };
        Mat {
            n_in: j1 - j0,
            n_out: n,
            view,
        }
    }

    /// Writes `w[j, o0 .. o0 + out.len()]` as f32 (scalar; the definition of each format).
    pub fn dequant_row(&self, j: usize, o0: usize, out: &mut [f32]) {
        let (n, ng) = (self.n_out, groups(self.n_out));
        assert!(
            j < self.n_in && o0 + out.len() <= n,
            "dequant_row: out of range"
        );
        for (i, v) in out.iter_mut().enumerate() {
            let o = o0 + i;
            let i = o % GROUP;
            let h = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
            *v = match self.view {
                View::F32(w) => w[j * n + o],
                View::F16(w) => w[j * n + o].to_f32(),
                View::Bf16(w) => w[j * n + o].to_f32(),
                View::Q8(b) => {
                    let row = &b[j * ng * Q8_BLOCK..(j + 1) * ng * Q8_BLOCK];
                    let (od, oq) = q8_offsets(ng, o / GROUP);
                    h(&row[od..]) * row[oq + i] as i8 as f32
                }
                View::Q4(_) => {
                    let (d, m, nibbles) = self.q4_parts(j, o / GROUP);
                    d * q4_value(nibbles, i) as f32 + m
                }
            };
        }
    }

    /// Group `g` of row `j` of a q4 matrix: its scale `d`, minimum `m` and the 32 values `q`
    /// (0..=15), `w = d q + m` (scalar; the definition of the format).
    pub fn q4_group(&self, j: usize, g: usize) -> (f32, f32, [u8; GROUP]) {
        let (d, m, nibbles) = self.q4_parts(j, g);
        (d, m, std::array::from_fn(|i| q4_value(nibbles, i)))
    }

    /// Group `g` of row `j` of a q8 matrix: its scale `d` and the 32 values `q`, `w = d q`
    /// (scalar; the definition of the format).
    pub fn q8_group(&self, j: usize, g: usize) -> (f32, [i8; GROUP]) {
        let View::Q8(b) = self.view else {
            panic!("q8_group: not a q8 matrix")
        };
        let ng = groups(self.n_out);
        assert!(j < self.n_in && g < ng, "q8_group: out of range");
        let row = &b[j * ng * Q8_BLOCK..(j + 1) * ng * Q8_BLOCK];
        let (od, oq) = q8_offsets(ng, g);
        let d = f16::from_le_bytes([row[od], row[od + 1]]).to_f32();
        (d, std::array::from_fn(|i| row[oq + i] as i8))
    }

    /// Scale, minimum and the 16 bytes of nibbles of group `g` of row `j` of a q4 matrix.
    fn q4_parts(&self, j: usize, g: usize) -> (f32, f32, &[u8]) {
        let View::Q4(b) = self.view else {
            panic!("q4_group: not a q4 matrix")
        };
        let ng = groups(self.n_out);
        assert!(j < self.n_in && g < ng, "q4_group: out of range");
        let row = &b[j * ng * Q4_BLOCK..(j + 1) * ng * Q4_BLOCK];
        let (od, om, oq) = q4_offsets(ng, g);
        let h = |o: usize| f16::from_le_bytes([row[o], row[o + 1]]).to_f32();
        (h(od), h(om), &row[oq..oq + GROUP / 2])
    }
}

/// A dense output-major matrix `w[out, in]` (the checkpoints' own layout): for matrices that are
/// never sparsified (the LM head, the token embedding), so a row is one output's dot product
/// (or one token's embedding). `f32`, `f16`, `bf16` store one value per weight; `q8` and `q4` cut
/// each row into blocks of [`GROUP`] consecutive *inputs*, byte for byte GGML's `Q8_0` (`[f16 d,
/// 32 x i8]`, `w = d q`) and `Q4_1` (`[f16 d, f16 m, 16 bytes]`, `w = d q + m`, byte `b` holding
/// input `b` in its low nibble and `b + 16` in its high one), quantized as GGML's reference
/// quantizer does. A partial last block of a row is padded with zeros.
#[derive(Debug)]
pub struct PackedRows {
    pub n_out: usize,
    pub n_in: usize,
    /// Row `o` of a float format at `o * n_in`; block `(o, g)` of a quantized one at byte
    /// `(o * blocks + g) * block size`, `blocks = n_in.div_ceil(GROUP)`.
    pub data: Data,
}

/// A borrowed output-major matrix, as the kernels see it.
#[derive(Clone, Copy, Debug)]
pub struct RowsMat<'a> {
    pub n_out: usize,
    pub n_in: usize,
    pub view: View<'a>,
}

/// GGML's `quantize_row_q8_0_ref` on one block (fewer than [`GROUP`] values: zero-padded).
fn quantize_q8_0(x: &[f32], blk: &mut [u8]) {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    blk[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    for (q, &v) in blk[2..].iter_mut().zip(x) {
        *q = ((v * id).round() as i8) as u8;
    }
}

/// GGML's `quantize_row_q4_1_ref` on one block (fewer than [`GROUP`] values: zero-padded).
fn quantize_q4_1(x: &[f32], blk: &mut [u8]) {
    let min = x.iter().fold(f32::INFINITY, |a, &v| a.min(v));
    let max = x.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    blk[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    blk[2..4].copy_from_slice(&f16::from_f32(min).to_le_bytes());
    for (i, &v) in x.iter().enumerate() {
        let q = (((v - min) * id + 0.5) as i8).min(15) as u8;
        blk[4 + i % 16] |= if i < 16 { q } else { q << 4 };
    }
}

impl PackedRows {
    /// Packs an output-major f32 matrix `w[n_out, n_in]` (f32 keeps the vector as it is).
    pub fn from_rows(
        dtype: Dtype,
        w: Vec<f32>,
        n_out: usize,
        n_in: usize,
    ) -> Result<PackedRows, PackError> {
        check_packable(&w, n_in, n_out, dtype)?;
        let quantized = |size: usize, quantize: fn(&[f32], &mut [u8])| {
            let nb = groups(n_in);
            let mut blocks = vec![0u8; n_out * nb * size];
            for (row, out) in w.chunks(n_in.max(1)).zip(blocks.chunks_mut(nb * size)) {
                for (x, blk) in row.chunks(GROUP).zip(out.chunks_mut(size)) {
                    quantize(x, blk);
                }
            }
            blocks
        };
        let data = match dtype {
            Dtype::F32 => Data::F32(w),
            Dtype::F16 => Data::F16(w.par_iter().map(|&v| f16::from_f32(v)).collect()),
            Dtype::Bf16 => Data::Bf16(w.par_iter().map(|&v| bf16::from_f32(v)).collect()),
            Dtype::Q8 => Data::Q8(quantized(Q8_BLOCK, quantize_q8_0)),
            Dtype::Q4 => Data::Q4(quantized(Q4_BLOCK, quantize_q4_1)),
        };
        Ok(PackedRows { n_out, n_in, data })
    }

    /// No rows yet, room for `n_out` of `n_in` values in `dtype`: filled by
    /// [`PackedRows::push_rows`] a slice of rows at a time, without reallocation.
    pub fn with_capacity(dtype: Dtype, n_in: usize, n_out: usize) -> PackedRows {
        let blocks = |size: usize| Vec::with_capacity(n_out * groups(n_in) * size);
        let data = match dtype {
            Dtype::F32 => Data::F32(Vec::with_capacity(n_out * n_in)),
            Dtype::F16 => Data::F16(Vec::with_capacity(n_out * n_in)),
            Dtype::Bf16 => Data::Bf16(Vec::with_capacity(n_out * n_in)),
            Dtype::Q8 => Data::Q8(blocks(Q8_BLOCK)),
            Dtype::Q4 => Data::Q4(blocks(Q4_BLOCK)),
        };
        PackedRows {
            n_out: 0,
            n_in,
            data,
        }
    }

    /// Appends the rows `w` (`[rows, n_in]`, f32) packed as this matrix is, as
    /// [`PackedRows::from_rows`] would pack them; error indices count from the first row.
    pub fn push_rows(&mut self, w: Vec<f32>) -> Result<(), PackError> {
        let n_in = self.n_in.max(1);
        let base = self.n_out * self.n_in;
        let rows = w.len() / n_in;
        let part =
            PackedRows::from_rows(self.dtype(), w, rows, self.n_in).map_err(|e| match e {
                PackError::NotFinite { index, value } => PackError::NotFinite {
                    index: base + index,
                    value,
                },
                PackError::OutOfRange {
                    index,
                    value,
                    dtype,
                } => PackError::OutOfRange {
                    index: base + index,
                    value,
                    dtype,
                },
                size => size,
            })?;
        match (&mut self.data, part.data) {
            (Data::F32(a), Data::F32(b)) => a.extend(b),
            (Data::F16(a), Data::F16(b)) => a.extend(b),
            (Data::Bf16(a), Data::Bf16(b)) => a.extend(b),
            (Data::Q8(a), Data::Q8(b)) | (Data::Q4(a), Data::Q4(b)) => a.extend(b),
            _ => unreachable!("a part is packed in the matrix's own format"),
        }
        self.n_out += rows;
        Ok(())
    }

    pub fn dtype(&self) -> Dtype {
        self.data.dtype()
    }

    pub fn mat(&self) -> RowsMat<'_> {
        let view = self.data.view();
        RowsMat {
            n_out: self.n_out,
            n_in: self.n_in,
            view,
        }
    }

    /// Bytes stored (values, scales and minimums).
    pub fn bytes(&self) -> usize {
        self.data.bytes()
    }
}

impl<'a> RowsMat<'a> {
    /// A plain output-major f32 matrix.
    pub fn f32(w: &'a [f32], n_out: usize, n_in: usize) -> RowsMat<'a> {
        assert_eq!(w.len(), n_out * n_in, "f32 matrix size");
        RowsMat {
            n_out,
            n_in,
            view: View::F32(w),
        }
    }

    /// Panics unless the view holds exactly `n_out` rows of `n_in` weights (what every
    /// kernel that takes a `RowsMat` checks first; see [`View::assert_holds`]).
    pub(crate) fn assert_sized(&self, what: &str) {
        self.view.assert_holds(self.n_out, self.n_in, what);
    }

    /// Writes row `o` (`n_in` values) as f32: an embedding lookup, or one output's weights
    /// (scalar; the definition of each format).
    pub fn dequant_row(&self, o: usize, out: &mut [f32]) {
        let (n, nb) = (self.n_in, groups(self.n_in));
        assert!(
            o < self.n_out && out.len() == n,
            "dequant_row: out of range"
        );
        let h = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
        match self.view {
            View::F32(w) => out.copy_from_slice(&w[o * n..(o + 1) * n]),
            View::F16(w) => {
                for (v, w) in out.iter_mut().zip(&w[o * n..(o + 1) * n]) {
                    *v = w.to_f32();
                }
            }
            View::Bf16(w) => {
                for (v, w) in out.iter_mut().zip(&w[o * n..(o + 1) * n]) {
                    *v = w.to_f32();
                }
            }
            View::Q8(b) => {
                let row = &b[o * nb * Q8_BLOCK..(o + 1) * nb * Q8_BLOCK];
                for (blk, y) in row.chunks(Q8_BLOCK).zip(out.chunks_mut(GROUP)) {
                    let d = h(blk);
                    for (v, &q) in y.iter_mut().zip(&blk[2..]) {
                        *v = q as i8 as f32 * d;
                    }
                }
            }
            View::Q4(b) => {
                let row = &b[o * nb * Q4_BLOCK..(o + 1) * nb * Q4_BLOCK];
                for (blk, y) in row.chunks(Q4_BLOCK).zip(out.chunks_mut(GROUP)) {
                    let (d, m) = (h(blk), h(&blk[2..]));
                    for (i, v) in y.iter_mut().enumerate() {
                        let byte = blk[4 + i % 16];
                        let q = if i < 16 { byte & 15 } else { byte >> 4 };
                        *v = q as f32 * d + m;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rand::uniform as rand_vec;

    /// Groups of every length up to a full one, plain and with an outlier: the chosen scale
    /// and minimum never store a group worse than the min/max grid, and on these they are
    /// better on the whole. (`parity.rs` checks packed matrices against a min/max grid of its
    /// own.)
    #[test]
    fn q4_scale_search_is_never_worse_than_min_max() {
        let (mut ours, mut theirs) = (0.0f64, 0.0f64);
        for seed in 0..200u64 {
            let len = 1 + seed as usize % GROUP;
            let mut v = rand_vec(len, seed);
            if seed % 3 == 0 {
                v[seed as usize % len] *= 6.0;
            }
            let (d, m) = q4_scale_min(&v);
            let e = q4_sq_err(&v, d.to_f32(), m.to_f32());
            let (d0, m0, _, _) = q4_min_max(&v);
            let base = q4_sq_err(&v, d0.to_f32(), m0.to_f32());
            assert!(e <= base, "seed {seed}: {e} > {base}");
            ours += e as f64;
            theirs += base as f64;
        }
        assert!(
            ours < 0.9 * theirs,
            "search {ours} against min/max {theirs}"
        );
    }

    /// Values already on a 16-level grid whose step and minimum are f16 values (a `Q4_1`
    /// block, dequantized) are stored exactly; a constant group gets a zero step.
    #[test]
    fn q4_values_on_a_grid_are_stored_exactly() {
        for seed in 0..50u64 {
            let r = rand_vec(GROUP + 2, 100 + seed);
            let d = f16::from_f32(0.01 + r[0].abs() * 0.1).to_f32();
            let m = f16::from_f32(r[1]).to_f32();
            let v: Vec<f32> = (0..GROUP)
                .map(|i| {
                    let q = match i {
                        0 => 0.0,
                        1 => 15.0,
                        _ => ((r[i + 2] + 1.0) * 7.5).round().clamp(0.0, 15.0),
                    };
                    d * q + m
                })
                .collect();
            let (dq, mq) = q4_scale_min(&v);
            assert_eq!(q4_sq_err(&v, dq.to_f32(), mq.to_f32()), 0.0, "seed {seed}");
        }
        let (d, m) = q4_scale_min(&[0.25; 7]);
        assert_eq!((d.to_f32(), m.to_f32()), (0.0, 0.25));
    }
}
