//! Decode speed of the engine's GPU model (the `Decoder` that `teal run --device cuda:N`
//! uses) on a seeded random-weights model: greedy decoding of `--steps` tokens after an
//! 8-token prompt, dense and at TEAL thresholds calibrated on the model's own prompt
//! activations (exact |x| quantile per site, the same s for all seven projections), median of
//! `--reps` runs. Prints tok/s; the first run of each setting (graph capture) is not timed.
//!
//! With `--profile`, one more greedy step per sparsity runs inside a profiler range
//! (`ncu --profile-from-start off` records only those steps' kernels).
//!
//! Usage: gpu_decode [--shape smollm2-135m] [--dtype bf16] [--steps 128] [--reps 5]
//!        [--sparsities 0,0.25,0.4,0.5,0.65] [--profile]

use std::time::Instant;
use teal::device::Device;
use teal::generate::Models;
use teal::linear::InputMask;
use teal::models::llama::{Logits, Observer, Site};
use teal::models::random;

struct Samples(Vec<[Vec<f32>; 4]>);

impl Observer for Samples {
    fn observe(&mut self, layer: usize, site: Site, rows: &[f32], _width: usize) {
        let s = Site::ALL.iter().position(|&x| x == site).unwrap_or(0);
        self.0[layer][s].extend(rows.iter().map(|v| v.abs()));
    }
}

fn quantile(v: &[f32], s: f64) -> f32 {
    let mut a = v.to_vec();
    a.sort_by(f32::total_cmp);
    a[((s * a.len() as f64) as usize).min(a.len() - 1)]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
            .unwrap_or_else(|| default.to_string())
    };
    let shape = arg("--shape", "smollm2-135m");
    let dtype = arg("--dtype", "bf16");
    let steps: usize = arg("--steps", "128").parse()?;
    let reps: usize = arg("--reps", "5").parse()?;
    let sparsities = arg("--sparsities", "0,0.25,0.4,0.5,0.65")
        .split(',')
        .map(str::parse::<f64>)
        .collect::<Result<Vec<_>, _>>()?;
    let profile = args.iter().any(|a| a == "--profile");
    let device = Device::parse("cuda:0", &dtype)?;
    let c = random::shape(&shape)?;
    let model = random::random_llama(&c, 1, None)?;
    let prompt: Vec<u32> = (0..8u32)
        .map(|i| (i * 7919 + 13) % c.vocab_size as u32)
        .collect();
    let mut samples = Samples(vec![Default::default(); c.num_hidden_layers]);
    model.prefill_observed(
        &prompt,
        &mut model.new_cache(64),
        Logits::Last,
        Some(&mut samples),
    )?;
    let ctx = prompt.len() + steps + 2;
    println!("shape {shape}, {dtype} weights, {steps} greedy steps after 8 prompt tokens, median of {reps}");
    println!("{:>5} {:>10} {:>9}", "s", "ms/token", "tok/s");
    for &s in &sparsities {
        let masks: Vec<[Option<InputMask>; 7]> = samples
            .0
            .iter()
            .map(|l| {
                let t =
                    |site: usize| (s > 0.0).then(|| InputMask::Threshold(quantile(&l[site], s)));
                [t(0), t(0), t(0), t(1), t(2), t(2), t(3)]
            })
            .collect();
        let m = model.with_masks(&masks)?;
        let mut dec = match device.decoder(Models::single(&m), ctx) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("no GPU decoder: {e}");
                return Ok(());
            }
        };
        let mut times = Vec::new();
        let mut ids = Vec::new();
        let mut next = 0;
        for r in 0..=reps {
            dec.clear()?;
            next = teal::sampler::argmax(&dec.prefill(&prompt, Logits::Last)?);
            ids.clear();
            let t0 = Instant::now();
            for _ in 0..steps {
                next = dec.decode_greedy(next)?;
                ids.push(next);
            }
            if r > 0 {
                times.push(t0.elapsed().as_secs_f64() / steps as f64);
            }
        }
        if profile {
            teal_kernels::cuda::profiler_range(true)?;
            next = dec.decode_greedy(next)?;
            teal_kernels::cuda::profiler_range(false)?;
            println!("profiled one step at s = {s} (next id {next})");
        }
        times.sort_by(f64::total_cmp);
        let t = times[times.len() / 2];
        println!(
            "{s:>5.2} {:>10.3} {:>9.1}   {} first ids {:?}",
            t * 1e3,
            1.0 / t,
            dec.describe(),
            &ids[..6]
        );
    }
    Ok(())
}
