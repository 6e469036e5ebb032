//! Quality evaluation.

pub mod perplexity;
pub mod sparse;
