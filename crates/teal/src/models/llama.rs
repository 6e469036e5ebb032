//! The Llama family (Llama-2/3, SmolLM2, TinyLlama, Mistral, Qwen2): one forward pass, top to
//! bottom. Prefill (many positions, optionally logits for every one) and decode (one position,
//! preallocated scratch, no allocation) are separate functions. Every projection goes through
//! [`Linear`], which owns precision and sparsity; the LM head is a [`Dense`] layer, whose rows
//! are also the token embeddings of a tied model.

use crate::config::Config;
use crate::error::{Error, Result};
use crate::kv_cache::{KvCache, KvDtype, KvRows};
use crate::linear::{Dense, InputMask, Linear};
use crate::loader::TensorSource;
use teal_kernels::batch::MAX_ROWS;
use teal_kernels::packed::Dtype;
use teal_kernels::{cpu, reference};

/// The four places in a block where an input enters projections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Site {
    /// Post-RMSNorm attention input: q_proj, k_proj, v_proj.
    Qkv,
    /// Attention output (heads concatenated): o_proj.
    O,
    /// Post-RMSNorm MLP input: gate_proj, up_proj.
    GateUp,
    /// `act(gate(x)) * up(x)`: down_proj.
    Down,
}

impl Site {
    pub const ALL: [Site; 4] = [Site::Qkv, Site::O, Site::GateUp, Site::Down];
}

/// Receives every row of activations at each site during prefill (calibration).
pub trait Observer {
    fn observe(&mut self, layer: usize, site: Site, rows: &[f32], width: usize);
}

#[derive(Clone)]
pub struct Block {
    pub input_layernorm: Vec<f32>,
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub post_attention_layernorm: Vec<f32>,
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

#[derive(Clone)]
pub struct Llama {
    pub config: Config,
    /// `[vocab, hidden]`: row `t` is token `t`'s embedding. For a tied model (no
    /// `lm_head.weight`) the same weights as `lm_head`.
    pub embed_tokens: Dense,
    pub layers: Vec<Block>,
    pub norm: Vec<f32>,
    pub lm_head: Dense,
    inv_freq: Vec<f32>,
}

/// What prefill returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Logits of the last position only (`[vocab]`).
    Last,
    /// Logits of every position (`[n_tokens, vocab]`).
    All,
}

impl Logits {
    /// The position of the first row returned for `n` tokens run from position `start`.
    pub fn first_position(self, start: usize, n: usize) -> usize {
        match self {
            Logits::All => start,
            Logits::Last => start + n.saturating_sub(1),
        }
    }
}

impl Llama {
    pub fn load(config: Config, src: &dyn TensorSource) -> Result<Llama> {
        Llama::load_as(config, src, Dtype::F32)
    }

    /// Loads every weight: the projections repacked input-major to `dtype`, the LM head and the
    /// embeddings output-major in `dtype` (one matrix when tied), norms in f32. Tensors are
    /// converted one at a time, so the f32 copies never outlive their tensor.
    pub fn load_as(config: Config, src: &dyn TensorSource, dtype: Dtype) -> Result<Llama> {
        let c = &config;
        let (d, ff, q, kv) = (c.hidden_size, c.intermediate_size, c.q_dim(), c.kv_dim());
        let linear = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
            let w = src.load(&format!("{name}.weight"), &[out, inp])?;
            check_finite(&format!("{name}.weight"), &w)?;
            let b = if bias {
                let b = src.load(&format!("{name}.bias"), &[out])?;
                check_finite(&format!("{name}.bias"), &b)?;
                Some(b)
            } else {
                None
            };
            Linear::from_rows_as(dtype, &format!("{name}.weight"), out, inp, &w, b)
        };
        let vector = |name: &str, n: usize| -> Result<Vec<f32>> {
            let v = src.load(name, &[n])?;
            check_finite(name, &v)?;
            Ok(v)
        };
        // The embedding and head, the largest matrices, are converted 16 MiB of f32 at a time.
        let dense = |name: &str| -> Result<Dense> {
            let chunk = ((16 << 20) / 4 / d.max(1)).max(1);
            Dense::from_row_chunks(dtype, name, c.vocab_size, d, chunk, |rows| {
                let r0 = rows.start;
                let w = src.load_rows(name, [c.vocab_size, d], rows)?;
                check_finite(name, &w).map_err(|e| match e {
                    Error::Tensor { name, msg } => Error::Tensor {
                        name,
                        msg: format!("{msg} of rows from {r0}"),
                    },
                    other => other,
                })?;
                Ok(w)
            })
        };
        let embed_tokens = dense("model.embed_tokens.weight")?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}");
            layers.push(Block {
                input_layernorm: vector(&format!("{p}.input_layernorm.weight"), d)?,
                q_proj: linear(&format!("{p}.self_attn.q_proj"), q, d, c.attention_bias)?,
                k_proj: linear(&format!("{p}.self_attn.k_proj"), kv, d, c.attention_bias)?,
                v_proj: linear(&format!("{p}.self_attn.v_proj"), kv, d, c.attention_bias)?,
                o_proj: linear(&format!("{p}.self_attn.o_proj"), d, q, false)?,
                post_attention_layernorm: vector(
                    &format!("{p}.post_attention_layernorm.weight"),
                    d,
                )?,
                gate_proj: linear(&format!("{p}.mlp.gate_proj"), ff, d, false)?,
                up_proj: linear(&format!("{p}.mlp.up_proj"), ff, d, false)?,
                down_proj: linear(&format!("{p}.mlp.down_proj"), d, ff, false)?,
            });
        }
        let lm_head = if src.contains("lm_head.weight") {
            dense("lm_head.weight")?
        } else {
            embed_tokens.clone()
        };
        Ok(Llama {
            inv_freq: config.rope_inv_freq(),
            embed_tokens,
            layers,
            norm: vector("model.norm.weight", d)?,
            lm_head,
            config,
        })
    }

    /// The same architecture and rotary tables with other weights (for weight transforms such
    /// as the rotation experiment in `examples/rotate_eval.rs`).
    pub fn with_weights(
        &self,
        embed_tokens: Dense,
        layers: Vec<Block>,
        norm: Vec<f32>,
        lm_head: Dense,
    ) -> Llama {
        Llama {
            config: self.config.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            inv_freq: self.inv_freq.clone(),
        }
    }

    /// The same weights (shared, not copied) with input masks, one row of seven per layer.
    pub fn with_masks(&self, per_layer: &[[Option<InputMask>; 7]]) -> Result<Llama> {
        if per_layer.len() != self.layers.len() {
            return Err(Error::Invalid(format!(
                "thresholds for {} layers, the model has {}",
                per_layer.len(),
                self.layers.len()
            )));
        }
        for (l, (b, t)) in self.layers.iter().zip(per_layer).enumerate() {
            for ((name, lin), m) in b.linears().iter().zip(t) {
                if let Some(InputMask::Channels(c)) = m {
                    if c.len() != lin.in_dim {
                        return Err(Error::Invalid(format!(
                            "layer {l} {name}: {} per-channel thresholds for {} inputs",
                            c.len(),
                            lin.in_dim
                        )));
                    }
                }
            }
        }
        let layers = self
            .layers
            .iter()
            .zip(per_layer)
            .map(|(b, t)| b.with_masks(t))
            .collect();
        Ok(Llama {
            layers,
            ..self.clone()
        })
    }

    /// A KV cache of f32 for `capacity` positions.
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        KvCache::new(&self.config, capacity, KvDtype::F32)
    }

    /// A KV cache of `dtype` for `capacity` positions.
    pub fn new_cache_as(&self, capacity: usize, dtype: KvDtype) -> KvCache {
        KvCache::new(&self.config, capacity, dtype)
    }

    /// Bytes of weights stored in the projections and the LM head.
    pub fn linear_weight_bytes(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|b| b.linears())
            .map(|(_, l)| l.weight_bytes())
            .sum::<usize>()
            + self.lm_head.weight_bytes()
    }

    /// Bytes of every weight the model holds: projections, LM head, the embedding table when it
    /// is not the head's, norms.
    pub fn weight_bytes(&self) -> usize {
        let embed = if self.embed_tokens.shares_weights(&self.lm_head) {
            0
        } else {
            self.embed_tokens.weight_bytes()
        };
        let norms = self
            .layers
            .iter()
            .map(|b| b.input_layernorm.len() + b.post_attention_layernorm.len())
            .sum::<usize>()
            + self.norm.len();
        self.linear_weight_bytes() + embed + 4 * norms
    }

    /// Writes token `token`'s embedding (`hidden_size` values) into `out`.
    pub fn embed(&self, token: u32, out: &mut [f32]) {
        self.embed_tokens.row(token as usize, out);
    }

    /// Rotary cos/sin tables (`[n, head_dim/2]` each) for positions `pos0..pos0+n`.
    pub fn rope_tables_for(&self, pos0: usize, n: usize) -> (Vec<f32>, Vec<f32>) {
        let half = self.inv_freq.len();
        let (mut cos, mut sin) = (vec![0.0; n * half], vec![0.0; n * half]);
        self.rope_tables(pos0, n, &mut cos, &mut sin);
        (cos, sin)
    }

    fn rope_tables(&self, pos0: usize, n: usize, cos: &mut [f32], sin: &mut [f32]) {
        let half = self.inv_freq.len();
        for t in 0..n {
            let p = (pos0 + t) as f32;
            for (i, &f) in self.inv_freq.iter().enumerate() {
                let a = p * f;
                cos[t * half + i] = a.cos();
                sin[t * half + i] = a.sin();
            }
        }
    }

    pub(crate) fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        match tokens
            .iter()
            .find(|&&t| t as usize >= self.config.vocab_size)
        {
            Some(t) => Err(Error::Invalid(format!(
                "token id {t} is outside the vocabulary of {}",
                self.config.vocab_size
            ))),
            None => Ok(()),
        }
    }

    /// Runs `tokens` at positions `cache.len()..`, appends their keys and values to the cache and
    /// returns logits as asked.
    pub fn prefill(&self, tokens: &[u32], cache: &mut KvCache, logits: Logits) -> Result<Vec<f32>> {
        self.prefill_observed(tokens, cache, logits, None)
    }

    /// [`Llama::prefill`], reporting the input of every projection site to `observer`.
    pub fn prefill_observed(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        logits: Logits,
        observer: Option<&mut dyn Observer>,
    ) -> Result<Vec<f32>> {
        let c = &self.config;
        let n = tokens.len();
        let rows: Vec<usize> = match logits {
            Logits::Last => vec![n.saturating_sub(1)],
            Logits::All => (0..n).collect(),
        };
        let normed = self.final_states(tokens, cache, &rows, observer)?;
        let mut lg = vec![0.0f32; rows.len() * c.vocab_size];
        self.lm_head.forward_batch(&normed, rows.len(), &mut lg);
        Ok(lg)
    }

    /// The final hidden states (after the last RMSNorm, `[n, hidden]`) of `tokens` run at
    /// positions `cache.len()..`, which are appended to the cache: what an embedding pools.
    pub fn hidden_states(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        let rows: Vec<usize> = (0..tokens.len()).collect();
        self.final_states(tokens, cache, &rows, None)
    }

    /// Runs the blocks on `tokens` and returns the normed final states of the positions `rows`.
    fn final_states(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        rows: &[usize],
        mut observer: Option<&mut dyn Observer>,
    ) -> Result<Vec<f32>> {
        let c = &self.config;
        let n = tokens.len();
        if n == 0 {
            return Err(Error::EmptyPrompt);
        }
        let pos0 = cache.len();
        if pos0 + n > cache.capacity() {
            return Err(Error::ContextOverflow {
                what: "the input",
                got: pos0 + n,
                ctx: cache.capacity(),
            });
        }
        self.check_tokens(tokens)?;
        let d = c.hidden_size;
        let (cos, sin) = self.rope_tables_for(pos0, n);

        let mut x = vec![0.0f32; n * d];
        for (&tok, xt) in tokens.iter().zip(x.chunks_mut(d)) {
            self.embed(tok, xt);
        }
        let mut ws = PrefillBuffers::new(c, n);
        for (l, b) in self.layers.iter().enumerate() {
            let obs = observer
                .as_mut()
                .map(|o| (l, &mut **o as &mut dyn Observer));
            b.prefill(
                c,
                &mut x,
                n,
                pos0,
                (&cos, &sin),
                cache.rows(l),
                &mut ws,
                obs,
            );
        }
        cache.advance(n);

        let mut normed = vec![0.0f32; rows.len() * d];
        for (i, &t) in rows.iter().enumerate() {
            cpu::rmsnorm(
                &x[t * d..(t + 1) * d],
                &self.norm,
                c.rms_norm_eps,
                &mut normed[i * d..(i + 1) * d],
            );
        }
        Ok(normed)
    }

    /// One decode step: runs `token` at position `cache.len()` and returns its logits. Uses only
    /// the preallocated buffers in `s`.
    pub fn decode<'s>(
        &self,
        token: u32,
        cache: &mut KvCache,
        s: &'s mut DecodeScratch,
    ) -> Result<&'s [f32]> {
        self.decode_start(token, cache, s)?;
        self.run_rows(&mut s.rows, &mut [(cache, &mut s.seq)]);
        Ok(&s.rows.logits)
    }

    /// Decode steps of several sequences (each `(model, token, cache, scratch)`, as
    /// [`Llama::decode`]), run together: the steps on the same model go through each layer as
    /// rows of one batch ([`teal_kernels::batch`]: each weight row is read once for all of
    /// them, at most [`MAX_ROWS`] at a time), the others one after another. Each step leaves
    /// its logits in its scratch ([`DecodeScratch::logits`]); they equal what
    /// [`Llama::decode`] computes up to the order of float sums. Returns each step's result: a
    /// step that fails its checks is not run, and the others are.
    pub fn decode_lockstep(
        steps: &mut [(&Llama, u32, &mut KvCache, &mut DecodeScratch)],
    ) -> Vec<Result<()>> {
        let results: Vec<Result<()>> = steps
            .iter_mut()
            .map(|(m, token, cache, s)| m.decode_start(*token, cache, s))
            .collect();
        let mut done = vec![false; steps.len()];
        for i in 0..steps.len() {
            if done[i] || results[i].is_err() {
                continue;
            }
            let model = steps[i].0;
            let same: Vec<usize> = (i..steps.len())
                .filter(|&k| !done[k] && results[k].is_ok() && std::ptr::eq(steps[k].0, model))
                .collect();
            for batch in same.chunks(MAX_ROWS) {
                let mut picked: Vec<&mut (&Llama, u32, &mut KvCache, &mut DecodeScratch)> = steps
                    .iter_mut()
                    .enumerate()
                    .filter(|(k, _)| batch.contains(k))
                    .map(|(_, st)| st)
                    .collect();
                model.decode_rows(&mut picked);
                for &k in batch {
                    done[k] = true;
                }
            }
        }
        results
    }

    /// The steps (past [`Llama::decode_start`]) as the rows of one batch.
    fn decode_rows(&self, steps: &mut [&mut (&Llama, u32, &mut KvCache, &mut DecodeScratch)]) {
        let c = &self.config;
        let n = steps.len();
        if n == 1 {
            let (_, _, cache, s) = &mut *steps[0];
            self.run_rows(&mut s.rows, &mut [(&mut **cache, &mut s.seq)]);
            return;
        }
        BATCH_ROWS.with_borrow_mut(|rows| {
            let rows = match rows {
                Some(r) if r.shape == StepRows::shape(c, n) => r,
                _ => rows.insert(StepRows::new(c, n)),
            };
            self.run_batch(rows, steps)
        })
    }

    /// [`Llama::decode_rows`] of two steps or more, in `rows` (sized for them).
    fn run_batch(
        &self,
        rows: &mut StepRows,
        steps: &mut [&mut (&Llama, u32, &mut KvCache, &mut DecodeScratch)],
    ) {
        let c = &self.config;
        let d = c.hidden_size;
        for (x, st) in rows.x.chunks_mut(d).zip(steps.iter()) {
            x.copy_from_slice(&st.3.rows.x);
        }
        let mut seqs: Vec<(&mut KvCache, &mut SeqScratch)> = steps
            .iter_mut()
            .map(|st| {
                let (_, _, cache, s) = &mut **st;
                (&mut **cache, &mut s.seq)
            })
            .collect();
        self.run_rows(rows, &mut seqs);
        drop(seqs);
        let v = c.vocab_size;
        for (logits, st) in rows.logits.chunks(v).zip(steps.iter_mut()) {
            st.3.rows.logits.copy_from_slice(logits);
        }
    }

    /// The decode steps whose activations are the rows of `r` (past [`Llama::decode_start`]),
    /// sequence `i` at position `seqs[i].0.len()`: every block, then the logits into `r`.
    fn run_rows(&self, r: &mut StepRows, seqs: &mut [(&mut KvCache, &mut SeqScratch)]) {
        for l in 0..self.layers.len() {
            self.decode_layer(l, r, seqs);
        }
        self.decode_finish(r, seqs);
    }

    /// A decode step's checks, RoPE tables and embedding (into the step's own row).
    fn decode_start(&self, token: u32, cache: &KvCache, s: &mut DecodeScratch) -> Result<()> {
        let c = &self.config;
        let pos = cache.len();
        if pos + 1 > cache.capacity() {
            return Err(Error::ContextOverflow {
                what: "the sequence",
                got: pos + 1,
                ctx: cache.capacity(),
            });
        }
        self.check_tokens(&[token])?;
        if s.seq.scores.len() < c.num_attention_heads * (pos + 1) {
            return Err(Error::Invalid(format!(
                "decode scratch was sized for fewer than {} positions",
                pos + 1
            )));
        }
        self.rope_tables(pos, 1, &mut s.seq.cos, &mut s.seq.sin);
        self.embed(token, &mut s.rows.x);
        Ok(())
    }

    /// Block `l` of the decode steps of [`Llama::run_rows`].
    fn decode_layer(
        &self,
        l: usize,
        r: &mut StepRows,
        seqs: &mut [(&mut KvCache, &mut SeqScratch)],
    ) {
        let c = &self.config;
        let b = &self.layers[l];
        let n = seqs.len();
        let (kvd, hd, qd) = (c.kv_dim(), c.head_dim, c.q_dim());
        rmsnorm_rows(&r.x, &b.input_layernorm, c.rms_norm_eps, &mut r.h);
        Linear::forward_rows(
            &r.h,
            n,
            [
                (&b.q_proj, &mut r.q[..]),
                (&b.k_proj, &mut r.k[..]),
                (&b.v_proj, &mut r.v[..]),
            ],
        );
        for (i, (cache, seq)) in seqs.iter_mut().enumerate() {
            let pos = cache.len();
            let (q, k) = (
                &mut r.q[i * qd..(i + 1) * qd],
                &mut r.k[i * kvd..(i + 1) * kvd],
            );
            for head in q.chunks_mut(hd).chain(k.chunks_mut(hd)) {
                reference::rope_neox(head, &seq.cos, &seq.sin);
            }
            let mut kv = cache.rows(l);
            kv.store(pos, kvd, k, &r.v[i * kvd..(i + 1) * kvd]);
            kv.attention_decode(
                q,
                pos + 1,
                c.num_attention_heads,
                c.num_key_value_heads,
                hd,
                &mut seq.scores,
                &mut r.att[i * qd..(i + 1) * qd],
            );
        }
        Linear::forward_rows(&r.att, n, [(&b.o_proj, &mut r.out[..])]);
        add_assign(&mut r.x, &r.out);

        rmsnorm_rows(&r.x, &b.post_attention_layernorm, c.rms_norm_eps, &mut r.h);
        Linear::forward_rows(
            &r.h,
            n,
            [(&b.gate_proj, &mut r.g[..]), (&b.up_proj, &mut r.u[..])],
        );
        cpu::silu_mul_in_place(&mut r.g, &r.u);
        Linear::forward_rows(&r.g, n, [(&b.down_proj, &mut r.out[..])]);
        add_assign(&mut r.x, &r.out);
    }

    /// The decode steps' end: their positions are in the caches, their logits in `r`.
    fn decode_finish(&self, r: &mut StepRows, seqs: &mut [(&mut KvCache, &mut SeqScratch)]) {
        let c = &self.config;
        for (cache, _) in seqs.iter_mut() {
            cache.advance(1);
        }
        rmsnorm_rows(&r.x, &self.norm, c.rms_norm_eps, &mut r.h);
        self.lm_head.forward_rows(&r.h, seqs.len(), &mut r.logits);
    }
}

impl Block {
    /// Runs this block on `n` positions (`x[n, hidden]`, updated in place) at absolute positions
    /// `pos0..pos0+n`, writing their keys and values into this layer's cache buffers `kv` (which
    /// must already hold positions `0..pos0`). `rope` holds the cos/sin tables of these positions.
    #[allow(clippy::too_many_arguments)]
    pub fn prefill(
        &self,
        c: &Config,
        x: &mut [f32],
        n: usize,
        pos0: usize,
        rope: (&[f32], &[f32]),
        kv: KvRows<'_>,
        ws: &mut PrefillBuffers,
        mut observer: Option<(usize, &mut dyn Observer)>,
    ) {
        self.attention_residual(c, x, n, pos0, rope, kv, ws, &mut observer);
        self.mlp_residual(c, x, n, ws, &mut observer);
    }

    /// The attention half of the block on `n` positions: `x += o_proj(attention(q, k, v))`.
    #[allow(clippy::too_many_arguments)]
    fn attention_residual(
        &self,
        c: &Config,
        x: &mut [f32],
        n: usize,
        pos0: usize,
        rope: (&[f32], &[f32]),
        kv: KvRows<'_>,
        ws: &mut PrefillBuffers,
        observer: &mut Option<(usize, &mut dyn Observer)>,
    ) {
        let (d, qd, kvd) = (c.hidden_size, c.q_dim(), c.kv_dim());
        let PrefillBuffers {
            h,
            q,
            k,
            v,
            att,
            out,
            ..
        } = ws;
        let (h, q, k, v, att, out) = (
            &mut h[..n * d],
            &mut q[..n * qd],
            &mut k[..n * kvd],
            &mut v[..n * kvd],
            &mut att[..n * qd],
            &mut out[..n * d],
        );
        self.attention_input(c, x, n, h);
        observe(observer, Site::Qkv, h, d);
        self.q_proj.forward_batch(h, n, q);
        self.k_proj.forward_batch(h, n, k);
        self.v_proj.forward_batch(h, n, v);
        attend(c, q, k, v, n, pos0, 0, rope, kv, att);
        observe(observer, Site::O, att, qd);
        self.o_proj.forward_batch(att, n, out);
        add_assign(&mut x[..n * d], out);
    }

    /// The attention's input on `m` rows of the residual `x`: `h = rmsnorm(x)`.
    pub fn attention_input(&self, c: &Config, x: &[f32], m: usize, h: &mut [f32]) {
        let d = c.hidden_size;
        rmsnorm_rows(&x[..m * d], &self.input_layernorm, c.rms_norm_eps, h);
    }

    /// The MLP half of the block on `m` rows: `x += down(silu(gate(h)) * up(h))`,
    /// `h = rmsnorm(x)`.
    pub fn mlp_residual(
        &self,
        c: &Config,
        x: &mut [f32],
        m: usize,
        ws: &mut PrefillBuffers,
        observer: &mut Option<(usize, &mut dyn Observer)>,
    ) {
        let (d, ff) = (c.hidden_size, c.intermediate_size);
        let PrefillBuffers { h, g, u, out, .. } = ws;
        let (h, g, u, out) = (
            &mut h[..m * d],
            &mut g[..m * ff],
            &mut u[..m * ff],
            &mut out[..m * d],
        );
        self.mlp_input(c, x, m, h);
        observe(observer, Site::GateUp, h, d);
        self.gate_proj.forward_batch(h, m, g);
        self.up_proj.forward_batch(h, m, u);
        cpu::silu_mul_in_place(g, u);
        observe(observer, Site::Down, g, ff);
        self.mlp_output(x, m, g, out);
    }

    /// The MLP's input on `m` rows of the residual `x`: `h = rmsnorm(x)`.
    pub fn mlp_input(&self, c: &Config, x: &[f32], m: usize, h: &mut [f32]) {
        let d = c.hidden_size;
        rmsnorm_rows(
            &x[..m * d],
            &self.post_attention_layernorm,
            c.rms_norm_eps,
            h,
        );
    }

    /// The MLP's last step on `m` rows: `x += down(act)`, with `out` (`m` rows of the hidden
    /// size) as scratch.
    pub fn mlp_output(&self, x: &mut [f32], m: usize, act: &[f32], out: &mut [f32]) {
        self.down_proj.forward_batch(act, m, out);
        add_assign(&mut x[..out.len()], out);
    }

    /// The same weights with an input mask on each of the seven projections, in the order of
    /// [`Block::linears`] (`None`: dense).
    pub fn with_masks(&self, t: &[Option<InputMask>; 7]) -> Block {
        Block {
            q_proj: self.q_proj.with_mask(t[0].clone()),
            k_proj: self.k_proj.with_mask(t[1].clone()),
            v_proj: self.v_proj.with_mask(t[2].clone()),
            o_proj: self.o_proj.with_mask(t[3].clone()),
            gate_proj: self.gate_proj.with_mask(t[4].clone()),
            up_proj: self.up_proj.with_mask(t[5].clone()),
            down_proj: self.down_proj.with_mask(t[6].clone()),
            ..self.clone()
        }
    }

    /// The seven projections with their checkpoint names.
    pub fn linears(&self) -> [(&'static str, &Linear); 7] {
        [
            ("q_proj", &self.q_proj),
            ("k_proj", &self.k_proj),
            ("v_proj", &self.v_proj),
            ("o_proj", &self.o_proj),
            ("gate_proj", &self.gate_proj),
            ("up_proj", &self.up_proj),
            ("down_proj", &self.down_proj),
        ]
    }
}

/// Buffers for one decode step, sized once for the model and the context.
pub struct DecodeScratch {
    /// The step's activations (one row).
    rows: StepRows,
    seq: SeqScratch,
}

/// What a decode step needs of its own when it runs with others: its position's RoPE tables
/// and room for its attention scores.
struct SeqScratch {
    cos: Vec<f32>,
    sin: Vec<f32>,
    scores: Vec<f32>,
}

thread_local! {
    /// The activations of the last batch of decode steps run on this thread
    /// ([`Llama::decode_lockstep`]), reused while the number of steps stays the same.
    static BATCH_ROWS: std::cell::RefCell<Option<StepRows>> = const { std::cell::RefCell::new(None) };
}

/// The activations of decode steps run together, a row per step.
struct StepRows {
    /// What the buffers are sized for ([`StepRows::shape`]).
    shape: [usize; 6],
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    /// The positions' keys (after RoPE) and values, before they go into the caches.
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    out: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    logits: Vec<f32>,
}

impl StepRows {
    /// The rows and the widths of the model's activations.
    fn shape(c: &Config, n: usize) -> [usize; 6] {
        [
            n,
            c.hidden_size,
            c.q_dim(),
            c.kv_dim(),
            c.intermediate_size,
            c.vocab_size,
        ]
    }

    fn new(c: &Config, n: usize) -> StepRows {
        let z = |w: usize| vec![0.0f32; n * w];
        StepRows {
            shape: StepRows::shape(c, n),
            x: z(c.hidden_size),
            h: z(c.hidden_size),
            q: z(c.q_dim()),
            k: z(c.kv_dim()),
            v: z(c.kv_dim()),
            att: z(c.q_dim()),
            out: z(c.hidden_size),
            g: z(c.intermediate_size),
            u: z(c.intermediate_size),
            logits: z(c.vocab_size),
        }
    }
}

impl DecodeScratch {
    /// The logits of the last decode step run with it.
    pub fn logits(&self) -> &[f32] {
        &self.rows.logits
    }

    pub fn new(c: &Config, ctx: usize) -> DecodeScratch {
        DecodeScratch {
            rows: StepRows::new(c, 1),
            seq: SeqScratch {
                cos: vec![0.0; c.head_dim / 2],
                sin: vec![0.0; c.head_dim / 2],
                scores: vec![0.0; c.num_attention_heads * ctx],
            },
        }
    }
}

/// Activations of one prefill, sized for `n` positions and reused across layers.
pub struct PrefillBuffers {
    h: Vec<f32>,
    q: Vec<f32>,
    /// Keys (after RoPE) and values of the positions run, before they go into the cache.
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    out: Vec<f32>,
}

impl PrefillBuffers {
    pub fn new(c: &Config, n: usize) -> PrefillBuffers {
        let z = |w: usize| vec![0.0f32; n * w];
        PrefillBuffers {
            h: z(c.hidden_size),
            q: z(c.q_dim()),
            k: z(c.kv_dim()),
            v: z(c.kv_dim()),
            att: z(c.q_dim()),
            g: z(c.intermediate_size),
            u: z(c.intermediate_size),
            out: z(c.hidden_size),
        }
    }
}

/// RMSNorm with weights `w` of every row of `x` (rows of `w.len()`) into the rows of `h`.
fn rmsnorm_rows(x: &[f32], w: &[f32], eps: f32, h: &mut [f32]) {
    for (xr, hr) in x.chunks(w.len()).zip(h.chunks_mut(w.len())) {
        cpu::rmsnorm(xr, w, eps, hr);
    }
}

/// Causal attention at positions `pos0..pos0 + n`, before the output projection: RoPE on the
/// queries `q` (`n - q_from` rows, those of positions `pos0 + q_from..`) and on the keys `k`
/// (`n` rows) in place, the keys and values `v` into `kv` (which must already hold positions
/// `0..pos0`), and each query's attention over the positions up to its own into `att`. `rope`
/// holds the cos/sin tables of the `n` positions. Callers that need only the last rows (the
/// greedy search) pass `q_from > 0`.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    c: &Config,
    q: &mut [f32],
    k: &mut [f32],
    v: &[f32],
    n: usize,
    pos0: usize,
    q_from: usize,
    rope: (&[f32], &[f32]),
    mut kv: KvRows<'_>,
    att: &mut [f32],
) {
    let (qd, kvd, hd) = (c.q_dim(), c.kv_dim(), c.head_dim);
    let half = hd / 2;
    let (cos, sin) = rope;
    for t in 0..n {
        let (ct, st) = (
            &cos[t * half..(t + 1) * half],
            &sin[t * half..(t + 1) * half],
        );
        if t >= q_from {
            for head in q[(t - q_from) * qd..(t - q_from + 1) * qd].chunks_mut(hd) {
                reference::rope_neox(head, ct, st);
            }
        }
        for head in k[t * kvd..(t + 1) * kvd].chunks_mut(hd) {
            reference::rope_neox(head, ct, st);
        }
    }
    kv.store(pos0, kvd, k, v);
    let (nh, nkv) = (c.num_attention_heads, c.num_key_value_heads);
    kv.attention(q, n - q_from, pos0 + q_from, nh, nkv, hd, att);
}

fn observe(
    observer: &mut Option<(usize, &mut dyn Observer)>,
    site: Site,
    rows: &[f32],
    width: usize,
) {
    if let Some((l, o)) = observer.as_mut() {
        o.observe(*l, site, rows, width);
    }
}

pub(crate) fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

fn check_finite(name: &str, v: &[f32]) -> Result<()> {
    match teal_kernels::packed::first_where(v, |x| !x.is_finite()) {
        Some(i) => Err(Error::Tensor {
            name: name.into(),
            msg: format!("non-finite value {} at index {i}", v[i]),
        }),
        None => Ok(()),
    }
}
