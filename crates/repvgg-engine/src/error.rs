use repvgg_checkpoint::CheckpointError;
use repvgg_kernels::UnavailableIsa;

/// Why an engine could not be built.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The weights could not be read or converted.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// [`crate::EngineOptions::isa`] names an instruction set this machine lacks.
    #[error(transparent)]
    Isa(#[from] UnavailableIsa),
    /// An INT8 kernel set asked for that cannot run these weights here.
    #[error("{0}")]
    Int8Kernels(String),
}
