//! Every fast CPU kernel against its scalar reference, at sparsity 0%, 100% and odd sizes.

use teal_kernels::{cpu, reference};

/// f32 sums of up to a few thousand terms in a different order: relative to the sum of |terms|.
const GEMV_REL_TOL: f32 = 1e-5;
const ATTN_TOL: f32 = 1e-5;

use teal_kernels::rand::uniform as rand_vec;

fn assert_close(a: &[f32], b: &[f32], scale: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len());
    for i in 0..a.len() {
        let lim = tol * scale[i].max(1.0);
        assert!(
            (a[i] - b[i]).abs() <= lim,
            "{what}: index {i}: {} vs {} (limit {lim})",
            a[i],
            b[i]
        );
    }
}

/// `|a - b| <= lim` element by element.
fn assert_within(a: &[f32], b: &[f32], lim: &[f32], what: &str) {
    assert_eq!(a.len(), b.len());
    for i in 0..a.len() {
        assert!(
            (a[i] - b[i]).abs() <= lim[i],
            "{what}: index {i}: {} vs {} (limit {})",
            a[i],
            b[i],
            lim[i]
        );
    }
}

/// Runs `gemv` on inputs of `n_in` values with a NaN at the first, a middle and the last
/// position, and checks that every one of its `n_out` outputs is NaN.
fn assert_nan_reaches_every_output(
    n_in: usize,
    n_out: usize,
    what: &str,
    gemv: impl Fn(&[f32], &mut [f32]),
) {
    for at in [0, n_in / 2, n_in - 1] {
        let mut x = rand_vec(n_in, 41);
        x[at] = f32::NAN;
        let mut y = vec![0.0; n_out];
        gemv(&x, &mut y);
        assert!(y.iter().all(|v| v.is_nan()), "{what}, NaN at {at}: {y:?}");
    }
}

/// Sum of |x_j * w_jo| per output: the scale that bounds reordering error.
fn abs_scale(wt: &[f32], n_in: usize, n_out: usize, x: &[f32]) -> Vec<f32> {
    let wa: Vec<f32> = wt.iter().map(|v| v.abs()).collect();
    let xa: Vec<f32> = x.iter().map(|v| v.abs()).collect();
    let mut s = vec![0.0; n_out];
    reference::gemv_t(&wa, n_in, n_out, &xa, &mut s);
    s
}

const SHAPES: &[(usize, usize)] = &[
    (1, 1),
    (3, 7),
    (17, 9),
    (64, 64),
    (576, 1536),
    (1536, 577),
    (13, 1029),
];

#[test]
fn gemv_dense_matches_reference() {
    for &(n_in, n_out) in SHAPES {
        let wt = rand_vec(n_in * n_out, 1);
        let x = rand_vec(n_in, 2);
        let (mut a, mut b) = (vec![0.0; n_out], vec![0.0; n_out]);
        reference::gemv_t(&wt, n_in, n_out, &x, &mut a);
        cpu::gemv_t(&wt, n_in, n_out, &x, &mut b);
        assert_close(
            &b,
            &a,
            &abs_scale(&wt, n_in, n_out, &x),
            GEMV_REL_TOL,
            "gemv_t",
        );
    }
}

#[test]
fn gemv_sparse_matches_reference_at_every_sparsity() {
    for &(n_in, n_out) in SHAPES {
        let wt = rand_vec(n_in * n_out, 3);
        let x = rand_vec(n_in, 4);
        // t = -1: nothing dropped (0%); t = 1: everything dropped (100%).
        for t in [-1.0f32, 0.0, 0.25, 0.5, 0.75, 1.0] {
            let (mut a, mut b) = (vec![0.0; n_out], vec![0.0; n_out]);
            reference::gemv_t_sparse(&wt, n_in, n_out, &x, t, &mut a);
            cpu::gemv_t_sparse(&wt, n_in, n_out, &x, t, &mut b);
            assert_close(
                &b,
                &a,
                &abs_scale(&wt, n_in, n_out, &x),
                GEMV_REL_TOL,
                "gemv_t_sparse",
            );
            if t >= 1.0 {
                assert!(
                    b.iter().all(|&v| v == 0.0),
                    "100% sparsity must give exact zeros"
                );
            }
        }
    }
}

#[test]
fn sparse_gemv_equals_dense_gemv_of_sparsified_input() {
    let (n_in, n_out) = (96, 200);
    let wt = rand_vec(n_in * n_out, 5);
    let x = rand_vec(n_in, 6);
    let mut xs = vec![0.0; n_in];
    reference::sparsify(&x, 0.4, &mut xs);
    let (mut a, mut b) = (vec![0.0; n_out], vec![0.0; n_out]);
    reference::gemv_t(&wt, n_in, n_out, &xs, &mut a);
    reference::gemv_t_sparse(&wt, n_in, n_out, &x, 0.4, &mut b);
    assert_eq!(a, b, "skipping a row must equal multiplying it by zero");
}

/// The per-channel mask (the GPU tests' reference for per-channel thresholds) keeps exactly
/// `|x_j| > t_j` in every row, equals the one-threshold mask when every `t_j` is `t`, keeps every
/// input with negative thresholds and none with infinite ones; its GEMV equals the GEMV over
/// the per-channel index list.
#[test]
fn sparsify_channels_matches_its_definition() {
    let (rows, n) = (3, 517);
    let x = rand_vec(rows * n, 11);
    let t: Vec<f32> = rand_vec(n, 12).iter().map(|v| v.abs()).collect();
    let mut xs = vec![0.0; rows * n];
    reference::sparsify_channels(&x, &t, &mut xs);
    for (i, (&v, &s)) in x.iter().zip(&xs).enumerate() {
        assert_eq!(s, if v.abs() > t[i % n] { v } else { 0.0 }, "index {i}");
    }
    let (mut one, mut all) = (vec![0.0; rows * n], vec![0.0; rows * n]);
    reference::sparsify(&x, 0.4, &mut one);
    reference::sparsify_channels(&x, &vec![0.4; n], &mut all);
    assert_eq!(one, all, "the same threshold for every channel");
    reference::sparsify_channels(&x, &vec![-1.0; n], &mut all);
    assert_eq!(all, x, "negative thresholds keep every input");
    reference::sparsify_channels(&x, &vec![f32::INFINITY; n], &mut all);
    assert!(
        all.iter().all(|&v| v == 0.0),
        "infinite thresholds keep none"
    );
    let n_out = 77;
    let wt = rand_vec(n * n_out, 13);
    let (mut a, mut b) = (vec![0.0; n_out], vec![0.0; n_out]);
    reference::gemv_t(&wt, n, n_out, &xs[..n], &mut a);
    let (idx, val) = reference::compact_abs_gt_channel(&x[..n], &t);
    let p = teal_kernels::packed::PackedT {
        n_in: n,
        n_out,
        data: teal_kernels::packed::Data::F32(wt),
    };
    reference::gemv_packed_idx(&p.mat(), &idx, &val, &mut b);
    assert_eq!(a, b, "dropping an input equals skipping its row");
}

#[test]
fn matmul_matches_reference() {
    for &(n_in, n_out) in SHAPES {
        for n_tok in [1, 2, 5, 33] {
            let wt = rand_vec(n_in * n_out, 7);
            let x = rand_vec(n_tok * n_in, 8);
            let (mut a, mut b) = (vec![0.0; n_tok * n_out], vec![0.0; n_tok * n_out]);
            reference::matmul_t(&x, n_tok, &wt, n_in, n_out, &mut a);
            cpu::matmul_t(&x, n_tok, &wt, n_in, n_out, &mut b);
            let scale: Vec<f32> = (0..n_tok)
                .flat_map(|t| abs_scale(&wt, n_in, n_out, &x[t * n_in..(t + 1) * n_in]))
                .collect();
            assert_close(&b, &a, &scale, GEMV_REL_TOL, "matmul_t");
        }
    }
}

#[test]
fn attention_matches_reference() {
    for &(n_head, n_kv, hd) in &[(1, 1, 4), (9, 3, 64), (4, 2, 6), (14, 2, 64)] {
        for &(n_q, pos0) in &[(1, 0), (1, 7), (5, 0), (3, 4)] {
            let n_keys = pos0 + n_q;
            let q = rand_vec(n_q * n_head * hd, 9);
            let k = rand_vec(n_keys * n_kv * hd, 10);
            let v = rand_vec(n_keys * n_kv * hd, 11);
            let (mut a, mut b) = (vec![0.0; q.len()], vec![0.0; q.len()]);
            reference::attention(&q, &k, &v, n_q, pos0, n_head, n_kv, hd, &mut a);
            cpu::attention(&q, &k, &v, n_q, pos0, n_head, n_kv, hd, &mut b);
            let ones = vec![1.0; a.len()];
            assert_close(&b, &a, &ones, ATTN_TOL, "attention");
        }
    }
}

/// `got` against the reference `want`: NaN exactly where the reference has NaN, the other
/// values within `tol`.
fn assert_close_nan(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.is_nan() == w.is_nan() && (w.is_nan() || (g - w).abs() <= tol),
            "{what}: index {i}: {g} vs {w}"
        );
    }
}

/// A NaN in a query, a key or a value (an overflowed projection) reaches the attentions'
/// outputs where it reaches the reference's (the engine reports non-finite logits from it):
/// a NaN score makes its head's output NaN, a NaN value the column of the heads that read it.
/// Head sizes that take the SIMD paths (multiples of 8) and the portable one, keys in the
/// SIMD score loop's groups of four and in its tail, decode caches of one and several pieces.
#[test]
fn attention_passes_nan_on() {
    for &(n_head, n_kv, hd) in &[(4, 2, 64), (2, 1, 6), (8, 2, 128)] {
        for n_keys in [1, 7, 40, 700] {
            let (qs, kvs, n_q) = (n_head * hd, n_kv * hd, n_keys.min(5));
            // The last query position's second head, the middle key of the last key/value
            // head, the last value of the first.
            let cases = [
                ("q", (n_q - 1) * qs + hd + 3),
                ("k", n_keys / 2 * kvs + (n_kv - 1) * hd + 1),
                ("v", (n_keys - 1) * kvs + 2),
            ];
            for (which, at) in cases {
                let mut q = rand_vec(n_q * qs, 22);
                let mut k = rand_vec(n_keys * kvs, 23);
                let mut v = rand_vec(n_keys * kvs, 24);
                match which {
                    "q" => q[at] = f32::NAN,
                    "k" => k[at] = f32::NAN,
                    _ => v[at] = f32::NAN,
                }
                let what = format!("{n_head}/{n_kv} heads of {hd}, {n_keys} keys, NaN in {which}");
                // Decode: the last query position over every key.
                let qd = &q[(n_q - 1) * qs..];
                let (mut a, mut b) = (vec![0.0; qs], vec![0.0; qs]);
                let mut scores = vec![0.0; n_head * n_keys];
                reference::attention(qd, &k, &v, 1, n_keys - 1, n_head, n_kv, hd, &mut a);
                assert!(
                    a.iter().any(|x| x.is_nan()),
                    "{what}: the reference has no NaN"
                );
                cpu::attention_decode(qd, &k, &v, n_keys, n_head, n_kv, hd, &mut scores, &mut b);
                assert_close_nan(&b, &a, ATTN_TOL, &format!("attention_decode, {what}"));
                // Prefill: the last few positions, causal.
                let (mut a, mut b) = (vec![0.0; q.len()], vec![0.0; q.len()]);
                reference::attention(&q, &k, &v, n_q, n_keys - n_q, n_head, n_kv, hd, &mut a);
                cpu::attention(&q, &k, &v, n_q, n_keys - n_q, n_head, n_kv, hd, &mut b);
                assert_close_nan(&b, &a, ATTN_TOL, &format!("attention, {what}"));
            }
        }
    }
}

#[test]
fn dot_matches_reference() {
    for n in [0, 1, 7, 8, 9, 64, 1000] {
        let (a, b) = (rand_vec(n, 12), rand_vec(n, 13));
        let r: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        let scale: f32 = a.iter().zip(&b).map(|(x, y)| (x * y).abs()).sum();
        assert!((cpu::dot(&a, &b) - r).abs() <= GEMV_REL_TOL * scale.max(1.0));
    }
}

#[test]
fn attention_decode_matches_reference() {
    for &(n_head, n_kv, hd) in &[(1, 1, 4), (9, 3, 64), (4, 2, 6)] {
        for n_keys in [1, 2, 9, 100] {
            let q = rand_vec(n_head * hd, 14);
            let k = rand_vec(n_keys * n_kv * hd, 15);
            let v = rand_vec(n_keys * n_kv * hd, 16);
            let (mut a, mut b) = (vec![0.0; q.len()], vec![0.0; q.len()]);
            let mut scores = vec![0.0; n_head * n_keys];
            reference::attention(&q, &k, &v, 1, n_keys - 1, n_head, n_kv, hd, &mut a);
            cpu::attention_decode(&q, &k, &v, n_keys, n_head, n_kv, hd, &mut scores, &mut b);
            assert_close(&b, &a, &vec![1.0; a.len()], ATTN_TOL, "attention_decode");
        }
    }
}

/// Keys and values stored as f16: both attentions against the reference on the same values
/// widened back to f32 (the conversion is exact), so the f32 tolerance holds; odd head sizes
/// take the portable path, multiples of 8 the F16C one, and long caches several pieces.
#[test]
fn attention_with_f16_cache_matches_reference() {
    use half::f16;
    let round = |x: Vec<f32>| -> (Vec<f16>, Vec<f32>) {
        let h: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
        let w = h.iter().map(|v| v.to_f32()).collect();
        (h, w)
    };
    for &(n_head, n_kv, hd) in &[(1, 1, 4), (9, 3, 64), (4, 2, 6), (8, 2, 128)] {
        for n_keys in [1, 9, 100, 700] {
            let q = rand_vec(n_head * hd, 17);
            let (k16, k) = round(rand_vec(n_keys * n_kv * hd, 18));
            let (v16, v) = round(rand_vec(n_keys * n_kv * hd, 19));
            let (mut a, mut b) = (vec![0.0; q.len()], vec![0.0; q.len()]);
            let mut scores = vec![0.0; n_head * n_keys];
            reference::attention(&q, &k, &v, 1, n_keys - 1, n_head, n_kv, hd, &mut a);
            cpu::attention_decode(
                &q,
                &k16,
                &v16,
                n_keys,
                n_head,
                n_kv,
                hd,
                &mut scores,
                &mut b,
            );
            let ones = vec![1.0; a.len()];
            assert_close(&b, &a, &ones, ATTN_TOL, "attention_decode, f16 cache");
            let n_q = n_keys.min(5);
            let pos0 = n_keys - n_q;
            let q = rand_vec(n_q * n_head * hd, 20);
            let (mut a, mut b) = (vec![0.0; q.len()], vec![0.0; q.len()]);
            reference::attention(&q, &k, &v, n_q, pos0, n_head, n_kv, hd, &mut a);
            cpu::attention(&q, &k16, &v16, n_q, pos0, n_head, n_kv, hd, &mut b);
            let ones = vec![1.0; a.len()];
            assert_close(&b, &a, &ones, ATTN_TOL, "attention, f16 cache");
        }
    }
}

#[test]
fn sum_matches_reference() {
    for n in [0, 1, 63, 64, 1000, 100_003] {
        let x = rand_vec(n, 21);
        let scale: f32 = x.iter().map(|v| v.abs()).sum();
        let a = reference::sum(&x);
        for (what, b) in [("sum", cpu::sum(&x)), ("par_sum", cpu::par_sum(&x))] {
            assert!(
                (a - b).abs() <= GEMV_REL_TOL * scale.max(1.0),
                "{what} n={n}: {a} vs {b}"
            );
        }
    }
}

mod packed_formats {
    use super::*;
    use teal_kernels::packed::{first_where, Dtype, Mat, PackError, PackedT, View, GROUP};

    /// Quantization error bound of q8 per weight, relative to its group's largest |w|: half a
    /// step (1/254) plus the f16 rounding of the scale.
    const Q8_PACK_TOL: f32 = 0.5 / 127.0 + 1.0 / 1024.0;
    /// q4 squared error per group, relative to that of the min/max grid (GGML's `Q4_1`
    /// choice, which the packer's search starts from and keeps unless it finds a smaller
    /// error): ties between two levels may round the other way.
    const Q4_PACK_REL: f32 = 1e-5;
    const F16_PACK_TOL: f32 = 1.0 / 2048.0;
    const BF16_PACK_TOL: f32 = 1.0 / 256.0;

    const PACK_SHAPES: &[(usize, usize)] = &[
        (1, 1),
        (37, 77),
        (64, 64),
        (13, 1029),
        (576, 1536),
        (1536, 577),
        // Rows wider than one tile of every format, so a thread's columns span several tiles.
        (2, 140_001),
    ];

    fn dequant_all(p: &PackedT) -> Vec<f32> {
        let m = p.mat();
        let mut out = vec![0.0; p.n_in * p.n_out];
        for j in 0..p.n_in {
            m.dequant_row(j, 0, &mut out[j * p.n_out..(j + 1) * p.n_out]);
        }
        out
    }

    /// The fast row dequantization against the scalar definition, at group-aligned and
    /// unaligned starts and odd lengths: equal for the float formats, within 4 f32 epsilons of
    /// max(|w|, 1) for q8/q4 (one FMA where the definition multiplies, then adds).
    #[test]
    fn fast_dequant_row_matches_definition() {
        for &(n_in, n_out) in PACK_SHAPES {
            let wt = rand_vec(n_in * n_out, 12);
            for dtype in Dtype::ALL {
                let p = PackedT::from_input_major(dtype, &wt, n_in, n_out).expect("pack");
                let m = p.mat();
                for j in [0, n_in / 2, n_in - 1] {
                    for (o0, len) in [(0, n_out), (0, n_out / 2), (n_out / 3, n_out - n_out / 3)] {
                        let (mut a, mut b) = (vec![0.0; len], vec![0.0; len]);
                        m.dequant_row(j, o0, &mut a);
                        cpu::dequant_row(&m, j, o0, &mut b);
                        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                            assert!(
                                (x - y).abs() <= x.abs().max(1.0) * 4.0 * f32::EPSILON,
                                "{dtype:?} {n_in}x{n_out} row {j} col {}: {x} vs {y}",
                                o0 + i
                            );
                        }
                    }
                }
            }
        }
    }

    /// A group on GGML's `Q4_1` grid (`d = (max - min) / 15`, `m = min`, both as f16), dequantized.
    fn min_max_q4(v: &[f32]) -> Vec<f32> {
        use half::f16;
        let lo = v.iter().fold(f32::INFINITY, |a, &x| a.min(x));
        let hi = v.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
        let m = f16::from_f32(lo).to_f32();
        let d = f16::from_f32((hi - m).max(0.0) / 15.0).to_f32();
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        v.iter()
            .map(|&x| d * ((x - m) * inv).round().clamp(0.0, 15.0) + m)
            .collect()
    }

    #[test]
    fn pack_is_within_format_error() {
        let (n_in, n_out) = (37, 77);
        let wt = rand_vec(n_in * n_out, 11);
        for dtype in Dtype::ALL {
            let p = PackedT::from_input_major(dtype, &wt, n_in, n_out).expect("pack");
            assert_eq!(p.dtype(), dtype);
            let dq = dequant_all(&p);
            for j in 0..n_in {
                for (g, chunk) in wt[j * n_out..(j + 1) * n_out].chunks(GROUP).enumerate() {
                    let amax = chunk.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                    let got = &dq[j * n_out + g * GROUP..][..chunk.len()];
                    if dtype == Dtype::Q4 {
                        let sq = |a: &[f32]| -> f32 {
                            a.iter().zip(chunk).map(|(x, w)| (x - w) * (x - w)).sum()
                        };
                        let grid = min_max_q4(chunk);
                        assert!(
                            sq(got) <= sq(&grid) * (1.0 + Q4_PACK_REL) + f32::MIN_POSITIVE,
                            "q4 [{j}, group {g}]: squared error {} > min/max grid's {}",
                            sq(got),
                            sq(&grid)
                        );
                        continue;
                    }
                    for (i, (&w, &got)) in chunk.iter().zip(got).enumerate() {
                        let lim = match dtype {
                            Dtype::F16 => F16_PACK_TOL * w.abs(),
                            Dtype::Bf16 => BF16_PACK_TOL * w.abs(),
                            Dtype::Q8 => Q8_PACK_TOL * amax,
                            // f32, stored as it is (q4 is checked per group above).
                            _ => 0.0,
                        };
                        assert!(
                            (got - w).abs() <= lim,
                            "{dtype:?} [{j},{}]: {w} -> {got}",
                            g * GROUP + i
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn pack_rejects_non_finite_and_f16_overflow() {
        let mut wt = rand_vec(64, 3);
        wt[5] = 1e6;
        assert!(PackedT::from_input_major(Dtype::F16, &wt, 8, 8).is_err());
        assert!(PackedT::from_input_major(Dtype::Q4, &wt, 8, 8).is_err());
        assert!(PackedT::from_input_major(Dtype::Bf16, &wt, 8, 8).is_ok());
        wt[5] = f32::NAN;
        assert!(PackedT::from_input_major(Dtype::Bf16, &wt, 8, 8).is_err());
        assert!(PackedT::from_input_major(Dtype::F32, &wt[..10], 8, 8).is_err());
    }

    /// The load-time checks search on all threads but report the first bad value, as a serial
    /// scan would, also when several chunks of the search hold one.
    #[test]
    fn pack_reports_the_first_non_finite_value() {
        let (n_in, n_out) = (512, 600);
        let mut wt = vec![0.5f32; n_in * n_out];
        assert_eq!(first_where(&wt, |v| !v.is_finite()), None);
        for (bad, value) in [
            (250_000, f32::INFINITY),
            (70_001, f32::NAN),
            (200_000, f32::NAN),
        ] {
            wt[bad] = value;
        }
        assert_eq!(first_where(&wt, |v| !v.is_finite()), Some(70_001));
        match PackedT::from_input_major(Dtype::Bf16, &wt, n_in, n_out) {
            Err(PackError::NotFinite { index, value }) => {
                assert_eq!(index, 70_001);
                assert!(value.is_nan());
            }
            other => panic!("expected NotFinite, got {:?}", other.map(|_| ())),
        }
        for bad in [250_000, 70_001, 200_000] {
            wt[bad] = 0.5;
        }
        (wt[3], wt[100_000]) = (-1e6, 1e6);
        match PackedT::from_input_major(Dtype::F16, &wt, n_in, n_out) {
            Err(PackError::OutOfRange { index, .. }) => assert_eq!(index, 3),
            other => panic!("expected OutOfRange, got {:?}", other.map(|_| ())),
        }
    }

    /// How far the fast GEMV may be from the exact product over the kept rows `idx` (values
    /// `val`): [`GEMV_REL_TOL`] of the sum of |terms| for summation order, and for q4 (and q8
    /// where the CPU has VNNI) the rounding of its activations to 8 bits
    /// (`reference::gemv_q4_int8`, `gemv_q8_int8`): each `x_j d_jg` is off by at most half a
    /// step, the step at most `max |x_j d_jg| / 127` over the kept rows, times `|q_jo - 7.5|`
    /// for q4 (the errors times 7.5 are added back) and `|q_jo|` for q8 (exact products in a
    /// partial last group).
    fn gemv_limits(m: &Mat, idx: &[u32], val: &[f32], scale: &[f32]) -> Vec<f32> {
        let mut lim: Vec<f32> = scale.iter().map(|s| GEMV_REL_TOL * s.max(1.0)).collect();
        let int8 = match m.view {
            View::Q4(_) => true,
            View::Q8(_) => cpu::int8_dots(),
            _ => false,
        };
        if int8 {
            let rows: Vec<(usize, f32)> = idx
                .iter()
                .map(|&j| j as usize)
                .zip(val.iter().copied())
                .collect();
            let mut bound = vec![0.0f32; m.n_out];
            reference::int8_bound(m, &rows, 0, rows.len(), &mut bound);
            for (l, b) in lim.iter_mut().zip(&bound) {
                *l += 1.001 * b;
            }
        }
        lim
    }

    /// Fast dense and sparse GEMV on every format against the scalar reference on the same packed
    /// weights, at sparsity 0 %, about 50 % and 100 %.
    #[test]
    fn packed_gemv_matches_reference() {
        for &(n_in, n_out) in PACK_SHAPES {
            let wt = rand_vec(n_in * n_out, 5);
            let x = rand_vec(n_in, 6);
            for dtype in Dtype::ALL {
                let p = PackedT::from_input_major(dtype, &wt, n_in, n_out).expect("pack");
                let m = p.mat();
                let dq = dequant_all(&p);
                let scale = abs_scale(&dq, n_in, n_out, &x);
                let (mut a, mut b) = (vec![0.0; n_out], vec![0.0; n_out]);
                let every: Vec<u32> = (0..n_in as u32).collect();
                reference::gemv_packed(&m, &x, &mut a);
                cpu::gemv(&m, &x, &mut b);
                assert_within(
                    &a,
                    &b,
                    &gemv_limits(&m, &every, &x, &scale),
                    &format!("dense {dtype:?} {n_in}x{n_out}"),
                );
                for t in [-1.0f32, 0.5, 2.0] {
                    let (idx, val) = reference::compact_abs_gt(&x, t);
                    reference::gemv_packed_idx(&m, &idx, &val, &mut a);
                    let kept = cpu::gemv_sparse(&m, &x, t, &mut b);
                    assert_eq!(kept, idx.len());
                    assert_within(
                        &a,
                        &b,
                        &gemv_limits(&m, &idx, &val, &scale),
                        &format!("sparse t={t} {dtype:?} {n_in}x{n_out}"),
                    );
                    if t >= 2.0 {
                        assert!(b.iter().all(|&v| v == 0.0), "100% sparse must give zeros");
                    }
                    // Per-channel thresholds around t (the weight-aware masks' kernel).
                    let tc: Vec<f32> = (0..n_in)
                        .map(|j| t * (0.5 + (j % 3) as f32 * 0.5))
                        .collect();
                    let (idx, val) = reference::compact_abs_gt_channel(&x, &tc);
                    reference::gemv_packed_idx(&m, &idx, &val, &mut a);
                    let kept = cpu::gemv_sparse_channels(&m, &x, &tc, &mut b);
                    assert_eq!(kept, idx.len());
                    assert_within(
                        &a,
                        &b,
                        &gemv_limits(&m, &idx, &val, &scale),
                        &format!("per-channel t~{t} {dtype:?} {n_in}x{n_out}"),
                    );
                }
            }
        }
    }

    /// A NaN in the input reaches every output of the dense GEMV, in every format: the integer
    /// passes' rounding must not skip it (q8's makes its group's step NaN, q4's minimums' sum
    /// carries it), as the f32 products do not.
    #[test]
    fn gemv_passes_nan_on() {
        let (n_in, n_out) = (75, 32 * 9 + 5);
        let wt = rand_vec(n_in * n_out, 40);
        for dtype in Dtype::ALL {
            let p = PackedT::from_input_major(dtype, &wt, n_in, n_out).expect("pack");
            assert_nan_reaches_every_output(n_in, n_out, &format!("gemv {dtype:?}"), |x, y| {
                cpu::gemv(&p.mat(), x, y)
            });
        }
    }

    /// Several GEMVs on one input in one parallel section (q/k/v, gate/up), each with its own
    /// format, size and mask (dense, 0 %, about 50 % and 100 % sparse, per-channel), against the
    /// scalar reference of each alone.
    #[test]
    fn gemv_many_matches_each_alone() {
        let n_in = 577;
        let x = rand_vec(n_in, 40);
        let tc: Vec<f32> = (0..n_in).map(|j| 0.3 + (j % 5) as f32 * 0.1).collect();
        let shapes = [
            (Dtype::F16, 1029, cpu::Mask::Threshold(0.5)),
            (Dtype::Q8, 77, cpu::Mask::Dense),
            (Dtype::Q4, 300, cpu::Mask::Channels(&tc)),
            (Dtype::Bf16, 33, cpu::Mask::Threshold(2.0)),
        ];
        for masks_of_f32 in [cpu::Mask::Threshold(-1.0), cpu::Mask::Dense] {
            let packed: Vec<PackedT> = shapes
                .iter()
                .enumerate()
                .map(|(i, &(dtype, n_out, _))| {
                    let wt = rand_vec(n_in * n_out, 41 + i as u64);
                    PackedT::from_input_major(dtype, &wt, n_in, n_out).expect("pack")
                })
                .chain(std::iter::once(
                    PackedT::from_input_major(Dtype::F32, &rand_vec(n_in * 5, 45), n_in, 5)
                        .expect("pack"),
                ))
                .collect();
            let masks: Vec<cpu::Mask> = shapes
                .iter()
                .map(|s| s.2)
                .chain(std::iter::once(masks_of_f32))
                .collect();
            // Four at a time (the most one call takes), in two groups.
            for group in [0..4, 3..5] {
                let mut ys: Vec<Vec<f32>> = packed[group.clone()]
                    .iter()
                    .map(|p| vec![f32::NAN; p.n_out])
                    .collect();
                let mut gemvs: Vec<cpu::Gemv> = packed[group.clone()]
                    .iter()
                    .zip(&masks[group.clone()])
                    .zip(ys.iter_mut())
                    .map(|((p, &mask), y)| cpu::Gemv {
                        w: p.mat(),
                        mask,
                        y,
                    })
                    .collect();
                let kept = cpu::gemv_many(&x, &mut gemvs);
                for (k, ((p, mask), y)) in packed[group.clone()]
                    .iter()
                    .zip(&masks[group.clone()])
                    .zip(&ys)
                    .enumerate()
                {
                    let (idx, val) = match *mask {
                        cpu::Mask::Dense => ((0..n_in as u32).collect(), x.clone()),
                        cpu::Mask::Threshold(t) => reference::compact_abs_gt(&x, t),
                        cpu::Mask::Channels(t) => reference::compact_abs_gt_channel(&x, t),
                    };
                    assert_eq!(kept[k], idx.len(), "kept inputs of GEMV {k}");
                    let mut want = vec![0.0; p.n_out];
                    reference::gemv_packed_idx(&p.mat(), &idx, &val, &mut want);
                    let scale = abs_scale(&dequant_all(p), n_in, p.n_out, &x);
                    let lim = gemv_limits(&p.mat(), &idx, &val, &scale);
                    assert_within(&want, y, &lim, &format!("gemv_many {k}"));
                }
            }
        }
    }

    /// GEMVs with short rows are split over input rows, each item taking an equal share of the
    /// kept rows: kept rows all at one end, a single one, the first and last, and none.
    #[test]
    fn row_split_with_clustered_or_few_kept_rows() {
        let (n_in, n_out) = (301, 40);
        let dense = rand_vec(n_in, 50);
        let cases: Vec<Vec<usize>> = vec![
            vec![300],
            vec![0, 300],
            vec![],
            (0..7).collect(),
            (280..301).collect(),
        ];
        for dtype in [Dtype::F32, Dtype::F16, Dtype::Bf16, Dtype::Q8, Dtype::Q4] {
            let wt = rand_vec(n_in * n_out, 51);
            let p = PackedT::from_input_major(dtype, &wt, n_in, n_out).expect("pack");
            for kept in &cases {
                // Kept inputs are the large ones: |x| > 1.5 against the threshold 1, the others < 0.5.
                let x: Vec<f32> = (0..n_in)
                    .map(|j| {
                        if kept.contains(&j) {
                            2.5 + dense[j]
                        } else {
                            0.5 * dense[j]
                        }
                    })
                    .collect();
                let mut y = vec![f32::NAN; n_out];
                cpu::gemv_sparse(&p.mat(), &x, 1.0, &mut y);
                let (idx, val) = reference::compact_abs_gt(&x, 1.0);
                assert_eq!(idx.len(), kept.len());
                let mut want = vec![0.0; n_out];
                reference::gemv_packed_idx(&p.mat(), &idx, &val, &mut want);
                let scale = abs_scale(&dequant_all(&p), n_in, n_out, &x);
                assert_within(
                    &want,
                    &y,
                    &gemv_limits(&p.mat(), &idx, &val, &scale),
                    &format!("{dtype:?} kept {kept:?}"),
                );
            }
        }
    }

    /// The benchmarks' threshold zeroes the requested fraction (rounded down), keeps all at
    /// s = 0 and zeroes all at s = 1.
    #[test]
    fn abs_threshold_zeroes_the_fraction() {
        let x = rand_vec(1000, 46);
        for (s, zeroed) in [
            (0.0, 0),
            (0.0005, 0),
            (0.25, 250),
            (0.5, 500),
            (0.999, 999),
            (1.0, 1000),
            (1.5, 1000),
        ] {
            let t = reference::abs_threshold(&x, s);
            assert_eq!(x.iter().filter(|v| v.abs() <= t).count(), zeroed, "s = {s}");
        }
    }

    #[test]
    fn compaction_matches_reference() {
        let x = rand_vec(1029, 8);
        let t = rand_vec(1029, 9)
            .iter()
            .map(|v| v.abs())
            .collect::<Vec<f32>>();
        let (mut idx, mut val) = (vec![0u32; x.len()], vec![0.0f32; x.len()]);
        let n = cpu::compact_abs_gt(&x, 0.3, &mut idx, &mut val);
        let (ri, rv) = reference::compact_abs_gt(&x, 0.3);
        assert_eq!((&idx[..n], &val[..n]), (&ri[..], &rv[..]));
        let n = cpu::compact_abs_gt_channel(&x, &t, &mut idx, &mut val);
        let (ri, rv) = reference::compact_abs_gt_channel(&x, &t);
        assert_eq!((&idx[..n], &val[..n]), (&ri[..], &rv[..]));
        // The per-channel list feeds the same GEMV.
        let wt = rand_vec(1029 * 77, 10);
        let p = PackedT::from_input_major(Dtype::Q8, &wt, 1029, 77).expect("pack");
        let (mut a, mut b) = (vec![0.0; 77], vec![0.0; 77]);
        reference::gemv_packed_idx(&p.mat(), &ri, &rv, &mut a);
        cpu::gemv_idx(&p.mat(), &idx[..n], &val[..n], &mut b);
        let scale = abs_scale(&dequant_all(&p), 1029, 77, &x);
        let lim = gemv_limits(&p.mat(), &ri, &rv, &scale);
        assert_within(&a, &b, &lim, "per-channel q8");
    }

    /// The prefill product on every format against the scalar reference on the same packed
    /// weights, exact up to summation order: up to [`cpu::MATMUL_ROWS_UP_TO`] positions as
    /// rows (a part batch, a full one, and seven rows over several blocks of the wide tile's
    /// kept rows and columns), longer pieces as a product over more than one tile of inputs
    /// and a partial block of outputs; no positions, and no inputs (zeros, written over what
    /// the output held) as rows and as a product.
    #[test]
    fn packed_matmul_matches_reference() {
        for (n_tok, n_in, n_out) in [
            (5, 37, 300),
            (8, 300, 577),
            (7, 600, 2100),
            (9, 37, 300),
            (40, 300, 577),
            (0, 37, 300),
            (3, 0, 40),
            (9, 0, 40),
        ] {
            let wt = rand_vec(n_in * n_out, 12);
            let x = rand_vec(n_tok * n_in, 13);
            for dtype in Dtype::ALL {
                let p = PackedT::from_input_major(dtype, &wt, n_in, n_out).expect("pack");
                let dq = dequant_all(&p);
                let (mut a, mut b) = (vec![0.0; n_tok * n_out], vec![f32::NAN; n_tok * n_out]);
                reference::matmul_t(&x, n_tok, &dq, n_in, n_out, &mut a);
                cpu::matmul_packed(&x, n_tok, &p.mat(), &mut b);
                for t in 0..n_tok {
                    let scale = abs_scale(&dq, n_in, n_out, &x[t * n_in..(t + 1) * n_in]);
                    assert_close(
                        &a[t * n_out..(t + 1) * n_out],
                        &b[t * n_out..(t + 1) * n_out],
                        &scale,
                        GEMV_REL_TOL,
                        &format!("matmul {dtype:?}, {n_tok} positions, position {t}"),
                    );
                }
            }
        }
    }
}

/// The output-major formats (LM head, embeddings): GGML's Q8_0 / Q4_1 blocks along the input,
/// the dot-product GEMV and the prefill matmul against the scalar reference.
mod rows_formats {
    use super::*;
    use teal_kernels::packed::{Data, Dtype, PackedRows, GROUP};
    use teal_kernels::quant::{dequantize, GgmlType};

    /// Dot products of up to ~1000 terms, reordered (blocked, four lanes, FMA): relative to the
    /// sum of |terms|, as [`GEMV_REL_TOL`].
    const DOT_REL_TOL: f32 = GEMV_REL_TOL;
    /// q8 error per weight relative to its block's largest |w|: half a step plus the f16 scale.
    const Q8_ROW_TOL: f32 = 0.5 / 127.0 + 1.0 / 1024.0;
    /// q4 error per weight relative to its block's range, plus the f16 minimum's rounding.
    const Q4_ROW_TOL: f32 = 0.5 / 15.0 + 1.0 / 1024.0;
    const F16_ROW_TOL: f32 = 1.0 / 2048.0;
    const BF16_ROW_TOL: f32 = 1.0 / 256.0;

    /// `(n_out, n_in)`, odd sizes included (partial last blocks, row counts not a multiple of 4).
    const ROW_SHAPES: &[(usize, usize)] = &[
        (1, 1),
        (37, 77),
        (13, 1029),
        (1000, 577),
        (64, 576),
        (3, 31),
    ];

    fn dequant_all(p: &PackedRows) -> Vec<f32> {
        let m = p.mat();
        let mut out = vec![0.0; p.n_in * p.n_out];
        for o in 0..p.n_out {
            m.dequant_row(o, &mut out[o * p.n_in..(o + 1) * p.n_in]);
        }
        out
    }

    /// Sum of |w_oi x_i| per output row.
    fn dot_scale(w: &[f32], n_out: usize, n_in: usize, x: &[f32]) -> Vec<f32> {
        (0..n_out)
            .map(|o| {
                w[o * n_in..(o + 1) * n_in]
                    .iter()
                    .zip(x)
                    .map(|(a, b)| (a * b).abs())
                    .sum()
            })
            .collect()
    }

    #[test]
    fn rows_pack_is_within_format_error() {
        for &(n_out, n_in) in ROW_SHAPES {
            let w = rand_vec(n_out * n_in, 31);
            for dtype in Dtype::ALL {
                let p = PackedRows::from_rows(dtype, w.clone(), n_out, n_in).expect("pack");
                assert_eq!(p.dtype(), dtype);
                let dq = dequant_all(&p);
                for o in 0..n_out {
                    let row = &w[o * n_in..(o + 1) * n_in];
                    for (g, chunk) in row.chunks(GROUP).enumerate() {
                        let amax = chunk.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                        let lo = chunk.iter().fold(f32::INFINITY, |a, &v| a.min(v));
                        let hi = chunk.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
                        for (i, &v) in chunk.iter().enumerate() {
                            let got = dq[o * n_in + g * GROUP + i];
                            let lim = match dtype {
                                Dtype::F32 => 0.0,
                                Dtype::F16 => F16_ROW_TOL * v.abs(),
                                Dtype::Bf16 => BF16_ROW_TOL * v.abs(),
                                Dtype::Q8 => Q8_ROW_TOL * amax,
                                Dtype::Q4 => Q4_ROW_TOL * (hi - lo) + amax / 1024.0,
                            };
                            assert!(
                                (got - v).abs() <= lim,
                                "{dtype:?} {n_out}x{n_in} [{o},{}]: {v} -> {got}",
                                g * GROUP + i
                            );
                        }
                    }
                }
            }
        }
    }

    /// The blocks are GGML's: ggml's own dequantization of a row's bytes gives the same values,
    /// and values already on a Q8_0 grid are packed back to the same bytes (a Q8_0-stored
    /// embedding is reproduced exactly).
    #[test]
    fn rows_blocks_are_ggml_q8_0_and_q4_1() {
        let (n_out, n_in) = (5, 96);
        let w = rand_vec(n_out * n_in, 32);
        for (dtype, ty) in [(Dtype::Q8, GgmlType::Q8_0), (Dtype::Q4, GgmlType::Q4_1)] {
            let p = PackedRows::from_rows(dtype, w.clone(), n_out, n_in).expect("pack");
            let bytes = match &p.data {
                Data::Q8(b) | Data::Q4(b) => b.clone(),
                _ => unreachable!("quantized format"),
            };
            let mut ggml = vec![0.0f32; n_out * n_in];
            dequantize(ty, &bytes, &mut ggml).expect("ggml layout");
            assert_eq!(ggml, dequant_all(&p), "{ty}");
            if dtype == Dtype::Q8 {
                let again = PackedRows::from_rows(dtype, ggml, n_out, n_in).expect("pack");
                match &again.data {
                    Data::Q8(b) => assert_eq!(b, &bytes, "Q8_0 values re-packed"),
                    _ => unreachable!("q8"),
                }
            }
        }
    }

    #[test]
    fn rows_pack_rejects_non_finite_and_f16_overflow() {
        let mut w = rand_vec(64, 33);
        w[5] = 1e6;
        assert!(PackedRows::from_rows(Dtype::F16, w.clone(), 8, 8).is_err());
        assert!(PackedRows::from_rows(Dtype::Q8, w.clone(), 8, 8).is_err());
        assert!(PackedRows::from_rows(Dtype::Bf16, w.clone(), 8, 8).is_ok());
        w[5] = f32::NAN;
        assert!(PackedRows::from_rows(Dtype::F32, w.clone(), 8, 8).is_err());
        assert!(PackedRows::from_rows(Dtype::F32, w[..10].to_vec(), 8, 8).is_err());
    }

    #[test]
    fn gemv_dot_matches_reference() {
        for &(n_out, n_in) in ROW_SHAPES {
            let w = rand_vec(n_out * n_in, 34);
            let x = rand_vec(n_in, 35);
            for dtype in Dtype::ALL {
                let p = PackedRows::from_rows(dtype, w.clone(), n_out, n_in).expect("pack");
                let scale = dot_scale(&dequant_all(&p), n_out, n_in, &x);
                let (mut a, mut b) = (vec![0.0; n_out], vec![0.0; n_out]);
                reference::gemv_dot(&p.mat(), &x, &mut a);
                cpu::gemv_dot(&p.mat(), &x, &mut b);
                let what = format!("gemv_dot {dtype:?} {n_out}x{n_in}");
                if matches!(dtype, Dtype::Q8 | Dtype::Q4) && cpu::int8_dots() {
                    // 8-bit activations: the kernel against its definition, the definition
                    // within its rounding bound of the exact product.
                    let (mut d, mut bound) = (vec![0.0; n_out], vec![0.0; n_out]);
                    reference::gemv_dot_int8(&p.mat(), &x, &mut d);
                    assert_close(&d, &b, &scale, DOT_REL_TOL, &what);
                    reference::dot_int8_bound(&p.mat(), &x, &mut bound);
                    let lim: Vec<f32> = bound
                        .iter()
                        .zip(&scale)
                        .map(|(b, s)| 1.001 * b + DOT_REL_TOL * s.max(1.0))
                        .collect();
                    assert_within(&a, &d, &lim, &format!("{what}, definition"));
                } else {
                    assert_close(&a, &b, &scale, DOT_REL_TOL, &what);
                }
            }
        }
    }

    /// A NaN in the input reaches every output of the LM head's dots, in every format and on
    /// both paths (the 8-bit activations' block scale turns NaN rather than skipping it), so
    /// that the sampler reports it instead of reading finite logits.
    #[test]
    fn gemv_dot_passes_nan_on() {
        let (n_out, n_in) = (37, 77);
        let w = rand_vec(n_out * n_in, 38);
        for dtype in Dtype::ALL {
            let p = PackedRows::from_rows(dtype, w.clone(), n_out, n_in).expect("pack");
            assert_nan_reaches_every_output(n_in, n_out, &format!("gemv_dot {dtype:?}"), |x, y| {
                cpu::gemv_dot(&p.mat(), x, y)
            });
        }
    }

    #[test]
    fn matmul_dot_matches_reference() {
        let n_tok = 5;
        for &(n_out, n_in) in &[(300, 37), (1000, 577), (13, 1029)] {
            let w = rand_vec(n_out * n_in, 36);
            let x = rand_vec(n_tok * n_in, 37);
            for dtype in Dtype::ALL {
                let p = PackedRows::from_rows(dtype, w.clone(), n_out, n_in).expect("pack");
                let dq = dequant_all(&p);
                let mut b = vec![0.0; n_tok * n_out];
                cpu::matmul_dot(&x, n_tok, &p.mat(), &mut b);
                for t in 0..n_tok {
                    let xt = &x[t * n_in..(t + 1) * n_in];
                    let mut a = vec![0.0; n_out];
                    reference::gemv_dot(&p.mat(), xt, &mut a);
                    assert_close(
                        &a,
                        &b[t * n_out..(t + 1) * n_out],
                        &dot_scale(&dq, n_out, n_in, xt),
                        DOT_REL_TOL,
                        &format!("matmul_dot {dtype:?} {n_out}x{n_in} token {t}"),
                    );
                }
            }
        }
    }
}

/// An output-major matrix filled a slice of rows at a time equals the one packed at once, in
/// every format, including slices that end mid-way through the rows; a non-finite weight is
/// reported at its index in the whole matrix.
#[test]
fn packed_rows_pushed_in_slices_equal_packed_at_once() {
    use teal_kernels::packed::{Dtype, PackedRows};
    let (n_out, n_in) = (37, 70);
    let w = teal_kernels::rand::uniform(n_out * n_in, 77);
    for dtype in [Dtype::F32, Dtype::F16, Dtype::Bf16, Dtype::Q8, Dtype::Q4] {
        let whole = PackedRows::from_rows(dtype, w.clone(), n_out, n_in).unwrap();
        let mut parts = PackedRows::with_capacity(dtype, n_in, n_out);
        for r0 in (0..n_out).step_by(8) {
            let r1 = (r0 + 8).min(n_out);
            parts.push_rows(w[r0 * n_in..r1 * n_in].to_vec()).unwrap();
        }
        assert_eq!(parts.n_out, n_out);
        let (mut a, mut b) = (vec![0.0; n_in], vec![0.0; n_in]);
        for o in 0..n_out {
            whole.mat().dequant_row(o, &mut a);
            parts.mat().dequant_row(o, &mut b);
            assert_eq!(a, b, "{} row {o}", dtype.name());
        }
        assert_eq!(whole.bytes(), parts.bytes(), "{}", dtype.name());
    }
    let mut bad = w.clone();
    bad[20 * n_in + 3] = f32::NAN;
    let mut p = PackedRows::with_capacity(Dtype::Q8, n_in, n_out);
    p.push_rows(bad[..16 * n_in].to_vec()).unwrap();
    let e = p.push_rows(bad[16 * n_in..].to_vec()).unwrap_err();
    assert!(
        e.to_string().contains(&format!("weight {}", 20 * n_in + 3)),
        "{e}"
    );
}

/// A matrix whose view holds fewer weights than its sizes say (the fields are public) is
/// refused before any kernel reads it: the SIMD paths index the view by the sizes unchecked.
#[test]
#[should_panic(expected = "4 rows of 64 f32 weights need 256 values, the view holds 16")]
fn gemv_on_a_short_view_panics() {
    use teal_kernels::packed::{Mat, View};
    let small = vec![1.0f32; 16];
    let m = Mat {
        n_in: 4,
        n_out: 64,
        view: View::F32(&small),
    };
    let mut y = vec![0.0f32; 64];
    cpu::gemv(&m, &[1.0; 4], &mut y);
}

/// The same for an output-major matrix and the dot-product GEMV (a q8 view one byte short).
#[test]
#[should_panic(expected = "the view holds 101")]
fn gemv_dot_on_a_short_view_panics() {
    use teal_kernels::packed::{RowsMat, View, Q8_BLOCK};
    let bytes = vec![0u8; 3 * Q8_BLOCK - 1];
    let m = RowsMat {
        n_out: 3,
        n_in: 32,
        view: View::Q8(&bytes),
    };
    let mut y = vec![0.0f32; 3];
    cpu::gemv_dot(&m, &[1.0; 32], &mut y);
}
