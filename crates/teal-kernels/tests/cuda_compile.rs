//! The embedded CUDA source compiles with NVRTC (needs libnvrtc, not a GPU; skips without it,
//! fails without it when TEAL_REQUIRE_NVRTC is set, as scripts/test.sh does after fetching it).

use teal_kernels::cuda::{compile_kernels, CudaError, KERNELS_CU};

#[test]
fn kernels_compile_with_nvrtc() {
    match compile_kernels("sm_90") {
        Ok(ptx) => {
            // Every kernel the source declares by name, and two of the GEMV macro's.
            let declared = KERNELS_CU
                .split("__global__ void")
                .skip(1)
                .filter_map(|rest| {
                    let rest = rest.trim_start();
                    let rest = rest
                        .strip_prefix("__launch_bounds__(")
                        .and_then(|r| r.split_once(')'))
                        .map_or(rest, |(_, r)| r.trim_start());
                    let name: String = rest
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    (!name.is_empty() && name != "NAME").then_some(name)
                })
                .collect::<Vec<_>>();
            assert!(declared.len() >= 10, "kernels found: {declared:?}");
            for name in declared
                .iter()
                .map(String::as_str)
                .chain(["gemv_f16_b1_vec", "gemv_bf16_b8_any"])
            {
                assert!(
                    ptx.contains(&format!(".entry {name}(")),
                    "{name} missing from the PTX"
                );
            }
        }
        Err(CudaError::NoNvrtc) if std::env::var_os("TEAL_REQUIRE_NVRTC").is_some() => {
            panic!("TEAL_REQUIRE_NVRTC is set: {}", CudaError::NoNvrtc)
        }
        Err(CudaError::NoNvrtc) => eprintln!("skipping: {}", CudaError::NoNvrtc),
        Err(e) => panic!("{e}"),
    }
}
