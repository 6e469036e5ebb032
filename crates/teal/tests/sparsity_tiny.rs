//! TEAL on the tiny random model: calibration, thresholds file, greedy, sparse forward.

mod common;
use common::*;
use teal::config::{Arch, Config};
use teal::linear::InputMask;
use teal::loader::{SafetensorsSource, TensorSource};
use teal::models::llama::{Llama, Logits};
use teal::sparsity::calibrate::{calibrate, CalibOptions};
use teal::sparsity::fisher::{FisherLabels, FisherOptions};
use teal::sparsity::greedy::{greedy_block, GreedyOptions};
use teal::sparsity::thresholds::{weights_hash, Fingerprint, Thresholds};
use teal::sparsity::{
    effective_sparsity, size_weights, Allocation, Mode, Quantile, SparsitySpec, PROJ_SITE,
};

fn model() -> (Llama, Config, Fingerprint) {
    let c = tiny_config(Arch::Llama);
    let w = random_weights(&c, 11);
    let dir = tempfile::tempdir().unwrap();
    write_safetensors(dir.path(), &c, &w);
    let src = SafetensorsSource::open(dir.path()).unwrap();
    let m = Llama::load(c.clone(), &src).unwrap();
    let fp = Fingerprint::of(&c, &src.describe());
    (m, c, fp)
}

fn tokens(n: usize, seed: u64) -> Vec<u32> {
    rand_vec(n, seed, 1.0)
        .iter()
        .map(|v| ((v + 1.0) * 48.0) as u32 % 97)
        .collect()
}

fn calibrated(greedy: bool) -> (Llama, Config, Fingerprint, Thresholds) {
    let (m, c, fp) = model();
    let opts = CalibOptions {
        weight_aware: true,
        samples: 3,
        seq_len: 64,
        greedy: greedy.then_some((
            GreedyOptions {
                samples: 2,
                seq_len: 32,
                step: 0.05,
                max_sparsity: 0.9,
            },
            Quantile::Abs,
        )),
        fisher: Some(FisherOptions {
            samples: 2,
            seq_len: 64,
            labels: FisherLabels::Model { seed: 1 },
        }),
        text_label: "random".into(),
        text_bytes: 0,
    };
    let th = calibrate(&m, fp.clone(), &tokens(3 * 64, 5), &opts, &mut |_, _, _| {}).unwrap();
    (m, c, fp, th)
}

fn spec(target: f64, allocation: Allocation, quantile: Quantile) -> SparsitySpec {
    SparsitySpec {
        target,
        allocation,
        quantile,
        mode: Mode::All,
    }
}

#[test]
fn zero_sparsity_reproduces_dense_logits_bit_for_bit() {
    let (m, _, _, th) = calibrated(false);
    let t = th
        .resolve(&spec(0.0, Allocation::Uniform, Quantile::Abs))
        .unwrap();
    assert!(t.iter().flatten().all(|x| x.is_none()));
    let sparse = m.with_masks(&t).unwrap();
    let toks = tokens(20, 9);
    let a = m.prefill(&toks, &mut m.new_cache(32), Logits::All).unwrap();
    let b = sparse
        .prefill(&toks, &mut sparse.new_cache(32), Logits::All)
        .unwrap();
    assert_eq!(a, b);
    // A threshold below every |x| keeps everything, through the sparse kernels too.
    let keep_all = m
        .with_masks(&vec![
            std::array::from_fn(|_| Some(InputMask::Threshold(
                -1.0
            )));
            3
        ])
        .unwrap();
    let c = keep_all
        .prefill(&toks, &mut keep_all.new_cache(32), Logits::All)
        .unwrap();
    assert_eq!(a, c);
}

#[test]
fn calibrated_thresholds_hit_the_target_on_calibration_data() {
    let (m, c, _, th) = calibrated(false);
    let toks = tokens(3 * 64, 5);
    for s in [0.25, 0.5, 0.75] {
        for q in [
            Quantile::Abs,
            Quantile::Teal,
            Quantile::Wina,
            Quantile::Fisher,
        ] {
            let t = th.resolve(&spec(s, Allocation::Uniform, q)).unwrap();
            let sparse = m.with_masks(&t).unwrap();
            // Realized sparsity of layer 0's q_proj input on the same calibration windows:
            // layer 0 sees the same (dense) inputs during calibration and here.
            let mut zeros = [0usize; 3];
            let mut total = 0usize;
            struct Obs<'a>(
                &'a mut [usize; 3],
                &'a mut usize,
                &'a teal::models::llama::Block,
            );
            impl teal::models::llama::Observer for Obs<'_> {
                fn observe(
                    &mut self,
                    layer: usize,
                    site: teal::models::llama::Site,
                    rows: &[f32],
                    _: usize,
                ) {
                    if layer == 0 && site == teal::models::llama::Site::Qkv {
                        for (p, z) in self.0.iter_mut().enumerate() {
                            *z += self.2.linears()[p].1.count_zeroed(rows);
                        }
                        *self.1 += rows.len();
                    }
                }
            }
            for w in toks.chunks(64) {
                let mut o = Obs(&mut zeros, &mut total, &sparse.layers[0]);
                sparse
                    .prefill_observed(w, &mut sparse.new_cache(64), Logits::Last, Some(&mut o))
                    .unwrap();
            }
            for (p, &z) in zeros.iter().enumerate() {
                let got = z as f64 / total as f64;
                // 3 x 64 x 48 = 9216 values: the exact quantiles (of |x| or of the weight- or
                // loss-aware score) are exact up to 1/9216 plus the 0.005 level spacing
                // interpolation;
                // TEAL's signed reading assumes symmetry.
                let tol = if q == Quantile::Teal { 0.05 } else { 0.005 };
                assert!(
                    (got - s).abs() < tol,
                    "{q:?} s={s} proj {p}: realized {got}"
                );
            }
        }
    }
    let _ = c;
}

#[test]
fn thresholds_file_round_trips_and_rejects_other_models() {
    let (_, c, fp, th) = calibrated(true);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.json");
    th.save(&p).unwrap();
    let back = Thresholds::load(&p).unwrap();
    assert!(back == th, "thresholds changed in a save/load round trip");
    back.check_model(&fp).unwrap();
    // Saved through a temporary file of its own, which is gone afterwards, also when the
    // rename fails (the path is a directory).
    let names = |d: &std::path::Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(dir.path()), ["t.json"]);
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    assert!(th.save(&sub).is_err());
    assert!(Thresholds::check_writable(&sub).is_err());
    Thresholds::check_writable(&dir.path().join("new.json")).unwrap();
    assert_eq!(names(dir.path()), ["sub", "t.json"]);
    assert!(names(&sub).is_empty());

    let other = Fingerprint {
        hidden_size: c.hidden_size + 1,
        ..fp.clone()
    };
    let e = back.check_model(&other).unwrap_err().to_string();
    assert!(e.contains("another model"), "{e}");
    let (h, h1) = (c.hidden_size, c.hidden_size + 1);
    assert!(
        e.contains(&format!("hidden_size {h} in the file, {h1} in the model")),
        "{e}"
    );

    // Other weights of the same shapes (a fine-tune, another quantization): the tensor list
    // hashes alike, the sample of values does not; the file is then usable, with a warning.
    let hash_of = |seed: u64| {
        let d = tempfile::tempdir().unwrap();
        write_safetensors(d.path(), &c, &random_weights(&c, seed));
        weights_hash(&c, &SafetensorsSource::open(d.path()).unwrap()).unwrap()
    };
    let (a, b) = (hash_of(1), hash_of(2));
    assert_eq!(a, hash_of(1), "the weights hash of one model changed");
    assert_ne!(a, b);
    let mut mine = back.clone();
    mine.model.weights_hash = Some(a.clone());
    let this = |h: &str| Fingerprint {
        weights_hash: Some(h.into()),
        ..fp.clone()
    };
    mine.check_model(&this(&b)).unwrap();
    assert!(mine.other_weights(&this(&b)));
    assert!(!mine.other_weights(&this(&a)));
    assert!(!back.other_weights(&this(&b)), "a file without the hash");

    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replacen("\"version\":1", "\"version\":99", 1);
    std::fs::write(&p, text).unwrap();
    let e = Thresholds::load(&p).unwrap_err().to_string();
    assert!(e.contains("unsupported thresholds file version"), "{e}");
    std::fs::write(&p, "{\"format\": \"something else\"}").unwrap();
    assert!(Thresholds::load(&p)
        .unwrap_err()
        .to_string()
        .contains("not a teal thresholds file"));
    std::fs::write(&p, "{not json").unwrap();
    assert!(Thresholds::load(&p)
        .unwrap_err()
        .to_string()
        .contains("invalid JSON"));

    for bad in [-0.1, 1.0, 1.5, f64::NAN] {
        let e = back
            .resolve(&spec(bad, Allocation::Uniform, Quantile::Abs))
            .unwrap_err()
            .to_string();
        assert!(e.contains("outside [0, 1)"), "{e}");
    }
}

/// A greedy table that stops short of the target is an error, not the dense model (a table
/// calibrated with a step of 0 held only its first row, and 50 % ran dense), and so is a
/// file whose greedy step is not in (0, 1].
#[test]
fn greedy_tables_short_of_the_target_are_errors() {
    let (_, _, _, mut th) = calibrated(true);
    let greedy = |t: f64| spec(t, Allocation::Greedy, Quantile::Abs);
    th.resolve(&greedy(0.5)).unwrap();
    th.resolve(&greedy(0.9)).unwrap();
    // The search stops at 0.9: 0.95 ran silently at 0.9 while the check allowed a whole step.
    let e = th.resolve(&greedy(0.95)).unwrap_err().to_string();
    assert!(e.contains("short of the target 0.95"), "{e}");
    let g = th.greedy.as_mut().unwrap();
    for steps in &mut g.layers {
        steps.truncate(1);
    }
    let e = th.resolve(&greedy(0.5)).unwrap_err().to_string();
    assert!(
        e.contains(
            "the greedy table of layer 0 reaches block sparsity 0.000 at most, short of \
             the target 0.5"
        ),
        "{e}"
    );
    th.resolve(&greedy(0.004)).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.json");
    th.greedy.as_mut().unwrap().step = 0.0;
    th.save(&p).unwrap();
    let e = Thresholds::load(&p).unwrap_err().to_string();
    assert!(e.contains("greedy tables: step 0 outside (0, 1]"), "{e}");
}

/// Hand-edited site tables whose thresholds fall as the level rises, or with a negative |x|
/// quantile, are refused at load.
#[test]
fn site_tables_out_of_order_are_refused() {
    let (_, _, _, th) = calibrated(false);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.json");
    th.save(&p).unwrap();
    Thresholds::load(&p).unwrap();
    let edits: [fn(&mut Thresholds); 2] = [
        |t| t.sites[1][2].abs[1] = -0.5,
        |t| t.sites[1][2].teal.swap(4, 9),
    ];
    for edit in edits {
        let mut bad = th.clone();
        edit(&mut bad);
        bad.save(&p).unwrap();
        let e = Thresholds::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("layer 1 site 2: thresholds that fall as the level rises"),
            "{e}"
        );
    }
}

#[test]
fn greedy_picks_the_least_error_projection_at_each_step() {
    let (m, c, _, th) = calibrated(true);
    let g = th.greedy.as_ref().unwrap();
    let w = size_weights(&c);
    for steps in &g.layers {
        assert_eq!(steps[0].sparsity, 0.0);
        assert!(steps.last().unwrap().sparsity >= 0.9 - 1e-9);
        for st in steps {
            assert!((effective_sparsity(&st.s, &w) - st.sparsity).abs() < 1e-12);
        }
    }
    // Brute-force the first step of layer 1 with the same inputs the search used.
    let layer = 1;
    let toks = tokens(3 * 64, 5);
    let d = c.hidden_size;
    let (cos, sin) = m.rope_tables_for(0, 32);
    // A block's prefill of 32 positions from position 0, in place.
    let run_block = |b: &teal::models::llama::Block, x: &mut [f32]| {
        let mut ws = teal::models::llama::PrefillBuffers::new(&c, 32);
        let (mut kc, mut vc) = (vec![0.0; 32 * c.kv_dim()], vec![0.0; 32 * c.kv_dim()]);
        let kv = teal::kv_cache::KvRows::F32(&mut kc, &mut vc);
        b.prefill(&c, x, 32, 0, (&cos, &sin), kv, &mut ws, None);
    };
    // Dense inputs of block 1: embeddings run through block 0, first 32 positions of samples 0, 1.
    let mut inputs = Vec::new();
    for s in 0..2 {
        let w = &toks[s * 64..s * 64 + 32];
        let mut x = vec![0.0f32; w.len() * d];
        for (&t, xt) in w.iter().zip(x.chunks_mut(d)) {
            m.embed(t, xt);
        }
        run_block(&m.layers[0], &mut x);
        inputs.extend(x);
    }
    let lookup = |p: usize, s: f64| {
        th.sites[layer][PROJ_SITE[p]]
            .threshold(&th.levels, s, Quantile::Abs)
            .map(InputMask::Threshold)
    };
    let opts = GreedyOptions {
        samples: 2,
        seq_len: 32,
        step: 0.05,
        max_sparsity: 0.9,
    };
    let steps = greedy_block(
        &c,
        &m.layers[layer],
        &inputs,
        2,
        32,
        (&cos, &sin),
        &lookup,
        &w,
        &opts,
    );
    assert_eq!(
        steps, g.layers[layer],
        "the search is deterministic given its inputs"
    );

    // A block error at sparsities `s`, computed independently with the full block prefill, as
    // TEAL's `calculate_activation_error`: per sample and channel the L2 norm over positions
    // 24..32 (the last quarter), averaged; relative to the same of the dense output.
    let block_error = |s: &[f64; 7]| -> f64 {
        let t: [Option<InputMask>; 7] = std::array::from_fn(|q| lookup(q, s[q]));
        let b = m.layers[layer].with_masks(&t);
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for smp in 0..2 {
            let mut xd = inputs[smp * 32 * d..(smp + 1) * 32 * d].to_vec();
            let mut xs = xd.clone();
            run_block(&m.layers[layer], &mut xd);
            run_block(&b, &mut xs);
            for j in 0..d {
                let col = |x: &[f32], y: Option<&[f32]>| {
                    (24..32)
                        .map(|t| (x[t * d + j] - y.map_or(0.0, |y| y[t * d + j])) as f64)
                        .map(|e| e * e)
                        .sum::<f64>()
                        .sqrt()
                };
                num += col(&xs, Some(&xd));
                den += col(&xd, None);
            }
        }
        num / den
    };
    // Each single-step candidate's error.
    let errs: Vec<f64> = (0..7)
        .map(|p| {
            let mut s = [0.0; 7];
            s[p] = 0.05 / w[p];
            block_error(&s)
        })
        .collect();
    let best = (0..7).min_by(|&a, &b| errs[a].total_cmp(&errs[b])).unwrap();
    let first = &steps[1];
    let chosen = (0..7).find(|&p| first.s[p] > 0.0).unwrap();
    assert_eq!(chosen, best, "errors per candidate: {errs:?}");
    assert!(
        (first.error - errs[best]).abs() < 1e-4 * errs[best].max(1e-6),
        "{} vs {}",
        first.error,
        errs[best]
    );
    // The search updates its state step by step (by the inputs each step zeroes); after the
    // whole search the recorded error is still the block's, up to the rounding of those
    // updates: 4e-9 relative here after 130 steps, where an update applied wrong moves it by
    // percents.
    const GREEDY_DRIFT_TOL: f64 = 1e-5;
    let last = steps.last().unwrap();
    let fresh = block_error(&last.s);
    assert!(
        (last.error - fresh).abs() < GREEDY_DRIFT_TOL * fresh,
        "last step: recorded {} vs recomputed {fresh}",
        last.error
    );
}

#[test]
fn calibration_text_too_short_is_an_error() {
    let (m, _, fp) = model();
    let opts = CalibOptions {
        weight_aware: true,
        samples: 4,
        seq_len: 64,
        greedy: None,
        fisher: None,
        text_label: "x".into(),
        text_bytes: 0,
    };
    let e = calibrate(&m, fp.clone(), &tokens(100, 1), &opts, &mut |_, _, _| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("calibration text too short"), "{e}");
    let opts = CalibOptions {
        samples: 1,
        fisher: Some(FisherOptions {
            samples: 4,
            seq_len: 64,
            labels: FisherLabels::Text,
        }),
        ..opts
    };
    let e = calibrate(&m, fp.clone(), &tokens(100, 1), &opts, &mut |_, _, _| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("4 windows of 64"), "{e}");
    // Counts whose product overflows are too many, not a panic or minutes of work.
    let huge = usize::MAX / 2;
    let e = calibrate(
        &m,
        fp.clone(),
        &tokens(100, 1),
        &CalibOptions {
            samples: huge,
            seq_len: 4,
            fisher: None,
            ..opts.clone()
        },
        &mut |_, _, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("calibration text too short"), "{e}");
    let opts_fisher_huge = CalibOptions {
        fisher: Some(FisherOptions {
            samples: huge,
            seq_len: 4,
            labels: FisherLabels::Text,
        }),
        ..opts.clone()
    };
    let e = calibrate(
        &m,
        fp.clone(),
        &tokens(100, 1),
        &opts_fisher_huge,
        &mut |_, _, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("windows of 4"), "{e}");

    // Greedy steps that would calibrate nothing (0, negative, NaN) or jump past every table.
    for step in [0.0, -0.1, f64::NAN, 5.0] {
        let opts = CalibOptions {
            fisher: None,
            greedy: Some((
                GreedyOptions {
                    samples: 1,
                    seq_len: 32,
                    step,
                    max_sparsity: 0.9,
                },
                Quantile::Abs,
            )),
            ..opts.clone()
        };
        let e = calibrate(&m, fp.clone(), &tokens(100, 1), &opts, &mut |_, _, _| {})
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("greedy step {step}: must be in (0, 1]")),
            "{e}"
        );
    }
}

/// `compare_on` (what `teal ppl --device cuda:N` runs: one decoder, masks switched per window,
/// the zeroed inputs counted through `prefill_observed`) on the CPU decoder gives the report
/// of `compare` (two models, one observed sparse pass): the same models on the same windows,
/// so the same numbers up to f64 summation order, and the same zero counts.
#[test]
fn compare_on_a_decoder_matches_compare() {
    use teal::device::Device;
    use teal::eval::perplexity::PplOptions;
    use teal::eval::sparse::{compare, compare_on};
    use teal::generate::Models;
    let (m, c, _, th) = calibrated(false);
    let t = th
        .resolve(&spec(0.5, Allocation::Uniform, Quantile::Abs))
        .unwrap();
    let sparse = m.with_masks(&t).unwrap();
    let text = tokens(3 * 40 + 1, 9);
    let opts = PplOptions {
        ctx: 40,
        chunks: Some(3),
        kv: teal::kv_cache::KvDtype::F32,
        scoring: Default::default(),
    };
    let want = compare(&c, &m, &sparse, Mode::All, &text, &opts, |_, _| {}).unwrap();
    let mut dec = Device::Cpu
        .decoder(Models::single(&sparse), opts.ctx)
        .unwrap();
    let got = compare_on(&mut *dec, &sparse, &t, &text, &opts, |_, _| {}).unwrap();
    let close = |a: f64, b: f64, what: &str| {
        assert!(
            (a - b).abs() <= 1e-9 * b.abs().max(1.0),
            "{what}: {a} vs {b}"
        )
    };
    close(got.ppl, want.ppl, "ppl");
    close(got.dense_ppl, want.dense_ppl, "dense ppl");
    close(got.kl, want.kl, "kl");
    close(got.top1, want.top1, "top1");
    close(got.model_sparsity, want.model_sparsity, "model sparsity");
    assert!(
        want.model_sparsity > 0.3,
        "sparsity {}",
        want.model_sparsity
    );
    assert_eq!(got.site_sparsity, want.site_sparsity);
    assert_eq!(
        (got.tokens_scored, got.chunks, got.mode.as_str()),
        (want.tokens_scored, want.chunks, "all")
    );
}

/// Mean NLL of `labels[t]` at position `t` of `toks` through the model's own prefill, in f64.
fn mean_nll(m: &Llama, toks: &[u32], labels: &[u32]) -> f64 {
    let v = m.config.vocab_size;
    let lg = m
        .prefill(toks, &mut m.new_cache(toks.len()), Logits::All)
        .unwrap();
    labels
        .iter()
        .enumerate()
        .map(|(t, &y)| teal::eval::perplexity::nll(&lg[t * v..(t + 1) * v], y))
        .sum::<f64>()
        / labels.len() as f64
}

#[test]
fn loss_gradients_at_projection_inputs_match_finite_differences() {
    // The text's next tokens, and tokens drawn from the model's own distribution.
    loss_gradients_match_finite_differences(FisherLabels::Text);
    loss_gradients_match_finite_differences(FisherLabels::Model { seed: 3 });
}

fn loss_gradients_match_finite_differences(labels: FisherLabels) {
    use teal::linear::Linear;
    use teal::sparsity::fisher::input_gradients;
    let (m, c, _) = model();
    let toks = tokens(24, 3);
    let mut grads: Vec<Vec<Vec<f32>>> = vec![vec![Vec::new(); 7]; c.num_hidden_layers];
    let mut inputs = grads.clone();
    let (loss, ys) = input_gradients(&m, &toks, labels, &mut |l, p, x, g| {
        inputs[l][p] = x.to_vec();
        grads[l][p] = g.to_vec();
    })
    .unwrap();
    assert_eq!(ys.len(), toks.len() - 1);
    if labels == FisherLabels::Text {
        assert_eq!(ys, toks[1..]);
    } else {
        // Drawn labels differ from the text at most positions of a random model.
        assert!(ys.iter().zip(&toks[1..]).filter(|(a, b)| a != b).count() > ys.len() / 2);
    }
    assert!(
        (loss - mean_nll(&m, &toks, &ys)).abs() < 1e-5 * loss,
        "{loss}"
    );
    // The inputs passed along are those the model's own prefill feeds each projection.
    struct Sites(Vec<[Vec<f32>; 4]>);
    impl teal::models::llama::Observer for Sites {
        fn observe(&mut self, l: usize, site: teal::models::llama::Site, rows: &[f32], _: usize) {
            let i = teal::models::llama::Site::ALL
                .iter()
                .position(|&s| s == site)
                .unwrap();
            self.0[l][i] = rows.to_vec();
        }
    }
    let mut sites = Sites(vec![Default::default(); c.num_hidden_layers]);
    m.prefill_observed(&toks, &mut m.new_cache(24), Logits::Last, Some(&mut sites))
        .unwrap();
    for (l, (got, want)) in inputs.iter().zip(&sites.0).enumerate() {
        for p in 0..7 {
            let want = &want[PROJ_SITE[p]];
            let err = got[p]
                .iter()
                .zip(want)
                .map(|(a, b)| (a - b).abs() / (1.0 + b.abs()))
                .fold(0.0f32, f32::max);
            assert!(
                got[p].len() == want.len() && err < 1e-4,
                "layer {l} proj {p}: {err}"
            );
        }
    }
    // Adding eps * W[:, j] to projection p's output at every position is adding eps to its
    // input j alone, so the loss changes by eps * sum_t dL/dx_tj.
    const FD_ABS: f64 = 2e-4;
    const FD_REL: f64 = 2e-3;
    let eps = 1e-2f32;
    let mut checked = 0;
    for l in 0..c.num_hidden_layers {
        for p in 0..7 {
            let lin = m.layers[l].linears()[p].1.clone();
            let wt = lin.input_major();
            let g = &grads[l][p];
            for j in [0, lin.in_dim / 2, lin.in_dim - 1] {
                let analytic: f64 = g.chunks(lin.in_dim).map(|r| r[j] as f64).sum();
                let shifted = |sign: f32| {
                    let col = &wt[j * lin.out_dim..(j + 1) * lin.out_dim];
                    let bias: Vec<f32> = (0..lin.out_dim)
                        .map(|o| lin.bias().map_or(0.0, |b| b[o]) + sign * eps * col[o])
                        .collect();
                    let new = Linear::from_input_major_as(
                        teal::Dtype::F32,
                        "w",
                        lin.in_dim,
                        lin.out_dim,
                        wt.clone(),
                        Some(bias),
                    )
                    .unwrap();
                    let mut layers = m.layers.clone();
                    let b = &mut layers[l];
                    *[
                        &mut b.q_proj,
                        &mut b.k_proj,
                        &mut b.v_proj,
                        &mut b.o_proj,
                        &mut b.gate_proj,
                        &mut b.up_proj,
                        &mut b.down_proj,
                    ][p] = new;
                    let mm = m.with_weights(
                        m.embed_tokens.clone(),
                        layers,
                        m.norm.clone(),
                        m.lm_head.clone(),
                    );
                    mean_nll(&mm, &toks, &ys)
                };
                let fd = (shifted(1.0) - shifted(-1.0)) / (2.0 * eps as f64);
                // The f32 loss carries ~1e-6 of rounding, 5e-5 over 2 eps; eps^2 curvature is
                // well under 1e-3 of the gradient at these sizes.
                let excess = (fd - analytic).abs() - (FD_ABS + FD_REL * analytic.abs());
                assert!(
                    excess <= 0.0,
                    "layer {l} proj {p} channel {j}: analytic {analytic:e}, finite differences {fd:e}"
                );
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 3 * 7 * c.num_hidden_layers);
}

#[test]
fn fisher_allocation_hits_the_target_over_the_whole_model() {
    let (m, c, _, th) = calibrated(false);
    let f = th.fisher.as_ref().unwrap();
    assert_eq!(f.weights.len(), c.num_hidden_layers);
    assert!(th
        .resolve(&spec(0.0, Allocation::Fisher, Quantile::Abs))
        .unwrap()
        .iter()
        .flatten()
        .all(|x| x.is_none()));
    // It picks the inputs itself: TEAL's and the weight-aware quantiles are refused by name.
    for q in [Quantile::Teal, Quantile::Wina] {
        let e = th
            .resolve(&spec(0.5, Allocation::Fisher, q))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("the {} quantile does not apply", q.name())),
            "{e}"
        );
    }
    let sizes = size_weights(&c);
    let toks = tokens(3 * 64, 5);
    for s in [0.25, 0.5, 0.75] {
        let sp = spec(s, Allocation::Fisher, Quantile::Abs);
        let sparse = m.with_masks(&th.resolve(&sp).unwrap()).unwrap();
        let planned = th.allocate(&sp).unwrap();
        // Zeros the masks would make on the dense model's activations of the calibration
        // windows, the statistics the one global threshold was placed on.
        struct Count<'a>(&'a Llama, Vec<[(usize, usize); 7]>);
        impl teal::models::llama::Observer for Count<'_> {
            fn observe(
                &mut self,
                l: usize,
                site: teal::models::llama::Site,
                rows: &[f32],
                _: usize,
            ) {
                let si = teal::models::llama::Site::ALL
                    .iter()
                    .position(|&x| x == site)
                    .unwrap();
                for p in (0..7).filter(|&p| PROJ_SITE[p] == si) {
                    let z = self.0.layers[l].linears()[p].1.count_zeroed(rows);
                    self.1[l][p].0 += z;
                    self.1[l][p].1 += rows.len();
                }
            }
        }
        let mut count = Count(&sparse, vec![[(0, 0); 7]; c.num_hidden_layers]);
        for w in toks.chunks(64) {
            m.prefill_observed(w, &mut m.new_cache(64), Logits::Last, Some(&mut count))
                .unwrap();
        }
        let realized: Vec<[f64; 7]> = count
            .1
            .iter()
            .map(|r| std::array::from_fn(|p| r[p].0 as f64 / r[p].1 as f64))
            .collect();
        let model_wide = realized
            .iter()
            .map(|r| effective_sparsity(r, &sizes))
            .sum::<f64>()
            / realized.len() as f64;
        // Exact score quantiles at levels 0.005 apart, read between levels: the per-projection
        // fractions are exact within one level spacing, the model-wide one within less.
        assert!(
            (model_wide - s).abs() < 0.005,
            "s={s}: realized {model_wide}"
        );
        for (l, (r, p)) in realized.iter().zip(&planned).enumerate() {
            for q in 0..7 {
                assert!(
                    (r[q] - p[q]).abs() < 0.01,
                    "s={s} layer {l} proj {q}: {} vs {}",
                    r[q],
                    p[q]
                );
            }
        }
        // The allocation is not uniform: it follows the loss gradients.
        let spread = planned
            .iter()
            .flatten()
            .fold((1.0f64, 0.0f64), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        assert!(spread.1 - spread.0 > 0.1, "s={s}: {spread:?}");
    }
    // A table of the wrong width (a damaged file of the right model) is an error, not a panic.
    let mut masks = th
        .resolve(&spec(0.5, Allocation::Fisher, Quantile::Abs))
        .unwrap();
    masks[1][6] = Some(InputMask::Channels(std::sync::Arc::new(vec![0.1; 5])));
    let e = match m.with_masks(&masks) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a mask of the wrong width was accepted"),
    };
    assert!(
        e.contains("layer 1 down_proj: 5 per-channel thresholds"),
        "{e}"
    );
    let mut plain = th.clone();
    plain.fisher = None;
    let e = plain
        .resolve(&spec(0.5, Allocation::Fisher, Quantile::Abs))
        .unwrap_err()
        .to_string();
    assert!(e.contains("--fisher"), "{e}");
}

#[test]
fn fisher_reading_picks_the_inputs_within_any_allocation() {
    let (m, _, fp, th) = calibrated(true);
    let f = th.fisher.as_ref().unwrap();
    // Greedy's sparsities with the loss-aware choice of inputs: per-channel thresholds t / w_j,
    // t the projection's score quantile at greedy's sparsity.
    let sp = spec(0.5, Allocation::Greedy, Quantile::Fisher);
    let alloc = th.allocate(&sp).unwrap();
    let masks = th.resolve(&sp).unwrap();
    let mut differ = 0;
    for (l, row) in masks.iter().enumerate() {
        for p in 0..7 {
            match &row[p] {
                None => assert_eq!(alloc[l][p], 0.0, "layer {l} proj {p}"),
                Some(InputMask::Channels(t)) => {
                    assert_eq!(t.len(), f.weights[l][p].len());
                    let thr = t
                        .iter()
                        .zip(&f.weights[l][p])
                        .find(|(_, &w)| w > 0.0)
                        .unwrap();
                    let score = thr.0 * thr.1;
                    for (tj, &wj) in t.iter().zip(&f.weights[l][p]) {
                        if wj > 0.0 {
                            assert!(
                                (tj * wj - score).abs() <= 1e-5 * score,
                                "layer {l} proj {p}"
                            );
                        }
                    }
                    let abs = th.mask(l, p, alloc[l][p], Quantile::Abs);
                    differ += usize::from(abs != row[p]);
                }
                Some(other) => panic!("layer {l} proj {p}: {other:?}"),
            }
        }
    }
    assert!(differ > 0);
    m.with_masks(&masks).unwrap();

    // Without fisher tables the reading is an error naming the missing step.
    let mut plain = th.clone();
    plain.fisher = None;
    let e = plain.resolve(&sp).unwrap_err().to_string();
    assert!(e.contains("--fisher"), "{e}");

    // The greedy search over loss-aware masks needs the gradients, and records its reading.
    let (m2, _, _) = model();
    let mut opts = CalibOptions {
        weight_aware: false,
        samples: 3,
        seq_len: 64,
        greedy: Some((
            GreedyOptions {
                samples: 2,
                seq_len: 32,
                step: 0.05,
                max_sparsity: 0.9,
            },
            Quantile::Fisher,
        )),
        fisher: None,
        text_label: "random".into(),
        text_bytes: 0,
    };
    let toks = tokens(3 * 64, 5);
    let e = calibrate(&m2, fp.clone(), &toks, &opts, &mut |_, _, _| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("--fisher"), "{e}");
    opts.fisher = Some(FisherOptions {
        samples: 2,
        seq_len: 64,
        labels: FisherLabels::Model { seed: 1 },
    });
    let searched = calibrate(&m2, fp, &toks, &opts, &mut |_, _, _| {}).unwrap();
    let g = searched.greedy.as_ref().unwrap();
    assert_eq!(g.quantile, Quantile::Fisher);
    let sp = spec(0.5, Allocation::Greedy, Quantile::Fisher);
    let masks = searched.resolve(&sp).unwrap();
    assert!(masks
        .iter()
        .flatten()
        .flatten()
        .all(|x| matches!(x, InputMask::Channels(_))));
    // The search's steps reach the target: the planned model-wide sparsity is near 0.5.
    let planned = searched.planned_sparsity(&sp, &m2.config).unwrap();
    assert!((planned - 0.5).abs() < 0.03, "planned {planned}");
}

/// The modes score what ran sparse, as TEAL's evaluation does: `half` only the predictions of
/// the window's last `len / 2` positions (TEAL sparsifies them and scores within them), so its
/// KL per token is not diluted by the dense half's zeros; `decode-only` all but position 0's.
#[test]
fn modes_score_only_the_positions_that_ran_sparse() {
    use teal::eval::perplexity::PplOptions;
    use teal::eval::sparse::compare;
    let (m, c, _, th) = calibrated(false);
    let t = th
        .resolve(&spec(0.5, Allocation::Uniform, Quantile::Abs))
        .unwrap();
    let sparse = m.with_masks(&t).unwrap();
    let text = tokens(2 * 41 + 1, 9);
    let opts = PplOptions {
        ctx: 41,
        chunks: Some(2),
        kv: teal::kv_cache::KvDtype::F32,
        scoring: Default::default(),
    };
    let run = |mode| compare(&c, &m, &sparse, mode, &text, &opts, |_, _| {}).unwrap();
    let (all, half, dec) = (run(Mode::All), run(Mode::Half), run(Mode::DecodeOnly));
    assert_eq!(all.tokens_scored, 2 * 40);
    // 41 positions: 0..21 dense, 21..41 sparse (20 = 41 / 2), whose predictions are tokens 22..=40.
    assert_eq!(half.tokens_scored, 2 * 19);
    assert_eq!(dec.tokens_scored, 2 * 39);
    assert!(half.kl > 0.0 && all.kl > 0.0);
    assert_eq!(
        (half.mode.as_str(), dec.mode.as_str()),
        ("half", "decode-only")
    );
    // Windows too short for a mode to score any token: an error, not a PPL of NaN.
    let short = PplOptions {
        ctx: 3,
        chunks: Some(1),
        ..opts
    };
    let e = compare(&c, &m, &sparse, Mode::Half, &text, &short, |_, _| {})
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("mode half with windows of 3 tokens scores no token"),
        "{e}"
    );
}

/// Hand-edited greedy and fisher tables that would run a silently wrong allocation are refused
/// at load, naming what is wrong; a target beyond the file's highest level is an error, not
/// that level.
#[test]
fn greedy_and_fisher_tables_that_do_not_fit_are_refused() {
    let (_, _, _, th) = calibrated(true);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.json");
    th.save(&p).unwrap();
    Thresholds::load(&p).unwrap();
    type Edit = (fn(&mut Thresholds), &'static str);
    let edits: [Edit; 7] = [
        (
            |t| t.greedy.as_mut().unwrap().layers[1][3].s[2] = 5.0,
            "greedy tables: layer 1 step 3: a sparsity outside [0, 1)",
        ),
        (
            |t| t.greedy.as_mut().unwrap().layers[0][2].sparsity = -1.0,
            "greedy tables: layer 0 step 2: a sparsity outside [0, 1)",
        ),
        (
            |t| t.greedy.as_mut().unwrap().size_weights[6] = 0.0,
            "greedy tables: size weights",
        ),
        (
            |t| t.fisher.as_mut().unwrap().size_weights[1] = 0.5,
            "fisher tables: size weights",
        ),
        (
            |t| t.fisher.as_mut().unwrap().size_weights[4] = -1.0,
            "fisher tables: size weights",
        ),
        (
            |t| t.fisher.as_mut().unwrap().weights[2][0].push(1.0),
            "fisher tables: layer 2 projection 0 has 49 channel weights, its input has 48",
        ),
        (
            |t| {
                let w = &mut t.fisher.as_mut().unwrap().weights[1][6];
                w.iter_mut().for_each(|x| *x = 0.0)
            },
            "fisher tables: layer 1 projection 6: every channel weight is 0",
        ),
    ];
    for (edit, want) in edits {
        let mut bad = th.clone();
        edit(&mut bad);
        bad.save(&p).unwrap();
        let e = Thresholds::load(&p).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }
    let top = *th.levels.last().unwrap();
    let e = th
        .resolve(&spec((top + 1.0) / 2.0, Allocation::Uniform, Quantile::Abs))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("beyond this thresholds file's highest calibrated level"),
        "{e}"
    );
}
