//! The linear layer: the one place where precision and sparsity live. The model calls
//! [`Linear::forward`] (one vector, decode) or [`Linear::forward_batch`] (many rows, prefill);
//! what kind of weights sit behind it, and whether the input is sparsified first, is this
//! module's business.

use crate::error::{Error, Result};
use std::sync::Arc;
use teal_kernels::cpu;
use teal_kernels::packed::{Data, Dtype, PackedT};

/// Weight storage: input-major (`wt[in, out]`) in one of the formats of
/// [`teal_kernels::packed`], so a zeroed input skips a whole row (and its scales).
type Weight = PackedT;

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

    fn new(w: PackedT, bias: Option<Vec<f32>>) -> Linear {
        if let Some(b) = &bias {
            assert_eq!(b.len(), w.n_out);
        }
        Linear {
            in_dim: w.n_in,
            out_dim: w.n_out,
            weight: Arc::new(w),
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
        let w = self.weight.mat();
        match self.threshold {
            None => cpu::gemv(&w, x, y),
            Some(t) => {
                cpu::gemv_sparse(&w, x, t, y);
            }
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
        cpu::matmul_packed(x, n_tok, &self.weight.mat(), y);
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

/// Row-major `[out, in]` to input-major `[in, out]`, blocked: cache-friendly on both sides.
fn transpose(out_dim: usize, in_dim: usize, w: &[f32]) -> Vec<f32> {
    assert_eq!(w.len(), out_dim * in_dim);
    let mut wt = vec![0.0f32; w.len()];
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
    wt
}

#[cfg(test)]
mod tests {
    use super::*;

    /// q8 reproduces the f32 layer within its quantization error (relative to sum |x w|).
    const Q8_LAYER_TOL: f32 = 1e-2;

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
            let s = l.with_threshold(Some(0.5));
            let xs: Vec<f32> = x
                .iter()
                .map(|&v| if v.abs() > 0.5 { v } else { 0.0 })
                .collect();
            let (mut a, mut b, mut c) = (vec![0.0; out], vec![0.0; out], vec![0.0; 2 * out]);
            s.forward(&x, &mut a);
            l.forward(&xs, &mut b);
            let two: Vec<f32> = x.iter().chain(&x).copied().collect();
            s.forward_batch(&two, 2, &mut c);
            for o in 0..out {
                assert!((a[o] - b[o]).abs() <= 1e-5 * scale, "{dtype:?} sparse");
                assert!(
                    (a[o] - c[out + o]).abs() <= 1e-4 * scale,
                    "{dtype:?} prefill"
                );
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
}
