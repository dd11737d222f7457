"""The server a Python user would build instead of `repvgg serve`: a small FastAPI app on
ONNX Runtime serving the same model (`repvgg export --random A0 --dynamic-batch`), with the
V2 infer route (JSON and binary tensors) so that `repvgg bench-serve` loads both the same way.
No dynamic batching: each request is one session.run, on Starlette's thread pool so the event
loop keeps accepting.

    python bench/serve_fastapi.py MODEL.onnx --port 8081 --threads 2
"""

import argparse
import json

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool

parser = argparse.ArgumentParser()
parser.add_argument("model")
parser.add_argument("--port", type=int, default=8081)
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--name", default="repvgg")
args = parser.parse_args()

options = ort.SessionOptions()
options.intra_op_num_threads = args.threads
options.inter_op_num_threads = 1
session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
app = FastAPI()


@app.get("/v2/health/live")
def live():
    return {"live": True}


@app.get("/v2/health/ready")
def ready():
    return {"ready": True}


@app.post("/v2/models/{name}/infer")
async def infer(name: str, request: Request):
    body = await request.body()
    header_length = request.headers.get("inference-header-content-length")
    if header_length is not None:
        header = json.loads(body[: int(header_length)])
        spec = header["inputs"][0]
        size = spec["parameters"]["binary_data_size"]
        raw = body[int(header_length) : int(header_length) + size]
        batch = np.frombuffer(raw, dtype="<f4").reshape(spec["shape"])
    else:
        header = json.loads(body)
        spec = header["inputs"][0]
        batch = np.asarray(spec["data"], dtype=np.float32).reshape(spec["shape"])
    (logits,) = await run_in_threadpool(session.run, None, {"input": batch})
    binary = any(o.get("parameters", {}).get("binary_data") for o in header.get("outputs", []))
    output = {"name": "logits", "datatype": "FP32", "shape": list(logits.shape)}
    if not binary:
        output["data"] = logits.ravel().tolist()
        return {"model_name": name, "outputs": [output]}
    output["parameters"] = {"binary_data_size": logits.nbytes}
    head = json.dumps({"model_name": name, "outputs": [output]}).encode()
    return Response(
        head + logits.astype("<f4").tobytes(),
        media_type="application/octet-stream",
        headers={"inference-header-content-length": str(len(head))},
    )


uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
