"""audio_llm.dist: launcher environments and single-process answers (the real 2-rank launches
are in tests/integration/test_dist.py)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from audio_llm import dist


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
