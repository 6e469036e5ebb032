//! Decode benchmark in the form of llama-bench: prompt and decode speed per sparsity, the bytes
//! of weights each decoded token reads (the sparse projections scaled by their realized
//! density), the effective bandwidth that implies, and its ratio to the device's measured
//! bandwidth (the floor a memory-bound decode cannot beat). It drives a [`Decoder`], so the
//! same code measures the CPU and a GPU.

use crate::device::{Decoder, Masks};
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
    let buf = vec![1.0f32; bytes / 4];
    let mut best = f64::INFINITY;
    for r in 0..=reps {
        let t0 = Instant::now();
        let s = cpu::par_sum(&buf);
        let dt = t0.elapsed().as_secs_f64();
        std::hint::black_box(s);
        if r > 0 {
            best = best.min(dt);
        }
    }
    (buf.len() * 4) as f64 / best
}

/// The value in bytes of a `/proc` line `key value kB` (`key` with its colon, e.g. `VmRSS:`)
/// in `text`, the contents of `/proc/self/status` or `/proc/meminfo`.
pub(crate) fn proc_kib_field(text: &str, key: &str) -> Option<u64> {
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix(key))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// This process's resident memory from `/proc/self/status`: `(VmRSS, VmHWM)` in bytes, the
/// current and the peak resident set. `None` where there is no such file (not Linux).
pub fn resident_memory() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    Some((
        proc_kib_field(&status, "VmRSS:")?,
        proc_kib_field(&status, "VmHWM:")?,
    ))
}

/// Memory the kernel reports as available for new allocations (`MemAvailable` of
/// /proc/meminfo) in bytes, where it can be read.
pub fn available_memory() -> Option<u64> {
    proc_kib_field(
        &std::fs::read_to_string("/proc/meminfo").ok()?,
        "MemAvailable:",
    )
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
    /// Decode tokens/s of each timed round, in order.
    pub decode_rounds: Vec<f64>,
    pub prompt: Stat,
    /// Bytes read per decoded token: projections (times their realized density), LM head,
    /// one embedding row, the KV cache at the mean decode position.
    pub bytes_per_token: f64,
    /// `bytes_per_token * decode tok/s`, in GB/s (1e9 bytes).
    pub gb_s: f64,
    /// `gb_s` over the device's measured bandwidth ([`Decoder::bandwidth`]).
    pub floor_ratio: f64,
    /// Bytes of the KV cache of one repetition (prompt plus decoded tokens), in the decoder's
    /// element type.
    pub kv_cache_bytes: usize,
    /// VmRSS at the end of this variant's warm-up repetition, its KV cache filled and its
    /// scratch alive.
    pub resident_bytes: Option<u64>,
    /// The decoder as it ran this variant ([`Decoder::describe`] after the warm-up
    /// repetition: a GPU decoder names the row splits it fitted to the masks).
    pub decoder: String,
}

/// One model variant of a benchmark run.
#[derive(Clone, Copy)]
pub struct Variant<'a> {
    /// Requested model-wide sparsity (0 for the dense model).
    pub sparsity: f64,
    /// The masks the decoder runs with ([`Decoder::set_masks`]); `None`: dense.
    pub masks: Option<&'a Masks>,
    /// The model carrying the same masks on the CPU, to count which inputs they zero.
    pub model: &'a Llama,
}

/// One repetition: the prompt, then `n_decode` greedy tokens. Returns the prefill and decode
/// seconds and the decoded tokens.
fn repetition(
    dec: &mut dyn Decoder,
    prompt: &[u32],
    n_decode: usize,
    generated: &mut Vec<u32>,
) -> Result<(f64, f64)> {
    dec.clear()?;
    let t0 = Instant::now();
    let logits = dec.prefill(prompt, Logits::Last)?;
    let tp = t0.elapsed().as_secs_f64();
    let mut next = crate::sampler::argmax(&logits);
    generated.clear();
    let t1 = Instant::now();
    for _ in 0..n_decode {
        generated.push(next);
        next = dec.decode_greedy(next)?;
    }
    Ok((tp, t1.elapsed().as_secs_f64()))
}

/// Runs every variant on `dec` (`prompt`: the prompt tokens, `bandwidth`: the device's
/// measured bandwidth in bytes/s, [`Decoder::bandwidth`]), interleaved: one untimed warm-up
/// repetition of each, then `opts.reps` rounds in which every variant runs once, so that a
/// change in the machine's load during the benchmark falls on all variants alike and their
/// per-round speeds ([`BenchResult::decode_rounds`]) can be compared pairwise. Where there are
/// several variants, each switch of masks is followed by an untimed prefill and decode step
/// (a GPU decoder captures its graphs again there).
pub fn bench_decode(
    dec: &mut dyn Decoder,
    variants: &[Variant],
    prompt: &[u32],
    opts: &BenchOptions,
    bandwidth: f64,
) -> Result<Vec<BenchResult>> {
    if prompt.is_empty() {
        return Err(Error::EmptyPrompt);
    }
    if opts.reps == 0 || opts.n_decode == 0 || variants.is_empty() {
        return Err(Error::Invalid(
            "bench needs at least one variant, one repetition and one decoded token".into(),
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
    let n = variants.len();
    let mut decode_s = vec![Vec::with_capacity(opts.reps); n];
    let mut prompt_s = vec![Vec::with_capacity(opts.reps); n];
    let mut generated = vec![Vec::new(); n];
    let mut resident_bytes = vec![None; n];
    let mut described = vec![String::new(); n];
    for (i, v) in variants.iter().enumerate() {
        dec.set_masks(v.masks)?;
        repetition(dec, prompt, opts.n_decode, &mut generated[i])?;
        described[i] = dec.describe();
        resident_bytes[i] = resident_memory().map(|(rss, _)| rss);
    }
    let mut scratch = Vec::new();
    for _ in 0..opts.reps {
        for (i, v) in variants.iter().enumerate() {
            if n > 1 {
                dec.set_masks(v.masks)?;
                repetition(dec, prompt, 1, &mut scratch)?;
            }
            let (tp, td) = repetition(dec, prompt, opts.n_decode, &mut scratch)?;
            prompt_s[i].push(prompt.len() as f64 / tp);
            decode_s[i].push(opts.n_decode as f64 / td);
        }
    }

    let mut results = Vec::with_capacity(n);
    for (i, v) in variants.iter().enumerate() {
        // Realized density of each projection on the decoded positions, from the same tokens.
        dec.set_masks(v.masks)?;
        let mut counter = MaskCounter::new(v.model, 0);
        dec.clear()?;
        dec.prefill(prompt, Logits::Last)?;
        dec.prefill_observed(&generated[i], &mut counter)?;

        let fp = dec.footprint();
        let (mut proj_bytes, mut dense_proj_bytes) = (0.0, 0.0);
        for (l, b) in v.model.layers.iter().enumerate() {
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
        let bytes_per_token =
            proj_bytes + fp.lm_head + fp.embed_row + fp.kv_per_position * mean_keys;
        let decode = Stat::of(decode_s[i].clone());
        let gb_s = bytes_per_token * decode.median / 1e9;
        results.push(BenchResult {
            sparsity: v.sparsity,
            realized_sparsity: 1.0 - proj_bytes / dense_proj_bytes,
            decode,
            decode_rounds: std::mem::take(&mut decode_s[i]),
            prompt: Stat::of(std::mem::take(&mut prompt_s[i])),
            bytes_per_token,
            gb_s,
            floor_ratio: gb_s * 1e9 / bandwidth,
            kv_cache_bytes: (fp.kv_per_position * ctx as f64) as usize,
            resident_bytes: resident_bytes[i],
            decoder: std::mem::take(&mut described[i]),
        });
    }
    Ok(results)
}

/// The median over rounds of `a`'s decode speed over `b`'s in the same round (two results of
/// one [`bench_decode`] run); `None` where they share no round.
pub fn paired_speedup(a: &BenchResult, b: &BenchResult) -> Option<f64> {
    let ratios: Vec<f64> = a
        .decode_rounds
        .iter()
        .zip(&b.decode_rounds)
        .map(|(x, y)| x / y)
        .collect();
    (!ratios.is_empty()).then(|| Stat::of(ratios).median)
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
        fisher: None,
        text_label: format!("{} random token ids", tokens.len()),
        text_bytes: 0,
    };
    let fp = Fingerprint::with_hash(&c, format!("random:{shape}:{seed}"));
    let th = calibrate(&model, fp, &tokens, &opts, &mut |_, _, _| {})?;
    Ok((model, th))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Device;
    use crate::generate::Models;
    use crate::sparsity::thresholds::{Allocation, Mode, Quantile, SparsitySpec};

    /// Dense and 50 % sparse variants of a tiny random model, run interleaved: one result per
    /// variant, in order, with one speed per round, the dense one reading every row and the
    /// sparse one about half of them.
    #[test]
    fn variants_run_interleaved_with_a_speed_per_round() {
        let (model, th) = random_model("qwen2-tiny", Dtype::F32, 3).unwrap();
        let spec = SparsitySpec {
            target: 0.5,
            allocation: Allocation::Uniform,
            quantile: Quantile::Abs,
            mode: Mode::All,
        };
        let masks = th.resolve(&spec).unwrap();
        let sparse = model.with_masks(&masks).unwrap();
        let variants = [
            Variant {
                sparsity: 0.0,
                masks: None,
                model: &model,
            },
            Variant {
                sparsity: 0.5,
                masks: Some(&masks),
                model: &sparse,
            },
        ];
        let opts = BenchOptions {
            n_decode: 4,
            reps: 3,
        };
        let prompt = spread_tokens(5, model.config.vocab_size, 2);
        let mut dec = Device::Cpu
            .decoder(Models::single(&model), prompt.len() + 8)
            .unwrap();
        let r = bench_decode(&mut *dec, &variants, &prompt, &opts, 1e10).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].sparsity, r[1].sparsity), (0.0, 0.5));
        assert!(r.iter().all(|r| r.decode_rounds.len() == 3));
        assert_eq!(r[0].realized_sparsity, 0.0);
        assert!(
            (0.3..0.7).contains(&r[1].realized_sparsity),
            "{}",
            r[1].realized_sparsity
        );
        assert!(r[1].bytes_per_token < r[0].bytes_per_token);
        assert!(paired_speedup(&r[1], &r[0]).is_some_and(|s| s > 0.0));
    }
}
