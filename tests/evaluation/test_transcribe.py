"""Long-audio transcription: windows, and stitching that neither drops nor doubles seam words."""

import itertools
import json
import random

import numpy as np
import pytest
import soundfile as sf

from audio_llm.audio.frames import SAMPLE_RATE
from audio_llm.errors import AudioLLMError
from audio_llm.evaluation.transcribe import stitch, transcribe_audio, windows
from audio_llm.model.tiny import vocabulary


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
    """Words at known times, each a loud noise burst; a clip 'hears' the words lying wholly inside
    it. Stands in for a model that transcribes perfectly, so any seam error is the cutting's or
    the stitching's. `pause_every` words a pause of 0.3-0.6 s ends an utterance (0: no pauses;
    the gaps between words are always shorter than a pause)."""

    def __init__(self, total_seconds: float, seed: int = 0, pause_every: int = 0) -> None:
        rng = random.Random(seed)
        words, t = [], 0.3
        while t < total_seconds - 1.0:
            length = rng.uniform(0.2, 0.5)
            words.append((rng.choice(vocabulary()), t, t + length))
            t += length + rng.uniform(0.05, 0.12)
            if pause_every and len(words) % pause_every == 0:
                t += rng.uniform(0.3, 0.6)
        self.words = words
        noise = np.random.default_rng(seed)
        self.audio = noise.normal(0, 1e-3, int(total_seconds * SAMPLE_RATE)).astype(np.float32)
        for _, a, b in words:
            i, j = int(a * SAMPLE_RATE), int(b * SAMPLE_RATE)
            self.audio[i:j] += noise.normal(0, 0.2, j - i).astype(np.float32)
        self.clips: list[tuple[float, float]] = []

    def __call__(self, clips):
        out = []
        for clip in clips:
            # transcribe_audio passes views of self.audio: where a view begins says when it is
            offset = (clip.ctypes.data - self.audio.ctypes.data) // self.audio.itemsize
            start, end = offset / SAMPLE_RATE, (offset + len(clip)) / SAMPLE_RATE
            self.clips.append((start, end))
            out.append(" ".join(w for w, a, b in self.words if a >= start and b <= end))
        return out


@pytest.mark.parametrize("seed", range(5))
def test_70s_stitches_to_exactly_the_clip_by_clip_words(seed):
    fake = FakeDecoder(70.0, seed)
    text = transcribe_audio(fake, fake.audio, overlap=5.0)
    assert text.split() == [w for w, _, _ in fake.words]
    assert max(b - a for a, b in fake.clips) == pytest.approx(30.0)


@pytest.mark.parametrize("seed", range(5))
def test_utterances_are_cut_at_pauses_into_short_pieces_in_order(seed):
    """78 s of 2-5 s utterances: decoded in pieces no longer than the limit (as a model trained
    on short clips needs), every word once and in order. The old 30 s windows fail the limit."""
    fake = FakeDecoder(78.0, seed, pause_every=8)
    text = transcribe_audio(fake, fake.audio, overlap=5.0, batch_size=3, max_seconds=6.0)
    assert text.split() == [w for w, _, _ in fake.words]
    assert len(fake.clips) >= 13 and max(b - a for a, b in fake.clips) <= 6.0 + 1e-9
    assert all(b1 <= a2 for (_, b1), (a2, _) in itertools.pairwise(fake.clips))  # no overlap


@pytest.mark.parametrize("seed", range(3))
def test_speech_without_pauses_uses_overlapping_windows_of_the_limit(seed):
    fake = FakeDecoder(40.0, seed)  # gaps between words only, never a pause
    text = transcribe_audio(fake, fake.audio, overlap=5.0, max_seconds=8.0)
    assert text.split() == [w for w, _, _ in fake.words]
    assert max(b - a for a, b in fake.clips) <= 8.0 + 1e-9
    assert all(b1 - a2 >= 2.0 for (_, b1), (a2, _) in itertools.pairwise(fake.clips))


def test_stitch_keeps_shared_words_once_and_tolerates_no_overlap():
    assert stitch(["a b c d", "c d e f"], [2.0]) == "a b c d e f"
    assert stitch(["a b c", "x y z"], [2.0]) == "a b c x y z"
    assert stitch(["a b c", ""], [2.0]) == "a b c"
    assert stitch(["only"], []) == "only"
    # pieces cut at a pause heard different words: a repeated word at the seam stays twice
    assert stitch(["a b the", "the c d"], [0.0]) == "a b the the c d"


def _write_shards(folder, durations):
    """A packed-looking folder: one tar of KEY.json members (durations) and its index.json."""
    import io
    import tarfile

    folder.mkdir(parents=True)
    with tarfile.open(folder / "shard-000000.tar", "w") as tar:
        for i, seconds in enumerate(durations):
            data = json.dumps({"text": "a", "duration": seconds}).encode()
            info = tarfile.TarInfo(f"u{i:03d}.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    entry = {"name": "shard-000000.tar", "samples": len(durations), "seconds": sum(durations)}
    index = {"format_version": 1, "mode": "audio", "shards": [entry]}
    (folder / "index.json").write_text(json.dumps(index))


def test_training_clip_seconds_from_the_runs_shards_or_the_bundle(tmp_path):
    import yaml

    from audio_llm.evaluation.transcribe import training_clip_seconds

    _write_shards(tmp_path / "train", [2.5, 4.75, 3.0])
    run = tmp_path / "run"
    run.mkdir()
    config = {"data": {"train_shards": str(tmp_path / "train")}, "train": {"stage": 2}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert training_clip_seconds(run=run) == (2.5, 4.75)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "audio_llm.json").write_text(json.dumps({"trained_seconds": [1.0, 7.5]}))
    assert training_clip_seconds(export=bundle) == (1.0, 7.5)
    # a bundle written before the field existed asks its source run
    (bundle / "audio_llm.json").write_text(json.dumps({"source_run": str(run)}))
    assert training_clip_seconds(export=bundle) == (2.5, 4.75)
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"stage": 2}}))
    assert training_clip_seconds(run=run) is None


def test_cli_transcribes_long_stereo_44k_audio(tmp_path, capsys):
    """End to end with a (tiny, untrained) model: any rate/channels/length runs through."""
    from audio_llm.cli import main
    from audio_llm.config import LoraConfig, ModelConfig
    from audio_llm.evaluation.export import export_weights
    from audio_llm.model.build import build_audio_llm
    from audio_llm.model.tiny import write_tiny_models

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
    captured = capsys.readouterr()
    # the run names no training shards: the note says so and how to set the length
    assert "--max-segment-seconds" in captured.err
    line = captured.out.strip().splitlines()[-1]
    row = json.loads(line)
    assert row["seconds"] == pytest.approx(45.0, abs=0.01)
    assert isinstance(row["text"], str)
    assert main(["transcribe", "--run", str(run), str(tmp_path / "missing.wav")]) == 2
    capsys.readouterr()
    wav = str(tmp_path / "long.wav")
    assert main(["transcribe", "--run", str(run), wav, "--max-segment-seconds", "31"]) == 2
    assert "(0, 30]" in capsys.readouterr().err
    code = main(["transcribe", "--run", str(run), wav, "--max-segment-seconds", "8", "--json"])
    assert code == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["seconds"] == pytest.approx(45.0, abs=0.01)

    # a run with training shards: `export` records their clip lengths, transcribe uses them
    from audio_llm.evaluation.export import export_bundle

    _write_shards(tmp_path / "train", [2.0, 5.5])
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"] = {"train_shards": str(tmp_path / "train")}
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    bundle = export_bundle(run, tmp_path / "bundle")
    assert json.loads((bundle / "audio_llm.json").read_text())["trained_seconds"] == [2.0, 5.5]
    assert main(["transcribe", "--export", str(bundle), wav, "--max-new-tokens", "4"]) == 0
    assert "pieces of at most 5.5 s" in capsys.readouterr().err
