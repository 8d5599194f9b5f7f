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

from collections.abc import Callable, Sequence
from difflib import SequenceMatcher

import numpy as np

from audio_llm.audio.frames import HOP_LENGTH, SAMPLE_RATE
from audio_llm.audio.segment import WINDOW_SECONDS, plan_pieces, windows
from audio_llm.evaluation.export import training_clip_seconds

__all__ = ["stitch", "training_clip_seconds", "transcribe_audio", "windows"]

WORDS_PER_SECOND = 5.0  # generous speaking rate: bounds how far into a text the overlap can reach


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


def model_decoder(
    model, max_new_tokens: int = 128, num_beams: int = 1, ctc_weight: float = 0.0
) -> Callable[[list[np.ndarray]], list[str]]:
    """A `decode` for `transcribe_audio` backed by an AudioLLM (features computed here)."""
    from audio_llm.audio.features import log_mel
    from audio_llm.data import AudioSample, Collator, layout_of
    from audio_llm.evaluation.evaluate import transcribe_samples

    layout = layout_of(model, identity=False)
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
