//! The key/value cache: one contiguous buffer per layer, preallocated for the context length.

use crate::config::Config;

pub struct KvCache {
    /// Per layer: `[capacity, kv_dim]` keys (after RoPE) and values.
    pub(crate) k: Vec<Vec<f32>>,
    pub(crate) v: Vec<Vec<f32>>,
    capacity: usize,
    len: usize,
}

impl KvCache {
    pub fn new(config: &Config, capacity: usize) -> KvCache {
        let kv_dim = config.kv_dim();
        let layer = || vec![0.0f32; capacity * kv_dim];
        KvCache {
            k: (0..config.num_hidden_layers).map(|_| layer()).collect(),
            v: (0..config.num_hidden_layers).map(|_| layer()).collect(),
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
}
