"""`audio-llm teach-reading`: text-only reading pretraining of a tiny LLM (`demo.reading`)."""

from __future__ import annotations

import argparse

from audio_llm.demo import reading
from audio_llm.demo.reading import ReadingSpec, teach_reading


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "teach-reading",
        help="text-only pretraining of a tiny LLM to read embeddings at audio placeholders",
        description=(reading.__doc__ or "").split("\n\n")[1].replace("\n", " "),
    )
    p.add_argument("llm", help="Qwen2-VL checkpoint folder (rewritten in place)")
    p.add_argument("--steps", type=int, default=ReadingSpec.steps)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    teach_reading(args.llm, ReadingSpec(steps=args.steps, seed=args.seed))
    return 0
