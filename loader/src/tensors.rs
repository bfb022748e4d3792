//! Checkpoint tensors as the engine sees them: canonical names, zero-copy views into the mapped
//! files, and the fp8 scales that go with them.

use crate::dtype::{decode_into, DType};
use crate::error::{LoadError, Result};
use crate::safetensors::{MappedBytes, SafetensorsFile, TensorInfo};
use half::bf16;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// All tensors of one checkpoint: a single `.safetensors` file, or a folder of shards (through
/// its `*.safetensors.index.json`, or every `.safetensors` file in it when there is no index).
pub struct TensorSet {
    /// What the user pointed at (file or folder); used in messages.
    pub root: PathBuf,
    pub files: Vec<SafetensorsFile>,
    index: BTreeMap<String, usize>,
}

impl TensorSet {
    pub fn open(path: &Path) -> Result<TensorSet> {
        if path.is_dir() {
            Self::open_dir(path)
        } else {
            let f = SafetensorsFile::open(path)?;
            Self::from_files(path, vec![f])
        }
    }

    fn open_dir(dir: &Path) -> Result<TensorSet> {
        let io = |err| LoadError::Io {
            path: dir.to_path_buf(),
            err,
        };
        let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        names.sort();
        let indexes: Vec<&PathBuf> = names
            .iter()
            .filter(|p| p.to_string_lossy().ends_with(".safetensors.index.json"))
            .collect();
        match indexes.as_slice() {
            [] => {
                let files = names
                    .iter()
                    .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                    .map(|p| SafetensorsFile::open(p))
                    .collect::<Result<Vec<_>>>()?;
                if files.is_empty() {
                    return Err(LoadError::UnknownLayout {
                        path: dir.to_path_buf(),
                        reason: "folder holds no .safetensors file".into(),
                    });
                }
                Self::from_files(dir, files)
            }
            [index] => Self::open_index(index),
            _ => Err(LoadError::UnknownLayout {
                path: dir.to_path_buf(),
                reason: "folder holds more than one *.safetensors.index.json".into(),
            }),
        }
    }

    /// Opens the shards named by a `*.safetensors.index.json` and checks that every key it
    /// lists is in the shard it names.
    pub fn open_index(index: &Path) -> Result<TensorSet> {
        let text = std::fs::read_to_string(index).map_err(|err| LoadError::Io {
            path: index.to_path_buf(),
            err,
        })?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| LoadError::InvalidJson {
                path: index.to_path_buf(),
                reason: e.to_string(),
            })?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| LoadError::InvalidJson {
                path: index.to_path_buf(),
                reason: "no \"weight_map\" object".into(),
            })?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut shard_names: Vec<&str> = Vec::new();
        for (key, shard) in map {
            let shard = shard.as_str().ok_or_else(|| LoadError::InvalidJson {
                path: index.to_path_buf(),
                reason: format!("weight_map entry {key:?} is not a file name"),
            })?;
            if !shard_names.contains(&shard) {
                if !dir.join(shard).is_file() {
                    return Err(LoadError::MissingShard {
                        index: index.to_path_buf(),
                        shard: shard.to_string(),
                        key: key.clone(),
                    });
                }
                shard_names.push(shard);
            }
        }
        shard_names.sort();
        let files = shard_names
            .iter()
            .map(|s| SafetensorsFile::open(&dir.join(s)))
            .collect::<Result<Vec<_>>>()?;
        let set = Self::from_files(dir, files)?;
        for (key, shard) in map {
            let shard = shard.as_str().unwrap_or_default();
            let in_shard = set
                .index
                .get(key)
                .is_some_and(|&i| set.files[i].path.file_name() == Some(shard.as_ref()));
            if !in_shard {
                return Err(LoadError::ShardMissingKey {
                    index: index.to_path_buf(),
                    shard: shard.to_string(),
                    key: key.clone(),
                });
            }
        }
        Ok(set)
    }

    fn from_files(root: &Path, files: Vec<SafetensorsFile>) -> Result<TensorSet> {
        let mut index = BTreeMap::new();
        for (i, f) in files.iter().enumerate() {
            for key in f.header.tensors.keys() {
                if index.insert(key.clone(), i).is_some() {
                    return Err(LoadError::DuplicateKey {
                        path: f.path.clone(),
                        key: key.clone(),
                    });
                }
            }
        }
        Ok(TensorSet {
            root: root.to_path_buf(),
            files,
            index,
        })
    }

    pub fn info(&self, key: &str) -> Option<&TensorInfo> {
        self.index
            .get(key)
            .and_then(|&i| self.files[i].header.tensors.get(key))
    }

    pub fn bytes(&self, key: &str) -> Option<MappedBytes> {
        self.index.get(key).and_then(|&i| self.files[i].bytes(key))
    }

    /// The file that holds `key` (the root when unknown).
    pub fn file_of(&self, key: &str) -> &Path {
        self.index
            .get(key)
            .map_or(&self.root, |&i| &self.files[i].path)
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.index.keys()
    }

    pub fn contains(&self, key: &str) -> bool {
        self.index.contains_key(key)
    }

    /// Total bytes of all files (what a user downloaded).
    pub fn total_file_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.file_len()).sum()
    }
}

/// One contiguous block of rows of a canonical weight, viewed in its file.
#[derive(Debug, Clone)]
pub struct WeightPart {
    pub bytes: MappedBytes,
    /// Rows (first dimension) this part contributes; 1 for scalars.
    pub rows: usize,
    /// fp8 weight scale (`scale_weight` / `weight_scale`): value = stored · scale.
    pub scale: Option<f32>,
    /// fp8 activation scale (`scale_input` / `input_scale`) for the fp8 GEMM path.
    pub input_scale: Option<f32>,
    /// The source key this part came from, for messages.
    pub source: String,
}

/// A weight under its canonical (BFL / HF) name. Layouts that split a canonical tensor (the
/// diffusers q/k/v) or reorder it (the final layer's halves) give several parts; the bytes stay
/// in the map, in their stored dtype, with their scales.
#[derive(Debug, Clone)]
pub struct Weight {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub parts: Vec<WeightPart>,
}

impl Weight {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Stored bytes (fp8 weights count one byte per element).
    pub fn nbytes(&self) -> usize {
        self.parts.iter().map(|p| p.bytes.len()).sum()
    }

    /// The weight dequantised to f32 (`stored · scale` per part), in canonical row order.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.numel());
        for p in &self.parts {
            decode_into(
                self.dtype,
                p.bytes.as_slice(),
                p.scale.unwrap_or(1.0),
                &mut out,
            );
        }
        out
    }

    /// The weight dequantised and rounded to bf16 (the GPU's 16-bit path).
    pub fn to_bf16(&self) -> Vec<bf16> {
        self.to_f32().into_iter().map(bf16::from_f32).collect()
    }
}

/// Where a canonical tensor comes from: a whole source tensor, or a block of its rows.
#[derive(Debug, Clone)]
pub struct Src {
    pub key: String,
    pub rows: Option<(usize, usize)>,
}

impl Src {
    pub fn whole(key: impl Into<String>) -> Src {
        Src {
            key: key.into(),
            rows: None,
        }
    }

    pub fn rows(key: impl Into<String>, begin: usize, end: usize) -> Src {
        Src {
            key: key.into(),
            rows: Some((begin, end)),
        }
    }
}

/// One expected canonical tensor: its name, the shape the config implies, and its sources.
#[derive(Debug, Clone)]
pub struct Expect {
    pub canonical: String,
    pub shape: Vec<usize>,
    pub sources: Vec<Src>,
}

impl Expect {
    /// A tensor stored under its canonical name.
    pub fn same(name: impl Into<String>, shape: Vec<usize>) -> Expect {
        let name = name.into();
        Expect {
            sources: vec![Src::whole(name.clone())],
            canonical: name,
            shape,
        }
    }
}

/// How a checkpoint stores its fp8 weights (spec 6.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quant {
    /// No fp8 tensors.
    None,
    /// fp8 weights without scales: dequantise by a plain cast.
    PlainFp8,
    /// ComfyUI legacy `scaled_fp8` marker with `<layer>.scale_weight` (and maybe `scale_input`).
    /// `fp8_matmul` is false when the marker has two elements (ComfyUI then dequantises).
    ScaledFp8 { fp8_matmul: bool },
    /// ComfyUI `comfy_quant` form: `<layer>.weight_scale`, optional `input_scale`.
    ComfyQuant,
}

impl std::fmt::Display for Quant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Quant::None => f.write_str("none"),
            Quant::PlainFp8 => f.write_str("fp8 (plain cast, no scales)"),
            Quant::ScaledFp8 { fp8_matmul: true } => f.write_str("ComfyUI scaled fp8"),
            Quant::ScaledFp8 { fp8_matmul: false } => {
                f.write_str("ComfyUI scaled fp8 (marked: dequantise, no fp8 matmul)")
            }
            Quant::ComfyQuant => f.write_str("ComfyUI comfy_quant fp8"),
        }
    }
}

/// Keys that may sit in a checkpoint without being weights the model uses. Anything else that is
/// not expected is reported, so a wrong or damaged file is caught rather than half-used.
/// - `scaled_fp8`: ComfyUI's fp8 marker (read for [`Quant`], holds no weight);
/// - `*.comfy_quant`: per-layer quantisation JSON of the comfy_quant form;
/// - `*.position_ids`: an int64 buffer older CLIP checkpoints carry;
/// - `text_projection.weight`: CLIP's image-text projection, which `CLIPTextModel` does not use;
/// - `encoder.embed_tokens.weight`: T5's tied copy of `shared.weight`.
pub const IGNORED_KEYS: &[&str] = &[
    "scaled_fp8",
    "*.comfy_quant",
    "*.position_ids",
    "text_projection.weight",
    "encoder.embed_tokens.weight",
    "logit_scale",
];

fn is_ignored(key: &str) -> bool {
    IGNORED_KEYS.iter().any(|pat| match pat.strip_prefix('*') {
        Some(suffix) => key.ends_with(suffix),
        None => key == *pat,
    })
}

/// Reads a scalar scale tensor; anything but one float element is an error naming the key.
fn read_scale(set: &TensorSet, key: &str) -> Result<Option<f32>> {
    let Some(info) = set.info(key) else {
        return Ok(None);
    };
    if info.numel() != 1 || !info.dtype.is_float() {
        return Err(LoadError::BadScale {
            path: set.file_of(key).to_path_buf(),
            key: key.to_string(),
            reason: format!(
                "fp8 scale must be one float (shape [] or [1]); found {} {:?}. HINT: per-channel or block scales are not supported",
                info.dtype, info.shape
            ),
        });
    }
    let mut v = Vec::new();
    decode_into(
        info.dtype,
        set.bytes(key).expect("key exists").as_slice(),
        1.0,
        &mut v,
    );
    if !v[0].is_finite() || v[0] <= 0.0 {
        return Err(LoadError::BadScale {
            path: set.file_of(key).to_path_buf(),
            key: key.to_string(),
            reason: format!("fp8 scale is {}, not a usable finite positive number", v[0]),
        });
    }
    Ok(Some(v[0]))
}

/// Detects the fp8 form of a checkpoint from its marker and scale keys.
pub fn detect_quant(set: &TensorSet, prefix: &str) -> Quant {
    let marker = format!("{prefix}scaled_fp8");
    if let Some(info) = set.info(&marker) {
        return Quant::ScaledFp8 {
            fp8_matmul: info.numel() != 2,
        };
    }
    if set
        .keys()
        .any(|k| k.ends_with(".comfy_quant") || k.ends_with(".weight_scale"))
    {
        return Quant::ComfyQuant;
    }
    if set
        .keys()
        .filter_map(|k| set.info(k))
        .any(|i| i.dtype.is_fp8())
    {
        return Quant::PlainFp8;
    }
    Quant::None
}

/// Named weights of one model component, in canonical names.
pub struct Component {
    /// What the component is ("transformer", "vae", "t5", "clip").
    pub kind: &'static str,
    /// Which file layout it was read from (e.g. "diffusers folder", "BFL single file").
    pub layout: &'static str,
    pub path: PathBuf,
    pub quant: Quant,
    pub weights: BTreeMap<String, Weight>,
    /// Bytes of the files behind this component.
    pub file_bytes: u64,
}

impl Component {
    pub fn get(&self, key: &str) -> Result<&Weight> {
        self.weights
            .get(key)
            .ok_or_else(|| LoadError::NoSuchTensor {
                component: self.kind.to_string(),
                key: key.to_string(),
            })
    }

    /// The weight `key` dequantised to f32.
    pub fn f32(&self, key: &str) -> Result<Vec<f32>> {
        Ok(self.get(key)?.to_f32())
    }

    pub fn param_count(&self) -> usize {
        self.weights.values().map(Weight::numel).sum()
    }

    pub fn stored_bytes(&self) -> usize {
        self.weights.values().map(Weight::nbytes).sum()
    }

    /// Number of weights of each stored dtype.
    pub fn dtype_counts(&self) -> BTreeMap<&'static str, usize> {
        let mut m = BTreeMap::new();
        for w in self.weights.values() {
            *m.entry(w.dtype.name()).or_insert(0) += 1;
        }
        m
    }
}

/// Whether a stored shape can stand for an expected one without moving bytes: equal, both
/// scalars (`[]` vs `[1]`), or equal up to trailing 1s (diffusers stores the autoencoder's 1×1
/// attention convolutions as linears, `[c, c]` for `[c, c, 1, 1]`).
fn shapes_match(stored: &[usize], expected: &[usize]) -> bool {
    fn trim(s: &[usize]) -> &[usize] {
        let mut n = s.len();
        while n > 1 && s[n - 1] == 1 {
            n -= 1;
        }
        &s[..n]
    }
    let numel = |s: &[usize]| s.iter().product::<usize>();
    stored == expected
        || (numel(stored) == 1 && numel(expected) == 1)
        || trim(stored) == trim(expected)
}

/// Builds a component from `set`: every expected tensor present with its config shape, every
/// other key used or on [`IGNORED_KEYS`]. All problems are gathered into one error. Source keys
/// are looked up as `prefix + key`; keys outside `prefix` are ignored (they belong to other
/// components of a whole-model file).
pub fn assemble(
    set: &TensorSet,
    kind: &'static str,
    layout: &'static str,
    prefix: &str,
    expects: &[Expect],
) -> Result<Component> {
    let quant = detect_quant(set, prefix);
    let mut used: BTreeMap<String, ()> = BTreeMap::new();
    let mut problems = Vec::new();
    let mut weights = BTreeMap::new();
    'expect: for e in expects {
        let mut parts = Vec::new();
        let mut dtype = None;
        let mut shape: Option<Vec<usize>> = None;
        for src in &e.sources {
            let key = format!("{prefix}{}", src.key);
            let Some(info) = set.info(&key) else {
                problems.push(format!(
                    "missing tensor {key} (needed for {} {:?})",
                    e.canonical, e.shape
                ));
                continue 'expect;
            };
            used.insert(key.clone(), ());
            if !info.dtype.is_float() {
                return Err(LoadError::NotAWeight {
                    path: set.file_of(&key).to_path_buf(),
                    key,
                    dtype: info.dtype.name(),
                });
            }
            if dtype.is_some_and(|d| d != info.dtype) {
                problems.push(format!(
                    "{key} is {} but the other parts of {} are {}",
                    info.dtype,
                    e.canonical,
                    dtype.expect("set")
                ));
                continue 'expect;
            }
            dtype = Some(info.dtype);
            let mut bytes = set.bytes(&key).expect("key exists");
            let mut part_shape = info.shape.clone();
            let rows = part_shape.first().copied().unwrap_or(1);
            let rows = if let Some((b, en)) = src.rows {
                if part_shape.is_empty() || b > en || en > rows {
                    problems.push(format!(
                        "{key}: shape {:?} has no rows {b}..{en} (needed for {})",
                        info.shape, e.canonical
                    ));
                    continue 'expect;
                }
                let row_bytes = bytes.len().checked_div(rows).unwrap_or(0);
                bytes = bytes.slice(b * row_bytes, (en - b) * row_bytes);
                part_shape[0] = en - b;
                en - b
            } else {
                rows
            };
            shape = Some(match shape {
                None => part_shape,
                Some(mut s) => {
                    if s.is_empty() || s.len() != part_shape.len() || s[1..] != part_shape[1..] {
                        problems.push(format!(
                            "{key}: shape {:?} cannot be stacked with the other parts of {}",
                            info.shape, e.canonical
                        ));
                        continue 'expect;
                    }
                    s[0] += part_shape[0];
                    s
                }
            });
            let (mut scale, mut input_scale) = (None, None);
            if info.dtype.is_fp8() {
                let stem = key.strip_suffix(".weight").unwrap_or(&key);
                for name in ["scale_weight", "weight_scale"] {
                    let k = format!("{stem}.{name}");
                    if let Some(s) = read_scale(set, &k)? {
                        scale = Some(s);
                        used.insert(k, ());
                    }
                }
                for name in ["scale_input", "input_scale"] {
                    let k = format!("{stem}.{name}");
                    if let Some(s) = read_scale(set, &k)? {
                        input_scale = Some(s);
                        used.insert(k, ());
                    }
                }
                if matches!(quant, Quant::ScaledFp8 { .. }) && scale.is_none() {
                    problems.push(format!(
                        "{key} is fp8 but has no {stem}.scale_weight. HINT: this file is a ComfyUI scaled fp8 checkpoint without scale_weight for this key; it is damaged or was written by a tool that drops scales"
                    ));
                    continue 'expect;
                }
            }
            parts.push(WeightPart {
                bytes,
                rows,
                scale,
                input_scale,
                source: key,
            });
        }
        let shape = shape.unwrap_or_default();
        if !shapes_match(&shape, &e.shape) {
            problems.push(format!(
                "{}: shape {:?} but the config needs {:?} (from {})",
                e.canonical,
                shape,
                e.shape,
                e.sources
                    .iter()
                    .map(|s| s.key.as_str())
                    .collect::<Vec<_>>()
                    .join(" + ")
            ));
            continue;
        }
        weights.insert(
            e.canonical.clone(),
            Weight {
                dtype: dtype.expect("at least one source"),
                shape: e.shape.clone(),
                parts,
            },
        );
    }
    for key in set.keys() {
        let Some(local) = key.strip_prefix(prefix) else {
            continue;
        };
        if !used.contains_key(key) && !is_ignored(local) {
            let scale_like = [
                ".scale_weight",
                ".weight_scale",
                ".scale_input",
                ".input_scale",
            ];
            let weight_of_scale = scale_like
                .iter()
                .find_map(|s| local.strip_suffix(s))
                .map(|stem| format!("{stem}.weight"));
            if weight_of_scale.as_deref().is_some_and(is_ignored) {
                // The scale of an ignored weight (e.g. T5's fp8 tied embedding copy) goes with it.
                continue;
            }
            if weight_of_scale.is_some() {
                // A scale whose weight is not fp8 (or absent): harmless but suspicious.
                problems.push(format!(
                    "unexpected scale {key}: its weight is missing or not fp8"
                ));
            } else {
                problems.push(format!("unexpected tensor {key}"));
            }
        }
    }
    if !problems.is_empty() {
        // A wrong config can produce thousands of lines; the first few say what is wrong.
        const SHOWN: usize = 20;
        if problems.len() > SHOWN {
            let more = problems.len() - SHOWN;
            problems.truncate(SHOWN);
            problems.push(format!("… and {more} more"));
        }
        return Err(LoadError::Layout {
            path: set.root.clone(),
            component: kind,
            problems,
        });
    }
    Ok(Component {
        kind,
        layout,
        path: set.root.clone(),
        quant,
        weights,
        file_bytes: set.total_file_bytes(),
    })
}
