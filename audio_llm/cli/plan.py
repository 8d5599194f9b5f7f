"""`audio-llm plan`: the command line of `audio_llm.planning.plan` (memory per GPU, FLOPs per
sample and time per epoch, before renting the GPUs)."""

from __future__ import annotations

import argparse
import dataclasses
import json

from audio_llm.planning.plan import MEMORY_HEADROOM, PlanSpec, format_plan, make_plan


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `plan` subcommand, its flags defaulting to `PlanSpec`'s fields."""
    d = PlanSpec()
    p = subparsers.add_parser(
        "plan",
        help="memory per GPU, FLOPs and epoch time for a training setup (no download)",
        description=(
            "Build the encoder and LLM on the meta device from their configs (built-in names "
            "whisper-large-v3, qwen2-vl-2b, qwen2-vl-7b, or checkpoint folders), count trainable "
            "and frozen parameters, and estimate per-GPU memory (weights, gradients, optimizer, "
            "activations), training FLOPs per sample and time per epoch at a given MFU. Model "
            "states are cross-checked against DeepSpeed's own estimator."
        ),
    )
    _add_setup_flags(p, d)
    _add_step_flags(p, d)
    _add_gpu_and_epoch_flags(p, d)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)


def _add_setup_flags(p: argparse.ArgumentParser, d: PlanSpec) -> None:
    """The models and how they are trained and spread: GPUs, ZeRO, LoRA, projector."""
    p.add_argument("--encoder", default=d.encoder, help=f"Whisper (default {d.encoder})")
    p.add_argument("--llm", default=d.llm, help=f"Qwen2-VL (default {d.llm})")
    p.add_argument("--gpus-per-node", type=int, default=d.gpus_per_node, help="default 8")
    p.add_argument("--nodes", type=int, default=d.nodes, help="default 1")
    p.add_argument("--zero", type=int, default=d.zero, help="ZeRO stage 1, 2 or 3 (default 2)")
    p.add_argument(
        "--offload", action="store_true", help="optimizer (ZeRO-3: and parameters) on CPU"
    )
    p.add_argument(
        "--lora-rank", type=int, default=d.lora_rank, help="LoRA rank; 0 = stage 1 (default 16)"
    )
    p.add_argument("--stack", type=int, default=d.stack, help="projector stack factor k")
    p.add_argument("--projector", default=d.projector, help="linear (default) or mlp")
    p.add_argument("--projector-hidden", type=int, default=0, help="mlp width (0: LLM width)")


def _add_step_flags(p: argparse.ArgumentParser, d: PlanSpec) -> None:
    """What one sample costs: encoder frames, micro batch, sequence length, precision."""
    enc = p.add_mutually_exclusive_group()
    enc.add_argument("--varlen", dest="varlen", action="store_true", help="valid frames only")
    enc.add_argument(
        "--padded", dest="varlen", action="store_false", help="30 s window (default, the seed)"
    )
    p.add_argument(
        "--precomputed-encoder",
        action="store_true",
        help="encoder-mode shards: the step does not run Whisper",
    )
    p.add_argument("--batch", type=int, default=d.batch, help="micro batch per GPU (default 8)")
    p.add_argument(
        "--audio-seconds", type=float, default=d.audio_seconds, help="mean clip (default 12.7)"
    )
    p.add_argument(
        "--text-tokens",
        type=int,
        default=d.text_tokens,
        help="non-audio positions per sample: template, prompt, transcript (default 70)",
    )
    p.add_argument("--dtype", default=d.dtype, help="bfloat16 (default), float16 or float32")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute LLM layers")


def _add_gpu_and_epoch_flags(p: argparse.ArgumentParser, d: PlanSpec) -> None:
    """The GPUs' speed and memory and the hours of audio in an epoch (or a mixture)."""
    p.add_argument("--mfu", type=float, default=d.mfu, help="assumed MFU (default 0.4)")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=d.peak_tflops,
        help="peak dense TFLOP/s per GPU (default 989, H100 bf16)",
    )
    p.add_argument(
        "--epoch-hours",
        type=float,
        default=d.epoch_hours,
        help="hours of audio per epoch (default 960, LibriSpeech)",
    )
    p.add_argument(
        "--gpu-memory",
        type=float,
        default=d.gpu_memory,
        help=(
            f"GiB of memory per GPU (default {d.gpu_memory:g}): says whether the plan fits, "
            f"keeping {MEMORY_HEADROOM * 100:.0f}%% free, and the largest micro batch that does"
        ),
    )
    p.add_argument(
        "--mix",
        action="append",
        type=_mix_entry,
        default=[],
        metavar="NAME=HOURS:WEIGHT",
        help=(
            "a corpus of a weighted mixture (repeat per corpus, as data.train_shards lists them): "
            "the epoch becomes their hours together, with passes and time per pass of each"
        ),
    )


def run(args: argparse.Namespace) -> int:
    """Plan the setup the flags describe and print it (as text, or as JSON with `--json`)."""
    names = {f.name for f in dataclasses.fields(PlanSpec)}
    options = {k: v for k, v in vars(args).items() if k in names}
    spec = PlanSpec(**{**options, "mix": tuple(options.get("mix", ()))})
    plan = make_plan(spec)
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0


def _mix_entry(text: str) -> tuple[str, float, float]:
    """`read=960:0.8` -> ("read", 960.0, 0.8)."""
    name, _, rest = text.partition("=")
    hours, _, weight = rest.partition(":")
    try:
        return name.strip(), float(hours), float(weight)
    except ValueError:
        message = f"{text!r}: write NAME=HOURS:WEIGHT, e.g. read=960:0.8"
        raise argparse.ArgumentTypeError(message) from None
