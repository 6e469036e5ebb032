//! Seeded random-weights Llama models of real shapes, for tests and benchmarks at model scale
//! without model files: uniform weights scaled for unit output variance, optionally rounded to
//! f16/bf16 so that a GPU copy holds exactly the CPU's values. Each tensor is generated when the
//! loader asks for it (by all threads), so only the stored model and one tensor in f32 are
//! ever in memory.

use crate::config::{Arch, Config, RopeScaling};
use crate::error::{Error, Result};
use crate::loader::{bad_rows, TensorSource};
use crate::models::llama::Llama;
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::ops::Range;
use teal_kernels::cuda::WeightDtype;
use teal_kernels::packed::Dtype;

/// Shape names [`shape`] knows.
pub const SHAPES: [&str; 4] = ["smollm2-135m", "llama3-8b", "llama3-8b-2l", "qwen2-tiny"];

/// A model shape by name: `smollm2-135m` (30 layers, d 576, 9/3 heads, MLP 1536, vocabulary
/// 49152, tied embeddings), `llama3-8b` (32 layers, d 4096, 32/8 heads, MLP 14336, vocabulary
/// 128256), `llama3-8b-2l` (two Llama-3-8B blocks, vocabulary 8192), `qwen2-tiny` (3 layers,
/// d 48, q/k/v biases).
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
        "llama3-8b" => Ok(c(
            Arch::Llama,
            32,
            4096,
            32,
            8,
            14336,
            128256,
            500000.0,
            false,
        )),
        "llama3-8b-2l" => Ok(c(Arch::Llama, 2, 4096, 32, 8, 14336, 8192, 500000.0, false)),
        "qwen2-tiny" => Ok(c(Arch::Qwen2, 3, 48, 6, 2, 72, 97, 10000.0, false)),
        other => Err(Error::Invalid(format!(
            "unknown random model shape '{other}' ({})",
            SHAPES.join(", ")
        ))),
    }
}

/// How one tensor is drawn: `offset + scale * uniform(seed)`.
struct Draw {
    shape: Vec<usize>,
    seed: u64,
    scale: f32,
    offset: f32,
}

/// The tensors of a random model, generated on demand.
struct RandomSource {
    tensors: BTreeMap<String, Draw>,
    round_to: Option<WeightDtype>,
}

impl RandomSource {
    /// The tensors of shape `c`, seeded from `seed` in a fixed order (the values of every
    /// earlier version of this module: test fixtures depend on them).
    fn new(c: &Config, seed: u64, round_to: Option<WeightDtype>) -> RandomSource {
        let mut tensors = BTreeMap::new();
        let mut k = seed;
        let mut put = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
            k += 1;
            tensors.insert(
                name,
                Draw {
                    shape,
                    seed: k,
                    scale,
                    offset,
                },
            );
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
        RandomSource { tensors, round_to }
    }

    /// The draw of tensor `name`, checked against `shape`.
    fn get(&self, name: &str, shape: &[usize]) -> Result<&Draw> {
        let t = self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.into(),
            source_desc: self.label(),
        })?;
        if t.shape != shape {
            return Err(Error::TensorShape {
                name: name.into(),
                got: t.shape.clone(),
                expected: shape.to_vec(),
            });
        }
        Ok(t)
    }

    /// Values `first .. first + n` of tensor `t` (row-major).
    fn draw(&self, t: &Draw, first: usize, n: usize) -> Vec<f32> {
        let mut v = vec![0.0f32; n];
        teal_kernels::rand::uniform_into_at(&mut v, t.seed, first as u64);
        let round_to = self.round_to;
        v.par_iter_mut().for_each(|x| {
            let y = *x * t.scale + t.offset;
            *x = match round_to {
                Some(WeightDtype::Bf16) => half::bf16::from_f32(y).to_f32(),
                Some(WeightDtype::F16) => half::f16::from_f32(y).to_f32(),
                None => y,
            };
        });
        v
    }
}

impl TensorSource for RandomSource {
    fn load(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let t = self.get(name, shape)?;
        Ok(self.draw(t, 0, shape.iter().product()))
    }
    /// Only the rows asked for are drawn (the model converts its embedding and head a slice of
    /// rows at a time: drawing the whole matrix for each slice took most of the time of a
    /// Llama-3-8B-shaped model).
    fn load_rows(&self, name: &str, shape: [usize; 2], rows: Range<usize>) -> Result<Vec<f32>> {
        let t = self.get(name, &shape)?;
        if rows.start > rows.end || rows.end > shape[0] {
            return Err(bad_rows(name, &rows, shape[0]));
        }
        Ok(self.draw(t, rows.start * shape[1], rows.len() * shape[1]))
    }
    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
    fn describe(&self) -> Vec<(String, Vec<usize>, String)> {
        self.tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.shape.clone(), "F32".into()))
            .collect()
    }
    fn label(&self) -> String {
        "random weights".into()
    }
}

/// A model of shape `c` with weights from `seed`, rounded to `round_to` when given, stored in
/// f32.
pub fn random_llama(c: &Config, seed: u64, round_to: Option<WeightDtype>) -> Result<Llama> {
    Llama::load(c.clone(), &RandomSource::new(c, seed, round_to))
}

/// The same values as [`random_llama`] with `round_to` = `dtype` where that is f16 or bf16,
/// stored in `dtype` (projections and LM head; embeddings and norms in f32). Fails with
/// [`Error::Invalid`] before allocating when the machine lacks the memory
/// ([`host_bytes`] against the available memory).
pub fn random_llama_as(c: &Config, seed: u64, dtype: Dtype) -> Result<Llama> {
    let need = host_bytes(c, dtype);
    if let Some(avail) = crate::bench::available_memory() {
        if need > avail {
            return Err(Error::Invalid(format!(
                "a random-weights model of this shape ({} layers, d {}, vocabulary {}) in {} \
                 needs about {:.1} GB of memory, {:.1} GB are available; use a smaller shape, \
                 a smaller --dtype (bf16, q8, q4), or a machine with more memory",
                c.num_hidden_layers,
                c.hidden_size,
                c.vocab_size,
                dtype.name(),
                need as f64 / 1e9,
                avail as f64 / 1e9
            )));
        }
    }
    let round_to = match dtype {
        Dtype::Bf16 => Some(WeightDtype::Bf16),
        Dtype::F16 => Some(WeightDtype::F16),
        _ => None,
    };
    Llama::load_as(c.clone(), &RandomSource::new(c, seed, round_to), dtype)
}

/// Bytes of memory a model of shape `c` stored in `dtype` needs while loading: the
/// projections and LM head in `dtype`, the embeddings in f32, and the largest tensor three
/// times in f32 (drawn, transposed, packed).
pub fn host_bytes(c: &Config, dtype: Dtype) -> u64 {
    let (d, ff, q, kv) = (
        c.hidden_size as u64,
        c.intermediate_size as u64,
        c.q_dim() as u64,
        c.kv_dim() as u64,
    );
    let per_layer = 2 * d * q + 2 * d * kv + 3 * d * ff;
    let head = c.vocab_size as u64 * d;
    let stored = (c.num_hidden_layers as u64 * per_layer + head) as f64
        * match dtype {
            Dtype::F32 => 4.0,
            Dtype::F16 | Dtype::Bf16 => 2.0,
            Dtype::Q8 => 34.0 / 32.0,
            Dtype::Q4 => 20.0 / 32.0,
        };
    stored as u64 + 4 * head + 3 * 4 * head.max(d * ff)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows drawn alone are the same values as the same rows of the whole tensor, rounded
    /// alike; rows outside the matrix are an error naming the tensor.
    #[test]
    fn rows_drawn_alone_match_the_whole_tensor() {
        let c = shape("qwen2-tiny").unwrap();
        let src = RandomSource::new(&c, 5, Some(WeightDtype::Bf16));
        let (name, shape) = ("model.embed_tokens.weight", [c.vocab_size, c.hidden_size]);
        let all = src.load(name, &shape).unwrap();
        for rows in [0..1, 3..40, 90..97, 10..10] {
            let part = src.load_rows(name, shape, rows.clone()).unwrap();
            assert_eq!(
                part,
                all[rows.start * shape[1]..rows.end * shape[1]],
                "{rows:?}"
            );
        }
        let e = src.load_rows(name, shape, 90..98).unwrap_err().to_string();
        assert!(e.contains(name) && e.contains("90..98"), "{e}");
    }
}
