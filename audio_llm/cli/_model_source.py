"""The `--run RUN_DIR | --export DIR` pair with which `eval` and `transcribe` find a model."""

from __future__ import annotations

import argparse


def add_model_source(parser: argparse.ArgumentParser) -> None:
    """--run RUN_DIR | --export DIR, the two ways `eval` and `transcribe` find a model."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--run",
        "--run-dir",
        dest="run",
        help="training run folder (its config.yaml and export/); under torchrun write --run-dir, "
        "since torchrun takes --run as an abbreviation of its own --run-path",
    )
    src.add_argument("--export", help="folder written by `audio-llm export`")
