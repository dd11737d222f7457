#!/usr/bin/env python3
"""Checks an ONNX file exported by `repvgg export` with the ONNX tools themselves.

    check_onnx.py MODEL.onnx INPUT.safetensors EXPECTED.safetensors [TOLERANCE]

Runs `onnx.checker.check_model(full_check=True)` (which also infers shapes), then ONNX Runtime
(CPU) on tensor `input` of INPUT and compares the graph's output (`logits`, or `pooled` for a
headless model) with tensor `logits` of EXPECTED (what `repvgg forward` or the engine computed): max |ort - expected| / max |expected| must be below TOLERANCE
(default 1e-5). Prints one JSON line and exits non-zero on failure.
"""
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
from safetensors.numpy import load_file


def main():
    model_path, input_path, expected_path = sys.argv[1:4]
    tol = float(sys.argv[4]) if len(sys.argv) > 4 else 1e-5
    onnx.checker.check_model(model_path, full_check=True)
    x = load_file(input_path)["input"].astype(np.float32)
    expected = load_file(expected_path)["logits"].astype(np.float64)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"])
    names = ([i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()])
    # The graph's only output: `logits`, or `pooled` for a headless backbone.
    (out,) = sess.run(None, {"input": x})
    rel = float(np.abs(out.astype(np.float64) - expected).max() / np.abs(expected).max())
    ok = out.shape == expected.shape and rel < tol
    print(json.dumps({"ok": ok, "relative_error": rel, "shape": list(out.shape), "io": names,
                      "onnx": onnx.__version__, "onnxruntime": ort.__version__}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
