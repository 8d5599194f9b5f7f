# Shared by launch/single_node.sh and launch/multi_node.sh (sourced, not run).

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# check_stage SCRIPT STAGE: exit 2 unless STAGE is 1 or 2.
check_stage() {
  case "$2" in
    1 | 2) ;;
    *) echo "$1: STAGE must be 1 or 2 (got '$2')" >&2; exit 2 ;;
  esac
}

# NUM_GPUS, unless set: the GPUs nvidia-smi lists, else 1.
default_num_gpus() {
  if [[ -z "${NUM_GPUS:-}" ]]; then
    NUM_GPUS="$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)"
    [[ "$NUM_GPUS" -ge 1 ]] || NUM_GPUS=1
  fi
}

# run_stage STAGE LAUNCHER... -- ARGS...: the launcher, then launch/stageSTAGE.py with DS_CONFIG
# and ARGS; printed instead of run when DRY_RUN=1.
run_stage() {
  local stage="$1"
  shift
  local launcher=()
  while [[ "$1" != "--" ]]; do launcher+=("$1"); shift; done
  shift
  local cmd=(
    "${launcher[@]}"
    "$ROOT/launch/stage${stage}.py" --deepspeed_config "${DS_CONFIG:-$ROOT/ds_configs/zero2.json}"
    "$@"
  )
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q' "${cmd[0]}"
    printf ' %q' "${cmd[@]:1}"
    echo
  else
    exec "${cmd[@]}"
  fi
}
