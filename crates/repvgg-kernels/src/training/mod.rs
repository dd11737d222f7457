//! The training form's maths on NCHW batches: convolutions with their input and weight
//! gradients ([`conv`]) and batch norm with batch statistics and its gradients
//! ([`batch_norm`]).

pub mod batch_norm;
pub mod conv;
