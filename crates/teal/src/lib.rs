//! teal: Llama-family inference with TEAL activation sparsity.
//!
//! request → [`generate`] → [`models::llama`] → [`linear`] → `teal_kernels`.

pub mod assets;
pub mod bench;
pub mod chat;
pub mod config;
pub mod constrain;
pub mod device;
pub mod error;
pub mod eval;
pub mod generate;
pub mod gguf;
pub mod grammar;
pub mod json_schema;
pub mod kv_cache;
pub mod linear;
pub mod load;
pub mod loader;
pub mod models;
pub mod sampler;
pub mod sparsity;
pub mod tokenizer;
pub mod tools;

pub use error::{Error, Result};
pub use load::ModelFiles;
pub use teal_kernels::cpu::{int8_dots, simd_available};
pub use teal_kernels::packed::Dtype;
