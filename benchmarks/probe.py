"""Run a script or module with the GPU suite's instruments and write what they saw to a JSON file.

    AUDIO_LLM_PROBE=/tmp/p.json python benchmarks/probe.py launch/stage2.py [args...]
    AUDIO_LLM_PROBE=/tmp/p.json python benchmarks/probe.py -m audio_llm.cli eval [args...]

`benchmarks/gpu_suite.py` starts every launch and eval through this file (deepspeed's launcher
runs it in place of the stage script) so that it measures from the outside what the code under
test reports about itself, and so cannot be fooled by it:

- `checkpoint_calls`: calls of `torch.utils.checkpoint.checkpoint`, patched before transformers
  binds it, so a run configured with gradient checkpointing shows whether its layers checkpoint;
- `batches`: per micro-batch drawn by the trainer, its executed and useful training FLOPs
  (`planning.flops.batch_flops_from_tensors`: useful = real tokens at each sample's own length),
  recorded by wrapping the trainer's `with_flops` stage; absent if the trainer has none;
- `generate`: per `transcribe_samples` call (one eval batch), its utterances, wall seconds and
  generated tokens (`AudioLLM.generate`'s new ids, up to each row's end),
  the seconds spent inside the joint CTC `LogitsProcessor`, and on CUDA, for one batch, the
  device's kernel time under `torch.profiler` (the rest of that batch's wall time is the host's).

The file is rewritten at exit, on SIGTERM too (the suite ends a launch past its deadline that
way), with a temporary name and `os.replace`, so a reader never sees half of it.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint

RECORD: dict[str, Any] = {"checkpoint_calls": 0, "instruments": []}
PROFILED_BATCH = 1  # the second eval batch: the first pays for warm-up and allocator growth


def _write() -> None:
    path = os.environ.get("AUDIO_LLM_PROBE")
    if not path:
        return
    tmp = Path(f"{path}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(RECORD) + "\n")
    os.replace(tmp, path)


def _count_checkpoints() -> None:
    """Patch `checkpoint` before transformers imports it by name (`modeling_utils`)."""
    original = torch.utils.checkpoint.checkpoint

    def counted(*args: Any, **kwargs: Any) -> Any:
        RECORD["checkpoint_calls"] += 1
        return original(*args, **kwargs)

    torch.utils.checkpoint.checkpoint = counted
    RECORD["instruments"].append("checkpoint_calls")


def _record_batch_flops() -> None:
    """Wrap the step loop's per-batch FLOPs stage (`train.trainer` draws its batches through
    `with_flops`); record executed and useful FLOPs per batch."""
    try:
        from audio_llm.planning.flops import batch_flops_from_tensors
        from audio_llm.train import trainer
    except ImportError:
        return
    original = getattr(trainer, "with_flops", None)
    if original is None:  # the trainer counts FLOPs some other way: no per-batch record
        return
    batches: list[list[float]] = []
    RECORD["batches"] = batches  # [executed, useful] per micro-batch, in the order drawn

    def recorded(loader: Iterator[dict], shape: Any, *args: Any, **kwargs: Any) -> Iterator[dict]:
        for batch in original(loader, shape, *args, **kwargs):  # e.g. `checkpointing`
            counted = batch_flops_from_tensors(shape, batch)
            batches.append([counted.executed.total, counted.useful.total])
            yield batch

    trainer.with_flops = recorded
    RECORD["instruments"].append("batches")


def _kernel_seconds(profile: torch.profiler.profile) -> float:
    """Device time of the profiled kernels and copies, in seconds."""
    total = 0.0
    for event in profile.key_averages():
        total += getattr(event, "self_device_time_total", 0.0) or 0.0
    return total / 1e6


def _time_generation() -> None:
    """Wrap eval's per-batch transcription and the joint CTC scorer with wall clocks."""
    from audio_llm.evaluation import evaluate
    from audio_llm.model import ctc
    from audio_llm.model.audio_llm import AudioLLM

    cuda = torch.cuda.is_available()
    calls: list[dict[str, Any]] = []
    RECORD["generate"] = calls
    in_ctc = [0.0]

    def sync() -> None:
        if cuda:  # the clocks below must not charge queued LLM work to the CTC scorer
            torch.cuda.synchronize()

    scorer_call = ctc.CTCPrefixScorer.__call__

    def timed_scorer(self: Any, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        sync()
        began = time.perf_counter()
        out = scorer_call(self, input_ids, scores)
        sync()
        in_ctc[0] += time.perf_counter() - began
        return out

    generated = [0]
    generate = AudioLLM.generate

    def counted(self: Any, *args: Any, **kwargs: Any) -> list[list[int]]:
        ids = generate(self, *args, **kwargs)
        generated[0] += sum(len(row) for row in ids)
        return ids

    original = evaluate.transcribe_samples

    def timed(model: Any, collator: Any, samples: list, *args: Any, **kwargs: Any) -> list[str]:
        in_ctc[0], generated[0] = 0.0, 0
        row: dict[str, Any] = {"utterances": len(samples)}
        profile = cuda and len(calls) == PROFILED_BATCH
        sync()
        began = time.perf_counter()
        if profile:
            try:
                activity = [torch.profiler.ProfilerActivity.CUDA]
                with torch.profiler.profile(activities=activity) as prof:
                    texts = original(model, collator, samples, *args, **kwargs)
                    sync()
                row["profiled"] = True
                row["wall_s"] = time.perf_counter() - began
                row["device_s"] = _kernel_seconds(prof)
            except Exception as exc:  # the timing row still stands without the profile
                row["profile_error"] = f"{type(exc).__name__}: {exc}"
                began = time.perf_counter()
                texts = original(model, collator, samples, *args, **kwargs)
        else:
            texts = original(model, collator, samples, *args, **kwargs)
        sync()
        row.setdefault("wall_s", time.perf_counter() - began)
        row["ctc_s"] = in_ctc[0]
        row["tokens"] = generated[0]  # new tokens up to each row's end: what decoding scales with
        calls.append(row)
        return texts

    ctc.CTCPrefixScorer.__call__ = timed_scorer
    AudioLLM.generate = counted
    evaluate.transcribe_samples = timed
    RECORD["instruments"].append("generate")


def _on_sigterm(signum: int, frame: Any) -> None:
    sys.exit(128 + signum)  # runs atexit, which writes the record


def main() -> None:
    """Install the instruments, then run argv[1:] as `python` would."""
    argv = sys.argv[1:]
    if not argv:
        raise SystemExit(__doc__)
    atexit.register(_write)
    signal.signal(signal.SIGTERM, _on_sigterm)
    _count_checkpoints()
    run: Callable[[], Any]
    if argv[0] == "-m":
        module, sys.argv = argv[1], argv[1:]
        if module.startswith("audio_llm.cli"):
            _time_generation()
        run = lambda: runpy.run_module(module, run_name="__main__", alter_sys=True)  # noqa: E731
    else:
        # deepspeed's launcher puts --local_rank=N before the script's own arguments
        ranks = [a for a in argv if a.startswith("--local_rank")]
        rest = [a for a in argv if not a.startswith("--local_rank")]
        script, sys.argv = rest[0], [rest[0], *ranks, *rest[1:]]
        sys.path.insert(0, str(Path(script).resolve().parent))
        _record_batch_flops()
        run = lambda: runpy.run_path(script, run_name="__main__")  # noqa: E731
    run()


if __name__ == "__main__":
    main()
