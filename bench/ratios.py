#!/usr/bin/env python3
"""Joins `repvgg bench --json` with bench/reference.py output and prints the ratio table.

With several rounds of the same case (compare.sh ROUNDS=N), each side keeps its best round
(highest images/s), so that a burst of load from another tenant of the machine does not decide
a ratio."""
import json
import sys


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def best(rows, key):
    """The fastest row for each key."""
    kept = {}
    for row in rows:
        k = key(row)
        if k not in kept or row["images_per_s"] > kept[k]["images_per_s"]:
            kept[k] = row
    return list(kept.values())


def main(rust_path, ref_path):
    rust = best(load(rust_path), lambda r: (r["form"], r["batch"], tuple(r["size"]), r["threads"]))
    ref = best(load(ref_path), lambda x: (x["engine"], x.get("omp_wait_policy"), x["form"],
                                          x["batch"], tuple(x["size"]), x["threads"]))
    print("| case | repvgg-rs img/s | PyTorch img/s (PASSIVE / default) | ONNX Runtime img/s "
          "| vs PyTorch | vs ORT | latency vs ORT | peak MB (rs / torch / ORT) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rust:
        key = (r["form"], r["batch"], tuple(r["size"]), r["threads"])
        match = [x for x in ref if (x["form"], x["batch"], tuple(x["size"]), x["threads"]) == key]
        torch_p = next((x for x in match if x["engine"] == "torch" and x["omp_wait_policy"] == "PASSIVE"), None)
        torch_d = next((x for x in match if x["engine"] == "torch" and x["omp_wait_policy"] == "default"), None)
        ort = next((x for x in match if x["engine"] == "onnxruntime"), None)
        best_torch = max((x for x in (torch_p, torch_d) if x), key=lambda x: x["images_per_s"], default=None)
        fmt = lambda x: f"{x['images_per_s']:.1f}" if x else "-"
        ratio = lambda x: f"{r['images_per_s'] / x['images_per_s']:.2f}x" if x else "-"
        latency = f"{r['median_ms'] / ort['median_ms']:.2f}" if ort else "-"
        mem = " / ".join(f"{x['peak_rss_mb']:.0f}" if x else "-" for x in (r, best_torch, ort))
        case = f"{r['arch']} {r['form']} b{r['batch']} {r['size'][0]}x{r['size'][1]} t{r['threads']}"
        print(f"| {case} | {r['images_per_s']:.1f} | {fmt(torch_p)} / {fmt(torch_d)} | {fmt(ort)} "
              f"| {ratio(best_torch)} | {ratio(ort)} | {latency} | {mem} |")


if __name__ == "__main__":
    main(*sys.argv[1:])
