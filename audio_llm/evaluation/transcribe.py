"""Transcribe audio files of any length, rate and channel count.

A model fine-tuned on short utterances has never heard 30 s of speech, so long audio is cut where
the speaker pauses into pieces no longer than the run's longest training clip (read from its
training shards, or recorded in an export bundle; `--max-segment-seconds` overrides). Speech with
no pause for that long is cut into overlapping windows instead (`audio.segment`). Each piece is
transcribed on its own and the texts are joined in order; where two windows overlap, the longest
run of words shared by the end of one text and the start of the next is kept once. Words in the
overlap are heard twice, so a word cut at one window's edge is whole in the other, and neither
lost nor doubled at the seam.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable, Sequence
from difflib import SequenceMatcher
from pathlib import Path

import numpy as np

from audio_llm.audio.frames import HOP_LENGTH, SAMPLE_RATE
from audio_llm.audio.segment import WINDOW_SECONDS, plan_pieces, windows
from audio_llm.errors import AudioLLMError
from audio_llm.evaluation.export import BUNDLE_FILE

__all__ = ["stitch", "training_clip_seconds", "transcribe_audio", "windows"]

WORDS_PER_SECOND = 5.0  # generous speaking rate: bounds how far into a text the overlap can reach
SCANNED_SHARDS = 32  # shards read for the clip-length range: enough to see its longest clips


def stitch(texts: Sequence[str], overlaps: Sequence[float]) -> str:
    """Join window transcripts, keeping the words of each overlap once (see module doc).

    `overlaps[i]` is how many seconds window i shares with window i + 1; 0 for pieces cut at a
    pause, which heard different words and are joined as they are."""
    words: list[str] = []
    for i, text in enumerate(texts):
        new = text.split()
        if not words or not new or overlaps[i - 1] <= 0:
            words += new
            continue
        reach = int(overlaps[i - 1] * WORDS_PER_SECOND) + 2
        tail_start = max(0, len(words) - reach)
        tail, head = words[tail_start:], new[:reach]
        match = SequenceMatcher(None, tail, head, autojunk=False).find_longest_match(
            0, len(tail), 0, len(head)
        )
        if match.size == 0:
            words += new  # nothing shared: the windows heard different words at the seam
            continue
        # Keep the left text up to the shared run and the right text from it: each half is
        # the one that heard those words away from its own window edge.
        words = words[: tail_start + match.a] + new[match.b :]
    return " ".join(words)


def transcribe_audio(
    decode: Callable[[list[np.ndarray]], list[str]],
    audio: np.ndarray,
    overlap: float = 5.0,
    batch_size: int = 8,
    max_seconds: float = WINDOW_SECONDS,
) -> str:
    """Transcribe 16 kHz mono `audio` of any length with `decode(list of clips)`, each clip at
    most `max_seconds` long and cut at pauses where there are any (see module doc)."""
    pieces = plan_pieces(audio, max_seconds, overlap)
    clips = [audio[p.start : p.end] for p in pieces]
    texts: list[str] = []
    for i in range(0, len(clips), batch_size):
        texts += decode(clips[i : i + batch_size])
    return stitch(texts, [p.shared_with_next for p in pieces[:-1]])


def training_clip_seconds(
    run: str | Path | None = None, export: str | Path | None = None
) -> tuple[float, float] | None:
    """(shortest, longest) training clip in seconds of a run (read from the `.json` members of
    up to `SCANNED_SHARDS` of its local training shards) or of an export bundle (recorded by
    `audio-llm export`; older bundles ask their source run). None when it cannot be known."""
    from audio_llm.config import load_config
    from audio_llm.data.shards import ShardSet

    if export is not None:
        bundle_path = Path(export) / BUNDLE_FILE
        if not bundle_path.is_file():
            return None
        bundle = json.loads(bundle_path.read_text())
        if bundle.get("trained_seconds"):
            low, high = bundle["trained_seconds"]
            return float(low), float(high)
        source = bundle.get("source_run")
        return training_clip_seconds(run=source) if source and Path(source).is_dir() else None
    config = Path(run) / "config.yaml"
    if not config.is_file():
        return None
    data = load_config(config).data
    try:
        shards = ShardSet.open(data.train_shards, data.train_index).shards
    except AudioLLMError:
        return None  # no shards named, or moved since training
    local = [s.url for s in shards if Path(s.url).is_file()]
    step = max(1, len(local) / SCANNED_SHARDS)
    durations = []
    for path in (local[int(i * step)] for i in range(min(len(local), SCANNED_SHARDS))):
        try:
            with tarfile.open(path, mode="r:") as tar:
                for member in tar:
                    if member.isreg() and member.name.endswith(".json"):
                        meta = json.loads(tar.extractfile(member).read())
                        durations.append(float(meta["duration"]))
        except (tarfile.TarError, OSError, ValueError, KeyError, TypeError):
            continue  # a damaged shard: the others still tell the range
    return (min(durations), max(durations)) if durations else None


def model_decoder(
    model, max_new_tokens: int = 128, num_beams: int = 1, ctc_weight: float = 0.0
) -> Callable[[list[np.ndarray]], list[str]]:
    """A `decode` for `transcribe_audio` backed by an AudioLLM (features computed here)."""
    from audio_llm.audio.features import log_mel
    from audio_llm.data import AudioSample, Collator, layout_of
    from audio_llm.evaluation.evaluate import transcribe_samples

    layout = layout_of(model)
    collator = Collator(layout, "mel")
    filters = layout.mel_filters

    def decode(clips: list[np.ndarray]) -> list[str]:
        samples = []
        for clip in clips:
            if len(clip) < HOP_LENGTH * 2:
                clip = np.pad(clip, (0, HOP_LENGTH * 2 - len(clip)))
            mel = log_mel(clip, filters).numpy()
            samples.append(AudioSample("clip", "", None, len(clip) / SAMPLE_RATE, None, mel=mel))
        return transcribe_samples(
            model, collator, samples, max_new_tokens, num_beams, ctc_weight=ctc_weight
        )

    return decode
