//! The flow-matching schedule's shift parameters (`scheduler/scheduler_config.json`, spec 3.3).

use crate::config::{config_err, JsonConfig};
use crate::error::Result;
use std::path::Path;

/// Resolution-dependent shift: `mu` is linear in the target token count, from `base_shift` at
/// `base_image_seq_len` tokens to `max_shift` at `max_image_seq_len` (extrapolated outside).
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    pub base_image_seq_len: usize,
    pub max_image_seq_len: usize,
    pub base_shift: f64,
    pub max_shift: f64,
}

impl Default for SchedulerConfig {
    /// FLUX.1's values, used by the BFL reference and shipped in the HF folder.
    fn default() -> Self {
        SchedulerConfig {
            base_image_seq_len: 256,
            max_image_seq_len: 4096,
            base_shift: 0.5,
            max_shift: 1.15,
        }
    }
}

impl SchedulerConfig {
    /// Reads `scheduler_config.json` (missing fields take the FLUX.1 defaults). Only the
    /// dynamic exponential shift of FLUX is supported; anything else is an error.
    pub fn read(path: &Path) -> Result<SchedulerConfig> {
        let j = JsonConfig::read(path)?;
        let d = SchedulerConfig::default();
        if !j.bool_or("use_dynamic_shifting", true) {
            return Err(config_err(
                path,
                "use_dynamic_shifting is false; FLUX.1 Kontext shifts the schedule by resolution",
            ));
        }
        let kind = j.str_or("time_shift_type", "exponential");
        if kind != "exponential" {
            return Err(config_err(
                path,
                format!("time_shift_type {kind:?}: only \"exponential\" (FLUX.1) is supported"),
            ));
        }
        let cfg = SchedulerConfig {
            base_image_seq_len: j.usize_or("base_image_seq_len", d.base_image_seq_len)?,
            max_image_seq_len: j.usize_or("max_image_seq_len", d.max_image_seq_len)?,
            base_shift: j.f64_or("base_shift", d.base_shift)?,
            max_shift: j.f64_or("max_shift", d.max_shift)?,
        };
        // mu sets exp(mu) in the time shift: keep it where the schedule stays a schedule.
        let shifts_ok = [cfg.base_shift, cfg.max_shift]
            .iter()
            .all(|v| v.is_finite() && v.abs() <= 10.0);
        if !shifts_ok {
            return Err(config_err(path, format!("base_shift {} / max_shift {} must be finite and within ±10 (FLUX.1: 0.5 / 1.15)", cfg.base_shift, cfg.max_shift)));
        }
        if cfg.max_image_seq_len <= cfg.base_image_seq_len {
            return Err(config_err(
                path,
                "max_image_seq_len must exceed base_image_seq_len",
            ));
        }
        Ok(cfg)
    }

    /// `mu` for a target of `image_seq_len` tokens.
    pub fn mu(&self, image_seq_len: usize) -> f64 {
        let m = (self.max_shift - self.base_shift)
            / (self.max_image_seq_len - self.base_image_seq_len) as f64;
        let b = self.base_shift - m * self.base_image_seq_len as f64;
        m * image_seq_len as f64 + b
    }
}
