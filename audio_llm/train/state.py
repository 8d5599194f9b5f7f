"""What a checkpoint holds besides DeepSpeed's engine state: the step counters, this rank's data
position and its RNG streams (`RunState`), saved and restored as one."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from audio_llm import dist
from audio_llm.config import Config
from audio_llm.errors import AudioLLMError
from audio_llm.train.checkpoint import CheckpointManager, load, load_rank_state


def _rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class RunState:
    """What a checkpoint holds besides DeepSpeed's engine state, saved and restored as one.

    The counters (`step`, `bad_in_row`: non-finite steps in a row) and the config are the same
    on every rank: they go in the checkpoint's client state. The data position and the RNG
    streams are this rank's own: a file per rank. The keys are those every earlier run saved,
    so old run folders resume.
    """

    def __init__(self, cfg: Config, loader) -> None:
        self.cfg, self.loader = cfg, loader
        self.step, self.bad_in_row = 0, 0

    def count(self, step: int, finite: bool) -> None:
        """Step `step` is done; a skipped (non-finite) one lengthens the run of bad steps."""
        self.step = step
        self.bad_in_row = 0 if finite else self.bad_in_row + 1

    def client_state(self) -> dict[str, Any]:
        return {"step": self.step, "bad_in_row": self.bad_in_row, "config": self.cfg.to_dict()}

    def rank_state(self) -> dict[str, Any]:
        return {"loader": self.loader.state_dict(), "rng": _rng_state()}

    def save(self, checkpoints: CheckpointManager, engine) -> None:
        """A checkpoint of the engine and this state after step `self.step`. Collective."""
        checkpoints.save(engine, self.step, self.client_state(), self.rank_state())

    def resume(self, engine, path: Path) -> None:
        """Restore the engine, the counters, this rank's data position and its RNG from the
        checkpoint folder `path`. Collective."""
        client = load(engine, path)
        self.step, self.bad_in_row = int(client["step"]), int(client.get("bad_in_row", 0))
        own = load_rank_state(path)
        if own is None:
            raise AudioLLMError(f"{path}: no data position for rank {dist.rank()}")
        self.loader.load_state_dict(own["loader"])
        _set_rng_state(own["rng"])
