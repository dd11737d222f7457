#!/usr/bin/env python3
"""Calls `repvgg serve` with NVIDIA's Triton HTTP client (tritonclient[http]), unchanged, as a
KServe V2 user would.

    triton_client.py URL MODEL INPUT.safetensors OUTPUT.safetensors

Asks whether the server and MODEL are live and ready and for MODEL's metadata, then infers
tensor `input` of INPUT three times, with binary tensors, with JSON ones and without naming an
output (the client then asks for every output as binary data), and writes the answers to
OUTPUT as `logits_binary`, `logits_json` and `logits_default`. Also sends an FP16 tensor,
which the model does not take, and asks for the top classes (`class_count`), which the server
does not offer. Prints one JSON line: the readiness answers, the metadata, and the refused
calls' statuses and messages.
"""
import json
import sys

import numpy as np
import tritonclient.http as httpclient
from safetensors.numpy import load_file, save_file
from tritonclient.utils import InferenceServerException


def infer(client, model, x, binary, outputs=True):
    tensor = httpclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    wanted = [httpclient.InferRequestedOutput("logits", binary_data=binary)] if outputs else None
    return client.infer(model, [tensor], outputs=wanted).as_numpy("logits")


def refusal(call):
    """The status and message of a call the server should refuse (None if it answered)."""
    try:
        call()
        return None
    except InferenceServerException as e:
        return {"status": e.status(), "message": e.message()}


def main():
    url, model, input_path, output_path = sys.argv[1:5]
    client = httpclient.InferenceServerClient(url.removeprefix("http://"))
    x = load_file(input_path)["input"].astype(np.float32)
    save_file(
        {
            "logits_binary": infer(client, model, x, True),
            "logits_json": infer(client, model, x, False),
            "logits_default": infer(client, model, x, True, outputs=False),
        },
        output_path,
    )
    half = httpclient.InferInput("input", list(x.shape), "FP16")
    half.set_data_from_numpy(x.astype(np.float16))
    full = httpclient.InferInput("input", list(x.shape), "FP32")
    full.set_data_from_numpy(x)
    top = httpclient.InferRequestedOutput("logits", class_count=3)
    print(
        json.dumps(
            {
                "live": client.is_server_live(),
                "ready": client.is_server_ready(),
                "model_ready": client.is_model_ready(model),
                "metadata": client.get_model_metadata(model),
                "fp16": refusal(lambda: client.infer(model, [half])),
                "class_count": refusal(lambda: client.infer(model, [full], outputs=[top])),
            }
        )
    )


if __name__ == "__main__":
    main()
