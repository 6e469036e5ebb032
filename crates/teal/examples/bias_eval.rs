//! Experiment (docs/QUALITY.md, "bias correction"): TEAL's greedy masks at one target, with and
//! without the expected dropped contribution added back as a bias: each sparsified projection
//! gets `b += W m`, `m_j = E[x_j 1{x_j zeroed}]` over the sparse model's own inputs on C4.
//!
//!     bias_eval MODEL THRESHOLDS SPARSITY CALIB_SAMPLES CALIB_LEN WINDOWS
use teal::eval::perplexity::PplOptions;
use teal::eval::sparse::compare;
use teal::kv_cache::KvDtype;
use teal::linear::{InputMask, Linear};
use teal::load::ModelFiles;
use teal::models::llama::{Block, Llama, Logits, Observer, Site};
use teal::sparsity::thresholds::{SparsitySpec, Thresholds};
use teal::sparsity::{Allocation, Mode, Quantile, PROJ_NAMES, PROJ_SITE};

/// Sums of the zeroed inputs of every projection, per input channel, and the rows seen.
struct Dropped<'a> {
    sparse: &'a Llama,
    sum: Vec<[Vec<f64>; 7]>,
    rows: Vec<[usize; 7]>,
}

impl Observer for Dropped<'_> {
    fn observe(&mut self, layer: usize, site: Site, rows: &[f32], width: usize) {
        let si = Site::ALL.iter().position(|&s| s == site).unwrap();
        for p in (0..7).filter(|&p| PROJ_SITE[p] == si) {
            let Some(InputMask::Threshold(t)) = self.sparse.layers[layer].linears()[p].1.mask()
            else {
                continue;
            };
            let sum = &mut self.sum[layer][p];
            if sum.is_empty() {
                *sum = vec![0.0; width];
            }
            for r in rows.chunks(width) {
                for (a, &v) in sum.iter_mut().zip(r) {
                    if v.abs() <= t {
                        *a += v as f64;
                    }
                }
            }
            self.rows[layer][p] += rows.len() / width;
        }
    }
}

/// `l` with `W m` added to its bias.
fn with_bias(l: &Linear, m: &[f32], name: &str) -> Linear {
    let mut b = vec![0.0f32; l.out_dim];
    l.with_mask(None).forward(m, &mut b);
    Linear::from_input_major_as(l.dtype(), name, l.in_dim, l.out_dim, l.input_major(), Some(b))
        .unwrap()
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let files = ModelFiles::open(std::path::Path::new(&a[1])).unwrap();
    let th = Thresholds::load(std::path::Path::new(&a[2])).unwrap();
    let s: f64 = a[3].parse().unwrap();
    let (n, len, wins): (usize, usize, usize) = (
        a[4].parse().unwrap(),
        a[5].parse().unwrap(),
        a[6].parse().unwrap(),
    );
    let model = files.load_model_as(teal::Dtype::F32).unwrap();
    let c4 = std::fs::read_to_string(teal::assets::cached("data", "c4.utf8").unwrap()).unwrap();
    let ctoks = files.tokenizer.encode(&c4, false).unwrap();
    let wiki = std::fs::read_to_string("/work/shared/data/wikitext-2-raw-test.raw").unwrap();
    let wtoks = files.tokenizer.encode(&wiki, false).unwrap();
    let spec = SparsitySpec {
        target: s,
        allocation: Allocation::Greedy,
        quantile: Quantile::Abs,
        mode: Mode::All,
    };
    let masks = th.resolve(&spec).unwrap();
    let sparse = model.with_masks(&masks).unwrap();
    let layers = model.layers.len();
    let mut d = Dropped {
        sparse: &sparse,
        sum: vec![Default::default(); layers],
        rows: vec![[0; 7]; layers],
    };
    let mut cache = sparse.new_cache(len);
    for w in ctoks.chunks_exact(len).take(n) {
        cache.clear();
        sparse
            .prefill_observed(w, &mut cache, Logits::Last, Some(&mut d))
            .unwrap();
    }
    let mean = |l: usize, p: usize| -> Vec<f32> {
        let r = d.rows[l][p].max(1) as f64;
        let v: Vec<f32> = d.sum[l][p].iter().map(|&x| (x / r) as f32).collect();
        if v.is_empty() {
            vec![0.0; model.layers[l].linears()[p].1.in_dim]
        } else {
            v
        }
    };
    let corrected: Vec<Block> = model
        .layers
        .iter()
        .enumerate()
        .map(|(l, b)| {
            let name = |p: usize| format!("model.layers.{l}.{}.weight", PROJ_NAMES[p]);
            let fix = |p: usize, lin: &Linear| with_bias(lin, &mean(l, p), &name(p));
            let (m4, m6) = (mean(l, 4), mean(l, 6));
            if l % 10 == 0 {
                let rms = |v: &[f32]| (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
                println!("layer {l}: rms of the dropped mean, gate input {:.3e}, down input {:.3e}", rms(&m4), rms(&m6));
            }
            Block {
                q_proj: fix(0, &b.q_proj),
                k_proj: fix(1, &b.k_proj),
                v_proj: fix(2, &b.v_proj),
                o_proj: fix(3, &b.o_proj),
                gate_proj: fix(4, &b.gate_proj),
                up_proj: fix(5, &b.up_proj),
                down_proj: fix(6, &b.down_proj),
                ..b.clone()
            }
        })
        .collect();
    let fixed = model
        .with_weights(
            model.embed_tokens.clone(),
            corrected,
            model.norm.clone(),
            model.lm_head.clone(),
        )
        .with_masks(&masks)
        .unwrap();
    let ppl = PplOptions {
        ctx: 512,
        chunks: Some(wins),
        kv: KvDtype::F32,
    };
    for (name, sm) in [("greedy", &sparse), ("+ bias", &fixed)] {
        let r = compare(&files.config, &model, sm, Mode::All, &wtoks, &ppl, |_, _| {}).unwrap();
        println!(
            "{name:8} s={s} dense {:.4} sparse {:.4} ratio x{:.4} kl {:.4} top1 {:.4} realized {:.4}",
            r.dense_ppl, r.ppl, r.ppl_ratio, r.kl, r.top1, r.model_sparsity
        );
    }
}
