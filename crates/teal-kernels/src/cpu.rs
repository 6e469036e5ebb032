//! Fast CPU paths: AVX2/FMA with run-time detection and a portable fallback, threaded over output
//! columns with rayon's persistent pool. Each function computes exactly what its namesake in
//! [`crate::reference`] computes (up to float summation order) and is tested against it.

use rayon::prelude::*;

/// Output columns per work item: a multiple of 8 (one AVX register) and small enough that one
/// tile of `y` stays in L1 while every input row streams past it.
const TILE: usize = 512;

/// A raw pointer that may cross threads: every user writes a disjoint range.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// Number of work items so that each thread of the pool gets a contiguous share of columns.
fn column_chunks(n_out: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let tiles = n_out.div_ceil(TILE);
    tiles.min(threads * 4).max(1)
}

/// Dense GEMV on input-major weights: `y = Wt^T x`.
pub fn gemv_t(wt: &[f32], n_in: usize, n_out: usize, x: &[f32], y: &mut [f32]) {
    gemv_t_impl(wt, n_in, n_out, x, None, y)
}

/// TEAL sparse GEMV with the `|x| > t` test fused: rows of zeroed inputs are never read.
pub fn gemv_t_sparse(wt: &[f32], n_in: usize, n_out: usize, x: &[f32], t: f32, y: &mut [f32]) {
    gemv_t_impl(wt, n_in, n_out, x, Some(t), y)
}

fn gemv_t_impl(wt: &[f32], n_in: usize, n_out: usize, x: &[f32], t: Option<f32>, y: &mut [f32]) {
    assert_eq!(wt.len(), n_in * n_out, "gemv_t: weight size");
    assert_eq!(x.len(), n_in, "gemv_t: input size");
    assert_eq!(y.len(), n_out, "gemv_t: output size");
    let chunks = column_chunks(n_out);
    let per = n_out.div_ceil(chunks).next_multiple_of(8);
    y.par_chunks_mut(per).enumerate().for_each(|(c, yc)| {
        let o0 = c * per;
        for (k, yt) in yc.chunks_mut(TILE).enumerate() {
            gemv_tile(wt, n_out, x, t, o0 + k * TILE, yt);
        }
    });
}

/// `yt = sum_{j kept} x[j] * wt[j, o0..o0+yt.len()]`.
fn gemv_tile(wt: &[f32], n_out: usize, x: &[f32], t: Option<f32>, o0: usize, yt: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the features were just detected; all indices are bounds-checked by slicing.
            unsafe { gemv_tile_avx2(wt, n_out, x, t, o0, yt) };
            return;
        }
    }
    gemv_tile_portable(wt, n_out, x, t, o0, yt)
}

fn gemv_tile_portable(
    wt: &[f32],
    n_out: usize,
    x: &[f32],
    t: Option<f32>,
    o0: usize,
    yt: &mut [f32],
) {
    yt.fill(0.0);
    let w = yt.len();
    for (j, &xj) in x.iter().enumerate() {
        if t.is_some_and(|t| xj.abs() <= t) {
            continue;
        }
        let row = &wt[j * n_out + o0..j * n_out + o0 + w];
        for (a, &b) in yt.iter_mut().zip(row) {
            *a += xj * b;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gemv_tile_avx2(
    wt: &[f32],
    n_out: usize,
    x: &[f32],
    t: Option<f32>,
    o0: usize,
    yt: &mut [f32],
) {
    use std::arch::x86_64::*;
    yt.fill(0.0);
    let w = yt.len();
    let w8 = w / 8 * 8;
    for (j, &xj) in x.iter().enumerate() {
        if t.is_some_and(|t| xj.abs() <= t) {
            continue;
        }
        let row = &wt[j * n_out + o0..j * n_out + o0 + w];
        let xv = _mm256_set1_ps(xj);
        let (rp, yp) = (row.as_ptr(), yt.as_mut_ptr());
        let mut i = 0;
        while i < w8 {
            let acc = _mm256_loadu_ps(yp.add(i));
            _mm256_storeu_ps(
                yp.add(i),
                _mm256_fmadd_ps(xv, _mm256_loadu_ps(rp.add(i)), acc),
            );
            i += 8;
        }
        for i in w8..w {
            yt[i] = xj.mul_add(row[i], yt[i]);
        }
    }
}

/// `y[T, out] = x[T, in] * wt[in, out]` (prefill), threaded over column blocks.
pub fn matmul_t(x: &[f32], n_tok: usize, wt: &[f32], n_in: usize, n_out: usize, y: &mut [f32]) {
    assert_eq!(x.len(), n_tok * n_in, "matmul_t: input size");
    assert_eq!(wt.len(), n_in * n_out, "matmul_t: weight size");
    assert_eq!(y.len(), n_tok * n_out, "matmul_t: output size");
    if n_tok == 1 {
        return gemv_t(wt, n_in, n_out, x, y);
    }
    let block = 256;
    let n_blocks = n_out.div_ceil(block);
    let yp = SendPtr(y.as_mut_ptr());
    (0..n_blocks).into_par_iter().for_each(|b| {
        let yp = yp;
        let o0 = b * block;
        let n = block.min(n_out - o0);
        // SAFETY: block b writes only columns o0..o0+n of y, disjoint from every other block;
        // all pointers stay inside the slices whose sizes were checked above.
        unsafe {
            matrixmultiply::sgemm(
                n_tok,
                n_in,
                n,
                1.0,
                x.as_ptr(),
                n_in as isize,
                1,
                wt.as_ptr().add(o0),
                n_out as isize,
                1,
                0.0,
                yp.0.add(o0),
                n_out as isize,
                1,
            );
        }
    });
}

/// Causal grouped-query attention, same contract as [`crate::reference::attention`], threaded
/// over query heads.
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
    let n_keys_max = pos0 + n_q;
    assert!(k.len() >= n_keys_max * kvs && v.len() >= n_keys_max * kvs);
    assert_eq!(q.len(), n_q * qs);
    assert_eq!(out.len(), n_q * qs);
    let op = SendPtr(out.as_mut_ptr());
    (0..n_head * n_q).into_par_iter().for_each_init(
        || vec![0.0f32; n_keys_max],
        |scores, i| {
            let op = op;
            let (h, t) = (i % n_head, i / n_head);
            let kh = h / group;
            let n_keys = pos0 + t + 1;
            let qh = &q[t * qs + h * hd..t * qs + (h + 1) * hd];
            let sc = &mut scores[..n_keys];
            for (p, s) in sc.iter_mut().enumerate() {
                *s = dot(qh, &k[p * kvs + kh * hd..p * kvs + (kh + 1) * hd]) * scale;
            }
            crate::reference::softmax(sc);
            // SAFETY: (t, h) owns out[t*qs + h*hd .. +hd], disjoint across work items.
            let o = unsafe { std::slice::from_raw_parts_mut(op.0.add(t * qs + h * hd), hd) };
            o.fill(0.0);
            for (p, &s) in sc.iter().enumerate() {
                axpy(s, &v[p * kvs + kh * hd..p * kvs + (kh + 1) * hd], o);
            }
        },
    );
}

/// `sum a[i] * b[i]`.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: features detected; lengths checked inside.
            return unsafe { dot_avx2(a, b) };
        }
    }
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let n8 = n / 8 * 8;
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    while i < n8 {
        acc = _mm256_fmadd_ps(
            _mm256_loadu_ps(a.as_ptr().add(i)),
            _mm256_loadu_ps(b.as_ptr().add(i)),
            acc,
        );
        i += 8;
    }
    let mut buf = [0.0f32; 8];
    _mm256_storeu_ps(buf.as_mut_ptr(), acc);
    let mut s: f32 = buf.iter().sum();
    for i in n8..n {
        s += a[i] * b[i];
    }
    s
}

/// `y += a * x`.
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: features detected; lengths checked inside.
            return unsafe { axpy_avx2(a, x, y) };
        }
    }
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_avx2(a: f32, x: &[f32], y: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = x.len().min(y.len());
    let n8 = n / 8 * 8;
    let av = _mm256_set1_ps(a);
    let mut i = 0;
    while i < n8 {
        let yv = _mm256_loadu_ps(y.as_ptr().add(i));
        _mm256_storeu_ps(
            y.as_mut_ptr().add(i),
            _mm256_fmadd_ps(av, _mm256_loadu_ps(x.as_ptr().add(i)), yv),
        );
        i += 8;
    }
    for i in n8..n {
        y[i] = a.mul_add(x[i], y[i]);
    }
}

/// Decode attention of one query position over `n_keys` cached positions, threaded over query
/// heads. `scores` is caller-owned scratch of at least `n_head * n_keys` values, so a decode step
/// allocates nothing. Same result as [`crate::reference::attention`] with `n_q = 1`,
/// `pos0 = n_keys - 1`.
#[allow(clippy::too_many_arguments)]
pub fn attention_decode(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n_keys: usize,
    n_head: usize,
    n_kv_head: usize,
    hd: usize,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let group = n_head / n_kv_head;
    let scale = 1.0 / (hd as f32).sqrt();
    let kvs = n_kv_head * hd;
    assert!(k.len() >= n_keys * kvs && v.len() >= n_keys * kvs);
    assert!(scores.len() >= n_head * n_keys);
    assert_eq!(q.len(), n_head * hd);
    assert_eq!(out.len(), n_head * hd);
    out.par_chunks_mut(hd)
        .zip(scores[..n_head * n_keys].par_chunks_mut(n_keys))
        .enumerate()
        .for_each(|(h, (o, sc))| {
            let kh = h / group;
            let qh = &q[h * hd..(h + 1) * hd];
            for (p, s) in sc.iter_mut().enumerate() {
                *s = dot(qh, &k[p * kvs + kh * hd..p * kvs + (kh + 1) * hd]) * scale;
            }
            crate::reference::softmax(sc);
            o.fill(0.0);
            for (p, &s) in sc.iter().enumerate() {
                axpy(s, &v[p * kvs + kh * hd..p * kvs + (kh + 1) * hd], o);
            }
        });
}
