"""A spoken corpus from espeak-ng for the embedded demo: real speech, no downloads.

Random word sequences over a fixed vocabulary, spoken by several espeak-ng voices at varied speed
with light gain and noise variation. Test sets hold word sequences never seen in training (seen
voices) and a voice never seen in training, so a low WER means the model recognises words, not
memorised utterances or one speaker. A dev set (seen voices, its own word sequences) is for the
choices made while developing (decoding, steps), so that the test sets only measure.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from audio_llm.errors import AudioLLMError
from audio_llm.files import atomic_file, atomic_write_text
from audio_llm.model.tiny import vocabulary
from audio_llm.planning.plan import format_duration

TRAIN_VOICES = (
    "en-us",
    "en-gb",
    "en-gb-scotland",
    "en-gb-x-rp",
    "en-029",
    "en-gb-x-gbcwmd",
    "en-us+f3",
    "en-gb+f2",
)
UNSEEN_VOICE = "en-gb-x-gbclan+m3"


@dataclass
class CorpusSpec:
    words: int = 240
    train: int = 3000
    test: int = 200
    dev: int = 200  # seen voices, for choices made while developing (decoding, steps)
    min_words: int = 4
    max_words: int = 12
    wpm: tuple[int, int] = (130, 200)
    gain: tuple[float, float] = (0.5, 1.0)
    snr_db: tuple[float, float] = (25.0, 45.0)
    voices: tuple[str, ...] = TRAIN_VOICES
    unseen_voice: str = UNSEEN_VOICE
    seed: int = 0
    # 2: no homophones in the vocabulary (HOMOPHONES), a dev set, held-out sets independent of
    # `train`. A corpus made by another version is rebuilt, not reused.
    version: int = 2

    def clips(self, split: str) -> int:
        """How many clips `split` holds: `train`, `dev`, or `test` for each test set."""
        return {"train": self.train, "dev": self.dev}.get(split, self.test)


# One word of each pair that espeak-ng says exactly alike in some corpus voice (`espeak-ng -x`
# gives the same phonemes): in random word sequences nothing can tell such words apart, so each
# would cost a coin flip of WER that no model can win. "ate" sounds like "eight" in every voice;
# "his" and "hold" are "is" and "old" in en-gb-x-gbcwmd, which drops its h's.
# tests/demo/test_speech.py checks that no two words of the vocabulary sound alike in any voice.
HOMOPHONES = ("ate", "his", "hold")


def demo_vocabulary(count: int) -> list[str]:
    """The first `count` words of the embedded list that sound unlike every other (deterministic:
    `HOMOPHONES` are left out, so the next words of the list take their places)."""
    words = [w for w in vocabulary() if w not in HOMOPHONES]
    if count > len(words):
        raise AudioLLMError(
            f"the embedded vocabulary has {len(words)} distinct-sounding words, not {count}"
        )
    return words[:count]


def _utterances(spec: CorpusSpec) -> dict[str, list[dict]]:
    """Every split's rows. The held-out sets (test sets and dev) come first, each from its own
    generator, so they do not depend on the training set's size; training rows are drawn after
    them and never repeat a held-out word sequence. A split's rows are drawn one by one (text,
    then speed, gain and noise), so a larger `spec.train` only adds rows after those a smaller
    one has."""
    words = demo_vocabulary(spec.words)

    def rows(name: str, voices: tuple[str, ...], banned: set[str]) -> list[dict]:
        rng = random.Random(f"{spec.seed}-{name}")
        width = 5 if name == "train" else 4
        out: list[dict] = []
        while len(out) < spec.clips(name):
            text = " ".join(rng.choices(words, k=rng.randint(spec.min_words, spec.max_words)))
            if text in banned:
                continue  # never a held-out sequence in training
            i = len(out)
            row = {"id": f"{name}-{i:0{width}d}", "text": text, "voice": voices[i % len(voices)]}
            row["wpm"] = rng.randint(*spec.wpm)
            row["gain"] = rng.uniform(*spec.gain)
            row["snr_db"] = rng.uniform(*spec.snr_db)
            row["noise_seed"] = rng.randrange(2**31)
            out.append(row)
        return out

    seen = rows("test_seen_voices", spec.voices, set())
    unseen = rows("test_unseen_voice", (spec.unseen_voice,), set())
    dev = rows("dev", spec.voices, set())
    held_out = {row["text"] for row in seen + unseen + dev}
    train = rows("train", spec.voices, held_out)
    return {"train": train, "dev": dev, "test_seen_voices": seen, "test_unseen_voice": unseen}


def _speak(row: dict, folder: Path) -> dict:
    wav = folder / f"{row['id']}.wav"
    cmd = ["espeak-ng", "-v", row["voice"], "-s", str(row["wpm"]), "-w", str(wav), row["text"]]
    subprocess.run(cmd, check=True, capture_output=True)
    audio, rate = sf.read(wav, dtype="float32")
    wav.unlink()
    peak = float(np.abs(audio).max()) or 1.0
    audio = audio / peak * row["gain"] * 0.9
    power = float(np.mean(audio**2)) or 1e-8
    noise = np.random.default_rng(row["noise_seed"]).standard_normal(len(audio)).astype(np.float32)
    audio = audio + noise * np.sqrt(power / 10 ** (row["snr_db"] / 10))
    flac = folder / f"{row['id']}.flac"
    # a temporary name, then the rename: a killed corpus never leaves half a clip under its name
    with atomic_file(flac, durable=False) as out:
        sf.write(out, np.clip(audio, -1, 1), rate, subtype="PCM_16", format="FLAC")
    return {
        "audio_filepath": flac.name,
        "text": row["text"],
        "id": row["id"],
        "speaker": row["voice"],
        "duration": len(audio) / rate,
    }


SPEC_FILE = "spec.json"
PROGRESS_EVERY_S = 10.0  # as the trainer's progress lines in the demo's terminal


class ClipProgress:
    """Reports clips done, clips/s and an ETA through `report`, at most once per `every` seconds
    and once more at the last clip: `clips 1200/33200 (3.6%) | 45.2 clips/s | elapsed 26s | eta
    11m48s`, the shape of the trainer's progress lines."""

    def __init__(
        self,
        total: int,
        report: Callable[[str], None],
        every: float = PROGRESS_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.report, self.every, self.clock = total, report, every, clock
        self.done = 0
        self.began = self.shown = clock()

    def advance(self, clips: int = 1) -> None:
        self.done += clips
        now = self.clock()
        if self.done < self.total and now - self.shown < self.every:
            return
        self.shown = now
        elapsed = now - self.began
        rate = self.done / elapsed if elapsed > 0 else math.nan
        eta = (self.total - self.done) / rate if rate > 0 else math.nan
        self.report(
            f"clips {self.done}/{self.total} ({100.0 * self.done / self.total:.1f}%) | "
            f"{rate:.1f} clips/s | elapsed {format_duration(elapsed)} | eta {format_duration(eta)}"
        )


def make_corpus(
    out_dir: str | Path,
    spec: CorpusSpec | None = None,
    workers: int = 2,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Path]:
    """Synthesise every split into `out_dir/SPLIT/` with a NeMo-style `manifest.jsonl` each;
    `progress` receives a line on the clips done across all splits (`ClipProgress`)."""
    spec = spec or CorpusSpec()
    if shutil.which("espeak-ng") is None:
        raise AudioLLMError(
            "espeak-ng is not installed: apt-get install -y espeak-ng (or make demo)"
        )
    out = Path(out_dir)
    manifests = {}
    splits = _utterances(spec)
    total = sum(len(rows) for rows in splits.values())
    counter = ClipProgress(total, progress) if progress is not None else None
    for name, rows in splits.items():
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        entries = []
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for entry in pool.map(lambda r, f=folder: _speak(r, f), rows):  # in order
                entries.append(entry)
                if counter is not None:
                    counter.advance()
        manifest = folder / "manifest.jsonl"
        atomic_write_text(manifest, "".join(json.dumps(e) + "\n" for e in entries))
        manifests[name] = manifest
    # Written last: a corpus with this file is complete and was made from exactly this spec.
    atomic_write_text(out / SPEC_FILE, json.dumps(asdict(spec), indent=2) + "\n")
    return manifests


def corpus_matches(out_dir: str | Path, spec: CorpusSpec) -> bool:
    """True if `out_dir` holds a complete corpus made from `spec` (so it can be reused)."""
    path = Path(out_dir) / SPEC_FILE
    if not path.is_file():
        return False
    return json.loads(path.read_text()) == json.loads(json.dumps(asdict(spec)))
