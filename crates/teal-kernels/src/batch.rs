//! Decode steps of several sequences through the same weights at once (the server's slots): each
//! weight row is read once for all of them and multiplied by every step's input, so a step
//! costs a fraction of the weights' bytes. The rows read are the union of the steps' kept
//! inputs. Each output row is what [`crate::cpu::gemv_many`] / [`crate::cpu::gemv_dot`] compute
//! for that input row, up to float summation order; one row is those kernels themselves. Where
//! the rows together would be slower than one after another (by format, number of rows, size
//! against the last-level cache and the union's size: `worth_together`), each GEMV runs its
//! rows apart with the one-row kernels; q4 always does.

#[cfg(target_arch = "x86_64")]
use crate::cpu::f16_at;
use crate::cpu::{self, Gemv, Mask, SendPtr, Split, MAX_MANY};
use crate::packed::{groups, Mat, RowsMat, View, GROUP, Q4_BLOCK, Q8_BLOCK};
use crate::pool;

/// The most input rows (decode steps) one call takes.
pub const MAX_ROWS: usize = 8;

/// Kept rows a pass of the AVX2 tile multiplies at a time: each output vector is loaded and
/// stored once per this many weight rows. On Llama-3-8B's 4096 x 14336 from DRAM (f16, 4
/// rows), passes of 8 rows ran 1.1x faster than of 4 and 1.9x faster than of 16
/// (`gemv_speed --rows`).
const PASS: usize = 8;

/// Bytes of the output tiles (of all rows) a work item fills at a time: they stay in L2 while
/// the weight rows stream past them.
const TILE_OUT_BYTES: usize = 128 * 1024;

/// Columns the portable tile dequantizes at a time.
const PIECE: usize = 512;

/// [`cpu::gemv_many`] on `nb` input rows: `x` holds `nb` rows of `n_in`, each GEMV's `y` `nb`
/// rows of its `n_out`; row `b` of `y` is `W s(x_b)`, `s` the GEMV's mask.
pub fn gemv_many_rows(x: &[f32], nb: usize, gemvs: &mut [Gemv]) {
    if nb == 1 {
        cpu::gemv_many(x, gemvs);
        return;
    }
    gemv_many_rows_on(x, nb, gemvs, cpu::simd_available(), worth_together)
}

/// Prefill's product on `nb` positions (`x` holds `nb` rows of `w.n_in`, `y` `nb` rows of
/// `w.n_out`): every weight row is read once and multiplied in f32 by all the rows, whatever
/// the format, so each row is the exact product with the dequantized weights up to summation
/// order (the one-row q4 kernel, and q8's where the CPU has VNNI, round the activations to 8
/// bits instead).
pub fn matmul_rows(x: &[f32], nb: usize, w: Mat, y: &mut [f32]) {
    let mut g = [Gemv {
        w,
        mask: Mask::Dense,
        y,
    }];
    gemv_many_rows_on(x, nb, &mut g, cpu::simd_available(), always);
}

/// The choice that runs every GEMV's rows together.
fn always(_: &View, _: usize, _: usize, _: usize, _: usize) -> bool {
    true
}

/// Whether a GEMV runs its rows together: `(weights, rows, bytes of the weights, union of the
/// kept inputs, kept inputs of all rows)`.
type Choice = fn(&View, usize, usize, usize, usize) -> bool;

/// [`gemv_many_rows`] with the SIMD choice and the choice to run the rows together explicit
/// (tests run the portable path on AVX2 machines, and both ways).
fn gemv_many_rows_on(x: &[f32], nb: usize, gemvs: &mut [Gemv], simd: bool, choose: Choice) {
    assert!(
        (1..=MAX_ROWS).contains(&nb),
        "gemv_many_rows: {nb} rows, 1 to {MAX_ROWS}"
    );
    let n = gemvs.len();
    assert!(
        n <= MAX_MANY,
        "gemv_many_rows: {n} GEMVs, at most {MAX_MANY}"
    );
    let mut together = [false; MAX_MANY];
    let wide = simd && nb >= WIDE_FROM && wide_available();
    cpu::SCRATCH.with_borrow_mut(
        |cpu::Scratch {
             lists, partials, ..
         }| {
            for (i, g) in gemvs.iter().enumerate() {
                g.w.assert_sized("gemv_many_rows");
                assert_eq!(x.len(), nb * g.w.n_in, "gemv_many_rows: input size");
                assert_eq!(g.y.len(), nb * g.w.n_out, "gemv_many_rows: output size");
                if let Mask::Channels(t) = g.mask {
                    assert_eq!(t.len(), g.w.n_in, "gemv_many_rows: per-channel thresholds");
                }
                // Whether the rows could gain at all (all of them keeping every input), before
                // their union is taken.
                let (idx, val) = &mut lists[i];
                let bytes = g.w.n_in * g.w.view.bytes_per_row(g.w.n_out);
                together[i] = choose(&g.w.view, nb, bytes, g.w.n_in, nb * g.w.n_in) && {
                    let kept = union_kept(x, nb, g.mask, idx, val);
                    choose(&g.w.view, nb, bytes, idx.len(), kept)
                };
            }
            let plan = cpu::Plan::new(gemvs, nb, &together);
            cpu::grow(partials, plan.partials());
            let pp = SendPtr(partials.as_mut_ptr());
            let lists = &*lists;
            let gemvs = &*gemvs;
            pool::for_each(plan.items(), |c| {
                let (i, c, items) = plan.item(c);
                let g = &gemvs[i];
                let (idx, val) = &lists[i];
                let n_out = g.w.n_out;
                match plan.split[i] {
                    Split::Columns(per) => {
                        let (o0, len) = (c * per, per.min(n_out - c * per));
                        // SAFETY: item c of GEMV i writes columns o0..o0+len of each of the nb
                        // output rows (stride n_out), which no other item touches.
                        unsafe {
                            tile_rows(
                                &g.w,
                                idx,
                                val,
                                nb,
                                o0,
                                len,
                                plan.y(i).add(o0),
                                n_out,
                                simd,
                                wide,
                            )
                        }
                    }
                    Split::Rows(_) => {
                        // An equal share of the kept inputs, into this item's own nb partial rows.
                        let (k0, k1) = (c * idx.len() / items, (c + 1) * idx.len() / items);
                        // SAFETY: item c owns nb * n_out partial values at
                        // plan.partial_at(i, c, n_out), inside `partials` (sized above).
                        unsafe {
                            tile_rows(
                                &g.w,
                                &idx[k0..k1],
                                &val[k0 * nb..k1 * nb],
                                nb,
                                0,
                                n_out,
                                pp.get().add(plan.partial_at(i, c, n_out)),
                                n_out,
                                simd,
                                wide,
                            )
                        }
                    }
                }
            });
            plan.sum_partials(gemvs, partials);
        },
    );
    let mut apart: Vec<Gemv> = gemvs
        .iter_mut()
        .zip(together)
        .filter(|(_, t)| !t)
        .map(|(g, _)| Gemv {
            w: g.w,
            mask: g.mask,
            y: &mut *g.y,
        })
        .collect();
    if !apart.is_empty() {
        one_row_at_a_time(x, nb, &mut apart, simd);
    }
}

/// Whether `nb` rows' GEMV on weights `view` (`bytes` of them) runs faster together, reading
/// the `union` rows any of them keeps, than one row after another, reading `kept` rows in all:
/// the tile here multiplies each weight it reads by every row, and costs `1 + a (nb - 1)`
/// times the one-row kernel per row read, `a` measured per format on the 2-core machine
/// (Llama-3-8B's 4096 x 14336 and 14336 x 4096 from DRAM, 2 and 4 rows, `gemv_speed --rows`).
/// - q8: from three rows, and only matrices larger than a quarter of the last-level cache.
///   From DRAM two rows together were 1.2-1.4x faster than apart and four 1.5-1.7x, but on
///   SmolLM2, whose layers fit the cache (so that the rows after the first, apart, read them
///   from there), decoding went from 183-188 to 148 tok/s with two rows and from 173-197 to
///   158-167 with four. Where the one-row kernel multiplies in integers ([`cpu::int8_dots`])
///   apart costs less: dense, four rows together were 1.1-1.4x faster than apart, two
///   1.0-1.1x, at 50 % 0.6-0.8x (`a` about 0.65-1.0).
/// - q4 never: its one-row kernel multiplies 8-bit activations by the nibbles 16 at a time,
///   where the tile decodes each weight to f32, and the rows together ran 0.6-0.8x as fast as
///   one after another.
fn worth_together(view: &View, nb: usize, bytes: usize, union: usize, kept: usize) -> bool {
    let a = match view {
        View::F32(_) | View::F16(_) => 0.15,
        View::Bf16(_) => 0.25,
        View::Q8(_) if nb >= 3 && bytes > last_level_cache() / 4 => {
            if cpu::int8_dots() {
                0.8
            } else {
                0.55
            }
        }
        View::Q8(_) | View::Q4(_) => return false,
    };
    union as f64 * (1.0 + a * (nb - 1) as f64) < kept as f64
}

/// Bytes of the last-level cache (Linux's sysfs; 32 MiB where it cannot be read).
fn last_level_cache() -> usize {
    static BYTES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *BYTES.get_or_init(|| {
        (0..8)
            .rev()
            .find_map(|i| {
                let dir = format!("/sys/devices/system/cpu/cpu0/cache/index{i}");
                let size = std::fs::read_to_string(format!("{dir}/size")).ok()?;
                let size = size.trim();
                let (num, mult) = match size.strip_suffix('K') {
                    Some(k) => (k, 1024),
                    None => match size.strip_suffix('M') {
                        Some(m) => (m, 1024 * 1024),
                        None => (size, 1),
                    },
                };
                Some(num.parse::<usize>().ok()? * mult)
            })
            .unwrap_or(32 << 20)
    })
}

/// [`gemv_many_rows`] as one [`cpu::gemv_many`] per row.
fn one_row_at_a_time(x: &[f32], nb: usize, gemvs: &mut [Gemv], simd: bool) {
    let n_in = x.len() / nb;
    for b in 0..nb {
        let mut row: Vec<Gemv> = gemvs
            .iter_mut()
            .map(|g| {
                let n = g.w.n_out;
                Gemv {
                    w: g.w,
                    mask: g.mask,
                    y: &mut g.y[b * n..(b + 1) * n],
                }
            })
            .collect();
        cpu::gemv_many_on(&x[b * n_in..(b + 1) * n_in], &mut row, simd);
    }
}

/// The inputs that any of the `nb` rows of `x` keeps under `mask`: their indices into `idx`
/// and, for each, the `nb` rows' values into `val` (zero where a row's mask drops it).
/// Returns how many inputs the rows keep in all (the rows one after another would read).
fn union_kept(x: &[f32], nb: usize, mask: Mask, idx: &mut Vec<u32>, val: &mut Vec<f32>) -> usize {
    let n_in = x.len() / nb;
    idx.clear();
    val.clear();
    let mut kept = 0;
    for j in 0..n_in {
        let t = match mask {
            Mask::Dense => None,
            Mask::Threshold(t) => Some(t),
            Mask::Channels(t) => Some(t[j]),
        };
        let at = val.len();
        let mut n = 0;
        for b in 0..nb {
            let v = x[b * n_in + j];
            let keep = t.is_none_or(|t| v.abs() > t);
            n += keep as usize;
            val.push(if keep { v } else { 0.0 });
        }
        if n > 0 {
            idx.push(j as u32);
        } else {
            val.truncate(at);
        }
        kept += n;
    }
    kept
}

/// Columns `o0 .. o0 + len` of the `nb` output rows (row `b` at `out + b * stride`, column `o0`
/// at `out`): `y_b = sum_k val[k nb + b] w[idx[k], :]`. With `simd`, the AVX2 tile, or with
/// `wide` the AVX-512 one ([`Wide`]).
///
/// # Safety
/// `out` must be valid for those writes; `w`'s view must hold its `n_in` rows of `n_out`; `o0`
/// a multiple of [`GROUP`], `o0 + len <= n_out`, every index below `n_in`,
/// `val.len() == nb * idx.len()`; `simd` only where [`cpu::simd_available`], `wide` only with
/// `simd` where [`wide_available`].
#[allow(clippy::too_many_arguments)]
unsafe fn tile_rows(
    w: &Mat,
    idx: &[u32],
    val: &[f32],
    nb: usize,
    o0: usize,
    len: usize,
    out: *mut f32,
    stride: usize,
    simd: bool,
    wide: bool,
) {
    for b in 0..nb {
        std::slice::from_raw_parts_mut(out.add(b * stride), len).fill(0.0);
    }
    let full = len / GROUP * GROUP;
    #[cfg(target_arch = "x86_64")]
    if simd {
        let tile = |g: usize, gn: usize| Tile {
            idx,
            val,
            nb,
            g0: o0 / GROUP + g,
            gn,
            out: out.add(g * GROUP),
            stride,
        };
        if wide {
            each_format(w, &Wide(tile(0, full / GROUP)));
        } else {
            // Tiles of about TILE_OUT_BYTES of outputs, whole multiples of eight groups.
            let tw = (TILE_OUT_BYTES / (4 * nb)).max(8 * GROUP) / (8 * GROUP) * 8;
            for g in (0..full / GROUP).step_by(tw) {
                each_format(w, &tile(g, tw.min(full / GROUP - g)));
            }
        }
        tile_rows_portable(
            w,
            idx,
            val,
            nb,
            o0 + full,
            len - full,
            out.add(full),
            stride,
        );
        return;
    }
    let _ = (simd, wide, full);
    tile_rows_portable(w, idx, val, nb, o0, len, out, stride)
}

/// [`tile_rows`] by the scalar definition: each kept row's piece dequantized, then added to
/// every output row times its value.
#[allow(clippy::too_many_arguments)]
unsafe fn tile_rows_portable(
    w: &Mat,
    idx: &[u32],
    val: &[f32],
    nb: usize,
    o0: usize,
    len: usize,
    out: *mut f32,
    stride: usize,
) {
    let mut buf = [0.0f32; PIECE];
    for p0 in (0..len).step_by(PIECE) {
        let pn = PIECE.min(len - p0);
        let piece = &mut buf[..pn];
        for (k, &j) in idx.iter().enumerate() {
            w.dequant_row(j as usize, o0 + p0, piece);
            for b in 0..nb {
                let xv = val[k * nb + b];
                let y = std::slice::from_raw_parts_mut(out.add(b * stride + p0), pn);
                for (a, &v) in y.iter_mut().zip(piece.iter()) {
                    *a += xv * v;
                }
            }
        }
    }
}

/// Rows from which [`tile_rows`] keeps the sums of every output row in registers
/// ([`Wide`]) where the CPU has AVX-512's 32 vector registers.
const WIDE_FROM: usize = 5;

#[cfg(target_arch = "x86_64")]
/// Kept rows per block of [`Wide`]: the rows it reads at a time, each from its own
/// place in memory. SmolLM2-135M's 8-position prefill ran 1.2-1.5x faster with 32 than with
/// 256 (f32, f16; level in q4), whose many streams at once left every line a miss; Llama-3-8B's
/// shapes from `gemv_speed --prefill` were level.
const WIDE_ROWS: usize = 32;

#[cfg(target_arch = "x86_64")]
/// Columns per block of [`Wide`]: a block's pieces of rows are 288 bytes (q4) to
/// 2 KiB (f32) long, and 128 columns (0.25-0.5 KiB pieces) ran up to 2x slower in f16.
const WIDE_COLS: usize = 512;

/// Whether [`Wide`] runs where five or more rows go together: AVX-512 with 256-bit
/// vectors (VL), for its 32 registers.
pub(crate) fn wide_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        cpu::simd_available()
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The [`Tile`] for five to eight rows, where the CPU has AVX-512 VL ([`wide_available`]):
/// per sixteen columns, each row's two sums stay in registers over a block of [`WIDE_ROWS`]
/// kept rows, each weight is decoded once and multiplied by every row's value, and the outputs are loaded and stored once per block. The AVX2 tile
/// instead decodes each weight once per four rows and adds each pass of rows into the outputs
/// in memory; for eight rows (a short prompt's product) it took 1.2-1.7x this tile's time on
/// Llama-3-8B's and SmolLM2's shapes in q4, q8, f16 and f32 (`gemv_speed --prefill`).
#[cfg(target_arch = "x86_64")]
struct Wide<'a>(Tile<'a>);

/// A tile that runs on any weight format's [`Chunks`].
#[cfg(target_arch = "x86_64")]
trait OnChunks {
    /// # Safety
    /// As the tile's own `run`.
    unsafe fn on<F: Chunks>(&self, f: &F);
}

/// Runs `tile` on `w`'s format.
///
/// # Safety
/// As the tile's own `run`.
#[cfg(target_arch = "x86_64")]
unsafe fn each_format(w: &Mat, tile: &impl OnChunks) {
    let (n, ng) = (w.n_out, groups(w.n_out));
    match w.view {
        View::F32(a) => tile.on(&F32s { a: a.as_ptr(), n }),
        View::F16(a) => tile.on(&Halves::<false> {
            a: a.as_ptr() as *const u16,
            n,
        }),
        View::Bf16(a) => tile.on(&Halves::<true> {
            a: a.as_ptr() as *const u16,
            n,
        }),
        View::Q8(b) => tile.on(&Q8s { b: b.as_ptr(), ng }),
        View::Q4(b) => tile.on(&Q4s { b: b.as_ptr(), ng }),
    }
}

#[cfg(target_arch = "x86_64")]
impl OnChunks for Wide<'_> {
    #[inline(always)]
    unsafe fn on<F: Chunks>(&self, f: &F) {
        self.run(f)
    }
}

#[cfg(target_arch = "x86_64")]
impl Wide<'_> {
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
    unsafe fn run<F: Chunks>(&self, f: &F) {
        match self.0.nb {
            5 => self.blocks::<F, 5>(f),
            6 => self.blocks::<F, 6>(f),
            7 => self.blocks::<F, 7>(f),
            _ => self.blocks::<F, 8>(f),
        }
    }

    /// Blocks of [`WIDE_COLS`] columns by [`WIDE_ROWS`] kept rows; while a block runs, the
    /// next block's rows are prefetched group by group (as the AVX2 tile's next pass).
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
    #[inline]
    unsafe fn blocks<F: Chunks, const B: usize>(&self, f: &F) {
        let t = &self.0;
        use std::arch::x86_64::*;
        let cols = WIDE_COLS / GROUP;
        let kn = t.idx.len();
        for gb in (0..t.gn).step_by(cols) {
            let ge = (gb + cols).min(t.gn);
            for k0 in (0..kn).step_by(WIDE_ROWS) {
                let ks = &t.idx[k0..(k0 + WIDE_ROWS).min(kn)];
                // The next block: the next rows of these columns, or the first rows of the
                // next columns.
                let (next, ng0) = if k0 + WIDE_ROWS < kn {
                    (&t.idx[k0 + WIDE_ROWS..(k0 + 2 * WIDE_ROWS).min(kn)], gb)
                } else {
                    (&t.idx[..WIDE_ROWS.min(kn)], ge)
                };
                let vals = t.val.as_ptr().add(k0 * B);
                for g in gb..ge {
                    // Where this group's pass prefetches the next block, if that is inside the
                    // tile.
                    let pg = (ng0 + (g - gb) < t.gn).then_some(t.g0 + ng0 + (g - gb));
                    for h in 0..2 {
                        let mut acc = [[_mm256_setzero_ps(); 2]; B];
                        for (b, a) in acc.iter_mut().enumerate() {
                            let p = t.out.add(b * t.stride + g * GROUP + 16 * h);
                            a[0] = _mm256_loadu_ps(p);
                            a[1] = _mm256_loadu_ps(p.add(8));
                        }
                        for (kk, &j) in ks.iter().enumerate() {
                            if let (0, Some(pg), Some(&nj)) = (h, pg, next.get(kk)) {
                                f.prefetch(nj as usize, pg);
                            }
                            let st = f.group(j as usize, t.g0 + g);
                            let w0 = f.chunk(st, 2 * h);
                            let w1 = f.chunk(st, 2 * h + 1);
                            let xv = vals.add(kk * B);
                            for (b, a) in acc.iter_mut().enumerate() {
                                let x = _mm256_broadcast_ss(&*xv.add(b));
                                a[0] = _mm256_fmadd_ps(x, w0, a[0]);
                                a[1] = _mm256_fmadd_ps(x, w1, a[1]);
                            }
                        }
                        for (b, a) in acc.iter().enumerate() {
                            let p = t.out.add(b * t.stride + g * GROUP + 16 * h);
                            _mm256_storeu_ps(p, a[0]);
                            _mm256_storeu_ps(p.add(8), a[1]);
                        }
                    }
                }
            }
        }
    }
}

/// A weight format as the AVX2 tile reads it: per row and group a state (where its values
/// are, its scale), then its four chunks of eight values as f32.
#[cfg(target_arch = "x86_64")]
trait Chunks {
    type Group: Copy;
    /// Group `g` of input row `j`.
    unsafe fn group(&self, j: usize, g: usize) -> Self::Group;
    /// Values `8 c .. 8 c + 8` of a group.
    unsafe fn chunk(&self, s: Self::Group, c: usize) -> std::arch::x86_64::__m256;
    /// Where group `g` of row `j` lies, for prefetching (q4: about, its scales being stored
    /// per eight groups).
    fn at(&self, j: usize, g: usize) -> *const u8;
    /// Prefetches group `g` of row `j` into L2: its line, and the next where the bytes from
    /// one group of a row to the next take more than one (f32's 128).
    #[inline(always)]
    unsafe fn prefetch(&self, j: usize, g: usize) {
        use std::arch::x86_64::_mm_prefetch;
        let p = self.at(j, g);
        _mm_prefetch::<{ cpu::TILE_PREFETCH }>(p as *const i8);
        if self.at(0, 1) as usize - self.at(0, 0) as usize > 64 {
            _mm_prefetch::<{ cpu::TILE_PREFETCH }>(p.wrapping_add(64) as *const i8);
        }
    }
}

#[cfg(target_arch = "x86_64")]
struct F32s {
    a: *const f32,
    n: usize,
}

#[cfg(target_arch = "x86_64")]
impl Chunks for F32s {
    type Group = *const f32;
    #[inline(always)]
    unsafe fn group(&self, j: usize, g: usize) -> *const f32 {
        self.a.add(j * self.n + g * GROUP)
    }
    #[inline(always)]
    unsafe fn chunk(&self, p: *const f32, c: usize) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p.add(8 * c))
    }
    fn at(&self, j: usize, g: usize) -> *const u8 {
        self.a.wrapping_add(j * self.n + g * GROUP) as *const u8
    }
}

/// f16 (`BF` false) or bf16 (`BF` true) values.
#[cfg(target_arch = "x86_64")]
struct Halves<const BF: bool> {
    a: *const u16,
    n: usize,
}

#[cfg(target_arch = "x86_64")]
impl<const BF: bool> Chunks for Halves<BF> {
    type Group = *const u16;
    #[inline(always)]
    unsafe fn group(&self, j: usize, g: usize) -> *const u16 {
        self.a.add(j * self.n + g * GROUP)
    }
    #[inline(always)]
    unsafe fn chunk(&self, p: *const u16, c: usize) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        let v = _mm_loadu_si128(p.add(8 * c) as *const __m128i);
        if BF {
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(v)))
        } else {
            _mm256_cvtph_ps(v)
        }
    }
    fn at(&self, j: usize, g: usize) -> *const u8 {
        self.a.wrapping_add(j * self.n + g * GROUP) as *const u8
    }
}

/// An input-major q8 matrix, row `j` laid out as [`crate::packed::q8_offsets`] says.
#[cfg(target_arch = "x86_64")]
struct Q8s {
    b: *const u8,
    ng: usize,
}

#[cfg(target_arch = "x86_64")]
impl Chunks for Q8s {
    /// The group's values and its scale.
    type Group = (*const u8, std::arch::x86_64::__m256);
    #[inline(always)]
    unsafe fn group(&self, j: usize, g: usize) -> Self::Group {
        let row = self.b.add(j * self.ng * Q8_BLOCK);
        let (od, oq) = crate::packed::q8_offsets(self.ng, g);
        (row.add(oq), f16_at(row.add(od)))
    }
    #[inline(always)]
    unsafe fn chunk(&self, s: Self::Group, c: usize) -> std::arch::x86_64::__m256 {
        q8_chunk(s, c)
    }
    fn at(&self, j: usize, g: usize) -> *const u8 {
        self.b.wrapping_add((j * self.ng + g) * Q8_BLOCK)
    }
}

/// Chunk `c` of a q8 group `(values, scale)`: values `8 c .. 8 c + 8` times the scale.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn q8_chunk((q, d): <Q8s as Chunks>::Group, c: usize) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(q.add(8 * c) as *const __m128i));
    _mm256_mul_ps(d, _mm256_cvtepi32_ps(v))
}

#[cfg(target_arch = "x86_64")]
struct Q4s {
    b: *const u8,
    ng: usize,
}

#[cfg(target_arch = "x86_64")]
impl Chunks for Q4s {
    /// The group's nibbles, scale and minimum.
    type Group = (
        *const u8,
        std::arch::x86_64::__m256,
        std::arch::x86_64::__m256,
    );
    #[inline(always)]
    unsafe fn group(&self, j: usize, g: usize) -> Self::Group {
        let row = self.b.add(j * self.ng * Q4_BLOCK);
        let (od, om, oq) = crate::packed::q4_offsets(self.ng, g);
        (row.add(oq), f16_at(row.add(od)), f16_at(row.add(om)))
    }
    #[inline(always)]
    unsafe fn chunk(&self, s: Self::Group, c: usize) -> std::arch::x86_64::__m256 {
        q4_chunk(s, c)
    }
    fn at(&self, j: usize, g: usize) -> *const u8 {
        self.b.wrapping_add((j * self.ng + g) * Q4_BLOCK)
    }
}

/// Chunk `c` of a q4 group `(nibbles, scale, minimum)`, `d q + m`: bytes 0..8 hold values 0..8
/// (low nibbles) and 16..24 (high), bytes 8..16 values 8..16 and 24..32.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn q4_chunk((q, d, m): <Q4s as Chunks>::Group, c: usize) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(q.add(8 * (c & 1)) as *const __m128i));
    let v = if c < 2 {
        _mm256_and_si256(v, _mm256_set1_epi32(15))
    } else {
        _mm256_srli_epi32::<4>(v)
    };
    _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(v), m)
}

/// One tile of [`tile_rows`]'s SIMD path: groups `g0 .. g0 + gn` of the output rows at `out`.
#[cfg(target_arch = "x86_64")]
struct Tile<'a> {
    idx: &'a [u32],
    val: &'a [f32],
    nb: usize,
    g0: usize,
    gn: usize,
    out: *mut f32,
    stride: usize,
}

#[cfg(target_arch = "x86_64")]
impl OnChunks for Tile<'_> {
    #[inline(always)]
    unsafe fn on<F: Chunks>(&self, f: &F) {
        self.run(f)
    }
}

#[cfg(target_arch = "x86_64")]
impl Tile<'_> {
    /// The output rows in blocks of at most four, each block's kept rows in passes of [`PASS`].
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run<F: Chunks>(&self, f: &F) {
        let mut b0 = 0;
        while b0 < self.nb {
            match self.nb - b0 {
                1 => self.block::<F, 1>(f, b0),
                2 => self.block::<F, 2>(f, b0),
                3 => self.block::<F, 3>(f, b0),
                _ => self.block::<F, 4>(f, b0),
            }
            b0 += 4;
        }
    }

    /// Output rows `b0 .. b0 + B`: the kept rows [`PASS`] at a time (the last pass padded with
    /// zero values), each chunk of each row decoded once and multiplied into the `B` rows.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn block<F: Chunks, const B: usize>(&self, f: &F, b0: usize) {
        const R: usize = PASS;
        use std::arch::x86_64::*;
        let nb = self.nb;
        let g0 = self.g0;
        for (pi, pass) in self.idx.chunks(R).enumerate() {
            // The next pass's rows, prefetched group by group as this pass reads its own (as
            // `cpu::next_rows` does for one row), so that no pass waits for its lines: kept
            // rows are far apart, which the hardware prefetcher does not follow.
            let next = self.idx.get((pi + 1) * R..).unwrap_or(&[]);
            let next = &next[..next.len().min(R)];
            let mut js = [pass[0] as usize; R];
            // xs[b][r]: row b0 + b's value of the pass's r-th input.
            let mut xs = [[_mm256_setzero_ps(); R]; B];
            for (r, &j) in pass.iter().enumerate() {
                js[r] = j as usize;
                for (b, x) in xs.iter_mut().enumerate() {
                    x[r] = _mm256_set1_ps(self.val[(pi * R + r) * nb + b0 + b]);
                }
            }
            for g in 0..self.gn {
                for &j in next {
                    f.prefetch(j as usize, g0 + g);
                }
                let st: [F::Group; R] = std::array::from_fn(|r| f.group(js[r], g0 + g));
                for c in 0..4 {
                    let wv: [__m256; R] = std::array::from_fn(|r| f.chunk(st[r], c));
                    for (b, x) in xs.iter().enumerate() {
                        let p = self.out.add((b0 + b) * self.stride + g * GROUP + 8 * c);
                        let mut acc = _mm256_loadu_ps(p);
                        for (xv, w) in x.iter().zip(&wv) {
                            acc = _mm256_fmadd_ps(*xv, *w, acc);
                        }
                        _mm256_storeu_ps(p, acc);
                    }
                }
            }
        }
    }
}

/// [`cpu::gemv_dot`] on `nb` input rows: `x` holds `nb` rows of `n_in`, `y` `nb` rows of
/// `n_out`, row `b` of `y` = `W x_b`. Each weight row is read once for all input rows.
pub fn gemv_dot_rows(w: &RowsMat, x: &[f32], nb: usize, y: &mut [f32]) {
    gemv_dot_rows_on(w, x, nb, y, cpu::simd_available())
}

/// [`gemv_dot_rows`] with the SIMD choice explicit.
fn gemv_dot_rows_on(w: &RowsMat, x: &[f32], nb: usize, y: &mut [f32], simd: bool) {
    assert!(
        (1..=MAX_ROWS).contains(&nb),
        "gemv_dot_rows: {nb} rows, 1 to {MAX_ROWS}"
    );
    w.assert_sized("gemv_dot_rows");
    assert_eq!(x.len(), nb * w.n_in, "gemv_dot_rows: input size");
    assert_eq!(y.len(), nb * w.n_out, "gemv_dot_rows: output size");
    // Two rows of q8/q4 one after another: the dots here decode each block to f32 and scale
    // every chunk, where the one-row dot scales each block's sum once; on SmolLM2's head
    // (49152 x 576) two rows together took 1.06-1.19x the time of two apart, four 0.63-0.75x
    // (`gemv_speed --rows --small`). q8 always, where its one-row dot multiplies in integers
    // (`cpu::int8_dots`): four rows together took 0.91-0.98x the time of four apart; q4 too
    // where its one-row dot does (the same CPUs), so that a row's head never depends on what
    // runs beside it.
    let apart = match w.view {
        View::Q8(_) | View::Q4(_) if cpu::int8_dots() => true,
        View::Q8(_) | View::Q4(_) => nb <= 2,
        _ => nb == 1,
    };
    if apart {
        for (xb, yb) in x.chunks(w.n_in).zip(y.chunks_mut(w.n_out)) {
            cpu::gemv_dot_on(w, xb, yb, simd);
        }
        return;
    }
    let per = cpu::rows_per_chunk(w.n_out);
    let yp = SendPtr(y.as_mut_ptr());
    pool::for_each(w.n_out.div_ceil(per), |c| {
        let (o0, len) = (c * per, per.min(w.n_out - c * per));
        // SAFETY: item c writes outputs o0..o0+len of each row (stride n_out), which no other
        // item touches; the sizes were checked above.
        unsafe { dot_rows(w, x, nb, o0, len, yp.get(), simd) }
    });
}

/// Outputs `o0 .. o0 + len` of every row of `y` (at `y`, rows of `n_out`).
///
/// # Safety
/// As [`gemv_dot_rows_on`] checks: `w`'s view holds its `n_out` rows of `n_in`, `x` `nb` rows
/// of `n_in`, `y` `nb` rows of `n_out`, and `o0 + len <= n_out`.
unsafe fn dot_rows(
    w: &RowsMat,
    x: &[f32],
    nb: usize,
    o0: usize,
    len: usize,
    y: *mut f32,
    simd: bool,
) {
    let (n_in, n_out) = (w.n_in, w.n_out);
    let full = n_in / GROUP * GROUP;
    #[cfg(target_arch = "x86_64")]
    if simd {
        dot_rows_avx2(w, x, nb, o0, len, y);
    }
    let from = if simd && cfg!(target_arch = "x86_64") {
        full
    } else {
        0
    };
    if from == n_in {
        return;
    }
    // The inputs the SIMD path left (all of them without it), by the scalar definition.
    let mut row = vec![0.0f32; n_in];
    for o in o0..o0 + len {
        w.dequant_row(o, &mut row);
        for b in 0..nb {
            let xb = &x[b * n_in..(b + 1) * n_in];
            let s: f32 = row[from..]
                .iter()
                .zip(&xb[from..])
                .map(|(a, v)| a * v)
                .sum();
            let yo = y.add(b * n_out + o);
            *yo = if from == 0 { s } else { *yo + s };
        }
    }
}

/// The whole groups of [`dot_rows`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_rows_avx2(w: &RowsMat, x: &[f32], nb: usize, o0: usize, len: usize, y: *mut f32) {
    let (n, ng) = (w.n_in, groups(w.n_in));
    let d = Dots {
        x,
        nb,
        n_in: n,
        n_out: w.n_out,
        y,
    };
    match w.view {
        View::F32(a) => d.run(&F32s { a: a.as_ptr(), n }, o0, len),
        View::F16(a) => d.run(
            &Halves::<false> {
                a: a.as_ptr() as *const u16,
                n,
            },
            o0,
            len,
        ),
        View::Bf16(a) => d.run(
            &Halves::<true> {
                a: a.as_ptr() as *const u16,
                n,
            },
            o0,
            len,
        ),
        View::Q8(b) => d.run(&Q8_0s { b: b.as_ptr(), ng }, o0, len),
        View::Q4(b) => d.run(&Q4_1s { b: b.as_ptr(), ng }, o0, len),
    }
}

/// The dot products of [`dot_rows_avx2`] into `y` (rows of `n_out`).
#[cfg(target_arch = "x86_64")]
struct Dots<'a> {
    x: &'a [f32],
    nb: usize,
    n_in: usize,
    n_out: usize,
    y: *mut f32,
}

#[cfg(target_arch = "x86_64")]
impl Dots<'_> {
    /// Per weight row, each chunk decoded once and multiplied by every input row.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run<F: Chunks>(&self, f: &F, o0: usize, len: usize) {
        use std::arch::x86_64::*;
        let xp = self.x.as_ptr();
        for o in o0..o0 + len {
            let mut acc = [_mm256_setzero_ps(); MAX_ROWS];
            for g in 0..self.n_in / GROUP {
                let st = f.group(o, g);
                for c in 0..4 {
                    let wv = f.chunk(st, c);
                    for (b, a) in acc.iter_mut().enumerate().take(self.nb) {
                        let xc = _mm256_loadu_ps(xp.add(b * self.n_in + g * GROUP + 8 * c));
                        *a = _mm256_fmadd_ps(wv, xc, *a);
                    }
                }
            }
            for (b, a) in acc.iter().enumerate().take(self.nb) {
                *self.y.add(b * self.n_out + o) = cpu::hsum(*a);
            }
        }
    }
}

/// An output-major q8 matrix (GGML's Q8_0 blocks, [`crate::packed::PackedRows`]): row `o`,
/// group `g` of its inputs at block `o * ng + g`.
#[cfg(target_arch = "x86_64")]
struct Q8_0s {
    b: *const u8,
    ng: usize,
}

#[cfg(target_arch = "x86_64")]
impl Chunks for Q8_0s {
    type Group = <Q8s as Chunks>::Group;
    #[inline(always)]
    unsafe fn group(&self, o: usize, g: usize) -> Self::Group {
        let p = self.b.add((o * self.ng + g) * Q8_BLOCK);
        (p.add(2), f16_at(p))
    }
    #[inline(always)]
    unsafe fn chunk(&self, s: Self::Group, c: usize) -> std::arch::x86_64::__m256 {
        q8_chunk(s, c)
    }
    fn at(&self, o: usize, g: usize) -> *const u8 {
        self.b.wrapping_add((o * self.ng + g) * Q8_BLOCK)
    }
}

/// The output-major q4 (GGML Q4_1: scale, minimum, nibbles per block) of the LM head.
#[cfg(target_arch = "x86_64")]
struct Q4_1s {
    b: *const u8,
    ng: usize,
}

#[cfg(target_arch = "x86_64")]
impl Chunks for Q4_1s {
    type Group = <Q4s as Chunks>::Group;
    #[inline(always)]
    unsafe fn group(&self, o: usize, g: usize) -> Self::Group {
        let p = self.b.add((o * self.ng + g) * Q4_BLOCK);
        (p.add(4), f16_at(p), f16_at(p.add(2)))
    }
    #[inline(always)]
    unsafe fn chunk(&self, s: Self::Group, c: usize) -> std::arch::x86_64::__m256 {
        q4_chunk(s, c)
    }
    fn at(&self, o: usize, g: usize) -> *const u8 {
        self.b.wrapping_add((o * self.ng + g) * Q4_BLOCK)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packed::{Dtype, PackedRows, PackedT};

    const DTYPES: [Dtype; 5] = [Dtype::F32, Dtype::F16, Dtype::Bf16, Dtype::Q8, Dtype::Q4];

    /// Rows together whatever they keep.
    const ALWAYS: Choice = always;

    fn values(n: usize, seed: f32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32 + seed) * 0.7317).sin() * (1.0 + (i % 7) as f32 * 0.3))
            .collect()
    }

    /// `sum |x_j w_jo|` per output: the scale of the float error of any summation order.
    fn scale_of(w: &Mat, x: &[f32]) -> Vec<f32> {
        let mut row = vec![0.0f32; w.n_out];
        let mut s = vec![0.0f32; w.n_out];
        for (j, &xj) in x.iter().enumerate() {
            w.dequant_row(j, 0, &mut row);
            for (a, r) in s.iter_mut().zip(&row) {
                *a += (xj * r).abs();
            }
        }
        s
    }

    /// Error allowed against the scalar definition: float summation in another order, as a
    /// fraction of `sum |x_j w_jo|` (f32 epsilon is 1.2e-7; sums of a few hundred terms).
    const TOL: f32 = 2e-6;

    /// Every format, the SIMD and portable paths, 1 to 8 rows (the AVX2 tile's blocks of one
    /// to four rows; from five rows the AVX-512 wide tile where the CPU has it), dense, one
    /// threshold, per-channel thresholds, a threshold that keeps nothing, and sizes that are
    /// not multiples of a group, the rows run together and as each GEMV chooses: each output row equals the
    /// reference GEMV of its own masked input (q4 as it chooses: the one-row kernel on that
    /// row, exactly).
    #[test]
    fn rows_match_each_row_alone() {
        for (n_in, n_out) in [(67, 32 * 5 + 7), (300, 64), (40, 32 * 300)] {
            let wt = values(n_in * n_out, 0.5);
            for dtype in DTYPES {
                let p = PackedT::from_input_major(dtype, &wt, n_in, n_out).unwrap();
                let m = p.mat();
                let chan: Vec<f32> = (0..n_in).map(|j| 0.3 + 0.1 * (j % 5) as f32).collect();
                for nb in 1..=MAX_ROWS {
                    let x = values(nb * n_in, nb as f32);
                    for mask in [
                        Mask::Dense,
                        Mask::Threshold(0.6),
                        Mask::Channels(&chan),
                        Mask::Threshold(f32::INFINITY),
                    ] {
                        for (simd, choose, ours) in [
                            (false, ALWAYS, true),
                            (cpu::simd_available(), ALWAYS, true),
                            (cpu::simd_available(), worth_together as Choice, false),
                        ] {
                            let mut y = vec![f32::NAN; nb * n_out];
                            let mut g = [Gemv {
                                w: p.mat(),
                                mask,
                                y: &mut y,
                            }];
                            gemv_many_rows_on(&x, nb, &mut g, simd, choose);
                            for b in 0..nb {
                                let xb = &x[b * n_in..(b + 1) * n_in];
                                if !ours && matches!(dtype, Dtype::Q4 | Dtype::Q8) {
                                    // By its own choice q4 runs the one-row kernel on each
                                    // row; q8 mostly does (exactly its result), or runs the
                                    // rows together (checked below like the others).
                                    let mut want = vec![0.0f32; n_out];
                                    let mut g = [Gemv {
                                        w: p.mat(),
                                        mask,
                                        y: &mut want,
                                    }];
                                    cpu::gemv_many_on(xb, &mut g, simd);
                                    let alone = y[b * n_out..(b + 1) * n_out] == want[..];
                                    assert!(alone || dtype == Dtype::Q8, "q4 row {b} apart");
                                    if alone {
                                        continue;
                                    }
                                }
                                let masked: Vec<f32> = xb
                                    .iter()
                                    .enumerate()
                                    .map(|(j, &v)| match mask {
                                        Mask::Dense => v,
                                        Mask::Threshold(t) => {
                                            if v.abs() > t {
                                                v
                                            } else {
                                                0.0
                                            }
                                        }
                                        Mask::Channels(t) => {
                                            if v.abs() > t[j] {
                                                v
                                            } else {
                                                0.0
                                            }
                                        }
                                    })
                                    .collect();
                                let mut want = vec![0.0f32; n_out];
                                crate::reference::gemv_packed(&m, &masked, &mut want);
                                let scale = scale_of(&m, &masked);
                                for o in 0..n_out {
                                    let got = y[b * n_out + o];
                                    assert!(
                                        (got - want[o]).abs() <= TOL * (1.0 + scale[o]),
                                        "{dtype:?} {n_in}x{n_out} rows {nb} {mask:?} simd {simd}: row {b} col {o}: {got} vs {}",
                                        want[o]
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// The AVX2 tile on five to eight rows, which `gemv_many_rows` gives the wide tile where the
    /// CPU has AVX-512 (so it runs there only on other machines): against the portable tile,
    /// as the wide tile, every format, a subset of the inputs kept, an odd number of columns.
    #[test]
    fn avx2_tile_on_five_to_eight_rows() {
        if !cpu::simd_available() {
            return;
        }
        let (n_in, n_out) = (67, 32 * 5 + 7);
        let wt = values(n_in * n_out, 0.25);
        let idx: Vec<u32> = (0..n_in as u32).filter(|j| j % 3 != 1).collect();
        for dtype in DTYPES {
            let p = PackedT::from_input_major(dtype, &wt, n_in, n_out).unwrap();
            let m = p.mat();
            for nb in WIDE_FROM..=MAX_ROWS {
                let val = values(nb * idx.len(), nb as f32);
                let run = |simd, wide| {
                    let mut y = vec![f32::NAN; nb * n_out];
                    // SAFETY: y holds nb rows of n_out; idx below n_in; val nb per index.
                    unsafe {
                        tile_rows(
                            &m,
                            &idx,
                            &val,
                            nb,
                            0,
                            n_out,
                            y.as_mut_ptr(),
                            n_out,
                            simd,
                            wide,
                        )
                    };
                    y
                };
                let want = run(false, false);
                let mut paths = vec![(run(true, false), "avx2")];
                if wide_available() {
                    paths.push((run(true, true), "wide"));
                }
                for (got, path) in paths {
                    for b in 0..nb {
                        let mut scale = vec![0.0f32; n_out];
                        let mut row = vec![0.0f32; n_out];
                        for (k, &j) in idx.iter().enumerate() {
                            m.dequant_row(j as usize, 0, &mut row);
                            for (a, r) in scale.iter_mut().zip(&row) {
                                *a += (val[k * nb + b] * r).abs();
                            }
                        }
                        for o in 0..n_out {
                            let (g, w) = (got[b * n_out + o], want[b * n_out + o]);
                            assert!(
                                (g - w).abs() <= TOL * (1.0 + scale[o]),
                                "{dtype:?} {path} rows {nb}: row {b} col {o}: {g} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Several GEMVs in one call, rows split (short rows, many inputs) and columns split, each
    /// equal to the same GEMV run alone on the rows.
    #[test]
    fn many_rows_equal_each_gemv_alone() {
        let (n_in, outs) = (640, [96, 32 * 40, 64]);
        let nb = 4;
        let x = values(nb * n_in, 3.0);
        let ps: Vec<PackedT> = outs
            .iter()
            .map(|&o| {
                PackedT::from_input_major(Dtype::Q8, &values(n_in * o, o as f32), n_in, o).unwrap()
            })
            .collect();
        let mut alone: Vec<Vec<f32>> = Vec::new();
        for (p, &o) in ps.iter().zip(&outs) {
            let mut y = vec![0.0; nb * o];
            gemv_many_rows(
                &x,
                nb,
                &mut [Gemv {
                    w: p.mat(),
                    mask: Mask::Threshold(0.5),
                    y: &mut y,
                }],
            );
            alone.push(y);
        }
        let mut ys: Vec<Vec<f32>> = outs.iter().map(|&o| vec![f32::NAN; nb * o]).collect();
        let [a, b, c] = &mut ys[..] else {
            unreachable!()
        };
        gemv_many_rows(
            &x,
            nb,
            &mut [
                Gemv {
                    w: ps[0].mat(),
                    mask: Mask::Threshold(0.5),
                    y: a,
                },
                Gemv {
                    w: ps[1].mat(),
                    mask: Mask::Threshold(0.5),
                    y: b,
                },
                Gemv {
                    w: ps[2].mat(),
                    mask: Mask::Threshold(0.5),
                    y: c,
                },
            ],
        );
        assert_eq!(ys, alone);
    }

    /// The batched dot products (the LM head) of every format, SIMD and portable, 2, 4, 5 and 7
    /// rows, input sizes with and without a partial group, against the reference of each row
    /// (q8 with 8-bit activations, where a row may run alone, within their rounding bound).
    #[test]
    fn dot_rows_match_each_row_alone() {
        for (n_in, n_out) in [(96, 37), (75, 50)] {
            let w = values(n_in * n_out, 1.5);
            for dtype in DTYPES {
                let mut p = PackedRows::with_capacity(dtype, n_in, n_out);
                p.push_rows(w.clone()).unwrap();
                let m = p.mat();
                for nb in [2, 4, 5, 7] {
                    let x = values(nb * n_in, 7.0 + nb as f32);
                    for simd in [false, cpu::simd_available()] {
                        let mut y = vec![f32::NAN; nb * n_out];
                        gemv_dot_rows_on(&m, &x, nb, &mut y, simd);
                        for b in 0..nb {
                            let xb = &x[b * n_in..(b + 1) * n_in];
                            let mut want = vec![0.0f32; n_out];
                            crate::reference::gemv_dot(&m, xb, &mut want);
                            // A q8/q4 row run alone by the int8 dot: within its rounding
                            // bound.
                            let mut int8 = vec![0.0f32; n_out];
                            if matches!(dtype, Dtype::Q8 | Dtype::Q4) && simd && cpu::int8_dots() {
                                crate::reference::dot_int8_bound(&m, xb, &mut int8);
                            }
                            let mut row = vec![0.0f32; n_in];
                            for o in 0..n_out {
                                m.dequant_row(o, &mut row);
                                let scale: f32 =
                                    row.iter().zip(xb).map(|(a, v)| (a * v).abs()).sum();
                                let got = y[b * n_out + o];
                                assert!(
                                    (got - want[o]).abs() <= TOL * (1.0 + scale) + 1.001 * int8[o],
                                    "{dtype:?} {n_in}x{n_out} rows {nb} simd {simd}: row {b} out {o}: {got} vs {}",
                                    want[o]
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// One row is the one-row kernels themselves, bit for bit.
    #[test]
    fn one_row_is_the_one_row_kernel() {
        let (n_in, n_out) = (128, 96);
        let wt = values(n_in * n_out, 2.0);
        let x = values(n_in, 9.0);
        for dtype in DTYPES {
            let p = PackedT::from_input_major(dtype, &wt, n_in, n_out).unwrap();
            let (mut a, mut b) = (vec![0.0; n_out], vec![0.0; n_out]);
            cpu::gemv_sparse(&p.mat(), &x, 0.4, &mut a);
            gemv_many_rows(
                &x,
                1,
                &mut [Gemv {
                    w: p.mat(),
                    mask: Mask::Threshold(0.4),
                    y: &mut b,
                }],
            );
            assert_eq!(a, b, "{dtype:?}");
            let mut r = PackedRows::with_capacity(dtype, n_in, n_out);
            r.push_rows(wt.clone()).unwrap();
            cpu::gemv_dot(&r.mat(), &x, &mut a);
            gemv_dot_rows(&r.mat(), &x, 1, &mut b);
            assert_eq!(a, b, "{dtype:?} dot");
        }
    }
}
