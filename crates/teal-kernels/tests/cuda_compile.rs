//! The embedded CUDA source compiles with NVRTC (needs libnvrtc, not a GPU; skips without it,
//! fails without it when TEAL_REQUIRE_NVRTC is set, as scripts/test.sh does after fetching it).

use teal_kernels::cuda::{compile_kernels, CudaError};

#[test]
fn kernels_compile_with_nvrtc() {
    match compile_kernels("sm_90") {
        Ok(ptx) => {
            for name in [
                "gemv_f16_b1_vec",
                "gemv_bf16_b8_any",
                "rmsnorm_f32",
                "attn_decode_f32",
                "attn_rope_decode_f32",
            ] {
                assert!(ptx.contains(name), "{name} missing from the PTX");
            }
        }
        Err(CudaError::NoNvrtc) if std::env::var_os("TEAL_REQUIRE_NVRTC").is_some() => {
            panic!("TEAL_REQUIRE_NVRTC is set: {}", CudaError::NoNvrtc)
        }
        Err(CudaError::NoNvrtc) => eprintln!("skipping: {}", CudaError::NoNvrtc),
        Err(e) => panic!("{e}"),
    }
}
