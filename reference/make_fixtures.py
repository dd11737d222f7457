#!/usr/bin/env python3
"""Generate the reference fixtures for repvgg-rs.

Run from the repository root, inside the reference venv:

    .venv-ref/bin/python reference/make_fixtures.py

Everything here is seeded and deterministic. The script only *imports* the two
reference implementations; none of their code is copied into this repository:

  * the authors' RepVGG code, as packaged on PyPI (``repvgg-pytorch``,
    module ``repvgg_pytorch.repvgg``: ``RepVGG``, ``repvgg_model_convert``);
  * timm's ``timm.models.byobnet`` (``ByobNet``, ``ByoModelCfg``,
    ``_rep_vgg_bcfg``, the same helper timm uses for ``repvgg_a0`` ...) and
    ``timm.utils.reparameterize_model``.

For every config it builds the training-form model with the official code,
fills every parameter and BN statistic with seeded random values, loads the
same weights into the timm model through the official -> timm key mapping,
checks that both agree, converts both with their own conversion code and
writes the results into ``fixtures/<config>/``.  See ``fixtures/README.md``.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import io
import json
import os
import pickletools
import platform
import shutil
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save_file, load_file

import timm
from timm.models.byobnet import ByobNet, ByoModelCfg, ByoBlockCfg, _rep_vgg_bcfg
from timm.utils import reparameterize_model
from repvgg_pytorch import repvgg as official  # the authors' repvgg.py

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "fixtures"

# Tolerance for "official and timm agree" (brief: allclose 1e-5 in eval mode).
TOL_F32 = 1e-5
TOL_F64 = 1e-10

# Scale of conv / linear weights: std = gain / sqrt(fan_in), gain = cfg.get("weight_gain", 1.0).
# The SE gates (sigmoid, ~0.5) shrink activations block after block, so the SE config uses a larger
# gain to keep block outputs O(1) (std 0.4 .. 0.8) instead of decaying to ~0.06 by stage 4.
DEFAULT_WEIGHT_GAIN = 1.0

CONFIGS = [
    dict(name="tiny", stem_width=8, depths=[2, 2, 2, 1], widths=[8, 16, 16, 32],
         groups={}, se=False, num_classes=10, input_shape=[2, 3, 32, 32], seed=1001),
    dict(name="tiny_g2", stem_width=8, depths=[2, 2, 4, 1], widths=[8, 16, 16, 32],
         groups={2: 2, 4: 2, 6: 2, 8: 2}, se=False, num_classes=10, input_shape=[2, 3, 32, 32], seed=1002),
    dict(name="tiny_g4", stem_width=16, depths=[2, 2, 2, 1], widths=[16, 16, 16, 32],
         groups={2: 4, 4: 4, 6: 4}, se=False, num_classes=7, input_shape=[1, 3, 40, 40], seed=1003),
    dict(name="tiny_se", stem_width=16, depths=[1, 2, 2, 1], widths=[16, 16, 16, 32],
         groups={}, se=True, num_classes=10, input_shape=[2, 3, 32, 32], seed=1004, weight_gain=1.7),
    dict(name="tiny_nonsquare", stem_width=8, depths=[1, 3, 2, 1], widths=[8, 8, 16, 24],
         groups={}, se=False, num_classes=5, input_shape=[2, 3, 37, 53], seed=1005),
]

BASE_WIDTHS = (64, 128, 256, 512)  # official/timm: stage width = int(base * multiplier)


# --------------------------------------------------------------------------- helpers

def versions() -> dict:
    def v(dist):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "repvgg-pytorch": v("repvgg-pytorch"),
        "safetensors": v("safetensors"),
        "numpy": np.__version__,
    }


def diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    """max |a-b|, elementwise max |a-b|/|b| (b = reference), and max |b| for scale."""
    a = a.detach().double()
    b = b.detach().double()
    d = (a - b).abs()
    rel = d / b.abs().clamp_min(1e-12)
    return {
        "max_abs": float(d.max()),
        "max_rel": float(rel.max()),
        "ref_max_abs": float(b.abs().max()),
    }


def quiet():
    """The official RepVGGBlock prints a line per block on construction."""
    return contextlib.redirect_stdout(io.StringIO())


def official_multipliers(cfg) -> list:
    wm = [w / base for w, base in zip(cfg["widths"], BASE_WIDTHS)]
    # The official constructor derives widths as int(base * m) and the stem as min(64, int(64 * m0)).
    for w, base, m in zip(cfg["widths"], BASE_WIDTHS, wm):
        assert int(base * m) == w, (cfg["name"], w, base, m)
    assert min(64, int(64 * wm[0])) == cfg["stem_width"], "stem width not expressible officially"
    return wm


def build_official(cfg, deploy=False) -> official.RepVGG:
    with quiet():
        model = official.RepVGG(
            num_blocks=cfg["depths"],
            num_classes=cfg["num_classes"],
            width_multiplier=official_multipliers(cfg),
            override_groups_map=dict(cfg["groups"]) or None,
            deploy=deploy,
            use_se=cfg["se"],
        )
    return model


def official_blocks(model) -> list:
    """[(official block name, module)] in forward order."""
    out = [("stage0", model.stage0)]
    for i in range(1, 5):
        for j, blk in enumerate(getattr(model, f"stage{i}")):
            out.append((f"stage{i}.{j}", blk))
    return out


def timm_blocks(model) -> list:
    """Same order as official_blocks, official names."""
    out = [("stage0", model.stem)]
    for i, stage in enumerate(model.stages):
        for j, blk in enumerate(stage):
            out.append((f"stage{i + 1}.{j}", blk))
    return out


def official_layer_groups(cfg) -> dict:
    """official block name -> groups (official layer indexing: stage0 = 0, then counting on)."""
    res = {"stage0": 1}
    layer = 1
    for i, d in enumerate(cfg["depths"]):
        for j in range(d):
            res[f"stage{i + 1}.{j}"] = cfg["groups"].get(layer, 1)
            layer += 1
    return res


def build_timm(cfg, deploy=False) -> tuple:
    """Returns (model, group_rule) where group_rule says how the groups were expressed in timm."""
    want = official_layer_groups(cfg)
    gvals = set(cfg["groups"].values())
    assert len(gvals) <= 1, "timm's _rep_vgg_bcfg takes one group count"
    g = gvals.pop() if gvals else 0
    wf = tuple(w / base for w, base in zip(cfg["widths"], BASE_WIDTHS))
    # timm's own RepVGG helper: groups on odd block indices *within each stage*.
    blocks = _rep_vgg_bcfg(d=tuple(cfg["depths"]), wf=wf, groups=g)
    rule = "timm _rep_vgg_bcfg(groups=%d): odd block index inside each stage" % g if g else "none"

    def timm_groups_of(blocks_cfg):
        # Mirrors create_byob_stages + RepVggBlock: group_size = gs(out_chs, idx); groups = in_chs // group_size.
        res = {"stage0": 1}
        prev = cfg["stem_width"]
        for i, bc in enumerate(blocks_cfg):
            for j in range(bc.d):
                gs = bc.gs(bc.c, j) if callable(bc.gs) else bc.gs
                res[f"stage{i + 1}.{j}"] = 1 if not gs else prev // gs
                prev = bc.c
        return res

    if timm_groups_of(blocks) != want:
        # timm's "odd index inside each stage" rule differs from the official "even global layer index"
        # rule whenever an earlier stage has an odd depth.  Use an explicit per-layer group size instead.
        # timm computes groups = in_chs // group_size, and gs() only sees out_chs, so derive in_chs here.
        starts = np.cumsum([1] + list(cfg["depths"]))[:-1]
        stage_in = [cfg["stem_width"]] + list(cfg["widths"][:-1])

        def make_gs(stage_start, c_in, c_out):
            def gs(chs, idx):
                gg = cfg["groups"].get(int(stage_start) + idx, 1)
                return (c_in if idx == 0 else c_out) // gg if gg > 1 else 0
            return gs

        blocks = tuple(ByoBlockCfg(type="rep", d=d, c=c, gs=make_gs(s, ci, c))
                       for d, c, s, ci in zip(cfg["depths"], cfg["widths"], starts, stage_in))
        assert timm_groups_of(blocks) == want
        rule = "explicit per-layer group size (timm's odd-index rule differs from the official layer rule here)"

    mcfg = ByoModelCfg(
        blocks=blocks,
        stem_type="rep",  # stem = one RepVggBlock, stride 2 (stem_pool is ignored for 'rep')
        stem_chs=cfg["stem_width"],
        # timm's repvgg_d2se: SEModule(rd_ratio=1/16, rd_divisor=1); every RepVggBlock incl. the stem gets it.
        attn_layer="se" if cfg["se"] else None,
        attn_kwargs=dict(rd_ratio=0.0625, rd_divisor=1) if cfg["se"] else dict(),
    )
    model = ByobNet(mcfg, num_classes=cfg["num_classes"], in_chans=3)
    if deploy:
        model = reparameterize_model(model)
    # Cross-check the structure against the official model.
    for name, blk in timm_blocks(model):
        conv = blk.reparam_conv if blk.reparam_conv is not None else blk.conv_kxk.conv
        assert conv.groups == want[name], (cfg["name"], name, conv.groups, want[name])
    return model, rule


def official_to_timm_key(k: str) -> str:
    parts = k.split(".")
    if parts[0] == "stage0":
        rest, head = parts[1:], ["stem"]
    elif parts[0] in ("stage1", "stage2", "stage3", "stage4"):
        rest, head = parts[2:], ["stages", str(int(parts[0][-1]) - 1), parts[1]]
    elif parts[0] == "linear":
        return "head.fc." + ".".join(parts[1:])
    else:
        raise KeyError(k)
    sub = {
        "rbr_dense": "conv_kxk",
        "rbr_1x1": "conv_1x1",
        "rbr_identity": "identity",
        "rbr_reparam": "reparam_conv",
    }
    if rest[0] in sub:
        rest = [sub[rest[0]]] + rest[1:]
    elif rest[0] == "se":
        rest = ["attn", {"down": "fc1", "up": "fc2"}[rest[1]]] + rest[2:]
    else:
        raise KeyError(k)
    return ".".join(head + rest)


def to_timm_sd(sd: dict) -> collections.OrderedDict:
    return collections.OrderedDict((official_to_timm_key(k), v) for k, v in sd.items())


@torch.no_grad()
def randomize_(model: nn.Module, gen: torch.Generator, gain: float) -> None:
    """Seeded random values for every parameter and BN buffer (module order is deterministic)."""
    for _, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)            # U(0.5, 1.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)               # N(0, 0.1)
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)  # N(0, 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) * 1.5 + 0.5)  # U(0.5, 2.0)
            m.num_batches_tracked.fill_(int(torch.randint(1, 100000, (1,), generator=gen)))
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()  # in_channels/groups * kh * kw, or in_features
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (gain / fan_in ** 0.5))
            if m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
    # Anything left unvisited would keep PyTorch's default init: make sure there is nothing.
    covered = set()
    for mn, m in model.named_modules():
        if isinstance(m, (nn.BatchNorm2d, nn.Conv2d, nn.Linear)):
            for k in m.state_dict().keys():
                covered.add(f"{mn}.{k}" if mn else k)
    assert covered == set(model.state_dict().keys()), set(model.state_dict().keys()) - covered


def plain_sd(model: nn.Module) -> collections.OrderedDict:
    return collections.OrderedDict((k, v.detach().clone().contiguous()) for k, v in model.state_dict().items())


def save_sd(sd: dict, stem: Path) -> None:
    torch.save(collections.OrderedDict(sd), stem.with_suffix(".pth"))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(stem.with_suffix(".safetensors")),
              metadata={"format": "pt"})
    os.chmod(stem.with_suffix(".safetensors"), 0o644)


def capture_blocks(blocks) -> tuple:
    feats = collections.OrderedDict()
    handles = []
    for name, blk in blocks:
        def hook(_m, _inp, out, name=name):
            feats[name] = out.detach().clone()
        handles.append(blk.register_forward_hook(hook))
    return feats, handles


# --------------------------------------------------------------------------- per config

@torch.no_grad()
def make_config(cfg) -> dict:
    name = cfg["name"]
    out = OUT / name
    out.mkdir(parents=True, exist_ok=True)

    # ---- official training form, random weights
    torch.manual_seed(cfg["seed"])  # only affects PyTorch's default init, which is overwritten below
    off32 = build_official(cfg).eval()
    gain = cfg.get("weight_gain", DEFAULT_WEIGHT_GAIN)
    randomize_(off32, torch.Generator().manual_seed(cfg["seed"]), gain)
    train_sd = plain_sd(off32)
    assert all(v.dtype == torch.float32 for k, v in train_sd.items() if not k.endswith("num_batches_tracked"))
    off64 = copy.deepcopy(off32).double().eval()

    x32 = torch.randn(cfg["input_shape"], generator=torch.Generator().manual_seed(cfg["seed"] + 500000))
    x64 = x32.double()

    # ---- timm, same weights through the key mapping
    tim32, timm_group_rule = build_timm(cfg)
    tim32.eval()
    mapped = to_timm_sd(train_sd)
    tim32.load_state_dict(mapped, strict=True)
    tim64 = copy.deepcopy(tim32).double().eval()
    # Save in timm's own key order (with SE, timm registers `attn` after the branches; official has `se` first).
    timm_train_sd = plain_sd(tim32)
    assert set(timm_train_sd.keys()) == set(mapped.keys())
    assert all(torch.equal(timm_train_sd[k], mapped[k]) for k in mapped)

    # ---- forwards (training form); features from the fp64 official run
    logits_train_f32 = off32(x32)
    feats, handles = capture_blocks(official_blocks(off64))
    logits_train_f64 = off64(x64)
    for h in handles:
        h.remove()
    tfeats, handles = capture_blocks(timm_blocks(tim64))
    timm_train_f64 = tim64(x64)
    for h in handles:
        h.remove()
    timm_train_f32 = tim32(x32)

    # ---- each reference's own conversion
    offd32 = official.repvgg_model_convert(off32, do_copy=True).eval()
    offd64 = official.repvgg_model_convert(off64, do_copy=True).eval()
    timd32 = reparameterize_model(tim32).eval()
    timd64 = reparameterize_model(tim64).eval()
    deploy_sd = plain_sd(offd32)
    deploy_sd64 = plain_sd(offd64)
    timm_deploy_sd = plain_sd(timd32)
    assert all(v.dtype == torch.float32 for v in deploy_sd.values())
    assert all(v.dtype == torch.float64 for v in deploy_sd64.values())
    assert set(timm_deploy_sd.keys()) == {official_to_timm_key(k) for k in deploy_sd.keys()}

    # The converted state dicts must load into models built directly in deploy form.
    offd_check = build_official(cfg, deploy=True).eval()
    offd_check.load_state_dict(deploy_sd, strict=True)
    timd_check = build_timm(cfg, deploy=True)[0].eval()
    timd_check.load_state_dict(timm_deploy_sd, strict=True)

    logits_deploy_f32 = offd32(x32)
    logits_deploy_f64 = offd64(x64)
    timm_deploy_f32 = timd32(x32)
    timm_deploy_f64 = timd64(x64)
    assert torch.equal(offd_check(x32), logits_deploy_f32)

    # ---- checks
    def close(a, b, tol):
        return torch.allclose(a, b, rtol=tol, atol=tol)

    assert close(timm_train_f32, logits_train_f32, TOL_F32), f"{name}: timm/official train f32 disagree"
    assert close(timm_train_f64, logits_train_f64, TOL_F64), f"{name}: timm/official train f64 disagree"
    assert close(timm_deploy_f32, logits_deploy_f32, TOL_F32), f"{name}: timm/official deploy f32 disagree"
    assert close(timm_deploy_f64, logits_deploy_f64, TOL_F64), f"{name}: timm/official deploy f64 disagree"
    assert close(logits_deploy_f32, logits_train_f32, 1e-4), f"{name}: train/deploy f32 disagree"
    assert close(logits_deploy_f64, logits_train_f64, 1e-10), f"{name}: train/deploy f64 disagree"
    assert list(feats.keys()) == list(tfeats.keys())
    feat_diff = max(float((feats[k] - tfeats[k]).abs().max()) for k in feats)
    assert feat_diff < 1e-10, feat_diff

    fused_w_diff = max(float((timm_deploy_sd[official_to_timm_key(k)] - v).abs().max())
                       for k, v in deploy_sd.items())
    fused_w64_diff = max(float((deploy_sd64[k] - v.double()).abs().max()) for k, v in deploy_sd.items())

    # ---- write
    spec = {
        "name": name,
        "stem_width": cfg["stem_width"],
        "depths": list(cfg["depths"]),
        "widths": list(cfg["widths"]),
        "groups": {str(k): v for k, v in sorted(cfg["groups"].items()) if v > 1},
        "se": bool(cfg["se"]),
        "num_classes": cfg["num_classes"],
    }
    (out / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")

    save_sd(train_sd, out / "train_official")
    save_sd(timm_train_sd, out / "train_timm")
    save_sd(deploy_sd, out / "deploy_official")
    save_sd(timm_deploy_sd, out / "deploy_timm")

    iod = collections.OrderedDict()
    iod["input"] = x32.contiguous()
    iod["logits_train_f32"] = logits_train_f32.contiguous()
    iod["logits_train_f64"] = logits_train_f64.contiguous()
    iod["logits_deploy_f32"] = logits_deploy_f32.contiguous()
    iod["logits_deploy_f64"] = logits_deploy_f64.contiguous()
    for k, v in feats.items():
        assert v.dtype == torch.float64
        iod[f"features.{k}"] = v.contiguous()
    # One forward in training mode (batch statistics; running statistics updated with PyTorch's
    # momentum 0.1 and unbiased variance): logits and every BN's running stats afterwards.
    trainmode = copy.deepcopy(off64).train()
    iod["logits_trainmode_f64"] = trainmode(x64).detach().contiguous()
    for k, v in trainmode.state_dict().items():
        if k.endswith("running_mean") or k.endswith("running_var"):
            iod[f"trainmode.{k}"] = v.detach().contiguous()
    save_file(iod, str(out / "io.safetensors"))
    os.chmod(out / "io.safetensors", 0o644)

    feat_stats = {k: {"shape": list(v.shape), "mean": float(v.mean()), "std": float(v.std()),
                      "frac_zero": float((v == 0).double().mean())} for k, v in feats.items()}
    meta = {
        "name": name,
        "input_shape": list(cfg["input_shape"]),
        "input_dtype": "float32",
        "seed": cfg["seed"],
        "seeds": {
            "weights": f"torch.Generator().manual_seed({cfg['seed']}), drawn module by module in official "
                       f"named_modules() order",
            "input": f"torch.randn(input_shape, generator=torch.Generator().manual_seed({cfg['seed'] + 500000}))",
        },
        "init": {
            "conv_and_linear_weight": f"N(0,1) * {gain} / sqrt(fan_in), fan_in = in/groups*kh*kw",
            "conv_and_linear_bias": "N(0,1) * 0.1 (SE convs and the head)",
            "bn_weight": "U(0.5, 1.5)",
            "bn_bias": "N(0,1) * 0.1",
            "bn_running_mean": "N(0,1) * 0.1",
            "bn_running_var": "U(0.5, 2.0)",
            "bn_num_batches_tracked": "random int in [1, 100000) (meaningless, int64)",
            "bn_eps": 1e-5,
        },
        "versions": versions(),
        "official_block_groups": official_layer_groups(cfg),
        "timm_group_rule": timm_group_rule,
        "logits_shape": list(logits_train_f32.shape),
        "feature_stats_f64_train": feat_stats,
        "diffs": {
            "_note": "max_abs = max|a-b|; max_rel = max(|a-b|/|b|) elementwise; ref_max_abs = max|b|; "
                     "'a vs b' means a compared with reference b",
            "timm_vs_official_train_f32": diff(timm_train_f32, logits_train_f32),
            "timm_vs_official_train_f64": diff(timm_train_f64, logits_train_f64),
            "timm_vs_official_deploy_f32": diff(timm_deploy_f32, logits_deploy_f32),
            "timm_vs_official_deploy_f64": diff(timm_deploy_f64, logits_deploy_f64),
            "timm_vs_official_features_train_f64_max_abs": feat_diff,
            "deploy_vs_train_official_f32": diff(logits_deploy_f32, logits_train_f32),
            "deploy_vs_train_official_f64": diff(logits_deploy_f64, logits_train_f64),
            "deploy_vs_train_timm_f32": diff(timm_deploy_f32, timm_train_f32),
            "deploy_vs_train_timm_f64": diff(timm_deploy_f64, timm_train_f64),
            "train_f32_vs_train_f64": diff(logits_train_f32, logits_train_f64),
            "deploy_f32_vs_deploy_f64": diff(logits_deploy_f32, logits_deploy_f64),
            "deploy_f32_vs_train_f64": diff(logits_deploy_f32, logits_train_f64),
            "fused_weights_timm_vs_official_f32_max_abs": fused_w_diff,
            "fused_weights_official_f32_vs_f64_max_abs": fused_w64_diff,
        },
        "files": sorted(p.name for p in out.iterdir()) + ["meta.json"],
    }
    meta["files"] = sorted(set(meta["files"]))
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return dict(train_sd=train_sd, timm_train_sd=timm_train_sd, meta=meta)


# --------------------------------------------------------------------------- pth/ edge cases

class _ForbiddenGlobal:
    """Pickles as a call to os.system (module 'posix' on Linux). NEVER unpickle the result."""

    def __reduce__(self):
        return (os.system, ("echo 'repvgg-rs fixture: forbidden_global.pth was unpickled (unsafe)'",))


def pickle_globals(pth: Path) -> list:
    """GLOBAL / STACK_GLOBAL names in a zip-format .pth, read with pickletools (no unpickling)."""
    with zipfile.ZipFile(pth) as z:
        name = next(n for n in z.namelist() if n.endswith("/data.pkl"))
        data = z.read(name)
    found, strings = [], []
    for op, arg, _pos in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "GLOBAL":
            found.append(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            found.append(f"{strings[-2]}.{strings[-1]}")
    return found


def noncontiguous_tensors() -> collections.OrderedDict:
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10) * 0.5 - 7.0   # storage A (60 x f32)
    flat = torch.linspace(-1.0, 1.0, 40, dtype=torch.float64)                 # storage B (40 x f64)
    ints = torch.arange(20, dtype=torch.int64) * 3 - 11                        # storage C (20 x i64)
    halfs = torch.arange(16, dtype=torch.float16).reshape(4, 4) / 8           # storage D (16 x f16)
    t = collections.OrderedDict()
    t["a.full"] = base                       # (6,10) stride (10,1) offset 0
    t["a.rows"] = base[2:5]                  # (3,10) stride (10,1) offset 20 (contiguous, offset)
    t["a.block"] = base[1:4, 3:7]            # (3,4)  stride (10,1) offset 13
    t["a.transposed"] = base.t()             # (10,6) stride (1,10) offset 0
    t["a.strided"] = base[::2, ::3]          # (3,4)  stride (20,3) offset 0
    t["a.scalar"] = base[3, 4]               # ()     offset 34
    t["b.view"] = flat[5:29].view(4, 6)      # (4,6)  stride (6,1)  offset 5
    t["b.broadcast"] = flat[30:33].view(1, 3).expand(2, 3)  # (2,3) stride (0,1) offset 30
    t["c.step"] = ints[3:13:2]               # (5,)   stride (2,)   offset 3
    t["d.column"] = halfs[:, 1]              # (4,)   stride (4,)   offset 1
    t["d.full"] = halfs                      # same storage as d.column
    return t


def make_pth_fixtures(tiny: dict) -> dict:
    out = OUT / "pth"
    out.mkdir(parents=True, exist_ok=True)
    sd = tiny["train_sd"]

    torch.save({"state_dict": collections.OrderedDict(("module." + k, v) for k, v in sd.items()),
                "epoch": 3, "best_acc1": 0.5, "arch": "tiny"}, out / "wrapped.pth")
    torch.save({"model": tiny["timm_train_sd"]}, out / "model_key.pth")

    for tag, dt in (("f16", torch.float16), ("bf16", torch.bfloat16), ("f64", torch.float64)):
        cast = collections.OrderedDict(
            (k, v if k.endswith("num_batches_tracked") else v.to(dt)) for k, v in sd.items())
        save_sd(cast, out / tag)

    torch.save(sd, out / "legacy.pth", _use_new_zipfile_serialization=False)

    torch.save(collections.OrderedDict([
        ("stage0.rbr_dense.conv.weight", torch.zeros(1, 1, 1, 1)),
        ("payload", _ForbiddenGlobal()),
    ]), out / "forbidden_global.pth")
    forbidden = [g for g in pickle_globals(out / "forbidden_global.pth") if g.split(".")[-1] == "system"]
    assert forbidden, "forbidden global missing from the pickle"

    nc = noncontiguous_tensors()
    torch.save(nc, out / "noncontiguous.pth")
    save_file(collections.OrderedDict((k, v.contiguous().clone()) for k, v in nc.items()),
              str(out / "noncontiguous_expected.safetensors"))
    os.chmod(out / "noncontiguous_expected.safetensors", 0o644)
    return {"forbidden_globals": forbidden,
            "noncontiguous_layout": {k: {"shape": list(v.shape), "stride": list(v.stride()),
                                         "storage_offset": v.storage_offset(), "dtype": str(v.dtype)}
                                     for k, v in nc.items()}}


# --------------------------------------------------------------------------- verification

def verify(results: dict, pth_info: dict) -> None:
    """Load every written .pth back (never forbidden_global.pth) and compare with the safetensors twins."""
    for cfg in CONFIGS:
        d = OUT / cfg["name"]
        for stem in ("train_official", "train_timm", "deploy_official", "deploy_timm"):
            a = torch.load(d / f"{stem}.pth", weights_only=True)
            b = load_file(str(d / f"{stem}.safetensors"))
            assert set(a.keys()) == set(b.keys()), stem  # safetensors stores keys sorted
            for k in a:
                assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (stem, k)
        io_ = load_file(str(d / "io.safetensors"))
        assert io_["input"].dtype == torch.float32 and io_["logits_train_f64"].dtype == torch.float64
    p = OUT / "pth"
    sd = results["tiny"]["train_sd"]
    w = torch.load(p / "wrapped.pth", weights_only=True)
    assert w["epoch"] == 3 and w["arch"] == "tiny" and len(w["state_dict"]) == len(sd)
    assert all(torch.equal(w["state_dict"]["module." + k], v) for k, v in sd.items())
    m = torch.load(p / "model_key.pth", weights_only=True)
    assert all(torch.equal(m["model"][k], v) for k, v in results["tiny"]["timm_train_sd"].items())
    for tag, dt in (("f16", torch.float16), ("bf16", torch.bfloat16), ("f64", torch.float64)):
        a = torch.load(p / f"{tag}.pth", weights_only=True)
        b = load_file(str(p / f"{tag}.safetensors"))
        for k, v in sd.items():
            want = torch.int64 if k.endswith("num_batches_tracked") else dt
            assert a[k].dtype == want and b[k].dtype == want and torch.equal(a[k], b[k]), (tag, k)
    lg = torch.load(p / "legacy.pth", weights_only=True)
    assert all(torch.equal(lg[k], v) for k, v in sd.items())
    with open(p / "legacy.pth", "rb") as f:
        assert not f.read(4).startswith(b"PK"), "legacy.pth should not be a zip"
    nc = torch.load(p / "noncontiguous.pth", weights_only=True)
    exp = load_file(str(p / "noncontiguous_expected.safetensors"))
    for k, v in nc.items():
        lay = pth_info["noncontiguous_layout"][k]
        assert list(v.stride()) == lay["stride"] and v.storage_offset() == lay["storage_offset"], k
        assert torch.equal(v.contiguous(), exp[k]), k
    assert nc["a.block"].untyped_storage().data_ptr() == nc["a.full"].untyped_storage().data_ptr()


def main() -> int:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if OUT.exists():
        # Regenerate this script's folders from scratch; leave the other scripts' folders
        # (photos/, fashion-mnist-subset/) and the hand-written README alone.
        for name in [cfg["name"] for cfg in CONFIGS] + ["pth"]:
            if (OUT / name).is_dir():
                shutil.rmtree(OUT / name)
    OUT.mkdir(exist_ok=True)
    results = {}
    for cfg in CONFIGS:
        results[cfg["name"]] = make_config(cfg)
        dd = results[cfg["name"]]["meta"]["diffs"]
        print(f"{cfg['name']:15s} timm-vs-official train f32 {dd['timm_vs_official_train_f32']['max_abs']:.2e}"
              f"  deploy-vs-train f32 {dd['deploy_vs_train_official_f32']['max_abs']:.2e}"
              f"  f64 {dd['deploy_vs_train_official_f64']['max_abs']:.2e}"
              f"  f32-vs-f64 {dd['train_f32_vs_train_f64']['max_abs']:.2e}")
    pth_info = make_pth_fixtures(results["tiny"])
    (OUT / "pth" / "meta.json").write_text(json.dumps({
        "source": "fixtures/tiny training-form weights",
        "versions": versions(),
        **pth_info,
    }, indent=2) + "\n")
    verify(results, pth_info)
    print("forbidden globals in forbidden_global.pth:", pth_info["forbidden_globals"])
    print("all fixtures written and verified under", OUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
