"""`audio-llm eval`: transcribe shards with a trained model and report WER (several ranks under
torchrun/deepspeed)."""

from __future__ import annotations

import argparse
import os

import torch

from audio_llm import dist
from audio_llm.cli._model_source import add_model_source
from audio_llm.evaluation.evaluate import evaluate, write_results


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
