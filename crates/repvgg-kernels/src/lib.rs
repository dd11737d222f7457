//! The compute kernels under RepVGG's two forms, with no framework underneath: the deploy
//! engine (`repvgg-engine`) and the training form's custom operations (`repvgg-burn`) both
//! run on them.
//!
//! - [`Isa`]: the instruction sets there is code for, detected once per process. Every entry
//!   point takes the set to run, so a caller can cap it (to test each set end to end on one
//!   machine, or to compare them).
//! - [`gemm`]: the matrix product every convolution becomes, on micro-kernels per
//!   instruction set (8x48 AVX-512, 6x16 AVX2/FMA, portable), against weights packed once.
//! - [`winograd`]: Winograd F(2x2, 3x3) and F(4x4, 3x3) at stride 1, F(2x2, 3x3) by phases at
//!   stride 2: the transforms, written once over a vector of channels and compiled per
//!   instruction set.
//! - [`training`]: the training form's convolutions (forward, input and weight gradients) and
//!   batch norm, over NCHW batches.
//!
//! ```
//! use repvgg_kernels::Isa;
//! use repvgg_kernels::gemm::{PackedB, Product, gemm, strided};
//!
//! // C (2 x 3) = A (2 x 4) B (4 x 3), B packed once.
//! let a = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
//! let b = PackedB::new(4, 3, |row, col| (row * 3 + col) as f32);
//! let mut c = [0.0f32; 6];
//! let product = Product::new(2, strided(a.as_ptr(), 4), &b, c.as_mut_ptr(), 3);
//! // SAFETY: A has 2 rows of 4 values and C 2 rows of 3.
//! unsafe { gemm(Isa::best(), &product) };
//! assert_eq!(c, [60.0, 70.0, 80.0, 132.0, 158.0, 184.0]);
//! ```

#![deny(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

pub mod gemm;
pub mod int8;
mod isa;
pub mod partition;
mod simd;
pub mod training;
pub mod winograd;

pub use isa::{Isa, UnavailableIsa, UnknownIsa};

/// Bytes in a cache line: where the kernels' scratch rows start, so that a vector load of a
/// row reads one line, not two.
pub const CACHE_LINE: usize = 64;

/// `len` values of `buffer` starting on a cache line, the buffer grown with `fill` when too
/// short (never shrunk, so a thread's scratch is allocated once). The allocator's own
/// alignment is not enough: glibc starts large blocks 16 bytes into a page.
pub fn line_aligned<T: Clone>(buffer: &mut Vec<T>, len: usize, fill: T) -> &mut [T] {
    let slack = CACHE_LINE / std::mem::size_of::<T>().max(1);
    if buffer.len() < len + slack {
        buffer.resize(len + slack, fill);
    }
    let start = buffer.as_ptr().align_offset(CACHE_LINE).min(slack);
    &mut buffer[start..start + len]
}

/// A raw pointer that parallel tasks write through, each to a disjoint block of one output:
/// the tasks' closures must be `Send` and `Sync`, which a raw pointer is not.
#[derive(Clone, Copy)]
pub struct OutPtr(pub *mut f32);

// SAFETY: an `OutPtr` is only an address; the code that writes through it guarantees (and says
// where it does) that no two threads write the same element.
unsafe impl Send for OutPtr {}
// SAFETY: as for `Send`.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// A method (not field access) so closures capture the whole `Send` wrapper.
    pub fn get(self) -> *mut f32 {
        self.0
    }
}
