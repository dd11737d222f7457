//! The training form's maths on NCHW batches: convolutions with their input and weight
//! gradients ([`conv`]) and batch norm with batch statistics and its gradients
//! ([`batch_norm`]).

pub mod batch_norm;
pub mod conv;

/// Buffers that do not have the shape a training kernel's call describes, or a shape that
/// cannot be convolved: the caller's mistake, said in words instead of a panic.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ShapeError(pub String);

/// `Ok` when `found` values are the `expected` ones of `what`.
pub(crate) fn check_len(what: &str, found: usize, expected: usize) -> Result<(), ShapeError> {
    if found != expected {
        return Err(ShapeError(format!(
            "{what} has {found} values, expected {expected}"
        )));
    }
    Ok(())
}
