//! Every kernel family compiles with NVRTC for sm_80, sm_89 and sm_90a, with no error and no
//! warning, and defines exactly the functions its launchers resolve. No GPU needed: NVRTC and the
//! CUDA headers come from NVIDIA's PyPI wheels (`eval "$(scripts/nvrtc-env)"`, run by
//! `scripts/test`) or a CUDA toolkit.
//!
//! Without NVRTC this test fails, naming the fix; `KONTEXT_SKIP_NVRTC=1` skips it explicitly.

mod nvrtc_support;

use kontext_kernels::launch::parse_params;
use kontext_kernels::{Arg, Family, Kernel, COMMON_CUH, FAMILIES};
use nvrtc_support::{cubin_has_kernel, global_functions, nvrtc_or_skip, ARCHS};
use std::collections::BTreeSet;
use std::time::Instant;

#[test]
fn every_family_compiles_cleanly_for_every_arch() {
    let Some(nvrtc) = nvrtc_or_skip() else {
        return;
    };
    eprintln!(
        "NVRTC {}.{} ({}), headers {}",
        nvrtc.version.0,
        nvrtc.version.1,
        nvrtc
            .library
            .as_ref()
            .map_or("system search path".to_string(), |p| p
                .display()
                .to_string()),
        nvrtc.include_dir.display()
    );
    let mut failures = Vec::new();
    let total = Instant::now();
    for family in &FAMILIES {
        for arch in ARCHS {
            let t = Instant::now();
            match nvrtc.compile(family, arch) {
                Err(e) => failures.push(e.to_string()),
                Ok(c) => {
                    if !c.log.is_empty() {
                        failures.push(format!("{}.cu ({arch}) warned:\n{}", family.name, c.log));
                    }
                    for k in family.kernels {
                        if !cubin_has_kernel(&c.cubin, k.name) {
                            failures.push(format!(
                                "{}.cu ({arch}) has no kernel {}",
                                family.name, k.name
                            ));
                        }
                    }
                    eprintln!(
                        "{:>14}.cu {arch:>6}: {:>7} bytes, {:.2} s",
                        family.name,
                        c.cubin.len(),
                        t.elapsed().as_secs_f64()
                    );
                }
            }
        }
    }
    eprintln!(
        "all families × {ARCHS:?}: {:.1} s",
        total.elapsed().as_secs_f64()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn a_broken_kernel_is_reported_with_its_log() {
    let Some(nvrtc) = nvrtc_or_skip() else {
        return;
    };
    let broken = Family {
        name: "broken",
        source: "#include \"common.cuh\"\nextern \"C\" __global__ void k(bf16* x) { x[0] = undefined_name; }\n",
        kernels: &[Kernel {
            name: "k",
            args: &[Arg::Ptr],
        }],
    };
    let err = nvrtc.compile(&broken, "sm_80").unwrap_err().to_string();
    assert!(
        err.contains("broken.cu") && err.contains("undefined_name"),
        "{err}"
    );
    // A warning is reported in the log of a successful compile (the test above rejects it).
    let warns = Family {
        name: "warns",
        source: "#include \"common.cuh\"\nextern \"C\" __global__ void k(bf16* x) { int unused; x[0] = x[1]; }\n",
        kernels: &[Kernel {
            name: "k",
            args: &[Arg::Ptr],
        }],
    };
    let c = nvrtc.compile(&warns, "sm_80").unwrap();
    assert!(c.log.contains("unused"), "{}", c.log);
    assert!(nvrtc.compile(&warns, "sm_1").is_err());
}

/// The launchers' signature tables (what `Launch` checks every launch against) are the
/// sources' parameter lists: same kernels, same parameter kinds in the same order.
#[test]
fn signatures_match_the_sources() {
    for family in &FAMILIES {
        let found = global_functions(family.source);
        let names: BTreeSet<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
        let listed: BTreeSet<&str> = family.kernels.iter().map(|k| k.name).collect();
        assert_eq!(
            names, listed,
            "{}.cu's kernels vs its launcher module",
            family.name
        );
        for (name, params) in &found {
            let parsed = parse_params(params)
                .unwrap_or_else(|| panic!("{}.cu: {name}({params}): unknown type", family.name));
            let sig = family.kernels.iter().find(|k| k.name == name).unwrap();
            assert_eq!(
                parsed, sig.args,
                "{}.cu: {name}({params}) vs the launcher's {:?}",
                family.name, sig.args
            );
        }
    }
    assert!(global_functions(COMMON_CUH).is_empty());
}

#[test]
fn every_cu_file_is_a_family_and_opens_with_its_header() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("cuda");
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".cu"))
        .collect();
    on_disk.sort();
    let mut families: Vec<String> = FAMILIES.iter().map(|f| format!("{}.cu", f.name)).collect();
    families.sort();
    assert_eq!(on_disk, families, "kernels/cuda/*.cu and FAMILIES differ");
    for family in &FAMILIES {
        let first = family.source.lines().next().unwrap_or("");
        assert!(
            first.starts_with(&format!("// {}.cu: ", family.name)),
            "{}.cu must open with `// {}.cu: <what it computes>` (style.md), found {first:?}",
            family.name,
            family.name
        );
        for part in ["Replaces", "Layout", "Why"] {
            assert!(
                family.source.contains(part),
                "{}.cu's header lacks a {part:?} paragraph",
                family.name
            );
        }
    }
}
