"""`audio-llm` console script: one module of this package per subcommand, each registering its
own arguments, and `stage`, the command line of `launch/stage1.py` and `stage2.py`. The library
modules behind them know nothing of argparse (only the demo driver parses its own flags)."""

from __future__ import annotations

import argparse
import importlib
import sys

from audio_llm.errors import AudioLLMError

# Each `audio_llm.cli.<module>` defines `register(subparsers)`, which adds a parser whose
# `func(args) -> int` runs it.
# Imported lazily per command so `audio-llm --help` stays fast and torch loads only when needed.
COMMANDS: dict[str, tuple[str, str]] = {
    "tiny": ("audio_llm.cli.tiny", "write tiny offline Whisper + Qwen2-VL checkpoints"),
    "teach-reading": (
        "audio_llm.cli.teach_reading",
        "text-only pretraining of a tiny LLM to read embeddings at audio placeholders",
    ),
    "lora-targets": (
        "audio_llm.cli.lora_targets",
        "show which modules a LoRA regex hits, per component",
    ),
    "config": ("audio_llm.cli.config", "print the resolved training config (file + overrides)"),
    "pack": (
        "audio_llm.cli.pack",
        "build WebDataset shards + index.json from manifests/LibriSpeech/Kaldi dirs",
    ),
    "wer": (
        "audio_llm.cli.wer",
        "score hypotheses against references: WER, CER, bootstrap interval",
    ),
    "eval": (
        "audio_llm.cli.eval",
        "transcribe shards with a trained model and report WER",
    ),
    "export": (
        "audio_llm.cli.export",
        "bundle a training run into a folder transcribe/eval load",
    ),
    "transcribe": ("audio_llm.cli.transcribe", "transcribe audio files of any length"),
    "plan": (
        "audio_llm.cli.plan",
        "memory per GPU, FLOPs and epoch time for a setup (no download)",
    ),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="audio-llm",
        description="Train speech LLMs: Whisper encoder -> projector -> Qwen2-VL with LoRA.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, summary) in COMMANDS.items():
        if command == name:
            importlib.import_module(module).register(sub)
        else:
            sub.add_parser(name, help=summary)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if a in COMMANDS), None)
    args = build_parser(command).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except AudioLLMError as exc:
        print(f"audio-llm {args.command}: error: {exc}", file=sys.stderr)
        return 2
