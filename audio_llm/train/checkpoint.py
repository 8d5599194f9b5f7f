"""Resumable DeepSpeed checkpoints, trusted only once their completion marker exists.

Layout (`RUN_DIR` must be on a filesystem every node sees):

```
RUN_DIR/checkpoints/
  step_00000500/              one DeepSpeed tag: model states + ZeRO optimizer shards
    mp_rank_00_model_states.pt, *optim_states.pt ...   written by DeepSpeed, on all ranks
    rank_00000_state.pt ...   optional per-rank state (data position, RNG), one file per rank
    COMPLETE                  JSON {step, time, world_size}; written last, by rank 0
  latest_complete             tag of the newest complete checkpoint (ours)
  latest                      tag of the newest *started* save (DeepSpeed's)
  zero_to_fp32.py             DeepSpeed's recovery script
```

A save is complete only when `COMPLETE` exists: it is written after every rank has finished
writing (a barrier) and renamed into place, so a job killed mid-save leaves a folder without a
marker, which `latest()` ignores. Deleting works the other way round: the marker goes first.

DeepSpeed's own `latest` file is kept because DeepSpeed's tools default to it
(`python checkpoints/zero_to_fp32.py checkpoints out/`, `engine.load_checkpoint(dir)` without a
tag); it is written at the end of DeepSpeed's save, so it can name a tag whose marker is missing
if the job died in between. Resuming therefore never reads it: `latest()` scans for markers.

Frozen parameters (the Whisper encoder, the base LLM) are not saved: they come back from the
pretrained checkpoints when the model is rebuilt, so a checkpoint holds the trainable weights
(projector, LoRA), persistent buffers and the optimizer state. DeepSpeed's
`exclude_frozen_parameters=True` alone is not enough: it drops the names `named_parameters()`
lists, which gives a tied weight once, so the alias (Qwen2-VL's `lm_head.weight`, tied to the
frozen input embeddings: about 0.47 GB at 2B) stayed in the file. `save()` drops every name a
frozen parameter goes by. `load()` checks that only frozen parameters are absent from the file;
older checkpoints that still carry frozen weights load too (those values equal the pretrained
ones the model was rebuilt with).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from audio_llm import dist
from audio_llm.errors import AudioLLMError
from audio_llm.files import atomic_write_text
from audio_llm.train.faults import fault_point

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
MARKER = "COMPLETE"
POINTER = "latest_complete"
CLIENT_KEY = "audio_llm"  # our client state, kept apart from DeepSpeed's own checkpoint keys
SUPERSEDED = ".superseded"
TAG_RE = re.compile(r"step_(\d{8,})")


def tag_for(step: int) -> str:
    """`step_00000500`: zero-padded so tags sort by step."""
    return f"step_{step:08d}"


def is_complete(path: str | Path) -> bool:
    """True if `path` is a checkpoint folder whose save finished."""
    return (Path(path) / MARKER).is_file()


def _checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `step_*` folder, complete or not, oldest first."""
    root = run_dir / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = TAG_RE.fullmatch(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder under `run_dir`, or None."""
    complete = [path for _, path in _checkpoints(Path(run_dir)) if is_complete(path)]
    return complete[-1] if complete else None


def resolve_resume(arg: str, run_dir: str | Path) -> Path | None:
    """What to resume from: `auto` (newest complete, or None for a fresh run), `none`, or a PATH.

    A PATH must be a complete checkpoint folder (`.../checkpoints/step_XXXXXXXX`).
    """
    if arg in ("", "none"):
        return None
    if arg == "auto":
        return latest(run_dir)
    path = Path(arg)
    if not path.is_dir():
        raise AudioLLMError(f"resume checkpoint {arg!r} does not exist")
    if not is_complete(path):
        raise AudioLLMError(
            f"resume checkpoint {arg!r} has no {MARKER} marker (an interrupted save, or not a "
            f"{CHECKPOINT_DIR}/step_XXXXXXXX folder); use resume=auto for the newest complete one"
        )
    return path


def read_marker(path: str | Path) -> dict[str, Any]:
    """The marker's JSON: step, time, world size."""
    return json.loads((Path(path) / MARKER).read_text(encoding="utf-8"))


class CheckpointManager:
    """Saves `RUN_DIR/checkpoints/step_XXXXXXXX` on all ranks and keeps the newest `keep_last`."""

    def __init__(self, run_dir: str | Path, keep_last: int) -> None:
        if keep_last < 1:
            raise AudioLLMError(f"keep_last must be >= 1 (got {keep_last})")
        self.run_dir = Path(run_dir)
        self.save_dir = self.run_dir / CHECKPOINT_DIR
        self.keep_last = keep_last

    def save(
        self,
        engine: Any,
        step: int,
        client_state: dict[str, Any],
        rank_state: dict[str, Any] | None = None,
    ) -> Path:
        """Checkpoint after optimizer step `step`. Collective: every rank calls it.

        `client_state` (counters, config; the same on every rank) is stored once, in DeepSpeed's
        model-states file; `rank_state` (this rank's data position, RNG) in a file per rank.
        """
        tag = tag_for(step)
        path = self.save_dir / tag
        if dist.is_main() and path.exists():
            # An older save of this step (a resumed run repeating it, or an interrupted save):
            # start empty, so it never looks complete half-way nor mixes in stale rank shards.
            _remove(path)
        dist.barrier()
        with _without_frozen_aliases(engine):
            engine.save_checkpoint(
                str(self.save_dir),
                tag=tag,
                client_state={CLIENT_KEY: client_state},
                exclude_frozen_parameters=True,
            )
        if rank_state is not None:
            path.mkdir(parents=True, exist_ok=True)  # ranks without DeepSpeed files (no ZeRO)
            target = path / f"rank_{dist.rank():05d}_state.pt"
            torch.save(rank_state, target.with_suffix(".tmp"))
            os.replace(target.with_suffix(".tmp"), target)
        fault_point("in_save", step)  # test hook: die with the files written, no marker
        dist.barrier()  # every rank's files are written before the marker says so
        if dist.is_main():
            marker = {"step": step, "time": time.time(), "world_size": dist.world_size()}
            atomic_write_text(path / MARKER, json.dumps(marker) + "\n")
            atomic_write_text(self.save_dir / POINTER, tag + "\n")
            self._prune(step)
            log.info("checkpoint %s complete", path)
        dist.barrier()  # no rank reads the checkpoint list while rank 0 prunes it
        return path

    def _prune(self, step: int) -> None:
        for other_step, path in _checkpoints(self.run_dir):
            # Newer steps come from a run history this run left by resuming from an older
            # checkpoint; set them aside so `latest()` cannot jump back to them.
            if other_step > step:
                log.warning("setting aside %s: newer than the checkpoint just saved", path)
                shutil.rmtree(path.with_name(path.name + SUPERSEDED), ignore_errors=True)
                os.replace(path, path.with_name(path.name + SUPERSEDED))
            elif other_step < step and not is_complete(path):
                _remove(path)  # left by an interrupted save: never resumable
        complete = [path for _, path in _checkpoints(self.run_dir) if is_complete(path)]
        for path in complete[: -self.keep_last]:
            _remove(path)


def frozen_names(module: nn.Module) -> set[str]:
    """Every name a frozen parameter goes by, tied aliases included."""
    return {
        name
        for name, param in module.named_parameters(remove_duplicate=False)
        if not param.requires_grad
    }


@contextlib.contextmanager
def _without_frozen_aliases(engine: Any) -> Iterator[None]:
    """While saving, the engine's module state dict leaves out every frozen name.

    DeepSpeed's `save_checkpoint` asks `engine.module_state_dict(...)` for the weights it writes;
    an instance attribute shadows that method for the one call and is removed afterwards.
    """
    full = engine.module_state_dict
    frozen = frozen_names(engine.module)

    def trainable_state_dict(*args: Any, **kwargs: Any) -> Any:
        state = full(*args, **kwargs)
        for name in frozen & set(state):
            del state[name]
        return state

    engine.module_state_dict = trainable_state_dict
    try:
        yield
    finally:
        del engine.module_state_dict


def _remove(path: Path) -> None:
    log.info("removing checkpoint %s", path)
    (path / MARKER).unlink(missing_ok=True)  # first: a half-deleted folder is never "complete"
    shutil.rmtree(path, ignore_errors=True)


def _strict_but_frozen(frozen: set[str]) -> Any:
    """A load function for DeepSpeed: tolerate missing frozen parameters, nothing else."""

    def load(src: dict[str, torch.Tensor], dst: nn.Module) -> None:
        result = dst.load_state_dict(src, strict=False)
        missing = sorted(set(result.missing_keys) - frozen)
        unexpected = sorted(result.unexpected_keys)
        if missing or unexpected:
            raise AudioLLMError(
                f"checkpoint does not fit the model: missing trainable {missing[:5]}, "
                f"unexpected {unexpected[:5]} (was it saved with another model/LoRA config?)"
            )

    return load


def load(engine: Any, path: str | Path) -> dict[str, Any]:
    """Restore the engine (trainable weights, optimizer, lr scheduler, step counters) from a
    complete checkpoint folder and return the `client_state` given to `save`. Collective.

    Frozen parameters are not in the file; they keep the values the model was built with.
    The world size must match the save's: ZeRO shards the optimizer state per rank.
    """
    path = Path(path)
    if not is_complete(path):
        raise AudioLLMError(f"checkpoint {str(path)!r} has no {MARKER} marker")
    saved_world = read_marker(path).get("world_size")
    if saved_world is not None and saved_world != dist.world_size():
        raise AudioLLMError(
            f"checkpoint {path.name} was saved by {saved_world} ranks, this run has "
            f"{dist.world_size()}: ZeRO optimizer shards cannot be re-split; run with "
            f"{saved_world} ranks, or start fresh from its weights (zero_to_fp32)"
        )
    frozen = frozen_names(engine.module)
    load_path, client_state = engine.load_checkpoint(
        str(path.parent),
        tag=path.name,
        load_module_strict=False,
        custom_load_fn=_strict_but_frozen(frozen),
    )
    if load_path is None:
        raise AudioLLMError(f"DeepSpeed could not load checkpoint {str(path)!r}")
    return client_state.get(CLIENT_KEY, {})


def load_rank_state(path: str | Path) -> dict[str, Any] | None:
    """This rank's `rank_state` from `save`, or None if that save had none."""
    target = Path(path) / f"rank_{dist.rank():05d}_state.pt"
    if not target.is_file():
        return None
    # Our own file in the run directory; it holds RNG states that weights_only cannot load.
    return torch.load(target, map_location="cpu", weights_only=False)
