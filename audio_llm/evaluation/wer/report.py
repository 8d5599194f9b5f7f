"""REF/HYP files in, a readable and a JSON report out.

REF and HYP are Kaldi-style `id text` files or JSONL ({"id", "text"}; "ref"/"hyp" keys also work,
so one JSONL with both can be passed as both). `WerReport` holds the corpus scores that
`scoring.score` computes; `write_report_json` writes it with its per-utterance rows.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from audio_llm.errors import AudioLLMError
from audio_llm.files import atomic_write_json

SHOW_IDS = 5  # ids listed in the text summary; the JSON keeps them all

Role = Literal["ref", "hyp"]


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


def read_with_durations(
    path: str | os.PathLike[str], role: Role
) -> tuple[dict[str, str], dict[str, float]]:
    """Transcripts of a REF/HYP file, and the durations its JSONL lines carry (if any)."""
    jsonl, records = _records(path)
    texts = {uid: _text_of(rec, role, f"{path}:{lineno}") for uid, lineno, rec in records}
    return texts, _durations(path, jsonl, records) if jsonl else {}


# ----------------------------------------------------------------------------- the report


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


def write_report_json(report: WerReport, path: str | os.PathLike[str], ref: str, hyp: str) -> None:
    """The full report (per-utterance rows included) plus the REF and HYP paths, as JSON at
    `path` (its folder is made if needed); written atomically, so a reader never sees half."""
    payload = report.to_dict(include_utterances=True)
    payload.update(ref=str(ref), hyp=str(hyp))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, payload)
