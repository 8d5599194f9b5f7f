"""Learning-rate schedule: linear warmup, then cosine, linear or no decay.

`step` counts optimizer steps already taken, so `lr_at(0)` is the rate of the first update. Warmup
climbs linearly from 0 (step 0) to `train.lr` (step `warmup_steps`); decay then runs to
`train.lr * train.min_lr_ratio` at step `max_steps`.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from audio_llm.config import TrainConfig


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """`lr_at(step, cfg) / cfg.lr`: the multiplier applied to every parameter group's base lr."""
    if step < cfg.warmup_steps:
        return step / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    decay_steps = cfg.max_steps - cfg.warmup_steps
    # No decay span (warmup_steps >= max_steps): past warmup, the floor.
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps) if decay_steps > 0 else 1.0
    if cfg.schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:  # linear
        shape = 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    return cfg.lr * lr_factor(step, cfg)


def make_scheduler(optimizer: Optimizer, cfg: TrainConfig) -> LambdaLR:
    """LambdaLR following `lr_at`; step it once per optimizer step (DeepSpeed does, if given it).

    The optimizer's lr must be `cfg.lr` (`ds_config` fills it from `train.lr`): the schedule scales
    each group's base lr, so groups with their own lr keep their ratio. Resume with
    `load_state_dict` (DeepSpeed checkpoints do this for a scheduler passed to `initialize`).
    """

    def factor(step: int) -> float:
        return lr_factor(step, cfg)

    # A plain function, not a callable object: LambdaLR then saves only its position
    # (`last_epoch`), so a resumed run follows the schedule of its *current* config.
    return LambdaLR(optimizer, factor)
