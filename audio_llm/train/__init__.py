"""Training under DeepSpeed: the step loop (`trainer`), resumable checkpoints (`checkpoint`), the
DeepSpeed config (`ds_config`) and op-build environment (`ds_ops`), the LR schedule (`schedule`),
metrics and TensorBoard (`metrics`) and fault injection for the recovery tests (`faults`).

May import everything below it (`config`, `dist`, `model`, `data`, `evaluation` for periodic
eval and the export at the end, `planning.flops` for MFU); nothing imports `train` but
`launch/` and the CLI.
"""
