//! The INT8 product on AMX (Advanced Matrix Extensions): `tdpbusd` multiplies a tile of A
//! (16 rows x 64 u8) by a tile of B (16 groups of four k x 16 columns of s8, exactly one
//! [`super::PackedB8`] panel's layout over 64 k) and adds the 16 x 16 exact 32-bit sums to a third
//! tile. A block of 32 rows x 32 columns keeps four sum tiles and reloads two A and two B
//! tiles per 64 k; the sums then go through memory to the same AVX-512 epilogue as the VNNI
//! kernel, so both store the same bits.
//!
//! Unlike the register micro-kernels, a tile reads its rows at one stride and always 64
//! bytes of k, so this set has its own driver ([`columns`]), whose rows of A come from a
//! [`Rows`] source: patch rows (one strided matrix, each row readable for `k` rounded up to
//! 64 bytes, [`super::Int8Kernels::a_row_bytes`]; a last block of fewer than 32 rows copied
//! into a scratch block first), or an image read tap by tap (adjacent output pixels are
//! adjacent input pixels; the image has room for whole blocks). B's panels hold their groups
//! rounded up to sixteen (zeros past `k`); where each row of the product goes is a
//! [`RowMap`]; columns past the product's are masked at the store. k runs in passes of eight tiles over every row block of a span, the
//! sums stored and reloaded between passes, so that the span's weights for a pass stay in L1.
//!
//! Linux lends a thread the tile registers' 8 KB of state only after the process asks for
//! it ([`is_available`] asks once); the tiles are configured at the start of each product and
//! released when it ends ([`Tiles`]), so a thread that is not in a product carries no tile
//! state. The tile registers are named as clobbered wherever an instruction writes them; no
//! other code uses them, so their contents carry from one asm block to the next.

#![cfg(target_arch = "x86_64")]

use std::arch::asm;
use std::arch::x86_64::*;
use std::cell::RefCell;
use std::sync::OnceLock;

use super::avx512::requantize_16;
use super::{AMX_ROWS as BLOCK_ROWS, AMX_SPAN as SPAN, COLS_MAX, K_GROUP, K_TILE, NR8, Store};

/// Groups of four k in one B tile (its rows).
pub(super) const TILE_GROUPS: usize = K_TILE / K_GROUP;

/// Whether the processor has AMX with INT8, the OS saves its state, AVX-512 (the epilogue)
/// runs, and Linux has granted this process the tile data: checked, and asked for, once.
pub(super) fn is_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        let avx512 = std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512vnni");
        // CPUID leaf 7: EDX bit 24 AMX-TILE, bit 25 AMX-INT8.
        let leaf7 = __cpuid_count(7, 0);
        let amx = leaf7.edx & (1 << 24) != 0 && leaf7.edx & (1 << 25) != 0;
        // CPUID leaf 1 ECX bit 27: the OS uses XSAVE, so XGETBV may be executed.
        let osxsave = __cpuid(1).ecx & (1 << 27) != 0;
        // XCR0 bits 17 and 18: the OS saves the tile configuration and the tile data.
        // SAFETY: XGETBV runs where OSXSAVE is set (checked first).
        let os_saves_tiles = osxsave && unsafe { _xgetbv(0) } & (0b11 << 17) == 0b11 << 17;
        avx512 && amx && os_saves_tiles && request_tile_data()
    })
}

/// Asks Linux for the tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`),
/// which every thread of the process then has: without it the first tile instruction faults.
#[cfg(target_os = "linux")]
fn request_tile_data() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: the call takes two integers and changes only this process's permissions.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(target_os = "linux"))]
fn request_tile_data() -> bool {
    false
}

/// The operand `ldtilecfg` reads (palette 1): every tile 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

const CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    bytes_per_row: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// The eight tiles configured for [`columns`] on this thread, until dropped: then released,
/// so that a thread outside a product (a panic included) carries no tile data.
pub(super) struct Tiles(());

impl Tiles {
    /// # Safety
    /// [`is_available`] must have returned true.
    pub(super) unsafe fn configure() -> Tiles {
        // SAFETY: AMX runs here and the process holds the tile data (the caller's
        // contract); the operand is a valid 64-byte palette-1 configuration.
        unsafe {
            asm!(
                "ldtilecfg [{0}]",
                in(reg) &CONFIG,
                out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
                out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
                options(nostack, readonly)
            )
        };
        Tiles(())
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: AMX runs here (a `Tiles` exists only where `configure` could run).
        unsafe {
            asm!(
                "tilerelease",
                out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
                out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
                options(nostack, nomem)
            )
        };
    }
}

/// The 32 x 32 sums of one block, as the tiles store them.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Sums([[i32; SPAN * NR8]; BLOCK_ROWS]);

/// Tiles of k per pass over a span's row blocks: the span's weights for one pass (8 x 2 KB)
/// stay in L1 while every row block's A streams past them, so that the tiles read one of
/// their two operands from L1 instead of both from L2, which cannot feed four `tdpbusd` per
/// four tile loads.
const PASS_TILES: usize = 8;

/// What a thread keeps between products: grown to the largest once.
#[derive(Default)]
struct Scratch {
    /// The rows of a short last block, padded to 32.
    short: Vec<u8>,
    /// The sums of every row block of the span, carried from one pass of k to the next.
    sums: Vec<Sums>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Where the product's rows of A are, tile of k by tile of k: row `r`'s bytes for tile `t`
/// start at `base + r stride + taps[t / tiles_per_tap] + (t % tiles_per_tap) 64`.
#[derive(Clone, Copy)]
pub(super) struct Rows<'a> {
    pub base: *const u8,
    pub stride: usize,
    /// The byte offset of each run of `tiles_per_tap` tiles: `[0]` for patch rows (every
    /// tile of a row consecutive), a 3x3 window's nine taps for rows read from an image.
    pub taps: &'a [usize],
    pub tiles_per_tap: usize,
    /// Whether a last block's 32 rows may all be read, rows past the product's included (an
    /// image with room below); else the short block's rows are copied first (patch rows only).
    pub whole_blocks: bool,
}

impl Rows<'_> {
    fn tile(&self, row: usize, t: usize) -> *const u8 {
        self.base.wrapping_add(
            row * self.stride
                + self.taps[t / self.tiles_per_tap]
                + (t % self.tiles_per_tap) * K_TILE,
        )
    }

    /// The offset of each tile of `pass` from its row's start, in order, stepped rather than
    /// divided out per tile (the tile loop runs one per 64 k).
    fn offsets(&self, pass: std::ops::Range<usize>) -> impl Iterator<Item = usize> + '_ {
        let (mut tap, mut chunk) = (
            pass.start / self.tiles_per_tap,
            pass.start % self.tiles_per_tap,
        );
        pass.map(move |_| {
            let offset = self.taps[tap] + chunk * K_TILE;
            chunk += 1;
            if chunk == self.tiles_per_tap {
                (tap, chunk) = (tap + 1, 0);
            }
            offset
        })
    }
}

/// Where each row of the product goes in C.
#[derive(Clone, Copy)]
pub(super) enum RowMap {
    /// Row `r` to row `r`.
    Dense,
    /// Row `r` is position `v = first + r` of a grid `padded_width` wide (an output row and
    /// its two padding columns): to row `(v / padded_width) width + v % padded_width`, none
    /// for the padding columns (`v % padded_width >= width`).
    Grid {
        first: usize,
        padded_width: usize,
        width: usize,
    },
}

impl RowMap {
    /// The C rows of the product's rows `first_row..first_row + count` (at most a block),
    /// `None` for those not stored: one division for the block, not one a row.
    fn rows(self, first_row: usize, count: usize) -> [Option<usize>; BLOCK_ROWS] {
        let mut rows = [None; BLOCK_ROWS];
        match self {
            RowMap::Dense => {
                for (i, row) in rows[..count].iter_mut().enumerate() {
                    *row = Some(first_row + i);
                }
            }
            RowMap::Grid {
                first,
                padded_width,
                width,
            } => {
                let v = first + first_row;
                let (mut y, mut x) = (v / padded_width, v % padded_width);
                for row in rows[..count].iter_mut() {
                    *row = (x < width).then_some(y * width + x);
                    x += 1;
                    if x == padded_width {
                        (y, x) = (y + 1, 0);
                    }
                }
            }
        }
        rows
    }
}

/// Copies the rows of a short last block of patch rows (fewer than 32) into this thread's
/// scratch, padded to 32, where [`columns`] reads them: once per product, not once a span.
///
/// # Safety
/// As [`columns`] for `a`'s rows.
pub(super) unsafe fn copy_tail(a: &Rows<'_>, rows: usize, tiles: usize) {
    let short_rows = rows % BLOCK_ROWS;
    if a.whole_blocks || short_rows == 0 {
        return;
    }
    let row_bytes = tiles * K_TILE;
    SCRATCH.with_borrow_mut(|scratch| {
        let short = &mut scratch.short;
        // Rows past the product's hold whatever an earlier product left (initialized once):
        // their sums are never stored.
        if short.len() < BLOCK_ROWS * row_bytes {
            short.resize(BLOCK_ROWS * row_bytes, 0);
        }
        for i in 0..short_rows {
            // SAFETY: row `rows - short_rows + i` of A is valid for `row_bytes` reads from
            // its first tile (the contract: patch rows); the scratch row holds `row_bytes`.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    a.tile(rows - short_rows + i, 0),
                    short.as_mut_ptr().add(i * row_bytes),
                    row_bytes,
                )
            };
        }
    });
}

/// One span of `span` panels (1 or 2, at `b`, `panel_stride` bytes apart) over `rows` rows
/// of A (`a`), `tiles` x 64 bytes of k each; the sums plus `offset`, finished as `store` says,
/// into C's first `width` columns (u8 or i32 elements, rows `ldc` elements apart, row by
/// row as `map` says).
///
/// # Safety
/// A [`Tiles`] lives on this thread; for each row `r < rows` (every row of its block with
/// `a.whole_blocks`) and tile `t < tiles`, `a.tile(r, t)` is valid for 64 bytes of reads;
/// with `!a.whole_blocks`, `a.taps` is `[0]` and `a.tiles_per_tap >= tiles` (each row's
/// tiles contiguous, as the short block's copy reads them) and, if its last block is short,
/// [`copy_tail`] ran for these rows on this thread since they last changed; each panel holds `tiles * 16` groups; C as the
/// module's contract says for `width` columns of every row `map` gives; `width <= 16 span`.
#[allow(clippy::too_many_arguments)] // the contract's operands, one each
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn columns(
    span: usize,
    rows: usize,
    a: &Rows<'_>,
    tiles: usize,
    b: *const i8,
    panel_stride: usize,
    offset: &[i32; COLS_MAX],
    store: &Store,
    c: *mut u8,
    ldc: usize,
    width: usize,
    map: RowMap,
) {
    debug_assert!((1..=SPAN).contains(&span) && width <= span * NR8);
    debug_assert!(a.whole_blocks || (a.taps == [0] && a.tiles_per_tap >= tiles));
    let row_bytes = tiles * K_TILE;
    let blocks = rows.div_ceil(BLOCK_ROWS);
    SCRATCH.with_borrow_mut(|scratch| {
        let Scratch { short, sums } = scratch;
        debug_assert!(
            a.whole_blocks
                || rows.is_multiple_of(BLOCK_ROWS)
                || short.len() >= BLOCK_ROWS * row_bytes
        );
        let short_block = Rows {
            base: short.as_ptr(),
            stride: row_bytes,
            taps: &[0],
            tiles_per_tap: tiles.max(1),
            whole_blocks: true,
        };
        if sums.len() < blocks {
            sums.resize(blocks, Sums([[0; SPAN * NR8]; BLOCK_ROWS]));
        }
        if tiles == 0 {
            // No k: no pass runs, and the sums are zero.
            sums[..blocks].fill(Sums([[0; SPAN * NR8]; BLOCK_ROWS]));
        }
        for first in (0..tiles).step_by(PASS_TILES) {
            let pass = PASS_TILES.min(tiles - first);
            for (block, sums) in sums[..blocks].iter_mut().enumerate() {
                let r0 = block * BLOCK_ROWS;
                let (source, row) = if r0 + BLOCK_ROWS <= rows || a.whole_blocks {
                    (a, r0)
                } else {
                    (&short_block, 0)
                };
                // A last block of 16 rows or fewer needs only the upper tile of A.
                let halves = if rows - r0 <= 16 { 1 } else { 2 };
                // SAFETY: the block's 32 rows are valid for `tiles` tiles of k (full or
                // whole blocks by the contract, the short one by the copy); the span's
                // panels hold `tiles` tiles of groups.
                unsafe {
                    multiply(
                        span,
                        halves,
                        first..first + pass,
                        source,
                        row,
                        b,
                        panel_stride,
                        sums,
                    )
                };
            }
        }
        for (block, sums) in sums[..blocks].iter().enumerate() {
            let r0 = block * BLOCK_ROWS;
            // SAFETY: every row `map` gives holds `width` columns of C (the contract).
            unsafe {
                finish(
                    sums,
                    r0,
                    BLOCK_ROWS.min(rows - r0),
                    width,
                    offset,
                    store,
                    c,
                    ldc,
                    map,
                )
            };
        }
    });
}

/// `sums` += the block of A's rows from `row` (32 of them) times the span's panels, over
/// the tiles of k `pass`; the sums start from zero on the first tile. With `halves` 1, only the
/// block's first 16 rows are computed (the other rows of `sums` then hold no product).
///
/// # Safety
/// As [`columns`], for one full block.
#[allow(clippy::too_many_arguments)] // the block's operands, one each
unsafe fn multiply(
    span: usize,
    halves: usize,
    pass: std::ops::Range<usize>,
    a: &Rows<'_>,
    row: usize,
    b: *const i8,
    panel_stride: usize,
    sums: &mut Sums,
) {
    let lda = a.stride;
    let b_first = b;
    let b_second = b.wrapping_add(panel_stride);
    let tile_step = TILE_GROUPS * NR8 * K_GROUP;
    let out = sums.0.as_mut_ptr() as *mut u8;
    let stride = SPAN * NR8 * 4;
    // Tiles 0-3 sum (rows 0-15, panel 0), (0-15, 1), (16-31, 0), (16-31, 1); tiles 4 and 5
    // hold A's two row halves, 6 and 7 the two panels' weights.
    // SAFETY: for every asm block: AMX runs and is configured (the caller's contract); the
    // loads read 16 rows of 64 bytes inside A's rows, the panels' groups (likewise) or
    // `sums` (32 rows of 128 bytes), where the stores write.
    unsafe {
        if pass.start == 0 {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _, options(nostack, nomem)
            );
        } else {
            asm!(
                "tileloadd tmm0, [{low} + {stride} * 1]",
                "tileloadd tmm1, [{low_second} + {stride} * 1]",
                "tileloadd tmm2, [{high} + {stride} * 1]",
                "tileloadd tmm3, [{high_second} + {stride} * 1]",
                low = in(reg) out,
                low_second = in(reg) out.wrapping_add(NR8 * 4),
                high = in(reg) out.wrapping_add(16 * stride),
                high_second = in(reg) out.wrapping_add(16 * stride + NR8 * 4),
                stride = in(reg) stride,
                out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _, options(nostack, readonly)
            );
        }
        let low = a.base.wrapping_add(row * a.stride);
        let high = a.base.wrapping_add((row + 16) * a.stride);
        let offsets = a.offsets(pass.clone());
        for (t, offset) in pass.zip(offsets) {
            let (a_low, a_high) = (low.wrapping_add(offset), high.wrapping_add(offset));
            let b_first = b_first.wrapping_add(t * tile_step);
            let b_second = b_second.wrapping_add(t * tile_step);
            let row = NR8 * K_GROUP;
            // Each tile load sits just before the products that use it (A low, B first,
            // product; A high, product; B second, its products), so loads and products
            // overlap; the blocks run in this order whatever the block's shape.
            asm!(
                "tileloadd tmm4, [{a_low} + {lda} * 1]",
                "tileloadd tmm6, [{b_first} + {row} * 1]",
                "tdpbusd tmm0, tmm4, tmm6",
                a_low = in(reg) a_low,
                b_first = in(reg) b_first,
                lda = in(reg) lda,
                row = in(reg) row,
                out("tmm0") _, out("tmm4") _, out("tmm6") _,
                options(nostack, readonly)
            );
            if halves == 2 {
                asm!(
                    "tileloadd tmm5, [{a_high} + {lda} * 1]",
                    "tdpbusd tmm2, tmm5, tmm6",
                    a_high = in(reg) a_high,
                    lda = in(reg) lda,
                    out("tmm2") _, out("tmm5") _,
                    options(nostack, readonly)
                );
            }
            if span == 2 {
                asm!(
                    "tileloadd tmm7, [{b_second} + {row} * 1]",
                    "tdpbusd tmm1, tmm4, tmm7",
                    b_second = in(reg) b_second,
                    row = in(reg) row,
                    out("tmm1") _, out("tmm7") _,
                    options(nostack, readonly)
                );
                if halves == 2 {
                    asm!("tdpbusd tmm3, tmm5, tmm7", out("tmm3") _, options(nostack, nomem));
                }
            }
        }
        asm!(
            "tilestored [{low} + {stride} * 1], tmm0",
            "tilestored [{low_second} + {stride} * 1], tmm1",
            "tilestored [{high} + {stride} * 1], tmm2",
            "tilestored [{high_second} + {stride} * 1], tmm3",
            low = in(reg) out,
            low_second = in(reg) out.wrapping_add(NR8 * 4),
            high = in(reg) out.wrapping_add(16 * stride),
            high_second = in(reg) out.wrapping_add(16 * stride + NR8 * 4),
            stride = in(reg) stride,
            options(nostack)
        );
    }
}

/// Stores the first `height` rows and `width` columns of `sums` plus `offset` into C: the
/// block's row `i` is the product's row `first_row + i`, placed where `map` says.
///
/// # Safety
/// C holds `width` elements at stride `ldc` in every row `map` gives for these rows; AVX-512
/// F, BW and VL run here.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[allow(clippy::too_many_arguments)] // the block's operands, one each
unsafe fn finish(
    sums: &Sums,
    first_row: usize,
    height: usize,
    width: usize,
    offset: &[i32; COLS_MAX],
    store: &Store,
    c: *mut u8,
    ldc: usize,
    map: RowMap,
) {
    let targets = map.rows(first_row, height);
    for p in 0..width.div_ceil(NR8) {
        let lanes = (width - p * NR8).min(NR8);
        let mask: __mmask16 = if lanes == NR8 { !0 } else { (1 << lanes) - 1 };
        // SAFETY: `offset` holds 48 i32; panel `p`'s are 16 of them.
        let offset = unsafe { _mm512_loadu_si512(offset.as_ptr().add(p * NR8) as *const _) };
        let rows = sums.0[..height]
            .iter()
            .zip(targets)
            .filter_map(|(sums, row)| row.map(|row| (row, sums)));
        match store {
            Store::U8 { scale, zero, low } => {
                // SAFETY: `scale` holds 48 f32; panel `p`'s are 16 of them.
                let scale = unsafe { _mm512_loadu_ps(scale.as_ptr().add(p * NR8)) };
                for (row, sums) in rows {
                    // SAFETY: a row of `sums` holds 32 i32; panel `p`'s are 16 of them.
                    let v = unsafe { _mm512_loadu_si512(sums.as_ptr().add(p * NR8) as *const _) };
                    let bytes = requantize_16(_mm512_add_epi32(v, offset), scale, *zero, *low);
                    // SAFETY: row `row` of C holds `lanes` bytes from column 16 p (the
                    // contract); the mask writes no others.
                    unsafe {
                        _mm_mask_storeu_epi8(c.add(row * ldc + p * NR8) as *mut i8, mask, bytes)
                    };
                }
            }
            Store::I32 => {
                for (row, sums) in rows {
                    // SAFETY: as above.
                    let v = unsafe { _mm512_loadu_si512(sums.as_ptr().add(p * NR8) as *const _) };
                    // SAFETY: as above, for i32 elements.
                    unsafe {
                        _mm512_mask_storeu_epi32(
                            (c as *mut i32).add(row * ldc + p * NR8) as *mut _,
                            mask,
                            _mm512_add_epi32(v, offset),
                        )
                    };
                }
            }
        }
    }
}
