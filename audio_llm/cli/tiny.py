"""`audio-llm tiny`: tiny offline Whisper + Qwen2-VL checkpoints, or random ones at published
shapes (`--like`)."""

from __future__ import annotations

import argparse
from dataclasses import asdict

from audio_llm.errors import AudioLLMError
from audio_llm.model.tiny import (
    LIKE_ENCODERS,
    LIKE_LLMS,
    TinySpec,
    write_like_models,
    write_tiny_models,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tiny",
        help="write tiny offline Whisper + Qwen2-VL checkpoints",
        description=(
            "Write OUT/whisper (Whisper seq2seq checkpoint + feature extractor) and OUT/qwen2vl "
            "(Qwen2-VL model + BPE tokenizer with Qwen2-VL special tokens and chat template), "
            "randomly initialised from SEED (Whisper's random layers scaled to pass the audio "
            "through, see WHISPER_PASSTHROUGH). Point model.encoder / model.llm at them. "
            "With --like: the same folders at the published shapes, random bf16 weights at the "
            "configs' init std (no passthrough scaling), for speed and memory smoke tests."
        ),
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    like = p.add_argument_group(
        "published shapes, random weights (instead of the tiny sizes below)"
    )
    like.add_argument(
        "--like",
        metavar="ENCODER,LLM",
        help=f"e.g. whisper-large-v3,qwen2-vl-2b: the real models' shapes (encoders: "
        f"{', '.join(LIKE_ENCODERS)}; LLMs: {', '.join(LIKE_LLMS)}), random bf16 weights, "
        "the tiny tokenizer",
    )
    like.add_argument(
        "--layers",
        type=int,
        default=0,
        help="with --like: cap every stack's depth (default 0: all)",
    )
    like.add_argument(
        "--shrink", type=int, default=1, help="with --like: divide the widths by K (default 1)"
    )
    like.add_argument(
        "--device", help="with --like: where to draw the weights (default cuda if available)"
    )
    sizes = p.add_argument_group("tiny sizes")
    for name, value in asdict(TinySpec()).items():
        flag = "--" + name.replace("_", "-")
        sizes.add_argument(flag, type=int, default=value, help=f"default {value}")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    spec = TinySpec(**{k: getattr(args, k) for k in asdict(TinySpec())})
    if args.like:
        if spec != TinySpec():
            raise AudioLLMError("--like sets the shapes: drop the tiny size flags")
        like = [n.strip() for n in args.like.split(",") if n.strip()]
        paths = write_like_models(args.out, like, args.seed, args.layers, args.shrink, args.device)
    elif args.layers or args.shrink != 1 or args.device:
        raise AudioLLMError("--layers, --shrink and --device go with --like")
    else:
        paths = write_tiny_models(args.out, args.seed, spec)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0
