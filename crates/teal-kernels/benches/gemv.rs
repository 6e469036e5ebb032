//! Dense vs TEAL-sparse GEMV at Llama-3-8B and -70B shapes, per weight format, on random
//! weights. Throughput is the bytes of weights the kernel reads (kept rows only when sparse),
//! so criterion's GB/s is comparable with the machine's read bandwidth.
//!
//!   cargo bench -p teal-kernels --bench gemv                 # everything
//!   cargo bench -p teal-kernels --bench gemv -- '8b/.*q8'    # a filter (regex)

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::time::Duration;
use teal_kernels::packed::{Dtype, PackedT};
use teal_kernels::{cpu, reference};

/// `(name, in, out)`: Llama-3-8B (q/o, k/v, gate/up, down) and Llama-3-70B (q/o, gate/up, down).
const SHAPES: &[(&str, usize, usize)] = &[
    ("8b", 4096, 4096),
    ("8b", 4096, 1024),
    ("8b", 4096, 14336),
    ("8b", 14336, 4096),
    ("70b", 8192, 8192),
    ("70b", 8192, 28672),
    ("70b", 28672, 8192),
];

use teal_kernels::rand::uniform as rand_vec;

fn gemv(c: &mut Criterion) {
    for &(model, n_in, n_out) in SHAPES {
        let wt = rand_vec(n_in * n_out, 1);
        let x = rand_vec(n_in, 2);
        let mut y = vec![0.0f32; n_out];
        let mut g = c.benchmark_group(format!("{model}/{n_in}x{n_out}"));
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2));
        for dtype in Dtype::ALL {
            let p = PackedT::from_input_major(dtype, &wt, n_in, n_out).expect("pack");
            let m = p.mat();
            let row_bytes = p.bytes() as f64 / n_in as f64;
            g.throughput(Throughput::Bytes(p.bytes() as u64));
            g.bench_function(BenchmarkId::new(dtype.name(), "dense"), |b| {
                b.iter(|| cpu::gemv(&m, &x, &mut y))
            });
            for s in [0.0, 0.5, 0.75] {
                let t = reference::abs_threshold(&x, s);
                let kept = x.iter().filter(|v| v.abs() > t).count();
                g.throughput(Throughput::Bytes((kept as f64 * row_bytes) as u64));
                g.bench_function(BenchmarkId::new(dtype.name(), format!("sparse{s}")), |b| {
                    b.iter(|| cpu::gemv_sparse(&m, &x, t, &mut y))
                });
            }
        }
        g.finish();
    }
}

criterion_group!(benches, gemv);
criterion_main!(benches);
