use std::path::PathBuf;

/// Everything that can go wrong turning files into named tensors. Every variant names the file
/// (and the tensor key where there is one) so the message alone tells the user what to fix.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The cause is in the message, not chained as a `source` (printing the chain would
    /// repeat it).
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{path}: file is {len} bytes, too short for the 8-byte safetensors header length (truncated or not a safetensors file)")]
    TooShort { path: PathBuf, len: u64 },
    #[error("{path}: header length {header_len} runs past the end of the {file_len}-byte file (truncated or not a safetensors file)")]
    HeaderPastEnd {
        path: PathBuf,
        header_len: u64,
        file_len: u64,
    },
    #[error("{path}: not valid JSON: {reason}")]
    InvalidJson { path: PathBuf, reason: String },
    #[error("{path}: header entry {key:?} is malformed: {reason}")]
    MalformedEntry {
        path: PathBuf,
        key: String,
        reason: String,
    },
    #[error("{path}: tensor {key:?} has unknown dtype {dtype:?}")]
    UnknownDtype {
        path: PathBuf,
        key: String,
        dtype: String,
    },
    #[error(
        "{path}: tensor {key:?} has {actual} bytes but shape {shape:?} × {dtype} needs {expected}"
    )]
    ByteLengthMismatch {
        path: PathBuf,
        key: String,
        shape: Vec<usize>,
        dtype: &'static str,
        expected: u64,
        actual: u64,
    },
    #[error("{path}: tensor {key:?} data [{begin}, {end}) lies outside the {data_len}-byte data section (file truncated?)")]
    OffsetOutOfRange {
        path: PathBuf,
        key: String,
        begin: u64,
        end: u64,
        data_len: u64,
    },
    #[error("{path}: tensors {first:?} and {second:?} overlap in the data section")]
    OverlappingTensors {
        path: PathBuf,
        first: String,
        second: String,
    },
    #[error("{index}: shard {shard:?} listed for tensor {key:?} does not exist")]
    MissingShard {
        index: PathBuf,
        shard: String,
        key: String,
    },
    #[error(
        "{index}: tensor {key:?} is listed in shard {shard:?} but that shard does not contain it"
    )]
    ShardMissingKey {
        index: PathBuf,
        shard: String,
        key: String,
    },
    #[error("{path}: tensor {key:?} appears in more than one file")]
    DuplicateKey { path: PathBuf, key: String },
    #[error("{path}: {component} checkpoint does not match the expected layout:\n{}", problems.join("\n"))]
    Layout {
        path: PathBuf,
        component: &'static str,
        /// One line per missing, mis-shaped or unexpected tensor.
        problems: Vec<String>,
    },
    #[error("{path}: tensor {key:?}: {reason}")]
    BadScale {
        path: PathBuf,
        key: String,
        reason: String,
    },
    #[error("{path}: tensor {key:?} has dtype {dtype}, which cannot hold weights")]
    NotAWeight {
        path: PathBuf,
        key: String,
        dtype: &'static str,
    },
    #[error("{path}: {reason}")]
    UnknownLayout { path: PathBuf, reason: String },
    #[error("{path}: config: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("tensor {key:?} not found in {component}")]
    NoSuchTensor { component: String, key: String },
}

pub type Result<T, E = LoadError> = std::result::Result<T, E>;
