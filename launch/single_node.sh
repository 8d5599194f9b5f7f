#!/usr/bin/env bash
# Train on one machine with every local GPU (one rank per GPU) through the `deepspeed` launcher.
#
# Usage: launch/single_node.sh STAGE [ARGS...]
#   launch/single_node.sh 1 --config run.yaml train.lr=1e-3
#   NUM_GPUS=4 DS_CONFIG=ds_configs/zero3.json launch/single_node.sh 2 --config run.yaml
#
# STAGE     1 (projector) or 2 (projector + LoRA): runs launch/stage${STAGE}.py
# ARGS      passed to the stage script: --config FILE and section.key=value overrides
# NUM_GPUS  ranks to start (default: GPUs listed by nvidia-smi, else 1)
# DS_CONFIG DeepSpeed JSON (default: ds_configs/zero2.json)
# MASTER_PORT  rendezvous port (default 29500; change it to run two jobs on one machine)
# DRY_RUN=1 print the command instead of running it
#
# Stopping early: SIGTERM (or SIGUSR1, to the ranks only: it kills the launcher) makes every
# rank finish its step, checkpoint the step the ranks agree on and exit 75; run the same
# command again to go on (--resume auto). The launcher passes its own SIGTERM to the ranks
# and SIGKILLs them 30 s later, so the save must fit in 30 s.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
STAGE="${1:?usage: launch/single_node.sh STAGE [ARGS...] (STAGE is 1 or 2)}"
shift
check_stage launch/single_node.sh "$STAGE"
default_num_gpus

run_stage "$STAGE" \
  "${DEEPSPEED:-deepspeed}" --num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}" -- "$@"
