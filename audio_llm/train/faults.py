"""Fault injection for the recovery tests: `AUDIO_LLM_FAULT=WHERE:STEP` SIGKILLs rank 0 at that
point, as a lost node or an OOM kill would. Unset (always, outside tests), it does nothing."""

from __future__ import annotations

import logging
import os
import signal

from audio_llm import dist

log = logging.getLogger(__name__)


def fault_point(where: str, step: int) -> None:
    """Kill this process (rank 0 only) if `AUDIO_LLM_FAULT` names this point and step."""
    if os.environ.get("AUDIO_LLM_FAULT") == f"{where}:{step}" and dist.is_main():
        log.warning("AUDIO_LLM_FAULT=%s:%d: killing this process", where, step)
        os.kill(os.getpid(), signal.SIGKILL)
