"""Word error rate scoring: `audio-llm wer --ref REF --hyp HYP`, and the `score` API behind it.

Corpus WER is total (S + D + I) over total reference words, counted by jiwer on whitespace words
after one of three normalisers (`none`, `basic`, `whisper`). Every reference id is scored: a
missing hypothesis is an empty one (all deletions) and is listed; hypothesis ids without a
reference are listed and ignored. An empty reference has no words to get wrong, so its
hypothesis words all count as insertions in the corpus totals, and it is left out of the mean
per-utterance WER (its own WER is undefined).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

import jiwer
import numpy as np
import regex

from audio_llm.errors import AudioLLMError
from audio_llm.model.prompts import normalize_transcript

NORMALIZERS = ("none", "basic", "whisper")
DEFAULT_BUCKETS: tuple[float, ...] = (5.0, 10.0, 20.0, 30.0)
CONFIDENCE = 0.95
SHOW_IDS = 5  # ids listed in the text summary; the JSON keeps them all

# Typographic apostrophes become ASCII so "don’t" and "don't" are the same word.
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u02bc": "'"})
# An apostrophe counts as part of a word only with a word character on both sides.
_LOOSE_APOSTROPHE = regex.compile(r"(?<!\w)'|'(?!\w)")
_PUNCTUATION = regex.compile(r"[^\P{P}']")  # every Unicode punctuation character but "'"

Role = Literal["ref", "hyp"]


# ----------------------------------------------------------------------------- normalisers


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


# ----------------------------------------------------------------------------- reading files


def _is_jsonl(path: Path, lines: Sequence[str]) -> bool:
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        return True
    first = next((line.strip() for line in lines if line.strip()), "")
    return first.startswith("{")


def _read_lines(path: str | os.PathLike[str]) -> tuple[Path, list[str]]:
    path = Path(path)
    try:
        # utf-8-sig: a BOM would otherwise glue itself to the first id.
        return path, path.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise AudioLLMError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AudioLLMError(f"{path}: cannot read as UTF-8 text ({exc})") from None


Record = tuple[str, int, dict[str, Any]]  # (id, line number, fields)


def _records(path: str | os.PathLike[str]) -> tuple[bool, list[Record]]:
    """(is_jsonl, [(id, line number, record)]); Kaldi lines become {"text": rest of line}."""
    path, lines = _read_lines(path)
    jsonl = _is_jsonl(path, lines)
    out: list[Record] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if jsonl:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise AudioLLMError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("id"), (str, int)):
                raise AudioLLMError(
                    f'{path}:{lineno}: each JSONL line needs an object with an "id" string'
                )
            uid = str(record["id"])
        else:
            parts = line.strip().split(maxsplit=1)
            uid, record = parts[0], {"text": parts[1] if len(parts) > 1 else ""}
        if uid in seen:
            raise AudioLLMError(
                f"{path}:{lineno}: id {uid!r} already appeared on line {seen[uid]}; "
                "ids must be unique"
            )
        seen[uid] = lineno
        out.append((uid, lineno, record))
    return jsonl, out


def _text_of(record: dict[str, Any], role: Role | None, where: str) -> str:
    # A JSONL holding both "ref" and "hyp" can be passed as REF and as HYP.
    keys = {"ref": ("ref", "text"), "hyp": ("hyp", "text"), None: ("text", "ref", "hyp")}[role]
    for key in keys:
        if key in record:
            value = record[key]
            if not isinstance(value, str):
                raise AudioLLMError(f'{where}: "{key}" must be a string, got {value!r}')
            return value
    raise AudioLLMError(f"{where}: no transcript field; expected one of {', '.join(keys)}")


def read_texts(path: str | os.PathLike[str], role: Role | None = None) -> dict[str, str]:
    """Transcripts by id from a Kaldi `id text` file or a JSONL of {"id", "text"} objects.

    The format is JSONL for .jsonl/.json/.ndjson files or when the first line starts with "{",
    otherwise Kaldi (id = first whitespace token, text = the rest, possibly empty). `role`
    picks the JSONL field: "ref" prefers "ref", "hyp" prefers "hyp", both fall back to "text".
    """
    _, records = _records(path)
    return {uid: _text_of(rec, role, f"{path}:{lineno}") for uid, lineno, rec in records}


def _duration_of(value: Any, where: str) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise AudioLLMError(f"{where}: duration {value!r} is not a number of seconds") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise AudioLLMError(f"{where}: duration {value!r} must be a finite number >= 0")
    return seconds


def _durations(
    path: str | os.PathLike[str], jsonl: bool, records: list[Record]
) -> dict[str, float]:
    out = {}
    for uid, lineno, rec in records:
        where = f"{path}:{lineno}"
        if not jsonl:
            out[uid] = _duration_of(rec["text"], where)
        elif rec.get("duration") is not None:
            out[uid] = _duration_of(rec["duration"], where)
    return out


def read_durations(path: str | os.PathLike[str]) -> dict[str, float]:
    """Durations in seconds by id from `id seconds` lines or a JSONL with a "duration" field.

    JSONL lines without "duration" are skipped, so a REF/HYP JSONL can be read this way too.
    """
    return _durations(path, *_records(path))


# ----------------------------------------------------------------------------- scoring


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


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _id_list(ids: Sequence[str]) -> str:
    more = f", ... (+{len(ids) - SHOW_IDS})" if len(ids) > SHOW_IDS else ""
    return ", ".join(ids[:SHOW_IDS]) + more


@dataclass
class WerReport:
    """Corpus scores of one REF/HYP pair; `to_dict()` for JSON, `summary()` for people."""

    normalizer: str
    wer: float | None  # None when the references hold no words at all
    utterances: int
    ref_words: int
    hyp_words: int
    substitutions: int
    deletions: int
    insertions: int
    hits: int
    cer: dict[str, Any]
    mean_utterance_wer: float | None
    utterances_in_mean: int
    empty_refs: int
    empty_ref_insertions: int
    missing_ids: list[str]
    extra_ids: list[str]
    bootstrap: dict[str, Any] | None
    by_duration: list[dict[str, Any]] | None
    durations_unknown: int
    # Per-utterance rows, kept so an evaluator need not align twice; not in to_dict() by default.
    per_utterance: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    def to_dict(self, include_utterances: bool = False) -> dict[str, Any]:
        """Plain JSON-ready dict; per-utterance rows only when asked for."""
        out = asdict(self)
        out["errors"] = self.errors
        out["missing_count"] = len(self.missing_ids)
        out["extra_count"] = len(self.extra_ids)
        if not include_utterances:
            del out["per_utterance"]
        return out

    def summary(self) -> str:
        """A few readable lines: WER with its interval, CER, ids that did not match."""
        lines = [
            f"WER {_pct(self.wer)}  ({self.errors} errors = S {self.substitutions} + "
            f"D {self.deletions} + I {self.insertions}; {self.ref_words} reference words, "
            f"{self.utterances} utterances; normalizer {self.normalizer})"
        ]
        if self.bootstrap:
            b = self.bootstrap
            lines.append(
                f"  {100 * b['confidence']:.0f}% interval [{_pct(b['low'])}, {_pct(b['high'])}] "
                f"({b['resamples']} bootstrap resamples over utterances, seed {b['seed']})"
            )
        lines.append(
            f"CER {_pct(self.cer['cer'])}  (S {self.cer['substitutions']} + "
            f"D {self.cer['deletions']} + I {self.cer['insertions']}; "
            f"{self.cer['ref_chars']} reference characters)"
        )
        lines.append(
            f"mean per-utterance WER {_pct(self.mean_utterance_wer)} over "
            f"{self.utterances_in_mean} utterances"
        )
        if self.empty_refs:
            lines.append(
                f"empty references: {self.empty_refs} (left out of the mean; their "
                f"{self.empty_ref_insertions} hypothesis words count as insertions)"
            )
        if self.missing_ids:
            lines.append(
                f"missing hypotheses: {len(self.missing_ids)} (scored as empty, all deletions): "
                + _id_list(self.missing_ids)
            )
        if self.extra_ids:
            lines.append(
                f"extra hypotheses: {len(self.extra_ids)} (no reference, ignored): "
                + _id_list(self.extra_ids)
            )
        if self.by_duration is not None:
            lines.append("WER by duration (seconds):")
            for b in (b for b in self.by_duration if b["utterances"]):
                lines.append(
                    f"  {b['bucket']:>10}  {_pct(b['wer']):>8}  {b['utterances']:>6} utts  "
                    f"{b['ref_words']:>7} words"
                )
            if self.durations_unknown:
                lines.append(f"  no duration for {self.durations_unknown} utterances")
        return "\n".join(lines)


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


# ----------------------------------------------------------------------------- command line


def _load(path: str, role: Role) -> tuple[dict[str, str], dict[str, float]]:
    """Transcripts of a REF/HYP file, and the durations its JSONL lines carry (if any)."""
    jsonl, records = _records(path)
    texts = {uid: _text_of(rec, role, f"{path}:{lineno}") for uid, lineno, rec in records}
    return texts, _durations(path, jsonl, records) if jsonl else {}


def _write_json(path: str, payload: dict[str, Any]) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out)  # a reader never sees half a report


def _buckets(text: str) -> tuple[float, ...]:
    try:
        edges = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected seconds like 5,10,20,30") from None
    if not edges or any(not math.isfinite(e) or e <= 0 for e in edges):
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive seconds like 5,10,20,30")
    return edges


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "wer",
        help="score hypotheses against references: WER, CER, bootstrap interval",
        description=(
            "Corpus WER = (S + D + I) / reference words over every reference id. REF and HYP are "
            "Kaldi-style 'id text' files or JSONL ({'id', 'text'}; 'ref'/'hyp' keys also work, "
            "so one JSONL with both can be given twice). Missing hypotheses score as empty; "
            "extra ones are listed and ignored."
        ),
    )
    p.add_argument("--ref", required=True, metavar="REF", help="reference transcripts")
    p.add_argument("--hyp", required=True, metavar="HYP", help="hypothesis transcripts")
    p.add_argument(
        "--normalizer",
        choices=NORMALIZERS,
        default="basic",
        help="none: spaces/line endings only; basic (default): + lowercase, no punctuation; "
        "whisper: Whisper's English normaliser",
    )
    p.add_argument(
        "--durations",
        metavar="FILE",
        help="'id seconds' lines or JSONL with 'duration' (default: 'duration' in REF/HYP JSONL)",
    )
    p.add_argument(
        "--buckets",
        type=_buckets,
        default=DEFAULT_BUCKETS,
        metavar="S1,S2,..",
        help="duration bucket edges in seconds (default 5,10,20,30)",
    )
    p.add_argument("--json", metavar="OUT", help="write the full report (with utterances) here")
    p.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        metavar="N",
        help="resamples for the 95%% interval (default 1000; 0 = none)",
    )
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument(
        "--strict", action="store_true", help="exit 1 if any id is missing from HYP or extra"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.bootstrap < 0:
        raise AudioLLMError(f"--bootstrap {args.bootstrap}: use 0 (no interval) or more")
    refs, ref_durations = _load(args.ref, "ref")
    if not refs:
        raise AudioLLMError(f"{args.ref}: no reference utterances; is it the right file?")
    hyps, hyp_durations = _load(args.hyp, "hyp")
    if args.durations:
        durations = read_durations(args.durations)
    else:  # durations in the JSONL files themselves; REF wins where both have one
        durations = {**hyp_durations, **ref_durations} or None
    report = score(
        refs,
        hyps,
        normalizer=args.normalizer,
        durations=durations,
        bootstrap=args.bootstrap,
        seed=args.seed,
        duration_buckets=args.buckets,
    )
    print(report.summary())
    if args.json:
        payload = report.to_dict(include_utterances=True)
        payload.update(ref=str(args.ref), hyp=str(args.hyp))
        _write_json(args.json, payload)
    if not hyps.keys() & refs.keys():
        print(
            f"audio-llm wer: warning: no id of {args.hyp} appears in {args.ref}; "
            "check that the files belong together",
            file=sys.stderr,
        )
    if args.strict and (report.missing_ids or report.extra_ids):
        print(
            f"audio-llm wer: {len(report.missing_ids)} missing and {len(report.extra_ids)} "
            "extra hypothesis ids (--strict)",
            file=sys.stderr,
        )
        return 1
    return 0
