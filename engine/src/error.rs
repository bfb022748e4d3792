//! Errors of the engine: every variant says which op or tensor and which shapes.

use kontext_loader::LoadError;

/// Everything that can go wrong building or running a model.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Reading the checkpoint failed (file, key and layout are in the loader's message).
    #[error(transparent)]
    Load(#[from] LoadError),
    /// An op was called with operands whose shapes do not fit together.
    #[error("{op}: {detail}")]
    Shape {
        /// The backend op (`linear`, `attention`, …) or model step.
        op: &'static str,
        /// The offending shapes, e.g. `x [7, 13] but weight [5, 12]`.
        detail: String,
    },
    /// A weight does not have the shape the config implies.
    #[error("weight {key:?}: expected shape {expected:?}, found {found:?}")]
    WeightShape {
        /// Canonical (BFL) key.
        key: String,
        /// Shape the config implies.
        expected: Vec<usize>,
        /// Shape found.
        found: Vec<usize>,
    },
    /// A weight the model needs is missing from an in-memory weight set.
    #[error("weight {key:?} is missing")]
    MissingWeight {
        /// Canonical (BFL) key.
        key: String,
    },
    /// The model config cannot be run (e.g. RoPE axes that do not sum to the head dim).
    #[error("config: {0}")]
    Config(String),
    /// A model input has the wrong length for its stated shape.
    #[error("input {name}: {len} values, expected {expected} ({shape})")]
    Input {
        /// Which input (`img`, `txt_ids`, `latent`, …).
        name: &'static str,
        /// Values given.
        len: usize,
        /// Values the shape needs.
        expected: usize,
        /// The expected shape in words, e.g. `[Ni = 18, 3]`.
        shape: String,
    },
    /// A tokenizer folder could not be read or a prompt could not be tokenized.
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    /// The GPU, a CUDA library or a kernel launch failed (the kernels' message names which).
    #[error(transparent)]
    Gpu(#[from] kontext_kernels::KernelError),
    /// An image could not be read or written (file and reason in one line).
    #[error("{path}: {reason}")]
    Image {
        path: std::path::PathBuf,
        reason: String,
    },
    /// A GPU failure (an allocation another process made fail, a fault) inside a stage of a
    /// request: the stage is named.
    #[error("{stage}: {source}")]
    Stage {
        stage: &'static str,
        source: Box<EngineError>,
    },
}

impl EngineError {
    /// Names `stage` on a GPU error; other errors say where they are already.
    pub fn in_stage(self, stage: &'static str) -> EngineError {
        match self {
            e @ EngineError::Gpu(_) => EngineError::Stage {
                stage,
                source: Box::new(e),
            },
            e => e,
        }
    }
}

/// Result with [`EngineError`].
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// Builds an [`EngineError::Shape`] for `op`.
pub(crate) fn shape_err(op: &'static str, detail: impl Into<String>) -> EngineError {
    EngineError::Shape {
        op,
        detail: detail.into(),
    }
}
