"""Training under DeepSpeed: the step loop (`trainer`), resumable checkpoints (`checkpoint`), the
DeepSpeed config (`ds_config`) and op-build environment (`ds_ops`), the LR schedule (`schedule`),
metrics and TensorBoard (`metrics`) and fault injection for the recovery tests (`faults`).

May import everything below it (`config`, `dist`, `files`, `audio`, `model`, `data`,
`evaluation` for periodic eval and the export at the end, `planning` for MFU and durations);
nothing in the package imports `train`: `launch/stage1.py` and `stage2.py` run it.
"""
