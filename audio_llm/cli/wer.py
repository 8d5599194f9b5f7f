"""`audio-llm wer --ref REF --hyp HYP`: corpus WER, CER and a bootstrap interval of two files."""

from __future__ import annotations

import argparse
import math
import sys

from audio_llm.errors import AudioLLMError
from audio_llm.evaluation.wer import (
    DEFAULT_BUCKETS,
    NORMALIZERS,
    read_durations,
    read_with_durations,
    score,
    write_report_json,
)


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
    refs, ref_durations = read_with_durations(args.ref, "ref")
    if not refs:
        raise AudioLLMError(f"{args.ref}: no reference utterances; is it the right file?")
    hyps, hyp_durations = read_with_durations(args.hyp, "hyp")
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
        write_report_json(report, args.json, args.ref, args.hyp)
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
