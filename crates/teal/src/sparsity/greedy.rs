//! TEAL's block-wise greedy allocation (DESIGN §1). For one block, on its dense calibration
//! inputs: start with all seven sparsities at 0; at each step try raising each projection's
//! sparsity by `step / w_p`, run the block, and keep the candidate whose output is closest to
//! the dense output (L2 over the last 25% of positions); stop at a parameter-weighted block
//! sparsity of `max_sparsity`. Every step is recorded.
//!
//! Only the last quarter of positions is scored, so queries, the attention output and the MLP are
//! computed only there (keys and values need every position). MLP candidates reuse the
//! attention half of the current state and its MLP input, gate and up outputs: a step on gate
//! or up recomputes that projection and down, a step on down only down.

use super::effective_sparsity;
use super::thresholds::GreedyStep;
use crate::config::Config;
use crate::kv_cache::KvRows;
use crate::linear::{InputMask, Linear};
use crate::models::llama::{Block, PrefillBuffers};
use teal_kernels::cpu;

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
    // The MLP's input of the tail rows (`[samples, tail, hidden]`) and one projection of it
    // (`[samples, tail, out]`), a sample at a time as the prefill runs it.
    let mlp_input = |b: &Block, att: &[f32]| -> Vec<f32> {
        let mut h = vec![0.0f32; att.len()];
        b.mlp_input(c, att, samples * tail, &mut h);
        h
    };
    let project = |l: &Linear, h: &[f32]| -> Vec<f32> {
        let mut y = vec![0.0f32; samples * tail * l.out_dim];
        for (hs, ys) in h.chunks(tail * d).zip(y.chunks_mut(tail * l.out_dim)) {
            l.forward_batch(hs, tail, ys);
        }
        y
    };
    // The block's output from the attention half and the MLP's gate and up outputs.
    let mlp_output = |b: &Block, att: &[f32], g: &[f32], u: &[f32]| -> Vec<f32> {
        let ff = c.intermediate_size;
        let mut x = att.to_vec();
        let mut act = g.to_vec();
        let mut out = vec![0.0f32; tail * d];
        for s in 0..samples {
            let a = &mut act[s * tail * ff..(s + 1) * tail * ff];
            cpu::silu_mul_in_place(a, &u[s * tail * ff..(s + 1) * tail * ff]);
            b.mlp_output(&mut x[s * tail * d..(s + 1) * tail * d], tail, a, &mut out);
        }
        x
    };
    let mlp_parts = |b: &Block, att: &[f32]| -> MlpParts {
        let h = mlp_input(b, att);
        let (g, u) = (project(&b.gate_proj, &h), project(&b.up_proj, &h));
        MlpParts { h, g, u }
    };
    let with =
        |s: &[f64; 7]| -> Block { block.with_masks(&std::array::from_fn(|p| mask(p, s[p]))) };

    let dense_att = attention(block, &mut ws);
    let dense = mlp_parts(block, &dense_att);
    let target = mlp_output(block, &dense_att, &dense.g, &dense.u);
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
    let mut parts = mlp_parts(&with(&s), &dense_att);
    let mut att = dense_att;
    let mut steps = vec![GreedyStep {
        sparsity: 0.0,
        error: 0.0,
        s,
    }];
    while effective_sparsity(&s, weights) < opts.max_sparsity {
        // The best step so far: its error, the sparsities after it and what it changed of the
        // state (the attention output, the MLP's parts).
        let mut best: Option<Candidate> = None;
        for p in 0..7 {
            let mut cand = s;
            cand[p] = (s[p] + opts.step / weights[p]).min(MAX_PROJ_SPARSITY);
            if cand[p] <= s[p] {
                continue;
            }
            let b = with(&cand);
            let (err, change) = match p {
                0..4 => {
                    let a = attention(&b, &mut ws);
                    let m = mlp_parts(&b, &a);
                    let err = rel_err(&mlp_output(&b, &a, &m.g, &m.u));
                    (err, Change::Attention(a, m))
                }
                4 => {
                    let g = project(&b.gate_proj, &parts.h);
                    (
                        rel_err(&mlp_output(&b, &att, &g, &parts.u)),
                        Change::Gate(g),
                    )
                }
                5 => {
                    let u = project(&b.up_proj, &parts.h);
                    (rel_err(&mlp_output(&b, &att, &parts.g, &u)), Change::Up(u))
                }
                _ => (
                    rel_err(&mlp_output(&b, &att, &parts.g, &parts.u)),
                    Change::Down,
                ),
            };
            if best.as_ref().is_none_or(|bst| err < bst.err) {
                best = Some(Candidate {
                    err,
                    s: cand,
                    change,
                });
            }
        }
        let Some(Candidate {
            err,
            s: cand,
            change,
        }) = best
        else {
            break;
        };
        s = cand;
        match change {
            Change::Attention(a, m) => (att, parts) = (a, m),
            Change::Gate(g) => parts.g = g,
            Change::Up(u) => parts.u = u,
            Change::Down => {}
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
    change: Change,
}

/// What a candidate step changes of the search's state.
enum Change {
    /// A step on q, k, v or o: the attention half's output and everything of the MLP.
    Attention(Vec<f32>, MlpParts),
    Gate(Vec<f32>),
    Up(Vec<f32>),
    Down,
}

/// The MLP's input and its gate and up outputs on the tail rows of every sample.
struct MlpParts {
    h: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
}
