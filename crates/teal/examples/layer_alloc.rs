//! Experiment (docs/QUALITY.md, "sparsity across layers by measured marginal loss"): TEAL's
//! greedy tables fix the split between the seven projections of each block, and TEAL gives
//! every block the same sparsity. Here the block sparsities S_l move instead, keeping their
//! mean: at each round the marginal increase of the mean NLL on C4 windows (not the evaluation
//! text) is measured for each layer at S_l + delta, and delta moves from the `k` layers where
//! it costs most to the `k` where it costs least; a move is kept only if the C4 NLL falls.
//! The result is then evaluated on WikiText-2 (P512) against the uniform-across-layers greedy.
//!
//!     layer_alloc MODEL THRESHOLDS TARGET SEARCH_WINDOWS ROUNDS EVAL_WINDOWS
use teal::eval::perplexity::{perplexity, PplOptions};
use teal::eval::sparse::compare;
use teal::linear::InputMask;
use teal::load::ModelFiles;
use teal::models::llama::Llama;
use teal::sparsity::thresholds::Thresholds;
use teal::sparsity::{Mode, Quantile};

fn masks(th: &Thresholds, targets: &[f64]) -> (Vec<[Option<InputMask>; 7]>, f64) {
    let g = th.greedy.as_ref().expect("greedy tables");
    let mut mean = 0.0;
    let m = targets
        .iter()
        .enumerate()
        .map(|(l, &t)| {
            let row = g.layers[l]
                .iter()
                .min_by(|a, b| (a.sparsity - t).abs().total_cmp(&(b.sparsity - t).abs()))
                .unwrap();
            mean += row.sparsity / targets.len() as f64;
            std::array::from_fn(|p| th.mask(l, p, row.s[p], Quantile::Abs))
        })
        .collect();
    (m, mean)
}

fn nll(model: &Llama, th: &Thresholds, targets: &[f64], toks: &[u32], o: &PplOptions) -> f64 {
    let (m, _) = masks(th, targets);
    let sm = model.with_masks(&m).unwrap();
    perplexity(&sm, toks, o, |_, _| {}).unwrap().nll
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let files = ModelFiles::open(std::path::Path::new(&a[1])).unwrap();
    let th = Thresholds::load(std::path::Path::new(&a[2])).unwrap();
    let target: f64 = a[3].parse().unwrap();
    let (search_w, rounds, eval_w): (usize, usize, usize) = (
        a[4].parse().unwrap(),
        a[5].parse().unwrap(),
        a[6].parse().unwrap(),
    );
    let model = files.load_model_as(teal::Dtype::F32).unwrap();
    let n = files.config.num_hidden_layers;
    let c4 = std::fs::read_to_string(teal::assets::cached("data", "c4.utf8").unwrap()).unwrap();
    let ctoks = files.tokenizer.encode(&c4, false).unwrap();
    // The calibration used the first 10 x 2048 tokens; search on windows after them.
    let stoks = &ctoks[10 * 2048..];
    let so = PplOptions {
        ctx: 512,
        chunks: Some(search_w),
    };
    let mut s = vec![target; n];
    let mut best = nll(&model, &th, &s, stoks, &so);
    eprintln!("uniform across layers: C4 NLL {best:.5}");
    let (mut delta, mut k) = (0.05, 6usize);
    for r in 0..rounds {
        let t0 = std::time::Instant::now();
        let mut up: Vec<(f64, usize)> = (0..n)
            .map(|l| {
                let mut t = s.clone();
                t[l] += delta;
                (nll(&model, &th, &t, stoks, &so) - best, l)
            })
            .collect();
        up.sort_by(|a, b| a.0.total_cmp(&b.0));
        eprintln!(
            "round {r}: delta {delta} k {k}, marginals {:.1}s, cheapest {:?}, dearest {:?}",
            t0.elapsed().as_secs_f64(),
            &up[..k]
                .iter()
                .map(|x| (x.1, (x.0 * 1e4).round() / 1e4))
                .collect::<Vec<_>>(),
            &up[n - k..]
                .iter()
                .map(|x| (x.1, (x.0 * 1e4).round() / 1e4))
                .collect::<Vec<_>>()
        );
        loop {
            let mut t = s.clone();
            for &(_, l) in &up[..k] {
                t[l] += delta;
            }
            for &(_, l) in &up[n - k..] {
                t[l] -= delta;
            }
            let v = nll(&model, &th, &t, stoks, &so);
            eprintln!("  move k={k}: C4 NLL {v:.5} (best {best:.5})");
            if v < best {
                best = v;
                s = t;
                break;
            }
            if k == 1 {
                delta /= 2.0;
                k = 6;
                break;
            }
            k /= 2;
        }
        eprintln!(
            "  schedule {:?}",
            s.iter()
                .map(|x| (x * 1000.0).round() / 1000.0)
                .collect::<Vec<_>>()
        );
    }
    let wiki = std::fs::read_to_string("/work/shared/data/wikitext-2-raw-test.raw").unwrap();
    let wtoks = files.tokenizer.encode(&wiki, false).unwrap();
    let eo = PplOptions {
        ctx: 512,
        chunks: Some(eval_w),
    };
    for (name, t) in [
        ("greedy, uniform across layers", vec![target; n]),
        ("searched", s),
    ] {
        let (m, planned) = masks(&th, &t);
        let sm = model.with_masks(&m).unwrap();
        let r = compare(
            &files.config,
            &model,
            &sm,
            Mode::All,
            &wtoks,
            &eo,
            |_, _| {},
        )
        .unwrap();
        println!(
            "{name}: planned {planned:.4} realized {:.4} ppl {:.4} ratio x{:.4} kl {:.4} top1 {:.4}",
            r.model_sparsity, r.ppl, r.ppl_ratio, r.kl, r.top1
        );
    }
}
