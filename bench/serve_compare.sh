#!/usr/bin/env bash
# `repvgg serve` under load, side by side with the server a Python user would build (FastAPI
# + ONNX Runtime, bench/serve_fastapi.py) on the same model (A0's seeded random weights), the
# same machine and the same client (`repvgg bench-serve`, V2 binary tensors, one image per
# request), loopback only, bounded in requests and time:
#   1. closed loop at concurrency 1, 8, 64: ours with dynamic batching, ours without
#      (--max-batch 1), the Python server, interleaved for ROUNDS rounds (this machine is
#      noisy); each keeps its best round by throughput;
#   2. overload: requests due at RATE per second (above capacity) for at most 15 s; ours
#      (bounded queue) and the Python server, with peak memory.
#
#   bench/serve_compare.sh                  # A0 at 224, 2 engine threads
#   ARCH=B0 REQUESTS=400 RATE=400 bench/serve_compare.sh
#   PRECISION=int8 RATE=800 bench/serve_compare.sh   # both serve one INT8 model
#
# PRECISION=int8: the model is quantized once (`repvgg quantize --random`, calibrated on the
# fixture photos; the scales do not change the speed), ours serves that file on the INT8
# engine and the Python server its QDQ export (`repvgg export`), which ONNX Runtime runs as
# QLinearConv.
#
# VENV (default .venv-bench) gets fastapi, uvicorn, onnxruntime and numpy from PyPI if it
# lacks them. Output: JSON lines in $OUT (default bench/serve_results.jsonl), a table on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
ARCH=${ARCH:-A0}
SIZE=${SIZE:-224}
THREADS=${THREADS:-2}
REQUESTS=${REQUESTS:-300}
RATE=${RATE:-300}
PRECISION=${PRECISION:-fp32}
ROUNDS=${ROUNDS:-2}
VENV=${VENV:-.venv-bench}
OUT=${OUT:-bench/serve_results.jsonl}
if ! "$VENV/bin/python" -c "import fastapi, uvicorn, onnxruntime, numpy" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q -r bench/requirements-serve.txt
fi
cargo build --release -q -p repvgg-cli
repvgg=target/release/repvgg
tmp=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$tmp"' EXIT
case "$PRECISION" in
  fp32)
    $repvgg export --random "$ARCH" "$tmp/model.onnx" --size "$SIZE" --dynamic-batch 2>/dev/null
    model=(--random "$ARCH")
    ;;
  int8)
    mkdir "$tmp/calib"
    cp fixtures/photos/chelsea.png fixtures/photos/rocket.jpg "$tmp/calib/"
    $repvgg quantize --random "$ARCH" --calib "$tmp/calib" --out "$tmp/model.safetensors" \
      --size "$SIZE" 2>/dev/null
    $repvgg export "$tmp/model.safetensors" "$tmp/model.onnx" --dynamic-batch 2>/dev/null
    model=(--weights "$tmp/model.safetensors")
    ;;
  *)
    echo "PRECISION=$PRECISION: expected fp32 or int8" >&2
    exit 2
    ;;
esac
isa=$(grep -o -m1 -w 'amx_int8' /proc/cpuinfo || grep -o -m1 -w 'avx512f' /proc/cpuinfo \
  || grep -o -m1 -w 'avx2' /proc/cpuinfo || echo none)
echo "# $ARCH at $SIZE, $PRECISION, $THREADS engine threads, $(nproc) cores ($isa), load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
: >"$OUT"

wait_ready() {
  for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$1/v2/health/ready" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "server on port $1 did not become ready" >&2
  exit 1
}

# run LABEL PORT BENCH-ARGS... -- SERVER-COMMAND...
run() {
  local label=$1 port=$2
  shift 2
  local bench=()
  while [ "$1" != "--" ]; do bench+=("$1"); shift; done
  shift
  "$@" >"$tmp/$label.log" 2>&1 &
  local pid=$!
  wait_ready "$port"
  $repvgg bench-serve --url "http://127.0.0.1:$port" --size "$SIZE" --label "$label" \
    --server-pid "$pid" --json "${bench[@]}" | tee -a "$OUT"
  kill -TERM "$pid"
  wait "$pid" 2>/dev/null || true
}

ours=($repvgg serve "${model[@]}" --size "$SIZE" --threads "$THREADS")
python=("$VENV/bin/python" bench/serve_fastapi.py "$tmp/model.onnx" --threads "$THREADS")
closed=(--concurrency 1,8,64 --requests "$REQUESTS" --duration 60)
overload=(--concurrency 256 --rate "$RATE" --requests $((RATE * 15)) --duration 15)

for round in $(seq "$ROUNDS"); do
  run ours-batching 18080 "${closed[@]}" -- "${ours[@]}" --addr 127.0.0.1:18080
  run ours-no-batching 18081 "${closed[@]}" -- "${ours[@]}" --addr 127.0.0.1:18081 --max-batch 1
  run python-fastapi-ort 18082 "${closed[@]}" -- "${python[@]}" --port 18082
done
run ours-overload 18083 "${overload[@]}" -- "${ours[@]}" --addr 127.0.0.1:18083 --queue 32
run python-overload 18084 "${overload[@]}" -- "${python[@]}" --port 18084

"$VENV/bin/python" - "$OUT" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
best = {}
for r in rows:
    key = (r["label"], r["concurrency"])
    if key not in best or r["ok_per_s"] > best[key]["ok_per_s"]:
        best[key] = r
rows = list(best.values())
# A latency is null where no request succeeded.
ms = lambda v: f"{v:>8.1f}" if v is not None else f"{'-':>8}"
print(f"{'server':20} {'clients':>7} {'rate':>6} {'ok/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'peak MB':>8}  statuses")
for r in rows:
    rate = r["rate"] or "-"
    print(f"{r['label']:20} {r['concurrency']:>7} {rate:>6} {r['ok_per_s']:>7.1f} {ms(r['p50_ms'])} "
          f"{ms(r['p99_ms'])} {r['server_peak_rss_mb'] or 0:>8.0f}  {r['statuses']}")
by = best
for c in (1, 8, 64):
    a, b = by.get(("ours-batching", c)), by.get(("python-fastapi-ort", c))
    if a and b:
        print(f"concurrency {c}: ours/python throughput {a['ok_per_s'] / b['ok_per_s']:.2f}x, "
              f"p99 {ms(a['p99_ms']).strip()} vs {ms(b['p99_ms']).strip()} ms")
PY
