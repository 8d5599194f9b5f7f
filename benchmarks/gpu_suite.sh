#!/bin/bash
# The GPU suite in one call on the lent GPU machine (see benchmarks/README.md, "On the project's
# GPU machine"): runs benchmarks/gpu_suite.py with the given arguments, then copies each run's
# log and metrics.jsonl under $OUT/logs (when $OUT is set) so they come back with the JSON.
set -uo pipefail
cd "$(dirname "$0")/.."
work=/tmp/gpu_suite
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  [ "${args[i]}" = "--work" ] && work=${args[i + 1]}
done
python3 benchmarks/gpu_suite.py "$@"
rc=$?
if [ -n "${OUT:-}" ] && [ -d "$work" ]; then
  mkdir -p "$OUT/logs"
  for f in "$work"/runs/*.log "$work"/raw/*.log "$work"/raw/*.json; do
    [ -f "$f" ] && cp "$f" "$OUT/logs/"
  done
  for d in "$work"/runs/*/; do
    [ -f "$d/metrics.jsonl" ] && cp "$d/metrics.jsonl" "$OUT/logs/$(basename "$d").metrics.jsonl"
  done
fi
exit $rc
