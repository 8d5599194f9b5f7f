"""Every shipped ds_configs/*.json in a real (single-process) DeepSpeed engine, launched with the
worker at the bottom of this file."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

from audio_llm.config import Config, DataConfig, ModelConfig
from audio_llm.train.ds_config import build_ds_config
from tests.integration.launch import run_launch, worker_env
from tests.train.test_ds_config import CONFIGS, SHIPPED


def test_deepspeed_accepts_every_shipped_config(tmp_path):
    # One training step per config in a real (single-process) DeepSpeed engine.
    cmd = [sys.executable, "-m", "tests.integration.test_ds_config", "--out", str(tmp_path)]
    out = run_launch(cmd, worker_env())
    assert out.returncode == 0, out.stdout[-4000:]
    steps = json.loads((tmp_path / "steps.json").read_text())
    assert sorted(steps) == sorted(SHIPPED)
    for name, info in steps.items():
        assert info["global_steps"] == 1, name
        assert info["train_batch_size"] == 4, name
        assert info["lr"] == pytest.approx(2e-4), name


def _worker(out_dir: Path) -> None:
    import deepspeed
    import torch
    from torch import nn

    from audio_llm import dist

    dist.init_distributed()
    cfg = Config(model=ModelConfig(dtype="float32"), data=DataConfig(batch_size=2))
    cfg.train.grad_accum, cfg.train.lr = 2, 2e-4
    steps = {}
    for name in SHIPPED:
        ds = build_ds_config(CONFIGS / f"{name}.json", cfg)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=ds
        )
        for _ in range(2):  # grad_accum micro-batches make one optimizer step
            loss = engine(torch.randn(2, 4)).pow(2).mean()
            engine.backward(loss)
            engine.step()
        steps[name] = {
            "global_steps": engine.global_steps,
            "train_batch_size": engine.train_batch_size(),
            "lr": engine.get_lr()[0],
        }
    (out_dir / "steps.json").write_text(json.dumps(steps))
    dist.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--local_rank", type=int, default=None)
    _worker(parser.parse_args().out)
