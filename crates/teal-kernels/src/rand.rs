//! Deterministic pseudo-random values (xorshift64) for tests, benchmarks and random-weight
//! models, so they need no extra crate and every user draws the same numbers from a seed.

/// `n` values uniform in `[-1, 1)` from `seed`.
pub fn uniform(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}
