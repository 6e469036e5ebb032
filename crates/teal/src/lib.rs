//! teal: Llama-family inference with TEAL activation sparsity.

pub mod chat;
pub mod gguf;
pub mod tokenizer;
