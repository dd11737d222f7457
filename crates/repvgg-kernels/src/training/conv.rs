//! Convolutions over NCHW batches and their two gradients, on the GEMM micro-kernels: the
//! training form's 3x3 and 1x1 convolutions (without bias, since a batch norm follows each),
//! which `repvgg-burn` runs as custom burn operations because burn's CPU versions (and their
//! backward passes) are several times slower.
//!
//! Per group, all three convolution passes are one matrix product over the batch-wide column
//! index j = (image, output pixel), with q = (input channel, tap) in PyTorch's weight order:
//!
//! - forward: `Y[k][j] = sum_q W[k][q] col[q][j]`;
//! - input gradient: `dcol[q][j] = sum_k W[k][q] dY[k][j]`, each `dcol[q][j]` then added back
//!   onto the input pixel it was read from (col2im); at stride 1 it is instead a forward
//!   convolution of dY by the flipped kernel with its channel axes swapped;
//! - weight gradient: `dW[k][q] = sum_j dY[k][j] col[q][j]`.
//!
//! `col[q][j]` is the zero-padded input pixel that tap q of output j reads. It is never stored
//! whole: each task packs the slice it multiplies straight from the padded input into the
//! kernel's panel layout. Y and dY stay NCHW where a map has 64 pixels or more (column blocks
//! then stay inside one image, where a channel's pixels are contiguous); smaller maps are held
//! channel-major (`[k][j]`) and permuted once.

use std::borrow::Cow;
use std::ops::Range;

use rayon::prelude::*;

use super::{ShapeError, check_len};
use crate::gemm::{self, Init, NR, PackedB, Product, row_block};
use crate::partition::{round_up, split};
use crate::{Isa, OutPtr};

/// The shape of one convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvShape {
    pub batch: usize,
    pub in_channels: usize,
    pub height: usize,
    pub width: usize,
    pub out_channels: usize,
    /// The kernel's side (square kernels only).
    pub kernel: usize,
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
    pub groups: usize,
}

impl ConvShape {
    /// Why this shape cannot be convolved, if it cannot.
    pub fn check(&self) -> Result<(), ShapeError> {
        let s = self;
        if s.kernel == 0 || s.stride == 0 || s.groups == 0 || s.in_channels == 0 {
            return Err(ShapeError(format!(
                "{s:?}: kernel, stride, groups and input channels must be positive"
            )));
        }
        if !s.in_channels.is_multiple_of(s.groups) || !s.out_channels.is_multiple_of(s.groups) {
            return Err(ShapeError(format!(
                "{s:?}: channels must divide into the groups"
            )));
        }
        if s.height + 2 * s.padding < s.kernel || s.width + 2 * s.padding < s.kernel {
            return Err(ShapeError(format!(
                "{s:?}: the padded input is smaller than the kernel"
            )));
        }
        Ok(())
    }

    pub fn out_height(&self) -> usize {
        (self.height + 2 * self.padding - self.kernel) / self.stride + 1
    }

    pub fn out_width(&self) -> usize {
        (self.width + 2 * self.padding - self.kernel) / self.stride + 1
    }

    /// `(batch, in, height, width)`.
    pub fn input_dims(&self) -> [usize; 4] {
        [self.batch, self.in_channels, self.height, self.width]
    }

    /// `(batch, out, out height, out width)`.
    pub fn output_dims(&self) -> [usize; 4] {
        [
            self.batch,
            self.out_channels,
            self.out_height(),
            self.out_width(),
        ]
    }

    /// `(out, in / groups, k, k)`, PyTorch's layout.
    pub fn weight_dims(&self) -> [usize; 4] {
        let k = self.kernel;
        [self.out_channels, self.in_channels / self.groups, k, k]
    }

    pub fn input_len(&self) -> usize {
        self.input_dims().iter().product()
    }

    pub fn output_len(&self) -> usize {
        self.output_dims().iter().product()
    }

    pub fn weight_len(&self) -> usize {
        self.weight_dims().iter().product()
    }
}

/// `Y = conv(x, W)`: NCHW input, `(out, in / groups, k, k)` weight, NCHW output.
pub fn forward(
    isa: Isa,
    shape: &ConvShape,
    input: &[f32],
    weight: &[f32],
) -> Result<Vec<f32>, ShapeError> {
    let plan = Plan::new(isa, shape)?;
    check_len("input", input.len(), shape.input_len())?;
    check_len("weight", weight.len(), shape.weight_len())?;
    let padded = plan.pad(input);
    let mut y = vec![0.0f32; shape.out_channels * plan.columns];
    let out = OutPtr(y.as_mut_ptr());
    let stride = plan.row_stride();
    plan.forward_tasks().par_iter().for_each_init(
        PackedB::default,
        |packed, (group, cols, rows)| {
            let first_channel = group * plan.in_per_group * plan.padded_plane;
            let bases = &plan.column_base[cols.clone()];
            packed.refill_rows(plan.reduction, cols.len(), |q, lanes, values| {
                gather(
                    &padded,
                    first_channel + plan.tap_offset[q],
                    &bases[lanes],
                    values,
                )
            });
            let first_row = group * plan.out_per_group + rows.start;
            let product = Product::new(
                rows.len(),
                |r| {
                    weight
                        .as_ptr()
                        .wrapping_add((first_row + r) * plan.reduction)
                },
                packed,
                out.get().wrapping_add(plan.offset(first_row, cols.start)),
                stride,
            );
            // SAFETY: W has `reduction` values per output channel; every task writes its own
            // block (its rows and columns) of y.
            unsafe { gemm::gemm(plan.isa, &product) }
        },
    );
    Ok(if plan.direct { y } else { plan.to_nchw(&y) })
}

/// `dL/dx` from `dL/dY`: each output gradient, times the weights, added back onto the input
/// pixels it was computed from.
pub fn input_grad(
    isa: Isa,
    shape: &ConvShape,
    weight: &[f32],
    out_grad: &[f32],
) -> Result<Vec<f32>, ShapeError> {
    shape.check()?;
    check_len("weight", weight.len(), shape.weight_len())?;
    check_len("output gradient", out_grad.len(), shape.output_len())?;
    if shape.stride == 1 && shape.padding < shape.kernel {
        // A stride-1 convolution's input gradient is itself a convolution: of dY, by the
        // kernel flipped and with its channel axes swapped, padded by k - 1 - p. That runs as
        // a forward pass, with no scatter.
        let k = shape.kernel;
        let (in_g, out_g) = (
            shape.in_channels / shape.groups,
            shape.out_channels / shape.groups,
        );
        let taps = k * k;
        let mut flipped = vec![0.0f32; weight.len()];
        flipped
            .par_chunks_mut(out_g * taps)
            .enumerate()
            .for_each(|(row, dst)| {
                let (group, i) = (row / in_g, row % in_g);
                for (o, dst) in dst.chunks_exact_mut(taps).enumerate() {
                    let src = &weight[((group * out_g + o) * in_g + i) * taps..][..taps];
                    dst.iter_mut()
                        .zip(src.iter().rev())
                        .for_each(|(d, &s)| *d = s);
                }
            });
        let transposed_shape = ConvShape {
            in_channels: shape.out_channels,
            out_channels: shape.in_channels,
            height: shape.out_height(),
            width: shape.out_width(),
            padding: k - 1 - shape.padding,
            ..*shape
        };
        return forward(isa, &transposed_shape, out_grad, &flipped);
    }
    let plan = Plan::new(isa, shape)?;
    let dy = plan.arrange(out_grad);
    let (out_g, reduction) = (plan.out_per_group, plan.reduction);
    let transposed = transpose_per_group(weight, out_g, reduction);
    let mut padded_grad = vec![0.0f32; shape.batch * shape.in_channels * plan.padded_plane];
    let grad = OutPtr(padded_grad.as_mut_ptr());
    // Tasks own whole images and whole input channels, so no two of them add into the same
    // input pixel. A channel block's rows of W^T stay in L2.
    let taps = shape.kernel * shape.kernel;
    let channels = split(
        plan.in_per_group,
        plan.in_per_group.div_ceil((128 / taps).max(1)),
        1,
    );
    // Images are split only when the channel blocks are too few to share out: each image
    // range reads all of W^T again.
    let image_parts = plan
        .target_tasks()
        .div_ceil(shape.groups * channels.len())
        .min(shape.batch);
    let images = split(shape.batch, image_parts, 1);
    let mut tasks = Vec::new();
    for group in 0..shape.groups {
        for c in &channels {
            for i in &images {
                tasks.push((group, c.clone(), i.clone()));
            }
        }
    }
    tasks.par_iter().for_each_init(
        || (PackedB::default(), Vec::new()),
        |(packed, dcol), (group, channels, images)| {
            let rows = channels.start * taps..channels.end * taps;
            // A block of dcol stays within L2.
            let block = round_up((65536 / rows.len()).clamp(NR, 512), NR);
            let columns = images.start * plan.pixels..images.end * plan.pixels;
            let first_channel = group * plan.in_per_group * plan.padded_plane;
            for piece in plan.pieces(columns.clone(), block) {
                let (start, width) = (piece.start, piece.len());
                packed.refill_rows(out_g, width, |k, lanes, values| {
                    let at = plan.offset(group * out_g + k, start + lanes.start);
                    values.copy_from_slice(&dy[at..at + values.len()]);
                });
                dcol.resize(rows.len() * width, 0.0);
                let product = Product::new(
                    rows.len(),
                    |r| {
                        transposed
                            .as_ptr()
                            .wrapping_add((group * reduction + rows.start + r) * out_g)
                    },
                    packed,
                    dcol.as_mut_ptr(),
                    width,
                );
                // SAFETY: `transposed` has out_g values per row; dcol is this task's own.
                unsafe { gemm::gemm(plan.isa, &product) }
                let bases = &plan.column_base[start..start + width];
                for (q, row) in rows.clone().zip(dcol.chunks_exact(width)) {
                    let offset = first_channel + plan.tap_offset[q];
                    for (&base, &value) in bases.iter().zip(row) {
                        // SAFETY: column bases and tap offsets stay inside the padded input,
                        // and only this task touches these images' channels.
                        unsafe { *grad.get().add(base + offset) += value };
                    }
                }
            }
        },
    );
    Ok(plan.unpad(padded_grad))
}

/// Per group, a `(rows, cols)` matrix transposed, in 32x32 tiles so both sides move by lines.
fn transpose_per_group(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const TILE: usize = 32;
    let mut out = vec![0.0f32; m.len()];
    if rows * cols == 0 {
        return out;
    }
    // Tasks take TILE output rows (input columns) of one group.
    out.par_chunks_mut(rows * cols)
        .zip(m.par_chunks(rows * cols))
        .for_each(|(out, src)| {
            out.par_chunks_mut(TILE * rows)
                .enumerate()
                .for_each(|(task, dst)| {
                    let (c0, width) = (task * TILE, dst.len() / rows);
                    for r0 in (0..rows).step_by(TILE) {
                        for c in 0..width {
                            for r in r0..(r0 + TILE).min(rows) {
                                dst[c * rows + r] = src[r * cols + c0 + c];
                            }
                        }
                    }
                });
        });
    out
}

/// `dL/dW` from the input and `dL/dY`: the sum over every output position of its gradient
/// times the input pixels it read.
pub fn weight_grad(
    isa: Isa,
    shape: &ConvShape,
    input: &[f32],
    out_grad: &[f32],
) -> Result<Vec<f32>, ShapeError> {
    let plan = Plan::new(isa, shape)?;
    check_len("input", input.len(), shape.input_len())?;
    check_len("output gradient", out_grad.len(), shape.output_len())?;
    let mut grad = vec![0.0f32; shape.weight_len()];
    if plan.columns == 0 {
        return Ok(grad);
    }
    let padded = plan.pad(input);
    let dy = plan.arrange(out_grad);
    let tasks = plan.weight_grad_tasks();
    let parts = tasks.iter().map(|t| t.2 + 1).max().unwrap_or(1);
    // With the sum over positions split in parts, each part adds into its own copy.
    let mut partials = vec![vec![0.0f32; grad.len()]; parts - 1];
    let outs: Vec<OutPtr> = std::iter::once(OutPtr(grad.as_mut_ptr()))
        .chain(partials.iter_mut().map(|p| OutPtr(p.as_mut_ptr())))
        .collect();
    let (out_g, reduction) = (plan.out_per_group, plan.reduction);
    tasks
        .par_iter()
        .for_each_init(PackedB::default, |packed, (group, qs, part, columns)| {
            let first_channel = group * plan.in_per_group * plan.padded_plane;
            let out = outs[*part];
            for piece in plan.pieces(columns.clone(), GRAD_CHUNK) {
                let (start, len) = (piece.start, piece.len());
                let taps = &plan.tap_offset[qs.clone()];
                packed.refill_rows(len, qs.len(), |j, lanes, values| {
                    gather(
                        &padded,
                        first_channel + plan.column_base[start + j],
                        &taps[lanes],
                        values,
                    )
                });
                let init = if start == columns.start {
                    Init::Zero
                } else {
                    Init::Accumulate
                };
                // In blocks of rows whose slice of dY stays in L2 while it meets every panel.
                let mr = plan.row_block;
                let block = round_up((32768 / len).max(mr), mr);
                for rows in split(out_g, out_g.div_ceil(block), mr) {
                    let product = Product::new(
                        rows.len(),
                        |r| {
                            dy.as_ptr()
                                .wrapping_add(plan.offset(group * out_g + rows.start + r, start))
                        },
                        packed,
                        out.get()
                            .wrapping_add((group * out_g + rows.start) * reduction + qs.start),
                        reduction,
                    )
                    .init(init);
                    // SAFETY: a piece lies in one image when dY is NCHW, so its rows are
                    // contiguous; every task writes its own block of its own part's copy.
                    unsafe { gemm::gemm(plan.isa, &product) }
                }
            }
        });
    for partial in &partials {
        grad.iter_mut().zip(partial).for_each(|(g, p)| *g += p);
    }
    Ok(grad)
}

/// Positions summed per packed block of the weight gradient.
const GRAD_CHUNK: usize = 512;

/// What every pass derives from the shape: sizes, and where in the padded input each column
/// and each (channel, tap) reads.
struct Plan {
    shape: ConvShape,
    in_per_group: usize,
    out_per_group: usize,
    /// q's count: input channels per group x taps.
    reduction: usize,
    pixels: usize,
    columns: usize,
    /// Output-shaped values (Y, dY) stay NCHW, and column blocks stay inside one image; when
    /// images are too small for that to give long blocks, they are held channel-major.
    direct: bool,
    padded_width: usize,
    padded_plane: usize,
    /// Per column j: offset of its first tap in channel 0 of its image in the padded input.
    column_base: Vec<usize>,
    /// Per q: offset from a column's base to the pixel it reads.
    tap_offset: Vec<usize>,
    isa: Isa,
    /// The micro-kernel's rows: output channels are split in multiples of it.
    row_block: usize,
}

impl Plan {
    fn new(isa: Isa, shape: &ConvShape) -> Result<Plan, ShapeError> {
        shape.check()?;
        let s = *shape;
        let (oh, ow) = (s.out_height(), s.out_width());
        let (ph, pw) = (s.height + 2 * s.padding, s.width + 2 * s.padding);
        let in_per_group = s.in_channels / s.groups;
        let image = s.in_channels * ph * pw;
        let column_base = (0..s.batch)
            .flat_map(|n| {
                (0..oh).flat_map(move |oy| {
                    (0..ow).map(move |ox| n * image + oy * s.stride * pw + ox * s.stride)
                })
            })
            .collect();
        let tap_offset = (0..in_per_group)
            .flat_map(|c| {
                (0..s.kernel)
                    .flat_map(move |dy| (0..s.kernel).map(move |dx| c * ph * pw + dy * pw + dx))
            })
            .collect();
        Ok(Plan {
            shape: s,
            in_per_group,
            out_per_group: s.out_channels / s.groups,
            reduction: in_per_group * s.kernel * s.kernel,
            pixels: oh * ow,
            columns: s.batch * oh * ow,
            direct: oh * ow >= 64,
            padded_width: pw,
            padded_plane: ph * pw,
            column_base,
            tap_offset,
            isa,
            row_block: row_block(isa),
        })
    }

    /// Where value (output channel k, column j) of an output-shaped buffer is.
    fn offset(&self, k: usize, j: usize) -> usize {
        if self.direct {
            let (n, p) = (j / self.pixels, j % self.pixels);
            (n * self.shape.out_channels + k) * self.pixels + p
        } else {
            k * self.columns + j
        }
    }

    /// The distance between consecutive output channels of a column block.
    fn row_stride(&self) -> usize {
        if self.direct {
            self.pixels
        } else {
            self.columns
        }
    }

    /// An NCHW output-shaped input (dY) in this plan's layout.
    fn arrange<'a>(&self, nchw: &'a [f32]) -> Cow<'a, [f32]> {
        if self.direct {
            Cow::Borrowed(nchw)
        } else {
            Cow::Owned(self.channel_major(nchw))
        }
    }

    /// `columns` in consecutive pieces of at most `max`, none crossing an image boundary when
    /// the layout is NCHW.
    fn pieces(&self, columns: Range<usize>, max: usize) -> Vec<Range<usize>> {
        let mut pieces = Vec::new();
        let mut start = columns.start;
        while start < columns.end {
            let mut end = (start + max).min(columns.end);
            if self.direct {
                end = end.min((start / self.pixels + 1) * self.pixels);
            }
            pieces.push(start..end);
            start = end;
        }
        pieces
    }

    fn target_tasks(&self) -> usize {
        4 * rayon::current_num_threads()
    }

    /// The input with its zero border (borrowed when there is none).
    fn pad<'a>(&self, input: &'a [f32]) -> Cow<'a, [f32]> {
        let (s, pad) = (&self.shape, self.shape.padding);
        if pad == 0 {
            return Cow::Borrowed(input);
        }
        let mut padded = vec![0.0f32; s.batch * s.in_channels * self.padded_plane];
        padded
            .par_chunks_mut(self.padded_plane)
            .zip(input.par_chunks(s.height * s.width))
            .for_each(|(dst, src)| {
                for (y, row) in src.chunks_exact(s.width).enumerate() {
                    let at = (y + pad) * self.padded_width + pad;
                    dst[at..at + s.width].copy_from_slice(row);
                }
            });
        Cow::Owned(padded)
    }

    /// The inverse of [`Plan::pad`]: the border cut off.
    fn unpad(&self, padded: Vec<f32>) -> Vec<f32> {
        let (s, pad) = (&self.shape, self.shape.padding);
        if pad == 0 {
            return padded;
        }
        let mut out = vec![0.0f32; s.input_len()];
        out.par_chunks_mut(s.height * s.width)
            .zip(padded.par_chunks(self.padded_plane))
            .for_each(|(dst, src)| {
                for (y, row) in dst.chunks_exact_mut(s.width).enumerate() {
                    let at = (y + pad) * self.padded_width + pad;
                    row.copy_from_slice(&src[at..at + s.width]);
                }
            });
        out
    }

    /// NCHW output-shaped values as `[channel][image, pixel]`.
    fn channel_major(&self, nchw: &[f32]) -> Vec<f32> {
        swap_blocks(nchw, self.shape.batch, self.shape.out_channels, self.pixels)
    }

    /// The inverse of [`Plan::channel_major`].
    fn to_nchw(&self, channel_major: &[f32]) -> Vec<f32> {
        swap_blocks(
            channel_major,
            self.shape.out_channels,
            self.shape.batch,
            self.pixels,
        )
    }

    /// (group, columns, output channels within the group): column blocks of up to 256, more
    /// and smaller (down to 64) when there are few, and the channels split when still short.
    fn forward_tasks(&self) -> Vec<(usize, Range<usize>, Range<usize>)> {
        let (groups, target) = (self.shape.groups, self.target_tasks());
        let cols = if self.direct {
            // Per image, pieces of up to 256 columns, more (down to 64) if they are few.
            let per_image = self.pixels.div_ceil(256).max(
                target
                    .div_ceil(groups * self.shape.batch)
                    .min(self.pixels / 64),
            );
            let piece = round_up(self.pixels.div_ceil(per_image), NR);
            (0..self.shape.batch)
                .flat_map(|n| self.pieces(n * self.pixels..(n + 1) * self.pixels, piece))
                .collect::<Vec<_>>()
        } else {
            let blocks = self
                .columns
                .div_ceil(256)
                .max(target.div_ceil(groups).min(self.columns / 64));
            split(self.columns, blocks.max(1), NR)
        };
        if cols.is_empty() {
            return Vec::new();
        }
        let short = target.div_ceil(groups * cols.len());
        let mr = self.row_block;
        let rows = split(
            self.out_per_group,
            short.min(self.out_per_group / (4 * mr)).max(1),
            mr,
        );
        let mut tasks = Vec::new();
        for group in 0..groups {
            for c in &cols {
                for r in &rows {
                    tasks.push((group, c.clone(), r.clone()));
                }
            }
        }
        tasks
    }

    /// (group, q columns of dW, part, positions summed): dW's columns split in panels, and
    /// the positions in parts when the panels are too few to share out.
    fn weight_grad_tasks(&self) -> Vec<(usize, Range<usize>, usize, Range<usize>)> {
        let (groups, target) = (self.shape.groups, self.target_tasks());
        let panels = self.reduction.div_ceil(NR);
        let qs = split(
            self.reduction,
            panels.min(target.div_ceil(groups)).max(1),
            NR,
        );
        let parts = target
            .div_ceil(groups * qs.len())
            .min(self.columns.div_ceil(GRAD_CHUNK));
        let positions = split(self.columns, parts.max(1), GRAD_CHUNK.min(self.columns));
        let mut tasks = Vec::new();
        for group in 0..groups {
            for q in &qs {
                for (part, p) in positions.iter().enumerate() {
                    tasks.push((group, q.clone(), part, p.clone()));
                }
            }
        }
        tasks
    }
}

/// `[outer][inner][block]` values as `[inner][outer][block]`: blocks of `block` contiguous
/// values with their two axes swapped.
fn swap_blocks(src: &[f32], outer: usize, inner: usize, block: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; src.len()];
    if src.is_empty() || block == 0 {
        return out;
    }
    out.par_chunks_mut(outer * block)
        .enumerate()
        .for_each(|(i, row)| {
            for (o, dst) in row.chunks_exact_mut(block).enumerate() {
                let at = (o * inner + i) * block;
                dst.copy_from_slice(&src[at..at + block]);
            }
        });
    out
}

/// `values[i] = src[offset + at[i]]`: one copy when the offsets run consecutively (a row of a
/// stride-1 map, or three taps of one kernel row).
fn gather(src: &[f32], offset: usize, at: &[usize], values: &mut [f32]) {
    let (first, last) = (at[0], at[at.len() - 1]);
    if last - first == at.len() - 1 {
        values.copy_from_slice(&src[offset + first..=offset + last]);
    } else {
        for (value, &i) in values.iter_mut().zip(at) {
            *value = src[offset + i];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Direct f64 convolution: output, input gradient and weight gradient, straight from the
    /// definition (every output position, every tap).
    fn reference(s: &ConvShape, x: &[f32], w: &[f32], dy: &[f32]) -> [Vec<f64>; 3] {
        let (oh, ow) = (s.out_height(), s.out_width());
        let (cg, kg) = (s.in_channels / s.groups, s.out_channels / s.groups);
        let mut y = vec![0.0f64; s.output_len()];
        let mut dx = vec![0.0f64; s.input_len()];
        let mut dw = vec![0.0f64; s.weight_len()];
        for n in 0..s.batch {
            for k in 0..s.out_channels {
                let group = k / kg;
                for oy in 0..oh {
                    for ox in 0..ow {
                        let yi = ((n * s.out_channels + k) * oh + oy) * ow + ox;
                        for c in 0..cg {
                            let ci = group * cg + c;
                            for ty in 0..s.kernel {
                                for tx in 0..s.kernel {
                                    let iy = (oy * s.stride + ty) as isize - s.padding as isize;
                                    let ix = (ox * s.stride + tx) as isize - s.padding as isize;
                                    if iy < 0
                                        || ix < 0
                                        || iy >= s.height as isize
                                        || ix >= s.width as isize
                                    {
                                        continue;
                                    }
                                    let xi = ((n * s.in_channels + ci) * s.height + iy as usize)
                                        * s.width
                                        + ix as usize;
                                    let wi = ((k * cg + c) * s.kernel + ty) * s.kernel + tx;
                                    y[yi] += w[wi] as f64 * x[xi] as f64;
                                    dx[xi] += w[wi] as f64 * dy[yi] as f64;
                                    dw[wi] += x[xi] as f64 * dy[yi] as f64;
                                }
                            }
                        }
                    }
                }
            }
        }
        [y, dx, dw]
    }

    /// Worst error relative to the reference's largest magnitude.
    fn relative_error(got: &[f32], want: &[f64]) -> f64 {
        assert_eq!(got.len(), want.len());
        let scale = want.iter().fold(1e-30f64, |m, v| m.max(v.abs()));
        got.iter()
            .zip(want)
            .map(|(&g, &w)| (g as f64 - w).abs() / scale)
            .fold(0.0, f64::max)
    }

    #[test]
    fn forward_and_gradients_match_a_direct_f64_convolution() {
        let mut rng = StdRng::seed_from_u64(7);
        let shapes = [
            // RepVGG's 3x3 and 1x1 branches, stride 1 and 2, odd sizes, groups.
            (2, 5, 9, 7, 8, 3, 1, 1, 1),
            (3, 4, 10, 11, 6, 3, 2, 1, 1),
            (2, 5, 9, 7, 8, 1, 1, 0, 1),
            (2, 6, 9, 8, 6, 1, 2, 0, 1),
            (2, 8, 6, 6, 12, 3, 1, 1, 4),
            (1, 8, 7, 5, 8, 3, 2, 1, 2),
            // Enough columns and channels for several tasks, reduction chunks and partial
            // sums, with edge panels and edge rows.
            (5, 3, 21, 19, 20, 3, 1, 1, 1),
            (4, 40, 5, 6, 70, 3, 1, 1, 1),
            // Maps of 64 pixels and more keep Y and dY in NCHW (blocks within an image).
            (2, 8, 20, 18, 8, 3, 2, 1, 2),
            (2, 6, 12, 12, 10, 1, 1, 0, 1),
            (3, 4, 8, 8, 4, 3, 1, 1, 1),
        ];
        for (batch, cin, h, w, cout, kernel, stride, padding, groups) in shapes {
            let s = ConvShape {
                batch,
                in_channels: cin,
                height: h,
                width: w,
                out_channels: cout,
                kernel,
                stride,
                padding,
                groups,
            };
            let mut draw =
                |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0..1.0)).collect() };
            let (x, wt, dy) = (
                draw(s.input_len()),
                draw(s.weight_len()),
                draw(s.output_len()),
            );
            let [y_ref, dx_ref, dw_ref] = reference(&s, &x, &wt, &dy);
            // f32 products summed over at most a few hundred terms: a few 1e-7 of the scale.
            for isa in Isa::available() {
                for (name, got, want) in [
                    ("forward", forward(isa, &s, &x, &wt).unwrap(), &y_ref),
                    (
                        "input grad",
                        input_grad(isa, &s, &wt, &dy).unwrap(),
                        &dx_ref,
                    ),
                    (
                        "weight grad",
                        weight_grad(isa, &s, &x, &dy).unwrap(),
                        &dw_ref,
                    ),
                ] {
                    let err = relative_error(&got, want);
                    assert!(err < 1e-5, "{isa} {name} {s:?}: relative error {err:e}");
                }
            }
        }
    }

    #[test]
    fn an_empty_batch_gives_empty_outputs_and_zero_weight_gradients() {
        let s = ConvShape {
            batch: 0,
            in_channels: 4,
            height: 5,
            width: 5,
            out_channels: 4,
            kernel: 3,
            stride: 1,
            padding: 1,
            groups: 1,
        };
        let w = vec![1.0; s.weight_len()];
        for isa in Isa::available() {
            assert!(forward(isa, &s, &[], &w).unwrap().is_empty());
            assert!(input_grad(isa, &s, &w, &[]).unwrap().is_empty());
            assert_eq!(
                weight_grad(isa, &s, &[], &[]).unwrap(),
                vec![0.0; s.weight_len()]
            );
        }
    }

    #[test]
    fn buffers_of_the_wrong_length_and_impossible_shapes_are_errors() {
        let s = ConvShape {
            batch: 2,
            in_channels: 4,
            height: 5,
            width: 5,
            out_channels: 8,
            kernel: 3,
            stride: 1,
            padding: 1,
            groups: 2,
        };
        let (x, w, dy) = (
            vec![1.0; s.input_len()],
            vec![1.0; s.weight_len()],
            vec![1.0; s.output_len()],
        );
        let isa = Isa::Portable;
        let err = forward(isa, &s, &x[1..], &w).unwrap_err();
        assert!(err.0.contains("input has"), "{err}");
        assert!(forward(isa, &s, &x, &w[1..]).is_err());
        assert!(input_grad(isa, &s, &w, &dy[1..]).is_err());
        assert!(weight_grad(isa, &s, &x, &dy[1..]).is_err());
        for bad in [
            ConvShape { groups: 3, ..s },
            ConvShape { stride: 0, ..s },
            ConvShape {
                height: 0,
                padding: 0,
                ..s
            },
        ] {
            let err = forward(isa, &bad, &x, &w).unwrap_err();
            assert!(err.0.contains("ConvShape"), "{err}");
        }
    }
}
