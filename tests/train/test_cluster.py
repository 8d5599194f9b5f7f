"""audio_llm.train.cluster in one process: stop signals, heartbeats, and the messages an OOM or a
stalled rank ends a run with. The real multi-rank launches are in tests/integration/test_cluster.py.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from audio_llm.config import Config, load_config
from audio_llm.errors import AudioLLMError
from audio_llm.train import faults
from audio_llm.train.cluster import (
    Heartbeat,
    OutOfMemory,
    RanksStalled,
    RunGuard,
    StopSignals,
    describe_oom,
    describe_stall,
    is_collective_failure,
)


def test_a_second_stop_signal_is_recorded_and_ignored():
    before = signal.getsignal(signal.SIGUSR1)
    signals = StopSignals(["USR1"])
    signals.install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)  # e.g. the launcher's, during the save: no exception
        assert signals.requested and signals.received == "SIGUSR1" and signals.count == 2
    finally:
        signals.restore()
    assert signal.getsignal(signal.SIGUSR1) == before


def test_stop_signals_config_accepts_names_and_refuses_unknown_ones():
    cfg = load_config(None, ["train.stop_signals=TERM,SIGUSR2"])
    assert cfg.train.stop_signals == ["TERM", "SIGUSR2"]
    assert Config().train.stop_signals == ["SIGTERM", "SIGUSR1"]
    with pytest.raises(AudioLLMError, match="unknown signal 'SIGFOO'"):
        load_config(None, ["train.stop_signals=SIGFOO"])
    with pytest.raises(AudioLLMError, match="collective_timeout_s must be > 0"):
        load_config(None, ["train.collective_timeout_s=0"])


def test_heartbeat_rewritten_in_place_stays_one_json_object(tmp_path):
    beat = Heartbeat(tmp_path, rank=0, world=2)
    beat.beat(done=7, message="x" * 200)
    beat.beat(done=8, message="")  # shorter: the old tail must be cut
    beats = beat.read_all()
    assert beats[0]["done"] == 8 and beats[0]["message"] == ""
    assert beats[1] == {}  # rank 1 has written nothing yet
    beat.close()


def test_a_stall_names_the_ranks_that_did_not_arrive_and_their_last_step():
    beats = {
        0: {"done": 4, "waiting": 5, "status": "running", "time": 0, "host": "a", "pid": 1},
        1: {"done": 4, "waiting": 4, "status": "running", "time": 0, "host": "b", "pid": 2},
        2: {"done": 4, "waiting": 5, "status": "running", "time": 0, "host": "c", "pid": 3},
    }
    message = describe_stall(beats, me=0, step=5, timeout_s=60, error=RuntimeError("Timed out"))
    assert "rank(s) [1] did not arrive: rank 1 (last completed step 4, " in message
    assert "b pid 2" in message and "train.collective_timeout_s=60" in message


def test_an_oom_message_names_the_batch_the_plan_and_the_settings(model_config):
    stats = {"samples": 3, "audio_seconds": 41.5, "positions": 900, "longest_seconds": 19.25}
    stats["audio_positions"] = 600
    cfg = Config(model=model_config)
    message = describe_oom(12, [{"stats": stats}, {"stats": stats}], cfg)
    assert "ran out of memory in step 12: batch of 6 clips (2 micro-batch(es))" in message
    assert "83.0 s of audio, 1800 LLM positions, longest clip 19.2 s" in message
    for setting in ("data.max_batch_seconds", "data.batch_size", "gradient_checkpointing"):
        assert setting in message
    # the plan for this config and batch: 3 clips of 13.8 s mean, 100 text tokens each
    assert "`audio-llm plan` expects " in message, message
    assert " GiB per GPU for 3 clips of 13.8 s and 100 text tokens each" in message
    assert "says at most " in message and "with gradient checkpointing" in message


def test_only_collective_errors_count_as_a_failed_collective():
    closed = "[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:48328"
    assert is_collective_failure(RuntimeError(closed))
    assert not is_collective_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_collective_failure(ValueError("gloo"))


def test_watch_turns_an_oom_into_a_message_the_peers_read(tmp_path):
    guard = RunGuard(Config(), tmp_path)
    try:
        guard.begin(3)
        oom = pytest.raises(OutOfMemory, match="rank 0 ran out of memory in step 3")
        with oom as caught, guard.watch():
            raise torch.OutOfMemoryError("CUDA out of memory")
        assert caught.value.exit_code == 3
        beat = json.loads(guard.heartbeat.path(0).read_text())
        assert beat["status"] == "out_of_memory" and beat["message"] == str(caught.value)

        # As a peer: the collective fails, rank 1's heartbeat says why
        guard.heartbeat.world = 2
        guard.heartbeat.path(1).write_text(
            json.dumps({"status": "out_of_memory", "message": "rank 1 ran out of memory"})
        )
        guard.heartbeat.beat(status="running")
        with pytest.raises(OutOfMemory, match="^rank 1 ran out of memory$"), guard.watch():
            raise RuntimeError("Connection closed by peer")
        guard.heartbeat.path(1).write_text(json.dumps({"status": "running", "done": 2}))
        guard.heartbeat.beat(status="running", waiting=3)
        with pytest.raises(RanksStalled, match=r"rank\(s\) \[1\] did not arrive"), guard.watch():
            raise RuntimeError("Timed out waiting 5000ms for recv operation (gloo)")
        with pytest.raises(RuntimeError, match="shapes"), guard.watch():
            raise RuntimeError("shapes cannot be multiplied")  # a bug stays a bug
    finally:
        guard.close()


def test_fault_points_match_their_exact_step_and_rank(monkeypatch):
    monkeypatch.setenv("AUDIO_LLM_FAULT", "in_step:12:oom")
    faults.fault_point("in_step", 1)  # not step 1 of "12"
    faults.fault_point("after_step", 12)
    with pytest.raises(torch.OutOfMemoryError):
        faults.fault_point("in_step", 12)
    monkeypatch.setenv("AUDIO_LLM_FAULT_RANK", "1")
    faults.fault_point("in_step", 12)  # this process is rank 0
    monkeypatch.setenv("AUDIO_LLM_FAULT_RANK", "0")
    monkeypatch.setenv("AUDIO_LLM_FAULT", "in_step:2:explode")
    with pytest.raises(ValueError, match="unknown action"):
        faults.fault_point("in_step", 2)
