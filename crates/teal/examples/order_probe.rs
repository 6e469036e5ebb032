//! Experiment (docs/PERFORMANCE.md, "short rows"): how often a kept input row is followed in
//! memory by a skipped one, with TEAL's greedy thresholds at sparsity S, in the checkpoint's
//! channel order and with the channels sorted by their mean |x| on C4 (512 tokens); counted on
//! 512 WikiText-2 tokens of dense activations.
//!
//!     order_probe MODEL THRESHOLDS S
use std::collections::HashMap;
use teal::load::ModelFiles;
use teal::models::llama::{Logits, Observer, Site};
use teal::sparsity::PROJ_SITE;
use teal::sparsity::{Allocation, Mode, Quantile, SparsitySpec, Thresholds};

struct Rec(HashMap<(usize, usize), (usize, Vec<f32>)>);
impl Observer for Rec {
    fn observe(&mut self, layer: usize, site: Site, rows: &[f32], width: usize) {
        let s = Site::ALL.iter().position(|&x| x == site).unwrap();
        let e = self.0.entry((layer, s)).or_insert((width, vec![]));
        e.1.extend_from_slice(rows);
    }
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let files = ModelFiles::open(std::path::Path::new(&a[1])).unwrap();
    let th = Thresholds::load(std::path::Path::new(&a[2])).unwrap();
    let s: f64 = a[3].parse().unwrap();
    let n: usize = 512;
    let model = files.load_model_as(teal::Dtype::F32).unwrap();
    let c4 = std::fs::read_to_string(teal::assets::cached("data", "c4.utf8").unwrap()).unwrap();
    let ctoks = files.tokenizer.encode(&c4, false).unwrap();
    let wiki = std::fs::read_to_string("/work/shared/data/wikitext-2-raw-test.raw").unwrap();
    let wtoks = files.tokenizer.encode(&wiki, false).unwrap();
    let run = |toks: &[u32]| {
        let mut rec = Rec(HashMap::new());
        let mut cache = model.new_cache(n);
        model
            .prefill_observed(&toks[..n], &mut cache, Logits::Last, Some(&mut rec))
            .unwrap();
        rec.0
    };
    let cal = run(&ctoks[20000..]);
    let ev = run(&wtoks[1000..]);
    let spec = SparsitySpec {
        target: s,
        allocation: Allocation::Greedy,
        quantile: Quantile::Abs,
        mode: Mode::All,
    };
    let masks = th.resolve(&spec).unwrap();
    let mut tot = [[0f64; 4]; 7];
    for (l, m) in masks.iter().enumerate() {
        for p in 0..7 {
            let site = PROJ_SITE[p];
            let t = match m[p] {
                Some(teal::linear::InputMask::Threshold(t)) => t,
                None => continue,
                _ => panic!(),
            };
            let (w, xs) = &cal[&(l, site)];
            let w = *w;
            let mut mean = vec![0f64; w];
            for r in xs.chunks(w) {
                for (m, v) in mean.iter_mut().zip(r) {
                    *m += v.abs() as f64;
                }
            }
            let mut order: Vec<usize> = (0..w).collect();
            order.sort_by(|&a, &b| mean[b].total_cmp(&mean[a]));
            let (_, ev_x) = &ev[&(l, site)];
            for r in ev_x.chunks(w) {
                let keep: Vec<bool> = r.iter().map(|v| v.abs() > t).collect();
                let kept = keep.iter().filter(|&&k| k).count() as f64;
                let tr_orig = (0..w - 1).filter(|&j| keep[j] && !keep[j + 1]).count() as f64;
                let tr_sort = (0..w - 1)
                    .filter(|&j| keep[order[j]] && !keep[order[j + 1]])
                    .count() as f64;
                tot[p][0] += kept;
                tot[p][1] += tr_orig;
                tot[p][2] += tr_sort;
                tot[p][3] += w as f64;
            }
        }
    }
    for (p, t) in tot.iter().enumerate() {
        println!("{:10} kept {:.3}  kept->skipped per row: checkpoint order {:.3}, sorted {:.3}  (random {:.3})",
            teal::sparsity::PROJ_NAMES[p], t[0] / t[3], t[1] / t[3], t[2] / t[3], (t[0]/t[3]) * (1.0 - t[0]/t[3]));
    }
}
