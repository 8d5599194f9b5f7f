"""Shared fixtures: tiny checkpoints written once per session through `save_pretrained`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from audio_llm.demo.tiny import write_tiny_models

    return write_tiny_models(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="session")
def model_config(tiny_models):
    from audio_llm.config import ModelConfig

    return ModelConfig(
        encoder=str(tiny_models["whisper"]), llm=str(tiny_models["qwen2vl"]), dtype="float32"
    )
