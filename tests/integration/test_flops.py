"""FLOPs and MFU in launched processes: a training run logging them, the GPU step benchmark's CPU
smoke run, and benchmarks/flops.py against the issue 7 targets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_training_logs_tflops_and_mfu(tiny_models, tmp_path):
    """One real single-rank launch: the step's analytic FLOPs over its wall time reach
    metrics.jsonl as perf/tflops_per_device and perf/mfu = that / train.peak_tflops (model
    FLOPs of real tokens), and the executed ones (padding included) as perf/hfu, never less."""
    from tests.integration.test_train_launch import common, launch

    out = tmp_path / "run"
    launch(1, [*common(tiny_models, out, 2), "train.peak_tflops=0.5"], gpus=1)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    perf = [r for r in rows if "perf/tflops_per_device" in r]
    assert [r["step"] for r in perf] == [1, 2]
    for row in perf:
        assert row["perf/tflops_per_device"] > 0
        assert row["perf/mfu"] == pytest.approx(row["perf/tflops_per_device"] / 0.5)
        executed = row["perf/executed_tflops_per_device"]
        assert row["perf/hfu"] == pytest.approx(executed / 0.5)
        assert executed >= row["perf/tflops_per_device"]
        # template and instruction positions are counted: some, never all
        assert 0 < row["perf/prompt_position_ratio"] < 1


def test_gpu_step_benchmark_runs_tiny_on_cpu(tmp_path):
    out = tmp_path / "gpu_step.json"
    script = ["benchmarks/gpu_step.py", "--tiny", "--steps", "2", "--warmup", "1"]
    proc = subprocess.run(
        [sys.executable, *script, "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["timed_steps"] == 2
    assert report["step_s"] > 0 and report["tflops_per_device"] > 0
    assert report["mfu"] == pytest.approx(report["tflops_per_device"] / report["peak_tflops"])
    assert "step" in proc.stdout and "MFU" in proc.stdout


def test_flops_benchmark_meets_issue_7_targets(tmp_path):
    """benchmarks/flops.py on a smaller corpus: efficient settings >= 4x fewer FLOPs per trained
    audio-second than the seed, <= 5% padded encoder frames and LLM positions (exit 0 = met)."""
    out = tmp_path / "flops.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/flops.py", "--utterances", "4000", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-2000:])
    report = json.loads(out.read_text())
    seed, efficient = report["settings"][0], report["settings"][-1]
    assert seed["padded_fraction"]["encoder_frames"] > 0.5  # 30 s windows for ~12.7 s clips
    assert report["seed_over_efficient"] >= 4.0
    assert efficient["padded_fraction"]["encoder_frames"] <= 0.05
    assert efficient["padded_fraction"]["llm_positions"] <= 0.05
