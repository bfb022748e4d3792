//! kontext-engine: the FLUX.1 Kontext [dev] transformer on a backend.
//!
//! - [`backend::Backend`]: the op set; [`cpu::CpuBackend`] is the f32 reference every GPU
//!   kernel is checked against; [`cuda::CudaBackend`] runs it on an NVIDIA GPU.
//! - [`model::Flux`] and its [`layers`], named like the BFL reference (spec 1).
//! - [`sampling`]: packing and Kontext ids (spec 2.3, 2.4, 3.2).
//! - [`check`]: the comparison helper and its tolerances.

pub mod backend;
pub mod check;
pub mod clip;
pub mod cpu;
pub mod cpu_encoder;
pub mod cuda;
pub mod cuda_encoder;
pub mod encoder_backend;
pub mod error;
pub mod image;
pub mod layers;
pub mod lora;
pub mod model;
pub mod noise;
pub mod pipeline;
pub mod random;
pub mod request;
pub mod sampling;
pub mod schedule;
pub mod t5;
pub mod tokenizer;
pub mod vae;
pub mod weights;

pub use backend::Backend;
pub use cpu::{CpuBackend, CpuLinear, CpuTensor};
pub use cuda::{CudaBackend, CudaTensor};
pub use error::{EngineError, Result};
pub use layers::{timestep_embedding, EmbedNd};
pub use model::{Flux, FluxInputs, StageHook, StepConditioning};
pub use weights::{random_weights, HostWeight, WeightMap, WeightSource};
