//! The asm halves of `kernels/cuda/ptx.cuh` are valid PTX: the twin test kernels
//! (`kernels/emu/tests/ptx_twins.cu`, which call every function of the header) compile with the
//! real NVRTC and ptxas for sm_80, sm_89 and sm_90a with no error and no warning, and every test
//! kernel is in each cubin. No GPU needed (`eval "$(scripts/nvrtc-env)"`).
//!
//! Without NVRTC this test fails, naming the fix; `KONTEXT_SKIP_NVRTC=1` skips it explicitly.

mod nvrtc_support;

use kontext_kernels::Family;
use nvrtc_support::{cubin_has_kernel, global_functions, nvrtc_or_skip, ARCHS};

const TWINS: &str = include_str!("../emu/tests/ptx_twins.cu");

#[test]
fn ptx_twins_compile_cleanly_for_every_arch() {
    let Some(nvrtc) = nvrtc_or_skip() else {
        return;
    };
    // NVRTC gets ptx.cuh in memory beside common.cuh (kontext_kernels::HEADERS).
    let family = Family {
        name: "ptx_twins",
        source: TWINS,
        kernels: &[],
    };
    let names: Vec<String> = global_functions(TWINS)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(names.len() >= 10, "{names:?}");
    let mut failures = Vec::new();
    for arch in ARCHS {
        match nvrtc.compile(&family, arch) {
            Err(e) => failures.push(e.to_string()),
            Ok(c) => {
                if !c.log.is_empty() {
                    failures.push(format!("ptx_twins.cu ({arch}) warned:\n{}", c.log));
                }
                for name in &names {
                    if !cubin_has_kernel(&c.cubin, name) {
                        failures.push(format!("ptx_twins.cu ({arch}) has no kernel {name}"));
                    }
                }
                eprintln!("ptx_twins.cu {arch:>6}: {:>7} bytes", c.cubin.len());
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// An instruction newer than the target is not declared there: using it is a compile error in
/// both halves, as ptxas would refuse it.
#[test]
fn sm90_instructions_are_refused_for_sm80() {
    let Some(nvrtc) = nvrtc_or_skip() else {
        return;
    };
    let source = "#include \"common.cuh\"\n#include \"ptx.cuh\"\nextern \"C\" __global__ void \
                  k(unsigned long long* b) { mbarrier_arrive_expect_tx(b, 16); }\n";
    let family = Family {
        name: "ptx_sm90_on_sm80",
        source,
        kernels: &[],
    };
    let err = nvrtc.compile(&family, "sm_80").unwrap_err().to_string();
    assert!(err.contains("mbarrier_arrive_expect_tx"), "{err}");
    assert!(nvrtc.compile(&family, "sm_90a").is_ok());
}

/// A one-kernel family calling `body`.
fn probe_family(name: &'static str, params: &str, body: &str) -> Family {
    let source = format!(
        "#include \"common.cuh\"\n#include \"ptx.cuh\"\nextern \"C\" __global__ void \
         k({params}) {{ {body} }}\n"
    );
    Family {
        name,
        source: Box::leak(source.into_boxed_str()),
        kernels: &[],
    }
}

/// wgmma exists only on sm_90a (not sm_90, not before); the TMA tensor copies from sm_90 on.
/// Where an instruction is missing, using it is a compile error naming the function.
#[test]
fn hopper_instructions_exist_only_where_the_hardware_has_them() {
    let Some(nvrtc) = nvrtc_or_skip() else {
        return;
    };
    let wgmma = probe_family(
        "ptx_wgmma_probe",
        "float* out",
        "extern __shared__ __align__(1024) unsigned char s[]; float acc[32] = {}; \
         wgmma_fence(); unsigned long long d = wgmma_desc(s, 16, 1024, WGMMA_SWIZZLE_128B); \
         wgmma_m64nNk16_bf16_f32<64>(acc, d, d, 0); float o[64] = {}; \
         const unsigned a[4] = {1u, 2u, 3u, 4u}; wgmma_m64n128k16_bf16_f32_rs(o, a, d, 0); \
         wgmma_commit_group(); wgmma_wait_group<0>(); wgmma_fence_operand(acc); \
         wgmma_fence_operand(o); out[threadIdx.x] = acc[0] + o[1];",
    );
    let tma = probe_family(
        "ptx_tma_probe",
        "const __grid_constant__ CUtensorMap map, unsigned long long* bar",
        "extern __shared__ __align__(1024) unsigned char s[]; \
         cp_async_bulk_tensor_2d_g2s(s, &map, 0, 0, bar);",
    );
    let mut failures = Vec::new();
    for (family, function, archs_with) in [
        (&wgmma, "wgmma_fence", &["sm_90a"][..]),
        (
            &tma,
            "cp_async_bulk_tensor_2d_g2s",
            &["sm_90", "sm_90a"][..],
        ),
    ] {
        for arch in ["sm_80", "sm_89", "sm_90", "sm_90a"] {
            let r = nvrtc.compile(family, arch);
            match (archs_with.contains(&arch), r) {
                (true, Ok(c)) if c.log.is_empty() => {}
                (true, Ok(c)) => failures.push(format!("{function} on {arch} warned:\n{}", c.log)),
                (true, Err(e)) => failures.push(format!("{function} on {arch} failed:\n{e}")),
                (false, Ok(_)) => failures.push(format!("{function} compiled for {arch}")),
                (false, Err(e)) => {
                    if !e.to_string().contains(function) {
                        failures.push(format!(
                            "{function} on {arch}: the error does not name it:\n{e}"
                        ));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
