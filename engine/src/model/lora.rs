//! LoRAs on a loaded transformer, applied as a low-rank side product of each patched linear.
//!
//! The base weights stay exactly as loaded (bf16, f32, or fp8 bytes with their scales); each
//! patched linear holds its LoRAs' `A [rank, in]` and `B [rows, rank]` and [`Backend::linear`]
//! adds `scale · (x·Aᵀ)·Bᵀ` to the output columns the pair patches (a diffusers `to_q` patches
//! the first third of the fused `qkv`). That is what PEFT computes for an unfused diffusers
//! adapter, and it makes a new strength, or a LoRA dropped, a matter of replacing a few small
//! tensors: [`Flux::set_loras`] between two edits, with nothing of the base model reloaded.
//!
//! The alternative, merging `ΔW` into the weight, is measured against the f32 merge in
//! `engine/tests/lora_e2e.rs` for fp8 weights (requantising the merged weight loses the LoRA in
//! the fp8 rounding, the side product keeps it exactly).

#![warn(missing_docs)]

use crate::backend::Backend;
use crate::error::{EngineError, Result};
use crate::memory::MemoryOptions;
use crate::model::Flux;
use crate::pipeline::{Device, Engine, Pipeline};
use crate::request::SizePlan;
use kontext_loader::{load_lora, Lora, LoraPatch, ModelPaths};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

/// A LoRA file attached at a strength.
#[derive(Debug, Clone)]
pub struct ActiveLora {
    /// The file, mapped onto canonical names ([`kontext_loader::load_lora`]).
    pub lora: Arc<Lora>,
    /// Multiplies `ΔW` (1 = as trained; 0 leaves the model unchanged).
    pub strength: f32,
}

/// One low-rank term on a linear, in host f32: rows `[row0, row0 + rows)` of the output gain
/// `scale · (x·Aᵀ)·Bᵀ`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraTerm {
    /// Rank of the pair.
    pub rank: usize,
    /// First output row (feature) it patches.
    pub row0: usize,
    /// Output rows it patches.
    pub rows: usize,
    /// `A`, `[rank, in]` row-major.
    pub down: Vec<f32>,
    /// `B`, `[rows, rank]` row-major.
    pub up: Vec<f32>,
    /// `strength · alpha / rank`.
    pub scale: f32,
}

impl LoraTerm {
    /// The term of `patch` at `strength`.
    pub fn new(patch: &LoraPatch, strength: f32) -> LoraTerm {
        LoraTerm {
            rank: patch.rank,
            row0: patch.row0,
            rows: patch.rows,
            down: patch.down.clone(),
            up: patch.up.clone(),
            scale: strength * patch.scale,
        }
    }
}

/// Checks that `terms` fit a linear `(out, inp)` named `key`.
pub(crate) fn check_terms(key: &str, (out, inp): (usize, usize), terms: &[LoraTerm]) -> Result<()> {
    for t in terms {
        if t.rank == 0
            || t.down.len() != t.rank * inp
            || t.up.len() != t.rows * t.rank
            || t.row0 + t.rows > out
        {
            return Err(EngineError::Config(format!(
                "LoRA on {key} [{out}, {inp}]: A has {} values, B {} for rank {} and rows {}..{}",
                t.down.len(),
                t.up.len(),
                t.rank,
                t.row0,
                t.row0 + t.rows
            )));
        }
    }
    Ok(())
}

impl<B: Backend> Flux<B> {
    /// Every linear layer with its canonical name (without `.weight`), and the backend.
    fn linears_mut(&mut self) -> (&B, Vec<(String, &mut B::Linear)>) {
        let Flux {
            backend,
            img_in,
            time_in,
            vector_in,
            guidance_in,
            txt_in,
            double_blocks,
            single_blocks,
            final_layer,
            ..
        } = self;
        let mut v: Vec<(String, &mut B::Linear)> = vec![
            ("img_in".into(), img_in),
            ("txt_in".into(), txt_in),
            ("time_in.in_layer".into(), &mut time_in.in_layer),
            ("time_in.out_layer".into(), &mut time_in.out_layer),
            ("vector_in.in_layer".into(), &mut vector_in.in_layer),
            ("vector_in.out_layer".into(), &mut vector_in.out_layer),
        ];
        if let Some(g) = guidance_in {
            v.push(("guidance_in.in_layer".into(), &mut g.in_layer));
            v.push(("guidance_in.out_layer".into(), &mut g.out_layer));
        }
        for (i, blk) in double_blocks.iter_mut().enumerate() {
            let p = format!("double_blocks.{i}");
            v.push((format!("{p}.img_mod.lin"), &mut blk.img_mod.lin));
            v.push((format!("{p}.img_attn.qkv"), &mut blk.img_attn.qkv));
            v.push((format!("{p}.img_attn.proj"), &mut blk.img_attn.proj));
            v.push((format!("{p}.img_mlp.0"), &mut blk.img_mlp.fc0));
            v.push((format!("{p}.img_mlp.2"), &mut blk.img_mlp.fc2));
            v.push((format!("{p}.txt_mod.lin"), &mut blk.txt_mod.lin));
            v.push((format!("{p}.txt_attn.qkv"), &mut blk.txt_attn.qkv));
            v.push((format!("{p}.txt_attn.proj"), &mut blk.txt_attn.proj));
            v.push((format!("{p}.txt_mlp.0"), &mut blk.txt_mlp.fc0));
            v.push((format!("{p}.txt_mlp.2"), &mut blk.txt_mlp.fc2));
        }
        for (i, blk) in single_blocks.iter_mut().enumerate() {
            let p = format!("single_blocks.{i}");
            v.push((format!("{p}.linear1"), &mut blk.linear1));
            v.push((format!("{p}.linear2"), &mut blk.linear2));
            v.push((format!("{p}.modulation.lin"), &mut blk.modulation.lin));
        }
        v.push((
            "final_layer.adaLN_modulation.1".into(),
            &mut final_layer.ada_ln_modulation,
        ));
        v.push(("final_layer.linear".into(), &mut final_layer.linear));
        (backend, v)
    }

    /// Makes `loras` (at their strengths) the LoRAs of this model, replacing whatever was
    /// attached before; an empty list gives the base model back. Only the LoRAs' small `A` and
    /// `B` move: the base weights are not touched. A LoRA whose target the model does not have
    /// is an error naming it.
    pub fn set_loras(&mut self, loras: &[ActiveLora]) -> Result<()> {
        let mut terms: BTreeMap<&str, Vec<LoraTerm>> = BTreeMap::new();
        for a in loras.iter().filter(|a| a.strength != 0.0) {
            for p in &a.lora.patches {
                let name = p.target.strip_suffix(".weight").unwrap_or(&p.target);
                terms
                    .entry(name)
                    .or_default()
                    .push(LoraTerm::new(p, a.strength));
            }
        }
        let (b, linears) = self.linears_mut();
        let unknown: Vec<&str> = terms
            .keys()
            .filter(|k| !linears.iter().any(|(n, _)| n == *k))
            .copied()
            .collect();
        if !unknown.is_empty() {
            return Err(EngineError::Config(format!(
                "LoRA targets this transformer does not have: {}",
                unknown.join(", ")
            )));
        }
        for (name, lin) in linears {
            let t = terms.remove(name.as_str()).unwrap_or_default();
            b.set_lora(lin, &name, &t)?;
        }
        self.loras = loras.to_vec();
        Ok(())
    }
}

/// A LoRA file and its strength, as given at load (`--lora FILE[:STRENGTH]`).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    /// The `.safetensors` file.
    pub path: PathBuf,
    /// Multiplies `ΔW`; 1 = as trained.
    pub strength: f32,
}

impl LoraSpec {
    /// Parses `FILE[:STRENGTH]` (strength 1 when absent). Only a suffix that parses as a number
    /// is a strength, so a path with a colon in it stays a path.
    pub fn parse(s: &str) -> std::result::Result<LoraSpec, String> {
        if let Some((path, strength)) = s.rsplit_once(':') {
            if let Ok(v) = strength.parse::<f32>() {
                if !v.is_finite() {
                    return Err(format!(
                        "{s}: the LoRA strength {strength} is not a finite number"
                    ));
                }
                if path.is_empty() {
                    return Err(format!("{s}: no LoRA file before the strength"));
                }
                return Ok(LoraSpec {
                    path: path.into(),
                    strength: v,
                });
            }
        }
        if s.is_empty() {
            return Err("an empty --lora value; expected FILE[:STRENGTH]".into());
        }
        Ok(LoraSpec {
            path: s.into(),
            strength: 1.0,
        })
    }
}

impl Pipeline {
    /// [`Pipeline::load`], then the LoRAs `specs` attached at their strengths. Each file is
    /// mapped onto the transformer's config first; any key that cannot be placed is an error
    /// naming the file and the keys.
    pub fn load_with_loras(
        paths: &ModelPaths,
        device: Device,
        specs: &[LoraSpec],
    ) -> Result<Pipeline> {
        Pipeline::load_configured(paths, device, specs, &MemoryOptions::default(), None)
    }

    /// [`Pipeline::load_with_loras`] with the memory plan made for `design` under `memory`
    /// ([`Pipeline::load_with`]).
    pub fn load_configured(
        paths: &ModelPaths,
        device: Device,
        specs: &[LoraSpec],
        memory: &MemoryOptions,
        design: Option<(&SizePlan, usize)>,
    ) -> Result<Pipeline> {
        let mut p = Pipeline::load_with(paths, device, memory, design)?;
        let loras = specs
            .iter()
            .map(|s| {
                Ok(ActiveLora {
                    lora: Arc::new(load_lora(&s.path, p.flux_config())?),
                    strength: s.strength,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        p.set_loras(&loras)?;
        Ok(p)
    }

    /// The LoRAs attached now, in order, with their strengths.
    pub fn loras(&self) -> &[ActiveLora] {
        match &self.engine {
            Engine::Cpu(m) => &m.flux.loras,
            Engine::Cuda(m) => &m.flux.loras,
        }
    }

    /// Replaces the attached LoRAs (new strengths, one dropped, another added) between requests;
    /// the base weights are not reloaded ([`Flux::set_loras`]).
    pub fn set_loras(&mut self, loras: &[ActiveLora]) -> Result<()> {
        match &mut self.engine {
            Engine::Cpu(m) => m.flux.set_loras(loras),
            Engine::Cuda(m) => m.flux.set_loras(loras),
        }
    }
}
