//! Fast CPU paths: AVX2/FMA with run-time detection and a portable fallback, threaded over output
//! columns (or input rows): the decode kernels on [`crate::pool`]'s spinning workers, prefill on
//! rayon's pool. Each function computes exactly what its namesake in [`crate::reference`]
//! computes (up to float summation order) and is tested against it; the AVX2 q4 GEMV rounds
//! its activations to 8 bits, as [`crate::reference::gemv_q4_int8`] defines (with `vpdpbusd`
//! where the CPU has AVX-512 VNNI, `vpmaddubsw` otherwise), and so does the q8 GEMV where the
//! CPU has AVX-512 VNNI ([`int8_dots`], [`crate::reference::gemv_q8_int8`]).

use crate::packed::{
    groups, q4_offsets, q8_offsets, Mat, RowsMat, View, GROUP, Q4_BLOCK, Q4_SUPER, Q8_BLOCK,
};
use crate::pool;
use crate::reference::{Q4_MID, Q4_PASS, Q8_PASS};
use rayon::prelude::*;

/// Output columns per tile (f32; formats with fewer bytes per weight take wider tiles): a
/// multiple of the group, small enough that the tile of `y` (at most 256 KiB, for q4) stays in
/// L2 while the kept input rows stream past it, and wide enough that a thread's share of a
/// Llama-sized row is one run of 32-40 KiB. Runs of 4 KiB (a quarter of this) left wide
/// matrices at 17-22 GB/s on the 2-core machine, 28 GB/s with this width (docs/PERFORMANCE.md).
const TILE: usize = 8192;
/// Where the input-major tiles prefetch to: L2 (`T1`), not L1 (`T0`). On a 2-core AMD EPYC
/// (Zen 4) machine, T1 raised the dense GEMVs on 14336 x 4096 from 0.67-0.74 (q8) and
/// 0.42-0.46 (q4) of the read bandwidth to 0.86-0.87 and 0.50, and SmolLM2's decoding by
/// 12-31 % in f32, f16, bf16 and q8 (q4: 13 % at 50 % sparsity, dense unchanged;
/// docs/PERFORMANCE.md, twenty-eighth session). Likely because a T0 prefetch holds one of the
/// core's few L1 miss buffers until its line arrives from DRAM.
#[cfg(target_arch = "x86_64")]
pub(crate) const TILE_PREFETCH: i32 = std::arch::x86_64::_MM_HINT_T1;
/// Columns the portable tile dequantizes at a time.
const PORTABLE_PIECE: usize = 1024;

/// Tile width for a format: about 32 KiB of weights per row.
pub(crate) fn tile_width(view: &View) -> usize {
    match view {
        View::F32(_) => TILE,
        View::F16(_) | View::Bf16(_) => 2 * TILE,
        View::Q8(_) => 4 * TILE,
        View::Q4(_) => 8 * TILE,
    }
}

/// A raw pointer that may cross threads: every user writes a disjoint range.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so closures capture the whole `Send` wrapper, not its field).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Number of work items: at least one per thread (where there are groups enough), at most four
/// per thread, so each thread gets a contiguous share of columns and the claiming of items can
/// even out a noisy machine.
fn column_chunks(n_out: usize, tile: usize) -> usize {
    let threads = pool::threads();
    let tiles = n_out.div_ceil(tile);
    tiles
        .min(threads * 4)
        .max(threads)
        .min(n_out.div_ceil(GROUP))
        .max(1)
}

/// Whether the AVX2/FMA/F16C paths run on this CPU (detected once per call site, cached by std).
pub fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the CPU adds four 8-bit products to an int32 per instruction (`vpdpbusd`, AVX-512
/// VNNI with 256-bit vectors). Then the q8 GEMVs multiply in 8-bit integers: the input-major
/// tile with its activations rounded to 8 bits per pass of rows and group of outputs
/// ([`crate::reference::gemv_q8_int8`]), the output-major LM head's dots, q8's and q4's, with
/// them rounded per block of 32 inputs ([`crate::reference::gemv_dot_int8`]); otherwise those
/// decode the weights to f32 and their products are exact. The q4 tile rounds its activations
/// either way ([`crate::reference::gemv_q4_int8`]) and here multiplies with `vpdpbusd`.
pub fn int8_dots() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        simd_available()
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The inputs a GEMV multiplies: `(input index, value)` pairs.
trait Rows: Sync {
    fn len(&self) -> usize;
    fn get(&self, k: usize) -> (usize, f32);
}

/// Every input (dense GEMV).
struct AllRows<'a>(&'a [f32]);
impl Rows for AllRows<'_> {
    #[inline(always)]
    fn len(&self) -> usize {
        self.0.len()
    }
    #[inline(always)]
    fn get(&self, k: usize) -> (usize, f32) {
        (k, self.0[k])
    }
}

/// A compacted list of kept inputs (sparse GEMV).
struct Kept<'a> {
    idx: &'a [u32],
    val: &'a [f32],
}
impl Rows for Kept<'_> {
    #[inline(always)]
    fn len(&self) -> usize {
        self.idx.len()
    }
    #[inline(always)]
    fn get(&self, k: usize) -> (usize, f32) {
        (self.idx[k] as usize, self.val[k])
    }
}

/// A list of inputs taken in an interleaved order, its four quarters side by side, so that
/// the four rows of each pass of a tile come one from each quarter. A row-split work item's
/// rows lie one after another in memory; in this order each of a pass's four streams runs on
/// through its own quarter (where the hardware prefetcher follows it) instead of four short
/// rows starting over at every pass.
struct Quarters<R>(R);
impl<R: Rows> Rows for Quarters<R> {
    #[inline(always)]
    fn len(&self) -> usize {
        self.0.len()
    }
    #[inline(always)]
    fn get(&self, k: usize) -> (usize, f32) {
        let q = self.0.len() / 4;
        if k < 4 * q {
            self.0.get(k % 4 * q + k / 4)
        } else {
            self.0.get(k)
        }
    }
}

/// Dense GEMV on input-major f32 weights: `y = Wt^T x`.
pub fn gemv_t(wt: &[f32], n_in: usize, n_out: usize, x: &[f32], y: &mut [f32]) {
    gemv(&Mat::f32(wt, n_in, n_out), x, y)
}

/// TEAL sparse GEMV on f32 weights with the `|x| > t` test fused: rows of zeroed inputs are
/// never read.
pub fn gemv_t_sparse(wt: &[f32], n_in: usize, n_out: usize, x: &[f32], t: f32, y: &mut [f32]) {
    gemv_sparse(&Mat::f32(wt, n_in, n_out), x, t, y);
}

/// Dense GEMV on packed input-major weights: `y = W x`.
pub fn gemv(w: &Mat, x: &[f32], y: &mut [f32]) {
    gemv_one(x, *w, Mask::Dense, y);
}

/// GEMV over a compacted index list: `y = sum_k val[k] * w[idx[k], :]`. Any compaction (one
/// threshold, per-channel thresholds, top-k) feeds this same kernel.
pub fn gemv_idx(w: &Mat, idx: &[u32], val: &[f32], y: &mut [f32]) {
    assert_eq!(idx.len(), val.len(), "gemv_idx: index and value lists");
    assert!(
        idx.iter().all(|&j| (j as usize) < w.n_in),
        "gemv_idx: index out of range"
    );
    gemv_rows(w, &Kept { idx, val }, y)
}

/// TEAL sparse GEMV: compaction of `|x| > t` (fused test), then the GEMV over the kept rows only.
/// Returns the number of kept inputs.
pub fn gemv_sparse(w: &Mat, x: &[f32], t: f32, y: &mut [f32]) -> usize {
    gemv_one(x, *w, Mask::Threshold(t), y)
}

/// Sparse GEMV with one threshold per input channel (`|x_j| > t_j`), through the same path.
/// Returns the number of kept inputs.
pub fn gemv_sparse_channels(w: &Mat, x: &[f32], t: &[f32], y: &mut [f32]) -> usize {
    gemv_one(x, *w, Mask::Channels(t), y)
}

fn gemv_one(x: &[f32], w: Mat, mask: Mask, y: &mut [f32]) -> usize {
    gemv_many(x, &mut [Gemv { w, mask, y }])[0]
}

/// Which inputs a GEMV multiplies.
#[derive(Clone, Copy, Debug)]
pub enum Mask<'a> {
    /// Every input (dense).
    Dense,
    /// TEAL: the inputs with `|x| > t`.
    Threshold(f32),
    /// The inputs with `|x_j| > t_j`, one threshold per input channel.
    Channels(&'a [f32]),
}

/// One GEMV of [`gemv_many`]: `y = W s(x)`, `s` zeroing the inputs its mask drops.
pub struct Gemv<'a, 'y> {
    pub w: Mat<'a>,
    pub mask: Mask<'a>,
    pub y: &'y mut [f32],
}

/// The most GEMVs one [`gemv_many`] call takes.
pub const MAX_MANY: usize = 4;

/// Scratch of one [`gemv_many`] call.
#[derive(Default)]
pub(crate) struct Scratch {
    /// The kept inputs (indices, values) of each GEMV (`batch`: the values of every row).
    pub(crate) lists: [(Vec<u32>, Vec<f32>); MAX_MANY],
    /// The [`gemv_many`] section whose kept inputs `lists` holds (0: none), and how many each
    /// GEMV kept. Every section has a new number, so lists written by anything else (`batch`
    /// writes the rows' union into the caller's) never pass for a section's.
    listed: u64,
    kept: [usize; MAX_MANY],
    /// The partial outputs of the row-split GEMVs.
    pub(crate) partials: Vec<f32>,
    /// The q8/q4 LM head's activations in 8 bits and what each block adds besides its
    /// products ([`gemv_dot`] where [`int8_dots`]).
    int8: crate::reference::Int8Blocks,
    sums: Vec<BlockSums>,
}

/// What a block of the 8-bit activations adds to an int8 dot besides the products: q8's
/// int32 lanes start at `-128` times the sum of their four `k` (its weights are read as
/// `q + 128`), and q4's minimum multiplies `d_b sum k` (`ksum`); each format leaves the
/// other's part zero.
#[derive(Clone, Copy)]
pub(crate) struct BlockSums {
    start: [i32; 8],
    ksum: f32,
}

thread_local! {
    /// The calling thread's scratch, so a decode step allocates nothing.
    pub(crate) static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// Row segments (bytes of one input row's weights) below which a GEMV is split over input rows
/// rather than output columns: each work item then reads whole rows, four contiguous runs (see
/// [`Quarters`]) where its rows are consecutive, instead of every thread reading a short piece
/// of each row (measured
/// faster for SmolLM2's 0.4-3 KiB rows and Llama-3-8B's 8 KiB ones; docs/PERFORMANCE.md).
const ROW_SPLIT_BELOW: usize = 16384;

/// Bytes of weights below which a row-split GEMV is cut into one item per thread, not two:
/// about 130 us of reading at this machine's 30 GB/s, where a few microseconds per item
/// count and a late thread costs little (all of SmolLM2's matrices, Qwen2.5-0.5B's in q8/q4).
const ONE_ITEM_BELOW: usize = 4 << 20;

/// How a GEMV's work is cut into items.
#[derive(Clone, Copy)]
pub(crate) enum Split {
    /// Items of this many output columns.
    Columns(usize),
    /// Items of this many input rows, each into its own partial output, summed at the end.
    Rows(usize),
}

pub(crate) fn split_of(w: &Mat) -> Split {
    let threads = pool::threads();
    let row_bytes = w.view.bytes_per_row(w.n_out);
    if threads > 1 && row_bytes < ROW_SPLIT_BELOW && w.n_in >= 64 * threads {
        // A short GEMV in one item per thread: each reads one run of rows in four streams, and
        // there is one partial output per thread to zero and add. Two per thread decoded
        // SmolLM2 2-5 % slower dense and 8-11 % slower at 50 % in q4 and q8. A long one in two
        // per thread, so that the claiming of items can even out a noisy machine: in one item
        // per thread, 28672 x 8192 q4 at 0.75 took 1.17-1.40 ms against 1.06-1.15
        // (docs/PERFORMANCE.md, thirty-seventh session).
        let per_thread = if w.n_in * row_bytes < ONE_ITEM_BELOW {
            1
        } else {
            2
        };
        Split::Rows(w.n_in.div_ceil(per_thread * threads))
    } else {
        Split::Columns(column_split(w))
    }
}

/// How one parallel section cuts its GEMVs into work items (column chunks, or ranges of input
/// rows where rows are short): per GEMV its split, the item numbers it owns, and where its
/// items' partial outputs start. Each GEMV's `y` holds `rows` rows of its outputs (one for
/// [`gemv_many`], one per decode step for `batch::gemv_many_rows`).
pub(crate) struct Plan {
    n: usize,
    rows: usize,
    pub(crate) split: [Split; MAX_MANY],
    start: [usize; MAX_MANY + 1],
    part: [usize; MAX_MANY + 1],
    ys: [SendPtr; MAX_MANY],
}

impl Plan {
    /// The items of the GEMVs `i` with `run[i]` (the others get none).
    pub(crate) fn new(gemvs: &mut [Gemv], rows: usize, run: &[bool]) -> Plan {
        let mut p = Plan {
            n: gemvs.len(),
            rows,
            split: [Split::Columns(0); MAX_MANY],
            start: [0; MAX_MANY + 1],
            part: [0; MAX_MANY + 1],
            ys: [SendPtr(std::ptr::null_mut()); MAX_MANY],
        };
        for (i, g) in gemvs.iter_mut().enumerate() {
            p.split[i] = split_of(&g.w);
            let items = match (run[i], p.split[i]) {
                (false, _) => 0,
                (true, Split::Columns(per)) => g.w.n_out.div_ceil(per),
                (true, Split::Rows(per)) => g.w.n_in.div_ceil(per),
            };
            p.start[i + 1] = p.start[i] + items;
            p.part[i + 1] = p.part[i]
                + match p.split[i] {
                    Split::Columns(_) => 0,
                    Split::Rows(_) => items * rows * g.w.n_out,
                };
            p.ys[i] = SendPtr(g.y.as_mut_ptr());
        }
        p
    }

    /// Work items in all.
    pub(crate) fn items(&self) -> usize {
        self.start[self.n]
    }

    /// Partial output values in all.
    pub(crate) fn partials(&self) -> usize {
        self.part[self.n]
    }

    /// Item `c` of the section as `(GEMV, its item number, the GEMV's items)`.
    pub(crate) fn item(&self, c: usize) -> (usize, usize, usize) {
        let i = (0..self.n).rev().find(|&i| self.start[i] <= c).unwrap_or(0);
        (i, c - self.start[i], self.start[i + 1] - self.start[i])
    }

    /// GEMV `i`'s output.
    pub(crate) fn y(&self, i: usize) -> *mut f32 {
        self.ys[i].get()
    }

    /// Where item `c` of GEMV `i` (of `n_out` outputs) writes its partial rows.
    pub(crate) fn partial_at(&self, i: usize, c: usize, n_out: usize) -> usize {
        self.part[i] + c * self.rows * n_out
    }

    /// The row-split GEMVs' outputs: the sum of their items' partial outputs.
    pub(crate) fn sum_partials(&self, gemvs: &[Gemv], partials: &[f32]) {
        for (i, g) in gemvs.iter().enumerate() {
            if self.start[i + 1] == self.start[i] || !matches!(self.split[i], Split::Rows(_)) {
                continue;
            }
            let m = self.rows * g.w.n_out;
            let parts = &partials[self.part[i]..self.part[i + 1]];
            // SAFETY: the parallel section is over; y of GEMV i (m values) is borrowed by
            // `gemvs`.
            let y = unsafe { std::slice::from_raw_parts_mut(self.y(i), m) };
            y.copy_from_slice(&parts[..m]);
            for p in parts[m..].chunks(m) {
                for (a, b) in y.iter_mut().zip(p) {
                    *a += b;
                }
            }
        }
    }
}

/// Several GEMVs on the same input `x` (q, k and v; gate and up) in one parallel section: each
/// input list is compacted by its GEMV's own mask, then the work items of all of them (column
/// chunks, or ranges of input rows where rows are short) share one fork-join of the thread
/// pool, which on a small model costs about as much as a small matrix. Returns the number of
/// kept inputs of each GEMV (the first `gemvs.len()` entries).
pub fn gemv_many(x: &[f32], gemvs: &mut [Gemv]) -> [usize; MAX_MANY] {
    gemv_many_on(x, gemvs, simd_available())
}

/// [`gemv_many`] with the SIMD choice explicit (tests run the portable path on AVX2 machines).
pub(crate) fn gemv_many_on(x: &[f32], gemvs: &mut [Gemv], simd: bool) -> [usize; MAX_MANY] {
    let n = gemvs.len();
    assert!(n <= MAX_MANY, "gemv_many: {n} GEMVs, at most {MAX_MANY}");
    for g in gemvs.iter() {
        g.w.assert_sized("gemv");
        assert_eq!(x.len(), g.w.n_in, "gemv: input size");
        assert_eq!(g.y.len(), g.w.n_out, "gemv: output size");
        if let Mask::Channels(t) = g.mask {
            assert_eq!(t.len(), x.len(), "gemv: per-channel thresholds");
        }
    }
    let plan = Plan::new(gemvs, 1, &[true; MAX_MANY]);
    // Every thread compacts the input into its own lists at its first item, so that no thread
    // reads lines another has just written: lists written by the caller and read by the
    // workers cost SmolLM2's decode 1.2 us per compaction of a few hundred inputs, in
    // cache-line transfers between the cores, where compacting on each core takes 0.1-0.4 us.
    // The caller compacts inside the section too, at the same time as the workers: before it,
    // the workers waited for it (SmolLM2's 50 % decode 1-2 % slower). Every thread's lists and
    // counts are the same, so the items split the kept rows alike.
    let section = SECTION.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
    let pp = SCRATCH.with_borrow_mut(|s| {
        grow(&mut s.partials, plan.partials());
        SendPtr(s.partials.as_mut_ptr())
    });
    let gemvs = &*gemvs;
    // One work item per item of any GEMV, claimed in order by whichever thread is free, so
    // items of unequal size even out.
    pool::for_each(plan.items(), |c| {
        let (i, c, items) = plan.item(c);
        let g = &gemvs[i];
        SCRATCH.with_borrow_mut(|s| {
            s.list(section, x, gemvs);
            let kept = s.kept;
            let (idx, val) = &s.lists[i];
            let (idx, val) = (&idx[..kept[i]], &val[..kept[i]]);
            match plan.split[i] {
                Split::Columns(per) => {
                    let (o0, len) = (c * per, per.min(g.w.n_out - c * per));
                    // SAFETY: item c of GEMV i is columns o0..o0+len of its output, which no
                    // other item touches; the output outlives this call.
                    let yc = unsafe { std::slice::from_raw_parts_mut(plan.y(i).add(o0), len) };
                    match g.mask {
                        Mask::Dense => chunk(&g.w, &AllRows(x), o0, yc, simd),
                        _ => chunk(&g.w, &Kept { idx, val }, o0, yc, simd),
                    }
                }
                Split::Rows(per) => {
                    // SAFETY: item c of GEMV i owns its partial output, n_out values at
                    // plan.partial_at(i, c, n_out), inside the caller's `partials` (sized
                    // above, and not resized before the section ends).
                    let yc = unsafe {
                        std::slice::from_raw_parts_mut(
                            pp.get().add(plan.partial_at(i, c, g.w.n_out)),
                            g.w.n_out,
                        )
                    };
                    match g.mask {
                        Mask::Dense => {
                            let (j0, j1) = (c * per, ((c + 1) * per).min(g.w.n_in));
                            let rows = Quarters(AllRows(&x[j0..j1]));
                            chunk(&g.w.rows(j0, j1), &rows, 0, yc, simd)
                        }
                        _ => {
                            // An equal share of the kept rows, wherever they lie: the items
                            // read the same bytes however unevenly the zeros fall.
                            let (k0, k1) = (c * kept[i] / items, (c + 1) * kept[i] / items);
                            let rows = Quarters(Kept {
                                idx: &idx[k0..k1],
                                val: &val[k0..k1],
                            });
                            chunk(&g.w, &rows, 0, yc, simd)
                        }
                    }
                }
            }
        })
    });
    // The caller may have run no item (the workers took them all): its counts, for the result.
    SCRATCH.with_borrow_mut(|s| {
        s.list(section, x, gemvs);
        plan.sum_partials(gemvs, &s.partials);
        s.kept
    })
}

/// Numbers the parallel sections of [`gemv_many_on`] (from 1), so that a thread can tell
/// whether its lists of kept inputs are the current section's.
static SECTION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Scratch {
    /// Makes `lists` and `kept` those of `section`: each GEMV's inputs compacted by its mask
    /// (`kept` is every input where it is dense).
    fn list(&mut self, section: u64, x: &[f32], gemvs: &[Gemv]) {
        if self.listed == section {
            return;
        }
        for ((g, (idx, val)), k) in gemvs
            .iter()
            .zip(self.lists.iter_mut())
            .zip(self.kept.iter_mut())
        {
            grow(idx, x.len());
            grow(val, x.len());
            *k = match g.mask {
                Mask::Dense => x.len(),
                Mask::Threshold(t) => compact_abs_gt(x, t, idx, val),
                Mask::Channels(t) => compact_abs_gt_channel(x, t, idx, val),
            };
        }
        self.listed = section;
    }
}

/// Makes a scratch buffer at least `n` long, never shorter: its contents are overwritten by
/// its users, so a call after a larger one does not shrink it and the next larger one does
/// not zero the regrown part again (the partial outputs of gate/up after down's: 34 KB per
/// layer of SmolLM2).
pub(crate) fn grow<T: Clone + Default>(v: &mut Vec<T>, n: usize) {
    if v.len() < n {
        v.resize(n, T::default());
    }
}

/// Writes the indices and values of the inputs with `|x| > t` to the front of `idx`/`val`
/// (branch-free) and returns how many there are.
pub fn compact_abs_gt(x: &[f32], t: f32, idx: &mut [u32], val: &mut [f32]) -> usize {
    assert!(idx.len() >= x.len() && val.len() >= x.len());
    #[cfg(target_arch = "x86_64")]
    if simd_available() {
        // SAFETY: AVX2 detected; the outputs hold at least x.len() values (asserted).
        return unsafe { compact_avx2(x, t, None, idx, val) };
    }
    compact_portable(x, |_| t, idx, val)
}

/// Per-channel compaction: the inputs with `|x_j| > t_j`, as [`compact_abs_gt`].
pub fn compact_abs_gt_channel(x: &[f32], t: &[f32], idx: &mut [u32], val: &mut [f32]) -> usize {
    assert_eq!(x.len(), t.len());
    assert!(idx.len() >= x.len() && val.len() >= x.len());
    #[cfg(target_arch = "x86_64")]
    if simd_available() {
        // SAFETY: AVX2 detected; `t` has x.len() values and the outputs at least as many.
        return unsafe { compact_avx2(x, 0.0, Some(t), idx, val) };
    }
    compact_portable(x, |j| t[j], idx, val)
}

/// The scalar compaction: every input is written at the current end, which advances only past
/// the kept ones.
fn compact_portable(
    x: &[f32],
    t: impl Fn(usize) -> f32,
    idx: &mut [u32],
    val: &mut [f32],
) -> usize {
    let mut n = 0;
    for (j, &v) in x.iter().enumerate() {
        idx[n] = j as u32;
        val[n] = v;
        n += (v.abs() > t(j)) as usize;
    }
    n
}

/// For each 8-bit mask, the positions of its set bits, first to last (the rest zero): the
/// permutation that moves an 8-lane vector's kept lanes to the front.
#[cfg(target_arch = "x86_64")]
const LEFT_PACK: [[u32; 8]; 256] = {
    let mut lut = [[0u32; 8]; 256];
    let mut m = 0;
    while m < 256 {
        let (mut k, mut b) = (0, 0);
        while b < 8 {
            if m & (1 << b) != 0 {
                lut[m][k] = b as u32;
                k += 1;
            }
            b += 1;
        }
        m += 1;
    }
    lut
};

/// [`compact_portable`] eight inputs at a time: compare, then move the kept lanes of the
/// indices and values to the front with one permutation each and advance by their count.
/// The thresholds are `channel[j]` where given, else `t` for every input.
///
/// # Safety
/// AVX2 must be available; `idx` and `val` must hold at least `x.len()` values, and `channel`,
/// where given, exactly `x.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn compact_avx2(
    x: &[f32],
    t: f32,
    channel: Option<&[f32]>,
    idx: &mut [u32],
    val: &mut [f32],
) -> usize {
    use std::arch::x86_64::*;
    let n_in = x.len();
    let sign = _mm256_set1_ps(-0.0);
    let step = _mm256_set1_epi32(8);
    let tc = _mm256_set1_ps(t);
    let mut lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let (xp, ip, vp) = (x.as_ptr(), idx.as_mut_ptr(), val.as_mut_ptr());
    let mut n = 0;
    let mut j = 0;
    while j + 8 <= n_in {
        let v = _mm256_loadu_ps(xp.add(j));
        let tv = match channel {
            Some(c) => _mm256_loadu_ps(c.as_ptr().add(j)),
            None => tc,
        };
        let keep = _mm256_cmp_ps::<_CMP_GT_OQ>(_mm256_andnot_ps(sign, v), tv);
        let m = _mm256_movemask_ps(keep) as usize;
        let perm = _mm256_loadu_si256(LEFT_PACK[m].as_ptr() as *const __m256i);
        // n <= j, so the eight lanes written at n lie inside the outputs (>= x.len() values).
        _mm256_storeu_si256(
            ip.add(n) as *mut __m256i,
            _mm256_permutevar8x32_epi32(lanes, perm),
        );
        _mm256_storeu_ps(vp.add(n), _mm256_permutevar8x32_ps(v, perm));
        n += m.count_ones() as usize;
        lanes = _mm256_add_epi32(lanes, step);
        j += 8;
    }
    for (j, &v) in x.iter().enumerate().skip(j) {
        idx[n] = j as u32;
        val[n] = v;
        n += (v.abs() > channel.map_or(t, |c| c[j])) as usize;
    }
    n
}

fn gemv_rows<R: Rows>(w: &Mat, rows: &R, y: &mut [f32]) {
    w.assert_sized("gemv");
    assert_eq!(y.len(), w.n_out, "gemv: output size");
    let per = column_split(w);
    let simd = simd_available();
    pool::for_each_chunk_mut(y, per, |c, yc| chunk(w, rows, c * per, yc, simd));
}

/// Output columns per work item: a multiple of the quantization group (of q4's super-block),
/// so that every tile starts on a group (super-block) boundary.
fn column_split(w: &Mat) -> usize {
    let chunks = column_chunks(w.n_out, tile_width(&w.view));
    let align = match w.view {
        View::Q4(_) => GROUP * Q4_SUPER,
        _ => GROUP,
    };
    w.n_out.div_ceil(chunks).next_multiple_of(align).max(align)
}

/// One work item: columns `o0 .. o0 + yc.len()`, a tile at a time.
fn chunk<R: Rows>(w: &Mat, rows: &R, o0: usize, yc: &mut [f32], simd: bool) {
    let tw = tile_width(&w.view);
    for (k, yt) in yc.chunks_mut(tw).enumerate() {
        tile(w, rows, o0 + k * tw, yt, simd);
    }
}

/// `yt = sum_k val_k * w[j_k, o0 .. o0 + yt.len()]`.
fn tile<R: Rows>(w: &Mat, rows: &R, o0: usize, yt: &mut [f32], simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: the features were detected by `simd_available` (and VNNI's by `int8_dots`);
        // every index stays inside the matrix (the entry points assert the view's size,
        // `Mat::assert_sized`, and x's and y's, and `o0 + yt.len() <= n_out`).
        unsafe { tile_avx2(w, rows, o0, yt, int8_dots()) };
        return;
    }
    let _ = simd;
    tile_portable(w, rows, o0, yt)
}

/// [`tile`] on AVX2/FMA/F16C, one body per format; where `vnni` (AVX-512 VNNI, detected by
/// the caller) q8 in integers and q4's integer products four rows to an instruction. The q8
/// and q4 passes are called from closures defined here, so that they inherit the target
/// features and are inlined (the VNNI passes, with more features, are called).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_avx2<R: Rows>(w: &Mat, rows: &R, o0: usize, yt: &mut [f32], vnni: bool) {
    let ng = w.n_out.div_ceil(GROUP);
    match w.view {
        View::F32(a) => tile_f32_avx2(a, w.n_out, rows, o0, yt),
        View::F16(a) => tile_f16_avx2(a, w.n_out, rows, o0, yt),
        View::Bf16(a) => tile_bf16_avx2(a, w.n_out, rows, o0, yt),
        // q8 in integers and q4: passes of Q8_PASS / Q4_PASS rows (the last one shorter); q8
        // in f32: of four rows, then one by one.
        View::Q8(b) if vnni => blocked_tile(
            rows,
            yt,
            |left| left.min(Q8_PASS),
            |k, m, yt| pass_q8_vnni(w, b, ng, rows, k, m, o0, yt),
        ),
        View::Q8(b) => blocked_tile(
            rows,
            yt,
            |left| if left >= 4 { 4 } else { 1 },
            |k, m, yt| match m {
                4 => pass_q8_avx2::<4, R>(w, b, ng, rows, k, o0, yt),
                _ => pass_q8_avx2::<1, R>(w, b, ng, rows, k, o0, yt),
            },
        ),
        View::Q4(b) if vnni => blocked_tile(
            rows,
            yt,
            |left| left.min(Q4_PASS),
            |k, m, yt| pass_q4_vnni(w, b, ng, rows, k, m, o0, yt),
        ),
        View::Q4(b) => blocked_tile(
            rows,
            yt,
            |left| left.min(Q4_PASS),
            |k, m, yt| pass_q4_avx2(w, b, ng, rows, k, m, o0, yt),
        ),
    }
}

/// Portable tile: dequantize each kept row's slice (a piece at a time), then accumulate.
fn tile_portable<R: Rows>(w: &Mat, rows: &R, o0: usize, yt: &mut [f32]) {
    yt.fill(0.0);
    let mut buf = [0.0f32; PORTABLE_PIECE];
    for (p, yp) in yt.chunks_mut(PORTABLE_PIECE).enumerate() {
        let b = &mut buf[..yp.len()];
        for k in 0..rows.len() {
            let (j, xj) = rows.get(k);
            w.dequant_row(j, o0 + p * PORTABLE_PIECE, b);
            for (a, &v) in yp.iter_mut().zip(b.iter()) {
                *a += xj * v;
            }
        }
    }
}

/// AVX2 tile over a format with one value per weight: four kept rows per pass over `yt`, so
/// the tile is loaded and stored once per four rows.
macro_rules! elementwise_tile {
    ($name:ident, $t:ty, |$p:ident| $load:expr, |$v:ident| $scalar:expr) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $name<R: Rows>(w: &[$t], n_out: usize, rows: &R, o0: usize, yt: &mut [f32]) {
            use std::arch::x86_64::*;
            yt.fill(0.0);
            let n = yt.len();
            let n8 = n / 8 * 8;
            let yp = yt.as_mut_ptr();
            let base = w.as_ptr().add(o0);
            let nr = rows.len();
            let mut k = 0;
            while k + 4 <= nr {
                // Where each of the four rows prefetches as it goes.
                let nx = next_rows::<4, R, $t>(rows, k, 4, |j| base.add(j * n_out));
                let (j0, x0) = rows.get(k);
                let (j1, x1) = rows.get(k + 1);
                let (j2, x2) = rows.get(k + 2);
                let (j3, x3) = rows.get(k + 3);
                let (r0, r1, r2, r3) = (
                    base.add(j0 * n_out),
                    base.add(j1 * n_out),
                    base.add(j2 * n_out),
                    base.add(j3 * n_out),
                );
                let (v0, v1, v2, v3) = (
                    _mm256_set1_ps(x0),
                    _mm256_set1_ps(x1),
                    _mm256_set1_ps(x2),
                    _mm256_set1_ps(x3),
                );
                let mut i = 0;
                while i < n8 {
                    for r in nx {
                        _mm_prefetch::<TILE_PREFETCH>(r.add(i) as *const i8);
                    }
                    let mut a = _mm256_loadu_ps(yp.add(i));
                    a = _mm256_fmadd_ps(
                        v0,
                        {
                            let $p = r0.add(i);
                            $load
                        },
                        a,
                    );
                    a = _mm256_fmadd_ps(
                        v1,
                        {
                            let $p = r1.add(i);
                            $load
                        },
                        a,
                    );
                    a = _mm256_fmadd_ps(
                        v2,
                        {
                            let $p = r2.add(i);
                            $load
                        },
                        a,
                    );
                    a = _mm256_fmadd_ps(
                        v3,
                        {
                            let $p = r3.add(i);
                            $load
                        },
                        a,
                    );
                    _mm256_storeu_ps(yp.add(i), a);
                    i += 8;
                }
                for i in n8..n {
                    let s =
                        [(r0, x0), (r1, x1), (r2, x2), (r3, x3)]
                            .iter()
                            .fold(0.0, |s, &(r, x)| {
                                let $v = *r.add(i);
                                s + x * $scalar
                            });
                    *yp.add(i) += s;
                }
                k += 4;
            }
            while k < nr {
                let (j, x) = rows.get(k);
                let r = base.add(j * n_out);
                let v = _mm256_set1_ps(x);
                let mut i = 0;
                while i < n8 {
                    let a = _mm256_loadu_ps(yp.add(i));
                    _mm256_storeu_ps(
                        yp.add(i),
                        _mm256_fmadd_ps(
                            v,
                            {
                                let $p = r.add(i);
                                $load
                            },
                            a,
                        ),
                    );
                    i += 8;
                }
                for i in n8..n {
                    let $v = *r.add(i);
                    *yp.add(i) += x * $scalar;
                }
                k += 1;
            }
        }
    };
}

elementwise_tile!(tile_f32_avx2, f32, |p| _mm256_loadu_ps(p), |v| v);
elementwise_tile!(
    tile_f16_avx2,
    half::f16,
    |p| _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
    |v| v.to_f32()
);
elementwise_tile!(
    tile_bf16_avx2,
    half::bf16,
    |p| _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)),
        16
    )),
    |v| v.to_f32()
);

/// 32 int8 values as four vectors of f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn q8_bytes(q: *const u8) -> [std::arch::x86_64::__m256; 4] {
    use std::arch::x86_64::*;
    std::array::from_fn(|i| {
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
            q.add(8 * i) as *const __m128i
        )))
    })
}

/// 16 bytes of q4 nibbles (low nibbles are outputs 0..16, high ones 16..32) as four vectors of
/// f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn q4_nibbles(p: *const u8) -> [std::arch::x86_64::__m256; 4] {
    use std::arch::x86_64::*;
    let mask = _mm256_set1_epi32(15);
    let a = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i));
    let b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(8) as *const __m128i));
    [
        _mm256_cvtepi32_ps(_mm256_and_si256(a, mask)),
        _mm256_cvtepi32_ps(_mm256_and_si256(b, mask)),
        _mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4)),
        _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)),
    ]
}

/// The 32 values `q` of a GGML Q4_1 block (scale, minimum, 16 bytes of nibbles) as four
/// vectors of f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q4_1_values(p: *const u8) -> [std::arch::x86_64::__m256; 4] {
    q4_nibbles(p.add(4))
}

/// The 32 values `q` of a GGML Q8_0 block (scale, 32 bytes) as four vectors of f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q8_values(p: *const u8) -> [std::arch::x86_64::__m256; 4] {
    q8_bytes(p.add(2))
}

/// Every f16 bit pattern as f32. The q8 tile and dot read their scales through it (a load)
/// instead of converting each with F16C, whose one-value conversion costs a cycle of the
/// shuffle port on top of the block's four sign extensions and the broadcast: the dense q8
/// GEMV, bound by that port, ran 3-12 % faster (docs/PERFORMANCE.md, twelfth session).
fn f16_table() -> &'static [f32; 65536] {
    static TABLE: std::sync::OnceLock<Box<[f32; 65536]>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = Box::new([0.0f32; 65536]);
        for (i, v) in t.iter_mut().enumerate() {
            *v = half::f16::from_bits(i as u16).to_f32();
        }
        t
    })
}

/// AVX2 tile over a blocked format (q8, q4): the kept rows in passes, `take(left)` rows at a
/// time of the `left` still to do, `pass(k, m, yt)` adding rows `k .. k + m`. Each pass
/// prefetches the rows of the next one as it reads its own ([`next_rows`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn blocked_tile<R: Rows>(
    rows: &R,
    yt: &mut [f32],
    take: impl Fn(usize) -> usize,
    mut pass: impl FnMut(usize, usize, &mut [f32]),
) {
    yt.fill(0.0);
    let nr = rows.len();
    let mut k = 0;
    while k < nr {
        let m = take(nr - k);
        pass(k, m, yt);
        k += m;
    }
}

/// Adds the trailing partial group of a tile (only at the end of the matrix) through the
/// scalar definition.
fn partial_group(w: &Mat, js: &[usize], xs: &[f32], o: usize, y: &mut [f32]) {
    let mut buf = [0.0f32; GROUP];
    let b = &mut buf[..y.len()];
    for (&j, &x) in js.iter().zip(xs) {
        w.dequant_row(j, o, b);
        for (y, &v) in y.iter_mut().zip(b.iter()) {
            *y += x * v;
        }
    }
}

/// The `m <= N` kept rows of a pass from the `k`-th: their indices, values, and pointers to
/// byte `off` of each row (rows of `row_bytes`); the pass's last `N - m` entries repeat its
/// first row with the value 0.
#[inline(always)]
fn pass_rows<const N: usize, R: Rows>(
    rows: &R,
    k: usize,
    m: usize,
    blocks: &[u8],
    row_bytes: usize,
    off: usize,
) -> ([usize; N], [f32; N], [*const u8; N]) {
    let mut js = [0usize; N];
    let mut xs = [0.0f32; N];
    let mut ps = [blocks.as_ptr(); N];
    for r in 0..N {
        (js[r], xs[r]) = if r < m { rows.get(k + r) } else { (js[0], 0.0) };
        ps[r] = blocks[js[r] * row_bytes + off..].as_ptr();
    }
    (js, xs, ps)
}

/// Where each row slot of a pass over `rows`' `k .. k + m` prefetches, at the offset the pass is
/// reading: the same place in the row that takes the slot in the next pass (`at(j)`: where row
/// `j` starts), or, where the next pass has no such row, the slot's own row (the pass's first
/// for a slot past `m`, as [`pass_rows`] pads; nothing to fetch). So every pass
/// but an item's first finds its rows in the cache, fetched at the pace the previous pass
/// read, one pass ahead; kept rows are far apart, which the hardware prefetcher does not
/// follow. (Until the thirty-eighth session a pass prefetched the first KiB of the next rows
/// all at once before it started, and 1 KiB ahead within its own rows. On short rows those
/// 100-500 prefetches filled the core's miss buffers, and the core stalled until most of
/// them had come from DRAM: fetching and arithmetic took turns instead of overlapping.
/// SmolLM2's decoding was 8-24 % slower dense in every format; docs/PERFORMANCE.md.)
#[inline(always)]
fn next_rows<const N: usize, R: Rows, T>(
    rows: &R,
    k: usize,
    m: usize,
    at: impl Fn(usize) -> *const T,
) -> [*const T; N] {
    std::array::from_fn(|r| {
        let slot = if k + m + r < rows.len() {
            k + m + r
        } else if r < m {
            k + r
        } else {
            k
        };
        at(rows.get(slot).0)
    })
}

/// Prefetches byte `off` of each of `rows` (the scales of a q8/q4 super-block in the rows
/// [`next_rows`] gives).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn prefetch_at(rows: &[*const u8], off: usize) {
    for p in rows {
        std::arch::x86_64::_mm_prefetch::<TILE_PREFETCH>(p.add(off) as *const i8);
    }
}

/// One q8 pass over `N` kept rows: per group of 32 outputs, `acc += (x_j d_jg) q_j` in
/// registers, the scale read through [`f16_table`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn pass_q8_avx2<const N: usize, R: Rows>(
    w: &Mat,
    blocks: &[u8],
    ng: usize,
    rows: &R,
    k: usize,
    o0: usize,
    yt: &mut [f32],
) {
    use std::arch::x86_64::*;
    let n = yt.len();
    let full = n / GROUP;
    let g0 = o0 / GROUP;
    let yp = yt.as_mut_ptr();
    let (js, xs, ps) = pass_rows::<N, R>(rows, k, N, blocks, ng * Q8_BLOCK, 0);
    let pf = next_rows::<N, R, u8>(rows, k, N, |j| blocks[j * ng * Q8_BLOCK..].as_ptr());
    let table = f16_table();
    for g in 0..full {
        let gy = yp.add(g * GROUP);
        let (od, oq) = q8_offsets(ng, g0 + g);
        let mut acc = [
            _mm256_loadu_ps(gy),
            _mm256_loadu_ps(gy.add(8)),
            _mm256_loadu_ps(gy.add(16)),
            _mm256_loadu_ps(gy.add(24)),
        ];
        for r in 0..N {
            let p = ps[r];
            if g == 0 || (g0 + g).is_multiple_of(Q4_SUPER) {
                _mm_prefetch::<TILE_PREFETCH>(pf[r].add(od) as *const i8);
            }
            _mm_prefetch::<TILE_PREFETCH>(pf[r].add(oq) as *const i8);
            let qv = q8_bytes(p.add(oq));
            let d = (p.add(od) as *const u16).read_unaligned();
            let s = _mm256_set1_ps(xs[r] * table[d as usize]);
            for i in 0..4 {
                acc[i] = _mm256_fmadd_ps(s, qv[i], acc[i]);
            }
        }
        for (i, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(gy.add(i * 8), *a);
        }
    }
    if full * GROUP < n {
        partial_group(w, &js, &xs, o0 + full * GROUP, &mut yt[full * GROUP..]);
    }
}

/// From each group's largest `|c_jg|` over a pass, `A` (one lane per group): the factor
/// `127 / A` that rounds the `c_jg` to int8 (0 where `A = 0`) and the step `A / 127` a unit of
/// them is worth, as `reference::gemv_int8` defines them for q4 and q8. Only for callers with
/// AVX2 detected: no `#[target_feature]`, so that it is inlined into them.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn int8_steps(
    amax: std::arch::x86_64::__m256,
) -> (std::arch::x86_64::__m256, std::arch::x86_64::__m256) {
    use std::arch::x86_64::*;
    let nonzero = _mm256_cmp_ps::<_CMP_GT_OQ>(amax, _mm256_setzero_ps());
    let inv = _mm256_and_ps(_mm256_div_ps(_mm256_set1_ps(127.0), amax), nonzero);
    (inv, _mm256_mul_ps(amax, _mm256_set1_ps(1.0 / 127.0)))
}

/// Four rows' bytes `v[0..4]` interleaved per byte position, the four rows' bytes of a position
/// in row order in one int32 lane, for `vpdpbusd`: `[t]` holds, per 128-bit half, positions
/// `4t .. 4t + 4` (two byte and two word unpacks per row). Only for callers with AVX2 detected
/// (no `#[target_feature]`, so that it is inlined into them).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn interleave4(v: [std::arch::x86_64::__m256i; 4]) -> [std::arch::x86_64::__m256i; 4] {
    use std::arch::x86_64::*;
    let (ab_lo, ab_hi) = (
        _mm256_unpacklo_epi8(v[0], v[1]),
        _mm256_unpackhi_epi8(v[0], v[1]),
    );
    let (cd_lo, cd_hi) = (
        _mm256_unpacklo_epi8(v[2], v[3]),
        _mm256_unpackhi_epi8(v[2], v[3]),
    );
    [
        _mm256_unpacklo_epi16(ab_lo, cd_lo),
        _mm256_unpackhi_epi16(ab_lo, cd_lo),
        _mm256_unpacklo_epi16(ab_hi, cd_hi),
        _mm256_unpackhi_epi16(ab_hi, cd_hi),
    ]
}

/// Four rows' int8 `k` (the low byte of each int32 lane of `kv[0..4]`) as one word per lane,
/// the first row in its low byte: the signed operand of `vpdpbusd` against four rows' weight
/// bytes interleaved per output. Only for callers with AVX2 detected (no `#[target_feature]`,
/// so that it is inlined into them).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn quad_words(kv: [std::arch::x86_64::__m256i; 4]) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let byte = _mm256_set1_epi32(0xff);
    _mm256_or_si256(
        _mm256_or_si256(
            _mm256_and_si256(kv[0], byte),
            _mm256_slli_epi32::<8>(_mm256_and_si256(kv[1], byte)),
        ),
        _mm256_or_si256(
            _mm256_slli_epi32::<16>(_mm256_and_si256(kv[2], byte)),
            _mm256_slli_epi32::<24>(kv[3]),
        ),
    )
}

/// For a q4 pass over the super-block at byte `base` of its rows (`kk` groups): each row's
/// `c_jg = x_j d_jg` (lanes past `kk` unused), their largest `|c_jg|` per group, and the
/// minimums' sum `sum_j x_j m_jg`; a partial super-block's `20 kk >= 2 kk + 16` bytes hold the
/// loads. Only for callers with AVX2 and F16C detected (no `#[target_feature]`, so that it is
/// inlined into them).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn q4_super_scales(
    ps: &[*const u8; Q4_PASS],
    xs: &[f32; Q4_PASS],
    base: usize,
    kk: usize,
) -> (
    [std::arch::x86_64::__m256; Q4_PASS],
    std::arch::x86_64::__m256,
    std::arch::x86_64::__m256,
) {
    use std::arch::x86_64::*;
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let mut c = [_mm256_setzero_ps(); Q4_PASS];
    let mut amax = _mm256_setzero_ps();
    let mut bias = _mm256_setzero_ps();
    for r in 0..Q4_PASS {
        let p = ps[r].add(base);
        let x = _mm256_set1_ps(xs[r]);
        let d = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
        let mn = _mm256_cvtph_ps(_mm_loadu_si128(p.add(2 * kk) as *const __m128i));
        c[r] = _mm256_mul_ps(x, d);
        amax = _mm256_max_ps(amax, _mm256_and_ps(c[r], abs_mask));
        bias = _mm256_fmadd_ps(x, mn, bias);
    }
    (c, amax, bias)
}

/// One q8 pass over `m <= Q8_PASS` kept rows with 8-bit products (the rest of the pass padded
/// with zero inputs), what `reference::gemv_q8_int8` defines. Per super-block and group `g`,
/// each row's `c_jg = x_j d_jg` is rounded to an int8 `k_jg = round(127 c_jg / max_j |c_jg|)`
/// (the maximum over the pass's rows; eight groups' scales converted at once), four rows'
/// bytes are interleaved per output and `vpdpbusd` adds their four products to an int32 per
/// output: 32 products an instruction, where the f32 tile converts and multiplies 8. The
/// instruction multiplies unsigned bytes by signed ones, so the weights are taken as
/// `q + 128` (their sign bit flipped) and the pass starts each sum at `-128 sum_j k_jg`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
#[allow(clippy::too_many_arguments)]
unsafe fn pass_q8_vnni<R: Rows>(
    w: &Mat,
    blocks: &[u8],
    ng: usize,
    rows: &R,
    k: usize,
    m: usize,
    o0: usize,
    yt: &mut [f32],
) {
    use std::arch::x86_64::*;
    const QUADS: usize = Q8_PASS / 4;
    let n = yt.len();
    let g0 = o0 / GROUP;
    let gend = g0 + n / GROUP;
    let yp = yt.as_mut_ptr();
    let (js, xs, ps) = pass_rows::<Q8_PASS, R>(rows, k, m, blocks, ng * Q8_BLOCK, 0);
    let pf = next_rows::<Q8_PASS, R, u8>(rows, k, m, |j| blocks[j * ng * Q8_BLOCK..].as_ptr());
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let flip = _mm256_set1_epi8(-128);
    for sb in (g0 / Q4_SUPER * Q4_SUPER..gend).step_by(Q4_SUPER) {
        let kk = Q4_SUPER.min(ng - sb);
        let (i0, i1) = (g0.max(sb) - sb, gend.min(sb + kk) - sb);
        let base = sb * Q8_BLOCK;
        prefetch_at(&pf, base);
        // c_jg for the super-block's groups (lanes past kk unused: a partial super-block's
        // 34 kk >= 16 bytes hold the load), and their maximum per group.
        let mut c = [_mm256_setzero_ps(); Q8_PASS];
        let mut amax = _mm256_setzero_ps();
        let mut nan = _mm256_setzero_ps();
        for r in 0..Q8_PASS {
            let d = _mm256_cvtph_ps(_mm_loadu_si128(ps[r].add(base) as *const __m128i));
            c[r] = _mm256_mul_ps(_mm256_set1_ps(xs[r]), d);
            amax = _mm256_max_ps(amax, _mm256_and_ps(c[r], abs_mask));
            nan = _mm256_or_ps(nan, _mm256_cmp_ps::<_CMP_UNORD_Q>(c[r], c[r]));
        }
        // A NaN `c_jg` makes its group's step NaN (the maximum alone would skip it), so that
        // it reaches the outputs as in f32 (q4's passes carry it in their minimums' sum).
        let (inv, steps) = int8_steps(_mm256_or_ps(amax, nan));
        let mut step = [0.0f32; Q4_SUPER];
        _mm256_storeu_ps(step.as_mut_ptr(), steps);
        // kq[q][g]: the int8 k of rows 4q .. 4q + 4 of group g as one word, first row in its
        // low byte; start[g] = -128 sum_j k_jg.
        let mut kq = [[0i32; Q4_SUPER]; QUADS];
        let mut ksum = _mm256_setzero_si256();
        for (q, kw) in kq.iter_mut().enumerate() {
            let kv: [__m256i; 4] =
                std::array::from_fn(|b| _mm256_cvtps_epi32(_mm256_mul_ps(c[4 * q + b], inv)));
            for v in kv {
                ksum = _mm256_add_epi32(ksum, v);
            }
            _mm256_storeu_si256(kw.as_mut_ptr() as *mut __m256i, quad_words(kv));
        }
        let mut start = [0i32; Q4_SUPER];
        _mm256_storeu_si256(
            start.as_mut_ptr() as *mut __m256i,
            _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32::<7>(ksum)),
        );
        for i in i0..i1 {
            let off = base + 2 * kk + GROUP * i;
            let mut acc = [_mm256_set1_epi32(start[i]); 4];
            for (q, kw) in kq.iter().enumerate() {
                let kv = _mm256_set1_epi32(kw[i]);
                let v: [__m256i; 4] = std::array::from_fn(|b| {
                    let p = ps[4 * q + b].add(off);
                    _mm_prefetch::<TILE_PREFETCH>(pf[4 * q + b].add(off) as *const i8);
                    _mm256_loadu_si256(p as *const __m256i)
                });
                // Outputs 0..4 | 16..20, 4..8 | 20..24, 8..12 | 24..28, 12..16 | 28..32.
                let quads = interleave4(v);
                for (a, u) in acc.iter_mut().zip(quads) {
                    *a = _mm256_dpbusd_epi32(*a, _mm256_xor_si256(u, flip), kv);
                }
            }
            let gy = yp.add((sb + i - g0) * GROUP);
            let s = _mm256_set1_ps(step[i]);
            let ordered = [
                _mm256_permute2x128_si256::<0x20>(acc[0], acc[1]),
                _mm256_permute2x128_si256::<0x20>(acc[2], acc[3]),
                _mm256_permute2x128_si256::<0x31>(acc[0], acc[1]),
                _mm256_permute2x128_si256::<0x31>(acc[2], acc[3]),
            ];
            for (t, a) in ordered.into_iter().enumerate() {
                let yv = _mm256_loadu_ps(gy.add(8 * t));
                _mm256_storeu_ps(gy.add(8 * t), _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(a), yv));
            }
        }
    }
    let full = n / GROUP * GROUP;
    if full < n {
        partial_group(w, &js[..m], &xs[..m], o0 + full, &mut yt[full..]);
    }
}

/// One q4 pass over `m <= Q4_PASS` kept rows (the rest of the pass padded with zero inputs),
/// what `reference::gemv_q4_int8` defines. Per super-block and group `g`, each row's
/// `c_jg = x_j d_jg` is rounded to an int8 `k_jg = round(127 c_jg / max_j |c_jg|)` (the
/// maximum over the pass's rows), the nibbles `q_jo` of two rows at a time are multiplied by
/// their `k` and summed in int16 (`vpmaddubsw`: 16 products a group for one instruction, where
/// the f32 path converted and multiplied 8), and the pass adds
/// `S_g sum_j k_jg q_jo + sum_j x_j m_jg + 7.5 sum_j (c_jg - S_g k_jg)` to the output,
/// `S_g = max_j |c_jg| / 127`. The rounding is GGML's quantization of the activations to 8
/// bits for its Q4 dot products, here per group of outputs and pass of rows; the last term
/// adds back the part of its error that the mean `q` carries (on SmolLM2-135M that cut the
/// decode's KL divergence from exact products six-fold, docs/PERFORMANCE.md).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn pass_q4_avx2<R: Rows>(
    w: &Mat,
    blocks: &[u8],
    ng: usize,
    rows: &R,
    k: usize,
    m: usize,
    o0: usize,
    yt: &mut [f32],
) {
    use std::arch::x86_64::*;
    let n = yt.len();
    let g0 = o0 / GROUP;
    let gend = g0 + n / GROUP;
    let yp = yt.as_mut_ptr();
    let (js, xs, ps) = pass_rows::<Q4_PASS, R>(rows, k, m, blocks, ng * Q4_BLOCK, 0);
    let pf = next_rows::<Q4_PASS, R, u8>(rows, k, m, |j| blocks[j * ng * Q4_BLOCK..].as_ptr());
    // The pairs of rows the pass multiplies: those past the kept rows hold padding (zero k)
    // only. A count known only at run time also keeps the compiler from unrolling the loop
    // over them (see `quads` in `pass_q4_vnni`).
    let pairs = m.div_ceil(2);
    for sb in (g0 / Q4_SUPER * Q4_SUPER..gend).step_by(Q4_SUPER) {
        let kk = Q4_SUPER.min(ng - sb);
        let (i0, i1) = (g0.max(sb) - sb, gend.min(sb + kk) - sb);
        let base = sb * Q4_BLOCK;
        prefetch_at(&pf, base);
        // c_jg for the super-block's groups (lanes past kk unused), their maximum, and the
        // minimums' sum; a partial super-block's 20 kk >= 2 kk + 16 bytes hold the loads.
        let (c, amax, bias) = q4_super_scales(&ps, &xs, base, kk);
        let (inv, step) = int8_steps(amax);
        // kw[p][g]: the int8 pair (k of row 2p, k of row 2p + 1) of group g, as one u16 (one
        // spare entry, read by a lone group's unused lane); `err`: sum_j (c_jg - S_g k_jg).
        let mut kw = [[0u16; Q4_SUPER + 1]; Q4_PASS / 2];
        let mut err = _mm256_setzero_ps();
        for (p, kp) in kw.iter_mut().enumerate() {
            let a = _mm256_cvtps_epi32(_mm256_mul_ps(c[2 * p], inv));
            let b = _mm256_cvtps_epi32(_mm256_mul_ps(c[2 * p + 1], inv));
            err = _mm256_add_ps(err, _mm256_fnmadd_ps(step, _mm256_cvtepi32_ps(a), c[2 * p]));
            err = _mm256_add_ps(
                err,
                _mm256_fnmadd_ps(step, _mm256_cvtepi32_ps(b), c[2 * p + 1]),
            );
            let a16 = _mm_packs_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256::<1>(a));
            let b16 = _mm_packs_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256::<1>(b));
            let ab = _mm_packs_epi16(a16, b16);
            let pairs = _mm_unpacklo_epi8(ab, _mm_srli_si128::<8>(ab));
            _mm_storeu_si128(kp.as_mut_ptr() as *mut __m128i, pairs);
        }
        let mut sc = [0.0f32; Q4_SUPER];
        let mut bs = [0.0f32; Q4_SUPER];
        _mm256_storeu_ps(sc.as_mut_ptr(), step);
        _mm256_storeu_ps(
            bs.as_mut_ptr(),
            _mm256_fmadd_ps(_mm256_set1_ps(Q4_MID), err, bias),
        );
        let mut i = i0;
        while i < i1 {
            let off = base + 4 * kk + 16 * i;
            let acc = if i + 1 < i1 {
                q4_groups_avx2::<true>(&ps, &pf, &kw, pairs, i, off)
            } else {
                q4_groups_avx2::<false>(&ps, &pf, &kw, pairs, i, off)
            };
            for l in 0..(i1 - i).min(2) {
                let gy = yp.add((sb + i + l - g0) * GROUP);
                let s = _mm256_set1_ps(sc[i + l]);
                let b = _mm256_set1_ps(bs[i + l]);
                // acc[0], acc[2], acc[1], acc[3] hold outputs 0..8, 8..16, 16..24, 24..32;
                // lane l of each is group i + l.
                for (t, a) in [acc[0], acc[2], acc[1], acc[3]].into_iter().enumerate() {
                    let h = if l == 0 {
                        _mm256_castsi256_si128(a)
                    } else {
                        _mm256_extracti128_si256::<1>(a)
                    };
                    let f = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(h));
                    let yv = _mm256_add_ps(_mm256_loadu_ps(gy.add(8 * t)), b);
                    _mm256_storeu_ps(gy.add(8 * t), _mm256_fmadd_ps(s, f, yv));
                }
            }
            i += 2;
        }
    }
    let full = n / GROUP * GROUP;
    if full < n {
        partial_group(w, &js[..m], &xs[..m], o0 + full, &mut yt[full..]);
    }
}

/// [`pass_q4_avx2`] with `vpdpbusd` (AVX-512 VNNI): the same passes, roundings and sums (so
/// the same result up to float summation order), but four rows' bytes interleaved per output
/// and their four products added to an int32 per instruction, where `vpmaddubsw` multiplies
/// two rows into an int16. The interleaved bytes are not split into nibbles: one product
/// takes each whole byte `q_lo + 16 q_hi`, a second its high nibble, and the low nibbles' sum
/// is the first minus 16 times the second. Per four rows and two groups, 30 instructions where
/// the pair scheme takes 40, and no int16 widening at the end of a pass.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
#[allow(clippy::too_many_arguments)]
unsafe fn pass_q4_vnni<R: Rows>(
    w: &Mat,
    blocks: &[u8],
    ng: usize,
    rows: &R,
    k: usize,
    m: usize,
    o0: usize,
    yt: &mut [f32],
) {
    use std::arch::x86_64::*;
    const QUADS: usize = Q4_PASS / 4;
    let n = yt.len();
    let g0 = o0 / GROUP;
    let gend = g0 + n / GROUP;
    let yp = yt.as_mut_ptr();
    let (js, xs, ps) = pass_rows::<Q4_PASS, R>(rows, k, m, blocks, ng * Q4_BLOCK, 0);
    let pf = next_rows::<Q4_PASS, R, u8>(rows, k, m, |j| blocks[j * ng * Q4_BLOCK..].as_ptr());
    // The quads of rows the pass multiplies: those past the kept rows hold padding (zero k)
    // only. Run-time counts matter beyond that: with the constant `QUADS` the compiler
    // unrolled the loop over the quads, whose code then had 1.5 times as many stack
    // operands, and the pass ran 1.3-1.5x slower from L2 on one thread (SmolLM2's decoding
    // 6-9 % slower dense; with `pairs` in `pass_q4_avx2`, 18-26 %; docs/PERFORMANCE.md,
    // thirty-ninth session).
    let quads = m.div_ceil(4);
    let lo = _mm256_set1_epi8(0x0F);
    // Lane 0 takes the quad word of group i, lane 1 that of group i + 1.
    let lanes = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    for sb in (g0 / Q4_SUPER * Q4_SUPER..gend).step_by(Q4_SUPER) {
        let kk = Q4_SUPER.min(ng - sb);
        let (i0, i1) = (g0.max(sb) - sb, gend.min(sb + kk) - sb);
        let base = sb * Q4_BLOCK;
        prefetch_at(&pf, base);
        let (c, amax, bias) = q4_super_scales(&ps, &xs, base, kk);
        let (inv, step) = int8_steps(amax);
        // kq[q][g]: the int8 k of rows 4q .. 4q + 4 of group g as one word, first row in its
        // low byte (one spare entry, read by a lone group's unused lane).
        let mut kq = [[0i32; Q4_SUPER + 1]; QUADS];
        let mut err = _mm256_setzero_ps();
        for (q, kw) in kq.iter_mut().enumerate() {
            let kv: [__m256i; 4] =
                std::array::from_fn(|b| _mm256_cvtps_epi32(_mm256_mul_ps(c[4 * q + b], inv)));
            for (b, v) in kv.iter().enumerate() {
                err = _mm256_add_ps(
                    err,
                    _mm256_fnmadd_ps(step, _mm256_cvtepi32_ps(*v), c[4 * q + b]),
                );
            }
            _mm256_storeu_si256(kw.as_mut_ptr() as *mut __m256i, quad_words(kv));
        }
        let mut sc = [0.0f32; Q4_SUPER];
        let mut bs = [0.0f32; Q4_SUPER];
        _mm256_storeu_ps(sc.as_mut_ptr(), step);
        _mm256_storeu_ps(
            bs.as_mut_ptr(),
            _mm256_fmadd_ps(_mm256_set1_ps(Q4_MID), err, bias),
        );
        let mut i = i0;
        while i < i1 {
            let two = i + 1 < i1;
            let off = base + 4 * kk + 16 * i;
            // full[t] / high[t]: sums over whole bytes / high nibbles, per lane (group) the
            // outputs 4t .. 4t + 4 (low nibbles) and 16 + 4t .. 20 + 4t (high ones).
            let mut full = [_mm256_setzero_si256(); 4];
            let mut high = [_mm256_setzero_si256(); 4];
            for (q, kw) in kq.iter().enumerate().take(quads) {
                let kv = _mm256_permutevar8x32_epi32(
                    _mm256_castsi128_si256(_mm_loadl_epi64(kw.as_ptr().add(i) as *const __m128i)),
                    lanes,
                );
                let v: [__m256i; 4] = std::array::from_fn(|b| {
                    let p = ps[4 * q + b].add(off);
                    _mm_prefetch::<TILE_PREFETCH>(pf[4 * q + b].add(off) as *const i8);
                    if two {
                        _mm256_loadu_si256(p as *const __m256i)
                    } else {
                        _mm256_zextsi128_si256(_mm_loadu_si128(p as *const __m128i))
                    }
                });
                let quads = interleave4(v);
                for (t, u) in quads.into_iter().enumerate() {
                    full[t] = _mm256_dpbusd_epi32(full[t], u, kv);
                    let h = _mm256_and_si256(_mm256_srli_epi16::<4>(u), lo);
                    high[t] = _mm256_dpbusd_epi32(high[t], h, kv);
                }
            }
            let low: [__m256i; 4] =
                std::array::from_fn(|t| _mm256_sub_epi32(full[t], _mm256_slli_epi32::<4>(high[t])));
            for l in 0..(i1 - i).min(2) {
                let gy = yp.add((sb + i + l - g0) * GROUP);
                let s = _mm256_set1_ps(sc[i + l]);
                let b = _mm256_set1_ps(bs[i + l]);
                let pick = |a: __m256i, c: __m256i| {
                    if l == 0 {
                        _mm256_permute2x128_si256::<0x20>(a, c)
                    } else {
                        _mm256_permute2x128_si256::<0x31>(a, c)
                    }
                };
                let ordered = [
                    pick(low[0], low[1]),
                    pick(low[2], low[3]),
                    pick(high[0], high[1]),
                    pick(high[2], high[3]),
                ];
                for (t, a) in ordered.into_iter().enumerate() {
                    let yv = _mm256_add_ps(_mm256_loadu_ps(gy.add(8 * t)), b);
                    _mm256_storeu_ps(gy.add(8 * t), _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(a), yv));
                }
            }
            i += 2;
        }
    }
    let full = n / GROUP * GROUP;
    if full < n {
        partial_group(w, &js[..m], &xs[..m], o0 + full, &mut yt[full..]);
    }
}

/// The int16 sums `sum_j k_jg q_jo` over the first `pairs` pairs of rows of a pass, of group
/// `i` (lane 0) and, when `TWO`, group `i + 1` (lane 1), nibbles at byte `off` of each row: for
/// outputs 0..8 (`[0]`), 16..24 (`[1]`), 8..16 (`[2]`) and 24..32 (`[3]`) of each group. Only
/// for [`pass_q4_avx2`] (AVX2 detected): it carries no `#[target_feature]` so that it can be
/// `#[inline(always)]`; as a call it returned its four vectors through the stack (17 % of a q4
/// decode's samples).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn q4_groups_avx2<const TWO: bool>(
    ps: &[*const u8; Q4_PASS],
    pf: &[*const u8; Q4_PASS],
    kw: &[[u16; Q4_SUPER + 1]; Q4_PASS / 2],
    pairs: usize,
    i: usize,
    off: usize,
) -> [std::arch::x86_64::__m256i; 4] {
    use std::arch::x86_64::*;
    let lo = _mm256_set1_epi8(0x0F);
    // Lane 0 takes the pair word of group i (bytes 0, 1), lane 1 that of group i + 1.
    let pick = _mm256_setr_epi8(
        0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3,
        2, 3,
    );
    let mut acc = [_mm256_setzero_si256(); 4];
    for (p, kp) in kw.iter().enumerate().take(pairs) {
        let (pa, pb) = (ps[2 * p].add(off), ps[2 * p + 1].add(off));
        _mm_prefetch::<TILE_PREFETCH>(pf[2 * p].add(off) as *const i8);
        _mm_prefetch::<TILE_PREFETCH>(pf[2 * p + 1].add(off) as *const i8);
        let (va, vb) = if TWO {
            (
                _mm256_loadu_si256(pa as *const __m256i),
                _mm256_loadu_si256(pb as *const __m256i),
            )
        } else {
            (
                _mm256_zextsi128_si256(_mm_loadu_si128(pa as *const __m128i)),
                _mm256_zextsi128_si256(_mm_loadu_si128(pb as *const __m128i)),
            )
        };
        let u = _mm256_unpacklo_epi8(va, vb);
        let h = _mm256_unpackhi_epi8(va, vb);
        let kv = _mm256_shuffle_epi8(
            _mm256_set1_epi32((kp.as_ptr().add(i) as *const i32).read_unaligned()),
            pick,
        );
        let nib = |v: __m256i, t: usize| {
            let v = if t == 0 { v } else { _mm256_srli_epi16::<4>(v) };
            _mm256_maddubs_epi16(_mm256_and_si256(v, lo), kv)
        };
        acc[0] = _mm256_add_epi16(acc[0], nib(u, 0));
        acc[1] = _mm256_add_epi16(acc[1], nib(u, 1));
        acc[2] = _mm256_add_epi16(acc[2], nib(h, 0));
        acc[3] = _mm256_add_epi16(acc[3], nib(h, 1));
    }
    acc
}

/// `w[j, o0 .. o0 + out.len()]` as f32, what [`Mat::dequant_row`] computes: f16/bf16 through
/// `half`'s vectorized slice conversion, whole q8/q4 groups through the AVX2 block decoders
/// (`d q (+ m)` as one FMA, so within an ulp of the scalar definition), the rest by it.
pub fn dequant_row(w: &Mat, j: usize, o0: usize, out: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    let n = w.n_out;
    w.assert_sized("dequant_row");
    assert!(
        j < w.n_in && o0 + out.len() <= n,
        "dequant_row: out of range"
    );
    let r = j * n + o0..j * n + o0 + out.len();
    match w.view {
        View::F32(v) => out.copy_from_slice(&v[r]),
        View::F16(v) => v[r].convert_to_f32_slice(out),
        View::Bf16(v) => v[r].convert_to_f32_slice(out),
        View::Q8(_) | View::Q4(_) => {
            let full = if simd_available() && o0.is_multiple_of(GROUP) {
                out.len() / GROUP * GROUP
            } else {
                0
            };
            #[cfg(target_arch = "x86_64")]
            if full > 0 {
                // SAFETY: the AVX2 features were detected; the groups decoded lie in
                // row j, columns o0..o0+full, inside the matrix (checked above).
                unsafe { dequant_groups_avx2(w, j, o0, &mut out[..full]) };
            }
            w.dequant_row(j, o0 + full, &mut out[full..]);
        }
    }
}

/// An f16 value at `p` broadcast to eight lanes of f32 (a scale or minimum of q8/q4). Only for
/// callers with F16C detected: no `#[target_feature]`, so that it is inlined into them.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn f16_at(p: *const u8) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    _mm256_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(
        (p as *const u16).read_unaligned() as i32,
    )))
}

/// Whole groups of a q8/q4 row, from the group-aligned column `o0`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dequant_groups_avx2(w: &Mat, j: usize, o0: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let ng = groups(w.n_out);
    let g0 = o0 / GROUP;
    for (g, o) in out.chunks_exact_mut(GROUP).enumerate() {
        let (qv, d, m) = match w.view {
            View::Q8(b) => {
                let row = b.as_ptr().add(j * ng * Q8_BLOCK);
                let (od, oq) = q8_offsets(ng, g0 + g);
                (
                    q8_bytes(row.add(oq)),
                    f16_at(row.add(od)),
                    _mm256_setzero_ps(),
                )
            }
            View::Q4(b) => {
                let row = b.as_ptr().add(j * ng * Q4_BLOCK);
                let (od, om, oq) = q4_offsets(ng, g0 + g);
                (
                    q4_nibbles(row.add(oq)),
                    f16_at(row.add(od)),
                    f16_at(row.add(om)),
                )
            }
            _ => unreachable!("dequant_groups_avx2 on a float format"),
        };
        for (i, q) in qv.iter().enumerate() {
            _mm256_storeu_ps(o.as_mut_ptr().add(8 * i), _mm256_fmadd_ps(d, *q, m));
        }
    }
}

/// Longest prompt piece [`matmul_packed`] runs as rows ([`crate::batch::matmul_rows`], one
/// read of the weights for all of them, each weight decoded in registers and multiplied by
/// every row) instead of a matrix product: one batch. Eight positions ran 1.1-8x faster as rows
/// on Llama-3-8B's and SmolLM2's shapes (`gemv_speed --prefill`); at 32 the tiled product took
/// 0.55-1.1x the time of four batches of rows in q4 and q8. With the wide tile (forty-fourth
/// session) two batches at 16 positions took 0.4-0.75x the tiled product's time on the 8B
/// shapes, but a longer limit makes a greedy window of 16 positions (prefilled alone by
/// `calibrate_on`) sum in another order than the same positions inside a longer window
/// (`calibrate`), and the two calibrations must agree exactly.
pub const MATMUL_ROWS_UP_TO: usize = crate::batch::MAX_ROWS;

/// Input rows of one dequantized tile of [`matmul_packed`].
const TILE_K: usize = 256;
/// Most output columns of one block of [`matmul_packed`]: a tile of `TILE_K` x `TILE_N` f32
/// (256 KiB) stays in the core's L2 while the product reads it.
const TILE_N: usize = 256;

/// Prefill on packed weights: `y[T, out] = x[T, in] * W^T`, exact products with the
/// dequantized weights (up to summation order) in every format. Up to [`MATMUL_ROWS_UP_TO`]
/// positions run as rows ([`crate::batch::matmul_rows`]). Longer pieces: f32 goes straight to
/// [`matmul_t`]; other formats are split into blocks of up to `TILE_N` output
/// columns (at least two per thread where the matrix is wide enough); each block walks down
/// the inputs one tile of `TILE_K` rows at a time, dequantizes the tile into a thread-local
/// f32 buffer that stays in L2, and adds its product into the block's outputs. (Dequantizing
/// a whole block of columns first, 14 MiB for Llama-3-8B's down_proj, sent every weight
/// through memory as f32 twice.) No positions is an empty product, no inputs zeros.
pub fn matmul_packed(x: &[f32], n_tok: usize, w: &Mat, y: &mut [f32]) {
    let (n_in, n_out) = (w.n_in, w.n_out);
    w.assert_sized("matmul_packed");
    assert_eq!(x.len(), n_tok * n_in, "matmul_packed: input size");
    assert_eq!(y.len(), n_tok * n_out, "matmul_packed: output size");
    // The rows take 1 to MATMUL_ROWS_UP_TO positions, and the tiles below add nothing where
    // there are no inputs: every output is an empty sum.
    if n_tok == 0 || n_in == 0 {
        y.fill(0.0);
        return;
    }
    if n_tok <= MATMUL_ROWS_UP_TO {
        return crate::batch::matmul_rows(x, n_tok, *w, y);
    }
    if let View::F32(wt) = w.view {
        return matmul_t(x, n_tok, wt, n_in, n_out, y);
    }
    // Whole groups, so that every block starts on a group (the SIMD dequantization's case).
    let block = n_out
        .div_ceil(2 * pool::threads())
        .next_multiple_of(GROUP)
        .clamp(GROUP, TILE_N);
    let n_blocks = n_out.div_ceil(block);
    let yp = SendPtr(y.as_mut_ptr());
    (0..n_blocks)
        .into_par_iter()
        .for_each_init(Vec::new, |buf, b| {
            let o0 = b * block;
            let n = block.min(n_out - o0);
            buf.resize(TILE_K * n, 0.0);
            for k0 in (0..n_in).step_by(TILE_K) {
                let k = TILE_K.min(n_in - k0);
                for (j, row) in buf[..k * n].chunks_mut(n).enumerate() {
                    dequant_row(w, k0 + j, o0, row);
                }
                // SAFETY: block b writes only columns o0..o0+n of y, disjoint from every other
                // block; x's columns k0..k0+k and the tile's k rows of n lie inside their
                // slices (sizes checked above).
                unsafe {
                    matrixmultiply::sgemm(
                        n_tok,
                        k,
                        n,
                        1.0,
                        x.as_ptr().add(k0),
                        n_in as isize,
                        1,
                        buf.as_ptr(),
                        n as isize,
                        1,
                        if k0 == 0 { 0.0 } else { 1.0 },
                        yp.get().add(o0),
                        n_out as isize,
                        1,
                    );
                }
            }
        });
}

/// Output rows per work item of the dot-product GEMV: a multiple of the four rows of a pass, at
/// least four items per thread so the claiming of items can even out a noisy machine.
pub(crate) fn rows_per_chunk(n_out: usize) -> usize {
    let threads = pool::threads();
    n_out.div_ceil(threads * 4).next_multiple_of(4).max(16)
}

/// Dense GEMV on an output-major matrix (the LM head): `y[o] = w[o, :] . x`, as dot products,
/// threaded over output rows.
pub fn gemv_dot(w: &RowsMat, x: &[f32], y: &mut [f32]) {
    gemv_dot_on(w, x, y, simd_available())
}

/// [`gemv_dot`] with the SIMD choice explicit (tests run the portable path on AVX2 machines).
pub(crate) fn gemv_dot_on(w: &RowsMat, x: &[f32], y: &mut [f32], simd: bool) {
    gemv_dot_paths(w, x, y, simd, simd && int8_dots())
}

/// [`gemv_dot_on`] with the choice of q8's and q4's 8-bit dots explicit too, `int8` only
/// where [`int8_dots`] (tests run the f32 dots of AVX2 machines without VNNI on machines
/// with it).
fn gemv_dot_paths(w: &RowsMat, x: &[f32], y: &mut [f32], simd: bool, int8: bool) {
    w.assert_sized("gemv_dot");
    assert_eq!(x.len(), w.n_in, "gemv_dot: input size");
    assert_eq!(y.len(), w.n_out, "gemv_dot: output size");
    assert!(
        !int8 || (simd && int8_dots()),
        "gemv_dot: 8-bit dots without AVX-512 VNNI"
    );
    let per = rows_per_chunk(w.n_out);
    #[cfg(target_arch = "x86_64")]
    if let (true, View::Q8(b) | View::Q4(b)) = (int8, w.view) {
        let q4 = matches!(w.view, View::Q4(_));
        SCRATCH.with_borrow_mut(|Scratch { int8, sums, .. }| {
            int8.fill(x);
            sums.clear();
            sums.extend(int8.k.chunks(GROUP).zip(&int8.d).map(|(kb, &d)| {
                let lane = |l: usize| kb[4 * l..4 * l + 4].iter().map(|&k| k as i32).sum::<i32>();
                BlockSums {
                    start: std::array::from_fn(|l| if q4 { 0 } else { -128 * lane(l) }),
                    ksum: if q4 {
                        d * (0..8).map(lane).sum::<i32>() as f32
                    } else {
                        0.0
                    },
                }
            }));
            let (xb, sums) = (&*int8, &sums[..]);
            pool::for_each_chunk_mut(y, per, |c, yc| {
                // SAFETY: the features were detected by `simd_available` and `int8_dots`
                // (asserted above);
                // the sizes (the view's among them) were checked above, so every row read
                // lies in the matrix.
                unsafe {
                    if q4 {
                        dot_int8::<true>(b, w.n_in, xb, sums, c * per, yc)
                    } else {
                        dot_int8::<false>(b, w.n_in, xb, sums, c * per, yc)
                    }
                }
            });
        });
        return;
    }
    pool::for_each_chunk_mut(y, per, |c, yc| dot_rows(w, x, c * per, yc, simd));
}

/// `yc[r] = w[o0 + r, :] . x`.
fn dot_rows(w: &RowsMat, x: &[f32], o0: usize, yc: &mut [f32], simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: the features were detected by `simd_available`; the callers checked the
        // view's size, `x.len() == n_in` and `o0 + yc.len() <= n_out`, so every row read lies
        // in the matrix.
        unsafe {
            match w.view {
                View::F32(a) => dot_f32_avx2(a, w.n_in, x, o0, yc),
                View::F16(a) => dot_f16_avx2(a, w.n_in, x, o0, yc),
                View::Bf16(a) => dot_bf16_avx2(a, w.n_in, x, o0, yc),
                View::Q8(b) => dot_q8_avx2(b, w.n_in, x, o0, yc),
                View::Q4(b) => dot_q4_avx2(b, w.n_in, x, o0, yc),
            }
        }
        return;
    }
    let _ = simd;
    let mut row = vec![0.0f32; w.n_in];
    for (i, yo) in yc.iter_mut().enumerate() {
        w.dequant_row(o0 + i, &mut row);
        *yo = row.iter().zip(x).map(|(a, b)| a * b).sum();
    }
}

/// The sum of the eight lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn hsum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
}

/// Rows a dot-product pass works on at once.
const DOT_ROWS: usize = 4;
/// How many rows ahead of each stream a pass prefetches.
const DOT_PREFETCH_ROWS: usize = 2;

/// Runs `pass` over the rows `o0 .. o0 + yc.len()`: [`DOT_ROWS`] rows per pass taken from as many
/// far-apart stretches of the chunk (row `k` of each quarter), so that memory is read as four
/// independent streams rather than one (one sequential stream per core leaves the output-major
/// head about 2x slower than the input-major tiles); the remainder one row at a time.
#[inline(always)]
fn dot_streams(
    o0: usize,
    yc: &mut [f32],
    mut pass4: impl FnMut([usize; DOT_ROWS]) -> [f32; DOT_ROWS],
    mut pass1: impl FnMut([usize; 1]) -> [f32; 1],
) {
    let q = yc.len() / DOT_ROWS;
    for k in 0..q {
        let out = pass4(std::array::from_fn(|s| o0 + s * q + k));
        for (s, v) in out.into_iter().enumerate() {
            yc[s * q + k] = v;
        }
    }
    for (i, y) in yc.iter_mut().enumerate().skip(DOT_ROWS * q) {
        *y = pass1([o0 + i])[0];
    }
}

/// AVX2 dot products over a format with one value per weight: a pass loads `x` once for its
/// rows, two accumulators per row, and prefetches each stream's coming rows.
macro_rules! elementwise_dot {
    ($name:ident, $pass:ident, $t:ty, |$p:ident| $load:expr, |$v:ident| $scalar:expr) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $name(w: &[$t], n_in: usize, x: &[f32], o0: usize, yc: &mut [f32]) {
            dot_streams(
                o0,
                yc,
                |os| $pass::<DOT_ROWS>(w, n_in, x, os),
                |os| $pass::<1>(w, n_in, x, os),
            );
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma,f16c")]
        #[inline]
        unsafe fn $pass<const N: usize>(
            w: &[$t],
            n_in: usize,
            x: &[f32],
            os: [usize; N],
        ) -> [f32; N] {
            use std::arch::x86_64::*;
            let n16 = n_in / 16 * 16;
            let xp = x.as_ptr();
            let mut rows = [w.as_ptr(); N];
            for (p, &o) in rows.iter_mut().zip(&os) {
                *p = w.as_ptr().add(o * n_in);
            }
            let ahead = DOT_PREFETCH_ROWS * n_in;
            let mut acc = [[_mm256_setzero_ps(); 2]; N];
            let mut i = 0;
            while i < n16 {
                let x0 = _mm256_loadu_ps(xp.add(i));
                let x1 = _mm256_loadu_ps(xp.add(i + 8));
                for r in 0..N {
                    // A prefetch never faults, past the matrix included.
                    _mm_prefetch::<_MM_HINT_T0>(rows[r].wrapping_add(i + ahead) as *const i8);
                    let a = {
                        let $p = rows[r].add(i);
                        $load
                    };
                    let b = {
                        let $p = rows[r].add(i + 8);
                        $load
                    };
                    acc[r][0] = _mm256_fmadd_ps(a, x0, acc[r][0]);
                    acc[r][1] = _mm256_fmadd_ps(b, x1, acc[r][1]);
                }
                i += 16;
            }
            let mut y = [0.0f32; N];
            for r in 0..N {
                let mut s = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
                for k in n16..n_in {
                    let $v = *rows[r].add(k);
                    s += $scalar * x[k];
                }
                y[r] = s;
            }
            y
        }
    };
}

elementwise_dot!(
    dot_f32_avx2,
    dot_pass_f32,
    f32,
    |p| _mm256_loadu_ps(p),
    |v| v
);
elementwise_dot!(
    dot_f16_avx2,
    dot_pass_f16,
    half::f16,
    |p| _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
    |v| v.to_f32()
);
elementwise_dot!(
    dot_bf16_avx2,
    dot_pass_bf16,
    half::bf16,
    |p| _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)),
        16
    )),
    |v| v.to_f32()
);

/// AVX2 dot products over a blocked format (blocks of 32 inputs), in passes as
/// [`elementwise_dot`]: per block, `x` is loaded once for the pass and each row adds
/// `d * (q . x_block)` (plus `m * sum(x_block)` for formats with a minimum). `d` and `m` are
/// broadcast straight from [`f16_table`], a load instead of an F16C conversion and a broadcast
/// on the shuffle port (q8 since the twelfth session; q4 since the twenty-eighth: SmolLM2's
/// 49152 x 576 head 0.93 -> 0.80 ms on a Zen 4 machine, where an earlier session on another
/// machine had found it no faster). A partial last block runs through the same code against
/// a zero-padded copy of `x`'s tail (the padded weights are zeros, and meet zeros).
macro_rules! blocked_dot {
    ($name:ident, $pass:ident, $bsize:expr, $values:ident, $has_min:expr) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $name(b: &[u8], n_in: usize, x: &[f32], o0: usize, yc: &mut [f32]) {
            let full = n_in / GROUP;
            let mut tail = [0.0f32; GROUP];
            tail[..n_in - full * GROUP].copy_from_slice(&x[full * GROUP..]);
            dot_streams(
                o0,
                yc,
                |os| $pass::<DOT_ROWS>(b, n_in, x, &tail, os),
                |os| $pass::<1>(b, n_in, x, &tail, os),
            );
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma,f16c")]
        #[inline]
        unsafe fn $pass<const N: usize>(
            b: &[u8],
            n_in: usize,
            x: &[f32],
            tail: &[f32; GROUP],
            os: [usize; N],
        ) -> [f32; N] {
            use std::arch::x86_64::*;
            let nb = n_in.div_ceil(GROUP);
            let full = n_in / GROUP;
            let mut rows = [b.as_ptr(); N];
            for (p, &o) in rows.iter_mut().zip(&os) {
                *p = b.as_ptr().add(o * nb * $bsize);
            }
            let ahead = DOT_PREFETCH_ROWS * nb * $bsize;
            let table = f16_table();
            let mut acc = [_mm256_setzero_ps(); N];
            for g in 0..nb {
                let xg = if g < full {
                    x.as_ptr().add(g * GROUP)
                } else {
                    tail.as_ptr()
                };
                let xv = [
                    _mm256_loadu_ps(xg),
                    _mm256_loadu_ps(xg.add(8)),
                    _mm256_loadu_ps(xg.add(16)),
                    _mm256_loadu_ps(xg.add(24)),
                ];
                let xsum = _mm256_add_ps(_mm256_add_ps(xv[0], xv[1]), _mm256_add_ps(xv[2], xv[3]));
                for r in 0..N {
                    // A prefetch never faults, past the matrix included.
                    _mm_prefetch::<_MM_HINT_T0>(
                        rows[r].wrapping_add(g * $bsize + ahead) as *const i8
                    );
                    let qv = $values(rows[r].add(g * $bsize));
                    let mut t = _mm256_mul_ps(qv[0], xv[0]);
                    t = _mm256_fmadd_ps(qv[1], xv[1], t);
                    t = _mm256_fmadd_ps(qv[2], xv[2], t);
                    t = _mm256_fmadd_ps(qv[3], xv[3], t);
                    let f16_at = |o: usize| {
                        let bits = (rows[r].add(g * $bsize + o) as *const u16).read_unaligned();
                        _mm256_broadcast_ss(&table[bits as usize])
                    };
                    acc[r] = _mm256_fmadd_ps(f16_at(0), t, acc[r]);
                    if $has_min {
                        acc[r] = _mm256_fmadd_ps(f16_at(2), xsum, acc[r]);
                    }
                }
            }
            let mut y = [0.0f32; N];
            for r in 0..N {
                y[r] = hsum(acc[r]);
            }
            y
        }
    };
}

blocked_dot!(dot_q8_avx2, dot_pass_q8, Q8_BLOCK, q8_values, false);
blocked_dot!(dot_q4_avx2, dot_pass_q4, Q4_BLOCK, q4_1_values, true);

/// The q8 (`Q4` false) or q4 dot products of rows `o0 .. o0 + yc.len()` with 8-bit
/// activations, what `reference::gemv_dot_int8` defines (GGML's Q8_0 x Q8_0 and Q4_1 x
/// Q8_1): per block of 32 inputs, one `vpdpbusd` adds the products of the weights and the
/// activations' `k`, four to an int32 lane, and the lanes are scaled by the block's two scales
/// into f32 sums (about ten instructions a block and row, where the f32 dots take fifteen).
/// The weights' f16 scales are converted by F16C rather than read from [`f16_table`]
/// (two dependent loads a block, from a 256 KiB table): SmolLM2's q4 and q8 decoding mostly
/// 1-4 % faster (docs/PERFORMANCE.md, thirty-ninth session).
/// q8's weights are read as `q + 128` (sign bit flipped; the sums start at `sums[b].start`);
/// q4's 16 bytes of nibbles are read into both halves of a vector, the upper half shifted down
/// four bits and both masked, so that the 32 values stand in the order of the `k`, and the
/// minimum's part `m_ob sums[b].ksum` is added per block.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn dot_int8<const Q4: bool>(
    b: &[u8],
    n_in: usize,
    xb: &crate::reference::Int8Blocks,
    sums: &[BlockSums],
    o0: usize,
    yc: &mut [f32],
) {
    dot_streams(
        o0,
        yc,
        |os| dot_pass_int8::<Q4, DOT_ROWS>(b, n_in, xb, sums, os),
        |os| dot_pass_int8::<Q4, 1>(b, n_in, xb, sums, os),
    );
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
#[inline]
unsafe fn dot_pass_int8<const Q4: bool, const N: usize>(
    b: &[u8],
    n_in: usize,
    xb: &crate::reference::Int8Blocks,
    sums: &[BlockSums],
    os: [usize; N],
) -> [f32; N] {
    use std::arch::x86_64::*;
    let bsize = if Q4 { Q4_BLOCK } else { Q8_BLOCK };
    let nb = n_in.div_ceil(GROUP);
    let rows: [*const u8; N] = std::array::from_fn(|r| b.as_ptr().add(os[r] * nb * bsize));
    let ahead = DOT_PREFETCH_ROWS * nb * bsize;
    let flip = _mm256_set1_epi8(-128);
    let lo = _mm256_set1_epi8(0x0F);
    let shift = _mm256_setr_epi64x(0, 0, 4, 4);
    let mut acc = [_mm256_setzero_ps(); N];
    // Lane 1: q4's `sum_b m_ob ksum_b` (lane 0 gathers nothing).
    let mut mins = [_mm_setzero_ps(); N];
    for (g, (bs, &dx)) in sums.iter().zip(&xb.d).enumerate() {
        let kv = _mm256_loadu_si256(xb.k.as_ptr().add(g * GROUP) as *const __m256i);
        let c = _mm256_loadu_si256(bs.start.as_ptr() as *const __m256i);
        let dxv = _mm256_set1_ps(dx);
        let ks = _mm_setr_ps(0.0, bs.ksum, 0.0, 0.0);
        for r in 0..N {
            let p = rows[r].add(g * bsize);
            // A prefetch never faults, past the matrix included.
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(ahead) as *const i8);
            let wv = if Q4 {
                let bytes =
                    _mm256_broadcastsi128_si256(_mm_loadu_si128(p.add(4) as *const __m128i));
                _mm256_and_si256(_mm256_srlv_epi64(bytes, shift), lo)
            } else {
                _mm256_xor_si256(_mm256_loadu_si256(p.add(2) as *const __m256i), flip)
            };
            let sums = _mm256_dpbusd_epi32(c, wv, kv);
            // The block's scale (and q4's minimum after it) converted by F16C: lane 0 `d`,
            // lane 1 `m` (q8: the first two weights' bytes, unused).
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const i32).read_unaligned()));
            let scale = _mm256_mul_ps(_mm256_broadcastss_ps(dm), dxv);
            acc[r] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sums), acc[r]);
            if Q4 {
                mins[r] = _mm_add_ps(mins[r], _mm_mul_ps(dm, ks));
            }
        }
    }
    std::array::from_fn(|r| hsum(acc[r]) + _mm_cvtss_f32(_mm_movehdup_ps(mins[r])))
}

/// Prefill on an output-major matrix: `y[T, out] = x[T, in] * W^T`, threaded over blocks of 256
/// output rows. f32 is multiplied in place (W read through transposed strides); other formats
/// are dequantized one block of rows at a time into a thread-local f32 buffer.
pub fn matmul_dot(x: &[f32], n_tok: usize, w: &RowsMat, y: &mut [f32]) {
    let (n_in, n_out) = (w.n_in, w.n_out);
    w.assert_sized("matmul_dot");
    assert_eq!(x.len(), n_tok * n_in, "matmul_dot: input size");
    assert_eq!(y.len(), n_tok * n_out, "matmul_dot: output size");
    if n_tok == 1 {
        return gemv_dot(w, x, y);
    }
    let block = 256;
    let n_blocks = n_out.div_ceil(block);
    let yp = SendPtr(y.as_mut_ptr());
    (0..n_blocks)
        .into_par_iter()
        .for_each_init(Vec::new, |buf: &mut Vec<f32>, b| {
            let o0 = b * block;
            let n = block.min(n_out - o0);
            let rows = match w.view {
                View::F32(a) => &a[o0 * n_in..(o0 + n) * n_in],
                _ => {
                    buf.resize(n * n_in, 0.0);
                    for (i, row) in buf.chunks_mut(n_in).enumerate() {
                        w.dequant_row(o0 + i, row);
                    }
                    &buf[..]
                }
            };
            // SAFETY: block b writes only columns o0..o0+n of y, disjoint from every other block;
            // `rows` holds the n rows of n_in values read as the [n_in, n] matrix W^T (row
            // stride 1, column stride n_in); all pointers stay inside the slices checked above.
            unsafe {
                matrixmultiply::sgemm(
                    n_tok,
                    n_in,
                    n,
                    1.0,
                    x.as_ptr(),
                    n_in as isize,
                    1,
                    rows.as_ptr(),
                    1,
                    n_in as isize,
                    0.0,
                    yp.get().add(o0),
                    n_out as isize,
                    1,
                );
            }
        });
}

/// A read-only matrix view for [`gemm`]: element `(r, c)` at `data[r * rs + c * cs]`, so a
/// transpose or a column block of a wider row-major matrix is a view, not a copy.
#[derive(Clone, Copy, Debug)]
pub struct Strided<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> Strided<'a> {
    /// A view of `rows x cols` elements of `data` with row stride `rs` and column stride `cs`;
    /// panics when an element would lie outside `data` (the offsets computed without
    /// wrapping) or a stride exceeds `isize::MAX` (the product takes strides as `isize`).
    pub fn new(data: &'a [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Strided<'a> {
        assert!(
            rs <= isize::MAX as usize && cs <= isize::MAX as usize,
            "Strided: strides {rs}, {cs} exceed isize::MAX"
        );
        if rows > 0 && cols > 0 {
            let last = (rows - 1)
                .checked_mul(rs)
                .zip((cols - 1).checked_mul(cs))
                .and_then(|(r, c)| r.checked_add(c));
            assert!(
                last.is_some_and(|l| l < data.len()),
                "Strided: a {rows} x {cols} view (strides {rs}, {cs}) overruns {} values",
                data.len()
            );
        }
        Strided {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }

    /// `rows x cols` of a row-major matrix whose rows are `ld` apart.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize, ld: usize) -> Strided<'a> {
        Strided::new(data, rows, cols, ld, 1)
    }

    /// The transpose (the same elements).
    pub fn t(self) -> Strided<'a> {
        Strided {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }
}

/// `c = a * b + beta * c` on one thread, `c` row-major with rows `ldc` apart (for callers that
/// thread over independent products, such as attention heads).
pub fn gemm(a: Strided, b: Strided, beta: f32, c: &mut [f32], ldc: usize) {
    assert_eq!(a.cols, b.rows, "gemm: inner sizes");
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if m == 0 || n == 0 {
        return;
    }
    let end = (m - 1).checked_mul(ldc).and_then(|r| r.checked_add(n));
    assert!(
        end.is_some_and(|e| e <= c.len()) && n <= ldc && ldc <= isize::MAX as usize,
        "gemm: output too small"
    );
    // SAFETY: the views' constructors checked that every element they address lies inside
    // their slices, and the assert above does the same for c; k = 0 reads nothing.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.data.as_ptr(),
            a.rs as isize,
            a.cs as isize,
            b.data.as_ptr(),
            b.rs as isize,
            b.cs as isize,
            beta,
            c.as_mut_ptr(),
            ldc as isize,
            1,
        );
    }
}

/// `y[T, out] = x[T, in] * wt[in, out]` (prefill), threaded over column blocks.
pub fn matmul_t(x: &[f32], n_tok: usize, wt: &[f32], n_in: usize, n_out: usize, y: &mut [f32]) {
    assert_eq!(x.len(), n_tok * n_in, "matmul_t: input size");
    assert_eq!(wt.len(), n_in * n_out, "matmul_t: weight size");
    assert_eq!(y.len(), n_tok * n_out, "matmul_t: output size");
    if n_tok == 1 {
        return gemv_t(wt, n_in, n_out, x, y);
    }
    let block = 256;
    let n_blocks = n_out.div_ceil(block);
    let yp = SendPtr(y.as_mut_ptr());
    (0..n_blocks).into_par_iter().for_each(|b| {
        let o0 = b * block;
        let n = block.min(n_out - o0);
        // SAFETY: block b writes only columns o0..o0+n of y, disjoint from every other block;
        // all pointers stay inside the slices whose sizes were checked above.
        unsafe {
            matrixmultiply::sgemm(
                n_tok,
                n_in,
                n,
                1.0,
                x.as_ptr(),
                n_in as isize,
                1,
                wt.as_ptr().add(o0),
                n_out as isize,
                1,
                0.0,
                yp.get().add(o0),
                n_out as isize,
                1,
            );
        }
    });
}

/// An element type of the KV cache: f32, or f16 (half the bytes, the attention converts each
/// key and value as it reads it).
pub trait KvElem: Copy + Default + Send + Sync + 'static {
    /// f16: the SIMD paths convert eight values at a time with F16C.
    const F16: bool;
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
}

impl KvElem for f32 {
    const F16: bool = false;
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl KvElem for half::f16 {
    const F16: bool = true;
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        half::f16::from_f32(v)
    }
}

/// Eight cache values from `p` as f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load8<T: KvElem>(p: *const T) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    if T::F16 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    } else {
        _mm256_loadu_ps(p as *const f32)
    }
}

/// Causal grouped-query attention, same contract as [`crate::reference::attention`] (keys and
/// values of type `T`), threaded over query heads.
#[allow(clippy::too_many_arguments)]
pub fn attention<T: KvElem>(
    q: &[f32],
    k: &[T],
    v: &[T],
    n_q: usize,
    pos0: usize,
    n_head: usize,
    n_kv_head: usize,
    hd: usize,
    out: &mut [f32],
) {
    assert!(
        n_kv_head > 0 && n_head.is_multiple_of(n_kv_head),
        "attention: {n_head} query heads in groups over {n_kv_head} key/value heads"
    );
    let group = n_head / n_kv_head;
    let scale = 1.0 / (hd as f32).sqrt();
    let (qs, kvs) = (n_head * hd, n_kv_head * hd);
    let n_keys_max = pos0 + n_q;
    assert!(k.len() >= n_keys_max * kvs && v.len() >= n_keys_max * kvs);
    assert_eq!(q.len(), n_q * qs);
    assert_eq!(out.len(), n_q * qs);
    let op = SendPtr(out.as_mut_ptr());
    let simd = simd_available();
    (0..n_head * n_q).into_par_iter().for_each_init(
        || vec![0.0f32; n_keys_max],
        |scores, i| {
            let (h, t) = (i % n_head, i / n_head);
            let kh = h / group;
            let n_keys = pos0 + t + 1;
            let qh = &q[t * qs + h * hd..t * qs + (h + 1) * hd];
            let sc = &mut scores[..n_keys];
            let (kb, vb) = (&k[kh * hd..], &v[kh * hd..]);
            let m = head_scores(qh, kb, kvs, 0, n_keys, scale, sc, simd);
            let l = exp_shifted(sc, m, simd);
            // SAFETY: (t, h) owns out[t*qs + h*hd .. +hd], disjoint across work items.
            let o = unsafe { std::slice::from_raw_parts_mut(op.get().add(t * qs + h * hd), hd) };
            head_weighted_sum(sc, vb, kvs, 0, n_keys, o, simd);
            o.iter_mut().for_each(|x| *x /= l);
        },
    );
}

/// `sum a[i] * b[i]`.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: features detected; lengths checked inside.
            return unsafe { dot_avx2(a, b) };
        }
    }
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let n8 = n / 8 * 8;
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    while i < n8 {
        acc = _mm256_fmadd_ps(
            _mm256_loadu_ps(a.as_ptr().add(i)),
            _mm256_loadu_ps(b.as_ptr().add(i)),
            acc,
        );
        i += 8;
    }
    let mut buf = [0.0f32; 8];
    _mm256_storeu_ps(buf.as_mut_ptr(), acc);
    let mut s: f32 = buf.iter().sum();
    for i in n8..n {
        s += a[i] * b[i];
    }
    s
}

/// `y += a * x`.
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: features detected; lengths checked inside.
            return unsafe { axpy_avx2(a, x, y) };
        }
    }
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_avx2(a: f32, x: &[f32], y: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = x.len().min(y.len());
    let n8 = n / 8 * 8;
    let av = _mm256_set1_ps(a);
    let mut i = 0;
    while i < n8 {
        let yv = _mm256_loadu_ps(y.as_ptr().add(i));
        _mm256_storeu_ps(
            y.as_mut_ptr().add(i),
            _mm256_fmadd_ps(av, _mm256_loadu_ps(x.as_ptr().add(i)), yv),
        );
        i += 8;
    }
    for i in n8..n {
        y[i] = a.mul_add(x[i], y[i]);
    }
}

/// Fewest keys in one piece of [`attention_decode`] (where there are more keys than that).
const ATTN_MIN_KEYS: usize = 32;
/// Most keys in one piece of [`attention_decode`]: its keys and values stay in the core's L2
/// while each query head of the group reads them.
const ATTN_MAX_KEYS: usize = 256;

thread_local! {
    /// [`attention_decode`]'s per-piece partial results, kept between calls.
    static ATTN_PARTS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Decode attention of one query position over `n_keys` cached positions (flash-decoding):
/// the keys of each key/value head are cut into blocks, and each piece (key/value head, block
/// of keys) computes for the query heads of its group the scores, their maximum m, the sum l of
/// `exp(score - m)` and the weighted sum of its values with those weights; the pieces of each
/// head are then merged, rescaled to the common maximum. Pieces are spread over the kernel pool
/// (about eight per thread, none under `ATTN_MIN_KEYS` keys where there are more), so the
/// threads share the work whatever the number of heads, and a block of keys and values is read
/// once for all the query heads of its group. `scores` is caller-owned scratch of at least
/// `n_head * n_keys` values, so a decode step allocates nothing after the first. Same result as
/// [`crate::reference::attention`] with `n_q = 1`, `pos0 = n_keys - 1`.
#[allow(clippy::too_many_arguments)]
pub fn attention_decode<T: KvElem>(
    q: &[f32],
    k: &[T],
    v: &[T],
    n_keys: usize,
    n_head: usize,
    n_kv_head: usize,
    hd: usize,
    scores: &mut [f32],
    out: &mut [f32],
) {
    attention_decode_on(
        q,
        k,
        v,
        n_keys,
        n_head,
        n_kv_head,
        hd,
        scores,
        out,
        simd_available(),
    );
}

/// [`attention_decode`] with the SIMD choice explicit (tests run the portable path too); the
/// SIMD paths take head sizes that are multiples of 8.
#[allow(clippy::too_many_arguments)]
fn attention_decode_on<T: KvElem>(
    q: &[f32],
    k: &[T],
    v: &[T],
    n_keys: usize,
    n_head: usize,
    n_kv_head: usize,
    hd: usize,
    scores: &mut [f32],
    out: &mut [f32],
    simd: bool,
) {
    assert!(n_keys >= 1, "attention_decode: no keys");
    assert!(
        n_kv_head > 0 && n_head.is_multiple_of(n_kv_head),
        "attention_decode: {n_head} query heads in groups over {n_kv_head} key/value heads"
    );
    let group = n_head / n_kv_head;
    let scale = 1.0 / (hd as f32).sqrt();
    let kvs = n_kv_head * hd;
    assert!(k.len() >= n_keys * kvs && v.len() >= n_keys * kvs);
    assert!(scores.len() >= n_head * n_keys);
    assert_eq!(q.len(), n_head * hd);
    assert_eq!(out.len(), n_head * hd);
    let want = (8 * pool::threads()).div_ceil(n_kv_head);
    let blocks = want
        .min(n_keys.div_ceil(ATTN_MIN_KEYS))
        .max(n_keys.div_ceil(ATTN_MAX_KEYS))
        .max(1);
    let len = n_keys.div_ceil(blocks);
    let blocks = n_keys.div_ceil(len);
    // Per (head, block): the weighted sum of the block's values, then m and l.
    let slot = hd + 2;
    ATTN_PARTS.with_borrow_mut(|parts| {
        parts.resize(n_head * blocks * slot, 0.0);
        let (pp, sp) = (SendPtr(parts.as_mut_ptr()), SendPtr(scores.as_mut_ptr()));
        pool::for_each(n_kv_head * blocks, |t| {
            let (kh, b) = (t / blocks, t % blocks);
            let (p0, p1) = (b * len, ((b + 1) * len).min(n_keys));
            let (kb, vb) = (&k[kh * hd..], &v[kh * hd..]);
            for h in kh * group..(kh + 1) * group {
                // SAFETY: piece (kh, b) alone writes scores[h*n_keys + p0 .. h*n_keys + p1] and
                // the slot (h, b) of `parts` for the heads h of its group; both lie inside their
                // buffers (sizes checked or resized above).
                let (sc, part) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(sp.get().add(h * n_keys + p0), p1 - p0),
                        std::slice::from_raw_parts_mut(pp.get().add((h * blocks + b) * slot), slot),
                    )
                };
                let m = head_scores(&q[h * hd..(h + 1) * hd], kb, kvs, p0, p1, scale, sc, simd);
                let l = exp_shifted(sc, m, simd);
                head_weighted_sum(sc, vb, kvs, p0, p1, &mut part[..hd], simd);
                part[hd] = m;
                part[hd + 1] = l;
            }
        });
        for (h, o) in out.chunks_mut(hd).enumerate() {
            let ps = &parts[h * blocks * slot..(h + 1) * blocks * slot];
            let m = ps
                .chunks(slot)
                .map(|p| p[hd])
                .fold(f32::NEG_INFINITY, max_nan);
            o.fill(0.0);
            let mut l = 0.0;
            for p in ps.chunks(slot) {
                let w = (p[hd] - m).exp();
                l += w * p[hd + 1];
                axpy(w, &p[..hd], o);
            }
            o.iter_mut().for_each(|x| *x /= l);
        }
    });
}

/// The larger of `a` and `b`, NaN if either is (`f32::max` returns the other one): a NaN score
/// must reach the attention's output, as it does in the reference's softmax.
#[inline(always)]
fn max_nan(a: f32, b: f32) -> f32 {
    if a > b || a.is_nan() {
        a
    } else {
        b
    }
}

/// `sc[p - p0] = scale * (qh . k_p)` for keys `p0..p1` of one query head, key `p` at
/// `kb[p * kvs..][..hd]`; returns the largest score (NaN if any score is NaN, so that every
/// weight, and the output, turns NaN).
#[allow(clippy::too_many_arguments)]
fn head_scores<T: KvElem>(
    qh: &[f32],
    kb: &[T],
    kvs: usize,
    p0: usize,
    p1: usize,
    scale: f32,
    sc: &mut [f32],
    simd: bool,
) -> f32 {
    let hd = qh.len();
    assert!(sc.len() >= p1 - p0 && (p1 == p0 || kb.len() >= (p1 - 1) * kvs + hd));
    #[cfg(target_arch = "x86_64")]
    if simd && hd.is_multiple_of(8) {
        // SAFETY: AVX2/FMA checked by the caller (`simd`); rows and sc bounded above.
        return unsafe { head_scores_avx2(qh, kb, kvs, p0, p1, scale, sc) };
    }
    let _ = simd;
    let mut m = f32::NEG_INFINITY;
    for p in p0..p1 {
        let s = qh
            .iter()
            .zip(&kb[p * kvs..p * kvs + hd])
            .map(|(a, b)| a * b.to_f32())
            .sum::<f32>()
            * scale;
        sc[p - p0] = s;
        m = max_nan(m, s);
    }
    m
}

/// `sc[i] = exp(sc[i] - m)`; returns their sum.
fn exp_shifted(sc: &mut [f32], m: f32, simd: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: AVX2/FMA checked by the caller (`simd`).
        return unsafe { exp_shifted_avx2(sc, m) };
    }
    let _ = simd;
    let mut l = 0.0;
    for s in sc.iter_mut() {
        *s = (*s - m).exp();
        l += *s;
    }
    l
}

/// `o = sum_p sc[p - p0] * v_p` over keys `p0..p1`, value `p` at `vb[p * kvs..][..o.len()]`.
fn head_weighted_sum<T: KvElem>(
    sc: &[f32],
    vb: &[T],
    kvs: usize,
    p0: usize,
    p1: usize,
    o: &mut [f32],
    simd: bool,
) {
    let hd = o.len();
    assert!(sc.len() >= p1 - p0 && (p1 == p0 || vb.len() >= (p1 - 1) * kvs + hd));
    #[cfg(target_arch = "x86_64")]
    if simd && hd.is_multiple_of(8) {
        // SAFETY: AVX2/FMA checked by the caller (`simd`); rows and sc bounded above.
        return unsafe { head_weighted_sum_avx2(sc, vb, kvs, p0, p1, o) };
    }
    let _ = simd;
    o.fill(0.0);
    for p in p0..p1 {
        let w = sc[p - p0];
        for (oi, vi) in o.iter_mut().zip(&vb[p * kvs..p * kvs + hd]) {
            *oi += w * vi.to_f32();
        }
    }
}

/// [`head_scores`]: four keys at a time, each key's eight-lane products summed across the
/// four accumulators with one horizontal-add tree.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn head_scores_avx2<T: KvElem>(
    qh: &[f32],
    kb: &[T],
    kvs: usize,
    p0: usize,
    p1: usize,
    scale: f32,
    sc: &mut [f32],
) -> f32 {
    use std::arch::x86_64::*;
    let hd = qh.len();
    let (qp, kp, out) = (qh.as_ptr(), kb.as_ptr(), sc.as_mut_ptr());
    let sv = _mm_set1_ps(scale);
    let mut mv = _mm_set1_ps(f32::NEG_INFINITY);
    let mut p = p0;
    while p + 4 <= p1 {
        let r = [
            kp.add(p * kvs),
            kp.add((p + 1) * kvs),
            kp.add((p + 2) * kvs),
            kp.add((p + 3) * kvs),
        ];
        let mut a = [_mm256_setzero_ps(); 4];
        let mut c = 0;
        while c < hd {
            let qv = _mm256_loadu_ps(qp.add(c));
            for (ai, ri) in a.iter_mut().zip(r) {
                *ai = _mm256_fmadd_ps(qv, load8(ri.add(c)), *ai);
            }
            c += 8;
        }
        let t = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
        let s4 = _mm_mul_ps(
            _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)),
            sv,
        );
        _mm_storeu_ps(out.add(p - p0), s4);
        // NaN-propagating: `maxps` returns its second operand where either is NaN, so a lane
        // that has seen a NaN is set to all ones (a NaN) and stays so.
        mv = _mm_or_ps(_mm_max_ps(mv, s4), _mm_cmpunord_ps(mv, s4));
        p += 4;
    }
    let mut mb = [0.0f32; 4];
    _mm_storeu_ps(mb.as_mut_ptr(), mv);
    let mut m = mb.iter().cloned().fold(f32::NEG_INFINITY, max_nan);
    while p < p1 {
        let row = kp.add(p * kvs);
        let mut a = _mm256_setzero_ps();
        let mut c = 0;
        while c < hd {
            a = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(c)), load8(row.add(c)), a);
            c += 8;
        }
        let mut buf = [0.0f32; 8];
        _mm256_storeu_ps(buf.as_mut_ptr(), a);
        let s = buf.iter().sum::<f32>() * scale;
        *out.add(p - p0) = s;
        m = max_nan(m, s);
        p += 1;
    }
    m
}

/// `exp(x)` of eight lanes: `x = n ln 2 + r` with n rounded, a degree-6 polynomial in r
/// (Cephes' expf coefficients, about 1e-7 relative error), scaled by `2^n` through the exponent
/// bits; inputs clamped to [-87.3, 88.4] (below, the result is the smallest normal or less than
/// it, where the reference gives a denormal or zero). A NaN stays NaN: the clamp passes `x` as
/// the second operand of `maxps` and `minps`, which return it where either operand is NaN.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_avx2(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let x = _mm256_min_ps(
        _mm256_set1_ps(88.376_26),
        _mm256_max_ps(_mm256_set1_ps(-87.336_55), x),
    );
    let n = _mm256_round_ps(
        _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
    );
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut y = _mm256_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ] {
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
    }
    let y = _mm256_add_ps(
        _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r),
        _mm256_set1_ps(1.0),
    );
    let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    _mm256_mul_ps(y, _mm256_castsi256_ps(e))
}

/// RMSNorm as [`crate::reference::rmsnorm`], the sum of squares kept in eight partial sums
/// that the compiler holds in vector registers. The reference's one running sum is a chain of
/// dependent additions: 0.53 us for SmolLM2's 576 values against 0.12 us here (one core),
/// 61 norms a decoded token on the calling thread while the workers wait.
pub fn rmsnorm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    assert!(
        w.len() == x.len() && out.len() == x.len(),
        "rmsnorm: input, weight and output sizes"
    );
    let mut acc = [0.0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v * v;
        }
    }
    let ss = acc.iter().sum::<f32>() + tail.iter().map(|v| v * v).sum::<f32>();
    let inv = 1.0 / (ss / x.len() as f32 + eps).sqrt();
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = v * inv * g;
    }
}

/// `g = silu(g) * up` in place ([`crate::reference::silu_mul`]'s arithmetic), eight at a time
/// with the eight-lane exp where AVX2/FMA are available.
pub fn silu_mul_in_place(g: &mut [f32], up: &[f32]) {
    silu_mul_in_place_on(g, up, simd_available());
}

/// [`silu_mul_in_place`] with the SIMD choice explicit (tests run the portable path too).
fn silu_mul_in_place_on(g: &mut [f32], up: &[f32], simd: bool) {
    assert_eq!(g.len(), up.len(), "silu_mul: gate and up sizes");
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: AVX2/FMA checked by the caller (`simd`); lengths equal.
        return unsafe { silu_mul_in_place_avx2(g, up) };
    }
    let _ = simd;
    for (a, &b) in g.iter_mut().zip(up) {
        *a = *a / (1.0 + (-*a).exp()) * b;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_in_place_avx2(g: &mut [f32], up: &[f32]) {
    use std::arch::x86_64::*;
    let (n, gp, up_) = (g.len(), g.as_mut_ptr(), up.as_ptr());
    let one = _mm256_set1_ps(1.0);
    let mut i = 0;
    while i + 8 <= n {
        let x = _mm256_loadu_ps(gp.add(i));
        let e = exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), x));
        let s = _mm256_div_ps(x, _mm256_add_ps(one, e));
        _mm256_storeu_ps(gp.add(i), _mm256_mul_ps(s, _mm256_loadu_ps(up_.add(i))));
        i += 8;
    }
    silu_mul_in_place_on(&mut g[i..], &up[i..], false);
}

/// [`exp_shifted`], eight scores at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_shifted_avx2(sc: &mut [f32], m: f32) -> f32 {
    use std::arch::x86_64::*;
    let (n, p) = (sc.len(), sc.as_mut_ptr());
    let mv = _mm256_set1_ps(m);
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    while i + 8 <= n {
        let e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), mv));
        _mm256_storeu_ps(p.add(i), e);
        acc = _mm256_add_ps(acc, e);
        i += 8;
    }
    let mut buf = [0.0f32; 8];
    _mm256_storeu_ps(buf.as_mut_ptr(), acc);
    buf.iter().sum::<f32>() + exp_shifted(&mut sc[i..], m, false)
}

/// [`head_weighted_sum`]: 64 output values at a time held in eight registers over all the
/// keys (then 8 at a time), so the output is stored once instead of once per key.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn head_weighted_sum_avx2<T: KvElem>(
    sc: &[f32],
    vb: &[T],
    kvs: usize,
    p0: usize,
    p1: usize,
    o: &mut [f32],
) {
    use std::arch::x86_64::*;
    let hd = o.len();
    let (vp, op) = (vb.as_ptr(), o.as_mut_ptr());
    let mut c0 = 0;
    while c0 + 64 <= hd {
        let mut a = [_mm256_setzero_ps(); 8];
        for p in p0..p1 {
            let w = _mm256_set1_ps(*sc.get_unchecked(p - p0));
            let row = vp.add(p * kvs + c0);
            for (j, aj) in a.iter_mut().enumerate() {
                *aj = _mm256_fmadd_ps(w, load8(row.add(8 * j)), *aj);
            }
        }
        for (j, aj) in a.iter().enumerate() {
            _mm256_storeu_ps(op.add(c0 + 8 * j), *aj);
        }
        c0 += 64;
    }
    while c0 < hd {
        let mut a = _mm256_setzero_ps();
        for p in p0..p1 {
            let w = _mm256_set1_ps(*sc.get_unchecked(p - p0));
            a = _mm256_fmadd_ps(w, load8(vp.add(p * kvs + c0)), a);
        }
        _mm256_storeu_ps(op.add(c0), a);
        c0 += 8;
    }
}

/// [`sum`] over the thread pool: every thread sums its share (eight pieces per thread, so
/// stealing can even out a noisy machine). One pass over a buffer much larger than the caches
/// is how `teal bench` and `gemv_speed --vs-bandwidth` measure this machine's read bandwidth.
pub fn par_sum(x: &[f32]) -> f32 {
    let threads = rayon::current_num_threads().max(1);
    let per = x.len().div_ceil(threads * 8).max(1);
    x.par_chunks(per).map(sum).sum()
}

/// `sum x[i]` with eight independent accumulators: a pure streaming read, which is how the
/// benchmark measures this machine's read bandwidth. Single-threaded; [`par_sum`] splits it.
pub fn sum(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd_available() {
        // SAFETY: features detected; every load stays inside `x`.
        return unsafe { sum_avx2(x) };
    }
    x.iter().sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn sum_avx2(x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n64 = x.len() / 64 * 64;
    let p = x.as_ptr();
    let mut acc = [_mm256_setzero_ps(); 8];
    let mut i = 0;
    while i < n64 {
        for (k, a) in acc.iter_mut().enumerate() {
            *a = _mm256_add_ps(*a, _mm256_loadu_ps(p.add(i + 8 * k)));
        }
        i += 64;
    }
    let mut buf = [0.0f32; 8];
    let mut total = _mm256_setzero_ps();
    for a in acc {
        total = _mm256_add_ps(total, a);
    }
    _mm256_storeu_ps(buf.as_mut_ptr(), total);
    buf.iter().sum::<f32>() + x[n64..].iter().sum::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packed::{Dtype, PackedRows, PackedT};

    /// The integer tiles against their definitions (`reference::gemv_q4_int8`,
    /// `gemv_q8_int8`: the same passes of rows) within f32 summation error, q4's with and
    /// without VNNI, q8's f32 tile (its path without VNNI) against the exact product, and each definition within its rounding
    /// bound of the exact product (each `c_j` off by at most half a step `A / 127`, times
    /// `|q - 7.5|` for q4, whose errors times 7.5 are added back, and `|q|` for q8): tiles that
    /// start on and inside a super-block, a partial super-block and a partial group at the end,
    /// every input (two full passes and a short one), kept lists in any order, one row and none.
    fn int8_tile_case(dtype: Dtype) {
        type Gemv = fn(&Mat, &[(usize, f32)], usize, &mut [f32]);
        let (definition, pass): (Gemv, usize) = match dtype {
            Dtype::Q4 => (crate::reference::gemv_q4_int8, Q4_PASS),
            _ => (crate::reference::gemv_q8_int8, Q8_PASS),
        };
        let (n_in, n_out) = (37, 32 * 21 + 5);
        let wt: Vec<f32> = (0..n_in * n_out).map(|i| (i as f32 * 0.37).sin()).collect();
        let x: Vec<f32> = (0..n_in)
            .map(|i| (i as f32 * 0.71).cos() * (1 + i % 5) as f32)
            .collect();
        let p = PackedT::from_input_major(dtype, &wt, n_in, n_out).unwrap();
        let m = p.mat();
        let every: Vec<u32> = (0..n_in as u32).collect();
        let lists: [Vec<u32>; 4] = [every, vec![30, 2, 17, 5, 36, 0, 11], vec![9], vec![]];
        for list in &lists {
            let val: Vec<f32> = list.iter().map(|&j| x[j as usize]).collect();
            let rows: Vec<(usize, f32)> =
                list.iter().map(|&j| j as usize).zip(val.clone()).collect();
            for o0 in [0, 32 * 3, 32 * 8, 32 * 9] {
                let n = n_out - o0;
                let mut int8 = vec![0.0f32; n];
                definition(&m, &rows, o0, &mut int8);
                let (mut exact, mut scale, mut bound) =
                    (vec![0.0f32; n], vec![0.0f32; n], vec![0.0f32; n]);
                let mut row = vec![0.0f32; n];
                crate::reference::int8_bound(&m, &rows, o0, pass, &mut bound);
                for &(j, xj) in &rows {
                    m.dequant_row(j, o0, &mut row);
                    for o in 0..n {
                        exact[o] += xj * row[o];
                        scale[o] += (xj * row[o]).abs();
                    }
                }
                for o in 0..n {
                    let lim = 1.001 * bound[o] + 1e-5 * (1.0 + scale[o]);
                    assert!(
                        (int8[o] - exact[o]).abs() <= lim,
                        "{dtype:?} definition, column {o}: {} vs {} (bound {lim})",
                        int8[o],
                        exact[o]
                    );
                }
                if !simd_available() {
                    continue;
                }
                for vnni in [false, int8_dots()] {
                    let want = if dtype == Dtype::Q4 || vnni {
                        &int8
                    } else {
                        &exact
                    };
                    let mut got = vec![f32::NAN; n];
                    let kept = Kept {
                        idx: list,
                        val: &val,
                    };
                    // SAFETY: AVX2 (and VNNI where asked) detected; the tile lies in the matrix.
                    unsafe { tile_avx2(&m, &kept, o0, &mut got, vnni) };
                    for o in 0..n {
                        assert!(
                            (got[o] - want[o]).abs() <= 1e-5 * (1.0 + scale[o]),
                            "{dtype:?} vnni {vnni}, {} rows, o0 {o0}, column {o}: {} vs {}",
                            list.len(),
                            got[o],
                            want[o]
                        );
                    }
                }
            }
        }
    }

    /// What the threaded q4/q8 GEMV computes over the kept rows `idx` (values `val`; `dense`:
    /// every input, through the dense path): the integer definition (`gemv_q4_int8` where the
    /// AVX2 tiles run, `gemv_q8_int8` where VNNI does; else the exact product) applied as
    /// [`split_of`] cuts the work: in a column split the rows in order; in a row split each
    /// item's share of the rows in [`Quarters`] order, the items' partial outputs summed in
    /// order.
    fn threaded_int8_definition(m: &Mat, idx: &[u32], val: &[f32], dense: bool) -> Vec<f32> {
        let definition = |rows: &[(usize, f32)], y: &mut [f32]| match m.view {
            View::Q4(_) if simd_available() => crate::reference::gemv_q4_int8(m, rows, 0, y),
            View::Q8(_) if int8_dots() => crate::reference::gemv_q8_int8(m, rows, 0, y),
            _ => {
                let (i, v): (Vec<u32>, Vec<f32>) = rows.iter().map(|&(j, x)| (j as u32, x)).unzip();
                crate::reference::gemv_packed_idx(m, &i, &v, y)
            }
        };
        let list: Vec<(usize, f32)> = idx.iter().map(|&j| j as usize).zip(val.to_vec()).collect();
        let mut y = vec![0.0f32; m.n_out];
        let Split::Rows(per) = split_of(m) else {
            definition(&list, &mut y);
            return y;
        };
        let items = m.n_in.div_ceil(per);
        let mut part = vec![0.0f32; m.n_out];
        for c in 0..items {
            let share = if dense {
                &list[c * per..((c + 1) * per).min(m.n_in)]
            } else {
                &list[c * list.len() / items..(c + 1) * list.len() / items]
            };
            let q = share.len() / 4;
            let rows: Vec<(usize, f32)> = (0..share.len())
                .map(|k| share[if k < 4 * q { k % 4 * q + k / 4 } else { k }])
                .collect();
            definition(&rows, &mut part);
            if c == 0 {
                y.copy_from_slice(&part);
            } else {
                y.iter_mut().zip(&part).for_each(|(a, b)| *a += b);
            }
        }
        y
    }

    /// The threaded q4 and q8 GEMVs, dense and sparse, through the public entry points, against
    /// their integer definitions cut as the work is (shapes that take the row split and the
    /// column split, odd ones among them): the same roundings and the same rows, so only f32
    /// summation order differs (seen within 2e-7 of the sum of |terms|); the tolerance, 1e-5
    /// of it, is far below one row's term, so a row dropped or counted twice fails (checked).
    #[test]
    fn int8_gemvs_match_their_definitions_tightly() {
        for (n_in, n_out) in [(1536, 577), (576, 1536), (37, 77), (301, 40), (1029, 13)] {
            let wt = crate::rand::uniform(n_in * n_out, 81);
            let x = crate::rand::uniform(n_in, 82);
            for dtype in [Dtype::Q4, Dtype::Q8] {
                let p = PackedT::from_input_major(dtype, &wt, n_in, n_out).expect("pack");
                let m = p.mat();
                for t in [-1.0f32, 0.5, 0.9] {
                    let dense = t < 0.0;
                    let (idx, val) = crate::reference::compact_abs_gt(&x, t);
                    let mut got = vec![f32::NAN; n_out];
                    if dense {
                        gemv(&m, &x, &mut got);
                    } else {
                        assert_eq!(gemv_sparse(&m, &x, t, &mut got), idx.len());
                    }
                    let want = threaded_int8_definition(&m, &idx, &val, dense);
                    let mut scale = vec![0.0f32; n_out];
                    let mut row = vec![0.0f32; n_out];
                    for (&j, &xj) in idx.iter().zip(&val) {
                        m.dequant_row(j as usize, 0, &mut row);
                        scale
                            .iter_mut()
                            .zip(&row)
                            .for_each(|(s, r)| *s += (xj * r).abs());
                    }
                    let lim: Vec<f32> = scale.iter().map(|s| 1e-5 * s.max(1.0)).collect();
                    for o in 0..n_out {
                        assert!(
                            (got[o] - want[o]).abs() <= lim[o],
                            "{dtype:?} {n_in}x{n_out} t {t} column {o}: {} vs {}",
                            got[o],
                            want[o]
                        );
                    }
                    if dense && n_in > 1 {
                        let short = threaded_int8_definition(&m, &idx[1..], &val[1..], false);
                        assert!(
                            (0..n_out).any(|o| (short[o] - want[o]).abs() > lim[o]),
                            "{dtype:?} {n_in}x{n_out}: one row fewer passes the tolerance"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn q4_tile_matches_its_integer_definition() {
        int8_tile_case(Dtype::Q4);
    }

    #[test]
    fn q8_tiles_match_their_definitions() {
        int8_tile_case(Dtype::Q8);
    }

    /// `gemm` on a column block of a wider matrix times a transposed view, against plain
    /// loops: `beta` scales what `c` held, and columns past the product are left alone.
    #[test]
    fn gemm_on_strided_views_matches_loops() {
        // A 5 x 3 block at column 2 of a 5 x 7 matrix, against the transpose of a 4 x 3 one.
        let a: Vec<f32> = (0..35).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..12).map(|i| (i as f32 * 0.71).cos()).collect();
        let av = Strided::rows(&a[2..], 5, 3, 7);
        let bv = Strided::rows(&b, 4, 3, 3).t();
        let mut c = vec![1.0f32; 5 * 6];
        gemm(av, bv, 0.5, &mut c, 6);
        for r in 0..5 {
            for col in 0..6 {
                let want = if col < 4 {
                    0.5 + (0..3)
                        .map(|k| a[2 + r * 7 + k] * b[col * 3 + k])
                        .sum::<f32>()
                } else {
                    1.0
                };
                assert!((c[r * 6 + col] - want).abs() < 1e-5, "({r}, {col})");
            }
        }
    }

    #[test]
    #[should_panic(expected = "overruns")]
    fn strided_view_past_its_slice_panics() {
        Strided::rows(&[0.0; 10], 3, 4, 4);
    }

    /// A row stride whose product with the rows wraps past `usize::MAX` to a small offset
    /// ((2^64 + 2) / 3 times 3 is 2 modulo 2^64) is refused, not taken for one that fits.
    #[cfg(target_pointer_width = "64")]
    #[test]
    #[should_panic(expected = "overruns")]
    fn strided_view_with_a_wrapping_stride_panics() {
        Strided::new(&[0.0; 4], 4, 1, 6_148_914_691_236_517_206, 1);
    }

    #[test]
    #[should_panic(expected = "exceed isize::MAX")]
    fn strided_view_with_a_stride_past_isize_panics() {
        Strided::new(&[0.0; 4], 1, 1, usize::MAX, 1);
    }

    /// The output's extent is computed without wrapping either.
    #[test]
    #[should_panic(expected = "output too small")]
    fn gemm_with_a_wrapping_output_stride_panics() {
        let a = [1.0f32; 4];
        let mut c = [0.0f32; 4];
        gemm(
            Strided::rows(&a, 4, 1, 1),
            Strided::rows(&a, 1, 1, 1),
            0.0,
            &mut c,
            usize::MAX / 3 + 1,
        );
    }

    /// Both compactions against the reference, at every tail length, with values exactly at
    /// the threshold, NaN, infinities and a threshold that keeps everything.
    #[test]
    fn compaction_paths_match_reference() {
        for n in [0usize, 1, 7, 8, 9, 16, 23, 1029] {
            let mut x = crate::rand::uniform(n, n as u64);
            for (j, v) in x.iter_mut().enumerate() {
                match j % 11 {
                    3 => *v = 0.3,
                    5 => *v = -0.3,
                    7 => *v = f32::NAN,
                    9 => *v = f32::NEG_INFINITY,
                    _ => {}
                }
            }
            let tc: Vec<f32> = (0..n).map(|j| 0.1 * (j % 7) as f32).collect();
            for t in [0.3f32, -1.0, 2.0] {
                let (ri, rv) = crate::reference::compact_abs_gt(&x, t);
                let (mut i, mut v) = (vec![0u32; n], vec![0.0f32; n]);
                let k = compact_portable(&x, |_| t, &mut i, &mut v);
                assert_eq!(&i[..k], &ri[..], "portable, n {n} t {t}");
                #[cfg(target_arch = "x86_64")]
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: AVX2 detected; outputs of n values.
                    let k = unsafe { compact_avx2(&x, t, None, &mut i, &mut v) };
                    assert_eq!(&i[..k], &ri[..], "avx2, n {n} t {t}");
                    assert!(v[..k]
                        .iter()
                        .zip(&rv)
                        .all(|(a, b)| a.to_bits() == b.to_bits()));
                }
            }
            let (ri, _) = crate::reference::compact_abs_gt_channel(&x, &tc);
            let (mut i, mut v) = (vec![0u32; n], vec![0.0f32; n]);
            let k = compact_portable(&x, |j| tc[j], &mut i, &mut v);
            assert_eq!(&i[..k], &ri[..], "portable per-channel, n {n}");
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: AVX2 detected; thresholds and outputs of n values.
                let k = unsafe { compact_avx2(&x, 0.0, Some(&tc), &mut i, &mut v) };
                assert_eq!(&i[..k], &ri[..], "avx2 per-channel, n {n}");
            }
        }
    }

    /// Decode attention in pieces, SIMD and portable, against the reference: one block and
    /// many (a last block shorter than the others), head sizes that take the 64-wide, the
    /// 8-wide and the portable weighted sums, and large scores (the merge rescales blocks
    /// whose maxima differ).
    #[test]
    fn attention_decode_pieces_match_reference() {
        let shapes = [
            (9usize, 3usize, 64usize),
            (4, 2, 96),
            (2, 1, 6),
            (8, 2, 128),
        ];
        for (n_head, n_kv, hd) in shapes {
            for n_keys in [1usize, 3, 33, 257, 700] {
                let q: Vec<f32> = crate::rand::uniform(n_head * hd, 41)
                    .iter()
                    .map(|v| 4.0 * v)
                    .collect();
                let k = crate::rand::uniform(n_keys * n_kv * hd, 42);
                let v = crate::rand::uniform(n_keys * n_kv * hd, 43);
                let mut want = vec![0.0; n_head * hd];
                crate::reference::attention(&q, &k, &v, 1, n_keys - 1, n_head, n_kv, hd, &mut want);
                for simd in [false, simd_available()] {
                    let mut got = vec![f32::NAN; n_head * hd];
                    let mut scores = vec![0.0; n_head * n_keys];
                    attention_decode_on(
                        &q,
                        &k,
                        &v,
                        n_keys,
                        n_head,
                        n_kv,
                        hd,
                        &mut scores,
                        &mut got,
                        simd,
                    );
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g - w).abs() <= 1e-5,
                            "attention {n_head}/{n_kv} heads of {hd}, {n_keys} keys, simd {simd}, value {i}: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }

    /// Both attentions refuse query heads that do not fall into whole groups over the
    /// key/value heads (and no key/value heads: a division by zero on a worker thread).
    #[test]
    fn attention_refuses_uneven_head_groups() {
        let (q, kv) = (vec![0.0f32; 3 * 8], vec![0.0f32; 2 * 8]);
        for n_kv in [0, 2] {
            let prefill = std::panic::catch_unwind(|| {
                attention(&q, &kv, &kv, 1, 0, 3, n_kv, 8, &mut [0.0; 3 * 8]);
            });
            let decode = std::panic::catch_unwind(|| {
                let mut scores = vec![0.0; 3];
                attention_decode(&q, &kv, &kv, 1, 3, n_kv, 8, &mut scores, &mut [0.0; 3 * 8]);
            });
            for (what, r) in [("attention", prefill), ("attention_decode", decode)] {
                let e = r.expect_err("uneven groups accepted");
                let msg = e.downcast_ref::<String>().map_or("", |m| m.as_str());
                assert!(
                    msg.contains("query heads in groups"),
                    "{what}, {n_kv} kv heads: {msg}"
                );
            }
        }
    }

    /// RMSNorm against the reference at every tail length and SmolLM2's width, with an outlier
    /// channel: only the summation order differs, so within a few f32 rounding steps.
    #[test]
    fn rmsnorm_matches_reference() {
        for n in [1usize, 7, 8, 9, 31, 576, 1537] {
            let mut x = crate::rand::uniform(n, 61);
            x[n / 2] = 40.0;
            let w: Vec<f32> = crate::rand::uniform(n, 62)
                .iter()
                .map(|v| 1.0 + v)
                .collect();
            let (mut want, mut got) = (vec![0.0; n], vec![0.0; n]);
            crate::reference::rmsnorm(&x, &w, 1e-5, &mut want);
            rmsnorm(&x, &w, 1e-5, &mut got);
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                    "rmsnorm n {n} at {i}: {a} vs {b}"
                );
            }
        }
    }

    /// SiLU*mul, SIMD and portable, against the reference at every tail length, with large
    /// gate values of both signs.
    #[test]
    fn silu_mul_matches_reference() {
        for n in [0usize, 1, 7, 8, 9, 31, 1536] {
            let mut g: Vec<f32> = crate::rand::uniform(n, 51)
                .iter()
                .map(|v| 12.0 * v)
                .collect();
            if n > 2 {
                g[0] = 120.0;
                g[1] = -120.0;
            }
            let up = crate::rand::uniform(n, 52);
            let mut want = vec![0.0; n];
            crate::reference::silu_mul(&g, &up, &mut want);
            for simd in [false, simd_available()] {
                let mut got = g.clone();
                silu_mul_in_place_on(&mut got, &up, simd);
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                        "silu_mul n {n} simd {simd} at {i}: {a} vs {b}"
                    );
                }
            }
        }
    }

    /// The eight-lane exp against f32::exp over the range the softmax uses (x <= 0) and a
    /// little above, within 2 ulp-scale relative error.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn exp_avx2_matches_exp() {
        if !simd_available() {
            return;
        }
        let xs: Vec<f32> = (0..20_000).map(|i| -87.0 + i as f32 * 0.0048).collect();
        let mut got = xs.clone();
        // SAFETY: AVX2/FMA checked above.
        let l = unsafe { exp_shifted_avx2(&mut got, 0.0) };
        let mut sum = 0.0f64;
        for (x, g) in xs.iter().zip(&got) {
            let w = x.exp();
            sum += w as f64;
            assert!((g - w).abs() <= 3e-7 * w, "exp({x}): {g} vs {w}");
        }
        assert!((l as f64 - sum).abs() <= 1e-5 * sum);
        let mut got = [1.0f32; 9];
        got[2] = f32::NAN;
        // SAFETY: AVX2/FMA checked above.
        let l = unsafe { exp_shifted_avx2(&mut got, 0.0) };
        assert!(got[2].is_nan() && l.is_nan(), "exp(NaN): {got:?}, sum {l}");
    }

    /// The portable path against the scalar reference, for every format (the SIMD path is
    /// covered by tests/parity.rs).
    #[test]
    fn portable_gemv_matches_reference() {
        // 3001 columns: a thread's share spans several pieces of the portable tile; 300 x 77:
        // short rows, split over input rows.
        for (n_in, n_out) in [(37, 77), (5, 3001), (300, 77)] {
            portable_gemv_case(n_in, n_out);
        }
    }

    fn portable_gemv_case(n_in: usize, n_out: usize) {
        let wt: Vec<f32> = (0..n_in * n_out)
            .map(|i| ((i * 7919 % 201) as f32 - 100.0) / 100.0)
            .collect();
        let x: Vec<f32> = (0..n_in)
            .map(|i| ((i * 31 % 17) as f32 - 8.0) / 8.0)
            .collect();
        for dtype in Dtype::ALL {
            let p = PackedT::from_input_major(dtype, &wt, n_in, n_out).expect("pack");
            let (mut a, mut b) = (vec![0.0; n_out], vec![0.0; n_out]);
            crate::reference::gemv_packed(&p.mat(), &x, &mut a);
            gemv_many_on(
                &x,
                &mut [Gemv {
                    w: p.mat(),
                    mask: Mask::Dense,
                    y: &mut b,
                }],
                false,
            );
            for (u, v) in a.iter().zip(&b) {
                assert!(
                    (u - v).abs() <= 1e-4 * u.abs().max(1.0),
                    "{dtype:?}: {u} vs {v}"
                );
            }
        }
    }

    /// The AVX2 f32 dots of q8 and q4 (the LM head of AVX2 machines without VNNI, which a
    /// machine with it never takes by itself) and of the float formats against the scalar
    /// reference, on odd sizes (partial last blocks, row counts not a multiple of four, one
    /// row): f32 sums in another order, within 1e-5 of the sum of |terms|.
    #[test]
    fn f32_dots_match_reference() {
        if !simd_available() {
            return;
        }
        for (n_out, n_in) in [(37, 77), (13, 1029), (3, 31), (1, 1), (1000, 577), (65, 64)] {
            let w = crate::rand::uniform(n_out * n_in, 71);
            let x = crate::rand::uniform(n_in, 72);
            for dtype in Dtype::ALL {
                let p = PackedRows::from_rows(dtype, w.clone(), n_out, n_in).expect("pack");
                let m = p.mat();
                let (mut a, mut b) = (vec![0.0; n_out], vec![f32::NAN; n_out]);
                crate::reference::gemv_dot(&m, &x, &mut a);
                gemv_dot_paths(&m, &x, &mut b, true, false);
                let mut row = vec![0.0f32; n_in];
                for o in 0..n_out {
                    m.dequant_row(o, &mut row);
                    let scale: f32 = row.iter().zip(&x).map(|(r, v)| (r * v).abs()).sum();
                    assert!(
                        (a[o] - b[o]).abs() <= 1e-5 * scale.max(1.0),
                        "{dtype:?} {n_out}x{n_in} row {o}: {} vs {}",
                        b[o],
                        a[o]
                    );
                }
            }
        }
    }

    /// The portable dot-product GEMV against the scalar reference, for every format.
    #[test]
    fn portable_gemv_dot_matches_reference() {
        let (n_out, n_in) = (37, 77);
        let w: Vec<f32> = (0..n_in * n_out)
            .map(|i| ((i * 7919 % 201) as f32 - 100.0) / 100.0)
            .collect();
        let x: Vec<f32> = (0..n_in)
            .map(|i| ((i * 31 % 17) as f32 - 8.0) / 8.0)
            .collect();
        for dtype in Dtype::ALL {
            let p = PackedRows::from_rows(dtype, w.clone(), n_out, n_in).expect("pack");
            let (mut a, mut b) = (vec![0.0; n_out], vec![0.0; n_out]);
            crate::reference::gemv_dot(&p.mat(), &x, &mut a);
            gemv_dot_on(&p.mat(), &x, &mut b, false);
            for (u, v) in a.iter().zip(&b) {
                assert!(
                    (u - v).abs() <= 1e-4 * u.abs().max(1.0),
                    "{dtype:?}: {u} vs {v}"
                );
            }
        }
    }
}
