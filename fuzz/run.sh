#!/usr/bin/env bash
# Runs every fuzz target under libFuzzer (nightly, cargo-fuzz) until RUNS executions or SECONDS
# seconds, whichever comes first, with the limits the issue sets: 2 GiB of memory, 1 s per
# input. New inputs go to a scratch corpus (WORK); crashes to fuzz/artifacts/NAME/ (fix them,
# then keep each in fuzz/corpus/NAME/ for the replay test). Prints one line per target.
#
#   fuzz/run.sh                       # every target, 10^6 runs or 600 s each
#   RUNS=100000 SECONDS_EACH=60 fuzz/run.sh spec_string pickle
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-1000000}
SECONDS_EACH=${SECONDS_EACH:-600}
WORK=${WORK:-/tmp/repvgg-fuzz}
JOBS=${JOBS:-1}
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo +nightly fuzz list --fuzz-dir fuzz)
fi
cargo +nightly fuzz build --fuzz-dir fuzz --features libfuzzer -O >/dev/null
seeds() {
  # The seed folders the replay test lists for a target (fuzz/src/lib.rs, TARGETS).
  awk -v name="\"$1\"," 'index($0, name) { on = 1 } on { print } on && /\),/ { exit }' \
    fuzz/src/lib.rs | grep -o '"fixtures/[^"]*"' | tr -d '"' || true
}
run_one() {
  local name=$1
  mkdir -p "$WORK/$name" "fuzz/corpus/$name"
  local log="$WORK/$name.log"
  local started
  started=$(date +%s)
  cargo +nightly fuzz run --fuzz-dir fuzz --features libfuzzer -O "$name" \
    "$WORK/$name" "fuzz/corpus/$name" $(seeds "$name") -- \
    -runs="$RUNS" -max_total_time="$SECONDS_EACH" -rss_limit_mb=2048 -malloc_limit_mb=2048 \
    -timeout=1 -print_final_stats=1 >"$log" 2>&1 && status=ok || status="FAILED (see $log)"
  local runs time
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
  # Wall time, also for a run that stopped at a finding (libFuzzer then prints no "Done").
  time=$(($(date +%s) - started))
  echo "$name: $runs executions in $time s, $status"
}
export -f run_one seeds
export RUNS SECONDS_EACH WORK
printf '%s\n' "${targets[@]}" | xargs -P "$JOBS" -I{} bash -c 'run_one {}'
