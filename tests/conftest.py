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
    """Mark every test collected from tests/integration/ as `integration`. On an xdist worker
    (`make test`: `-n 2 --dist loadfile --no-loadscope-reorder`), also put those modules first.

    The launch modules are most of the suite's time (up to a few minutes each); the unit modules
    take seconds. Started first, the launch modules spread over both workers and the many short
    unit modules even out the two workers' ends. Stable (collection order within each kind), so
    every worker collects the same order, as xdist requires. loadfile keeps a module on one
    worker: a module-scoped fixture (one launch, many assertions) still runs once."""
    for item in items:
        if item.path.resolve().is_relative_to(INTEGRATION):
            item.add_marker(pytest.mark.integration)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: not item.get_closest_marker("integration"))


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Every test starts on one torch thread and leaves it so. Code under test may raise the
    process's count (the demo's reading pretraining takes every core): left raised, every later
    test in the process (an xdist worker runs hundreds) ran on all cores beside the other worker
    and was several times slower."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


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
