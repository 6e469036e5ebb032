//! Median GB/s of the CPU GEMV (dense and 50% sparse) per shape and weight format: a quick
//! probe for comparing two builds run alternately (`scripts/gemv-ab.py`); the criterion bench
//! `gemv` is the full measurement.
//!
//!   cargo run --release -p teal-kernels --example gemv_speed -- f16 q8
//!   cargo run --release -p teal-kernels --example gemv_speed -- --group f16 q8
//!   cargo run --release -p teal-kernels --example gemv_speed -- --small q4   # Qwen2.5-0.5B and SmolLM2 shapes
//!
//! `--group`: SmolLM2's q/k/v GEMVs (576 -> 576, 192, 192) as three calls against one
//! `cpu::gemv_many` call, alternating, median microseconds per group.
//!
//!   cargo run --release -p teal-kernels --example gemv_speed -- --fused q8 f16
//!
//! `--fused`: SmolLM2's gate and up (576 -> 1536 each) as one `gemv_many` call of two
//! matrices against one 576 -> 3072 matrix (what storing `[gate | up]` side by side would
//! read), from DRAM, median microseconds: dense, uniform 50 %, and TEAL-greedy-like masks
//! (gate 0.45, up 0.41 of the same input: the fused matrix then reads the rows either keeps).
//!
//!   cargo run --release -p teal-kernels --example gemv_speed -- --patterns f16
//!
//! `--patterns`: microseconds per GEMV at 50 % sparsity on SmolLM2's shapes (1 GiB of copies,
//! so the weights come from DRAM) for kept rows that are the first half, every other row, two
//! of every four, eight of every sixteen, and TEAL's threshold on random inputs, against dense:
//! the same bytes, arranged differently (docs/PERFORMANCE.md, "short rows").
//!
//!   cargo run --release -p teal-kernels --example gemv_speed -- --vs-bandwidth f32 f16 bf16
//!
//!   cargo run --release -p teal-kernels --example gemv_speed -- --rows f16 q8 q4
//!
//! `--rows`: several decode steps' inputs through the same weights (`batch::gemv_many_rows`,
//! the slots' lockstep) against the same steps one GEMV after another, from DRAM, dense and
//! at 50 % (each row's own threshold), median microseconds for all the rows and the ratio.
//!
//!   cargo run --release -p teal-kernels --example gemv_speed -- --prefill q4 q8 f16
//!
//! `--prefill`: the prompt's matrix products (`cpu::matmul_packed`, T tokens through one
//! weight matrix) on Llama-3-8B's shapes (`--small`: SmolLM2's) for T = 8, 32, 64 and 512, median
//! milliseconds and GFLOP/s (2 T in out per product), and the same positions as decode rows
//! (`batch::gemv_many_rows`, eight at a time).
//!
//! `--vs-bandwidth`: dense GEMV against this machine's read bandwidth in the same rounds: each
//! round streams a 1 GiB buffer (every thread summing its share, as `teal bench` measures the
//! bandwidth), then runs each format's dense GEMV once over copies of every Llama shape filling
//! 256 MiB; the ratio GEMV GB/s / streaming GB/s per round, median and range over the rounds.
use std::time::Instant;
use teal_kernels::cpu::{self, Gemv, Mask};
use teal_kernels::packed::{Dtype, PackedT};
use teal_kernels::rand::uniform as rand_vec;
use teal_kernels::reference;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Three q/k/v GEMVs as separate calls and as one group.
fn group(dtypes: &[Dtype]) {
    let d = 576;
    let x = rand_vec(d, 9);
    for &dtype in dtypes {
        let ps: Vec<PackedT> = [576usize, 192, 192]
            .iter()
            .enumerate()
            .map(|(i, &o)| {
                PackedT::from_input_major(dtype, &rand_vec(d * o, i as u64), d, o).expect("pack")
            })
            .collect();
        let mut ys: Vec<Vec<f32>> = ps.iter().map(|p| vec![0.0; p.n_out]).collect();
        for s in [0.0f32, 0.5] {
            let t = reference::abs_threshold(&x, s as f64);
            let mut times = [vec![], vec![]];
            for it in 0..20000 {
                let t0 = Instant::now();
                if it % 2 == 0 {
                    for (p, y) in ps.iter().zip(ys.iter_mut()) {
                        cpu::gemv_sparse(&p.mat(), &x, t, y);
                    }
                } else {
                    let [a, b, c] = &mut ys[..] else {
                        unreachable!("three outputs")
                    };
                    let mask = Mask::Threshold(t);
                    cpu::gemv_many(
                        &x,
                        &mut [
                            Gemv {
                                w: ps[0].mat(),
                                mask,
                                y: a,
                            },
                            Gemv {
                                w: ps[1].mat(),
                                mask,
                                y: b,
                            },
                            Gemv {
                                w: ps[2].mat(),
                                mask,
                                y: c,
                            },
                        ],
                    );
                }
                times[it % 2].push(t0.elapsed().as_secs_f64() * 1e6);
            }
            let [a, b] = &mut times;
            println!(
                "q/k/v {} s={s}: three calls {:.1} us, one group {:.1} us",
                dtype.name(),
                median(a),
                median(b)
            );
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dtypes: Vec<Dtype> = args.iter().filter_map(|a| Dtype::parse(a)).collect();
    // On a worker of the pool, as the CLI runs its commands (a parallel section started from
    // outside the pool waits for a worker to pick it up).
    let small = args.iter().any(|a| a == "--small");
    if args.iter().any(|a| a == "--group") {
        rayon::scope(|s| s.spawn(|_| group(&dtypes)));
    } else if args.iter().any(|a| a == "--fused") {
        rayon::scope(|s| s.spawn(|_| fused(&dtypes)));
    } else if args.iter().any(|a| a == "--patterns") {
        rayon::scope(|s| s.spawn(|_| patterns(&dtypes)));
    } else if args.iter().any(|a| a == "--rows") {
        rayon::scope(|s| s.spawn(|_| rows(&dtypes, small)));
    } else if args.iter().any(|a| a == "--prefill") {
        rayon::scope(|s| s.spawn(|_| prefill(&dtypes, small)));
    } else if args.iter().any(|a| a == "--vs-bandwidth") {
        rayon::scope(|s| s.spawn(|_| vs_bandwidth(&dtypes)));
    } else {
        rayon::scope(|s| s.spawn(|_| matrices(&dtypes, small)));
    }
}

/// `cpu::matmul_packed` for several prompt lengths, median of a few runs each.
fn prefill(dtypes: &[Dtype], small: bool) {
    let shapes: &[(usize, usize)] = if small {
        &[(576, 1536), (1536, 576), (576, 576), (576, 192)]
    } else {
        &[(4096, 14336), (14336, 4096), (4096, 4096), (4096, 1024)]
    };
    for &(n_in, n_out) in shapes {
        let wt = rand_vec(n_in * n_out, 5);
        for &dtype in dtypes {
            let p = PackedT::from_input_major(dtype, &wt, n_in, n_out).expect("pack");
            for n_tok in [8usize, 32, 64, 512] {
                let x = rand_vec(n_tok * n_in, 11);
                let mut y = vec![0.0f32; n_tok * n_out];
                let reps = if small {
                    40
                } else {
                    (4096 / n_tok).clamp(3, 24)
                };
                let mut times = vec![];
                for _ in 0..reps + 1 {
                    let t0 = Instant::now();
                    cpu::matmul_packed(&x, n_tok, &p.mat(), &mut y);
                    times.push(t0.elapsed().as_secs_f64());
                }
                times.remove(0);
                let t = median(&mut times);
                let gflop = 2.0 * (n_tok * n_in * n_out) as f64 / 1e9;
                let mut rows_t = vec![];
                for _ in 0..reps + 1 {
                    let t0 = Instant::now();
                    for (xc, yc) in x.chunks(8 * n_in).zip(y.chunks_mut(8 * n_out)) {
                        teal_kernels::batch::gemv_many_rows(
                            xc,
                            xc.len() / n_in,
                            &mut [Gemv {
                                w: p.mat(),
                                mask: Mask::Dense,
                                y: yc,
                            }],
                        );
                    }
                    rows_t.push(t0.elapsed().as_secs_f64());
                }
                rows_t.remove(0);
                let tr = median(&mut rows_t);
                println!(
                    "prefill {n_in}x{n_out} {dtype:?} T {n_tok}: {:.3} ms, {:.1} GFLOP/s; rows of 8: {:.3} ms",
                    t * 1e3,
                    gflop / t,
                    tr * 1e3
                );
            }
        }
    }
}

/// `nb` rows at once against one after another, on Llama-3-8B's shapes from DRAM (`small`:
/// SmolLM2's, one copy, from the caches, and its LM head).
fn rows(dtypes: &[Dtype], small: bool) {
    use teal_kernels::batch;
    let shapes: &[(usize, usize)] = if small {
        &[(576, 1536), (1536, 576), (576, 576)]
    } else {
        &[(4096, 14336), (14336, 4096)]
    };
    if small {
        head_rows(dtypes);
    }
    for &(n_in, n_out) in shapes {
        let wt = rand_vec(n_in * n_out, 5);
        for &dtype in dtypes {
            let ps = copies(dtype, &wt, n_in, n_out, if small { 0 } else { 1 << 30 });
            for nb in [2usize, 4] {
                let x = rand_vec(nb * n_in, 11);
                let mut y = vec![0.0f32; nb * n_out];
                for s in [0.0f64, 0.5] {
                    let t = if s == 0.0 {
                        -1.0
                    } else {
                        reference::abs_threshold(&x, s)
                    };
                    let mut times = [vec![], vec![]];
                    for it in 0..(4 * ps.len()).max(if small { 400 } else { 40 }) {
                        let p = &ps[it / 2 % ps.len()];
                        let t0 = Instant::now();
                        if it % 2 == 0 {
                            for (xb, yb) in x.chunks(n_in).zip(y.chunks_mut(n_out)) {
                                cpu::gemv_sparse(&p.mat(), xb, t, yb);
                            }
                        } else {
                            let mask = Mask::Threshold(t);
                            batch::gemv_many_rows(
                                &x,
                                nb,
                                &mut [Gemv {
                                    w: p.mat(),
                                    mask,
                                    y: &mut y,
                                }],
                            );
                        }
                        times[it % 2].push(t0.elapsed().as_secs_f64() * 1e6);
                    }
                    let [a, b] = &mut times;
                    let (a, b) = (median(a), median(b));
                    println!(
                        "{n_in}x{n_out} {} rows {nb} s={s}: one after another {a:.0} us, together {b:.0} us ({:.2}x)",
                        dtype.name(),
                        a / b
                    );
                }
            }
        }
    }
}

/// SmolLM2's LM head (49152 x 576, output-major), `nb` rows at once against one after another.
fn head_rows(dtypes: &[Dtype]) {
    use teal_kernels::batch;
    use teal_kernels::packed::PackedRows;
    let (n_in, n_out) = (576usize, 49152usize);
    let w = rand_vec(n_in * n_out, 3);
    for &dtype in dtypes {
        let mut p = PackedRows::with_capacity(dtype, n_in, n_out);
        p.push_rows(w.clone()).expect("pack");
        for nb in [2usize, 4] {
            let x = rand_vec(nb * n_in, 11);
            let mut y = vec![0.0f32; nb * n_out];
            let mut times = [vec![], vec![]];
            for it in 0..200 {
                let t0 = Instant::now();
                if it % 2 == 0 {
                    for (xb, yb) in x.chunks(n_in).zip(y.chunks_mut(n_out)) {
                        cpu::gemv_dot(&p.mat(), xb, yb);
                    }
                } else {
                    batch::gemv_dot_rows(&p.mat(), &x, nb, &mut y);
                }
                times[it % 2].push(t0.elapsed().as_secs_f64() * 1e6);
            }
            let [a, b] = &mut times;
            let (a, b) = (median(a), median(b));
            println!(
                "head {n_out}x{n_in} {} rows {nb}: one after another {a:.0} us, together {b:.0} us ({:.2}x)",
                dtype.name(),
                a / b
            );
        }
    }
}

/// Copies of `wt` packed as `dtype`, enough to exceed `bytes` together (more than the caches).
fn copies(dtype: Dtype, wt: &[f32], n_in: usize, n_out: usize, bytes: usize) -> Vec<PackedT> {
    let first = PackedT::from_input_major(dtype, wt, n_in, n_out).expect("pack");
    let n = bytes / first.bytes() + 1;
    let mut ps = vec![first];
    for _ in 1..n {
        ps.push(PackedT::from_input_major(dtype, wt, n_in, n_out).expect("pack"));
    }
    ps
}

/// GB/s of weights read, dense and 50 % sparse, per shape and format (`small`: Qwen2.5's and
/// SmolLM2's shapes only).
fn matrices(dtypes: &[Dtype], small: bool) {
    // Llama-3-8B gate/up, down and q/o, Llama-3-70B gate/up, Qwen2.5-0.5B up and down,
    // SmolLM2-135M up and down.
    let shapes = [
        (4096usize, 14336usize),
        (14336, 4096),
        (4096, 4096),
        (8192, 28672),
        (896, 4864),
        (4864, 896),
        (576, 1536),
        (1536, 576),
    ];
    for &(n_in, n_out) in shapes.iter().filter(|s| !small || s.0 * s.1 < 8 << 20) {
        let wt = rand_vec(n_in * n_out, 1);
        let x = rand_vec(n_in, 2);
        let mut y = vec![0.0f32; n_out];
        for &dtype in dtypes {
            // Copies used in turn, so that the weights come from DRAM as in a decode step.
            let ps = copies(dtype, &wt, n_in, n_out, 128 << 20);
            let n_copies = ps.len();
            let bytes = ps[0].bytes();
            for s in [0.0f32, 0.5] {
                let t = reference::abs_threshold(&x, s as f64);
                let reps = (2e9 / bytes as f64).clamp(20.0, 2000.0) as usize;
                let mut times = vec![];
                for r in 0..reps {
                    let m = ps[r % n_copies].mat();
                    let t0 = Instant::now();
                    cpu::gemv_sparse(&m, &x, t, &mut y);
                    times.push(t0.elapsed().as_secs_f64());
                }
                let gb = bytes as f64 * (1.0 - s as f64) / 1e9;
                print!(
                    "{n_in}x{n_out} {} s={s}: {:.1} GB/s | ",
                    dtype.name(),
                    gb / median(&mut times)
                );
            }
            println!();
        }
    }
}

/// Dense GEMV GB/s over streaming-read GB/s, measured in the same rounds.
fn vs_bandwidth(dtypes: &[Dtype]) {
    let buf = vec![1.0f32; 1 << 28];
    let stream = || {
        let t0 = Instant::now();
        std::hint::black_box(cpu::par_sum(&buf));
        (buf.len() * 4) as f64 / t0.elapsed().as_secs_f64() / 1e9
    };
    let shapes = [(4096usize, 14336usize), (14336, 4096), (8192, 28672)];
    let mut cases = vec![];
    for &(n_in, n_out) in &shapes {
        let wt = rand_vec(n_in * n_out, 1);
        for &dtype in dtypes {
            let ps = copies(dtype, &wt, n_in, n_out, 256 << 20);
            cases.push((
                format!("{n_in}x{n_out} {}", dtype.name()),
                ps,
                rand_vec(n_in, 2),
            ));
        }
    }
    stream();
    let rounds = 7;
    let mut ratios = vec![vec![]; cases.len()];
    for r in 0..rounds {
        let bw = stream();
        print!("round {r}: stream {bw:.1} GB/s |");
        for (i, (name, ps, x)) in cases.iter().enumerate() {
            let mut y = vec![0.0f32; ps[0].n_out];
            let t0 = Instant::now();
            for p in ps {
                cpu::gemv(&p.mat(), x, &mut y);
            }
            let gb = (ps[0].bytes() * ps.len()) as f64 / t0.elapsed().as_secs_f64() / 1e9;
            ratios[i].push(gb / bw);
            print!(" {name} {gb:.1} ({:.2})", gb / bw);
        }
        println!();
    }
    for ((name, _, _), r) in cases.iter().zip(ratios.iter_mut()) {
        let (lo, hi) = (
            r.iter().cloned().fold(f64::INFINITY, f64::min),
            r.iter().cloned().fold(0.0, f64::max),
        );
        println!(
            "{name}: dense GEMV / read bandwidth, median {:.3} (range {lo:.3}-{hi:.3})",
            median(r)
        );
    }
}

/// Median time of one GEMV per copy of `ps`, over 5 sweeps of all copies.
fn sweep_time(ps: &[PackedT], x: &[f32], t: f32, y: &mut [f32]) -> f64 {
    let mut times = vec![];
    for _ in 0..5 {
        let t0 = Instant::now();
        for p in ps {
            cpu::gemv_sparse(&p.mat(), x, t, y);
        }
        times.push(t0.elapsed().as_secs_f64() / ps.len() as f64);
    }
    median(&mut times)
}

/// 50 % sparse GEMVs whose kept rows follow fixed patterns, against dense and TEAL's random
/// ones, on SmolLM2's shapes.
fn patterns(dtypes: &[Dtype]) {
    for &(n_in, n_out) in &[(1536usize, 576usize), (576, 576), (576, 192), (576, 1536)] {
        let wt = rand_vec(n_in * n_out, 1);
        let x = rand_vec(n_in, 2);
        let kept = |f: &dyn Fn(usize) -> bool| -> Vec<f32> {
            (0..n_in).map(|j| if f(j) { 1.0 } else { 0.0 }).collect()
        };
        let cases: [(&str, Vec<f32>); 4] = [
            ("first half", kept(&|j| j < n_in / 2)),
            ("every other", kept(&|j| j % 2 == 0)),
            ("2 of 4", kept(&|j| j % 4 < 2)),
            ("8 of 16", kept(&|j| j % 16 < 8)),
        ];
        for &dtype in dtypes {
            let ps = copies(dtype, &wt, n_in, n_out, 1 << 30);
            let mut y = vec![0.0f32; n_out];
            let dense = sweep_time(&ps, &x, -1.0, &mut y);
            print!(
                "{n_in}x{n_out} {}: dense {:.1} us",
                dtype.name(),
                dense * 1e6
            );
            for (name, xp) in &cases {
                let t = sweep_time(&ps, xp, 0.5, &mut y);
                print!(" | {name} {:.1} ({:.2})", t * 1e6, t / dense);
            }
            let t = sweep_time(&ps, &x, reference::abs_threshold(&x, 0.5), &mut y);
            println!(" | random {:.1} ({:.2})", t * 1e6, t / dense);
        }
    }
}

/// Gate and up as two matrices in one `gemv_many` call against one matrix of both widths.
fn fused(dtypes: &[Dtype]) {
    let (d, f) = (576usize, 1536usize);
    let xs: Vec<Vec<f32>> = (0..16).map(|i| rand_vec(d, 77 + i)).collect();
    for &dtype in dtypes {
        let (gate, up) = (rand_vec(d * f, 1), rand_vec(d * f, 2));
        let gs = copies(dtype, &gate, d, f, 1 << 29);
        let us = copies(dtype, &up, d, f, 1 << 29);
        let both = copies(dtype, &rand_vec(d * 2 * f, 3), d, 2 * f, 1 << 30);
        let (mut yg, mut yu, mut yb) = (vec![0.0f32; f], vec![0.0f32; f], vec![0.0f32; 2 * f]);
        let names = [
            "two dense",
            "two 0.5",
            "two 0.45/0.41",
            "fused dense",
            "fused 0.5",
            "fused 0.41",
        ];
        let mut res: Vec<Vec<f64>> = vec![vec![]; names.len()];
        for round in 0..7 {
            for (case, r) in res.iter_mut().enumerate() {
                let n = if case < 3 { gs.len() } else { both.len() };
                let t0 = Instant::now();
                for i in 0..n {
                    let x = &xs[(i + round) % xs.len()];
                    let t = |s: f64| Mask::Threshold(reference::abs_threshold(x, s));
                    let (mg, mu) = match case {
                        0 | 3 => (Mask::Dense, Mask::Dense),
                        1 | 4 => (t(0.5), t(0.5)),
                        _ => (t(0.45), t(0.41)),
                    };
                    if case < 3 {
                        cpu::gemv_many(
                            x,
                            &mut [
                                Gemv {
                                    w: gs[i].mat(),
                                    mask: mg,
                                    y: &mut yg,
                                },
                                Gemv {
                                    w: us[i].mat(),
                                    mask: mu,
                                    y: &mut yu,
                                },
                            ],
                        );
                    } else {
                        cpu::gemv_many(
                            x,
                            &mut [Gemv {
                                w: both[i].mat(),
                                mask: mu,
                                y: &mut yb,
                            }],
                        );
                    }
                }
                r.push(t0.elapsed().as_secs_f64() / n as f64 * 1e6);
            }
        }
        print!("gate|up {}:", dtype.name());
        for (name, r) in names.iter().zip(res.iter_mut()) {
            print!(" | {name} {:.1}", median(r));
        }
        println!();
    }
}
