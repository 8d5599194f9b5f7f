"""Cut long audio at pauses into pieces no longer than the model was trained on.

A model fine-tuned on short utterances decodes 30 s of continuous speech badly (it has never seen
one), so `transcribe` cuts long audio where the speaker pauses. Pauses are found from frame energy
(pure numpy): a 20 ms frame is quiet when its level is below a threshold set between the
recording's noise floor and its speech level, and a pause is at least `min_pause` seconds of quiet
frames. Each stretch of speech between pauses is one piece: it starts where its speech starts
and keeps up to `TAIL_SECONDS` of the pause after it, as utterance-cut training clips do. (Both
choices are measured: the demo's model decodes its held-out clips at 4.2% WER alone; joined with
pauses and cut this way at 6.8%; with 0.05 s of pause before each piece at 10.5%; with several
utterances packed into pieces of up to its longest training clip at 11%.) Speech that runs
longer than `max_seconds` without a pause falls back to evenly spaced overlapping windows, whose
texts are stitched at their shared words; pieces cut at pauses share no audio and are joined as
they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from audio_llm.audio.frames import SAMPLE_RATE, WINDOW_SECONDS
from audio_llm.errors import AudioLLMError

FRAME_SECONDS = 0.02
MIN_PAUSE_SECONDS = 0.2
TAIL_SECONDS = 0.25  # pause kept after a piece's speech: training clips end in a short silence
MIN_CONTRAST_DB = 10.0  # a recording this even in loudness has no pause to find
SILENCE_DB = -70.0  # frames this quiet (dBFS) are never speech


@dataclass(frozen=True)
class Piece:
    """Samples [start, end) of the audio, and how many seconds it shares with the next piece
    (0 for a cut at a pause; the overlap of fallback windows)."""

    start: int
    end: int
    shared_with_next: float = 0.0

    @property
    def seconds(self) -> float:
        return (self.end - self.start) / SAMPLE_RATE


def windows(
    num_samples: int, overlap: float, window: float = WINDOW_SECONDS
) -> list[tuple[int, int]]:
    """(start, end) sample ranges of `window` seconds, evenly spaced so that consecutive ones
    share at least `overlap` seconds; one range if the audio fits a single window."""
    if not 0 <= overlap < window / 2:
        raise AudioLLMError(f"overlap must be in [0, {window / 2:g}) seconds (got {overlap})")
    size, shared = int(window * SAMPLE_RATE), int(overlap * SAMPLE_RATE)
    if num_samples <= size:
        return [(0, num_samples)]
    count = -(-(num_samples - shared) // (size - shared))
    starts = [round(i * (num_samples - size) / (count - 1)) for i in range(count)]
    return [(s, s + size) for s in starts]


def frame_levels(audio: np.ndarray) -> np.ndarray:
    """Level in dBFS (RMS) of each whole `FRAME_SECONDS` frame of 16 kHz mono `audio`."""
    size = int(FRAME_SECONDS * SAMPLE_RATE)
    frames = np.asarray(audio, dtype=np.float64)[: len(audio) // size * size].reshape(-1, size)
    return 10 * np.log10(np.mean(frames**2, axis=1) + 1e-12)


def speech_regions(
    audio: np.ndarray, min_pause: float = MIN_PAUSE_SECONDS
) -> list[tuple[int, int]]:
    """Sample ranges of speech separated by pauses of at least `min_pause` seconds.

    The threshold sits a third of the way from the noise floor (10th percentile of frame levels)
    to the speech level (95th); a recording with less contrast than `MIN_CONTRAST_DB` has no
    detectable pause and is one region (unless it is digital silence, which is none)."""
    levels = frame_levels(audio)
    if len(levels) == 0:
        return []
    floor, loud = np.percentile(levels, [10, 95])
    if loud - floor < MIN_CONTRAST_DB:
        threshold = SILENCE_DB
    else:
        threshold = max(floor + (loud - floor) / 3, SILENCE_DB)
    voiced = levels > threshold
    size = int(FRAME_SECONDS * SAMPLE_RATE)
    min_gap = max(1, round(min_pause / FRAME_SECONDS))
    regions: list[list[int]] = []
    for start, end in _runs(voiced):
        if regions and start - regions[-1][1] < min_gap:
            regions[-1][1] = end  # a gap shorter than a pause is inside the speech
        else:
            regions.append([start, end])
    # the last partial frame belongs to the region that reaches it
    last = len(audio)
    return [(a * size, last if b == len(levels) else b * size) for a, b in regions]


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) index ranges where `mask` is True."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True))


def plan_pieces(
    audio: np.ndarray,
    max_seconds: float,
    overlap: float,
    min_pause: float = MIN_PAUSE_SECONDS,
) -> list[Piece]:
    """Pieces of at most `max_seconds` covering the speech of `audio` (see module doc).

    Audio that fits in `max_seconds` is one piece, as it is. Fallback windows over speech with no
    pause share min(`overlap`, `max_seconds` / 4) seconds."""
    if not 0 < max_seconds <= WINDOW_SECONDS:
        raise AudioLLMError(
            f"max segment length must be in (0, {WINDOW_SECONDS:g}] seconds (got {max_seconds})"
        )
    if overlap < 0:
        raise AudioLLMError(f"overlap must be >= 0 seconds (got {overlap})")
    n = len(audio)
    limit = int(max_seconds * SAMPLE_RATE)
    if n <= limit:
        return [Piece(0, n)]
    regions = speech_regions(audio, min_pause)
    if not regions:  # digital silence: nothing to say, nothing to decode
        return []
    tail = int(TAIL_SECONDS * SAMPLE_RATE)
    # Each region with up to `tail` of the pause after it, never into the next region, and
    # never so much that a region within the limit would go over it.
    bounds = [
        (a, min(b + tail, regions[i + 1][0] if i + 1 < len(regions) else n, max(b, a + limit)))
        for i, (a, b) in enumerate(regions)
    ]

    window_overlap = min(overlap, max_seconds / 4)
    pieces: list[Piece] = []
    for start, end in bounds:
        if end - start <= limit:
            pieces.append(Piece(start, end))
            continue
        # speech longer than the limit with no pause to cut at: overlapping windows
        spans = windows(end - start, window_overlap, max_seconds)
        for k, (a, b) in enumerate(spans):
            shared = (b - spans[k + 1][0]) / SAMPLE_RATE if k + 1 < len(spans) else 0.0
            pieces.append(Piece(start + a, start + b, shared))
    return pieces
