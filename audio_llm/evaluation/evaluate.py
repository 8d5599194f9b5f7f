"""Transcribe held-out shards and score them: batched generation split across ranks, then WER.

Used three ways: `audio-llm eval` (a trained run or an exported bundle, optionally under
`torchrun`/`deepspeed` for several ranks), WER every `eval.every` steps inside training (also under
ZeRO-3, where every rank must run the same number of forward passes: `synced=True`), and the demo.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from audio_llm import dist
from audio_llm.data import AudioSample, Collator, Problems, ShardSet, eval_samples, layout_of
from audio_llm.errors import AudioLLMError
from audio_llm.evaluation.wer import score
from audio_llm.files import atomic_write_text
from audio_llm.model.ctc import ctc_decoding

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
    decoding, see `model.ctc`)."""
    batch = collator.prompt_batch(samples)
    device = next(model.parameters()).device
    ids = model.generate(
        **model.batch_inputs(batch, device),
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        synced_gpus=synced,
        decoding=ctc_decoding(ctc_weight),
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
    collator = Collator(layout_of(model, identity=False), shards.mode)
    problems = Problems()
    samples = list(eval_samples(shards, rank, world, long_audio, problems))
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
    atomic_write_text(out / "utterances.jsonl", lines)
    atomic_write_text(out / "summary.json", json.dumps(result.summary(), indent=2) + "\n")
    return out
