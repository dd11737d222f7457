//! Implicit GEMM: nine products per task, one per tap, each reading its rows straight from
//! the NHWC input (no im2col copy), accumulated in place. Padding rows read a row of zeros.
//! It serves layers whose weights outgrow L2: a task reads its slice of them once over many
//! rows.

use repvgg_kernels::Isa;
use repvgg_kernels::gemm::{self, Init, Product};

use crate::layer::{ConvLayer, RowTask};

impl ConvLayer {
    /// Computes the task's outputs as nine per-tap products; `origins` is scratch for the
    /// task's per-position origins (grown as needed).
    ///
    /// # Safety
    /// As [`ConvLayer::im2col_task`].
    pub(crate) unsafe fn implicit_task(
        &self,
        isa: Isa,
        task: &RowTask<'_>,
        origins: &mut Vec<(usize, isize, isize)>,
    ) {
        let g = &self.geometry;
        let (cin_g, cout_g) = (g.in_per_group(), g.out_per_group());
        let group = task.range.group;
        let bias = &self.bias[group * cout_g..(group + 1) * cout_g];
        origins.clear();
        origins.extend(self.origins(task));
        for tap in 0..9 {
            let a_row = |r: usize| match self.tap_offset(task, origins[r], tap / 3, tap % 3) {
                Some(at) => task.input[at..].as_ptr(),
                None => self.zeros.as_ptr(),
            };
            let init = if tap == 0 {
                Init::Bias(bias)
            } else {
                Init::Accumulate
            };
            let product = Product::new(
                origins.len(),
                a_row,
                &self.packed[group],
                task.output_block(g.out_channels, cout_g),
                g.out_channels,
            )
            .k(tap * cin_g..(tap + 1) * cin_g)
            .cols(task.range.cols.clone())
            .init(init)
            .relu(task.relu && tap == 8);
            // SAFETY: every row pointer covers cin_g values (a tap inside the map has this
            // group's cin_g channels; the zeros row has cin_g); the caller owns these outputs.
            unsafe { gemm::gemm(isa, &product) };
        }
    }
}
