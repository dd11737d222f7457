//! Every constant the engine's choices depend on, each with the reason for its value. The
//! measurements behind them are in `bench/RESULTS.md` and the commits that set them.

/// Output positions per im2col task: enough to amortise packing, few enough that the task's
/// patches stay in L2.
pub const IM2COL_ROWS_PER_TASK: usize = 96;
/// Output positions per implicit-GEMM task: each task reads its weight slice once, so more
/// rows per task read the weights less often.
pub const IMPLICIT_ROWS_PER_TASK: usize = 256;
/// Output channels per task, at least, when a layer has too few rows to keep every thread
/// busy: narrower slices re-read the patches for too few columns.
pub const MIN_COLS_PER_TASK: usize = 64;
/// Tasks per thread a layer without Winograd aims for, so that uneven tasks even out.
pub const TASKS_PER_THREAD: usize = 4;
/// Below this many tasks per thread, a task count the threads cannot share evenly idles a
/// thread for a sizeable share of the layer, so the planner evens it out.
pub const UNEVEN_TASKS_PER_THREAD: usize = 16;
/// Weight matrices larger than this (floats; 1 MiB) take the implicit GEMM, whose tasks each
/// read a slice of the weights once over many rows.
pub const IMPLICIT_MIN_WEIGHTS: usize = 1 << 18;
/// Share of the L2 cache an implicit-GEMM task's weight slice may take: half, so that the
/// rows it meets stay there too.
pub const IMPLICIT_SLICE_L2_DIVISOR: usize = 2;
/// L2 size assumed where Linux reports none: the smallest of the machines tuned on.
pub const DEFAULT_L2_BYTES: usize = 512 << 10;
/// A batch's leading layers run image by image while one image's input or output map is
/// bigger than this, so that one image's maps pass through the caches rather than a batch's
/// through memory.
pub const PER_IMAGE_MAP_BYTES: usize = 1 << 20;

/// The smallest output map side on which [`crate::Winograd::Auto`] takes F(4x4, 3x3) (or, for
/// stride 2, any Winograd algorithm): on smaller maps, partial tiles waste most of the
/// savings.
pub const F4_MIN_SIDE: usize = 8;
/// Fewer input channels per group than this leave the transforms' 8-channel vectors, and the
/// products' reductions, too short to gain: [`crate::Winograd::Auto`] leaves such layers
/// direct.
pub const WINOGRAD_MIN_CHANNELS: usize = 8;
/// [`crate::Winograd::Auto`]'s bar for stride-2 layers, whose 25 transform points per 2x2
/// tile read and write more per product than stride 1's: with the AVX2 kernels it gains from
/// 64 input channels up.
pub const STRIDE2_WINOGRAD_MIN_CHANNELS: usize = 64;
/// The same bar where AVX-512 runs on 512-bit units, whose 16-lane transforms cost less per
/// product: A0's two 48-channel stride-2 blocks gain there too.
pub const STRIDE2_WINOGRAD_MIN_CHANNELS_AVX512: usize = 48;
/// [`crate::Winograd::Auto`] takes F(4x4, 3x3) while its transformed filters (36 per channel
/// pair) come to at most this many bytes per 4x4 output tile of the call: with fewer tiles,
/// reading the filters costs more than the products saved (not where products are scarce:
/// the planner's `Choices::f4_filter_bound`).
pub const F4_MAX_FILTER_BYTES_PER_TILE: usize = 128 << 10;
/// Output tiles per Winograd task on one thread: enough rows for the products to run at full
/// speed.
pub const WINOGRAD_TILES_PER_TASK: usize = 128;
/// Output tiles per Winograd task when the threads share a layer: smaller tasks balance
/// better, and a 14x14 map's 49 tiles at batch 1 are split between the threads rather than
/// its output channels.
pub const SHARED_WINOGRAD_TILES_PER_TASK: usize = 32;
/// Fewer tiles than this per Winograd task leave the products too few rows to run at full
/// speed.
pub const MIN_WINOGRAD_TILES_PER_TASK: usize = 32;
/// Bytes of transformed tiles, over all transform points, a Winograd task may hold (its ring
/// has one point's slot more): bounds the scratch of wide layers.
pub const WINOGRAD_SCRATCH_BYTES: usize = 8 << 20;
