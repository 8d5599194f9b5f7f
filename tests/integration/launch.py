"""Launching helpers for the integration tests: a clean environment for launched ranks, a
launcher run that cannot hang, and the `deepspeed` command for CPU ranks on this machine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from audio_llm import dist

REPO = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT_S = 120  # a rank that never joins would otherwise hang the other for minutes


def worker_env(**extra: str) -> dict[str, str]:
    """A clean environment for launched ranks: no inherited rank variables, one thread."""
    env = {k: v for k, v in os.environ.items() if k not in dist.DIST_VARS}
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    env.update(
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(REPO),
        TORCH_EXTENSIONS_DIR=os.environ.get(
            "TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")
        ),
    )
    env.update(extra)
    return env


def run_launch(
    cmd: list[str], env: dict[str, str], timeout: float = LAUNCH_TIMEOUT_S
) -> subprocess.CompletedProcess:
    """Run a launcher command in its own process group; kill the whole group on timeout."""
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"launch timed out after {timeout}s:\n{out[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)


def deepspeed_cmd(num_ranks: int, module: str, *args: str) -> list[str]:
    """`deepspeed --num_gpus N --module MODULE ARGS` (CPU ranks on this machine)."""
    return [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        str(num_ranks),
        "--master_port",
        str(dist.free_port()),
        "--module",
        module,
        *args,
    ]
