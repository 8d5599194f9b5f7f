"""WER and CER of hypotheses against references, with a bootstrap interval.

Corpus WER is total (S + D + I) over total reference words, counted by jiwer on whitespace words
after one of three normalisers (`none`, `basic`, `whisper`). Every reference id is scored: a
missing hypothesis is an empty one (all deletions) and is listed; hypothesis ids without a
reference are listed and ignored. An empty reference has no words to get wrong, so its
hypothesis words all count as insertions in the corpus totals, and it is left out of the mean
per-utterance WER (its own WER is undefined).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import jiwer
import numpy as np

from audio_llm.errors import AudioLLMError
from audio_llm.evaluation.wer.normalizers import NORMALIZERS, normalize
from audio_llm.evaluation.wer.report import WerReport

DEFAULT_BUCKETS: tuple[float, ...] = (5.0, 10.0, 20.0, 30.0)
CONFIDENCE = 0.95


@dataclass
class _Counts:
    """Per-utterance alignment counts, in reference order."""

    ids: list[str]
    refs: list[str]
    hyps: list[str]
    missing: list[bool]
    ref_words: np.ndarray
    hyp_words: np.ndarray
    subs: np.ndarray
    dels: np.ndarray
    ins: np.ndarray
    hits: np.ndarray

    @property
    def errors(self) -> np.ndarray:
        return self.subs + self.dels + self.ins


def _align(refs: Mapping[str, str], hyps: Mapping[str, str], normalizer: str) -> _Counts:
    ids = list(refs)
    ref_text = [normalize(refs[uid], normalizer) for uid in ids]
    hyp_text = [normalize(hyps.get(uid, ""), normalizer) for uid in ids]
    # Re-join on single spaces: jiwer splits on " " only, so a newline would glue two words.
    ref_text = [" ".join(t.split()) for t in ref_text]
    hyp_text = [" ".join(t.split()) for t in hyp_text]
    n = len(ids)
    subs, dels, ins, hits = (np.zeros(n, dtype=np.int64) for _ in range(4))
    ref_words = np.array([len(t.split()) for t in ref_text], dtype=np.int64)
    hyp_words = np.array([len(t.split()) for t in hyp_text], dtype=np.int64)
    # jiwer rejects (3.x) or special-cases (4.x) empty references; score them here instead:
    # nothing to substitute or delete, so every hypothesis word is an insertion.
    scored = np.flatnonzero(ref_words > 0)
    ins[ref_words == 0] = hyp_words[ref_words == 0]
    if len(scored):
        out = jiwer.process_words([ref_text[i] for i in scored], [hyp_text[i] for i in scored])
        for i, chunks in zip(scored, out.alignments, strict=True):
            for chunk in chunks:
                width = chunk.ref_end_idx - chunk.ref_start_idx
                if chunk.type == "equal":
                    hits[i] += width
                elif chunk.type == "substitute":
                    subs[i] += width
                elif chunk.type == "delete":
                    dels[i] += width
                elif chunk.type == "insert":
                    ins[i] += chunk.hyp_end_idx - chunk.hyp_start_idx
    missing = [uid not in hyps for uid in ids]
    return _Counts(ids, ref_text, hyp_text, missing, ref_words, hyp_words, subs, dels, ins, hits)


def _rows(counts: _Counts) -> list[dict[str, Any]]:
    rows = []
    for i, uid in enumerate(counts.ids):
        n = int(counts.ref_words[i])
        errors = int(counts.errors[i])
        rows.append(
            {
                "id": uid,
                "ref": counts.refs[i],
                "hyp": counts.hyps[i],
                "ref_words": n,
                "hyp_words": int(counts.hyp_words[i]),
                "substitutions": int(counts.subs[i]),
                "deletions": int(counts.dels[i]),
                "insertions": int(counts.ins[i]),
                "hits": int(counts.hits[i]),
                "errors": errors,
                "wer": errors / n if n else None,  # undefined for an empty reference
                "missing_hyp": counts.missing[i],
            }
        )
    return rows


def per_utterance(
    refs: Mapping[str, str], hyps: Mapping[str, str], normalizer: str = "basic"
) -> list[dict[str, Any]]:
    """One dict per reference id (reference order), ready to write as JSONL.

    Keys: id, ref and hyp (normalised), ref_words, hyp_words, substitutions, deletions,
    insertions, hits, errors, wer (None for an empty reference), missing_hyp.
    """
    return _rows(_align(refs, hyps, normalizer))


def _cer(counts: _Counts) -> dict[str, Any]:
    scored = [i for i, n in enumerate(counts.ref_words) if n > 0]
    # Characters of the normalised, single-space-joined text, spaces included (jiwer's CER).
    ref_chars = sum(len(counts.refs[i]) for i in scored)
    subs = dels = ins = 0
    if scored:
        out = jiwer.process_characters(
            [counts.refs[i] for i in scored], [counts.hyps[i] for i in scored]
        )
        subs, dels, ins = out.substitutions, out.deletions, out.insertions
    ins += sum(len(h) for h, n in zip(counts.hyps, counts.ref_words, strict=True) if n == 0)
    errors = subs + dels + ins
    return {
        "cer": errors / ref_chars if ref_chars else None,
        "ref_chars": ref_chars,
        "substitutions": int(subs),
        "deletions": int(dels),
        "insertions": int(ins),
    }


def _bootstrap(
    errors: np.ndarray, ref_words: np.ndarray, resamples: int, seed: int
) -> dict[str, Any] | None:
    """Percentile interval of corpus WER over utterances resampled with replacement."""
    n = len(errors)
    if resamples <= 0 or n == 0:
        return None
    rng = np.random.default_rng(seed)
    # Chunked so a large test set never builds a resamples x utterances matrix at once.
    chunk = max(1, 2_000_000 // n)
    wers = []
    for start in range(0, resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, resamples - start), n))
        num, den = errors[idx].sum(axis=1), ref_words[idx].sum(axis=1)
        wers.append(num[den > 0] / den[den > 0])  # a draw of only empty refs has no WER
    values = np.concatenate(wers)
    if not len(values):
        return None
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return {
        "confidence": CONFIDENCE,
        "low": float(low),
        "high": float(high),
        "resamples": resamples,
        "used": len(values),
        "seed": seed,
    }


def _bucket_name(lo: float, hi: float) -> str:
    return f"[{lo:g},{hi:g})" if math.isfinite(hi) else f"[{lo:g},inf)"


def _by_duration(
    counts: _Counts, durations: Mapping[str, float], edges: Sequence[float]
) -> tuple[list[dict[str, Any]], int]:
    bounds = [0.0, *sorted(edges), math.inf]
    buckets = [
        {"bucket": _bucket_name(lo, hi), "min_s": lo, "max_s": hi if math.isfinite(hi) else None}
        for lo, hi in pairwise(bounds)
    ]
    for b in buckets:
        b.update(utterances=0, ref_words=0, errors=0, wer=None)
    unknown = 0
    for i, uid in enumerate(counts.ids):
        seconds = durations.get(uid)
        if seconds is None:
            unknown += 1
            continue
        k = next(k for k in range(len(buckets)) if seconds < bounds[k + 1])
        buckets[k]["utterances"] += 1
        buckets[k]["ref_words"] += int(counts.ref_words[i])
        buckets[k]["errors"] += int(counts.errors[i])
    for b in buckets:
        if b["ref_words"]:
            b["wer"] = b["errors"] / b["ref_words"]
    return buckets, unknown


def score(
    refs: Mapping[str, str],
    hyps: Mapping[str, str],
    normalizer: str = "basic",
    durations: Mapping[str, float] | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    duration_buckets: Sequence[float] = DEFAULT_BUCKETS,
) -> WerReport:
    """Score hypotheses against references (both {id: text}); every reference id is scored.

    `durations` ({id: seconds}) adds WER per bucket of `duration_buckets` edges; `bootstrap`
    resamples (0 = none) give a 95% percentile interval, reproducible for a `seed`.
    """
    if normalizer not in NORMALIZERS:
        raise AudioLLMError(
            f"unknown normalizer {normalizer!r}; choose one of {', '.join(NORMALIZERS)}"
        )
    counts = _align(refs, hyps, normalizer)
    ref_total = int(counts.ref_words.sum())
    nonempty = counts.ref_words > 0
    utt_wers = counts.errors[nonempty] / counts.ref_words[nonempty]
    by_duration, unknown = (None, 0)
    if durations is not None:
        by_duration, unknown = _by_duration(counts, durations, duration_buckets)
    return WerReport(
        normalizer=normalizer,
        wer=int(counts.errors.sum()) / ref_total if ref_total else None,
        utterances=len(counts.ids),
        ref_words=ref_total,
        hyp_words=int(counts.hyp_words.sum()),
        substitutions=int(counts.subs.sum()),
        deletions=int(counts.dels.sum()),
        insertions=int(counts.ins.sum()),
        hits=int(counts.hits.sum()),
        cer=_cer(counts),
        mean_utterance_wer=float(utt_wers.mean()) if len(utt_wers) else None,
        utterances_in_mean=len(utt_wers),
        empty_refs=int((~nonempty).sum()),
        empty_ref_insertions=int(counts.ins[~nonempty].sum()),
        missing_ids=[uid for uid, m in zip(counts.ids, counts.missing, strict=True) if m],
        extra_ids=[uid for uid in hyps if uid not in refs],
        bootstrap=_bootstrap(counts.errors, counts.ref_words, bootstrap, seed),
        by_duration=by_duration,
        durations_unknown=unknown,
        per_utterance=_rows(counts),
    )
