//! The models, each named like its reference: [`Flux`] (`flux.rs`) with its [`layers`], the
//! autoencoder ([`vae`]), T5 ([`t5`]), CLIP ([`clip`]), and the LoRAs a Flux carries ([`lora`]).

pub mod clip;
pub mod flux;
pub mod layers;
pub mod lora;
pub mod t5;
pub mod vae;

pub use flux::*;
