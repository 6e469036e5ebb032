//! Decode benchmark in the form of llama-bench: prompt and decode speed per sparsity, the bytes
//! of weights each decoded token reads (the sparse projections scaled by their realized
//! density), the effective bandwidth that implies, and its ratio to the device's measured
//! bandwidth (the floor a memory-bound decode cannot beat). It drives a [`Decoder`], so the
//! same code measures the CPU and a GPU.

use crate::device::Decoder;
use crate::error::{Error, Result};
use crate::eval::sparse::MaskCounter;
use crate::models::llama::{Llama, Logits};
use crate::sparsity::calibrate::{calibrate, CalibOptions};
use crate::sparsity::thresholds::Fingerprint;
use crate::sparsity::Thresholds;
use std::time::Instant;
use teal_kernels::cpu;
use teal_kernels::packed::Dtype;

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
    /// `gb_s` over the device's measured bandwidth ([`Decoder::bandwidth`]).
    pub floor_ratio: f64,
    /// Bytes of the f32 KV cache of one repetition (prompt plus decoded tokens).
    pub kv_cache_bytes: usize,
    /// VmRSS at the end of the warm-up repetition, its KV cache filled and its scratch alive.
    pub resident_bytes: Option<u64>,
}

/// Runs the benchmark for one model variant on `dec` (a decoder of `model`, its masks set
/// with [`Decoder::set_masks`]): `model` carries the same masks on the CPU, to count which
/// inputs they zero; `prompt` the prompt tokens, `bandwidth` the device's measured bandwidth in
/// bytes/s ([`Decoder::bandwidth`]).
pub fn bench_decode(
    dec: &mut dyn Decoder,
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
    let ctx = prompt.len() + opts.n_decode + 1;
    if ctx > dec.capacity() {
        return Err(Error::ContextOverflow {
            what: "prompt plus decoded tokens",
            got: ctx,
            ctx: dec.capacity(),
        });
    }
    let mut decode_s = Vec::with_capacity(opts.reps);
    let mut prompt_s = Vec::with_capacity(opts.reps);
    let mut generated = Vec::new();
    let mut resident_bytes = None;
    for r in 0..=opts.reps {
        dec.clear()?;
        let t0 = Instant::now();
        let logits = dec.prefill(prompt, Logits::Last)?;
        let tp = t0.elapsed().as_secs_f64();
        let mut next = crate::sampler::argmax(&logits);
        generated.clear();
        let t1 = Instant::now();
        for _ in 0..opts.n_decode {
            generated.push(next);
            next = dec.decode_greedy(next)?;
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
    let mut counter = MaskCounter::new(model, 0);
    dec.clear()?;
    dec.prefill(prompt, Logits::Last)?;
    dec.prefill_observed(&generated, &mut counter)?;

    let fp = dec.footprint();
    let (mut proj_bytes, mut dense_proj_bytes) = (0.0, 0.0);
    for (l, b) in model.layers.iter().enumerate() {
        for (p, (_, lin)) in b.linears().iter().enumerate() {
            // A dense projection reads every row, zeros included.
            let (zeroed, total) = counter.counts[l][p];
            let density = match lin.mask() {
                Some(_) => (total - zeroed) as f64 / total.max(1) as f64,
                None => 1.0,
            };
            proj_bytes += density * fp.proj[l][p];
            dense_proj_bytes += fp.proj[l][p];
        }
    }
    let mean_keys = prompt.len() as f64 + (opts.n_decode as f64 + 1.0) / 2.0;
    let bytes_per_token = proj_bytes + fp.lm_head + fp.embed_row + fp.kv_per_position * mean_keys;
    let gb_s = bytes_per_token * decode.median / 1e9;
    Ok(BenchResult {
        sparsity,
        realized_sparsity: 1.0 - proj_bytes / dense_proj_bytes,
        decode,
        prompt: Stat::of(prompt_s),
        bytes_per_token,
        gb_s,
        floor_ratio: gb_s * 1e9 / bandwidth,
        kv_cache_bytes: (fp.kv_per_position * ctx as f64) as usize,
        resident_bytes,
    })
}

/// Tokens of calibration a random-weights model is calibrated on ([`random_model`]).
pub const RANDOM_CALIBRATION_TOKENS: usize = 32;

/// `n` token ids spread over a vocabulary of `vocab` (prompts for random-weights models).
pub fn spread_tokens(n: usize, vocab: usize, salt: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(7919).wrapping_add(13 + salt * 104_729)) % vocab as u32)
        .collect()
}

/// A seeded random-weights model of a named shape ([`crate::models::random::shape`]) stored in
/// `dtype`, with TEAL statistics calibrated on its own activations by the calibration code
/// (one window of [`RANDOM_CALIBRATION_TOKENS`] spread token ids, no weight-aware or greedy
/// tables): thresholds for any sparsity with uniform allocation.
pub fn random_model(shape: &str, dtype: Dtype, seed: u64) -> Result<(Llama, Thresholds)> {
    let c = crate::models::random::shape(shape)?;
    let model = crate::models::random::random_llama_as(&c, seed, dtype)?;
    let tokens = spread_tokens(RANDOM_CALIBRATION_TOKENS, c.vocab_size, 1);
    let opts = CalibOptions {
        samples: 1,
        seq_len: tokens.len(),
        greedy: None,
        weight_aware: false,
        text_label: format!("{} random token ids", tokens.len()),
        text_bytes: 0,
    };
    let fp = Fingerprint::with_hash(&c, format!("random:{shape}:{seed}"));
    let th = calibrate(&model, fp, &tokens, &opts, &mut |_, _, _| {})?;
    Ok((model, th))
}
