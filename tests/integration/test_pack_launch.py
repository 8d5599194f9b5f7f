"""`audio-llm pack` in parts as clusters run it: launch/pack_array.sbatch as three SLURM array
tasks, and `torchrun` with `--part auto`; both end with the index one process writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from audio_llm.pack.writer import PackOptions, pack
from tests.integration.launch import REPO, run_launch, worker_env

SCRIPT = REPO / "launch" / "pack_array.sbatch"


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> tuple[Path, Path]:
    """A 9-clip manifest and its one-process pack (3 clips a shard)."""
    root = tmp_path_factory.mktemp("pack_launch")
    rows = []
    for i in range(9):
        t = np.arange(int((0.3 + 0.05 * i) * 16000)) / 16000
        sf.write(root / f"c{i}.wav", (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), 16000)
        rows.append(json.dumps({"audio_filepath": f"c{i}.wav", "text": f"clip {i}", "id": f"u{i}"}))
    (root / "m.jsonl").write_text("\n".join(rows) + "\n")
    pack([root / "m.jsonl"], PackOptions(out=root / "one", max_samples=3, quiet=True))
    return root / "m.jsonl", root / "one"


def _same_output(a: Path, b: Path) -> bool:
    files = [p.name for p in sorted(a.iterdir()) if p.is_file()]
    assert "index.json" in files and len(files) == 4
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in files)


def test_pack_array_script_parses_and_is_executable():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    assert os.access(SCRIPT, os.X_OK)


def test_pack_array_tasks_pack_the_parts(packed, tmp_path):
    manifest, one = packed
    out = tmp_path / "out"
    env = worker_env(AUDIO_LLM=f"{sys.executable} -m audio_llm.cli", SLURM_ARRAY_TASK_COUNT="3")
    flags = ["--input", str(manifest), "--out", str(out), "--max-samples", "3", "--quiet"]
    for task in (2, 0, 1):  # any order: the last to finish writes the index
        run = subprocess.run(
            ["bash", str(SCRIPT), *flags],
            env=env | {"SLURM_ARRAY_TASK_ID": str(task)},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr
        assert f"part {task}/3: blocks {task}-{task}" in run.stdout
    assert "3 shard(s) + index.json" in run.stdout
    assert _same_output(out, one)


def test_pack_array_refuses_to_run_outside_an_array(tmp_path):
    run = subprocess.run(
        ["bash", str(SCRIPT), "--out", str(tmp_path)],
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode != 0 and "--array=0-N-1" in run.stderr


def test_torchrun_part_auto(packed, tmp_path):
    manifest, one = packed
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3"]
    cmd += ["-m", "audio_llm.cli", "pack", "--part", "auto", "--input", str(manifest)]
    cmd += ["--out", str(out), "--max-samples", "3", "--quiet"]
    run = run_launch(cmd, worker_env())
    assert run.returncode == 0, run.stdout[-3000:]
    for part in range(3):
        assert f"part {part}/3: blocks {part}-{part}" in run.stdout
    assert _same_output(out, one)


KILLED_PACK = """
import os, signal, sys
from audio_llm.cli import main
from audio_llm.pack import prepare

real, calls = prepare.encode_flac, []

def encode(audio):
    calls.append(1)
    if len(calls) == int(os.environ["KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)  # no finally, no cleanup: as the OOM killer does
    return real(audio)

prepare.encode_flac = encode
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_mid_pack_then_resume_equals_one_pack(packed, tmp_path):
    manifest, one = packed
    out = tmp_path / "out"
    args = ["pack", "--input", str(manifest), "--out", str(out), "--max-samples", "3", "--quiet"]
    cmd = [sys.executable, "-c", KILLED_PACK, *args]
    run = subprocess.run(cmd, env=worker_env(KILL_AT="5"), capture_output=True, timeout=120)
    assert run.returncode == -9  # in block 1: block 0 is finished, block 1's shard half written
    assert [p.name for p in out.glob("*.tar")] == ["shard-000000.tar"]
    assert len(list(out.glob(".shard-000001.tar.*.tmp"))) == 1
    kept = (out / "shard-000000.tar").stat()
    run = subprocess.run(cmd, env=worker_env(KILL_AT="0"), capture_output=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "kept 1 finished block(s)" in run.stdout.decode()
    assert (out / "shard-000000.tar").stat().st_mtime_ns == kept.st_mtime_ns
    assert not list(out.glob(".*.tmp")) and _same_output(out, one)
