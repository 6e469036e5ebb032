//! Decode speed of N sequences stepped together on the CPU (`device::decode_each`, what the
//! server's slots run): N decoders on one model, each after a 4-token prompt, then ROUNDS
//! rounds of one decode step each; prints the tokens per second of all N together.
//!
//!   cargo run --release -p teal --example lockstep_probe -- MODEL.gguf q8 4 [ROUNDS]
//!   cargo run --release -p teal --example lockstep_probe -- random:llama3-8b-2l f16 4 20
//!
//!   cargo run --release -p teal --example lockstep_probe -- MODEL.gguf q8 4 300 smollm2.json 0.5
//!
//! `random:SHAPE`: a random-weights model of that shape (`teal::bench::random_model`). After
//! ROUNDS, a thresholds file and a sparsity run the TEAL-sparse model (uniform, mode all).
//! Each sequence decodes its own greedy continuation.
use std::time::Instant;
use teal::device::{decode_each, CpuDecoder, Decoder};
use teal::generate::Models;
use teal::load::ModelFiles;
use teal::models::llama::Logits;
use teal_kernels::packed::Dtype;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dtype = Dtype::parse(&args[1]).unwrap();
    let n: usize = args[2].parse().unwrap();
    let model = match args[0].strip_prefix("random:") {
        Some(shape) => teal::bench::random_model(shape, dtype, 1).unwrap().0,
        None => ModelFiles::open(std::path::Path::new(&args[0]))
            .unwrap()
            .load_model_as(dtype)
            .unwrap(),
    };
    let rounds: usize = args.get(3).map_or(300, |r| r.parse().unwrap());
    // Optional TEAL masks: THRESHOLDS.json SPARSITY (uniform allocation, mode all).
    let model = match (args.get(4), args.get(5)) {
        (Some(path), Some(s)) => {
            let th = teal::sparsity::Thresholds::load(std::path::Path::new(path)).unwrap();
            let spec = teal::sparsity::SparsitySpec {
                target: s.parse().unwrap(),
                allocation: teal::sparsity::Allocation::Uniform,
                quantile: teal::sparsity::Quantile::Teal,
                mode: teal::sparsity::Mode::All,
            };
            model.with_masks(&th.resolve(&spec).unwrap()).unwrap()
        }
        _ => model,
    };
    rayon::scope(|s| {
        s.spawn(|_| {
            let mut decs: Vec<CpuDecoder> = (0..n)
                .map(|i| {
                    let mut d = CpuDecoder::new(Models::single(&model), 512);
                    d.prefill(&[1, 2 + i as u32, 3, 4], Logits::Last).unwrap();
                    d
                })
                .collect();
            let t0 = Instant::now();
            for r in 0..rounds {
                let mut ds: Vec<&mut dyn Decoder> =
                    decs.iter_mut().map(|d| d as &mut dyn Decoder).collect();
                let toks: Vec<u32> = (0..n).map(|i| (r * 7 + i * 13) as u32 % 1000).collect();
                for x in decode_each(&mut ds, &toks, |_, _| {}) {
                    x.unwrap();
                }
            }
            let dt = t0.elapsed().as_secs_f64();
            println!(
                "{} rows {n}: {:.1} tok/s together",
                dtype.name(),
                (rounds * n) as f64 / dt
            );
        })
    });
}
