//! The linear layer: the one place where precision and sparsity live. The model calls
//! [`Linear::forward`] (one vector, decode) or [`Linear::forward_batch`] (many rows, prefill);
//! what kind of weights sit behind it, and whether the input is sparsified first, is this
//! module's business.

use std::sync::Arc;
use teal_kernels::cpu;

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
    /// TEAL threshold: inputs with `|x| <= threshold` are zeroed. `None`: dense.
    threshold: Option<f32>,
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
            threshold: None,
        }
    }

    /// The same weights (shared, not copied) with a TEAL threshold; `None` makes it dense.
    pub fn with_threshold(&self, threshold: Option<f32>) -> Linear {
        Linear {
            threshold,
            ..self.clone()
        }
    }

    pub fn threshold(&self) -> Option<f32> {
        self.threshold
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
        match (&*self.weight, self.threshold) {
            (Weight::F32(w), None) => cpu::gemv_t(w, self.in_dim, self.out_dim, x, y),
            (Weight::F32(w), Some(t)) => cpu::gemv_t_sparse(w, self.in_dim, self.out_dim, x, t, y),
        }
        self.add_bias(y);
    }

    /// Prefill: `y[T, out] = s_t(x[T, in]) W^T + b`.
    pub fn forward_batch(&self, x: &[f32], n_tok: usize, y: &mut [f32]) {
        let sparsified;
        let x = match self.threshold {
            None => x,
            Some(t) => {
                let mut v = vec![0.0; x.len()];
                teal_kernels::reference::sparsify(x, t, &mut v);
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
