//! SGD with momentum in PyTorch's semantics, with RepVGG's weight-decay groups.
//!
//! Written out rather than taken from burn's optimizer so that its state (one momentum buffer
//! per parameter) is keyed by the parameter's name: a checkpoint then resumes into a freshly
//! built model, whose parameter ids are new.

use std::collections::BTreeMap;

use burn::module::{Module, ModuleMapper, Param};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;

/// The update, per parameter `p` with gradient `g` (PyTorch's `torch.optim.SGD`, dampening 0):
/// `g += weight_decay * p` (decayed parameters only); `v = momentum * v + g` (`v = g` at the
/// first step); `p -= lr * (nesterov ? g + momentum * v : v)`.
#[derive(Clone, Debug)]
pub struct Sgd {
    pub momentum: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
    /// The equivalent-kernel L2 replaces plain decay on the 3x3 and 1x1 kernels.
    pub custom_l2: bool,
    /// Momentum buffers by parameter path (e.g. `blocks.3.dense_conv.weight`), flattened.
    pub velocity: BTreeMap<String, Tensor<1>>,
}

/// Whether plain weight decay applies, following the official training code: conv and linear
/// kernels are decayed; biases and the BN of the 3x3 and 1x1 branches are not; the identity
/// branch's BN weight is (its name has neither "bias" nor "bn" in the official code).
pub fn is_decayed(path: &str, custom_l2: bool) -> bool {
    let leaf = path.rsplit('.').next().unwrap_or(path);
    let owner = path.rsplit('.').nth(1).unwrap_or("");
    match (owner, leaf) {
        ("dense_conv" | "one_conv", "weight") => !custom_l2,
        (_, "weight") => true,
        ("identity", "gamma") => true,
        _ => false,
    }
}

impl Sgd {
    pub fn new(momentum: f64, nesterov: bool, weight_decay: f64, custom_l2: bool) -> Sgd {
        Sgd {
            momentum,
            nesterov,
            weight_decay,
            custom_l2,
            velocity: BTreeMap::new(),
        }
    }

    /// One step at learning rate `lr`; parameters without a gradient are left alone.
    pub fn step<M: Module>(&mut self, model: M, lr: f64, grads: GradientsParams) -> M {
        let mut mapper = StepMapper {
            sgd: self,
            grads,
            lr,
            path: Vec::new(),
        };
        model.map(&mut mapper)
    }
}

struct StepMapper<'a> {
    sgd: &'a mut Sgd,
    grads: GradientsParams,
    lr: f64,
    path: Vec<String>,
}

impl ModuleMapper for StepMapper<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(mut grad) = self.grads.remove::<D>(id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let path = self.path.join(".");
        let require_grad = tensor.is_require_grad();
        let value = tensor.inner();
        let sgd = &mut *self.sgd;
        if sgd.weight_decay != 0.0 && is_decayed(&path, sgd.custom_l2) {
            grad = grad + value.clone().mul_scalar(sgd.weight_decay);
        }
        let dims = grad.dims();
        let velocity = match sgd.velocity.remove(&path) {
            Some(v) => v.reshape(dims).mul_scalar(sgd.momentum) + grad.clone(),
            None => grad.clone(),
        };
        let update = if sgd.nesterov {
            grad + velocity.clone().mul_scalar(sgd.momentum)
        } else {
            velocity.clone()
        };
        sgd.velocity.insert(path, velocity.reshape([-1]));
        let mut updated = Tensor::from_inner(value - update.mul_scalar(self.lr));
        if require_grad {
            updated = updated.require_grad();
        }
        Param::from_mapped_value(id, updated, mapper)
    }
}
