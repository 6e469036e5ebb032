//! GPU kernel benchmark: device-to-device copy bandwidth, then the TEAL sparse GEMV at the
//! Llama-3-8B and Llama-2/3-70B shapes, f16 and bf16, at several sparsities, against its byte
//! floor `(1-s) * in * out * 2 / BW` and against cuBLAS (GemmEx, n = 1) on the same data.
//! Every kernel is timed as CUDA-graph replays of many launches that rotate among weight copies
//! (more than 2x the L2 in all), so no weight is served from L2; median of several replays.
//!
//! Usage: cuda_bench [--quick] [--tune] [--json PATH]

use std::io::Write;
use std::sync::Arc;

use cudarc::driver::{sys, CudaSlice, CudaStream};
use teal_kernels::cuda::{CudaError, GemvPlan, Gpu, GpuLinear, WeightDtype};

type Res<T> = std::result::Result<T, CudaError>;

const SPARSITIES: &[f64] = &[0.0, 0.25, 0.4, 0.5, 0.65, 0.75, 0.9];
const ROTATE_BYTES: usize = 256 << 20;
const LAUNCHES: usize = 40;
const REPS: usize = 7;

fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
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

/// Roughly Gaussian activations (sum of four uniforms), as TEAL's inputs are.
fn activations(n: usize, seed: u64) -> Vec<f32> {
    let u = rand_vec(4 * n, seed);
    u.chunks(4).map(|c| c.iter().sum::<f32>()).collect()
}

fn threshold_for(x: &[f32], s: f64) -> f32 {
    if s <= 0.0 {
        return -1.0;
    }
    let mut a: Vec<f32> = x.iter().map(|v| v.abs()).collect();
    a.sort_by(f32::total_cmp);
    let k = ((s * a.len() as f64).ceil() as usize).clamp(1, a.len());
    a[k - 1]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Time `f` (which enqueues `LAUNCHES` launches) as a captured graph: median per launch, µs.
fn time_graph(stream: &Arc<CudaStream>, mut f: impl FnMut() -> Res<()>) -> Res<f64> {
    f()?;
    stream.synchronize()?;
    stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
    let r = f();
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0))?;
    r?;
    let graph = graph.ok_or_else(|| CudaError::Invalid("empty graph".into()))?;
    graph.upload()?;
    graph.launch()?;
    stream.synchronize()?;
    let ctx = stream.context();
    let mut times = Vec::with_capacity(REPS);
    for _ in 0..REPS {
        let a = ctx.new_event(None)?;
        let b = ctx.new_event(None)?;
        a.record(stream)?;
        graph.launch()?;
        b.record(stream)?;
        b.synchronize()?;
        times.push(a.elapsed_ms(&b)? as f64 * 1e3 / LAUNCHES as f64);
    }
    Ok(median(times))
}

/// Time `f` (which enqueues `LAUNCHES` launches) on the stream directly: median per launch, µs.
fn time_stream(stream: &Arc<CudaStream>, mut f: impl FnMut() -> Res<()>) -> Res<f64> {
    f()?;
    stream.synchronize()?;
    let ctx = stream.context();
    let mut times = Vec::with_capacity(REPS);
    for _ in 0..REPS {
        let a = ctx.new_event(None)?;
        let b = ctx.new_event(None)?;
        a.record(stream)?;
        f()?;
        b.record(stream)?;
        b.synchronize()?;
        times.push(a.elapsed_ms(&b)? as f64 * 1e3 / LAUNCHES as f64);
    }
    Ok(median(times))
}

fn bandwidth(g: &Gpu, out: &mut String) -> Res<f64> {
    let n = 1usize << 30; // u16 elements: 2 GiB per buffer
    let src = g.upload(&vec![0x3c00u16; n])?;
    let mut dst = g.zeros::<u16>(n)?;
    let s = g.stream().clone();
    let ctx = s.context().clone();
    let mut copy = Vec::new();
    for _ in 0..10 {
        let a = ctx.new_event(None)?;
        let b = ctx.new_event(None)?;
        a.record(&s)?;
        s.memcpy_dtod(&src, &mut dst)?;
        b.record(&s)?;
        b.synchronize()?;
        copy.push(a.elapsed_ms(&b)? as f64 * 1e-3);
    }
    let copy_bw = 2.0 * (n * 2) as f64 / median(copy);
    let mut sink = g.zeros::<u32>(1)?;
    let mut read = Vec::new();
    for _ in 0..10 {
        let a = ctx.new_event(None)?;
        let b = ctx.new_event(None)?;
        a.record(&s)?;
        g.read_probe(&src, &mut sink)?;
        b.record(&s)?;
        b.synchronize()?;
        read.push(a.elapsed_ms(&b)? as f64 * 1e-3);
    }
    let read_bw = (n * 2) as f64 / median(read);
    let line = format!(
        "bandwidth: device-to-device copy {:.0} GB/s (read + write counted), read-only kernel {:.0} GB/s\n",
        copy_bw / 1e9,
        read_bw / 1e9
    );
    print!("{line}");
    out.push_str(&line);
    Ok(copy_bw)
}

struct Shape {
    model: &'static str,
    name: &'static str,
    n_in: usize,
    n_out: usize,
}

const SHAPES: &[Shape] = &[
    Shape { model: "llama3-8b", name: "q", n_in: 4096, n_out: 4096 },
    Shape { model: "llama3-8b", name: "k", n_in: 4096, n_out: 1024 },
    Shape { model: "llama3-8b", name: "v", n_in: 4096, n_out: 1024 },
    Shape { model: "llama3-8b", name: "o", n_in: 4096, n_out: 4096 },
    Shape { model: "llama3-8b", name: "gate", n_in: 4096, n_out: 14336 },
    Shape { model: "llama3-8b", name: "up", n_in: 4096, n_out: 14336 },
    Shape { model: "llama3-8b", name: "down", n_in: 14336, n_out: 4096 },
    Shape { model: "llama-70b", name: "q", n_in: 8192, n_out: 8192 },
    Shape { model: "llama-70b", name: "k", n_in: 8192, n_out: 1024 },
    Shape { model: "llama-70b", name: "v", n_in: 8192, n_out: 1024 },
    Shape { model: "llama-70b", name: "o", n_in: 8192, n_out: 8192 },
    Shape { model: "llama-70b", name: "gate", n_in: 8192, n_out: 28672 },
    Shape { model: "llama-70b", name: "up", n_in: 8192, n_out: 28672 },
    Shape { model: "llama-70b", name: "down", n_in: 28672, n_out: 8192 },
];

/// Weight copies of one shape, each with its own GEMV workspace, plus the matching inputs.
struct Copies {
    lin: Vec<GpuLinear>,
    x32: CudaSlice<f32>,
    x16: CudaSlice<u16>,
    y: CudaSlice<f32>,
    host_x: Vec<f32>,
}

fn make_copies(g: &Gpu, n_in: usize, n_out: usize, dtype: WeightDtype, segs: &[usize]) -> Res<Copies> {
    let bytes = n_in * n_out * 2;
    let copies = ROTATE_BYTES.div_ceil(bytes).clamp(2, 64);
    let wt: Vec<f32> = rand_vec(n_in * n_out, 7).iter().map(|v| v * 0.05).collect();
    let bits = dtype.encode(&wt);
    let mut lin = Vec::with_capacity(copies);
    for _ in 0..copies {
        lin.push(g.linear_from_bits(&bits, n_in, n_out, dtype, segs)?);
    }
    let host_x = activations(n_in, 3);
    Ok(Copies {
        x32: g.upload(&host_x)?,
        x16: g.upload(&dtype.encode(&host_x))?,
        y: g.zeros(n_out)?,
        lin,
        host_x,
    })
}

fn time_ours(g: &Gpu, c: &mut Copies, ts: &[f32], plan: Option<GemvPlan>, graph: bool) -> Res<f64> {
    let s = g.stream().clone();
    let Copies { lin, x32, y, .. } = c;
    let n = lin.len();
    let mut i = 0usize;
    let f = || -> Res<()> {
        for _ in 0..LAUNCHES {
            g.gemv(&mut lin[i % n], x32, y, 1, ts, 0.0, plan)?;
            i += 1;
        }
        Ok(())
    };
    if graph {
        time_graph(&s, f)
    } else {
        time_stream(&s, f)
    }
}

fn time_cublas(g: &Gpu, blas: &cudarc::cublas::CudaBlas, c: &mut Copies, graph: bool) -> Res<f64> {
    let s = g.stream().clone();
    let Copies { lin, x16, y, .. } = c;
    let n = lin.len();
    let mut i = 0usize;
    let f = || -> Res<()> {
        for _ in 0..LAUNCHES {
            let l = &lin[i % n];
            g.cublas_gemv(blas, l.weights(), x16, y, l.n_in, l.n_out, l.dtype, false)?;
            i += 1;
        }
        Ok(())
    };
    if graph {
        time_graph(&s, f)
    } else {
        time_stream(&s, f)
    }
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let tune = args.iter().any(|a| a == "--tune");
    let json_path = args
        .iter()
        .position(|a| a == "--json")
        .and_then(|i| args.get(i + 1).cloned());
    let g = match teal_kernels::cuda::try_gpu(0)? {
        Some(g) => g,
        None => {
            eprintln!("no GPU: {}", Gpu::new(0).err().map(|e| e.to_string()).unwrap_or_default());
            return Ok(());
        }
    };
    let mut report = String::new();
    let head = format!("device: {} ({} SMs)\n", g.name(), g.multiprocessors());
    print!("{head}");
    report.push_str(&head);
    let bw = bandwidth(&g, &mut report)?;
    let (blas, _blas_ws) = g.cublas()?;
    let mut rows_json = Vec::new();
    let sparsities: &[f64] = if quick { &[0.0, 0.5, 0.9] } else { SPARSITIES };
    let dtypes = [WeightDtype::F16, WeightDtype::Bf16];
    // per (model, dtype, s): sums for the block table
    let mut block: std::collections::BTreeMap<(String, &str, usize), (f64, f64, f64)> =
        Default::default();
    println!(
        "{:<10} {:<5} {:>6} {:>6} {:<5} {:>5} {:>9} {:>9} {:>9} {:>8} {:>9} {:>9} {:>7}",
        "model", "proj", "in", "out", "dtype", "s", "ours_us", "floor_us", "xfloor", "rows", "cublas_us", "speedup", "stream"
    );
    for sh in SHAPES {
        if quick && sh.model != "llama3-8b" {
            continue;
        }
        if sh.name == "v" || sh.name == "up" {
            // same shape as k / gate: reuse those measurements in the block sums
            continue;
        }
        let mult = if sh.name == "k" || sh.name == "gate" { 2.0 } else { 1.0 };
        for dtype in dtypes {
            let mut c = make_copies(&g, sh.n_in, sh.n_out, dtype, &[])?;
            let cub_stream = time_cublas(&g, &blas, &mut c, false)?;
            let cub = match time_cublas(&g, &blas, &mut c, true) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("cuBLAS graph capture failed ({e}); using stream timing");
                    cub_stream
                }
            };
            for (si, &s) in sparsities.iter().enumerate() {
                let t = threshold_for(&c.host_x, s);
                let real = c.host_x.iter().filter(|v| v.abs() <= t).count() as f64 / sh.n_in as f64;
                let density = (1.0 - s).max(0.0) as f32;
                let plan = g.gemv_plan(sh.n_in, sh.n_out, density);
                let mut ours = time_ours(&g, &mut c, &[t], Some(plan), true)?;
                let mut rows = plan.rows_per_chunk;
                let ours_stream = time_ours(&g, &mut c, &[t], Some(plan), false)?;
                if tune {
                    for r in [64usize, 128, 256, 512, 1024] {
                        let p = GemvPlan { rows_per_chunk: r };
                        let tt = time_ours(&g, &mut c, &[t], Some(p), true)?;
                        if tt < ours {
                            ours = tt;
                            rows = r;
                        }
                    }
                }
                let floor = (1.0 - real) * (sh.n_in * sh.n_out * 2) as f64 / bw * 1e6;
                println!(
                    "{:<10} {:<5} {:>6} {:>6} {:<5} {:>5.2} {:>9.2} {:>9.2} {:>9.2} {:>8} {:>9.2} {:>9.2} {:>7.2}",
                    sh.model, sh.name, sh.n_in, sh.n_out, dtype.name(), real, ours, floor,
                    ours / floor, rows, cub, cub / ours, ours_stream
                );
                rows_json.push(format!(
                    "{{\"model\":\"{}\",\"proj\":\"{}\",\"in\":{},\"out\":{},\"dtype\":\"{}\",\"s\":{:.4},\"ours_us\":{:.3},\"ours_stream_us\":{:.3},\"floor_us\":{:.3},\"rows_per_chunk\":{},\"cublas_us\":{:.3},\"cublas_stream_us\":{:.3}}}",
                    sh.model, sh.name, sh.n_in, sh.n_out, dtype.name(), real, ours, ours_stream, floor, rows, cub, cub_stream
                ));
                let e = block.entry((sh.model.to_string(), dtype.name(), si)).or_default();
                e.0 += mult * ours;
                e.1 += mult * floor;
                e.2 += mult * cub;
            }
            std::io::stdout().flush()?;
        }
    }
    let mut table = String::from(
        "\nper block (q,k,v,o,gate,up,down as 7 separate launches; graph replay):\n\
         model      dtype     s   ours_us  floor_us  xfloor  cublas_us  speedup_vs_cublas\n",
    );
    for ((model, dtype, si), (o, f, c)) in &block {
        table.push_str(&format!(
            "{:<10} {:<5} {:>5.2} {:>9.2} {:>9.2} {:>7.2} {:>10.2} {:>8.2}\n",
            model, dtype, sparsities[*si], o, f, o / f, c, c / o
        ));
    }
    print!("{table}");
    report.push_str(&table);
    if let Some(p) = json_path {
        std::fs::write(
            p,
            format!("{{\"bandwidth_Bps\":{bw:.0},\"rows\":[\n{}\n]}}\n", rows_json.join(",\n")),
        )?;
    }
    Ok(())
}
