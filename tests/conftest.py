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


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups off the marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test collected from tests/integration/ as `integration`; on an xdist worker
    (`make test` runs `-n 2 --dist loadgroup`), also order and group the tests for two workers."""
    for item in items:
        if item.path.resolve().is_relative_to(INTEGRATION):
            item.add_marker(pytest.mark.integration)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        _schedule_for_xdist(items)


def _schedule_for_xdist(items: list[pytest.Item]) -> None:
    """The process launches (tests/integration/, about 85% of the suite's CPU time) go first and
    one by one, so the short unit tests fill the end of both workers' time (with the launches
    last, one worker was left running them alone). A unit module is sent whole, and so are the
    launch tests that share a module-scoped fixture (one launch, many assertions), split by the
    fixture's parameters: each such fixture then runs once, on one worker.

    The order is stable (collection order within each kind), the same on every worker as xdist
    requires; `--no-loadscope-reorder` keeps xdist from sorting the groups by size."""
    items.sort(key=lambda item: not item.get_closest_marker("integration"))
    for item in items:
        group = _shared_group(item)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))


def _shared_group(item: pytest.Item) -> str | None:
    """The xdist group of `item` (see `_schedule_for_xdist`), or None: a test of its own."""
    module = item.nodeid.split("::")[0]
    if not item.get_closest_marker("integration"):
        return _group_name(module)
    infos = getattr(item, "_fixtureinfo", None)
    params = getattr(getattr(item, "callspec", None), "params", {})
    shared = []
    for name, defs in infos.name2fixturedefs.items() if infos else ():
        if defs and defs[-1].scope in ("module", "package", "class"):
            shared.append(f"{name}={params[name]}" if name in params else name)
    return _group_name(f"{module}::{'+'.join(sorted(shared))}") if shared else None


def _group_name(text: str) -> str:
    """xdist splits a group off a test id at its last '@' after any ']': keep to safe characters."""
    return "".join(c if c.isalnum() or c in "._/-+=:" else "_" for c in text)


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
