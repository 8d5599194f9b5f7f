"""`audio-llm pack`: the command's flags and what it prints; the work is in `audio_llm.pack`."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

from audio_llm.data.shards import INDEX_NAME
from audio_llm.errors import AudioLLMError
from audio_llm.pack.manifests import FORMATS
from audio_llm.pack.merge import merge
from audio_llm.pack.parts import Part
from audio_llm.pack.report import report_summary
from audio_llm.pack.verify import load_index, verify
from audio_llm.pack.writer import MODES, PackOptions, PartResult, pack_part


def parse_size(text: str) -> int:
    """`500M`, `1G`, `1.5GiB`, `100000` -> bytes (K/M/G/T are powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 500M or 1G")
    scale = 1024 ** " KMGT".index(match.group(2).upper() or " ")
    return int(float(match.group(1)) * scale)


DESCRIPTION = """\
Build WebDataset tar shards + index.json from NeMo JSONL manifests, LibriSpeech folders or Kaldi
data dirs, or check shards built earlier (--verify).

Each sample is KEY.json (text, duration, sample_rate, source, ...) plus one payload:
  --mode audio    KEY.flac     16 kHz mono 16-bit FLAC; features are computed while training
  --mode mel      KEY.mel.npy  float16 log-mel [n_mels, frames] (needs the feature extractor)
  --mode encoder  KEY.enc.npy  float16 Whisper encoder output [frames, d_model] (needs --encoder)
Audio in any format/rate/channel count soundfile reads is downmixed and resampled to 16 kHz.
Audio longer than 30 s (Whisper's window) is skipped or truncated (--long-audio); every skip is
counted by reason in the report. Output is deterministic: same input and flags, same bytes.
See shards/README.md for the format."""

EPILOG = """\
examples:
  audio-llm pack --input train.jsonl --out shards/train
  audio-llm pack --input LibriSpeech/train-clean-100 --out shards/ls100 --workers 8
  audio-llm pack --input data/train --format kaldi --out shards/mel --mode mel --n-mels 80
  audio-llm pack --input data/train --allow-pipes --out shards/train  # wav.scp has `cmd |`
  audio-llm pack --input train.jsonl --out shards/enc --mode encoder --encoder whisper-small
  audio-llm pack --verify shards/train
  audio-llm pack --input train.jsonl --out shards/enc --mode encoder --encoder whisper-small \\
      --part 3/16          # one of 16 parts, on any machine; index.json when all are done
  sbatch --array=0-15 launch/pack_array.sbatch --input train.jsonl --out shards/enc ...
  torchrun --nproc-per-node 8 -m audio_llm.cli pack --part auto --input ... --out ..."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `pack` subcommand and its flags to `subparsers`."""
    p = subparsers.add_parser(
        "pack",
        help="build WebDataset shards + index.json from manifests/LibriSpeech/Kaldi dirs",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _io_flags(p.add_argument_group("input and output"))
    _payload_flags(p.add_argument_group("payload"))
    _policy_flags(p.add_argument_group("length policy"))
    _execution_flags(p.add_argument_group("execution"))
    _parts_flags(p.add_argument_group("packing on many machines"))
    p.set_defaults(func=run)


def _io_flags(io_args: argparse._ArgumentGroup) -> None:
    io_args.add_argument(
        "--input",
        action="append",
        metavar="PATH",
        help="JSONL manifest, LibriSpeech folder or Kaldi data dir (repeatable)",
    )
    io_args.add_argument(
        "--format",
        dest="fmt",
        choices=("auto", *FORMATS),
        default="auto",
        help="input format (default auto: file -> jsonl, dir with wav.scp -> kaldi, "
        "dir with *.trans.txt -> librispeech)",
    )
    io_args.add_argument(
        "--allow-pipes",
        action="store_true",
        help="Kaldi wav.scp: run piped entries (`sox x.wav -t wav - |`) through /bin/sh and "
        "pack their output; refused by default. The commands are listed in the report. "
        "Ark offsets (`foo.ark:1234`) are read without this flag",
    )
    io_args.add_argument("--out", metavar="DIR", help="output folder for shards and index.json")
    io_args.add_argument("--prefix", default="shard", help="shard name prefix (default: shard)")
    io_args.add_argument(
        "--max-samples",
        type=int,
        default=1000,
        metavar="N",
        help="input utterances per block (default 1000): block b of the sorted input becomes "
        "shard PREFIX-b.tar (fewer samples if some are skipped; PREFIX-b-1.tar, ... if "
        "--max-bytes cuts it)",
    )
    io_args.add_argument(
        "--max-bytes",
        type=parse_size,
        default=1 << 30,
        metavar="SIZE",
        help="start a new shard before one would exceed SIZE, e.g. 500M (default 1G)",
    )
    io_args.add_argument(
        "--overwrite",
        action="store_true",
        help="replace shards and index.json already in --out. Without it, a pack of the same "
        "inputs and flags resumes: finished shards whose checksums verify are kept",
    )
    io_args.add_argument(
        "--verify",
        metavar="DIR",
        help="instead of packing: re-read every shard in DIR/index.json, check checksums, "
        "members and payloads; exit 1 on any problem",
    )


def _payload_flags(content: argparse._ArgumentGroup) -> None:
    content.add_argument("--mode", choices=MODES, default="audio", help="payload (default audio)")
    content.add_argument(
        "--encoder",
        type=Path,
        metavar="DIR",
        help="Whisper checkpoint: the encoder for --mode encoder, and its preprocessor_config.json "
        "for the features",
    )
    content.add_argument(
        "--feature-extractor",
        type=Path,
        metavar="DIR",
        help="folder with a WhisperFeatureExtractor preprocessor_config.json (mode mel)",
    )
    content.add_argument(
        "--n-mels",
        type=int,
        choices=(80, 128),
        help="mode mel without files: stock Whisper features with 80 (v1/v2) or 128 (v3) bins",
    )


def _policy_flags(policy: argparse._ArgumentGroup) -> None:
    policy.add_argument(
        "--long-audio",
        choices=("skip", "truncate"),
        default="skip",
        help="audio over 30 s: skip it, or keep the first 30 s (counted as truncated) "
        "(default skip)",
    )
    policy.add_argument(
        "--min-seconds",
        type=float,
        metavar="SECONDS",
        default=0.1,
        help="skip audio shorter than this (default 0.1)",
    )


def _execution_flags(run_args: argparse._ArgumentGroup) -> None:
    run_args.add_argument(
        "--workers",
        type=int,
        metavar="N",
        default=0,
        help="processes decoding/resampling/featurising in parallel (default 0: in this process)",
    )
    run_args.add_argument(
        "--batch-size",
        type=int,
        default=16,
        metavar="N",
        help=(
            "encoder batch size, mode encoder (default 16); clips are run shortest first "
            "within windows of 8 batches and written in input order"
        ),
    )
    run_args.add_argument(
        "--device", help="encoder device, mode encoder (default: cuda if available, else cpu)"
    )
    run_args.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default="float32",
        help="encoder weights dtype, mode encoder (default float32)",
    )
    run_args.add_argument(
        "--varlen-encoder",
        action="store_true",
        help="mode encoder: run Whisper on each clip's own frames instead of the 30 s window "
        "(train with model.varlen_encoder=true; the index records which)",
    )
    run_args.add_argument(
        "--shuffle",
        action="store_true",
        help="shuffle samples across shards (deterministic with --seed); default: sorted by id",
    )
    run_args.add_argument(
        "--seed", type=int, default=0, metavar="S", help="shuffle seed (default 0)"
    )
    run_args.add_argument(
        "--quiet",
        action="store_true",
        help="no progress and no per-sample skip lines (progress: a bar in a terminal, else "
        "one line of clips done, clips/s and ETA every 10 s)",
    )


def _parts_flags(parts: argparse._ArgumentGroup) -> None:
    parts.add_argument(
        "--part",
        metavar="I/N",
        help="pack only the I-th of N disjoint slices of the input (0-based) into --out; run "
        "all N with the same flags, on any machines that see --out. The last part to finish "
        "writes index.json. `auto`: I/N from RANK/WORLD_SIZE (torchrun, deepspeed) and/or "
        "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT; the encoder then runs on LOCAL_RANK's GPU",
    )
    parts.add_argument(
        "--merge",
        metavar="DIR",
        help="instead of packing: write DIR/index.json from the parts packed there (needed "
        "only if the last part could not, e.g. it was rerun separately)",
    )


def part_from_env(environ: Mapping[str, str]) -> tuple[Part, int | None]:
    """`--part auto`: (part, LOCAL_RANK or None without a launcher).

    A launcher's RANK/WORLD_SIZE (torchrun, deepspeed, srun tasks) and a SLURM array's task
    combine: array task a of n, rank r of w is part a*w + r of n*w, so an array of nodes that
    each run one rank per GPU covers the input once.
    """
    from audio_llm import dist  # torch: only for --part auto

    launched = dist.launch_env(environ)
    rank, world = (int(launched["RANK"]), int(launched["WORLD_SIZE"])) if launched else (0, 1)
    task, tasks = 0, 1
    if "SLURM_ARRAY_TASK_ID" in environ:
        if "SLURM_ARRAY_TASK_COUNT" not in environ:
            raise AudioLLMError(
                "--part auto in a SLURM array needs SLURM_ARRAY_TASK_COUNT (Slurm >= 17.11); "
                "pass --part I/N instead"
            )
        step = int(environ.get("SLURM_ARRAY_TASK_STEP", "1"))
        first = int(environ.get("SLURM_ARRAY_TASK_MIN", "0"))
        task = (int(environ["SLURM_ARRAY_TASK_ID"]) - first) // step
        tasks = int(environ["SLURM_ARRAY_TASK_COUNT"])
    local_rank = int(launched["LOCAL_RANK"]) if launched else None
    return Part(task * world + rank, tasks * world), local_rank


def _part_and_device(args: argparse.Namespace) -> tuple[Part, str | None]:
    if args.part is None:
        return Part(), args.device
    if args.part != "auto":
        return Part.parse(args.part), args.device
    part, local_rank = part_from_env(os.environ)
    device = args.device
    if device is None and local_rank is not None:
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{local_rank}"  # one GPU per rank, as training places them
    return part, device


def _verify(folder: str) -> int:
    problems = verify(folder)
    for problem in problems:
        print(f"FAIL {problem}")
    if problems:
        print(f"{folder}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    totals = load_index(folder)["totals"]
    print(
        f"OK {folder}: {totals['shards']} shards, {totals['samples']} samples, "
        f"{totals['hours']:.3f} h"
    )
    return 0


def _options(args: argparse.Namespace) -> PackOptions:
    part, device = _part_and_device(args)
    return PackOptions(
        out=Path(args.out),
        mode=args.mode,
        fmt=args.fmt,
        prefix=args.prefix,
        max_samples=args.max_samples,
        max_bytes=args.max_bytes,
        long_audio=args.long_audio,
        min_seconds=args.min_seconds,
        encoder=args.encoder,
        feature_extractor=args.feature_extractor,
        n_mels=args.n_mels,
        workers=args.workers,
        batch_size=args.batch_size,
        device=device,
        dtype=args.dtype,
        varlen_encoder=args.varlen_encoder,
        shuffle=args.shuffle,
        seed=args.seed,
        overwrite=args.overwrite,
        quiet=args.quiet,
        allow_pipes=args.allow_pipes,
        part=part,
    )


def _print_result(result: PartResult, out: Path) -> None:
    if result.part.count > 1:
        span = result.blocks
        blocks = f"blocks {span.start}-{span.stop - 1}" if span else "no blocks (N > blocks)"
        print(
            f"part {result.part}: {blocks}, {len(result.packed)} packed now ({result.samples} "
            f"samples), {len(result.kept)} kept from an earlier run"
        )
    elif result.kept:
        print(f"kept {len(result.kept)} finished block(s) from an earlier run")
    if result.index is None:
        print(
            f"other parts are still packing; the last to finish writes {INDEX_NAME} (or run "
            f"`audio-llm pack --merge {out}` once all are done)"
        )
        return
    print(report_summary(result.index["report"]))
    print(f"{result.index['totals']['shards']} shard(s) + {INDEX_NAME} in {out}")


def run(args: argparse.Namespace) -> int:
    """`audio-llm pack`: verify a folder, merge parts, or pack (a part of) the inputs and print
    the report."""
    if args.verify or args.merge:
        if args.input or args.out or (args.verify and args.merge):
            raise AudioLLMError(
                "--verify DIR and --merge DIR work on a packed folder: drop --input/--out "
                "and use one of them"
            )
        if args.verify:
            return _verify(args.verify)
        index = merge(args.merge)
        print(report_summary(index["report"]))
        print(f"{index['totals']['shards']} shard(s) + {INDEX_NAME} in {args.merge}")
        return 0
    if not args.input or not args.out:
        raise AudioLLMError("pack needs --input PATH (one or more) and --out DIR, or --verify DIR")
    options = _options(args)
    _print_result(pack_part(args.input, options), options.out)
    return 0
