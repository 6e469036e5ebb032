//! The embedded CUDA source compiles with NVRTC (needs libnvrtc, not a GPU; skips without it,
//! fails without it when TEAL_REQUIRE_NVRTC is set, as scripts/test.sh does after fetching it).

use teal_kernels::cuda::{compile_kernels, image_defines, CudaError, KERNELS_CU, PARTS};

#[test]
fn kernels_compile_with_nvrtc() {
    match compile_kernels("sm_90") {
        Ok(images) => {
            assert_eq!(images.len(), PARTS);
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
            // Each kernel in exactly one part: part 0 all but the GEMVs, part b the batch-b
            // GEMVs.
            for name in declared.into_iter().chain(macro_made) {
                let parts: Vec<usize> = (0..PARTS)
                    .filter(|&p| image_defines(&images[p], &name))
                    .collect();
                let want = name
                    .strip_prefix("gemv_")
                    .and_then(|r| r.split_once("_b"))
                    .and_then(|(_, r)| r.split('_').next())
                    .map_or(0, |b| b.parse().unwrap());
                assert_eq!(parts, [want], "{name}: in parts {parts:?}");
            }
        }
        Err(CudaError::NoNvrtc) if std::env::var_os("TEAL_REQUIRE_NVRTC").is_some() => {
            panic!("TEAL_REQUIRE_NVRTC is set: {}", CudaError::NoNvrtc)
        }
        Err(CudaError::NoNvrtc) => eprintln!("skipping: {}", CudaError::NoNvrtc),
        Err(e) => panic!("{e}"),
    }
}
