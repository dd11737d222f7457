//! How the engine computes: the choices a caller may force, to measure them or to test every
//! path. The defaults are the fastest measured on the machines the engine was tuned on.

use repvgg_kernels::Isa;

#[derive(Clone, Copy, Debug)]
pub struct EngineOptions {
    pub winograd: Winograd,
    /// How layers without Winograd become matrix products.
    pub lowering: Lowering,
    pub mode: Mode,
    /// The most capable instruction set to use; `None`, the best the machine has. One the
    /// machine lacks makes [`crate::Engine::with_options`] fail.
    pub isa: Option<Isa>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            winograd: Winograd::Auto,
            lowering: Lowering::Auto,
            mode: Mode::Auto,
            isa: None,
        }
    }
}

/// How a convolution that does not take the Winograd path becomes matrix products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lowering {
    /// Copy each output position's 3x3 patch into a row (im2col), one product per task.
    Im2col,
    /// Nine products, one per tap, reading rows straight from the input (implicit GEMM).
    Implicit,
    /// Implicit where the weight matrix is too big for L2, im2col elsewhere.
    Auto,
}

/// Which Winograd algorithms the layers use. Stride-2 layers have one, F(2x2, 3x3) by phases;
/// stride-1 layers have F(2x2, 3x3) and F(4x4, 3x3). Layers with dilation never do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Winograd {
    /// im2col or implicit GEMM for every layer.
    Off,
    /// F(2x2, 3x3) on every layer of stride 1 or 2.
    F2,
    /// F(4x4, 3x3) on stride-1 layers, F(2x2, 3x3) on stride-2 ones.
    F4,
    /// Stride 1: F(4x4, 3x3) unless the map is small or has so few tiles for the size of its
    /// transformed filters that reading them costs more than the products saved; F(2x2, 3x3)
    /// there (the filter-size test is waived where products are scarce: AVX-512 on 256-bit
    /// units); none for layers of few input channels per group. Stride 2: F(2x2, 3x3) for wide
    /// layers on big enough maps whose filters pay by the same measure; direct otherwise
    /// (the RGB stem, a last stage of 1280 channels on a 7x7 map). The thresholds are in
    /// [`crate::tuning`].
    Auto,
}

/// How threads share a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Every layer split across threads: the lowest latency for one image.
    Latency,
    /// Threads take whole images: no synchronisation between layers.
    Throughput,
    /// Throughput when the batch has at least one image per thread, else latency.
    Auto,
}
