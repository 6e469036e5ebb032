//! Decode attention (one query position over the KV cache) at the head shapes of SmolLM2-135M,
//! Qwen2.5-0.5B and Llama-3-8B, at several context lengths. Throughput is the bytes of keys and
//! values read (f32), so criterion's GB/s is comparable with the machine's read bandwidth.
//!
//!   cargo bench -p teal-kernels --bench attention
//!   cargo bench -p teal-kernels --bench attention -- 'smollm2'    # a filter (regex)

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::time::Duration;
use teal_kernels::cpu;
use teal_kernels::rand::uniform as rand_vec;

/// `(name, query heads, key/value heads, head dim)`.
const SHAPES: &[(&str, usize, usize, usize)] = &[
    ("smollm2-135m", 9, 3, 64),
    ("qwen2.5-0.5b", 14, 2, 64),
    ("llama3-8b", 32, 8, 128),
];

fn attention(c: &mut Criterion) {
    for &(name, n_head, n_kv, hd) in SHAPES {
        let mut g = c.benchmark_group(format!("attention/{name}"));
        g.sample_size(20)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1));
        for n_keys in [64usize, 512, 2048] {
            let q = rand_vec(n_head * hd, 1);
            let k = rand_vec(n_keys * n_kv * hd, 2);
            let v = rand_vec(n_keys * n_kv * hd, 3);
            let mut scores = vec![0.0f32; n_head * n_keys];
            let mut out = vec![0.0f32; n_head * hd];
            g.throughput(Throughput::Bytes((2 * n_keys * n_kv * hd * 4) as u64));
            g.bench_function(BenchmarkId::from_parameter(n_keys), |b| {
                b.iter(|| {
                    cpu::attention_decode(
                        &q,
                        &k,
                        &v,
                        n_keys,
                        n_head,
                        n_kv,
                        hd,
                        &mut scores,
                        &mut out,
                    )
                })
            });
        }
        g.finish();
    }
}

criterion_group!(benches, attention);
criterion_main!(benches);
