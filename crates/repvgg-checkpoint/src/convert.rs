//! Training-form state dict -> deploy-form state dict, through [`repvgg_fuse`] in `f64`.

use rayon::prelude::*;
use repvgg_arch::{ArchSpec, BlockSpec};
use repvgg_fuse::{
    BatchNorm, ConvBias, Kernel, QaTrainBlock, TrainBlock, fuse_block, fuse_qa_block,
    fuse_qa_branches,
};

use crate::error::{CheckpointErrorKind, Problem};
use crate::layout::{
    self, BN_FIELDS, DENSE_BN, DENSE_CONV, HEAD, IDENTITY_BN, ONE_BN, ONE_CONV, QA_ONE_CONV,
    QA_POST_BN, REPARAM,
};
use crate::tensor::{StateDict, Tensor};

/// The eps of PyTorch's `BatchNorm2d` default, which RepVGG, timm and mmpretrain all use. State
/// dicts do not record eps, so models trained with another (YOLOv7's RepConv: 1e-3) must say so.
pub const DEFAULT_BN_EPS: f64 = 1e-5;

fn get<'a>(dict: &'a StateDict, key: &str) -> Result<&'a Tensor, Problem> {
    dict.get(key).ok_or_else(|| {
        Problem::new(
            CheckpointErrorKind::MissingKey,
            format!("missing key '{key}'"),
        )
        .about(key)
    })
}

fn kernel(dict: &StateDict, key: &str) -> Result<Kernel<f64>, Problem> {
    let t = get(dict, key)?;
    let [o, i, h, w] = t.shape[..] else {
        return Err(Problem::new(
            CheckpointErrorKind::ShapeMismatch,
            format!("'{key}' has shape {:?}, expected a 4-d kernel", t.shape),
        ));
    };
    Ok(Kernel {
        out_channels: o,
        in_per_group: i,
        height: h,
        width: w,
        data: t.to_f64(),
    })
}

fn batch_norm(dict: &StateDict, prefix: &str, eps: f64) -> Result<BatchNorm<f64>, Problem> {
    let [gamma, beta, running_mean, running_var] =
        BN_FIELDS.map(|field| get(dict, &format!("{prefix}{field}")).map(Tensor::to_f64));
    Ok(BatchNorm {
        gamma: gamma?,
        beta: beta?,
        running_mean: running_mean?,
        running_var: running_var?,
        eps,
    })
}

/// The eval-mode branches of one block, read from a training-form state dict.
pub fn train_block(
    dict: &StateDict,
    block: &BlockSpec,
    eps: f64,
) -> Result<TrainBlock<f64>, Problem> {
    let p = layout::prefix(block);
    Ok(TrainBlock {
        dense: (
            kernel(dict, &format!("{p}{DENSE_CONV}weight"))?,
            batch_norm(dict, &format!("{p}{DENSE_BN}"), eps)?,
        ),
        one_by_one: Some((
            kernel(dict, &format!("{p}{ONE_CONV}weight"))?,
            batch_norm(dict, &format!("{p}{ONE_BN}"), eps)?,
        )),
        identity: if block.has_identity {
            Some(batch_norm(dict, &format!("{p}{IDENTITY_BN}"), eps)?)
        } else {
            None
        },
        groups: block.groups,
    })
}

/// The eval-mode branches of one QARepVGG block, read from a training-form state dict.
pub fn qa_train_block(
    dict: &StateDict,
    block: &BlockSpec,
    eps: f64,
) -> Result<QaTrainBlock<f64>, Problem> {
    let p = layout::prefix(block);
    Ok(QaTrainBlock {
        dense: (
            kernel(dict, &format!("{p}{DENSE_CONV}weight"))?,
            batch_norm(dict, &format!("{p}{DENSE_BN}"), eps)?,
        ),
        one_by_one: kernel(dict, &format!("{p}{QA_ONE_CONV}weight"))?,
        identity: block.has_identity,
        post: batch_norm(dict, &format!("{p}{QA_POST_BN}"), eps)?,
        groups: block.groups,
    })
}

/// Folds a BN kept beside a deployed block's conv (YOLOv6's QARepVGG blocks deploy as
/// `BN(rbr_reparam(x))`) into the conv, in place: the deploy form is then the plain one.
/// Returns how many blocks had one.
pub fn fold_deployed_post_bn(dict: &mut StateDict, eps: f64) -> Result<usize, Problem> {
    // (Not where SE sits between the conv and the BN: QARepVGG with SE keeps it there.)
    let prefixes: Vec<String> = dict
        .keys()
        .filter_map(|k| k.strip_suffix(&format!("{REPARAM}weight")))
        .filter(|p| dict.contains_key(&format!("{p}{QA_POST_BN}weight")))
        .filter(|p| !dict.contains_key(&format!("{p}se.down.weight")))
        .map(String::from)
        .collect();
    for p in &prefixes {
        let conv = ConvBias {
            kernel: kernel(dict, &format!("{p}{REPARAM}weight"))?,
            bias: get(dict, &format!("{p}{REPARAM}bias"))?.to_f64(),
        };
        let bn = batch_norm(dict, &format!("{p}{QA_POST_BN}"), eps)?;
        // This runs before the shapes are checked against an architecture: the fold's own
        // preconditions are checked here.
        let k = &conv.kernel;
        let outputs = k.out_channels;
        let lengths = [
            conv.bias.len(),
            bn.gamma.len(),
            bn.beta.len(),
            bn.running_mean.len(),
            bn.running_var.len(),
        ];
        let unfit = if k.in_per_group == 0 || k.height == 0 || k.width == 0 {
            Some("with no values".to_string())
        } else if lengths.iter().any(|&l| l != outputs) {
            Some(format!(
                "but its bias and the BN after it have {lengths:?} values"
            ))
        } else {
            None
        };
        if let Some(why) = unfit {
            let key = format!("{p}{REPARAM}weight");
            return Err(Problem::new(
                CheckpointErrorKind::ShapeMismatch,
                format!("'{key}' has shape {:?}, {why}", k.shape()),
            )
            .about(key));
        }
        let folded = repvgg_fuse::fold_bn_after(conv, &bn);
        let to_f32 = |v: &[f64]| v.iter().map(|&x| x as f32).collect();
        dict.insert(
            format!("{p}{REPARAM}weight"),
            Tensor::new(folded.kernel.shape().to_vec(), to_f32(&folded.kernel.data)),
        );
        dict.insert(
            format!("{p}{REPARAM}bias"),
            Tensor::new(vec![folded.bias.len()], to_f32(&folded.bias)),
        );
        for field in BN_FIELDS {
            dict.remove(&format!("{p}{QA_POST_BN}{field}"));
        }
    }
    Ok(prefixes.len())
}

/// Fuses every block; SE and the head carry over unchanged. Expects official naming and a
/// state dict already checked against `spec`.
pub fn to_deploy(train: &StateDict, spec: &ArchSpec, eps: f64) -> Result<StateDict, Problem> {
    // Blocks are independent: fused side by side (B3's whole conversion took 3.7 s on one
    // core in the test profile).
    let fused = spec
        .blocks()
        .par_iter()
        .map(|block| {
            let fused = if block.qa && block.se_channels.is_some() {
                fuse_qa_branches(&qa_train_block(train, block, eps)?)
            } else if block.qa {
                fuse_qa_block(&qa_train_block(train, block, eps)?)
            } else {
                fuse_block(&train_block(train, block, eps)?)
            };
            let to_f32 = |v: &[f64]| v.iter().map(|&x| x as f32).collect();
            let p = layout::prefix(block);
            Ok([
                (
                    format!("{p}{REPARAM}weight"),
                    Tensor::new(fused.kernel.shape().to_vec(), to_f32(&fused.kernel.data)),
                ),
                (
                    format!("{p}{REPARAM}bias"),
                    Tensor::new(vec![fused.bias.len()], to_f32(&fused.bias)),
                ),
            ])
        })
        .collect::<Result<Vec<_>, Problem>>()?;
    let mut deploy: StateDict = fused.into_iter().flatten().collect();
    for (key, tensor) in train {
        let kept_bn = spec.qa && spec.se && key.contains(&format!(".{QA_POST_BN}"));
        if key.starts_with(HEAD) || key.contains(".se.") || kept_bn {
            deploy.insert(key.clone(), tensor.clone());
        }
    }
    Ok(deploy)
}
