"""benchmarks/gpu_suite.py: its --tiny mode end to end (real deepspeed launches on one CPU rank),
and a failed run becoming a row instead of ending the suite."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_suite  # noqa: E402

ROWS = [
    "raw-seed",
    "raw-efficient",
    "raw-matched",
    "stage1-zero2",
    "stage2-zero2",
    "stage2-zero3",
    "stage2-matched",
    "stage2-shipped",
]


def test_tiny_suite_runs_every_row_and_writes_one_table(tmp_path):
    out = tmp_path / "suite.json"
    cmd = [sys.executable, "benchmarks/gpu_suite.py", "--tiny", "--work", str(tmp_path / "w")]
    cmd += ["--out", str(out), "--batch", "2", "--steps", "2", "--raw-steps", "1"]
    cmd += ["--raw-warmup", "0", "--clips", "4", "--matched-clips", "2", "--seconds", "4"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    report = json.loads(out.read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == ROWS
    for name, row in rows.items():
        assert row["error"] is None, (name, row["error"])
        assert row["ms_per_step"] > 0 and row["audio_s_per_s"] > 0 and row["tokens_per_s"] > 0
        assert row["mfu"] is None  # no MFU on a CPU
        assert f"| {name} |" in proc.stdout  # the printed table has every run
    durations = report["mixed_durations"]
    assert abs(durations["mean_s"] - 12.7) < 0.05 and durations["min_s"] >= 1.0
    # the comparable pair: no padding on either side, same batch shape
    raw, ds = rows["raw-matched"], rows["stage2-matched"]
    assert raw["padding"] == 0 and ds["padding"] == 0
    raw_json = json.loads(Path(raw["source"]).read_text())
    assert raw_json["batch_shape"]["input_ids"][0] == 2
    overhead = report["comparable_pair"]["overhead"]
    assert overhead["ratio"] == pytest.approx(ds["ms_per_step"] / raw["ms_per_step"])
    assert "raw-matched vs stage2-matched" in report["table"]


def test_a_failed_run_is_a_row_with_its_error(tmp_path):
    args = gpu_suite.parse_args(["--tiny", "--work", str(tmp_path), "--out", str(tmp_path / "o")])
    row = gpu_suite.Row("broken", "deepspeed", "a launch that exits 3", 2)
    cmd = [sys.executable, "-c", "import sys; print('no GPU', file=sys.stderr); sys.exit(3)"]
    assert not gpu_suite._run(args, cmd, row, tmp_path / "broken.log")
    assert row.error.startswith("exit 3") and "no GPU" in row.error
    args.launch_timeout = 1
    slow = gpu_suite.Row("slow", "raw", "a run past its timeout", 2)
    assert not gpu_suite._run(
        args, [sys.executable, "-c", "import time; time.sleep(30)"], slow, tmp_path / "slow.log"
    )
    assert "timed out after 1 s" in slow.error
    report = {"rows": [vars(row), vars(slow)], "comparable_pair": {"overhead": None}}
    text = gpu_suite.table(report)
    assert "| broken | 2 | failed: exit 3" in text and "| slow | 2 | failed: timed out" in text


def test_default_outputs_keep_tiny_and_gpu_results_apart():
    tiny = gpu_suite.parse_args(["--tiny"])
    gpu = gpu_suite.parse_args([])
    assert tiny.out.name == "gpu_suite_tiny_cpu.json" and gpu.out.name == "gpu_suite.json"
    assert (tiny.steps, tiny.workers, tiny.peak_tflops) == (4, 0, 0.0)
    assert (gpu.steps, gpu.workers, gpu.peak_tflops) == (20, 4, 989.0)
