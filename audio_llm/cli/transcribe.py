"""`audio-llm transcribe`: audio files of any length, cut to the run's training clip lengths."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from audio_llm.audio.frames import SAMPLE_RATE
from audio_llm.audio.segment import WINDOW_SECONDS, plan_pieces
from audio_llm.cli._model_source import add_model_source
from audio_llm.evaluation.transcribe import model_decoder, training_clip_seconds, transcribe_audio


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "transcribe",
        help="transcribe audio files of any length with a trained model",
        description=(
            "Transcribe audio files (any format soundfile reads, any rate, any channels, any "
            "length). Audio longer than the run's longest training clip is cut at pauses into "
            "pieces no longer than that (--max-segment-seconds overrides); speech with no pause "
            "is cut into windows overlapping by --overlap seconds, joined at their shared words."
        ),
    )
    add_model_source(p)
    p.add_argument("files", nargs="+", help="audio files")
    p.add_argument(
        "--max-segment-seconds",
        type=float,
        default=None,
        help="longest piece decoded at once (default: the longest clip the run was trained on, "
        f"read from its training shards or export bundle; {WINDOW_SECONDS:g} if unknown)",
    )
    p.add_argument(
        "--overlap",
        type=float,
        default=5.0,
        help="overlap of windows over speech with no pause, in seconds (at most a quarter of "
        "the segment length is used)",
    )
    p.add_argument("--max-new-tokens", type=int, default=128, help="per piece")
    p.add_argument("--beams", type=int, default=1)
    p.add_argument(
        "--ctc-weight",
        type=float,
        default=0.0,
        help="joint CTC/LLM decoding weight in [0, 1] for runs trained with train.ctc_weight",
    )
    p.add_argument("--batch-size", type=int, default=8, help="pieces decoded together")
    p.add_argument("--json", action="store_true", help="JSON lines {file, seconds, text}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from audio_llm.audio.io import load_audio
    from audio_llm.evaluation.export import load_for_inference

    audio = {path: load_audio(path) for path in args.files}  # bad files fail before the model loads
    max_seconds = args.max_segment_seconds
    if max_seconds is None:
        trained = training_clip_seconds(args.run, args.export)
        source = args.run or args.export
        if trained is None:
            max_seconds = WINDOW_SECONDS
            print(
                f"transcribe: the training clip lengths of {source} are unknown (training shards "
                f"not found); long audio is cut at pauses into pieces of at most "
                f"{max_seconds:g} s; set --max-segment-seconds to the longest training clip",
                file=sys.stderr,
            )
        else:
            max_seconds = min(trained[1], WINDOW_SECONDS)
            print(
                f"transcribe: {source} was trained on {trained[0]:.1f}-{trained[1]:.1f} s clips; "
                f"long audio is cut at pauses into pieces of at most {max_seconds:.1f} s",
                file=sys.stderr,
            )
    plan_pieces(np.zeros(0, np.float32), max_seconds, args.overlap)  # bad flags fail here, early
    model = load_for_inference(args.run, args.export, device=args.device)
    decode = model_decoder(model, args.max_new_tokens, args.beams, args.ctc_weight)
    for path, samples in audio.items():
        text = transcribe_audio(decode, samples, args.overlap, args.batch_size, max_seconds)
        seconds = len(samples) / SAMPLE_RATE
        if args.json:
            print(json.dumps({"file": str(Path(path)), "seconds": round(seconds, 3), "text": text}))
        else:
            print(f"{path}\t{text}")
    return 0
