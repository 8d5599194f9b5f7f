#!/usr/bin/env bash
# Train on several machines through the `deepspeed` launcher, in one of two modes.
#
# (a) ssh mode: run once, on the first node; the launcher starts the others with pdsh/ssh.
#     HOSTFILE=hostfile launch/multi_node.sh STAGE [ARGS...]
#     (hostfile lines: "HOSTNAME slots=GPUS"; see launch/hostfile.example)
#
# (b) per-node mode (no ssh between nodes): run on every node, with its own NODE_RANK.
#     NODE_RANK=0 NUM_NODES=2 MASTER_ADDR=10.0.0.1 launch/multi_node.sh STAGE [ARGS...]   # node 0
#     NODE_RANK=1 NUM_NODES=2 MASTER_ADDR=10.0.0.1 launch/multi_node.sh STAGE [ARGS...]   # node 1
#     MASTER_ADDR is node 0's address. DeepSpeed still wants a hostfile to count nodes and
#     slots: HOSTFILE if given, else one is written with NUM_NODES lines "node-I slots=NUM_GPUS".
#
# STAGE       1 or 2: runs launch/stage${STAGE}.py; ARGS go to it (--config FILE, key=value)
# NUM_GPUS    GPUs per node (default: nvidia-smi's count, else 1)
# DS_CONFIG   DeepSpeed JSON (default: ds_configs/zero2.json)
# MASTER_PORT rendezvous port (default 29500)
# DRY_RUN=1   print the command instead of running it
#
# Every node needs this checkout at the same path, and train.out_dir on a shared filesystem.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
STAGE="${1:?usage: launch/multi_node.sh STAGE [ARGS...] (STAGE is 1 or 2)}"
shift
check_stage launch/multi_node.sh "$STAGE"

GPUS_GIVEN="${NUM_GPUS:-}"
default_num_gpus
MASTER_PORT="${MASTER_PORT:-29500}"
launcher=("${DEEPSPEED:-deepspeed}")

if [[ -n "${NODE_RANK:-}" ]]; then
  : "${NUM_NODES:?per-node mode needs NUM_NODES (and MASTER_ADDR)}"
  : "${MASTER_ADDR:?per-node mode needs MASTER_ADDR, the address of node 0}"
  if (( NODE_RANK < 0 || NODE_RANK >= NUM_NODES )); then
    echo "launch/multi_node.sh: NODE_RANK=$NODE_RANK is outside 0..$((NUM_NODES - 1))" >&2
    exit 2
  fi
  if [[ -z "${HOSTFILE:-}" ]]; then
    # Only the node count and slots matter with --no_ssh: names are labels.
    HOSTFILE="$(mktemp "${TMPDIR:-/tmp}/audio_llm_hostfile.XXXXXX")"
    for ((i = 0; i < NUM_NODES; i++)); do echo "node-$i slots=$NUM_GPUS"; done >"$HOSTFILE"
  fi
  launcher+=(
    --hostfile "$HOSTFILE" --no_ssh --num_nodes "$NUM_NODES" --num_gpus "$NUM_GPUS"
    --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
  )
elif [[ -n "${HOSTFILE:-}" ]]; then
  if [[ ! -f "$HOSTFILE" ]]; then
    echo "launch/multi_node.sh: HOSTFILE '$HOSTFILE' does not exist" >&2
    exit 2
  fi
  launcher+=(--hostfile "$HOSTFILE" --master_port "$MASTER_PORT")
  [[ -z "${MASTER_ADDR:-}" ]] || launcher+=(--master_addr "$MASTER_ADDR")
  [[ -z "${NUM_NODES:-}" ]] || launcher+=(--num_nodes "$NUM_NODES")
  [[ -z "$GPUS_GIVEN" ]] || launcher+=(--num_gpus "$GPUS_GIVEN")  # else the hostfile's slots
else
  echo "launch/multi_node.sh: set HOSTFILE (ssh mode) or NODE_RANK/NUM_NODES/MASTER_ADDR" \
    "(per-node mode); see the comment at the top" >&2
  exit 2
fi

run_stage "$STAGE" "${launcher[@]}" -- "$@"
