//! Plain scalar reference implementations of every op. Slow, obvious, and the oracle that each
//! fast path is tested against.

/// `y = Wt^T x` for input-major weights `wt[in, out]`: `y[o] = sum_j x[j] * wt[j * n_out + o]`.
pub fn gemv_t(wt: &[f32], n_in: usize, n_out: usize, x: &[f32], y: &mut [f32]) {
    assert_eq!(wt.len(), n_in * n_out);
    assert_eq!(x.len(), n_in);
    assert_eq!(y.len(), n_out);
    y.fill(0.0);
    for (j, &xj) in x.iter().enumerate() {
        let row = &wt[j * n_out..(j + 1) * n_out];
        for (yo, &w) in y.iter_mut().zip(row) {
            *yo += xj * w;
        }
    }
}

/// TEAL sparse GEMV: `y = Wt^T s_t(x)` with `s_t(x) = x * [|x| > t]`; rows of zeroed inputs are
/// never read.
pub fn gemv_t_sparse(wt: &[f32], n_in: usize, n_out: usize, x: &[f32], t: f32, y: &mut [f32]) {
    assert_eq!(wt.len(), n_in * n_out);
    assert_eq!(x.len(), n_in);
    assert_eq!(y.len(), n_out);
    y.fill(0.0);
    for (j, &xj) in x.iter().enumerate() {
        if xj.abs() > t {
            let row = &wt[j * n_out..(j + 1) * n_out];
            for (yo, &w) in y.iter_mut().zip(row) {
                *yo += xj * w;
            }
        }
    }
}

/// `y[T, out] = x[T, in] * wt[in, out]`.
pub fn matmul_t(x: &[f32], n_tok: usize, wt: &[f32], n_in: usize, n_out: usize, y: &mut [f32]) {
    assert_eq!(x.len(), n_tok * n_in);
    assert_eq!(y.len(), n_tok * n_out);
    for t in 0..n_tok {
        gemv_t(
            wt,
            n_in,
            n_out,
            &x[t * n_in..(t + 1) * n_in],
            &mut y[t * n_out..(t + 1) * n_out],
        );
    }
}

/// TEAL's sparsification rule `s_t(x) = x * [|x| > t]` (strict).
pub fn sparsify(x: &[f32], t: f32, out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = if v.abs() > t { v } else { 0.0 };
    }
}

/// Per-channel TEAL mask: `out = x * [|x| > t_j]` for rows of `t.len()` channels.
pub fn sparsify_channels(x: &[f32], t: &[f32], out: &mut [f32]) {
    assert_eq!(x.len() % t.len().max(1), 0, "sparsify_channels: row size");
    for (xr, or) in x.chunks(t.len()).zip(out.chunks_mut(t.len())) {
        for ((o, &v), &tj) in or.iter_mut().zip(xr).zip(t) {
            *o = if v.abs() > tj { v } else { 0.0 };
        }
    }
}

/// RMSNorm: `out = x / sqrt(mean(x^2) + eps) * w`, in f32 as the models' own code does.
pub fn rmsnorm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ss: f32 = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ss + eps).sqrt();
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = v * inv * g;
    }
}

/// Rotary embedding, NeoX / Hugging Face layout: dimension `i` pairs with `i + head_dim/2`.
/// `cos`/`sin` hold `head_dim/2` values for this position.
pub fn rope_neox(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = head.len() / 2;
    for i in 0..half {
        let (a, b) = (head[i], head[i + half]);
        head[i] = a * cos[i] - b * sin[i];
        head[i + half] = b * cos[i] + a * sin[i];
    }
}

/// In-place numerically stable softmax.
pub fn softmax(x: &mut [f32]) {
    let m = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut s = 0.0;
    for v in x.iter_mut() {
        *v = (*v - m).exp();
        s += *v;
    }
    for v in x.iter_mut() {
        *v /= s;
    }
}

/// `out = silu(gate) * up`.
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

/// Causal attention of `n_q` query positions (absolute positions `pos0..pos0+n_q`) over the
/// first `pos0 + n_q` cached keys, grouped-query: query head `h` reads KV head `h / group`.
/// `q[n_q, n_head*hd]`, `k`,`v`: `[n_kv_total, n_kv_head*hd]`, `out[n_q, n_head*hd]`.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n_q: usize,
    pos0: usize,
    n_head: usize,
    n_kv_head: usize,
    hd: usize,
    out: &mut [f32],
) {
    let group = n_head / n_kv_head;
    let scale = 1.0 / (hd as f32).sqrt();
    let (qs, kvs) = (n_head * hd, n_kv_head * hd);
    for t in 0..n_q {
        let n_keys = pos0 + t + 1;
        for h in 0..n_head {
            let kh = h / group;
            let qh = &q[t * qs + h * hd..t * qs + (h + 1) * hd];
            let mut scores: Vec<f32> = (0..n_keys)
                .map(|p| {
                    let kp = &k[p * kvs + kh * hd..p * kvs + (kh + 1) * hd];
                    qh.iter().zip(kp).map(|(a, b)| a * b).sum::<f32>() * scale
                })
                .collect();
            softmax(&mut scores);
            let o = &mut out[t * qs + h * hd..t * qs + (h + 1) * hd];
            o.fill(0.0);
            for (p, &s) in scores.iter().enumerate() {
                let vp = &v[p * kvs + kh * hd..p * kvs + (kh + 1) * hd];
                for (oi, &vi) in o.iter_mut().zip(vp) {
                    *oi += s * vi;
                }
            }
        }
    }
}

/// Index of the largest value (the first one on ties); 0 for an empty slice.
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

/// The threshold `t` at which `x * [|x| > t]` zeroes a fraction `s` of `x` (rounded down to
/// whole entries; more where `|x|` has ties at `t`): the `floor(s * n)`-th smallest `|x|`
/// (the largest for `s >= 1`: every entry zeroed), or -1 (keep all) where that is none. The
/// benchmarks' way to set a sparsity on synthetic inputs.
pub fn abs_threshold(x: &[f32], s: f64) -> f32 {
    let mut a: Vec<f32> = x.iter().map(|v| v.abs()).collect();
    a.sort_by(f32::total_cmp);
    let k = ((s * a.len() as f64) as usize).min(a.len());
    if k == 0 {
        -1.0
    } else {
        a[k - 1]
    }
}

/// TEAL's compaction: the indices and values of the inputs with `|x| > t`, in order.
pub fn compact_abs_gt(x: &[f32], t: f32) -> (Vec<u32>, Vec<f32>) {
    x.iter()
        .enumerate()
        .filter(|(_, v)| v.abs() > t)
        .map(|(j, &v)| (j as u32, v))
        .unzip()
}

/// Per-channel compaction: the inputs with `|x_j| > t_j`.
pub fn compact_abs_gt_channel(x: &[f32], t: &[f32]) -> (Vec<u32>, Vec<f32>) {
    assert_eq!(x.len(), t.len());
    x.iter()
        .zip(t)
        .enumerate()
        .filter(|(_, (v, t))| v.abs() > **t)
        .map(|(j, (&v, _))| (j as u32, v))
        .unzip()
}

/// `y = sum_k val[k] * w[idx[k], :]` for packed input-major weights: the GEMV over a compacted
/// index list (the dense GEMV is the list of every input).
pub fn gemv_packed_idx(w: &crate::packed::Mat, idx: &[u32], val: &[f32], y: &mut [f32]) {
    assert_eq!(idx.len(), val.len());
    assert_eq!(y.len(), w.n_out);
    y.fill(0.0);
    let mut row = vec![0.0; w.n_out];
    for (&j, &xj) in idx.iter().zip(val) {
        w.dequant_row(j as usize, 0, &mut row);
        for (yo, &r) in y.iter_mut().zip(&row) {
            *yo += xj * r;
        }
    }
}

/// Dense GEMV on packed input-major weights.
pub fn gemv_packed(w: &crate::packed::Mat, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), w.n_in);
    let idx: Vec<u32> = (0..w.n_in as u32).collect();
    gemv_packed_idx(w, &idx, x, y)
}

/// Kept rows that the q4 GEMV's integer passes take at a time (`cpu`'s AVX2 q4 tile).
pub const Q4_PASS: usize = 16;

/// The middle of q4's values 0..=15: the rounding errors of a pass's activations, summed, are
/// added back times this (the part of their products with `q` that the mean `q` carries).
pub const Q4_MID: f32 = 7.5;

/// One group of a quantized input row as the integer GEMVs see it: scale `d`, minimum `m`
/// (0 for q8) and the 32 integer values `q`, `w = d q + m`.
type IntGroup = (f32, f32, [i32; crate::packed::GROUP]);

/// Group `g` of row `j` of a q4 or q8 matrix as an [`IntGroup`].
fn int_group(w: &crate::packed::Mat, j: usize, g: usize) -> IntGroup {
    use crate::packed::View;
    match w.view {
        View::Q4(_) => {
            let (d, m, q) = w.q4_group(j, g);
            (d, m, q.map(i32::from))
        }
        View::Q8(_) => {
            let (d, q) = w.q8_group(j, g);
            (d, 0.0, q.map(i32::from))
        }
        _ => panic!("integer GEMV on a float matrix"),
    }
}

/// What the rounding errors of a pass's activations are added back times: [`Q4_MID`] for q4,
/// 0 for q8 (whose values are centred on 0).
fn int_mid(w: &crate::packed::Mat) -> f32 {
    match w.view {
        crate::packed::View::Q4(_) => Q4_MID,
        _ => 0.0,
    }
}

/// How values are rounded to int8 together: from their largest `|v|`, `A` (NaN if any value
/// is NaN: `f32::max` alone would skip it, and a NaN must reach the products as it does in
/// f32), the factor `127 / A` that rounds them (0 where `A` is 0 or NaN) and the step `A / 127`
/// a unit of the rounded values is worth.
fn int8_scale(values: &[f32]) -> (f32, f32) {
    let a = values.iter().fold(0.0f32, |a, v| {
        if v.is_nan() || a.is_nan() {
            f32::NAN
        } else {
            a.max(v.abs())
        }
    });
    (if a > 0.0 { 127.0 / a } else { 0.0 }, a * (1.0 / 127.0))
}

/// The GEMV of a q4 or q8 matrix with the activations rounded to 8 bits, as the integer tiles
/// compute it over columns `o0 .. o0 + y.len()`: the rows `(input index, value)` in the
/// tile's order, in passes of `pass` consecutive rows. Per pass and group `g` of 32 outputs:
/// `c_j = x_j d_jg`, `A = max_j |c_j|` (NaN if any `c_j` is), `S = A / 127`,
/// `k_j = round(c_j (127 / A))` (ties to even; 0 where `A` is 0 or NaN), and the pass adds
/// `S sum_j k_j q_jo + sum_j x_j m_jg + mid sum_j (c_j - S k_j)` (`mid` 7.5 for q4, 0 for
/// q8). A partial last group is the exact `sum_j x_j w_jo`.
fn gemv_int8(w: &crate::packed::Mat, rows: &[(usize, f32)], pass: usize, o0: usize, y: &mut [f32]) {
    use crate::packed::GROUP;
    assert!(
        o0.is_multiple_of(GROUP) && o0 + y.len() <= w.n_out,
        "gemv_int8: columns"
    );
    y.fill(0.0);
    let mid = int_mid(w);
    let full = y.len() / GROUP * GROUP;
    for pass in rows.chunks(pass) {
        for g in 0..full / GROUP {
            let parts: Vec<IntGroup> = pass
                .iter()
                .map(|&(j, _)| int_group(w, j, o0 / GROUP + g))
                .collect();
            let c: Vec<f32> = pass
                .iter()
                .zip(&parts)
                .map(|(&(_, x), p)| x * p.0)
                .collect();
            let (inv, s) = int8_scale(&c);
            let k: Vec<i32> = c
                .iter()
                .map(|&c| (c * inv).round_ties_even() as i32)
                .collect();
            let err: f32 = c.iter().zip(&k).map(|(&c, &k)| c - s * k as f32).sum();
            let bias: f32 = pass
                .iter()
                .zip(&parts)
                .map(|(&(_, x), p)| x * p.1)
                .sum::<f32>()
                + mid * err;
            for (i, yo) in y[g * GROUP..(g + 1) * GROUP].iter_mut().enumerate() {
                let dot: i32 = k.iter().zip(&parts).map(|(&k, p)| k * p.2[i]).sum();
                *yo += bias + s * dot as f32;
            }
        }
        let mut row = vec![0.0; y.len() - full];
        for &(j, x) in pass {
            w.dequant_row(j, o0 + full, &mut row);
            for (yo, &r) in y[full..].iter_mut().zip(&row) {
                *yo += x * r;
            }
        }
    }
}

/// How far [`gemv_q4_int8`] or [`gemv_q8_int8`] may be from the exact product, per output of
/// columns `o0 .. o0 + bound.len()`, with `rows` taken `pass` at a time: each `c_j` is rounded
/// by at most half a step `A / 127` (`A` the pass's largest `|c_j|`), times `|q_jo - mid|`
/// since the errors times `mid` are added back (`|q_jo - 7.5|` for q4, `|q_jo|` for q8). Zero
/// in a partial last group (exact). With `pass` the number of rows, a bound for any cut of
/// the rows into passes.
pub fn int8_bound(
    w: &crate::packed::Mat,
    rows: &[(usize, f32)],
    o0: usize,
    pass: usize,
    bound: &mut [f32],
) {
    use crate::packed::GROUP;
    bound.fill(0.0);
    let mid = int_mid(w);
    for pass in rows.chunks(pass.max(1)) {
        for (g, b) in bound.chunks_exact_mut(GROUP).enumerate() {
            let parts: Vec<(f32, IntGroup)> = pass
                .iter()
                .map(|&(j, x)| (x, int_group(w, j, o0 / GROUP + g)))
                .collect();
            let a = parts
                .iter()
                .fold(0.0f32, |a, (x, p)| a.max((x * p.0).abs()));
            for (i, b) in b.iter_mut().enumerate() {
                let q: f32 = parts.iter().map(|(_, p)| (p.2[i] as f32 - mid).abs()).sum();
                *b += a / 254.0 * q;
            }
        }
    }
}

/// The q4 GEMV with the activations rounded to 8 bits, as the AVX2 q4 tile computes it:
/// [`gemv_int8`] in passes of [`Q4_PASS`] rows, the rounding errors added back times
/// [`Q4_MID`].
pub fn gemv_q4_int8(w: &crate::packed::Mat, rows: &[(usize, f32)], o0: usize, y: &mut [f32]) {
    gemv_int8(w, rows, Q4_PASS, o0, y)
}

/// Kept rows that the q8 GEMV's integer passes take at a time (`cpu`'s q8 tile where the CPU
/// has 8-bit dot products, AVX-512 VNNI).
pub const Q8_PASS: usize = 16;

/// The q8 GEMV with the activations rounded to 8 bits, as the VNNI q8 tile computes it:
/// [`gemv_int8`] in passes of [`Q8_PASS`] rows (no minimum, nothing added back), so the pass
/// adds `S sum_j k_j q_jo`, the integer sum exact.
pub fn gemv_q8_int8(w: &crate::packed::Mat, rows: &[(usize, f32)], o0: usize, y: &mut [f32]) {
    gemv_int8(w, rows, Q8_PASS, o0, y)
}

/// Dense GEMV on an output-major matrix as dot products: `y[o] = sum_i w[o, i] x[i]`, each row
/// dequantized, summed in order.
pub fn gemv_dot(w: &crate::packed::RowsMat, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), w.n_in);
    assert_eq!(y.len(), w.n_out);
    let mut row = vec![0.0; w.n_in];
    for (o, yo) in y.iter_mut().enumerate() {
        w.dequant_row(o, &mut row);
        *yo = row.iter().zip(x).map(|(a, b)| a * b).sum();
    }
}

/// An activation vector rounded to 8 bits in blocks of [`crate::packed::GROUP`] inputs, as
/// GGML rounds it for its Q8_0 dot products: block `b`'s scale `d_b = A_b / 127` (`A_b` its
/// largest `|x_i|`, NaN if any `x_i` is) and `k_i = round(x_i (127 / A_b))` (ties to even; 0
/// where `A_b = 0` or is NaN), the last block padded with zeros.
#[derive(Default)]
pub struct Int8Blocks {
    pub k: Vec<i8>,
    pub d: Vec<f32>,
}

impl Int8Blocks {
    /// Rounds `x` into these buffers (resized, so that a caller can reuse them).
    pub fn fill(&mut self, x: &[f32]) {
        use crate::packed::GROUP;
        let nb = x.len().div_ceil(GROUP);
        self.k.clear();
        self.k.resize(nb * GROUP, 0);
        self.d.clear();
        self.d.resize(nb, 0.0);
        for ((xb, kb), db) in x
            .chunks(GROUP)
            .zip(self.k.chunks_mut(GROUP))
            .zip(&mut self.d)
        {
            let (inv, d) = int8_scale(xb);
            *db = d;
            for (kv, &v) in kb.iter_mut().zip(xb) {
                *kv = (v * inv).round_ties_even() as i8;
            }
        }
    }
}

/// `x` rounded as [`Int8Blocks`] says.
pub fn int8_blocks(x: &[f32]) -> Int8Blocks {
    let mut b = Int8Blocks::default();
    b.fill(x);
    b
}

/// Block `g` of output row `o` of a q8 or q4 output-major matrix as an [`IntGroup`] (the
/// values of a partial last block past `n_in` are whatever the packing stored: they meet zero
/// activations).
fn dot_group(w: &crate::packed::RowsMat, o: usize, g: usize) -> IntGroup {
    use crate::packed::{groups, View, GROUP, Q4_BLOCK, Q8_BLOCK};
    let nb = groups(w.n_in);
    let h = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f32();
    match w.view {
        View::Q8(b) => {
            let blk = &b[(o * nb + g) * Q8_BLOCK..(o * nb + g + 1) * Q8_BLOCK];
            (
                h(blk),
                0.0,
                std::array::from_fn(|i| blk[2 + i] as i8 as i32),
            )
        }
        View::Q4(b) => {
            let blk = &b[(o * nb + g) * Q4_BLOCK..(o * nb + g + 1) * Q4_BLOCK];
            (
                h(blk),
                h(&blk[2..]),
                std::array::from_fn(|i| {
                    let byte = blk[4 + i % (GROUP / 2)];
                    i32::from(if i < GROUP / 2 { byte & 15 } else { byte >> 4 })
                }),
            )
        }
        _ => panic!("integer dot on a float matrix"),
    }
}

/// The q8 or q4 output-major GEMV (the LM head) with 8-bit activations, as the VNNI dots
/// compute it: `y[o] = sum_b (d_ob d_b sum_{i in b} q_oi k_i + m_ob d_b sum_{i in b} k_i)`
/// over `x`'s [`int8_blocks`] (`m` 0 for q8), the integer sums exact. For q4 that is GGML's
/// Q4_1 x Q8_1 product.
pub fn gemv_dot_int8(w: &crate::packed::RowsMat, x: &[f32], y: &mut [f32]) {
    use crate::packed::{groups, GROUP};
    assert_eq!(x.len(), w.n_in);
    assert_eq!(y.len(), w.n_out);
    let xb = int8_blocks(x);
    for (o, yo) in y.iter_mut().enumerate() {
        *yo = 0.0;
        for g in 0..groups(w.n_in) {
            let (d, m, q) = dot_group(w, o, g);
            let k = &xb.k[g * GROUP..(g + 1) * GROUP];
            let dot: i32 = q.iter().zip(k).map(|(&q, &k)| q * k as i32).sum();
            let ksum: i32 = k.iter().map(|&k| k as i32).sum();
            *yo += d * xb.d[g] * dot as f32 + m * (xb.d[g] * ksum as f32);
        }
    }
}

/// How far [`gemv_dot_int8`] may be from the exact product: each `x_i` is off by at most half
/// its block's step `A_b / 127`, times `|w_oi|`.
pub fn dot_int8_bound(w: &crate::packed::RowsMat, x: &[f32], bound: &mut [f32]) {
    use crate::packed::GROUP;
    let steps: Vec<f32> = x
        .chunks(GROUP)
        .map(|b| b.iter().fold(0.0f32, |a, v| a.max(v.abs())) / 254.0)
        .collect();
    let mut row = vec![0.0; w.n_in];
    for (o, b) in bound.iter_mut().enumerate() {
        w.dequant_row(o, &mut row);
        *b = row
            .iter()
            .enumerate()
            .map(|(i, v)| steps[i / GROUP] * v.abs())
            .sum();
    }
}

/// `sum x[i]` (the streaming read that measures memory bandwidth).
pub fn sum(x: &[f32]) -> f32 {
    x.iter().sum()
}
