"""The demo pipeline, small: espeak-ng speech -> pack -> deepspeed stage 1 + 2 -> eval -> WER.

The WER target belongs to `make demo`; here the same code runs with a few dozen utterances and
steps and must show a falling loss and WER computed end to end on both held-out sets. A demo step's
progress display is checked on a stand-in trainer process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _converted_cache(folder: Path) -> Path:
    """A cache as a whisper-tiny.en conversion leaves it (the marker with the pinned checksum and
    its check), holding a tiny random Whisper: the demo takes its pretrained route, recipe and
    all, without downloading anything."""
    from audio_llm.demo import pretrained
    from audio_llm.model.tiny import write_tiny_whisper

    checkpoint = folder / pretrained.CHECKPOINT
    write_tiny_whisper(checkpoint, seed=3)
    marker = {"wheel_sha256": pretrained.PINNED_SHA256, "check": {"heard": "(a stand-in)"}}
    (checkpoint / pretrained.MARKER).write_text(json.dumps(marker))
    return folder


@pytest.mark.timeout(600)  # as long as its launch may take: the demo's phases, all in one
def test_small_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "audio_llm.demo", "--out", str(out), "--train-utterances", "64"]
    cmd += ["--test-utterances", "8", "--stage1-steps", "4", "--stage2-steps", "16"]
    cmd += ["--reading-steps", "20", "--pretrained-cache", str(_converted_cache(tmp_path))]
    cmd += ["--llm-alone"]  # the comparison make demo leaves out, to fit its 15 minutes
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    summary = json.loads((out / "summary.json").read_text())
    keys = ("wer_before", "wer_after_stage1", "wer_after", "wer_unseen_voice", "train_seconds")
    for key in (*keys, "total_seconds"):
        assert summary[key] is not None, key
    assert summary["llm_pretraining_seconds"] > 0  # reported apart from the training time
    assert summary["reading_loss"]["last"] < summary["reading_loss"]["first"]
    evals = {
        name: json.loads((out / "eval" / name / "summary.json").read_text())["wer"]
        for name in ("test_seen_voices", "test_unseen_voice")
    }
    # the demo reports what `audio-llm eval` measured, and 16 steps leave errors to measure
    assert summary["wer_after"] == evals["test_seen_voices"] > 0.0
    assert summary["wer_unseen_voice"] == evals["test_unseen_voice"] > 0.0
    stage2 = json.loads((out / "stage2" / "summary.json").read_text())
    losses = [stage2["losses"][k] for k in sorted(stage2["losses"], key=int)]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4  # it learns something
    for split in ("test_seen_voices", "test_unseen_voice"):
        for decoding in ("", "_llm_only"):  # joint CTC/LLM decoding, and the LLM alone
            rows = (out / "eval" / f"{split}{decoding}" / "utterances.jsonl").read_text()
            assert len(rows.splitlines()) == 8
    # the default encoder, with its recipe: 3 frames a position, the 1024-wide MLP, beam 4, CTC 0.5
    assert summary["encoder"] == "pretrained whisper-tiny.en"
    assert "reusing" in summary["encoder_source"]  # the cache above: nothing downloaded
    assert summary["decoding"] == {"ctc_weight": 0.5, "beams": 4}
    stage2_config = (out / "stage2" / "config.yaml").read_text()
    assert "projector_hidden: 1024" in stage2_config
    assert "projector_context_width: 128" in stage2_config
    assert "stack_factor: 3" in stage2_config
    assert str(tmp_path / "whisper-tiny.en") in stage2_config
    for key, name in (
        ("wer_after_llm_only", "test_seen_voices_llm_only"),
        ("wer_unseen_voice_llm_only", "test_unseen_voice_llm_only"),
    ):
        measured = json.loads((out / "eval" / name / "summary.json").read_text())["wer"]
        assert summary[key] == measured > 0.0, key
    # stage 2 continued stage 1's CTC head rather than starting it from zero
    assert (out / "stage1" / "export" / "ctc_blank.safetensors").is_file()
    assert "WER after, seen voices" in proc.stdout
    # the demo's recipe: both loss terms reach TensorBoard's metrics.jsonl
    logged = [json.loads(line) for line in (out / "stage2" / "metrics.jsonl").open()]
    assert any("train/ctc_loss" in row and "train/lm_loss" in row for row in logged)


FAKE_TRAINER = r"""
import sys, time
print("[deepspeed] launching 2 ranks", flush=True)
for step in (25, 50, 75, 100):
    line = f"step {step}/100 ({step:.1f}%) | loss {3 - step / 50:.3f} | eta {4 - step // 25}s"
    print(f"20:41:0{step // 25} [rank 0] INFO {line}", file=sys.stderr, flush=True)
    print("[rank 1] some noise the terminal does not need", flush=True)
    time.sleep(0.05)
print("20:41:05 [rank 0] INFO step 100: eval WER 12.50% over 24 utterances", file=sys.stderr)
"""


def test_a_demo_step_shows_its_progress_and_names_its_log(tmp_path, capsys):
    from audio_llm.demo.run import _run

    log = tmp_path / "stage2.log"
    _run([sys.executable, "-c", FAKE_TRAINER], log, echo_every=0)
    shown = capsys.readouterr().out
    assert f"full log: {log}" in shown
    for step in (25, 50, 75, 100):
        assert f"   step {step}/100 ({step:.1f}%) | loss " in shown, shown
    assert "eta 3s" in shown and "step 100: eval WER 12.50%" in shown
    assert "noise" not in shown and "[rank 0]" not in shown  # the rest stays in the log
    assert log.read_text().count("noise") == 4 and "[deepspeed] launching" in log.read_text()

    # rate limited: the first progress line, then the last one; WER lines always
    _run([sys.executable, "-c", FAKE_TRAINER], log, echo_every=3600)
    shown = capsys.readouterr().out
    assert [line.split(" |")[0].strip() for line in shown.splitlines() if "/100 (" in line] == [
        "step 25/100 (25.0%)",
        "step 100/100 (100.0%)",
    ]
    assert "eval WER 12.50%" in shown
