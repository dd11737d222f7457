#!/usr/bin/env bash
# INT8 side by side: our INT8 and FP32 engines against ONNX Runtime's INT8 (its own static
# QDQ quantization, per-channel weights, u8 activations) and FP32, on the same model (the
# variant's seeded random weights, as `repvgg bench --arch` makes them, exported with
# `repvgg export --random`), interleaved; each side keeps its best of ROUNDS.
#
#   bench/compare_int8.sh                      # A0 at 224, batches 1 and 8, 2 threads
#   ARCH=B0 ROUNDS=3 bench/compare_int8.sh
#   INT8_KERNELS=amx,avx512-vnni bench/compare_int8.sh   # ours on each INT8 kernel set
#
# VENV (default .venv-ci, which scripts/test makes) needs onnx and onnxruntime.
set -euo pipefail
cd "$(dirname "$0")/.."
ARCH=${ARCH:-A0}
SIZE=${SIZE:-224}
THREADS=${THREADS:-2}
BATCHES=${BATCHES:-1,8}
ITERS=${ITERS:-15}
ROUNDS=${ROUNDS:-2}
VENV=${VENV:-.venv-ci}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q -r .ci/requirements.txt
fi
cargo build --release -q -p repvgg-cli
out=$(mktemp -d)
isa=$(grep -o -m1 -w 'amx_int8' /proc/cpuinfo || grep -o -m1 -w 'avx512_vnni' /proc/cpuinfo \
  || grep -o -m1 -w 'avx2' /proc/cpuinfo || echo none)
echo "rounds: $ROUNDS, machine: $(nproc) cores, best INT8 set: $isa, load: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
for batch in ${BATCHES//,/ }; do
  target/release/repvgg export --random "$ARCH" "$out/b$batch.onnx" --size "$SIZE" --batch "$batch" 2>/dev/null
done
for round in $(seq "$ROUNDS"); do
  target/release/repvgg bench --arch "$ARCH" --size "$SIZE" --threads "$THREADS" \
    --iters "$ITERS" --batch "$BATCHES" --precision fp32 --json >>"$out/rust.jsonl"
  for kernels in ${INT8_KERNELS//,/ }; do
    target/release/repvgg bench --arch "$ARCH" --size "$SIZE" --threads "$THREADS" \
      --iters "$ITERS" --batch "$BATCHES" --precision int8 --json \
      ${kernels:+--int8-kernels "$kernels"} >>"$out/rust.jsonl"
  done
  if [ -z "${INT8_KERNELS:-}" ]; then
    target/release/repvgg bench --arch "$ARCH" --size "$SIZE" --threads "$THREADS" \
      --iters "$ITERS" --batch "$BATCHES" --precision int8 --json >>"$out/rust.jsonl"
  fi
  for batch in ${BATCHES//,/ }; do
    "$VENV/bin/python" bench/ort_int8.py "$out/b$batch.onnx" --batch "$batch" --arch "$ARCH" \
      --threads "$THREADS" --iters "$ITERS" --json >>"$out/ort.jsonl"
  done
done
"$VENV/bin/python" - "$out/rust.jsonl" "$out/ort.jsonl" <<'PY'
import json, sys
def load(path):
    return [json.loads(l) for l in open(path) if l.strip()]
def best(rows):
    kept = {}
    for r in rows:
        # Our INT8 rows are kept per kernel set ("isa" names it).
        k = (r["precision"], r["batch"], r.get("isa") if r["precision"] == "int8" else None)
        if k not in kept or r["images_per_s"] > kept[k]["images_per_s"]:
            kept[k] = r
    return kept
rust, ort = best(load(sys.argv[1])), best(load(sys.argv[2]))
print("| batch | ours int8 (kernels) img/s (ms) | ours fp32 img/s (ms) | ORT int8 img/s (ms) "
      "| ORT fp32 img/s (ms) | int8 vs ORT int8 | int8 latency vs ORT int8 | int8 vs our fp32 |")
print("|---|---|---|---|---|---|---|---|")
one = lambda rows, precision, batch: next(
    (r for k, r in rows.items() if k[0] == precision and k[1] == batch), None)
for batch in sorted({k[1] for k in rust}):
    cell = lambda r: f"{r['images_per_s']:.1f} ({r['median_ms']:.2f})" if r else "-"
    rf, oi, of = one(rust, "fp32", batch), one(ort, "int8", batch), one(ort, "fp32", batch)
    ratio = lambda a, b: f"{a['images_per_s'] / b['images_per_s']:.2f}x" if a and b else "-"
    for key in sorted(k for k in rust if k[0] == "int8" and k[1] == batch):
        ri = rust[key]
        lat = f"{ri['median_ms'] / oi['median_ms']:.2f}" if oi else "-"
        print(f"| {batch} | {cell(ri)} ({key[2]}) | {cell(rf)} | {cell(oi)} | {cell(of)} "
              f"| {ratio(ri, oi)} | {lat} | {ratio(ri, rf)} |")
PY
