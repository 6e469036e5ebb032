//! A tiny Llama-family model with seeded random weights, written both as GGUF (q/k rows permuted
//! as llama.cpp's converter does) and as a Hugging Face safetensors directory.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use teal::config::{Arch, Config, RopeScaling};
use teal::gguf::{GgufWriter, MetaValue};
use teal::loader::{gguf_name, permute_rows};

pub fn tiny_config(arch: Arch) -> Config {
    Config {
        arch,
        hidden_size: 48,
        intermediate_size: 72,
        num_hidden_layers: 3,
        num_attention_heads: 6,
        num_key_value_heads: 2,
        head_dim: 8,
        vocab_size: 97,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: RopeScaling::None,
        max_position_embeddings: 256,
        tie_word_embeddings: arch != Arch::Qwen2,
        attention_bias: arch == Arch::Qwen2,
    }
}

pub fn rand_vec(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut v = teal_kernels::rand::uniform(n, seed);
    v.iter_mut().for_each(|x| *x *= scale);
    v
}

/// Hugging Face name -> (row-major shape, values).
pub type Weights = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

pub fn random_weights(c: &Config, seed: u64) -> Weights {
    let mut w = Weights::new();
    let mut k = seed;
    let mut put = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
        k += 1;
        let n = shape.iter().product();
        let v = rand_vec(n, k, scale)
            .into_iter()
            .map(|x| x + offset)
            .collect();
        w.insert(name, (shape, v));
    };
    let (d, ff, q, kv) = (c.hidden_size, c.intermediate_size, c.q_dim(), c.kv_dim());
    put(
        "model.embed_tokens.weight".into(),
        vec![c.vocab_size, d],
        1.0,
        0.0,
    );
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        put(format!("{p}.input_layernorm.weight"), vec![d], 0.2, 1.0);
        put(format!("{p}.self_attn.q_proj.weight"), vec![q, d], 0.3, 0.0);
        put(
            format!("{p}.self_attn.k_proj.weight"),
            vec![kv, d],
            0.3,
            0.0,
        );
        put(
            format!("{p}.self_attn.v_proj.weight"),
            vec![kv, d],
            0.3,
            0.0,
        );
        if c.attention_bias {
            put(format!("{p}.self_attn.q_proj.bias"), vec![q], 0.1, 0.0);
            put(format!("{p}.self_attn.k_proj.bias"), vec![kv], 0.1, 0.0);
            put(format!("{p}.self_attn.v_proj.bias"), vec![kv], 0.1, 0.0);
        }
        put(format!("{p}.self_attn.o_proj.weight"), vec![d, q], 0.2, 0.0);
        put(
            format!("{p}.post_attention_layernorm.weight"),
            vec![d],
            0.2,
            1.0,
        );
        put(format!("{p}.mlp.gate_proj.weight"), vec![ff, d], 0.2, 0.0);
        put(format!("{p}.mlp.up_proj.weight"), vec![ff, d], 0.2, 0.0);
        put(format!("{p}.mlp.down_proj.weight"), vec![d, ff], 0.2, 0.0);
    }
    put("model.norm.weight".into(), vec![d], 0.2, 1.0);
    if !c.tie_word_embeddings {
        put("lm_head.weight".into(), vec![c.vocab_size, d], 0.3, 0.0);
    }
    w
}

pub fn write_gguf(path: &Path, c: &Config, w: &Weights) {
    let mut g = GgufWriter::new();
    add_config_meta(&mut g, c);
    for (name, (shape, v)) in w {
        let n_head = if name.contains("q_proj") {
            Some(c.num_attention_heads)
        } else if name.contains("k_proj") {
            Some(c.num_key_value_heads)
        } else {
            None
        };
        let data = match n_head {
            Some(h) if c.arch != Arch::Qwen2 => permute_rows(
                v,
                h,
                c.head_dim,
                if shape.len() == 2 { shape[1] } else { 1 },
            ),
            _ => v.clone(),
        };
        let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        g.add_f32_tensor(&gguf_name(name).unwrap(), &dims, &data);
    }
    g.write(path).unwrap();
}

pub fn write_safetensors(dir: &Path, c: &Config, w: &Weights) {
    std::fs::create_dir_all(dir).unwrap();
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = w
        .iter()
        .map(|(n, (s, v))| {
            (
                n.clone(),
                s.clone(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    let arch = match c.arch {
        Arch::Llama => "LlamaForCausalLM",
        Arch::Mistral => "MistralForCausalLM",
        Arch::Qwen2 => "Qwen2ForCausalLM",
    };
    let cfg = serde_json::json!({
        "architectures": [arch],
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "vocab_size": c.vocab_size,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
}

/// The `{arch}.*` hyper-parameters of `c` as llama.cpp's converter writes them.
pub fn add_config_meta(g: &mut GgufWriter, c: &Config) {
    let a = c.arch.name();
    g.add_meta("general.architecture", MetaValue::String(a.into()));
    let u = |v: usize| MetaValue::U32(v as u32);
    g.add_meta(&format!("{a}.embedding_length"), u(c.hidden_size));
    g.add_meta(&format!("{a}.feed_forward_length"), u(c.intermediate_size));
    g.add_meta(&format!("{a}.block_count"), u(c.num_hidden_layers));
    g.add_meta(
        &format!("{a}.attention.head_count"),
        u(c.num_attention_heads),
    );
    g.add_meta(
        &format!("{a}.attention.head_count_kv"),
        u(c.num_key_value_heads),
    );
    g.add_meta(&format!("{a}.context_length"), u(c.max_position_embeddings));
    g.add_meta(&format!("{a}.vocab_size"), u(c.vocab_size));
    g.add_meta(
        &format!("{a}.attention.layer_norm_rms_epsilon"),
        MetaValue::F32(c.rms_norm_eps),
    );
    g.add_meta(&format!("{a}.rope.freq_base"), MetaValue::F32(c.rope_theta));
}

/// Runs `turn` (from [`teal::generate::Session::embed_start`]) to its end: the embedding and
/// the number of steps (pieces) it took.
pub fn embed_in_pieces(
    session: &mut teal::generate::Session,
    turn: &mut teal::generate::EmbedTurn,
) -> (Vec<f32>, usize) {
    let mut steps = 1;
    loop {
        match session.embed_step(turn).unwrap() {
            Some(v) => return (v, steps),
            None => steps += 1,
        }
    }
}
