//! Turning logits into the next token: greedy, or temperature / top-k / top-p sampling with a
//! seeded generator. The candidate buffer is kept between calls, so sampling allocates nothing.

use rand::{rngs::StdRng, Rng, SeedableRng};

#[derive(Clone, Debug, PartialEq)]
pub struct SamplerConfig {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// 0 means no top-k cut.
    pub top_k: usize,
    /// 1 means no nucleus cut.
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            temperature: 0.0,
            top_k: 40,
            top_p: 0.95,
            seed: 42,
        }
    }
}

pub struct Sampler {
    cfg: SamplerConfig,
    rng: StdRng,
    cand: Vec<(f32, u32)>,
}

/// Index of the largest value (the first one on ties), as llama.cpp's greedy sampler.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

impl Sampler {
    pub fn new(cfg: SamplerConfig) -> Sampler {
        Sampler {
            rng: StdRng::seed_from_u64(cfg.seed),
            cfg,
            cand: Vec::new(),
        }
    }

    pub fn config(&self) -> &SamplerConfig {
        &self.cfg
    }

    /// The next uniform number in [0, 1) of the seeded generator (one per sampled token).
    pub fn draw(&mut self) -> f32 {
        self.rng.random::<f32>()
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.cfg.temperature <= 0.0 {
            return argmax(logits);
        }
        let r = self.draw();
        self.sample_with(logits, r)
    }

    /// Temperature / top-k / top-p sampling with the uniform number `r` in [0, 1) given (what
    /// [`Sampler::sample`] does with its next [`Sampler::draw`]).
    pub fn sample_with(&mut self, logits: &[f32], r: f32) -> u32 {
        self.cand.clear();
        self.cand
            .extend(logits.iter().enumerate().map(|(i, &v)| (v, i as u32)));
        let by_logit = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0);
        let k = if self.cfg.top_k == 0 {
            self.cand.len()
        } else {
            self.cfg.top_k.min(self.cand.len())
        };
        if k < self.cand.len() {
            self.cand.select_nth_unstable_by(k - 1, by_logit);
            self.cand.truncate(k);
        }
        self.cand.sort_unstable_by(by_logit);
        let inv_t = 1.0 / self.cfg.temperature;
        let m = self.cand[0].0;
        let mut total = 0.0;
        for c in self.cand.iter_mut() {
            c.0 = ((c.0 - m) * inv_t).exp();
            total += c.0;
        }
        // Nucleus: the smallest prefix whose probability reaches top_p.
        let mut keep = self.cand.len();
        if self.cfg.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, c) in self.cand.iter().enumerate() {
                acc += c.0 / total;
                if acc >= self.cfg.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        let kept_total: f32 = self.cand[..keep].iter().map(|c| c.0).sum();
        let mut r = r * kept_total;
        for c in &self.cand[..keep] {
            r -= c.0;
            if r <= 0.0 {
                return c.1;
            }
        }
        self.cand[keep - 1].1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplerConfig {
            temperature: 0.0,
            ..Default::default()
        });
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 3.0]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_seed_reproduces() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 17) as f32 * 0.3).collect();
        let mut s = Sampler::new(SamplerConfig {
            temperature: 1.0,
            top_k: 1,
            top_p: 1.0,
            seed: 1,
        });
        assert_eq!(s.sample(&logits), argmax(&logits));
        let cfg = SamplerConfig {
            temperature: 0.8,
            top_k: 20,
            top_p: 0.9,
            seed: 7,
        };
        let (mut a, mut b) = (Sampler::new(cfg.clone()), Sampler::new(cfg));
        let ra: Vec<u32> = (0..50).map(|_| a.sample(&logits)).collect();
        let rb: Vec<u32> = (0..50).map(|_| b.sample(&logits)).collect();
        assert_eq!(ra, rb);
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // Two tokens with p = e^1/(e^1+e^0) = 0.731 at temperature 1.
        let logits = [1.0f32, 0.0];
        let mut s = Sampler::new(SamplerConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 3,
        });
        let n = 20000;
        let ones = (0..n).filter(|_| s.sample(&logits) == 0).count() as f64 / n as f64;
        // 4.5 standard deviations of a binomial proportion at n = 20000.
        assert!((ones - 0.7311).abs() < 0.015, "{ones}");
    }

    #[test]
    fn top_p_cuts_the_tail() {
        let logits = [10.0f32, 0.0, 0.0, 0.0];
        let mut s = Sampler::new(SamplerConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.5,
            seed: 5,
        });
        assert!((0..1000).all(|_| s.sample(&logits) == 0));
    }
}
