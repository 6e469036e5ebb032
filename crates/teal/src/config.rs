//! Model hyper-parameters, read from GGUF metadata or a Hugging Face `config.json`.

use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use serde::Deserialize;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
}

impl Arch {
    pub fn parse(s: &str) -> Result<Arch> {
        match s {
            "llama" | "LlamaForCausalLM" => Ok(Arch::Llama),
            "mistral" | "MistralForCausalLM" => Ok(Arch::Mistral),
            "qwen2" | "Qwen2ForCausalLM" => Ok(Arch::Qwen2),
            other => Err(Error::UnsupportedArchitecture(other.to_string())),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
        }
    }
}

/// Llama-3 style frequency-dependent RoPE scaling.
#[derive(Clone, Debug, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: usize,
}

/// How the rotary frequencies are modified.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    Llama3(Llama3RopeScaling),
    /// Per-frequency divisors, as GGUF stores them (`rope_freqs.weight`).
    Factors(Vec<f32>),
    /// Positions divided by a factor (every frequency divided by it): Hugging Face's `linear`
    /// type, llama.cpp's `rope.scaling.type = linear`.
    Linear(f32),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub arch: Arch,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    /// The context length (capped at the sliding window where a Hugging Face config sets one).
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry biases (Qwen2).
    pub attention_bias: bool,
}

impl Config {
    /// Checks the relations the forward pass relies on.
    pub fn validate(&self) -> Result<()> {
        let c = self;
        let bad = |m: String| Err(Error::Config(m));
        if c.hidden_size == 0
            || c.num_hidden_layers == 0
            || c.vocab_size == 0
            || c.intermediate_size == 0
        {
            return bad(format!("zero dimension in {c:?}"));
        }
        if c.num_attention_heads == 0 {
            return bad("zero attention heads".into());
        }
        if c.num_key_value_heads == 0 {
            return bad("zero key-value heads".into());
        }
        if c.max_position_embeddings == 0 {
            return bad("a context length of 0 positions".into());
        }
        if !c.num_attention_heads.is_multiple_of(c.num_key_value_heads) {
            return bad(format!(
                "{} attention heads is not a multiple of {} KV heads",
                c.num_attention_heads, c.num_key_value_heads
            ));
        }
        if c.head_dim == 0 || !c.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim {} must be even and positive", c.head_dim));
        }
        let positive = |v: f32| v.is_finite() && v > 0.0;
        match &c.rope_scaling {
            RopeScaling::Factors(f) if f.len() != c.head_dim / 2 => {
                return bad(format!(
                    "rope_freqs has {} values, expected {}",
                    f.len(),
                    c.head_dim / 2
                ));
            }
            RopeScaling::Linear(f) if !positive(*f) => {
                return bad(format!(
                    "linear rope scaling factor {f} must be finite and positive"
                ));
            }
            _ => {}
        }
        if !positive(c.rms_norm_eps) {
            return bad(format!(
                "rms_norm_eps {} must be finite and positive",
                c.rms_norm_eps
            ));
        }
        if !positive(c.rope_theta) {
            return bad(format!(
                "rope_theta {} must be finite and positive",
                c.rope_theta
            ));
        }
        Ok(())
    }

    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Rotary inverse frequencies (`head_dim / 2` values) after any scaling.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let hd = self.head_dim;
        let base: Vec<f32> = (0..hd / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f32 / hd as f32))
            .collect();
        match &self.rope_scaling {
            RopeScaling::None => base,
            RopeScaling::Factors(f) => base.iter().zip(f).map(|(b, f)| b / f).collect(),
            RopeScaling::Linear(factor) => base.iter().map(|b| b / factor).collect(),
            RopeScaling::Llama3(s) => base
                .iter()
                .map(|&f| {
                    let old = s.original_max_position_embeddings as f32;
                    let low_wavelen = old / s.low_freq_factor;
                    let high_wavelen = old / s.high_freq_factor;
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / s.factor
                    } else {
                        let smooth = (old / wavelen - s.low_freq_factor)
                            / (s.high_freq_factor - s.low_freq_factor);
                        (1.0 - smooth) * f / s.factor + smooth * f
                    }
                })
                .collect(),
        }
    }

    /// Reads the hyper-parameters from GGUF metadata (`{arch}.*` keys).
    pub fn from_gguf(g: &GgufFile) -> Result<Config> {
        let arch_name = g.architecture()?.to_string();
        let arch = Arch::parse(&arch_name)?;
        let k = |s: &str| format!("{arch_name}.{s}");
        let u = |s: &str| -> Result<usize> { Ok(g.get_u64(&k(s))? as usize) };
        let hidden_size = u("embedding_length")?;
        let num_attention_heads = u("attention.head_count")?;
        let num_key_value_heads = g
            .opt_u64(&k("attention.head_count_kv"))?
            .map_or(num_attention_heads, |v| v as usize);
        let head_dim = match g.opt_u64(&k("attention.key_length"))? {
            Some(v) => v as usize,
            None => hidden_size.checked_div(num_attention_heads).unwrap_or(0),
        };
        let unsupported = |m: String| Err(Error::Config(format!("{}: {m}", g.label())));
        // What the forward pass does not implement is refused here rather than run wrongly.
        if let Some(v) = g.opt_u64(&k("attention.value_length"))? {
            if v as usize != head_dim {
                return unsupported(format!(
                    "{arch_name}.attention.value_length {v} differs from the key length \
                     {head_dim}, which is not supported"
                ));
            }
        }
        if let Some(d) = g.opt_u64(&k("rope.dimension_count"))? {
            if d as usize != head_dim {
                return unsupported(format!(
                    "{arch_name}.rope.dimension_count {d} is not the head size {head_dim} \
                     (partial rotary embeddings are not supported)"
                ));
            }
        }
        if let Some(n) = g.opt_u64(&k("expert_count"))? {
            if n > 0 {
                return unsupported(format!(
                    "{arch_name}.expert_count {n}: mixture-of-experts models are not supported"
                ));
            }
        }
        let vocab_size = match g.opt_u64(&k("vocab_size"))? {
            Some(v) => v as usize,
            None => g.get_array("tokenizer.ggml.tokens")?.len(),
        };
        let rope_theta = g.opt_f32(&k("rope.freq_base"))?.unwrap_or(10000.0);
        // llama.cpp reads the factor from `rope.scaling.factor` (older files: `rope.scale_linear`)
        // and takes the type as linear unless the file names another.
        let factor = match g.opt_f32(&k("rope.scaling.factor"))? {
            Some(f) => Some(f),
            None => g.opt_f32(&k("rope.scale_linear"))?,
        };
        let kind = g.opt_str(&k("rope.scaling.type"))?.unwrap_or("linear");
        let rope_scaling = match (g.tensor("rope_freqs.weight"), kind, factor) {
            (Some(t), _, _) => RopeScaling::Factors(g.dequantize(t)?),
            (None, _, None) | (None, "none", _) => RopeScaling::None,
            (None, _, Some(f)) if f == 0.0 || f == 1.0 => RopeScaling::None,
            (None, "linear", Some(f)) => RopeScaling::Linear(f),
            (None, other, Some(f)) => {
                return unsupported(format!(
                    "{arch_name}.rope.scaling.type {other:?} (factor {f}) is not supported"
                ))
            }
        };
        let tie_word_embeddings = g.tensor("output.weight").is_none();
        let c = Config {
            arch,
            hidden_size,
            intermediate_size: u("feed_forward_length")?,
            num_hidden_layers: u("block_count")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
            rms_norm_eps: g.get_f32(&k("attention.layer_norm_rms_epsilon"))?,
            rope_theta,
            rope_scaling,
            max_position_embeddings: u("context_length")?,
            tie_word_embeddings,
            attention_bias: g.tensor("blk.0.attn_q.bias").is_some(),
        };
        c.validate()?;
        Ok(c)
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_json(path: &Path) -> Result<Config> {
        let text = crate::error::read_text(path)?;
        let j: HfConfig = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.into(),
            source,
        })?;
        let arch_name = j
            .architectures
            .as_ref()
            .and_then(|a| a.first().cloned())
            .or(j.model_type.clone())
            .ok_or_else(|| {
                Error::Config(format!(
                    "{}: neither 'architectures' nor 'model_type'",
                    path.display()
                ))
            })?;
        let arch = Arch::parse(&arch_name)?;
        if let Some(act) = j
            .hidden_act
            .as_deref()
            .filter(|a| !matches!(*a, "silu" | "swish"))
        {
            return Err(Error::Config(format!(
                "{}: hidden_act {act:?} is not supported (the MLP is SiLU-gated)",
                path.display()
            )));
        }
        let num_key_value_heads = j.num_key_value_heads.unwrap_or(j.num_attention_heads);
        let head_dim = j.head_dim.unwrap_or(
            j.hidden_size
                .checked_div(j.num_attention_heads)
                .unwrap_or(0),
        );
        let rope_kind = j
            .rope_scaling
            .as_ref()
            .and_then(|s| s.rope_type.as_deref().or(s.kind.as_deref()));
        let rope_scaling = match &j.rope_scaling {
            Some(s) if rope_kind == Some("linear") => {
                RopeScaling::Linear(s.factor.ok_or_else(|| {
                    Error::Config(format!("{}: rope_scaling.factor missing", path.display()))
                })?)
            }
            Some(s) if rope_kind == Some("llama3") => {
                let need = |v: Option<f32>, n: &str| {
                    v.ok_or_else(|| {
                        Error::Config(format!("{}: rope_scaling.{n} missing", path.display()))
                    })
                };
                RopeScaling::Llama3(Llama3RopeScaling {
                    factor: need(s.factor, "factor")?,
                    low_freq_factor: need(s.low_freq_factor, "low_freq_factor")?,
                    high_freq_factor: need(s.high_freq_factor, "high_freq_factor")?,
                    original_max_position_embeddings: s
                        .original_max_position_embeddings
                        .ok_or_else(|| {
                            Error::Config(format!(
                                "{}: rope_scaling.original_max_position_embeddings missing",
                                path.display()
                            ))
                        })?,
                })
            }
            Some(_) => {
                return Err(Error::Config(format!(
                    "{}: unsupported rope_scaling type {:?}",
                    path.display(),
                    rope_kind
                )))
            }
            None => RopeScaling::None,
        };
        // Attention limited to a sliding window (Mistral-7B-v0.1's 4096 positions) equals full
        // attention up to the window; the context is capped there rather than run past it.
        let max_position_embeddings = match (j.sliding_window, j.use_sliding_window) {
            (Some(w), None | Some(true)) => j.max_position_embeddings.unwrap_or(2048).min(w),
            _ => j.max_position_embeddings.unwrap_or(2048),
        };
        let c = Config {
            arch,
            hidden_size: j.hidden_size,
            intermediate_size: j.intermediate_size,
            num_hidden_layers: j.num_hidden_layers,
            num_attention_heads: j.num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size: j.vocab_size,
            rms_norm_eps: j.rms_norm_eps,
            rope_theta: j.rope_theta.unwrap_or(10000.0),
            rope_scaling,
            max_position_embeddings,
            tie_word_embeddings: j.tie_word_embeddings.unwrap_or(false),
            attention_bias: j.attention_bias.unwrap_or(arch == Arch::Qwen2),
        };
        c.validate()?;
        Ok(c)
    }
}

#[derive(Deserialize)]
struct HfRopeScaling {
    rope_type: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    factor: Option<f32>,
    low_freq_factor: Option<f32>,
    high_freq_factor: Option<f32>,
    original_max_position_embeddings: Option<usize>,
}

#[derive(Deserialize)]
struct HfConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    rms_norm_eps: f32,
    rope_theta: Option<f32>,
    rope_scaling: Option<HfRopeScaling>,
    max_position_embeddings: Option<usize>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    hidden_act: Option<String>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
}
