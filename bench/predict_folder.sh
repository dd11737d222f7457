#!/usr/bin/env bash
# `repvgg predict` over a folder of COUNT JPEGs (300-640 px, made by bench/predict_folder.py)
# with RepVGG-A0 at 224 (seeded random weights), against the one-at-a-time path (one
# `repvgg predict FILE` per image, as a shell loop over a folder would run it; timed on the
# first ONE_AT_A_TIME files). Prints images/s for each.
#
#   bench/predict_folder.sh                 # 2000 images
#   COUNT=5000 bench/predict_folder.sh
#
# VENV (default .venv-bench) needs pillow, numpy and safetensors.
set -euo pipefail
cd "$(dirname "$0")/.."
COUNT=${COUNT:-2000}
ONE_AT_A_TIME=${ONE_AT_A_TIME:-100}
VENV=${VENV:-.venv-bench}
"$VENV/bin/python" -c "import PIL, numpy, safetensors" 2>/dev/null ||
  "$VENV/bin/pip" install -q pillow numpy safetensors
cargo build --release -q -p repvgg-cli
repvgg=target/release/repvgg
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$VENV/bin/python" bench/predict_folder.py "$tmp" "$COUNT"
weights="$tmp/a0.safetensors"
$repvgg convert "$tmp/a0_train.safetensors" "$weights" 2>/dev/null
isa=$(grep -o -m1 -w 'avx512f' /proc/cpuinfo || grep -o -m1 -w 'avx2' /proc/cpuinfo || echo none)
echo "# A0 at 224, $COUNT JPEGs, $(nproc) cores ($isa), load $(cut -d' ' -f1-3 /proc/loadavg)"
for batch in 32 8 1; do
  rm -f "$tmp/preds.jsonl"
  start=$(date +%s.%N)
  $repvgg predict --weights "$weights" "$tmp/images" --recursive --batch "$batch" \
    --output "$tmp/preds.jsonl" 2>/dev/null
  end=$(date +%s.%N)
  lines=$(wc -l <"$tmp/preds.jsonl")
  echo "folder mode, --batch $batch: $lines images in $(echo "$end - $start" | bc) s," \
    "$(echo "scale=1; $lines / ($end - $start)" | bc) images/s (process start and model load included)"
done
mapfile -t files < <(find "$tmp/images" -name '*.jpg' | sort | head -n "$ONE_AT_A_TIME")
start=$(date +%s.%N)
for f in "${files[@]}"; do
  $repvgg predict --weights "$weights" --json "$f" >/dev/null 2>&1
done
end=$(date +%s.%N)
echo "one at a time: ${#files[@]} images in $(echo "$end - $start" | bc) s," \
  "$(echo "scale=1; ${#files[@]} / ($end - $start)" | bc) images/s"
