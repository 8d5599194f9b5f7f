"""Transcript normalisers for WER scoring: `none`, `basic` and `whisper` (see `normalize`)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import regex

from audio_llm.errors import AudioLLMError
from audio_llm.model.prompts import normalize_transcript

NORMALIZERS = ("none", "basic", "whisper")

# Typographic apostrophes become ASCII so "don’t" and "don't" are the same word.
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u02bc": "'"})
# An apostrophe counts as part of a word only with a word character on both sides.
_LOOSE_APOSTROPHE = regex.compile(r"(?<!\w)'|'(?!\w)")
_PUNCTUATION = regex.compile(r"[^\P{P}']")  # every Unicode punctuation character but "'"


def _basic(text: str) -> str:
    text = normalize_transcript(text).lower().translate(_APOSTROPHES)
    text = _LOOSE_APOSTROPHE.sub(" ", text)
    # Punctuation becomes a space, not nothing: "well-known" is two words, not "wellknown".
    return " ".join(_PUNCTUATION.sub(" ", text).split())


@lru_cache(maxsize=1)
def _whisper_normalizer() -> Any:
    try:
        from whisper_normalizer.english import EnglishTextNormalizer
    except ImportError as exc:  # pragma: no cover - only without the dependency
        raise AudioLLMError(
            "--normalizer whisper needs the whisper-normalizer package: "
            "pip install whisper-normalizer (or reinstall audio_llm)"
        ) from exc
    return EnglishTextNormalizer()


def normalize(text: str, name: str) -> str:
    """Normalise one transcript for scoring; words are then whatever `str.split()` returns.

    `none`: `normalize_transcript` only (line endings, spaces). `basic`: also lowercase and
    Unicode punctuation -> space, keeping apostrophes inside words ("don't"). `whisper`:
    Whisper's English normaliser (numbers, contractions, titles, British spellings, fillers).
    """
    if name == "none":
        return normalize_transcript(text)
    if name == "basic":
        return _basic(text)
    if name == "whisper":
        return " ".join(_whisper_normalizer()(normalize_transcript(text)).split())
    raise AudioLLMError(f"unknown normalizer {name!r}; choose one of {', '.join(NORMALIZERS)}")
