//! im2col: each output position's 3x3 patch copied into a row, then one product per task
//! against the packed weights.

use repvgg_kernels::Isa;
use repvgg_kernels::gemm::{self, Product, strided};

use crate::layer::{ConvLayer, RowTask};

impl ConvLayer {
    /// Computes the task's outputs through im2col, its patches in `patches` (grown as needed).
    ///
    /// # Safety
    /// `task.out` must be the call's `(n, oh, ow, cout)` output, whose block of this task's
    /// rows and group columns no other thread touches meanwhile.
    pub(crate) unsafe fn im2col_task(&self, isa: Isa, task: &RowTask<'_>, patches: &mut Vec<f32>) {
        let g = &self.geometry;
        let (cin, cin_g, cout_g) = (g.in_channels, g.in_per_group(), g.out_per_group());
        let k = 9 * cin_g;
        let count = task.range.items.len();
        if patches.len() < count * k {
            patches.resize(count * k, 0.0);
        }
        let patches = &mut patches[..count * k];
        // Without groups or dilation, the three taps of a patch row inside the map are one
        // contiguous run of the NHWC input.
        let runs = g.groups == 1 && g.dilation == 1;
        let (h, w) = (task.h as isize, task.w as isize);
        let (input, run_len) = (task.input, 3 * cin);
        // Row r holds the 3x3 patch of the task's output position r, tap-major.
        for (row, origin) in patches.chunks_exact_mut(k).zip(self.origins(task)) {
            let (row0, y, x) = origin;
            if runs && y >= 0 && x >= 0 && y + 2 < h && x + 2 < w {
                // The whole patch inside the map: three copies, no per-tap checks.
                let at = ((row0 + y as usize) * task.w + x as usize) * cin;
                for (ky, dst) in row.chunks_exact_mut(run_len).enumerate() {
                    copy_run(dst, &input[at + ky * task.w * cin..]);
                }
                continue;
            }
            for ky in 0..3 {
                // On the border, a patch row whose three taps are inside is still one run.
                let inside = runs
                    .then(|| self.tap_offset(task, origin, ky, 0))
                    .flatten()
                    .filter(|_| self.tap_offset(task, origin, ky, 2).is_some());
                if let Some(at) = inside {
                    copy_run(&mut row[ky * run_len..(ky + 1) * run_len], &input[at..]);
                    continue;
                }
                for kx in 0..3 {
                    let dst = &mut row[(ky * 3 + kx) * cin_g..(ky * 3 + kx + 1) * cin_g];
                    match self.tap_offset(task, origin, ky, kx) {
                        Some(at) => dst.copy_from_slice(&input[at..at + cin_g]),
                        None => dst.fill(0.0),
                    }
                }
            }
        }
        let group = task.range.group;
        let product = Product::new(
            count,
            strided(patches.as_ptr(), k),
            &self.packed[group],
            task.output_block(g.out_channels, cout_g),
            g.out_channels,
        )
        .cols(task.range.cols.clone())
        .bias(&self.bias[group * cout_g..(group + 1) * cout_g])
        .relu(task.relu);
        // SAFETY: the patches are `count` rows of k values; the caller owns these outputs.
        unsafe { gemm::gemm(isa, &product) };
    }
}

/// Fills `dst` with the first `dst.len()` values of `src`: one row of three taps of a patch.
/// The RGB stem's nine values move as a fixed-size array, not through a `memcpy` call.
fn copy_run(dst: &mut [f32], src: &[f32]) {
    if let Ok(dst) = <&mut [f32; 9]>::try_from(&mut *dst) {
        dst.copy_from_slice(&src[..9]);
    } else {
        dst.copy_from_slice(&src[..dst.len()]);
    }
}
