//! Calibration: run the dense model on calibration text block by block, collect every value at
//! the four sites of each layer, and turn them into per-site quantile tables (TEAL's histogram
//! reading and the exact |x| quantile); optionally run the greedy search on each block's dense
//! inputs. Layer-wise processing keeps only one layer's activations in memory.

use super::fisher::{input_fisher, FisherOptions};
use super::greedy::{greedy_block, GreedyOptions};
use super::histogram::{abs_quantiles, check_finite, TealHistogram};
use super::thresholds::{
    default_levels, interpolate, loss_aware_mask, Fingerprint, FisherTables, GreedyTables,
    Provenance, Quantile, SiteTable, Thresholds, FORMAT, VERSION,
};
use super::{size_weights, window_rows, PROJ_SITE};
use crate::device::Decoder;
use crate::error::{Error, Result};
use crate::kv_cache::KvRows;
use crate::linear::InputMask;
use crate::models::llama::{Block, Llama, Observer, PrefillBuffers, Site};

#[derive(Clone, Debug)]
pub struct CalibOptions {
    pub samples: usize,
    pub seq_len: usize,
    /// Greedy search, with the quantile reading it uses to turn sparsities into thresholds.
    pub greedy: Option<(GreedyOptions, Quantile)>,
    /// Also compute the weight-aware (wina) score quantiles of every projection.
    pub weight_aware: bool,
    /// Loss gradients on these windows for the loss-aware allocation (computed on the CPU,
    /// also by [`calibrate_on`]).
    pub fisher: Option<FisherOptions>,
    /// Name of the calibration text, for the provenance record.
    pub text_label: String,
    pub text_bytes: usize,
}

/// Collects every value of each site of the current layer.
struct Collector {
    values: [Vec<f32>; 4],
}

impl Observer for Collector {
    fn observe(&mut self, _layer: usize, site: Site, rows: &[f32], _width: usize) {
        let i = Site::ALL
            .iter()
            .position(|&s| s == site)
            .expect("a known site");
        self.values[i].extend_from_slice(rows);
    }
}

const SITE_NAMES: [&str; 4] = [
    "qkv (attention input)",
    "o (attention output)",
    "gate/up (MLP input)",
    "down (MLP hidden)",
];

/// Calibrates `model` on `tokens` (the tokenized calibration text: the first `samples`
/// non-overlapping windows of `seq_len` tokens). `progress(stage, done, total)`.
pub fn calibrate(
    model: &Llama,
    fingerprint: Fingerprint,
    tokens: &[u32],
    opts: &CalibOptions,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<Thresholds> {
    crate::load::reusing_heap(|| calibrate_blocks(model, fingerprint, tokens, opts, progress))
}

/// [`calibrate`]: the windows advanced one block at a time through the whole model.
fn calibrate_blocks(
    model: &Llama,
    fingerprint: Fingerprint,
    tokens: &[u32],
    opts: &CalibOptions,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<Thresholds> {
    let c = &model.config;
    let (n, len, d) = (opts.samples, opts.seq_len, c.hidden_size);
    if n == 0 || len < 4 {
        return Err(Error::Invalid(format!(
            "calibration needs at least 1 sample of 4 tokens (got {n} x {len})"
        )));
    }
    if n.checked_mul(len).is_none_or(|need| tokens.len() < need) {
        return Err(Error::Invalid(format!(
            "calibration text too short: {} tokens, {n} samples x {len} tokens need {}",
            tokens.len(),
            n as u128 * len as u128
        )));
    }
    if len > c.max_position_embeddings {
        return Err(Error::Invalid(format!(
            "--seq-len {len} exceeds the model's context of {}",
            c.max_position_embeddings
        )));
    }
    let greedy = greedy_options(opts)?;
    let levels = default_levels();
    let weights = size_weights(c);
    // The loss-aware channel weights, before the statistics that use them.
    let fisher_weights = opts
        .fisher
        .map(|f| loss_weights(model, tokens, &f, progress))
        .transpose()?;
    let (cos, sin) = model.rope_tables_for(0, len);

    // Hidden states of every sample, advanced one block at a time.
    let mut h = embed_windows(model, &tokens[..n * len])?;
    let mut ws = PrefillBuffers::new(c, len);
    let mut kc = vec![0.0f32; len * c.kv_dim()];
    let mut vc = vec![0.0f32; len * c.kv_dim()];
    let mut sites = Vec::with_capacity(c.num_hidden_layers);
    let mut wina = Vec::with_capacity(c.num_hidden_layers);
    let mut fisher_scores = Vec::with_capacity(c.num_hidden_layers);
    let mut greedy_layers = Vec::new();
    let total = c.num_hidden_layers;
    for (l, block) in model.layers.iter().enumerate() {
        // The greedy search needs this block's dense inputs (a prefix of each sample).
        let greedy_inputs = greedy.map(|(g, _)| window_rows(&h, d, len, g.samples, 0..g.seq_len));
        let mut col = Collector {
            values: Default::default(),
        };
        for s in 0..n {
            let x = &mut h[s * len * d..(s + 1) * len * d];
            block.prefill(
                c,
                x,
                len,
                0,
                (&cos, &sin),
                KvRows::F32(&mut kc, &mut vc),
                &mut ws,
                Some((l, &mut col)),
            );
        }
        let (tables, wina_row) = layer_tables(l, block, &col.values, &levels, opts.weight_aware)?;
        if let Some(fw) = &fisher_weights {
            fisher_scores.push(std::array::from_fn(|p| {
                score_quantiles(&col.values[PROJ_SITE[p]], &fw[l][p], &levels)
            }));
        }
        drop(col);
        if let (Some((g, q)), Some(inp)) = (greedy, greedy_inputs) {
            progress(&format!("greedy layer {l}"), l, total);
            let rope = (cos.as_slice(), sin.as_slice());
            let masks = LayerMasks {
                levels: &levels,
                sites: &tables,
                wina: wina_row.as_ref(),
                fisher: fisher_weights
                    .as_ref()
                    .zip(fisher_scores.get(l))
                    .map(|(fw, sc)| (&fw[l], sc)),
            };
            greedy_layers.push(greedy_layer(
                c, block, &inp, g, q, masks, &weights, rope, len,
            ));
        }
        sites.push(tables);
        if let Some(w) = wina_row {
            wina.push(w);
        }
        progress("calibrate", l + 1, total);
    }
    Ok(Thresholds {
        format: FORMAT.into(),
        version: VERSION,
        model: fingerprint,
        calibration: provenance(opts, tokens, format!("teal {}", env!("CARGO_PKG_VERSION"))),
        levels,
        sites,
        wina: opts.weight_aware.then_some(wina),
        greedy: greedy.map(|(g, q)| greedy_tables(g, q, weights, greedy_layers)),
        fisher: fisher_tables(opts, fisher_weights, fisher_scores, weights),
    })
}

/// The embeddings of `tokens` (`[tokens, hidden]`); an id outside the vocabulary is an error.
fn embed_windows(model: &Llama, tokens: &[u32]) -> Result<Vec<f32>> {
    let c = &model.config;
    let mut h = vec![0.0f32; tokens.len() * c.hidden_size];
    for (&t, ht) in tokens.iter().zip(h.chunks_mut(c.hidden_size)) {
        if t as usize >= c.vocab_size {
            return Err(Error::Invalid(format!(
                "token id {t} outside the vocabulary"
            )));
        }
        model.embed(t, ht);
    }
    Ok(h)
}

fn greedy_tables(
    g: &GreedyOptions,
    q: Quantile,
    size_weights: [f64; 7],
    layers: Vec<Vec<super::thresholds::GreedyStep>>,
) -> GreedyTables {
    GreedyTables {
        step: g.step,
        quantile: q,
        samples: g.samples,
        seq_len: g.seq_len,
        size_weights,
        layers,
    }
}

/// The greedy search `opts` asks for, checked against the calibration windows (the search
/// scores a prefix of the first windows) and the tables it reads.
fn greedy_options(opts: &CalibOptions) -> Result<Option<(&GreedyOptions, Quantile)>> {
    let (n, len) = (opts.samples, opts.seq_len);
    match &opts.greedy {
        Some((_, Quantile::Wina)) if !opts.weight_aware => Err(Error::Invalid(
            "a greedy search with the wina reading needs the weight-aware tables".into(),
        )),
        Some((_, Quantile::Fisher)) if opts.fisher.is_none() => Err(Error::Invalid(
            "a greedy search with the fisher reading needs the loss gradients (--fisher)".into(),
        )),
        Some((g, q)) => {
            if !(g.step > 0.0 && g.step <= 1.0) {
                return Err(Error::Invalid(format!(
                    "greedy step {}: must be in (0, 1] (the default is 0.05)",
                    g.step
                )));
            }
            if g.samples == 0 {
                return Err(Error::Invalid(
                    "greedy search on 0 windows: at least one is needed".into(),
                ));
            }
            if g.samples > n || g.seq_len < 4 || g.seq_len > len {
                return Err(Error::Invalid(format!(
                    "greedy search on {} x {} tokens must fit in the {n} x {len} calibration tokens",
                    g.samples, g.seq_len
                )));
            }
            Ok(Some((g, *q)))
        }
        None => Ok(None),
    }
}

/// What one layer's masks are read from: its site tables and, for the wina reading, its
/// weight-aware score quantiles, for the fisher reading its loss-aware channel weights and
/// score quantiles.
#[derive(Clone, Copy)]
struct LayerMasks<'a> {
    levels: &'a [f64],
    sites: &'a [SiteTable; 4],
    wina: Option<&'a [Vec<f32>; 7]>,
    fisher: Option<LayerFisher<'a>>,
}

/// One layer's loss-aware channel weights and the quantiles of their scores, per projection.
type LayerFisher<'a> = (&'a [Vec<f32>; 7], &'a [Vec<f32>; 7]);
/// Per-projection tables of every layer (`[layer][projection]`).
type ModelTables<'a> = &'a [[Vec<f32>; 7]];
/// Every layer's loss-aware channel weights and score quantiles.
type ModelFisher<'a> = (ModelTables<'a>, ModelTables<'a>);

/// TEAL's greedy search on one block: `inputs` are its dense inputs at the first `g.seq_len`
/// positions of `g.samples` windows; `rope` the cos/sin tables of `len` positions.
#[allow(clippy::too_many_arguments)]
fn greedy_layer(
    c: &crate::config::Config,
    block: &Block,
    inputs: &[f32],
    g: &GreedyOptions,
    q: Quantile,
    masks: LayerMasks<'_>,
    weights: &[f64; 7],
    rope: (&[f32], &[f32]),
    len: usize,
) -> Vec<super::thresholds::GreedyStep> {
    let LayerMasks {
        levels,
        sites,
        wina,
        fisher,
    } = masks;
    let lookup = |p: usize, s: f64| match q {
        Quantile::Wina => wina
            .and_then(|w| interpolate(levels, &w[p], s))
            .map(InputMask::WeightAware),
        Quantile::Fisher => {
            fisher.and_then(|(w, scores)| loss_aware_mask(levels, &scores[p], &w[p], s))
        }
        _ => sites[PROJ_SITE[p]]
            .threshold(levels, s, q)
            .map(InputMask::Threshold),
    };
    let (cos, sin) = rope;
    let gl = g.seq_len;
    greedy_block(
        c,
        block,
        inputs,
        g.samples,
        gl,
        (&cos[..gl * cos.len() / len], &sin[..gl * sin.len() / len]),
        &lookup,
        weights,
        g,
    )
}

/// The loss-aware channel weights `sqrt(F_j / out)` of every layer and projection, from the
/// loss gradients of [`input_fisher`] (on the CPU); a non-finite one is an error naming it.
fn loss_weights(
    model: &Llama,
    tokens: &[u32],
    f: &FisherOptions,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<Vec<[Vec<f32>; 7]>> {
    let weights: Vec<[Vec<f32>; 7]> = input_fisher(model, tokens, f, progress)?
        .into_iter()
        .zip(&model.layers)
        .map(|(row, b)| {
            let lin = b.linears();
            std::array::from_fn(|p| {
                let out = lin[p].1.out_dim as f32;
                row[p].iter().map(|f| (f / out).sqrt()).collect()
            })
        })
        .collect();
    for (l, row) in weights.iter().enumerate() {
        for (p, w) in row.iter().enumerate() {
            if let Err(i) = check_finite(w) {
                return Err(Error::Invalid(format!(
                    "calibration: non-finite loss gradient statistic {} in layer {l} at {} \
                     (channel {i})",
                    w[i],
                    super::PROJ_NAMES[p]
                )));
            }
        }
    }
    Ok(weights)
}

/// The thresholds file's loss-aware tables, when `opts` asked for them.
fn fisher_tables(
    opts: &CalibOptions,
    weights: Option<Vec<[Vec<f32>; 7]>>,
    scores: Vec<[Vec<f32>; 7]>,
    size_weights: [f64; 7],
) -> Option<FisherTables> {
    let (f, w) = (opts.fisher?, weights?);
    Some(FisherTables {
        samples: f.samples,
        seq_len: f.seq_len,
        labels: f.labels,
        size_weights,
        weights: w,
        scores,
    })
}

/// The quantile tables of one layer's four sites from every value seen there, and with
/// `weight_aware` the weight-aware score quantiles of its seven projections.
type LayerTables = ([SiteTable; 4], Option<[Vec<f32>; 7]>);

fn layer_tables(
    l: usize,
    block: &Block,
    values: &[Vec<f32>; 4],
    levels: &[f64],
    weight_aware: bool,
) -> Result<LayerTables> {
    let mut tables = Vec::with_capacity(4);
    for (si, v) in values.iter().enumerate() {
        if v.is_empty() {
            return Err(Error::Invalid(format!(
                "calibration: no activations seen in layer {l} at site {}",
                SITE_NAMES[si]
            )));
        }
        if let Err(i) = check_finite(v) {
            return Err(Error::Invalid(format!(
                "calibration: non-finite activation {} in layer {l} at site {} (value #{i})",
                v[i], SITE_NAMES[si]
            )));
        }
        let hist = TealHistogram::build(v);
        tables.push(SiteTable {
            teal: levels
                .iter()
                .map(|&s| if s == 0.0 { -1.0 } else { hist.threshold(s) })
                .collect(),
            abs: abs_quantiles(v, levels),
            hist_lo: hist.lo,
            hist_hi: hist.hi,
        });
    }
    // Weight-aware scores |x_j| * ||W[:, j]|| of each projection, from its site's values.
    let linears = block.linears();
    let wina_row: Option<[Vec<f32>; 7]> = weight_aware.then(|| {
        std::array::from_fn(|p| {
            score_quantiles(&values[PROJ_SITE[p]], linears[p].1.input_norms(), levels)
        })
    });
    let tables: [SiteTable; 4] = tables
        .try_into()
        .map_err(|_| Error::Invalid("four sites".into()))?;
    Ok((tables, wina_row))
}

/// Exact quantiles at `levels` of the score `|x_j| w_j` over rows of `values` (`w.len()` wide).
fn score_quantiles(values: &[f32], w: &[f32], levels: &[f64]) -> Vec<f32> {
    let scores: Vec<f32> = values
        .chunks(w.len())
        .flat_map(|r| r.iter().zip(w).map(|(x, w)| x.abs() * w))
        .collect();
    abs_quantiles(&scores, levels)
}

/// Collects every value of each site of the layers `first..first + values.len()`.
struct RangeCollector {
    first: usize,
    values: Vec<[Vec<f32>; 4]>,
}

impl Observer for RangeCollector {
    fn observe(&mut self, layer: usize, site: Site, rows: &[f32], _width: usize) {
        if let Some(v) = layer
            .checked_sub(self.first)
            .and_then(|i| self.values.get_mut(i))
        {
            let si = Site::ALL
                .iter()
                .position(|&s| s == site)
                .expect("a known site");
            v[si].extend_from_slice(rows);
        }
    }
}

/// [`calibrate`] with the activations collected from a [`Decoder`] of the dense `model` (a GPU
/// one: each window runs through the device's observed step, whose site inputs are copied
/// back): the same statistics and tables. The loss gradients of `opts.fisher` and the greedy
/// search of `opts.greedy` run on the CPU model, as in [`calibrate`] (the search reads the
/// device's tables). The values of as many layers as
/// fit in `budget_bytes` are held at once; the windows run again for each group of layers.
pub fn calibrate_on(
    dec: &mut dyn Decoder,
    model: &Llama,
    fingerprint: Fingerprint,
    tokens: &[u32],
    opts: &CalibOptions,
    budget_bytes: usize,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<Thresholds> {
    let c = &model.config;
    let (n, len) = (opts.samples, opts.seq_len);
    let greedy = greedy_options(opts)?;
    if n == 0 || len < 4 || n.checked_mul(len).is_none_or(|need| tokens.len() < need) {
        return Err(Error::Invalid(format!(
            "calibration needs {n} samples of {len} >= 4 tokens, the text has {} tokens",
            tokens.len()
        )));
    }
    if len > dec.capacity() {
        return Err(Error::ContextOverflow {
            what: "a calibration window",
            got: len,
            ctx: dec.capacity(),
        });
    }
    dec.set_masks(None)?;
    // The loss gradients have no device path: they run on the CPU model.
    let fisher_weights = opts
        .fisher
        .map(|f| loss_weights(model, tokens, &f, progress))
        .transpose()?;
    let levels = default_levels();
    let per_layer = n * len * (2 * c.hidden_size + c.q_dim() + c.intermediate_size) * 4;
    let group = (budget_bytes / per_layer.max(1)).clamp(1, c.num_hidden_layers.max(1));
    let total = c.num_hidden_layers;
    let (mut sites, mut wina) = (Vec::with_capacity(total), Vec::with_capacity(total));
    let mut fisher_scores = Vec::with_capacity(total);
    for first in (0..total).step_by(group) {
        let count = group.min(total - first);
        let mut col = RangeCollector {
            first,
            values: vec![Default::default(); count],
        };
        for s in 0..n {
            dec.clear()?;
            dec.prefill_observed(&tokens[s * len..(s + 1) * len], &mut col)?;
            progress("collect", first, total);
        }
        for (i, values) in col.values.iter().enumerate() {
            let l = first + i;
            let (tables, wina_row) =
                layer_tables(l, &model.layers[l], values, &levels, opts.weight_aware)?;
            if let Some(fw) = &fisher_weights {
                fisher_scores.push(std::array::from_fn(|p| {
                    score_quantiles(&values[PROJ_SITE[p]], &fw[l][p], &levels)
                }));
            }
            sites.push(tables);
            if let Some(w) = wina_row {
                wina.push(w);
            }
        }
        progress("calibrate", first + count, total);
    }
    // The search has no device path: it runs on the CPU model, reading the device's tables.
    let greedy = greedy
        .map(|gq| {
            let wina = opts.weight_aware.then_some(wina.as_slice());
            let fisher = fisher_weights
                .as_deref()
                .map(|fw| (fw, fisher_scores.as_slice()));
            greedy_on_cpu(
                model,
                tokens,
                len,
                gq,
                &levels,
                &sites,
                (wina, fisher),
                progress,
            )
        })
        .transpose()?;
    Ok(Thresholds {
        format: FORMAT.into(),
        version: VERSION,
        model: fingerprint,
        calibration: provenance(
            opts,
            tokens,
            format!("teal {} on {}", env!("CARGO_PKG_VERSION"), dec.describe()),
        ),
        levels,
        sites,
        wina: opts.weight_aware.then_some(wina),
        greedy,
        fisher: fisher_tables(opts, fisher_weights, fisher_scores, size_weights(c)),
    })
}

/// TEAL's greedy search of every block of the CPU `model`, for [`calibrate_on`]: the dense
/// block inputs are the first `g.seq_len` tokens of each of the first `g.samples` windows of
/// `len` tokens, advanced block by block (attention is causal, so these are the prefixes of
/// what [`calibrate`] advances whole windows to), and the masks are read from `sites` and
/// the wina or fisher tables of `scores` (the device's tables).
#[allow(clippy::too_many_arguments)]
fn greedy_on_cpu(
    model: &Llama,
    tokens: &[u32],
    len: usize,
    (g, q): (&GreedyOptions, Quantile),
    levels: &[f64],
    sites: &[[SiteTable; 4]],
    scores: (Option<ModelTables<'_>>, Option<ModelFisher<'_>>),
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<GreedyTables> {
    let (wina, fisher) = scores;
    let c = &model.config;
    let (d, total, gl) = (c.hidden_size, c.num_hidden_layers, g.seq_len);
    let weights = size_weights(c);
    let (cos, sin) = model.rope_tables_for(0, gl);
    let rope = (cos.as_slice(), sin.as_slice());
    let mut h = embed_windows(model, &window_rows(tokens, 1, len, g.samples, 0..gl))?;
    let mut ws = PrefillBuffers::new(c, gl);
    let mut kc = vec![0.0f32; gl * c.kv_dim()];
    let mut vc = vec![0.0f32; gl * c.kv_dim()];
    let mut layers = Vec::with_capacity(total);
    for (l, block) in model.layers.iter().enumerate() {
        progress(&format!("greedy layer {l}"), l, total);
        let masks = LayerMasks {
            levels,
            sites: &sites[l],
            wina: wina.map(|w| &w[l]),
            fisher: fisher.map(|(w, sc)| (&w[l], &sc[l])),
        };
        layers.push(greedy_layer(c, block, &h, g, q, masks, &weights, rope, gl));
        if l + 1 == total {
            break;
        }
        for x in h.chunks_mut(gl * d) {
            block.prefill(
                c,
                x,
                gl,
                0,
                rope,
                KvRows::F32(&mut kc, &mut vc),
                &mut ws,
                None,
            );
        }
    }
    progress("greedy", total, total);
    Ok(greedy_tables(g, q, weights, layers))
}

/// The calibration record of a thresholds file: the text (`tokens`, all of it), the windows,
/// the engine.
pub fn provenance(opts: &CalibOptions, tokens: &[u32], engine: String) -> Provenance {
    Provenance {
        text: opts.text_label.clone(),
        text_bytes: opts.text_bytes,
        samples: opts.samples,
        seq_len: opts.seq_len,
        tokens: opts.samples * opts.seq_len,
        engine,
        tokens_hash: Some(Provenance::hash_tokens(tokens)),
    }
}
