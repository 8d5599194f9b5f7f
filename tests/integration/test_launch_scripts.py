"""launch/*.sh and launch/slurm.sbatch: syntax, the commands they build (DRY_RUN=1), and real
launches of a stand-in stage script on this machine (CPU ranks).

The real launches copy the scripts into a temporary tree whose `launch/stage1.py` only reports
what each rank sees, so they test the scripts and the launcher, not training.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from audio_llm import dist
from tests.integration.launch import REPO, run_launch, worker_env

SCRIPTS = ["single_node.sh", "multi_node.sh", "slurm.sbatch"]

STAND_IN_STAGE = """
import argparse, json, os, sys
from pathlib import Path
from audio_llm import dist

parser = argparse.ArgumentParser()
parser.add_argument("--local_rank", type=int)
parser.add_argument("--deepspeed_config")
parser.add_argument("--config")
args, overrides = parser.parse_known_args()
dist.init_distributed()
out = Path(os.environ["OUT_DIR"])
info = {"rank": dist.rank(), "world": dist.world_size(), "local_rank": dist.local_rank(),
        "ranks": dist.all_gather_object(dist.rank()), "ds_config": args.deepspeed_config,
        "config": args.config, "overrides": overrides}
(out / f"rank{dist.rank()}.json").write_text(json.dumps(info))
dist.shutdown()
"""


def script_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No launcher/SLURM variables, temporary files under `tmp_path`."""
    env = worker_env()
    for key in ("NUM_GPUS", "NUM_NODES", "NODE_RANK", "HOSTFILE", "DS_CONFIG", "DEEPSPEED"):
        env.pop(key, None)
    env.update(extra, TMPDIR=str(tmp_path))
    return env


def launch_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """`script_env` for real launches: this venv's `deepspeed`, output to `tmp_path`.

    The launcher is named through DEEPSPEED rather than by putting the venv on PATH: the venv's
    ninja differs from the system's, and mixing them rebuilds DeepSpeed's JIT ops (a minute).
    """
    env = script_env(tmp_path, **extra)
    env["DEEPSPEED"] = str(Path(sys.executable).parent / "deepspeed")
    env["OUT_DIR"] = str(tmp_path)
    return env


def dry_run(script: str, *args: str, env: dict[str, str], root: Path = REPO):
    return subprocess.run(
        ["bash", str(root / "launch" / script), *args],
        env=env | {"DRY_RUN": "1"},
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(REPO / "launch" / script)]).returncode == 0


@pytest.mark.parametrize("script", ["single_node.sh", "multi_node.sh"])
def test_scripts_are_executable(script):
    assert os.access(REPO / "launch" / script, os.X_OK)


def test_single_node_command(tmp_path):
    env = script_env(tmp_path, NUM_GPUS="8", DS_CONFIG="ds_configs/zero3.json")
    out = dry_run("single_node.sh", "2", "--config", "my run.yaml", "train.lr=1e-4", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (
        f"deepspeed --num_gpus 8 --master_port 29500 {REPO}/launch/stage2.py "
        r"--deepspeed_config ds_configs/zero3.json --config my\ run.yaml train.lr=1e-4"
    )


def test_single_node_counts_gpus_with_nvidia_smi(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text(
        '#!/bin/sh\nfor i in 0 1 2 3; do echo "GPU $i: H100 (UUID: x)"; done\n'
    )
    (fake / "nvidia-smi").chmod(0o755)
    env = script_env(tmp_path)
    env["PATH"] = f"{fake}:{env['PATH']}"
    out = dry_run("single_node.sh", "1", env=env)
    assert f"--num_gpus 4 --master_port 29500 {REPO}/launch/stage1.py" in out.stdout
    assert f"--deepspeed_config {REPO}/ds_configs/zero2.json" in out.stdout


def test_without_gpus_one_rank(tmp_path):
    out = dry_run("single_node.sh", "1", env=script_env(tmp_path))
    assert "--num_gpus 1 " in out.stdout


@pytest.mark.parametrize("script", ["single_node.sh", "multi_node.sh"])
def test_bad_stage_is_refused(tmp_path, script):
    out = dry_run(script, "3", env=script_env(tmp_path, HOSTFILE="x"))
    assert out.returncode == 2 and "STAGE must be 1 or 2" in out.stderr


def test_multi_node_per_node_command_and_hostfile(tmp_path):
    env = script_env(tmp_path, NODE_RANK="1", NUM_NODES="2", NUM_GPUS="8", MASTER_ADDR="10.0.0.1")
    out = dry_run("multi_node.sh", "2", "--config", "run.yaml", env=env)
    assert out.returncode == 0, out.stderr
    match = re.fullmatch(
        r"deepspeed --hostfile (\S+) --no_ssh --num_nodes 2 --num_gpus 8 --node_rank 1 "
        rf"--master_addr 10\.0\.0\.1 --master_port 29500 {REPO}/launch/stage2\.py "
        rf"--deepspeed_config {REPO}/ds_configs/zero2\.json --config run\.yaml",
        out.stdout.strip(),
    )
    assert match, out.stdout
    assert Path(match.group(1)).read_text().splitlines() == ["node-0 slots=8", "node-1 slots=8"]


def test_multi_node_ssh_mode_command(tmp_path):
    hostfile = tmp_path / "hostfile"
    shutil.copy(REPO / "launch" / "hostfile.example", hostfile)
    env = script_env(tmp_path, HOSTFILE=str(hostfile), MASTER_PORT="6000")
    out = dry_run("multi_node.sh", "1", "train.max_steps=10", env=env)
    assert out.stdout.strip() == (
        f"deepspeed --hostfile {hostfile} --master_port 6000 {REPO}/launch/stage1.py "
        f"--deepspeed_config {REPO}/ds_configs/zero2.json train.max_steps=10"
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({}, "set HOSTFILE"),
        ({"HOSTFILE": "/nonexistent/hostfile"}, "does not exist"),
        ({"NODE_RANK": "0", "MASTER_ADDR": "h"}, "NUM_NODES"),
        ({"NODE_RANK": "2", "NUM_NODES": "2", "MASTER_ADDR": "h"}, "outside 0..1"),
    ],
)
def test_multi_node_refuses_incomplete_settings(tmp_path, extra, message):
    out = dry_run("multi_node.sh", "1", env=script_env(tmp_path, **extra))
    assert out.returncode != 0 and message in out.stderr


def test_hostfile_example_parses_for_deepspeed():
    from deepspeed.launcher.runner import fetch_hostfile

    pool = fetch_hostfile(str(REPO / "launch" / "hostfile.example"))
    assert dict(pool) == {"node-01": 8, "node-02": 8}


def _stand_in_tree(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "launch").mkdir(parents=True)
    for script in SCRIPTS:
        shutil.copy2(REPO / "launch" / script, root / "launch" / script)
    shutil.copy2(REPO / "launch" / "_common.sh", root / "launch" / "_common.sh")
    shutil.copytree(REPO / "ds_configs", root / "ds_configs")
    (root / "launch" / "stage1.py").write_text(STAND_IN_STAGE)
    return root


def test_slurm_job_runs_one_launcher_per_node(tmp_path):
    root = _stand_in_tree(tmp_path)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/sh\necho gpu-a17\necho gpu-b03\n")
    # srun: drop its options, then run the task once per node, as SLURM would on each node.
    (fake / "srun").write_text(
        "#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\n"
        'for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i "$@"; done\n'
    )
    for stub in fake.iterdir():
        stub.chmod(0o755)
    env = script_env(
        tmp_path,
        SLURM_JOB_NODELIST="gpu-a17,gpu-b03",
        SLURM_NNODES="2",
        SLURM_JOB_ID="42",
        SLURM_SUBMIT_DIR=str(root),
        SLURM_GPUS_ON_NODE="4",
    )
    env["PATH"] = f"{fake}:{env['PATH']}"
    out = subprocess.run(
        ["bash", str(root / "launch" / "slurm.sbatch"), "1", "--config", "run.yaml"],
        env=env | {"DRY_RUN": "1"},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2
    for node, line in enumerate(lines):
        assert re.fullmatch(
            rf"deepspeed --hostfile \S+ --no_ssh --num_nodes 2 --num_gpus 4 --node_rank {node} "
            rf"--master_addr gpu-a17 --master_port 29500 {root}/launch/stage1\.py "
            rf"--deepspeed_config {root}/ds_configs/zero2\.json --config run\.yaml",
            line,
        ), line


def test_slurm_job_stops_its_step_and_requeues_on_the_time_limit_notice(tmp_path):
    root = _stand_in_tree(tmp_path)
    fake = tmp_path / "bin"
    fake.mkdir()
    calls = tmp_path / "scontrol.calls"
    (fake / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\necho gpu-a17\n')
    # srun: a job step whose ranks take SIGTERM, save, and exit 75 (preempted, resumable)
    started = tmp_path / "step.started"
    (fake / "srun").write_text(
        f"#!/usr/bin/env bash\ntrap 'echo step got TERM; kill $!; exit 75' TERM\ntouch {started}\n"
        "sleep 60 & wait\n"
    )
    for stub in fake.iterdir():
        stub.chmod(0o755)
    env = script_env(tmp_path, SLURM_JOB_NODELIST="gpu-a17", SLURM_NNODES="1", SLURM_JOB_ID="42")
    env |= {"SLURM_SUBMIT_DIR": str(root), "PATH": f"{fake}:{env['PATH']}"}
    job = subprocess.Popen(
        ["bash", str(root / "launch" / "slurm.sbatch"), "1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(job.pid, signal.SIGUSR1)  # --signal=B:USR1@120: to the batch shell only
        out = job.communicate(timeout=30)[0]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 75, out
    assert "step got TERM" in out and "then requeueing" in out
    assert "requeue 42" in calls.read_text().splitlines()


def test_single_node_script_really_launches(tmp_path):
    root = _stand_in_tree(tmp_path)
    env = launch_env(tmp_path, NUM_GPUS="2", MASTER_PORT=str(dist.free_port()))
    cmd = ["bash", str(root / "launch" / "single_node.sh"), "1", "--config", "c.yaml", "a.b=1"]
    out = run_launch(cmd, env)
    assert out.returncode == 0, out.stdout[-4000:]
    for r in range(2):
        info = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert (info["rank"], info["world"], info["ranks"]) == (r, 2, [0, 1])
        assert info["ds_config"] == f"{root}/ds_configs/zero2.json"
        assert (info["config"], info["overrides"]) == ("c.yaml", ["a.b=1"])


def test_multi_node_per_node_mode_really_launches(tmp_path):
    # Two "nodes" on this machine, each started by its own multi_node.sh, no ssh.
    root = _stand_in_tree(tmp_path)
    port = str(dist.free_port())
    procs = []
    for node in range(2):
        env = launch_env(
            tmp_path,
            NODE_RANK=str(node),
            NUM_NODES="2",
            NUM_GPUS="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        cmd = ["bash", str(root / "launch" / "multi_node.sh"), "1"]
        procs.append(
            subprocess.Popen(
                cmd,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        )
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=120)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)[-4000:]
    for r in range(2):
        info = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert (info["rank"], info["world"], info["local_rank"]) == (r, 2, 0)
