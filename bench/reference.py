#!/usr/bin/env python3
"""Times the PyTorch reference stack on the same cases as `repvgg bench`.

PyTorch CPU runs timm's RepVGG (training form in eval mode, and the deploy form after timm's own
reparameterization); ONNX Runtime runs the deploy form exported from timm. Prints the same table,
or with --json one object per line with the same keys as `repvgg bench --json` plus `engine`.

Run it through bench/compare.sh, which makes the venv and prints ratios.
"""
import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time


def parse_size(text):
    if "x" in text:
        h, w = text.split("x")
        return int(h), int(w)
    return int(text), int(text)


def timm_name(arch):
    a = arch.strip().lower()
    for prefix in ("repvgg-", "repvgg_"):
        if a.startswith(prefix):
            a = a[len(prefix):]
    return "repvgg_" + a


def build(arch, deploy):
    import timm
    from timm.utils.model import reparameterize_model

    model = timm.create_model(timm_name(arch), pretrained=False).eval()
    return reparameterize_model(model).eval() if deploy else model


def time_fn(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return statistics.median(times), times[round((len(times) - 1) * 0.9)]


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="A0")
    p.add_argument("--form", default="deploy", choices=["train", "deploy", "both"])
    p.add_argument("--batch", default="1,8")
    p.add_argument("--size", default="224")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--iters", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--engines", default="torch,onnxruntime")
    p.add_argument("--json", action="store_true")
    p.add_argument("--train", action="store_true",
                   help="time one training step of the multi-branch form instead (forward, "
                        "backward, SGD with momentum 0.9 and weight decay 1e-4; label smoothing 0.1)")
    args = p.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    h, w = parse_size(args.size)
    forms = ["train", "deploy"] if args.form == "both" else [args.form]
    batches = [int(b) for b in args.batch.split(",")]
    engines = args.engines.split(",")
    macs_cache = {}

    def macs(form):
        # 2 x MACs of convs and the linear head, counted by hooks on one forward.
        if form not in macs_cache:
            model = build(args.arch, form == "deploy")
            total = [0]

            def hook(mod, inp, out):
                if isinstance(mod, torch.nn.Conv2d):
                    k = mod.weight[0].numel()
                    total[0] += out.numel() * k
                elif isinstance(mod, torch.nn.Linear):
                    total[0] += mod.weight.numel()

            hs = [m.register_forward_hook(hook) for m in model.modules()]
            with torch.no_grad():
                model(torch.zeros(1, 3, h, w))
            for x in hs:
                x.remove()
            macs_cache[form] = total[0]
        return macs_cache[form]

    if args.train:
        return train_steps(args, h, w, batches)

    if not args.json:
        print(f"{'engine':<12} {'arch':<10} {'form':<7} {'batch':>5} {'size':>9} {'threads':>7} "
              f"{'median ms':>10} {'p90 ms':>10} {'images/s':>10} {'GFLOP/s':>9} {'peak RSS MB':>11}")
    for engine in engines:
        for form in forms:
            if engine == "onnxruntime" and form == "train":
                continue  # ORT folds BN itself; the deploy form is what it is for
            model = build(args.arch, form == "deploy")
            for batch in batches:
                x = torch.randn(batch, 3, h, w)
                if engine == "torch":
                    def run():
                        with torch.no_grad():
                            model(x)
                else:
                    import onnxruntime as ort
                    path = os.path.join(tempfile.mkdtemp(), "model.onnx")
                    torch.onnx.export(model, x, path, input_names=["input"], output_names=["logits"],
                                      opset_version=17, dynamo=False)
                    so = ort.SessionOptions()
                    so.intra_op_num_threads = args.threads
                    so.inter_op_num_threads = 1
                    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
                    xn = x.numpy()

                    def run():
                        sess.run(None, {"input": xn})
                median, p90 = time_fn(run, args.warmup, args.iters)
                row = {
                    "engine": engine, "arch": args.arch, "form": form, "batch": batch, "size": [h, w],
                    "threads": args.threads, "median_ms": median * 1e3, "p90_ms": p90 * 1e3,
                    "images_per_s": batch / median, "gflops": 2 * macs(form) * batch / median / 1e9,
                    "peak_rss_mb": peak_rss_mb(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
                }
                if args.json:
                    print(json.dumps(row), flush=True)
                else:
                    print(f"{engine:<12} {args.arch:<10} {form:<7} {batch:>5} {f'{h}x{w}':>9} {args.threads:>7} "
                          f"{row['median_ms']:>10.2f} {row['p90_ms']:>10.2f} {row['images_per_s']:>10.1f} "
                          f"{row['gflops']:>9.1f} {row['peak_rss_mb']:>11.0f}", flush=True)


def train_steps(args, h, w, batches):
    import torch

    for batch in batches:
        model = build(args.arch, deploy=False).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
        x = torch.randn(batch, 3, h, w)
        y = torch.randint(0, 1000, (batch,))

        def step():
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()

        median, p90 = time_fn(step, args.warmup, args.iters)
        row = {
            "engine": "torch", "arch": args.arch, "form": "train-step", "batch": batch, "size": [h, w],
            "threads": args.threads, "median_ms": median * 1e3, "p90_ms": p90 * 1e3,
            "images_per_s": batch / median, "peak_rss_mb": peak_rss_mb(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        }
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(f"torch train step {args.arch} batch {batch} at {h}x{w}, {args.threads} threads: "
                  f"median {row['median_ms']:.1f} ms, p90 {row['p90_ms']:.1f} ms, "
                  f"{row['images_per_s']:.1f} images/s, peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)


if __name__ == "__main__":
    sys.exit(main())
