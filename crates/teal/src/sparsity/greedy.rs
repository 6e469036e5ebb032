//! TEAL's block-wise greedy allocation (DESIGN §1). For one block, on its dense calibration
//! inputs: start with all seven sparsities at 0; at each step try raising each projection's
//! sparsity by `step / w_p`, run the block, and keep the candidate whose output is closest to
//! the dense output (L2 over the last 25% of positions); stop at a parameter-weighted block
//! sparsity of `max_sparsity`. Every step is recorded.
//!
//! Only the last quarter of positions is scored, so queries, the attention output and the MLP are
//! computed only there (keys and values need every position), and MLP candidates reuse the
//! attention half of the current state.

use super::effective_sparsity;
use super::thresholds::GreedyStep;
use crate::config::Config;
use crate::kv_cache::KvRows;
use crate::linear::InputMask;
use crate::models::llama::{Block, PrefillBuffers};

#[derive(Clone, Debug)]
pub struct GreedyOptions {
    pub samples: usize,
    pub seq_len: usize,
    pub step: f64,
    pub max_sparsity: f64,
}

impl Default for GreedyOptions {
    fn default() -> Self {
        GreedyOptions {
            samples: 2,
            seq_len: 256,
            step: 0.05,
            max_sparsity: 0.9,
        }
    }
}

/// Highest per-projection sparsity the search may assign (the site tables stop at 0.995).
pub const MAX_PROJ_SPARSITY: f64 = 0.99;

/// Runs the greedy search for one block. `inputs` holds `samples` sequences of `len` dense block
/// inputs (`[samples, len, hidden]`); `mask(proj, s)` gives a projection's input mask for
/// sparsity `s`; `rope` holds cos/sin tables for positions `0..len`.
#[allow(clippy::too_many_arguments)]
pub fn greedy_block(
    c: &Config,
    block: &Block,
    inputs: &[f32],
    samples: usize,
    len: usize,
    rope: (&[f32], &[f32]),
    mask: &dyn Fn(usize, f64) -> Option<InputMask>,
    weights: &[f64; 7],
    opts: &GreedyOptions,
) -> Vec<GreedyStep> {
    let d = c.hidden_size;
    let tail_from = len - (len / 4).max(1);
    let tail = len - tail_from;
    let mut ws = PrefillBuffers::new(c, len);
    let mut kc = vec![0.0f32; len * c.kv_dim()];
    let mut vc = vec![0.0f32; len * c.kv_dim()];

    // Attention half for the tail rows of every sample: `[samples, tail, hidden]`.
    let mut attention = |b: &Block, ws: &mut PrefillBuffers| -> Vec<f32> {
        let mut out = Vec::with_capacity(samples * tail * d);
        for s in 0..samples {
            let mut x = inputs[s * len * d..(s + 1) * len * d].to_vec();
            b.attention_residual(
                c,
                &mut x,
                len,
                0,
                tail_from,
                rope,
                KvRows::F32(&mut kc, &mut vc),
                ws,
                &mut None,
            );
            out.extend_from_slice(&x[tail_from * d..]);
        }
        out
    };
    let mlp = |b: &Block, att: &[f32], ws: &mut PrefillBuffers| -> Vec<f32> {
        let mut x = att.to_vec();
        for s in 0..samples {
            b.mlp_residual(
                c,
                &mut x[s * tail * d..(s + 1) * tail * d],
                tail,
                ws,
                &mut None,
            );
        }
        x
    };
    let with =
        |s: &[f64; 7]| -> Block { block.with_masks(&std::array::from_fn(|p| mask(p, s[p]))) };

    let dense_att = attention(block, &mut ws);
    let target = mlp(block, &dense_att, &mut ws);
    let norm: f64 = target
        .iter()
        .map(|&v| (v as f64) * (v as f64))
        .sum::<f64>()
        .sqrt()
        .max(f64::MIN_POSITIVE);
    let rel_err = |y: &[f32]| -> f64 {
        y.iter()
            .zip(&target)
            .map(|(&a, &b)| ((a - b) as f64).powi(2))
            .sum::<f64>()
            .sqrt()
            / norm
    };

    let mut s = [0.0f64; 7];
    let mut att = dense_att;
    let mut steps = vec![GreedyStep {
        sparsity: 0.0,
        error: 0.0,
        s,
    }];
    while effective_sparsity(&s, weights) < opts.max_sparsity {
        // The best step so far: its error, the sparsities after it and, for a step on an
        // attention projection, the attention output it gives.
        let mut best: Option<Candidate> = None;
        for p in 0..7 {
            let mut cand = s;
            cand[p] = (s[p] + opts.step / weights[p]).min(MAX_PROJ_SPARSITY);
            if cand[p] <= s[p] {
                continue;
            }
            let b = with(&cand);
            let (err, new_att) = if p < 4 {
                let a = attention(&b, &mut ws);
                (rel_err(&mlp(&b, &a, &mut ws)), Some(a))
            } else {
                (rel_err(&mlp(&b, &att, &mut ws)), None)
            };
            if best.as_ref().is_none_or(|bst| err < bst.err) {
                best = Some(Candidate {
                    err,
                    s: cand,
                    att: new_att,
                });
            }
        }
        let Some(Candidate {
            err,
            s: cand,
            att: new_att,
        }) = best
        else {
            break;
        };
        s = cand;
        if let Some(a) = new_att {
            att = a;
        }
        steps.push(GreedyStep {
            sparsity: effective_sparsity(&s, weights),
            error: err,
            s,
        });
    }
    steps
}

/// A candidate step of the greedy search.
struct Candidate {
    err: f64,
    s: [f64; 7],
    att: Option<Vec<f32>>,
}
