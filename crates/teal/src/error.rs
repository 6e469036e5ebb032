//! The library's one error type. Every variant names what was wrong and where.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Gguf(#[from] crate::gguf::GgufError),
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    #[error(transparent)]
    Chat(#[from] crate::chat::ChatError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Safetensors { path: PathBuf, msg: String },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("unsupported architecture '{0}' (supported: llama, mistral, qwen2)")]
    UnsupportedArchitecture(String),
    #[error("model config: {0}")]
    Config(String),
    #[error("{path}: {msg}")]
    Model { path: PathBuf, msg: String },
    #[error("tensor '{name}' missing from {source_desc}")]
    MissingTensor { name: String, source_desc: String },
    #[error("tensor '{name}': shape {got:?}, expected {expected:?}")]
    TensorShape {
        name: String,
        got: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("tensor '{name}': {msg}")]
    Tensor { name: String, msg: String },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("{}", context_overflow(what, *got, *ctx))]
    ContextOverflow {
        what: &'static str,
        got: usize,
        ctx: usize,
    },
    #[error(
        "logit {value} at position {position} (token {token}): the model's activations \
         overflowed or its weights hold non-finite values{}",
        if *kv_f16 { " (an f16 KV cache overflows beyond 65504: try an f32 cache, --kv-dtype f32)" } else { "" }
    )]
    NonFiniteLogits {
        position: usize,
        token: usize,
        value: f32,
        /// Whether the KV cache holds f16, which overflows where f32 would not.
        kv_f16: bool,
    },
    #[error("{path}: not valid UTF-8 text (first bad byte at offset {offset})")]
    NotUtf8 { path: PathBuf, offset: usize },
    #[error(transparent)]
    Cuda(#[from] teal_kernels::cuda::CudaError),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// [`Error::ContextOverflow`]'s message: `got` positions where the context holds `ctx` (a
/// prompt as long as the context leaves no room for the token it is to generate).
fn context_overflow(what: &str, got: usize, ctx: usize) -> String {
    let tokens = |n: usize| if n == 1 { "token" } else { "tokens" };
    if got == ctx {
        format!(
            "{what} of {got} {} fills the context of {ctx} {}: no room is left for a token to \
             generate",
            tokens(got),
            tokens(ctx)
        )
    } else {
        format!(
            "{what} of {got} {} is longer than the context of {ctx} {}",
            tokens(got),
            tokens(ctx)
        )
    }
}

/// Reads a whole text file, naming the file in every error.
pub fn read_text(path: &std::path::Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.into(),
        source,
    })?;
    String::from_utf8(bytes).map_err(|e| Error::NotUtf8 {
        path: path.into(),
        offset: e.utf8_error().valid_up_to(),
    })
}

#[cfg(test)]
mod tests {
    use super::Error;

    #[test]
    fn context_overflow_reads_right_at_every_count() {
        let e = |got, ctx| {
            Error::ContextOverflow {
                what: "the prompt",
                got,
                ctx,
            }
            .to_string()
        };
        assert_eq!(
            e(9, 8),
            "the prompt of 9 tokens is longer than the context of 8 tokens"
        );
        assert_eq!(
            e(2, 1),
            "the prompt of 2 tokens is longer than the context of 1 token"
        );
        assert_eq!(
            e(1, 1),
            "the prompt of 1 token fills the context of 1 token: no room is left for a token \
             to generate"
        );
    }
}
