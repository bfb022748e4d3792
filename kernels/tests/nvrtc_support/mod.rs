//! What the NVRTC compile tests (`nvrtc_compile.rs`, `ptx_compile.rs`) share: the target
//! architectures, NVRTC or the reason it is missing, the kernels a source defines, and whether a
//! cubin holds one.

#![allow(dead_code)] // each test file uses its part

use kontext_kernels::nvrtc::Nvrtc;

/// The architectures CI compiles for: Ampere (A100), Ada (L40S, RTX 40xx), Hopper with its
/// architecture-specific features (H100, H200).
pub const ARCHS: [&str; 3] = ["sm_80", "sm_89", "sm_90a"];

pub fn nvrtc_or_skip() -> Option<Nvrtc> {
    match Nvrtc::load() {
        Ok(n) => Some(n),
        Err(e) => {
            if std::env::var("KONTEXT_SKIP_NVRTC").as_deref() == Ok("1") {
                eprintln!("skipped: KONTEXT_SKIP_NVRTC=1 and {e}");
                return None;
            }
            panic!(
                "{e}\n\nThe NVRTC compile tests need NVRTC and the CUDA headers. Run the tests \
                 with scripts/test, or first `eval \"$(scripts/nvrtc-env)\"` (installs the \
                 nvidia-cuda-nvrtc-cu12 and nvidia-cuda-runtime-cu12 wheels into .cache/nvrtc), \
                 or set KONTEXT_SKIP_NVRTC=1 to skip this test knowingly."
            );
        }
    }
}

/// The `extern "C" __global__` functions a source defines, in order: name and parameter list.
pub fn global_functions(source: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let mut rest = source;
    while let Some(i) = rest.find("extern \"C\" __global__") {
        rest = &rest[i + "extern \"C\" __global__".len()..];
        let mut s = rest.trim_start();
        s = s.strip_prefix("void").unwrap_or(s).trim_start();
        if let Some(after) = s.strip_prefix("__launch_bounds__") {
            let close = after.find(')').expect("__launch_bounds__ closes");
            s = after[close + 1..].trim_start();
        }
        let end = s
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(s.len());
        let name = s[..end].to_string();
        let params = s[end..].trim_start();
        let close = params.find(')').expect("parameter list closes");
        found.push((name, params[1..close].to_string()));
    }
    found
}

/// Whether the cubin defines a kernel `name` (its code section is `.text.<name>`).
pub fn cubin_has_kernel(cubin: &[u8], name: &str) -> bool {
    let needle = format!(".text.{name}\0");
    cubin.windows(needle.len()).any(|w| w == needle.as_bytes())
}
