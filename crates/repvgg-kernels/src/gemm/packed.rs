//! Weights packed once for the micro-kernels.

use super::NR;

/// A `k x n` matrix packed as `[panel][k][NR]`, each panel holding NR columns, the last
/// padded with zeros. The default is an empty matrix, to be filled with
/// [`PackedB::refill_rows`].
#[derive(Default)]
pub struct PackedB {
    pub(super) k: usize,
    pub(super) n: usize,
    data: Vec<PanelRow>,
}

/// One row of a panel, on a cache line of its own: a kernel's 16-lane load of it then reads
/// one line, not two (a plain `Vec<f32>` of this size starts 16 bytes into a page with glibc).
#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
struct PanelRow([f32; NR]);

impl PackedB {
    /// Packs the matrix whose element (row, col) is `at(row, col)`.
    pub fn new(k: usize, n: usize, at: impl Fn(usize, usize) -> f32) -> PackedB {
        let mut packed = PackedB::default();
        packed.refill_rows(k, n, |row, cols, lanes| {
            for (lane, value) in lanes.iter_mut().enumerate() {
                *value = at(row, cols.start + lane);
            }
        });
        packed
    }

    /// Packs a new `k x n` matrix into this one's storage (so a loop that packs one slice of
    /// its operand after another allocates once), `fill(row, cols, lanes)` writing a panel's
    /// stretch of one row at a time (`lanes[i]` is column `cols.start + i`), so a caller whose
    /// rows are contiguous in memory can copy them.
    pub fn refill_rows(
        &mut self,
        k: usize,
        n: usize,
        fill: impl Fn(usize, std::ops::Range<usize>, &mut [f32]),
    ) {
        let panels = n.div_ceil(NR);
        (self.k, self.n) = (k, n);
        self.data.resize(panels * k, PanelRow::default());
        self.data.truncate(panels * k);
        if k == 0 {
            return;
        }
        for (panel, block) in self.data.chunks_exact_mut(k).enumerate() {
            let cols = panel * NR..(panel * NR + NR).min(n);
            let width = cols.len();
            for (row, PanelRow(lanes)) in block.iter_mut().enumerate() {
                fill(row, cols.clone(), &mut lanes[..width]);
                // Lanes past the last column are multiplied but never stored; zero keeps
                // them finite.
                lanes[width..].fill(0.0);
            }
        }
    }

    /// A `k x n` matrix of zeros, to be written panel row by panel row.
    pub fn zeros(k: usize, n: usize) -> PackedB {
        PackedB {
            k,
            n,
            data: vec![PanelRow::default(); n.div_ceil(NR) * k],
        }
    }

    /// Rows of the matrix (its `k`).
    pub fn rows(&self) -> usize {
        self.k
    }

    /// Columns of the matrix (its `n`).
    pub fn cols(&self) -> usize {
        self.n
    }

    /// Row `row` of panel `panel`: columns `panel * NR..` (zero past the last).
    pub fn panel_row(&self, panel: usize, row: usize) -> &[f32] {
        &self.data[panel * self.k + row].0
    }

    /// As [`PackedB::panel_row`], to write. Lanes past the last column must stay zero.
    pub fn panel_row_mut(&mut self, panel: usize, row: usize) -> &mut [f32] {
        &mut self.data[panel * self.k + row].0
    }

    /// Where row `row` of panel `panel` starts; `row` may be `k` (the end of the panel).
    pub(super) fn panel_ptr(&self, panel: usize, row: usize) -> *const f32 {
        // PanelRow is NR floats with no padding, so the rows are one run of floats.
        self.data
            .as_ptr()
            .cast::<f32>()
            .wrapping_add((panel * self.k + row) * NR)
    }
}
