//! One deployed layer (a 3x3 convolution with bias, SE and ReLU) and the code that executes
//! its plan: the tasks of [`crate::plan`] run on the pool, each on the kernels of the
//! engine's instruction set.

use std::sync::OnceLock;

use rayon::prelude::*;
use repvgg_kernels::gemm::PackedB;
use repvgg_kernels::winograd::{self, Algorithm};
use repvgg_kernels::{Isa, OutPtr};

use crate::plan::{self, Call, Choices, Geometry, LayerPlan, Scheme, TaskRange};
use crate::se::SqueezeExcite;
use crate::workspace::with_task_scratch;

/// One packed 3x3 convolution with bias (and SE).
pub(crate) struct ConvLayer {
    pub geometry: Geometry,
    /// Per group, the `(9 * in/g) x (out/g)` weight matrix, rows ordered (ky, kx, c).
    pub packed: Vec<PackedB>,
    /// Winograd-transformed filters (`[group * points + point]`) for each [`Algorithm`],
    /// made on first use, so that only the algorithms a layer's map sizes call for take
    /// memory.
    winograd: [OnceLock<Vec<PackedB>>; 3],
    pub bias: Vec<f32>,
    pub se: Option<SqueezeExcite>,
    /// `in/g` zeros: what a tap reads in the padding.
    pub zeros: Vec<f32>,
}

/// One task of a layer without Winograd: output positions `rows` (over the whole batch) and
/// output channels `cols` of group `group`.
pub(crate) struct RowTask<'a> {
    /// `(n, h, w, cin)`
    pub input: &'a [f32],
    pub h: usize,
    pub w: usize,
    pub oh: usize,
    pub ow: usize,
    pub range: TaskRange,
    /// `(n, oh, ow, cout)`
    pub out: *mut f32,
    pub relu: bool,
}

impl RowTask<'_> {
    /// The task's first output element: its first row, its group's column `cols.start`.
    pub fn output_block(&self, cout: usize, cout_g: usize) -> *mut f32 {
        let TaskRange { items, group, cols } = &self.range;
        self.out
            .wrapping_add(items.start * cout + group * cout_g + cols.start)
    }
}

impl ConvLayer {
    /// Packs an OIHW weight (`(cout, cin/g, 3, 3)`) with its bias and SE.
    pub fn new(
        geometry: Geometry,
        weight: &[f32],
        bias: Vec<f32>,
        se: Option<SqueezeExcite>,
    ) -> ConvLayer {
        let (cin_g, cout_g) = (geometry.in_per_group(), geometry.out_per_group());
        // Per group a `(ky, kx, c) x out` matrix, so a row of patches meets a column of
        // weights in the same order.
        let packed = (0..geometry.groups)
            .map(|group| {
                PackedB::new(9 * cin_g, cout_g, |row, oc| {
                    let (tap, c) = (row / cin_g, row % cin_g);
                    weight[((group * cout_g + oc) * cin_g + c) * 9 + tap]
                })
            })
            .collect();
        ConvLayer {
            geometry,
            packed,
            winograd: Default::default(),
            bias,
            se,
            zeros: vec![0.0; cin_g],
        }
    }

    /// The output map's size for an `h x w` input (pad as dilation, so the size is kept at
    /// stride 1).
    pub fn output_size(&self, h: usize, w: usize) -> (usize, usize) {
        let s = self.geometry.stride;
        ((h - 1) / s + 1, (w - 1) / s + 1)
    }

    /// The transformed filters, made from the packed weights the first time they are needed.
    fn winograd_filters(&self, algorithm: Algorithm) -> &[PackedB] {
        self.winograd[algorithm as usize]
            .get_or_init(|| winograd::transform_filters(algorithm, &self.packed))
    }

    /// The plan [`Layer::forward`] follows for `n` images of `h x w`, and its output size.
    fn plan(
        &self,
        choices: &Choices,
        n: usize,
        h: usize,
        w: usize,
        parallel: bool,
    ) -> (LayerPlan, usize, usize) {
        let threads = if parallel {
            rayon::current_num_threads()
        } else {
            1
        };
        let (oh, ow) = self.output_size(h, w);
        let call = Call { n, oh, ow, threads };
        (plan::plan(&self.geometry, &call, choices), oh, ow)
    }

    /// How [`Layer::forward`] computes this call, as `bench --layers` names it.
    pub fn method(
        &self,
        choices: &Choices,
        n: usize,
        h: usize,
        w: usize,
        parallel: bool,
    ) -> &'static str {
        self.plan(choices, n, h, w, parallel).0.scheme.name()
    }

    /// Computes the layer for `n` NHWC images of `h x w` into `output`. `parallel`: split it
    /// across the thread pool (latency mode), or run it on the calling thread (throughput
    /// mode, where threads take whole images).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        isa: Isa,
        choices: &Choices,
        input: &[f32],
        n: usize,
        h: usize,
        w: usize,
        output: &mut [f32],
        parallel: bool,
    ) {
        let (plan, oh, ow) = self.plan(choices, n, h, w, parallel);
        let split = plan.split;
        let out = OutPtr(output.as_mut_ptr());
        let relu = self.se.is_none();
        let g = &self.geometry;
        match plan.scheme {
            Scheme::Winograd(algorithm) => {
                let layer = winograd::Layer {
                    algorithm,
                    u: self.winograd_filters(algorithm),
                    bias: &self.bias,
                    cin: g.in_channels,
                    cout: g.out_channels,
                    groups: g.groups,
                    relu,
                };
                run_tasks(split.tasks(), parallel, |index| {
                    let TaskRange { items, group, cols } = split.task(index);
                    let task = winograd::Task {
                        input,
                        h,
                        w,
                        first_tile: items.start,
                        count: items.len(),
                        group,
                        cols,
                        out: out.get(),
                    };
                    with_task_scratch(|scratch| {
                        // SAFETY: `output` is the call's `(n, oh, ow, cout)` map, and the
                        // plan gives each task its own (tiles, group, columns) block of it.
                        unsafe { winograd::run(isa, &layer, &task, &mut scratch.ring) }
                    });
                });
            }
            scheme => {
                run_tasks(split.tasks(), parallel, |index| {
                    let task = RowTask {
                        input,
                        h,
                        w,
                        oh,
                        ow,
                        range: split.task(index),
                        out: out.get(),
                        relu,
                    };
                    with_task_scratch(|scratch| {
                        // SAFETY: as above: each task's (rows, group columns) block is its own.
                        unsafe {
                            if scheme == Scheme::Implicit {
                                self.implicit_task(isa, &task, &mut scratch.origins)
                            } else {
                                self.im2col_task(isa, &task, &mut scratch.patches)
                            }
                        }
                    });
                });
            }
        }
        self.finish_se(output, n, oh, ow, parallel);
    }

    /// SE sits between the convolution and the ReLU, and needs the whole map first.
    fn finish_se(&self, output: &mut [f32], n: usize, oh: usize, ow: usize, parallel: bool) {
        let Some(se) = &self.se else {
            return;
        };
        let c = self.geometry.out_channels;
        let maps = &mut output[..n * oh * ow * c];
        let apply = |image: &mut [f32]| with_task_scratch(|s| se.apply(image, c, &mut s.se));
        if parallel {
            maps.par_chunks_mut(oh * ow * c).for_each(apply);
        } else {
            maps.chunks_mut(oh * ow * c).for_each(apply);
        }
    }

    /// Where each of the task's output positions starts reading: its image's first input row,
    /// and the row and column of its top-left tap (negative in the padding). Stepped along
    /// the rows rather than divided out per position: for the RGB stem, whose positions have
    /// only 27 products each, three divisions per position are a sizeable share.
    pub fn origins<'t>(
        &self,
        task: &'t RowTask<'_>,
    ) -> impl Iterator<Item = (usize, isize, isize)> + 't {
        let (oh, ow) = (task.oh, task.ow);
        let first = task.range.items.start;
        let (mut image, mut y, mut x) = (first / (oh * ow), (first / ow) % oh, first % ow);
        let (s, d) = (self.geometry.stride, self.geometry.dilation as isize);
        task.range.items.clone().map(move |_| {
            let origin = (image * task.h, (y * s) as isize - d, (x * s) as isize - d);
            x += 1;
            if x == ow {
                x = 0;
                y += 1;
                if y == oh {
                    y = 0;
                    image += 1;
                }
            }
            origin
        })
    }

    /// Offset in the input of the task's group's channels at tap (ky, kx) of an output
    /// position with this origin, or None where the tap falls in the padding.
    pub fn tap_offset(
        &self,
        task: &RowTask<'_>,
        (row0, y, x): (usize, isize, isize),
        ky: usize,
        kx: usize,
    ) -> Option<usize> {
        let d = self.geometry.dilation as isize;
        let (iy, ix) = (y + ky as isize * d, x + kx as isize * d);
        let inside = iy >= 0 && ix >= 0 && iy < task.h as isize && ix < task.w as isize;
        let cin_g = self.geometry.in_per_group();
        inside.then(|| {
            ((row0 + iy as usize) * task.w + ix as usize) * self.geometry.in_channels
                + task.range.group * cin_g
        })
    }
}

/// Runs `f(0..count)` on the pool, or in order on this thread.
pub(crate) fn run_tasks(count: usize, parallel: bool, f: impl Fn(usize) + Sync + Send) {
    if parallel {
        (0..count).into_par_iter().for_each(f);
    } else {
        (0..count).for_each(f);
    }
}
