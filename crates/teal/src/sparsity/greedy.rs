//! TEAL's block-wise greedy allocation (DESIGN §1). For one block, on its dense calibration
//! inputs: start with all seven sparsities at 0; at each step try raising each projection's
//! sparsity by `step / w_p`, run the block, and keep the candidate whose output is closest to
//! the dense output (L2 over the last 25% of positions); stop at a parameter-weighted block
//! sparsity of `max_sparsity`. Every step is recorded.
//!
//! Only the last quarter of positions is scored, so queries, the attention output and the MLP are
//! computed only there (keys and values need every position). The search keeps every
//! intermediate of the block at its current sparsities, and a candidate recomputes only what its
//! step changes: the stepped projection's output by the weight rows of the inputs its new mask
//! zeroes ([`Linear::add_mask_change`]), then everything after it in the block. The seven
//! candidates of a step run in parallel.

use super::thresholds::GreedyStep;
use super::{effective_sparsity, window_rows};
use crate::config::Config;
use crate::kv_cache::KvRows;
use crate::linear::{InputMask, Linear};
use crate::models::llama::{attend, Block};
use rayon::prelude::*;
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
    // TEAL's last quarter: from position floor(0.75 len).
    let tail_from = (len * 3 / 4).min(len - 1);
    let mut hn = vec![0.0f32; inputs.len()];
    block.attention_input(c, inputs, samples * len, &mut hn);
    let run = Run {
        c,
        samples,
        len,
        tail_from,
        rope,
        x_tail: window_rows(inputs, d, len, samples, tail_from..len),
        hn_tail: window_rows(&hn, d, len, samples, tail_from..len),
        hn,
    };
    let with =
        |s: &[f64; 7]| -> Block { block.with_masks(&std::array::from_fn(|p| mask(p, s[p]))) };

    let target = run.state(block).output();
    let tail = len - tail_from;
    let norm = channel_norms(&target, None, d, tail).max(f64::MIN_POSITIVE);
    let rel_err = |y: &[f32]| -> f64 { channel_norms(y, Some(&target), d, tail) / norm };

    let mut s = [0.0f64; 7];
    let mut cur = with(&s);
    let mut state = run.state(&cur);
    let mut steps = vec![GreedyStep {
        sparsity: 0.0,
        error: 0.0,
        s,
    }];
    while effective_sparsity(&s, weights) < opts.max_sparsity {
        let cands: Vec<(usize, [f64; 7], Block)> = (0..7)
            .filter_map(|p| {
                let mut cand = s;
                cand[p] = (s[p] + opts.step / weights[p]).min(MAX_PROJ_SPARSITY);
                (cand[p] > s[p]).then(|| (p, cand, with(&cand)))
            })
            .collect();
        let tried: Vec<(f64, [f64; 7], Block, Update)> = cands
            .into_par_iter()
            .map(|(p, cand, b)| {
                let u = run.step(&state, &cur, &b, p);
                (rel_err(&u.output(&state)), cand, b, u)
            })
            .collect();
        // The least error; the first projection of equal ones.
        let best = tried
            .into_iter()
            .reduce(|a, b| if b.0 < a.0 { b } else { a });
        let Some((err, cand, b, update)) = best else {
            break;
        };
        (s, cur) = (cand, b);
        update.apply(&mut state);
        steps.push(GreedyStep {
            sparsity: effective_sparsity(&s, weights),
            error: err,
            s,
        });
    }
    steps
}

/// What the search runs the block on: its inputs and their normalized form, fixed for the
/// whole search.
struct Run<'a> {
    c: &'a Config,
    samples: usize,
    len: usize,
    /// The first scored position of each sample.
    tail_from: usize,
    rope: (&'a [f32], &'a [f32]),
    /// The block's inputs at the scored positions, `[samples, tail, hidden]`.
    x_tail: Vec<f32>,
    /// The attention's normalized input at every position, `[samples, len, hidden]`, and at
    /// the scored ones.
    hn: Vec<f32>,
    hn_tail: Vec<f32>,
}

/// The block's intermediates at the search's current sparsities. Rows are those of every
/// sample: all `len` positions for keys and values, the scored ones for the rest.
struct State {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// The attention's output, o_proj's input.
    ctx: Vec<f32>,
    /// The residual after the attention half.
    att: Vec<f32>,
    /// The MLP's input and its gate and up outputs.
    h: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    /// down_proj's output.
    dn: Vec<f32>,
}

impl State {
    /// The block's output at the scored positions.
    fn output(&self) -> Vec<f32> {
        block_output(&self.att, &self.dn)
    }
}

/// TEAL's block error (its `calculate_activation_error`): per window and output channel, the
/// L2 norm over the tail positions of `y - target` (of `y` alone without a target), averaged
/// over windows and channels. `y` holds windows of `tail` rows of `d`.
fn channel_norms(y: &[f32], target: Option<&[f32]>, d: usize, tail: usize) -> f64 {
    let mut sq = vec![0.0f64; d];
    let mut total = 0.0f64;
    for (w, win) in y.chunks(tail * d).enumerate() {
        sq.iter_mut().for_each(|v| *v = 0.0);
        for (t, row) in win.chunks(d).enumerate() {
            let at = (w * tail + t) * d;
            for (j, &a) in row.iter().enumerate() {
                let e = a as f64 - target.map_or(0.0, |b| b[at + j] as f64);
                sq[j] += e * e;
            }
        }
        total += sq.iter().map(|v| v.sqrt()).sum::<f64>();
    }
    total / (y.len() / tail) as f64
}

/// The block's output from the residual after the attention half and down_proj's output.
fn block_output(att: &[f32], dn: &[f32]) -> Vec<f32> {
    att.iter().zip(dn).map(|(a, d)| a + d).collect()
}

/// What a candidate step recomputed of the [`State`] (`None`: unchanged).
#[derive(Default)]
struct Update {
    q: Option<Vec<f32>>,
    k: Option<Vec<f32>>,
    v: Option<Vec<f32>>,
    ctx: Option<Vec<f32>>,
    att: Option<Vec<f32>>,
    h: Option<Vec<f32>>,
    g: Option<Vec<f32>>,
    u: Option<Vec<f32>>,
    dn: Vec<f32>,
}

impl Update {
    /// The block's output at the scored positions after this step.
    fn output(&self, st: &State) -> Vec<f32> {
        block_output(self.att.as_ref().unwrap_or(&st.att), &self.dn)
    }

    fn apply(self, st: &mut State) {
        let put = |dst: &mut Vec<f32>, v: Option<Vec<f32>>| {
            if let Some(v) = v {
                *dst = v;
            }
        };
        put(&mut st.q, self.q);
        put(&mut st.k, self.k);
        put(&mut st.v, self.v);
        put(&mut st.ctx, self.ctx);
        put(&mut st.att, self.att);
        put(&mut st.h, self.h);
        put(&mut st.g, self.g);
        put(&mut st.u, self.u);
        st.dn = self.dn;
    }
}

impl Run<'_> {
    /// `l` on `x` (rows of its input size).
    fn project(l: &Linear, x: &[f32]) -> Vec<f32> {
        let n = x.len() / l.in_dim;
        let mut y = vec![0.0f32; n * l.out_dim];
        l.forward_batch(x, n, &mut y);
        y
    }

    /// `y` changed from `old`'s mask on `x` to `new`'s.
    fn changed(new: &Linear, old: &Linear, x: &[f32], y: &[f32]) -> Vec<f32> {
        let mut y = y.to_vec();
        new.add_mask_change(old, x, x.len() / new.in_dim, &mut y);
        y
    }

    /// The attention's output at the scored positions from the queries there and the keys and
    /// values of every position (all before RoPE).
    fn attention(&self, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f32> {
        let (c, len) = (self.c, self.len);
        let (qd, kvd) = (c.q_dim(), c.kv_dim());
        let tail = len - self.tail_from;
        let mut out = vec![0.0f32; self.samples * tail * qd];
        let (mut kc, mut vc) = (vec![0.0f32; len * kvd], vec![0.0f32; len * kvd]);
        for (s, att) in out.chunks_mut(tail * qd).enumerate() {
            let mut qs = q[s * tail * qd..(s + 1) * tail * qd].to_vec();
            let mut ks = k[s * len * kvd..(s + 1) * len * kvd].to_vec();
            let vs = &v[s * len * kvd..(s + 1) * len * kvd];
            let kv = KvRows::F32(&mut kc, &mut vc);
            attend(
                c,
                &mut qs,
                &mut ks,
                vs,
                len,
                0,
                self.tail_from,
                self.rope,
                kv,
                att,
            );
        }
        out
    }

    /// The residual after the attention half from o_proj's input.
    fn attention_output(&self, b: &Block, ctx: &[f32]) -> Vec<f32> {
        let mut x = Self::project(&b.o_proj, ctx);
        for (x, r) in x.iter_mut().zip(&self.x_tail) {
            *x += r;
        }
        x
    }

    /// The MLP's input and its gate and up outputs from the residual after the attention.
    fn mlp_front(&self, b: &Block, att: &[f32]) -> [Vec<f32>; 3] {
        let mut h = vec![0.0f32; att.len()];
        b.mlp_input(self.c, att, att.len() / self.c.hidden_size, &mut h);
        let (g, u) = (
            Self::project(&b.gate_proj, &h),
            Self::project(&b.up_proj, &h),
        );
        [h, g, u]
    }

    /// down_proj's input.
    fn act(g: &[f32], u: &[f32]) -> Vec<f32> {
        let mut a = g.to_vec();
        cpu::silu_mul_in_place(&mut a, u);
        a
    }

    /// Every intermediate of `b` on the search's inputs.
    fn state(&self, b: &Block) -> State {
        let q = Self::project(&b.q_proj, &self.hn_tail);
        let (k, v) = (
            Self::project(&b.k_proj, &self.hn),
            Self::project(&b.v_proj, &self.hn),
        );
        let ctx = self.attention(&q, &k, &v);
        let att = self.attention_output(b, &ctx);
        let [h, g, u] = self.mlp_front(b, &att);
        let dn = Self::project(&b.down_proj, &Self::act(&g, &u));
        State {
            q,
            k,
            v,
            ctx,
            att,
            h,
            g,
            u,
            dn,
        }
    }

    /// The step that moves projection `p` from `cur`'s mask to `new`'s (the two blocks differ
    /// only there), from the state of `cur`.
    fn step(&self, st: &State, cur: &Block, new: &Block, p: usize) -> Update {
        let mut up = Update::default();
        match p {
            0 => {
                up.q = Some(Self::changed(
                    &new.q_proj,
                    &cur.q_proj,
                    &self.hn_tail,
                    &st.q,
                ))
            }
            1 => up.k = Some(Self::changed(&new.k_proj, &cur.k_proj, &self.hn, &st.k)),
            2 => up.v = Some(Self::changed(&new.v_proj, &cur.v_proj, &self.hn, &st.v)),
            4 => up.g = Some(Self::changed(&new.gate_proj, &cur.gate_proj, &st.h, &st.g)),
            5 => up.u = Some(Self::changed(&new.up_proj, &cur.up_proj, &st.h, &st.u)),
            _ => {}
        }
        if p < 3 {
            up.ctx = Some(self.attention(
                up.q.as_ref().unwrap_or(&st.q),
                up.k.as_ref().unwrap_or(&st.k),
                up.v.as_ref().unwrap_or(&st.v),
            ));
        }
        if p < 4 {
            let att = match &up.ctx {
                Some(ctx) => self.attention_output(new, ctx),
                None => Self::changed(&new.o_proj, &cur.o_proj, &st.ctx, &st.att),
            };
            let [h, g, u] = self.mlp_front(new, &att);
            (up.att, up.h, up.g, up.u) = (Some(att), Some(h), Some(g), Some(u));
        }
        let a = Self::act(
            up.g.as_ref().unwrap_or(&st.g),
            up.u.as_ref().unwrap_or(&st.u),
        );
        up.dn = if p == 6 {
            Self::changed(&new.down_proj, &cur.down_proj, &a, &st.dn)
        } else {
            Self::project(&new.down_proj, &a)
        };
        up
    }
}
