//! The on-disk cache of compiled kernel modules, so that a second start compiles nothing.
//!
//! One file per (family, architecture, NVRTC version, source hash):
//! `<dir>/<family>-<arch>-nvrtc<major>.<minor>-<hash>.cubin`, where the hash (64-bit FNV-1a)
//! covers the family's source, the shared headers (`common.cuh`, `ptx.cuh`) and the compile
//! options. A changed kernel, header, option or NVRTC gets a new file; stale files are
//! harmless. Writes go to a temporary file that is renamed into place, so concurrent starts never
//! read a half-written module. The directory is `$KONTEXT_CACHE_DIR`, else
//! `$XDG_CACHE_HOME/kontext-fast/kernels`, else `~/.cache/kontext-fast/kernels`;
//! `KONTEXT_KERNEL_CACHE=off` disables it.

use crate::error::{KernelError, Result};
use std::path::{Path, PathBuf};

/// 64-bit FNV-1a over the given byte strings, each followed by a 0xFF separator (so `["ab", "c"]`
/// and `["a", "bc"]` differ).
pub fn fnv1a64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in part.iter().chain(std::iter::once(&0xFFu8)) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// What identifies one compiled module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheKey {
    pub family: &'static str,
    pub arch: String,
    pub nvrtc: (i32, i32),
    /// FNV-1a of source, the shared headers and options.
    pub hash: u64,
}

impl CacheKey {
    pub fn new(
        family: &'static str,
        source: &str,
        headers: &str,
        options: &[String],
        arch: &str,
        nvrtc: (i32, i32),
    ) -> CacheKey {
        let opts = options.join("\u{1f}");
        CacheKey {
            family,
            arch: arch.to_string(),
            nvrtc,
            hash: fnv1a64(&[source.as_bytes(), headers.as_bytes(), opts.as_bytes()]),
        }
    }

    pub fn file_name(&self) -> String {
        format!(
            "{}-{}-nvrtc{}.{}-{:016x}.cubin",
            self.family, self.arch, self.nvrtc.0, self.nvrtc.1, self.hash
        )
    }
}

/// The cache directory, or none when disabled.
#[derive(Debug, Clone)]
pub struct ModuleCache {
    pub dir: Option<PathBuf>,
}

impl ModuleCache {
    /// The directory from the environment (see the module docs).
    pub fn from_env() -> ModuleCache {
        if std::env::var("KONTEXT_KERNEL_CACHE").as_deref() == Ok("off") {
            return ModuleCache { dir: None };
        }
        let var = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let dir = var("KONTEXT_CACHE_DIR")
            .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("kontext-fast").join("kernels")))
            .or_else(|| var("HOME").map(|d| d.join(".cache/kontext-fast/kernels")));
        ModuleCache { dir }
    }

    /// A cache in `dir` (tests).
    pub fn at(dir: &Path) -> ModuleCache {
        ModuleCache {
            dir: Some(dir.to_path_buf()),
        }
    }

    /// The cached cubin for `key`, if present and readable.
    pub fn get(&self, key: &CacheKey) -> Option<Vec<u8>> {
        let path = self.dir.as_ref()?.join(key.file_name());
        std::fs::read(path).ok().filter(|b| !b.is_empty())
    }

    /// Stores `cubin` for `key` (temporary file, then rename). Does nothing when disabled.
    pub fn put(&self, key: &CacheKey, cubin: &[u8]) -> Result<()> {
        let Some(dir) = &self.dir else {
            return Ok(());
        };
        let err = |path: &Path, e: std::io::Error| KernelError::Cache {
            path: path.to_path_buf(),
            msg: format!(
                "{e} (set KONTEXT_CACHE_DIR to a writable directory, or KONTEXT_KERNEL_CACHE=off)"
            ),
        };
        std::fs::create_dir_all(dir).map_err(|e| err(dir, e))?;
        let path = dir.join(key.file_name());
        let tmp = dir.join(format!(".{}.{}.tmp", key.file_name(), std::process::id()));
        std::fs::write(&tmp, cubin).map_err(|e| err(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| err(&path, e))
    }

    /// Removes the entry for `key` (a cubin the driver refused to load).
    pub fn remove(&self, key: &CacheKey) {
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_file(dir.join(key.file_name()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_known_values_and_separators() {
        // FNV-1a 64 of "a" followed by the 0xFF separator, computed by hand from the definition.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in [b'a', 0xFF] {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        assert_eq!(fnv1a64(&[b"a"]), h);
        assert_ne!(fnv1a64(&[b"ab", b"c"]), fnv1a64(&[b"a", b"bc"]));
    }

    #[test]
    fn key_changes_with_every_input() {
        let opts = vec!["--gpu-architecture=sm_90a".to_string()];
        let k = CacheKey::new("fp8", "src", "common", &opts, "sm_90a", (12, 9));
        assert_eq!(
            k.file_name(),
            format!("fp8-sm_90a-nvrtc12.9-{:016x}.cubin", k.hash)
        );
        let other = [
            CacheKey::new("fp8", "src2", "common", &opts, "sm_90a", (12, 9)),
            CacheKey::new("fp8", "src", "common2", &opts, "sm_90a", (12, 9)),
            CacheKey::new("fp8", "src", "common", &[], "sm_90a", (12, 9)),
            CacheKey::new("fp8", "src", "common", &opts, "sm_80", (12, 9)),
            CacheKey::new("fp8", "src", "common", &opts, "sm_90a", (13, 0)),
        ];
        for o in other {
            assert_ne!(o.file_name(), k.file_name());
        }
    }

    #[test]
    fn put_get_remove_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ModuleCache::at(&dir.path().join("nested"));
        let k = CacheKey::new("conv", "s", "c", &[], "sm_80", (12, 9));
        assert!(cache.get(&k).is_none());
        cache.put(&k, b"\x7fELF...").unwrap();
        assert_eq!(cache.get(&k).unwrap(), b"\x7fELF...");
        cache.remove(&k);
        assert!(cache.get(&k).is_none());
        // No temporary files are left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path().join("nested"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(names.is_empty(), "{names:?}");
    }

    #[test]
    fn disabled_cache_stores_nothing() {
        let cache = ModuleCache { dir: None };
        let k = CacheKey::new("conv", "s", "c", &[], "sm_80", (12, 9));
        cache.put(&k, b"x").unwrap();
        assert!(cache.get(&k).is_none());
    }
}
