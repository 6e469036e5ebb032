//! Every CUDA kernel against its scalar reference, at sparsity 0%, 50%, 100% and odd sizes.
//! Needs a GPU with a driver and libnvrtc; without a driver or a GPU every test prints why and
//! passes (CI has no GPU). Run them on the GPU machine with the test binary.

use teal_kernels::cuda::{
    try_gpu, DeviceBuffer, GemvOpts, Gpu, Norm, Prepare, Threshold, WeightDtype, NON_FINITE,
};
use teal_kernels::reference;

/// GEMV: f32 accumulation in another order than the reference, relative to sum |x_j w_jo|.
const GPU_GEMV_REL_TOL: f32 = 2e-5;
/// RMSNorm, RoPE, SiLU*mul: a few f32 roundings apart (GPU expf / sqrt vs Rust's).
const GPU_ELEMWISE_TOL: f32 = 2e-6;
/// Decode attention: softmax and weighted sum over up to a few hundred keys.
const GPU_ATTN_TOL: f32 = 2e-5;

fn gpu() -> Option<Gpu> {
    match try_gpu(0) {
        Ok(Some(g)) => Some(g),
        Ok(None) => {
            let why = teal_kernels::cuda::Gpu::new(0).err().map(|e| e.to_string());
            eprintln!("skipping GPU test: {}", why.unwrap_or_default());
            None
        }
        Err(e) => panic!("GPU present but the backend failed: {e}"),
    }
}

use teal_kernels::rand::uniform as rand_vec;

fn assert_close(got: &[f32], want: &[f32], scale: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for i in 0..got.len() {
        let lim = tol * scale[i].max(1.0);
        assert!(
            got[i].is_finite() && (got[i] - want[i]).abs() <= lim,
            "{what}: index {i}: gpu {} vs reference {} (limit {lim})",
            got[i],
            want[i]
        );
    }
}

/// [`assert_close`] with the same limit `tol` for every element (values of order one).
fn assert_close_abs(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_close(got, want, &vec![1.0; want.len()], tol, what);
}

/// |x| quantile: the threshold that zeroes a fraction `s` of x.
fn threshold_for(x: &[f32], s: f64) -> f32 {
    if s <= 0.0 {
        return -1.0;
    }
    let mut a: Vec<f32> = x.iter().map(|v| v.abs()).collect();
    a.sort_by(f32::total_cmp);
    let k = ((s * a.len() as f64).ceil() as usize).clamp(1, a.len());
    a[k - 1]
}

/// Per-channel thresholds over the rows of `v` (`n_in` wide): channel j's at 1.5 |v[0, j]| (the
/// first row's input dropped) for a fraction `s` of the channels, at 0.5 |v[0, j]| (kept) for
/// the others; every one negative at s = 0, infinite at s = 1. Each is at least 1e-3 relative
/// from every value of its channel, so that a value computed in another order (RMSNorm,
/// SiLU*mul) falls on the same side on the GPU.
fn channel_thresholds(v: &[f32], n_in: usize, s: f64, seed: u64) -> Vec<f32> {
    if s <= 0.0 {
        return vec![-1.0; n_in];
    }
    if s >= 1.0 {
        return vec![f32::INFINITY; n_in];
    }
    let u = rand_vec(n_in, seed);
    (0..n_in)
        .map(|j| {
            let col: Vec<f32> = v.iter().skip(j).step_by(n_in).map(|x| x.abs()).collect();
            let drop = f64::from(u[j] + 1.0) / 2.0 < s;
            let mut t = col[0] * if drop { 1.5 } else { 0.5 };
            while col.iter().any(|&a| (a - t).abs() <= 1e-3 * a.max(t)) {
                t = t * 1.01 + 1e-6;
            }
            t
        })
        .collect()
}

/// The reference of a GEMV on an input already sparsified (`xs`, one row), and its scale
/// `sum_j |xs_j w_jo|` (the error bound's).
fn gemv_and_scale(wq: &[f32], n_in: usize, n_out: usize, xs: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (mut want, mut scale) = (vec![0.0; n_out], vec![0.0; n_out]);
    reference::gemv_t(wq, n_in, n_out, xs, &mut want);
    let wa: Vec<f32> = wq.iter().map(|v| v.abs()).collect();
    let xa: Vec<f32> = xs.iter().map(|v| v.abs()).collect();
    reference::gemv_t(&wa, n_in, n_out, &xa, &mut scale);
    (want, scale)
}

const SHAPES: &[(usize, usize)] = &[
    (1, 1),
    (3, 7),
    (17, 9),
    (64, 64),
    (576, 1536),
    (1536, 577),
    (13, 1029),
    (4096, 1024),
    (3000, 2056),
];

/// A case's thresholds: per input, as the reference applies them (per channel,
/// [`channel_thresholds`] of `v`; else `t` for every input), and as the kernel takes them.
struct CaseThresholds {
    per_input: Vec<f32>,
    device: DeviceBuffer<f32>,
    scalar: Option<f32>,
}

impl CaseThresholds {
    fn new(g: &Gpu, v: &[f32], n_in: usize, s: f64, t: f32, per_channel: bool, seed: u64) -> Self {
        let per_input = if per_channel {
            channel_thresholds(v, n_in, s, seed)
        } else {
            vec![t; n_in]
        };
        CaseThresholds {
            device: g.upload(&per_input).unwrap(),
            per_input,
            scalar: (!per_channel).then_some(t),
        }
    }

    fn kernel(&self) -> Threshold<'_> {
        match self.scalar {
            Some(t) => Threshold::Scalar(t),
            None => Threshold::Channels(&self.device),
        }
    }
}

/// The GEMV of `batch` rows against the reference at sparsity `s` of the first row: one
/// threshold for the whole batch, or with `per_channel` one per input
/// ([`channel_thresholds`]).
fn check_gemv(
    g: &Gpu,
    n_in: usize,
    n_out: usize,
    dtype: WeightDtype,
    batch: usize,
    s: f64,
    per_channel: bool,
) {
    let wt = rand_vec(n_in * n_out, 11 + n_in as u64);
    let bits = dtype.encode(&wt);
    let wq: Vec<f32> = bits.iter().map(|&b| dtype.decode(b)).collect();
    let x = rand_vec(batch * n_in, 5 + n_out as u64);
    // One threshold for the whole batch, from the first row.
    let t = if s >= 1.0 {
        f32::INFINITY
    } else {
        threshold_for(&x[..n_in], s)
    };
    let ct = CaseThresholds::new(g, &x, n_in, s, t, per_channel, 6 + n_in as u64);
    let (tc, th) = (&ct.per_input, ct.kernel());
    let mut lin = g.linear_from_bits(&bits, n_in, n_out, dtype, &[]).unwrap();
    let xd = g.upload(&x).unwrap();
    let mut yd = g.upload(&vec![f32::NAN; batch * n_out]).unwrap();
    // Several plans, each twice: the workspace must be clean after every call. 296 rows: a
    // multiple of 8 but not of 32, as the fitted whole-wave splits can be.
    for rows in [32usize, 96, 296, 1024] {
        let plan = Some(teal_kernels::cuda::GemvPlan {
            rows_per_chunk: rows,
        });
        for _ in 0..2 {
            g.gemv(
                &mut lin,
                &xd,
                &mut yd,
                batch,
                &[th],
                GemvOpts {
                    plan,
                    ..Default::default()
                },
            )
            .unwrap();
            let y = g.download(&yd).unwrap();
            for b in 0..batch {
                let xb = &x[b * n_in..(b + 1) * n_in];
                let mut xs = vec![0.0; n_in];
                reference::sparsify_channels(xb, tc, &mut xs);
                let (want, scale) = gemv_and_scale(&wq, n_in, n_out, &xs);
                let what = format!(
                    "gemv {n_in}x{n_out} {} batch {batch} row {b} s {s} per-channel \
                     {per_channel} rows/chunk {rows}",
                    dtype.name()
                );
                assert_close(
                    &y[b * n_out..(b + 1) * n_out],
                    &want,
                    &scale,
                    GPU_GEMV_REL_TOL,
                    &what,
                );
            }
        }
    }
}

#[test]
fn gemv_matches_reference_dense_sparse_empty() {
    let Some(g) = gpu() else { return };
    for &(n_in, n_out) in SHAPES {
        for dtype in [WeightDtype::F16, WeightDtype::Bf16] {
            for s in [0.0, 0.5, 1.0] {
                check_gemv(&g, n_in, n_out, dtype, 1, s, false);
            }
        }
    }
}

/// Per-channel thresholds (`Threshold::Channels`): every one negative (0 %), about half the
/// inputs dropped, every one infinite (100 %), at every shape, batch 1, 3 and 8 (each row
/// thresholded on its own, the rows read their union).
#[test]
fn gemv_per_channel_thresholds_match_reference() {
    let Some(g) = gpu() else { return };
    for &(n_in, n_out) in SHAPES {
        for dtype in [WeightDtype::F16, WeightDtype::Bf16] {
            for s in [0.0, 0.5, 1.0] {
                for batch in [1, 3, 8] {
                    check_gemv(&g, n_in, n_out, dtype, batch, s, true);
                }
            }
        }
    }
    // A vector shorter than the input: a clear error, no launch.
    let mut lin = g
        .linear_from_f32(&[0.5; 64], 8, 8, WeightDtype::F16, &[])
        .unwrap();
    let (xd, mut yd, short) = (
        g.zeros::<f32>(8).unwrap(),
        g.zeros::<f32>(8).unwrap(),
        g.zeros::<f32>(7).unwrap(),
    );
    let e = g
        .gemv(
            &mut lin,
            &xd,
            &mut yd,
            1,
            &[Threshold::Channels(&short)],
            GemvOpts::default(),
        )
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("7 per-channel thresholds for 8 inputs"),
        "{e}"
    );
}

#[test]
fn gemv_batches_up_to_eight() {
    let Some(g) = gpu() else { return };
    for batch in 1..=8 {
        for dtype in [WeightDtype::F16, WeightDtype::Bf16] {
            check_gemv(&g, 333, 264, dtype, batch, 0.6, false);
            check_gemv(&g, 1024, 517, dtype, batch, 0.0, false);
        }
    }
}

/// Three fused segments with a threshold each over a residual (beta 1, then accumulating with
/// and without programmatic dependent launch): three scalar thresholds, then per-channel
/// thresholds for the first and last segments with a scalar one for the middle.
#[test]
fn gemv_fused_segments_and_residual_add() {
    let Some(mut g) = gpu() else { return };
    let (n_in, segs) = (700, [512usize, 768, 1000]);
    let n_out = segs[2];
    let dtype = WeightDtype::Bf16;
    let wt = rand_vec(n_in * n_out, 3);
    let bits = dtype.encode(&wt);
    let wq: Vec<f32> = bits.iter().map(|&b| dtype.decode(b)).collect();
    let x = rand_vec(n_in, 4);
    let scalar = [
        threshold_for(&x, 0.3),
        threshold_for(&x, 0.5),
        threshold_for(&x, 0.9),
    ];
    let (first, last) = (
        channel_thresholds(&x, n_in, 0.3, 5),
        channel_thresholds(&x, n_in, 0.8, 6),
    );
    let (first_d, last_d) = (g.upload(&first).unwrap(), g.upload(&last).unwrap());
    let mut lin = g
        .linear_from_bits(&bits, n_in, n_out, dtype, &segs)
        .unwrap();
    let resid = rand_vec(n_out, 9);
    let xd = g.upload(&x).unwrap();
    let cases = [
        (scalar.map(Threshold::Scalar), scalar.map(|t| vec![t; n_in])),
        (
            [
                Threshold::Channels(&first_d),
                Threshold::Scalar(scalar[1]),
                Threshold::Channels(&last_d),
            ],
            [first.clone(), vec![scalar[1]; n_in], last.clone()],
        ),
    ];
    for (ts, host) in &cases {
        let mut yd = g.upload(&resid).unwrap();
        g.gemv(
            &mut lin,
            &xd,
            &mut yd,
            1,
            ts,
            GemvOpts {
                beta: 1.0,
                ..Default::default()
            },
        )
        .unwrap();
        let y = g.download(&yd).unwrap();
        // The same through f32 atomics straight into the residual, with and without
        // programmatic dependent launch.
        for pdl in [false, true] {
            g.set_programmatic_launch(pdl);
            let mut yd2 = g.upload(&resid).unwrap();
            g.gemv(
                &mut lin,
                &xd,
                &mut yd2,
                1,
                ts,
                GemvOpts {
                    accumulate: true,
                    ..Default::default()
                },
            )
            .unwrap();
            let y2 = g.download(&yd2).unwrap();
            check_fused(&y2, &wq, &x, &resid, &segs, host, n_in, n_out);
        }
        check_fused(&y, &wq, &x, &resid, &segs, host, n_in, n_out);
    }
}

/// Three projections written side by side into one output by three launches at offsets
/// (q|k|v whose boundaries are not on GEMV tiles), with different thresholds, over a residual;
/// batch 1, and batch 3 with rows of the fused width (`y_stride`), self-contained and
/// accumulating.
#[test]
fn gemv_output_offsets_match_reference() {
    let Some(g) = gpu() else { return };
    let (n_in, segs) = (577, [576usize, 768, 960]);
    let n_out = segs[2];
    let dtype = WeightDtype::F16;
    let wt = rand_vec(n_in * n_out, 21);
    let wq: Vec<f32> = dtype.encode(&wt).iter().map(|&b| dtype.decode(b)).collect();
    for (batch, accumulate) in [(1usize, false), (3, false), (3, true)] {
        let x = rand_vec(batch * n_in, 22);
        let ts = [threshold_for(&x, 0.5), -1.0, threshold_for(&x, 0.8)];
        let resid = rand_vec(batch * n_out, 23);
        let xd = g.upload(&x).unwrap();
        let mut yd = g.upload(&resid).unwrap();
        let mut start = 0;
        for (&end, &t) in segs.iter().zip(&ts) {
            let cols = end - start;
            let part: Vec<f32> = (0..n_in)
                .flat_map(|j| wq[j * n_out + start..j * n_out + end].to_vec())
                .collect();
            let mut lin = g.linear_from_f32(&part, n_in, cols, dtype, &[]).unwrap();
            let opts = GemvOpts {
                beta: 1.0,
                accumulate,
                y_offset: start,
                y_stride: if batch > 1 { n_out } else { 0 },
                ..Default::default()
            };
            g.gemv(&mut lin, &xd, &mut yd, batch, &[Threshold::Scalar(t)], opts)
                .unwrap();
            start = end;
        }
        let y = g.download(&yd).unwrap();
        for b in 0..batch {
            let row = |v: &[f32], n: usize| v[b * n..(b + 1) * n].to_vec();
            check_fused(
                &row(&y, n_out),
                &wq,
                &row(&x, n_in),
                &row(&resid, n_out),
                &segs,
                &ts.map(|t| vec![t; n_in]),
                n_in,
                n_out,
            );
        }
    }
    // A row too narrow for the columns at the offset: a clear error, no launch.
    let bad = GemvOpts {
        y_offset: 1,
        y_stride: 8,
        ..Default::default()
    };
    let mut lin = g
        .linear_from_f32(&wq[..n_in * 8], n_in, 8, dtype, &[])
        .unwrap();
    let (xd, mut yd) = (g.zeros(2 * n_in).unwrap(), g.zeros(32).unwrap());
    assert!(
        g.gemv(&mut lin, &xd, &mut yd, 2, &[Threshold::Scalar(-1.0)], bad)
            .is_err(),
        "8 columns at offset 1 of an 8-wide row"
    );
}

/// The GEMV with RMSNorm folded into its prologue against RMSNorm then the sparse GEMV, dense
/// and with half the normalized inputs below the threshold, batch 1 and 3, f16 and bf16, and
/// with 1090 inputs (not a multiple of 4: the mean square's scalar loads).
#[test]
fn gemv_rmsnorm_matches_reference() {
    let Some(g) = gpu() else { return };
    let eps = 1e-5f32;
    for (n_in, n_out, dtype) in [
        (1536, 577, WeightDtype::F16),
        (1536, 577, WeightDtype::Bf16),
        (1090, 300, WeightDtype::Bf16),
    ] {
        let wq: Vec<f32> = dtype
            .encode(&rand_vec(n_in * n_out, 31))
            .iter()
            .map(|&b| dtype.decode(b))
            .collect();
        let nw: Vec<f32> = rand_vec(n_in, 32).iter().map(|v| 1.0 + 0.3 * v).collect();
        let mut lin = g.linear_from_f32(&wq, n_in, n_out, dtype, &[]).unwrap();
        let wa: Vec<f32> = wq.iter().map(|v| v.abs()).collect();
        for batch in [1usize, 3] {
            let x: Vec<f32> = rand_vec(batch * n_in, 33 + batch as u64)
                .iter()
                .map(|v| 4.0 * v)
                .collect();
            let mut xn = vec![0.0; batch * n_in];
            for b in 0..batch {
                reference::rmsnorm(
                    &x[b * n_in..(b + 1) * n_in],
                    &nw,
                    eps,
                    &mut xn[b * n_in..(b + 1) * n_in],
                );
            }
            for (s, per_channel) in [(0.0, false), (0.5, false), (0.0, true), (0.5, true)] {
                // Between two normalized inputs, so that none lies within rounding of t (the
                // GPU's mean square is summed in another order); per channel, clear of every
                // normalized input of the channel.
                let t = if s == 0.0 {
                    -1.0
                } else {
                    let mut a: Vec<f32> = xn.iter().map(|v| v.abs()).collect();
                    a.sort_by(f32::total_cmp);
                    let k = a.len() / 2;
                    0.5 * (a[k - 1] + a[k])
                };
                let ct = CaseThresholds::new(&g, &xn, n_in, s, t, per_channel, 34);
                let (tc, th) = (&ct.per_input, ct.kernel());
                let (xd, nd) = (g.upload(&x).unwrap(), g.upload(&nw).unwrap());
                let mut yd = g.upload(&vec![f32::NAN; batch * n_out]).unwrap();
                let norm = Norm { weight: &nd, eps };
                g.gemv_rmsnorm(
                    &mut lin,
                    &xd,
                    norm,
                    &mut yd,
                    batch,
                    &[th],
                    GemvOpts::default(),
                )
                .unwrap();
                let y = g.download(&yd).unwrap();
                let (mut want, mut scale) = (vec![0.0; batch * n_out], vec![0.0; batch * n_out]);
                for b in 0..batch {
                    let xr = &xn[b * n_in..(b + 1) * n_in];
                    let mut xs = vec![0.0; n_in];
                    reference::sparsify_channels(xr, tc, &mut xs);
                    reference::gemv_t(&wq, n_in, n_out, &xs, &mut want[b * n_out..(b + 1) * n_out]);
                    let xa: Vec<f32> = xr.iter().map(|v| v.abs()).collect();
                    reference::gemv_t(
                        &wa,
                        n_in,
                        n_out,
                        &xa,
                        &mut scale[b * n_out..(b + 1) * n_out],
                    );
                }
                assert_close(
                    &y,
                    &want,
                    &scale,
                    GPU_GEMV_REL_TOL,
                    &format!(
                        "gemv_rmsnorm {} b{batch} s{s} per-channel {per_channel}",
                        dtype.name()
                    ),
                );
            }
        }
        let bad = GemvOpts {
            silu_mul_input: true,
            ..Default::default()
        };
        let (xd, nd) = (
            g.upload(&vec![0.0f32; 2 * n_in]).unwrap(),
            g.upload(&nw).unwrap(),
        );
        let mut yd = g.zeros::<f32>(n_out).unwrap();
        let norm = Norm { weight: &nd, eps };
        assert!(g
            .gemv_rmsnorm(
                &mut lin,
                &xd,
                norm,
                &mut yd,
                1,
                &[Threshold::Scalar(-1.0)],
                bad
            )
            .is_err());
    }
}

/// The GEMV's side job: another buffer set to a bias or to zeros by the blocks of a launch,
/// whatever its grid, while the GEMV itself gives the same result.
#[test]
fn gemv_prepare_sets_the_other_buffer() {
    let Some(g) = gpu() else { return };
    let (n_in, n_out) = (300, 520);
    let dtype = WeightDtype::F16;
    let bits = dtype.encode(&rand_vec(n_in * n_out, 91));
    let wq: Vec<f32> = bits.iter().map(|&b| dtype.decode(b)).collect();
    let mut lin = g.linear_from_bits(&bits, n_in, n_out, dtype, &[]).unwrap();
    let x = rand_vec(n_in, 92);
    let mut want = vec![0.0; n_out];
    reference::gemv_t(&wq, n_in, n_out, &x, &mut want);
    let xd = g.upload(&x).unwrap();
    // Larger than one element per thread of the grid, and with a bias source.
    let n_other = 200_003;
    let bias = rand_vec(n_other, 93);
    let bd = g.upload(&bias).unwrap();
    for from in [None, Some(&bd)] {
        let mut other = g.upload(&vec![f32::NAN; n_other]).unwrap();
        let mut yd = g.zeros::<f32>(n_out).unwrap();
        let prep = Prepare {
            out: &mut other,
            from,
        };
        let opts = GemvOpts {
            accumulate: true,
            ..Default::default()
        };
        g.gemv_and_prepare(
            &mut lin,
            &xd,
            None,
            &mut yd,
            1,
            &[Threshold::Scalar(-1.0)],
            opts,
            prep,
        )
        .unwrap();
        let o = g.download(&other).unwrap();
        match from {
            None => assert!(o.iter().all(|&v| v == 0.0), "prepare: zeros"),
            Some(_) => assert_eq!(o, bias, "prepare: bias"),
        }
        let y = g.download(&yd).unwrap();
        assert_close_abs(&y, &want, 1e-4, "gemv with prepare");
    }
    let mut other = g.zeros::<f32>(10).unwrap();
    let short = g.zeros::<f32>(5).unwrap();
    let mut yd = g.zeros::<f32>(n_out).unwrap();
    let prep = Prepare {
        out: &mut other,
        from: Some(&short),
    };
    assert!(g
        .gemv_and_prepare(
            &mut lin,
            &xd,
            None,
            &mut yd,
            1,
            &[Threshold::Scalar(-1.0)],
            GemvOpts::default(),
            prep
        )
        .is_err());
}

/// `y` against the reference of fused segments `segs` over `resid`, segment k's inputs
/// thresholded per channel by `ts[k]` (a scalar threshold repeated for each input).
#[allow(clippy::too_many_arguments)]
fn check_fused(
    y: &[f32],
    wq: &[f32],
    x: &[f32],
    resid: &[f32],
    segs: &[usize],
    ts: &[Vec<f32>],
    n_in: usize,
    n_out: usize,
) {
    let mut want = vec![0.0; n_out];
    let mut scale = vec![0.0; n_out];
    let mut start = 0;
    for (seg, t) in segs.iter().zip(ts) {
        let mut xs = vec![0.0; n_in];
        reference::sparsify_channels(x, t, &mut xs);
        let (full, sc) = gemv_and_scale(wq, n_in, n_out, &xs);
        for o in start..*seg {
            want[o] = full[o] + resid[o];
            scale[o] = sc[o] + resid[o].abs();
        }
        start = *seg;
    }
    assert_close(
        y,
        &want,
        &scale,
        GPU_GEMV_REL_TOL,
        "fused q|k|v with residual add",
    );
}

#[test]
fn unsupported_dtype_is_a_clear_error() {
    let e = WeightDtype::parse("q4_0").unwrap_err().to_string();
    assert!(e.contains("unsupported dtype") && e.contains("q4_0"), "{e}");
}

/// The multi-block argmax against the reference at a vocabulary's length: ties across blocks
/// (the first index wins, -0 as +0), rows holding a NaN, a -inf or a +inf ([`NON_FINITE`], as
/// the CPU reports non-finite logits), rows beyond one launch's group, odd lengths, and a
/// second call on the same workspace.
#[test]
fn argmax_over_blocks_matches_reference() {
    let Some(g) = gpu() else { return };
    for &(rows, n) in &[(1usize, 128256usize), (3, 49152), (11, 8193), (2, 20001)] {
        let mut x: Vec<f32> = rand_vec(rows * n, 31);
        let top = 10.0;
        // Row 0: a tie between the first block and a later one.
        x[5] = top;
        x[n - 3] = top;
        let mut want: Vec<u32> = (0..rows)
            .map(|r| reference::argmax(&x[r * n..(r + 1) * n]) as u32)
            .collect();
        if rows > 1 {
            // Row 1: NaN here and there, the maximum in the last block.
            x[n..2 * n]
                .iter_mut()
                .step_by(97)
                .for_each(|v| *v = f32::NAN);
            x[2 * n - 1] = top;
            want[1] = NON_FINITE;
        }
        if rows > 2 {
            x[2 * n..3 * n].fill(f32::NEG_INFINITY);
            want[2] = NON_FINITE;
        }
        if rows > 4 {
            // Row 3: the maximum 0, as -0 in the first block and +0 in the last: the first.
            let row = &mut x[3 * n..4 * n];
            row.iter_mut().for_each(|v| *v = -v.abs() - 1.0);
            row[7] = -0.0;
            row[n - 1] = 0.0;
            want[3] = 7;
            // Row 4: one +inf.
            x[4 * n + n / 2] = f32::INFINITY;
            want[4] = NON_FINITE;
        }
        let xd = g.upload(&x).unwrap();
        for call in 0..2 {
            let mut am = g.zeros::<u32>(rows).unwrap();
            g.argmax(&xd, &mut am, rows, n).unwrap();
            let got = g.download(&am).unwrap();
            assert_eq!(got, want, "argmax n {n} call {call}");
        }
    }
}

#[test]
fn rmsnorm_silu_argmax_match_reference() {
    let Some(g) = gpu() else { return };
    for &(rows, n) in &[(1usize, 1usize), (3, 577), (2, 4096)] {
        let x: Vec<f32> = rand_vec(rows * n, 21).iter().map(|v| v * 3.0).collect();
        let w = rand_vec(n, 22);
        let (xd, wd) = (g.upload(&x).unwrap(), g.upload(&w).unwrap());
        let mut od = g.upload(&vec![f32::NAN; rows * n]).unwrap();
        g.rmsnorm(&xd, &wd, &mut od, rows, n, 1e-5).unwrap();
        let got = g.download(&od).unwrap();
        for r in 0..rows {
            let mut want = vec![0.0; n];
            reference::rmsnorm(&x[r * n..(r + 1) * n], &w, 1e-5, &mut want);
            let scale: Vec<f32> = want.iter().map(|v| v.abs()).collect();
            assert_close(
                &got[r * n..(r + 1) * n],
                &want,
                &scale,
                4.0 * GPU_ELEMWISE_TOL,
                "rmsnorm",
            );
        }

        let gu: Vec<f32> = rand_vec(rows * 2 * n, 23).iter().map(|v| v * 6.0).collect();
        let gud = g.upload(&gu).unwrap();
        let mut sd = g.upload(&vec![f32::NAN; rows * n]).unwrap();
        g.silu_mul(&gud, &mut sd, n, rows).unwrap();
        let got = g.download(&sd).unwrap();
        for r in 0..rows {
            let row = &gu[r * 2 * n..(r + 1) * 2 * n];
            let mut want = vec![0.0; n];
            reference::silu_mul(&row[..n], &row[n..], &mut want);
            let scale: Vec<f32> = want.iter().map(|v| v.abs()).collect();
            assert_close(
                &got[r * n..(r + 1) * n],
                &want,
                &scale,
                4.0 * GPU_ELEMWISE_TOL,
                "silu_mul",
            );
        }

        let mut am = g.zeros::<u32>(rows).unwrap();
        let mut xt = x.clone();
        // A tie: the first index must win.
        if n > 10 {
            let m = x[..n].iter().cloned().fold(f32::MIN, f32::max) + 1.0;
            xt[7] = m;
            xt[9] = m;
        }
        let xtd = g.upload(&xt).unwrap();
        g.argmax(&xtd, &mut am, rows, n).unwrap();
        let got = g.download(&am).unwrap();
        for r in 0..rows {
            assert_eq!(
                got[r] as usize,
                reference::argmax(&xt[r * n..(r + 1) * n]),
                "argmax row {r}"
            );
        }
    }
}

#[test]
fn rope_and_decode_attention_match_reference() {
    let Some(g) = gpu() else { return };
    let (n_head, n_kv, hd, max_keys, batch) = (8usize, 2usize, 64usize, 300usize, 2usize);
    let half = hd / 2;
    let positions = 64;
    let mut cos = vec![0.0; positions * half];
    let mut sin = vec![0.0; positions * half];
    for p in 0..positions {
        for i in 0..half {
            let a = p as f32 * 10000f32.powf(-((2 * i) as f32) / hd as f32);
            cos[p * half + i] = a.cos();
            sin[p * half + i] = a.sin();
        }
    }
    let q = rand_vec(batch * n_head * hd, 31);
    let pos = [5i32, 63];
    let mut qd = g.upload(&q).unwrap();
    let (cd, sd) = (g.upload(&cos).unwrap(), g.upload(&sin).unwrap());
    let pd = g.upload(&pos).unwrap();
    g.rope_neox(&mut qd, &cd, &sd, &pd, batch, n_head, hd, n_head * hd)
        .unwrap();
    let got = g.download(&qd).unwrap();
    let mut want = q.clone();
    for (b, &p) in pos.iter().enumerate() {
        let p = p as usize;
        for h in 0..n_head {
            let o = b * n_head * hd + h * hd;
            reference::rope_neox(
                &mut want[o..o + hd],
                &cos[p * half..(p + 1) * half],
                &sin[p * half..(p + 1) * half],
            );
        }
    }
    assert_close_abs(&got, &want, 4.0 * GPU_ELEMWISE_TOL, "rope_neox");

    let kvs = n_kv * hd;
    let k = rand_vec(batch * max_keys * kvs, 32);
    let v = rand_vec(batch * max_keys * kvs, 33);
    let n_keys = [1i32, 300];
    let (kd, vd, nkd) = (
        g.upload(&k).unwrap(),
        g.upload(&v).unwrap(),
        g.upload(&n_keys).unwrap(),
    );
    let mut od = g.upload(&vec![f32::NAN; batch * n_head * hd]).unwrap();
    g.attention_decode(
        &qd, &kd, &vd, &mut od, &nkd, batch, n_head, n_kv, hd, max_keys,
    )
    .unwrap();
    let got = g.download(&od).unwrap();
    for b in 0..batch {
        let nk = n_keys[b] as usize;
        let qs = &want[b * n_head * hd..(b + 1) * n_head * hd];
        let kb = &k[b * max_keys * kvs..b * max_keys * kvs + nk * kvs];
        let vb = &v[b * max_keys * kvs..b * max_keys * kvs + nk * kvs];
        let mut o = vec![0.0; n_head * hd];
        reference::attention(qs, kb, vb, 1, nk - 1, n_head, n_kv, hd, &mut o);
        assert_close_abs(
            &got[b * n_head * hd..(b + 1) * n_head * hd],
            &o,
            GPU_ATTN_TOL,
            "attention_decode",
        );
    }
}

#[test]
fn gemv_back_to_back_launches_stay_ordered() {
    let Some(mut g) = gpu() else { return };
    let (n_in, n_out) = (2048, 1024);
    let dtype = WeightDtype::F16;
    let bits = dtype.encode(&rand_vec(n_in * n_out, 41));
    let wq: Vec<f32> = bits.iter().map(|&b| dtype.decode(b)).collect();
    let x = rand_vec(n_in, 42);
    let t = threshold_for(&x, 0.5);
    let mut want = vec![0.0; n_out];
    reference::gemv_t_sparse(&wq, n_in, n_out, &x, t, &mut want);
    let mut xs = vec![0.0; n_in];
    reference::sparsify(&x, t, &mut xs);
    let xa: Vec<f32> = xs.iter().map(|v| v.abs()).collect();
    let wa: Vec<f32> = wq.iter().map(|v| v.abs()).collect();
    let mut scale = vec![0.0; n_out];
    reference::gemv_t(&wa, n_in, n_out, &xa, &mut scale);
    let mut lin = g.linear_from_bits(&bits, n_in, n_out, dtype, &[]).unwrap();
    let xd = g.upload(&x).unwrap();
    for pdl in [false, true] {
        g.set_programmatic_launch(pdl);
        // 10 accumulating launches, then 10 self-contained ones that each add y once more
        // (beta = 1), with no synchronisation in between: y = 20 * W s_t(x).
        let mut yd = g.zeros::<f32>(n_out).unwrap();
        for _ in 0..10 {
            g.gemv(
                &mut lin,
                &xd,
                &mut yd,
                1,
                &[Threshold::Scalar(t)],
                GemvOpts {
                    accumulate: true,
                    ..Default::default()
                },
            )
            .unwrap();
        }
        for _ in 0..10 {
            g.gemv(
                &mut lin,
                &xd,
                &mut yd,
                1,
                &[Threshold::Scalar(t)],
                GemvOpts {
                    beta: 1.0,
                    ..Default::default()
                },
            )
            .unwrap();
        }
        let y = g.download(&yd).unwrap();
        let want20: Vec<f32> = want.iter().map(|v| 20.0 * v).collect();
        let scale20: Vec<f32> = scale.iter().map(|v| 20.0 * v).collect();
        assert_close(
            &y,
            &want20,
            &scale20,
            GPU_GEMV_REL_TOL,
            &format!("20 chained launches, pdl {pdl}"),
        );
    }
}

#[test]
fn decode_helpers_fill_embed_kv_append_advance() {
    let Some(g) = gpu() else { return };
    for dtype in [WeightDtype::F16, WeightDtype::Bf16] {
        // Random fill: inside [-scale, scale], mean near 0, not constant, deterministic.
        let n = 1 << 16;
        let mut w = g.zeros::<u16>(n).unwrap();
        g.fill_random(&mut w, dtype, 5, 0.5).unwrap();
        let a: Vec<f32> = g
            .download(&w)
            .unwrap()
            .iter()
            .map(|&b| dtype.decode(b))
            .collect();
        let mean = a.iter().sum::<f32>() / n as f32;
        assert!(
            a.iter().all(|v| v.abs() <= 0.5),
            "{}: fill out of range",
            dtype.name()
        );
        assert!(mean.abs() < 0.01, "{}: fill mean {mean}", dtype.name());
        let var = a.iter().map(|v| v * v).sum::<f32>() / n as f32;
        assert!(
            (var - 0.25 / 3.0).abs() < 0.005,
            "{}: fill variance {var}",
            dtype.name()
        );
        let mut w2 = g.zeros::<u16>(n).unwrap();
        g.fill_random(&mut w2, dtype, 5, 0.5).unwrap();
        assert_eq!(g.download(&w).unwrap(), g.download(&w2).unwrap());

        // Embedding row lookup of a batch of tokens, exact.
        let (vocab, d) = (37, 300);
        let table = dtype.encode(&rand_vec(vocab * d, 51));
        let td = g.upload(&table).unwrap();
        let toks = [29u32, 3, 29];
        let tok = g.upload(&toks).unwrap();
        let mut h = g.zeros::<f32>(toks.len() * d).unwrap();
        g.embed(&td, dtype, &tok, &mut h, d, toks.len()).unwrap();
        let want: Vec<f32> = toks
            .iter()
            .flat_map(|&t| &table[t as usize * d..(t as usize + 1) * d])
            .map(|&b| dtype.decode(b))
            .collect();
        assert_eq!(g.download(&h).unwrap(), want);
    }
    // KV append of two fused rows at device-held positions, then advance the first.
    let (q_dim, kv_dim, max_pos) = (64, 32, 5);
    let row = q_dim + 2 * kv_dim;
    let qkv = rand_vec(2 * row, 52);
    let qd = g.upload(&qkv).unwrap();
    let mut kc = g.zeros::<f32>(max_pos * kv_dim).unwrap();
    let mut vc = g.zeros::<f32>(max_pos * kv_dim).unwrap();
    let mut pos = g.upload(&[3i32, 1]).unwrap();
    g.kv_append(&qd, &mut kc, &mut vc, &pos, q_dim, kv_dim, 2)
        .unwrap();
    g.advance_position(&mut pos).unwrap();
    let (k, v) = (g.download(&kc).unwrap(), g.download(&vc).unwrap());
    for (b, p) in [(0usize, 3usize), (1, 1)] {
        let r = &qkv[b * row..(b + 1) * row];
        assert_eq!(&k[p * kv_dim..(p + 1) * kv_dim], &r[q_dim..q_dim + kv_dim]);
        assert_eq!(&v[p * kv_dim..(p + 1) * kv_dim], &r[q_dim + kv_dim..]);
    }
    for p in [0, 2, 4] {
        assert!(k[p * kv_dim..(p + 1) * kv_dim].iter().all(|&x| x == 0.0));
    }
    assert_eq!(g.download(&pos).unwrap(), vec![4, 1]);
}

/// A prefill chunk's attention as the GPU model runs it: RoPE on the q and k heads of fused
/// q|k|v rows, their keys and values appended at consecutive positions after cached ones,
/// then each row attending causally over the shared cache (`attention_chunk`).
/// Both prefill attentions (one block per row and head; tiled) after RoPE and the KV append,
/// against the reference: rows from position 0 and later, one tile of rows and several, head
/// dimensions 8 to 128, grouped and plain.
#[test]
fn attention_chunk_matches_reference() {
    let Some(g) = gpu() else { return };
    for (n_head, n_kv, hd, p0, batch) in [
        (6usize, 2usize, 64usize, 0usize, 8usize),
        (8, 2, 128, 37, 5),
        (4, 2, 8, 3, 1),
        (8, 2, 128, 41, 70),
        (9, 3, 64, 0, 33),
        (4, 4, 16, 17, 40),
    ] {
        let (max_pos, half, kvs) = (p0 + batch + 3, hd / 2, n_kv * hd);
        let row = (n_head + 2 * n_kv) * hd;
        let cos = rand_vec(max_pos * half, 81);
        let sin = rand_vec(max_pos * half, 82);
        let qkv = rand_vec(batch * row, 83);
        let k_old = rand_vec(max_pos * kvs, 84);
        let v_old = rand_vec(max_pos * kvs, 85);
        let pos: Vec<i32> = (0..batch).map(|b| (p0 + b) as i32).collect();
        let n_keys: Vec<i32> = pos.iter().map(|p| p + 1).collect();
        let mut qd = g.upload(&qkv).unwrap();
        let (cd, sd) = (g.upload(&cos).unwrap(), g.upload(&sin).unwrap());
        let (pd, nd) = (g.upload(&pos).unwrap(), g.upload(&n_keys).unwrap());
        let mut kc = g.upload(&k_old).unwrap();
        let mut vc = g.upload(&v_old).unwrap();
        let mut od = g.upload(&vec![f32::NAN; batch * n_head * hd]).unwrap();
        g.rope_neox(&mut qd, &cd, &sd, &pd, batch, n_head + n_kv, hd, row)
            .unwrap();
        g.kv_append(&qd, &mut kc, &mut vc, &pd, n_head * hd, kvs, batch)
            .unwrap();
        g.attention_chunk(
            &qd, &kc, &vc, &mut od, &nd, batch, n_head, n_kv, hd, max_pos,
        )
        .unwrap();

        let (mut q, mut k, mut v) = (Vec::new(), k_old.clone(), v_old.clone());
        for b in 0..batch {
            let p = p0 + b;
            let mut r = qkv[b * row..(b + 1) * row].to_vec();
            for h in 0..n_head + n_kv {
                reference::rope_neox(
                    &mut r[h * hd..(h + 1) * hd],
                    &cos[p * half..(p + 1) * half],
                    &sin[p * half..(p + 1) * half],
                );
            }
            q.extend_from_slice(&r[..n_head * hd]);
            k[p * kvs..(p + 1) * kvs].copy_from_slice(&r[n_head * hd..(n_head + n_kv) * hd]);
            v[p * kvs..(p + 1) * kvs].copy_from_slice(&r[(n_head + n_kv) * hd..]);
        }
        let what = format!("hd {hd}, positions {p0}..{}", p0 + batch);
        assert_close_abs(
            &g.download(&kc).unwrap(),
            &k,
            4.0 * GPU_ELEMWISE_TOL,
            &format!("{what}: k cache"),
        );
        assert_eq!(g.download(&vc).unwrap(), v, "{what}: v cache");
        let n = (p0 + batch) * kvs;
        let mut want = vec![0.0; batch * n_head * hd];
        reference::attention(&q, &k[..n], &v[..n], batch, p0, n_head, n_kv, hd, &mut want);
        assert_close_abs(
            &g.download(&od).unwrap(),
            &want,
            GPU_ATTN_TOL,
            &format!("{what}: attention"),
        );
        // The tiled prefill attention on the same caches (rows in tiles of 32, keys of 16).
        let mut od = g.upload(&vec![f32::NAN; batch * n_head * hd]).unwrap();
        g.attention_prefill(&qd, &kc, &vc, &mut od, p0, batch, n_head, n_kv, hd)
            .unwrap();
        assert_close_abs(
            &g.download(&od).unwrap(),
            &want,
            GPU_ATTN_TOL,
            &format!("{what}: prefill attention"),
        );
    }
}

#[test]
fn gemv_with_silu_mul_input_matches_reference() {
    let Some(g) = gpu() else { return };
    let (n_in, n_out, batch) = (1000, 264, 2);
    let dtype = WeightDtype::Bf16;
    let bits = dtype.encode(&rand_vec(n_in * n_out, 61));
    let wq: Vec<f32> = bits.iter().map(|&b| dtype.decode(b)).collect();
    let gu: Vec<f32> = rand_vec(batch * 2 * n_in, 62)
        .iter()
        .map(|v| 4.0 * v)
        .collect();
    let mut act = vec![0.0; batch * n_in];
    for b in 0..batch {
        let row = &gu[b * 2 * n_in..(b + 1) * 2 * n_in];
        reference::silu_mul(
            &row[..n_in],
            &row[n_in..],
            &mut act[b * n_in..(b + 1) * n_in],
        );
    }
    let t = threshold_for(&act[..n_in], 0.5);
    let tc = channel_thresholds(&act, n_in, 0.5, 63);
    let tcd = g.upload(&tc).unwrap();
    let mut lin = g.linear_from_bits(&bits, n_in, n_out, dtype, &[]).unwrap();
    let gud = g.upload(&gu).unwrap();
    let opts = GemvOpts {
        silu_mul_input: true,
        ..Default::default()
    };
    for (label, th, ts) in [
        ("one threshold", Threshold::Scalar(t), vec![t; n_in]),
        ("per channel", Threshold::Channels(&tcd), tc.clone()),
    ] {
        let mut yd = g.upload(&vec![f32::NAN; batch * n_out]).unwrap();
        g.gemv(&mut lin, &gud, &mut yd, batch, &[th], opts).unwrap();
        let y = g.download(&yd).unwrap();
        let wa: Vec<f32> = wq.iter().map(|v| v.abs()).collect();
        for b in 0..batch {
            let a = &act[b * n_in..(b + 1) * n_in];
            let mut xs = vec![0.0; n_in];
            reference::sparsify_channels(a, &ts, &mut xs);
            let mut want = vec![0.0; n_out];
            reference::gemv_t(&wq, n_in, n_out, &xs, &mut want);
            let aa: Vec<f32> = a.iter().map(|v| v.abs()).collect();
            let mut scale = vec![0.0; n_out];
            reference::gemv_t(&wa, n_in, n_out, &aa, &mut scale);
            assert_close(
                &y[b * n_out..(b + 1) * n_out],
                &want,
                &scale,
                GPU_GEMV_REL_TOL,
                &format!("gemv silu*mul input, {label}"),
            );
        }
    }
}

#[test]
fn attention_rope_decode_matches_reference() {
    let Some(g) = gpu() else { return };
    // Head dims of SmolLM2/Qwen (64), Llama 3 (128) and the tiny test Qwen2 (8); groups of
    // 1 (one query head per key-value head), 2, 3 and 4 (one block per group and run,
    // compiled for 1, 2, 4 heads), 7 (Qwen2.5-0.5B, compiled for 8) and 16 (two blocks of 8);
    // the first position, a short cache, one longer than a pass of the score loop (64 keys at
    // hd 128), the last position whose cache is not split (ATTN_SPLIT_KEYS = 256 keys) and the
    // first one split into runs (merged by the last block of a head or group), longer caches
    // and the cache's end.
    for (n_head, n_kv, hd, max_pos) in [
        (6usize, 2usize, 64usize, 300usize),
        (8, 2, 128, 300),
        (4, 2, 8, 40),
        (8, 2, 128, 3000),
        (6, 2, 64, 1100),
        (4, 4, 64, 700),
        (14, 2, 64, 1200),
        (32, 2, 128, 600),
    ] {
        // Each query head by its own blocks up to ATTN_GROUP_KEYS (2048) keys, by key-value
        // group beyond; and by group at every position.
        for by_group_from in [None, Some(0)] {
            let split = g.attention_split(n_head, n_kv, hd, max_pos).unwrap();
            let mut split = match by_group_from {
                Some(keys) => split.group_from(keys),
                None => split,
            };
            let positions = [0usize, 7, 100, 255, 256, 511, 512, 1500, 1023, max_pos - 1];
            for p in positions.into_iter().filter(|&p| p < max_pos) {
                let half = hd / 2;
                let kvs = n_kv * hd;
                let cos: Vec<f32> = rand_vec(max_pos * half, 71);
                let sin: Vec<f32> = rand_vec(max_pos * half, 72);
                let qkv = rand_vec((n_head + 2 * n_kv) * hd, 73 + p as u64);
                let k_old = rand_vec(max_pos * kvs, 74);
                let v_old = rand_vec(max_pos * kvs, 75);
                let qd = g.upload(&qkv).unwrap();
                let (cd, sd, pd) = (
                    g.upload(&cos).unwrap(),
                    g.upload(&sin).unwrap(),
                    g.upload(&[p as i32]).unwrap(),
                );
                let mut kc = g.upload(&k_old).unwrap();
                let mut vc = g.upload(&v_old).unwrap();
                let mut od = g.upload(&vec![f32::NAN; n_head * hd]).unwrap();
                g.attention_rope_decode(
                    &qd, &cd, &sd, &pd, &mut kc, &mut vc, &mut od, &mut split, n_head, n_kv, hd,
                    max_pos,
                )
                .unwrap();
                let first = g.download(&od).unwrap();
                // Again on the same inputs (the new row is stored with the same values): the same
                // result, so the split's counters were left at zero.
                g.attention_rope_decode(
                    &qd, &cd, &sd, &pd, &mut kc, &mut vc, &mut od, &mut split, n_head, n_kv, hd,
                    max_pos,
                )
                .unwrap();
                let what = format!(
                    "{n_head} heads / {n_kv} of {hd} (group {} from {by_group_from:?}, {} runs), \
                 position {p} of {max_pos}",
                    split.group(),
                    split.n_split()
                );
                assert_eq!(g.download(&od).unwrap(), first, "{what}: a second launch");
                let mut rot = qkv.clone();
                for h in 0..n_head + n_kv {
                    reference::rope_neox(
                        &mut rot[h * hd..(h + 1) * hd],
                        &cos[p * half..(p + 1) * half],
                        &sin[p * half..(p + 1) * half],
                    );
                }
                assert_eq!(
                    g.download(&qd).unwrap(),
                    qkv,
                    "{what}: qkv must stay as it was"
                );
                let (k, v) = (g.download(&kc).unwrap(), g.download(&vc).unwrap());
                let row = p * kvs;
                assert_close_abs(
                    &k[row..row + kvs],
                    &rot[n_head * hd..(n_head + n_kv) * hd],
                    4.0 * GPU_ELEMWISE_TOL,
                    &format!("{what}: k cache row"),
                );
                assert_eq!(&v[row..row + kvs], &qkv[(n_head + n_kv) * hd..], "{what}");
                assert_eq!(&k[..row], &k_old[..row], "{what}: other k rows");
                assert_eq!(&k[row + kvs..], &k_old[row + kvs..], "{what}: other k rows");
                assert_eq!(&v[..row], &v_old[..row], "{what}: other v rows");
                let mut want = vec![0.0; n_head * hd];
                reference::attention(
                    &rot[..n_head * hd],
                    &k[..(p + 1) * kvs],
                    &v[..(p + 1) * kvs],
                    1,
                    p,
                    n_head,
                    n_kv,
                    hd,
                    &mut want,
                );
                assert_close_abs(
                    &g.download(&od).unwrap(),
                    &want,
                    GPU_ATTN_TOL,
                    &format!("{what}: attention"),
                );
            }
        }
    }
    // Shapes the kernel does not take: a clear error, no launch.
    let qd = g.zeros::<f32>(16 * 48).unwrap();
    let (cd, pd) = (g.zeros::<f32>(1024).unwrap(), g.zeros::<i32>(1).unwrap());
    let (mut kc, mut vc, mut od) = (
        g.zeros::<f32>(4096).unwrap(),
        g.zeros::<f32>(4096).unwrap(),
        g.zeros::<f32>(1024).unwrap(),
    );
    let e = g.attention_split(8, 4, 48, 4).err().expect("head dim 48");
    assert!(e.to_string().contains("head dim 48"), "{e}");
    let mut split = g.attention_split(8, 8, 16, 4).unwrap();
    let e = g
        .attention_rope_decode(
            &qd, &cd, &cd, &pd, &mut kc, &mut vc, &mut od, &mut split, 8, 4, 48, 4,
        )
        .unwrap_err();
    assert!(e.to_string().contains("head dim 48"), "{e}");
    // A workspace made for other heads: an error naming it.
    for (nh, nkv) in [(4, 4), (8, 2)] {
        let mut split = g.attention_split(nh, nkv, 64, 4).unwrap();
        let e = g
            .attention_rope_decode(
                &qd, &cd, &cd, &pd, &mut kc, &mut vc, &mut od, &mut split, 8, 4, 64, 4,
            )
            .unwrap_err();
        assert!(e.to_string().contains("split workspace"), "{e}");
    }
    // Groups: the whole group up to 8 query heads in one block, larger ones in blocks of 8.
    for (nh, nkv, group) in [
        (8, 8, 1),
        (8, 4, 2),
        (9, 3, 4),
        (32, 8, 4),
        (14, 2, 8),
        (32, 2, 8),
    ] {
        assert_eq!(g.attention_split(nh, nkv, 128, 512).unwrap().group(), group);
    }
    assert_eq!(g.attention_split(8, 2, 128, 256).unwrap().n_split(), 1);
    assert!(g.attention_split(8, 2, 128, 3000).unwrap().n_split() > 1);
}

/// The two pieces of the GEMM prefill. `gemm_input`: the thresholded input (plain, RMSNorm or
/// SiLU*mul, padded rows, a first row other than 0) rounded to the weights' type, within one
/// unit in the last place of that type of the f32 reference (the GPU's mean square sums in
/// another order; entries within 1e-5 of the threshold are not compared, as they may fall
/// either side). `gemm`: that input times a column range of the weights into a column offset
/// of a wider output, added to what is there (beta 1), against the reference on the GPU's own
/// 16-bit input: products of two 16-bit values are exact in f32, so only the summation order
/// differs (GPU_GEMV_REL_TOL of sum |x w|). Sparsity 0, 50 % and 100 %, f16 and bf16; an f16
/// input beyond the type's range raises the overflow flag, bf16 never does.
#[test]
fn gemm_prefill_pieces_match_reference() {
    let Some(g) = gpu() else { return };
    let (blas, _ws) = match g.cublas() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("skipping GEMM test: {e}");
            return;
        }
    };
    let eps = 1e-5f32;
    for dtype in [WeightDtype::F16, WeightDtype::Bf16] {
        let ulp = match dtype {
            WeightDtype::F16 => 2f32.powi(-10),
            WeightDtype::Bf16 => 2f32.powi(-7),
        };
        for (n_in, n_out, rows) in [(77usize, 300usize, 5usize), (1024, 520, 33)] {
            let bits = dtype.encode(&rand_vec(n_in * n_out, 71 + n_in as u64));
            let wq: Vec<f32> = bits.iter().map(|&b| dtype.decode(b)).collect();
            let lin = g.linear_from_bits(&bits, n_in, n_out, dtype, &[]).unwrap();
            let nw: Vec<f32> = rand_vec(n_in, 72).iter().map(|v| 1.0 + v).collect();
            let nwd = g.upload(&nw).unwrap();
            for kind in ["plain", "rmsnorm", "silu_mul"] {
                let width = if kind == "silu_mul" { 2 * n_in } else { n_in };
                let (ldx, row0) = (width + 3, 2);
                let x: Vec<f32> = rand_vec((row0 + rows) * ldx, 73 + n_out as u64)
                    .iter()
                    .map(|v| 3.0 * v)
                    .collect();
                let mut v = vec![0.0f32; rows * n_in];
                for b in 0..rows {
                    let xr = &x[(row0 + b) * ldx..(row0 + b) * ldx + width];
                    let out = &mut v[b * n_in..(b + 1) * n_in];
                    match kind {
                        "plain" => out.copy_from_slice(xr),
                        "rmsnorm" => reference::rmsnorm(xr, &nw, eps, out),
                        _ => reference::silu_mul(&xr[..n_in], &xr[n_in..], out),
                    }
                }
                let norm = (kind == "rmsnorm").then_some(Norm { weight: &nwd, eps });
                let xd = g.upload(&x).unwrap();
                let cases = [0.0, 0.5, 1.0]
                    .into_iter()
                    .flat_map(|s| [(s, false), (s, true)]);
                for (s, per_channel) in cases {
                    let what = format!(
                        "{} {n_in}x{n_out} {kind} s={s} per-channel {per_channel}",
                        dtype.name()
                    );
                    let t = match s {
                        s if s <= 0.0 => -1.0,
                        s if s >= 1.0 => f32::INFINITY,
                        s => threshold_for(&v[..n_in], s),
                    };
                    let ct = CaseThresholds::new(&g, &v, n_in, s, t, per_channel, 75);
                    let (tc, th) = (&ct.per_input, ct.kernel());
                    let mut x16 = g.zeros::<u16>(rows * n_in).unwrap();
                    let mut flag = g.zeros::<i32>(1).unwrap();
                    g.gemm_input(
                        &xd,
                        row0,
                        ldx,
                        rows,
                        n_in,
                        th,
                        norm,
                        kind == "silu_mul",
                        dtype,
                        &mut x16,
                        &mut flag,
                    )
                    .unwrap();
                    let got: Vec<f32> = g
                        .download(&x16)
                        .unwrap()
                        .iter()
                        .map(|&b| dtype.decode(b))
                        .collect();
                    assert_eq!(g.download(&flag).unwrap()[0], 0, "{what}: overflow flag");
                    for (i, (&a, &r)) in got.iter().zip(&v).enumerate() {
                        let t = tc[i % n_in];
                        if t.is_finite() && (r.abs() - t).abs() <= 1e-5 * t.max(1.0) {
                            continue;
                        }
                        let want = if r.abs() > t { r } else { 0.0 };
                        assert!(
                            (a - want).abs() <= ulp * want.abs() + 1e-7,
                            "{what}: input {i}: gpu {a} vs reference {want}"
                        );
                    }
                    // Columns 13..n_out-7 into columns 5.. of an output 9 wider than that.
                    let cols = 13..n_out - 7;
                    let (m, ldy, col0) = (cols.len(), cols.len() + 9, 5);
                    let y0 = rand_vec(rows * ldy, 74);
                    let mut yd = g.upload(&y0).unwrap();
                    g.gemm(
                        &blas,
                        &lin,
                        cols.clone(),
                        &x16,
                        rows,
                        &mut yd,
                        col0,
                        ldy,
                        1.0,
                    )
                    .unwrap();
                    let y = g.download(&yd).unwrap();
                    let (mut want, mut scale) = (y0.clone(), vec![0.0f32; rows * ldy]);
                    for b in 0..rows {
                        for j in 0..m {
                            let (mut acc, mut mag) = (0.0f64, y0[b * ldy + col0 + j].abs() as f64);
                            for i in 0..n_in {
                                let p = got[b * n_in + i] as f64
                                    * wq[i * n_out + cols.start + j] as f64;
                                acc += p;
                                mag += p.abs();
                            }
                            want[b * ldy + col0 + j] += acc as f32;
                            scale[b * ldy + col0 + j] = mag as f32;
                        }
                    }
                    assert_close(
                        &y,
                        &want,
                        &scale,
                        GPU_GEMV_REL_TOL,
                        &format!("{what}: gemm"),
                    );
                }
            }
            // Out of f16's range: the flag (f16 only).
            let big = g.upload(&[70000.0f32, 1.0]).unwrap();
            let mut x16 = g.zeros::<u16>(2).unwrap();
            let mut flag = g.zeros::<i32>(1).unwrap();
            g.gemm_input(
                &big,
                0,
                2,
                1,
                2,
                Threshold::Scalar(-1.0),
                None,
                false,
                dtype,
                &mut x16,
                &mut flag,
            )
            .unwrap();
            let raised = g.download(&flag).unwrap()[0] != 0;
            assert_eq!(
                raised,
                dtype == WeightDtype::F16,
                "{}: overflow flag",
                dtype.name()
            );
        }
    }
}

/// `fill_rows` sets each row's first n columns to the source row or zeros, leaving the rest.
#[test]
fn fill_rows_sets_bias_or_zeros() {
    let Some(g) = gpu() else { return };
    let (rows, n, ldy) = (3usize, 700usize, 705usize);
    let src = rand_vec(n, 81);
    let sd = g.upload(&src).unwrap();
    for with_src in [true, false] {
        let mut yd = g.upload(&vec![7.0f32; rows * ldy]).unwrap();
        g.fill_rows(&mut yd, with_src.then_some(&sd), rows, n, ldy)
            .unwrap();
        let y = g.download(&yd).unwrap();
        for b in 0..rows {
            for i in 0..ldy {
                let want = match (i < n, with_src) {
                    (false, _) => 7.0,
                    (true, true) => src[i],
                    (true, false) => 0.0,
                };
                assert_eq!(
                    y[b * ldy + i],
                    want,
                    "row {b} column {i} (source {with_src})"
                );
            }
        }
    }
}
