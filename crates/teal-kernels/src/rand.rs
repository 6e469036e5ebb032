//! Deterministic pseudo-random values (xorshift64) for tests, benchmarks and random-weight
//! models, so they need no extra crate and every user draws the same numbers from a seed.

use rayon::prelude::*;

fn start(seed: u64) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1
}

fn step(mut s: u64) -> u64 {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    s
}

fn value(s: u64) -> f32 {
    (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

/// `n` values uniform in `[-1, 1)` from `seed`.
pub fn uniform(n: usize, seed: u64) -> Vec<f32> {
    let mut s = start(seed);
    (0..n)
        .map(|_| {
            s = step(s);
            value(s)
        })
        .collect()
}

/// A linear map of 64-bit states over GF(2): column `i` is the image of bit `i`.
#[derive(Clone, Copy)]
struct BitMatrix([u64; 64]);

impl BitMatrix {
    fn apply(&self, s: u64) -> u64 {
        (0..64)
            .filter(|i| s >> i & 1 == 1)
            .fold(0, |acc, i| acc ^ self.0[i])
    }
    /// `self` after `other`.
    fn after(&self, other: &BitMatrix) -> BitMatrix {
        BitMatrix(std::array::from_fn(|i| self.apply(other.0[i])))
    }
}

/// The state `n` steps after `s` (xorshift is linear over GF(2): square-and-multiply).
fn jump(mut s: u64, mut n: u64) -> u64 {
    let mut m = BitMatrix(std::array::from_fn(|i| step(1u64 << i)));
    while n > 0 {
        if n & 1 == 1 {
            s = m.apply(s);
        }
        m = m.after(&m);
        n >>= 1;
    }
    s
}

/// [`uniform`] written into `out` by all threads of the pool: the same values (each chunk
/// starts from the state the sequence reaches there), for models of billions of weights.
pub fn uniform_into(out: &mut [f32], seed: u64) {
    uniform_into_at(out, seed, 0);
}

/// Values `first ..` of the sequence of [`uniform`] written into `out` (a slice of a tensor,
/// e.g. some rows of a matrix), by all threads of the pool.
pub fn uniform_into_at(out: &mut [f32], seed: u64, first: u64) {
    const CHUNK: usize = 1 << 18;
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
        let mut s = jump(start(seed), first + (c * CHUNK) as u64);
        for v in o {
            s = step(s);
            *v = value(s);
        }
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn parallel_values_equal_sequential() {
        for n in [0, 1, 5, (1 << 18) - 1, (1 << 18) + 3, 3 << 18] {
            let mut p = vec![0.0; n];
            super::uniform_into(&mut p, 42);
            assert_eq!(p, super::uniform(n, 42), "n = {n}");
        }
    }

    #[test]
    fn values_from_an_offset_continue_the_sequence() {
        let all = super::uniform(3 << 18, 9);
        for (first, n) in [
            (0usize, 10usize),
            (5, 1),
            ((1 << 18) - 2, 7),
            (1000, (1 << 18) + 5),
        ] {
            let mut p = vec![0.0; n];
            super::uniform_into_at(&mut p, 9, first as u64);
            assert_eq!(p, all[first..first + n], "first = {first}, n = {n}");
        }
    }
}
