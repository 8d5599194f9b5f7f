"""benchmarks/gpu_suite.py: its --tiny mode end to end (real deepspeed launches and `audio-llm
eval` on one CPU rank), rows written as they finish, the deadline, runs stopped with their
children, and benchmarks/probe.py's instruments."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_suite  # noqa: E402

ROWS = [
    "raw-matched",
    "stage2-matched",
    "stage2-shipped",
    "stage2-zero2",
    "stage2-zero3",
    "eval-greedy",
    "eval-beam-ctc",
    "raw-efficient",
    "raw-seed",
    "stage1-zero2",
]
TINY = ["--tiny", "--batch", "2", "--steps", "2", "--raw-steps", "1", "--raw-warmup", "0"]
TINY += ["--clips", "4", "--matched-clips", "2", "--seconds", "4", "--eval-clips", "4"]


def test_tiny_suite_runs_every_row_and_copies_each_to_out(tmp_path):
    out, copies = tmp_path / "suite.json", tmp_path / "OUT"
    cmd = [sys.executable, "benchmarks/gpu_suite.py", *TINY, "--work", str(tmp_path / "w")]
    cmd += ["--out", str(out)]
    env = {**os.environ, "OUT": str(copies)}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    report = json.loads(out.read_text())
    assert report["complete"] and json.loads((copies / "suite.json").read_text()) == report
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == ROWS
    for name, row in rows.items():
        assert row["error"] is None, (name, row["error"])
        assert f"| {name} |" in proc.stdout  # the printed tables have every run
        assert (copies / "logs" / f"{name}.{Path(row['logs'][0]).name}").is_file()
        if row["kind"] == "eval":
            continue
        assert row["ms_per_step"] > 0 and row["audio_s_per_s"] > 0 and row["tokens_per_s"] > 0
        assert row["mfu_useful"] is None and row["mfu_executed"] is None  # no MFU on a CPU
        # padding and the 30 s window are executed, not useful
        assert 0 < row["tflops_useful"] <= row["tflops_executed"] * (1 + 1e-9), name
    # the shipped config pads every clip to Whisper's 30 s window: much less is useful
    shipped = rows["stage2-shipped"]
    assert shipped["tflops_useful"] < 0.8 * shipped["tflops_executed"]
    calls = shipped["checkpoint_calls"]
    assert isinstance(calls, int)
    assert shipped["note"].startswith("not checkpointing" if calls == 0 else "checkpointing:")
    for name in ("eval-greedy", "eval-beam-ctc"):
        d = rows[name]["details"]
        assert d["utterances"] == 4 and d["utterances_per_s"] > 0, name
        assert 0 <= d["hypothesis_tokens_mean"] <= 48, name  # the demo's max_new_tokens
    assert rows["eval-greedy"]["details"]["ctc_share"] == 0
    assert 0 < rows["eval-beam-ctc"]["details"]["ctc_share"] < 1
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


def test_rows_are_on_disk_as_they_finish_and_the_deadline_marks_the_rest(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path / "OUT"))
    monkeypatch.setattr(gpu_suite, "MIN_RUN_S", 0.5)
    args = gpu_suite.parse_args(["--tiny", "--out", str(tmp_path / "s.json"), "--deadline-s", "3"])
    args.launch_timeout = 10.0
    suite = gpu_suite.Suite(args)
    seen: list[tuple[int, int, float]] = []  # rows in the file and in $OUT, timeout given

    def run(row: gpu_suite.Row, seconds: float) -> None:
        on_disk = json.loads(args.out.read_text())["rows"]
        copied = json.loads((tmp_path / "OUT" / "s.json").read_text())["rows"]
        seen.append((len(on_disk), len(copied), seconds))
        time.sleep(min(seconds, 1.5))  # the second run uses up the rest of the deadline

    rows = [gpu_suite.Row(f"r{i}", "raw", "", 1) for i in range(4)]
    suite.save(complete=False)
    suite.run([gpu_suite.Planned(row, run) for row in rows])
    assert [s[:2] for s in seen] == [(0, 0), (1, 1)]  # each run saw every earlier row saved
    assert 2.5 < seen[0][2] <= 3 and seen[1][2] <= 1.5  # each got the time left, not 10 s
    report = json.loads(args.out.read_text())
    assert [r["error"] for r in report["rows"]] == [None, None] + ["not run: deadline"] * 2
    assert "| r3 | 1 | not run: deadline |" in report["table"]


def test_a_deadline_inside_preparation_records_every_row_as_not_run(tmp_path):
    out = tmp_path / "s.json"
    cmd = [sys.executable, "benchmarks/gpu_suite.py", *TINY, "--work", str(tmp_path / "w")]
    cmd += ["--out", str(out), "--deadline-s", "0.5"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["complete"]
    assert [(r["name"], r["error"]) for r in report["rows"]] == [
        (name, "not run: deadline") for name in ROWS
    ]


def _alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        return "State:\tZ" not in status.read_text()  # a zombie has ended
    except FileNotFoundError:
        return False


def test_a_run_past_its_timeout_is_stopped_with_its_children(tmp_path):
    args = gpu_suite.parse_args(["--tiny", "--work", str(tmp_path), "--out", str(tmp_path / "o")])
    pid_file = tmp_path / "child.pid"
    spawn = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)"
    )
    row = gpu_suite.Row("launcher", "deepspeed", "a launcher whose rank outlives it", 2)
    assert not gpu_suite._run(args, [sys.executable, "-c", spawn], row, tmp_path / "l.log", 3)
    assert "timed out after 3 s" in row.error
    child, ends = int(pid_file.read_text()), time.monotonic() + 5
    while _alive(child) and time.monotonic() < ends:  # a signal is delivered, not awaited
        time.sleep(0.1)
    assert not _alive(child)  # the rank went with its launcher


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


def test_probe_counts_checkpoint_calls_and_keeps_deepspeeds_argument_order(tmp_path):
    script = tmp_path / "ckpt.py"
    script.write_text(
        "import sys, torch\n"
        "from torch.utils.checkpoint import checkpoint\n"  # bound after the probe's patch
        "assert sys.argv[1:] == ['--local_rank=0', 'x=1'], sys.argv\n"
        "x = torch.ones(2, requires_grad=True)\n"
        "for _ in range(3):\n"
        "    checkpoint(torch.sin, x, use_reentrant=False).sum().backward()\n"
    )
    record = tmp_path / "probe.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "probe.py"), "--local_rank=0", str(script)]
    env = {**os.environ, "AUDIO_LLM_PROBE": str(record)}
    proc = subprocess.run([*cmd, "x=1"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(record.read_text())["checkpoint_calls"] == 3


def test_checkpoint_note_says_when_a_run_does_not_checkpoint():
    row = gpu_suite.Row("shipped", "deepspeed", "", 8, checkpoint_calls=0)
    gpu_suite.checkpoint_note(row, layers=28, micro_batches=4)
    assert row.note == "not checkpointing: 0 checkpoint calls"
    row.checkpoint_calls = 112
    gpu_suite.checkpoint_note(row, layers=28, micro_batches=4)
    assert row.note.startswith("checkpointing: 28.0 calls per micro-batch")


def test_default_outputs_keep_tiny_and_gpu_results_apart():
    tiny = gpu_suite.parse_args(["--tiny"])
    gpu = gpu_suite.parse_args([])
    assert tiny.out.name == "gpu_suite_tiny_cpu.json" and gpu.out.name == "gpu_suite.json"
    assert (tiny.steps, tiny.workers, tiny.peak_tflops) == (4, 0, 0.0)
    assert (gpu.steps, gpu.workers, gpu.peak_tflops) == (20, 4, 989.0)
    assert gpu.deadline_s == 420 and gpu.eval_clips == 256 <= gpu.clips
