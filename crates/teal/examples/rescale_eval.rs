//! Experiment (docs/QUALITY.md, "per-channel rescale"): TEAL's greedy allocation at one target,
//! with and without a least-squares rescale of each sparsified projection's output channels,
//! `alpha_o = E[y_o yhat_o] / E[yhat_o^2]` (`y`: the dense projection, `yhat`: the sparse one, on
//! the same inputs of the sparse model running on calibration text), folded into the weights; and
//! with one such scale per projection (the sums pooled over its output channels).
//!
//!     rescale_eval MODEL SPARSITY CALIB_SAMPLES CALIB_LEN WINDOWS
//!
//! The greedy search is `teal calibrate --greedy --no-wina` (10 x 2048 C4 tokens for the
//! statistics, 2 x 256 for the search, step 0.05), stopped at SPARSITY + 0.05: its rows up to
//! there are those of the full search.
use teal::eval::perplexity::PplOptions;
use teal::eval::sparse::compare;
use teal::linear::Linear;
use teal::load::ModelFiles;
use teal::models::llama::{Block, Llama, Logits, Observer, Site};
use teal::sparsity::calibrate::{calibrate, CalibOptions};
use teal::sparsity::greedy::GreedyOptions;
use teal::sparsity::thresholds::Fingerprint;
use teal::sparsity::{Allocation, Mode, Quantile, SparsitySpec, PROJ_NAMES, PROJ_SITE};

/// Sums `y_o yhat_o` and `yhat_o^2` of every projection's outputs at the sites the sparse model
/// reports (its own, sparsified, activations).
struct Moments<'a> {
    dense: &'a Llama,
    sparse: &'a Llama,
    num: Vec<[Vec<f64>; 7]>,
    den: Vec<[Vec<f64>; 7]>,
}

impl Observer for Moments<'_> {
    fn observe(&mut self, layer: usize, site: Site, rows: &[f32], width: usize) {
        let si = Site::ALL.iter().position(|&s| s == site).unwrap();
        let n = rows.len() / width;
        for p in (0..7).filter(|&p| PROJ_SITE[p] == si) {
            let (d, s) = (
                self.dense.layers[layer].linears()[p].1,
                self.sparse.layers[layer].linears()[p].1,
            );
            let out = d.out_dim;
            let (mut y, mut yh) = (vec![0.0f32; n * out], vec![0.0f32; n * out]);
            d.forward_batch(rows, n, &mut y);
            s.forward_batch(rows, n, &mut yh);
            let (num, den) = (&mut self.num[layer][p], &mut self.den[layer][p]);
            if num.is_empty() {
                *num = vec![0.0; out];
                *den = vec![0.0; out];
            }
            for (yr, hr) in y.chunks(out).zip(yh.chunks(out)) {
                for o in 0..out {
                    num[o] += yr[o] as f64 * hr[o] as f64;
                    den[o] += hr[o] as f64 * hr[o] as f64;
                }
            }
        }
    }
}

/// `l` with output channel `o` (weights and bias) scaled by `alpha[o]`.
fn scale_outputs(l: &Linear, alpha: &[f32], name: &str) -> Linear {
    let mut wt = l.input_major();
    for row in wt.chunks_mut(l.out_dim) {
        row.iter_mut().zip(alpha).for_each(|(v, a)| *v *= a);
    }
    let bias = l
        .bias()
        .map(|b| b.iter().zip(alpha).map(|(v, a)| v * a).collect());
    Linear::from_input_major_as(l.dtype(), name, l.in_dim, l.out_dim, wt, bias).unwrap()
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let files = ModelFiles::open(std::path::Path::new(&a[1])).unwrap();
    let s: f64 = a[2].parse().unwrap();
    let (n, len, wins): (usize, usize, usize) = (
        a[3].parse().unwrap(),
        a[4].parse().unwrap(),
        a[5].parse().unwrap(),
    );
    let model = files.load_model_as(teal::Dtype::F32).unwrap();
    let c4 = std::fs::read_to_string(teal::assets::cached("data", "c4.utf8").unwrap()).unwrap();
    let ctoks = files.tokenizer.encode(&c4, false).unwrap();
    let wiki = std::fs::read_to_string("/work/shared/data/wikitext-2-raw-test.raw").unwrap();
    let wtoks = files.tokenizer.encode(&wiki, false).unwrap();
    let fp = Fingerprint::of(&files.config, &files.tensors);
    let opts = CalibOptions {
        samples: 10,
        seq_len: 2048,
        greedy: Some((
            GreedyOptions {
                max_sparsity: (s + 0.05).min(0.9),
                ..GreedyOptions::default()
            },
            Quantile::Abs,
        )),
        weight_aware: false,
        text_label: "c4.utf8".into(),
        text_bytes: c4.len(),
    };
    let t0 = std::time::Instant::now();
    let th = calibrate(&model, fp, &ctoks, &opts, &mut |_, _, _| {}).unwrap();
    eprintln!("greedy calibrated in {:.0}s", t0.elapsed().as_secs_f64());
    let spec = SparsitySpec {
        target: s,
        allocation: Allocation::Greedy,
        quantile: Quantile::Abs,
        mode: Mode::All,
    };
    let masks = th.resolve(&spec).unwrap();
    let sparse = model.with_masks(&masks).unwrap();

    let layers = model.layers.len();
    let mut m = Moments {
        dense: &model,
        sparse: &sparse,
        num: vec![Default::default(); layers],
        den: vec![Default::default(); layers],
    };
    let mut cache = sparse.new_cache(len);
    for w in ctoks.chunks_exact(len).take(n) {
        cache.clear();
        sparse
            .prefill_observed(w, &mut cache, Logits::Last, Some(&mut m))
            .unwrap();
    }
    let channel: Vec<[Vec<f32>; 7]> = (0..layers)
        .map(|l| {
            std::array::from_fn(|p| {
                m.num[l][p]
                    .iter()
                    .zip(&m.den[l][p])
                    .map(|(&nu, &de)| if de > 0.0 { (nu / de) as f32 } else { 1.0 })
                    .collect()
            })
        })
        .collect();
    let scalar: Vec<[Vec<f32>; 7]> = (0..layers)
        .map(|l| {
            std::array::from_fn(|p| {
                let a = m.num[l][p].iter().sum::<f64>() / m.den[l][p].iter().sum::<f64>();
                vec![a as f32; m.num[l][p].len()]
            })
        })
        .collect();
    for (p, name) in PROJ_NAMES.iter().enumerate() {
        let all: Vec<f32> = channel.iter().flat_map(|r| r[p].iter().copied()).collect();
        let mean = all.iter().map(|&v| v as f64).sum::<f64>() / all.len() as f64;
        let (lo, hi) = all
            .iter()
            .fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        println!("alpha {name:10} mean {mean:.4} min {lo:.4} max {hi:.4}");
    }
    let rescaled = |alpha: &[[Vec<f32>; 7]]| -> Llama {
        let layers: Vec<Block> = model
            .layers
            .iter()
            .enumerate()
            .map(|(l, b)| {
                let name = |p: usize| format!("model.layers.{l}.{}.weight", PROJ_NAMES[p]);
                let sc = |p: usize, lin: &Linear| scale_outputs(lin, &alpha[l][p], &name(p));
                Block {
                    q_proj: sc(0, &b.q_proj),
                    k_proj: sc(1, &b.k_proj),
                    v_proj: sc(2, &b.v_proj),
                    o_proj: sc(3, &b.o_proj),
                    gate_proj: sc(4, &b.gate_proj),
                    up_proj: sc(5, &b.up_proj),
                    down_proj: sc(6, &b.down_proj),
                    ..b.clone()
                }
            })
            .collect();
        model
            .with_weights(
                model.embed_tokens.clone(),
                layers,
                model.norm.clone(),
                model.lm_head.clone(),
            )
            .with_masks(&masks)
            .unwrap()
    };
    let (per_channel, per_projection) = (rescaled(&channel), rescaled(&scalar));
    let ppl = PplOptions {
        ctx: 512,
        chunks: Some(wins),
    };
    for (name, sm) in [
        ("+ channel rescale", &per_channel),
        ("+ proj. rescale", &per_projection),
        ("greedy", &sparse),
    ] {
        let r = compare(
            &files.config,
            &model,
            sm,
            Mode::All,
            &wtoks,
            &ppl,
            |_, _| {},
        )
        .unwrap();
        println!(
            "{name:18} s={s} dense {:.4} sparse {:.4} ratio x{:.4} kl {:.4} top1 {:.4} realized {:.4}",
            r.dense_ppl, r.ppl, r.ppl_ratio, r.kl, r.top1, r.model_sparsity
        );
    }
}
