//! Experiment (docs/QUALITY.md, "loss-aware masks"): zero `x_j` when `|x_j| * w_j <= t`, with
//! `w_j` from the diagonal empirical Fisher of each projection's input (`F_j = E[(dL/dx_j)^2]`,
//! computed by a PyTorch script), either with one `t` per projection at the target (uniform) or
//! one `t` for the whole model with `w_j = sqrt(F_j / out)` (expected loss increase per weight
//! byte skipped, a global allocation). Baselines from the same calibration: TEAL's |x| quantile
//! (uniform) and the weight-aware score (uniform and global).
//!
//!     fisher_eval MODEL FISHER_JSON SPARSITY CALIB_SAMPLES CALIB_LEN WINDOWS [VARIANTS]
use teal::eval::perplexity::PplOptions;
use teal::eval::sparse::{compare, SparseReport};
use teal::kv_cache::KvDtype;
use teal::linear::InputMask;
use teal::load::ModelFiles;
use teal::models::llama::{Block, Llama, Logits, Observer, Site};
use teal::sparsity::thresholds::{SparsitySpec, Thresholds};
use teal::sparsity::{Allocation, Mode, Quantile, PROJ_SITE};

struct Collect {
    values: Vec<[Vec<f32>; 4]>,
}

impl Observer for Collect {
    fn observe(&mut self, layer: usize, site: Site, rows: &[f32], _width: usize) {
        let si = Site::ALL.iter().position(|&s| s == site).unwrap();
        self.values[layer][si].extend_from_slice(rows);
    }
}

const NAMES: [&str; 7] = ["q", "k", "v", "o", "gate", "up", "down"];

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let files = ModelFiles::open(std::path::Path::new(&a[1])).unwrap();
    let fisher: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&a[2]).unwrap()).unwrap();
    let s: f64 = a[3].parse().unwrap();
    let (n, len, wins): (usize, usize, usize) = (
        a[4].parse().unwrap(),
        a[5].parse().unwrap(),
        a[6].parse().unwrap(),
    );
    let variants: Vec<String> = a
        .get(7)
        .map(|v| v.split(',').map(String::from).collect())
        .unwrap_or_else(|| {
            ["abs", "wina-global", "fisher", "fisher-global"]
                .map(String::from)
                .to_vec()
        });
    let model = files.load_model_as(teal::Dtype::F32).unwrap();
    let c4 = std::fs::read_to_string(teal::assets::cached("data", "c4.utf8").unwrap()).unwrap();
    let ctoks = files.tokenizer.encode(&c4, false).unwrap();
    let wiki = std::fs::read_to_string("/work/shared/data/wikitext-2-raw-test.raw").unwrap();
    let wtoks = files.tokenizer.encode(&wiki, false).unwrap();
    let layers = model.layers.len();
    let mut col = Collect {
        values: vec![Default::default(); layers],
    };
    let mut cache = model.new_cache(len);
    for w in ctoks.chunks_exact(len).take(n) {
        cache.clear();
        model
            .prefill_observed(w, &mut cache, Logits::Last, Some(&mut col))
            .unwrap();
    }
    let ppl = PplOptions {
        ctx: 512,
        chunks: Some(wins),
        kv: KvDtype::F32,
    };
    for var in &variants {
        if var == "greedy" {
            let th =
                Thresholds::load(std::path::Path::new(&std::env::var("GREEDY").unwrap())).unwrap();
            let spec = SparsitySpec {
                target: s,
                allocation: Allocation::Greedy,
                quantile: Quantile::Abs,
                mode: Mode::All,
            };
            let sparse = model.with_masks(&th.resolve(&spec).unwrap()).unwrap();
            report(
                var,
                s,
                &compare(
                    &files.config,
                    &model,
                    &sparse,
                    Mode::All,
                    &wtoks,
                    &ppl,
                    |_, _| {},
                )
                .unwrap(),
            );
            continue;
        }
        // Channel weights of every projection.
        let weights: Vec<[Vec<f32>; 7]> = (0..layers)
            .map(|l| {
                let lin = model.layers[l].linears();
                std::array::from_fn(|p| {
                    let li = lin[p].1;
                    let out = li.out_dim as f32;
                    let f = || -> Vec<f32> {
                        fisher["layers"][l][NAMES[p]]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|v| v.as_f64().unwrap() as f32)
                            .collect()
                    };
                    match var.as_str() {
                        "abs" => vec![1.0; li.in_dim],
                        "wina" => li.input_norms().to_vec(),
                        "wina-global" => li.input_norms().iter().map(|n| n / out.sqrt()).collect(),
                        "fisher" => f().iter().map(|v| v.sqrt()).collect(),
                        "fproj-global" => {
                            let f = f();
                            let m = f.iter().sum::<f32>() / f.len() as f32;
                            vec![(m / out).sqrt(); li.in_dim]
                        }
                        "fisher-global" => f().iter().map(|v| (v / out).sqrt()).collect(),
                        other => panic!("unknown variant {other}"),
                    }
                })
            })
            .collect();
        // Sorted scores of every projection.
        let sorted: Vec<[Vec<f32>; 7]> = (0..layers)
            .map(|l| {
                std::array::from_fn(|p| {
                    let w = &weights[l][p];
                    let mut v: Vec<f32> = col.values[l][PROJ_SITE[p]]
                        .chunks(w.len())
                        .flat_map(|r| r.iter().zip(w).map(|(x, w)| x.abs() * w))
                        .collect();
                    v.sort_unstable_by(|a, b| a.total_cmp(b));
                    v
                })
            })
            .collect();
        let params = |l: usize, p: usize| {
            let li = model.layers[l].linears()[p].1;
            (li.in_dim * li.out_dim) as f64
        };
        let total: f64 = (0..layers)
            .flat_map(|l| (0..7).map(move |p| (l, p)))
            .map(|(l, p)| params(l, p))
            .sum();
        let thresholds: Vec<[f32; 7]> = if var.ends_with("global") {
            let frac = |t: f32| -> f64 {
                (0..layers)
                    .flat_map(|l| (0..7).map(move |p| (l, p)))
                    .map(|(l, p)| {
                        let v = &sorted[l][p];
                        params(l, p) * v.partition_point(|&x| x <= t) as f64 / v.len() as f64
                    })
                    .sum::<f64>()
                    / total
            };
            let (mut lo, mut hi) = (0.0f32, 1e30f32);
            for _ in 0..200 {
                let mid = if hi > 1e29 {
                    lo * 2.0 + 1e-12
                } else {
                    0.5 * (lo + hi)
                };
                if frac(mid) < s {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            vec![[hi; 7]; layers]
        } else {
            (0..layers)
                .map(|l| {
                    std::array::from_fn(|p| {
                        let v = &sorted[l][p];
                        v[((s * v.len() as f64) as usize).min(v.len() - 1)]
                    })
                })
                .collect()
        };
        let blocks: Vec<Block> = model
            .layers
            .iter()
            .enumerate()
            .map(|(l, b)| {
                let w = |p: usize| weights[l][p].clone();
                let m = |p: usize| Some(InputMask::WeightAware(thresholds[l][p]));
                Block {
                    q_proj: b.q_proj.with_input_norms(w(0)).with_mask(m(0)),
                    k_proj: b.k_proj.with_input_norms(w(1)).with_mask(m(1)),
                    v_proj: b.v_proj.with_input_norms(w(2)).with_mask(m(2)),
                    o_proj: b.o_proj.with_input_norms(w(3)).with_mask(m(3)),
                    gate_proj: b.gate_proj.with_input_norms(w(4)).with_mask(m(4)),
                    up_proj: b.up_proj.with_input_norms(w(5)).with_mask(m(5)),
                    down_proj: b.down_proj.with_input_norms(w(6)).with_mask(m(6)),
                    ..b.clone()
                }
            })
            .collect();
        let sparse: Llama = model.with_weights(
            model.embed_tokens.clone(),
            blocks,
            model.norm.clone(),
            model.lm_head.clone(),
        );
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
        report(var, s, &r);
    }
}

fn report(var: &str, s: f64, r: &SparseReport) {
    println!(
            "{var:14} s={s} dense {:.4} sparse {:.4} ratio x{:.4} kl {:.4} top1 {:.4} realized {:.4} sites {:?}",
            r.dense_ppl, r.ppl, r.ppl_ratio, r.kl, r.top1, r.model_sparsity,
            r.site_sparsity.iter().map(|(_, x)| (x * 100.0).round() / 100.0).collect::<Vec<_>>()
        );
}
