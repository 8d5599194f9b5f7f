"""The training run: config -> model, data, DeepSpeed engine, run state and guard -> `Trainer`.

`launch/stage1.py` and `launch/stage2.py` (through `cli/stage.py`) only parse arguments and call
`train()`: it checks the paths (`preflight`), builds the run, resumes its `RunState` (`state`) if
there is a checkpoint, and hands it all to a `Trainer` (`trainer`), whose `run()` is the loop.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from audio_llm import dist
from audio_llm.config import Config
from audio_llm.data import build_train_loader, layout_of
from audio_llm.model.build import build_audio_llm
from audio_llm.planning.flops import ModelShape
from audio_llm.train.checkpoint import CheckpointManager, resolve_resume
from audio_llm.train.cluster import RunGuard
from audio_llm.train.ds_config import build_ds_config
from audio_llm.train.metrics import MetricsLogger
from audio_llm.train.preflight import check_start
from audio_llm.train.schedule import make_scheduler
from audio_llm.train.state import RunState
from audio_llm.train.step import check_engine
from audio_llm.train.trainer import Trainer

log = logging.getLogger(__name__)


def train(cfg: Config, ds_config: str, resume: str = "auto") -> dict[str, Any]:
    """Train `cfg.train.max_steps` optimizer steps; returns a summary (rank 0 has the losses)."""
    ds_config = str(check_start(cfg, ds_config, resume))
    dist.init_distributed(timeout=timedelta(seconds=cfg.train.collective_timeout_s))
    if not torch.cuda.is_available() and cfg.model.dtype != "float32":
        log.warning("no CUDA: model.dtype %s -> float32 (CPU training)", cfg.model.dtype)
        cfg.model.dtype = "float32"
    run_dir = Path(cfg.train.out_dir)
    rank, world = dist.rank(), dist.world_size()
    dist.seed_everything(cfg.train.seed)  # identical projector/LoRA init on every rank

    model = build_audio_llm(
        cfg.model,
        cfg.lora if cfg.use_lora else None,
        device=dist.device(),
        ctc_weight=cfg.train.ctc_weight,
    )
    # from_pretrained leaves the LLM in eval mode, where transformers never checkpoints a layer
    # (and dropout is off): train in training mode from step 1, fresh or resumed, not only after
    # the first eval restores it. AudioLLM.train keeps the frozen encoder in eval.
    model.train()
    loader = build_train_loader(cfg.data, layout_of(model), rank=rank, world_size=world)
    ds = build_ds_config(ds_config, cfg, world)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    flops_shape = ModelShape.from_model(model)  # before ZeRO-3 partitions the weights away
    from audio_llm.train.ds_ops import normalize_cuda_arch_list

    normalize_cuda_arch_list()  # before deepspeed.initialize JIT-builds FusedAdam ('9.0a')
    import deepspeed  # after the cheap checks: importing it costs seconds

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds,
        lr_scheduler=lambda opt: make_scheduler(opt, cfg.train),
    )
    check_engine(engine)
    checkpoints = CheckpointManager(run_dir, cfg.train.keep_last)
    state = RunState(cfg, loader)
    resume_from = resolve_resume(resume, run_dir)
    if resume_from is not None:
        state.resume(engine, resume_from)
        log.info("rank %d resumed from %s at step %d", rank, resume_from, state.step)

    # Steps after the checkpoint are logged again: an earlier attempt's rows there are dropped.
    logger = MetricsLogger(run_dir, purge_step=state.step + 1 if resume_from is not None else 0)
    if dist.is_main():
        log.info(
            "stage %d: %d trainable parameters, %d ranks, %d batches per rank per epoch",
            cfg.train.stage,
            trainable,
            world,
            loader.batches_per_epoch,
        )
        (run_dir / "config.yaml").write_text(_yaml(cfg))
    # stop signals and the heartbeat from here on
    guard = RunGuard(cfg, run_dir, zero_stage=engine.zero_optimization_stage())
    trainer = Trainer(
        cfg, engine, loader, state, checkpoints, logger, flops_shape, trainable, guard=guard
    )
    try:
        return trainer.run()
    finally:
        guard.close()


def _yaml(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
