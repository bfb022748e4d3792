//! kontext-loader: checkpoint files → canonical named tensors, without copying.
//!
//! Files are memory-mapped; tensors stay in their stored dtype (fp8 with its scales) until a
//! backend asks for f32 (CPU) or uploads the bytes (GPU). Every supported layout (BFL and
//! ComfyUI single files, diffusers folders, sharded folders) is mapped onto one set of
//! canonical names: the BFL keys for the transformer and autoencoder, the Hugging Face keys for
//! the text encoders.

pub mod clip;
mod config;
pub mod dtype;
pub mod error;
pub mod lora;
pub mod model;
pub mod resolve;
pub mod safetensors;
pub mod scheduler;
pub mod sparse;
pub mod t5;
pub mod tensors;
pub mod transformer;
pub mod vae;

pub use clip::{load_clip, Clip, ClipConfig};
pub use dtype::DType;
pub use error::{LoadError, Result};
pub use lora::{load_lora, Lora, LoraFormat, LoraPatch};
pub use model::{open_component, AnyComponent, ModelPaths};
pub use resolve::{ModelSources, Origin, Resolution};
pub use scheduler::SchedulerConfig;
pub use t5::{load_t5, T5Config, T5};
pub use tensors::{Component, Quant, TensorSet, Weight, WeightPart};
pub use transformer::{load_transformer, FluxConfig, Transformer, TransformerOptions};
pub use vae::{load_vae, Vae, VaeConfig, VaeOptions};
