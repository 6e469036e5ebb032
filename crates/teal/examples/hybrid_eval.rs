//! Experiment (docs/QUALITY.md): block sparsities across layers from the loss-aware (fisher)
//! allocation, the split inside each block from TEAL's greedy tables. For a target `s`, the
//! fisher allocation's parameter-weighted sparsity of each layer picks that layer's greedy
//! row; masks from the greedy file's exact |x| quantiles.
//!
//!     hybrid_eval MODEL GREEDY_THRESHOLDS FISHER_THRESHOLDS S WINDOWS
use teal::eval::perplexity::PplOptions;
use teal::eval::sparse::compare;
use teal::kv_cache::KvDtype;
use teal::load::ModelFiles;
use teal::sparsity::thresholds::{SparsitySpec, Thresholds};
use teal::sparsity::{effective_sparsity, size_weights, Allocation, Mode, Quantile};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let files = ModelFiles::open(std::path::Path::new(&a[1])).unwrap();
    let greedy = Thresholds::load(std::path::Path::new(&a[2])).unwrap();
    let fisher = Thresholds::load(std::path::Path::new(&a[3])).unwrap();
    let s: f64 = a[4].parse().unwrap();
    let wins: usize = a[5].parse().unwrap();
    let model = files.load_model_as(teal::Dtype::F32).unwrap();
    let sizes = size_weights(&files.config);
    let spec = |allocation| SparsitySpec {
        target: s,
        allocation,
        quantile: Quantile::Abs,
        mode: Mode::All,
    };
    let per_layer = fisher.allocate(&spec(Allocation::Fisher)).unwrap();
    let g = greedy.greedy.as_ref().unwrap();
    let masks: Vec<_> = per_layer
        .iter()
        .zip(&g.layers)
        .enumerate()
        .map(|(l, (f, steps))| {
            let block = effective_sparsity(f, &sizes);
            let row = steps
                .iter()
                .min_by(|a, b| {
                    (a.sparsity - block)
                        .abs()
                        .total_cmp(&(b.sparsity - block).abs())
                })
                .unwrap();
            eprintln!(
                "layer {l}: block {block:.3} -> greedy row {:.3}",
                row.sparsity
            );
            std::array::from_fn(|p| greedy.mask(l, p, row.s[p], Quantile::Abs))
        })
        .collect();
    let wiki = std::fs::read_to_string("/work/shared/data/wikitext-2-raw-test.raw").unwrap();
    let wtoks = files.tokenizer.encode(&wiki, false).unwrap();
    let ppl = PplOptions {
        ctx: 512,
        chunks: Some(wins),
        kv: KvDtype::F16,
    };
    let sparse = model.with_masks(&masks).unwrap();
    let r = compare(
        &files.config,
        &model,
        &sparse,
        Mode::All,
        &wtoks,
        &ppl,
        |_, _| {},
    )
    .unwrap();
    println!(
        "hybrid s={s} dense {:.4} sparse {:.4} ratio x{:.4} kl {:.4} top1 {:.4} realized {:.4} sites {:?}",
        r.dense_ppl,
        r.ppl,
        r.ppl_ratio,
        r.kl,
        r.top1,
        r.model_sparsity,
        r.site_sparsity
            .iter()
            .map(|(_, x)| (x * 100.0).round() / 100.0)
            .collect::<Vec<_>>()
    );
}
