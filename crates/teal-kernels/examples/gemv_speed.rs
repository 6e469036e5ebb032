//! Median GB/s of the CPU GEMV (dense and 50% sparse) per shape and weight format: a quick
//! probe for comparing two builds run alternately (`scripts/gemv-ab.py`); the criterion bench
//! `gemv` is the full measurement.
//!
//!   cargo run --release -p teal-kernels --example gemv_speed -- f16 q8
use std::time::Instant;
use teal_kernels::cpu;
use teal_kernels::packed::{Dtype, PackedT};
use teal_kernels::rand::uniform as rand_vec;

fn main() {
    let shapes = [
        (4096usize, 14336usize),
        (14336, 4096),
        (4096, 4096),
        (8192, 28672),
        (576, 1536),
        (1536, 576),
    ];
    let dtypes: Vec<Dtype> = std::env::args()
        .skip(1)
        .filter_map(|a| Dtype::parse(&a))
        .collect();
    for &(n_in, n_out) in &shapes {
        let wt = rand_vec(n_in * n_out, 1);
        let x = rand_vec(n_in, 2);
        let mut y = vec![0.0f32; n_out];
        for &dtype in &dtypes {
            let p = PackedT::from_input_major(dtype, &wt, n_in, n_out).expect("pack");
            for s in [0.0f32, 0.5] {
                let mut a: Vec<f32> = x.iter().map(|v| v.abs()).collect();
                a.sort_by(f32::total_cmp);
                let t = if s == 0.0 {
                    -1.0
                } else {
                    a[(s * a.len() as f32) as usize - 1]
                };
                let reps = (2e9 / p.bytes() as f64).clamp(20.0, 2000.0) as usize;
                let mut times = vec![];
                for _ in 0..reps {
                    let m = p.mat();
                    let t0 = Instant::now();
                    cpu::gemv_sparse(&m, &x, t, &mut y);
                    times.push(t0.elapsed().as_secs_f64());
                }
                let gb = p.bytes() as f64 * (1.0 - s as f64) / 1e9;
                times.sort_by(f64::total_cmp);
                print!(
                    "{n_in}x{n_out} {} s={s}: {:.1} GB/s | ",
                    dtype.name(),
                    gb / times[times.len() / 2]
                );
            }
            println!();
        }
    }
}
