//! Golden tests on a tiny random model written by the test itself: GGUF and safetensors load to
//! identical logits, the engine matches a naive forward pass written here from the definitions,
//! and prefill, chunked prefill and decode agree.

mod common;
use common::*;
use teal::config::{Arch, Config};
use teal::gguf::GgufFile;
use teal::loader::{GgufSource, SafetensorsSource, TensorSource};
use teal::models::llama::{DecodeScratch, Llama, Logits};
use teal_kernels::packed::Dtype;

/// Differences between two float paths computing the same sums in a different order, on logits of
/// size ~10: measured around 1e-6; 1e-4 leaves room and still catches any real error.
const LOGIT_TOL: f32 = 1e-4;

const TOKENS: [u32; 11] = [1, 5, 96, 17, 17, 0, 42, 63, 8, 2, 77];

/// The tiny model of `arch` written as `tiny.gguf` and as a Hugging Face directory `hf`.
fn write_both(arch: Arch) -> (tempfile::TempDir, Weights, Config) {
    let c = tiny_config(arch);
    let w = random_weights(&c, 7);
    let dir = tempfile::tempdir().unwrap();
    write_gguf(&dir.path().join("tiny.gguf"), &c, &w);
    write_safetensors(&dir.path().join("hf"), &c, &w);
    (dir, w, c)
}

fn load_both(arch: Arch) -> (Llama, Llama, Weights, Config) {
    let (dir, w, c) = write_both(arch);
    let g = GgufFile::open(&dir.path().join("tiny.gguf")).unwrap();
    let gc = Config::from_gguf(&g).unwrap();
    assert_eq!(gc, c, "config read back from GGUF metadata");
    let m_gguf = Llama::load(gc.clone(), &GgufSource::new(g, gc)).unwrap();
    let hc = Config::from_hf_json(&dir.path().join("hf/config.json")).unwrap();
    assert_eq!(hc, c, "config read back from config.json");
    let m_st = Llama::load(
        hc,
        &SafetensorsSource::open(&dir.path().join("hf")).unwrap(),
    )
    .unwrap();
    (m_gguf, m_st, w, c)
}

fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * y.abs().max(1.0),
            "{what}: index {i}: {x} vs {y}"
        );
    }
}

#[test]
fn gguf_and_safetensors_give_identical_logits() {
    for arch in [Arch::Llama, Arch::Qwen2] {
        let (a, b, _, c) = load_both(arch);
        let la = a
            .prefill(&TOKENS, &mut a.new_cache(32), Logits::All)
            .unwrap();
        let lb = b
            .prefill(&TOKENS, &mut b.new_cache(32), Logits::All)
            .unwrap();
        assert_eq!(la.len(), TOKENS.len() * c.vocab_size);
        assert_eq!(
            la, lb,
            "{arch:?}: GGUF and safetensors logits must be bit-identical"
        );
    }
}

/// A naive forward pass straight from the definitions, on the Hugging Face layout: y = W x.
fn naive_forward(c: &Config, w: &Weights, tokens: &[u32]) -> Vec<f32> {
    let get = |n: &str| &w[n].1;
    let (d, hd, nh, nkv) = (
        c.hidden_size,
        c.head_dim,
        c.num_attention_heads,
        c.num_key_value_heads,
    );
    let matvec = |m: &[f32], x: &[f32], out: usize| -> Vec<f32> {
        (0..out)
            .map(|o| (0..x.len()).map(|i| m[o * x.len() + i] * x[i]).sum())
            .collect()
    };
    let rms = |x: &[f32], g: &[f32]| -> Vec<f32> {
        let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
        x.iter()
            .zip(g)
            .map(|(v, g)| v / (ms + c.rms_norm_eps).sqrt() * g)
            .collect()
    };
    let rope = |v: &mut [f32], pos: usize| {
        for h in v.chunks_mut(hd) {
            let orig = h.to_vec();
            for i in 0..hd / 2 {
                let th = pos as f32 / c.rope_theta.powf(2.0 * i as f32 / hd as f32);
                h[i] = orig[i] * th.cos() - orig[i + hd / 2] * th.sin();
                h[i + hd / 2] = orig[i + hd / 2] * th.cos() + orig[i] * th.sin();
            }
        }
    };
    let add_bias = |v: &mut Vec<f32>, n: &str| {
        if let Some((_, b)) = w.get(n) {
            v.iter_mut().zip(b).for_each(|(x, b)| *x += b);
        }
    };
    let mut xs: Vec<Vec<f32>> = tokens
        .iter()
        .map(|&t| get("model.embed_tokens.weight")[t as usize * d..(t as usize + 1) * d].to_vec())
        .collect();
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        let (mut ks, mut vs, mut qs) = (vec![], vec![], vec![]);
        for (pos, x) in xs.iter().enumerate() {
            let h = rms(x, get(&format!("{p}.input_layernorm.weight")));
            let mut q = matvec(get(&format!("{p}.self_attn.q_proj.weight")), &h, nh * hd);
            let mut k = matvec(get(&format!("{p}.self_attn.k_proj.weight")), &h, nkv * hd);
            let mut v = matvec(get(&format!("{p}.self_attn.v_proj.weight")), &h, nkv * hd);
            add_bias(&mut q, &format!("{p}.self_attn.q_proj.bias"));
            add_bias(&mut k, &format!("{p}.self_attn.k_proj.bias"));
            add_bias(&mut v, &format!("{p}.self_attn.v_proj.bias"));
            rope(&mut q, pos);
            rope(&mut k, pos);
            qs.push(q);
            ks.push(k);
            vs.push(v);
        }
        for t in 0..xs.len() {
            let mut att = vec![0.0f32; nh * hd];
            for h in 0..nh {
                let kh = h / (nh / nkv);
                let q = &qs[t][h * hd..(h + 1) * hd];
                let s: Vec<f32> = (0..=t)
                    .map(|p| {
                        q.iter()
                            .zip(&ks[p][kh * hd..(kh + 1) * hd])
                            .map(|(a, b)| a * b)
                            .sum::<f32>()
                            / (hd as f32).sqrt()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f32::MIN, f32::max);
                let e: Vec<f32> = s.iter().map(|v| (v - m).exp()).collect();
                let z: f32 = e.iter().sum();
                for p in 0..=t {
                    for i in 0..hd {
                        att[h * hd + i] += e[p] / z * vs[p][kh * hd + i];
                    }
                }
            }
            let o = matvec(get(&format!("{p}.self_attn.o_proj.weight")), &att, d);
            xs[t].iter_mut().zip(&o).for_each(|(x, o)| *x += o);
            let h = rms(&xs[t], get(&format!("{p}.post_attention_layernorm.weight")));
            let g = matvec(
                get(&format!("{p}.mlp.gate_proj.weight")),
                &h,
                c.intermediate_size,
            );
            let u = matvec(
                get(&format!("{p}.mlp.up_proj.weight")),
                &h,
                c.intermediate_size,
            );
            let a: Vec<f32> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let dn = matvec(get(&format!("{p}.mlp.down_proj.weight")), &a, d);
            xs[t].iter_mut().zip(&dn).for_each(|(x, o)| *x += o);
        }
    }
    let head = w
        .get("lm_head.weight")
        .unwrap_or(&w["model.embed_tokens.weight"])
        .1
        .clone();
    xs.iter()
        .flat_map(|x| matvec(&head, &rms(x, get("model.norm.weight")), c.vocab_size))
        .collect()
}

#[test]
fn engine_matches_naive_forward() {
    for arch in [Arch::Llama, Arch::Qwen2] {
        let (m, _, w, c) = load_both(arch);
        let got = m
            .prefill(&TOKENS, &mut m.new_cache(32), Logits::All)
            .unwrap();
        let want = naive_forward(&c, &w, &TOKENS);
        assert_close(
            &got,
            &want,
            LOGIT_TOL,
            &format!("{arch:?} prefill vs naive"),
        );
    }
}

/// With either KV cache type, one prefill, prefill + decode and two prefill chunks give the
/// same logits: with f16 (`--kv-dtype f16`, the CLI's default on the CPU) prefill stores its
/// keys and values rounded before its own attention reads them, as decode does.
#[test]
fn decode_and_chunked_prefill_match_full_prefill() {
    use teal::kv_cache::KvDtype;
    let (m, _, _, c) = load_both(Arch::Llama);
    let v = c.vocab_size;
    for kv in [KvDtype::F32, KvDtype::F16] {
        let kvn = kv.name();
        let full = m
            .prefill(&TOKENS, &mut m.new_cache_as(32, kv), Logits::All)
            .unwrap();

        // Prefill 4 tokens, then decode the rest one by one.
        let mut cache = m.new_cache_as(32, kv);
        assert_eq!(cache.dtype(), kv);
        let mut scratch = DecodeScratch::new(&c, 32);
        let first = m.prefill(&TOKENS[..4], &mut cache, Logits::Last).unwrap();
        assert_close(
            &first,
            &full[3 * v..4 * v],
            LOGIT_TOL,
            &format!("{kvn}: prefill last"),
        );
        for (i, &t) in TOKENS.iter().enumerate().skip(4) {
            let l = m.decode(t, &mut cache, &mut scratch).unwrap();
            assert_close(
                l,
                &full[i * v..(i + 1) * v],
                LOGIT_TOL,
                &format!("{kvn}: decode at {i}"),
            );
        }

        // Two prefill chunks.
        let mut cache = m.new_cache_as(32, kv);
        m.prefill(&TOKENS[..5], &mut cache, Logits::Last).unwrap();
        let rest = m.prefill(&TOKENS[5..], &mut cache, Logits::All).unwrap();
        assert_close(
            &rest,
            &full[5 * v..],
            LOGIT_TOL,
            &format!("{kvn}: chunked prefill"),
        );
    }
}

/// Decode steps of three sequences run together (`decode_each` over CPU decoders,
/// `Llama::decode_lockstep` beneath: the rows of one batch through each layer) give the logits
/// of each decoded alone, up to the order of float sums, in f32, f16, bf16 and q8 (which
/// runs its rows one after another at this size); a step that cannot run (its cache full)
/// fails alone and leaves the others running.
#[test]
fn decode_steps_together_equal_each_alone() {
    let (dir, _, c) = write_both(Arch::Llama);
    for dtype in [Dtype::F32, Dtype::F16, Dtype::Bf16, Dtype::Q8] {
        let g = GgufFile::open(&dir.path().join("tiny.gguf")).unwrap();
        let m = Llama::load_as(c.clone(), &GgufSource::new(g, c.clone()), dtype).unwrap();
        steps_together_equal_each_alone(&m, &c, &format!("{dtype:?}"));
    }
}

fn steps_together_equal_each_alone(m: &Llama, c: &Config, what: &str) {
    use teal::device::{decode_each, CpuDecoder, Decoder};
    use teal::generate::Models;
    let prompts: [&[u32]; 3] = [&TOKENS[..3], &TOKENS[2..9], &TOKENS[5..]];
    let new = |ctx: usize, p: &[u32]| {
        let mut d = CpuDecoder::new(Models::single(m), ctx);
        d.prefill(p, Logits::Last).unwrap();
        d
    };
    let mut alone: Vec<CpuDecoder> = prompts.iter().map(|p| new(32, p)).collect();
    let mut together: Vec<CpuDecoder> = prompts.iter().map(|p| new(32, p)).collect();
    for step in 0..4u32 {
        let tokens: Vec<u32> = (0..3)
            .map(|i| (7 * step + 11 * i) % c.vocab_size as u32)
            .collect();
        let want: Vec<Vec<f32>> = alone
            .iter_mut()
            .zip(&tokens)
            .map(|(d, &t)| d.decode(t).unwrap().to_vec())
            .collect();
        let mut decs: Vec<&mut dyn Decoder> =
            together.iter_mut().map(|d| d as &mut dyn Decoder).collect();
        let mut got = vec![Vec::new(); 3];
        for r in decode_each(&mut decs, &tokens, |i, l| got[i] = l.to_vec()) {
            r.unwrap();
        }
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_close(
                g,
                w,
                LOGIT_TOL,
                &format!("{what}: step {step}, sequence {i}"),
            );
        }
        assert!(together
            .iter()
            .zip(&alone)
            .all(|(a, b)| a.position() == b.position()));
    }
    // The middle decoder's cache is full: its step fails, the others run as alone.
    let mut full = new(prompts[1].len(), prompts[1]);
    let want: Vec<Vec<f32>> = [0usize, 2]
        .iter()
        .map(|&i| alone[i].decode(5).unwrap().to_vec())
        .collect();
    let (first, rest) = together.split_at_mut(1);
    let mut decs: Vec<&mut dyn Decoder> = vec![&mut first[0], &mut full, &mut rest[1]];
    let mut got = vec![Vec::new(); 3];
    let results = decode_each(&mut decs, &[5, 5, 5], |i, l| got[i] = l.to_vec());
    assert!(results[0].is_ok() && results[2].is_ok());
    let msg = results[1].as_ref().unwrap_err().to_string();
    assert!(msg.contains("longer than the context"), "{msg}");
    assert_close(
        &got[0],
        &want[0],
        LOGIT_TOL,
        &format!("{what}: first beside a full cache"),
    );
    assert_close(
        &got[2],
        &want[1],
        LOGIT_TOL,
        &format!("{what}: last beside a full cache"),
    );
    assert!(got[1].is_empty());
}

/// A decoder truncated back to a shared prefix continues as a fresh sequence would (what
/// `Session` and the server's prompt cache rely on): prefill `A + B`, truncate to `A`, then
/// prefill `C` and decode: the logits of prefilling `A + C` and decoding on. Truncating past
/// the position changes nothing.
#[test]
fn a_truncated_decoder_continues_like_a_fresh_one() {
    use teal::device::{CpuDecoder, Decoder};
    use teal::generate::Models;
    let (m, _, _, c) = load_both(Arch::Llama);
    let v = c.vocab_size;
    let (a, b, cc) = (&TOKENS[..4], &TOKENS[4..9], &[9u32, 3, 50]);
    let mut fresh = CpuDecoder::new(Models::single(&m), 32);
    let whole: Vec<u32> = a.iter().chain(cc).copied().collect();
    let expected = fresh.prefill(&whole, Logits::All).unwrap();
    let expected_next = fresh.decode(7).unwrap().to_vec();

    let mut dec = CpuDecoder::new(Models::single(&m), 32);
    dec.prefill(&[a, b].concat(), Logits::Last).unwrap();
    dec.truncate(20).unwrap();
    assert_eq!(dec.position(), a.len() + b.len());
    dec.truncate(a.len()).unwrap();
    assert_eq!(dec.position(), a.len());
    let got = dec.prefill(cc, Logits::All).unwrap();
    assert_close(
        &got,
        &expected[a.len() * v..],
        LOGIT_TOL,
        "prefill after truncate",
    );
    let next = dec.decode(7).unwrap();
    assert_close(next, &expected_next, LOGIT_TOL, "decode after truncate");
}

/// An embedding run in pieces on a session (`Session::embed_start`, a piece per
/// `embed_step`) is the input's embedding run whole (`Decoder::embed`) bit for bit, in f32 and
/// q8 weights with either KV cache: its pieces are of equal sizes, none short enough to take
/// other kernels than the whole input, each attends to the pieces before it through the cache,
/// and the states are summed in order. Pooling the same pieces run as sequences of their own
/// gives another vector (the comparison sees the cache). The cache is empty afterwards; an
/// input longer than the context is refused before anything runs, naming its whole length.
#[test]
fn an_embedding_in_pieces_is_the_whole_inputs() {
    use teal::device::{CpuDecoder, Decoder, Pooled};
    use teal::generate::{Models, Session};
    use teal::kv_cache::KvDtype;
    let (dir, _, c) = write_both(Arch::Llama);
    let input: Vec<u32> = (0..40)
        .map(|i| (i * 37 + 11) % c.vocab_size as u32)
        .collect();
    for dtype in [Dtype::F32, Dtype::Q8] {
        let g = GgufFile::open(&dir.path().join("tiny.gguf")).unwrap();
        let m = Llama::load_as(c.clone(), &GgufSource::new(g, c.clone()), dtype).unwrap();
        for kv in [KvDtype::F32, KvDtype::F16] {
            let what = format!("{dtype:?}, KV {}", kv.name());
            let mut dec = CpuDecoder::with_kv(Models::single(&m), 64, kv);
            let whole = dec.embed(&input).unwrap();
            // Pieces of at most 16: three of 14, 14 and 12 tokens, a step each.
            let mut session = Session::new(&mut dec);
            let mut turn = session.embed_start(&input, 16).unwrap();
            let (got, steps) = common::embed_in_pieces(&mut session, &mut turn);
            assert_eq!(steps, 3, "{what}");
            assert_eq!(got, whole, "{what}");
            assert_eq!(session.positions(), 0, "{what}");
            let e = session.embed_step(&mut turn).unwrap_err();
            assert!(e.to_string().contains("after its end"), "{what}: {e}");
            drop(session);
            let mut apart = Pooled::new(c.hidden_size);
            for piece in input.chunks(14) {
                dec.clear().unwrap();
                dec.embed_piece(piece, &mut apart).unwrap();
            }
            assert_ne!(apart.unit(), whole, "{what}");
        }
    }
    let m = Llama::load(
        c.clone(),
        &GgufSource::new(
            GgufFile::open(&dir.path().join("tiny.gguf")).unwrap(),
            c.clone(),
        ),
    )
    .unwrap();
    let mut dec = CpuDecoder::new(Models::single(&m), 32);
    let e = Session::new(&mut dec)
        .embed_start(&input, 16)
        .err()
        .unwrap();
    assert!(e.to_string().contains("the input of 40 tokens"), "{e}");
}

/// Against the f32 cache, the f16 cache moves the logits by the rounding of the keys and
/// values (f16 keeps 11 significant bits, 4.9e-4 relative), which this small random model
/// amplifies: measured 3.5e-3 relative to max(1, |logit|), bounded by `KV_F16_TOL`.
#[test]
fn f16_kv_cache_is_close_to_f32() {
    use teal::kv_cache::KvDtype;
    const KV_F16_TOL: f32 = 1e-2;
    let (m, _, _, _) = load_both(Arch::Llama);
    let f32_full = m
        .prefill(&TOKENS, &mut m.new_cache(32), Logits::All)
        .unwrap();
    let full = m
        .prefill(&TOKENS, &mut m.new_cache_as(32, KvDtype::F16), Logits::All)
        .unwrap();
    let worst = full
        .iter()
        .zip(&f32_full)
        .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
        .fold(0.0f32, f32::max);
    eprintln!("f16 vs f32 KV cache: max relative logit difference {worst:.2e}");
    assert!(worst > 0.0, "the f16 cache rounded nothing");
    assert_close(&full, &f32_full, KV_F16_TOL, "f16 vs f32 cache");
    let e = KvDtype::parse("q8").unwrap_err().to_string();
    assert!(e.contains("q8") && e.contains("f16"), "{e}");
}

#[test]
fn bad_inputs_are_errors() {
    let (m, _, _, c) = load_both(Arch::Llama);
    let mut cache = m.new_cache(4);
    assert!(matches!(
        m.prefill(&[], &mut cache, Logits::Last),
        Err(teal::Error::EmptyPrompt)
    ));
    let e = m.prefill(&TOKENS, &mut cache, Logits::Last).unwrap_err();
    assert!(e.to_string().contains("longer than the context"), "{e}");
    let e = m
        .prefill(&[c.vocab_size as u32], &mut m.new_cache(4), Logits::Last)
        .unwrap_err();
    assert!(e.to_string().contains("outside the vocabulary"), "{e}");

    // A missing tensor and a wrong shape are named.
    let dir = tempfile::tempdir().unwrap();
    let mut w = random_weights(&c, 1);
    w.remove("model.layers.1.mlp.up_proj.weight");
    write_safetensors(dir.path(), &c, &w);
    let e = Llama::load(c.clone(), &SafetensorsSource::open(dir.path()).unwrap())
        .err()
        .unwrap();
    assert!(
        e.to_string().contains("model.layers.1.mlp.up_proj.weight"),
        "{e}"
    );

    let mut w = random_weights(&c, 1);
    w.insert(
        "model.layers.0.mlp.down_proj.weight".into(),
        (vec![c.hidden_size, 5], vec![0.0; c.hidden_size * 5]),
    );
    let gpath = dir.path().join("bad.gguf");
    write_gguf(&gpath, &c, &w);
    let g = GgufFile::open(&gpath).unwrap();
    let e = Llama::load(c.clone(), &GgufSource::new(g, c.clone()))
        .err()
        .unwrap();
    assert!(
        e.to_string().contains("blk.0.ffn_down.weight") && e.to_string().contains("shape"),
        "{e}"
    );
}

#[test]
fn unknown_architecture_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let c = tiny_config(Arch::Llama);
    write_safetensors(dir.path(), &c, &random_weights(&c, 1));
    let p = dir.path().join("config.json");
    let s = std::fs::read_to_string(&p)
        .unwrap()
        .replace("LlamaForCausalLM", "GPTNeoXForCausalLM");
    std::fs::write(&p, s).unwrap();
    let e = Config::from_hf_json(&p).unwrap_err();
    assert!(
        e.to_string()
            .contains("unsupported architecture 'GPTNeoXForCausalLM'"),
        "{e}"
    );
}

#[test]
fn llama3_rope_scaling_follows_the_reference_formula() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("config.json");
    let j = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"}
    });
    std::fs::write(&p, j.to_string()).unwrap();
    let c = Config::from_hf_json(&p).unwrap();
    let f = c.rope_inv_freq();
    assert_eq!(f.len(), 64);
    // Highest frequency untouched, lowest divided by the factor (wavelength > 8192/1).
    assert_eq!(f[0], 1.0);
    let base_last = 1.0 / 500000f32.powf(126.0 / 128.0);
    assert!((f[63] - base_last / 8.0).abs() < 1e-12);
    // Frequencies stay monotonically decreasing through the smooth band.
    assert!(f.windows(2).all(|w| w[0] > w[1]));
}

/// GGUF rope scaling as llama.cpp reads it: the factor from `rope.scaling.factor` (older files:
/// `rope.scale_linear`), the type linear unless named; linear divides every frequency by the
/// factor (llama.cpp's `freq_scale = 1 / factor`). Hyper-parameters the forward pass does not
/// implement are refused by name instead of run wrongly.
#[test]
fn gguf_rope_scaling_and_unsupported_hyperparameters() {
    use teal::config::RopeScaling;
    use teal::gguf::{GgufWriter, MetaValue};
    let c = tiny_config(Arch::Llama);
    let hd = c.head_dim as u32;
    let open = |extra: &[(&str, MetaValue)]| {
        let mut g = GgufWriter::new();
        add_config_meta(&mut g, &c);
        for (k, v) in extra {
            g.add_meta(&format!("llama.{k}"), v.clone());
        }
        Config::from_gguf(&GgufFile::from_bytes(g.to_bytes(), "meta.gguf").unwrap())
    };
    let (s, f) = (|v: &str| MetaValue::String(v.into()), MetaValue::F32);
    let base = open(&[]).unwrap();
    assert_eq!(base.rope_scaling, RopeScaling::None);
    let linear = open(&[
        ("rope.scaling.type", s("linear")),
        ("rope.scaling.factor", f(4.0)),
    ])
    .unwrap();
    assert_eq!(linear.rope_scaling, RopeScaling::Linear(4.0));
    for (b, l) in base.rope_inv_freq().iter().zip(linear.rope_inv_freq()) {
        assert_eq!(b / 4.0, l);
    }
    let scaling = |extra: &[(&str, MetaValue)]| open(extra).unwrap().rope_scaling;
    assert_eq!(
        scaling(&[("rope.scaling.factor", f(2.0))]),
        RopeScaling::Linear(2.0)
    );
    assert_eq!(
        scaling(&[("rope.scale_linear", f(2.0))]),
        RopeScaling::Linear(2.0)
    );
    assert_eq!(
        scaling(&[("rope.scaling.factor", f(1.0))]),
        RopeScaling::None
    );
    assert_eq!(
        scaling(&[
            ("rope.scaling.type", s("none")),
            ("rope.scaling.factor", f(8.0))
        ]),
        RopeScaling::None
    );
    // The values the forward pass implements are accepted.
    let u = MetaValue::U32;
    open(&[
        ("rope.dimension_count", u(hd)),
        ("attention.key_length", u(hd)),
        ("attention.value_length", u(hd)),
        ("expert_count", u(0)),
    ])
    .unwrap();
    for (extra, want) in [
        (
            vec![
                ("rope.scaling.type", s("yarn")),
                ("rope.scaling.factor", f(4.0)),
            ],
            "llama.rope.scaling.type \"yarn\" (factor 4) is not supported",
        ),
        (vec![("rope.dimension_count", u(hd / 2))], "partial rotary"),
        (
            vec![("attention.value_length", u(2 * hd))],
            "llama.attention.value_length",
        ),
        (vec![("expert_count", u(8))], "mixture-of-experts"),
        (
            vec![("attention.key_length", s("64"))],
            "'llama.attention.key_length'",
        ),
        (
            vec![("rope.scaling.factor", s("4"))],
            "'llama.rope.scaling.factor'",
        ),
        (
            vec![("attention.head_count_kv", s("2"))],
            "'llama.attention.head_count_kv'",
        ),
        (vec![("rope.freq_base", s("1e4"))], "'llama.rope.freq_base'"),
        (
            vec![("rope.scaling.factor", f(-1.0))],
            "linear rope scaling factor -1",
        ),
    ] {
        let e = open(&extra).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }
}

/// A Hugging Face config with `linear` rope scaling divides the frequencies by its factor; one
/// with a sliding window shorter than its context (Mistral-7B-v0.1) caps the context there,
/// unless `use_sliding_window` is false (Qwen2). An activation other than SiLU is refused.
#[test]
fn hf_linear_rope_scaling_and_sliding_window() {
    use teal::config::RopeScaling;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("config.json");
    let config = |extra: serde_json::Value| {
        let mut j = serde_json::json!({
            "architectures": ["MistralForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 100, "rms_norm_eps": 1e-5, "max_position_embeddings": 32768
        });
        for (k, v) in extra.as_object().unwrap() {
            j[k] = v.clone();
        }
        std::fs::write(&p, j.to_string()).unwrap();
        Config::from_hf_json(&p)
    };
    let c = config(serde_json::json!({"rope_scaling": {"type": "linear", "factor": 2.0}})).unwrap();
    assert_eq!(c.rope_scaling, RopeScaling::Linear(2.0));
    assert_eq!(c.max_position_embeddings, 32768);
    let e = config(serde_json::json!({"rope_scaling": {"type": "linear"}})).unwrap_err();
    assert!(e.to_string().contains("rope_scaling.factor missing"), "{e}");
    let c = config(serde_json::json!({"sliding_window": 4096})).unwrap();
    assert_eq!(c.max_position_embeddings, 4096);
    let c = config(serde_json::json!({"sliding_window": null})).unwrap();
    assert_eq!(c.max_position_embeddings, 32768);
    let c =
        config(serde_json::json!({"sliding_window": 4096, "use_sliding_window": false})).unwrap();
    assert_eq!(c.max_position_embeddings, 32768);
    config(serde_json::json!({"hidden_act": "silu"})).unwrap();
    let e = config(serde_json::json!({"hidden_act": "gelu"})).unwrap_err();
    assert!(
        e.to_string()
            .contains("hidden_act \"gelu\" is not supported"),
        "{e}"
    );
}

/// A matrix read a slice of rows at a time (how the embedding and head are converted) equals
/// the same rows of the whole tensor, from both file formats; a range past the end is an error.
#[test]
fn row_slices_equal_the_whole_tensor() {
    let (dir, _, c) = write_both(Arch::Llama);
    let g = GgufFile::open(&dir.path().join("tiny.gguf")).unwrap();
    let gsrc = GgufSource::new(g, c.clone());
    let ssrc = SafetensorsSource::open(&dir.path().join("hf")).unwrap();
    let sources: [&dyn TensorSource; 2] = [&gsrc, &ssrc];
    let (v, d) = (c.vocab_size, c.hidden_size);
    for src in sources {
        for name in [
            "model.embed_tokens.weight",
            "model.layers.0.mlp.down_proj.weight",
        ] {
            let shape = if name.contains("embed") {
                [v, d]
            } else {
                [d, c.intermediate_size]
            };
            let whole = src.load(name, &shape).unwrap();
            for rows in [0..0, 0..1, 3..shape[0] / 2 + 1, shape[0] - 1..shape[0]] {
                let part = src.load_rows(name, shape, rows.clone()).unwrap();
                assert_eq!(
                    part,
                    &whole[rows.start * shape[1]..rows.end * shape[1]],
                    "{} {name} rows {rows:?}",
                    src.label()
                );
            }
            assert!(src.load_rows(name, shape, 0..shape[0] + 1).is_err());
        }
    }
}

#[test]
fn non_finite_activations_are_errors() {
    use teal::device::{CpuDecoder, Decoder};
    use teal::generate::Models;
    use teal::kv_cache::KvDtype;
    // A NaN bias is refused at load, named.
    let c = tiny_config(Arch::Qwen2);
    let dir = tempfile::tempdir().unwrap();
    let mut w = random_weights(&c, 3);
    w.get_mut("model.layers.1.self_attn.v_proj.bias").unwrap().1[2] = f32::NAN;
    write_safetensors(dir.path(), &c, &w);
    let e = Llama::load(c.clone(), &SafetensorsSource::open(dir.path()).unwrap())
        .err()
        .unwrap();
    assert!(
        e.to_string()
            .contains("model.layers.1.self_attn.v_proj.bias"),
        "{e}"
    );

    // Values beyond f16's 65504 overflow an f16 KV cache: the logits come out NaN, which is an
    // error naming the position, not a perplexity of NaN or tokens sampled from garbage.
    let c = tiny_config(Arch::Llama);
    let mut w = random_weights(&c, 3);
    w.get_mut("model.layers.0.self_attn.v_proj.weight")
        .unwrap()
        .1
        .iter_mut()
        .for_each(|x| *x *= 1e5);
    let dir = tempfile::tempdir().unwrap();
    write_safetensors(dir.path(), &c, &w);
    let m = Llama::load(c.clone(), &SafetensorsSource::open(dir.path()).unwrap()).unwrap();
    let mut f32_cache = CpuDecoder::with_kv(Models::single(&m), 32, KvDtype::F32);
    let logits = f32_cache.prefill(&TOKENS, Logits::All).unwrap();
    assert!(logits.iter().all(|x| x.is_finite()));
    f32_cache.decode(3).unwrap();
    let mut f16_cache = CpuDecoder::with_kv(Models::single(&m), 32, KvDtype::F16);
    let e = f16_cache.prefill(&TOKENS, Logits::All).unwrap_err();
    assert!(
        matches!(e, teal::Error::NonFiniteLogits { position: 0, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("--kv-dtype f32"), "{e}");
    f16_cache.clear().unwrap();
    let e = f16_cache.prefill(&TOKENS[..3], Logits::Last).unwrap_err();
    assert!(
        matches!(e, teal::Error::NonFiniteLogits { position: 2, .. }),
        "{e}"
    );
    let e = f16_cache.decode(5).unwrap_err();
    assert!(
        matches!(e, teal::Error::NonFiniteLogits { position: 3, .. }),
        "{e}"
    );
    // The sparse evaluation (ppl/report with --sparsity) runs the model itself: the same error.
    let opts = teal::eval::perplexity::PplOptions {
        ctx: 6,
        chunks: Some(1),
        kv: KvDtype::F16,
        scoring: Default::default(),
    };
    let tokens: Vec<u32> = TOKENS.to_vec();
    let all = teal::sparsity::Mode::All;
    let e = teal::eval::sparse::compare(&c, &m, &m, all, &tokens, &opts, |_, _| {})
        .err()
        .unwrap();
    assert!(
        matches!(e, teal::Error::NonFiniteLogits { kv_f16: true, .. }),
        "{e}"
    );
    let f32_opts = teal::eval::perplexity::PplOptions {
        kv: KvDtype::F32,
        ..opts
    };
    teal::eval::sparse::compare(&c, &m, &m, all, &tokens, &f32_opts, |_, _| {}).unwrap();
}

/// `llama-perplexity`'s scoring: BOS in place of each window's first token, the tokens after
/// the first half scored; the dense and the sparse evaluations agree on it. `chunks` beyond the
/// text's windows scores them all.
#[test]
fn llama_cpp_scoring_scores_the_second_half_after_bos() {
    use teal::device::{CpuDecoder, Decoder};
    use teal::eval::perplexity::{nll, perplexity, PplOptions, Scoring};
    use teal::generate::Models;
    use teal::kv_cache::KvDtype;
    let (m, _, _, c) = load_both(Arch::Llama);
    let tokens: Vec<u32> = (0..26).map(|i| (i * 7 + 3) % c.vocab_size as u32).collect();
    let scoring = Scoring::LlamaCpp { bos: Some(1) };
    let opts = PplOptions {
        ctx: 8,
        chunks: None,
        kv: KvDtype::F32,
        scoring,
    };
    let r = perplexity(&m, &tokens, &opts, |_, _| {}).unwrap();
    assert_eq!((r.chunks, r.tokens_scored), (3, 3 * 3));
    let mut each = Vec::new();
    for w in tokens.chunks_exact(8).take(3) {
        let mut run = w.to_vec();
        run[0] = 1;
        let mut dec = CpuDecoder::with_kv(Models::single(&m), 8, KvDtype::F32);
        let logits = dec.prefill(&run, Logits::All).unwrap();
        let v = c.vocab_size;
        each.extend((5..8).map(|t| nll(&logits[(t - 1) * v..t * v], w[t])));
    }
    let mean = each.iter().sum::<f64>() / 9.0;
    assert!((r.nll - mean).abs() < 1e-9, "{} vs {mean}", r.nll);
    // llama-perplexity's "+/-" is PPL times the standard error of the mean NLL.
    let var = each.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 9.0;
    let se = (var / 8.0).sqrt();
    assert!(
        (r.nll_std_err - se).abs() < 1e-9,
        "{} vs {se}",
        r.nll_std_err
    );
    // More windows asked for than the text has: all of them, as llama-perplexity caps
    // `--chunks`.
    let more = PplOptions {
        chunks: Some(99),
        ..opts.clone()
    };
    let capped = perplexity(&m, &tokens, &more, |_, _| {}).unwrap();
    assert_eq!((capped.chunks, capped.nll), (3, r.nll));
    let all = teal::sparsity::Mode::All;
    let cmp = teal::eval::sparse::compare(&c, &m, &m, all, &tokens, &opts, |_, _| {}).unwrap();
    assert_eq!(cmp.tokens_scored, 9);
    assert!((cmp.dense_ppl / r.ppl - 1.0).abs() < 1e-9);
    // P512 on the same windows scores every token after the first.
    let p512 = PplOptions {
        scoring: Scoring::P512,
        ..opts.clone()
    };
    assert_eq!(
        perplexity(&m, &tokens, &p512, |_, _| {})
            .unwrap()
            .tokens_scored,
        21
    );
    // Like llama-perplexity, a text of fewer than two windows is refused (26 tokens, windows
    // of 16); P512 scores its one window.
    let wide = PplOptions {
        ctx: 16,
        ..opts.clone()
    };
    let e = perplexity(&m, &tokens, &wide, |_, _| {}).unwrap_err();
    assert!(
        e.to_string()
            .contains("the text has 26 tokens; llama.cpp's scoring, as llama-perplexity, needs at least two windows (32 tokens)"),
        "{e}"
    );
    let wide_p512 = PplOptions {
        scoring: Scoring::P512,
        ..wide
    };
    assert_eq!(
        perplexity(&m, &tokens, &wide_p512, |_, _| {})
            .unwrap()
            .chunks,
        1
    );
    // A window too short to have a scored token.
    let short = PplOptions { ctx: 2, ..opts };
    let e = perplexity(&m, &tokens, &short, |_, _| {}).unwrap_err();
    assert!(
        e.to_string().contains("too short to score any token"),
        "{e}"
    );
}

#[test]
fn config_values_that_cannot_run_are_named() {
    let mut c = tiny_config(Arch::Llama);
    c.validate().unwrap();
    c.rope_theta = f32::INFINITY;
    let e = c.validate().unwrap_err().to_string();
    assert!(
        e.contains("rope_theta inf must be finite and positive"),
        "{e}"
    );
    c.rope_theta = 10000.0;
    c.rms_norm_eps = f32::NAN;
    let e = c.validate().unwrap_err().to_string();
    assert!(
        e.contains("rms_norm_eps NaN must be finite and positive"),
        "{e}"
    );
}

/// A minimal BPE `tokenizer.json` of `n` tokens (two special ones, then single characters).
fn write_tokenizer(dir: &std::path::Path, n: usize) {
    let mut vocab = serde_json::Map::new();
    vocab.insert("<s>".into(), 0.into());
    vocab.insert("</s>".into(), 1.into());
    for i in 2..n {
        let ch = char::from_u32(0x100 + i as u32).unwrap().to_string();
        vocab.insert(ch, i.into());
    }
    let special = |id: usize, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(0, "<s>"), special(1, "</s>")],
        "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
            "byte_fallback": false, "vocab": vocab, "merges": []}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
}

#[test]
fn a_tokenizer_with_ids_beyond_the_embedding_is_refused_at_open() {
    let c = tiny_config(Arch::Llama);
    let dir = tempfile::tempdir().unwrap();
    write_safetensors(dir.path(), &c, &random_weights(&c, 1));
    write_tokenizer(dir.path(), c.vocab_size);
    teal::ModelFiles::open(dir.path()).unwrap();
    // One of its files instead of the directory: named, with what to pass.
    let e = teal::ModelFiles::open(&dir.path().join("model.safetensors"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("model.safetensors: a Hugging Face model is opened by its directory"),
        "{e}"
    );
    write_tokenizer(dir.path(), c.vocab_size + 3);
    let e = teal::ModelFiles::open(dir.path())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("the tokenizer has 100 token ids, the model's vocab_size is 97"),
        "{e}"
    );
}

/// Every tensor of a model must be one the forward pass reads (llama.cpp's "wrong number of
/// tensors"): an MLP bias or an expert router would otherwise be ignored and the answers wrong.
/// The rotary tables old checkpoints carry are only a cache of the configuration's.
#[test]
fn tensors_the_forward_pass_does_not_read_are_refused_at_open() {
    // The model directory of `c` and `w`, opened: the error's text where it is refused.
    let open = |c: &Config, w: &Weights| {
        let dir = tempfile::tempdir().unwrap();
        write_safetensors(dir.path(), c, w);
        write_tokenizer(dir.path(), c.vocab_size);
        teal::ModelFiles::open(dir.path())
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    for arch in [Arch::Llama, Arch::Qwen2] {
        let c = tiny_config(arch);
        let mut w = random_weights(&c, 1);
        let d = c.hidden_size;
        w.insert(
            "model.layers.0.self_attn.rotary_emb.inv_freq".into(),
            (vec![c.head_dim / 2], rand_vec(c.head_dim / 2, 2, 1.0)),
        );
        open(&c, &w).unwrap();
        for extra in [
            "model.layers.0.mlp.down_proj.bias",
            "model.layers.1.self_attn.o_proj.bias",
            "model.layers.1.block_sparse_moe.gate.weight",
        ] {
            let mut w = w.clone();
            w.insert(extra.into(), (vec![d], rand_vec(d, 3, 1.0)));
            let e = open(&c, &w).unwrap_err();
            let want = format!(
                "tensor '{extra}' is not one the {} architecture reads",
                arch.name()
            );
            assert!(e.contains(&want), "{e}");
        }
    }
    // q/k/v biases only where the configuration has them.
    let c = tiny_config(Arch::Llama);
    let mut w = random_weights(&c, 1);
    w.insert(
        "model.layers.0.self_attn.q_proj.bias".into(),
        (vec![c.q_dim()], rand_vec(c.q_dim(), 3, 1.0)),
    );
    let e = open(&c, &w).unwrap_err();
    assert!(e.contains("'model.layers.0.self_attn.q_proj.bias'"), "{e}");
}
