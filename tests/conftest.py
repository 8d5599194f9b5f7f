"""Shared fixtures: tiny checkpoints written once per session through `save_pretrained`. Every test
under tests/integration/ (they launch processes: deepspeed, torchrun, the CLI, the demo) is marked
`integration`, so `pytest -m "not integration"` runs the unit tests alone."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

INTEGRATION = Path(__file__).resolve().parent / "integration"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test collected from tests/integration/ as `integration`."""
    for item in items:
        if item.path.resolve().is_relative_to(INTEGRATION):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from audio_llm.model.tiny import write_tiny_models

    return write_tiny_models(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="session")
def model_config(tiny_models):
    from audio_llm.config import ModelConfig

    return ModelConfig(
        encoder=str(tiny_models["whisper"]), llm=str(tiny_models["qwen2vl"]), dtype="float32"
    )
