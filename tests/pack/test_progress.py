"""Progress of `audio-llm pack`: a line of clips done, clips/s and ETA every interval when the
output is not a terminal, nothing with --quiet."""

import io
import json

import numpy as np
import soundfile as sf

from audio_llm.cli import main
from audio_llm.pack.progress import PackProgress


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_not_a_terminal_one_line_per_interval():
    stream, clock = io.StringIO(), FakeClock()
    progress = PackProgress(1000, stream=stream, interval=10.0, clock=clock)
    for _ in range(30):  # 30 clips in 9 s: no line yet
        clock.now += 0.3
        progress.update()
    assert stream.getvalue() == ""
    for _ in range(20):  # 50 clips in 15 s: one line, at the clip that crossed 10 s
        clock.now += 0.3
        progress.update()
    lines = stream.getvalue().splitlines()
    assert lines == ["pack: 34/1000 clips (3.4%), 3.3 clips/s, ETA 4:50"]
    progress.close()  # the final count, whatever the interval
    assert stream.getvalue().splitlines()[-1] == "pack: 50/1000 clips (5.0%), 3.3 clips/s, ETA 4:45"


def test_resumed_clips_count_as_done_but_not_in_the_rate():
    stream, clock = io.StringIO(), FakeClock()
    progress = PackProgress(7200, done=3600, label="pack part 1/2", stream=stream, clock=clock)
    clock.now += 60
    progress.update(60)
    assert progress.line() == "pack part 1/2: 3660/7200 clips (50.8%), 1.0 clips/s, ETA 59:00"


def test_quiet_prints_nothing():
    stream, clock = io.StringIO(), FakeClock()
    progress = PackProgress(10, quiet=True, stream=stream, interval=0.0, clock=clock)
    clock.now += 1
    progress.update(10)
    progress.close()
    assert stream.getvalue() == ""


def test_cli_progress_goes_to_a_log_file_and_quiet_silences_it(tmp_path, capsys):
    sf.write(tmp_path / "a.wav", np.zeros(8000, dtype=np.float32) + 0.1, 16000)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"audio_filepath": "a.wav", "text": "hi"}) + "\n")
    args = ["pack", "--input", str(manifest), "--out", str(tmp_path / "out")]
    assert main(args) == 0
    err = capsys.readouterr().err  # captured: not a terminal
    assert "pack: 1/1 clips (100.0%)" in err and "clips/s" in err and "\r" not in err
    assert main([*args, "--overwrite", "--quiet"]) == 0
    assert capsys.readouterr().err == ""
