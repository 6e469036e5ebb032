//! Quality evaluation.

pub mod perplexity;
