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

/// Largest integer accepted in a config: far above every real width or count (the widest Flux
/// tensor dimension is 21504, the largest vocabulary 49408), small enough that products of a
/// few of them cannot overflow.
pub(crate) const MAX_CONFIG_INT: usize = 1 << 24;

/// A parsed `config.json` with typed field access that names the file and field on error.
pub(crate) struct JsonConfig {
    pub path: std::path::PathBuf,
    pub json: serde_json::Value,
}

impl JsonConfig {
    pub fn read(path: &Path) -> Result<JsonConfig> {
        let text = std::fs::read_to_string(path).map_err(|err| LoadError::Io {
            path: path.to_path_buf(),
            err,
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

    /// A non-negative integer field, at most [`MAX_CONFIG_INT`].
    pub fn usize(&self, key: &str) -> Result<usize> {
        let v =
            self.json.get(key).and_then(|v| v.as_u64()).ok_or_else(|| {
                config_err(&self.path, format!("missing or non-integer \"{key}\""))
            })?;
        if v > MAX_CONFIG_INT as u64 {
            return Err(config_err(
                &self.path,
                format!(
                    "\"{key}\" is {v}, beyond any plausible model size (limit {MAX_CONFIG_INT})"
                ),
            ));
        }
        Ok(v as usize)
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

    /// A normalisation epsilon: finite, in (0, 1).
    pub fn eps_or(&self, key: &str, default: f32) -> Result<f32> {
        let v = self.f32_or(key, default)?;
        if !(v > 0.0 && v < 1.0) {
            return Err(config_err(
                &self.path,
                format!("\"{key}\" is {v}; an epsilon must be in (0, 1)"),
            ));
        }
        Ok(v)
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
            .filter(|l| l.iter().all(|&x| x <= MAX_CONFIG_INT) && l.len() <= 64)
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

    /// Number of numbered children `N` under `{prefix}{parent}N.`. The indices must run
    /// 0..count without a gap, so a stray key like `double_blocks.99999999.x` is reported
    /// instead of sizing a model with a hundred million blocks.
    pub fn count(&self, parent: &str) -> Result<usize> {
        let p = format!("{}{parent}", self.prefix);
        let indices: std::collections::BTreeSet<u64> = self
            .set
            .keys()
            .filter_map(|k| k.strip_prefix(&p))
            .filter_map(|r| r.split('.').next()?.parse::<u64>().ok())
            .collect();
        match indices.last() {
            None => Ok(0),
            Some(&last) if last as usize == indices.len() - 1 => Ok(indices.len()),
            Some(&last) => {
                let missing = (0..=last).find(|i| !indices.contains(i)).unwrap_or(0);
                Err(config_err(
                    &self.set.root,
                    format!("{p}N: highest index is {last} but {p}{missing} is missing ({} blocks present)", indices.len()),
                ))
            }
        }
    }

    /// Checks a count read from a config against the blocks present (`field` names it).
    pub fn expect_count(&self, parent: &str, n: usize, field: &str) -> Result<()> {
        let present = self.count(parent)?;
        if present != n {
            return Err(config_err(
                &self.set.root,
                format!(
                    "config says {field} = {n} but the checkpoint holds {present} ({}{parent}N)",
                    self.prefix
                ),
            ));
        }
        Ok(())
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
