//! `GET /metrics` (with `teal serve --metrics`): counters in Prometheus' text format, under the
//! names llama.cpp's server gives them, so that dashboards made for it read teal's too. The
//! HTTP side counts what every finished answer's summary reports; the requests on slots and
//! those waiting for one are the engine's to say ([`Load`], asked at each `/metrics`).

use crate::{Load, Summary};
use std::sync::atomic::{AtomicU64, Ordering};

/// The server's counters since it started.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Prompt tokens run (not those reused from a cache) and their microseconds.
    prompt_tokens: AtomicU64,
    prompt_micros: AtomicU64,
    /// Prompt tokens reused from a slot's cache.
    cached: AtomicU64,
    /// Tokens generated, and the microseconds of decoding them (after the first of each
    /// answer, which comes with its prompt).
    predicted: AtomicU64,
    decoded: AtomicU64,
    decode_micros: AtomicU64,
    /// Answers finished.
    answers: AtomicU64,
}

impl Metrics {
    /// An answer (one prompt's, one choice's) has finished.
    pub fn record(&self, s: &Summary) {
        let micros = |secs: f64| (secs * 1e6) as u64;
        let add = |c: &AtomicU64, v: u64| c.fetch_add(v, Ordering::Relaxed);
        add(
            &self.prompt_tokens,
            (s.prompt_tokens - s.cached_tokens) as u64,
        );
        add(&self.prompt_micros, micros(s.prompt_secs));
        add(&self.cached, s.cached_tokens as u64);
        add(&self.predicted, s.completion_tokens as u64);
        add(&self.decoded, s.decode_tokens as u64);
        add(&self.decode_micros, micros(s.decode_secs));
        add(&self.answers, 1);
    }

    /// The counters, and the engine's `load`, in Prometheus' text exposition format.
    pub fn render(&self, load: Load) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let secs = |c: &AtomicU64| get(c) as f64 / 1e6;
        let rate = |n: &AtomicU64, t: &AtomicU64| match get(t) {
            0 => 0.0,
            _ => get(n) as f64 / secs(t),
        };
        let (run, cached) = (get(&self.prompt_tokens), get(&self.cached));
        let hit_ratio = match run + cached {
            0 => 0.0,
            all => cached as f64 / all as f64,
        };
        let rows: [(&str, &str, &str, String); 11] = [
            (
                "prompt_tokens_total",
                "counter",
                "Number of prompt tokens processed.",
                run.to_string(),
            ),
            (
                "prompt_tokens_cache_total",
                "counter",
                "Number of prompt tokens reused from the cache.",
                cached.to_string(),
            ),
            (
                "prompt_cache_hit_ratio",
                "gauge",
                "Share of the prompt tokens reused from the cache.",
                hit_ratio.to_string(),
            ),
            (
                "prompt_seconds_total",
                "counter",
                "Prompt process time.",
                secs(&self.prompt_micros).to_string(),
            ),
            (
                "tokens_predicted_total",
                "counter",
                "Number of generation tokens processed.",
                get(&self.predicted).to_string(),
            ),
            (
                "tokens_predicted_seconds_total",
                "counter",
                "Predict process time.",
                secs(&self.decode_micros).to_string(),
            ),
            (
                "prompt_tokens_seconds",
                "gauge",
                "Average prompt throughput in tokens/s.",
                rate(&self.prompt_tokens, &self.prompt_micros).to_string(),
            ),
            (
                "predicted_tokens_seconds",
                "gauge",
                "Average generation throughput in tokens/s.",
                rate(&self.decoded, &self.decode_micros).to_string(),
            ),
            (
                "requests_processing",
                "gauge",
                "Number of requests processing.",
                load.processing.to_string(),
            ),
            (
                "requests_deferred",
                "gauge",
                "Number of requests deferred.",
                load.deferred.to_string(),
            ),
            (
                "answers_total",
                "counter",
                "Number of answers finished (one per prompt and choice).",
                get(&self.answers).to_string(),
            ),
        ];
        rows.iter()
            .map(|(name, kind, help, value)| {
                format!(
                    "# HELP llamacpp:{name} {help}\n# TYPE llamacpp:{name} {kind}\nllamacpp:{name} {value}\n"
                )
            })
            .collect()
    }
}
