//! Kernels for teal. Every op has a plain scalar reference in [`reference`]; every fast path
//! (SIMD, threads) in [`cpu`] is tested against it. [`packed`] defines the weight formats.

pub mod cpu;
pub mod cuda;
pub mod packed;
pub mod quant;
pub mod rand;
pub mod reference;
