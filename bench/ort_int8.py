#!/usr/bin/env python3
"""Times ONNX Runtime FP32 and INT8 on a float ONNX graph exported by `repvgg export`.

    ort_int8.py MODEL.onnx --batch 1,8 --threads 2 --iters 15 [--calib 64] [--json]

INT8 is ORT's own static quantization (`quantize_static`: QDQ, per-channel weights, u8
activations, min/max calibration on --calib random images drawn like the benchmark's inputs).
Prints one JSON object per case with the keys of `repvgg bench --json` plus `engine` and
`precision`. Run it through bench/compare_int8.sh.
"""
import argparse
import json
import os
import resource
import statistics
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                      quantize_static)


class Images(CalibrationDataReader):
    def __init__(self, shape, count):
        rng = np.random.default_rng(1)
        # The graph's batch is fixed: `count` images in batches of it.
        self.items = iter([{"input": rng.uniform(-2, 2, shape).astype(np.float32)}
                           for _ in range(max(1, count // shape[0]))])

    def get_next(self):
        return next(self.items, None)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--calib", type=int, default=64)
    p.add_argument("--arch", default="A0")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    graph = onnx.load(args.model)
    dims = [d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim]
    shape = (dims[0], dims[1], dims[2], dims[3])
    int8_path = os.path.join(tempfile.mkdtemp(), "int8.onnx")
    quantize_static(args.model, int8_path, Images(shape, args.calib), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    for precision, path in (("fp32", args.model), ("int8", int8_path)):
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        for batch in [int(b) for b in args.batch.split(",")]:
            x = np.random.default_rng(1).uniform(-2, 2, (batch,) + tuple(shape[1:])).astype(np.float32)
            for _ in range(args.warmup):
                sess.run(None, {"input": x})
            times = []
            for _ in range(args.iters):
                start = time.perf_counter()
                sess.run(None, {"input": x})
                times.append(time.perf_counter() - start)
            times.sort()
            median = statistics.median(times)
            row = {"engine": "onnxruntime", "precision": precision, "arch": args.arch,
                   "batch": batch, "size": list(shape[2:]), "threads": args.threads,
                   "median_ms": median * 1e3, "p90_ms": times[round((len(times) - 1) * 0.9)] * 1e3,
                   "images_per_s": batch / median,
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
                   "onnxruntime": ort.__version__}
            print(json.dumps(row) if args.json else
                  f"onnxruntime {precision} b{batch}: {row['median_ms']:.2f} ms, "
                  f"{row['images_per_s']:.1f} img/s", flush=True)


if __name__ == "__main__":
    main()
