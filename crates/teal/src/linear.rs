//! The linear layer: the one place where precision and sparsity live. The model calls
//! [`Linear::forward`] (one vector, decode) or [`Linear::forward_batch`] (many rows, prefill);
//! what kind of weights sit behind it, and whether the input is sparsified first, is this
//! module's business.

use std::sync::{Arc, OnceLock};
use teal_kernels::{cpu, reference};

/// Which inputs of a sparse linear layer are zeroed before the product.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum InputMask {
    /// TEAL: `x_j` is zeroed when `|x_j| <= t`.
    Threshold(f32),
    /// Weight-aware (WINA): `x_j` is zeroed when `|x_j| * ||W[:, j]|| <= t`, i.e. a threshold
    /// `t / ||W[:, j]||` per input channel. Still whole weight rows are skipped.
    WeightAware(f32),
}

/// An [`InputMask`] resolved against this layer's weights.
#[derive(Clone, Debug)]
enum Sparsify {
    Threshold(f32),
    /// Per-input-channel thresholds.
    Channels(Arc<Vec<f32>>),
}

thread_local! {
    /// The masked input of a per-channel sparse GEMV (decode), reused across calls.
    static CHANNEL_SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Weight storage. Input-major (`wt[in, out]`): the weights of one input channel are
/// contiguous, so a zeroed input skips a whole row.
#[derive(Debug)]
enum Weight {
    F32(Vec<f32>),
}

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
    /// From a row-major `[out, in]` matrix (the checkpoints' layout).
    pub fn from_rows(out_dim: usize, in_dim: usize, w: &[f32], bias: Option<Vec<f32>>) -> Linear {
        assert_eq!(w.len(), out_dim * in_dim);
        let mut wt = vec![0.0f32; w.len()];
        // Blocked transpose: cache-friendly on both sides.
        const B: usize = 64;
        for o0 in (0..out_dim).step_by(B) {
            for i0 in (0..in_dim).step_by(B) {
                for o in o0..(o0 + B).min(out_dim) {
                    for i in i0..(i0 + B).min(in_dim) {
                        wt[i * out_dim + o] = w[o * in_dim + i];
                    }
                }
            }
        }
        if let Some(b) = &bias {
            assert_eq!(b.len(), out_dim);
        }
        Linear {
            in_dim,
            out_dim,
            weight: Arc::new(Weight::F32(wt)),
            bias: bias.map(Arc::new),
            input_norms: Arc::new(OnceLock::new()),
            mask: None,
            sparsify: None,
        }
    }

    /// The same weights (shared, not copied) with an input mask; `None` makes it dense.
    pub fn with_mask(&self, mask: Option<InputMask>) -> Linear {
        let sparsify = mask.map(|m| match m {
            InputMask::Threshold(t) => Sparsify::Threshold(t),
            InputMask::WeightAware(t) => Sparsify::Channels(Arc::new(
                self.input_norms()
                    .iter()
                    .map(|&n| if n > 0.0 { t / n } else { f32::INFINITY })
                    .collect(),
            )),
        });
        Linear {
            mask,
            sparsify,
            ..self.clone()
        }
    }

    pub fn mask(&self) -> Option<InputMask> {
        self.mask
    }

    /// The bias added after the product, if any.
    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref().map(|b| b.as_slice())
    }

    /// `||W[:, j]||` for every input channel `j`.
    pub fn input_norms(&self) -> &[f32] {
        self.input_norms.get_or_init(|| {
            (0..self.in_dim)
                .map(|j| {
                    let r = self.input_row(j);
                    r.iter().map(|&w| (w as f64) * (w as f64)).sum::<f64>().sqrt() as f32
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
                .map(|r| r.iter().zip(t.iter()).filter(|(v, t)| v.abs() <= **t).count())
                .sum(),
        }
    }

    /// Bytes of weights stored.
    pub fn weight_bytes(&self) -> usize {
        match &*self.weight {
            Weight::F32(w) => w.len() * 4,
        }
    }

    /// Weights of input channel `j` (a row of the input-major matrix), for gathers such as
    /// a tied embedding lookup.
    pub fn input_row(&self, j: usize) -> &[f32] {
        match &*self.weight {
            Weight::F32(w) => &w[j * self.out_dim..(j + 1) * self.out_dim],
        }
    }

    /// Decode: `y = W s_t(x) + b` for one vector.
    pub fn forward(&self, x: &[f32], y: &mut [f32]) {
        match (&*self.weight, &self.sparsify) {
            (Weight::F32(w), None) => cpu::gemv_t(w, self.in_dim, self.out_dim, x, y),
            (Weight::F32(w), Some(Sparsify::Threshold(t))) => {
                cpu::gemv_t_sparse(w, self.in_dim, self.out_dim, x, *t, y)
            }
            (Weight::F32(w), Some(Sparsify::Channels(t))) => CHANNEL_SCRATCH.with_borrow_mut(|xs| {
                // Zero by channel, then the row-skipping kernel skips the zeros (`|0| <= 0`).
                xs.resize(x.len(), 0.0);
                reference::sparsify_channels(x, t, xs);
                cpu::gemv_t_sparse(w, self.in_dim, self.out_dim, xs, 0.0, y)
            }),
        }
        self.add_bias(y);
    }

    /// Prefill: `y[T, out] = s_t(x[T, in]) W^T + b`.
    pub fn forward_batch(&self, x: &[f32], n_tok: usize, y: &mut [f32]) {
        let sparsified;
        let x = match &self.sparsify {
            None => x,
            Some(s) => {
                let mut v = vec![0.0; x.len()];
                match s {
                    Sparsify::Threshold(t) => reference::sparsify(x, *t, &mut v),
                    Sparsify::Channels(t) => reference::sparsify_channels(x, t, &mut v),
                }
                sparsified = v;
                &sparsified
            }
        };
        match &*self.weight {
            Weight::F32(w) => cpu::matmul_t(x, n_tok, w, self.in_dim, self.out_dim, y),
        }
        for row in y.chunks_mut(self.out_dim) {
            self.add_bias(row);
        }
    }

    fn add_bias(&self, y: &mut [f32]) {
        if let Some(b) = &self.bias {
            for (v, b) in y.iter_mut().zip(b.iter()) {
                *v += b;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            .map(|j| (0..out_dim).map(|o| w[o * in_dim + j].powi(2)).sum::<f32>().sqrt())
            .collect();
        for (t, want_zeros) in [(-1.0f32, Some(0)), (0.3, None), (1e9, Some(3 * in_dim))] {
            let sparse = dense.with_mask(Some(InputMask::WeightAware(t)));
            let masked: Vec<f32> = x
                .iter()
                .enumerate()
                .map(|(i, &v)| if v.abs() * norms[i % in_dim] > t { v } else { 0.0 })
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
