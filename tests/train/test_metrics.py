"""audio_llm.train.metrics: TensorBoard + JSONL logging, throughput, progress line, rank skew."""

from __future__ import annotations

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from audio_llm import dist
from audio_llm.train.metrics import (
    METRICS_FILE,
    TENSORBOARD_DIR,
    MetricsLogger,
    StepCounts,
    StepTimer,
    format_duration,
    format_progress,
    step_time_skew,
    throughput,
)


def test_scalars_reach_tensorboard_event_files(tmp_path):
    with MetricsLogger(tmp_path, enabled=True) as logger:
        logger.scalars(1, {"train/loss": 2.5, "train/lr": torch.tensor(1e-4)})
        logger.scalars(2, {"train/loss": 2.0})
        logger.text(2, "samples/0", "hello world")

    events = EventAccumulator(str(tmp_path / TENSORBOARD_DIR))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [(e.step, e.value) for e in loss] == [(1, 2.5), (2, 2.0)]
    assert events.Scalars("train/lr")[0].value == pytest.approx(1e-4)
    assert "samples/0/text_summary" in events.Tags()["tensors"]


def test_every_call_appends_one_json_line(tmp_path):
    with MetricsLogger(tmp_path, enabled=True) as logger:
        logger.scalars(1, {"train/loss": 2.5})
        logger.scalars(2, {"train/loss": float("nan")})
        logger.text(2, "samples/0", "hello")
    rows = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 2]
    assert rows[0]["train/loss"] == 2.5
    assert rows[1]["train/loss"] == "nan"  # strict JSON has no NaN; still visible
    assert (rows[2]["tag"], rows[2]["text"]) == ("samples/0", "hello")
    assert all("time" in r for r in rows)


def test_resumed_run_appends_to_the_same_jsonl(tmp_path):
    for step in (1, 2):
        with MetricsLogger(tmp_path, enabled=True) as logger:
            logger.scalars(step, {"x": step})
    assert len((tmp_path / METRICS_FILE).read_text().splitlines()) == 2


def test_resumed_run_drops_the_earlier_attempts_rows_past_its_checkpoint(tmp_path):
    with MetricsLogger(tmp_path, enabled=True) as killed:  # logged steps 1-7, saved at step 4
        for step in range(1, 8):
            killed.scalars(step, {"train/loss": 10.0 + step})
        killed.text(7, "eval/examples", "REF: a  \nHYP: b")
    with (tmp_path / METRICS_FILE).open("a") as f:
        f.write('{"step": 8, "train/lo')  # the row a SIGKILL cut short
    with MetricsLogger(tmp_path, enabled=True, purge_step=5) as resumed:
        for step in range(5, 9):
            resumed.scalars(step, {"train/loss": 1.0 + step})
    rows = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))  # one row per step, in order
    assert [r["train/loss"] for r in rows] == [11.0, 12.0, 13.0, 14.0, 6.0, 7.0, 8.0, 9.0]
    assert not list(tmp_path.glob(".*tmp*"))  # the rewrite left no temp file behind

    events = EventAccumulator(str(tmp_path / TENSORBOARD_DIR))
    events.Reload()
    curve = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert curve == [
        (1, 11.0),
        (2, 12.0),
        (3, 13.0),
        (4, 14.0),
        (5, 6.0),
        (6, 7.0),
        (7, 8.0),
        (8, 9.0),
    ]


def test_a_run_restarted_from_scratch_starts_a_new_curve(tmp_path):
    with MetricsLogger(tmp_path, enabled=True) as first:
        first.scalars(1, {"x": 1.0})
    with MetricsLogger(tmp_path, enabled=True, purge_step=0) as again:
        again.scalars(1, {"x": 2.0})
    rows = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [(r["step"], r["x"]) for r in rows] == [(1, 2.0)]


def test_disabled_logger_writes_nothing(tmp_path):
    run = tmp_path / "run"
    logger = MetricsLogger(run, enabled=False)
    logger.scalars(1, {"x": 1.0})
    logger.text(1, "t", "s")
    logger.close()
    assert not run.exists()


def test_logger_is_enabled_on_rank_zero_only(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    if dist.is_initialized():
        pytest.skip("a process group exists in this pytest process")
    assert not MetricsLogger(tmp_path / "r1").enabled
    monkeypatch.setenv("RANK", "0")
    logger = MetricsLogger(tmp_path / "r0")
    assert logger.enabled
    logger.close()


def test_throughput_rates_by_hand():
    counts = StepCounts(
        steps=4,
        samples=32,
        audio_seconds=320.0,
        tokens=3000,
        positions=4000,
        data_wait_s=1.0,
        step_s=8.0,
    )
    assert throughput(counts) == pytest.approx(
        {
            "samples_per_s": 4.0,
            "audio_s_per_s": 40.0,
            "tokens_per_s": 375.0,
            "padding_ratio": 0.25,
            "data_wait_frac": 0.125,
            "step_s": 2.0,
        }
    )


def test_throughput_of_nothing_is_zero_not_an_error():
    assert set(throughput(StepCounts()).values()) == {0.0}


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_step_timer_splits_data_wait_from_compute():
    clock = FakeClock()
    timer = StepTimer(clock=clock)
    for wait, compute in ((0.5, 1.5), (0.0, 2.0)):
        clock.now += wait
        timer.data_ready()
        clock.now += compute
        assert timer.step_done(samples=8, audio_seconds=80.0, tokens=90, positions=100) == 2.0
    rates = timer.rates()
    assert rates["samples_per_s"] == pytest.approx(4.0)
    assert rates["data_wait_frac"] == pytest.approx(0.125)
    assert rates["padding_ratio"] == pytest.approx(0.1)
    assert timer.counts == StepCounts()  # reset after reading


def test_format_progress_line_with_eta():
    line = format_progress(120, 1000, 60.0, {"loss": 2.34567, "lr": 5e-4, "tokens": 2048})
    assert line == (
        "step 120/1000 (12.0%) | loss 2.346 | lr 5.00e-04 | tokens 2048 | elapsed 1m00s | eta 7m20s"
    )


def test_format_progress_eta_uses_this_runs_pace_after_resume():
    # Resumed at 500: 100 steps in 50 s -> 400 left at 0.5 s each.
    assert format_progress(600, 1000, 50.0, start_step=500).endswith("eta 3m20s")
    assert format_progress(500, 1000, 0.0, start_step=500).endswith("eta ?")


@pytest.mark.parametrize(("s", "text"), [(7.2, "7s"), (65, "1m05s"), (3725, "1h02m05s")])
def test_format_duration(s, text):
    assert format_duration(s) == text


def test_step_time_skew_single_process():
    if dist.is_initialized():
        pytest.skip("a process group exists in this pytest process")
    assert step_time_skew(2.0) == {"step_s_max": 2.0, "step_s_min": 2.0, "step_s_skew": 1.0}
