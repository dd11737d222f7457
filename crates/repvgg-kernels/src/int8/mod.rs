//! The integer matrix product under an INT8 convolution: `C = requantize(A B + offset)`, with
//! A unsigned 8-bit activations (a per-tensor zero point), B signed 8-bit weights (symmetric
//! per output channel, zero point 0), the products summed in 32-bit integers, and the result
//! stored as unsigned 8-bit activations for the next layer (or as the 32-bit sums).
//!
//! The x86 kernels take four consecutive k at once: AVX-512 VNNI's `vpdpbusd` multiplies four
//! u8 x s8 pairs and adds them to a 32-bit lane exactly; AVX2's `vpmaddubsw` multiplies them
//! and adds pairs into 16 bits with saturation, and `vpmaddwd` adds the pairs of pairs into the
//! lane; AVX2's 16-bit set widens both operands and `vpmaddwd` alone adds pairs into two lanes
//! per column. So B is packed in groups of four k ([`PackedB8`]), and A is read four bytes at
//! a time. AMX's `tdpbusd` takes the same groups sixteen at a time, as tiles (`amx`), so a
//! panel's groups are padded with zeros to a multiple of sixteen.
//!
//! # The micro-kernel contract
//!
//! Every micro-kernel computes one block of C: `mr` rows (its height) by `16 s` columns (`s`
//! adjacent panels of B, its span), over `groups` groups of four k, then finishes and stores
//! it as [`Epilogue`] says. It relies on, and the driver ([`gemm_u8s8`]) guarantees:
//! - `a[i]`, for `i < mr`, is valid for `4 groups` reads (rows past the block's last repeat
//!   it; bytes past `k` may hold any initialized value, B's are zero there);
//! - `b` and the `s - 1` panels after it (`panel_stride` bytes apart) are each valid for
//!   `groups * 64` reads;
//! - `offset` holds `16 s` values: per column, the bias minus the A zero point times the
//!   column's sum of B (so the kernel needs no zero-point arithmetic of its own); the u8
//!   store's `scale` likewise;
//! - `c` is valid for writes of `mr` rows at stride `ldc` (elements) of `16 s` elements (u8
//!   or i32, as the epilogue stores), that no other thread touches meanwhile;
//! - for the AVX2 kernel, every weight lies in [-64, 64], so that `vpmaddubsw`'s 16-bit sums
//!   of two products (at most 2 x 255 x 64 = 32640) never saturate ([`PackedB8::fits_avx2`]);
//! - the kernel's instruction set runs on this machine.
//!
//! The AMX set is not a register micro-kernel: tiles read rows at one stride and 64 bytes of
//! k at a time, so it has its own driver and contract (`amx::columns`), which the same
//! driver's checks and per-span `offset` and `scale` feed.
//!
//! The u8 epilogue computes, per element, `v = (acc + offset) as f32 * scale + zero` (a
//! multiply, then an add: no fused multiply-add, so every kernel rounds alike), clamps `v` to
//! `[low, 255]` (`low` is the output zero point with ReLU, else 0), and rounds it to the
//! nearest integer, ties to even. Every kernel gives the same bits; the tests hold each to
//! plain integer loops.

mod amx;
mod avx2;
mod avx2_i16;
mod avx512;
mod avxvnni;
mod portable;

use crate::Isa;

/// Columns of a panel of B: one AVX-512 vector of 32-bit sums, two AVX2 ones.
pub const NR8: usize = 16;
/// The k of a group: what one 32-bit lane sums at once.
pub const K_GROUP: usize = 4;
/// Bytes of k in one AMX tile row: sixteen groups.
pub const K_TILE: usize = 64;
/// Rows of an AMX block: two tiles of A.
const AMX_ROWS: usize = 32;
/// Panels of an AMX block: two tiles of B.
const AMX_SPAN: usize = 2;
/// The most rows a micro-kernel computes at once.
const MR_MAX: usize = 12;
/// The most panels a micro-kernel spans.
const SPAN_MAX: usize = 3;
/// Columns of the widest span.
const COLS_MAX: usize = SPAN_MAX * NR8;

/// The INT8 kernel sets there is code for. Ordered like [`Isa`]: each runs where the ones
/// before it do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Int8Kernels {
    /// Plain Rust.
    Portable,
    /// AVX2 on operands widened to 16 bits: `vpmaddwd` alone, exact for any INT8 weights, at
    /// half the products per instruction of [`Int8Kernels::Avx2`].
    Avx2I16,
    /// AVX2: `vpmaddubsw` + `vpmaddwd` (weights in [-64, 64]).
    Avx2,
    /// AVX-VNNI: 256-bit `vpdpbusd`, exact for any INT8 weights (processors with VNNI but
    /// no AVX-512).
    AvxVnni,
    /// AVX-512 with VNNI: `vpdpbusd`, exact for any INT8 weights.
    Avx512Vnni,
    /// AMX: `tdpbusd` on 16 x 64 tiles, exact for any INT8 weights, with the AVX-512
    /// epilogue.
    Amx,
}

impl Int8Kernels {
    pub const ALL: [Int8Kernels; 6] = [
        Int8Kernels::Portable,
        Int8Kernels::Avx2I16,
        Int8Kernels::Avx2,
        Int8Kernels::AvxVnni,
        Int8Kernels::Avx512Vnni,
        Int8Kernels::Amx,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Int8Kernels::Portable => "portable",
            Int8Kernels::Avx2I16 => "avx2-i16",
            Int8Kernels::Avx2 => "avx2",
            Int8Kernels::AvxVnni => "avx-vnni",
            Int8Kernels::Avx512Vnni => "avx512-vnni",
            Int8Kernels::Amx => "amx",
        }
    }

    pub fn is_available(self) -> bool {
        match self {
            Int8Kernels::Portable => true,
            Int8Kernels::Avx2 | Int8Kernels::Avx2I16 => Isa::Avx2.is_available(),
            Int8Kernels::AvxVnni => {
                #[cfg(target_arch = "x86_64")]
                {
                    Isa::Avx2.is_available() && std::arch::is_x86_feature_detected!("avxvnni")
                }
                #[cfg(not(target_arch = "x86_64"))]
                false
            }
            Int8Kernels::Avx512Vnni => {
                #[cfg(target_arch = "x86_64")]
                {
                    Isa::Avx512.is_available()
                        && std::arch::is_x86_feature_detected!("avx512bw")
                        && std::arch::is_x86_feature_detected!("avx512vnni")
                }
                #[cfg(not(target_arch = "x86_64"))]
                false
            }
            Int8Kernels::Amx => {
                #[cfg(target_arch = "x86_64")]
                {
                    Isa::Avx512.is_available() && amx::is_available()
                }
                #[cfg(not(target_arch = "x86_64"))]
                false
            }
        }
    }

    /// The bytes of each A row the set reads for a reduction of `k`: whole groups of four,
    /// or whole tiles of 64 for AMX. Rows of patches laid out this far apart need no
    /// padding of their own; bytes past `k` may hold any initialized value.
    pub fn a_row_bytes(self, k: usize) -> usize {
        match self {
            Int8Kernels::Amx => k.div_ceil(K_TILE) * K_TILE,
            _ => k.div_ceil(K_GROUP) * K_GROUP,
        }
    }

    /// The rows and columns of the set's block: a task that splits a product is best cut
    /// at multiples of them.
    pub fn block(self) -> (usize, usize) {
        match self {
            Int8Kernels::Amx => (AMX_ROWS, AMX_SPAN * NR8),
            // Every register kernel's height divides 24; the widest spans 48 columns.
            _ => (24, COLS_MAX),
        }
    }

    /// Whether this machine has either VNNI set, which take 8-bit weights at full speed
    /// (without, the fast AVX2 set needs 7-bit ones).
    pub fn vnni_available() -> bool {
        Int8Kernels::Avx512Vnni.is_available() || Int8Kernels::AvxVnni.is_available()
    }

    /// Every set this machine runs, portable first.
    pub fn available() -> Vec<Int8Kernels> {
        Int8Kernels::ALL
            .into_iter()
            .filter(|k| k.is_available())
            .collect()
    }

    /// The best set for `weights` within the instruction set `cap`: AMX where the machine
    /// has it, else AVX-512 VNNI, else AVX-VNNI, else AVX2 when the weights fit its 16-bit sums, else
    /// AVX2 on 16-bit operands, else portable.
    ///
    /// AMX rounds the reduction up to whole tiles of 64 bytes, AVX-512 VNNI to groups of
    /// four: where the tiles would compute more than half again VNNI's products (a stem's
    /// 27, a layer of 8 channels' 72), VNNI runs the layer faster.
    pub fn best_for(cap: Isa, weights: &PackedB8) -> Int8Kernels {
        let vnni = Int8Kernels::Avx512Vnni;
        let tiles_pay = 2 * Int8Kernels::Amx.a_row_bytes(weights.k)
            <= 3 * vnni.a_row_bytes(weights.k)
            || !vnni.is_available();
        if cap >= Isa::Avx512 && Int8Kernels::Amx.is_available() && tiles_pay {
            Int8Kernels::Amx
        } else if cap >= Isa::Avx512 && vnni.is_available() {
            vnni
        } else if cap >= Isa::Avx2 && Int8Kernels::AvxVnni.is_available() {
            Int8Kernels::AvxVnni
        } else if cap >= Isa::Avx2 && Int8Kernels::Avx2.is_available() && weights.fits_avx2() {
            Int8Kernels::Avx2
        } else if cap >= Isa::Avx2 && Int8Kernels::Avx2I16.is_available() {
            Int8Kernels::Avx2I16
        } else {
            Int8Kernels::Portable
        }
    }

    /// The rows of the set's register kernels, and its kernels by span (`spans[s - 1]`);
    /// none for AMX, which has its own driver.
    fn micro_kernels(self) -> (usize, &'static [MicroKernel]) {
        assert!(
            self.is_available(),
            "{} kernels do not run here",
            self.name()
        );
        match self {
            Int8Kernels::Portable => (portable::MR, &[portable::kernel]),
            #[cfg(target_arch = "x86_64")]
            Int8Kernels::Avx2 => (avx2::MR, &[avx2::kernel]),
            #[cfg(target_arch = "x86_64")]
            Int8Kernels::Avx2I16 => (avx2_i16::MR, &[avx2_i16::kernel]),
            #[cfg(target_arch = "x86_64")]
            Int8Kernels::AvxVnni => (avxvnni::MR, &[avxvnni::kernel]),
            #[cfg(target_arch = "x86_64")]
            Int8Kernels::Avx512Vnni => (avx512::MR, avx512::SPANS),
            Int8Kernels::Amx => (AMX_ROWS, &[]),
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("no x86-64 kernels off x86-64"),
        }
    }
}

impl std::fmt::Display for Int8Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A `k x n` INT8 weight matrix packed as `[panel][k group][column][4]`: for each panel of 16
/// columns and each group of four k, 64 bytes, column by column, the four k of a column
/// adjacent (one 32-bit lane each). Each panel holds its groups rounded up to sixteen (one
/// AMX tile of k); rows past `k` and columns past `n` are zero.
#[derive(Clone, Debug, Default)]
pub struct PackedB8 {
    k: usize,
    n: usize,
    data: Vec<i8>,
    /// Per column: the sum of its weights, for the activation zero point's correction.
    column_sums: Vec<i32>,
    /// The largest |weight|.
    max_abs: u8,
}

impl PackedB8 {
    /// Packs the matrix whose element (row, col) is `at(row, col)`.
    pub fn new(k: usize, n: usize, at: impl Fn(usize, usize) -> i8) -> PackedB8 {
        let groups = padded_groups(k);
        let panels = n.div_ceil(NR8);
        let mut data = vec![0i8; panels * groups * NR8 * K_GROUP];
        let mut column_sums = vec![0i32; n];
        let mut max_abs = 0u8;
        for (col, column_sum) in column_sums.iter_mut().enumerate() {
            let (panel, lane) = (col / NR8, col % NR8);
            for row in 0..k {
                let value = at(row, col);
                let (group, within) = (row / K_GROUP, row % K_GROUP);
                data[((panel * groups + group) * NR8 + lane) * K_GROUP + within] = value;
                *column_sum += value as i32;
                max_abs = max_abs.max(value.unsigned_abs());
            }
        }
        PackedB8 {
            k,
            n,
            data,
            column_sums,
            max_abs,
        }
    }

    pub fn rows(&self) -> usize {
        self.k
    }

    pub fn cols(&self) -> usize {
        self.n
    }

    /// Whether every weight lies in [-64, 64], as the AVX2 kernel needs.
    pub fn fits_avx2(&self) -> bool {
        self.max_abs <= 64
    }

    pub fn column_sums(&self) -> &[i32] {
        &self.column_sums
    }

    fn groups(&self) -> usize {
        self.k.div_ceil(K_GROUP)
    }

    /// Bytes from one panel to the next.
    fn panel_stride(&self) -> usize {
        padded_groups(self.k) * NR8 * K_GROUP
    }

    fn panel(&self, panel: usize) -> *const i8 {
        self.data[panel * self.panel_stride()..].as_ptr()
    }
}

/// The groups a panel holds for a reduction of `k`: whole AMX tiles.
fn padded_groups(k: usize) -> usize {
    k.div_ceil(K_TILE) * K_TILE / K_GROUP
}

/// How a block of 32-bit sums is finished and stored.
#[derive(Clone, Copy, Debug)]
pub enum Epilogue<'a> {
    /// Requantized to u8: `clamp((acc + offset) * scale[col] + zero, low, 255)`, rounded to
    /// nearest even; `low` is `zero` with ReLU, else 0.
    U8 {
        scale: &'a [f32],
        zero: u8,
        relu: bool,
    },
    /// The sums themselves, `acc + offset`, as i32: for the layers that leave INT8 (the last
    /// one before a float head or SE) and for tests.
    I32,
}

impl Epilogue<'_> {
    /// The bytes of one element of C as this epilogue stores it.
    fn element_bytes(self) -> usize {
        match self {
            Epilogue::U8 { .. } => 1,
            Epilogue::I32 => 4,
        }
    }
}

/// One micro-kernel call: `(groups, a, b, panel_stride, offset, c, ldc, store)`; see the
/// module's contract.
type MicroKernel = unsafe fn(
    groups: usize,
    a: &[*const u8; MR_MAX],
    b: *const i8,
    panel_stride: usize,
    offset: &[i32; COLS_MAX],
    c: *mut u8,
    ldc: usize,
    store: &Store,
);

/// The epilogue as one block's kernel sees it: scales for its columns.
#[derive(Clone, Copy)]
enum Store {
    U8 {
        scale: [f32; COLS_MAX],
        zero: f32,
        low: f32,
    },
    I32,
}

/// One INT8 product `C = epilogue(A[.., 0..k] B + bias - a_zero colsum(B))` over all of B's
/// columns.
pub struct Product8<'a> {
    pub rows: usize,
    /// A's first row; row `r` starts `r lda` bytes on.
    pub a: *const u8,
    pub lda: usize,
    /// A's zero point: the u8 that stands for 0.0.
    pub a_zero: u8,
    pub b: &'a PackedB8,
    /// Per column of B, in the units of the sums (activation scale x weight scale).
    pub bias: &'a [i32],
    /// The columns of B, and so of C, to compute; `cols.start` a multiple of [`NR8`]: a
    /// layer with few rows splits its columns among threads.
    pub cols: std::ops::Range<usize>,
    /// Where C's element (0, `cols.start`) goes: u8 or i32 elements as the epilogue stores,
    /// rows `ldc` elements apart.
    pub c: *mut u8,
    pub ldc: usize,
    pub epilogue: Epilogue<'a>,
}

/// Runs `product` with `kernels`, on the calling thread.
///
/// Panics if `kernels` does not run here, if the AVX2 kernels are given weights outside
/// [-64, 64], or if the bias or scales are shorter than B's columns.
///
/// # Safety
/// Each row of A, for `r < rows`, must be valid for reads of
/// [`kernels.a_row_bytes(k)`](Int8Kernels::a_row_bytes) bytes; `c` must be valid for writes
/// of `rows` rows at stride `ldc` elements of B's columns (u8 or i32 elements, as the
/// epilogue stores), untouched by other threads.
pub unsafe fn gemm_u8s8(kernels: Int8Kernels, product: &Product8<'_>) {
    let (mr, spans) = kernels.micro_kernels();
    let Product8 {
        rows,
        a,
        lda,
        a_zero,
        b,
        bias,
        ref cols,
        c,
        ldc,
        epilogue,
    } = *product;
    assert!(
        kernels != Int8Kernels::Avx2 || b.fits_avx2(),
        "the AVX2 INT8 kernel needs weights in [-64, 64]"
    );
    check_columns(b, bias, cols, epilogue);
    if rows == 0 || cols.is_empty() {
        return;
    }
    let element = epilogue.element_bytes();
    let groups = b.groups();
    let panel_stride = b.panel_stride();
    let panels = cols.end.div_ceil(NR8);
    let amx = kernels == Int8Kernels::Amx;
    let span_max = if amx { AMX_SPAN } else { spans.len() };
    // SAFETY: the AMX set runs here (checked by `micro_kernels`); released when dropped.
    #[cfg(target_arch = "x86_64")]
    let _tiles = amx.then(|| unsafe { amx::Tiles::configure() });
    #[cfg(target_arch = "x86_64")]
    let patch_rows = amx::Rows {
        base: a,
        stride: lda,
        taps: &[0],
        tiles_per_tap: b.k.div_ceil(K_TILE).max(1),
        whole_blocks: false,
    };
    if amx {
        // SAFETY: A's rows are valid for whole tiles of k (the caller's contract).
        #[cfg(target_arch = "x86_64")]
        unsafe {
            amx::copy_tail(&patch_rows, rows, b.k.div_ceil(K_TILE))
        };
    }
    let mut panel = cols.start / NR8;
    while panel < panels {
        let span = (panels - panel).min(span_max);
        let col = panel * NR8;
        let width = (span * NR8).min(cols.end - col);
        let (offset, store) = span_epilogue(b, bias, a_zero, epilogue, col, width);
        let panel_b = b.panel(panel);
        if amx {
            let tiles = b.k.div_ceil(K_TILE);
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the tiles are configured (`_tiles`); A's rows are valid for whole tiles
            // of k (the caller's contract, as `a_row_bytes` says for AMX) and their short
            // last block was copied above; the panels hold whole tiles of groups, C's rows
            // hold the span's `width` columns.
            unsafe {
                amx::columns(
                    span,
                    rows,
                    &patch_rows,
                    tiles,
                    panel_b,
                    panel_stride,
                    &offset,
                    &store,
                    c.wrapping_add((col - cols.start) * element),
                    ldc,
                    width,
                    amx::RowMap::Dense,
                )
            };
            panel += span;
            continue;
        }
        let kernel = spans[span - 1];
        for r0 in (0..rows).step_by(mr) {
            let height = mr.min(rows - r0);
            let a_rows: [*const u8; MR_MAX] =
                std::array::from_fn(|i| a.wrapping_add((r0 + i.min(height - 1)) * lda));
            if height == mr && width == span * NR8 {
                // SAFETY: the block's rows and columns are C's (the caller's contract), the
                // A rows hold `groups` groups (likewise), the span's panels hold `groups`.
                unsafe {
                    kernel(
                        groups,
                        &a_rows,
                        panel_b,
                        panel_stride,
                        &offset,
                        c.wrapping_add((r0 * ldc + col - cols.start) * element),
                        ldc,
                        &store,
                    )
                };
            } else {
                // An edge block goes through a scratch block, then its valid part to C.
                let mut scratch = [0i32; MR_MAX * COLS_MAX];
                let scratch_ptr = scratch.as_mut_ptr() as *mut u8;
                // SAFETY: the scratch block holds `mr` rows of 48 i32 (enough for u8 too);
                // the A rows and the panels as above.
                unsafe {
                    kernel(
                        groups,
                        &a_rows,
                        panel_b,
                        panel_stride,
                        &offset,
                        scratch_ptr,
                        COLS_MAX,
                        &store,
                    )
                };
                for i in 0..height {
                    let to = c.wrapping_add(((r0 + i) * ldc + col - cols.start) * element);
                    // SAFETY: row `r0 + i` of C holds the block's `width` columns (the
                    // caller's contract); the scratch row holds 48 elements.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            scratch_ptr.add(i * COLS_MAX * element),
                            to,
                            width * element,
                        )
                    };
                }
            }
        }
        panel += span;
    }
}

/// What every product entry checks of its columns, bias and scales against B.
fn check_columns(
    b: &PackedB8,
    bias: &[i32],
    cols: &std::ops::Range<usize>,
    epilogue: Epilogue<'_>,
) {
    assert!(
        cols.start.is_multiple_of(NR8) && cols.end <= b.n,
        "columns {cols:?} do not start on a panel or leave B"
    );
    assert!(bias.len() >= b.n, "bias shorter than the columns");
    if let Epilogue::U8 { scale, .. } = epilogue {
        assert!(scale.len() >= b.n, "scales shorter than the columns");
    }
}

/// What the kernels of one span need to finish its `width` columns from `col`: per column,
/// the bias less the A zero point times the column's weight sum, and the store.
fn span_epilogue(
    b: &PackedB8,
    bias: &[i32],
    a_zero: u8,
    epilogue: Epilogue<'_>,
    col: usize,
    width: usize,
) -> ([i32; COLS_MAX], Store) {
    let offset: [i32; COLS_MAX] = std::array::from_fn(|j| {
        if j < width {
            bias[col + j] - a_zero as i32 * b.column_sums[col + j]
        } else {
            0
        }
    });
    let store = match epilogue {
        Epilogue::U8 { scale, zero, relu } => Store::U8 {
            scale: std::array::from_fn(|j| if j < width { scale[col + j] } else { 0.0 }),
            zero: zero as f32,
            low: if relu { zero as f32 } else { 0.0 },
        },
        Epilogue::I32 => Store::I32,
    };
    (offset, store)
}

/// The rows of [`PackedB8`] for a 3x3 convolution read straight from an image
/// ([`conv3x3_u8s8`]): tap by tap, each tap's `channels` rounded up to whole tiles of k (64),
/// the rows past `channels` zero.
pub fn conv3x3_k(channels: usize) -> usize {
    9 * channels.div_ceil(K_TILE) * K_TILE
}

/// How far past its last position's own pixel a [`Conv8`] product may read: the rest of its
/// last 32-row block, two padded rows and a pixel of taps, and the last tap's channels
/// rounded up to a tile. An image padded for such products needs this much room after it.
pub fn conv3x3_overrun(channels: usize, padded_width: usize) -> usize {
    (AMX_ROWS + 2 * padded_width + 1) * channels + channels.div_ceil(K_TILE) * K_TILE
}

/// A 3x3, stride-1 convolution of a u8 NHWC image padded by one pixel of its zero point on
/// every side, as one INT8 product whose rows of A are read straight from the image: on AMX a
/// tile's 16 rows may be any stride apart, so 16 adjacent output pixels are 16 input pixels
/// `channels` bytes apart, tap by tap, and no patches are copied.
///
/// The product's rows are positions of the padded grid: position `v` is output pixel `(v /
/// padded_width, v % padded_width)`, computed from the 3x3 window whose top-left pixel is
/// `v`; its last two columns are padding, computed and not stored. Positions run from
/// `first` for `positions`.
pub struct Conv8<'a> {
    pub first: usize,
    pub positions: usize,
    /// The padded image's first pixel: the row of padding above the output's first row.
    pub image: *const u8,
    pub channels: usize,
    /// The padded image's width: the output's plus two.
    pub padded_width: usize,
    /// The image's zero point (its padding's value).
    pub a_zero: u8,
    /// Packed with [`conv3x3_k`] rows: (tap, channel), taps row by row.
    pub b: &'a PackedB8,
    pub bias: &'a [i32],
    /// As [`Product8::cols`].
    pub cols: std::ops::Range<usize>,
    /// Where the output pixel of row 0, column 0, channel `cols.start` goes: output pixels
    /// `ldc` elements apart, an output row `padded_width - 2` pixels long.
    pub c: *mut u8,
    pub ldc: usize,
    pub epilogue: Epilogue<'a>,
}

impl Conv8<'_> {
    /// The bytes from `image` that the product reads: every tile of its last 32-row block,
    /// positions past the product's included.
    pub fn image_bytes(&self) -> usize {
        (self.first + self.positions) * self.channels
            + conv3x3_overrun(self.channels, self.padded_width)
    }
}

/// Runs `product` on the AMX kernels, on the calling thread.
///
/// Panics if AMX does not run here, if B's rows are not [`conv3x3_k`]`(channels)`, if the
/// grid is narrower than 3, or if the bias or scales are shorter than B's columns.
///
/// # Safety
/// `image` must be valid for reads of [`Conv8::image_bytes`] bytes; `c` must be valid for
/// writes of every stored output pixel's columns (u8 or i32 elements, as the epilogue
/// stores), untouched by other threads.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
pub unsafe fn conv3x3_u8s8(product: &Conv8<'_>) {
    let Conv8 {
        first,
        positions,
        image,
        channels,
        padded_width,
        a_zero,
        b,
        bias,
        ref cols,
        c,
        ldc,
        epilogue,
    } = *product;
    assert!(
        Int8Kernels::Amx.is_available(),
        "amx kernels do not run here"
    );
    assert_eq!(
        b.k,
        conv3x3_k(channels),
        "weights not packed for an image's taps"
    );
    assert!(padded_width >= 3, "a padded grid narrower than 3");
    check_columns(b, bias, cols, epilogue);
    if positions == 0 || cols.is_empty() {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let element = epilogue.element_bytes();
        let tiles_per_tap = channels.div_ceil(K_TILE);
        let taps: [usize; 9] =
            std::array::from_fn(|tap| (tap / 3 * padded_width + tap % 3) * channels);
        let rows = amx::Rows {
            base: image.wrapping_add(first * channels),
            stride: channels,
            taps: &taps,
            tiles_per_tap,
            whole_blocks: true,
        };
        let map = amx::RowMap::Grid {
            first,
            padded_width,
            width: padded_width - 2,
        };
        // SAFETY: AMX runs here (asserted above); released when dropped.
        let _tiles = unsafe { amx::Tiles::configure() };
        let panels = cols.end.div_ceil(NR8);
        let mut panel = cols.start / NR8;
        while panel < panels {
            let span = (panels - panel).min(AMX_SPAN);
            let col = panel * NR8;
            let width = (span * NR8).min(cols.end - col);
            let (offset, store) = span_epilogue(b, bias, a_zero, epilogue, col, width);
            // SAFETY: every tile of every block's rows lies within `image_bytes` of the
            // image (the caller's contract); the panels hold 9 `tiles_per_tap` tiles of
            // groups (the k asserted above); every stored pixel's columns are C's.
            unsafe {
                amx::columns(
                    span,
                    positions,
                    &rows,
                    9 * tiles_per_tap,
                    b.panel(panel),
                    b.panel_stride(),
                    &offset,
                    &store,
                    c.wrapping_add((col - cols.start) * element),
                    ldc,
                    width,
                    map,
                )
            };
            panel += span;
        }
    }
}

/// The u8 epilogue of one sum, as every kernel computes it.
#[inline(always)]
fn requantize(sum: i32, scale: f32, zero: f32, low: f32) -> u8 {
    let v = (sum as f32 * scale + zero).clamp(low, 255.0);
    // Adding and removing 2^23 rounds a value in [0, 255] to an integer, ties to even, in
    // the default rounding mode: `round_ties_even` without its library call (no SSE4.1 in
    // the build's baseline).
    ((v + 8_388_608.0) - 8_388_608.0) as u8
}
