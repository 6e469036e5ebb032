//! The embedded CUDA source compiles with NVRTC (needs libnvrtc, not a GPU; skips without it,
//! fails without it when TEAL_REQUIRE_NVRTC is set, as scripts/test.sh does after fetching it).

use teal_kernels::cuda::{compile_kernels, CudaError, KERNELS_CU};

#[test]
fn kernels_compile_with_nvrtc() {
    match compile_kernels("sm_90") {
        Ok(ptx) => {
            // Every kernel the source declares by name, some of the GEMV macro's (scalar and
            // per-channel thresholds) and the grouped decode attention's.
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
            let macro_made = [
                "gemv_f16_b1_vec".to_string(),
                "gemv_bf16_b8_any".into(),
                "gemv_f16_b1_vec_pc".into(),
                "gemv_bf16_b8_any_pc".into(),
            ]
            .into_iter()
            .chain([1, 2, 4, 8].map(|g| format!("attn_rope_decode_g{g}_f32")));
            for name in declared.into_iter().chain(macro_made) {
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
