"""The command line of `launch/stage1.py` and `launch/stage2.py`: flags, a config file and
`section.key=value` overrides, run under `deepspeed`, `torchrun` or plain python."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from audio_llm import dist
from audio_llm.config import load_config
from audio_llm.errors import AudioLLMError
from audio_llm.train.cluster import Preempted, RunStopped
from audio_llm.train.run import train

log = logging.getLogger(__name__)


def stage_main(stage: int, argv: list[str] | None = None) -> int:
    """Command line of `launch/stage{1,2}.py` (under `deepspeed`, `torchrun` or plain python)."""
    parser = argparse.ArgumentParser(
        prog=f"launch/stage{stage}.py",
        description=(
            "Stage 1: train the projector (encoder and LLM frozen)."
            if stage == 1
            else "Stage 2: projector (from stage 1) + LoRA on the LLM's projections."
        )
        + " Config: --config FILE, then section.key=value overrides (audio-llm config --explain).",
    )
    parser.add_argument("--config", help="YAML/JSON run config")
    parser.add_argument(
        "--deepspeed_config",
        "--deepspeed-config",
        default="ds_configs/zero2.json",
        help=(
            "DeepSpeed JSON (default ds_configs/zero2.json); 'auto' fields come from the config. "
            "A relative path missing from the working directory is read from the repository top"
        ),
    )
    parser.add_argument(
        "--resume",
        default="auto",
        help="auto (newest complete checkpoint in train.out_dir, if any), none, or a folder",
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=1e-4")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after options
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s [rank {os.environ.get('RANK', '0')}] %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    together = True  # the ranks end together: wait for each other before leaving
    try:
        cfg = load_config(args.config, [*args.overrides, f"train.stage={stage}"])
        summary = train(cfg, args.deepspeed_config, args.resume)
    except AudioLLMError as exc:
        print(f"stage {stage}: error: {exc}", file=sys.stderr)
        return 2
    except RunStopped as exc:
        # Preempted: every rank agreed and saved. OOM or a stalled rank: a peer is gone or
        # stuck, so a goodbye barrier would only wait out the collective timeout again.
        together = isinstance(exc, Preempted)
        print(f"stage {stage}: rank {dist.rank()}: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    finally:
        if together:
            dist.shutdown()  # no rank leaves while another is still in a collective
    if dist.is_main():
        steps = summary["losses"]
        if steps:
            first, last = min(steps), max(steps)
            log.info(
                "loss %.4f (step %d) -> %.4f (step %d)", steps[first], first, steps[last], last
            )
        log.info("run folder: %s (tensorboard --logdir %s)", summary["run_dir"], summary["run_dir"])
    return 0
