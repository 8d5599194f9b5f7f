"""Training under DeepSpeed: building a run from its config (`run.train`), the checks before
anything loads (`preflight`), one optimizer step and reading its results (`step`), the step loop
with its log lines, checkpoints, exports and evals (`trainer`), what a checkpoint holds besides
the engine (`state`: counters, data position, RNG) and how it is written and trusted
(`checkpoint`), the DeepSpeed config (`ds_config`) and op-build environment (`ds_ops`), the LR
schedule (`schedule`), metrics and TensorBoard (`metrics`), how a run ends on a cluster
(`cluster`: stop signals, out-of-memory steps, stalled ranks, heartbeats) and fault injection
for the recovery tests (`faults`).

May import everything below it (`config`, `dist`, `files`, `audio`, `model`, `data`,
`evaluation` for periodic eval and the export at the end, `planning` for MFU, durations and
the memory an OOM message quotes); nothing in the package imports `train`: `launch/stage1.py`
and `stage2.py` run it.
"""
