//! The op sets — [`Backend`] (`ops.rs`, the transformer's) and
//! [`encoder_backend::EncoderBackend`] (what the VAE and the text encoders add) — with their f32
//! CPU reference ([`cpu`], [`cpu_encoder`]), the CUDA backend ([`cuda`], [`cuda_encoder`]), and
//! the weights as the backends take them ([`weights`]).

pub mod cpu;
pub mod cpu_encoder;
pub mod cuda;
mod cuda_attention;
pub mod cuda_encoder;
pub mod cuda_stream;
pub mod encoder_backend;
pub mod ops;
pub mod weights;

pub use ops::*;
