//! The engine's front: building it from a checkpoint, and running a batch through its layers
//! and head.

use rayon::prelude::*;
use repvgg_arch::{ArchSpec, Form};
use repvgg_checkpoint::Checkpoint;
use repvgg_checkpoint::layout::{HEAD, REPARAM, SE_DOWN, SE_UP, prefix};
use repvgg_kernels::gemm::{self, PackedB, Product, strided};
use repvgg_kernels::{Isa, OutPtr, line_aligned};

use crate::error::{EngineError, check_input};
use crate::layer::{ConvLayer, run_tasks};
use crate::layout::{channel_means_into, nchw_to_nhwc, nhwc_to_nchw};
use crate::options::{EngineOptions, Mode};
use crate::plan::{self, Choices, Geometry};
use crate::se::SqueezeExcite;
use crate::tuning::PER_IMAGE_MAP_BYTES;
use crate::workspace::{Workspace, with_thread_workspace};
use crate::{LayerTiming, StageFeatures};

/// A deployed RepVGG ready to run.
pub struct Engine {
    spec: ArchSpec,
    options: EngineOptions,
    isa: Isa,
    choices: Choices,
    layers: Vec<ConvLayer>,
    /// The linear head's weight as a `(features, classes)` product operand, or `None` when
    /// headless.
    head_weight: Option<PackedB>,
    head_bias: Vec<f32>,
}

/// Called after every block with (block index, height, width, NHWC activations).
type BlockObserver<'a> = dyn FnMut(usize, usize, usize, &[f32]) + 'a;

impl Engine {
    /// Builds the engine from a checkpoint of either form (a training-form one is converted
    /// first, with `bn_eps`), with the default options.
    pub fn from_checkpoint(ckpt: &Checkpoint, bn_eps: f64) -> Result<Engine, EngineError> {
        Engine::with_options(ckpt, bn_eps, EngineOptions::default())
    }

    pub fn with_options(
        ckpt: &Checkpoint,
        bn_eps: f64,
        options: EngineOptions,
    ) -> Result<Engine, EngineError> {
        let isa = Isa::capped(options.isa)?;
        let deploy = ckpt.as_deploy(bn_eps)?;
        let t = |key: String| &deploy.tensors[&key];
        let layers = deploy
            .spec
            .blocks()
            .iter()
            .map(|b| {
                let p = prefix(b);
                let se = b.se_channels.map(|hidden| SqueezeExcite {
                    hidden,
                    down: t(format!("{p}{SE_DOWN}weight")).data.clone(),
                    down_bias: t(format!("{p}{SE_DOWN}bias")).data.clone(),
                    up: t(format!("{p}{SE_UP}weight")).data.clone(),
                    up_bias: t(format!("{p}{SE_UP}bias")).data.clone(),
                    // QARepVGG with SE: its post-sum BN, `gamma / sigma`, `beta - mu gamma /
                    // sigma`.
                    post: b.qa.then(|| {
                        let field = |f: &str| &t(format!("{p}bn.{f}")).data;
                        let scale: Vec<f32> = field("weight")
                            .iter()
                            .zip(field("running_var"))
                            .map(|(g, v)| (*g as f64 / (*v as f64 + bn_eps).sqrt()) as f32)
                            .collect();
                        let shift = field("bias")
                            .iter()
                            .zip(field("running_mean"))
                            .zip(&scale)
                            .map(|((b, m), s)| b - m * s)
                            .collect();
                        (scale, shift)
                    }),
                });
                let geometry = Geometry {
                    in_channels: b.in_channels,
                    out_channels: b.out_channels,
                    groups: b.groups,
                    stride: b.stride,
                    dilation: b.dilation,
                };
                let weight = &t(format!("{p}{REPARAM}weight")).data;
                let bias = t(format!("{p}{REPARAM}bias")).data.clone();
                ConvLayer::new(geometry, weight, bias, se)
            })
            .collect();
        let (classes, features) = (deploy.spec.num_classes, deploy.spec.feature_width());
        Ok(Engine {
            spec: deploy.spec.clone(),
            options,
            isa,
            choices: Choices::for_machine(options.winograd, options.lowering, isa),
            layers,
            head_weight: deploy
                .tensors
                .get(&format!("{HEAD}weight"))
                .map(|t| PackedB::new(features, classes, |c, k| t.data[k * features + c])),
            head_bias: deploy
                .tensors
                .get(&format!("{HEAD}bias"))
                .map_or_else(Vec::new, |t| t.data.clone()),
        })
    }

    pub fn spec(&self) -> &ArchSpec {
        &self.spec
    }

    /// The instruction set the kernels run with.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Logits `(n, classes)` for an NCHW batch (a headless model's pooled features).
    pub fn forward(
        &self,
        input: &[f32],
        n: usize,
        h: usize,
        w: usize,
        ws: &mut Workspace,
    ) -> Result<Vec<f32>, EngineError> {
        Ok(self.infer(input, n, h, w, ws)?.to_vec())
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
    ) -> Result<&'w [f32], EngineError> {
        check_input(input, n, self.spec.in_channels, h, w)?;
        let threads = rayon::current_num_threads();
        let by_image = match self.options.mode {
            Mode::Latency => false,
            Mode::Throughput => threads > 1 && n > 1,
            Mode::Auto => threads > 1 && n >= threads,
        };
        if !by_image {
            return Ok(self.run(input, n, h, w, ws, true, None));
        }
        // Throughput mode: each thread runs whole images through every layer, with no
        // synchronisation between layers, and writes their logits into its share of ours.
        let image = self.spec.in_channels * h * w;
        let per_thread = n.div_ceil(threads);
        let width = self.output_width();
        ws.logits.resize(n * width, 0.0);
        input
            .par_chunks(per_thread * image)
            .zip(ws.logits.par_chunks_mut(per_thread * width))
            .for_each(|(part, logits)| {
                with_thread_workspace(|tws| {
                    let images = part.len() / image;
                    logits.copy_from_slice(self.run(part, images, h, w, tws, false, None));
                })
            });
        Ok(&ws.logits)
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
    ) -> Result<Vec<StageFeatures>, EngineError> {
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
        })?;
        Ok(out)
    }

    /// Like [`Engine::forward`], calling `observer(block_index, h, w, nhwc)` after every
    /// block (latency mode: each layer split across threads).
    pub fn forward_with(
        &self,
        input: &[f32],
        n: usize,
        h: usize,
        w: usize,
        ws: &mut Workspace,
        mut observer: impl FnMut(usize, usize, usize, &[f32]),
    ) -> Result<Vec<f32>, EngineError> {
        check_input(input, n, self.spec.in_channels, h, w)?;
        Ok(self
            .run(input, n, h, w, ws, true, Some(&mut observer))
            .to_vec())
    }

    /// All layers and the head; `observer`, when given, sees every layer's whole-batch output.
    /// The input has passed [`check_input`].
    #[allow(clippy::too_many_arguments)]
    fn run<'w>(
        &self,
        input: &[f32],
        n: usize,
        h: usize,
        w: usize,
        ws: &'w mut Workspace,
        parallel: bool,
        mut observer: Option<&mut BlockObserver<'_>>,
    ) -> &'w [f32] {
        let c = self.spec.in_channels;
        // The leading layers whose maps are big (A0 at 224: the stem's output, 2.4 MB an
        // image) run image by image, so that one image's maps pass through the caches rather
        // than a batch's through memory; the rest take the whole batch.
        let leading = match observer {
            Some(_) => 0,
            None if n > 1 => self.big_map_layers(h, w),
            None => 0,
        };
        let (mut h, mut w, mut len) = (h, w, n * c * h * w);
        if leading > 0 {
            (h, w, len) = self.run_leading_by_image(input, n, h, w, leading, ws, parallel);
        } else {
            nchw_to_nhwc(input, c, h, w, line_aligned(&mut ws.a, len, 0.0));
        }
        for (i, layer) in self.layers.iter().enumerate().skip(leading) {
            let (oh, ow) = layer.output_size(h, w);
            let out_len = n * oh * ow * layer.geometry.out_channels;
            // Buffers only ever grow (zero-filled once), so a warm workspace costs nothing
            // here; maps start on cache lines, as the kernels' vectors of channels then do.
            if n > 0 {
                let src = line_aligned(&mut ws.a, len, 0.0);
                let dst = line_aligned(&mut ws.b, out_len, 0.0);
                layer.forward(self.isa, &self.choices, src, n, h, w, dst, parallel);
            }
            std::mem::swap(&mut ws.a, &mut ws.b);
            (h, w, len) = (oh, ow, out_len);
            if let Some(observer) = observer.as_mut() {
                observer(i, h, w, line_aligned(&mut ws.a, len, 0.0));
            }
        }
        let Workspace {
            a, pooled, logits, ..
        } = ws;
        self.head(
            line_aligned(a, len, 0.0),
            n,
            h * w,
            pooled,
            logits,
            parallel,
        )
    }

    /// Runs the first `leading` layers image by image, leaving the batch's output NHWC in
    /// `ws.a`; returns its height, width and length.
    #[allow(clippy::too_many_arguments)]
    fn run_leading_by_image(
        &self,
        input: &[f32],
        n: usize,
        h: usize,
        w: usize,
        leading: usize,
        ws: &mut Workspace,
        parallel: bool,
    ) -> (usize, usize, usize) {
        let c = self.spec.in_channels;
        let (oh, ow, channels) =
            self.layers[..leading]
                .iter()
                .fold((h, w, c), |(h, w, _), layer| {
                    let (oh, ow) = layer.output_size(h, w);
                    (oh, ow, layer.geometry.out_channels)
                });
        let out_len = oh * ow * channels;
        let Workspace {
            a,
            image_a,
            image_b,
            ..
        } = ws;
        for (image, out) in input
            .chunks_exact(c * h * w)
            .zip(line_aligned(a, n * out_len, 0.0).chunks_exact_mut(out_len))
        {
            nchw_to_nhwc(image, c, h, w, line_aligned(image_a, c * h * w, 0.0));
            let (mut ih, mut iw) = (h, w);
            for (i, layer) in self.layers[..leading].iter().enumerate() {
                let (lh, lw) = layer.output_size(ih, iw);
                let len = lh * lw * layer.geometry.out_channels;
                // The last leading layer writes its image's place in the batch.
                let dst = if i + 1 == leading {
                    &mut *out
                } else {
                    line_aligned(image_b, len, 0.0)
                };
                let src = line_aligned(image_a, ih * iw * layer.geometry.in_channels, 0.0);
                layer.forward(self.isa, &self.choices, src, 1, ih, iw, dst, parallel);
                std::mem::swap(image_a, image_b);
                (ih, iw) = (lh, lw);
            }
        }
        (oh, ow, n * out_len)
    }

    /// How many leading layers read or write more than [`PER_IMAGE_MAP_BYTES`] per image
    /// for an `h x w` input.
    fn big_map_layers(&self, h: usize, w: usize) -> usize {
        let (mut h, mut w, mut c) = (h, w, self.spec.in_channels);
        let mut count = 0;
        for layer in &self.layers {
            let (oh, ow) = layer.output_size(h, w);
            let out_channels = layer.geometry.out_channels;
            let biggest = (h * w * c).max(oh * ow * out_channels) * 4;
            if biggest <= PER_IMAGE_MAP_BYTES {
                break;
            }
            (h, w, c, count) = (oh, ow, out_channels, count + 1);
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
    ) -> Result<Vec<LayerTiming>, EngineError> {
        check_input(input, n, self.spec.in_channels, h, w)?;
        // Warm up exactly what is timed below: this workspace, latency mode.
        self.run(input, n, h, w, ws, true, Some(&mut |_, _, _, _| {}));
        let blocks = self.spec.blocks();
        let mut timings = Vec::with_capacity(self.layers.len());
        let (mut in_h, mut in_w) = (h, w);
        let mut last = std::time::Instant::now();
        let mut observe = |i: usize, oh: usize, ow: usize, _: &[f32]| {
            let seconds = last.elapsed().as_secs_f64();
            let (layer, block) = (&self.layers[i], &blocks[i]);
            let g = &layer.geometry;
            timings.push(LayerTiming {
                name: block.name(),
                seconds,
                macs: n as u64 * block.macs(Form::Deploy, in_h, in_w),
                stride: g.stride,
                groups: g.groups,
                shape: (g.in_channels, g.out_channels, oh, ow),
                method: layer.method(&self.choices, n, in_h, in_w, true),
            });
            (in_h, in_w) = (oh, ow);
            last = std::time::Instant::now();
        };
        self.run(input, n, h, w, ws, true, Some(&mut observe));
        Ok(timings)
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
        let threads = if parallel {
            rayon::current_num_threads()
        } else {
            1
        };
        let cols_per_task = plan::head_cols_per_task(classes, threads);
        let out = OutPtr(logits.as_mut_ptr());
        let pooled = &pooled[..];
        run_tasks(classes.div_ceil(cols_per_task), parallel, |task| {
            let cols = task * cols_per_task..((task + 1) * cols_per_task).min(classes);
            let product = Product::new(
                n,
                strided(pooled.as_ptr(), c),
                weight,
                out.get().wrapping_add(cols.start),
                classes,
            )
            .cols(cols)
            .bias(&self.head_bias);
            // SAFETY: `pooled` is (n, c) and `logits` (n, classes); tasks write disjoint
            // columns.
            unsafe { gemm::gemm(self.isa, &product) };
        });
        logits
    }
}
