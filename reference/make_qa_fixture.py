#!/usr/bin/env python3
"""The QARepVGG reference fixture: a tiny network of QARepVGG blocks computed in float64 with
NumPy, written from the block's equations (Chu et al., "Make RepVGG Greater Again", AAAI 2023;
the authors' `QARepVGGBlockV2`):

    training form (eval mode):  y = ReLU(BN_post(BN(conv3x3(x)) + conv1x1(x) + x))
        the 1x1 is a bias-free conv with no BN; the identity (in == out, stride 1) has no BN
    deploy form:  W = t * (W3 * g3 / s3 + pad(W1) + I),  b = beta + t * (b3 - mean_post)
        with t = gamma_post / sqrt(var_post + eps), b3 = beta3 - mean3 * g3 / s3

No deep-learning framework: convolutions are explicit loops over the nine taps, so the
reference shares no code with what it checks. PyTorch is not needed (nor available on every
machine that regenerates fixtures). Run from the repository root:

    .venv-ci/bin/python reference/make_qa_fixture.py

Writes fixtures/qa_tiny/: spec.json, train_official.safetensors (authors' key names),
deploy_official.safetensors (the fused weights, by the formula above), io.safetensors
(input; logits_train_f64 and logits_deploy_f64; features.<block> of the training form).

And fixtures/qa_tiny_se/, the same with SE in the authors' order (their QARepVGGBlockV2 with
use_se): y = ReLU(BN_post(SE(sum))), SE = x * sigmoid(up(ReLU(down(mean(x))))) with a
bottleneck of C/16 (the official SEBlock; its avg_pool2d over the map's width is the global
mean on the square input used here). The BN follows the gate, so the deploy form keeps it:
W = W3 * g3 / s3 + pad(W1) + I, b = b3, then SE, then BN_post, then ReLU.
"""
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

EPS = 1e-5
SE_SPEC = {
    "name": "custom",
    "stem_width": 16,
    "depths": [1, 2, 1, 1],
    "widths": [16, 32, 32, 64],
    "groups": {"2": 2},
    "se": True,
    "qa": True,
    "num_classes": 7,
}
SPEC = {
    "name": "custom",
    "stem_width": 8,
    "depths": [2, 2, 2, 1],
    "widths": [8, 16, 16, 32],
    "groups": {"4": 2},
    "se": False,
    "qa": True,
    "num_classes": 10,
}


def blocks(spec):
    """(name, in, out, stride, groups, identity), as the official RepVGG lays them out."""
    out = [("stage0", 3, spec["stem_width"], 2, 1, False)]
    layer, channels = 1, spec["stem_width"]
    for s, (depth, width) in enumerate(zip(spec["depths"], spec["widths"]), start=1):
        for i in range(depth):
            stride = 2 if i == 0 else 1
            groups = int(spec["groups"].get(str(layer), 1))
            out.append((f"stage{s}.{i}", channels, width, stride, groups,
                        channels == width and stride == 1))
            channels, layer = width, layer + 1
    return out


def conv(x, w, stride, pad, groups):
    """x (N, C, H, W), w (O, C/g, k, k), float64, by explicit taps."""
    n, c, h, wd = x.shape
    o, cg, k, _ = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = (h + 2 * pad - k) // stride + 1, (wd + 2 * pad - k) // stride + 1
    y = np.zeros((n, o, oh, ow))
    og = o // groups
    for g in range(groups):
        xs = xp[:, g * cg:(g + 1) * cg]
        ws = w[g * og:(g + 1) * og]
        for ky in range(k):
            for kx in range(k):
                patch = xs[:, :, ky:ky + stride * oh:stride, kx:kx + stride * ow:stride]
                y[:, g * og:(g + 1) * og] += np.einsum("nchw,oc->nohw", patch, ws[:, :, ky, kx])
    return y


def bn(x, p):
    g, b, m, v = (p[f] for f in ("weight", "bias", "running_mean", "running_var"))
    s = np.sqrt(v + EPS)
    return (x - m[None, :, None, None]) / s[None, :, None, None] * g[None, :, None, None] \
        + b[None, :, None, None]


def se_apply(x, w, p):
    pooled = x.mean(axis=(2, 3))
    hidden = np.maximum(pooled @ w[f"{p}se.down.weight"][:, :, 0, 0].T + w[f"{p}se.down.bias"], 0)
    gate = 1 / (1 + np.exp(-(hidden @ w[f"{p}se.up.weight"][:, :, 0, 0].T + w[f"{p}se.up.bias"])))
    return x * gate[:, :, None, None]


def main():
    make(SPEC, "fixtures/qa_tiny", (33, 29), 2023)
    make(SE_SPEC, "fixtures/qa_tiny_se", (32, 32), 2024)


def make(SPEC, out_dir, hw, seed):
    se = SPEC["se"]
    rng = np.random.default_rng(seed)
    f32 = lambda a: a.astype(np.float32).astype(np.float64)  # noqa: E731 - values f32 holds
    weights = {}

    def bn_params(prefix, c):
        for field, v in (("weight", rng.uniform(0.5, 1.5, c)), ("bias", rng.uniform(-0.5, 0.5, c)),
                         ("running_mean", rng.uniform(-0.5, 0.5, c)),
                         ("running_var", rng.uniform(0.2, 2.0, c))):
            weights[f"{prefix}{field}"] = f32(v)

    for name, cin, cout, stride, groups, identity in blocks(SPEC):
        p = f"{name}."
        weights[f"{p}rbr_dense.conv.weight"] = f32(rng.normal(0, 0.3, (cout, cin // groups, 3, 3)))
        bn_params(f"{p}rbr_dense.bn.", cout)
        weights[f"{p}rbr_1x1.weight"] = f32(rng.normal(0, 0.3, (cout, cin // groups, 1, 1)))
        bn_params(f"{p}bn.", cout)
        if se:
            hidden = cout // 16
            weights[f"{p}se.down.weight"] = f32(rng.normal(0, 0.01, (hidden, cout, 1, 1)))
            weights[f"{p}se.down.bias"] = f32(rng.normal(0, 0.2, hidden))
            weights[f"{p}se.up.weight"] = f32(rng.normal(0, 0.5, (cout, hidden, 1, 1)))
            weights[f"{p}se.up.bias"] = f32(rng.normal(0, 0.2, cout))
    feat = SPEC["widths"][3]
    weights["linear.weight"] = f32(rng.normal(0, 0.2, (SPEC["num_classes"], feat)))
    weights["linear.bias"] = f32(rng.normal(0, 0.2, SPEC["num_classes"]))
    x = f32(rng.normal(0, 1, (2, 3) + hw))

    take = lambda prefix: {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}  # noqa: E731
    io, deploy = {"input": x.astype(np.float32)}, {}
    h = y_dep = x
    for name, cin, cout, stride, groups, identity in blocks(SPEC):
        p = f"{name}."
        w3, w1 = weights[f"{p}rbr_dense.conv.weight"], weights[f"{p}rbr_1x1.weight"]
        s = conv(h, w3, stride, 1, groups)
        s = bn(s, take(f"{p}rbr_dense.bn."))
        s = s + conv(h, w1, stride, 0, groups)
        if identity:
            s = s + h
        if se:
            s = se_apply(s, weights, p)
        h = np.maximum(bn(s, take(f"{p}bn.")), 0)
        io[f"features.{name}"] = h
        # The deploy form by the formula in the docstring.
        d, post = take(f"{p}rbr_dense.bn."), take(f"{p}bn.")
        t3 = d["weight"] / np.sqrt(d["running_var"] + EPS)
        kernel = w3 * t3[:, None, None, None]
        bias3 = d["bias"] - d["running_mean"] * t3
        kernel[:, :, 1, 1] += w1[:, :, 0, 0]
        if identity:
            cg = cin // groups
            for i in range(cout):
                kernel[i, i % cg, 1, 1] += 1.0
        if se:
            # The BN follows the gate: kept, not folded.
            deploy[f"{p}rbr_reparam.weight"], deploy[f"{p}rbr_reparam.bias"] = kernel, bias3
            for k in ("se.down.weight", "se.down.bias", "se.up.weight", "se.up.bias"):
                deploy[f"{p}{k}"] = weights[f"{p}{k}"]
            for f, v in post.items():
                deploy[f"{p}bn.{f}"] = v
            y = conv(y_dep, kernel, stride, 1, groups) + bias3[None, :, None, None]
            y_dep = np.maximum(bn(se_apply(y, weights, p), post), 0)
            continue
        t = post["weight"] / np.sqrt(post["running_var"] + EPS)
        kernel = kernel * t[:, None, None, None]
        bias = post["bias"] + (bias3 - post["running_mean"]) * t
        deploy[f"{p}rbr_reparam.weight"], deploy[f"{p}rbr_reparam.bias"] = kernel, bias
        y_dep = np.maximum(conv(y_dep, kernel, stride, 1, groups) + bias[None, :, None, None], 0)
    head = lambda z: z.mean(axis=(2, 3)) @ weights["linear.weight"].T + weights["linear.bias"]  # noqa: E731
    io["logits_train_f64"], io["logits_deploy_f64"] = head(h), head(y_dep)
    assert np.abs(io["logits_train_f64"] - io["logits_deploy_f64"]).max() < 1e-9
    deploy["linear.weight"], deploy["linear.bias"] = weights["linear.weight"], weights["linear.bias"]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(SPEC, indent=2) + "\n")
    save_file({k: v.astype(np.float32) for k, v in weights.items()}, str(out / "train_official.safetensors"))
    save_file({k: v.astype(np.float32) for k, v in deploy.items()}, str(out / "deploy_official.safetensors"))
    save_file({k: (v if v.dtype == np.float32 else v.astype(np.float64)) for k, v in io.items()},
              str(out / "io.safetensors"))
    print(f"wrote {out}: {len(weights)} training tensors, logits {io['logits_train_f64'][0][:3]}")


if __name__ == "__main__":
    main()
