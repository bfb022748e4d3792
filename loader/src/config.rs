//! Small helpers shared by the component loaders: reading `config.json` fields and sizing a
//! model from tensor shapes when a single file carries no config.

use crate::error::{LoadError, Result};
use crate::tensors::TensorSet;
use std::path::Path;

pub(crate) fn config_err(path: &Path, reason: impl Into<String>) -> LoadError {
    LoadError::Config {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// A parsed `config.json` with typed field access that names the file and field on error.
pub(crate) struct JsonConfig {
    pub path: std::path::PathBuf,
    pub json: serde_json::Value,
}

impl JsonConfig {
    pub fn read(path: &Path) -> Result<JsonConfig> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let json = serde_json::from_str(&text).map_err(|e| LoadError::InvalidJson {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Ok(JsonConfig {
            path: path.to_path_buf(),
            json,
        })
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        self.json
            .get(key)
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .ok_or_else(|| config_err(&self.path, format!("missing or non-integer \"{key}\"")))
    }

    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        match self.json.get(key) {
            None | Some(serde_json::Value::Null) => Ok(default),
            Some(_) => self.usize(key),
        }
    }

    pub fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.json.get(key) {
            None | Some(serde_json::Value::Null) => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| config_err(&self.path, format!("\"{key}\" is not a number"))),
        }
    }

    pub fn f32_or(&self, key: &str, default: f32) -> Result<f32> {
        Ok(self.f64_or(key, default as f64)? as f32)
    }

    pub fn str_or<'a>(&'a self, key: &str, default: &'a str) -> &'a str {
        self.json
            .get(key)
            .and_then(|v| v.as_str())
            .unwrap_or(default)
    }

    pub fn bool_or(&self, key: &str, default: bool) -> bool {
        self.json
            .get(key)
            .and_then(|v| v.as_bool())
            .unwrap_or(default)
    }

    pub fn usize_list(&self, key: &str) -> Result<Vec<usize>> {
        self.json
            .get(key)
            .and_then(|v| v.as_array())
            .and_then(|a| {
                a.iter()
                    .map(|x| x.as_u64().map(|x| x as usize))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| config_err(&self.path, format!("missing or malformed list \"{key}\"")))
    }
}

/// Reads tensor shapes to size a model stored without a config.
pub(crate) struct Shapes<'a> {
    pub set: &'a TensorSet,
    pub prefix: &'a str,
}

impl Shapes<'_> {
    /// Dimension `i` of tensor `key` (prefix added), or an error naming the key.
    pub fn dim(&self, key: &str, i: usize) -> Result<usize> {
        let full = format!("{}{key}", self.prefix);
        let info = self.set.info(&full).ok_or_else(|| {
            config_err(
                &self.set.root,
                format!("cannot size the model: tensor {full} is missing"),
            )
        })?;
        info.shape.get(i).copied().ok_or_else(|| {
            config_err(
                &self.set.root,
                format!(
                    "tensor {full} has shape {:?}, expected at least {} dims",
                    info.shape,
                    i + 1
                ),
            )
        })
    }

    /// Number of numbered children `N` under `{prefix}{parent}N.` (highest N + 1).
    pub fn count(&self, parent: &str) -> usize {
        let p = format!("{}{parent}", self.prefix);
        self.set
            .keys()
            .filter_map(|k| k.strip_prefix(&p))
            .filter_map(|r| r.split('.').next()?.parse::<usize>().ok())
            .map(|n| n + 1)
            .max()
            .unwrap_or(0)
    }

    pub fn has(&self, key: &str) -> bool {
        self.set.contains(&format!("{}{key}", self.prefix))
    }
}

/// Appends `name.weight` [out, in, …] and `name.bias` [out] to `v`.
pub(crate) fn push_layer(
    v: &mut Vec<(String, Vec<usize>)>,
    name: &str,
    weight: Vec<usize>,
    bias: bool,
) {
    let out = weight[0];
    v.push((format!("{name}.weight"), weight));
    if bias {
        v.push((format!("{name}.bias"), vec![out]));
    }
}
