//! Kernels for teal. Every op has a plain scalar reference in [`reference`]; every fast path
//! (SIMD, threads) is tested against it.

pub mod quant;
