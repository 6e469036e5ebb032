//! The decode kernels' fork-join pool: persistent workers that spin between parallel sections.
//!
//! A decoded token runs 100-250 short parallel sections (GEMVs of 10-200 µs, the attention),
//! separated by serial work on the calling thread (norms, RoPE, compaction) of a few to tens of
//! µs. rayon's idle workers go to sleep on a futex after a few rounds of `yield` (about 10 µs
//! here), and on the 2-core virtual machines this project runs on, waking one took 20-65 µs
//! (`examples/wake_probe.rs`): about as long as a sparse GEMV itself, so the second core mostly
//! joined each section late. These workers instead spin for [`SPIN`] after their last item
//! before parking, so during decoding a section starts on every core within a microsecond
//! (with more threads than cores they yield their time slice instead of spinning). rayon still
//! runs everything else (prefill, calibration statistics).
//!
//! One section runs at a time. A call made while another is running (from a second thread, or
//! from inside an item) runs its items inline on the caller: correct, only serial.

use std::cell::UnsafeCell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Condvar, Mutex, OnceLock, TryLockError};
use std::time::{Duration, Instant};

/// How long an idle worker spins before it parks: far longer than the serial gaps within a
/// decoded token, short enough that the cores are free soon after decoding stops.
pub const SPIN: Duration = Duration::from_millis(2);

/// The calling thread plus the workers: the size of rayon's pool at first use (the CLI sizes that
/// pool from `-t` before any kernel runs).
pub fn threads() -> usize {
    pool().workers + 1
}

/// Runs `f(0)`, ..., `f(n - 1)` across the calling thread and the workers, each index exactly
/// once (claimed in increasing order, so early items start first), and returns when all have
/// finished. A panic in an item reaches the caller once every item is done: the caller's own
/// is resumed, a worker's becomes a panic that says so.
pub fn for_each<F: Fn(usize) + Sync>(n: usize, f: F) {
    pool().run(n, &f)
}

/// [`for_each`] over the pieces of `data` of `per` values each (the last may be shorter), as
/// rayon's `par_chunks_mut`: `f(c, piece)` for piece c = `data[c * per ..]`, each piece to
/// exactly one call.
pub fn for_each_chunk_mut<T: Send, F: Fn(usize, &mut [T]) + Sync>(
    data: &mut [T],
    per: usize,
    f: F,
) {
    assert!(per > 0, "for_each_chunk_mut: pieces of no values");
    let (len, p) = (data.len(), Ptr(data.as_mut_ptr()));
    for_each(len.div_ceil(per), |c| {
        let o0 = c * per;
        // SAFETY: piece c is data[o0 .. o0 + min(per, len - o0)], inside `data` (borrowed
        // mutably for this call) and disjoint from every other piece.
        let piece = unsafe { std::slice::from_raw_parts_mut(p.get().add(o0), per.min(len - o0)) };
        f(c, piece)
    })
}

/// A pointer to the values of a slice that [`for_each_chunk_mut`] hands out in disjoint pieces.
struct Ptr<T>(*mut T);
// SAFETY: the pieces reached through it are disjoint, and the values `Send`.
unsafe impl<T: Send> Sync for Ptr<T> {}

impl<T> Ptr<T> {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper, not its field).
    fn get(&self) -> *mut T {
        self.0
    }
}

/// `state`: the section's epoch in the high 32 bits, whether it is closed to workers joining, and
/// how many workers are inside it.
const CLOSED: u64 = 1 << 31;
const ACTIVE: u64 = CLOSED - 1;

struct Job {
    /// The caller's closure, its lifetime erased: valid while the section is open or any worker
    /// is active in it, which `Section::drop` waits out.
    f: *const (dyn Fn(usize) + Sync),
    n: usize,
}

struct Pool {
    workers: usize,
    /// More threads than cores (`-t` above the core count): a spinning worker would take the
    /// core of a thread with work, so idle workers yield their time slice while they wait.
    oversubscribed: bool,
    /// Held by the thread running a section.
    submit: Mutex<()>,
    state: AtomicU64,
    /// Written only by the submitter while no worker can join (before the epoch is published).
    job: UnsafeCell<Job>,
    next: AtomicUsize,
    panicked: AtomicBool,
    sleepers: AtomicUsize,
    sleep: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written only by the thread holding `submit`, before it publishes a new epoch
// with release ordering, and read only by workers that joined that epoch (acquire); the closure
// it points to is `Sync`.
unsafe impl Sync for Pool {}
unsafe impl Send for Pool {}

fn pool() -> &'static Pool {
    static POOL: OnceLock<&'static Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let workers = rayon::current_num_threads().max(1) - 1;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let noop: &'static (dyn Fn(usize) + Sync) = &|_| {};
        let pool: &'static Pool = Box::leak(Box::new(Pool {
            workers,
            oversubscribed: workers + 1 > cores,
            submit: Mutex::new(()),
            state: AtomicU64::new(CLOSED),
            job: UnsafeCell::new(Job { f: noop, n: 0 }),
            next: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
        }));
        for i in 0..workers {
            std::thread::Builder::new()
                .name(format!("teal-kernel-{i}"))
                .spawn(move || pool.work())
                .expect("starting a kernel worker thread");
        }
        pool
    })
}

impl Pool {
    fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        if self.workers == 0 || n <= 1 {
            return (0..n).for_each(f);
        }
        // A section that panicked (the caller's item, or the assert on a worker's) unwound
        // with the guard held and poisoned `submit`; it guards no data, and `Section::drop`
        // left the pool closed and idle, so a poisoned lock is as good as a free one.
        let _guard = match self.submit.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => return (0..n).for_each(f),
        };
        // SAFETY: only the lifetime is erased; `Section` keeps the closure alive (this frame)
        // until no worker can reach it.
        let f_static: *const (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(f) };
        // SAFETY: the previous section is closed with no active worker (its `Section::drop`
        // waited), and no worker joins before the store of the new epoch below.
        unsafe { *self.job.get() = Job { f: f_static, n } };
        self.next.store(0, Relaxed);
        self.panicked.store(false, Relaxed);
        let epoch = (self.state.load(Relaxed) >> 32).wrapping_add(1);
        self.state.store(epoch << 32, SeqCst);
        if self.sleepers.load(SeqCst) > 0 {
            let _lock = self.sleep.lock().unwrap_or_else(|e| e.into_inner());
            self.wake.notify_all();
        }
        let section = Section(self);
        let result = catch_unwind(AssertUnwindSafe(|| self.items(f, n)));
        drop(section);
        if let Err(p) = result {
            resume_unwind(p);
        }
        assert!(
            !self.panicked.load(Acquire),
            "a kernel work item panicked on a pool worker"
        );
    }

    /// Claims and runs items until none are left.
    fn items(&self, f: &(dyn Fn(usize) + Sync), n: usize) {
        loop {
            let i = self.next.fetch_add(1, Relaxed);
            if i >= n {
                return;
            }
            f(i);
        }
    }

    fn work(&self) {
        let mut seen = self.state.load(Acquire) >> 32;
        loop {
            let s = self.wait_for_epoch(seen);
            seen = s >> 32;
            if self.join(seen) {
                // SAFETY: joined an open section: the job was written before its epoch was
                // published and stays valid until this worker leaves (fetch_sub below).
                let job = unsafe { &*self.job.get() };
                let f = unsafe { &*job.f };
                if catch_unwind(AssertUnwindSafe(|| self.items(f, job.n))).is_err() {
                    self.panicked.store(true, Release);
                }
                self.state.fetch_sub(1, Release);
            }
        }
    }

    /// Spins until the epoch differs from `seen`, parking after [`SPIN`]; returns the state.
    fn wait_for_epoch(&self, seen: u64) -> u64 {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let s = self.state.load(Acquire);
            if s >> 32 != seen {
                return s;
            }
            if self.oversubscribed {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(256) && start.elapsed() > SPIN {
                let mut lock = self.sleep.lock().unwrap_or_else(|e| e.into_inner());
                self.sleepers.fetch_add(1, SeqCst);
                while self.state.load(SeqCst) >> 32 == seen {
                    lock = self.wake.wait(lock).unwrap_or_else(|e| e.into_inner());
                }
                self.sleepers.fetch_sub(1, SeqCst);
            }
        }
    }

    /// Enters the section of `epoch` unless it is closed or already replaced.
    fn join(&self, epoch: u64) -> bool {
        let mut s = self.state.load(Acquire);
        loop {
            if s >> 32 != epoch || s & CLOSED != 0 {
                return false;
            }
            match self.state.compare_exchange_weak(s, s + 1, AcqRel, Acquire) {
                Ok(_) => return true,
                Err(now) => s = now,
            }
        }
    }
}

/// Closes the running section on drop (also when the caller's own items panic) and waits until
/// no worker is inside it, so the caller's closure outlives every use.
struct Section<'a>(&'a Pool);

impl Drop for Section<'_> {
    fn drop(&mut self) {
        self.0.state.fetch_or(CLOSED, AcqRel);
        while self.0.state.load(Acquire) & ACTIVE != 0 {
            std::hint::spin_loop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(n: usize) -> Vec<AtomicUsize> {
        (0..n).map(|_| AtomicUsize::new(0)).collect()
    }

    #[test]
    fn every_item_runs_once() {
        for n in [0, 1, 2, 3, 7, 64, 1000] {
            for _ in 0..50 {
                let c = counts(n);
                for_each(n, |i| {
                    c[i].fetch_add(1, Relaxed);
                });
                assert!(c.iter().all(|x| x.load(Relaxed) == 1), "n = {n}");
            }
        }
    }

    #[test]
    fn nested_and_concurrent_calls_run_inline() {
        let c = counts(16 * 8);
        std::thread::scope(|s| {
            for t in 0..4 {
                let c = &c;
                s.spawn(move || {
                    for_each(4, |i| {
                        for_each(8, |j| {
                            c[(t * 4 + i) * 8 + j].fetch_add(1, Relaxed);
                        })
                    })
                });
            }
        });
        assert!(c.iter().all(|x| x.load(Relaxed) == 1));
    }

    #[test]
    fn chunks_cover_the_slice_once() {
        for (len, per) in [(0usize, 3usize), (1, 3), (10, 3), (12, 4), (1000, 7)] {
            let mut v = vec![0usize; len];
            for_each_chunk_mut(&mut v, per, |c, piece| {
                assert!(piece.len() == per || (c + 1) * per >= len);
                for (i, x) in piece.iter_mut().enumerate() {
                    *x += c * per + i + 1;
                }
            });
            assert!(
                v.iter().enumerate().all(|(i, &x)| x == i + 1),
                "len {len} per {per}"
            );
        }
    }

    #[test]
    fn parked_workers_wake() {
        let c = counts(8);
        std::thread::sleep(SPIN * 3);
        for_each(8, |i| {
            c[i].fetch_add(1, Relaxed);
        });
        assert!(c.iter().all(|x| x.load(Relaxed) == 1));
    }

    /// How many threads ran the items of one section of 64 items of 2 ms each.
    fn threads_used() -> usize {
        let ids = Mutex::new(std::collections::HashSet::new());
        for_each(64, |_| {
            std::thread::sleep(Duration::from_millis(2));
            ids.lock().unwrap().insert(std::thread::current().id());
        });
        let n = ids.lock().unwrap().len();
        n
    }

    /// A panicking section leaves the pool usable: later sections still run on the workers
    /// (the unwinding poisoned `submit`, which once sent every later section inline). Sections
    /// of other tests running at the same time run inline, so a few tries are allowed.
    #[test]
    fn sections_after_a_panic_use_the_workers() {
        if pool().workers == 0 {
            return;
        }
        for _ in 0..3 {
            let r = catch_unwind(|| for_each(64, |i| assert!(i != 37, "item 37")));
            assert!(r.is_err());
        }
        assert!(
            (0..20).any(|_| threads_used() > 1),
            "no section after a panic ran on a worker"
        );
    }

    #[test]
    fn a_panicking_item_reaches_the_caller() {
        let r = catch_unwind(|| for_each(64, |i| assert!(i != 37, "item 37")));
        assert!(r.is_err());
        let c = counts(64);
        for_each(64, |i| {
            c[i].fetch_add(1, Relaxed);
        });
        assert!(c.iter().all(|x| x.load(Relaxed) == 1));
    }
}
