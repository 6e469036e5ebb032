//! Experiment (docs/QUALITY.md, "rotation"): uniform TEAL at one sparsity, with and without a
//! rotation of the residual stream into the principal axes of its normalized activations.
//!
//!     rotate_eval MODEL SPARSITY CALIB_SAMPLES CALIB_LEN WINDOWS
use teal::eval::perplexity::PplOptions;
use teal::eval::sparse::compare;
use teal::load::ModelFiles;
use teal::sparsity::calibrate::{calibrate, CalibOptions};
use teal::sparsity::thresholds::Fingerprint;
use teal::sparsity::{Allocation, Mode, Quantile, SparsitySpec};

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
        samples: n,
        seq_len: len,
        greedy: None,
        weight_aware: false,
        fisher: None,
        text_label: "c4".into(),
        text_bytes: c4.len(),
    };
    let ppl = PplOptions {
        ctx: 512,
        chunks: Some(wins),
        kv: teal::kv_cache::KvDtype::F32,
        scoring: Default::default(),
    };
    let t0 = std::time::Instant::now();
    let q = rotate::principal_basis(&model, &ctoks, n, len).unwrap();
    let rot = rotate::rotate(&model, &q).unwrap();
    eprintln!("rotation built in {:.1}s", t0.elapsed().as_secs_f64());
    let r = compare(
        &files.config,
        &model,
        &rot,
        Mode::All,
        &wtoks,
        &ppl,
        |_, _| {},
    )
    .unwrap();
    println!(
        "rotated dense vs dense: ratio x{:.6} kl {:.2e} top1 {:.4}",
        r.ppl_ratio, r.kl, r.top1
    );
    for (name, m) in [("identity", &model), ("principal", &rot)] {
        let th = calibrate(m, fp.clone(), &ctoks, &opts, &mut |_, _, _| {}).unwrap();
        for quant in [Quantile::Teal, Quantile::Abs] {
            let spec = SparsitySpec {
                target: s,
                allocation: Allocation::Uniform,
                quantile: quant,
                mode: Mode::All,
            };
            let sm = m.with_masks(&th.resolve(&spec).unwrap()).unwrap();
            let r = compare(
                &files.config,
                &model,
                &sm,
                Mode::All,
                &wtoks,
                &ppl,
                |_, _| {},
            )
            .unwrap();
            println!(
                "{name:10} {:?} s={s} dense {:.4} sparse {:.4} ratio x{:.4} kl {:.4} top1 {:.4} realized {:.4}",
                quant, r.dense_ppl, r.ppl, r.ppl_ratio, r.kl, r.top1, r.model_sparsity
            );
        }
    }
}

mod rotate {
    // Rotation before sparsification: the residual stream is expressed in another orthonormal
    // basis `Q` (the principal axes of the normalized inputs of q/k/v and gate/up, pooled over all
    // layers), folded into the weights so the rotated model computes the same function with no
    // extra work per token. TEAL then thresholds `Q^T x` instead of `x`: in the principal basis the
    // energy of each input sits in fewer coordinates, so zeroing the small ones loses less of it
    // (the idea of rotated sparse activations, e.g. LaRoSa, with one global basis instead of one per
    // layer, so no residual adapters are needed).
    //
    // With `h' = Q^T h` for every residual-stream vector:
    // - each RMSNorm weight `g` is first folded into the projections that read it
    //   (`W <- W diag(g)`, `g <- 1`), since an unweighted RMSNorm commutes with a rotation;
    // - readers (q/k/v, gate/up, LM head) take `W Q`; writers (o, down) give `Q^T W`; the token
    //   embedding rows become `Q^T e` (the LM head is then no longer the embedding: the model is
    //   untied);
    // - the inputs of o_proj and down_proj are not on the residual stream and stay as they are.

    use teal::error::{Error, Result};
    use teal::linear::{Dense, Linear};
    use teal::models::llama::{Block, Llama, Logits, Observer, Site};
    use teal_kernels::cpu::matmul_t;

    /// `model` with every RMSNorm weight folded into the projections that read it (all norm
    /// weights become 1); computes the same function.
    pub fn fold_norms(model: &Llama) -> Result<Llama> {
        let ones = vec![1.0f32; model.config.hidden_size];
        let layers = model
            .layers
            .iter()
            .enumerate()
            .map(|(l, b)| {
                let (g1, g2) = (&b.input_layernorm, &b.post_attention_layernorm);
                let name = |p: &str| format!("model.layers.{l}.{p}.weight");
                Ok(Block {
                    input_layernorm: ones.clone(),
                    q_proj: scale_inputs(&b.q_proj, g1, &name("self_attn.q_proj"))?,
                    k_proj: scale_inputs(&b.k_proj, g1, &name("self_attn.k_proj"))?,
                    v_proj: scale_inputs(&b.v_proj, g1, &name("self_attn.v_proj"))?,
                    post_attention_layernorm: ones.clone(),
                    gate_proj: scale_inputs(&b.gate_proj, g2, &name("mlp.gate_proj"))?,
                    up_proj: scale_inputs(&b.up_proj, g2, &name("mlp.up_proj"))?,
                    ..b.clone()
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut head = dense_rows(&model.lm_head);
        for row in head.chunks_mut(model.config.hidden_size) {
            row.iter_mut().zip(&model.norm).for_each(|(v, g)| *v *= g);
        }
        let lm_head = Dense::from_rows_as(
            model.lm_head.dtype(),
            "lm_head.weight",
            model.lm_head.out_dim,
            model.lm_head.in_dim,
            head,
        )?;
        Ok(model.with_weights(model.embed_tokens.clone(), layers, ones, lm_head))
    }

    /// `model` (any norm weights) in the basis `q` (`[d, d]` row-major, orthonormal columns):
    /// the norms are folded first, then every residual-stream reader and writer is rotated.
    pub fn rotate(model: &Llama, q: &[f32]) -> Result<Llama> {
        let d = model.config.hidden_size;
        check_basis(q, d)?;
        let folded = fold_norms(model)?;
        let qt = transpose(q, d, d);
        let layers = folded
            .layers
            .iter()
            .enumerate()
            .map(|(l, b)| {
                let name = |p: &str| format!("model.layers.{l}.{p}.weight");
                Ok(Block {
                    q_proj: rotate_inputs(&b.q_proj, &qt, &name("self_attn.q_proj"))?,
                    k_proj: rotate_inputs(&b.k_proj, &qt, &name("self_attn.k_proj"))?,
                    v_proj: rotate_inputs(&b.v_proj, &qt, &name("self_attn.v_proj"))?,
                    o_proj: rotate_outputs(&b.o_proj, q, &name("self_attn.o_proj"))?,
                    gate_proj: rotate_inputs(&b.gate_proj, &qt, &name("mlp.gate_proj"))?,
                    up_proj: rotate_inputs(&b.up_proj, &qt, &name("mlp.up_proj"))?,
                    down_proj: rotate_outputs(&b.down_proj, q, &name("mlp.down_proj"))?,
                    ..b.clone()
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // Head rows w -> Q^T w (W Q) and embedding rows e -> Q^T e (E Q).
        let lm_head = dense_times(&folded.lm_head, q, "lm_head.weight")?;
        let embed = dense_times(&folded.embed_tokens, q, "model.embed_tokens.weight")?;
        Ok(folded.with_weights(embed, layers, folded.norm.clone(), lm_head))
    }

    /// The principal axes (eigenvectors of the second-moment matrix, by decreasing eigenvalue) of
    /// the normalized inputs of q/k/v and gate/up over every layer, measured on `samples` windows
    /// of `seq_len` tokens: `[d, d]` row-major, one axis per column.
    pub fn principal_basis(
        model: &Llama,
        tokens: &[u32],
        samples: usize,
        seq_len: usize,
    ) -> Result<Vec<f32>> {
        let d = model.config.hidden_size;
        if samples == 0 || tokens.len() < samples * seq_len {
            return Err(Error::Invalid(format!(
                "the rotation needs {samples} x {seq_len} tokens, the text has {}",
                tokens.len()
            )));
        }
        let folded = fold_norms(model)?;
        let mut acc = SecondMoment {
            d,
            sum: vec![0.0; d * d],
            rows: 0,
        };
        let mut cache = folded.new_cache(seq_len);
        for w in tokens.chunks_exact(seq_len).take(samples) {
            cache.clear();
            folded.prefill_observed(w, &mut cache, Logits::Last, Some(&mut acc))?;
        }
        let m = nalgebra::DMatrix::from_row_slice(d, d, &acc.sum);
        let eig = nalgebra::SymmetricEigen::new(m);
        if eig.eigenvalues.iter().any(|v| !v.is_finite()) {
            return Err(Error::Invalid(
                "rotation: non-finite second moments of the activations".into(),
            ));
        }
        let mut order: Vec<usize> = (0..d).collect();
        order.sort_by(|&a, &b| eig.eigenvalues[b].total_cmp(&eig.eigenvalues[a]));
        let mut q = vec![0.0f32; d * d];
        for (i, &k) in order.iter().enumerate() {
            for j in 0..d {
                q[j * d + i] = eig.eigenvectors[(j, k)] as f32;
            }
        }
        Ok(q)
    }

    /// Sums `x x^T` over the rows seen at the residual-stream sites (q/k/v and gate/up inputs).
    struct SecondMoment {
        d: usize,
        sum: Vec<f64>,
        rows: usize,
    }

    impl Observer for SecondMoment {
        fn observe(&mut self, _layer: usize, site: Site, rows: &[f32], width: usize) {
            if !matches!(site, Site::Qkv | Site::GateUp) || width != self.d {
                return;
            }
            let n = rows.len() / width;
            let xt = transpose(rows, n, width);
            let mut m = vec![0.0f32; width * width];
            matmul_t(&xt, width, rows, n, width, &mut m);
            for (s, v) in self.sum.iter_mut().zip(&m) {
                *s += *v as f64;
            }
            self.rows += n;
        }
    }

    fn check_basis(q: &[f32], d: usize) -> Result<()> {
        if q.len() != d * d {
            return Err(Error::Invalid(format!(
                "rotation: a basis of {} values for hidden size {d} (needs {})",
                q.len(),
                d * d
            )));
        }
        let qt = transpose(q, d, d);
        let mut p = vec![0.0f32; d * d];
        matmul_t(&qt, d, q, d, d, &mut p);
        let err = p
            .iter()
            .enumerate()
            .map(|(k, &v)| (v - if k / d == k % d { 1.0 } else { 0.0 }).abs())
            .fold(0.0f32, f32::max);
        // f32 products of unit vectors of a few hundred entries: ~1e-6; anything near 1e-3 is not
        // a rotation.
        if err > 1e-3 {
            return Err(Error::Invalid(format!(
                "rotation: the basis is not orthonormal (max |Q^T Q - I| = {err:.2e})"
            )));
        }
        Ok(())
    }

    /// `W diag(g)`.
    /// Every row of an output-major layer, as f32.
    fn dense_rows(l: &Dense) -> Vec<f32> {
        let mut w = vec![0.0f32; l.out_dim * l.in_dim];
        for (o, row) in w.chunks_mut(l.in_dim).enumerate() {
            l.row(o, row);
        }
        w
    }

    /// `W Q` for an output-major layer (its rows times `Q`).
    fn dense_times(l: &Dense, q: &[f32], name: &str) -> Result<Dense> {
        let (o, i) = (l.out_dim, l.in_dim);
        let mut w = vec![0.0f32; o * i];
        matmul_t(&dense_rows(l), o, q, i, i, &mut w);
        Dense::from_rows_as(l.dtype(), name, o, i, w)
    }

    fn scale_inputs(l: &Linear, g: &[f32], name: &str) -> Result<Linear> {
        let mut wt = l.input_major();
        for (row, &gj) in wt.chunks_mut(l.out_dim).zip(g) {
            row.iter_mut().for_each(|v| *v *= gj);
        }
        rebuilt(l, name, wt)
    }

    /// `W Q` (input-major: `Q^T Wt`); `qt` is `Q^T`.
    fn rotate_inputs(l: &Linear, qt: &[f32], name: &str) -> Result<Linear> {
        let (i, o) = (l.in_dim, l.out_dim);
        let mut wt = vec![0.0f32; i * o];
        matmul_t(qt, i, &l.input_major(), i, o, &mut wt);
        rebuilt(l, name, wt)
    }

    /// `Q^T W` (input-major: `Wt Q`).
    fn rotate_outputs(l: &Linear, q: &[f32], name: &str) -> Result<Linear> {
        let (i, o) = (l.in_dim, l.out_dim);
        let mut wt = vec![0.0f32; i * o];
        matmul_t(&l.input_major(), i, q, o, o, &mut wt);
        rebuilt(l, name, wt)
    }

    fn rebuilt(l: &Linear, name: &str, wt: Vec<f32>) -> Result<Linear> {
        Linear::from_input_major_as(
            l.dtype(),
            name,
            l.in_dim,
            l.out_dim,
            wt,
            l.bias().map(<[f32]>::to_vec),
        )
    }

    fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        let mut t = vec![0.0f32; a.len()];
        for r in 0..rows {
            for c in 0..cols {
                t[c * rows + r] = a[r * cols + c];
            }
        }
        t
    }
}
