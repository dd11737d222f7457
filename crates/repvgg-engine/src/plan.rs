//! The layer planner: for one call of one layer (its geometry, the batch, the output map, the
//! threads), how to compute it (the [`Scheme`]) and how to cut it into tasks (the [`Split`]).
//! Pure arithmetic on sizes, so that every rule is unit-tested here, apart from the code that
//! executes a plan (`layer.rs`).

use std::ops::Range;

use repvgg_kernels::Isa;
use repvgg_kernels::gemm::NR;
use repvgg_kernels::winograd::{self, Algorithm};

use crate::options::{Lowering, Winograd};
use crate::probe;
use crate::tuning::*;

/// A layer's shape, as far as planning goes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Geometry {
    pub in_channels: usize,
    pub out_channels: usize,
    pub groups: usize,
    pub stride: usize,
    pub dilation: usize,
}

impl Geometry {
    pub fn in_per_group(&self) -> usize {
        self.in_channels / self.groups
    }

    pub fn out_per_group(&self) -> usize {
        self.out_channels / self.groups
    }
}

/// One call of a layer: `n` images giving an `oh x ow` output map each, on `threads` threads
/// (1 when the layer runs on the calling thread alone).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Call {
    pub n: usize,
    pub oh: usize,
    pub ow: usize,
    pub threads: usize,
}

/// What the caller chose (or left to the planner), and what the planner needs to know of the
/// machine.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Choices {
    pub winograd: Winograd,
    pub lowering: Lowering,
    pub l2_bytes: usize,
    /// Whether [`Winograd::Auto`] takes F(4x4) only where its transformed filters are small
    /// for the call's tiles ([`F4_MAX_FILTER_BYTES_PER_TILE`]). Not where products are scarce
    /// (AVX-512 kernels on 256-bit units): there F(4x4)'s 0.62x the products outweigh its
    /// 2.25x the filter reads at any size.
    pub f4_filter_bound: bool,
    /// The fewest input channels per group on which [`Winograd::Auto`] takes a stride-2 layer
    /// by phases.
    pub stride2_min_channels: usize,
}

impl Choices {
    /// The planner's view of this machine, running the kernels of `isa`.
    pub fn for_machine(winograd: Winograd, lowering: Lowering, isa: Isa) -> Choices {
        let half_width = isa == Isa::Avx512 && probe::avx512_on_256_bit_units();
        Choices {
            winograd,
            lowering,
            l2_bytes: probe::l2_bytes(),
            f4_filter_bound: !half_width,
            stride2_min_channels: if isa == Isa::Avx512 && !half_width {
                STRIDE2_WINOGRAD_MIN_CHANNELS_AVX512
            } else {
                STRIDE2_WINOGRAD_MIN_CHANNELS
            },
        }
    }
}

/// How a layer's convolution is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scheme {
    /// Transformed tiles, one product per transform point; the split's items are output tiles.
    Winograd(Algorithm),
    /// Patches copied into rows, one product per task; the split's items are output positions.
    Im2col,
    /// Nine per-tap products reading rows straight from the input; items are output positions.
    Implicit,
}

impl Scheme {
    /// As `bench --layers` prints it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Scheme::Winograd(Algorithm::F2) => "winograd F(2x2)",
            Scheme::Winograd(Algorithm::F4) => "winograd F(4x4)",
            Scheme::Winograd(Algorithm::Stride2F2) => "winograd F(2x2) s2",
            Scheme::Im2col => "im2col",
            Scheme::Implicit => "implicit",
        }
    }
}

/// A layer's work cut into tasks: runs of items (output positions, or Winograd tiles, over the
/// whole batch) times groups times slices of each group's output channels. Every (item,
/// group, output channel) belongs to exactly one task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Split {
    pub items: usize,
    pub items_per_task: usize,
    pub groups: usize,
    pub out_per_group: usize,
    /// Output channels per task: whole micro-kernel panels ([`NR`]).
    pub cols_per_task: usize,
}

/// One task's share of a [`Split`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TaskRange {
    pub items: Range<usize>,
    pub group: usize,
    /// Output channels within the group; starts at a multiple of [`NR`].
    pub cols: Range<usize>,
}

impl Split {
    fn item_runs(&self) -> usize {
        self.items.div_ceil(self.items_per_task)
    }

    fn col_slices(&self) -> usize {
        self.out_per_group.div_ceil(self.cols_per_task)
    }

    pub fn tasks(&self) -> usize {
        self.item_runs() * self.groups * self.col_slices()
    }

    /// Task `index` (of [`Split::tasks`]): column slices vary fastest, then groups, then runs
    /// of items, so that neighbouring tasks share their input.
    pub fn task(&self, index: usize) -> TaskRange {
        let slices = self.col_slices();
        let (rest, slice) = (index / slices, index % slices);
        let (run, group) = (rest / self.groups, rest % self.groups);
        let first = run * self.items_per_task;
        let last = (first + self.items_per_task).min(self.items);
        let cols = slice * self.cols_per_task;
        TaskRange {
            items: first..last,
            group,
            cols: cols..(cols + self.cols_per_task).min(self.out_per_group),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LayerPlan {
    pub scheme: Scheme,
    pub split: Split,
}

/// The plan for one call of a layer.
pub(crate) fn plan(layer: &Geometry, call: &Call, choices: &Choices) -> LayerPlan {
    if let Some(algorithm) = winograd_algorithm(layer, call, choices)
        && let Some(split) = winograd_split(layer, call, algorithm)
    {
        return LayerPlan {
            scheme: Scheme::Winograd(algorithm),
            split,
        };
    }
    direct_plan(layer, call, choices)
}

/// The Winograd algorithm for this call, if any (see [`Winograd::Auto`]).
fn winograd_algorithm(layer: &Geometry, call: &Call, choices: &Choices) -> Option<Algorithm> {
    if layer.dilation != 1 {
        return None;
    }
    // Whether the algorithm's transformed filters are small enough for the call's tiles.
    let filters_pay = |algorithm: Algorithm| {
        let tiles = winograd::tile_count(algorithm, call.n, call.oh, call.ow);
        let bytes = algorithm.points() * layer.in_per_group() * layer.out_channels * 4;
        bytes <= F4_MAX_FILTER_BYTES_PER_TILE * tiles
    };
    let wide = layer.in_per_group() >= WINOGRAD_MIN_CHANNELS;
    let big = call.oh.min(call.ow) >= F4_MIN_SIDE;
    match (layer.stride, choices.winograd) {
        (_, Winograd::Off) => None,
        (1, Winograd::F2) => Some(Algorithm::F2),
        (1, Winograd::F4) => Some(Algorithm::F4),
        (1, Winograd::Auto) if !wide => None,
        (1, Winograd::Auto) if big && (!choices.f4_filter_bound || filters_pay(Algorithm::F4)) => {
            Some(Algorithm::F4)
        }
        (1, Winograd::Auto) => Some(Algorithm::F2),
        (2, Winograd::F2 | Winograd::F4) => Some(Algorithm::Stride2F2),
        (2, Winograd::Auto)
            if layer.in_per_group() >= choices.stride2_min_channels
                && big
                && filters_pay(Algorithm::Stride2F2) =>
        {
            Some(Algorithm::Stride2F2)
        }
        _ => None,
    }
}

/// Output tiles per Winograd task, before the threads are considered.
///
/// A task reads all of the group's transformed filters U once and keeps its tiles' V and M,
/// so fewer tiles per task re-read U more often while more spill V and M out of L2. Taking
/// about as many tiles as U has bytes per tile of V (that is, `min(cin_g, cout_g)` tiles)
/// balances the two.
fn winograd_tiles_per_task(algorithm: Algorithm, layer: &Geometry, shared: bool) -> usize {
    let (cin_g, cout_g) = (layer.in_per_group(), layer.out_per_group());
    let per_tile = algorithm.points() * cin_g.max(cout_g) * 4;
    let most = if shared {
        SHARED_WINOGRAD_TILES_PER_TASK
    } else {
        WINOGRAD_TILES_PER_TASK.min(cin_g.min(cout_g))
    };
    (WINOGRAD_SCRATCH_BYTES / per_tile)
        .min(most)
        .max(MIN_WINOGRAD_TILES_PER_TASK)
}

/// Runs of at most the tiles per task, as many as the threads (or a multiple), while each
/// keeps enough rows for the products to run at full speed. With fewer tiles than that
/// (batch 1, small maps), the output channels are split instead, so that the transformed
/// filters are still read once; each slice repeats the (cheap) input transform. `None` when
/// even then the threads would not all have a task: the direct product serves better.
fn winograd_split(layer: &Geometry, call: &Call, algorithm: Algorithm) -> Option<Split> {
    let threads = call.threads;
    let (groups, cout_g) = (layer.groups, layer.out_per_group());
    let tiles = winograd::tile_count(algorithm, call.n, call.oh, call.ow);
    let per_task = winograd_tiles_per_task(algorithm, layer, threads > 1);
    let runs = tiles.div_ceil(per_task);
    let (runs, col_slices) = if runs * groups >= threads {
        (runs.div_ceil(threads) * threads, 1)
    } else if tiles >= threads * MIN_WINOGRAD_TILES_PER_TASK {
        (threads, 1)
    } else {
        let slices = threads.div_ceil(runs * groups);
        (runs, slices.min((cout_g / NR).max(1)))
    };
    let split = Split {
        items: tiles,
        items_per_task: tiles.div_ceil(runs.max(1)).max(1),
        groups,
        out_per_group: cout_g,
        cols_per_task: cout_g.div_ceil(col_slices).next_multiple_of(NR),
    };
    (split.tasks() >= threads).then_some(split)
}

/// im2col or implicit GEMM, cut into rows of output positions and slices of output channels.
fn direct_plan(layer: &Geometry, call: &Call, choices: &Choices) -> LayerPlan {
    let threads = call.threads;
    let rows = call.n * call.oh * call.ow;
    let (groups, cout_g) = (layer.groups, layer.out_per_group());
    let k = 9 * layer.in_per_group();
    // A weight matrix too big for L2 is better read once, by tasks that each take a slice of
    // its columns over many rows, straight from the input; smaller ones are faster with
    // im2col's contiguous rows.
    let implicit = match choices.lowering {
        Lowering::Im2col => false,
        Lowering::Implicit => true,
        Lowering::Auto => k * cout_g > IMPLICIT_MIN_WEIGHTS,
    };
    let rows_per_task = if implicit {
        IMPLICIT_ROWS_PER_TASK
    } else {
        IM2COL_ROWS_PER_TASK
    };
    // Even runs: 196 rows in tasks of up to 192 are two of 98, not one of 192 and one of 4
    // that reads a whole weight slice for 4 rows.
    let mut row_runs = rows.div_ceil(rows_per_task).max(1);
    // Few rows (late layers, batch 1): split the output channels too.
    let wanted = TASKS_PER_THREAD * threads;
    let mut col_slices = if row_runs >= wanted {
        1
    } else {
        wanted
            .div_ceil(row_runs)
            .min((cout_g / MIN_COLS_PER_TASK).max(1))
    };
    if implicit {
        // Column slices of at most a share of L2 in weights, so that each stays there.
        let slice_floats = choices.l2_bytes / IMPLICIT_SLICE_L2_DIVISOR / 4;
        let cols = (slice_floats / k / NR * NR).max(NR);
        col_slices = col_slices.max(cout_g.div_ceil(cols));
    }
    // Whole micro-kernel panels per task.
    let mut cols_per_task = cout_g.div_ceil(col_slices).next_multiple_of(NR);
    let col_slices = cout_g.div_ceil(cols_per_task);
    // Few tasks in a count the threads cannot share evenly idle one thread for the last:
    // more column slices where the panels allow, else more runs of rows.
    let uneven =
        |tasks: usize| !tasks.is_multiple_of(threads) && tasks < UNEVEN_TASKS_PER_THREAD * threads;
    if uneven(row_runs * groups * col_slices) {
        let even_cols = (col_slices..=cout_g.div_ceil(NR))
            .map(|slices| cout_g.div_ceil(slices).next_multiple_of(NR))
            .find(|&cols| !uneven(row_runs * groups * cout_g.div_ceil(cols)));
        match even_cols {
            Some(cols) if col_slices > 1 => cols_per_task = cols,
            _ => row_runs = row_runs.next_multiple_of(threads).min(rows),
        }
    }
    LayerPlan {
        scheme: if implicit {
            Scheme::Implicit
        } else {
            Scheme::Im2col
        },
        split: Split {
            items: rows,
            items_per_task: rows.div_ceil(row_runs.max(1)).max(1),
            groups,
            out_per_group: cout_g,
            cols_per_task,
        },
    }
}

/// Columns (classes) per task of the linear head: at small batches its product is a stream
/// of the weights, split between the threads.
pub(crate) fn head_cols_per_task(classes: usize, threads: usize) -> usize {
    classes.div_ceil(threads.max(1)).next_multiple_of(NR)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv(cin: usize, cout: usize, groups: usize, stride: usize) -> Geometry {
        Geometry {
            in_channels: cin,
            out_channels: cout,
            groups,
            stride,
            dilation: 1,
        }
    }

    fn call(n: usize, side: usize, threads: usize) -> Call {
        Call {
            n,
            oh: side,
            ow: side,
            threads,
        }
    }

    const AUTO: Choices = Choices {
        winograd: Winograd::Auto,
        lowering: Lowering::Auto,
        l2_bytes: 2 << 20,
        f4_filter_bound: true,
        stride2_min_channels: STRIDE2_WINOGRAD_MIN_CHANNELS,
    };

    /// Every (item, group, output channel) in exactly one task, columns starting on panels.
    fn assert_covers(split: &Split) {
        let mut seen = vec![0u8; split.items * split.groups * split.out_per_group];
        for index in 0..split.tasks() {
            let task = split.task(index);
            assert!(task.cols.start.is_multiple_of(NR), "{task:?}");
            assert!(
                !task.items.is_empty() && !task.cols.is_empty(),
                "{split:?}: {task:?}"
            );
            for item in task.items.clone() {
                for col in task.cols.clone() {
                    let at = (item * split.groups + task.group) * split.out_per_group + col;
                    seen[at] += 1;
                }
            }
        }
        assert!(seen.iter().all(|&count| count == 1), "{split:?}");
    }

    #[test]
    fn every_plan_covers_its_output_once() {
        let layers = [
            conv(3, 48, 1, 2),
            conv(48, 48, 1, 1),
            conv(96, 192, 1, 2),
            conv(192, 192, 1, 1),
            conv(192, 1280, 1, 2),
            conv(64, 128, 4, 1),
            conv(20, 36, 2, 1),
        ];
        for layer in &layers {
            for (n, side) in [(1, 1), (1, 7), (1, 14), (3, 9), (8, 28)] {
                for threads in [1, 2, 3, 16] {
                    for winograd in [Winograd::Auto, Winograd::Off, Winograd::F2, Winograd::F4] {
                        for lowering in [Lowering::Auto, Lowering::Im2col, Lowering::Implicit] {
                            let choices = Choices {
                                winograd,
                                lowering,
                                ..AUTO
                            };
                            let plan = plan(layer, &call(n, side, threads), &choices);
                            assert_covers(&plan.split);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn auto_picks_winograd_by_channels_map_and_filter_size() {
        let on = |layer: Geometry, n: usize, side: usize| plan(&layer, &call(n, side, 2), &AUTO);
        // RGB stem: too few channels for Winograd.
        assert_eq!(on(conv(3, 48, 1, 2), 1, 112).scheme, Scheme::Im2col);
        // A 14x14 map of 192 channels: F(4x4)'s 5.3 MB of filters do not pay for one image's
        // 16 tiles, but do for eight images'.
        let stage3 = conv(192, 192, 1, 1);
        assert_eq!(on(stage3, 1, 14).scheme, Scheme::Winograd(Algorithm::F2));
        assert_eq!(on(stage3, 8, 14).scheme, Scheme::Winograd(Algorithm::F4));
        // Where products are scarce, F(4x4) at any filter size; small maps still leave it.
        let scarce = Choices {
            f4_filter_bound: false,
            ..AUTO
        };
        let wide = conv(512, 512, 1, 1);
        for (layer, n, side, algorithm) in [
            (stage3, 1, 14, Algorithm::F4),
            (wide, 1, 14, Algorithm::F4),
            (wide, 1, 7, Algorithm::F2),
        ] {
            let scheme = plan(&layer, &call(n, side, 2), &scarce).scheme;
            assert_eq!(scheme, Scheme::Winograd(algorithm), "{layer:?} on {side}");
        }
        // Stride 2 from 64 input channels on maps of 8 or more; from 48 where AVX-512 runs
        // on 512-bit units.
        assert_eq!(
            on(conv(96, 192, 1, 2), 4, 14).scheme,
            Scheme::Winograd(Algorithm::Stride2F2)
        );
        assert_eq!(on(conv(48, 96, 1, 2), 4, 28).scheme, Scheme::Im2col);
        let full_width = Choices {
            stride2_min_channels: STRIDE2_WINOGRAD_MIN_CHANNELS_AVX512,
            ..AUTO
        };
        for (layer, side, scheme) in [
            (
                conv(48, 96, 1, 2),
                28,
                Scheme::Winograd(Algorithm::Stride2F2),
            ),
            (
                conv(48, 48, 1, 2),
                56,
                Scheme::Winograd(Algorithm::Stride2F2),
            ),
            (conv(32, 64, 1, 2), 28, Scheme::Im2col),
        ] {
            let plan = plan(&layer, &call(1, side, 2), &full_width);
            assert_eq!(plan.scheme, scheme, "{layer:?} on {side}");
        }
        // Dilated layers never take Winograd, whatever is asked.
        let dilated = Geometry {
            dilation: 2,
            ..stage3
        };
        let forced = Choices {
            winograd: Winograd::F4,
            ..AUTO
        };
        let scheme = plan(&dilated, &call(1, 28, 2), &forced).scheme;
        assert!(!matches!(scheme, Scheme::Winograd(_)), "{scheme:?}");
    }

    #[test]
    fn big_weights_take_implicit_gemm_in_slices_that_fit_half_of_l2() {
        // Stage 4's opening block: 1728 x 1280 weights (8.8 MB).
        let layer = conv(192, 1280, 1, 2);
        for l2_bytes in [512 << 10, 2 << 20] {
            let choices = Choices { l2_bytes, ..AUTO };
            let plan = plan(&layer, &call(1, 7, 2), &choices);
            assert_eq!(plan.scheme, Scheme::Implicit);
            let slice_bytes = plan.split.cols_per_task * 9 * 192 * 4;
            assert!(slice_bytes <= l2_bytes / 2, "{plan:?}");
        }
    }

    #[test]
    fn small_task_counts_are_shared_evenly_between_threads() {
        for (layer, n, side) in [
            (conv(192, 1280, 1, 2), 1, 7),
            (conv(48, 96, 1, 2), 1, 56),
            (conv(96, 192, 1, 2), 1, 14),
        ] {
            let plan = plan(&layer, &call(n, side, 2), &AUTO);
            let tasks = plan.split.tasks();
            assert!(
                tasks.is_multiple_of(2) || tasks >= UNEVEN_TASKS_PER_THREAD * 2,
                "{plan:?}: {tasks} tasks"
            );
        }
    }

    #[test]
    fn winograd_tasks_keep_every_thread_busy() {
        // One 14x14 image of 192 channels: 49 F(2x2) tiles, split between 2 threads.
        let plan = plan(&conv(192, 192, 1, 1), &call(1, 14, 2), &AUTO);
        assert!(plan.split.tasks() >= 2, "{plan:?}");
        // On one thread, tiles per task follow min(cin, cout) within the bounds.
        let layer = conv(48, 48, 1, 1);
        assert_eq!(
            winograd_tiles_per_task(Algorithm::F4, &layer, false),
            MIN_WINOGRAD_TILES_PER_TASK.max(48)
        );
    }

    #[test]
    fn the_head_splits_its_classes_in_whole_panels() {
        assert_eq!(head_cols_per_task(1000, 2), 512);
        assert_eq!(head_cols_per_task(10, 2), NR);
        assert_eq!(head_cols_per_task(1000, 1), 1008);
    }
}
