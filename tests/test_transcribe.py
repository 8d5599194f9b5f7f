"""Long-audio transcription: windows, and stitching that neither drops nor doubles seam words."""

import itertools
import json
import random

import numpy as np
import pytest
import soundfile as sf

from audio_llm.encoder import SAMPLE_RATE
from audio_llm.errors import AudioLLMError
from audio_llm.tiny import vocabulary
from audio_llm.transcribe import stitch, transcribe_audio, windows


@pytest.mark.parametrize("seconds", [3.0, 30.0, 31.0, 70.0, 200.5])
def test_windows_cover_everything_with_the_overlap(seconds):
    n = int(seconds * SAMPLE_RATE)
    spans = windows(n, overlap=5.0)
    assert spans[0][0] == 0 and spans[-1][1] == n
    assert all(b - a <= 30 * SAMPLE_RATE for a, b in spans)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end - start >= 5 * SAMPLE_RATE  # every seam shares >= the overlap
    with pytest.raises(AudioLLMError, match="overlap"):
        windows(n, overlap=20.0)


class FakeDecoder:
    """Words at known times; a window 'hears' the words lying wholly inside it. Stands in for a
    model that transcribes perfectly, so any seam error is the stitching's."""

    def __init__(self, total_seconds: float, seed: int = 0) -> None:
        rng = random.Random(seed)
        words, t = [], 0.0
        while t < total_seconds - 0.6:
            length = rng.uniform(0.2, 0.5)
            words.append((rng.choice(vocabulary()), t, t + length))
            t += length + rng.uniform(0.05, 0.3)
        self.words = words
        self.audio = np.zeros(int(total_seconds * SAMPLE_RATE), dtype=np.float32)
        # mark each clip with its start time, so decode() knows where it is
        self.audio[:] = np.arange(len(self.audio)) / SAMPLE_RATE

    def __call__(self, clips):
        out = []
        for clip in clips:
            start, end = float(clip[0]), float(clip[-1])
            out.append(" ".join(w for w, a, b in self.words if a >= start and b <= end))
        return out


@pytest.mark.parametrize("seed", range(5))
def test_70s_stitches_to_exactly_the_clip_by_clip_words(seed):
    fake = FakeDecoder(70.0, seed)
    text = transcribe_audio(fake, fake.audio, overlap=5.0)
    assert text.split() == [w for w, _, _ in fake.words]


def test_stitch_keeps_shared_words_once_and_tolerates_no_overlap():
    assert stitch(["a b c d", "c d e f"], [2.0]) == "a b c d e f"
    assert stitch(["a b c", "x y z"], [2.0]) == "a b c x y z"
    assert stitch(["a b c", ""], [2.0]) == "a b c"
    assert stitch(["only"], []) == "only"


def test_cli_transcribes_long_stereo_44k_audio(tmp_path, capsys):
    """End to end with a (tiny, untrained) model: any rate/channels/length runs through."""
    from audio_llm.cli import main
    from audio_llm.config import LoraConfig, ModelConfig
    from audio_llm.export import export_weights
    from audio_llm.model import build_audio_llm
    from audio_llm.tiny import write_tiny_models

    paths = write_tiny_models(tmp_path / "tiny")
    cfg = ModelConfig(encoder=str(paths["whisper"]), llm=str(paths["qwen2vl"]), dtype="float32")
    run = tmp_path / "run"
    run.mkdir()
    model = build_audio_llm(cfg, LoraConfig())
    export_weights(model, run / "export")
    import yaml

    (run / "config.yaml").write_text(
        yaml.safe_dump({"model": vars(cfg), "train": {"stage": 2}}, sort_keys=False)
    )
    t = np.arange(45 * 44100) / 44100
    stereo = np.stack([np.sin(2 * np.pi * 200 * t), np.sin(2 * np.pi * 300 * t)], axis=1) * 0.2
    sf.write(tmp_path / "long.wav", stereo.astype(np.float32), 44100)
    code = main(
        [
            "transcribe",
            "--run",
            str(run),
            str(tmp_path / "long.wav"),
            "--json",
            "--max-new-tokens",
            "4",
        ]
    )
    assert code == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    row = json.loads(line)
    assert row["seconds"] == pytest.approx(45.0, abs=0.01)
    assert isinstance(row["text"], str)
    assert main(["transcribe", "--run", str(run), str(tmp_path / "missing.wav")]) == 2
