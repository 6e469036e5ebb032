//! GPU kernel benchmark: device-to-device copy bandwidth, then the TEAL sparse GEMV at the
//! Llama-3-8B and Llama-2/3-70B shapes, f16 and bf16, at several sparsities, against its byte
//! floor `(1-s) * in * out * 2 / BW` and against cuBLAS (GemmEx, n = 1) on the same data.
//! Every kernel is timed as CUDA-graph replays of many launches that rotate among weight copies
//! (more than 2x the L2 in all), so no weight is served from L2; median of several replays.
//!
//! With `--batch B` our GEMV runs on B input rows at once (a prefill chunk; cuBLAS stays at
//! n = 1), each row thresholded on its own, so the rows read are the union of the rows' kept
//! inputs: the floor column still counts one row's sparsity.
//!
//! With `--contiguous` the activations of every run of 64 inputs are sorted by magnitude, so
//! that the kept rows of a sparse GEMV form runs of about `64 (1 - s)` adjacent rows instead of
//! falling at random: the same bytes, read in longer contiguous pieces (a diagnostic: does the
//! sparse GEMV lose bandwidth to the scatter of its rows?).
//!
//! With `--tune` every launch is also timed at each row split of the list given by `--rows`
//! (default 64,128,256,512,1024 rows per chunk), each printed on a `tune` line, and the
//! fastest is reported in the `tuned`/`trows` columns.
//!
//! With `--balanced` the activations of each row are placed so that every run of consecutive
//! inputs holds as nearly as possible the same number of kept ones (the i-th largest |x| at
//! position i * P mod n, P near n / golden ratio and coprime to n): the same bytes, with every
//! chunk of a split keeping the same number of rows (a diagnostic: does the sparse GEMV lose
//! time to chunks that keep more rows than others?).
//!
//! `--sparsities S1,S2,..` replaces the list of sparsities (0..0.9, or 0, 0.5, 0.9 with
//! `--quick`), and `--dtype f16|bf16` measures one weight type only.
//!
//! Usage: cuda_bench [--quick] [--tune] [--rows R1,R2,..] [--sparsities S1,..] [--dtype D]
//! [--batch B] [--json PATH] [--contiguous] [--balanced]

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use cudarc::driver::{sys, CudaSlice, CudaStream};
use teal_kernels::cuda::{CudaError, GemvOpts, GemvPlan, Gpu, GpuLinear, Threshold, WeightDtype};

type Res<T> = std::result::Result<T, CudaError>;

const SPARSITIES: &[f64] = &[0.0, 0.25, 0.4, 0.5, 0.65, 0.75, 0.9];
/// Row splits `--tune` tries unless `--rows` lists others.
const TUNE_ROWS: &[usize] = &[64, 128, 256, 512, 1024];
const ROTATE_BYTES: usize = 256 << 20;
const LAUNCHES: usize = 40;
const REPS: usize = 7;
/// `--contiguous`: see the module comment.
static CONTIGUOUS: AtomicBool = AtomicBool::new(false);
/// `--balanced`: see the module comment.
static BALANCED: AtomicBool = AtomicBool::new(false);

/// `row`'s values, the i-th largest in magnitude moved to position i * P mod n (`--balanced`).
fn balance(row: &mut [f32]) {
    let n = row.len();
    let gcd = |mut a: usize, mut b: usize| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    let mut p = ((n as f64 / 1.618_033_988_75).round() as usize).max(1);
    while gcd(p, n) != 1 {
        p += 1;
    }
    let mut sorted = row.to_vec();
    sorted.sort_by(|a, b| b.abs().total_cmp(&a.abs()));
    for (i, v) in sorted.into_iter().enumerate() {
        row[i * p % n] = v;
    }
}

use teal_kernels::rand::uniform as rand_vec;

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
        let a = ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        let b = ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
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
        let a = ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        let b = ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
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
        let a = ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        let b = ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
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
        let a = ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        let b = ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
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

/// Model dimensions: hidden, key/value width, MLP width.
const MODELS: &[(&str, usize, usize, usize)] = &[
    ("llama3-8b", 4096, 1024, 14336),
    ("llama-70b", 8192, 1024, 28672),
];

/// Weight copies of one shape, each with its own GEMV workspace, plus the matching inputs.
struct Copies {
    lin: Vec<GpuLinear>,
    x32: CudaSlice<f32>,
    x16: CudaSlice<u16>,
    y: CudaSlice<f32>,
    host_x: Vec<f32>,
    /// Input rows per GEMV (`--batch`): x32 and y hold this many rows.
    batch: usize,
}

fn make_copies(
    g: &Gpu,
    n_in: usize,
    n_out: usize,
    dtype: WeightDtype,
    segs: &[usize],
    batch: usize,
) -> Res<Copies> {
    let bytes = n_in * n_out * 2;
    let copies = ROTATE_BYTES.div_ceil(bytes).clamp(2, 64);
    let wt: Vec<f32> = rand_vec(n_in * n_out, 7).iter().map(|v| v * 0.05).collect();
    let bits = dtype.encode(&wt);
    let mut lin = Vec::with_capacity(copies);
    for _ in 0..copies {
        lin.push(g.linear_from_bits(&bits, n_in, n_out, dtype, segs)?);
    }
    let mut host_x = activations(n_in * batch, 3);
    if CONTIGUOUS.load(Ordering::Relaxed) {
        for run in host_x.chunks_mut(64) {
            run.sort_by(|a, b| b.abs().total_cmp(&a.abs()));
        }
    }
    if BALANCED.load(Ordering::Relaxed) {
        host_x.chunks_mut(n_in).for_each(balance);
    }
    Ok(Copies {
        x32: g.upload(&host_x)?,
        x16: g.upload(&dtype.encode(&host_x[..n_in]))?,
        y: g.zeros(n_out * batch)?,
        lin,
        host_x,
        batch,
    })
}

fn time_ours(
    g: &Gpu,
    c: &mut Copies,
    t: f32,
    plan: Option<GemvPlan>,
    accumulate: bool,
    graph: bool,
) -> Res<f64> {
    let s = g.stream().clone();
    let Copies {
        lin, x32, y, batch, ..
    } = c;
    let (n, batch) = (lin.len(), *batch);
    let ts = vec![Threshold::Scalar(t); lin[0].segments().len()];
    let mut i = 0usize;
    let f = || -> Res<()> {
        for _ in 0..LAUNCHES {
            g.gemv(
                &mut lin[i % n],
                x32,
                y,
                batch,
                &ts,
                GemvOpts {
                    accumulate,
                    plan,
                    ..Default::default()
                },
            )?;
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

fn cublas_best(g: &Gpu, blas: &cudarc::cublas::CudaBlas, c: &mut Copies) -> Res<f64> {
    let stream = time_cublas(g, blas, c, false)?;
    Ok(match time_cublas(g, blas, c, true) {
        Ok(t) => t.min(stream),
        Err(e) => {
            eprintln!("cuBLAS graph capture failed ({e}); using stream timing");
            stream
        }
    })
}

/// One projection shape measured at every sparsity.
struct Row {
    s: f64,
    ours: f64,
    ours_acc: f64,
    ours_nopdl: f64,
    rows: usize,
    tuned: f64,
    tuned_rows: usize,
    /// The tuned split timed again, apart from the sweep that chose it (NaN without `--tune`).
    retimed: f64,
    floor: f64,
}

#[allow(clippy::too_many_arguments)]
fn measure(
    g: &mut Gpu,
    blas: &cudarc::cublas::CudaBlas,
    n_in: usize,
    n_out: usize,
    segs: &[usize],
    dtype: WeightDtype,
    sparsities: &[f64],
    bw: f64,
    tune: &[usize],
    full: bool,
    batch: usize,
) -> Res<(f64, Vec<Row>)> {
    let mut c = make_copies(g, n_in, n_out, dtype, segs, batch)?;
    let cub = cublas_best(g, blas, &mut c)?;
    let mut rows = Vec::new();
    for &s in sparsities {
        let t = threshold_for(&c.host_x[..n_in], s);
        let real = c.host_x[..n_in].iter().filter(|v| v.abs() <= t).count() as f64 / n_in as f64;
        let plan = g.gemv_plan(n_in, n_out, (1.0 - s) as f32, batch);
        let ours_acc = time_ours(g, &mut c, t, Some(plan), true, true)?;
        let (mut ours, mut ours_nopdl) = (f64::NAN, f64::NAN);
        if full {
            ours = time_ours(g, &mut c, t, Some(plan), false, true)?;
            g.set_programmatic_launch(false);
            ours_nopdl = time_ours(g, &mut c, t, Some(plan), false, true)?;
            g.set_programmatic_launch(true);
        }
        let (mut tuned, mut tuned_rows) = (ours_acc, plan.rows_per_chunk);
        for &r in tune {
            let tt = time_ours(
                g,
                &mut c,
                t,
                Some(GemvPlan { rows_per_chunk: r }),
                true,
                true,
            )?;
            println!(
                "tune {n_in}x{n_out} {} s={real:.3} rows {r}: {tt:.2} us",
                dtype.name()
            );
            if tt < tuned {
                tuned = tt;
                tuned_rows = r;
            }
        }
        let retimed = if tune.is_empty() {
            f64::NAN
        } else {
            let plan = GemvPlan {
                rows_per_chunk: tuned_rows,
            };
            time_ours(g, &mut c, t, Some(plan), true, true)?
        };
        rows.push(Row {
            s: real,
            ours,
            ours_acc,
            ours_nopdl,
            rows: plan.rows_per_chunk,
            tuned,
            tuned_rows,
            retimed,
            floor: (1.0 - real) * (n_in * n_out * 2) as f64 / bw * 1e6,
        });
    }
    Ok((cub, rows))
}

/// The comma-separated list after `flag`, if given.
fn list_arg<T: std::str::FromStr>(
    args: &[String],
    flag: &str,
) -> std::result::Result<Option<Vec<T>>, String> {
    let Some(i) = args.iter().position(|a| a == flag) else {
        return Ok(None);
    };
    let list = args.get(i + 1).ok_or(format!("{flag} needs a list"))?;
    list.split(',')
        .map(|v| v.parse().map_err(|_| format!("{flag}: cannot read {v:?}")))
        .collect::<Result<_, _>>()
        .map(Some)
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let rows: Vec<usize> = match list_arg(&args, "--rows")? {
        Some(l) => l,
        None => TUNE_ROWS.to_vec(),
    };
    let sparsities: Vec<f64> = match list_arg(&args, "--sparsities")? {
        Some(l) => l,
        None if quick => vec![0.0, 0.5, 0.9],
        None => SPARSITIES.to_vec(),
    };
    let dtypes: Vec<WeightDtype> = match args.iter().position(|a| a == "--dtype") {
        Some(i) => vec![WeightDtype::parse(
            args.get(i + 1).ok_or("--dtype needs a name")?,
        )?],
        None => vec![WeightDtype::F16, WeightDtype::Bf16],
    };
    let tune: &[usize] = if args.iter().any(|a| a == "--tune") {
        &rows
    } else {
        &[]
    };
    CONTIGUOUS.store(args.iter().any(|a| a == "--contiguous"), Ordering::Relaxed);
    BALANCED.store(args.iter().any(|a| a == "--balanced"), Ordering::Relaxed);
    let batch: usize = args
        .iter()
        .position(|a| a == "--batch")
        .and_then(|i| args.get(i + 1))
        .map_or(Ok(1), |b| b.parse())?;
    let json_path = args
        .iter()
        .position(|a| a == "--json")
        .and_then(|i| args.get(i + 1).cloned());
    let mut g = match teal_kernels::cuda::try_gpu(0)? {
        Some(g) => g,
        None => {
            eprintln!(
                "no GPU: {}",
                Gpu::new(0).err().map(|e| e.to_string()).unwrap_or_default()
            );
            return Ok(());
        }
    };
    let mut report = String::new();
    let head = format!("device: {} ({} SMs)\n", g.name(), g.multiprocessors());
    print!("{head}");
    report.push_str(&head);
    let bw = bandwidth(&g, &mut report)?;
    let (blas, _blas_ws) = g.cublas()?;
    let sparsities = &sparsities[..];
    let mut json = Vec::new();
    let mut blocks = String::from(
        "\nper block, graph replay, microseconds. sep: q,k,v,o,gate,up,down as 7 launches; fused: q|k|v, o, gate|up, down as 4 launches (accumulate mode)\n\
         model      dtype     s  floor   sep_ours sep_acc fused_acc cublas_sep cublas_fused  fused/floor  vs_cublas_sep vs_cublas_fused fused_tuned vs_cublas_fused_tuned\n\
         (fused_tuned: each fused launch at the split --tune chose, timed again apart from the sweep)\n",
    );
    println!(
        "{:<10} {:<7} {:>6} {:>6} {:<5} {:>5} {:>8} {:>8} {:>8} {:>8} {:>6} {:>8} {:>6} {:>8} {:>8}",
        "model", "proj", "in", "out", "dtype", "s", "floor", "ours", "acc", "no_pdl", "rows", "tuned", "trows", "cublas", "acc/flr"
    );
    for &(model, d, kv, ffn) in MODELS {
        if quick && model != "llama3-8b" {
            continue;
        }
        for &dtype in &dtypes {
            let shapes: [(&str, usize, usize, Vec<usize>, bool); 7] = [
                ("q", d, d, vec![], true),
                ("k", d, kv, vec![], true),
                ("o", d, d, vec![], true),
                ("gate", d, ffn, vec![], true),
                ("down", ffn, d, vec![], true),
                ("qkv", d, d + 2 * kv, vec![d, d + kv, d + 2 * kv], false),
                ("gateup", d, 2 * ffn, vec![ffn, 2 * ffn], false),
            ];
            let mut res = Vec::new();
            for (name, n_in, n_out, segs, full) in shapes.iter() {
                let (cub, rows) = measure(
                    &mut g, &blas, *n_in, *n_out, segs, dtype, sparsities, bw, tune, *full, batch,
                )?;
                for r in &rows {
                    println!(
                        "{:<10} {:<7} {:>6} {:>6} {:<5} {:>5.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>6} {:>8.2} {:>6} {:>8.2} {:>8.2}",
                        model, name, n_in, n_out, dtype.name(), r.s, r.floor, r.ours, r.ours_acc,
                        r.ours_nopdl, r.rows, r.tuned, r.tuned_rows, cub, r.ours_acc / r.floor
                    );
                    json.push(format!(
                        "{{\"model\":\"{model}\",\"proj\":\"{name}\",\"in\":{n_in},\"out\":{n_out},\"dtype\":\"{}\",\"s\":{:.4},\"floor_us\":{:.3},\"ours_us\":{:.3},\"ours_accumulate_us\":{:.3},\"ours_no_pdl_us\":{:.3},\"rows_per_chunk\":{},\"tuned_us\":{:.3},\"tuned_rows\":{},\"retimed_tuned_us\":{:.3},\"cublas_us\":{:.3}}}",
                        dtype.name(), r.s, r.floor, r.ours, r.ours_acc, r.ours_nopdl, r.rows, r.tuned, r.tuned_rows, r.retimed, cub
                    ).replace("NaN", "null"));
                }
                std::io::stdout().flush()?;
                res.push((cub, rows));
            }
            for (si, &s) in sparsities.iter().enumerate() {
                let at = |i: usize| &res[i].1[si];
                let sep = |f: &dyn Fn(&Row) -> f64| {
                    f(at(0)) + 2.0 * f(at(1)) + f(at(2)) + 2.0 * f(at(3)) + f(at(4))
                };
                let floor = sep(&|r| r.floor);
                let sep_ours = sep(&|r| r.ours);
                let sep_acc = sep(&|r| r.ours_acc);
                let fused = at(5).ours_acc + at(2).ours_acc + at(6).ours_acc + at(4).ours_acc;
                let fused_tuned = at(5).retimed + at(2).retimed + at(6).retimed + at(4).retimed;
                let cub_sep = res[0].0 + 2.0 * res[1].0 + res[2].0 + 2.0 * res[3].0 + res[4].0;
                let cub_fused = res[5].0 + res[2].0 + res[6].0 + res[4].0;
                blocks.push_str(&format!(
                    "{:<10} {:<5} {:>5.2} {:>6.1} {:>9.1} {:>7.1} {:>9.1} {:>10.1} {:>12.1} {:>12.2} {:>14.2} {:>15.2} {:>11.1} {:>21.2}\n",
                    model, dtype.name(), s, floor, sep_ours, sep_acc, fused, cub_sep, cub_fused,
                    fused / floor, cub_sep / fused, cub_fused / fused, fused_tuned, cub_fused / fused_tuned
                ));
            }
        }
    }
    print!("{blocks}");
    report.push_str(&blocks);
    let rows_json = json;
    if let Some(p) = json_path {
        std::fs::write(
            p,
            format!(
                "{{\"bandwidth_Bps\":{bw:.0},\"rows\":[\n{}\n]}}\n",
                rows_json.join(",\n")
            ),
        )?;
    }
    Ok(())
}
