//! How much a TEAL-sparse model's perplexity moves when every threshold is scaled by
//! `1 + e` for tiny `e` (a few f32 ulps): the masks then differ only in the activations within
//! `e` of a threshold, as they do between two summation orders. Protocol P512 (windows of 512
//! tokens from the start of the text, no BOS, tokens 1.. scored), f32 weights, greedy
//! allocation, |x| quantiles, every position sparsified.
//!
//!   cargo run --release -p teal --example threshold_nudge -- MODEL TEXT THRESHOLDS SPARSITY WINDOWS E1,E2,...
//!
//! Prints, per `e`, the PPL ratio to dense on the same tokens and the mean KL divergence from
//! dense and from the unnudged sparse model.
use std::path::Path;
use teal::eval::{perplexity::nll, sparse::kl_top1};
use teal::linear::InputMask;
use teal::models::llama::{Llama, Logits};
use teal::sparsity::{Allocation, Mode, Quantile, SparsitySpec, Thresholds};
use teal::{Dtype, ModelFiles};

/// The logits of every position of one window (`[512, vocab]`).
fn logits(model: &Llama, toks: &[u32]) -> Result<Vec<f32>, teal::Error> {
    let mut cache = model.new_cache(toks.len());
    model.prefill(toks, &mut cache, Logits::All)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 7 {
        return Err(
            "usage: threshold_nudge MODEL TEXT THRESHOLDS SPARSITY WINDOWS E1,E2,...".into(),
        );
    }
    let files = ModelFiles::open(Path::new(&a[1]))?;
    let ids = files
        .tokenizer
        .encode(&std::fs::read_to_string(&a[2])?, false)?;
    let th = Thresholds::load(Path::new(&a[3]))?;
    let spec = SparsitySpec {
        target: a[4].parse()?,
        allocation: Allocation::Greedy,
        quantile: Quantile::Abs,
        mode: Mode::All,
    };
    let windows: usize = a[5].parse()?;
    let dense = files.load_model_as(Dtype::F32)?;
    let masks = th.resolve(&spec)?;
    let es: Vec<f32> = a[6]
        .split(',')
        .map(|e| e.parse())
        .collect::<Result<_, _>>()?;
    let models: Vec<Llama> = es
        .iter()
        .map(|&e| {
            let nudged: Vec<[Option<InputMask>; 7]> = masks
                .iter()
                .map(|l| {
                    std::array::from_fn(|p| match &l[p] {
                        Some(InputMask::Threshold(t)) => Some(InputMask::Threshold(t * (1.0 + e))),
                        other => other.clone(),
                    })
                })
                .collect();
            dense.with_masks(&nudged)
        })
        .collect::<Result<_, _>>()?;
    // Per e: NLL sum, KL from dense, KL from the first e.
    let mut acc = vec![(0.0f64, 0.0f64, 0.0f64); es.len()];
    let (mut nll_dense, mut n) = (0.0f64, 0usize);
    let v = dense.config.vocab_size;
    for w in 0..windows {
        let toks = &ids[w * 512..(w + 1) * 512];
        let d = logits(&dense, toks)?;
        let mut first: Option<Vec<f32>> = None;
        for (m, a) in models.iter().zip(acc.iter_mut()) {
            let s = logits(m, toks)?;
            for i in 0..511 {
                let (p, q) = (&d[i * v..(i + 1) * v], &s[i * v..(i + 1) * v]);
                a.0 += nll(q, toks[i + 1]);
                a.1 += kl_top1(p, q).0;
                a.2 += first
                    .as_ref()
                    .map_or(0.0, |f| kl_top1(&f[i * v..(i + 1) * v], q).0);
            }
            first.get_or_insert(s);
        }
        nll_dense += (0..511)
            .map(|i| nll(&d[i * v..(i + 1) * v], toks[i + 1]))
            .sum::<f64>();
        n += 511;
    }
    let n = n as f64;
    for (e, a) in es.iter().zip(&acc) {
        println!(
            "e {e:e}: PPL x{:.4} (dense {:.4}), KL from dense {:.4}, KL from e = {:e}: {:.4}",
            ((a.0 - nll_dense) / n).exp(),
            (nll_dense / n).exp(),
            a.1 / n,
            es[0],
            a.2 / n
        );
    }
    Ok(())
}
