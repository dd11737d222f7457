//! A CPU inference engine for deployed RepVGG: 3x3 conv + bias (+ SE) + ReLU, then pool and
//! linear, with no framework underneath.
//!
//! ```no_run
//! use repvgg_checkpoint::Checkpoint;
//! use repvgg_engine::{Engine, Workspace};
//!
//! // Either form: training-form weights are converted on load.
//! let ckpt = Checkpoint::load("RepVGG-A0-train.pth".as_ref(), None)?;
//! let engine = Engine::from_checkpoint(&ckpt, 1e-5)?;
//! let images = vec![0.0f32; 8 * 3 * 224 * 224]; // NCHW, ImageNet-normalised
//! let logits = engine.forward(&images, 8, 224, 224, &mut Workspace::default());
//! // Backbone use: the outputs of stages 1..4.
//! let pyramid = engine.forward_stages(&images, 8, 224, 224, &[1, 2, 3, 4]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Activations are NHWC, so a 3x3 convolution is matrix products whose rows are output
//! positions, whose reduction runs over (tap, input channel) and whose columns are output
//! channels. All of them run on one hand-written kernel (`kernel.rs`: an 8x48 AVX-512 or a
//! 6x16 AVX2/FMA register block, chosen at run time, with a portable fallback) against
//! weights packed once at load.
//! Bias and ReLU are applied as each block of outputs leaves the registers.
//!
//! - Stride-1 layers of 8+ input channels per group take Winograd (`winograd.rs`): F(4x4, 3x3)
//!   does a 4x4 output tile in 36 products per channel pair instead of 144; F(2x2, 3x3) on
//!   small maps.
//! - Wide stride-2 layers take F(2x2, 3x3) by phases: a 2x2 output tile in 25 products per
//!   channel pair instead of 36, with additions only.
//! - Other layers copy 3x3 patches into rows (im2col) and run one product per tile, or, when
//!   the weight matrix is too big for L2, run nine per-tap products that read their rows
//!   straight from the input (implicit GEMM), so each slice of weights is read once.
//!
//! Threads split a layer's tiles (latency mode), or take whole images (throughput mode).

use std::cell::RefCell;
use std::sync::OnceLock;

mod kernel;
pub mod nchw;
mod winograd;
use kernel::{NR, PackedB};
use rayon::prelude::*;
use winograd::Tile as WinogradTile;

use repvgg_arch::{ArchSpec, Form};
use repvgg_checkpoint::layout::{HEAD, REPARAM, SE_DOWN, SE_UP, prefix};
use repvgg_checkpoint::{Checkpoint, CheckpointError};

/// Output positions per tile: big enough to amortise the GEMM's packing, small enough that
/// the tile's patches stay in L2.
const ROW_TILE: usize = 96;
/// Output channels per tile when a layer has too few rows to keep every thread busy.
const MIN_COL_TILE: usize = 64;
/// Weight matrices larger than this (floats; 1 MiB) take the implicit-GEMM path.
const IMPLICIT_MIN_WEIGHTS: usize = 1 << 18;
/// Output positions per implicit-GEMM task.
const IMPLICIT_ROW_TILE: usize = 256;
/// Weights per implicit-GEMM task's column slice, as a share of the core's L2: half of it.
/// A0's stage 4 opening block at batch 4 on one thread, on a 2 MiB L2 (Xeon, AVX-512):
/// 7.4 ms with 256 KiB slices, 6.9-7.0 with 1 MiB.
fn implicit_slice_floats() -> usize {
    l2_bytes() / 2 / 4
}

/// The L2 cache of CPU 0 as Linux reports it, else 512 KiB (the Zen 3 machine this engine
/// was first tuned on).
fn l2_bytes() -> usize {
    static L2: OnceLock<usize> = OnceLock::new();
    *L2.get_or_init(|| {
        // Linux numbers a CPU's caches index0, index1, ...: find the one whose level is 2.
        let dir = "/sys/devices/system/cpu/cpu0/cache";
        let read = |index: usize, file: &str| {
            std::fs::read_to_string(format!("{dir}/index{index}/{file}")).ok()
        };
        let size = (0..8)
            .find(|&i| read(i, "level").is_some_and(|level| level.trim() == "2"))
            .and_then(|i| read(i, "size"));
        size.and_then(|s| {
            let s = s.trim();
            let (digits, scale) = match s.strip_suffix('K') {
                Some(d) => (d, 1 << 10),
                None => match s.strip_suffix('M') {
                    Some(d) => (d, 1 << 20),
                    None => (s, 1),
                },
            };
            digits.parse::<usize>().ok().map(|n| n * scale)
        })
        .filter(|&bytes| bytes >= 64 << 10)
        .unwrap_or(512 << 10)
    })
}
/// A batch's leading layers run image by image while one image's input or output map is
/// bigger than this ([`Engine::infer`]).
const PER_IMAGE_MAP_BYTES: usize = 1 << 20;

/// One packed 3x3 convolution with bias (and SE).
struct ConvLayer {
    in_channels: usize,
    out_channels: usize,
    groups: usize,
    stride: usize,
    /// Dilation and padding of the 3x3 taps.
    dilation: usize,
    /// Per group, the `(9 * in/g) x (out/g)` weight matrix, rows ordered (ky, kx, c).
    packed: Vec<PackedB>,
    /// Winograd-transformed filters (`[group * points + point]`) for each [`WinogradTile`],
    /// made on first use, so that only the transforms a layer's map sizes call for take memory.
    winograd: [OnceLock<Vec<PackedB>>; 3],
    winograd_choice: Winograd,
    lowering: Lowering,
    bias: Vec<f32>,
    se: Option<SqueezeExcite>,
    /// `in/g` zeros: what a tap reads in the padding.
    zeros: Vec<f32>,
}

/// How the engine computes; the defaults are the fastest measured on the AVX2 (Zen 3) and
/// AVX-512 (Xeon) machines it was tuned on.
#[derive(Clone, Copy, Debug)]
pub struct EngineOptions {
    pub winograd: Winograd,
    /// How layers without Winograd become matrix products.
    pub lowering: Lowering,
    pub mode: Mode,
}

/// How a convolution that does not take the Winograd path becomes matrix products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lowering {
    /// Copy each output position's 3x3 patch into a row (im2col), one product per tile.
    Im2col,
    /// Nine products, one per tap, reading rows straight from the input (implicit GEMM).
    Implicit,
    /// Implicit where the weight matrix is too big for L2, im2col elsewhere.
    Auto,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            winograd: Winograd::Auto,
            lowering: Lowering::Auto,
            mode: Mode::Auto,
        }
    }
}

/// Which Winograd transforms the layers use. Stride-2 layers have one, F(2x2, 3x3) by phases
/// (see `winograd.rs`); stride-1 layers have F(2x2, 3x3) and F(4x4, 3x3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Winograd {
    /// im2col and a matrix product for every layer.
    Off,
    /// F(2x2, 3x3) on every layer of stride 1 or 2 without dilation.
    F2,
    /// F(4x4, 3x3) on stride-1 layers, F(2x2, 3x3) on stride-2 ones.
    F4,
    /// Stride 1: F(4x4, 3x3) unless the map is small ([`F4_MIN_SIDE`]) or has so few tiles
    /// for the size of its transformed filters ([`F4_MAX_FILTER_BYTES_PER_TILE`]) that reading
    /// them costs more than the products saved (A0's 14x14 stage at batch 1); F(2x2, 3x3)
    /// there; none for layers of fewer than [`WINOGRAD_MIN_CHANNELS`] input channels per
    /// group. Stride 2: F(2x2, 3x3) from [`STRIDE2_WINOGRAD_MIN_CHANNELS`] input channels per
    /// group, on maps of at least [`F4_MIN_SIDE`] and with filters that pay by the same
    /// measure as F(4x4)'s; a direct product otherwise (the RGB stem, A0's last stage with
    /// 1280 channels on a 7x7 map).
    Auto,
}

/// The smallest output map side on which [`Winograd::Auto`] takes F(4x4, 3x3) (or, for
/// stride 2, any Winograd transform): on smaller maps, partial tiles waste most of the
/// savings.
pub const F4_MIN_SIDE: usize = 8;
/// Fewer input channels per group than this leave the transforms' 8-channel vectors, and the
/// products' reductions, too short to gain: [`Winograd::Auto`] leaves such layers direct.
pub const WINOGRAD_MIN_CHANNELS: usize = 8;
/// [`Winograd::Auto`]'s bar for stride-2 layers, whose 25 transform points per 2x2 tile
/// read and write more per product than stride 1's. Measured at batch 4 on one thread: 1-18%
/// faster from 64 input channels up (B0's 64, 128 and 256; A0's 96), no faster at A0's
/// 48 -> 96 and 8% slower at its 48 -> 48.
pub const STRIDE2_WINOGRAD_MIN_CHANNELS: usize = 64;
/// [`Winograd::Auto`] takes F(4x4, 3x3) while its transformed filters (36 per channel pair)
/// come to at most this many bytes per 4x4 output tile of the call.
pub const F4_MAX_FILTER_BYTES_PER_TILE: usize = 128 << 10;

/// How threads share a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Every layer split across threads: the lowest latency for one image.
    Latency,
    /// Threads take whole images: no synchronisation between layers.
    Throughput,
    /// Throughput when the batch has at least one image per thread, else latency.
    Auto,
}

struct SqueezeExcite {
    hidden: usize,
    /// `(hidden, C)` row-major.
    down: Vec<f32>,
    down_bias: Vec<f32>,
    /// `(C, hidden)` row-major.
    up: Vec<f32>,
    up_bias: Vec<f32>,
}

/// A deployed RepVGG ready to run.
pub struct Engine {
    spec: ArchSpec,
    options: EngineOptions,
    layers: Vec<ConvLayer>,
    /// The linear head's weight as a `(features, classes)` product operand, or `None` when
    /// headless.
    head_weight: Option<PackedB>,
    head_bias: Vec<f32>,
}

/// One block's share of a forward pass.
#[derive(Clone, Debug)]
pub struct LayerTiming {
    pub name: String,
    pub seconds: f64,
    pub macs: u64,
    pub stride: usize,
    pub groups: usize,
    /// (in channels, out channels, output height, output width)
    pub shape: (usize, usize, usize, usize),
}

/// One stage's output feature map, NCHW.
#[derive(Clone, Debug, PartialEq)]
pub struct StageFeatures {
    pub stage: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub data: Vec<f32>,
}

/// Buffers reused across calls (activations, pooled features, logits), so that steady-state
/// inference through [`Engine::infer`] does not allocate.
#[derive(Default)]
pub struct Workspace {
    a: Vec<f32>,
    b: Vec<f32>,
    /// One image's maps, for the leading layers that run image by image.
    image_a: Vec<f32>,
    image_b: Vec<f32>,
    pooled: Vec<f32>,
    logits: Vec<f32>,
}

thread_local! {
    static PATCHES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Implicit GEMM's per-row (image row offset, top tap row, left tap column).
    static ORIGINS: RefCell<Vec<(usize, isize, isize)>> = const { RefCell::new(Vec::new()) };
    static THREAD_WORKSPACE: RefCell<Workspace> = RefCell::new(Workspace::default());
    /// SE's pooled means, bottleneck and gate.
    static SE_SCRATCH: RefCell<(Vec<f32>, Vec<f32>, Vec<f32>)> =
        const { RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// A raw pointer that tiles write through; every tile owns a disjoint block of the output.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// A method (not field access) so closures capture the whole `Send` wrapper.
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// One task of a layer without Winograd: output rows `first..first + count` (positions over
/// the whole batch), output channels `cols` of group `group`.
struct RowTask<'a> {
    /// `(n, h, w, cin)`
    input: &'a [f32],
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    first: usize,
    count: usize,
    group: usize,
    /// Within the group; starts at a multiple of [`kernel::NR`].
    cols: std::ops::Range<usize>,
    /// `(n, oh, ow, cout)`
    out: *mut f32,
    relu: bool,
}

impl RowTask<'_> {
    /// The task's first output element: row `first`, its group's column `cols.start`.
    fn output_block(&self, cout: usize, cout_g: usize) -> *mut f32 {
        self.out
            .wrapping_add(self.first * cout + self.group * cout_g + self.cols.start)
    }
}

/// Called after every block with (block index, height, width, NHWC activations).
type Tap<'a> = dyn FnMut(usize, usize, usize, &[f32]) + 'a;

impl Engine {
    /// Builds the engine from a checkpoint of either form (a training-form one is converted
    /// first, with `bn_eps`).
    pub fn from_checkpoint(ckpt: &Checkpoint, bn_eps: f64) -> Result<Engine, CheckpointError> {
        Engine::with_options(ckpt, bn_eps, EngineOptions::default())
    }

    pub fn with_options(
        ckpt: &Checkpoint,
        bn_eps: f64,
        options: EngineOptions,
    ) -> Result<Engine, CheckpointError> {
        let deploy = ckpt.as_deploy(bn_eps)?;
        let t = |key: String| &deploy.tensors[&key];
        let layers = deploy
            .spec
            .blocks()
            .iter()
            .map(|b| {
                let p = prefix(b);
                let weight = t(format!("{p}{REPARAM}weight"));
                let bias = t(format!("{p}{REPARAM}bias")).data.clone();
                let se = b.se_channels.map(|hidden| SqueezeExcite {
                    hidden,
                    down: t(format!("{p}{SE_DOWN}weight")).data.clone(),
                    down_bias: t(format!("{p}{SE_DOWN}bias")).data.clone(),
                    up: t(format!("{p}{SE_UP}weight")).data.clone(),
                    up_bias: t(format!("{p}{SE_UP}bias")).data.clone(),
                });
                ConvLayer {
                    in_channels: b.in_channels,
                    out_channels: b.out_channels,
                    groups: b.groups,
                    stride: b.stride,
                    dilation: b.dilation,
                    packed: pack_kernel(
                        &weight.data,
                        b.out_channels,
                        b.in_channels / b.groups,
                        b.groups,
                    ),
                    winograd: Default::default(),
                    lowering: options.lowering,
                    winograd_choice: if b.stride <= 2 && b.dilation == 1 {
                        options.winograd
                    } else {
                        Winograd::Off
                    },
                    bias,
                    se,
                    zeros: vec![0.0; b.in_channels / b.groups],
                }
            })
            .collect();
        Ok(Engine {
            spec: deploy.spec.clone(),
            options,
            layers,
            head_weight: deploy.tensors.get(&format!("{HEAD}weight")).map(|t| {
                let (classes, features) = (deploy.spec.num_classes, deploy.spec.feature_width());
                PackedB::new(features, classes, |c, k| t.data[k * features + c])
            }),
            head_bias: deploy
                .tensors
                .get(&format!("{HEAD}bias"))
                .map_or_else(Vec::new, |t| t.data.clone()),
        })
    }

    pub fn spec(&self) -> &ArchSpec {
        &self.spec
    }

    /// Logits `(n, classes)` for an NCHW batch (a headless model's pooled features).
    pub fn forward(
        &self,
        input: &[f32],
        n: usize,
        h: usize,
        w: usize,
        ws: &mut Workspace,
    ) -> Vec<f32> {
        self.infer(input, n, h, w, ws).to_vec()
    }

    /// As [`Engine::forward`], with the logits left in the workspace: once a workspace has
    /// served a batch of this shape, the call allocates nothing (the `no_alloc` test).
    pub fn infer<'w>(
        &self,
        input: &[f32],
        n: usize,
        h: usize,
        w: usize,
        ws: &'w mut Workspace,
    ) -> &'w [f32] {
        let threads = rayon::current_num_threads();
        let by_image = match self.options.mode {
            Mode::Latency => false,
            Mode::Throughput => threads > 1 && n > 1,
            Mode::Auto => threads > 1 && n >= threads,
        };
        if !by_image {
            return self.run(input, n, h, w, ws, true, None);
        }
        // Throughput mode: each thread runs whole images through every layer, with no
        // synchronisation between layers, and writes their logits into its share of ours.
        self.check_input(input, n, h, w);
        let image = self.spec.in_channels * h * w;
        let per_thread = n.div_ceil(threads);
        let width = self.output_width();
        ws.logits.resize(n * width, 0.0);
        input
            .par_chunks(per_thread * image)
            .zip(ws.logits.par_chunks_mut(per_thread * width))
            .for_each(|(part, logits)| {
                THREAD_WORKSPACE.with(|tws| {
                    let mut tws = tws.borrow_mut();
                    let images = part.len() / image;
                    logits.copy_from_slice(self.run(part, images, h, w, &mut tws, false, None));
                })
            });
        &ws.logits
    }

    /// The input must be `(n, in_channels, h, w)` on a non-empty map: a caller's bug
    /// otherwise (the CLI checks shapes and reports them with the file's name first).
    fn check_input(&self, input: &[f32], n: usize, h: usize, w: usize) {
        let c = self.spec.in_channels;
        assert!(h > 0 && w > 0, "input map is empty ({h}x{w})");
        assert_eq!(
            input.len(),
            n * c * h * w,
            "input is not ({n}, {c}, {h}, {w})"
        );
    }

    /// Values per image of the output: classes, or a headless model's feature width.
    fn output_width(&self) -> usize {
        match self.head_weight {
            Some(_) => self.spec.num_classes,
            None => self.spec.feature_width(),
        }
    }

    /// The feature maps at the end of stages `out_indices` (0..=4), NCHW, for use as a
    /// backbone (as timm's `features_only` / mmseg's `out_indices`).
    pub fn forward_stages(
        &self,
        input: &[f32],
        n: usize,
        h: usize,
        w: usize,
        out_indices: &[usize],
    ) -> Vec<StageFeatures> {
        let blocks = self.spec.blocks();
        let mut out = Vec::with_capacity(out_indices.len());
        let mut ws = Workspace::default();
        self.forward_with(input, n, h, w, &mut ws, |i, oh, ow, nhwc| {
            let stage = blocks[i].stage;
            if blocks[i].ends_stage && out_indices.contains(&stage) {
                out.push(StageFeatures {
                    stage,
                    channels: blocks[i].out_channels,
                    height: oh,
                    width: ow,
                    data: nhwc_to_nchw(nhwc, n, oh, ow),
                });
            }
        });
        out
    }

    /// Like [`Engine::forward`], calling `tap(block_index, h, w, nhwc)` after every block
    /// (latency mode: each layer split across threads).
    pub fn forward_with(
        &self,
        input: &[f32],
        n: usize,
        h: usize,
        w: usize,
        ws: &mut Workspace,
        mut tap: impl FnMut(usize, usize, usize, &[f32]),
    ) -> Vec<f32> {
        self.run(input, n, h, w, ws, true, Some(&mut tap)).to_vec()
    }

    /// All layers and the head; `tap`, when given, sees every layer's whole-batch output.
    #[allow(clippy::too_many_arguments)]
    fn run<'w>(
        &self,
        input: &[f32],
        n: usize,
        h: usize,
        w: usize,
        ws: &'w mut Workspace,
        parallel: bool,
        mut tap: Option<&mut Tap<'_>>,
    ) -> &'w [f32] {
        self.check_input(input, n, h, w);
        let c = self.spec.in_channels;
        // The leading layers whose maps are big (A0 at 224: the stem's output, 2.4 MB an
        // image) run image by image, so that one image's maps pass through the caches rather
        // than a batch's through memory; the rest take the whole batch.
        let leading = match tap {
            Some(_) => 0,
            None if n > 1 => self.big_map_layers(h, w),
            None => 0,
        };
        let (mut h, mut w, mut len) = (h, w, n * c * h * w);
        if leading > 0 {
            let (oh, ow, channels) =
                self.layers[..leading]
                    .iter()
                    .fold((h, w, c), |(h, w, _), layer| {
                        let (oh, ow) = layer.output_size(h, w);
                        (oh, ow, layer.out_channels)
                    });
            let out_len = oh * ow * channels;
            if ws.a.len() < n * out_len {
                ws.a.resize(n * out_len, 0.0);
            }
            let Workspace {
                a,
                image_a,
                image_b,
                ..
            } = &mut *ws;
            for (image, out) in input
                .chunks_exact(c * h * w)
                .zip(a.chunks_exact_mut(out_len))
            {
                nchw_to_nhwc(image, 1, c, h, w, image_a);
                let (mut ih, mut iw) = (h, w);
                for (i, layer) in self.layers[..leading].iter().enumerate() {
                    let (lh, lw) = layer.output_size(ih, iw);
                    let len = lh * lw * layer.out_channels;
                    if image_b.len() < len {
                        image_b.resize(len, 0.0);
                    }
                    // The last leading layer writes its image's place in the batch.
                    let dst = if i + 1 == leading {
                        &mut *out
                    } else {
                        &mut image_b[..len]
                    };
                    let src = &image_a[..ih * iw * layer.in_channels];
                    layer.forward(src, 1, ih, iw, dst, parallel);
                    std::mem::swap(image_a, image_b);
                    (ih, iw) = (lh, lw);
                }
            }
            (h, w, len) = (oh, ow, n * out_len);
        } else {
            nchw_to_nhwc(input, n, c, h, w, &mut ws.a);
        }
        for (i, layer) in self.layers.iter().enumerate().skip(leading) {
            let (oh, ow) = layer.output_size(h, w);
            let out_len = n * oh * ow * layer.out_channels;
            // Buffers only ever grow (zero-filled once), so a warm workspace costs nothing here.
            if ws.b.len() < out_len {
                ws.b.resize(out_len, 0.0);
            }
            if n > 0 {
                layer.forward(&ws.a[..len], n, h, w, &mut ws.b[..out_len], parallel);
            }
            std::mem::swap(&mut ws.a, &mut ws.b);
            (h, w, len) = (oh, ow, out_len);
            if let Some(tap) = tap.as_mut() {
                tap(i, h, w, &ws.a[..len]);
            }
        }
        let Workspace {
            a, pooled, logits, ..
        } = ws;
        self.head(&a[..len], n, h * w, pooled, logits, parallel)
    }

    /// How many leading layers read or write more than [`PER_IMAGE_MAP_BYTES`] per image
    /// for an `h x w` input.
    fn big_map_layers(&self, h: usize, w: usize) -> usize {
        let (mut h, mut w, mut c) = (h, w, self.spec.in_channels);
        let mut count = 0;
        for layer in &self.layers {
            let (oh, ow) = layer.output_size(h, w);
            let biggest = (h * w * c).max(oh * ow * layer.out_channels) * 4;
            if biggest <= PER_IMAGE_MAP_BYTES {
                break;
            }
            (h, w, c, count) = (oh, ow, layer.out_channels, count + 1);
        }
        count
    }

    /// Seconds spent in each block for one forward (after a warm-up call), with the block's
    /// MACs, for per-layer GFLOP/s.
    pub fn profile(
        &self,
        input: &[f32],
        n: usize,
        h: usize,
        w: usize,
        ws: &mut Workspace,
    ) -> Vec<LayerTiming> {
        // Warm up exactly what is timed below: this workspace, latency mode.
        self.run(input, n, h, w, ws, true, Some(&mut |_, _, _, _| {}));
        let blocks = self.spec.blocks();
        let mut timings = Vec::with_capacity(self.layers.len());
        let (mut in_h, mut in_w) = (h, w);
        let mut last = std::time::Instant::now();
        self.run(
            input,
            n,
            h,
            w,
            ws,
            true,
            Some(&mut |i, oh, ow, _| {
                let (layer, block) = (&self.layers[i], &blocks[i]);
                timings.push(LayerTiming {
                    name: block.name(),
                    seconds: last.elapsed().as_secs_f64(),
                    macs: n as u64 * block.macs(Form::Deploy, in_h, in_w),
                    stride: layer.stride,
                    groups: layer.groups,
                    shape: (layer.in_channels, layer.out_channels, oh, ow),
                });
                (in_h, in_w) = (oh, ow);
                last = std::time::Instant::now();
            }),
        );
        timings
    }

    /// Logits, or for a headless model (0 classes) the pooled features `(n, channels)`, in
    /// the buffers given.
    fn head<'w>(
        &self,
        features: &[f32],
        n: usize,
        positions: usize,
        pooled: &'w mut Vec<f32>,
        logits: &'w mut Vec<f32>,
        parallel: bool,
    ) -> &'w [f32] {
        let c = self.spec.feature_width();
        pooled.resize(n * c, 0.0);
        for (image, means) in features
            .chunks_exact(positions * c)
            .zip(pooled.chunks_exact_mut(c))
        {
            channel_means_into(image, means);
        }
        let Some(weight) = &self.head_weight else {
            return pooled;
        };
        let classes = self.spec.num_classes;
        logits.resize(n * classes, 0.0);
        // At small batches the product is a stream of the weights (A0: 5 MB), split between
        // the threads in latency mode.
        let splits = if parallel {
            rayon::current_num_threads()
        } else {
            1
        };
        let col_tile = classes.div_ceil(splits).next_multiple_of(NR);
        let out = OutPtr(logits.as_mut_ptr());
        let pooled = &pooled[..];
        run_tasks(classes.div_ceil(col_tile), parallel, |task| {
            let cols = task * col_tile..((task + 1) * col_tile).min(classes);
            // SAFETY: `pooled` is (n, c) and `logits` (n, classes); tasks write disjoint
            // columns.
            unsafe {
                kernel::gemm(
                    n,
                    pooled.as_ptr(),
                    c,
                    weight,
                    cols.clone(),
                    out.get().add(cols.start),
                    classes,
                    Some(&self.head_bias),
                    false,
                )
            };
        });
        logits
    }
}

impl ConvLayer {
    /// The output map's size for an `h x w` input (pad 1).
    fn output_size(&self, h: usize, w: usize) -> (usize, usize) {
        ((h - 1) / self.stride + 1, (w - 1) / self.stride + 1)
    }

    /// `parallel`: split this layer across the thread pool (latency mode), or run it on the
    /// calling thread (throughput mode, where threads take whole images).
    fn forward(
        &self,
        input: &[f32],
        n: usize,
        h: usize,
        w: usize,
        output: &mut [f32],
        parallel: bool,
    ) {
        let threads = if parallel {
            rayon::current_num_threads()
        } else {
            1
        };
        let (oh, ow) = self.output_size(h, w);
        if let Some(tile) = self.winograd_tile(n, oh, ow) {
            let tiles = winograd::tile_count(tile, n, oh, ow);
            let cout_g = self.out_channels / self.groups;
            // Chunks of at most `per_task` tiles, as many as the threads (or a multiple),
            // while each keeps enough rows for the products to run at full speed. With fewer
            // tiles than that (batch 1, small maps), split the output channels instead, so
            // that the transformed filters are still read once; each split repeats the
            // (cheap) input transform.
            let per_task =
                winograd::tiles_per_task(tile, self.in_channels / self.groups, cout_g, threads > 1);
            let chunks = tiles.div_ceil(per_task);
            let (chunks, col_splits) = if chunks * self.groups >= threads {
                (chunks.div_ceil(threads) * threads, 1)
            } else if tiles >= threads * winograd::MIN_TILES_PER_TASK {
                (threads, 1)
            } else {
                let splits = threads.div_ceil(chunks * self.groups);
                (chunks, splits.min((cout_g / NR).max(1)))
            };
            let col_tile = cout_g.div_ceil(col_splits).next_multiple_of(NR);
            let col_splits = cout_g.div_ceil(col_tile);
            let per_chunk = tiles.div_ceil(chunks);
            let chunks = tiles.div_ceil(per_chunk);
            if chunks * self.groups * col_splits >= threads {
                let layer = winograd::Layer {
                    tile,
                    u: self.winograd_filters(tile),
                    bias: &self.bias,
                    cin: self.in_channels,
                    cout: self.out_channels,
                    groups: self.groups,
                    relu: self.se.is_none(),
                };
                let out = OutPtr(output.as_mut_ptr());
                run_tasks(chunks * self.groups * col_splits, parallel, |task| {
                    let (rest, col_block) = (task / col_splits, task % col_splits);
                    let (chunk, group) = (rest / self.groups, rest % self.groups);
                    let first = chunk * per_chunk;
                    let count = per_chunk.min(tiles - first);
                    let cols = col_block * col_tile..((col_block + 1) * col_tile).min(cout_g);
                    let task = winograd::Task {
                        input,
                        h,
                        w,
                        first_tile: first,
                        count,
                        group,
                        cols,
                        out: out.get(),
                    };
                    // SAFETY: tasks own disjoint (tiles, group, columns) blocks of the output.
                    unsafe { winograd::tiles(&layer, &task) };
                });
                self.finish_se(output, n, oh, ow, parallel);
                return;
            }
        }
        let rows = n * oh * ow;
        let cout_g = self.out_channels / self.groups;
        let k = 9 * self.in_channels / self.groups;
        // A weight matrix too big for L2 is better read once, by tasks that each take a slice
        // of its columns over many rows, straight from the input (stage 4's opening block:
        // 1.4x faster measured); smaller ones are faster with im2col's contiguous rows.
        let implicit = match self.lowering {
            Lowering::Im2col => false,
            Lowering::Implicit => true,
            Lowering::Auto => k * cout_g > IMPLICIT_MIN_WEIGHTS,
        };
        let row_tile = if implicit {
            IMPLICIT_ROW_TILE
        } else {
            ROW_TILE
        };
        // Even tiles: A0's last layer at batch 4 has 196 rows, which were one tile of 192 and
        // one of 4, the second reading a whole weight slice for 4 rows.
        let mut row_tiles = rows.div_ceil(row_tile);
        // Few rows (late layers, batch 1): split the output channels too.
        // Enough tasks that uneven ones even out across threads (a 5-task layer on 2 threads
        // idles one of them 40% of the time).
        let wanted = 4 * threads;
        let mut col_splits = if row_tiles >= wanted {
            1
        } else {
            wanted
                .div_ceil(row_tiles)
                .min((cout_g / MIN_COL_TILE).max(1))
        };
        if implicit {
            // Column slices of at most half of L2 in weights, so that each stays there.
            let col = (implicit_slice_floats() / k / NR * NR).max(NR);
            col_splits = col_splits.max(cout_g.div_ceil(col));
        }
        // Whole micro-kernel panels per task.
        let mut col_tile = cout_g.div_ceil(col_splits).next_multiple_of(NR);
        let mut col_splits = cout_g.div_ceil(col_tile);
        // Few tasks in a count the threads cannot share evenly idle one thread for the last
        // (A0 at batch 1: stage 4's opening block in 9 column slices, stage 2's in 9 row
        // tiles, on 2 threads): more column slices where the panels allow, else more rows.
        let uneven = |tasks: usize| !tasks.is_multiple_of(threads) && tasks < 16 * threads;
        if uneven(row_tiles * self.groups * col_splits) {
            let even_cols = (col_splits..=cout_g.div_ceil(NR))
                .map(|splits| cout_g.div_ceil(splits).next_multiple_of(NR))
                .find(|&tile| !uneven(row_tiles * self.groups * cout_g.div_ceil(tile)));
            match even_cols {
                Some(tile) if col_splits > 1 => {
                    col_tile = tile;
                    col_splits = cout_g.div_ceil(tile);
                }
                _ => row_tiles = row_tiles.next_multiple_of(threads).min(rows),
            }
        }
        let row_tile = rows.div_ceil(row_tiles.max(1)).max(1);
        let row_tiles = rows.div_ceil(row_tile);
        let out = OutPtr(output.as_mut_ptr());
        let fuse_relu = self.se.is_none();
        run_tasks(row_tiles * col_splits * self.groups, parallel, |task| {
            let (rest, col_block) = (task / col_splits, task % col_splits);
            let (row_tile_index, group) = (rest / self.groups, rest % self.groups);
            let first = row_tile_index * row_tile;
            let count = row_tile.min(rows - first);
            let cols = col_block * col_tile..((col_block + 1) * col_tile).min(cout_g);
            let task = RowTask {
                input,
                h,
                w,
                oh,
                ow,
                first,
                count,
                group,
                cols,
                out: out.get(),
                relu: fuse_relu,
            };
            // SAFETY: tasks write disjoint (rows, group columns) blocks of `output`.
            unsafe {
                if implicit {
                    self.implicit_tile(&task)
                } else {
                    self.tile(&task)
                }
            };
        });
        self.finish_se(output, n, oh, ow, parallel);
    }

    /// The transform for a call with `n` images and an `oh x ow` output map, if any.
    fn winograd_tile(&self, n: usize, oh: usize, ow: usize) -> Option<WinogradTile> {
        // Whether `tile`'s transformed filters are small enough for the call's tiles.
        let filters_pay = |tile: WinogradTile| {
            let tiles = winograd::tile_count(tile, n, oh, ow);
            let bytes = tile.points() * self.in_channels * self.out_channels / self.groups * 4;
            bytes <= F4_MAX_FILTER_BYTES_PER_TILE * tiles
        };
        let wide = self.in_channels / self.groups >= WINOGRAD_MIN_CHANNELS;
        let big = oh.min(ow) >= F4_MIN_SIDE;
        match (self.stride, self.winograd_choice) {
            (_, Winograd::Off) => None,
            (1, Winograd::F2) => Some(WinogradTile::F2),
            (1, Winograd::F4) => Some(WinogradTile::F4),
            (1, Winograd::Auto) if !wide => None,
            (1, Winograd::Auto) if big && filters_pay(WinogradTile::F4) => Some(WinogradTile::F4),
            (1, Winograd::Auto) => Some(WinogradTile::F2),
            (2, Winograd::F2 | Winograd::F4) => Some(WinogradTile::Stride2F2),
            (2, Winograd::Auto)
                if self.in_channels / self.groups >= STRIDE2_WINOGRAD_MIN_CHANNELS
                    && big
                    && filters_pay(WinogradTile::Stride2F2) =>
            {
                Some(WinogradTile::Stride2F2)
            }
            _ => None,
        }
    }

    /// The transformed filters, made from the packed weights the first time they are needed.
    fn winograd_filters(&self, tile: WinogradTile) -> &[PackedB] {
        self.winograd[tile as usize].get_or_init(|| winograd::transform_filters(tile, &self.packed))
    }

    /// SE sits between the convolution and the ReLU, and needs the whole map first.
    fn finish_se(&self, output: &mut [f32], n: usize, oh: usize, ow: usize, parallel: bool) {
        if let Some(se) = &self.se {
            let c = self.out_channels;
            if !parallel {
                for image in output[..n * oh * ow * c].chunks_mut(oh * ow * c) {
                    se.apply(image, c);
                }
                return;
            }
            output[..n * oh * ow * c]
                .par_chunks_mut(oh * ow * c)
                .for_each(|image| {
                    se.apply(image, c);
                });
        }
    }

    /// Where each of the task's output positions starts reading: its image's first input row,
    /// and the row and column of its top-left tap (negative in the padding). Stepped along
    /// the rows rather than divided out per position: for the RGB stem, whose positions have
    /// only 27 products each, three divisions per position were a sizeable share.
    fn origins<'t>(
        &self,
        task: &'t RowTask<'_>,
    ) -> impl Iterator<Item = (usize, isize, isize)> + 't {
        let (oh, ow) = (task.oh, task.ow);
        let first = task.first;
        let (mut image, mut y, mut x) = (first / (oh * ow), (first / ow) % oh, first % ow);
        let (s, d) = (self.stride, self.dilation as isize);
        (0..task.count).map(move |_| {
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
    fn tap_offset(
        &self,
        task: &RowTask<'_>,
        (row0, y, x): (usize, isize, isize),
        ky: usize,
        kx: usize,
    ) -> Option<usize> {
        let d = self.dilation as isize;
        let (iy, ix) = (y + ky as isize * d, x + kx as isize * d);
        let inside = iy >= 0 && ix >= 0 && iy < task.h as isize && ix < task.w as isize;
        let cin_g = self.in_channels / self.groups;
        inside.then(|| {
            ((row0 + iy as usize) * task.w + ix as usize) * self.in_channels + task.group * cin_g
        })
    }

    /// Computes the task's output rows as nine products (one per tap) accumulated in place,
    /// each reading its rows straight from the NHWC input: no im2col copy. Padding rows read a
    /// row of zeros.
    unsafe fn implicit_tile(&self, task: &RowTask<'_>) {
        let cin_g = self.in_channels / self.groups;
        let cout_g = self.out_channels / self.groups;
        let group = task.group;
        let bias = &self.bias[group * cout_g..(group + 1) * cout_g];
        ORIGINS.with(|origins| {
            let mut origins = origins.borrow_mut();
            origins.clear();
            origins.extend(self.origins(task));
            for tap in 0..9 {
                let a_row = |r: usize| match self.tap_offset(task, origins[r], tap / 3, tap % 3) {
                    // SAFETY: a tap inside the map has cin_g values of this group.
                    Some(at) => unsafe { task.input.as_ptr().add(at) },
                    None => self.zeros.as_ptr(),
                };
                let init = if tap == 0 {
                    kernel::Init::Bias(bias)
                } else {
                    kernel::Init::Accumulate
                };
                // SAFETY: every row pointer covers cin_g values; the caller owns these outputs.
                unsafe {
                    kernel::gemm_rows(
                        task.count,
                        a_row,
                        &self.packed[group],
                        tap * cin_g..(tap + 1) * cin_g,
                        task.cols.clone(),
                        task.output_block(self.out_channels, cout_g),
                        self.out_channels,
                        init,
                        task.relu && tap == 8,
                    )
                };
            }
        });
    }

    /// Computes the task's output rows through im2col: patches copied into rows, one product.
    unsafe fn tile(&self, task: &RowTask<'_>) {
        let cin = self.in_channels;
        let cin_g = cin / self.groups;
        let cout_g = self.out_channels / self.groups;
        let k = 9 * cin_g;
        let count = task.count;
        PATCHES.with(|patches| {
            let mut patches = patches.borrow_mut();
            if patches.len() < count * k {
                patches.resize(count * k, 0.0);
            }
            let patches = &mut patches[..count * k];
            // Without groups or dilation, the three taps of a patch row inside the map are one
            // contiguous run of the NHWC input.
            let runs = self.groups == 1 && self.dilation == 1;
            let (h, w) = (task.h as isize, task.w as isize);
            let (input, run_len) = (task.input, 3 * cin);
            // im2col: row r holds the 3x3 patch of output position first + r, tap-major.
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
            let group = task.group;
            let bias = &self.bias[group * cout_g..(group + 1) * cout_g];
            // SAFETY: the patches are `count` rows of k values; the caller owns these outputs.
            unsafe {
                kernel::gemm(
                    count,
                    patches.as_ptr(),
                    k,
                    &self.packed[group],
                    task.cols.clone(),
                    task.output_block(self.out_channels, cout_g),
                    self.out_channels,
                    Some(bias),
                    task.relu,
                )
            };
        });
    }
}

impl SqueezeExcite {
    /// Scales one NHWC image's channels by `sigmoid(up(relu(down(mean))))`, then applies the
    /// block's ReLU (SE sits between the convolution and the ReLU).
    fn apply(&self, image: &mut [f32], c: usize) {
        SE_SCRATCH.with(|scratch| {
            let (pooled, hidden, gate) = &mut *scratch.borrow_mut();
            pooled.resize(c, 0.0);
            channel_means_into(image, pooled);
            hidden.clear();
            hidden.extend((0..self.hidden).map(|j| {
                (self.down_bias[j] + dot(&self.down[j * c..(j + 1) * c], pooled)).max(0.0)
            }));
            gate.clear();
            gate.extend((0..c).map(|i| {
                let z =
                    self.up_bias[i] + dot(&self.up[i * self.hidden..(i + 1) * self.hidden], hidden);
                1.0 / (1.0 + (-z).exp())
            }));
            // Scale, then the block's ReLU, in one pass.
            for pixel in image.chunks_exact_mut(c) {
                pixel
                    .iter_mut()
                    .zip(gate.iter())
                    .for_each(|(v, g)| *v = (*v * g).max(0.0));
            }
        });
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

/// Runs `f(0..count)` on the pool, or in order on this thread.
fn run_tasks(count: usize, parallel: bool, f: impl Fn(usize) + Sync + Send) {
    if parallel {
        (0..count).into_par_iter().for_each(f);
    } else {
        (0..count).for_each(f);
    }
}

/// OIHW kernel -> per group a `(ky, kx, c) x out` matrix, so a row of patches meets a column
/// of weights in the same order.
fn pack_kernel(weight: &[f32], cout: usize, cin_g: usize, groups: usize) -> Vec<PackedB> {
    let cout_g = cout / groups;
    (0..groups)
        .map(|group| {
            PackedB::new(9 * cin_g, cout_g, |row, oc| {
                let (tap, c) = (row / cin_g, row % cin_g);
                weight[((group * cout_g + oc) * cin_g + c) * 9 + tap]
            })
        })
        .collect()
}

fn nchw_to_nhwc(input: &[f32], n: usize, c: usize, h: usize, w: usize, out: &mut Vec<f32>) {
    if out.len() < n * c * h * w {
        out.resize(n * c * h * w, 0.0);
    }
    // Pixel by pixel, so that the output is written once, in order (channel by channel, an
    // RGB image's output was rewritten three times, at a stride of three values).
    let plane = h * w;
    for (image, pixels) in out[..n * c * plane].chunks_exact_mut(c * plane).enumerate() {
        let planes = &input[image * c * plane..(image + 1) * c * plane];
        for (p, pixel) in pixels.chunks_exact_mut(c).enumerate() {
            for (ch, value) in pixel.iter_mut().enumerate() {
                *value = planes[ch * plane + p];
            }
        }
    }
}

/// NHWC block output -> NCHW, for callers that compare with framework tensors.
pub fn nhwc_to_nchw(data: &[f32], n: usize, h: usize, w: usize) -> Vec<f32> {
    let c = data.len().checked_div(n * h * w).unwrap_or(0);
    let mut out = vec![0.0; data.len()];
    for image in 0..n {
        for p in 0..h * w {
            for ch in 0..c {
                out[(image * c + ch) * h * w + p] = data[(image * h * w + p) * c + ch];
            }
        }
    }
    out
}

/// Per-channel means of one NHWC image, into `means` (one per channel).
fn channel_means_into(image: &[f32], means: &mut [f32]) {
    let c = means.len();
    let positions = image.len() / c;
    means.fill(0.0);
    for pixel in image.chunks_exact(c) {
        means.iter_mut().zip(pixel).for_each(|(s, v)| *s += v);
    }
    means.iter_mut().for_each(|s| *s /= positions as f32);
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
