//! Experiment (docs/QUALITY.md, "loss-aware masks"): zero `x_j` when `|x_j| * w_j <= t`, with
//! one `t` for the whole model and `w_j = sqrt(F_j / out)` from loss gradients at each
//! projection's input (the expected loss increase per weight byte skipped: a global allocation
//! with no search). Variants of `F_j`:
//! - `fisher-global`: `E[g_j^2]`, the diagonal empirical Fisher;
//! - `fsmall-global`: `E[g_j^2 | |x_j| < median_j]`, over the positions where the channel is small;
//! - `fx-global`: `E[g_j^2 x_j^2] / E[x_j^2]`;
//! - `fsparse-global`: `E[g_j^2]` with the gradients taken on the `fisher-global` sparse model;
//! - `greedy`: the greedy rows of the thresholds file in `$GREEDY`, for comparison.
//!
//!     fisher_eval MODEL FISHER_WINDOWS SPARSITY CALIB_SAMPLES CALIB_LEN WINDOWS [VARIANTS]
use teal::eval::perplexity::PplOptions;
use teal::eval::sparse::{compare, SparseReport};
use teal::kv_cache::KvDtype;
use teal::linear::InputMask;
use teal::load::ModelFiles;
use teal::models::llama::{Block, Llama, Logits, Observer, Site};
use teal::sparsity::fisher::input_gradients;
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

type PerChannel = Vec<[Vec<f64>; 7]>;

struct Stats {
    f: PerChannel,
    fsmall: PerChannel,
    fx: PerChannel,
}

fn stats(model: &Llama, toks: &[u32], windows: usize, medians: &[[Vec<f32>; 7]]) -> Stats {
    let zero = || -> PerChannel {
        model
            .layers
            .iter()
            .map(|b| {
                let lin = b.linears();
                std::array::from_fn(|p| vec![0.0; lin[p].1.in_dim])
            })
            .collect()
    };
    let (mut f, mut fs, mut ns, mut gx, mut xx) = (zero(), zero(), zero(), zero(), zero());
    let t0 = std::time::Instant::now();
    for (i, w) in toks.chunks_exact(512).take(windows).enumerate() {
        input_gradients(model, w, &mut |l, p, x, g| {
            let m = &medians[l][p];
            let n = m.len();
            for (xr, gr) in x.chunks(n).zip(g.chunks(n)) {
                for j in 0..n {
                    let (xv, gv) = (xr[j] as f64, gr[j] as f64);
                    f[l][p][j] += gv * gv;
                    gx[l][p][j] += gv * gv * xv * xv;
                    xx[l][p][j] += xv * xv;
                    if xr[j].abs() < m[j] {
                        fs[l][p][j] += gv * gv;
                        ns[l][p][j] += 1.0;
                    }
                }
            }
        })
        .unwrap();
        eprintln!(
            "gradients: window {} ({:.0}s)",
            i + 1,
            t0.elapsed().as_secs_f64()
        );
    }
    for l in 0..f.len() {
        for p in 0..7 {
            for j in 0..f[l][p].len() {
                fs[l][p][j] /= ns[l][p][j].max(1.0);
                gx[l][p][j] /= xx[l][p][j].max(1e-30);
            }
        }
    }
    Stats {
        f,
        fsmall: fs,
        fx: gx,
    }
}

/// The model with one global threshold on `|x_j| w_j`, placed so the parameter-weighted
/// sparsity over the calibration activations is `s`.
fn global(model: &Llama, col: &Collect, w: &[[Vec<f32>; 7]], s: f64) -> Llama {
    let layers = model.layers.len();
    let sorted: Vec<[Vec<f32>; 7]> = (0..layers)
        .map(|l| {
            std::array::from_fn(|p| {
                let w = &w[l][p];
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
    let blocks: Vec<Block> = model
        .layers
        .iter()
        .enumerate()
        .map(|(l, b)| {
            let w = |p: usize| w[l][p].clone();
            let m = || Some(InputMask::WeightAware(hi));
            Block {
                q_proj: b.q_proj.with_input_norms(w(0)).with_mask(m()),
                k_proj: b.k_proj.with_input_norms(w(1)).with_mask(m()),
                v_proj: b.v_proj.with_input_norms(w(2)).with_mask(m()),
                o_proj: b.o_proj.with_input_norms(w(3)).with_mask(m()),
                gate_proj: b.gate_proj.with_input_norms(w(4)).with_mask(m()),
                up_proj: b.up_proj.with_input_norms(w(5)).with_mask(m()),
                down_proj: b.down_proj.with_input_norms(w(6)).with_mask(m()),
                ..b.clone()
            }
        })
        .collect();
    model.with_weights(
        model.embed_tokens.clone(),
        blocks,
        model.norm.clone(),
        model.lm_head.clone(),
    )
}

fn weights(model: &Llama, f: &PerChannel) -> Vec<[Vec<f32>; 7]> {
    model
        .layers
        .iter()
        .enumerate()
        .map(|(l, b)| {
            let lin = b.linears();
            std::array::from_fn(|p| {
                let out = lin[p].1.out_dim as f64;
                f[l][p].iter().map(|v| (v / out).sqrt() as f32).collect()
            })
        })
        .collect()
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let files = ModelFiles::open(std::path::Path::new(&a[1])).unwrap();
    let fwin: usize = a[2].parse().unwrap();
    let s: f64 = a[3].parse().unwrap();
    let (n, len, wins): (usize, usize, usize) = (
        a[4].parse().unwrap(),
        a[5].parse().unwrap(),
        a[6].parse().unwrap(),
    );
    let variants: Vec<String> = a
        .get(7)
        .map(|v| v.split(',').map(String::from).collect())
        .unwrap_or_else(|| vec!["fisher-global".into()]);
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
    // Per-channel medians of |x| at each projection's site.
    let medians: Vec<[Vec<f32>; 7]> = (0..layers)
        .map(|l| {
            std::array::from_fn(|p| {
                let width = model.layers[l].linears()[p].1.in_dim;
                let v = &col.values[l][PROJ_SITE[p]];
                (0..width)
                    .map(|j| {
                        let mut c: Vec<f32> =
                            v.iter().skip(j).step_by(width).map(|x| x.abs()).collect();
                        let k = c.len() / 2;
                        *c.select_nth_unstable_by(k, |a, b| a.total_cmp(b)).1
                    })
                    .collect()
            })
        })
        .collect();
    let st = stats(&model, &ctoks, fwin, &medians);
    let ppl = PplOptions {
        ctx: 512,
        chunks: Some(wins),
        kv: KvDtype::F32,
    };
    let run = |name: &str, sparse: &Llama| {
        let r = compare(
            &files.config,
            &model,
            sparse,
            Mode::All,
            &wtoks,
            &ppl,
            |_, _| {},
        )
        .unwrap();
        report(name, s, &r);
    };
    for var in &variants {
        match var.as_str() {
            "greedy" => {
                let th = Thresholds::load(std::path::Path::new(&std::env::var("GREEDY").unwrap()))
                    .unwrap();
                let spec = SparsitySpec {
                    target: s,
                    allocation: Allocation::Greedy,
                    quantile: Quantile::Abs,
                    mode: Mode::All,
                };
                run(var, &model.with_masks(&th.resolve(&spec).unwrap()).unwrap());
            }
            "fisher-global" => run(var, &global(&model, &col, &weights(&model, &st.f), s)),
            "fsmall-global" => run(var, &global(&model, &col, &weights(&model, &st.fsmall), s)),
            "fx-global" => run(var, &global(&model, &col, &weights(&model, &st.fx), s)),
            "fsparse-global" => {
                let first = global(&model, &col, &weights(&model, &st.f), s);
                let st2 = stats(&first, &ctoks, fwin, &medians);
                run(var, &global(&model, &col, &weights(&model, &st2.f), s));
            }
            other => panic!("unknown variant {other}"),
        }
    }
}

fn report(var: &str, s: f64, r: &SparseReport) {
    println!(
        "{var:14} s={s} dense {:.4} sparse {:.4} ratio x{:.4} kl {:.4} top1 {:.4} realized {:.4} sites {:?}",
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
