use repvgg_checkpoint::CheckpointError;
use repvgg_kernels::UnavailableIsa;

/// Why an engine could not be built or run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
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
    /// Calibration met NaN or infinite values, in its images or in what the float model made
    /// of them: no range can cover those.
    #[error("{0}")]
    NonFinite(String),
    /// An input that is not the NCHW batch the call describes, for this model.
    #[error(
        "input of {len} values is not a batch of {n} images of {channels}x{height}x{width} \
         (channels x height x width, on a map of at least 1x1)"
    )]
    Input {
        len: usize,
        n: usize,
        channels: usize,
        height: usize,
        width: usize,
    },
}

/// An NCHW batch must be exactly `n * channels * height * width` values on a non-empty map.
pub fn check_input(
    input: &[f32],
    n: usize,
    channels: usize,
    height: usize,
    width: usize,
) -> Result<(), EngineError> {
    let expected = [n, channels, height, width]
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d));
    if height == 0 || width == 0 || expected != Some(input.len()) {
        return Err(EngineError::Input {
            len: input.len(),
            n,
            channels,
            height,
            width,
        });
    }
    Ok(())
}
