//! safetensors files, memory-mapped: the header is parsed, the data is never read or copied here.
//!
//! The header is parsed by hand rather than with the `safetensors` crate so that every kind of
//! damage gets its own error naming the file and the key (the crate folds several into one).

use crate::dtype::DType;
use crate::error::{LoadError, Result};
use memmap2::Mmap;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Headers larger than this are refused before any JSON parsing (the reference reader uses the
/// same bound); a real Flux header is well under 1 MB.
pub const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

/// One tensor's entry in a header. Offsets are relative to the start of the data section.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub begin: u64,
    pub end: u64,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A parsed safetensors header.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    pub tensors: BTreeMap<String, TensorInfo>,
    pub metadata: BTreeMap<String, String>,
    /// Absolute file offset of the data section (8 + header length).
    pub data_start: u64,
}

/// Parses and validates the header of a safetensors file held in `bytes` (the whole file, or at
/// least its header; `file_len` is the full length). `path` only labels errors.
pub fn parse_header(path: &Path, bytes: &[u8], file_len: u64) -> Result<Header> {
    let p = || path.to_path_buf();
    if file_len < 8 || bytes.len() < 8 {
        return Err(LoadError::TooShort {
            path: p(),
            len: file_len,
        });
    }
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    if header_len > MAX_HEADER_BYTES
        || header_len > file_len - 8
        || header_len > (bytes.len() - 8) as u64
    {
        return Err(LoadError::HeaderPastEnd {
            path: p(),
            header_len,
            file_len,
        });
    }
    let data_start = 8 + header_len;
    let data_len = file_len - data_start;
    let json = &bytes[8..data_start as usize];
    let value: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| LoadError::InvalidJson {
            path: p(),
            reason: e.to_string(),
        })?;
    let serde_json::Value::Object(entries) = value else {
        return Err(LoadError::InvalidJson {
            path: p(),
            reason: "top level is not an object".into(),
        });
    };

    let malformed = |key: &str, reason: &str| LoadError::MalformedEntry {
        path: p(),
        key: key.to_string(),
        reason: reason.to_string(),
    };
    let mut tensors = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    for (key, entry) in entries {
        if key == "__metadata__" {
            let serde_json::Value::Object(m) = entry else {
                return Err(malformed(&key, "__metadata__ is not an object"));
            };
            for (k, v) in m {
                let serde_json::Value::String(s) = v else {
                    return Err(malformed(
                        &key,
                        &format!("metadata value {k:?} is not a string"),
                    ));
                };
                metadata.insert(k, s);
            }
            continue;
        }
        let serde_json::Value::Object(fields) = &entry else {
            return Err(malformed(&key, "entry is not an object"));
        };
        let dtype_str = fields
            .get("dtype")
            .and_then(|v| v.as_str())
            .ok_or_else(|| malformed(&key, "missing string field \"dtype\""))?;
        let dtype = DType::from_safetensors(dtype_str).ok_or_else(|| LoadError::UnknownDtype {
            path: p(),
            key: key.clone(),
            dtype: dtype_str.to_string(),
        })?;
        let shape = fields
            .get("shape")
            .and_then(|v| v.as_array())
            .ok_or_else(|| malformed(&key, "missing array field \"shape\""))?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| malformed(&key, "shape holds a non-integer or negative dimension"))?;
        let offsets = fields
            .get("data_offsets")
            .and_then(|v| v.as_array())
            .ok_or_else(|| malformed(&key, "missing array field \"data_offsets\""))?;
        let (begin, end) = match offsets.as_slice() {
            [b, e] => match (b.as_u64(), e.as_u64()) {
                (Some(b), Some(e)) => (b, e),
                _ => {
                    return Err(malformed(
                        &key,
                        "data_offsets are not non-negative integers",
                    ))
                }
            },
            _ => {
                return Err(malformed(
                    &key,
                    "data_offsets must hold exactly two numbers",
                ))
            }
        };
        if begin > end || end > data_len {
            return Err(LoadError::OffsetOutOfRange {
                path: p(),
                key,
                begin,
                end,
                data_len,
            });
        }
        let expected = shape.iter().try_fold(dtype.size_bytes() as u64, |acc, &d| {
            acc.checked_mul(d as u64)
        });
        if expected != Some(end - begin) {
            return Err(LoadError::ByteLengthMismatch {
                path: p(),
                key,
                shape,
                dtype: dtype.name(),
                expected: expected.unwrap_or(u64::MAX),
                actual: end - begin,
            });
        }
        tensors.insert(
            key,
            TensorInfo {
                dtype,
                shape,
                begin,
                end,
            },
        );
    }

    // Overlap check: sort by start; any non-empty tensor starting before the previous one ended
    // would alias it. (Gaps are tolerated: they waste space but do not corrupt anything.)
    let mut spans: Vec<(&String, &TensorInfo)> =
        tensors.iter().filter(|(_, t)| t.end > t.begin).collect();
    spans.sort_by_key(|(_, t)| (t.begin, t.end));
    for w in spans.windows(2) {
        if w[1].1.begin < w[0].1.end {
            return Err(LoadError::OverlappingTensors {
                path: p(),
                first: w[0].0.clone(),
                second: w[1].0.clone(),
            });
        }
    }
    Ok(Header {
        tensors,
        metadata,
        data_start,
    })
}

/// A byte range inside a memory-mapped file. Cloning shares the map.
#[derive(Clone)]
pub struct MappedBytes {
    map: Arc<Mmap>,
    start: usize,
    len: usize,
}

impl MappedBytes {
    pub fn as_slice(&self) -> &[u8] {
        &self.map[self.start..self.start + self.len]
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A sub-range `[offset, offset + len)` of this range.
    pub fn slice(&self, offset: usize, len: usize) -> MappedBytes {
        assert!(
            offset + len <= self.len,
            "sub-range outside the mapped tensor"
        );
        MappedBytes {
            map: self.map.clone(),
            start: self.start + offset,
            len,
        }
    }
}

impl std::fmt::Debug for MappedBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MappedBytes[{}..+{}]", self.start, self.len)
    }
}

/// One memory-mapped safetensors file with its parsed header.
pub struct SafetensorsFile {
    pub path: PathBuf,
    pub header: Header,
    map: Arc<Mmap>,
}

impl SafetensorsFile {
    /// Maps the file and parses its header. Only the header pages are touched.
    pub fn open(path: &Path) -> Result<SafetensorsFile> {
        let io = |err| LoadError::Io {
            path: path.to_path_buf(),
            err,
        };
        let file = File::open(path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        if file_len < 8 {
            return Err(LoadError::TooShort {
                path: path.to_path_buf(),
                len: file_len,
            });
        }
        // SAFETY: the map is read-only and private to this process. Like every mmap-based
        // checkpoint reader we rely on nobody truncating the file while it is open; the header's
        // offsets are validated against the length seen here.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let header = parse_header(path, &map, file_len)?;
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            header,
            map: Arc::new(map),
        })
    }

    /// The bytes of tensor `key`, without copying.
    pub fn bytes(&self, key: &str) -> Option<MappedBytes> {
        let t = self.header.tensors.get(key)?;
        Some(MappedBytes {
            map: self.map.clone(),
            start: (self.header.data_start + t.begin) as usize,
            len: (t.end - t.begin) as usize,
        })
    }

    pub fn file_len(&self) -> u64 {
        self.map.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data: usize) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.resize(v.len() + data, 0);
        v
    }

    fn parse(bytes: &[u8]) -> Result<Header> {
        parse_header(Path::new("x.safetensors"), bytes, bytes.len() as u64)
    }

    #[test]
    fn parses_entries_and_metadata() {
        let h = r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"BF16","shape":[2,3],"data_offsets":[16,28]},"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
        let hdr = parse(&file(h, 28)).unwrap();
        assert_eq!(hdr.metadata["format"], "pt");
        assert_eq!(hdr.tensors["b"].shape, vec![2, 3]);
        assert_eq!(hdr.tensors["b"].dtype, DType::BF16);
        assert_eq!(hdr.data_start, 8 + h.len() as u64);
    }

    #[test]
    fn scalar_and_empty_tensors() {
        let h = r#"{"s":{"dtype":"F32","shape":[],"data_offsets":[0,4]},"e":{"dtype":"F32","shape":[0],"data_offsets":[4,4]}}"#;
        let hdr = parse(&file(h, 4)).unwrap();
        assert_eq!(hdr.tensors["s"].numel(), 1);
        assert_eq!(hdr.tensors["e"].numel(), 0);
    }

    #[test]
    fn shape_overflow_is_a_length_mismatch_not_a_panic() {
        let h = r#"{"a":{"dtype":"F32","shape":[18446744073709551615,2],"data_offsets":[0,4]}}"#;
        assert!(matches!(
            parse(&file(h, 4)),
            Err(LoadError::ByteLengthMismatch { .. })
        ));
    }
}
