//! The linear layer: the one place where precision and sparsity live. The model calls
//! [`Linear::forward`] (one vector, decode) or [`Linear::forward_batch`] (many rows, prefill);
//! what kind of weights sit behind it, and whether the input is sparsified first, is this
//! module's business. [`Dense`] is the layer that is never sparsified (the LM head): stored
//! output-major, its rows double as the token embeddings.

use crate::error::{Error, Result};
use std::borrow::Cow;
use std::sync::{Arc, OnceLock};
use teal_kernels::packed::{Data, Dtype, PackedRows, PackedT, RowsMat, View};
use teal_kernels::{batch, cpu, reference};

/// Which inputs of a sparse linear layer are zeroed before the product.
#[derive(Clone, Debug, PartialEq)]
pub enum InputMask {
    /// TEAL: `x_j` is zeroed when `|x_j| <= t`.
    Threshold(f32),
    /// Weight-aware (WINA): `x_j` is zeroed when `|x_j| * ||W[:, j]|| <= t`, i.e. a threshold
    /// `t / ||W[:, j]||` per input channel. Still whole weight rows are skipped.
    WeightAware(f32),
    /// One threshold per input channel: `x_j` is zeroed when `|x_j| <= t[j]` (the loss-aware
    /// allocation's masks).
    Channels(Arc<Vec<f32>>),
}

/// An [`InputMask`] resolved against this layer's weights ([`Linear::sparsify`]).
#[derive(Clone, Debug)]
pub enum Sparsify {
    /// `x_j` is zeroed when `|x_j| <= t`.
    Threshold(f32),
    /// Per-input-channel thresholds: `x_j` is zeroed when `|x_j| <= t[j]` ([`InputMask::Channels`]
    /// as given, [`InputMask::WeightAware`] as `t / ||W[:, j]||`).
    Channels(Arc<Vec<f32>>),
}

/// Weight storage: input-major (`wt[in, out]`) in one of the formats of
/// [`teal_kernels::packed`], so a zeroed input skips a whole row (and its scales).
type Weight = PackedT;

#[derive(Clone, Debug)]
pub struct Linear {
    pub in_dim: usize,
    pub out_dim: usize,
    weight: Arc<Weight>,
    bias: Option<Arc<Vec<f32>>>,
    /// L2 norm of each input channel's weights (`||W[:, j]||`), computed on first use.
    input_norms: Arc<OnceLock<Vec<f32>>>,
    /// The mask as requested (`None`: dense) and as applied.
    mask: Option<InputMask>,
    sparsify: Option<Sparsify>,
}

impl Linear {
    /// From a row-major `[out, in]` matrix (the checkpoints' layout), kept in f32.
    pub fn from_rows(out_dim: usize, in_dim: usize, w: &[f32], bias: Option<Vec<f32>>) -> Linear {
        let wt = transpose(out_dim, in_dim, w);
        Linear::new(
            PackedT {
                n_in: in_dim,
                n_out: out_dim,
                data: Data::F32(wt),
            },
            bias,
        )
    }

    /// From a row-major `[out, in]` matrix, repacked to `dtype`; `name` is for the error.
    pub fn from_rows_as(
        dtype: Dtype,
        name: &str,
        out_dim: usize,
        in_dim: usize,
        w: &[f32],
        bias: Option<Vec<f32>>,
    ) -> Result<Linear> {
        if dtype == Dtype::F32 {
            return Ok(Linear::from_rows(out_dim, in_dim, w, bias));
        }
        let wt = transpose(out_dim, in_dim, w);
        let p =
            PackedT::from_input_major(dtype, &wt, in_dim, out_dim).map_err(|e| Error::Tensor {
                name: name.into(),
                msg: format!("cannot be repacked to {}: {e}", dtype.name()),
            })?;
        Ok(Linear::new(p, bias))
    }

    /// From an input-major `[in, out]` matrix, repacked to `dtype`; `name` is for the error.
    pub fn from_input_major_as(
        dtype: Dtype,
        name: &str,
        in_dim: usize,
        out_dim: usize,
        wt: Vec<f32>,
        bias: Option<Vec<f32>>,
    ) -> Result<Linear> {
        let p = match dtype {
            Dtype::F32 => PackedT {
                n_in: in_dim,
                n_out: out_dim,
                data: Data::F32(wt),
            },
            _ => PackedT::from_input_major(dtype, &wt, in_dim, out_dim).map_err(|e| {
                Error::Tensor {
                    name: name.into(),
                    msg: format!("cannot be repacked to {}: {e}", dtype.name()),
                }
            })?,
        };
        Ok(Linear::new(p, bias))
    }

    /// The whole weight matrix, input-major (`[in, out]`), as f32.
    pub fn input_major(&self) -> Vec<f32> {
        let mut wt = vec![0.0f32; self.in_dim * self.out_dim];
        for (j, row) in wt.chunks_mut(self.out_dim).enumerate() {
            self.input_row(j, row);
        }
        wt
    }

    fn new(w: PackedT, bias: Option<Vec<f32>>) -> Linear {
        if let Some(b) = &bias {
            assert_eq!(b.len(), w.n_out);
        }
        Linear {
            in_dim: w.n_in,
            out_dim: w.n_out,
            weight: Arc::new(w),
            bias: bias.map(Arc::new),
            input_norms: Arc::new(OnceLock::new()),
            mask: None,
            sparsify: None,
        }
    }

    /// The same weights (shared, not copied) with an input mask; `None` makes it dense.
    pub fn with_mask(&self, mask: Option<InputMask>) -> Linear {
        let sparsify = mask.as_ref().map(|m| match m {
            InputMask::Threshold(t) => Sparsify::Threshold(*t),
            InputMask::Channels(t) => {
                assert_eq!(t.len(), self.in_dim, "one threshold per input channel");
                Sparsify::Channels(t.clone())
            }
            InputMask::WeightAware(t) => Sparsify::Channels(Arc::new(
                self.input_norms()
                    .iter()
                    .map(|&n| if n > 0.0 { *t / n } else { f32::INFINITY })
                    .collect(),
            )),
        });
        Linear {
            mask,
            sparsify,
            ..self.clone()
        }
    }

    pub fn mask(&self) -> Option<&InputMask> {
        self.mask.as_ref()
    }

    /// The mask as applied to this layer's inputs (`None`: dense).
    pub fn sparsify(&self) -> Option<&Sparsify> {
        self.sparsify.as_ref()
    }

    /// The bias added after the product, if any.
    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref().map(|b| b.as_slice())
    }

    /// The weights of input channel `j` (a row of the input-major matrix) as f32, into `out`
    /// (`out_dim` values), whatever the stored format.
    pub fn input_row(&self, j: usize, out: &mut [f32]) {
        self.weight.mat().dequant_row(j, 0, out);
    }

    /// `||W[:, j]||` for every input channel `j` (of the weights as stored).
    pub fn input_norms(&self) -> &[f32] {
        self.input_norms.get_or_init(|| {
            let mut row = vec![0.0f32; self.out_dim];
            (0..self.in_dim)
                .map(|j| {
                    self.input_row(j, &mut row);
                    row.iter()
                        .map(|&v| (v as f64) * (v as f64))
                        .sum::<f64>()
                        .sqrt() as f32
                })
                .collect()
        })
    }

    /// How many entries of `x` (any number of rows of `in_dim`) the mask zeroes, exact zeros
    /// included.
    pub fn count_zeroed(&self, x: &[f32]) -> usize {
        match &self.sparsify {
            None => x.iter().filter(|&&v| v == 0.0).count(),
            Some(Sparsify::Threshold(t)) => x.iter().filter(|v| v.abs() <= *t).count(),
            Some(Sparsify::Channels(t)) => x
                .chunks(self.in_dim)
                .map(|r| {
                    r.iter()
                        .zip(t.iter())
                        .filter(|(v, t)| v.abs() <= **t)
                        .count()
                })
                .sum(),
        }
    }

    /// Bytes of weights stored (scales included).
    pub fn weight_bytes(&self) -> usize {
        self.weight.bytes()
    }

    /// The weight format.
    pub fn dtype(&self) -> Dtype {
        self.weight.dtype()
    }

    /// Decode: `y = W s_t(x) + b` for one vector.
    pub fn forward(&self, x: &[f32], y: &mut [f32]) {
        Linear::forward_rows(x, 1, [(self, y)]);
    }

    /// Decode steps of `n` sequences (the rows of `x`) through several layers that read the
    /// same vectors (q, k and v; gate and up), each with its own mask, in one parallel section
    /// of the thread pool: row `r` of `y_i` is `W_i s_i(x_r) + b_i`. At most
    /// [`cpu::MAX_MANY`] layers and [`batch::MAX_ROWS`] rows; one row is the one-row GEMV,
    /// several share each weight row's read ([`batch::gemv_many_rows`]).
    pub fn forward_rows<const N: usize>(x: &[f32], n: usize, layers: [(&Linear, &mut [f32]); N]) {
        let linears = layers.each_ref().map(|(l, _)| *l);
        let mut gemvs = layers.map(|(l, y)| cpu::Gemv {
            w: l.weight.mat(),
            mask: match &l.sparsify {
                None => cpu::Mask::Dense,
                Some(Sparsify::Threshold(t)) => cpu::Mask::Threshold(*t),
                Some(Sparsify::Channels(t)) => cpu::Mask::Channels(t),
            },
            y,
        });
        batch::gemv_many_rows(x, n, &mut gemvs);
        for (l, g) in linears.iter().zip(gemvs.iter_mut()) {
            for row in g.y.chunks_mut(l.out_dim) {
                l.add_bias(row);
            }
        }
    }

    /// Prefill: `y[T, out] = s_t(x[T, in]) W^T + b`.
    pub fn forward_batch(&self, x: &[f32], n_tok: usize, y: &mut [f32]) {
        cpu::matmul_packed(&self.masked(x), n_tok, &self.weight.mat(), y);
        for row in y.chunks_mut(self.out_dim) {
            self.add_bias(row);
        }
    }

    /// `s_t(x)`: rows of `x` through this layer's input mask.
    fn masked<'a>(&self, x: &'a [f32]) -> Cow<'a, [f32]> {
        let Some(s) = &self.sparsify else {
            return Cow::Borrowed(x);
        };
        let mut v = vec![0.0; x.len()];
        match s {
            Sparsify::Threshold(t) => reference::sparsify(x, *t, &mut v),
            Sparsify::Channels(t) => reference::sparsify_channels(x, t, &mut v),
        }
        Cow::Owned(v)
    }

    /// Adds `self(x) - from(x)` to `y` (`n_tok` rows), for `self` and `from` the same weights
    /// under two input masks, reading only the weight rows of the inputs whose masked values
    /// differ: a step of the greedy search changes a few percent of them, so this is that much
    /// cheaper than running the product again.
    pub fn add_mask_change(&self, from: &Linear, x: &[f32], n_tok: usize, y: &mut [f32]) {
        assert!(
            Arc::ptr_eq(&self.weight, &from.weight),
            "add_mask_change: two masks of the same weights"
        );
        assert_eq!(x.len(), n_tok * self.in_dim, "add_mask_change: input size");
        assert_eq!(
            y.len(),
            n_tok * self.out_dim,
            "add_mask_change: output size"
        );
        let (new, old) = (self.masked(x), from.masked(x));
        let (n_in, n_out) = (self.in_dim, self.out_dim);
        let mat = self.weight.mat();
        let (mut buf, mut changes) = (Vec::new(), Vec::new());
        for j in 0..n_in {
            changes.clear();
            changes.extend((0..n_tok).filter_map(|t| {
                let dx = new[t * n_in + j] - old[t * n_in + j];
                (dx != 0.0).then_some((t, dx))
            }));
            if changes.is_empty() {
                continue;
            }
            let w = match mat.view {
                View::F32(w) => &w[j * n_out..(j + 1) * n_out],
                _ => {
                    buf.resize(n_out, 0.0);
                    mat.dequant_row(j, 0, &mut buf);
                    &buf[..]
                }
            };
            for &(t, dx) in &changes {
                cpu::axpy(dx, w, &mut y[t * n_out..(t + 1) * n_out]);
            }
        }
    }

    /// The gradient of the product with respect to its input, `dx[T, in] = dy[T, out] W`, for
    /// every input whatever the mask: the backward pass of [`Linear::forward_batch`] (loss
    /// gradients in calibration).
    pub fn input_grad_batch(&self, dy: &[f32], n_tok: usize, dx: &mut [f32]) {
        let owned;
        let wt = match self.weight.mat().view {
            View::F32(w) => w,
            _ => {
                owned = self.input_major();
                &owned
            }
        };
        // Row j of the input-major matrix is input j's weights: dx = dy . wt^T.
        cpu::matmul_dot(dy, n_tok, &RowsMat::f32(wt, self.in_dim, self.out_dim), dx);
    }

    fn add_bias(&self, y: &mut [f32]) {
        if let Some(b) = &self.bias {
            for (v, b) in y.iter_mut().zip(b.iter()) {
                *v += b;
            }
        }
    }
}

/// A dense layer that is never sparsified, stored output-major (`W[out, in]`, the checkpoints'
/// layout) in the `--dtype` format of [`teal_kernels::packed::PackedRows`] (q8/q4: GGML's Q8_0 /
/// Q4_1 blocks along the input). The LM head; a row is also a token's embedding, so a tied
/// model's embedding table is the head itself (the same `Arc`).
#[derive(Clone, Debug)]
pub struct Dense {
    pub in_dim: usize,
    pub out_dim: usize,
    weight: Arc<PackedRows>,
}

impl Dense {
    /// From a row-major `[out, in]` matrix, packed to `dtype` (f32 keeps the vector); `name` is
    /// for the error.
    pub fn from_rows_as(
        dtype: Dtype,
        name: &str,
        out_dim: usize,
        in_dim: usize,
        w: Vec<f32>,
    ) -> Result<Dense> {
        let mut w = Some(w);
        Dense::from_row_chunks(dtype, name, out_dim, in_dim, out_dim, |_| {
            Ok(w.take().unwrap_or_default())
        })
    }

    /// Packs `out_dim` rows read `chunk` rows at a time by `rows(range)` (row-major f32), so
    /// that only one slice exists in f32 besides the packed matrix; `name` is for errors.
    pub fn from_row_chunks(
        dtype: Dtype,
        name: &str,
        out_dim: usize,
        in_dim: usize,
        chunk: usize,
        mut rows: impl FnMut(std::ops::Range<usize>) -> Result<Vec<f32>>,
    ) -> Result<Dense> {
        let mut p = PackedRows::with_capacity(dtype, in_dim, out_dim);
        for r0 in (0..out_dim).step_by(chunk.max(1)) {
            let w = rows(r0..(r0 + chunk.max(1)).min(out_dim))?;
            p.push_rows(w).map_err(|e| Error::Tensor {
                name: name.into(),
                msg: format!("cannot be packed to {}: {e}", dtype.name()),
            })?;
        }
        Ok(Dense {
            in_dim,
            out_dim,
            weight: Arc::new(p),
        })
    }

    /// Row `o` (`in_dim` values) as f32: the embedding of token `o`.
    pub fn row(&self, o: usize, out: &mut [f32]) {
        self.weight.mat().dequant_row(o, out);
    }

    /// Bytes of weights stored (scales included).
    pub fn weight_bytes(&self) -> usize {
        self.weight.bytes()
    }

    /// Bytes of one row (an embedding lookup reads one).
    pub fn row_bytes(&self) -> usize {
        self.weight.bytes() / self.out_dim.max(1)
    }

    /// The weight format.
    pub fn dtype(&self) -> Dtype {
        self.weight.dtype()
    }

    /// Whether `other` holds the very same weights (a tied embedding and head).
    pub fn shares_weights(&self, other: &Dense) -> bool {
        Arc::ptr_eq(&self.weight, &other.weight)
    }

    /// Decode: `y = W x`.
    pub fn forward(&self, x: &[f32], y: &mut [f32]) {
        self.forward_rows(x, 1, y);
    }

    /// Decode steps of `n` sequences: row `r` of `y` is `W x_r`, each weight row read once for
    /// all of them ([`batch::gemv_dot_rows`]; at most [`batch::MAX_ROWS`]).
    pub fn forward_rows(&self, x: &[f32], n: usize, y: &mut [f32]) {
        batch::gemv_dot_rows(&self.weight.mat(), x, n, y);
    }

    /// Prefill: `y[T, out] = x[T, in] W^T`.
    pub fn forward_batch(&self, x: &[f32], n_tok: usize, y: &mut [f32]) {
        cpu::matmul_dot(x, n_tok, &self.weight.mat(), y);
    }

    /// `dx[T, in] = dy[T, out] W`: the backward pass of [`Dense::forward_batch`].
    pub fn input_grad_batch(&self, dy: &[f32], n_tok: usize, dx: &mut [f32]) {
        let owned;
        let w = match self.weight.mat().view {
            View::F32(w) => w,
            _ => {
                let mut v = vec![0.0f32; self.out_dim * self.in_dim];
                for (o, row) in v.chunks_mut(self.in_dim).enumerate() {
                    self.row(o, row);
                }
                owned = v;
                &owned
            }
        };
        // The output-major [out, in] matrix read as input-major with out inputs.
        cpu::matmul_t(dy, n_tok, w, self.out_dim, self.in_dim, dx);
    }
}

/// Row-major `[out, in]` to input-major `[in, out]`, blocked: cache-friendly on both sides.
pub(crate) fn transpose<T: Copy + Default + Send + Sync>(
    out_dim: usize,
    in_dim: usize,
    w: &[T],
) -> Vec<T> {
    use rayon::prelude::*;
    assert_eq!(w.len(), out_dim * in_dim);
    let mut wt = vec![T::default(); w.len()];
    const B: usize = 64;
    // Each task writes B input rows of wt (all of its columns), tile by tile.
    wt.par_chunks_mut((B * out_dim).max(1))
        .enumerate()
        .for_each(|(c, rows)| {
            let i0 = c * B;
            let i1 = (i0 + B).min(in_dim);
            for o0 in (0..out_dim).step_by(B) {
                for o in o0..(o0 + B).min(out_dim) {
                    for i in i0..i1 {
                        rows[(i - i0) * out_dim + o] = w[o * in_dim + i];
                    }
                }
            }
        });
    wt
}

#[cfg(test)]
mod tests {
    use super::*;

    /// q8 reproduces the f32 layer within its quantization error (relative to sum |x w|).
    const Q8_LAYER_TOL: f32 = 1e-2;
    /// What q4's 8-bit activations in decode may change per input row, relative to the largest
    /// |x| (the weights here are within [-1, 1]): each `x_j d_jg` is off by at most half a step
    /// of `max |x d| / 127`, with `d <= 2 / 15`, times `|q - 7.5| <= 7.5`
    /// (`teal_kernels::reference::gemv_q4_int8`).
    const Q4_ACT_TOL: f32 = (2.0 / 15.0) / 254.0 * 7.5;
    /// The same for q8 where its decode multiplies in integers (`teal_kernels::cpu::int8_dots`):
    /// `d <= 1 / 127`, times `|q| <= 127` (`teal_kernels::reference::gemv_q8_int8`).
    const Q8_ACT_TOL: f32 = (1.0 / 127.0) / 254.0 * 127.0;

    fn weights(out: usize, inp: usize) -> Vec<f32> {
        (0..out * inp)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 500.0)
            .collect()
    }

    #[test]
    fn every_dtype_matches_f32_and_keeps_its_threshold() {
        let (out, inp) = (77, 37);
        let w = weights(out, inp);
        let x: Vec<f32> = (0..inp)
            .map(|i| ((i * 13 % 11) as f32 - 5.0) / 5.0)
            .collect();
        let bias: Vec<f32> = (0..out).map(|o| o as f32 / 100.0).collect();
        let f = Linear::from_rows(out, inp, &w, Some(bias.clone()));
        let mut want = vec![0.0; out];
        f.forward(&x, &mut want);
        let scale: f32 = x.iter().map(|v| v.abs()).sum();
        for dtype in Dtype::ALL {
            let l = Linear::from_rows_as(dtype, "w", out, inp, &w, Some(bias.clone())).unwrap();
            assert_eq!(l.dtype(), dtype);
            let mut got = vec![0.0; out];
            l.forward(&x, &mut got);
            for (a, b) in want.iter().zip(&got) {
                assert!(
                    (a - b).abs() <= Q8_LAYER_TOL * scale * 4.0,
                    "{dtype:?}: {a} vs {b}"
                );
            }
            // Sparse decode equals the dense layer on the sparsified input, and prefill agrees.
            // q4's decode (and q8's with VNNI) rounds its activations to 8 bits in passes of
            // rows, which the two decodes cut differently and prefill does not do: up to
            // Q4_ACT_TOL (Q8_ACT_TOL) apart.
            let s = l.with_mask(Some(InputMask::Threshold(0.5)));
            let xs: Vec<f32> = x
                .iter()
                .map(|&v| if v.abs() > 0.5 { v } else { 0.0 })
                .collect();
            let (mut a, mut b, mut c) = (vec![0.0; out], vec![0.0; out], vec![0.0; 2 * out]);
            s.forward(&x, &mut a);
            l.forward(&xs, &mut b);
            let two: Vec<f32> = x.iter().chain(&x).copied().collect();
            s.forward_batch(&two, 2, &mut c);
            let per_row = match dtype {
                Dtype::Q4 => Q4_ACT_TOL,
                Dtype::Q8 if teal_kernels::cpu::int8_dots() => Q8_ACT_TOL,
                _ => 0.0,
            };
            let act = per_row * inp as f32 * x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            for o in 0..out {
                assert!(
                    (a[o] - b[o]).abs() <= 1e-5 * scale + 2.0 * act,
                    "{dtype:?} sparse"
                );
                assert!(
                    (a[o] - c[out + o]).abs() <= 1e-4 * scale + act,
                    "{dtype:?} prefill"
                );
            }
        }
    }

    /// `add_mask_change` moves a product from one mask to another: within f32 rounding of the
    /// product run again (relative to sum |x w| of a row), for every dtype, threshold and
    /// per-channel masks, a change to no mask, and masks that zero nothing or everything.
    #[test]
    fn a_mask_change_equals_the_product_under_the_new_mask() {
        const MASK_CHANGE_TOL: f32 = 1e-5;
        let (out, inp, n_tok) = (45, 67, 3);
        let w = values(out * inp, 1);
        let x = values(n_tok * inp, 2);
        let bias = values(out, 3);
        let chans: Vec<f32> = (0..inp).map(|j| (j % 5) as f32 / 8.0).collect();
        let masks = [
            None,
            Some(InputMask::Threshold(0.0)),
            Some(InputMask::Threshold(0.3)),
            Some(InputMask::Threshold(0.6)),
            Some(InputMask::Threshold(2.0)),
            Some(InputMask::Channels(chans.into())),
        ];
        for dtype in Dtype::ALL {
            let l = Linear::from_rows_as(dtype, "w", out, inp, &w, Some(bias.clone())).unwrap();
            for from in &masks {
                for to in &masks {
                    let (a, b) = (l.with_mask(from.clone()), l.with_mask(to.clone()));
                    let mut got = vec![0.0; n_tok * out];
                    a.forward_batch(&x, n_tok, &mut got);
                    b.add_mask_change(&a, &x, n_tok, &mut got);
                    let mut want = vec![0.0; n_tok * out];
                    b.forward_batch(&x, n_tok, &mut want);
                    for t in 0..n_tok {
                        let scale: f32 = x[t * inp..(t + 1) * inp].iter().map(|v| v.abs()).sum();
                        for o in t * out..(t + 1) * out {
                            assert!(
                                (got[o] - want[o]).abs() <= MASK_CHANGE_TOL * scale,
                                "{dtype:?} {from:?} -> {to:?}: {} vs {}",
                                got[o],
                                want[o]
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_weight_beyond_f16_is_a_named_error() {
        let mut w = weights(4, 4);
        w[3] = 1e6;
        let e = Linear::from_rows_as(Dtype::F16, "blk.0.w", 4, 4, &w, None).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("blk.0.w") && msg.contains("f16"), "{msg}");
    }

    /// Deterministic pseudo-random values in [-1, 1).
    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// The weight-aware mask zeroes exactly the inputs with `|x_j| * ||W[:, j]|| <= t`, in decode
    /// and prefill, at 0%, 100% and an odd size.
    #[test]
    fn weight_aware_mask_matches_its_definition() {
        let (out_dim, in_dim) = (37, 29);
        let w = values(out_dim * in_dim, 1);
        let x = values(3 * in_dim, 2);
        let dense = Linear::from_rows(out_dim, in_dim, &w, Some(values(out_dim, 3)));
        let norms: Vec<f32> = (0..in_dim)
            .map(|j| {
                (0..out_dim)
                    .map(|o| w[o * in_dim + j].powi(2))
                    .sum::<f32>()
                    .sqrt()
            })
            .collect();
        for (t, want_zeros) in [(-1.0f32, Some(0)), (0.3, None), (1e9, Some(3 * in_dim))] {
            let sparse = dense.with_mask(Some(InputMask::WeightAware(t)));
            let masked: Vec<f32> = x
                .iter()
                .enumerate()
                .map(|(i, &v)| {
                    if v.abs() * norms[i % in_dim] > t {
                        v
                    } else {
                        0.0
                    }
                })
                .collect();
            let zeros = masked.iter().filter(|&&v| v == 0.0).count();
            assert_eq!(sparse.count_zeroed(&x), zeros);
            if let Some(z) = want_zeros {
                assert_eq!(zeros, z);
            }
            let mut want = vec![0.0; 3 * out_dim];
            dense.forward_batch(&masked, 3, &mut want);
            let mut got = vec![0.0; 3 * out_dim];
            sparse.forward_batch(&x, 3, &mut got);
            for (row, (xr, wr)) in x.chunks(in_dim).zip(want.chunks(out_dim)).enumerate() {
                let mut y = vec![0.0; out_dim];
                sparse.forward(xr, &mut y);
                for (o, (&a, &b)) in y.iter().zip(wr).enumerate() {
                    // Summation order differs between the GEMV and the matmul.
                    assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "row {row} out {o}");
                }
            }
            assert_eq!(got, want);
        }
    }
}
