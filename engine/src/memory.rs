//! The device-memory plan of a request, made before any weight moves to the device.
//!
//! A plan is measured, not estimated: the four models are built on [`CudaBackend::planner`]
//! with the placement a mode asks for (headers only: the planner counts every weight's device
//! or host bytes without reading it), and every stage of the request is run as a plan at the
//! request's sizes (the same model calls the real run makes, which size its activation pools the
//! same way). A stage's peak is then the resident weights, the two streaming slots, the GEMM
//! workspace and the stage's pools; the request's peak is the largest stage's. A real run's
//! measured peak ([`kontext_kernels::Gpu::peak_bytes`], the device's allocation counter) cannot
//! exceed it: every device allocation of a run is one of these.
//!
//! Modes, tried in order, the first that fits the device is taken:
//! 1. [`Mode::Resident`]: every weight on the device, as stored (or `--weights`).
//! 2. [`Mode::Fp8`]: the transformer's linear weights in float8 (fp8 files as they are, others
//!    quantised at load); T5 and CLIP stream from host memory, one weight ahead of use, so they
//!    hold two slots of device memory instead of 9.8 GB.
//! 3. [`Mode::Stream`]: as 2, and the modulation weights (3.2 B parameters used once per request,
//!    by the conditioning) stream too, and then as many transformer blocks as needed, chosen
//!    evenly over the depth so each streamed copy hides behind resident blocks' work.

#![warn(missing_docs)]

use crate::backend::{Placement, StreamRule, WeightTally};
use crate::error::{EngineError, Result};
use crate::pipeline::{Components, Models, CLIP_MAX_LENGTH, T5_MAX_LENGTH};
use crate::request::SizePlan;
use crate::sampling::{image_ids, txt_ids};
use crate::vae::Latent;
use crate::{Backend, CudaBackend, FluxInputs};
use std::collections::BTreeSet;
use std::sync::Arc;

/// One gibibyte: card sizes are binary (a "24 GB" card has 24 GiB).
pub const GIB: u64 = 1 << 30;

/// PCIe bandwidth the streaming cost is stated at: a PCIe 4.0 ×16 link's usual host-to-device
/// rate from page-locked memory.
pub const PCIE_BYTES_PER_S: f64 = 25e9;

/// How the weights are placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mode {
    /// Everything resident.
    Resident,
    /// Transformer in fp8, text encoders streamed from host memory.
    Fp8,
    /// As [`Mode::Fp8`], plus the modulation weights and some transformer blocks streamed.
    Stream,
}

impl Mode {
    /// The name in messages, `--memory-mode` and `--json`.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Resident => "resident",
            Mode::Fp8 => "fp8",
            Mode::Stream => "stream",
        }
    }

    /// Parses [`Mode::name`].
    pub fn parse(s: &str) -> std::result::Result<Mode, String> {
        match s {
            "resident" | "1" => Ok(Mode::Resident),
            "fp8" | "2" => Ok(Mode::Fp8),
            "stream" | "3" => Ok(Mode::Stream),
            _ => Err(format!(
                "unknown memory mode {s:?}; expected resident, fp8 or stream"
            )),
        }
    }

    /// Every mode, in the order they are tried.
    pub const ALL: [Mode; 3] = [Mode::Resident, Mode::Fp8, Mode::Stream];
}

/// The transformer's linear weights' type on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightType {
    /// bf16 (weights stored in fp8 stay fp8 even so: they are not widened).
    Bf16,
    /// float8 e4m3fn with per-tensor scales.
    Fp8,
}

impl WeightType {
    /// Parses `bf16` or `fp8`.
    pub fn parse(s: &str) -> std::result::Result<WeightType, String> {
        match s {
            "bf16" => Ok(WeightType::Bf16),
            "fp8" => Ok(WeightType::Fp8),
            _ => Err(format!("unknown weight type {s:?}; expected bf16 or fp8")),
        }
    }
}

/// What the caller asks of the plan.
#[derive(Debug, Clone, Default)]
pub struct MemoryOptions {
    /// Plan for a device of this many bytes instead of the free memory of the one present.
    pub vram: Option<u64>,
    /// The transformer's weight type (default: as stored in mode 1, fp8 in modes 2 and 3).
    pub weights: Option<WeightType>,
    /// Take this mode instead of the first that fits.
    pub mode: Option<Mode>,
    /// In [`Mode::Stream`], keep exactly this many transformer blocks resident instead of as
    /// many as fit (checks and benchmarks).
    pub resident_blocks: Option<usize>,
}

/// Where each component's weights go.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The mode this layout realises.
    pub mode: Mode,
    /// The transformer's placement.
    pub transformer: Placement,
    /// T5's and CLIP's.
    pub text: Placement,
    /// Transformer blocks (`double_blocks.i` / `single_blocks.i`) whose linear weights stream.
    pub streamed_blocks: Vec<String>,
    /// Transformer blocks in all.
    pub blocks: usize,
}

impl Layout {
    /// Everything resident as stored: what [`crate::pipeline::Pipeline::load`] did before plans.
    pub fn resident() -> Layout {
        Layout {
            mode: Mode::Resident,
            transformer: Placement::default(),
            text: Placement::default(),
            streamed_blocks: Vec::new(),
            blocks: 0,
        }
    }
}

/// Whether the transformer's linear `key` is a modulation (adaLN) layer: used only by
/// [`crate::Flux::conditioning`], once per request.
pub fn is_modulation(key: &str) -> bool {
    key.ends_with("_mod.lin")
        || key.ends_with("modulation.lin")
        || key.starts_with("final_layer.adaLN_modulation")
}

/// The block a transformer key belongs to (`double_blocks.3`), if any.
pub fn block_of(key: &str) -> Option<&str> {
    let first = key.find('.')?;
    let end = key[first + 1..]
        .find('.')
        .map_or(key.len(), |i| first + 1 + i);
    let block = &key[..end];
    (block.starts_with("double_blocks.") || block.starts_with("single_blocks.")).then_some(block)
}

/// The layout of `mode` with the transformer's linears in `weights` and `streamed` blocks.
pub fn layout(mode: Mode, weights: WeightType, streamed: Vec<String>, blocks: usize) -> Layout {
    let fp8 = weights == WeightType::Fp8;
    let (text, transformer_stream) = match mode {
        Mode::Resident => (StreamRule::None, StreamRule::None),
        Mode::Fp8 => (StreamRule::All, StreamRule::None),
        Mode::Stream => {
            let set: BTreeSet<String> = streamed.iter().cloned().collect();
            let rule = move |key: &str| {
                is_modulation(key) || block_of(key).is_some_and(|b| set.contains(b))
            };
            (StreamRule::All, StreamRule::Keys(Arc::new(rule)))
        }
    };
    Layout {
        mode,
        transformer: Placement {
            fp8,
            stream: transformer_stream,
        },
        text: Placement {
            fp8: false,
            stream: text,
        },
        streamed_blocks: streamed,
        blocks,
    }
}

/// Activation pools of each stage of one request, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StagePools {
    /// T5 (then CLIP, after T5's pool is gone).
    pub text: u64,
    /// The largest reference's VAE encoding.
    pub context: u64,
    /// Every step's conditioning (lives through the loop).
    pub conditioning: u64,
    /// One denoising step.
    pub step: u64,
    /// The VAE decoding.
    pub decode: u64,
}

impl StagePools {
    /// The pools live at each stage's peak, by stage (the conditioning lives through the loop).
    pub fn by_stage(&self) -> [(&'static str, u64); 4] {
        [
            ("text", self.text),
            ("context", self.context),
            ("denoise", self.conditioning + self.step),
            ("decode", self.decode),
        ]
    }
}

/// The peak of one stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagePeak {
    /// `text`, `context`, `denoise`, `decode`.
    pub stage: &'static str,
    /// Its activation pools.
    pub pools: u64,
    /// Weights, slots, workspace and pools.
    pub peak: u64,
}

/// A request's plan in one mode.
#[derive(Debug, Clone)]
pub struct MemoryPlan {
    /// Where the weights go.
    pub layout: Layout,
    /// The transformer's linear weight type.
    pub weights: WeightType,
    /// Weight bytes by component, cumulative tallies taken as each was loaded.
    pub components: Vec<(&'static str, WeightTally)>,
    /// Device bytes of resident weights (all components).
    pub weight_bytes: u64,
    /// The two streaming slots.
    pub slot_bytes: u64,
    /// The GEMM workspace.
    pub workspace_bytes: u64,
    /// Per stage.
    pub stages: Vec<StagePeak>,
    /// The largest stage peak.
    pub peak_bytes: u64,
    /// Page-locked host memory of the streamed weights.
    pub host_bytes: u64,
    /// Bytes copied from host memory per denoising step (streamed blocks).
    pub streamed_per_step: u64,
    /// Tokens: text, target, context.
    pub tokens: (usize, usize, usize),
    /// FLOPs of one denoising step (GEMMs and attention, spec 7.1).
    pub flops_per_step: f64,
}

impl MemoryPlan {
    /// The mode.
    pub fn mode(&self) -> Mode {
        self.layout.mode
    }

    /// Seconds per step the streamed copies take at [`PCIE_BYTES_PER_S`] (an upper bound of
    /// what streaming adds: copies overlap the compute of the blocks around them).
    pub fn stream_seconds_per_step(&self) -> f64 {
        self.streamed_per_step as f64 / PCIE_BYTES_PER_S
    }

    /// One line for the run's notes.
    pub fn summary(&self) -> String {
        let w = match self.weights {
            WeightType::Bf16 => "bf16",
            WeightType::Fp8 => "fp8",
        };
        let what = match self.mode() {
            Mode::Resident => format!("every weight resident, transformer {w}"),
            Mode::Fp8 => format!(
                "transformer {w}, text encoders streamed from host memory"
            ),
            Mode::Stream => format!(
                "transformer {w}, text encoders and modulation streamed, {} of {} blocks streamed ({:.2} GB per step, ≤ {:.2} s per step at {:.0} GB/s)",
                self.layout.streamed_blocks.len(),
                self.layout.blocks,
                self.streamed_per_step as f64 / 1e9,
                self.stream_seconds_per_step(),
                PCIE_BYTES_PER_S / 1e9
            ),
        };
        let host = if self.host_bytes > 0 {
            format!(", {} of page-locked host memory", gib(self.host_bytes))
        } else {
            String::new()
        };
        format!(
            "memory mode {} ({what}); planned peak {}{host}",
            self.mode().name(),
            gib(self.peak_bytes)
        )
    }
}

/// `bytes` as GiB with two decimals (MiB below 1 GiB, so small plans stay readable).
pub fn gib(bytes: u64) -> String {
    if bytes < GIB {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.2} GiB", bytes as f64 / GIB as f64)
    }
}

/// The activation pools of every stage of a request of `sizes` on `m` (a planner or a real
/// backend, in planning scopes: nothing is allocated or launched).
pub fn stage_pools(m: &Models<CudaBackend>, sizes: &SizePlan, steps: usize) -> Result<StagePools> {
    let b = &m.flux.backend;
    let t5_ids = vec![0u32; T5_MAX_LENGTH];
    let clip_ids = vec![0u32; CLIP_MAX_LENGTH];
    let t5 = b.plan_bytes(&mut || m.t5.forward(&t5_ids, None).map(drop))?;
    let clip = b.plan_bytes(&mut || m.clip.forward(&clip_ids, None).map(drop))?;
    let mut context = 0;
    let z = m.vae.config.z_channels;
    let mut nc = 0;
    for &(w, h) in &sizes.references {
        let pixels = vec![0.0; 3 * w * h];
        context = context.max(b.plan_bytes(&mut || m.vae.encode(&pixels, h, w, None).map(drop))?);
        nc += (w / 16) * (h / 16);
    }
    let (lh, lw) = (sizes.height / 8, sizes.width / 8);
    let nx = (lh / 2) * (lw / 2);
    let f = &m.flux;
    let pooled = vec![0.0; f.config.vec_in_dim];
    let ts = vec![0.5; steps.max(1)];
    let conditioning = b.plan_bytes(&mut || f.conditioning(&ts, 2.5, &pooled).map(drop))?;
    let cond = b.with_scope(kontext_kernels::arena::Pool::plan(), true, &mut || {
        f.conditioning(&ts[..1], 2.5, &pooled)
    })?;
    let x = vec![0.0; nx * f.config.in_channels];
    let ctx = vec![0.0; nc * f.config.in_channels];
    let mut ids = image_ids(lh / 2, lw / 2, 0.0);
    ids.resize((nx + nc) * 3, 1.0);
    let txt = vec![0.0; T5_MAX_LENGTH * f.config.context_in_dim];
    let tids = txt_ids(T5_MAX_LENGTH);
    let inp = FluxInputs {
        img: &[],
        img_ids: &ids,
        txt: &txt,
        txt_ids: &tids,
        t: 0.5,
        guidance: 2.5,
        y: &pooled,
    };
    let step = b.plan_bytes(&mut || f.denoise_plan(&x, &ctx, &inp, &cond[0], -0.1))?;
    let latent = Latent {
        data: vec![0.0; z * lh * lw],
        channels: z,
        height: lh,
        width: lw,
    };
    let decode = b.plan_bytes(&mut || m.vae.decode(&latent, None).map(drop))?;
    Ok(StagePools {
        text: t5.max(clip) as u64,
        context: context as u64,
        conditioning: conditioning as u64,
        step: step as u64,
        decode: decode as u64,
    })
}

/// The GEMM workspace a device of compute capability `cc` gets (see `kontext_kernels::gemm`);
/// Hopper's, the larger, when planning for a device that is not there.
pub fn workspace_bytes(cc: Option<(i32, i32)>) -> u64 {
    match cc {
        Some((major, _)) if major < 9 => 4 << 20,
        _ => 32 << 20,
    }
}

/// FLOPs of one step at `l` joint tokens, `ni` image and `nx` target tokens (spec 7.1, as
/// `benches/flops.py` counts them).
pub fn flops_per_step(c: &kontext_loader::FluxConfig, lt: usize, ni: usize, nx: usize) -> f64 {
    let (d, m) = (c.hidden_size as f64, c.mlp_hidden as f64);
    let blocks = (c.depth + c.depth_single) as f64;
    let l = (lt + ni) as f64;
    let wblk = 4.0 * d * d + 2.0 * d * m;
    2.0 * wblk * blocks * l
        + blocks * 4.0 * d * l * l
        + 2.0 * ni as f64 * c.in_channels as f64 * d
        + 2.0 * lt as f64 * c.context_in_dim as f64 * d
        + 2.0 * nx as f64 * d * c.out_channels as f64
}

/// Linear weight elements of each transformer block, in forward order (double blocks, then
/// single), modulation excluded (it streams in every streaming layout).
fn block_elements(c: &Components) -> Vec<(String, u64, u64)> {
    let mut blocks: Vec<(String, u64, u64)> = Vec::new();
    let f = &c.transformer.config;
    let names = (0..f.depth)
        .map(|i| format!("double_blocks.{i}"))
        .chain((0..f.depth_single).map(|i| format!("single_blocks.{i}")));
    for name in names {
        let prefix = format!("{name}.");
        let (mut total, mut largest) = (0u64, 0u64);
        for (key, w) in c.transformer.weights.weights.range(prefix.clone()..) {
            if !key.starts_with(&prefix) {
                break;
            }
            let linear = key.strip_suffix(".weight");
            if w.shape.len() == 2 && linear.is_some_and(|k| !is_modulation(k)) {
                let n = w.numel() as u64;
                total += n;
                largest = largest.max(n);
            }
        }
        blocks.push((name, total, largest));
    }
    blocks
}

/// Block indices in an order that spreads any prefix of it evenly over the depth.
fn spread_order(n: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    // Sort by the bit-reversed position: 0, n/2, n/4, 3n/4, …
    let bits = usize::BITS - n.max(1).leading_zeros();
    idx.sort_by_key(|&i| (i.reverse_bits() >> (usize::BITS - bits), i));
    idx
}

/// Plans the request `sizes` in `mode` on the components `c`.
pub fn plan_mode(
    c: &Components,
    sizes: &SizePlan,
    steps: usize,
    mode: Mode,
    opts: &MemoryOptions,
    budget: Option<u64>,
    cc: Option<(i32, i32)>,
) -> Result<MemoryPlan> {
    let stored_fp8 = c
        .transformer
        .weights
        .weights
        .values()
        .any(|w| w.dtype.is_fp8() && w.shape.len() == 2);
    let weights = opts.weights.unwrap_or(match mode {
        Mode::Resident if !stored_fp8 => WeightType::Bf16,
        _ => WeightType::Fp8,
    });
    let blocks = block_elements(c);
    let lay = layout(mode, weights, Vec::new(), blocks.len());
    let b = CudaBackend::planner();
    let models = Models::from_components(b.clone(), c, &lay)?;
    let pools = stage_pools(&models, sizes, steps)?;
    let components = models.weights_by_part.clone();
    let tally = b.weight_tally();
    let mut plan = assemble(lay, weights, components, tally, pools, sizes, c, cc);
    if mode == Mode::Stream {
        // Streaming block k moves its linear weights from the device to host memory.
        let bytes_per = if weights == WeightType::Fp8 { 1 } else { 2 };
        let order = spread_order(blocks.len());
        let budget_blocks = opts.resident_blocks.map(|r| blocks.len().saturating_sub(r));
        let mut streamed: Vec<String> = Vec::new();
        let mut moved = 0u64;
        let mut largest = tally.largest_streamed;
        for &i in &order {
            let done = match budget_blocks {
                Some(n) => streamed.len() >= n,
                None => budget.is_none_or(|t| plan.peak_bytes <= t),
            };
            if done {
                break;
            }
            let (name, elems, big) = &blocks[i];
            streamed.push(name.clone());
            moved += elems * bytes_per;
            largest = largest.max(big * bytes_per);
            let mut t = tally;
            t.device -= moved;
            t.host += moved;
            t.largest_streamed = largest;
            let lay = layout(mode, weights, streamed.clone(), blocks.len());
            plan = assemble(
                lay,
                weights,
                plan.components.clone(),
                t,
                pools,
                sizes,
                c,
                cc,
            );
            plan.streamed_per_step = moved;
        }
    }
    Ok(plan)
}

/// A plan from measured parts.
#[allow(clippy::too_many_arguments)]
fn assemble(
    layout: Layout,
    weights: WeightType,
    components: Vec<(&'static str, WeightTally)>,
    tally: WeightTally,
    pools: StagePools,
    sizes: &SizePlan,
    c: &Components,
    cc: Option<(i32, i32)>,
) -> MemoryPlan {
    let slot_bytes = 2 * tally.largest_streamed;
    let workspace = workspace_bytes(cc);
    let fixed = tally.device + slot_bytes + workspace;
    let stages: Vec<StagePeak> = pools
        .by_stage()
        .into_iter()
        .map(|(stage, p)| StagePeak {
            stage,
            pools: p,
            peak: fixed + p,
        })
        .collect();
    let peak_bytes = stages.iter().map(|s| s.peak).max().unwrap_or(fixed);
    let nx = (sizes.height / 16) * (sizes.width / 16);
    let nc: usize = sizes
        .references
        .iter()
        .map(|&(w, h)| (w / 16) * (h / 16))
        .sum();
    MemoryPlan {
        layout,
        weights,
        components,
        weight_bytes: tally.device,
        slot_bytes,
        workspace_bytes: workspace,
        stages,
        peak_bytes,
        host_bytes: tally.host,
        streamed_per_step: 0,
        tokens: (T5_MAX_LENGTH, nx, nc),
        flops_per_step: flops_per_step(&c.transformer.config, T5_MAX_LENGTH, nx + nc, nx),
    }
}

/// Bytes of a `vram`-byte card our allocations may plan for. Outside them, the CUDA context,
/// the kernels' modules and cuBLASLt take about 0.5 GiB, and on a desktop card the display and
/// other programs take more: an eighth of the card, at least 1.5 GiB, is left (a 12 GiB card
/// plans for 10.5 GiB, a 16 GiB one for 14, a 24 GiB one for 21). Devices under 8 GiB (an
/// emulated one in a test) keep a sixteenth.
pub fn usable(vram: u64) -> u64 {
    let reserve = if vram >= 8 * GIB {
        (vram / 8).max(3 * GIB / 2)
    } else {
        vram / 16
    };
    vram - reserve
}

/// Every mode's plan and the chosen one: the forced mode, or the first that fits `budget`
/// bytes (None: no device to fit, only the table). An error when nothing fits, naming the peak
/// needed, the memory there is, and what would make it fit.
pub fn choose(
    c: &Components,
    sizes: &SizePlan,
    steps: usize,
    opts: &MemoryOptions,
    budget: Option<u64>,
    cc: Option<(i32, i32)>,
) -> Result<(Vec<MemoryPlan>, Option<usize>)> {
    let mut plans = Vec::new();
    let modes: Vec<Mode> = match opts.mode {
        Some(m) => vec![m],
        None => Mode::ALL.to_vec(),
    };
    for m in modes {
        plans.push(plan_mode(c, sizes, steps, m, opts, budget, cc)?);
    }
    let Some(budget) = budget else {
        return Ok((plans, None));
    };
    match plans.iter().position(|p| p.peak_bytes <= budget) {
        Some(i) => Ok((plans, Some(i))),
        None => {
            let smallest = plans.iter().map(|p| p.peak_bytes).min().unwrap_or(0);
            let which = match opts.mode {
                Some(m) => format!("memory mode {} (--memory-mode)", m.name()),
                None => "any memory mode".to_string(),
            };
            Err(EngineError::Config(format!(
                "this request does not fit in {which}: the smallest plan (mode {}) needs a peak of {} and {} can be used. HINT: a smaller output size, fewer or smaller context images, another --memory-mode, or a larger --vram on a card that has it",
                plans
                    .iter()
                    .min_by_key(|p| p.peak_bytes)
                    .map_or("?", |p| p.mode().name()),
                gib(smallest),
                gib(budget)
            )))
        }
    }
}

/// Host memory available now (`MemAvailable`), if the system says.
pub fn host_available() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Refuses a plan whose page-locked host memory the machine cannot hold (with room for the
/// rest of the process: a tenth of what is available).
pub fn check_host(plan: &MemoryPlan, available: Option<u64>) -> Result<()> {
    let Some(avail) = available else {
        return Ok(());
    };
    if plan.host_bytes > avail / 10 * 9 {
        return Err(EngineError::Config(format!(
            "memory mode {} keeps {} of streamed weights in page-locked host memory, and this machine has {} available. HINT: close other programs, use a card with more memory, or --memory-mode with fewer streamed parts",
            plan.mode().name(),
            gib(plan.host_bytes),
            gib(avail)
        )));
    }
    Ok(())
}

/// The request a placement is chosen for when the caller names none: a 1024² edit with one
/// 1024² reference.
pub fn default_design() -> Result<SizePlan> {
    let opts = crate::request::EditOptions {
        width: Some(1024),
        height: Some(1024),
        resize: crate::request::ResizePolicy::None,
        ..Default::default()
    };
    crate::request::plan_sizes(&[(1024, 1024)], &opts)
}

/// Bytes this process may use on `backend`'s device for a plan: `vram` (a device of that size,
/// less [`usable`]'s reserve), else the free memory now less a sixty-fourth of the device
/// (at most 256 MiB) for what the driver and cuBLASLt allocate on their own. A planner without
/// `vram` has no budget: an error.
pub fn device_budget(backend: &CudaBackend, vram: Option<u64>) -> Result<u64> {
    if let Some(v) = vram {
        return Ok(usable(v));
    }
    let gpu = backend
        .gpu()
        .ok_or_else(|| EngineError::Config("planning for no device: give --vram GB".into()))?;
    let (free, total) = gpu.mem_info()?;
    // What this process holds already (the GEMM workspace) is part of every plan's peak.
    Ok((free as u64 + gpu.in_use_bytes()).saturating_sub(headroom(total as u64)))
}

/// Free memory left unplanned on a device of `total` bytes, for what the driver and cuBLASLt
/// allocate on their own: a sixty-fourth, at most 256 MiB.
pub fn headroom(total: u64) -> u64 {
    (256u64 << 20).min(total / 64)
}
