"""Word error rate scoring (`audio-llm wer`): normalisers, WER/CER with a bootstrap interval, and
reading REF/HYP files and writing the report."""

from audio_llm.evaluation.wer.normalizers import NORMALIZERS, normalize
from audio_llm.evaluation.wer.report import (
    WerReport,
    read_durations,
    read_texts,
    read_with_durations,
    write_report_json,
)
from audio_llm.evaluation.wer.scoring import CONFIDENCE, DEFAULT_BUCKETS, per_utterance, score

__all__ = [
    "CONFIDENCE",
    "DEFAULT_BUCKETS",
    "NORMALIZERS",
    "WerReport",
    "normalize",
    "per_utterance",
    "read_durations",
    "read_texts",
    "read_with_durations",
    "score",
    "write_report_json",
]
