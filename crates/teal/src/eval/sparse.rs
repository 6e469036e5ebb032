//! Sparse quality against dense on the same tokens: perplexity of both, KL divergence of the
//! sparse next-token distribution from the dense one, top-1 agreement, and the realized sparsity
//! of every projection (exact zeros counted at its input, over the sparsified positions).

use super::perplexity::{nll, windows, PplOptions};
use crate::config::Config;
use crate::device::{Decoder, Masks};
use crate::error::{Error, Result};
use crate::models::llama::{Llama, Logits, Observer, Site};
use crate::sparsity::{effective_sparsity, size_weights, Mode, PROJ_NAMES, PROJ_SITE};
use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct SparseReport {
    pub dense_ppl: f64,
    pub ppl: f64,
    pub ppl_ratio: f64,
    /// Mean KL(dense || sparse) over scored positions, in nats.
    pub kl: f64,
    /// Fraction of scored positions whose argmax agrees with dense.
    pub top1: f64,
    pub tokens_scored: usize,
    pub chunks: usize,
    pub ctx: usize,
    /// Realized sparsity per projection (`PROJ_NAMES` order), over all layers.
    pub site_sparsity: Vec<(String, f64)>,
    /// Parameter-weighted realized sparsity of the whole model's projections.
    pub model_sparsity: f64,
    pub mode: String,
}

/// Counts, per layer and projection, the inputs seen and those each projection's mask zeroes
/// (exact zeros for a dense projection).
pub struct MaskCounter<'a> {
    model: &'a Llama,
    /// Rows before this position of each observed batch are not counted.
    skip_rows: usize,
    /// `[layer][proj]`: (zeroed, total)
    pub counts: Vec<[(u64, u64); 7]>,
}

impl<'a> MaskCounter<'a> {
    /// Counts the masks of `model`'s projections, skipping the first `skip_rows` positions.
    pub fn new(model: &'a Llama, skip_rows: usize) -> MaskCounter<'a> {
        MaskCounter {
            model,
            skip_rows,
            counts: vec![[(0, 0); 7]; model.layers.len()],
        }
    }
}

impl Observer for MaskCounter<'_> {
    fn observe(&mut self, layer: usize, site: Site, rows: &[f32], width: usize) {
        let si = Site::ALL
            .iter()
            .position(|&s| s == site)
            .expect("a known site");
        let x = &rows[(self.skip_rows * width).min(rows.len())..];
        let linears = self.model.layers[layer].linears();
        for p in (0..7).filter(|&p| PROJ_SITE[p] == si) {
            let zeros = linears[p].1.count_zeroed(x);
            let c = &mut self.counts[layer][p];
            c.0 += zeros as u64;
            c.1 += x.len() as u64;
        }
    }
}

/// KL(dense || sparse) of the two next-token distributions of one position's logits (in
/// f64), and whether their argmaxes agree.
pub fn kl_top1(dense: &[f32], sparse: &[f32]) -> (f64, bool) {
    let lse = |l: &[f32]| {
        let m = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        l.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln() + m
    };
    let (lp, lq) = (lse(dense), lse(sparse));
    let kl = dense
        .iter()
        .zip(sparse)
        .map(|(&a, &b)| {
            let la = a as f64 - lp;
            la.exp() * (la - (b as f64 - lq))
        })
        .sum::<f64>();
    let am = crate::sampler::argmax(dense) == crate::sampler::argmax(sparse);
    (kl, am)
}

/// What the windows of a comparison add up: NLL of both models, KL, top-1 agreement.
#[derive(Default)]
struct Tally {
    nll_d: f64,
    nll_s: f64,
    kl: f64,
    agree: usize,
    scored: usize,
}

impl Tally {
    /// Scores window `w` from the dense and the sparse logits of its positions, the
    /// predictions of positions `first..` (those that ran sparse: as TEAL's evaluation, which
    /// scores only tokens predicted by the sparsified half of each window).
    fn add(&mut self, w: &[u32], ld: &[f32], ls: &[f32], v: usize, first: usize) {
        for t in first + 1..w.len() {
            let (pd, ps) = (&ld[(t - 1) * v..t * v], &ls[(t - 1) * v..t * v]);
            self.nll_d += nll(pd, w[t]);
            self.nll_s += nll(ps, w[t]);
            let (k, a) = kl_top1(pd, ps);
            self.kl += k;
            self.agree += a as usize;
            self.scored += 1;
        }
    }

    /// The report of `chunks` windows of `opts.ctx`, with the realized sparsity of `counter`.
    fn report(
        self,
        config: &Config,
        counter: &MaskCounter,
        chunks: usize,
        opts: &PplOptions,
        mode: Mode,
    ) -> SparseReport {
        let n = self.scored as f64;
        let per_proj: Vec<f64> = (0..7)
            .map(|p| {
                let (z, t) = counter
                    .counts
                    .iter()
                    .fold((0u64, 0u64), |a, c| (a.0 + c[p].0, a.1 + c[p].1));
                z as f64 / t.max(1) as f64
            })
            .collect();
        let w = size_weights(config);
        let model_sparsity = counter
            .counts
            .iter()
            .map(|c| {
                effective_sparsity(
                    &std::array::from_fn(|p| c[p].0 as f64 / c[p].1.max(1) as f64),
                    &w,
                )
            })
            .sum::<f64>()
            / config.num_hidden_layers as f64;
        let (dense_ppl, ppl) = ((self.nll_d / n).exp(), (self.nll_s / n).exp());
        SparseReport {
            dense_ppl,
            ppl,
            ppl_ratio: ppl / dense_ppl,
            kl: self.kl / n,
            top1: self.agree as f64 / n,
            tokens_scored: self.scored,
            chunks,
            ctx: opts.ctx,
            site_sparsity: PROJ_NAMES
                .iter()
                .zip(per_proj)
                .map(|(n, s)| (n.to_string(), s))
                .collect(),
            model_sparsity,
            mode: mode.name().into(),
        }
    }
}

/// Runs P512 with the dense model and its sparse variant on the same windows.
#[allow(clippy::too_many_arguments)]
pub fn compare(
    config: &Config,
    dense: &Llama,
    sparse: &Llama,
    mode: Mode,
    tokens: &[u32],
    opts: &PplOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<SparseReport> {
    crate::load::reusing_heap(|| {
        let wins = windows(tokens.len(), opts)?;
        let v = config.vocab_size;
        let mut cache = dense.new_cache_as(opts.ctx, opts.kv);
        let mut counter = MaskCounter::new(sparse, 0);
        let mut tally = Tally::default();
        for (i, &(s, e)) in wins.iter().enumerate() {
            let w = &*opts.scoring.window(&tokens[s..e]);
            cache.clear();
            let ld = dense.prefill(w, &mut cache, Logits::All)?;
            // Positions 0..dense_upto run dense; the rest sparse (TEAL's half: the last
            // `len / 2`).
            let dense_upto = match mode {
                Mode::All => 0,
                Mode::Half => w.len() - w.len() / 2,
                Mode::DecodeOnly => 1,
            };
            cache.clear();
            let mut ls = Vec::with_capacity(w.len() * v);
            if dense_upto > 0 {
                ls.extend(dense.prefill(&w[..dense_upto], &mut cache, Logits::All)?);
            }
            ls.extend(sparse.prefill_observed(
                &w[dense_upto..],
                &mut cache,
                Logits::All,
                Some(&mut counter),
            )?);
            let f16 = opts.kv == crate::kv_cache::KvDtype::F16;
            crate::device::check_logits(&ld, v, 0, f16)?;
            crate::device::check_logits(&ls, v, 0, f16)?;
            tally.add(w, &ld, &ls, v, dense_upto.max(opts.scoring.first(w.len())));
            progress(i + 1, wins.len());
        }
        if tally.scored == 0 {
            return Err(Error::Invalid(format!(
                "mode {} with windows of {} tokens scores no token: a longer -c is needed",
                mode.name(),
                opts.ctx
            )));
        }
        Ok(tally.report(config, &counter, wins.len(), opts, mode))
    })
}

/// [`compare`] on a [`Decoder`] (a GPU's), mode `all`: per window, the dense logits
/// (`set_masks(None)`), the logits with `masks` (what `sparse`, the decoder's model with those
/// masks, computes), then the window once more through [`Decoder::prefill_observed`] to count
/// the zeroed inputs. The decoder keeps `masks` afterwards; open it on `sparse`, so that a GPU
/// decoder's fused launches are built for these masks.
pub fn compare_on(
    dec: &mut dyn Decoder,
    sparse: &Llama,
    masks: &Masks,
    tokens: &[u32],
    opts: &PplOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<SparseReport> {
    let wins = windows(tokens.len(), opts)?;
    let config = dec.config().clone();
    let mut counter = MaskCounter::new(sparse, 0);
    let mut tally = Tally::default();
    for (i, &(s, e)) in wins.iter().enumerate() {
        let w = &*opts.scoring.window(&tokens[s..e]);
        dec.set_masks(None)?;
        dec.clear()?;
        let ld = dec.prefill(w, Logits::All)?;
        dec.set_masks(Some(masks))?;
        dec.clear()?;
        let ls = dec.prefill(w, Logits::All)?;
        dec.clear()?;
        dec.prefill_observed(w, &mut counter)?;
        tally.add(w, &ld, &ls, config.vocab_size, opts.scoring.first(w.len()));
        progress(i + 1, wins.len());
    }
    Ok(tally.report(&config, &counter, wins.len(), opts, Mode::All))
}
