"""audio_llm.dist: launcher environments, single-process answers, and real 2-rank launches.

The multi-process tests start real `deepspeed` / `torchrun` / SLURM-style launches of this file
(`python -m tests.test_dist --out DIR`, the worker at the bottom), each under its own timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from audio_llm import dist

REPO = Path(__file__).resolve().parents[1]
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


def read_ranks(out_dir: Path, world: int) -> list[dict]:
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]


# -- environment mapping ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("nodelist", "host"),
    [
        ("gpu017", "gpu017"),
        ("gpu[003-006,9]", "gpu003"),
        ("gpu[12,14],cpu1", "gpu12"),
        ("a1,b2", "a1"),
        ("rack1-n[07-08]-ib", "rack1-n07-ib"),
    ],
)
def test_first_host_of_a_slurm_nodelist(nodelist, host):
    assert dist.first_host(nodelist) == host


def test_launcher_variables_are_used_as_given():
    env = {
        "RANK": "3",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "3",
        "MASTER_ADDR": "h",
        "MASTER_PORT": "1",
    }
    assert dist.launch_env(env) == env


def test_slurm_variables_map_to_torch_distributed():
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "gpu[003-006]",
    }
    assert dist.launch_env(env) == {
        "RANK": "5",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "gpu003",
        "MASTER_PORT": dist.DEFAULT_MASTER_PORT,
    }


def test_explicit_master_beats_slurm_nodelist():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "gpu[1-2]"}
    env |= {"MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "4242"}
    resolved = dist.launch_env(env)
    assert (resolved["MASTER_ADDR"], resolved["MASTER_PORT"]) == ("10.1.2.3", "4242")


def test_launcher_variables_win_over_slurm():
    # srun running the deepspeed launcher: SLURM describes the node task, RANK the real rank.
    env = {"RANK": "7", "WORLD_SIZE": "16", "LOCAL_RANK": "7", "SLURM_PROCID": "0"}
    env |= {"SLURM_NTASKS": "2"}
    assert dist.launch_env(env)["RANK"] == "7"


def test_no_launcher_means_none():
    assert dist.launch_env({"PATH": "/bin"}) is None


# -- single process --------------------------------------------------------------------------
@pytest.fixture
def no_launcher(monkeypatch):
    for key in [*dist.DIST_VARS, "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"]:
        monkeypatch.delenv(key, raising=False)
    if dist.is_initialized():
        pytest.skip("a process group exists in this pytest process")


def test_single_process_answers(no_launcher):
    assert (dist.rank(), dist.world_size(), dist.local_rank(), dist.is_main()) == (0, 1, 0, True)
    dist.barrier()  # must return, not wait for anyone
    dist.shutdown()
    assert dist.all_gather_object({"a": 1}) == [{"a": 1}]
    assert dist.broadcast_object("x") == "x"
    if not torch.cuda.is_available():
        assert dist.device() == torch.device("cpu")


def test_rank_before_init_comes_from_the_launcher_env(no_launcher, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert (dist.rank(), dist.world_size(), dist.local_rank(), dist.is_main()) == (3, 4, 1, False)


def test_seed_everything_repeats_every_generator():
    def draw():
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    dist.seed_everything(123)
    first = draw()
    dist.seed_everything(123)
    assert draw() == first
    dist.seed_everything(124)
    assert draw() != first


# -- real launches ---------------------------------------------------------------------------
def _check_two_ranks(results: list[dict]) -> None:
    for r, res in enumerate(results):
        assert res["rank"] == r
        assert res["world_size"] == 2
        assert res["is_main"] == (r == 0)
        assert res["gathered"] == [0, 10]
        assert res["broadcast"] == "from rank 0"
        assert res["backend"] == ("nccl" if torch.cuda.is_available() else "gloo")


def test_two_ranks_under_the_deepspeed_launcher(tmp_path):
    out = run_launch(deepspeed_cmd(2, "tests.test_dist", "--out", str(tmp_path)), worker_env())
    assert out.returncode == 0, out.stdout[-4000:]
    results = read_ranks(tmp_path, 2)
    _check_two_ranks(results)
    assert [r["local_rank"] for r in results] == [0, 1]


def test_two_ranks_under_torchrun(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(dist.free_port()), "-m", "tests.test_dist", "--out", str(tmp_path)]
    out = run_launch(cmd, worker_env())
    assert out.returncode == 0, out.stdout[-4000:]
    _check_two_ranks(read_ranks(tmp_path, 2))


def test_two_ranks_from_slurm_variables_alone(tmp_path):
    # What `srun --ntasks=2 python ...` gives each task: SLURM variables, no RANK/MASTER_*.
    port = str(dist.free_port())
    procs = []
    for r in range(2):
        env = worker_env(
            SLURM_PROCID=str(r),
            SLURM_NTASKS="2",
            SLURM_LOCALID=str(r),
            SLURM_JOB_NODELIST="127.0.0.[1-1]",
            MASTER_PORT=port,
        )
        cmd = [sys.executable, "-m", "tests.test_dist", "--out", str(tmp_path)]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True))
    try:
        logs = [p.communicate(timeout=LAUNCH_TIMEOUT_S)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)[-4000:]
    results = read_ranks(tmp_path, 2)
    _check_two_ranks(results)
    assert results[1]["master_addr"] == "127.0.0.1"


# -- worker (run by the launches above) ------------------------------------------------------
def _worker(out_dir: Path) -> None:
    dist.init_distributed()
    dist.init_distributed()  # idempotent: a second call must not fail or re-create the group
    me = dist.rank()
    result = {
        "rank": me,
        "world_size": dist.world_size(),
        "local_rank": dist.local_rank(),
        "is_main": dist.is_main(),
        "gathered": dist.all_gather_object(me * 10),
        "broadcast": dist.broadcast_object(f"from rank {me}", src=0),
        "backend": torch.distributed.get_backend(),
        "master_addr": os.environ["MASTER_ADDR"],
    }
    dist.barrier()
    (out_dir / f"rank{me}.json").write_text(json.dumps(result))
    dist.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher's
    _worker(parser.parse_args().out)
