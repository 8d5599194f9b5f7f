"""audio_llm.dist on real 2-rank launches.

The tests start real `deepspeed` / `torchrun` / SLURM-style launches of this file
(`python -m tests.integration.test_dist --out DIR`, the worker at the bottom), each under its own
timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from audio_llm import dist
from tests.integration.launch import LAUNCH_TIMEOUT_S, REPO, deepspeed_cmd, run_launch, worker_env


def read_ranks(out_dir: Path, world: int) -> list[dict]:
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]


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
    extensions = tmp_path / "torch_extensions"  # empty: any op built at init would land here
    cmd = deepspeed_cmd(2, "tests.integration.test_dist", "--out", str(tmp_path))
    out = run_launch(cmd, worker_env(TORCH_EXTENSIONS_DIR=str(extensions)))
    assert out.returncode == 0, out.stdout[-4000:]
    results = read_ranks(tmp_path, 2)
    _check_two_ranks(results)
    assert [r["local_rank"] for r in results] == [0, 1]
    if not torch.cuda.is_available():
        # CPU: DeepSpeed's shm comm op (inference all-reduce only) is neither compiled nor
        # given its /dev/shm buffers
        assert not extensions.exists() or not any(extensions.iterdir())
        port = cmd[cmd.index("--master_port") + 1]
        assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def test_two_ranks_under_torchrun(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(dist.free_port())]
    cmd += ["-m", "tests.integration.test_dist", "--out", str(tmp_path)]
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
        cmd = [sys.executable, "-m", "tests.integration.test_dist", "--out", str(tmp_path)]
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
