//! Seeded random-weights Llama models of real shapes, for tests and benchmarks at model scale
//! without model files: uniform weights scaled for unit output variance, optionally rounded to
//! f16/bf16 so that a GPU copy holds exactly the CPU's values.

use crate::config::{Arch, Config, RopeScaling};
use crate::error::{Error, Result};
use crate::loader::TensorSource;
use crate::models::llama::Llama;
use std::collections::BTreeMap;
use teal_kernels::cuda::WeightDtype;

/// A model shape by name: `smollm2-135m` (30 layers, d 576, 9/3 heads, MLP 1536, vocabulary
/// 49152, tied embeddings), `llama3-8b-2l` (two Llama-3-8B blocks: d 4096, 32/8 heads, MLP
/// 14336, vocabulary 8192), `qwen2-tiny` (3 layers, d 48, q/k/v biases).
pub fn shape(name: &str) -> Result<Config> {
    let c = |arch, layers, d, heads, kv, ff, vocab, theta, tied| Config {
        arch,
        hidden_size: d,
        intermediate_size: ff,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv,
        head_dim: d / heads,
        vocab_size: vocab,
        rms_norm_eps: 1e-5,
        rope_theta: theta,
        rope_scaling: RopeScaling::None,
        max_position_embeddings: 8192,
        tie_word_embeddings: tied,
        attention_bias: arch == Arch::Qwen2,
    };
    match name {
        "smollm2-135m" => Ok(c(Arch::Llama, 30, 576, 9, 3, 1536, 49152, 100000.0, true)),
        "llama3-8b-2l" => Ok(c(Arch::Llama, 2, 4096, 32, 8, 14336, 8192, 500000.0, false)),
        "qwen2-tiny" => Ok(c(Arch::Qwen2, 3, 48, 6, 2, 72, 97, 10000.0, false)),
        other => Err(Error::Invalid(format!(
            "unknown random model shape '{other}' (smollm2-135m, llama3-8b-2l, qwen2-tiny)"
        ))),
    }
}

/// Deterministic values uniform in `[-scale, scale)`.
fn uniform(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut v = teal_kernels::rand::uniform(n, seed);
    v.iter_mut().for_each(|x| *x *= scale);
    v
}

struct MapSource(BTreeMap<String, (Vec<usize>, Vec<f32>)>);

impl TensorSource for MapSource {
    fn load(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        match self.0.get(name) {
            Some((s, v)) if s == shape => Ok(v.clone()),
            Some((s, _)) => Err(Error::TensorShape {
                name: name.into(),
                got: s.clone(),
                expected: shape.to_vec(),
            }),
            None => Err(Error::MissingTensor {
                name: name.into(),
                source_desc: self.label(),
            }),
        }
    }
    fn contains(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }
    fn describe(&self) -> Vec<(String, Vec<usize>, String)> {
        self.0
            .iter()
            .map(|(n, (s, _))| (n.clone(), s.clone(), "F32".into()))
            .collect()
    }
    fn label(&self) -> String {
        "random weights".into()
    }
}

/// A model of shape `c` with weights from `seed`, rounded to `round_to` when given.
pub fn random_llama(c: &Config, seed: u64, round_to: Option<WeightDtype>) -> Result<Llama> {
    let round = |v: Vec<f32>| -> Vec<f32> {
        match round_to {
            Some(dt) => dt.encode(&v).into_iter().map(|b| dt.decode(b)).collect(),
            None => v,
        }
    };
    let mut w = BTreeMap::new();
    let mut k = seed;
    let mut put = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
        k += 1;
        let n = shape.iter().product();
        let v = uniform(n, k, scale)
            .into_iter()
            .map(|x| x + offset)
            .collect();
        w.insert(name, (shape, round(v)));
    };
    let (d, ff, q, kv) = (c.hidden_size, c.intermediate_size, c.q_dim(), c.kv_dim());
    let s = |n: usize| (3.0 / n as f32).sqrt();
    put(
        "model.embed_tokens.weight".into(),
        vec![c.vocab_size, d],
        1.0,
        0.0,
    );
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        put(format!("{p}.input_layernorm.weight"), vec![d], 0.2, 1.0);
        put(
            format!("{p}.self_attn.q_proj.weight"),
            vec![q, d],
            s(d),
            0.0,
        );
        put(
            format!("{p}.self_attn.k_proj.weight"),
            vec![kv, d],
            s(d),
            0.0,
        );
        put(
            format!("{p}.self_attn.v_proj.weight"),
            vec![kv, d],
            s(d),
            0.0,
        );
        if c.attention_bias {
            put(format!("{p}.self_attn.q_proj.bias"), vec![q], 0.1, 0.0);
            put(format!("{p}.self_attn.k_proj.bias"), vec![kv], 0.1, 0.0);
            put(format!("{p}.self_attn.v_proj.bias"), vec![kv], 0.1, 0.0);
        }
        put(
            format!("{p}.self_attn.o_proj.weight"),
            vec![d, q],
            s(q),
            0.0,
        );
        put(
            format!("{p}.post_attention_layernorm.weight"),
            vec![d],
            0.2,
            1.0,
        );
        put(format!("{p}.mlp.gate_proj.weight"), vec![ff, d], s(d), 0.0);
        put(format!("{p}.mlp.up_proj.weight"), vec![ff, d], s(d), 0.0);
        put(format!("{p}.mlp.down_proj.weight"), vec![d, ff], s(ff), 0.0);
    }
    put("model.norm.weight".into(), vec![d], 0.2, 1.0);
    if !c.tie_word_embeddings {
        put("lm_head.weight".into(), vec![c.vocab_size, d], s(d), 0.0);
    }
    Llama::load(c.clone(), &MapSource(w))
}
