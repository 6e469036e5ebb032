//! The kernels' compilation. NVRTC compiles [`KERNELS_CU`] for the GPU's own architecture to
//! machine code (CUBIN, so the driver has no PTX left to translate), as [`PARTS`] programs in
//! parallel threads: part 0 holds every kernel but the GEMVs, each other part the two GEMVs of
//! one batch size, weight type and threshold kind ([`gemv_part`]; kernels.cu's `TEAL_PART`).
//! The images are kept for the process and on disk under `<cache>/cuda/`, named by a hash of
//! the source, the options and NVRTC's version, so only the first process on a machine (or
//! after the source changes) waits for the compiler.

use std::ffi::{c_char, CStr, CString};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use cudarc::nvrtc::{result, sys};

use super::{CudaError, Result, KERNELS_CU, MAX_BATCH};

/// Programs the source is compiled as: part 0, then one per GEMV batch size, weight type and
/// threshold kind.
pub const PARTS: usize = 1 + MAX_BATCH * 4;

/// The part holding the GEMVs of batch size `batch` (1..=[`MAX_BATCH`]) for f16 or bf16
/// weights with scalar or per-channel (`pc`) thresholds.
pub fn gemv_part(batch: usize, bf16: bool, pc: bool) -> usize {
    1 + ((batch - 1) * 2 + usize::from(bf16)) * 2 + usize::from(pc)
}

/// One CUBIN per part, in part order.
pub type Images = Arc<Vec<Vec<u8>>>;

/// Compile every part for `arch` (e.g. `sm_90`), in parallel threads, without the disk cache.
/// Needs libnvrtc, not a GPU.
pub fn compile_kernels(arch: &str) -> Result<Images> {
    nvrtc_present()?;
    let parts: Vec<Result<Vec<u8>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..PARTS)
            .map(|part| s.spawn(move || compile_part(arch, part)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(CudaError::Compile("NVRTC thread panicked".into())))
            })
            .collect()
    });
    Ok(Arc::new(parts.into_iter().collect::<Result<_>>()?))
}

/// The images for `arch`: this process's, else those cached in `cache` (if given), else
/// compiled (and stored there). [`KernelCache::recompile`] replaces one that fails to load.
pub(crate) struct KernelCache {
    arch: &'static str,
    dir: Option<PathBuf>,
}

/// This process's images, by architecture.
static LOADED: Mutex<Vec<(&'static str, Images)>> = Mutex::new(Vec::new());

impl KernelCache {
    pub(crate) fn new(arch: &'static str, dir: Option<PathBuf>) -> Self {
        KernelCache { arch, dir }
    }

    pub(crate) fn images(&self) -> Result<Images> {
        let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, images)) = loaded.iter().find(|(a, _)| *a == self.arch) {
            return Ok(images.clone());
        }
        nvrtc_present()?;
        let key = source_key(self.arch)?;
        let images = match self.read(key) {
            Some(images) => images,
            None => {
                let images = compile_kernels(self.arch)?;
                for (part, image) in images.iter().enumerate() {
                    self.store(part, key, image);
                }
                images
            }
        };
        loaded.push((self.arch, images.clone()));
        Ok(images)
    }

    /// Every part's image stored for `key`, or `None` if any is missing or empty.
    fn read(&self, key: u64) -> Option<Images> {
        let parts = (0..PARTS)
            .map(|part| {
                self.path(part, key)
                    .and_then(|p| std::fs::read(p).ok())
                    .filter(|b| !b.is_empty())
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Arc::new(parts))
    }

    /// Compile `part` again (its cached image did not load) and store it in place of the old.
    pub(crate) fn recompile(&self, part: usize) -> Result<Vec<u8>> {
        let image = compile_part(self.arch, part)?;
        self.store(part, source_key(self.arch)?, &image);
        let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
        loaded.retain(|(a, _)| *a != self.arch);
        Ok(image)
    }

    fn path(&self, part: usize, key: u64) -> Option<PathBuf> {
        self.dir
            .as_ref()
            .map(|d| d.join(format!("kernels-{}-p{part}-{key:016x}.cubin", self.arch)))
    }

    /// Write `image` atomically (a temporary file renamed into place), then remove this part's
    /// images of other sources. A cache that cannot be written is no error: the next process
    /// compiles again.
    fn store(&self, part: usize, key: u64, image: &[u8]) {
        let (Some(dir), Some(path)) = (&self.dir, self.path(part, key)) else {
            return;
        };
        let tmp = dir.join(format!(".kernels-{}-{part}.tmp", std::process::id()));
        let stored = std::fs::create_dir_all(dir)
            .and_then(|_| std::fs::write(&tmp, image))
            .and_then(|_| std::fs::rename(&tmp, &path));
        if stored.is_err() {
            let _ = std::fs::remove_file(&tmp);
            return;
        }
        let prefix = format!("kernels-{}-p{part}-", self.arch);
        let stale = std::fs::read_dir(dir).into_iter().flatten().flatten();
        for entry in stale {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(&prefix) && entry.path() != path {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// The kernel cache of [`super::Gpu::new`]: `cuda/` in teal's cache directory.
pub(crate) fn default_dir() -> PathBuf {
    crate::cache_dir().join("cuda")
}

fn nvrtc_present() -> Result<()> {
    // SAFETY: only checks whether the shared library can be opened.
    if unsafe { sys::is_culib_present() } {
        Ok(())
    } else {
        Err(CudaError::NoNvrtc)
    }
}

fn options(arch: &str, part: usize) -> Vec<String> {
    let mut o = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".into(),
        format!("-DTEAL_PART={part}"),
    ];
    if part > 0 {
        let (batch, bf16, pc) = (
            (part - 1) / 4 + 1,
            (part - 1) / 2 % 2 == 1,
            (part - 1) % 2 == 1,
        );
        debug_assert_eq!(gemv_part(batch, bf16, pc), part);
        let (name, wt) = if bf16 {
            ("bf16", "BF16")
        } else {
            ("f16", "F16")
        };
        o.extend([
            format!("-DTEAL_GEMV_B={batch}"),
            format!("-DTEAL_GEMV_NAME={name}"),
            format!("-DTEAL_GEMV_WT={wt}"),
            format!("-DTEAL_GEMV_PC={pc}"),
            format!("-DTEAL_GEMV_SUF={}", if pc { "_pc" } else { "" }),
        ]);
    }
    o
}

/// FNV-1a of the source, the options of every part and NVRTC's version.
fn source_key(arch: &str) -> Result<u64> {
    let (mut major, mut minor) = (0i32, 0i32);
    // SAFETY: two out-pointers to live integers.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| CudaError::Compile(format!("NVRTC version: {e:?}")))?;
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    };
    eat(KERNELS_CU.as_bytes());
    eat(options(arch, 0).join(" ").as_bytes());
    eat(format!("nvrtc {major}.{minor}").as_bytes());
    Ok(h)
}

/// One part's CUBIN.
fn compile_part(arch: &str, part: usize) -> Result<Vec<u8>> {
    let fail = |what: &str, e: result::NvrtcError| {
        CudaError::Compile(format!("NVRTC, part {part}: {what}: {e:?}"))
    };
    let src = CString::new(KERNELS_CU).map_err(|e| CudaError::Compile(e.to_string()))?;
    let name = CString::new("kernels.cu").map_err(|e| CudaError::Compile(e.to_string()))?;
    let prog = result::create_program(&src, Some(&name)).map_err(|e| fail("create", e))?;
    // SAFETY: `prog` is a live program until destroyed below; the out-buffers are sized by
    // NVRTC's own size queries.
    let image = unsafe {
        let compiled = result::compile_program(prog, &options(arch, part));
        let image = match compiled {
            Ok(()) => cubin(prog).map_err(|e| fail("CUBIN", e)),
            Err(_) => Err(CudaError::Compile(format!(
                "NVRTC, part {part}: {}",
                log(prog).unwrap_or_default()
            ))),
        };
        result::destroy_program(prog).map_err(|e| fail("destroy", e))?;
        image
    }?;
    Ok(image)
}

/// # Safety
/// `prog` must be a live, compiled program.
unsafe fn cubin(prog: sys::nvrtcProgram) -> std::result::Result<Vec<u8>, result::NvrtcError> {
    let mut n = 0usize;
    sys::nvrtcGetCUBINSize(prog, &mut n).result()?;
    let mut buf = vec![0u8; n];
    sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut c_char).result()?;
    Ok(buf)
}

/// # Safety
/// `prog` must be a live program.
unsafe fn log(prog: sys::nvrtcProgram) -> Option<String> {
    let raw = result::get_program_log(prog).ok()?;
    Some(
        CStr::from_ptr(raw.as_ptr())
            .to_string_lossy()
            .trim()
            .to_string(),
    )
}

/// Whether `image` (a CUBIN) defines the kernel `name` (its symbol table holds the name).
pub fn image_defines(image: &[u8], name: &str) -> bool {
    let needle: Vec<u8> = [&[0u8][..], name.as_bytes(), &[0u8]].concat();
    image.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_images_read_back_and_replace_other_sources() {
        let dir = std::env::temp_dir().join(format!("teal-kernel-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cache = KernelCache::new("sm_90", Some(dir.clone()));
        assert!(cache.read(1).is_none(), "an empty cache has nothing");
        for part in 0..PARTS {
            cache.store(part, 1, &[part as u8 + 1; 3]);
        }
        let images = cache.read(1).expect("all parts stored");
        assert_eq!(images[PARTS - 1], [PARTS as u8; 3]);
        assert!(cache.read(2).is_none(), "another source's key");
        // A new source's image of part 0 replaces the old one; the key's other parts are
        // missing, so it is not read.
        cache.store(0, 2, b"new");
        assert!(cache.read(1).is_none() && cache.read(2).is_none());
        let files = std::fs::read_dir(&dir).unwrap().count();
        assert_eq!(files, PARTS, "one file per part, no temporaries");
        // An empty image (a write cut short) counts as missing.
        for part in 1..PARTS {
            cache.store(part, 2, &[]);
        }
        assert!(cache.read(2).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(KernelCache::new("sm_90", None).read(1).is_none());
    }
}
