//! The embedded CUDA source compiles with NVRTC (needs libnvrtc, not a GPU; skips without it,
//! fails without it when TEAL_REQUIRE_NVRTC is set, as scripts/test.sh does after fetching it).

use teal_kernels::cuda::{compile_kernels, gemv_part, image_defines, CudaError, KERNELS_CU, PARTS};

#[test]
fn kernels_compile_with_nvrtc() {
    match compile_kernels("sm_90") {
        Ok(images) => {
            assert_eq!(images.len(), PARTS);
            // Every kernel the source declares by name, the grouped decode attention's and
            // (below) the GEMV macro's 64.
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
            let macro_made = [1, 2, 4, 8].map(|g| format!("attn_rope_decode_g{g}_f32"));
            // Each kernel in exactly one part: part 0 all but the GEMVs, each GEMV in the part
            // of its batch size, weight type and threshold kind.
            let gemvs = (1..=8).flat_map(|b| {
                ["f16", "bf16"].into_iter().flat_map(move |d| {
                    ["vec", "any"].into_iter().flat_map(move |v| {
                        [("", false), ("_pc", true)].map(|(s, pc)| {
                            (
                                format!("gemv_{d}_b{b}_{v}{s}"),
                                gemv_part(b, d == "bf16", pc),
                            )
                        })
                    })
                })
            });
            let named = declared.into_iter().chain(macro_made).map(|n| (n, 0));
            let mut seen = 0;
            for (name, want) in named.chain(gemvs) {
                let parts: Vec<usize> = (0..PARTS)
                    .filter(|&p| image_defines(&images[p], &name))
                    .collect();
                assert_eq!(parts, [want], "{name}: in parts {parts:?}");
                seen += 1;
            }
            assert!(seen >= 10 + 64, "kernels checked: {seen}");
        }
        Err(CudaError::NoNvrtc) if std::env::var_os("TEAL_REQUIRE_NVRTC").is_some() => {
            panic!("TEAL_REQUIRE_NVRTC is set: {}", CudaError::NoNvrtc)
        }
        Err(CudaError::NoNvrtc) => eprintln!("skipping: {}", CudaError::NoNvrtc),
        Err(e) => panic!("{e}"),
    }
}

/// The GPUs before Hopper that the backend accepts compile too (sm_90's vector reductions
/// and grid-dependency control are behind `__CUDA_ARCH__` guards; an unguarded one made every
/// GEMV part fail in ptxas on sm_70 to sm_89). sm_80 stands for them: sm_70 compiled as well
/// when this was written.
#[test]
fn kernels_compile_before_hopper() {
    match compile_kernels("sm_80") {
        Ok(images) => assert_eq!(images.len(), PARTS),
        Err(CudaError::NoNvrtc) if std::env::var_os("TEAL_REQUIRE_NVRTC").is_some() => {
            panic!("TEAL_REQUIRE_NVRTC is set: {}", CudaError::NoNvrtc)
        }
        Err(CudaError::NoNvrtc) => eprintln!("skipping: {}", CudaError::NoNvrtc),
        Err(e) => panic!("sm_80: {e}"),
    }
}
