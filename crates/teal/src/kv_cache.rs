//! The key/value cache: one contiguous buffer per layer for keys and one for values,
//! preallocated for the context length, in f32 or f16 ([`KvDtype`]). The attention kernels read
//! either type ([`teal_kernels::cpu::KvElem`]); [`KvRows`] is the one place that picks them.

use crate::config::Config;
use crate::error::{Error, Result};
use half::f16;
use teal_kernels::cpu::{self, KvElem};

/// Element type of the cached keys and values: f32, or f16 (half the bytes of a long context;
/// llama.cpp's default).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvDtype {
    #[default]
    F32,
    F16,
}

impl KvDtype {
    pub fn parse(s: &str) -> Result<KvDtype> {
        match s {
            "f32" => Ok(KvDtype::F32),
            "f16" => Ok(KvDtype::F16),
            other => Err(Error::Invalid(format!(
                "KV cache type {other:?}: expected f32 or f16"
            ))),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
        }
    }
    /// Bytes of one cached value.
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 => 2,
        }
    }
}

/// Bytes of the keys and values of `capacity` positions in every layer (`None`: more than
/// 64 bits count).
pub fn cache_bytes(config: &Config, capacity: usize, dtype: KvDtype) -> Option<u64> {
    [
        config.num_hidden_layers,
        capacity,
        config.kv_dim(),
        dtype.bytes(),
    ]
    .iter()
    .try_fold(2u64, |b, &n| b.checked_mul(n as u64))
}

/// Checks a context of `ctx` positions (`what` names it in messages, e.g. `-c 4096`) before
/// `caches` KV caches of it are made in host memory, with `per_position` more host bytes for
/// each position (e.g. the logits a perplexity window keeps): no positions, or more bytes
/// than the memory available now ([`crate::bench::available_memory`]), are errors. Returns a
/// warning for a context beyond the one the model was trained for, which runs (as llama.cpp's
/// does) but degrades.
pub fn check_context(
    config: &Config,
    ctx: usize,
    dtype: KvDtype,
    (caches, per_position): (usize, u64),
    what: &str,
) -> Result<Option<String>> {
    if ctx == 0 {
        return Err(Error::Invalid(format!(
            "{what}: a context of 0 positions holds no prompt"
        )));
    }
    let bytes = cache_bytes(config, ctx, dtype)
        .and_then(|kv| kv.checked_mul(caches as u64))
        .and_then(|kv| kv.checked_add(per_position.checked_mul(ctx as u64)?));
    if let Some(avail) = crate::bench::available_memory() {
        if bytes.is_none_or(|b| b > avail) {
            let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
            return Err(Error::Invalid(format!(
                "{what}: {ctx} positions need {} of host memory (KV caches in {}{}), more \
                 than the {:.1} GiB available",
                bytes.map_or("more than 2^64 bytes".into(), |b| format!(
                    "{:.1} GiB",
                    gib(b)
                )),
                dtype.name(),
                if per_position > 0 { " and logits" } else { "" },
                gib(avail)
            )));
        }
    }
    Ok((ctx > config.max_position_embeddings).then(|| {
        format!(
            "warning: {what}: longer than the {} positions the model was trained on; \
             quality degrades beyond them",
            config.max_position_embeddings
        )
    }))
}

/// One layer's keys and values, `[capacity, kv_dim]` each.
enum KvLayer {
    F32(Vec<f32>, Vec<f32>),
    F16(Vec<f16>, Vec<f16>),
}

pub struct KvCache {
    layers: Vec<KvLayer>,
    dtype: KvDtype,
    capacity: usize,
    len: usize,
}

impl KvCache {
    pub fn new(config: &Config, capacity: usize, dtype: KvDtype) -> KvCache {
        let n = capacity * config.kv_dim();
        let layer = || match dtype {
            KvDtype::F32 => KvLayer::F32(vec![0.0; n], vec![0.0; n]),
            KvDtype::F16 => KvLayer::F16(vec![f16::ZERO; n], vec![f16::ZERO; n]),
        };
        KvCache {
            layers: (0..config.num_hidden_layers).map(|_| layer()).collect(),
            dtype,
            capacity,
            len: 0,
        }
    }
    /// Positions filled so far.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    pub fn dtype(&self) -> KvDtype {
        self.dtype
    }
    pub fn clear(&mut self) {
        self.len = 0;
    }
    /// Forgets every position from `len` on.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
        debug_assert!(self.len <= self.capacity);
    }
    /// Layer `l`'s keys and values.
    pub(crate) fn rows(&mut self, l: usize) -> KvRows<'_> {
        match &mut self.layers[l] {
            KvLayer::F32(k, v) => KvRows::F32(k, v),
            KvLayer::F16(k, v) => KvRows::F16(k, v),
        }
    }
}

/// One layer's keys and values as the attention reads them, `[positions, kv_dim]` each: a
/// cache layer, or the f32 buffers of calibration.
pub enum KvRows<'a> {
    F32(&'a mut [f32], &'a mut [f32]),
    F16(&'a mut [f16], &'a mut [f16]),
}

/// `$body` with `$k`, `$v` bound to the keys and values of `$rows` as slices of their own
/// element type (each arm compiles the generic kernels for that type).
macro_rules! with_rows {
    ($rows:expr, |$k:ident, $v:ident| $body:expr) => {
        match $rows {
            KvRows::F32($k, $v) => $body,
            KvRows::F16($k, $v) => $body,
        }
    };
}

impl KvRows<'_> {
    /// Stores `k` and `v` (`[n, kv_dim]`, f32) at positions `pos0..pos0 + n`.
    pub fn store(&mut self, pos0: usize, kv_dim: usize, k: &[f32], v: &[f32]) {
        fn put<T: KvElem>(dst: &mut [T], at: usize, src: &[f32]) {
            for (d, &s) in dst[at..at + src.len()].iter_mut().zip(src) {
                *d = T::from_f32(s);
            }
        }
        let at = pos0 * kv_dim;
        with_rows!(self, |kc, vc| {
            put(kc, at, k);
            put(vc, at, v);
        })
    }

    /// Causal attention of `n_q` queries at positions `pos0..` over the stored keys
    /// `0..pos0 + n_q` ([`cpu::attention`]).
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        q: &[f32],
        n_q: usize,
        pos0: usize,
        n_head: usize,
        n_kv_head: usize,
        hd: usize,
        out: &mut [f32],
    ) {
        let n = (pos0 + n_q) * n_kv_head * hd;
        with_rows!(self, |k, v| cpu::attention(
            q,
            &k[..n],
            &v[..n],
            n_q,
            pos0,
            n_head,
            n_kv_head,
            hd,
            out
        ))
    }

    /// Attention of one query over the first `n_keys` stored keys ([`cpu::attention_decode`]).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_decode(
        &self,
        q: &[f32],
        n_keys: usize,
        n_head: usize,
        n_kv_head: usize,
        hd: usize,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let n = n_keys * n_kv_head * hd;
        with_rows!(self, |k, v| cpu::attention_decode(
            q,
            &k[..n],
            &v[..n],
            n_keys,
            n_head,
            n_kv_head,
            hd,
            scores,
            out
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contexts_are_checked_against_the_model_and_memory() {
        let c = crate::models::random::shape("smollm2-135m").unwrap();
        // 30 layers x 192 values x keys and values x 2 bytes a position.
        assert_eq!(
            cache_bytes(&c, 10, KvDtype::F16),
            Some(2 * 30 * 10 * 192 * 2)
        );
        assert_eq!(cache_bytes(&c, 1 << 58, KvDtype::F16), None);
        let check = |ctx, kv, host, what| check_context(&c, ctx, kv, host, what);
        assert_eq!(check(4096, KvDtype::F16, (1, 0), "-c 4096").unwrap(), None);
        let e = check(0, KvDtype::F16, (1, 0), "-c 0").unwrap_err();
        assert!(
            e.to_string().contains("-c 0: a context of 0 positions"),
            "{e}"
        );
        let w = check(9000, KvDtype::F32, (1, 0), "-c 9000")
            .unwrap()
            .unwrap();
        assert!(
            w.contains("the 8192 positions the model was trained on"),
            "{w}"
        );
        // No host caches (a GPU's): only the model's context is checked.
        assert!(check(1 << 40, KvDtype::F32, (0, 0), "-c")
            .unwrap()
            .is_some());
        if let Some(avail) = crate::bench::available_memory() {
            // Sizes beyond memory, and beyond 64 bits (this once wrapped to 0 and passed).
            for ctx in [1 << 40, 1 << 58, usize::MAX] {
                let e = check(ctx, KvDtype::F32, (1, 0), "-c")
                    .unwrap_err()
                    .to_string();
                assert!(e.contains("GiB available"), "{e}");
            }
            // The logits of a window count too.
            let per = c.vocab_size as u64 * 4;
            let ctx = (2 * avail / per) as usize;
            check(ctx, KvDtype::F16, (0, 0), "-c").unwrap();
            let e = check(ctx, KvDtype::F16, (0, per), "-c")
                .unwrap_err()
                .to_string();
            assert!(e.contains("and logits"), "{e}");
        }
    }
}
