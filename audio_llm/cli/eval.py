"""`audio-llm eval`: transcribe shards with a trained model and report WER (several ranks under
torchrun/deepspeed)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from audio_llm import dist
from audio_llm.cli._model_source import add_model_source
from audio_llm.errors import AudioLLMError
from audio_llm.evaluation.evaluate import evaluate, write_results


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="transcribe shards with a trained model and report WER",
        description=(
            "Batched greedy (or beam) transcription of every sample in --shards, then corpus WER "
            "(S+D+I over reference words, jiwer) with the chosen normaliser. Writes "
            "OUT/utterances.jsonl and OUT/summary.json. Under torchrun/deepspeed the samples are "
            "split across ranks and scored together. Several test sets in one call load the "
            "model once: --shards A B --out OUT_A OUT_B, each scored on its own."
        ),
    )
    add_model_source(p)
    p.add_argument(
        "--shards",
        required=True,
        nargs="+",
        help="packed shard folder (or URLs with --index); several: one test set each",
    )
    p.add_argument("--index", default="", help="index.json for URL shard specs (one --shards)")
    p.add_argument("--out", required=True, nargs="+", help="output folder, one per --shards")
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

    if len(args.out) != len(args.shards):
        raise AudioLLMError(
            f"{len(args.shards)} --shards but {len(args.out)} --out: give one output folder "
            "per test set, in the same order"
        )
    if args.index and len(args.shards) > 1:
        raise AudioLLMError("--index names one test set's shards: give one --shards with it")
    if len({Path(out).resolve() for out in args.out}) != len(args.out):
        raise AudioLLMError("--out names the same folder twice: one folder per test set")
    if "RANK" in os.environ:
        dist.init_distributed()
    device = f"cuda:{dist.local_rank()}" if args.device == "cuda" else args.device
    model = load_for_inference(args.run, args.export, device=device)
    for shards, out in zip(args.shards, args.out, strict=True):
        result = evaluate(
            model,
            shards,
            args.index,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            num_beams=args.beams,
            normalizer=args.normalizer,
            limit=args.limit,
            ctc_weight=args.ctc_weight,
        )
        if dist.is_main():
            write_results(result, out)
            # several sets: each headline names its set ("test-clean: WER ...")
            label = f"{Path(shards).name or shards}: " if len(args.shards) > 1 else ""
            print(label + result.headline())
            print(result.report.summary())
            flagged = sum(1 for r in result.rows if r["flags"])
            print(f"flagged hypotheses (loops / longer than the audio): {flagged}")
            print(f"wrote {out}/utterances.jsonl and summary.json")
    dist.shutdown()  # no rank exits while another is still in a collective
    return 0
