#!/usr/bin/env python3
"""Record the infer requests KServe's own Python client (`kserve`, the KServe V2 SDK) sends, so
the tests can check that `repvgg serve` answers them, byte for byte as that client writes them,
without installing the SDK (it pulls grpc, pandas and the Kubernetes client).

Run from the repository root, in any venv with `kserve==0.21.0` (pip install kserve==0.21.0):

    python reference/make_serve_fixtures.py

Writes

  * fixtures/serve/kserve_infer.json   the JSON form of an infer request for model `tiny`
  * fixtures/serve/kserve_infer.bin    the binary-tensor form of the same request
  * fixtures/serve/kserve_infer.meta.json
        {"kserve": version, "model": "tiny", "shape": [...], "binary_header_length": N,
         "values": "((i * 7919) % 2003) / 1001 - 1 for flat index i"}

The tensor is the serve tests' `pattern(len, 0)`, so the tests can run `repvgg forward` on the
same values. The SDK puts a fresh UUID in each request's `id`; it is kept as sent.
"""
import json
from importlib import metadata
from pathlib import Path

import numpy as np
import orjson
from kserve import InferInput, InferRequest

MODEL = "tiny"
SHAPE = [1, 3, 32, 32]


def main():
    out = Path("fixtures/serve")
    out.mkdir(parents=True, exist_ok=True)
    count = int(np.prod(SHAPE))
    i = np.arange(count, dtype=np.int64)
    values = (((i * 7919) % 2003) / 1001.0 - 1.0).astype(np.float32).reshape(SHAPE)

    as_json = InferInput("input", SHAPE, "FP32")
    as_json.set_data_from_numpy(values, binary_data=False)
    body, header_length = InferRequest(model_name=MODEL, infer_inputs=[as_json]).to_rest()
    assert header_length is None
    # What InferenceRESTClient.infer posts: the dict through orjson.
    (out / "kserve_infer.json").write_bytes(orjson.dumps(body))

    as_binary = InferInput("input", SHAPE, "FP32")
    as_binary.set_data_from_numpy(values, binary_data=True)
    body, header_length = InferRequest(model_name=MODEL, infer_inputs=[as_binary]).to_rest()
    assert isinstance(body, bytes) and header_length is not None
    (out / "kserve_infer.bin").write_bytes(body)

    meta = {
        "kserve": metadata.version("kserve"),
        "model": MODEL,
        "shape": SHAPE,
        "binary_header_length": header_length,
        "values": "((i * 7919) % 2003) / 1001 - 1 for flat index i",
    }
    (out / "kserve_infer.meta.json").write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    main()
