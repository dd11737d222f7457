//! The INT8 engine: each block's 3x3 convolution as a u8 x s8 product on the INT8 kernels of
//! `repvgg-kernels`, bias, ReLU and the requantization to the next block's scale fused into
//! the store, activations u8 (NHWC) from the first block to the last; the input is quantized
//! on the way in, and the last block's output dequantized for the float pool and head.
//!
//! Each layer's output rows (positions) are cut into tasks; a task copies its rows' 3x3
//! patches (im2col, padded with the input's zero point, which stands for 0.0) into a
//! thread-local buffer and multiplies them by each group's packed weights. On AMX, stride-1
//! layers whose channels fill whole tiles skip the patches: the layer's input is copied once
//! with a pixel of padding around each image, and the tiles read their rows from it.

use rayon::prelude::*;
use repvgg_arch::ArchSpec;
use repvgg_checkpoint::quantized::{ActivationQuant, QuantizedModel};
use repvgg_kernels::gemm::{self, PackedB, Product, strided};
use repvgg_kernels::int8::{
    Conv8, Epilogue, Int8Kernels, PackedB8, Product8, conv3x3_k, conv3x3_overrun, conv3x3_u8s8,
    gemm_u8s8,
};
use repvgg_kernels::{CACHE_LINE, Isa, line_aligned};

use crate::error::{EngineError, check_input};
use crate::layer::ConvLayer;
use crate::layout::{channel_means_into, nchw_to_nhwc};
use crate::options::{Lowering, Winograd};
use crate::plan::{Choices, Geometry};

thread_local! {
    /// A task's patch rows, kept per thread between tasks and calls.
    static PATCHES: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    /// A layer's input padded for reading straight from it, on the thread that runs the layer.
    static PADDED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The longest kernel row of patches copied as one fixed-size copy.
const SHORT_COPY: usize = 16;

/// Output rows per task: enough to amortise a task, few enough that a layer at batch 1 has
/// tasks for every thread (a 7x7 map has 49).
const ROWS_PER_TASK: usize = 48;

struct Int8Layer {
    in_channels: usize,
    out_channels: usize,
    groups: usize,
    stride: usize,
    dilation: usize,
    /// One packed weight matrix per group: `(9 in/groups) x (out/groups)`, or for a layer
    /// read straight from its image, `conv3x3_k(in) x out`.
    weights: Vec<PackedB8>,
    kernels: Int8Kernels,
    /// Whether the products read the input image itself (AMX, stride 1, no dilation, one
    /// group: [`conv3x3_u8s8`]) instead of copied patches.
    from_image: bool,
    /// Per output channel, in the units of the sums.
    bias: Vec<i32>,
    /// Per output channel: input scale x weight scale / output scale.
    requant: Vec<f32>,
    input: ActivationQuant,
    output: ActivationQuant,
}

/// A block kept in float (`quantize --fp32-layers`): the float engine's layer, with the
/// quantization of its input, to read a u8 one.
struct FloatLayer {
    conv: ConvLayer,
    input: ActivationQuant,
}

enum Layer {
    Int8(Int8Layer),
    /// Boxed: the float layer's plan and packing dwarf the INT8 one.
    Float(Box<FloatLayer>),
}

impl Layer {
    fn output_size(&self, h: usize, w: usize) -> (usize, usize) {
        match self {
            Layer::Int8(l) => l.output_size(h, w),
            Layer::Float(l) => l.conv.output_size(h, w),
        }
    }

    fn out_channels(&self) -> usize {
        match self {
            Layer::Int8(l) => l.out_channels,
            Layer::Float(l) => l.conv.geometry.out_channels,
        }
    }
}

/// Activations between blocks: u8 after an INT8 block, f32 after a float one.
enum Activations {
    U8(Vec<u8>),
    F32(Vec<f32>),
}

/// A block's output as an observer sees it.
pub enum BlockOutput<'a> {
    /// NHWC u8 and its quantization (an INT8 block).
    U8(&'a [u8], ActivationQuant),
    /// NHWC f32 (a block kept in float).
    F32(&'a [f32]),
}

impl BlockOutput<'_> {
    /// The values as floats.
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            BlockOutput::U8(q, quant) => q.iter().map(|&q| quant.dequantize(q)).collect(),
            BlockOutput::F32(x) => x.to_vec(),
        }
    }
}

/// Called after every block with (block index, height, width, output).
type Int8Observer<'a> = dyn FnMut(usize, usize, usize, BlockOutput<'_>) + 'a;

/// A quantized RepVGG ready to run in INT8.
pub struct Int8Engine {
    spec: ArchSpec,
    layers: Vec<Layer>,
    /// The float layers' planning choices (the float engine's defaults).
    choices: Choices,
    input: ActivationQuant,
    output: ActivationQuant,
    /// The head's weight as a `(features, classes)` product operand, and its bias; `None`
    /// when headless.
    head: Option<(PackedB, Vec<f32>)>,
    /// The float kernels of the head.
    isa: Isa,
}

impl Int8Engine {
    /// Builds the engine; `isa` caps the INT8 kernels as [`crate::EngineOptions::isa`] caps
    /// the float ones (`None`: the best this machine has).
    pub fn new(model: &QuantizedModel, isa: Option<Isa>) -> Result<Int8Engine, EngineError> {
        Int8Engine::build(model, Isa::capped(isa)?, None)
    }

    /// Builds the engine on one INT8 kernel set for every layer, so that each set can be run
    /// end to end on a machine that has a better one: an error if the machine lacks it, or if
    /// the AVX2 set is asked for weights outside its [-64, 64].
    pub fn with_kernels(
        model: &QuantizedModel,
        kernels: Int8Kernels,
    ) -> Result<Int8Engine, EngineError> {
        if !kernels.is_available() {
            return Err(EngineError::Int8Kernels(format!(
                "the {kernels} INT8 kernels do not run on this machine"
            )));
        }
        Int8Engine::build(model, Isa::best(), Some(kernels))
    }

    fn build(
        model: &QuantizedModel,
        cap: Isa,
        forced: Option<Int8Kernels>,
    ) -> Result<Int8Engine, EngineError> {
        let blocks = model.spec.blocks();
        let acts = &model.info.activations;
        let layers = blocks
            .iter()
            .zip(&model.convs)
            .enumerate()
            .map(|(i, (b, conv))| -> Result<Layer, EngineError> {
                let (input, output) = (acts[i], acts[i + 1]);
                if let Some(weight) = &conv.float_weight {
                    let geometry = Geometry {
                        in_channels: b.in_channels,
                        out_channels: b.out_channels,
                        groups: b.groups,
                        stride: b.stride,
                        dilation: b.dilation,
                    };
                    return Ok(Layer::Float(Box::new(FloatLayer {
                        conv: ConvLayer::new(geometry, weight, conv.bias.clone(), None),
                        input,
                    })));
                }
                let (cin_g, cout_g) = (b.in_channels / b.groups, b.out_channels / b.groups);
                let k = 9 * cin_g;
                let weights: Vec<PackedB8> = (0..b.groups)
                    .map(|g| {
                        // Row (tap, input channel), column output channel, as im2col lays
                        // out the patches.
                        PackedB8::new(k, cout_g, |row, col| {
                            let (tap, ci) = (row / cin_g, row % cin_g);
                            let o = g * cout_g + col;
                            conv.weight[(o * cin_g + ci) * 9 + tap]
                        })
                    })
                    .collect();
                let kernels = match forced {
                    Some(Int8Kernels::Avx2) if !weights.iter().all(PackedB8::fits_avx2) => {
                        return Err(EngineError::Int8Kernels(format!(
                            "{}: the AVX2 INT8 kernels need weights within [-64, 64] (quantize with --weight-bits 7)",
                            b.name()
                        )));
                    }
                    Some(kernels) => kernels,
                    None => weights
                        .iter()
                        .map(|w| Int8Kernels::best_for(cap, w))
                        .min()
                        .unwrap_or(Int8Kernels::Portable),
                };
                let unit: Vec<f32> = conv.weight_scale.iter().map(|s| input.scale * s).collect();
                // Products of valid scales can still leave f32 (a file's scales of 1e30 and
                // 1e30): the requantization would turn them into NaN.
                let requant_ok = unit
                    .iter()
                    .all(|u| u.is_normal() && (u / output.scale).is_normal());
                if !requant_ok {
                    return Err(EngineError::Int8Kernels(format!(
                        "{}: its input, weight and output scales multiply to a value f32 cannot hold",
                        b.name()
                    )));
                }
                // Where a tap's channels fill whole tiles of k, or nearly: rounding 48 or 96
                // channels up to 64 or 128 would cost a third more products than the patch
                // copies it saves.
                let from_image = kernels == Int8Kernels::Amx
                    && b.stride == 1
                    && b.dilation == 1
                    && b.groups == 1
                    && conv3x3_k(b.in_channels) * 8 <= 9 * b.in_channels * 9;
                let weights = if from_image {
                    // Tap by tap, each tap's channels rounded up to whole tiles of k.
                    let cin = b.in_channels;
                    let per_tap = conv3x3_k(cin) / 9;
                    vec![PackedB8::new(conv3x3_k(cin), cout_g, |row, col| {
                        let (tap, ci) = (row / per_tap, row % per_tap);
                        if ci < cin {
                            conv.weight[(col * cin + ci) * 9 + tap]
                        } else {
                            0
                        }
                    })]
                } else {
                    weights
                };
                Ok(Layer::Int8(Int8Layer {
                    in_channels: b.in_channels,
                    out_channels: b.out_channels,
                    groups: b.groups,
                    stride: b.stride,
                    dilation: b.dilation,
                    weights,
                    kernels,
                    from_image,
                    bias: conv
                        .bias
                        .iter()
                        .zip(&unit)
                        .map(|(b, u)| {
                            (*b as f64 / *u as f64)
                                .round()
                                .clamp(i32::MIN as f64 / 2.0, i32::MAX as f64 / 2.0)
                                as i32
                        })
                        .collect(),
                    requant: unit.iter().map(|u| u / output.scale).collect(),
                    input,
                    output,
                }))
            })
            .collect::<Result<Vec<_>, EngineError>>()?;
        Ok(Int8Engine {
            spec: model.spec.clone(),
            layers,
            choices: Choices::for_machine(Winograd::Auto, Lowering::Auto, cap),
            input: acts[0],
            output: *acts.last().expect("checked on load"),
            head: model.head.as_ref().map(|(w, b)| {
                let (classes, features) = (w.shape[0], w.shape[1]);
                let packed = PackedB::new(features, classes, |c, k| w.data[k * features + c]);
                (packed, b.data.clone())
            }),
            isa: cap,
        })
    }

    pub fn spec(&self) -> &ArchSpec {
        &self.spec
    }

    /// The INT8 kernel set most layers run on (of two as common, the faster): a layer whose
    /// reduction is too short for it, such as the stem's, may run on another
    /// ([`Int8Kernels::best_for`]).
    pub fn kernels(&self) -> Int8Kernels {
        let layers_on = |kernels: Int8Kernels| {
            self.layers
                .iter()
                .filter(|l| matches!(l, Layer::Int8(l) if l.kernels == kernels))
                .count()
        };
        Int8Kernels::ALL
            .into_iter()
            .map(|kernels| (layers_on(kernels), kernels))
            .filter(|(n, _)| *n > 0)
            .max()
            .map_or(Int8Kernels::Portable, |(_, kernels)| kernels)
    }

    /// Logits `(n, classes)` for an NCHW float batch (a headless model's pooled features).
    ///
    /// A batch with an image per thread runs in throughput mode, as the float engine's auto
    /// mode does: each thread takes whole images through every layer, so no layer waits for
    /// the others' threads and each image's maps stay in its core's caches.
    pub fn forward(
        &self,
        input: &[f32],
        n: usize,
        h: usize,
        w: usize,
    ) -> Result<Vec<f32>, EngineError> {
        check_input(input, n, self.spec.in_channels, h, w)?;
        if n == 0 {
            return Ok(Vec::new());
        }
        let threads = rayon::current_num_threads();
        if threads < 2 || n < threads {
            return self.forward_with(input, n, h, w, |_, _, _, _| {});
        }
        let c = self.spec.in_channels;
        let image = c * h * w;
        let per_thread = n.div_ceil(threads);
        let parts: Vec<(Activations, usize, usize)> = input
            .par_chunks(per_thread * image)
            .map(|part| {
                let images = part.len() / image;
                let a = self.input_activations(part, images, h, w);
                let mut noop = |_: usize, _: usize, _: usize, _: BlockOutput<'_>| {};
                self.run_layers(a, images, h, w, false, &mut noop)
            })
            .collect();
        let (oh, ow) = (parts[0].1, parts[0].2);
        let features = match &parts[0].0 {
            Activations::U8(_) => Activations::U8(
                parts
                    .into_iter()
                    .flat_map(|(f, _, _)| match f {
                        Activations::U8(v) => v,
                        Activations::F32(_) => unreachable!("every part ends alike"),
                    })
                    .collect(),
            ),
            Activations::F32(_) => Activations::F32(
                parts
                    .into_iter()
                    .flat_map(|(f, _, _)| match f {
                        Activations::F32(v) => v,
                        Activations::U8(_) => unreachable!("every part ends alike"),
                    })
                    .collect(),
            ),
        };
        Ok(self.head(&features, n, oh * ow))
    }

    /// The input as the first block takes it: u8 for an INT8 block, f32 for a float one.
    fn input_activations(&self, input: &[f32], n: usize, h: usize, w: usize) -> Activations {
        match self.layers.first() {
            Some(Layer::Float(_)) => {
                let mut nhwc = vec![0.0; input.len()];
                nchw_to_nhwc(input, self.spec.in_channels, h, w, &mut nhwc);
                Activations::F32(nhwc)
            }
            _ => Activations::U8(self.quantize_input(input, n, h, w)),
        }
    }

    /// NCHW float to NHWC u8, a row of an image per task; the input has passed
    /// [`check_input`].
    fn quantize_input(&self, input: &[f32], n: usize, h: usize, w: usize) -> Vec<u8> {
        let c = self.spec.in_channels;
        let mut a = vec![0u8; n * h * w * c];
        let plane = h * w;
        let quant = self.input;
        a.par_chunks_mut(w * c).enumerate().for_each_init(
            Vec::new,
            |rows: &mut Vec<u8>, (line, out)| {
                let (image, y) = (line / h, line % h);
                let base = image * c * plane + y * w;
                // Each channel's row quantized into a contiguous row (reads and writes
                // contiguous, so the loop vectorises), then the rows interleaved.
                rows.resize(c * w, 0);
                for (ch, quantized) in rows.chunks_exact_mut(w).enumerate() {
                    let row = &input[base + ch * plane..base + ch * plane + w];
                    for (q, &x) in quantized.iter_mut().zip(row) {
                        *q = quant.quantize(x);
                    }
                }
                for (x, pixel) in out.chunks_exact_mut(c).enumerate() {
                    for (ch, q) in pixel.iter_mut().enumerate() {
                        *q = rows[ch * w + x];
                    }
                }
            },
        );
        a
    }

    /// Every layer over `a` (n, h, w, in): the last one's output and its size. Activations
    /// change kind where an INT8 block meets a float one: quantized with the INT8 block's
    /// input scale, or dequantized with the float block's.
    fn run_layers(
        &self,
        mut a: Activations,
        n: usize,
        h: usize,
        w: usize,
        parallel: bool,
        observer: &mut Int8Observer<'_>,
    ) -> (Activations, usize, usize) {
        let (mut h, mut w) = (h, w);
        // The buffer each kind of layer writes next: the one its previous input came in,
        // so that a forward allocates two maps' worth once, not a new map per layer.
        let (mut spare_u8, mut spare_f32) = (Vec::new(), Vec::new());
        for (i, layer) in self.layers.iter().enumerate() {
            let (oh, ow) = layer.output_size(h, w);
            let len = n * oh * ow * layer.out_channels();
            a = match (layer, a) {
                (Layer::Int8(l), a) => {
                    let input = match a {
                        Activations::U8(q) => q,
                        Activations::F32(x) => {
                            let q = x.iter().map(|&v| l.input.quantize(v)).collect();
                            spare_f32 = x;
                            q
                        }
                    };
                    let mut out = std::mem::take(&mut spare_u8);
                    out.resize(len, 0);
                    l.forward(&input, n, h, w, &mut out, parallel);
                    observer(i, oh, ow, BlockOutput::U8(&out, l.output));
                    spare_u8 = input;
                    Activations::U8(out)
                }
                (Layer::Float(l), a) => {
                    let input = match a {
                        Activations::F32(x) => x,
                        Activations::U8(q) => {
                            let x = q.iter().map(|&q| l.input.dequantize(q)).collect();
                            spare_u8 = q;
                            x
                        }
                    };
                    let mut out = std::mem::take(&mut spare_f32);
                    out.resize(len, 0.0);
                    l.conv
                        .forward(self.isa, &self.choices, &input, n, h, w, &mut out, parallel);
                    observer(i, oh, ow, BlockOutput::F32(&out));
                    spare_f32 = input;
                    Activations::F32(out)
                }
            };
            (h, w) = (oh, ow);
        }
        (a, h, w)
    }

    /// Like [`Int8Engine::forward`], calling `observer(block, h, w, nhwc, quantization)` with
    /// every block's u8 output.
    pub fn forward_with(
        &self,
        input: &[f32],
        n: usize,
        h: usize,
        w: usize,
        mut observer: impl FnMut(usize, usize, usize, BlockOutput<'_>),
    ) -> Result<Vec<f32>, EngineError> {
        check_input(input, n, self.spec.in_channels, h, w)?;
        if n == 0 {
            return Ok(Vec::new());
        }
        let a = self.input_activations(input, n, h, w);
        let (features, oh, ow) = self.run_layers(a, n, h, w, true, &mut observer);
        Ok(self.head(&features, n, oh * ow))
    }

    /// Seconds in each block for one forward (after a warm-up), with its MACs; the first
    /// block's includes quantizing the input.
    pub fn profile(
        &self,
        input: &[f32],
        n: usize,
        h: usize,
        w: usize,
    ) -> Result<Vec<crate::LayerTiming>, EngineError> {
        self.forward(input, n, h, w)?;
        let blocks = self.spec.blocks();
        let mut timings = Vec::with_capacity(blocks.len());
        let (mut in_h, mut in_w) = (h, w);
        let mut last = std::time::Instant::now();
        self.forward_with(input, n, h, w, |i, oh, ow, _| {
            let seconds = last.elapsed().as_secs_f64();
            let block = &blocks[i];
            timings.push(crate::LayerTiming {
                method: match &self.layers[i] {
                    Layer::Int8(l) => l.kernels.name(),
                    Layer::Float(_) => "float",
                },
                name: block.name(),
                seconds,
                macs: n as u64 * block.macs(repvgg_arch::Form::Deploy, in_h, in_w),
                stride: block.stride,
                groups: block.groups,
                shape: (block.in_channels, block.out_channels, oh, ow),
            });
            (in_h, in_w) = (oh, ow);
            last = std::time::Instant::now();
        })?;
        Ok(timings)
    }

    fn head(&self, features: &Activations, n: usize, positions: usize) -> Vec<f32> {
        let c = self.spec.feature_width();
        let zero = self.output.zero_point as i64;
        let mut pooled = vec![0f32; n * c];
        match features {
            Activations::U8(features) => {
                for (image, means) in features
                    .chunks_exact(positions * c)
                    .zip(pooled.chunks_exact_mut(c))
                {
                    let mut sums = vec![0i64; c];
                    for pixel in image.chunks_exact(c) {
                        for (s, &q) in sums.iter_mut().zip(pixel) {
                            *s += q as i64 - zero;
                        }
                    }
                    for (m, s) in means.iter_mut().zip(sums) {
                        *m = self.output.scale * (s as f64 / positions as f64) as f32;
                    }
                }
            }
            Activations::F32(features) => {
                for (image, means) in features
                    .chunks_exact(positions * c)
                    .zip(pooled.chunks_exact_mut(c))
                {
                    channel_means_into(image, means);
                }
            }
        }
        let Some((weight, bias)) = &self.head else {
            return pooled;
        };
        let classes = bias.len();
        let mut logits = vec![0f32; n * classes];
        let product = Product::new(
            n,
            strided(pooled.as_ptr(), c),
            weight,
            logits.as_mut_ptr(),
            classes,
        )
        .bias(bias);
        // SAFETY: `pooled` is (n, features) and `logits` (n, classes).
        unsafe { gemm::gemm(self.isa, &product) };
        logits
    }
}

/// How a layer's work is cut: rows (output positions, or grid positions for a layer read
/// from its image) into `row_tasks` runs of `rows_per_task`
/// (a multiple of every kernel's height), columns of each group into runs of `cols_per_task`
/// (whole spans), so that a layer of few positions (the last stage's 7x7 at batch 1) still
/// gives every thread work.
struct Split {
    rows_per_task: usize,
    row_tasks: usize,
    cols_per_task: usize,
    col_tasks: usize,
}

impl Int8Layer {
    fn output_size(&self, h: usize, w: usize) -> (usize, usize) {
        let span = 2 * self.dilation;
        let out = |x: usize| (x + 2 * self.dilation - span - 1) / self.stride + 1;
        (out(h), out(w))
    }

    fn split(&self, rows: usize) -> Split {
        let threads = rayon::current_num_threads();
        let (block_rows, block_cols) = self.kernels.block();
        let row_tasks = rows.div_ceil(ROWS_PER_TASK).max(1);
        let rows_per_task = rows.div_ceil(row_tasks).div_ceil(block_rows) * block_rows;
        let row_tasks = rows.div_ceil(rows_per_task).max(1);
        let cout_g = self.out_channels / self.groups;
        // Four tasks a thread, in column runs of whole blocks.
        let wanted = (4 * threads)
            .div_ceil(row_tasks)
            .min(cout_g.div_ceil(block_cols))
            .max(1);
        let cols_per_task = cout_g.div_ceil(wanted).div_ceil(block_cols) * block_cols;
        Split {
            rows_per_task,
            row_tasks,
            cols_per_task,
            col_tasks: cout_g.div_ceil(cols_per_task),
        }
    }

    /// One layer over the batch: `input` (n, h, w, in) u8 to `output` (n, oh, ow, out) u8.
    /// `parallel`: the layer's tasks shared among the pool's threads, or (a thread's share
    /// of a batch in throughput mode) run here one after the other.
    fn forward(
        &self,
        input: &[u8],
        n: usize,
        h: usize,
        w: usize,
        output: &mut [u8],
        parallel: bool,
    ) {
        let (oh, ow) = self.output_size(h, w);
        // A layer read from its image runs over grid positions: each output row and its two
        // padding columns, so that tasks of whole 32-row blocks stay whole.
        let rows = if self.from_image {
            n * oh * (ow + 2)
        } else {
            n * oh * ow
        };
        let out_ptr = crate::OutPtrU8(output.as_mut_ptr());
        let split = if parallel {
            self.split(rows)
        } else {
            // One thread: columns whole, rows in the usual runs.
            let block_rows = self.kernels.block().0;
            let rows_per_task = ROWS_PER_TASK.div_ceil(block_rows) * block_rows;
            let cout_g = self.out_channels / self.groups;
            Split {
                rows_per_task,
                row_tasks: rows.div_ceil(rows_per_task).max(1),
                cols_per_task: cout_g,
                col_tasks: 1,
            }
        };
        let execute = |image: &[u8]| {
            let run = |task: usize| {
                let (row_task, col_task) = (task / split.col_tasks, task % split.col_tasks);
                let first = row_task * split.rows_per_task;
                let count = split.rows_per_task.min(rows - first);
                let cout_g = self.out_channels / self.groups;
                let cols = col_task * split.cols_per_task
                    ..((col_task + 1) * split.cols_per_task).min(cout_g);
                let rows = first..first + count;
                if self.from_image {
                    self.image_task(rows, cols, image, h, w, out_ptr)
                } else {
                    PATCHES.with_borrow_mut(|patches| {
                        self.task(rows, cols, input, n, h, w, out_ptr, patches)
                    })
                }
            };
            if parallel {
                (0..split.row_tasks * split.col_tasks)
                    .into_par_iter()
                    .for_each(run);
            } else {
                (0..split.row_tasks * split.col_tasks).for_each(run);
            }
        };
        if self.from_image {
            // Taken out of the thread's slot while the tasks run, so that a layer this thread
            // picks up meanwhile (another forward's on the same pool) finds the slot free.
            let mut padded = PADDED.with_borrow_mut(std::mem::take);
            let start = self.pad_input(input, n, h, w, &mut padded, parallel);
            execute(&padded[start..]);
            PADDED.with_borrow_mut(|slot| *slot = padded);
        } else {
            execute(&[])
        }
    }

    /// The input with a pixel of its zero point around each image, images one after the
    /// other, and room after the last for the reads of its last 32-row block
    /// ([`Conv8::image_bytes`]): what a layer read straight from its image reads. It starts
    /// at the returned offset in `padded`, on a cache line (so are its pixels, where the
    /// channels fill whole lines).
    fn pad_input(
        &self,
        input: &[u8],
        n: usize,
        h: usize,
        w: usize,
        padded: &mut Vec<u8>,
        parallel: bool,
    ) -> usize {
        let cin = self.in_channels;
        let pad = self.input.zero_point;
        let (pw, line) = (w + 2, (w + 2) * cin);
        let grid = n * (h + 2) * line;
        let slack = conv3x3_overrun(cin, pw);
        // Every byte is written below; the slack's only need to be initialized. The caller
        // reads the grid from the returned offset, a cache line.
        padded.resize(grid + slack + CACHE_LINE, pad);
        let start = padded.as_ptr().align_offset(CACHE_LINE);
        let padded = &mut padded[start..];
        let fill = |(r, row): (usize, &mut [u8])| {
            let (image, y) = (r / (h + 2), r % (h + 2));
            if y == 0 || y == h + 1 {
                row.fill(pad);
                return;
            }
            row[..cin].fill(pad);
            row[(pw - 1) * cin..].fill(pad);
            let from = (image * h + y - 1) * w * cin;
            row[cin..(pw - 1) * cin].copy_from_slice(&input[from..from + w * cin]);
        };
        if parallel {
            padded[..grid]
                .par_chunks_exact_mut(line)
                .enumerate()
                .for_each(fill);
        } else {
            padded[..grid]
                .chunks_exact_mut(line)
                .enumerate()
                .for_each(fill);
        }
        start
    }

    /// One task of a layer read straight from its image, over grid positions (`rows`: output
    /// row `y` of image `i` and its two padding columns are positions `(i h + y) (w + 2)` on):
    /// one product over the task's columns for each image its rows touch, reading `padded`
    /// ([`Int8Layer::pad_input`]).
    #[allow(clippy::too_many_arguments)]
    fn image_task(
        &self,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
        padded: &[u8],
        h: usize,
        w: usize,
        out_ptr: crate::OutPtrU8,
    ) {
        let (cin, cout) = (self.in_channels, self.out_channels);
        let pw = w + 2;
        let grid = h * pw;
        let mut start = rows.start;
        while start < rows.end {
            let image = start / grid;
            let end = rows.end.min((image + 1) * grid);
            let first_y = (start % grid) / pw;
            // Output row first_y is the product's grid row 0; the padded row above it is
            // where its windows start.
            let product = Conv8 {
                first: start % grid - first_y * pw,
                positions: end - start,
                image: padded[(image * (h + 2) + first_y) * pw * cin..].as_ptr(),
                channels: cin,
                padded_width: pw,
                a_zero: self.input.zero_point,
                b: &self.weights[0],
                bias: &self.bias,
                cols: cols.clone(),
                c: out_ptr
                    .get()
                    .wrapping_add(((image * h + first_y) * w) * cout + cols.start),
                ldc: cout,
                epilogue: Epilogue::U8 {
                    scale: &self.requant,
                    zero: self.output.zero_point,
                    relu: true,
                },
            };
            let from = (image * (h + 2) + first_y) * pw * cin;
            assert!(
                from + product.image_bytes() <= padded.len(),
                "the padded input is shorter than a product reads"
            );
            // SAFETY: the padded input holds the product's `image_bytes` from its first row
            // (asserted); the task's output pixels and columns are its own (tasks split the
            // grid and the columns), pixels `cout` bytes apart.
            unsafe { conv3x3_u8s8(&product) };
            start = end;
        }
    }

    /// One task: its rows' patches, then a product per group over its columns.
    #[allow(clippy::too_many_arguments)]
    fn task(
        &self,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
        input: &[u8],
        n: usize,
        h: usize,
        w: usize,
        out_ptr: crate::OutPtrU8,
        patches: &mut Vec<u8>,
    ) {
        let (oh, ow) = self.output_size(h, w);
        debug_assert!(rows.end <= n * oh * ow);
        let (cin, cout) = (self.in_channels, self.out_channels);
        let (cin_g, cout_g) = (cin / self.groups, cout / self.groups);
        let k = 9 * cin_g;
        let lda = self.kernels.a_row_bytes(k);
        let pad = self.input.zero_point;
        let count = rows.len();
        let (stride, dilation) = (self.stride, self.dilation);
        // Grows once per thread; the bytes past each row's k meet zero weights, whatever
        // they hold.
        // Rows start on cache lines where `lda` is a multiple of one (AMX's whole tiles): a
        // tile row is then one line, not two.
        let patches = line_aligned(patches, count * lda, 0);
        for g in 0..self.groups {
            // The output position of each row, stepped rather than divided out per row (the
            // stem has 12,544 rows an image of few bytes each).
            let first = rows.start;
            let (mut image, mut y, mut x) = (first / (oh * ow), first / ow % oh, first % ow);
            for row in patches.chunks_exact_mut(lda) {
                if x == ow {
                    (x, y) = (0, y + 1);
                    if y == oh {
                        (y, image) = (0, image + 1);
                    }
                }
                let ix0 = (x * stride) as isize - dilation as isize;
                x += 1;
                for ky in 0..3 {
                    let iy = (y * stride + ky * dilation) as isize - dilation as isize;
                    let segment = 3 * ky * cin_g..3 * (ky + 1) * cin_g;
                    if iy < 0 || iy >= h as isize {
                        row[segment].fill(pad);
                        continue;
                    }
                    let line = (image * h + iy as usize) * w;
                    let inside = ix0 >= 0 && ix0 + 2 * (dilation as isize) < w as isize;
                    if inside && dilation == 1 && self.groups == 1 {
                        // The three taps of this kernel row are adjacent pixels: one copy.
                        let at = (line + ix0 as usize) * cin;
                        let start = segment.start;
                        if segment.len() <= SHORT_COPY
                            && start + SHORT_COPY <= row.len()
                            && at + SHORT_COPY <= input.len()
                        {
                            // A few channels (the RGB stem's 9 bytes): one fixed-size copy,
                            // not a library call per kernel row. The bytes past the segment
                            // land where the next kernel row or the row's padding goes,
                            // written later or never read against a weight.
                            row[start..start + SHORT_COPY]
                                .copy_from_slice(&input[at..at + SHORT_COPY]);
                        } else {
                            row[segment].copy_from_slice(&input[at..at + 3 * cin]);
                        }
                        continue;
                    }
                    let dst = &mut row[segment];
                    for kx in 0..3 {
                        let ix = ix0 + (kx * dilation) as isize;
                        let tap = &mut dst[kx * cin_g..(kx + 1) * cin_g];
                        if ix < 0 || ix >= w as isize {
                            tap.fill(pad);
                        } else {
                            let at = (line + ix as usize) * cin + g * cin_g;
                            tap.copy_from_slice(&input[at..at + cin_g]);
                        }
                    }
                }
            }
            let product = Product8 {
                rows: count,
                a: patches.as_ptr(),
                lda,
                a_zero: pad,
                b: &self.weights[g],
                bias: &self.bias[g * cout_g..],
                cols: cols.clone(),
                c: out_ptr
                    .get()
                    .wrapping_add(rows.start * cout + g * cout_g + cols.start),
                ldc: cout,
                epilogue: Epilogue::U8 {
                    scale: &self.requant[g * cout_g..],
                    zero: self.output.zero_point,
                    relu: true,
                },
            };
            // SAFETY: each patch row holds `lda` bytes (the kernel set's row bytes); the
            // task's rows and columns of the output are its own (tasks split them), rows
            // `cout` bytes apart with this group's columns inside.
            unsafe { gemm_u8s8(self.kernels, &product) };
        }
    }
}
