"""Cluster life with real 2-rank `deepspeed` launches of launch/stage1.py (CPU ranks, tiny models):
a SIGTERM to the whole process group (SLURM's time limit) saves the step the ranks agree on and
resumes bit for bit; an out-of-memory step on one rank and a rank that stalls past
`train.collective_timeout_s` stop every rank with a message that says what happened.

Faults come from `AUDIO_LLM_FAULT` (audio_llm/train/faults.py). Every launch has its own timeout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from audio_llm.dist import free_port
from audio_llm.train.checkpoint import latest, tag_for
from audio_llm.train.cluster import EXIT_OOM, EXIT_PREEMPTED, EXIT_STALLED
from tests.integration.test_train_launch import DEEPSPEED, REPO, _env, common, launch, losses

GRACE_S = 30  # SLURM's default KillWait, and the DeepSpeed launcher's wait before its SIGKILL
TIMEOUT_S = 300


def _start(overrides: list[str], env: dict[str, str]) -> subprocess.Popen:
    """A 2-rank stage-1 launch in a process group of its own (as a SLURM job step is)."""
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port())]
    cmd += [str(REPO / "launch" / "stage1.py"), "--deepspeed_config"]
    cmd += [str(REPO / "ds_configs" / "zero2.json"), *overrides]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _finish(proc: subprocess.Popen) -> str:
    """Everything the launch printed, once every process of it has closed its output."""
    try:
        return proc.communicate(timeout=TIMEOUT_S)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"launch hung:\n{proc.communicate()[0][-4000:]}")


def _heartbeats(run: Path) -> dict[int, dict]:
    return {r: json.loads((run / "heartbeat" / f"rank_{r:05d}.json").read_text()) for r in (0, 1)}


@pytest.mark.timeout(900)  # three launches on shared CPUs
def test_sigterm_to_the_process_group_saves_the_agreed_step_and_resumes_exactly(
    tiny_models, tmp_path
):
    steps, k = 8, 3
    # save_every beyond the run: the only checkpoint before the end is the preemption's. A
    # loader worker: the group's SIGTERM reaches it too, and must not fail the rank's step.
    extra = ["train.save_every=100", "data.num_workers=1"]
    ref = tmp_path / "ref"
    launch(1, [*common(tiny_models, ref, steps), *extra])
    reference = losses(ref)

    run = tmp_path / "preempted"
    overrides = [*common(tiny_models, run, steps), *extra]
    # rank 0 SIGTERMs its process group (launcher and both ranks) right after step k
    proc = _start(overrides, {"AUDIO_LLM_FAULT": f"after_step:{k}:term-group"})
    # The `deepspeed` runner has no handler: it dies of the signal at once, which times it.
    assert proc.wait(timeout=TIMEOUT_S) == -signal.SIGTERM
    signalled = time.monotonic()
    out = _finish(proc)
    took = time.monotonic() - signalled
    assert took < GRACE_S, (took, out[-3000:])

    saved = latest(run)
    assert saved is not None and saved.name in (tag_for(k), tag_for(k + 1)), out[-3000:]
    assert [p.name for p in (run / "checkpoints").glob("step_*")] == [saved.name]
    for rank in (0, 1):
        assert f"rank {rank}: SIGTERM on this rank: stopped after step" in out, out[-3000:]
        assert f"(exit {EXIT_PREEMPTED}: resume with --resume auto)" in out
    assert {b["status"] for b in _heartbeats(run).values()} == {"preempted"}
    assert not (run / "summary.json").exists()

    launch(1, overrides)  # --resume auto: on from the preemption checkpoint
    summary = json.loads((run / "summary.json").read_text())
    assert summary["start_step"] == int(saved.name.removeprefix("step_"))
    resumed = losses(run)
    assert resumed == reference  # bit for bit, the steps before the stop and after it
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, steps + 1)), logged  # each step once


@pytest.mark.timeout(300)
def test_a_rank_without_a_launcher_exits_with_the_preempted_code(tiny_models, tmp_path):
    # `python launch/stage1.py` (or srun, one task per GPU): nothing between the signal and
    # the rank, so the process's own status is what the job sees
    run = tmp_path / "alone"
    cmd = [sys.executable, str(REPO / "launch" / "stage1.py"), "--deepspeed_config"]
    cmd += [str(REPO / "ds_configs" / "zero2.json"), *common(tiny_models, run, steps=6)]
    env = _env({"AUDIO_LLM_FAULT": "after_step:1:term-group"})
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        start_new_session=True,
    )
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr[-3000:]
    assert latest(run) == run / "checkpoints" / tag_for(2)


@pytest.mark.timeout(600)
def test_out_of_memory_on_one_rank_stops_every_rank_with_its_message(tiny_models, tmp_path):
    run = tmp_path / "oom"
    began = time.monotonic()
    proc = launch(
        1,
        common(tiny_models, run, steps=6),  # save_every=2: step 2 is checkpointed first
        env={"AUDIO_LLM_FAULT": "in_step:3:oom", "AUDIO_LLM_FAULT_RANK": "1"},
        expect_ok=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == EXIT_OOM, out[-3000:]
    assert time.monotonic() - began < 120  # nobody waited out a collective timeout
    # rank 0 learns of it in the gradient all-reduce of step 3's backward
    message = "rank 1 ran out of memory in step 3: batch of 2 clips (1 micro-batch(es)), "
    for rank in (0, 1):
        assert f"rank {rank}: {message}" in out, out[-3000:]
    assert "data.max_batch_seconds" in out and "model.gradient_checkpointing=true" in out
    assert "`audio-llm plan` expects " in out  # for this config and batch
    assert latest(run) == run / "checkpoints" / tag_for(2)  # the last checkpoint is intact
    beats = _heartbeats(run)
    assert beats[1]["status"] == "out_of_memory" and beats[0]["status"] == "peer_out_of_memory"


@pytest.mark.timeout(600)
def test_a_stalled_rank_is_named_with_its_last_step_when_the_timeout_fires(tiny_models, tmp_path):
    run = tmp_path / "stall"
    proc = launch(
        1,
        [*common(tiny_models, run, steps=6), "train.collective_timeout_s=10"],
        env={"AUDIO_LLM_FAULT": "before_step:3:sleep-25", "AUDIO_LLM_FAULT_RANK": "1"},
        expect_ok=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == EXIT_STALLED, out[-3000:]
    assert (
        "rank 0: a collective in step 3 failed on rank 0 (train.collective_timeout_s=10): "
        "rank(s) [1] did not arrive: rank 1 (last completed step 2, " in out
    ), out[-3000:]
    assert {b["status"] for b in _heartbeats(run).values()} == {"stalled"}  # both ended
