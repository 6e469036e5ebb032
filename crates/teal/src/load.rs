//! Opening a model: a `.gguf` file or a Hugging Face directory (`config.json`,
//! `model.safetensors` or a sharded index, `tokenizer.json`).

use crate::config::Config;
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::loader::{GgufSource, SafetensorsSource, TensorDesc, TensorSource};
use crate::models::llama::Llama;
use crate::sparsity::thresholds::{weights_hash, Fingerprint};
use crate::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};
use teal_kernels::packed::Dtype;

/// A model's files, opened and checked, weights not yet loaded. Nothing here keeps the files
/// mapped: the weights are mapped only while [`ModelFiles::load_model_as`] converts them, so
/// once loaded, the model's own (repacked) weights are all that stays resident.
pub struct ModelFiles {
    pub config: Config,
    pub tokenizer: Tokenizer,
    /// "gguf" or "safetensors".
    pub format: &'static str,
    /// The `.gguf` file or the Hugging Face directory.
    pub path: PathBuf,
    /// Every tensor: Hugging Face name, shape, storage type.
    pub tensors: Vec<TensorDesc>,
}

impl ModelFiles {
    pub fn open(path: &Path) -> Result<ModelFiles> {
        if !path.exists() {
            return Err(Error::Io {
                path: path.into(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such file or directory",
                ),
            });
        }
        let a_file_of_a_model = path
            .extension()
            .is_some_and(|e| e == "safetensors" || e == "json");
        if a_file_of_a_model && !path.is_dir() {
            return Err(Error::Model {
                path: path.into(),
                msg: "a Hugging Face model is opened by its directory (config.json, \
                      tokenizer.json and the .safetensors weights), not one of its files"
                    .into(),
            });
        }
        if path.is_dir() {
            let config = Config::from_hf_json(&path.join("config.json"))?;
            let tokenizer = Tokenizer::from_file(&path.join("tokenizer.json"))?;
            let tensors = SafetensorsSource::open(path)?.describe();
            ModelFiles {
                config,
                tokenizer,
                format: "safetensors",
                path: path.into(),
                tensors,
            }
            .checked()
        } else {
            let file = GgufFile::open(path)?;
            let config = Config::from_gguf(&file)?;
            let tokenizer = Tokenizer::from_gguf(&file)?;
            let tensors = GgufSource::new(file, config.clone()).describe();
            ModelFiles {
                config,
                tokenizer,
                format: "gguf",
                path: path.into(),
                tensors,
            }
            .checked()
        }
    }

    /// The layer count of the metadata against the tensors, as llama.cpp checks it: a file with
    /// tensors of layers beyond the count is an error (fewer are a missing tensor at load).
    /// (Special token ids outside the vocabulary are ignored when the tokenizer is read, as
    /// llama.cpp ignores them.)
    fn checked(self) -> Result<ModelFiles> {
        let layers = self.config.num_hidden_layers;
        let beyond = self
            .tensors
            .iter()
            .filter_map(|(name, ..)| crate::loader::layer_of(name).map(|(l, _)| l))
            .filter(|&l| l >= layers)
            .max();
        if let Some(l) = beyond {
            return Err(Error::Model {
                path: self.path,
                msg: format!(
                    "tensors of layer {l}, but the metadata gives {layers} layers: wrong number \
                     of tensors"
                ),
            });
        }
        // Every tensor must be one the forward pass reads, as llama.cpp counts them: a bias,
        // an expert or another architecture's tensor ignored would give wrong answers.
        if let Some((name, ..)) = self
            .tensors
            .iter()
            .find(|(name, ..)| !used_tensor(&self.config, name))
        {
            return Err(Error::Model {
                path: self.path,
                msg: format!(
                    "tensor '{name}' is not one the {} architecture reads (teal implements no \
                     such bias, expert or layer): wrong number of tensors",
                    self.config.arch.name()
                ),
            });
        }
        // The tokenizer's ids must have rows in the embedding (more rows than ids is usual:
        // padding to a multiple).
        let (ids, rows) = (self.tokenizer.vocab_size(), self.config.vocab_size);
        if ids > rows {
            return Err(Error::Model {
                path: self.path,
                msg: format!(
                    "the tokenizer has {ids} token ids, the model's vocab_size is {rows}: ids \
                     beyond it have no embedding"
                ),
            });
        }
        Ok(self)
    }

    /// The fingerprint a thresholds file for this model carries: its configuration, tensor
    /// list and a sample of its weights' values.
    pub fn fingerprint(&self) -> Result<Fingerprint> {
        let mut fp = Fingerprint::of(&self.config, &self.tensors);
        fp.weights_hash = Some(weights_hash(&self.config, self.source()?.as_ref())?);
        Ok(fp)
    }

    /// The weights, mapped (until the returned source is dropped).
    pub fn source(&self) -> Result<Box<dyn TensorSource + Send + Sync>> {
        Ok(if self.path.is_dir() {
            Box::new(SafetensorsSource::open(&self.path)?)
        } else {
            Box::new(GgufSource::new(
                GgufFile::open(&self.path)?,
                self.config.clone(),
            ))
        })
    }

    /// Loads every weight (dequantized to f32, repacked).
    pub fn load_model(&self) -> Result<Llama> {
        self.load_model_as(Dtype::F32)
    }

    /// Loads every weight in `dtype` (see [`Llama::load_as`]); the files are unmapped when it
    /// returns, and the heap pages that held the f32 copies of the converted tensors are given
    /// back to the system.
    pub fn load_model_as(&self, dtype: Dtype) -> Result<Llama> {
        large_allocations_as_mappings();
        let model = Llama::load_as(self.config.clone(), self.source()?.as_ref(), dtype);
        release_free_heap();
        model
    }
}

/// Whether the Hugging Face tensor `name` is one [`crate::models::llama::Llama`] reads (or, as
/// `rope_freqs.weight` and the rotary tables old checkpoints carry, one the configuration reads
/// or that only caches what the configuration gives).
fn used_tensor(c: &Config, name: &str) -> bool {
    const FIXED: [&str; 4] = [
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
        "rope_freqs.weight",
    ];
    const LAYER: [&str; 10] = [
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.o_proj.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
        "self_attn.rotary_emb.inv_freq",
    ];
    const BIAS: [&str; 3] = [
        "self_attn.q_proj.bias",
        "self_attn.k_proj.bias",
        "self_attn.v_proj.bias",
    ];
    FIXED.contains(&name)
        || crate::loader::layer_of(name).is_some_and(|(_, rest)| {
            LAYER.contains(&rest) || (c.attention_bias && BIAS.contains(&rest))
        })
}

/// [`large_allocations_as_mappings`]'s threshold.
const MMAP_THRESHOLD: i32 = 128 << 10;

/// Makes glibc give every allocation of 128 KiB or more its own mapping, returned to the system
/// when freed, for the rest of the process (prefill buffers are then mapped per call: a
/// 4-window `teal ppl` took the same time within the machine's noise). By default the threshold grows with the largest block freed (up to 32 MiB), so
/// the packed weights and the transient f32 copies of the tensors being converted, made by
/// several threads at once, end up interleaved in per-thread heaps that stay resident (about
/// 100 MB, 15% of the weights, for Qwen2.5-0.5B in q8).
fn large_allocations_as_mappings() {
    set_mmap_threshold(MMAP_THRESHOLD);
}

/// Gives allocations of `bytes` or more their own mappings (glibc's `M_MMAP_THRESHOLD`).
fn set_mmap_threshold(bytes: i32) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's policy for later allocations.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, bytes);
    }
    let _ = bytes;
}

/// Makes every thread allocate from glibc's main heap (one arena). Call it before starting
/// threads (it applies to threads that have not allocated yet). Threads otherwise get heaps of
/// their own, whose free top `malloc_trim` never returns to the system: with prefill's
/// buffers from the heap (`reusing_heap`) about 1.5 MB more stayed resident while decoding
/// SmolLM2-135M in q8 or q4 (1-1.5 % of its weights) than with the main heap alone.
pub fn single_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's policy for later allocations.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Nesting depth of [`reusing_heap`].
static HEAP_REUSE_DEPTH: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Runs `f` with allocations of up to 32 MiB served from the heap, where freed blocks are
/// reused, then restores [`large_allocations_as_mappings`]'s policy (once the outermost call
/// ends), returns the free pages ([`release_free_heap`]) and drops the resident pages of the
/// program's code ([`release_executable_pages`]: decoding maps back what it runs). For batch
/// work (prefill, calibration): its per-call buffers (GEMM packing, dequantized weight blocks,
/// activations) are otherwise each mapped and faulted in afresh, and unmapped with a TLB flush
/// of every thread. On SmolLM2-135M this makes prefill 25-45 % faster and the greedy search's
/// system time 42 s -> 6 s; decoding keeps the mapped policy, whose freed blocks do not stay
/// resident.
pub(crate) fn reusing_heap<R>(f: impl FnOnce() -> R) -> R {
    use std::sync::atomic::Ordering;
    if HEAP_REUSE_DEPTH.fetch_add(1, Ordering::SeqCst) == 0 {
        set_mmap_threshold(32 << 20);
    }
    let out = f();
    if HEAP_REUSE_DEPTH.fetch_sub(1, Ordering::SeqCst) == 1 {
        set_mmap_threshold(MMAP_THRESHOLD);
        release_free_heap();
        release_executable_pages();
    }
    out
}

/// Returns the allocator's free pages to the system. glibc keeps freed blocks below its mmap
/// threshold (which grows to the size of the largest freed mapping, a few MB here) in the heap,
/// so the transient f32 copies made while converting, interleaved with the packed weights that
/// stay, would otherwise remain resident (~15 MB for SmolLM2-135M). The CPU decoder calls it
/// after each prefill too (see `device::CpuDecoder`).
pub(crate) fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only hands free memory back to the kernel; no live allocation is touched.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Drops this process's resident pages of its binary and shared libraries (their read-only
/// private mappings of files whose pages were never written, so hold nothing but the file's
/// bytes): the code and tables that opened and converted the model are not used again, and
/// what decoding uses comes back at its first use, a minor fault from the page cache (the pages
/// stay there, as the model file's do after [`ModelFiles::load_model_as`] unmaps it). Only
/// mappings of ordinary 4 KiB pages qualify: not hugetlbfs, I/O or device mappings.
///
/// # Safety
///
/// No other thread may map, unmap or remap memory while it runs (no `dlopen`, no large
/// allocation or free): it reads the mappings first and advises them after, and a range
/// remapped in between (a library's segments mapped over its first mapping, a freed mapping's
/// addresses reused by the heap) would lose its contents. Call it where the process is
/// quiescent, e.g. a CPU run's main thread after loading, its thread pool idle.
pub unsafe fn release_code_pages() {
    #[cfg(target_os = "linux")]
    {
        let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
            return;
        };
        let mut lines = smaps.lines().peekable();
        while let Some(header) = lines.next() {
            let mut fields = header.split_whitespace();
            let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
                continue;
            };
            let file_backed = fields.nth(3).is_some_and(|path| path.starts_with('/'));
            // The mapping's attribute lines ("Key: value"), up to the next mapping's header.
            let (mut written, mut small_pages, mut plain) = (true, false, false);
            while let Some(line) = lines.peek() {
                let Some((key, value)) = line.split_once(':') else {
                    break;
                };
                if key.contains(' ') || key.contains('-') {
                    break;
                }
                let value = value.trim();
                match key {
                    "Anonymous" => written = value != "0 kB",
                    "KernelPageSize" => small_pages = value == "4 kB",
                    // Not hugetlbfs (ht), I/O (io), raw page frames (pf) or a driver's
                    // mapping that must not be dumped (dd).
                    "VmFlags" => {
                        plain = !value
                            .split_whitespace()
                            .any(|f| matches!(f, "ht" | "io" | "pf" | "dd"))
                    }
                    _ => {}
                }
                lines.next();
            }
            let read_only_private = matches!(perms, "r--p" | "r-xp");
            if !(file_backed && read_only_private && small_pages && plain) || written {
                continue;
            }
            let Some((start, end)) = address_range(range) else {
                continue;
            };
            // SAFETY: a private, read-only mapping of a file in ordinary pages, none of them
            // copied on write, holds no page that differs from its file; MADV_DONTNEED only
            // unmaps them, and the next access maps them again from the file. The caller
            // guarantees the range still holds that mapping. A failure leaves them resident.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
            }
        }
    }
}

/// This program's own read-only mappings of its executable file (code, read-only data and
/// the relocated RELRO), found once from `/proc/self/maps`. The executable stays mapped for the
/// life of the process, so these ranges hold it until the process ends.
#[cfg(target_os = "linux")]
static EXECUTABLE_READ_ONLY: std::sync::OnceLock<Vec<(usize, usize)>> = std::sync::OnceLock::new();

/// The address ranges of `maps` (the text of `/proc/self/maps`) that map the file `exe`
/// read-only and private.
#[cfg(target_os = "linux")]
fn read_only_ranges_of(maps: &str, exe: &str) -> Vec<(usize, usize)> {
    maps.lines()
        .filter_map(|line| {
            // "start-end perms offset dev inode path", the path last (it may hold spaces).
            let mut fields = line.splitn(6, ' ');
            let range = fields.next()?;
            let perms = fields.next()?;
            let path = fields.nth(3)?.trim_start();
            if path != exe || !matches!(perms, "r--p" | "r-xp") {
                return None;
            }
            address_range(range)
        })
        .collect()
}

/// A mapping's `start-end` (hexadecimal) of `/proc/self/maps` or `smaps`.
#[cfg(target_os = "linux")]
fn address_range(range: &str) -> Option<(usize, usize)> {
    let (start, end) = range.split_once('-')?;
    Some((
        usize::from_str_radix(start, 16).ok()?,
        usize::from_str_radix(end, 16).ok()?,
    ))
}

/// Drops the resident pages of this program's executable file that hold nothing but the file's
/// bytes (its code and read-only data), as [`release_code_pages`] does after loading, but safe
/// at any time from any thread: the ranges are the executable's own, which are never unmapped,
/// and within them a page is kept where it was written (the relocated RELRO; a debugger's
/// breakpoint or a uprobe, written into a private copy of the page), as `/proc/self/pagemap`
/// tells (present and not a file page). [`reusing_heap`] calls it when batch work (prefill)
/// ends, so that while decoding the program's resident code is what decoding runs: tokenizing
/// and prefill's code, and loading's, come back only when they run again (minor faults from
/// the page cache). Nothing happens where `/proc` cannot be read.
pub(crate) fn release_executable_pages() {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::FileExt;
        const PAGE: usize = 4096;
        let ranges = EXECUTABLE_READ_ONLY.get_or_init(|| {
            let exe = std::fs::read_link("/proc/self/exe");
            match (exe, std::fs::read_to_string("/proc/self/maps")) {
                (Ok(exe), Ok(maps)) => exe
                    .to_str()
                    .map(|exe| read_only_ranges_of(&maps, exe))
                    .unwrap_or_default(),
                _ => Vec::new(),
            }
        });
        let Ok(pagemap) = std::fs::File::open("/proc/self/pagemap") else {
            return;
        };
        // pagemap: one little-endian u64 per page; bit 63 present, bit 62 swapped out (only
        // anonymous memory is), bit 61 a file page (or shared anonymous memory).
        let written =
            |entry: u64| (entry >> 62) & 1 == 1 || (entry >> 63 == 1 && (entry >> 61) & 1 == 0);
        let mut entries = Vec::new();
        for &(start, end) in ranges {
            entries.resize((end - start) / PAGE * 8, 0u8);
            if pagemap
                .read_exact_at(&mut entries, (start / PAGE * 8) as u64)
                .is_err()
            {
                continue;
            }
            let kept = entries.chunks_exact(8).map(|e| {
                let entry = u64::from_le_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
                written(entry)
            });
            // Runs of pages to drop, each ended by a kept page or the range's end.
            let mut first = None;
            for (i, keep) in kept.chain([true]).enumerate() {
                match (keep, first) {
                    (false, None) => first = Some(i),
                    (true, Some(f)) => {
                        // SAFETY: pages of the executable's read-only private mapping (mapped
                        // for the life of the process) that hold the file's bytes and no
                        // written copy: MADV_DONTNEED only unmaps them, and the next access
                        // maps them again from the file.
                        unsafe {
                            libc::madvise(
                                (start + f * PAGE) as *mut libc::c_void,
                                (i - f) * PAGE,
                                libc::MADV_DONTNEED,
                            );
                        }
                        first = None;
                    }
                    _ => {}
                }
            }
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The `RssFile:` line of `/proc/self/status`, in kB.
    fn file_resident_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        crate::bench::proc_kib_field(&status, "RssFile:").unwrap() / 1024
    }

    /// Whether this process is the one to run test `name` (of this module): the test runs
    /// itself again alone (one thread, no other test) in a child process, where this is true;
    /// here it checks that the child passed and is false.
    fn alone(name: &str) -> bool {
        const ALONE: &str = "TEAL_TEST_ALONE";
        if std::env::var_os(ALONE).is_some() {
            return true;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                &format!("load::tests::{name}"),
                "--exact",
                "--test-threads=1",
                "--nocapture",
            ])
            .env(ALONE, "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && text.contains("1 passed"), "{text}");
        false
    }

    /// Code pages go and come back; a private file mapping that was written and then made
    /// read-only (as the loader's relocated RELRO) keeps what was written. The release needs
    /// a process whose other threads do not map memory meanwhile, so the test runs itself again
    /// alone in a child process and does the work there.
    #[test]
    fn code_pages_released_and_written_pages_kept() {
        if !alone("code_pages_released_and_written_pages_kept") {
            return;
        }
        use std::io::Write;
        let page = 4096;
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&vec![7u8; 2 * page]).unwrap();
        // SAFETY: a fresh private mapping of our own temporary file, unmapped at the end; no
        // other thread of this test maps or unmaps memory while the release runs.
        unsafe {
            use std::os::fd::AsRawFd;
            let p = libc::mmap(
                std::ptr::null_mut(),
                2 * page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                f.as_raw_fd(),
                0,
            ) as *mut u8;
            assert_ne!(p as *mut libc::c_void, libc::MAP_FAILED);
            *p = 42;
            assert_eq!(
                libc::mprotect(p as *mut libc::c_void, 2 * page, libc::PROT_READ),
                0
            );
            let before = file_resident_kib();
            release_code_pages();
            let after = file_resident_kib();
            assert_eq!(*p, 42, "a written page of a private mapping was dropped");
            assert_eq!(*p.add(page), 7);
            libc::munmap(p as *mut libc::c_void, 2 * page);
            assert!(
                after < before,
                "file-backed resident {before} kB -> {after} kB"
            );
        }
        // The code dropped runs again from the page cache.
        let sum: u64 = (1..=1000u64).map(|x| x * x).sum();
        assert_eq!(sum, 333_833_500);
        assert_eq!(format!("{:?}", vec![1.5f32, 2.5]), "[1.5, 2.5]");
    }

    /// The executable's code and read-only data leave the resident set and come back when they
    /// run; a page written into a private copy (as a debugger writes a breakpoint, here
    /// through `/proc/self/mem`) keeps what was written. Run alone in a child process, as the
    /// test above, so that other tests' threads do not fault pages back in meanwhile.
    #[test]
    fn executable_pages_released_and_written_copies_kept() {
        if !alone("executable_pages_released_and_written_copies_kept") {
            return;
        }
        use std::os::unix::fs::FileExt;
        const PAGE: usize = 4096;
        static PROBE: [u8; 3 * PAGE] = [7; 3 * PAGE];
        // A whole page of PROBE, in the executable's read-only data.
        let at = PROBE.as_ptr() as usize;
        let page = at.div_ceil(PAGE) * PAGE;
        let probe = page as *const u8;
        assert!(page + PAGE <= at + PROBE.len());
        let mem = std::fs::OpenOptions::new()
            .write(true)
            .open("/proc/self/mem")
            .unwrap();
        mem.write_all_at(&[42], page as u64).unwrap();
        // SAFETY: `probe` points into PROBE, a static of this program.
        let read = || unsafe { std::ptr::read_volatile(probe) };
        assert_eq!(read(), 42);
        let before = file_resident_kib();
        release_executable_pages();
        let after = file_resident_kib();
        assert_eq!(read(), 42, "a written copy of a page was dropped");
        assert!(
            after + 256 < before,
            "file-backed resident {before} kB -> {after} kB"
        );
        // The code dropped runs again from the page cache.
        let sum: u64 = (1..=1000u64).map(|x| x * x).sum();
        assert_eq!(sum, 333_833_500);
        assert_eq!(format!("{:?}", vec![1.5f32, 2.5]), "[1.5, 2.5]");
    }
}
