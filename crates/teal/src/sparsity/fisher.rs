//! Loss gradients at the inputs of the seven projections, for loss-aware sparsity: a forward
//! pass of the model on one window that keeps what the backward pass needs, then the backward
//! pass, in f32 on the CPU. The gradient at projection `p`'s input is taken through `p` alone
//! (`dL/dx = dL/dy W`), so q, k and v (and gate and up) each get their own, and it covers
//! every input channel whatever `p`'s mask. Its square averaged over positions is the
//! diagonal Fisher `F_j = E[(dL/dx_j)^2]`: zeroing `x_j` costs about `F_j x_j^2 / 2`. The
//! loss is the NLL of next tokens drawn from the model's own distribution
//! ([`FisherLabels::Model`], the default): then `F` is the Fisher of the model's predictive
//! distribution and the cost is the KL divergence of the perturbed model from the dense one.
//! With the text's own next tokens ([`FisherLabels::Text`]) it is the empirical Fisher.

use crate::config::Config;
use crate::error::{Error, Result};
use crate::eval::perplexity::nll;
use crate::models::llama::{add_assign, Block, Llama};
use rand::{rngs::StdRng, Rng, SeedableRng};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use teal_kernels::cpu::{gemm, Strided};
use teal_kernels::reference;

/// Receives `(layer, proj, x, grad)` from [`input_gradients`].
pub type LayerVisitor<'a> = dyn FnMut(usize, usize, &[f32], &[f32]) + 'a;

/// Receives `(proj, x, grad)` from one block's backward pass.
type ProjVisitor<'a> = dyn FnMut(usize, &[f32], &[f32]) + 'a;

/// One KV head's share of the attention gradients: its query heads' `dq`, and `dk`, `dv`.
type KvHeadGrads = (Vec<Vec<f32>>, Vec<f32>, Vec<f32>);

/// Windows of calibration text the loss gradients are taken on, and for which labels.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FisherOptions {
    pub samples: usize,
    pub seq_len: usize,
    pub labels: FisherLabels,
}

/// Which next token the loss at each position is the NLL of.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FisherLabels {
    /// The text's own next token: the empirical Fisher (files written before the choice
    /// existed are of this kind).
    #[default]
    Text,
    /// A token drawn from the model's next-token distribution, seeded (window `i` of
    /// [`input_fisher`] draws with `seed + i`): the Fisher of the model's own predictive
    /// distribution (its Gauss-Newton curvature).
    Model { seed: u64 },
}

/// What the backward pass of one block needs from its forward pass.
struct Saved {
    /// The residual entering the block, and after its attention half (`[n, hidden]`).
    x_in: Vec<f32>,
    x_mid: Vec<f32>,
    /// Queries and keys after RoPE, and values (`[n, q_dim]`, `[n, kv_dim]`).
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// The attention output, o_proj's input (`[n, q_dim]`).
    att: Vec<f32>,
    /// The gate before its activation, and up (`[n, intermediate]`).
    g: Vec<f32>,
    u: Vec<f32>,
}

/// Runs `window` through `model` (its masks applied in the forward pass) and calls
/// `visit(layer, proj, x, grad)` with the input of every projection and the loss gradient
/// there (both `[n, in]`, the input before the mask; `proj` in `PROJ_NAMES` order), layers
/// from last to first. The loss is the mean NLL, over the positions but the last, of the next
/// tokens `labels` chooses. Returns the loss and those tokens.
pub fn input_gradients(
    model: &Llama,
    window: &[u32],
    labels: FisherLabels,
    visit: &mut LayerVisitor,
) -> Result<(f64, Vec<u32>)> {
    let c = &model.config;
    let (n, d, vocab) = (window.len(), c.hidden_size, c.vocab_size);
    if n < 2 {
        return Err(Error::Invalid(format!(
            "loss gradients need a window of at least 2 tokens, got {n}"
        )));
    }
    model.check_tokens(window)?;
    let (cos, sin) = model.rope_tables_for(0, n);
    let mut x = vec![0.0f32; n * d];
    for (&t, xt) in window.iter().zip(x.chunks_mut(d)) {
        model.embed(t, xt);
    }
    let saved: Vec<Saved> = model
        .layers
        .iter()
        .map(|b| forward_block(c, b, &mut x, n, (&cos, &sin)))
        .collect();

    let mut normed = vec![0.0f32; n * d];
    for (xt, ht) in x.chunks(d).zip(normed.chunks_mut(d)) {
        reference::rmsnorm(xt, &model.norm, c.rms_norm_eps, ht);
    }
    let mut logits = vec![0.0f32; n * vocab];
    model.lm_head.forward_batch(&normed, n, &mut logits);
    let mut rng = match labels {
        FisherLabels::Text => None,
        FisherLabels::Model { seed } => Some(StdRng::seed_from_u64(seed)),
    };
    // d(mean NLL)/d(logits): (softmax - one-hot) / (n - 1); the last position predicts nothing.
    let scale = 1.0 / (n - 1) as f64;
    let mut loss = 0.0f64;
    let mut targets = Vec::with_capacity(n - 1);
    for (t, row) in logits.chunks_mut(vocab).enumerate() {
        if t + 1 == n {
            row.fill(0.0);
            continue;
        }
        let text_nll = nll(row, window[t + 1]);
        let lse = text_nll + row[window[t + 1] as usize] as f64;
        for v in row.iter_mut() {
            *v = ((*v as f64 - lse).exp() * scale) as f32;
        }
        let target = match rng.as_mut() {
            None => {
                loss += text_nll;
                window[t + 1] as usize
            }
            Some(r) => {
                let i = draw(row, r.random::<f64>() * scale);
                loss -= (row[i] as f64 / scale).ln();
                i
            }
        };
        row[target] -= scale as f32;
        targets.push(target as u32);
    }
    let mut dnormed = vec![0.0f32; n * d];
    model.lm_head.input_grad_batch(&logits, n, &mut dnormed);
    drop(logits);
    let mut dx = vec![0.0f32; n * d];
    rmsnorm_backward_add(&x, &model.norm, c.rms_norm_eps, &dnormed, &mut dx);
    let neg_sin: Vec<f32> = sin.iter().map(|v| -v).collect();
    for (l, (b, s)) in model.layers.iter().zip(&saved).enumerate().rev() {
        backward_block(c, b, s, &mut dx, n, (&cos, &neg_sin), &mut |p, x, g| {
            visit(l, p, x, g)
        });
    }
    Ok((loss * scale, targets))
}

/// The first index at which the running sum of `weights` exceeds `u` (the last index with a
/// positive weight when rounding leaves the sum at or below `u`).
pub fn draw(weights: &[f32], u: f64) -> usize {
    let mut acc = 0.0f64;
    let mut last = 0;
    for (i, &w) in weights.iter().enumerate() {
        if w > 0.0 {
            acc += w as f64;
            last = i;
            if acc > u {
                return i;
            }
        }
    }
    last
}

/// The diagonal Fisher of every projection input, `[layer][proj][channel]`: over the first
/// `samples` windows of `seq_len` tokens of `tokens`, the mean over positions of the squared
/// loss gradient. `progress(stage, done, total)` after each window.
pub fn input_fisher(
    model: &Llama,
    tokens: &[u32],
    opts: &FisherOptions,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<Vec<[Vec<f32>; 7]>> {
    let (samples, seq_len) = (opts.samples, opts.seq_len);
    if samples == 0 {
        return Err(Error::Invalid(
            "the Fisher statistics on 0 windows: at least one is needed".into(),
        ));
    }
    if seq_len < 2
        || samples
            .checked_mul(seq_len)
            .is_none_or(|need| tokens.len() < need)
    {
        return Err(Error::Invalid(format!(
            "the Fisher statistics need {samples} windows of {seq_len} >= 2 tokens, the text has {}",
            tokens.len()
        )));
    }
    if seq_len > model.config.max_position_embeddings {
        return Err(Error::Invalid(format!(
            "a Fisher window of {seq_len} tokens exceeds the model's context of {}",
            model.config.max_position_embeddings
        )));
    }
    let mut acc: Vec<[Vec<f64>; 7]> = model
        .layers
        .iter()
        .map(|b| {
            let lin = b.linears();
            std::array::from_fn(|p| vec![0.0f64; lin[p].1.in_dim])
        })
        .collect();
    for (i, w) in tokens.chunks_exact(seq_len).take(samples).enumerate() {
        let labels = match opts.labels {
            FisherLabels::Model { seed } => FisherLabels::Model {
                seed: seed.wrapping_add(i as u64),
            },
            text => text,
        };
        input_gradients(model, w, labels, &mut |l, p, _, g| {
            let a = &mut acc[l][p];
            for row in g.chunks(a.len()) {
                for (s, &v) in a.iter_mut().zip(row) {
                    *s += (v as f64) * (v as f64);
                }
            }
        })?;
        progress("fisher", i + 1, samples);
    }
    let rows = (samples * seq_len) as f64;
    Ok(acc
        .into_iter()
        .map(|layer| layer.map(|a| a.iter().map(|&s| (s / rows) as f32).collect()))
        .collect())
}

/// One block forward on `n` positions from 0 (`x[n, hidden]` updated in place), keeping what
/// [`backward_block`] needs.
fn forward_block(c: &Config, b: &Block, x: &mut [f32], n: usize, rope: (&[f32], &[f32])) -> Saved {
    let (d, qd, kvd, ff, hd) = dims(c);
    let z = |w: usize| vec![0.0f32; n * w];
    let x_in = x.to_vec();
    let mut h = z(d);
    rmsnorm_rows(x, &b.input_layernorm, c.rms_norm_eps, d, &mut h);
    let (mut q, mut k, mut v) = (z(qd), z(kvd), z(kvd));
    b.q_proj.forward_batch(&h, n, &mut q);
    b.k_proj.forward_batch(&h, n, &mut k);
    b.v_proj.forward_batch(&h, n, &mut v);
    rope_rows(&mut q, qd, hd, rope);
    rope_rows(&mut k, kvd, hd, rope);
    let att = attention(c, &q, &k, &v, n);
    let mut out = z(d);
    b.o_proj.forward_batch(&att, n, &mut out);
    add_assign(x, &out);
    let x_mid = x.to_vec();
    b.mlp_input(c, x, n, &mut h);
    let (mut g, mut u, mut a) = (z(ff), z(ff), z(ff));
    b.gate_proj.forward_batch(&h, n, &mut g);
    b.up_proj.forward_batch(&h, n, &mut u);
    reference::silu_mul(&g, &u, &mut a);
    b.mlp_output(x, n, &a, &mut out);
    Saved {
        x_in,
        x_mid,
        q,
        k,
        v,
        att,
        g,
        u,
    }
}

/// One block backward: `dx` holds the loss gradient at the block's output and leaves with the
/// gradient at its input; `visit(proj, x, grad)` gets each projection's input and its
/// gradient. `rope` holds cos and **minus** sin (the inverse rotation).
fn backward_block(
    c: &Config,
    b: &Block,
    s: &Saved,
    dx: &mut [f32],
    n: usize,
    inverse_rope: (&[f32], &[f32]),
    visit: &mut ProjVisitor,
) {
    let (d, qd, kvd, ff, hd) = dims(c);
    let z = |w: usize| vec![0.0f32; n * w];
    // MLP half: x_out = x_mid + down(silu(g) * u), g and u from rmsnorm(x_mid).
    let (mut h, mut a) = (z(d), z(ff));
    reference::silu_mul(&s.g, &s.u, &mut a);
    let mut ga = z(ff);
    b.down_proj.input_grad_batch(dx, n, &mut ga);
    visit(6, &a, &ga);
    let (mut dg, mut du) = (z(ff), z(ff));
    for i in 0..n * ff {
        let (g, u) = (s.g[i], s.u[i]);
        let sg = 1.0 / (1.0 + (-g).exp());
        dg[i] = ga[i] * u * sg * (1.0 + g * (1.0 - sg));
        du[i] = ga[i] * g * sg;
    }
    let (mut gh, mut dh) = (z(d), z(d));
    b.mlp_input(c, &s.x_mid, n, &mut h);
    b.gate_proj.input_grad_batch(&dg, n, &mut dh);
    visit(4, &h, &dh);
    b.up_proj.input_grad_batch(&du, n, &mut gh);
    visit(5, &h, &gh);
    add_assign(&mut dh, &gh);
    rmsnorm_backward_add(
        &s.x_mid,
        &b.post_attention_layernorm,
        c.rms_norm_eps,
        &dh,
        dx,
    );

    // Attention half: x_mid = x_in + o(attention(q, k, v)), q, k, v from rmsnorm(x_in).
    let mut gatt = z(qd);
    b.o_proj.input_grad_batch(dx, n, &mut gatt);
    visit(3, &s.att, &gatt);
    let (mut dq, mut dk, dv) = attention_backward(c, s, &gatt, n);
    rope_rows(&mut dq, qd, hd, inverse_rope);
    rope_rows(&mut dk, kvd, hd, inverse_rope);
    rmsnorm_rows(&s.x_in, &b.input_layernorm, c.rms_norm_eps, d, &mut h);
    b.q_proj.input_grad_batch(&dq, n, &mut dh);
    visit(0, &h, &dh);
    b.k_proj.input_grad_batch(&dk, n, &mut gh);
    visit(1, &h, &gh);
    add_assign(&mut dh, &gh);
    b.v_proj.input_grad_batch(&dv, n, &mut gh);
    visit(2, &h, &gh);
    add_assign(&mut dh, &gh);
    rmsnorm_backward_add(&s.x_in, &b.input_layernorm, c.rms_norm_eps, &dh, dx);
}

/// Hidden, query, key/value and MLP widths, and the head size.
fn dims(c: &Config) -> (usize, usize, usize, usize, usize) {
    (
        c.hidden_size,
        c.q_dim(),
        c.kv_dim(),
        c.intermediate_size,
        c.head_dim,
    )
}

/// Causal softmax probabilities of query head `h` over its KV head (`[n, n]`, zero above the
/// diagonal).
fn probs(c: &Config, q: &[f32], k: &[f32], n: usize, h: usize) -> Vec<f32> {
    let (qd, kvd, hd) = (c.q_dim(), c.kv_dim(), c.head_dim);
    let kh = h / (c.num_attention_heads / c.num_key_value_heads);
    let mut p = vec![0.0f32; n * n];
    gemm(
        Strided::rows(&q[h * hd..], n, hd, qd),
        Strided::rows(&k[kh * hd..], n, hd, kvd).t(),
        0.0,
        &mut p,
        n,
    );
    let scale = 1.0 / (hd as f32).sqrt();
    for (t, row) in p.chunks_mut(n).enumerate() {
        let (live, future) = row.split_at_mut(t + 1);
        let m = live
            .iter()
            .fold(f32::NEG_INFINITY, |a, &v| a.max(v * scale));
        let mut sum = 0.0f32;
        for v in live.iter_mut() {
            *v = (*v * scale - m).exp();
            sum += *v;
        }
        live.iter_mut().for_each(|v| *v /= sum);
        future.fill(0.0);
    }
    p
}

/// Causal grouped-query attention of `n` positions from 0 (`[n, q_dim]`), one thread per head.
fn attention(c: &Config, q: &[f32], k: &[f32], v: &[f32], n: usize) -> Vec<f32> {
    let (qd, kvd, hd) = (c.q_dim(), c.kv_dim(), c.head_dim);
    let group = c.num_attention_heads / c.num_key_value_heads;
    let heads: Vec<Vec<f32>> = (0..c.num_attention_heads)
        .into_par_iter()
        .map(|h| {
            let p = probs(c, q, k, n, h);
            let mut o = vec![0.0f32; n * hd];
            gemm(
                Strided::rows(&p, n, n, n),
                Strided::rows(&v[(h / group) * hd..], n, hd, kvd),
                0.0,
                &mut o,
                hd,
            );
            o
        })
        .collect();
    let mut att = vec![0.0f32; n * qd];
    scatter_heads(&heads, &mut att, n, hd);
    att
}

/// Gradients of the attention with respect to q, k (both after RoPE) and v, from `gatt`, the
/// gradient at its output; one thread per KV head and the query heads that read it.
fn attention_backward(
    c: &Config,
    s: &Saved,
    gatt: &[f32],
    n: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (qd, kvd, hd) = (c.q_dim(), c.kv_dim(), c.head_dim);
    let group = c.num_attention_heads / c.num_key_value_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let parts: Vec<KvHeadGrads> = (0..c.num_key_value_heads)
        .into_par_iter()
        .map(|kh| {
            let (mut dk, mut dv) = (vec![0.0f32; n * hd], vec![0.0f32; n * hd]);
            let mut dqs = Vec::with_capacity(group);
            let keys = Strided::rows(&s.k[kh * hd..], n, hd, kvd);
            for h in kh * group..(kh + 1) * group {
                let p = probs(c, &s.q, &s.k, n, h);
                let g = Strided::rows(&gatt[h * hd..], n, hd, qd);
                // dP = G V^T, then the softmax backward: dS = P (dP - sum_s P dP) / sqrt(hd).
                let mut ds = vec![0.0f32; n * n];
                gemm(
                    g,
                    Strided::rows(&s.v[kh * hd..], n, hd, kvd).t(),
                    0.0,
                    &mut ds,
                    n,
                );
                for (dr, pr) in ds.chunks_mut(n).zip(p.chunks(n)) {
                    let r: f32 = dr.iter().zip(pr).map(|(a, b)| a * b).sum();
                    for (a, &b) in dr.iter_mut().zip(pr) {
                        *a = b * (*a - r) * scale;
                    }
                }
                let mut dq = vec![0.0f32; n * hd];
                gemm(Strided::rows(&ds, n, n, n), keys, 0.0, &mut dq, hd);
                gemm(
                    Strided::rows(&ds, n, n, n).t(),
                    Strided::rows(&s.q[h * hd..], n, hd, qd),
                    1.0,
                    &mut dk,
                    hd,
                );
                gemm(Strided::rows(&p, n, n, n).t(), g, 1.0, &mut dv, hd);
                dqs.push(dq);
            }
            (dqs, dk, dv)
        })
        .collect();
    let (mut dq, mut dk, mut dv) = (
        vec![0.0f32; n * qd],
        vec![0.0f32; n * kvd],
        vec![0.0f32; n * kvd],
    );
    let mut qheads = Vec::with_capacity(c.num_attention_heads);
    let (mut kheads, mut vheads) = (Vec::new(), Vec::new());
    for (dqs, k, v) in parts {
        qheads.extend(dqs);
        kheads.push(k);
        vheads.push(v);
    }
    scatter_heads(&qheads, &mut dq, n, hd);
    scatter_heads(&kheads, &mut dk, n, hd);
    scatter_heads(&vheads, &mut dv, n, hd);
    (dq, dk, dv)
}

/// Writes head `h`'s `[n, hd]` block into columns `h * hd..` of the `[n, heads * hd]` matrix.
fn scatter_heads(heads: &[Vec<f32>], out: &mut [f32], n: usize, hd: usize) {
    let width = heads.len() * hd;
    for (h, o) in heads.iter().enumerate() {
        for t in 0..n {
            out[t * width + h * hd..t * width + (h + 1) * hd]
                .copy_from_slice(&o[t * hd..(t + 1) * hd]);
        }
    }
}

/// RMSNorm of every row of `x` (`width` wide) into `out`.
fn rmsnorm_rows(x: &[f32], w: &[f32], eps: f32, width: usize, out: &mut [f32]) {
    for (xt, ot) in x.chunks(width).zip(out.chunks_mut(width)) {
        reference::rmsnorm(xt, w, eps, ot);
    }
}

/// RoPE on every head of every row of `x` (`width` wide, rows at positions 0..).
fn rope_rows(x: &mut [f32], width: usize, hd: usize, (cos, sin): (&[f32], &[f32])) {
    let half = hd / 2;
    for (t, row) in x.chunks_mut(width).enumerate() {
        for head in row.chunks_mut(hd) {
            reference::rope_neox(
                head,
                &cos[t * half..(t + 1) * half],
                &sin[t * half..(t + 1) * half],
            );
        }
    }
}

/// `dx += d rmsnorm(x)/dx . dy` for every row: with `y = w x / r`, `r = sqrt(mean(x^2) + eps)`,
/// `dx_i = w_i dy_i / r - x_i (sum_k w_k dy_k x_k) / (width r^3)`.
fn rmsnorm_backward_add(x: &[f32], w: &[f32], eps: f32, dy: &[f32], dx: &mut [f32]) {
    let width = w.len();
    for ((xt, gt), dt) in x
        .chunks(width)
        .zip(dy.chunks(width))
        .zip(dx.chunks_mut(width))
    {
        let ms = xt.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / width as f64;
        let inv = 1.0 / (ms + eps as f64).sqrt();
        let dot: f64 = xt
            .iter()
            .zip(gt)
            .zip(w)
            .map(|((&x, &g), &w)| (x as f64) * (g as f64) * (w as f64))
            .sum();
        let k = dot * inv * inv * inv / width as f64;
        for (((o, &x), &g), &w) in dt.iter_mut().zip(xt).zip(gt).zip(w) {
            *o += (inv * (w as f64) * (g as f64) - (x as f64) * k) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draw_follows_the_weights() {
        // Unnormalized weights with zeros between them; u on an even grid over the total.
        let w = [0.0f32, 0.1, 0.0, 0.6, 0.3, 0.0];
        let n = 10_000;
        let mut counts = [0usize; 6];
        for k in 0..n {
            counts[draw(&w, (k as f64 + 0.5) / n as f64)] += 1;
        }
        assert_eq!(counts[0] + counts[2] + counts[5], 0);
        for (c, &p) in counts.iter().zip(&w) {
            assert!((*c as f64 / n as f64 - p as f64).abs() < 1e-3, "{counts:?}");
        }
        // Rounding that leaves the sum at or below u: the last positive weight.
        assert_eq!(draw(&w, 1.5), 4);
    }

    #[test]
    fn tables_without_labels_are_of_the_text() {
        use crate::sparsity::thresholds::FisherTables;
        let t = FisherTables {
            samples: 2,
            seq_len: 8,
            labels: FisherLabels::Model { seed: 5 },
            size_weights: [1.0; 7],
            weights: vec![],
            scores: vec![],
        };
        let mut v = serde_json::to_value(&t).unwrap();
        assert_eq!(v["labels"], serde_json::json!({"model": {"seed": 5}}));
        assert_eq!(
            serde_json::from_value::<FisherTables>(v.clone()).unwrap(),
            t
        );
        // A file written before the labels were recorded took the text's next tokens.
        v.as_object_mut().unwrap().remove("labels");
        let old: FisherTables = serde_json::from_value(v).unwrap();
        assert_eq!(old.labels, FisherLabels::Text);
    }
}
