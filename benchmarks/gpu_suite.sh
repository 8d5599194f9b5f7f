#!/bin/bash
# The GPU suite in one call on the lent GPU machine (see benchmarks/README.md, "On the project's
# GPU machine"). benchmarks/gpu_suite.py itself writes its JSON, and copies each run's log,
# metrics.jsonl and probe record under $OUT/logs, the moment each row finishes (when $OUT is set),
# so a call cut off at its limit still brings back every finished row.
set -uo pipefail
cd "$(dirname "$0")/.."
exec python3 benchmarks/gpu_suite.py "$@"
