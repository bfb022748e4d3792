//! kontext-engine: the FLUX.1 Kontext [dev] transformer on a backend.
//!
//! - [`backend::Backend`]: the op set; [`cpu::CpuBackend`] is the f32 reference every GPU
//!   kernel is checked against; [`cuda::CudaBackend`] runs it on an NVIDIA GPU.
//! - [`model::Flux`] and its [`layers`], named like the BFL reference (spec 1).
//! - [`sampling`]: packing and Kontext ids (spec 2.3, 2.4, 3.2).
//! - [`check`]: the comparison helper and its tolerances.

// Rooms: model/ (Flux, its layers, the autoencoder, T5, CLIP, LoRA), backend/ (the op sets,
// the CPU reference, CUDA, weights as the backends take them); the pipeline and what a request
// needs (request, sampling, schedule, noise, image, tokenizer) beside them.
pub mod backend;
pub mod check;
pub mod error;
pub mod image;
pub mod memory;
pub mod model;
pub mod noise;
pub mod pipeline;
pub mod random;
pub mod request;
pub mod sampling;
pub mod schedule;
pub mod tokenizer;

// Each module keeps its path from the crate root (kontext_engine::layers, ::cpu, …).
pub use backend::{cpu, cpu_encoder, cuda, cuda_encoder, cuda_stream, encoder_backend, weights};
pub use model::{clip, layers, lora, t5, vae};

pub use backend::{Backend, QkScales};
pub use cpu::{CpuBackend, CpuLinear, CpuTensor};
pub use cuda::{CudaBackend, CudaTensor};
pub use error::{EngineError, Result};
pub use layers::{timestep_embedding, EmbedNd};
pub use model::{Flux, FluxInputs, StageHook, StepConditioning};
pub use weights::{random_weights, HostWeight, WeightMap, WeightSource};
