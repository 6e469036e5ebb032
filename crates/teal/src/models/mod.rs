//! Model families. One file per family; field names are the checkpoint's names.

pub mod llama;
pub mod llama_gpu;
pub mod random;
