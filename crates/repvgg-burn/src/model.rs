//! RepVGG in its two forms, built from checkpoints and exported back to them.

use burn::module::{Module, Param};
use burn::nn::conv::Conv2d;
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};

use repvgg_arch::{ArchSpec, BlockSpec, Form};
use repvgg_checkpoint::layout::{
    self, DENSE_BN, DENSE_CONV, HEAD, IDENTITY_BN, ONE_BN, ONE_CONV, QA_ONE_CONV, QA_POST_BN,
    REPARAM, SE_DOWN, SE_UP,
};
use repvgg_checkpoint::{Checkpoint, StateDict};

use crate::layers::{
    BatchNorm2d, Head, SqueezeExcite, conv2d, dilated_conv2d, from_device, global_pool, to_device,
};
use crate::training_ops;

/// Reads official-named tensors of a checked checkpoint onto a device.
struct Reader<'a> {
    tensors: &'a StateDict,
    device: &'a Device,
}

impl Reader<'_> {
    fn get<const D: usize>(&self, key: &str) -> Tensor<D> {
        // Checkpoint::load has verified every key and shape against the spec.
        to_device(&self.tensors[key], self.device)
    }

    fn bn(&self, prefix: &str, eps: f64) -> BatchNorm2d {
        BatchNorm2d::new(
            self.get(&format!("{prefix}weight")),
            self.get(&format!("{prefix}bias")),
            self.get(&format!("{prefix}running_mean")),
            self.get(&format!("{prefix}running_var")),
            eps,
        )
    }

    fn se(&self, p: &str, block: &BlockSpec) -> Option<SqueezeExcite> {
        block.se_channels.map(|_| {
            let conv = |part: &str| {
                conv2d(
                    self.get(&format!("{p}{part}weight")),
                    Some(self.get(&format!("{p}{part}bias"))),
                    1,
                    0,
                    1,
                )
            };
            SqueezeExcite {
                down: conv(SE_DOWN),
                up: conv(SE_UP),
            }
        })
    }

    /// The classifier; `None` for a headless backbone.
    fn head(&self) -> Option<Head> {
        self.tensors
            .contains_key(&format!("{HEAD}weight"))
            .then(|| Head {
                weight: Param::from_tensor(self.get(&format!("{HEAD}weight"))),
                bias: Param::from_tensor(self.get(&format!("{HEAD}bias"))),
            })
    }
}

/// Collects a module's tensors back into official naming.
struct Writer(StateDict);

impl Writer {
    fn put<const D: usize>(&mut self, key: String, t: Tensor<D>) {
        self.0.insert(key, from_device(t));
    }

    fn conv(&mut self, prefix: &str, conv: &Conv2d) {
        self.put(format!("{prefix}weight"), conv.weight.val());
        if let Some(b) = &conv.bias {
            self.put(format!("{prefix}bias"), b.val());
        }
    }

    fn bn(&mut self, prefix: &str, bn: &BatchNorm2d) {
        self.put(format!("{prefix}weight"), bn.gamma.val());
        self.put(format!("{prefix}bias"), bn.beta.val());
        self.put(
            format!("{prefix}running_mean"),
            bn.running_mean.value_sync(),
        );
        self.put(format!("{prefix}running_var"), bn.running_var.value_sync());
    }

    fn se(&mut self, p: &str, se: &Option<SqueezeExcite>) {
        if let Some(se) = se {
            self.conv(&format!("{p}{SE_DOWN}"), &se.down);
            self.conv(&format!("{p}{SE_UP}"), &se.up);
        }
    }

    fn head(&mut self, head: &Option<Head>) {
        if let Some(head) = head {
            self.put(format!("{HEAD}weight"), head.weight.val());
            self.put(format!("{HEAD}bias"), head.bias.val());
        }
    }
}

/// A block's official name from its position (modules hold only numbers).
fn block_name(stage: usize, index: usize) -> String {
    if stage == 0 {
        "stage0".into()
    } else {
        format!("stage{stage}.{index}")
    }
}

/// What the two forms' blocks share, so one loop runs either network.
trait Block {
    fn forward(&self, x: Tensor<4>) -> Tensor<4>;
    fn position(&self) -> (usize, usize);
}

impl Block for TrainBlock {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        TrainBlock::forward(self, x)
    }
    fn position(&self) -> (usize, usize) {
        (self.stage, self.index)
    }
}

impl Block for DeployBlock {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        DeployBlock::forward(self, x)
    }
    fn position(&self) -> (usize, usize) {
        (self.stage, self.index)
    }
}

/// Blocks in order, then the head (or, headless, the global pool); with `features`, each
/// block's output by official name.
fn run_blocks<B: Block>(
    blocks: &[B],
    head: &Option<Head>,
    mut x: Tensor<4>,
    mut features: Option<&mut Vec<(String, Tensor<4>)>>,
) -> Tensor<2> {
    for b in blocks {
        x = b.forward(x);
        if let Some(features) = features.as_mut() {
            let (stage, index) = b.position();
            features.push((block_name(stage, index), x.clone()));
        }
    }
    match head {
        Some(head) => head.forward(x),
        None => global_pool(x),
    }
}

/// The outputs of stages `out_indices` (the last block of each), in stage order.
fn stage_outputs<B: Block>(
    blocks: &[B],
    mut x: Tensor<4>,
    out_indices: &[usize],
) -> Vec<(usize, Tensor<4>)> {
    let mut out = Vec::new();
    for (i, b) in blocks.iter().enumerate() {
        x = b.forward(x);
        let (stage, _) = b.position();
        let last = blocks
            .get(i + 1)
            .is_none_or(|next| next.position().0 != stage);
        if last && out_indices.contains(&stage) {
            out.push((stage, x.clone()));
        }
    }
    out
}

/// Training-form block: `ReLU(SE(BN(conv3x3 x) + BN(conv1x1 x) + BN(x)))`, or QARepVGG's
/// `ReLU(BN_post(BN(conv3x3 x) + conv1x1 x + x))` (no BN on the 1x1 or the identity).
#[derive(Module, Debug)]
pub struct TrainBlock {
    pub dense_conv: Conv2d,
    pub dense_bn: BatchNorm2d,
    pub one_conv: Conv2d,
    /// The 1x1 branch's BN; `None` in a QARepVGG block.
    pub one_bn: Option<BatchNorm2d>,
    /// The identity branch's BN (RepVGG).
    pub identity: Option<BatchNorm2d>,
    /// A QARepVGG block's identity: `x` itself.
    pub plain_identity: bool,
    /// A QARepVGG block's BN after the sum.
    pub post_bn: Option<BatchNorm2d>,
    pub se: Option<SqueezeExcite>,
    pub stage: usize,
    pub index: usize,
}

impl TrainBlock {
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let one = training_ops::conv2d(&self.one_conv, x.clone());
        let one = match &self.one_bn {
            Some(bn) => bn.forward(one),
            None => one,
        };
        let mut sum = self
            .dense_bn
            .forward(training_ops::conv2d(&self.dense_conv, x.clone()))
            + one;
        if let Some(identity) = &self.identity {
            sum = sum + identity.forward(x);
        } else if self.plain_identity {
            sum = sum + x;
        }
        if let Some(se) = &self.se {
            sum = se.forward(sum);
        }
        if let Some(post) = &self.post_bn {
            sum = post.forward(sum);
        }
        relu(sum)
    }
}

/// Deploy-form block: `ReLU(SE(conv3x3 x + b))`.
#[derive(Module, Debug)]
pub struct DeployBlock {
    pub conv: Conv2d,
    pub se: Option<SqueezeExcite>,
    /// QARepVGG with SE: the post-sum BN, after the gate.
    pub post_bn: Option<BatchNorm2d>,
    pub stage: usize,
    pub index: usize,
}

impl DeployBlock {
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut y = self.conv.forward(x);
        if let Some(se) = &self.se {
            y = se.forward(y);
        }
        if let Some(post) = &self.post_bn {
            y = post.forward(y);
        }
        relu(y)
    }
}

/// The multi-branch network that is trained.
#[derive(Module, Debug)]
pub struct RepVggTrain {
    pub blocks: Vec<TrainBlock>,
    pub head: Option<Head>,
}

/// The plain network that is deployed.
#[derive(Module, Debug)]
pub struct RepVggDeploy {
    pub blocks: Vec<DeployBlock>,
    pub head: Option<Head>,
}

impl RepVggTrain {
    /// Builds the model from training-form weights (official naming, already checked).
    pub fn from_state_dict(
        spec: &ArchSpec,
        tensors: &StateDict,
        bn_eps: f64,
        device: &Device,
    ) -> Self {
        let r = Reader { tensors, device };
        let blocks = spec
            .blocks()
            .iter()
            .map(|b| {
                let p = layout::prefix(b);
                TrainBlock {
                    dense_conv: dilated_conv2d(
                        r.get(&format!("{p}{DENSE_CONV}weight")),
                        None,
                        b.stride,
                        b.dilation,
                        b.dilation,
                        b.groups,
                    ),
                    dense_bn: r.bn(&format!("{p}{DENSE_BN}"), bn_eps),
                    one_conv: conv2d(
                        r.get(&format!(
                            "{p}{}weight",
                            if b.qa { QA_ONE_CONV } else { ONE_CONV }
                        )),
                        None,
                        b.stride,
                        0,
                        b.groups,
                    ),
                    one_bn: (!b.qa).then(|| r.bn(&format!("{p}{ONE_BN}"), bn_eps)),
                    identity: (b.has_identity && !b.qa)
                        .then(|| r.bn(&format!("{p}{IDENTITY_BN}"), bn_eps)),
                    plain_identity: b.has_identity && b.qa,
                    post_bn: b.qa.then(|| r.bn(&format!("{p}{QA_POST_BN}"), bn_eps)),
                    se: r.se(&p, b),
                    stage: b.stage,
                    index: b.index,
                }
            })
            .collect();
        RepVggTrain {
            blocks,
            head: r.head(),
        }
    }

    /// The weights in official naming, running statistics included.
    pub fn state_dict(&self) -> StateDict {
        let mut w = Writer(StateDict::new());
        for b in &self.blocks {
            let p = format!("{}.", block_name(b.stage, b.index));
            w.conv(&format!("{p}{DENSE_CONV}"), &b.dense_conv);
            w.bn(&format!("{p}{DENSE_BN}"), &b.dense_bn);
            match &b.one_bn {
                Some(bn) => {
                    w.conv(&format!("{p}{ONE_CONV}"), &b.one_conv);
                    w.bn(&format!("{p}{ONE_BN}"), bn);
                }
                None => w.conv(&format!("{p}{QA_ONE_CONV}"), &b.one_conv),
            }
            if let Some(id) = &b.identity {
                w.bn(&format!("{p}{IDENTITY_BN}"), id);
            }
            if let Some(post) = &b.post_bn {
                w.bn(&format!("{p}{QA_POST_BN}"), post);
            }
            w.se(&p, &b.se);
        }
        w.head(&self.head);
        w.0
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        run_blocks(&self.blocks, &self.head, x, None)
    }

    /// Logits and every block's output, by official block name.
    pub fn forward_with_features(&self, x: Tensor<4>) -> (Tensor<2>, Vec<(String, Tensor<4>)>) {
        let mut features = Vec::with_capacity(self.blocks.len());
        let logits = run_blocks(&self.blocks, &self.head, x, Some(&mut features));
        (logits, features)
    }

    /// The feature maps at the end of stages `out_indices` (0..=4): backbone use.
    pub fn forward_stages(&self, x: Tensor<4>, out_indices: &[usize]) -> Vec<(usize, Tensor<4>)> {
        stage_outputs(&self.blocks, x, out_indices)
    }
}

impl RepVggDeploy {
    /// Builds the model from deploy-form weights (official naming, already checked).
    pub fn from_state_dict(spec: &ArchSpec, tensors: &StateDict, device: &Device) -> Self {
        let r = Reader { tensors, device };
        let blocks = spec
            .blocks()
            .iter()
            .map(|b| {
                let p = layout::prefix(b);
                DeployBlock {
                    conv: dilated_conv2d(
                        r.get(&format!("{p}{REPARAM}weight")),
                        Some(r.get(&format!("{p}{REPARAM}bias"))),
                        b.stride,
                        b.dilation,
                        b.dilation,
                        b.groups,
                    ),
                    se: r.se(&p, b),
                    // State dicts do not record eps: PyTorch's default, as the conversion's.
                    post_bn: (b.qa && b.se_channels.is_some()).then(|| {
                        r.bn(
                            &format!("{p}{QA_POST_BN}"),
                            repvgg_checkpoint::convert::DEFAULT_BN_EPS,
                        )
                    }),
                    stage: b.stage,
                    index: b.index,
                }
            })
            .collect();
        RepVggDeploy {
            blocks,
            head: r.head(),
        }
    }

    pub fn state_dict(&self) -> StateDict {
        let mut w = Writer(StateDict::new());
        for b in &self.blocks {
            let p = format!("{}.", block_name(b.stage, b.index));
            w.conv(&format!("{p}{REPARAM}"), &b.conv);
            w.se(&p, &b.se);
            if let Some(post) = &b.post_bn {
                w.bn(&format!("{p}{QA_POST_BN}"), post);
            }
        }
        w.head(&self.head);
        w.0
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        run_blocks(&self.blocks, &self.head, x, None)
    }

    /// Logits and every block's output, by official block name.
    pub fn forward_with_features(&self, x: Tensor<4>) -> (Tensor<2>, Vec<(String, Tensor<4>)>) {
        let mut features = Vec::with_capacity(self.blocks.len());
        let logits = run_blocks(&self.blocks, &self.head, x, Some(&mut features));
        (logits, features)
    }

    /// The feature maps at the end of stages `out_indices` (0..=4): backbone use.
    pub fn forward_stages(&self, x: Tensor<4>, out_indices: &[usize]) -> Vec<(usize, Tensor<4>)> {
        stage_outputs(&self.blocks, x, out_indices)
    }
}

/// Either form, as loaded from a checkpoint.
#[derive(Debug)]
pub enum RepVgg {
    Train(RepVggTrain),
    Deploy(RepVggDeploy),
}

impl RepVgg {
    /// The model in the checkpoint's own form. `bn_eps` applies to training-form checkpoints.
    pub fn from_checkpoint(ckpt: &Checkpoint, bn_eps: f64, device: &Device) -> Self {
        match ckpt.form {
            Form::Train => RepVgg::Train(RepVggTrain::from_state_dict(
                &ckpt.spec,
                &ckpt.tensors,
                bn_eps,
                device,
            )),
            Form::Deploy => RepVgg::Deploy(RepVggDeploy::from_state_dict(
                &ckpt.spec,
                &ckpt.tensors,
                device,
            )),
        }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        match self {
            RepVgg::Train(m) => m.forward(x),
            RepVgg::Deploy(m) => m.forward(x),
        }
    }

    pub fn forward_with_features(&self, x: Tensor<4>) -> (Tensor<2>, Vec<(String, Tensor<4>)>) {
        match self {
            RepVgg::Train(m) => m.forward_with_features(x),
            RepVgg::Deploy(m) => m.forward_with_features(x),
        }
    }

    pub fn forward_stages(&self, x: Tensor<4>, out_indices: &[usize]) -> Vec<(usize, Tensor<4>)> {
        match self {
            RepVgg::Train(m) => m.forward_stages(x, out_indices),
            RepVgg::Deploy(m) => m.forward_stages(x, out_indices),
        }
    }
}
