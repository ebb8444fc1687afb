# The step runner of bench/gpu_check.sh, sourced by it (and by tests/test_gpu_steps.py).
# step NAME LIMIT COMMAND...: run COMMAND under `timeout`, its output shown and logged to
# $OUT/NAME.log, and record "NAME: rc=RC in Ns" in the array `status`.
# With BUDGET (seconds for the whole script, counted by bash's SECONDS from its start), a step
# gets at most what is left of it less RESERVE (default 15 s, for the summary), and a step that
# would get under MIN_STEP seconds (default 20) is not started: it is recorded as
# "NAME: skipped, N s of BUDGET left". So a short lease ends with the summary printed, instead
# of the machine's own limit killing the script in the middle of a step.
status=()
step() {
  local name=$1 limit=$2; shift 2
  if [ -n "${BUDGET:-}" ]; then
    local left=$((BUDGET - SECONDS - ${RESERVE:-15}))
    if [ "$left" -lt "${MIN_STEP:-20}" ]; then
      echo "== $name skipped: $((BUDGET - SECONDS)) s of BUDGET=${BUDGET} s left"
      status+=("$name: skipped, $((BUDGET - SECONDS)) s of BUDGET left")
      return 124
    fi
    [ "$left" -lt "$limit" ] && limit=$left
  fi
  echo "== $name (limit ${limit}s)"
  local began=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  status+=("$name: rc=$rc in $((SECONDS - began))s")
  return "$rc"
}
