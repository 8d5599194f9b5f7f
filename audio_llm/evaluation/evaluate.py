"""Transcribe held-out shards and score them: batched generation split across ranks, then WER.

Used three ways: `audio-llm eval` (a trained run or an exported bundle, optionally under
`torchrun`/`deepspeed` for several ranks), WER every `eval.every` steps inside training (also under
ZeRO-3, where every rank must run the same number of forward passes: `synced=True`), and the demo.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from audio_llm import dist
from audio_llm.data.collate import AudioSample, Collator, model_collator
from audio_llm.data.shards import ShardSet
from audio_llm.data.stream import _Problems, decode_sample, parse_sample, read_shard
from audio_llm.errors import AudioLLMError
from audio_llm.evaluation.export import add_model_source
from audio_llm.evaluation.wer import score

MAX_WORDS_PER_SECOND = 6.0  # fast speech is ~4 words/s; more than this cannot all be in the audio


@dataclass
class EvalResult:
    rows: list[dict[str, Any]]
    report: Any  # WerReport (rank 0), None elsewhere
    seconds: float
    problems: dict[str, int] = field(default_factory=dict)  # all ranks' (rank 0)
    indexed: int = 0  # samples the index lists: what a full evaluation would score
    limit: int | None = None

    @property
    def not_scored(self) -> int:
        """Indexed samples with no row (rank 0): lost to data problems or left out by `limit`."""
        return self.indexed - len(self.rows)

    def headline(self) -> str:
        """`WER 3.20% over 22 of 24 indexed utterances (2 not scored: data problems
        corrupt_shard 1 (named in the log))`: what the WER is over, and why anything is not."""
        wer = self.report.wer if self.report is not None else None
        shown = "n/a" if wer is None else f"{100 * wer:.2f}%"
        line = f"WER {shown} over {len(self.rows)} of {self.indexed} indexed utterances"
        if self.not_scored == 0:
            return line
        why = []
        if self.limit is not None:
            why.append(f"--limit {self.limit}")
        if self.problems:
            problems = ", ".join(f"{k} {v}" for k, v in sorted(self.problems.items()))
            why.append(f"data problems {problems} (named in the log)")
        reasons = "; ".join(why) or "no problem was counted"
        if self.not_scored < 0:  # the shards hold more than their index says
            return f"{line} ({-self.not_scored} more than the index lists: {reasons})"
        return f"{line} ({self.not_scored} not scored: {reasons})"

    def summary(self) -> dict[str, Any]:
        report = self.report.to_dict() if self.report is not None else {}
        flagged = sum(1 for r in self.rows if r.get("flags"))
        return {
            **report,
            "indexed_utterances": self.indexed,
            "not_scored": self.not_scored,
            "flagged": flagged,
            "eval_seconds": self.seconds,
            "data": self.problems,
        }


def eval_collator(model, mode: str) -> Collator:
    # nothing is refused at evaluation: every utterance is scored
    return model_collator(model, mode, max_length=10**9)


def iter_samples(
    shards: ShardSet, rank: int, world: int, long_audio: str, problems: _Problems
) -> Iterator[AudioSample]:
    """Every sample of the set exactly once across ranks (sample i goes to rank i % world).

    Every rank reads every shard, so that ranks get even shares whatever the shard sizes; a
    shard's own problems (corrupt, unknown members) are counted by rank `shard number % world`
    alone, or `world` ranks would count each of them once."""
    index = 0
    others = _Problems(quiet=True)  # what other ranks count (and log)
    for number, shard in enumerate(shards.shards):
        mine_to_count = problems if number % world == rank else others
        for raw in read_shard(shard, shards.payload, mine_to_count):
            mine = index % world == rank
            index += 1
            if not mine:
                continue
            parsed = parse_sample(raw, shards.mode, shards.payload, long_audio, problems)
            if parsed is None:
                continue
            meta, frames = parsed
            try:
                yield decode_sample(raw, meta, frames, shards.mode)
            except Exception as exc:  # counted and named, never fatal
                problems("undecodable", f"{shard.url}:{raw['__key__']}", repr(exc))


def flags(hypothesis: str, seconds: float) -> list[str]:
    """Signs of a broken decode: a repeating loop, or more words than the audio could hold."""
    words = hypothesis.split()
    out = []
    if seconds > 0 and len(words) > MAX_WORDS_PER_SECOND * seconds + 3:
        out.append("too_long_for_audio")
    for n in (1, 2, 3):  # the same 1-3 word chunk four times in a row
        for i in range(len(words) - 4 * n + 1):
            chunk = words[i : i + n]
            if all(words[i + k * n : i + (k + 1) * n] == chunk for k in range(1, 4)):
                out.append("repeating")
                break
        if "repeating" in out:
            break
    return out


@torch.no_grad()
def transcribe_samples(
    model,
    collator: Collator,
    samples: list[AudioSample],
    max_new_tokens: int = 128,
    num_beams: int = 1,
    synced: bool = False,
    ctc_weight: float = 0.0,
) -> list[str]:
    """Greedy/beam transcripts of one batch of decoded samples (`ctc_weight`: joint CTC
    decoding, see `ctc_decode`)."""
    batch = collator.prompt_batch(samples)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    ids = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        synced_gpus=synced,
        ctc_weight=ctc_weight,
    )
    return [model.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]


def evaluate(
    model,
    spec: str,
    index: str = "",
    *,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    num_beams: int = 1,
    normalizer: str = "basic",
    long_audio: str = "skip",
    limit: int | None = None,
    synced: bool = False,
    bootstrap: int = 1000,
    ctc_weight: float = 0.0,
) -> EvalResult:
    """Transcribe and score every sample of `spec`; collective when distributed (all ranks call).

    Rank 0 gets the rows of every rank and the WER report; other ranks get their own rows.
    """
    began = time.time()
    rank, world = dist.rank(), dist.world_size()
    shards = ShardSet.open(spec, index)
    collator = eval_collator(model, shards.mode)
    problems = _Problems()
    samples = list(iter_samples(shards, rank, world, long_audio, problems))
    if limit is not None:
        samples = samples[: -(-limit // world)]
    batches = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    if synced:  # ZeRO-3: every rank runs as many generate() calls as the busiest one
        most = max(dist.all_gather_object(len(batches)))
        filler = batches[-1] if batches else None
        batches += [filler] * (most - len(batches)) if filler else []
        if not batches and most:
            raise AudioLLMError(f"rank {rank} has no eval sample to keep ZeRO-3 ranks in step")
    was_training = model.training
    model.eval()
    rows: list[dict[str, Any]] = []
    for number, batch in enumerate(batches):
        texts = transcribe_samples(
            model, collator, batch, max_new_tokens, num_beams, synced, ctc_weight
        )
        if number * batch_size >= len(samples):
            continue  # a filler batch
        for sample, hyp in zip(batch, texts, strict=True):
            rows.append(
                {
                    "id": sample.key,
                    "ref": sample.text,
                    "hyp": hyp,
                    "seconds": sample.seconds,
                    "flags": flags(hyp, sample.seconds),
                }
            )
    model.train(was_training)
    gathered = dist.all_gather_object((rows, dict(problems.counts)))
    report = None
    if dist.is_main():
        rows = [row for part, _ in gathered for row in part]
        merged: dict[str, int] = {}
        for _, counts in gathered:
            for key, value in counts.items():
                merged[key] = merged.get(key, 0) + value
        report = score(
            {r["id"]: r["ref"] for r in rows},
            {r["id"]: r["hyp"] for r in rows},
            normalizer=normalizer,
            durations={r["id"]: r["seconds"] for r in rows},
            bootstrap=bootstrap,
        )
        by_id = {u["id"]: u for u in report.per_utterance}
        for row in rows:
            u = by_id[row["id"]]
            row["errors"] = {k: u[k] for k in ("substitutions", "deletions", "insertions")}
            row["wer"] = u["wer"]
        problems_total = merged
    else:
        problems_total = dict(problems.counts)
    indexed = sum(s.samples for s in shards.shards)
    return EvalResult(rows, report, time.time() - began, problems_total, indexed, limit)


def write_results(result: EvalResult, out_dir: str | Path) -> Path:
    """`OUT/utterances.jsonl` (id, ref, hyp, errors, wer, flags) and `OUT/summary.json`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in result.rows)
    for name, text in (
        ("utterances.jsonl", lines),
        ("summary.json", json.dumps(result.summary(), indent=2) + "\n"),
    ):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out / name)
    return out


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="transcribe shards with a trained model and report WER",
        description=(
            "Batched greedy (or beam) transcription of every sample in --shards, then corpus WER "
            "(S+D+I over reference words, jiwer) with the chosen normaliser. Writes "
            "OUT/utterances.jsonl and OUT/summary.json. Under torchrun/deepspeed the samples are "
            "split across ranks and scored together."
        ),
    )
    add_model_source(p)
    p.add_argument("--shards", required=True, help="packed shard folder, or URLs with --index")
    p.add_argument("--index", default="", help="index.json for URL shard specs")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--beams", type=int, default=1, help="beam size (1: greedy)")
    p.add_argument(
        "--ctc-weight",
        type=float,
        default=0.0,
        help="joint CTC/LLM decoding weight in [0, 1] for runs trained with train.ctc_weight "
        "(0: the LLM alone)",
    )
    p.add_argument("--normalizer", choices=["none", "basic", "whisper"], default="basic")
    p.add_argument("--limit", type=int, help="score only the first N samples (quick checks)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from audio_llm.evaluation.export import load_for_inference

    if "RANK" in os.environ:
        dist.init_distributed()
    device = f"cuda:{dist.local_rank()}" if args.device == "cuda" else args.device
    model = load_for_inference(args.run, args.export, device=device)
    result = evaluate(
        model,
        args.shards,
        args.index,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        num_beams=args.beams,
        normalizer=args.normalizer,
        limit=args.limit,
        ctc_weight=args.ctc_weight,
    )
    if dist.is_main():
        write_results(result, args.out)
        print(result.headline())
        print(result.report.summary())
        flagged = sum(1 for r in result.rows if r["flags"])
        print(f"flagged hypotheses (loops / longer than the audio): {flagged}")
        print(f"wrote {args.out}/utterances.jsonl and summary.json")
    dist.shutdown()  # no rank exits while another is still in a collective
    return 0
