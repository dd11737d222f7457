#!/usr/bin/env bash
# Runs `repvgg bench` and the PyTorch / ONNX Runtime reference on the same cases, each case in
# its own process (so peak memory is per case), back to back, and prints the ratios.
#
#   bench/compare.sh                      # A0 at 224, batches 1 and 8, 2 threads
#   ARCH=B0 BATCHES=8 THREADS=2 bench/compare.sh
#   FORMS=deploy ARCH=B1g4 bench/compare.sh          # the deployed form only
#   ROUNDS=3 bench/compare.sh    # every case 3 times, interleaved; the table keeps each side's
#                                # best, which discounts bursts of load from other tenants
#   INT8=1 bench/compare.sh      # then the INT8 cases (bench/compare_int8.sh: ours and ONNX
#                                # Runtime's INT8 and FP32 side by side, same ARCH/SIZE/THREADS)
#   STEP=1 bench/compare.sh      # a training step instead (multi-branch form, forward, backward,
#                                # SGD), A0 at 64x64, batch 32 unless SIZE / BATCHES say otherwise
#
# VENV (default .venv-bench) is created from bench/requirements.txt when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
ARCH=${ARCH:-A0}
STEP=${STEP:-0}
if [ "$STEP" = 1 ]; then
  SIZE=${SIZE:-64}
  BATCHES=${BATCHES:-32}
fi
SIZE=${SIZE:-224}
THREADS=${THREADS:-2}
BATCHES=${BATCHES:-1,8}
ITERS=${ITERS:-15}
FORMS=${FORMS:-train,deploy}
ROUNDS=${ROUNDS:-1}
VENV=${VENV:-.venv-bench}

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q -r bench/requirements.txt
fi
cargo build --release -q -p repvgg-cli

out=$(mktemp -d)
echo "rounds: $ROUNDS, machine: $(nproc) cores, load: $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%FT%TZ)" >&2
common=(--arch "$ARCH" --size "$SIZE" --threads "$THREADS" --iters "$ITERS" --json)
for round in $(seq "$ROUNDS"); do
if [ "$STEP" = 1 ]; then
  for batch in ${BATCHES//,/ }; do
    target/release/repvgg bench "${common[@]}" --train --batch "$batch" >>"$out/rust.jsonl"
    for policy in PASSIVE default; do
      if [ "$policy" = default ]; then run=(env -u OMP_WAIT_POLICY); else run=(env OMP_WAIT_POLICY=PASSIVE); fi
      "${run[@]}" "$VENV/bin/python" bench/reference.py "${common[@]}" --train --batch "$batch" \
        >>"$out/reference.jsonl"
    done
  done
  continue
fi
for form in ${FORMS//,/ }; do
  for batch in ${BATCHES//,/ }; do
    target/release/repvgg bench "${common[@]}" --form "$form" --batch "$batch" >>"$out/rust.jsonl"
    OMP_WAIT_POLICY=PASSIVE "$VENV/bin/python" bench/reference.py "${common[@]}" --form "$form" \
      --batch "$batch" --engines torch >>"$out/reference.jsonl"
    env -u OMP_WAIT_POLICY "$VENV/bin/python" bench/reference.py "${common[@]}" --form "$form" \
      --batch "$batch" --engines torch >>"$out/reference.jsonl"
    if [ "$form" = deploy ]; then
      "$VENV/bin/python" bench/reference.py "${common[@]}" --form "$form" --batch "$batch" \
        --engines onnxruntime >>"$out/reference.jsonl"
    fi
  done
done
done
"$VENV/bin/python" bench/ratios.py "$out/rust.jsonl" "$out/reference.jsonl"
if [ "${INT8:-0}" = 1 ] && [ "$STEP" != 1 ]; then
  ARCH="$ARCH" SIZE="$SIZE" THREADS="$THREADS" BATCHES="$BATCHES" ITERS="$ITERS" ROUNDS="$ROUNDS" \
    bench/compare_int8.sh
fi
