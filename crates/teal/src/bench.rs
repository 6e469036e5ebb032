//! Decode benchmark in the form of llama-bench: prompt and decode speed per sparsity, the bytes
//! of weights each decoded token reads (the sparse projections scaled by their realized
//! density), the effective bandwidth that implies, and its ratio to this machine's measured
//! read bandwidth (the floor a memory-bound decode cannot beat).

use crate::error::{Error, Result};
use crate::eval::sparse::MaskCounter;
use crate::models::llama::{DecodeScratch, Llama, Logits};
use std::time::Instant;
use teal_kernels::cpu;

/// Streaming-read bandwidth of this machine in bytes per second: every thread of the pool sums
/// its share of a buffer of `bytes` (make it much larger than the last-level cache); best of
/// `reps` passes after one untimed pass.
pub fn read_bandwidth(bytes: usize, reps: usize) -> f64 {
    use rayon::prelude::*;
    let buf = vec![1.0f32; bytes / 4];
    let threads = rayon::current_num_threads().max(1);
    let per = buf.len().div_ceil(threads * 8).max(1);
    let mut best = f64::INFINITY;
    for r in 0..=reps {
        let t0 = Instant::now();
        let s: f32 = buf.par_chunks(per).map(cpu::sum).sum();
        let dt = t0.elapsed().as_secs_f64();
        std::hint::black_box(s);
        if r > 0 {
            best = best.min(dt);
        }
    }
    (buf.len() * 4) as f64 / best
}

/// This process's resident memory from `/proc/self/status`: `(VmRSS, VmHWM)` in bytes, the
/// current and the peak resident set. `None` where there is no such file (not Linux).
pub fn resident_memory() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |key: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        let kib: u64 = line[key.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Tokens decoded per repetition.
    pub n_decode: usize,
    /// Timed repetitions (one more, untimed, warms up).
    pub reps: usize,
}

/// Median and spread of one quantity over the repetitions.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stat {
    fn of(mut v: Vec<f64>) -> Stat {
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Stat {
            median,
            min: v[0],
            max: v[n - 1],
        }
    }
}

/// One row of the benchmark.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchResult {
    /// Requested model-wide sparsity.
    pub sparsity: f64,
    /// Realized parameter-weighted sparsity of the projections over the decoded tokens.
    pub realized_sparsity: f64,
    pub decode: Stat,
    pub prompt: Stat,
    /// Bytes read per decoded token: projections (times their realized density), LM head,
    /// one embedding row, the KV cache at the mean decode position.
    pub bytes_per_token: f64,
    /// `bytes_per_token * decode tok/s`, in GB/s (1e9 bytes).
    pub gb_s: f64,
    /// `gb_s` over the measured read bandwidth.
    pub floor_ratio: f64,
    /// Bytes of the f32 KV cache of one repetition (prompt plus decoded tokens).
    pub kv_cache_bytes: usize,
    /// VmRSS at the end of the warm-up repetition, its KV cache filled and its scratch alive.
    pub resident_bytes: Option<u64>,
}

/// Runs the benchmark for one model variant: `model` is the dense or sparse model (its masks
/// decide which inputs are read), `prompt` the prompt tokens, `bandwidth` the measured read
/// bandwidth in bytes/s.
pub fn bench_decode(
    model: &Llama,
    sparsity: f64,
    prompt: &[u32],
    opts: &BenchOptions,
    bandwidth: f64,
) -> Result<BenchResult> {
    if prompt.is_empty() {
        return Err(Error::EmptyPrompt);
    }
    if opts.reps == 0 || opts.n_decode == 0 {
        return Err(Error::Invalid(
            "bench needs at least one repetition and one decoded token".into(),
        ));
    }
    let c = &model.config;
    let ctx = prompt.len() + opts.n_decode + 1;
    if ctx > c.max_position_embeddings {
        return Err(Error::ContextOverflow {
            what: "prompt plus decoded tokens",
            got: ctx,
            ctx: c.max_position_embeddings,
        });
    }
    let mut decode_s = Vec::with_capacity(opts.reps);
    let mut prompt_s = Vec::with_capacity(opts.reps);
    let mut generated = Vec::new();
    let mut scratch = DecodeScratch::new(c, ctx);
    let mut resident_bytes = None;
    for r in 0..=opts.reps {
        let mut cache = model.new_cache(ctx);
        let t0 = Instant::now();
        let logits = model.prefill(prompt, &mut cache, Logits::Last)?;
        let tp = t0.elapsed().as_secs_f64();
        let mut next = crate::sampler::argmax(&logits);
        generated.clear();
        let t1 = Instant::now();
        for _ in 0..opts.n_decode {
            generated.push(next);
            next = crate::sampler::argmax(model.decode(next, &mut cache, &mut scratch)?);
        }
        let td = t1.elapsed().as_secs_f64();
        if r == 0 {
            resident_bytes = resident_memory().map(|(rss, _)| rss);
        }
        if r > 0 {
            prompt_s.push(prompt.len() as f64 / tp);
            decode_s.push(opts.n_decode as f64 / td);
        }
    }
    let decode = Stat::of(decode_s);

    // Realized density of each projection on the decoded positions, from the same tokens.
    let mut counter = MaskCounter::new(model, prompt.len());
    let all: Vec<u32> = prompt.iter().chain(&generated).copied().collect();
    let mut cache = model.new_cache(ctx);
    model.prefill_observed(&all, &mut cache, Logits::Last, Some(&mut counter))?;

    let (mut proj_bytes, mut dense_proj_bytes) = (0.0, 0.0);
    for (l, b) in model.layers.iter().enumerate() {
        for (p, (_, lin)) in b.linears().iter().enumerate() {
            // A dense projection reads every row, zeros included.
            let (zeroed, total) = counter.counts[l][p];
            let density = match lin.mask() {
                Some(_) => (total - zeroed) as f64 / total.max(1) as f64,
                None => 1.0,
            };
            proj_bytes += density * lin.weight_bytes() as f64;
            dense_proj_bytes += lin.weight_bytes() as f64;
        }
    }
    let mean_keys = prompt.len() as f64 + (opts.n_decode as f64 + 1.0) / 2.0;
    let kv_bytes = 2.0 * c.num_hidden_layers as f64 * mean_keys * c.kv_dim() as f64 * 4.0;
    let bytes_per_token = proj_bytes
        + model.lm_head.weight_bytes() as f64
        + model.embed_tokens.row_bytes() as f64
        + kv_bytes;
    let gb_s = bytes_per_token * decode.median / 1e9;
    Ok(BenchResult {
        sparsity,
        realized_sparsity: 1.0 - proj_bytes / dense_proj_bytes,
        decode,
        prompt: Stat::of(prompt_s),
        bytes_per_token,
        gb_s,
        floor_ratio: gb_s * 1e9 / bandwidth,
        kv_cache_bytes: 2 * c.num_hidden_layers * ctx * c.kv_dim() * 4,
        resident_bytes,
    })
}
