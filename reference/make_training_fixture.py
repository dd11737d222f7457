#!/usr/bin/env python3
"""Generate fixtures/tiny/train_step.{safetensors,json}: two SGD steps of the training-form
(multi-branch) `tiny` RepVGG, and the official custom L2 term, all in float64.

Run from the repository root, inside the reference venv, after reference/make_fixtures.py:

    .venv-ref/bin/python reference/make_training_fixture.py

It starts from fixtures/tiny/train_official.safetensors (written by make_fixtures.py), so a port can
start from the same file.  Only the official package (`repvgg_pytorch.repvgg`) is imported for the
model and its `RepVGGBlock.get_custom_L2`; nothing of it is copied here.  Every tensor written is
float64 and named with the official state_dict names (`stage1.0.rbr_dense.conv.weight`,
`stage1.1.rbr_identity.weight`, `linear.weight`, ...).  See fixtures/README.md and the json.
"""

from __future__ import annotations

import collections
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (build_official, CONFIGS, versions, official_blocks)

REPO = mf.REPO
CFG = next(c for c in mf.CONFIGS if c["name"] == "tiny")
DIR = REPO / "fixtures" / "tiny"
WEIGHTS = DIR / "train_official.safetensors"
OUT_ST = DIR / "train_step.safetensors"
OUT_JSON = DIR / "train_step.json"

BATCH = 4
INPUT_SEED = 777
LABELS = [3, 0, 9, 3]
LABEL_SMOOTHING = 0.1
LR = 0.1
MOMENTUM = 0.9
DAMPENING = 0.0
NESTEROV = False
WEIGHT_DECAY = 1e-4


def load_model() -> torch.nn.Module:
    """Official training-form tiny model, float64, weights from train_official.safetensors."""
    sd = load_file(str(WEIGHTS))
    sd64 = collections.OrderedDict(
        (k, v if k.endswith("num_batches_tracked") else v.double()) for k, v in sd.items())
    model = mf.build_official(CFG).double()
    model.load_state_dict(sd64, strict=True)
    return model


def decayed(name: str) -> bool:
    """The rule of the brief = the old official train.py `sgd_optimizer` (use_custwd=False)."""
    return "bias" not in name and "bn" not in name


def decayed_new_official(name: str, p: torch.Tensor) -> bool:
    """The newer official train/optimizer.py `set_weight_decay` (no skip lists), for the cross-check."""
    if "identity.weight" in name:
        return True
    return not (p.dim() == 1 or name.endswith(".bias"))


def make_optimizer(model) -> tuple:
    named = list(model.named_parameters())
    dec = [n for n, _ in named if decayed(n)]
    nodec = [n for n, _ in named if not decayed(n)]
    assert dec == [n for n, p in named if decayed_new_official(n, p)], "the two official rules differ here"
    params = dict(named)
    opt = torch.optim.SGD(
        [{"params": [params[n] for n in dec], "weight_decay": WEIGHT_DECAY},
         {"params": [params[n] for n in nodec], "weight_decay": 0.0}],
        lr=LR, momentum=MOMENTUM, dampening=DAMPENING, nesterov=NESTEROV, weight_decay=0.0)
    return opt, dec, nodec


def running_stats(model) -> collections.OrderedDict:
    return collections.OrderedDict(
        (k, v.detach().clone()) for k, v in model.state_dict().items()
        if k.endswith("running_mean") or k.endswith("running_var"))


def params_of(model) -> collections.OrderedDict:
    return collections.OrderedDict((n, p.detach().clone()) for n, p in model.named_parameters())


def main() -> int:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    out = collections.OrderedDict()

    # ---- sanity: the loaded fp64 model reproduces make_fixtures' eval-mode fp64 logits
    io_ = load_file(str(DIR / "io.safetensors"))
    with torch.no_grad():
        chk = load_model().eval()(io_["input"].double())
    load_check = float((chk - io_["logits_train_f64"]).abs().max())
    assert load_check < 1e-12, load_check

    # ---- model, batch, optimizer
    model = load_model().train()
    p_init = params_of(model)
    x = torch.randn((BATCH, 3, 32, 32), generator=torch.Generator().manual_seed(INPUT_SEED),
                    dtype=torch.float64)
    y = torch.tensor(LABELS)
    out["input"] = x
    out["labels"] = y.double()
    opt, dec, nodec = make_optimizer(model)

    # ---- step 1
    opt.zero_grad()
    logits0 = model(x)
    loss0 = F.cross_entropy(logits0, y, label_smoothing=LABEL_SMOOTHING)
    loss0.backward()
    out["loss0"] = loss0.detach().reshape(1)
    out["logits0"] = logits0.detach()
    grads0 = collections.OrderedDict((n, p.grad.detach().clone()) for n, p in model.named_parameters())
    for n, g in grads0.items():
        out[f"grad.{n}"] = g
    opt.step()
    p_step1 = params_of(model)
    for n, v in p_step1.items():
        out[f"step1.{n}"] = v
    for k, v in running_stats(model).items():
        out[f"step1.{k}"] = v

    # ---- step 2 (same batch, train mode; momentum buffers from step 1)
    opt.zero_grad()
    logits1 = model(x)
    loss1 = F.cross_entropy(logits1, y, label_smoothing=LABEL_SMOOTHING)
    loss1.backward()
    grads1 = collections.OrderedDict((n, p.grad.detach().clone()) for n, p in model.named_parameters())
    out["loss1"] = loss1.detach().reshape(1)
    opt.step()
    p_step2 = params_of(model)
    for n, v in p_step2.items():
        out[f"step2.{n}"] = v
    for k, v in running_stats(model).items():
        out[f"step2.{k}"] = v

    # ---- cross-check torch's SGD against the written-out update rule
    sgd_check = 0.0
    for n in p_init:
        wd = WEIGHT_DECAY if n in dec else 0.0
        d0 = grads0[n] + wd * p_init[n]
        buf = d0.clone()                                   # first step: buf = d (no dampening)
        e1 = p_init[n] - LR * buf
        d1 = grads1[n] + wd * p_step1[n]
        buf = MOMENTUM * buf + (1 - DAMPENING) * d1
        e2 = p_step1[n] - LR * buf
        sgd_check = max(sgd_check, float((e1 - p_step1[n]).abs().max()), float((e2 - p_step2[n]).abs().max()))
    assert sgd_check < 1e-15, sgd_check

    # ---- custom L2, from the original weights (fresh model)
    fresh = load_model()
    blocks = [(bn, blk) for bn, blk in mf.official_blocks(fresh)]
    assert [m for m in fresh.modules() if hasattr(m, "get_custom_L2")] == [b for _, b in blocks]
    per_block = [blk.get_custom_L2() for _, blk in blocks]
    l2 = torch.stack(per_block).sum()
    names = [n for n, _ in fresh.named_parameters()]
    gl2 = torch.autograd.grad(l2, [p for _, p in fresh.named_parameters()], allow_unused=True)
    out["custom_l2"] = l2.detach().reshape(1)
    for (bn, _), v in zip(blocks, per_block):
        out[f"custom_l2_block.{bn}"] = v.detach().reshape(1)
    l2grad_names = []
    for n, g in zip(names, gl2):
        if g is not None and bool((g != 0).any()):
            out[f"l2grad.{n}"] = g.detach()
            l2grad_names.append(n)
    assert all(n.endswith("rbr_dense.conv.weight") or n.endswith("rbr_1x1.conv.weight") for n in l2grad_names)
    assert len(l2grad_names) == 2 * len(blocks)

    # ---- write
    out = collections.OrderedDict((k, v.contiguous()) for k, v in out.items())
    assert all(v.dtype == torch.float64 for v in out.values())
    save_file(out, str(OUT_ST), metadata={"format": "pt"})
    os.chmod(OUT_ST, 0o644)

    buffers = [k for k in model.state_dict() if k.endswith("running_mean") or k.endswith("running_var")]
    prefix_bytes = collections.Counter()
    for k, v in out.items():
        pre = k.split(".", 1)[0] if "." in k else k
        prefix_bytes[pre] += v.numel() * 8
    meta = {
        "name": "tiny train_step",
        "generator": "reference/make_training_fixture.py",
        "versions": mf.versions(),
        "spec": "fixtures/tiny/spec.json (stem 8, depths 2,2,2,1, widths 8,16,16,32, 10 classes, no groups, no SE)",
        "start_weights": "fixtures/tiny/train_official.safetensors, every float tensor cast to float64 "
                         "(num_batches_tracked loaded as is, int64; irrelevant since BN momentum is 0.1)",
        "load_check_max_abs_vs_io_logits_train_f64": load_check,
        "dtype": "every tensor in train_step.safetensors is float64 (labels too)",
        "batch": {
            "input": f"torch.randn(({BATCH}, 3, 32, 32), generator=torch.Generator().manual_seed({INPUT_SEED}), "
                     f"dtype=torch.float64)",
            "labels": LABELS,
        },
        "model_mode": "model.double().train() for both steps: BN uses batch statistics (biased variance "
                      "for normalisation) and updates running_mean/running_var with momentum 0.1 "
                      "(running_var from the unbiased batch variance, n/(n-1)); BN eps 1e-5",
        "loss": f"torch.nn.functional.cross_entropy(logits, labels, label_smoothing={LABEL_SMOOTHING}), mean over "
                f"the batch: per sample (1-eps)*(-log p[y]) + eps/K * sum_k(-log p[k]), eps={LABEL_SMOOTHING}, K=10",
        "optimizer": {
            "class": "torch.optim.SGD",
            "lr": LR, "momentum": MOMENTUM, "dampening": DAMPENING, "nesterov": NESTEROV,
            "weight_decay": WEIGHT_DECAY,
            "param_groups": "two: [decayed names] with weight_decay 1e-4, [the rest] with weight_decay 0; "
                            "the same lr for both",
            "decay_rule": "decay unless the name contains 'bias' or 'bn'",
            "update": "d = grad + wd*p; step 1: buf = d; later: buf = momentum*buf + (1-dampening)*d; "
                      "p -= lr*buf (checked against torch in the script: max abs diff %.1e)" % sgd_check,
            "official_code_notes": [
                "DingXiaoH/RepVGG train.py sgd_optimizer (use_custwd=False): weight_decay 0 for names containing "
                "'bias' or 'bn' (same decayed set as here), but it also gives names containing 'bias' lr = 2*lr "
                "(one group per parameter); NOT reproduced here: every parameter uses lr 0.1",
                "DingXiaoH/RepVGG train/optimizer.py set_weight_decay: 'identity.weight' decayed, 1-D or "
                "'.bias' not decayed, the rest decayed: the same decayed set for this model (asserted); "
                "that build_optimizer uses nesterov=True, NOT reproduced here (nesterov False)",
            ],
            "decayed": dec,
            "not_decayed": nodec,
        },
        "procedure": [
            "load model, model.train(), build the optimizer",
            "step 1: zero_grad; logits0 = model(input); loss0 = CE(logits0, labels); backward -> grad.<param>; "
            "optimizer.step() -> step1.<param>, step1.<bn buffer> (running stats after the first forward)",
            "step 2: zero_grad; forward the same batch with the step-1 parameters (train mode) -> loss1; "
            "backward; optimizer.step() (momentum buffers from step 1) -> step2.<param>, step2.<bn buffer>",
            "custom L2: a fresh model with the ORIGINAL loaded weights; custom_l2 = sum of "
            "RepVGGBlock.get_custom_L2() over all blocks; l2grad.<param> = d custom_l2 / d param",
        ],
        "custom_l2": {
            "source": "repvgg_pytorch.repvgg.RepVGGBlock.get_custom_L2 (repvgg-pytorch 1.0.1; the package has no "
                      "model-level get_custom_L2, so the script sums the block method over every module that has "
                      "it, as the official training code does: stage0, stage1.0, ..., stage4.0 = 8 blocks, "
                      "including stage0 and the stride-2 blocks; the identity BN plays no part)",
            "formula_per_block": "K3 = rbr_dense.conv.weight, K1 = rbr_1x1.conv.weight; "
                                 "t3 = (rbr_dense.bn.weight / sqrt(rbr_dense.bn.running_var + eps)).reshape(-1,1,1,1).detach(); "
                                 "t1 likewise from rbr_1x1.bn; eps = 1e-5; "
                                 "l2_circle = sum(K3**2) - sum(K3[:,:,1:2,1:2]**2); "
                                 "eq = K3[:,:,1:2,1:2]*t3 + K1*t1; l2_eq = sum(eq**2 / (t3**2 + t1**2)); "
                                 "block = l2_eq + l2_circle",
            "gradient": "t3/t1 are detached: only rbr_dense.conv.weight and rbr_1x1.conv.weight get gradients. "
                        "dK3 = 2*K3 off-centre; dK3[:,:,1,1] = 2*eq*t3/(t3^2+t1^2); dK1 = 2*eq*t1/(t3^2+t1^2)",
            "scaling": "custom_l2 is the raw sum; the official training code adds weight_decay * 0.5 * "
                       "block.get_custom_L2() per block to the loss (and then sets weight_decay 0 on "
                       "rbr_dense/rbr_1x1 parameters, use_custwd); neither is applied here",
            "value": float(l2.detach()),
            "per_block": {bn: float(v.detach()) for (bn, _), v in zip(blocks, per_block)},
            "l2grad_params": l2grad_names,
        },
        "values": {"loss0": float(loss0.detach()), "loss1": float(loss1.detach())},
        "keys": {
            "input": list(x.shape), "labels": [BATCH], "loss0": [1], "logits0": list(logits0.shape),
            "loss1": [1], "custom_l2": [1],
            "grad.<param>": "every parameter (named_parameters order below), shape of the parameter",
            "step1.<param>, step2.<param>": "every parameter after that step",
            "step1.<buffer>, step2.<buffer>": "every running_mean / running_var after that step's forward",
            "custom_l2_block.<block>": "[1], get_custom_L2() of one block",
            "l2grad.<param>": "only the parameters listed in custom_l2.l2grad_params",
        },
        "params": {n: list(p.shape) for n, p in model.named_parameters()},
        "buffers": buffers,
        "bytes_by_prefix": dict(prefix_bytes),
        "num_tensors": len(out),
    }
    OUT_JSON.write_text(json.dumps(meta, indent=2) + "\n")

    # ---- read back
    back = load_file(str(OUT_ST))
    assert set(back) == set(out) and all(torch.equal(back[k], out[k]) for k in out)
    print(f"loss0 {float(loss0.detach()):.6f}  loss1 {float(loss1.detach()):.6f}  custom_l2 {float(l2.detach()):.6f}")
    print(f"{len(out)} tensors, {OUT_ST.stat().st_size} bytes -> {OUT_ST.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
