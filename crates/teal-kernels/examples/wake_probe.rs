//! What a parallel section costs after the calling thread worked alone for a while: rayon's
//! `join` (inside its pool, as the CLI runs) against `teal_kernels::pool::for_each`. Each round
//! spins `gap` µs on the caller, then runs two items of 20 µs in parallel; the overhead is the
//! round's time beyond `gap + 20` µs (20 more means the second core did not help at all).
//!
//! `cargo run --release -p teal-kernels --example wake_probe [THREADS]`

use std::time::{Duration, Instant};

const WORK: Duration = Duration::from_micros(20);
const ROUNDS: usize = 3000;

fn spin(d: Duration) {
    let t = Instant::now();
    while t.elapsed() < d {
        std::hint::spin_loop();
    }
}

fn probe(name: &str, section: &dyn Fn()) {
    for gap_us in [0u64, 5, 10, 20, 50, 100, 200] {
        let gap = Duration::from_micros(gap_us);
        let t = Instant::now();
        for _ in 0..ROUNDS {
            spin(gap);
            section();
        }
        let per = t.elapsed().as_secs_f64() * 1e6 / ROUNDS as f64;
        let over = per - gap_us as f64 - WORK.as_secs_f64() * 1e6;
        println!("{name:6} gap {gap_us:4} us: round {per:7.2} us, overhead {over:6.2} us");
    }
}

fn main() {
    let threads = std::env::args()
        .nth(1)
        .map(|t| t.parse().expect("THREADS: a number"))
        .unwrap_or(2);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .expect("rayon pool");
    rayon::scope(|_| {
        probe("rayon", &|| {
            rayon::join(|| spin(WORK), || spin(WORK));
        });
        probe("pool", &|| teal_kernels::pool::for_each(2, |_| spin(WORK)));
    });
}
