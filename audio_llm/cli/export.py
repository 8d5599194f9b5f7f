"""`audio-llm export`: bundle a training run into a folder that `transcribe`/`eval` load."""

from __future__ import annotations

import argparse

from audio_llm.evaluation.export import export_bundle


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="bundle a training run into a folder that transcribe/eval load",
        description=(
            "Write OUT with the encoder + feature extractor, the projector, the LoRA adapter (or, "
            "with --merge, the LLM with LoRA merged in) and the model config, so `audio-llm "
            "transcribe/eval --export OUT` work without the run folder. Without --merge the "
            "base LLM is referenced by its path (model.llm of the run)."
        ),
    )
    p.add_argument("--run", required=True, help="training run folder (train.out_dir)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--merge", action="store_true", help="merge LoRA into a full LLM copy")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = export_bundle(args.run, args.out, args.merge)
    print(f"exported {args.run} -> {out}")
    return 0
