//! Every fast CPU kernel against its scalar reference, at sparsity 0%, 100% and odd sizes.

use teal_kernels::{cpu, reference};

/// f32 sums of up to a few thousand terms in a different order: relative to the sum of |terms|.
const GEMV_REL_TOL: f32 = 1e-5;
const ATTN_TOL: f32 = 1e-5;

/// Deterministic pseudo-random values in [-1, 1) (xorshift), so the tests need no extra crate.
fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

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
