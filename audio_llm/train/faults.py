"""Fault injection for the recovery tests: `AUDIO_LLM_FAULT=WHERE:STEP[:ACTION]` acts on one rank
(`AUDIO_LLM_FAULT_RANK`, default 0) when it reaches that point. Unset (always, outside tests),
it does nothing. The points: `before_step`, `in_step` (batches fetched, before the forward),
`in_save` (files written, no marker yet) and `after_step`. ACTION is one of:

- `kill` (the default): SIGKILL this process, as a lost node or the kernel's OOM killer would;
- `term-group`: SIGTERM this process group (launcher and every rank), as SLURM does at a time
  limit or a preemption;
- `oom`: raise `torch.OutOfMemoryError`, as a CUDA allocation that does not fit would;
- `sleep-SECONDS`: stall this rank, as a hung file system or a dead node would.
"""

from __future__ import annotations

import logging
import os
import signal
import time

from audio_llm import dist

log = logging.getLogger(__name__)


def fault_point(where: str, step: int) -> None:
    """Act as `AUDIO_LLM_FAULT` says if it names this point and step, on the chosen rank."""
    before, found, action = os.environ.get("AUDIO_LLM_FAULT", "").partition(f"{where}:{step}")
    if not found or before or action[:1] not in ("", ":"):  # not this point (or 1 vs 12)
        return
    if dist.rank() != int(os.environ.get("AUDIO_LLM_FAULT_RANK", "0")):
        return
    action = action[1:] or "kill"
    log.warning("AUDIO_LLM_FAULT=%s:%d: %s", where, step, action)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "term-group":
        os.killpg(os.getpgid(0), signal.SIGTERM)
    elif action == "oom":
        import torch

        raise torch.OutOfMemoryError(f"AUDIO_LLM_FAULT: out of memory at {where}:{step}")
    elif action.startswith("sleep-"):
        time.sleep(float(action.removeprefix("sleep-")))
    else:
        raise ValueError(f"AUDIO_LLM_FAULT: unknown action {action!r}")
