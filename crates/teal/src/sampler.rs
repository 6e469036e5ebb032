//! Turning logits into the next token: greedy, or temperature / top-k / top-p / min-p sampling
//! with a seeded generator, after optional logit biases, repetition penalties over the recent
//! tokens, and a constraint (JSON mode or a GBNF grammar) that rules tokens out. The candidate
//! buffers are kept between calls, so unconstrained sampling allocates nothing.

use crate::constrain::{InfillStage, JsonMode};
use crate::grammar::{Grammar, GrammarMode};
use crate::tokenizer::Tokenizer;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use rand::{rngs::StdRng, Rng, SeedableRng};

#[derive(Clone, Debug, PartialEq)]
pub struct SamplerConfig {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// 0 means no top-k cut.
    pub top_k: usize,
    /// 1 means no nucleus cut.
    pub top_p: f32,
    /// Drops the candidates less likely than `min_p` times the most likely one (before the
    /// temperature, as the top-p cut and as llama.cpp's chain); 0 means no cut.
    pub min_p: f32,
    pub seed: u64,
    pub penalties: Penalties,
    /// Added to these tokens' logits before anything else, greedy included (OpenAI's and
    /// llama.cpp's `logit_bias`); `-inf` bans a token.
    pub logit_bias: Vec<(u32, f32)>,
    /// JSON mode: only tokens that keep the text a prefix of one JSON object, then the end of
    /// sequence (a sampler made by [`Sampler::for_tokenizer`]; see [`crate::constrain`]).
    pub json_object: bool,
    /// A GBNF grammar the text must follow (llama.cpp's `grammar`; a sampler made by
    /// [`Sampler::for_tokenizer`]; see [`crate::grammar`]).
    pub grammar: Option<Arc<Grammar>>,
    /// llama.cpp's `infill` stage after the cuts (a sampler made by
    /// [`Sampler::for_tokenizer`]; see [`crate::constrain::InfillStage`]).
    pub infill: bool,
}

impl SamplerConfig {
    /// Whether the logits are changed before sampling (biases or penalties), which needs the
    /// host sampler's state.
    pub fn adjusts_logits(&self) -> bool {
        self.penalties.active()
            || !self.logit_bias.is_empty()
            || self.json_object
            || self.grammar.is_some()
            || self.infill
    }

    /// Whether the only change to the logits is tokens banned (biases of -inf, e.g.
    /// `ignore_eos`'s end tokens): a device may then take the greedy pick as if unbiased and
    /// pick again on the host only when it is a banned token ([`SamplerConfig::banned`]). (Not
    /// a sampled pick: a ban renormalizes the distribution the random number is read against.)
    pub fn bans_only(&self) -> bool {
        !self.penalties.active()
            && !self.json_object
            && self.grammar.is_none()
            && !self.infill
            && self.logit_bias.iter().all(|&(_, b)| b == f32::NEG_INFINITY)
    }

    /// Whether `token` has a bias of -inf.
    pub fn banned(&self, token: u32) -> bool {
        self.logit_bias
            .iter()
            .any(|&(t, b)| t == token && b == f32::NEG_INFINITY)
    }

    /// The settings' ranges, each error naming the setting (as the server's request field).
    pub fn check(&self) -> Result<(), String> {
        let p = &self.penalties;
        let bad = |name: &str, v: f32, range: &str| Err(format!("{name} = {v}: must be {range}"));
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(
                "temperature",
                self.temperature,
                "a finite number >= 0 (0: greedy)",
            );
        }
        if self.json_object && self.grammar.is_some() {
            return Err("JSON mode and a grammar: give one of the two".into());
        }
        if !(0.0..=1.0).contains(&self.top_p) {
            return bad(
                "top_p",
                self.top_p,
                "in [0, 1] (0: the most likely token only)",
            );
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", self.min_p, "in [0, 1] (0: off)");
        }
        if !(p.repeat.is_finite() && p.repeat > 0.0) {
            return bad("repeat_penalty", p.repeat, "a finite number > 0 (1: off)");
        }
        for (name, v) in [
            ("presence_penalty", p.presence),
            ("frequency_penalty", p.frequency),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(name, v, "in [-2, 2] (0: off)");
            }
        }
        if let Some(&(t, b)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| b.is_nan() || *b == f32::INFINITY)
        {
            return Err(format!(
                "logit_bias of token {t} = {b}: must be a finite number or -inf (never)"
            ));
        }
        Ok(())
    }

    /// The tokens the settings name (`logit_bias`) against the vocabulary's size.
    pub fn check_tokens(&self, vocab_size: usize) -> Result<(), String> {
        match self
            .logit_bias
            .iter()
            .find(|(t, _)| *t as usize >= vocab_size)
        {
            Some((t, _)) => Err(format!(
                "logit_bias: token {t} is not in the vocabulary ({vocab_size} tokens)"
            )),
            None => Ok(()),
        }
    }
}

impl SamplerConfig {
    /// llama.cpp's sampling defaults (its server and tools), which `teal run` and `teal serve`
    /// take for every setting not given.
    pub const LLAMA_CPP: SamplerConfig = SamplerConfig {
        temperature: 0.8,
        top_k: 40,
        top_p: 0.95,
        min_p: 0.05,
        seed: 42,
        penalties: Penalties::OFF,
        logit_bias: Vec::new(),
        json_object: false,
        grammar: None,
        infill: false,
    };
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            temperature: 0.0,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.0,
            seed: 42,
            penalties: Penalties::OFF,
            logit_bias: Vec::new(),
            json_object: false,
            grammar: None,
            infill: false,
        }
    }
}

/// Penalties on the tokens among the last `last_n` of the context (prompt and generated), applied
/// to the logits before anything else, greedy included, as llama.cpp's penalties sampler: a
/// seen token's logit is divided by `repeat` when positive and multiplied by it otherwise, then
/// lowered by `presence` once and by `frequency` per occurrence (OpenAI's two penalties).
#[derive(Clone, Debug, PartialEq)]
pub struct Penalties {
    /// Tokens looked back over (0: no penalties), llama.cpp's `repeat_last_n`.
    pub last_n: usize,
    /// 1 means off.
    pub repeat: f32,
    /// 0 means off.
    pub presence: f32,
    /// 0 means off.
    pub frequency: f32,
}

impl Penalties {
    /// Off, looking back over llama.cpp's default 64 tokens when switched on.
    pub const OFF: Penalties = Penalties {
        last_n: 64,
        repeat: 1.0,
        presence: 0.0,
        frequency: 0.0,
    };
}

impl Default for Penalties {
    fn default() -> Self {
        Penalties::OFF
    }
}

impl Penalties {
    /// Whether any penalty changes the logits.
    pub fn active(&self) -> bool {
        self.last_n > 0 && (self.repeat != 1.0 || self.presence != 0.0 || self.frequency != 0.0)
    }
}

pub struct Sampler {
    cfg: SamplerConfig,
    rng: StdRng,
    cand: Vec<(f32, u32)>,
    /// With penalties: the last `last_n` tokens of the context and how often each occurs.
    recent: VecDeque<u32>,
    counts: HashMap<u32, u32>,
    /// With biases or penalties: the adjusted copy of the logits.
    adjusted: Vec<f32>,
    /// With [`SamplerConfig::json_object`] or [`SamplerConfig::grammar`]: the tokens allowed
    /// next.
    constraint: Option<Constraint>,
    /// With [`SamplerConfig::infill`].
    infill: Option<InfillStage>,
}

/// What rules tokens out: JSON mode or a grammar.
#[derive(Clone, Debug)]
enum Constraint {
    Json(JsonMode),
    Grammar(Box<GrammarMode>),
}

impl Constraint {
    fn allows(&self, token: u32) -> bool {
        match self {
            Constraint::Json(j) => j.allows(token),
            Constraint::Grammar(g) => g.allows(token),
        }
    }

    fn accept(&mut self, token: u32) {
        match self {
            Constraint::Json(j) => j.accept(token),
            Constraint::Grammar(g) => g.accept(token),
        }
    }

    /// The token to end with when nothing is allowed.
    fn fallback(&self) -> Option<u32> {
        match self {
            Constraint::Json(j) => j.eos().first().copied(),
            Constraint::Grammar(g) => g.eos().first().copied(),
        }
    }
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
            recent: VecDeque::new(),
            counts: HashMap::new(),
            adjusted: Vec::new(),
            constraint: None,
            infill: None,
        }
    }

    /// A sampler for `tok`'s vocabulary: with [`SamplerConfig::json_object`], in JSON mode;
    /// with [`SamplerConfig::grammar`], following the grammar; with [`SamplerConfig::infill`],
    /// with the infill stage.
    pub fn for_tokenizer(cfg: SamplerConfig, tok: &Tokenizer) -> Sampler {
        let constraint = match (&cfg.grammar, cfg.json_object) {
            (Some(g), _) => Some(Constraint::Grammar(Box::new(GrammarMode::new(
                g.clone(),
                tok,
            )))),
            (None, true) => Some(Constraint::Json(JsonMode::new(tok))),
            (None, false) => None,
        };
        let infill = cfg.infill.then(|| InfillStage::new(tok));
        Sampler {
            constraint,
            infill,
            ..Sampler::new(cfg)
        }
    }

    pub fn config(&self) -> &SamplerConfig {
        &self.cfg
    }

    /// The next uniform number in [0, 1) of the seeded generator (one per sampled token).
    pub fn draw(&mut self) -> f32 {
        self.rng.random::<f32>()
    }

    /// Records a context token for the penalties (the prompt's; [`Sampler::sample`] records the
    /// tokens it picks). Without penalties it does nothing.
    pub fn accept(&mut self, token: u32) {
        if !self.cfg.penalties.active() {
            return;
        }
        self.recent.push_back(token);
        *self.counts.entry(token).or_insert(0) += 1;
        if self.recent.len() > self.cfg.penalties.last_n {
            if let Some(old) = self.recent.pop_front() {
                if let Some(c) = self.counts.get_mut(&old) {
                    *c -= 1;
                    if *c == 0 {
                        self.counts.remove(&old);
                    }
                }
            }
        }
    }

    /// The next token: biases, penalties, then greedy or [`Sampler::sample_with`] on the next
    /// [`Sampler::draw`], among the tokens the constraint allows (if any); the token is recorded
    /// for the penalties and the constraint.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let token = if self.cfg.adjusts_logits() || self.constraint.is_some() {
            let mut v = std::mem::take(&mut self.adjusted);
            v.clear();
            v.extend_from_slice(logits);
            for &(t, b) in &self.cfg.logit_bias {
                if let Some(l) = v.get_mut(t as usize) {
                    *l += b;
                }
            }
            let p = &self.cfg.penalties;
            for (&t, &count) in &self.counts {
                if let Some(l) = v.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repeat
                    } else {
                        *l * p.repeat
                    };
                    *l -= p.presence + count as f32 * p.frequency;
                }
            }
            let token = match self.constraint.take() {
                Some(c) => {
                    let t = self.choose_allowed(&v, &c);
                    self.constraint = Some(c);
                    t
                }
                None => self.choose(&v),
            };
            self.adjusted = v;
            token
        } else {
            self.choose(logits)
        };
        self.accept(token);
        if let Some(c) = &mut self.constraint {
            c.accept(token);
        }
        token
    }

    /// What [`Sampler::choose`] gives on the logits with every token that `c` rules out at
    /// `-inf`, testing tokens only in order of their logits until the cut is full: the best
    /// one when greedy, the first `top_k` allowed ones (all of them without a top-k cut) when
    /// sampling. With no token allowed, the first end-of-sequence token the constraint knows.
    fn choose_allowed(&mut self, logits: &[f32], c: &Constraint) -> u32 {
        let greedy = self.cfg.temperature <= 0.0;
        if greedy {
            let best = argmax(logits);
            if c.allows(best) {
                return best;
            }
        }
        let want = match (greedy, self.cfg.top_k) {
            (true, _) => 1,
            (false, 0) => logits.len(),
            (false, k) => k,
        };
        self.cand.clear();
        self.cand.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, v)| **v > f32::NEG_INFINITY)
                .map(|(i, &v)| (v, i as u32)),
        );
        // Sort a generous head first; the rest only if the head holds too few allowed tokens.
        // The allowed ones are moved to the front of the candidates as they are found (every
        // place before the one tested has been tested).
        let n = self.cand.len();
        let (mut kept, mut start, mut head) = (0, 0, (4 * want).max(256));
        while kept < want && start < n {
            let end = head.min(n);
            if end < n {
                self.cand[start..].select_nth_unstable_by(end - start - 1, candidate_order);
            }
            self.cand[start..end].sort_unstable_by(candidate_order);
            for i in start..end {
                if kept == want {
                    break;
                }
                if c.allows(self.cand[i].1) {
                    self.cand[kept] = self.cand[i];
                    kept += 1;
                }
            }
            start = end;
            head *= 4;
        }
        self.cand.truncate(kept);
        if kept == 0 {
            return c.fallback().unwrap_or_else(|| argmax(logits));
        }
        if greedy {
            return self.cand[0].1;
        }
        let r = self.draw();
        self.draw_candidates(r)
    }

    fn choose(&mut self, logits: &[f32]) -> u32 {
        if self.cfg.temperature <= 0.0 {
            return argmax(logits);
        }
        let r = self.draw();
        self.sample_with(logits, r)
    }

    /// Temperature / top-k / top-p / min-p (and infill-stage) sampling of `logits` as given (no
    /// penalties) with
    /// the uniform number `r` in [0, 1) given (what [`Sampler::sample`] does with its next
    /// [`Sampler::draw`]).
    pub fn sample_with(&mut self, logits: &[f32], r: f32) -> u32 {
        self.top_k_candidates(logits);
        self.draw_candidates(r)
    }

    /// The `top_k` largest logits (all without a cut) into the candidates, largest first.
    fn top_k_candidates(&mut self, logits: &[f32]) {
        self.cand.clear();
        self.cand
            .extend(logits.iter().enumerate().map(|(i, &v)| (v, i as u32)));
        let k = if self.cfg.top_k == 0 {
            self.cand.len()
        } else {
            self.cfg.top_k.min(self.cand.len())
        };
        if k < self.cand.len() {
            self.cand.select_nth_unstable_by(k - 1, candidate_order);
            self.cand.truncate(k);
        }
        self.cand.sort_unstable_by(candidate_order);
    }

    /// Top-p, min-p, temperature (and the infill stage) over the candidates (logits, largest
    /// first), then the token where `r` in [0, 1) falls in their weights. llama.cpp's order:
    /// the cuts see the probabilities of the logits as they are, the temperature acts last.
    fn draw_candidates(&mut self, r: f32) -> u32 {
        let m = self.cand[0].0;
        // Nucleus: the smallest prefix whose probability reaches top_p.
        let mut keep = self.cand.len();
        if self.cfg.top_p < 1.0 {
            let total: f32 = self.cand.iter().map(|c| (c.0 - m).exp()).sum();
            let mut acc = 0.0;
            for (i, c) in self.cand.iter().enumerate() {
                acc += (c.0 - m).exp() / total;
                if acc >= self.cfg.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        // Min-p: the logits below the largest plus ln(min_p) (probability below min_p times
        // the largest), never the first.
        if self.cfg.min_p > 0.0 {
            let floor = self.cfg.min_p.ln();
            keep = self.cand[..keep]
                .iter()
                .position(|c| c.0 - m < floor)
                .unwrap_or(keep)
                .max(1);
        }
        // The temperature: the weights of the kept candidates. The largest weigh 1 also where
        // 1/T is infinite (T below about 3e-39, where 0 * inf gave NaN weights).
        let inv_t = 1.0 / self.cfg.temperature;
        self.cand.truncate(keep);
        for c in self.cand.iter_mut() {
            let d = c.0 - m;
            c.0 = if d == 0.0 { 1.0 } else { (d * inv_t).exp() };
        }
        if let Some(stage) = &self.infill {
            keep = stage.apply(&mut self.cand);
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

/// A random seed (llama.cpp's seed -1), from the system's random numbers (each `RandomState`
/// is keyed from them); 32 bits, as llama.cpp's seeds.
pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
        >> 32
}

/// The candidates' order: larger logits first, ties (-0 and +0 too) to the lower id, as
/// [`argmax`]'s, so the `top_k` kept and their order do not depend on the sort (the device
/// sampler's order too). `x + 0.0` is +0 for either zero.
fn candidate_order(a: &(f32, u32), b: &(f32, u32)) -> std::cmp::Ordering {
    (b.0 + 0.0).total_cmp(&(a.0 + 0.0)).then(a.1.cmp(&b.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vocabulary of single letters, a few pairs and an end-of-sequence token (id 0).
    fn letters() -> (crate::tokenizer::TokenBytes, Vec<u32>) {
        let mut v: Vec<Option<Vec<u8>>> = vec![None];
        for c in b'a'..=b'z' {
            v.push(Some(vec![c]));
        }
        for p in ["ab", "ba", "xyz", "{\"", "\"}", " "] {
            v.push(Some(p.as_bytes().to_vec()));
        }
        (Arc::new(v), vec![0])
    }

    #[test]
    fn random_seeds_are_32_bits_and_differ() {
        let seeds: Vec<u64> = (0..8).map(|_| random_seed()).collect();
        assert!(seeds.iter().all(|&s| s <= u64::from(u32::MAX)));
        assert!(seeds.windows(2).any(|w| w[0] != w[1]), "{seeds:?}");
    }

    /// Logits with many exact ties (and both zeros): the top-k candidates are the first k by
    /// logit, then by id, whatever the sort does with equal keys.
    #[test]
    fn top_k_ties_keep_the_lower_ids_in_order() {
        let mut rng = StdRng::seed_from_u64(3);
        for trial in 0..200 {
            let n = rng.random_range(1..300);
            let levels = [-0.0f32, 0.0, 1.0, 2.5, -3.0];
            let logits: Vec<f32> = (0..n)
                .map(|_| levels[rng.random_range(0..levels.len())])
                .collect();
            let k = rng.random_range(1..=n + 1);
            let mut s = Sampler::new(SamplerConfig {
                top_k: k,
                ..Default::default()
            });
            s.top_k_candidates(&logits);
            let mut want: Vec<u32> = (0..n as u32).collect();
            want.sort_by(|&a, &b| {
                let (x, y) = (logits[a as usize] + 0.0, logits[b as usize] + 0.0);
                y.partial_cmp(&x).unwrap().then(a.cmp(&b))
            });
            want.truncate(k);
            let got: Vec<u32> = s.cand.iter().map(|c| c.1).collect();
            assert_eq!(got, want, "trial {trial}, n {n}, k {k}");
        }
    }

    fn with_grammar(cfg: SamplerConfig, g: &str) -> Sampler {
        let (bytes, eos) = letters();
        let g = Arc::new(Grammar::parse(g).unwrap());
        Sampler {
            constraint: Some(Constraint::Grammar(Box::new(GrammarMode::from_parts(
                g, bytes, eos,
            )))),
            ..Sampler::new(cfg)
        }
    }

    /// A temperature so small that 1/T is infinite draws the largest logit (it drew the last
    /// candidate kept: 0 * inf made the top weight NaN), and ties at the top share the draws
    /// (half each).
    #[test]
    fn vanishing_temperature_is_greedy() {
        let mut s = Sampler::new(SamplerConfig {
            temperature: 1e-40,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.0,
            ..Default::default()
        });
        for r in [0.0, 0.3, 0.99] {
            assert_eq!(s.sample_with(&[5.0, 1.0, 0.0, -1.0], r), 0, "r {r}");
        }
        let ties = [0.2, 0.7].map(|r| s.sample_with(&[1.0, 5.0, 5.0, 0.0], r));
        assert!(ties.contains(&1) && ties.contains(&2), "{ties:?}");
    }

    /// Bans alone (biases of -inf, as `ignore_eos` adds) let a device take a greedy pick and
    /// check after; any other adjustment does not.
    #[test]
    fn bans_alone_are_told_apart() {
        let ban = |bias: Vec<(u32, f32)>| SamplerConfig {
            logit_bias: bias,
            ..Default::default()
        };
        let c = ban(vec![(3, f32::NEG_INFINITY), (7, f32::NEG_INFINITY)]);
        assert!(c.adjusts_logits() && c.bans_only());
        assert!(c.banned(3) && c.banned(7) && !c.banned(4));
        let c = ban(vec![(3, f32::NEG_INFINITY), (4, 2.0)]);
        assert!(!c.bans_only() && !c.banned(4));
        let c = SamplerConfig {
            penalties: Penalties {
                repeat: 1.1,
                ..Penalties::OFF
            },
            ..ban(vec![(3, f32::NEG_INFINITY)])
        };
        assert!(!c.bans_only());
        // Greedy over the logits with the bans applied: the best token not banned.
        let mut s = Sampler::new(ban(vec![(1, f32::NEG_INFINITY)]));
        assert_eq!(s.sample(&[0.0, 3.0, 2.0, 1.0]), 2);
    }

    #[test]
    fn grammar_constrains_greedy_and_sampled_text() {
        let (bytes, _) = letters();
        let text = |ids: &[u32]| -> String {
            ids.iter()
                .map(|&t| String::from_utf8(bytes[t as usize].clone().unwrap_or_default()).unwrap())
                .collect()
        };
        // The model wants "z" most, then the end, then "b", "a": the grammar forces a(b|a)+
        // ending in "b", and the end only once the text is whole.
        let mut logits = vec![0.0f32; bytes.len()];
        logits[26] = 5.0; // z
        logits[0] = 4.0; // end
        logits[2] = 3.0; // b
        logits[1] = 2.0; // a
        let g = r#"root ::= "a" [ab]* "b""#;
        let mut s = with_grammar(SamplerConfig::default(), g);
        let mut ids = Vec::new();
        for _ in 0..10 {
            let t = s.sample(&logits);
            ids.push(t);
            if t == 0 {
                break;
            }
        }
        assert_eq!(text(&ids), "ab", "{ids:?}");
        assert_eq!(ids.last(), Some(&0));
        for seed in 0..20 {
            let cfg = SamplerConfig {
                temperature: 1.5,
                top_k: 3,
                top_p: 1.0,
                seed,
                ..Default::default()
            };
            let mut s = with_grammar(cfg, g);
            let mut ids = Vec::new();
            for _ in 0..40 {
                let t = s.sample(&logits);
                if t == 0 {
                    break;
                }
                ids.push(t);
            }
            let out = text(&ids);
            assert!(
                out.starts_with('a')
                    && out.ends_with('b')
                    && out.bytes().all(|c| c == b'a' || c == b'b'),
                "seed {seed}: {out:?}"
            );
        }
    }

    #[test]
    fn constrained_choice_equals_masked_choice() {
        // The lazy search of the allowed tokens picks what masking every other token at -inf
        // and choosing among all would, for greedy and for each cut, with the same draws.
        let (bytes, eos) = letters();
        let g = Arc::new(Grammar::parse(r#"root ::= [a-m]+ " " [n-z]+"#).unwrap());
        let mode = GrammarMode::from_parts(g.clone(), bytes.clone(), eos.clone());
        let mut seedr = StdRng::seed_from_u64(5);
        for case in 0..200 {
            let logits: Vec<f32> = (0..bytes.len())
                .map(|_| seedr.random::<f32>() * 8.0)
                .collect();
            let masked: Vec<f32> = logits
                .iter()
                .enumerate()
                .map(|(t, &l)| {
                    if mode.allows(t as u32) {
                        l
                    } else {
                        f32::NEG_INFINITY
                    }
                })
                .collect();
            let cfg = SamplerConfig {
                temperature: [0.0, 0.7, 1.0, 2.0][case % 4],
                top_k: [0, 1, 3, 40][(case / 4) % 4],
                top_p: [1.0, 0.9][(case / 16) % 2],
                min_p: [0.0, 0.05][(case / 32) % 2],
                seed: case as u64,
                ..Default::default()
            };
            let mut lazy = Sampler {
                constraint: Some(Constraint::Grammar(Box::new(GrammarMode::from_parts(
                    g.clone(),
                    bytes.clone(),
                    eos.clone(),
                )))),
                ..Sampler::new(cfg.clone())
            };
            let mut plain = Sampler::new(cfg);
            assert_eq!(lazy.sample(&logits), plain.sample(&masked), "case {case}");
        }
    }

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
            ..Default::default()
        });
        assert_eq!(s.sample(&logits), argmax(&logits));
        let cfg = SamplerConfig {
            temperature: 0.8,
            top_k: 20,
            top_p: 0.9,
            seed: 7,
            ..Default::default()
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
            ..Default::default()
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
            ..Default::default()
        });
        assert!((0..1000).all(|_| s.sample(&logits) == 0));
        // 0 keeps the most likely token only (OpenAI's range is [0, 1]; llama.cpp's top-p
        // keeps its one token there).
        let cfg = SamplerConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.0,
            seed: 5,
            ..Default::default()
        };
        assert!(cfg.check().is_ok());
        let mut s = Sampler::new(cfg);
        assert!((0..1000).all(|_| s.sample(&[0.0, 0.1, 0.0, 0.05]) == 1));
    }

    /// llama.cpp's chain: top-p and min-p see the probabilities of the logits as they are and
    /// the temperature acts on what they keep. With its defaults (T 0.8, min-p 0.05) logits 0
    /// and -2.5 both pass min-p (-2.5 > ln 0.05 = -3.0), and the second is drawn with
    /// e^(-2.5/0.8) / (1 + e^(-2.5/0.8)) = 0.0421 (after the temperature its weight 0.044 would
    /// fall under 0.05: never drawn); top-p 0.9 keeps both of 0 and -1.5 (0.818 < 0.9), which
    /// at T 0.5 (0.953) it would not.
    #[test]
    fn cuts_come_before_the_temperature() {
        let mut s = Sampler::new(SamplerConfig {
            top_k: 0,
            top_p: 1.0,
            seed: 11,
            ..SamplerConfig::LLAMA_CPP
        });
        let n = 20000;
        let second = (0..n).filter(|_| s.sample(&[0.0, -2.5]) == 1).count() as f64 / n as f64;
        // 4.5 standard deviations of a binomial proportion at n = 20000.
        assert!((second - 0.0421).abs() < 0.0064, "{second}");
        let mut s = Sampler::new(SamplerConfig {
            temperature: 0.5,
            top_k: 0,
            top_p: 0.9,
            min_p: 0.0,
            seed: 12,
            ..Default::default()
        });
        assert!((0..2000).any(|_| s.sample(&[0.0, -1.5]) == 1));
    }

    #[test]
    fn min_p_cuts_relative_to_the_most_likely() {
        // Weights at temperature 1: 1, e^-1 = 0.368, e^-10.
        let logits = [10.0f32, 9.0, 0.0];
        let cfg = |min_p| SamplerConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p,
            seed: 9,
            ..Default::default()
        };
        let mut only = Sampler::new(cfg(0.5));
        assert!((0..1000).all(|_| only.sample(&logits) == 0));
        let mut two = Sampler::new(cfg(0.3));
        let picks: Vec<u32> = (0..1000).map(|_| two.sample(&logits)).collect();
        assert!(picks.contains(&0) && picks.contains(&1) && !picks.contains(&2));
        // A cut above every weight but the first keeps the first.
        let mut first = Sampler::new(cfg(1.0));
        assert!((0..100).all(|_| first.sample(&logits) == 0));
    }

    fn greedy_with(p: Penalties) -> Sampler {
        Sampler::new(SamplerConfig {
            temperature: 0.0,
            penalties: p,
            ..Default::default()
        })
    }

    #[test]
    fn penalties_follow_llama_cpp() {
        let repeat = |r| Penalties {
            repeat: r,
            ..Default::default()
        };
        // Positive logits are divided, negative ones multiplied.
        let mut s = greedy_with(repeat(1.1));
        s.accept(0);
        assert_eq!(s.sample(&[2.0, 1.9]), 1, "2.0 / 1.1 < 1.9");
        let mut s = greedy_with(repeat(1.1));
        s.accept(0);
        assert_eq!(s.sample(&[-1.0, -1.05]), 1, "-1.0 * 1.1 < -1.05");
        // Presence once, frequency per occurrence.
        let mut s = greedy_with(Penalties {
            presence: 0.5,
            ..Default::default()
        });
        s.accept(0);
        s.accept(0);
        assert_eq!(
            s.sample(&[1.0, 0.4]),
            0,
            "1.0 - 0.5 > 0.4: once, not per occurrence"
        );
        let mut s = greedy_with(Penalties {
            frequency: 0.25,
            ..Default::default()
        });
        s.accept(0);
        s.accept(0);
        assert_eq!(s.sample(&[1.0, 0.6]), 1, "1.0 - 2 x 0.25 < 0.6");
        // Only the last `last_n` tokens count.
        let mut s = greedy_with(Penalties {
            last_n: 2,
            presence: 1.0,
            ..Default::default()
        });
        for t in [0, 1, 1] {
            s.accept(t);
        }
        assert_eq!(s.sample(&[1.0, 0.5, 0.9]), 0, "token 0 left the window");
        // Sampled tokens count too: with a strong penalty greedy alternates.
        let mut s = greedy_with(Penalties {
            last_n: 1,
            presence: 1.0,
            ..Default::default()
        });
        let ids: Vec<u32> = (0..4).map(|_| s.sample(&[1.0, 0.5])).collect();
        assert_eq!(ids, [0, 1, 0, 1]);
        // Off by default: the logits are used as they are.
        let mut s = greedy_with(Penalties::default());
        s.accept(0);
        assert_eq!(s.sample(&[2.0, 1.9]), 0);
    }

    /// A bias moves a token up or down before anything else, greedy included; -inf bans it;
    /// several entries for one token add up.
    #[test]
    fn logit_bias_applies_before_sampling() {
        let logits = [0.1f32, 3.0, -1.0, 2.5];
        let greedy = |bias: Vec<(u32, f32)>| {
            Sampler::new(SamplerConfig {
                temperature: 0.0,
                logit_bias: bias,
                ..Default::default()
            })
            .sample(&logits)
        };
        assert_eq!(greedy(vec![]), 1);
        assert_eq!(greedy(vec![(1, f32::NEG_INFINITY)]), 3);
        assert_eq!(greedy(vec![(2, 5.0)]), 2);
        assert_eq!(greedy(vec![(0, 2.0), (0, 1.0)]), 0);
        // Sampling never picks a banned token, even as the only likely one.
        let mut s = Sampler::new(SamplerConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            logit_bias: vec![(1, f32::NEG_INFINITY)],
            ..Default::default()
        });
        for _ in 0..200 {
            assert_ne!(s.sample(&[0.0, 50.0, 0.0, 0.0]), 1);
        }
        let bad = SamplerConfig {
            logit_bias: vec![(7, f32::NAN)],
            ..Default::default()
        };
        assert!(bad.check().unwrap_err().contains("logit_bias of token 7"));
        let far = SamplerConfig {
            logit_bias: vec![(9, 1.0)],
            ..Default::default()
        };
        assert!(far.check().is_ok());
        assert!(far.check_tokens(9).unwrap_err().contains("token 9"));
        assert!(far.check_tokens(10).is_ok());
    }
}
