//! Kernels for teal. Every op has a plain scalar reference in [`reference`](mod@reference);
//! every fast path (SIMD, threads) in [`cpu`] is tested against it; [`pool`] runs the decode
//! kernels' threads. [`packed`] defines the weight formats.

pub mod cpu;
pub mod cuda;
pub mod packed;
pub mod pool;
pub mod quant;
pub mod rand;
pub mod reference;
