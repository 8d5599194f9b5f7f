"""One GPU suite: the raw model step, the real `deepspeed` launches and `audio-llm eval`, one JSON.

    python benchmarks/gpu_suite.py                    # one H100/H200: large-v3 + Qwen2-VL-2B
    python benchmarks/gpu_suite.py --with-7b          # also a stage-2 launch at Qwen2-VL-7B shapes
    python benchmarks/gpu_suite.py --tiny             # the same script on the CPU, tiny models

Made for a lent GPU with minutes of device time: every row is written to `--out` (and copied,
with its logs, to `$OUT` when that is set) the moment it finishes, and one deadline
(`--deadline-s`, default 420 s, counted from the start, preparation included) bounds the call:
each run's timeout shrinks to the time left, and the rows it does not reach are recorded as
"not run: deadline".

In one call it
1. writes random-weight checkpoints at the published shapes (`audio-llm tiny --like
   whisper-large-v3,qwen2-vl-2b`; `--tiny`: the tiny models) and synthesises speech-like clips
   (benchmarks/loader.py's synthesis) in two sets: `mixed`, a LibriSpeech-like duration mix
   (mean 12.7 s, 1-25 s), and `matched`, clips all `--seconds` long with one fixed transcript,
   so every batch has the same shapes; both packed by `audio-llm pack` (audio mode);
2. runs the rows in ORDER, most wanted first (a deadline cuts the tail): the raw step
   (`benchmarks/gpu_step.py`) on the first `matched` batch and its DeepSpeed pair; the shipped
   `launch/configs/whisper-large-v3_qwen2-vl-2b.yaml` (gradient checkpointing on; the row
   counts the checkpoint calls and says "not checkpointing" when there are none); stage 2 with
   ZeRO-2 and ZeRO-3 on `mixed`; `audio-llm eval` of the ZeRO-2 run on `--eval-clips` clips,
   greedy and with the demo's beam + joint CTC decoding; the raw step with efficient and seed
   settings on a synthetic batch; stage 1; and with `--with-7b` a stage-2 launch at 7B shapes.
3. prints one table per kind and writes the JSON. Launch figures come from each launch's last
   `metrics.jsonl` row (`train.log_every` = half the steps: the second half, warm-up excluded).
   FLOPs are the suite's own: launches and evals run through `benchmarks/probe.py`, which
   records every micro-batch's executed and useful FLOPs (`planning.flops`; useful = real
   tokens at each sample's own length, no padding, no recompute: MFU as PaLM defines it) and
   the checkpoint calls. The headline MFU is the useful one; executed FLOPs are a second column.

Efficient settings: `model.varlen_encoder`, `model.stack_factor=8`, `model.projector=mlp`,
`data.bucket_by_length`; LoRA r16 (the config's default) in stage 2. Seed settings: the 30 s
encoder window, stack 1, linear projector. GPU runs are bf16 with DeepSpeed's FusedAdam (JIT-built
once into TORCH_EXTENSIONS_DIR); `--tiny` runs float32 on one CPU rank with torch's Adam, and its
figures are the CPU's, useful for the per-step host overhead of the DeepSpeed path, not for MFU.
"""

# ruff: noqa: E402  (loader.py's thread settings must come before numpy and torch load)

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np
import soundfile as sf
import yaml
from loader import SynthSpec, speech_like, synthesise

from audio_llm.audio.frames import SAMPLE_RATE
from audio_llm.dist import free_port
from audio_llm.files import atomic_write_json

RESULTS = ROOT / "benchmarks" / "results"
PROBE = ROOT / "benchmarks" / "probe.py"
H100_BF16_TFLOPS = 989.0
MATCHED_TEXT = "the quick brown fox jumps over the lazy dog and runs home"
SHIPPED = ROOT / "launch" / "configs" / "whisper-large-v3_qwen2-vl-2b.yaml"
NOT_RUN = "not run: deadline"
MIN_RUN_S = 5.0  # a run with less time than this left would only be killed: not started
EFFICIENT = [
    "model.varlen_encoder=true",
    "model.stack_factor=8",
    "model.projector=mlp",
    "data.bucket_by_length=true",
]


@dataclass
class Row:
    """One line of a table: a raw step, a launch or an eval."""

    name: str
    kind: str  # "raw", "deepspeed" or "eval"
    what: str
    batch: int
    ms_per_step: float | None = None
    audio_s_per_s: float | None = None
    tokens_per_s: float | None = None
    tflops_useful: float | None = None  # real tokens at their own lengths, no recompute
    tflops_executed: float | None = None  # what the padded batches ran
    mfu_useful: float | None = None  # the headline MFU (PaLM's definition)
    mfu_executed: float | None = None
    data_wait: float | None = None
    padding: float | None = None
    peak_memory_gib: float | None = None
    checkpoint_calls: int | None = None
    note: str = ""
    details: dict[str, Any] = field(default_factory=dict)  # figures of one kind (eval)
    wall_s: float = 0.0
    error: str | None = None
    command: list[str] = field(default_factory=list)
    source: str = ""  # the file the figures were read from
    logs: list[str] = field(default_factory=list)  # copied to $OUT with the row


@dataclass
class Planned:
    """A row not yet run: `run(row, seconds)` fills `row` within `seconds`."""

    row: Row
    run: Callable[[Row, float], None]


@dataclass
class Inputs:
    """What preparation made: model folders and packed shard folders."""

    models: dict[str, Path]
    mixed: Path
    matched: Path
    durations: list[float]


# ----------------------------------------------------------------------------- the suite


class Suite:
    """The rows so far, written out after each one; the deadline every run is fitted into."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.began = time.perf_counter()
        self.deadline = self.began + args.deadline_s
        self.rows: list[Row] = []
        self.timings: dict[str, float] = {}
        self.facts: dict[str, Any] = {}  # mixed durations etc., once known
        out = os.environ.get("OUT")
        self.copy_to = Path(out) if out else None

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def run(self, planned: list[Planned]) -> None:
        """Each row in order within the time left; the rest are `NOT_RUN`."""
        for item in planned:
            row, left = item.row, self.left()
            if left < MIN_RUN_S:
                row.error = NOT_RUN
            else:
                began = time.perf_counter()
                try:
                    item.run(row, min(self.args.launch_timeout, left))
                except Exception as exc:  # a broken row is a row; the suite goes on
                    row.error = row.error or f"{type(exc).__name__}: {exc}"
                if row.error and row.error.startswith("timed out") and self.left() < MIN_RUN_S:
                    row.error = f"stopped at the deadline: {row.error}"
                row.wall_s = round(time.perf_counter() - began, 1)
            self.record(row)

    def record(self, row: Row) -> None:
        self.rows.append(row)
        self.save(complete=False)
        if self.copy_to is not None:
            logs = self.copy_to / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            for log in row.logs:
                if Path(log).is_file():
                    shutil.copy2(log, logs / f"{row.name}.{Path(log).name}")

    def report(self, complete: bool) -> dict:
        args = self.args
        return {
            "suite": "tiny (CPU)" if args.tiny else "gpu",
            "measured": True,
            "complete": complete,  # false while rows are still running (or the call was cut)
            "device": _device_name(),
            "torch": _version("torch"),
            "deepspeed": _version("deepspeed"),
            "transformers": _version("transformers"),
            "platform": platform.platform(),
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            **self.facts,
            "comparable_pair": comparable_pair(self.rows, args),
            "rows": [vars(r) for r in self.rows],
            "timings": {**self.timings, "total_s": round(time.perf_counter() - self.began, 1)},
        }

    def save(self, complete: bool) -> dict:
        report = self.report(complete)
        report["table"] = table(report)
        atomic_write_json(self.args.out, report)
        if self.copy_to is not None:
            copy = self.copy_to / self.args.out.name
            self.copy_to.mkdir(parents=True, exist_ok=True)
            if copy.resolve() != self.args.out.resolve():
                atomic_write_json(copy, report)
        return report


# ----------------------------------------------------------------------------- inputs


def _env(args: argparse.Namespace, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    # One op build (FusedAdam; on the CPU DeepSpeed's shm all-reduce) for every launch, kept
    # where `make` keeps it unless the caller says otherwise.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    if args.tiny:
        env["OMP_NUM_THREADS"] = "1"
    return {**env, **(extra or {})}


def _prepare_cmd(args: argparse.Namespace, cmd: list[str], seconds: float) -> None:
    subprocess.run(cmd, check=True, cwd=ROOT, env=_env(args), timeout=max(seconds, 1.0))


def write_models(args: argparse.Namespace, llm: str, seconds: float) -> dict[str, Path]:
    """Checkpoint folders for the runs: tiny models, or random weights at published shapes."""
    folder = args.work / "models" / ("tiny" if args.tiny else llm)
    found = {"whisper": folder / "whisper", "qwen2vl": folder / "qwen2vl"}
    if all((path / "config.json").is_file() for path in found.values()):
        return found
    cmd = [sys.executable, "-m", "audio_llm.cli", "tiny", "--out", str(folder)]
    if not args.tiny:
        cmd += ["--like", f"whisper-large-v3,{llm}"]
    _prepare_cmd(args, cmd, seconds)
    return found


def matched_manifest(folder: Path, clips: int, seconds: float) -> Path:
    """`clips` speech-like clips of exactly `seconds`, all with MATCHED_TEXT: every batch of the
    packed set has the same shapes (no padding anywhere)."""
    manifest = folder / "manifest.jsonl"
    if manifest.is_file() and len(manifest.read_text().splitlines()) == clips:
        return manifest
    (folder / "audio").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    rows = []
    for i in range(clips):
        path = folder / "audio" / f"{i:05d}.flac"
        sf.write(path, speech_like(seconds, rng), SAMPLE_RATE, subtype="PCM_16")
        rows.append({"audio_filepath": str(path), "text": MATCHED_TEXT, "duration": seconds})
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return manifest


def pack(args: argparse.Namespace, manifest: Path, out: Path, shards: int, seconds: float) -> Path:
    """`audio-llm pack` (audio mode) into `out`, `shards` shards (>= loader workers)."""
    if (out / "index.json").is_file():
        return out
    clips = len(manifest.read_text().splitlines())
    cmd = [sys.executable, "-m", "audio_llm.cli", "pack", "--input", str(manifest)]
    cmd += ["--out", str(out), "--mode", "audio", "--overwrite", "--quiet"]
    cmd += ["--max-samples", str(-(-clips // shards)), "--workers", str(args.pack_workers)]
    _prepare_cmd(args, cmd, seconds)
    return out


def prepare(suite: Suite) -> Inputs:
    """Models and data, each step within the time left (a timeout here ends the suite)."""
    args = suite.args
    t = time.perf_counter()
    models = write_models(args, "qwen2-vl-2b", suite.left())
    suite.timings["models_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    spec = SynthSpec(args.clips, 0, 12.7, 1.0, 25.0)
    mixed_manifest = synthesise(args.work / "data" / "mixed", spec)
    matched = matched_manifest(args.work / "data" / "matched", args.matched_clips, args.seconds)
    shards = 2 * max(1, args.workers)
    mixed = pack(args, mixed_manifest, args.work / "shards" / "mixed", shards, suite.left())
    matched = pack(args, matched, args.work / "shards" / "matched", shards, suite.left())
    suite.timings["data_s"] = round(time.perf_counter() - t, 1)
    durations = [json.loads(x)["duration"] for x in mixed_manifest.read_text().splitlines()]
    suite.facts["mixed_durations"] = {
        "clips": len(durations),
        "mean_s": round(float(np.mean(durations)), 2),
        "min_s": round(float(np.min(durations)), 2),
        "max_s": round(float(np.max(durations)), 2),
    }
    return Inputs(models, mixed, matched, durations)


# ----------------------------------------------------------------------------- runs


def _tail(text: str, lines: int = 6) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _group_alive(group: int) -> bool:
    """Whether a process of `group` is still running (zombies have ended: not counted)."""
    proc = Path("/proc")
    if not proc.is_dir():  # no procfs: ask the kernel, zombies included
        try:
            os.killpg(group, 0)
            return True
        except ProcessLookupError:
            return False
    for stat in proc.glob("[0-9]*/stat"):
        try:
            state, _, pgrp = stat.read_text().rpartition(")")[2].split()[:3]
        except (OSError, ValueError):
            continue  # ended while we looked
        if int(pgrp) == group and state != "Z":
            return True
    return False


def _stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """End a run and everything it started (deepspeed's launcher can leave its ranks running,
    holding the GPU): SIGTERM to its process group, then SIGKILL to what is left after `grace`
    seconds (a rank writes its probe record on SIGTERM)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    ends = time.monotonic() + grace
    while time.monotonic() < ends and _group_alive(proc.pid):
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):  # all gone already
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _run(
    args: argparse.Namespace,
    cmd: list[str],
    row: Row,
    log: Path,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
) -> bool:
    """Run `cmd` within `timeout` (default `--launch-timeout`); on failure the row gets the
    error. True if it ran to a zero exit."""
    timeout = args.launch_timeout if timeout is None else timeout
    row.command = cmd
    row.logs.append(str(log))
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as out:
        # its own session: on a timeout the whole group goes, launcher and ranks
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=_env(args, env), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop(proc)
            row.error = f"timed out after {timeout:g} s (log: {log})"
            return False
        except BaseException:  # the suite itself is stopped: its run must not outlive it
            _stop(proc, grace=2.0)
            raise
    if code != 0:
        row.error = f"exit {code}: {_tail(log.read_text(encoding='utf-8', errors='replace'))}"
    return code == 0


def _rates(flops: float, seconds: float, peak: float) -> tuple[float, float | None]:
    tflops = flops / seconds / 1e12
    return tflops, (tflops / peak if peak else None)


def raw_step(args: argparse.Namespace, extra: list[str]) -> Callable[[Row, float], None]:
    """benchmarks/gpu_step.py in its own process (the GPU is free again for the launches)."""

    def run(row: Row, seconds: float) -> None:
        out = args.work / "raw" / f"{row.name}.json"
        cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_step.py")]
        cmd += ["--batch", str(args.batch), "--steps", str(args.raw_steps)]
        cmd += ["--warmup", str(args.raw_warmup), "--out", str(out)]
        cmd += ["--peak-tflops", str(args.peak_tflops or H100_BF16_TFLOPS), *extra]
        if not _run(args, cmd, row, out.with_suffix(".log"), seconds):
            return
        report = json.loads(out.read_text())
        row.logs.append(str(out))
        positions = report["tokens_per_s"]
        row.source = str(out)
        row.ms_per_step = report["step_s"] * 1e3
        row.audio_s_per_s = report["audio_seconds_per_s"]
        row.tokens_per_s = report.get("real_tokens_per_s", positions)
        executed = report["flops_per_step"]["total"]
        useful = report.get("useful_flops_per_step")
        row.tflops_executed, row.mfu_executed = _rates(executed, report["step_s"], args.peak_tflops)
        if useful is not None:
            row.tflops_useful, row.mfu_useful = _rates(useful, report["step_s"], args.peak_tflops)
        row.data_wait = 0.0  # one batch, already on the device
        row.padding = 1.0 - row.tokens_per_s / positions
        row.peak_memory_gib = report["max_memory_allocated_gib"]

    return run


def _micro_batches(run_dir: Path) -> int:
    """Micro-batches per optimizer step of a finished run (its saved config's grad_accum)."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    return int(config["train"]["grad_accum"])


def launch_figures(args: argparse.Namespace, row: Row, out: Path, probe: Path) -> None:
    """Fill a launch's row from its last metrics row and the probe's per-batch FLOPs."""
    metrics = out / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    perf = [r for r in rows if "perf/step_s" in r]
    last = perf[-1]
    logged = last["step"] - (perf[-2]["step"] if len(perf) > 1 else 0)  # steps it covers
    row.source = f"{metrics} step {last['step']}"
    row.ms_per_step = last["perf/step_s"] * 1e3
    row.audio_s_per_s = last["perf/audio_s_per_s"]
    row.tokens_per_s = last["perf/tokens_per_s"]
    row.data_wait = last["perf/data_wait_frac"]
    row.padding = last["perf/padding_ratio"]
    row.peak_memory_gib = last.get("mem/max_allocated_gb")
    if row.peak_memory_gib is None:
        row.source += " (peak memory: mem/max_rss_gb, process RSS)"
        row.peak_memory_gib = last.get("mem/max_rss_gb")
    seen = json.loads(probe.read_text()) if probe.is_file() else {}
    row.checkpoint_calls = seen.get("checkpoint_calls")
    batches = seen.get("batches")
    if not batches:
        row.note = "no per-batch FLOPs recorded (probe.py found no trainer.with_flops)"
        return
    # the logged row covers steps (step - logged, step]: their micro-batches, in draw order
    per_step = _micro_batches(out)
    first = (last["step"] - logged) * per_step
    window = batches[first : first + logged * per_step]
    seconds = last["perf/step_s"] * logged
    executed, useful = (sum(b[i] for b in window) for i in (0, 1))
    row.tflops_executed, row.mfu_executed = _rates(executed, seconds, args.peak_tflops)
    row.tflops_useful, row.mfu_useful = _rates(useful, seconds, args.peak_tflops)
    row.details["micro_batches"] = {"per_step": per_step, "in_window": len(window)}


def checkpoint_note(row: Row, layers: int, micro_batches: int) -> None:
    """Say whether a run configured with gradient checkpointing really checkpointed."""
    calls = row.checkpoint_calls
    if calls is None:
        row.note = "checkpointing unverified (no probe record)"
    elif calls == 0:
        row.note = "not checkpointing: 0 checkpoint calls"
    else:
        per = calls / max(micro_batches, 1)
        row.note = f"checkpointing: {per:.1f} calls per micro-batch ({layers} decoder layers)"


def launch(
    args: argparse.Namespace,
    stage: int,
    overrides: list[str],
    ds_config: str = "ds_configs/zero2.json",
    config: Path | None = None,
) -> Callable[[Row, float], None]:
    """`deepspeed --num_gpus 1 launch/stageN.py` (through probe.py) for `--steps` steps."""

    def run(row: Row, seconds: float) -> None:
        out = args.work / "runs" / row.name
        shutil.rmtree(out, ignore_errors=True)  # a fresh run, never a resume
        probe = out.with_suffix(".probe.json")
        probe.unlink(missing_ok=True)
        launcher = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
        cmd = [launcher, "--num_gpus", "1", "--master_port", str(free_port()), str(PROBE)]
        cmd += [str(ROOT / "launch" / f"stage{stage}.py")]
        cmd += ["--deepspeed_config", str(ROOT / ds_config), "--resume", "none"]
        cmd += ["--config", str(config)] if config else []
        cmd += [
            *overrides,
            f"train.out_dir={out}",
            f"train.max_steps={args.steps}",
            f"train.log_every={max(1, args.steps // 2)}",
            f"train.save_every={args.steps}",
            f"train.warmup_steps={max(1, args.steps // 4)}",
            f"train.peak_tflops={args.peak_tflops}",
            "eval.every=0",
        ]
        ok = _run(args, cmd, row, out.with_suffix(".log"), seconds, {"AUDIO_LLM_PROBE": str(probe)})
        metrics = out / "metrics.jsonl"
        row.logs += [str(metrics), str(probe)]
        if metrics.is_file() and '"perf/step_s"' in metrics.read_text():
            launch_figures(args, row, out, probe)  # a timed-out run may have logged a row
        elif ok:
            row.error = f"no perf row in {metrics}"

    return run


def random_projector(path: Path, models: dict[str, Path], stack: int, kind: str) -> Path:
    """A stage-1-shaped projector with random weights: stage 2 needs one to start from."""
    from transformers import AutoConfig

    from audio_llm.model.projector import AudioProjector

    d_encoder = AutoConfig.from_pretrained(models["whisper"]).d_model
    d_llm = AutoConfig.from_pretrained(models["qwen2vl"]).text_config.hidden_size
    path.parent.mkdir(parents=True, exist_ok=True)
    AudioProjector(d_encoder, d_llm, stack=stack, kind=kind).save(path)
    return path


def decoder_layers(models: dict[str, Path]) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(models["qwen2vl"]).text_config.num_hidden_layers


# ----------------------------------------------------------------------------- eval


def demo_decoding() -> dict[str, Any]:
    """The demo's final decoding, from its stage-2 recipe files (the widest beam of them): beams,
    joint CTC weight and generation cap."""
    from audio_llm.demo.run import RECIPES, recipe_file

    evals = [yaml.safe_load(recipe_file(e, "stage2").read_text())["eval"] for e in RECIPES]
    widest = max(evals, key=lambda e: (e.get("num_beams", 1), e.get("ctc_weight", 0.0)))
    return {
        "beams": widest.get("num_beams", 1),
        "ctc_weight": widest.get("ctc_weight", 0.0),
        "max_new_tokens": widest["max_new_tokens"],
    }


def eval_model(args: argparse.Namespace, sources: list[Path], d_llm: int) -> Path:
    """A run folder for `audio-llm eval --run`: the first finished stage-2 run of `sources`
    (config.yaml + export/), with a random CTC blank added so joint decoding can run."""
    import torch
    from safetensors.torch import save_file

    from audio_llm.model.ctc import CTC_BLANK_FILE

    found = [s for s in sources if (s / "export" / "projector.safetensors").is_file()]
    if not found:
        raise RuntimeError(f"no stage-2 export to evaluate (looked in {[s.name for s in sources]})")
    folder = args.work / "eval_model"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(found[0] / "export", folder / "export")
    shutil.copy2(found[0] / "config.yaml", folder / "config.yaml")
    blank = torch.randn(d_llm, generator=torch.Generator().manual_seed(0)) * 0.02
    save_file({"ctc_blank": blank}, str(folder / "export" / CTC_BLANK_FILE))
    return folder


def eval_figures(row: Row, probe: Path) -> bool:
    """utterances/s and where the wall time of generation went, from the probe's record."""
    calls = json.loads(probe.read_text()).get("generate", [])
    if not calls:
        row.error = f"no generation timed (probe record {probe})"
        return False
    plain = [c for c in calls if not c.get("profiled")] or calls  # profiling slows its batch
    utterances = sum(c["utterances"] for c in calls)
    generation_s = sum(c["wall_s"] for c in calls)
    details: dict[str, Any] = {
        "utterances": utterances,
        "batches": len(calls),
        "utterances_per_s": sum(c["utterances"] for c in plain) / sum(c["wall_s"] for c in plain),
        "generation_s": generation_s,
        # wall time inside the joint CTC LogitsProcessor, synchronised at entry and exit
        "ctc_share": sum(c["ctc_s"] for c in calls) / generation_s,
        "hypothesis_tokens_mean": sum(c.get("tokens", 0) for c in calls) / utterances,
        "outside_device_share": None,  # CPU: no device; the CTC share is the figure
    }
    profiled = [c for c in calls if c.get("profiled")]
    if profiled:  # one batch under torch.profiler: kernel time against its wall time
        busy = profiled[0]["device_s"] / profiled[0]["wall_s"]
        details["device_busy_share"] = busy
        details["outside_device_share"] = max(0.0, 1.0 - busy)
    errors = [c["profile_error"] for c in calls if "profile_error" in c]
    if errors:
        details["profile_error"] = errors[0]
    row.details.update(details)
    return True


def eval_run(
    args: argparse.Namespace, inputs: Inputs, decoding: dict[str, Any], beams: int, weight: float
) -> Callable[[Row, float], None]:
    """`audio-llm eval` (through probe.py) of the ZeRO-2 stage-2 run on `--eval-clips` clips."""

    def run(row: Row, seconds: float) -> None:
        from transformers import AutoConfig

        d_llm = AutoConfig.from_pretrained(inputs.models["qwen2vl"]).text_config.hidden_size
        runs = args.work / "runs"
        model = eval_model(args, [runs / "stage2-zero2", runs / "stage2-matched"], d_llm)
        out = args.work / "eval" / row.name
        probe = out.with_suffix(".probe.json")
        probe.unlink(missing_ok=True)
        cmd = [sys.executable, str(PROBE), "-m", "audio_llm.cli", "eval", "--run", str(model)]
        cmd += ["--shards", str(inputs.mixed), "--out", str(out), "--limit", str(args.eval_clips)]
        cmd += ["--batch-size", str(args.eval_batch), "--beams", str(beams)]
        cmd += ["--ctc-weight", str(weight), "--max-new-tokens", str(decoding["max_new_tokens"])]
        ok = _run(args, cmd, row, out.with_suffix(".log"), seconds, {"AUDIO_LLM_PROBE": str(probe)})
        row.logs.append(str(probe))
        row.source = str(probe)
        if ok and eval_figures(row, probe):
            mean, cap = row.details["hypothesis_tokens_mean"], decoding["max_new_tokens"]
            row.note = f"random weights: {mean:.1f} tokens per hypothesis (cap {cap})"

    return run


# ----------------------------------------------------------------------------- the plan


def launch_overrides(args: argparse.Namespace, inputs: Inputs) -> dict[str, list[str]]:
    """Config overrides of each kind of launch, and the random projectors stage 2 starts from."""
    models = inputs.models
    base = [
        f"model.encoder={models['whisper']}",
        f"model.llm={models['qwen2vl']}",
        f"data.batch_size={args.batch}",
        f"data.num_workers={args.workers}",
        "train.lr=1e-4",
    ]
    projectors = args.work / "projectors"
    s8 = random_projector(projectors / "s8.safetensors", models, 8, "mlp")
    s4 = random_projector(projectors / "s4.safetensors", models, 4, "mlp")
    on_mixed = [*base, *EFFICIENT, f"data.train_shards={inputs.mixed}"]
    init = f"model.projector_init={s8}"
    return {
        "stage1": on_mixed,
        "stage2": [*on_mixed, init],
        "matched": [*base, *EFFICIENT, f"data.train_shards={inputs.matched}", init],
        "shipped": [
            f"model.encoder={models['whisper']}",
            f"model.llm={models['qwen2vl']}",
            f"data.train_shards={inputs.mixed}",
            "data.eval_shards=",
            f"data.num_workers={args.workers}",
            f"data.batch_size={args.batch}",  # the shipped 8 unless --batch says otherwise
            f"model.projector_init={s4}",
        ],
    }


def plan(args: argparse.Namespace, inputs: Inputs) -> list[Planned]:
    """Every row in the order it runs: what the first GPU call needs most comes first."""
    models = inputs.models
    size = ["--tiny"] if args.tiny else ["--encoder", "whisper-large-v3", "--llm", "qwen2-vl-2b"]
    eff = ["--varlen", "--stack", "8", "--projector", "mlp"]
    folders = ["--encoder", str(models["whisper"]), "--llm", str(models["qwen2vl"])]
    over = launch_overrides(args, inputs)
    decoding = demo_decoding()
    beam = f"beam {decoding['beams']} + joint CTC {decoding['ctc_weight']:g}"

    def row(name: str, kind: str, what: str, batch: int = args.batch) -> Row:
        return Row(name, kind, what, batch)

    zero3 = "ds_configs/zero3.json"
    items = [
        Planned(
            row("raw-matched", "raw", "gpu_step.py efficient, loaded folders, first matched batch"),
            raw_step(args, [*folders, "--batch-from", str(inputs.matched), *eff]),
        ),
        Planned(
            row("stage2-matched", "deepspeed", "stage 2, ZeRO-2, matched (pair of raw-matched)"),
            launch(args, 2, over["matched"]),
        ),
        Planned(
            row("stage2-shipped", "deepspeed", f"stage 2, {SHIPPED.name} (grad ckpt), mixed"),
            shipped_run(args, inputs, over["shipped"]),
        ),
        Planned(
            row("stage2-zero2", "deepspeed", "stage 2, ZeRO-2, mixed"),
            launch(args, 2, over["stage2"]),
        ),
        Planned(
            row("stage2-zero3", "deepspeed", "stage 2, ZeRO-3, mixed"),
            launch(args, 2, over["stage2"], ds_config=zero3),
        ),
        Planned(
            row("eval-greedy", "eval", "audio-llm eval of stage2-zero2, greedy", args.eval_batch),
            eval_run(args, inputs, decoding, 1, 0.0),
        ),
        Planned(
            row("eval-beam-ctc", "eval", f"audio-llm eval, demo's {beam}", args.eval_batch),
            eval_run(args, inputs, decoding, decoding["beams"], decoding["ctc_weight"]),
        ),
        Planned(
            row("raw-efficient", "raw", "gpu_step.py efficient"),
            raw_step(args, [*size, "--seconds", "12.7", *eff]),
        ),
        Planned(
            row("raw-seed", "raw", "gpu_step.py seed settings"),
            raw_step(args, [*size, "--seconds", "12.7"]),
        ),
        Planned(
            row("stage1-zero2", "deepspeed", "stage 1, ZeRO-2, mixed"),
            launch(args, 1, over["stage1"]),
        ),
    ]
    if args.with_7b:
        items.append(
            Planned(
                row("stage2-7b-zero2", "deepspeed", "stage 2, ZeRO-2, mixed, Qwen2-VL-7B shapes"),
                seven_b_run(args, over["stage1"]),
            )
        )
    return items


def shipped_run(
    args: argparse.Namespace, inputs: Inputs, overrides: list[str]
) -> Callable[[Row, float], None]:
    """The shipped config as a launch, and whether its gradient checkpointing really acts."""
    inner = launch(args, 2, overrides, config=SHIPPED)
    layers = decoder_layers(inputs.models)

    def run(row: Row, seconds: float) -> None:
        inner(row, seconds)
        probe = args.work / "runs" / f"{row.name}.probe.json"
        drawn = len(json.loads(probe.read_text()).get("batches", [])) if probe.is_file() else 0
        checkpoint_note(row, layers, drawn)

    return run


def seven_b_run(args: argparse.Namespace, on_mixed: list[str]) -> Callable[[Row, float], None]:
    """Qwen2-VL-7B shapes: its models are written inside the row, so the deadline covers them."""

    def run(row: Row, seconds: float) -> None:
        began = time.perf_counter()
        models7 = write_models(args, "qwen2-vl-7b", seconds)
        projector = random_projector(
            args.work / "projectors" / "s8_7b.safetensors", models7, 8, "mlp"
        )
        swap = [
            f"model.encoder={models7['whisper']}",
            f"model.llm={models7['qwen2vl']}",
            f"model.projector_init={projector}",
        ]
        left = seconds - (time.perf_counter() - began)
        launch(args, 2, [*on_mixed, *swap])(row, left)

    return run


def comparable_pair(rows: list[Row], args: argparse.Namespace) -> dict:
    """raw-matched vs stage2-matched: same shapes, the DeepSpeed path's cost per step."""
    pair = {r.name: r for r in rows}
    raw, ds = pair.get("raw-matched"), pair.get("stage2-matched")
    overhead = None
    if raw and ds and raw.ms_per_step and ds.ms_per_step:
        compute_ms = ds.ms_per_step * (1 - (ds.data_wait or 0.0))
        overhead = {
            "raw_ms": raw.ms_per_step,
            "deepspeed_ms": ds.ms_per_step,
            "deepspeed_ms_without_data_wait": compute_ms,
            "ratio": ds.ms_per_step / raw.ms_per_step,
            "ratio_without_data_wait": compute_ms / raw.ms_per_step,
        }
    return {
        "rows": ["raw-matched", "stage2-matched"],
        "same": (
            f"model folders, efficient settings, LoRA r16, dtype, batch {args.batch} of "
            f"{args.seconds:g} s clips with one transcript: identical shapes every step, "
            "no padding"
        ),
        "differs": (
            "stage2-matched runs the DeepSpeed engine (backward, step, clipping, grad "
            "norm), the loader (its wait is data_wait) and train_step's bookkeeping; "
            "raw-matched repeats one batch already on the device with torch AdamW"
        ),
        "overhead": overhead,
    }


def run_suite(args: argparse.Namespace) -> dict:
    """Prepare, run every row within the deadline, and write the report after each."""
    suite = Suite(args)
    suite.save(complete=False)  # a file exists from the first second
    try:
        inputs = prepare(suite)
        planned = plan(args, inputs)
    except Exception as exc:  # no inputs, no rows: each is recorded as not run, and why
        late = isinstance(exc, subprocess.TimeoutExpired) or suite.left() < MIN_RUN_S
        why = NOT_RUN if late else f"not run: preparation failed: {type(exc).__name__}: {exc}"
        for name in planned_names(args):
            suite.record(Row(name, "", "", args.batch, error=why))
        return suite.save(complete=True)
    suite.run(planned)
    return suite.save(complete=True)


def planned_names(args: argparse.Namespace) -> list[str]:
    """The row names in order, for a suite whose preparation did not finish in time."""
    names = ["raw-matched", "stage2-matched", "stage2-shipped", "stage2-zero2", "stage2-zero3"]
    names += ["eval-greedy", "eval-beam-ctc", "raw-efficient", "raw-seed", "stage1-zero2"]
    return names + (["stage2-7b-zero2"] if args.with_7b else [])


# ----------------------------------------------------------------------------- output


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # an absent module is a fact to report, not a failure
        return None


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def table(report: dict) -> str:
    """The tables: training rows (raw + launches), then evals; markdown, one line per run."""
    head = "| run | batch | ms/step | audio-s/s | tokens/s | TFLOP/s useful | MFU useful "
    head += "| TFLOP/s executed | MFU executed | data wait | padding | peak mem GiB | note |"
    lines = [head, "|" + "---|" * 13]
    evals = ["", "| eval | batch | utterances | utt/s | outside device | in joint CTC | note |"]
    evals.append("|" + "---|" * 7)
    for r in report["rows"]:
        if r["error"]:
            failed = f"| {r['name']} | {r['batch']} | {_failed(r['error'])} |"
            (evals if r["kind"] == "eval" else lines).append(failed)
            continue
        if r["kind"] == "eval":
            d = r["details"]
            cells = [
                r["name"],
                str(r["batch"]),
                str(d.get("utterances", "-")),
                _fmt(d.get("utterances_per_s"), ".2f"),
                _fmt(d.get("outside_device_share"), ".1%"),
                _fmt(d.get("ctc_share"), ".1%"),
                r["note"],
            ]
            evals.append("| " + " | ".join(cells) + " |")
            continue
        cells = [
            r["name"],
            str(r["batch"]),
            _fmt(r["ms_per_step"], ".1f"),
            _fmt(r["audio_s_per_s"], ".1f"),
            _fmt(r["tokens_per_s"], ".0f"),
            _fmt(r["tflops_useful"], ".3f"),
            _fmt(r["mfu_useful"], ".1%"),
            _fmt(r["tflops_executed"], ".3f"),
            _fmt(r["mfu_executed"], ".1%"),
            _fmt(r["data_wait"], ".1%"),
            _fmt(r["padding"], ".1%"),
            _fmt(r["peak_memory_gib"], ".1f"),
            r["note"],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if len(evals) > 3:
        lines += evals
    pair = report["comparable_pair"]
    if pair["overhead"]:
        o = pair["overhead"]
        lines.append(
            f"\nraw-matched vs stage2-matched ({pair['same']}): {o['raw_ms']:.1f} ms vs "
            f"{o['deepspeed_ms']:.1f} ms per step ({o['ratio']:.2f}x); without the data wait "
            f"{o['deepspeed_ms_without_data_wait']:.1f} ms ({o['ratio_without_data_wait']:.2f}x)"
        )
    return "\n".join(lines)


def _failed(error: str) -> str:
    return error if error.startswith("not run") else f"failed: {error.splitlines()[0]}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="See benchmarks/README.md."
    )
    add = p.add_argument
    add("--tiny", action="store_true", help="tiny models on the CPU, float32, 1 rank")
    add("--with-7b", action="store_true", help="also a stage-2 launch at Qwen2-VL-7B shapes")
    add("--work", type=Path, help="models, data, shards, runs (default: a folder under /tmp)")
    add("--out", type=Path, help="JSON (default results/gpu_suite.json; --tiny: *_tiny_cpu.json)")
    add("--deadline-s", type=float, default=420.0, help="the whole call, from its start (420)")
    add("--batch", type=int, default=8, help="rows per micro-batch everywhere (default 8)")
    add("--steps", type=int, help="optimizer steps per launch (default 20; --tiny 4)")
    add("--raw-steps", type=int, help="timed raw steps (default 10; --tiny 3)")
    add("--raw-warmup", type=int, help="untimed raw steps first (default 3; --tiny 1)")
    add("--clips", type=int, help="clips in the duration mix (default 256; --tiny 24)")
    add("--matched-clips", type=int, help="clips in the matched set (default 32; --tiny 16)")
    add("--eval-clips", type=int, help="clips `audio-llm eval` decodes (default 256; --tiny 16)")
    add("--eval-batch", type=int, default=8, help="eval batch size (default 8, as eval.batch_size)")
    add("--seconds", type=float, default=12.7, help="matched clip length (default 12.7)")
    add("--workers", type=int, help="loader workers per launch (default 4; --tiny 0)")
    add("--pack-workers", type=int, help="audio-llm pack --workers (default 8; --tiny 0)")
    add("--launch-timeout", type=float, help="seconds per run at most (default 240; --tiny 150)")
    add("--peak-tflops", type=float, help="MFU reference (default 989, H100 bf16; --tiny: none)")
    args = p.parse_args(argv)
    tiny = args.tiny
    defaults = {
        "steps": 4 if tiny else 20,
        "raw_steps": 3 if tiny else 10,
        "raw_warmup": 1 if tiny else 3,
        "clips": 24 if tiny else 256,
        "matched_clips": 16 if tiny else 32,
        "eval_clips": 16 if tiny else 256,
        "workers": 0 if tiny else 4,
        "pack_workers": 0 if tiny else 8,
        "launch_timeout": 150.0 if tiny else 240.0,
        "peak_tflops": 0.0 if tiny else H100_BF16_TFLOPS,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    name = "gpu_suite_tiny_cpu.json" if tiny else "gpu_suite.json"
    args.out = args.out or RESULTS / name
    args.work = args.work or Path(tempfile.gettempdir()) / (
        "gpu_suite_tiny" if tiny else "gpu_suite"
    )
    small = (args.batch, args.steps, args.raw_steps, args.clips, args.matched_clips)
    if min(*small, args.eval_clips, args.eval_batch) < 1:
        p.error("--batch, --steps, --raw-steps, --clips, --matched-clips, --eval-* must be >= 1")
    if args.matched_clips < args.batch or args.clips < args.batch:
        p.error("--clips and --matched-clips must hold at least one --batch")
    if args.eval_clips > args.clips:
        p.error("--eval-clips decodes clips of the duration mix: at most --clips")
    if not 0 < args.seconds <= 25:
        p.error("--seconds must be in (0, 25]")
    if args.deadline_s <= 0:
        p.error("--deadline-s must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # A SIGTERM (a device call at its limit) unwinds like an exception: the running launch is
    # stopped with its ranks, and the rows already finished are on disk.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = run_suite(args)
    print(report["table"])
    failed = [r["name"] for r in report["rows"] if r["error"] and r["error"] != NOT_RUN]
    skipped = [r["name"] for r in report["rows"] if r["error"] == NOT_RUN]
    print(f"wrote {args.out} ({report['timings']['total_s']:.0f} s)")
    if skipped:
        print(f"not run (deadline {args.deadline_s:g} s): {', '.join(skipped)}")
    if failed:
        print(f"failed: {', '.join(failed)} (errors in the JSON, logs under {args.work})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
