"""Cutting long audio at pauses: pieces never exceed the limit, cuts land in the silences, and
speech with no pause falls back to overlapping windows."""

import itertools

import numpy as np
import pytest

from audio_llm.audio.frames import SAMPLE_RATE
from audio_llm.audio.segment import plan_pieces, speech_regions
from audio_llm.errors import AudioLLMError


def bursts(layout: list[tuple[str, float]], seed: int = 0, noise: float = 1e-3) -> np.ndarray:
    """Audio from ("speech"|"pause", seconds) parts: speech is a loud noise burst shaped like
    syllables (4 Hz amplitude wobble), pauses are faint noise (about 50 dB below)."""
    rng = np.random.default_rng(seed)
    parts = []
    for kind, seconds in layout:
        n = int(seconds * SAMPLE_RATE)
        part = rng.normal(0, noise, n)
        if kind == "speech":
            t = np.arange(n) / SAMPLE_RATE
            part += rng.normal(0, 0.2, n) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
        parts.append(part)
    return np.concatenate(parts).astype(np.float32)


def speech_spans(layout: list[tuple[str, float]]) -> list[tuple[float, float]]:
    spans, t = [], 0.0
    for kind, seconds in layout:
        if kind == "speech":
            spans.append((t, t + seconds))
        t += seconds
    return spans


UTTERANCES = [
    ("pause", 0.5),
    ("speech", 3.0),
    ("pause", 0.4),
    ("speech", 2.5),
    ("pause", 0.6),
    ("speech", 4.0),
    ("pause", 0.3),
    ("speech", 1.5),
    ("pause", 0.5),
    ("speech", 3.5),
    ("pause", 0.4),
]


def test_speech_regions_are_the_bursts():
    regions = speech_regions(bursts(UTTERANCES))
    found = [(a / SAMPLE_RATE, b / SAMPLE_RATE) for a, b in regions]
    assert len(found) == len(speech_spans(UTTERANCES))
    for (a, b), (x, y) in zip(found, speech_spans(UTTERANCES), strict=True):
        assert a == pytest.approx(x, abs=0.05) and b == pytest.approx(y, abs=0.05)


def test_short_gaps_inside_speech_are_not_pauses():
    layout = [("speech", 1.0), ("pause", 0.08), ("speech", 1.0), ("pause", 0.5), ("speech", 1.0)]
    assert len(speech_regions(bursts(layout))) == 2


@pytest.mark.parametrize("max_seconds", [4.5, 6.0, 9.0])
def test_long_audio_is_cut_in_the_pauses_and_never_over_the_limit(max_seconds):
    audio = bursts(UTTERANCES)
    pieces = plan_pieces(audio, max_seconds, overlap=5.0)
    assert len(pieces) > 1
    assert all(p.seconds <= max_seconds for p in pieces)
    assert all(p.shared_with_next == 0 for p in pieces)  # cuts at pauses share nothing
    for p, q in itertools.pairwise(pieces):
        assert p.end <= q.start  # in order, no audio twice
    # every burst lies whole inside exactly one piece: no cut falls in speech
    for x, y in speech_spans(UTTERANCES):
        inside = [p for p in pieces if p.start <= x * SAMPLE_RATE and y * SAMPLE_RATE <= p.end]
        assert len(inside) == 1


def test_each_utterance_is_its_own_piece_starting_at_its_speech():
    pieces = plan_pieces(bursts(UTTERANCES), 9.0, overlap=5.0)
    spans = speech_spans(UTTERANCES)
    assert len(pieces) == len(spans)
    for piece, (x, y) in zip(pieces, spans, strict=True):
        assert piece.start / SAMPLE_RATE == pytest.approx(x, abs=0.03)  # no pause before it
        assert y + 0.2 <= piece.end / SAMPLE_RATE <= y + 0.3  # a short silence after it


def test_speech_without_pause_falls_back_to_overlapping_windows():
    layout = [("pause", 0.5), ("speech", 2.0), ("pause", 0.5), ("speech", 14.0), ("pause", 0.5)]
    audio = bursts(layout)
    pieces = plan_pieces(audio, 4.0, overlap=5.0)
    assert all(p.seconds <= 4.0 for p in pieces)
    windowed = [p for p in pieces if p.start >= 2.7 * SAMPLE_RATE]
    assert len(windowed) >= 4
    # consecutive windows overlap by a quarter of the limit (--overlap capped at max / 4)
    for p, q in itertools.pairwise(windowed):
        assert p.shared_with_next == pytest.approx((p.end - q.start) / SAMPLE_RATE)
        assert p.shared_with_next >= 1.0
    assert windowed[-1].shared_with_next == 0
    assert windowed[0].start <= 3.0 * SAMPLE_RATE and windowed[-1].end >= 17.0 * SAMPLE_RATE


def test_even_loudness_has_no_pause_and_short_audio_is_one_piece():
    t = np.arange(20 * SAMPLE_RATE) / SAMPLE_RATE
    tone = (0.2 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)
    pieces = plan_pieces(tone, 8.0, overlap=1.0)
    assert pieces[0].start == 0 and pieces[-1].end == len(tone)
    assert all(p.shared_with_next > 0 for p in pieces[:-1])
    short = bursts(UTTERANCES[:4])
    assert [(p.start, p.end) for p in plan_pieces(short, 30.0, overlap=5.0)] == [(0, len(short))]
    assert plan_pieces(np.zeros(40 * SAMPLE_RATE, np.float32), 10.0, 1.0) == []


@pytest.mark.parametrize("max_seconds, overlap", [(0.0, 1.0), (31.0, 1.0), (10.0, -1.0)])
def test_bad_settings_are_refused(max_seconds, overlap):
    with pytest.raises(AudioLLMError, match="segment length|overlap"):
        plan_pieces(np.zeros(10, np.float32), max_seconds, overlap)
