//! Whole-model GPU decoding benchmark with random weights: a Llama-3-8B-shaped model (32 layers,
//! d 4096, 32 heads / 8 KV heads of 128, MLP 14336, vocabulary 128256), weights generated on
//! the device, greedy decoding fully on the device (embedding lookup, 32 blocks, final norm,
//! LM head, argmax feeding the next step), one decode step captured as one CUDA graph.
//! Per block: RMSNorm, fused q|k|v GEMV, RoPE + KV append, attention, o GEMV into the
//! residual, RMSNorm, fused gate|up GEMV, down GEMV (SiLU*mul in its prologue) into the
//! residual: 8 launches.
//!
//! Thresholds are calibrated on the model itself: a few dense decode steps record every input
//! of the four TEAL sites (q|k|v, o, gate|up, down) per layer, and the threshold for target
//! sparsity s is the exact |x| quantile at s (uniform allocation). Realized sparsity is then
//! measured on sparse steps. Reports tok/s at each sparsity against the byte floor.
//!
//! `--leave-out attention,rmsnorm,head` drops those stages from the step, so that each one's
//! cost in place is the difference from the whole step. The GEMVs after a dropped stage read a
//! stale input (the sparse rows then measure a different amount of work): compare the dense row.
//!
//! Usage: cuda_decode [--dtype f16|bf16] [--steps N]

use cudarc::driver::{sys, CudaSlice};
use teal_kernels::cuda::{
    AttentionSplit, CudaError, GemvOpts, Gpu, GpuLinear, Threshold, WeightDtype,
};

type Res<T> = std::result::Result<T, CudaError>;

struct Cfg {
    d: usize,
    n_head: usize,
    n_kv: usize,
    hd: usize,
    ffn: usize,
    layers: usize,
    vocab: usize,
    theta: f32,
    eps: f32,
    max_pos: usize,
}

const LLAMA3_8B: Cfg = Cfg {
    d: 4096,
    n_head: 32,
    n_kv: 8,
    hd: 128,
    ffn: 14336,
    layers: 32,
    vocab: 128256,
    theta: 500000.0,
    eps: 1e-5,
    max_pos: 512,
};

struct Layer {
    qkv: GpuLinear,
    o: GpuLinear,
    gateup: GpuLinear,
    down: GpuLinear,
    attn_norm: CudaSlice<f32>,
    ffn_norm: CudaSlice<f32>,
    kc: CudaSlice<f32>,
    vc: CudaSlice<f32>,
}

struct Model {
    cfg: Cfg,
    dtype: WeightDtype,
    layers: Vec<Layer>,
    final_norm: CudaSlice<f32>,
    lm_head: GpuLinear,
    embed: CudaSlice<u16>,
    cos: CudaSlice<f32>,
    sin: CudaSlice<f32>,
    // per-step state
    h: CudaSlice<f32>,
    xn: CudaSlice<f32>,
    qkv: CudaSlice<f32>,
    attn: CudaSlice<f32>,
    split: AttentionSplit,
    gu: CudaSlice<f32>,
    act: CudaSlice<f32>,
    logits: CudaSlice<f32>,
    tok: CudaSlice<u32>,
    pos: CudaSlice<i32>,
    /// Stages left out of the step (`--leave-out attention,rmsnorm,head`), to read each one's
    /// cost in place as the difference from the whole step.
    leave_out: Vec<String>,
}

/// Called with (layer, site, site input) during uncaptured steps.
type Observer<'a> = dyn FnMut(usize, usize, &CudaSlice<f32>) -> Res<()> + 'a;

/// Thresholds of one layer: q, k, v, o, gate, up, down.
type LayerT = [f32; 7];

impl Model {
    fn new(g: &Gpu, cfg: Cfg, dtype: WeightDtype) -> Res<Self> {
        let (d, kv, ffn) = (cfg.d, cfg.n_kv * cfg.hd, cfg.ffn);
        let sc = |n_in: usize| (3.0 / n_in as f32).sqrt();
        let mut layers = Vec::with_capacity(cfg.layers);
        for l in 0..cfg.layers as u32 {
            let seed = 1000 + 10 * l;
            layers.push(Layer {
                qkv: g.linear_random(
                    d,
                    d + 2 * kv,
                    dtype,
                    &[d, d + kv, d + 2 * kv],
                    seed,
                    sc(d),
                )?,
                o: g.linear_random(d, d, dtype, &[], seed + 1, sc(d))?,
                gateup: g.linear_random(d, 2 * ffn, dtype, &[ffn, 2 * ffn], seed + 2, sc(d))?,
                down: g.linear_random(ffn, d, dtype, &[], seed + 3, sc(ffn))?,
                attn_norm: g.upload(&vec![1.0f32; d])?,
                ffn_norm: g.upload(&vec![1.0f32; d])?,
                kc: g.zeros(cfg.max_pos * kv)?,
                vc: g.zeros(cfg.max_pos * kv)?,
            });
        }
        let half = cfg.hd / 2;
        let mut cos = vec![0.0f32; cfg.max_pos * half];
        let mut sin = vec![0.0f32; cfg.max_pos * half];
        for p in 0..cfg.max_pos {
            for i in 0..half {
                let a = p as f32 * cfg.theta.powf(-((2 * i) as f32) / cfg.hd as f32);
                cos[p * half + i] = a.cos();
                sin[p * half + i] = a.sin();
            }
        }
        let mut embed = g.zeros::<u16>(cfg.vocab * d)?;
        g.fill_random(&mut embed, dtype, 7, 1.0)?;
        Ok(Model {
            lm_head: g.linear_random(d, cfg.vocab, dtype, &[], 9, sc(d))?,
            final_norm: g.upload(&vec![1.0f32; d])?,
            embed,
            cos: g.upload(&cos)?,
            sin: g.upload(&sin)?,
            h: g.zeros(d)?,
            xn: g.zeros(d)?,
            qkv: g.zeros(d + 2 * kv)?,
            attn: g.zeros(d)?,
            split: g.attention_split(cfg.n_head, cfg.n_kv, cfg.hd, cfg.max_pos)?,
            gu: g.zeros(2 * ffn)?,
            act: g.zeros(ffn)?,
            logits: g.zeros(cfg.vocab)?,
            tok: g.upload(&[1u32])?,
            pos: g.upload(&[0i32])?,
            leave_out: Vec::new(),
            layers,
            dtype,
            cfg,
        })
    }

    /// Start a new sequence at position 0 with token 1.
    fn reset(&mut self, g: &Gpu) -> Res<()> {
        g.write(&[1u32], &mut self.tok)?;
        g.write(&[0i32], &mut self.pos)
    }

    /// Enqueue one greedy decode step. `observe(layer, site, input)` is called after each
    /// site's input is computed, sites 0..4 = inputs of q|k|v, o, gate|up, down (None while
    /// capturing a graph).
    fn step(&mut self, g: &Gpu, ts: &[LayerT], mut observe: Option<&mut Observer<'_>>) -> Res<()> {
        let c = &self.cfg;
        let d = c.d;
        g.embed(&self.embed, self.dtype, &self.tok, &mut self.h, d, 1)?;
        let keep = |stage: &str| !self.leave_out.iter().any(|s| s == stage);
        let (attention, rmsnorm, head) = (keep("attention"), keep("rmsnorm"), keep("head"));
        for (li, (l, t)) in self.layers.iter_mut().zip(ts).enumerate() {
            let t = t.map(Threshold::Scalar);
            if rmsnorm {
                g.rmsnorm(&self.h, &l.attn_norm, &mut self.xn, 1, d, c.eps)?;
            }
            if let Some(f) = observe.as_mut() {
                f(li, 0, &self.xn)?;
            }
            let (plain, acc) = (
                GemvOpts::default(),
                GemvOpts {
                    accumulate: true,
                    ..Default::default()
                },
            );
            g.gemv(&mut l.qkv, &self.xn, &mut self.qkv, 1, &t[0..3], plain)?;
            if attention {
                g.attention_rope_decode(
                    &self.qkv,
                    &self.cos,
                    &self.sin,
                    &self.pos,
                    &mut l.kc,
                    &mut l.vc,
                    &mut self.attn,
                    &mut self.split,
                    c.n_head,
                    c.n_kv,
                    c.hd,
                    c.max_pos,
                )?;
            }
            if let Some(f) = observe.as_mut() {
                f(li, 1, &self.attn)?;
            }
            // o and down add straight into the residual stream h.
            g.gemv(&mut l.o, &self.attn, &mut self.h, 1, &t[3..4], acc)?;
            if rmsnorm {
                g.rmsnorm(&self.h, &l.ffn_norm, &mut self.xn, 1, d, c.eps)?;
            }
            if let Some(f) = observe.as_mut() {
                f(li, 2, &self.xn)?;
            }
            g.gemv(&mut l.gateup, &self.xn, &mut self.gu, 1, &t[4..6], plain)?;
            if let Some(f) = observe.as_mut() {
                // The down projection computes silu(gate) * up itself; observing needs it here.
                g.silu_mul(&self.gu, &mut self.act, c.ffn, 1)?;
                f(li, 3, &self.act)?;
            }
            let glu = GemvOpts {
                silu_mul_input: true,
                ..acc
            };
            g.gemv(&mut l.down, &self.gu, &mut self.h, 1, &t[6..7], glu)?;
        }
        if head {
            g.rmsnorm(&self.h, &self.final_norm, &mut self.xn, 1, d, c.eps)?;
            g.gemv(
                &mut self.lm_head,
                &self.xn,
                &mut self.logits,
                1,
                &[Threshold::Scalar(-1.0)],
                GemvOpts::default(),
            )?;
        }
        g.argmax(&self.logits, &mut self.tok, 1, c.vocab)?;
        g.advance_position(&mut self.pos)
    }

    /// Weight bytes read per token at uniform sparsity s (every projection at s, LM head dense).
    fn bytes_per_token(&self, s: f64) -> f64 {
        let c = &self.cfg;
        let (d, kv) = (c.d, c.n_kv * c.hd);
        let per_layer = (d * (d + 2 * kv) + d * d + d * 2 * c.ffn + c.ffn * d) as f64 * 2.0;
        c.layers as f64 * per_layer * (1.0 - s) + (d * c.vocab * 2) as f64
    }
}

/// Median time per launch (µs) of `f` captured 100 times into one graph and replayed.
fn time_small(g: &Gpu, mut f: impl FnMut() -> Res<()>) -> Res<f64> {
    let stream = g.stream().clone();
    f()?;
    g.synchronize()?;
    stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
    let mut r = Ok(());
    for _ in 0..100 {
        r = r.and_then(|_| f());
    }
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0))?;
    r?;
    let graph = graph.ok_or_else(|| CudaError::Invalid("empty graph".into()))?;
    graph.launch()?;
    g.synchronize()?;
    let ctx = stream.context();
    let mut t = Vec::new();
    for _ in 0..5 {
        let a = ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        let b = ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        a.record(&stream)?;
        graph.launch()?;
        b.record(&stream)?;
        b.synchronize()?;
        t.push(a.elapsed_ms(&b)? as f64 * 10.0);
    }
    t.sort_by(f64::total_cmp);
    Ok(t[2])
}

/// Per-launch time of the step's small kernels (chained, as in the step), at 128 cached keys.
fn breakdown(g: &Gpu, m: &mut Model) -> Res<()> {
    let (d, c_ffn) = (m.cfg.d, m.cfg.ffn);
    let (n_head, n_kv, hd, max_pos, eps, vocab) = (
        m.cfg.n_head,
        m.cfg.n_kv,
        m.cfg.hd,
        m.cfg.max_pos,
        m.cfg.eps,
        m.cfg.vocab,
    );
    g.write(&[128i32], &mut m.pos)?;
    let l = &mut m.layers[0];
    let rms = time_small(g, || g.rmsnorm(&m.h, &l.attn_norm, &mut m.xn, 1, d, eps))?;
    let attn = time_small(g, || {
        g.attention_rope_decode(
            &m.qkv,
            &m.cos,
            &m.sin,
            &m.pos,
            &mut l.kc,
            &mut l.vc,
            &mut m.attn,
            &mut m.split,
            n_head,
            n_kv,
            hd,
            max_pos,
        )
    })?;
    let silu = time_small(g, || g.silu_mul(&m.gu, &mut m.act, c_ffn, 1))?;
    let argmax = time_small(g, || g.argmax(&m.logits, &mut m.tok, 1, vocab))?;
    let embed = time_small(g, || g.embed(&m.embed, m.dtype, &m.tok, &mut m.h, d, 1))?;
    println!(
        "small kernels, us per launch (graph of 100 chained launches): rmsnorm {rms:.2}, \
         rope + kv append + attention@129 keys {attn:.2}, silu_mul {silu:.2} (not in the step), \
         argmax {argmax:.2}, embed {embed:.2}; per token 32 x (2 rmsnorm + attention) = {:.0} us",
        32.0 * (2.0 * rms + attn)
    );
    Ok(())
}

fn quantile(v: &mut [f32], s: f64) -> f32 {
    if s <= 0.0 || v.is_empty() {
        return -1.0;
    }
    v.sort_by(f32::total_cmp);
    let k = ((s * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[k - 1]
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let dtype = WeightDtype::parse(&arg("--dtype").unwrap_or_else(|| "bf16".into()))?;
    let steps: usize = arg("--steps").map(|s| s.parse()).transpose()?.unwrap_or(64);
    let leave_out: Vec<String> = arg("--leave-out")
        .map(|s| s.split(',').map(String::from).collect())
        .unwrap_or_default();
    let g = match teal_kernels::cuda::try_gpu(0)? {
        Some(g) => g,
        None => {
            eprintln!(
                "no GPU: {}",
                Gpu::new(0).err().map(|e| e.to_string()).unwrap_or_default()
            );
            return Ok(());
        }
    };
    let bw = g.copy_bandwidth()?;
    let mut m = Model::new(&g, LLAMA3_8B, dtype)?;
    m.leave_out = leave_out;
    let n_layers = m.cfg.layers;
    if steps + 8 >= m.cfg.max_pos {
        return Err(format!("--steps must be below {}", m.cfg.max_pos - 8).into());
    }
    println!(
        "device: {}; copy bandwidth {:.0} GB/s; model: llama3-8b shape, random {} weights, {:.2} GB per dense token",
        g.name(),
        bw / 1e9,
        dtype.name(),
        m.bytes_per_token(0.0) / 1e9
    );

    breakdown(&g, &mut m)?;

    // Calibration: |x| at every site of every layer over 8 dense steps.
    let dense: Vec<LayerT> = vec![[-1.0; 7]; n_layers];
    let mut samples: Vec<Vec<Vec<f32>>> = vec![vec![Vec::new(); 4]; n_layers];
    m.reset(&g)?;
    for _ in 0..8 {
        let mut obs = |l: usize, s: usize, x: &CudaSlice<f32>| -> Res<()> {
            samples[l][s].extend(g.download(x)?.iter().map(|v| v.abs()));
            Ok(())
        };
        m.step(&g, &dense, Some(&mut obs))?;
    }
    g.synchronize()?;

    let ctx = g.stream().context().clone();
    println!(
        "{:>5} {:>9} {:>9} {:>9} {:>10} {:>12} {:>14}",
        "s", "realized", "ms/token", "tok/s", "floor_tok/s", "of_floor", "speedup_vs_s0"
    );
    let mut dense_tps = f64::NAN;
    let mut tokens_dense = Vec::new();
    for &s in &[0.0, 0.25, 0.4, 0.5, 0.65] {
        let ts: Vec<LayerT> = (0..n_layers)
            .map(|l| {
                let q: Vec<f32> = (0..4)
                    .map(|site| quantile(&mut samples[l][site].clone(), s))
                    .collect();
                [q[0], q[0], q[0], q[1], q[2], q[2], q[3]]
            })
            .collect();
        // Realized sparsity over 4 uncaptured steps, weighted by the weights each site gates.
        let c = &m.cfg;
        let (d, kv, ffn) = (c.d, c.n_kv * c.hd, c.ffn);
        let w = [d * (d + 2 * kv), d * d, d * 2 * ffn, ffn * d];
        let (mut zero_w, mut all_w) = (0.0f64, 0.0f64);
        m.reset(&g)?;
        for _ in 0..4 {
            let mut obs = |l: usize, site: usize, x: &CudaSlice<f32>| -> Res<()> {
                let v = g.download(x)?;
                let t = ts[l][[0, 3, 4, 6][site]];
                let z = v.iter().filter(|a| a.abs() <= t).count() as f64 / v.len() as f64;
                zero_w += z * w[site] as f64;
                all_w += w[site] as f64;
                Ok(())
            };
            m.step(&g, &ts, Some(&mut obs))?;
        }
        let realized = zero_w / all_w;

        m.reset(&g)?;
        let stream = g.stream().clone();
        stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
        let r = m.step(&g, &ts, None);
        let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0))?;
        r?;
        let graph = graph.ok_or("empty graph")?;
        graph.upload()?;
        m.reset(&g)?;
        let mut toks = Vec::new();
        for _ in 0..3 {
            graph.launch()?;
        }
        g.synchronize()?;
        m.reset(&g)?;
        let a = ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        let b = ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        a.record(&stream)?;
        for _ in 0..steps {
            graph.launch()?;
        }
        b.record(&stream)?;
        b.synchronize()?;
        let ms = a.elapsed_ms(&b)? as f64 / steps as f64;
        // Greedy tokens of the first 8 steps, for a dense/sparse comparison.
        m.reset(&g)?;
        for _ in 0..8 {
            graph.launch()?;
            toks.push(g.download(&m.tok)?[0]);
        }
        let tps = 1e3 / ms;
        if s == 0.0 {
            dense_tps = tps;
            tokens_dense = toks.clone();
        }
        let floor_tps = bw / m.bytes_per_token(realized);
        println!(
            "{:>5.2} {:>9.3} {:>9.3} {:>9.1} {:>10.1} {:>12.2} {:>14.2}   tokens {:?}{}",
            s,
            realized,
            ms,
            tps,
            floor_tps,
            tps / floor_tps,
            tps / dense_tps,
            toks,
            if s > 0.0 && toks == tokens_dense {
                " (= dense)"
            } else {
                ""
            }
        );
    }
    Ok(())
}
