#!/usr/bin/env python3
"""Calls `repvgg serve` with NVIDIA's Triton HTTP client (tritonclient[http]), unchanged, as a
KServe V2 user would.

    triton_client.py URL MODEL INPUT.safetensors OUTPUT.safetensors

Asks whether the server and MODEL are live and ready and for MODEL's metadata, then infers
tensor `input` of INPUT twice, with binary tensors and with JSON ones, and writes the answers
to OUTPUT as `logits_binary` and `logits_json`. Also sends an FP16 tensor, which the model
does not take. Prints one JSON line: the readiness answers, the metadata and the FP16 call's
status and message.
"""
import json
import sys

import numpy as np
import tritonclient.http as httpclient
from safetensors.numpy import load_file, save_file
from tritonclient.utils import InferenceServerException


def infer(client, model, x, binary):
    tensor = httpclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    wanted = httpclient.InferRequestedOutput("logits", binary_data=binary)
    return client.infer(model, [tensor], outputs=[wanted]).as_numpy("logits")


def main():
    url, model, input_path, output_path = sys.argv[1:5]
    client = httpclient.InferenceServerClient(url.removeprefix("http://"))
    x = load_file(input_path)["input"].astype(np.float32)
    save_file(
        {
            "logits_binary": infer(client, model, x, True),
            "logits_json": infer(client, model, x, False),
        },
        output_path,
    )
    half = httpclient.InferInput("input", list(x.shape), "FP16")
    half.set_data_from_numpy(x.astype(np.float16))
    try:
        client.infer(model, [half])
        refused = None
    except InferenceServerException as e:
        refused = {"status": e.status(), "message": e.message()}
    print(
        json.dumps(
            {
                "live": client.is_server_live(),
                "ready": client.is_server_ready(),
                "model_ready": client.is_model_ready(model),
                "metadata": client.get_model_metadata(model),
                "fp16": refused,
            }
        )
    )


if __name__ == "__main__":
    main()
