#!/usr/bin/env bash
# The one script to run on a lent GPU machine (no network there): build, bench, CUDA tests, the demo,
# then the whole suite. Everything lands under $OUT (logs, bench.json, results CSV, PNG), and a
# short summary is printed last, ending with one verdict per goal of #18. Budget: under 8 minutes
# on an H100 (not yet verified with the end-to-end and host-cost rows).
#   OUT=/tmp/out bash bench/gpu_check.sh          # full
#   QUICK=1 OUT=/tmp/out bash bench/gpu_check.sh  # bench --quick, for a short lease
#   BUDGET=400 QUICK=1 OUT=/tmp/out bash bench/gpu_check.sh  # no step started past 400 s in all
#                                                  (see bench/gpu_steps.sh); the summary always prints
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:?set OUT to a folder for the results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOLARIA_REQUIRE_NATIVE=1
unset TRITON_INTERPRET
python=python3
source bench/gpu_steps.sh  # step NAME LIMIT COMMAND..., the status array, BUDGET

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
step build 240 $python -m pip install --no-build-isolation --no-deps -e . || { printf '%s\n' "${status[@]}"; exit 1; }
step doctor 60 $python -m tolaria doctor
# The bench first: its ratios are what the goals are judged on, and a lease that runs out later
# still returns them (bench.json is rewritten, and the CSV rows appended, after each scenario
# group). It has the end-to-end rows (governor.snapshot(), execute_rollback(), GuardedStep blocking
# and deferred) and, on CUDA, the host time of a guarded step's Governor calls.
quick=()
[ "${QUICK:-0}" = 1 ] && quick=(--quick)
step bench 420 $python -m tolaria.bench --device cuda "${quick[@]}" --out "$OUT" --csv "$OUT/results.csv"
# --durations: the slowest tests, to keep this step inside a short lease.
step cuda-tests 300 $python -m pytest -m cuda -q -rfE -p no:cacheprovider --durations=15
# The demo on the GPU: every scheduled fault detected, rolled back and recovered from (exit 0).
step demo 120 $python -m tolaria demo --device cuda --out "$OUT/demo"
step full-suite "${FULL_SUITE_LIMIT:-240}" $python -m pytest -q -x -rfE -p no:cacheprovider -m "not cuda"
echo
echo "== summary"
{
  cat "$OUT/gpu.txt"
  printf '%s\n' "${status[@]}"
  [ -f "$OUT/bench.json" ] && $python - "$OUT/bench.json" <<'PY'
import json, sys
data = json.load(open(sys.argv[1]))
for line in data["summary"]:
    print("-", line)
for error in data.get("errors", []):
    print("! scenario group failed:", error)
if not data.get("complete", True):
    print("! bench.json is partial: the bench stopped before its last scenario group")
PY
  # One verdict per goal of #18, judged on this run's bench.json (measurements, not test results).
  if [ -f "$OUT/bench.json" ]; then
    echo "goals of #18:"
    $python -m tolaria.bench.goals "$OUT/bench.json"
  fi
} | tee "$OUT/summary.txt"
# Back on the development machine: python -m bench.collect_gpu_results <folder with these files>
