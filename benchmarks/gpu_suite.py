"""One GPU suite: the raw model step and the real `deepspeed` launches, one table, one JSON.

    python benchmarks/gpu_suite.py                    # one H100/H200: large-v3 + Qwen2-VL-2B
    python benchmarks/gpu_suite.py --with-7b          # also a stage-2 launch at Qwen2-VL-7B shapes
    python benchmarks/gpu_suite.py --tiny             # the same script on the CPU, tiny models

In one call it
1. writes random-weight checkpoints at the published shapes (`audio-llm tiny --like
   whisper-large-v3,qwen2-vl-2b`; `--tiny`: the tiny models) and synthesises speech-like clips
   (benchmarks/loader.py's synthesis) in two sets: `mixed`, a LibriSpeech-like duration mix
   (mean 12.7 s, 1-25 s), and `matched`, clips all `--matched-seconds` long with one fixed
   transcript, so every batch has the same shapes; both packed by `audio-llm pack` (audio mode);
2. times the raw step (`benchmarks/gpu_step.py`): seed settings and efficient settings on a
   synthetic batch (as issue 14's table), and `raw-matched`: the efficient settings on the loaded
   checkpoints and the first `matched` batch (`gpu_step.py --batch-from`);
3. launches `deepspeed --num_gpus 1 launch/stage1.py` (ZeRO-2) and `launch/stage2.py` with ZeRO-2
   and ZeRO-3 on `mixed`, ZeRO-2 on `matched` (the pair of `raw-matched`: same model folders,
   settings, batch and shapes; the difference is the DeepSpeed training path's cost per step),
   the shipped `launch/configs/whisper-large-v3_qwen2-vl-2b.yaml` (gradient checkpointing on),
   and with `--with-7b` one stage-2 launch at Qwen2-VL-7B shapes; each for `--steps` steps under
   `--launch-timeout`;
4. prints one table (ms/step, audio-s/s, tokens/s, TFLOP/s, MFU, data wait, padding, peak
   memory) from each launch's last `metrics.jsonl` row (`train.log_every` = half the steps, so
   the row covers the second half: warm-up excluded) and each raw step's JSON, and writes it all
   to `--out`. A failed run is a row with its error; the suite goes on.

Efficient settings: `model.varlen_encoder`, `model.stack_factor=8`, `model.projector=mlp`,
`data.bucket_by_length`; LoRA r16 (the config's default) in stage 2. Seed settings: the 30 s
encoder window, stack 1, linear projector. GPU runs are bf16 with DeepSpeed's FusedAdam (JIT-built
once into TORCH_EXTENSIONS_DIR); `--tiny` runs float32 on one CPU rank with torch's Adam, and its
figures are the CPU's, useful for the per-step host overhead of the DeepSpeed path, not for MFU.
"""

# ruff: noqa: E402  (loader.py's thread settings must come before numpy and torch load)

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np
import soundfile as sf
from loader import SynthSpec, speech_like, synthesise

from audio_llm.audio.frames import SAMPLE_RATE
from audio_llm.dist import free_port
from audio_llm.files import atomic_write_text

RESULTS = ROOT / "benchmarks" / "results"
H100_BF16_TFLOPS = 989.0
EFFICIENT = {"varlen": True, "stack": 8, "projector": "mlp"}
MATCHED_TEXT = "the quick brown fox jumps over the lazy dog and runs home"
SHIPPED = ROOT / "launch" / "configs" / "whisper-large-v3_qwen2-vl-2b.yaml"


@dataclass
class Row:
    """One line of the table: a raw step or a launch."""

    name: str
    kind: str  # "raw" or "deepspeed"
    what: str
    batch: int
    ms_per_step: float | None = None
    audio_s_per_s: float | None = None
    tokens_per_s: float | None = None
    tflops: float | None = None
    mfu: float | None = None
    data_wait: float | None = None
    padding: float | None = None
    peak_memory_gib: float | None = None
    wall_s: float = 0.0
    error: str | None = None
    command: list[str] = field(default_factory=list)
    source: str = ""  # the file the figures were read from


# ----------------------------------------------------------------------------- inputs


def write_models(args: argparse.Namespace, llm: str) -> dict[str, Path]:
    """Checkpoint folders for the runs: tiny models, or random weights at published shapes."""
    folder = args.work / "models" / ("tiny" if args.tiny else llm)
    if all((folder / sub / "config.json").is_file() for sub in ("whisper", "qwen2vl")):
        return {"whisper": folder / "whisper", "qwen2vl": folder / "qwen2vl"}
    cmd = [sys.executable, "-m", "audio_llm.cli", "tiny", "--out", str(folder)]
    if not args.tiny:
        cmd += ["--like", f"whisper-large-v3,{llm}"]
    subprocess.run(cmd, check=True, cwd=ROOT, env=_env(args))
    return {"whisper": folder / "whisper", "qwen2vl": folder / "qwen2vl"}


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


def pack(args: argparse.Namespace, manifest: Path, out: Path, shards: int) -> Path:
    """`audio-llm pack` (audio mode) into `out`, `shards` shards (>= loader workers)."""
    if (out / "index.json").is_file():
        return out
    clips = len(manifest.read_text().splitlines())
    cmd = [sys.executable, "-m", "audio_llm.cli", "pack", "--input", str(manifest)]
    cmd += ["--out", str(out), "--mode", "audio", "--overwrite", "--quiet"]
    cmd += ["--max-samples", str(-(-clips // shards)), "--workers", str(args.pack_workers)]
    subprocess.run(cmd, check=True, cwd=ROOT, env=_env(args))
    return out


# ----------------------------------------------------------------------------- runs


def _env(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    # One op build (FusedAdam; on the CPU DeepSpeed's shm all-reduce) for every launch, kept
    # where `make` keeps it unless the caller says otherwise.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    if args.tiny:
        env["OMP_NUM_THREADS"] = "1"
    return env


def _tail(text: str, lines: int = 6) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _run(args: argparse.Namespace, cmd: list[str], row: Row, log: Path) -> bool:
    """Run `cmd` under the launch timeout; on failure the row gets the error. True if it ran."""
    row.command = cmd
    began = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd,
            cwd=ROOT,
            env=_env(args),
            capture_output=True,
            text=True,
            timeout=args.launch_timeout,
        )
        log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr, encoding="utf-8")
        if proc.returncode != 0:
            row.error = f"exit {proc.returncode}: {_tail(proc.stderr or proc.stdout)}"
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or b""
        log.write_bytes(out if isinstance(out, bytes) else out.encode())
        row.error = f"timed out after {args.launch_timeout:g} s (log: {log})"
    row.wall_s = round(time.perf_counter() - began, 1)
    return row.error is None


def raw_step(args: argparse.Namespace, name: str, what: str, extra: list[str]) -> Row:
    """benchmarks/gpu_step.py in its own process (the GPU is free again for the launches)."""
    row = Row(name, "raw", what, args.batch)
    out = args.work / "raw" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_step.py"), "--batch", str(args.batch)]
    cmd += ["--steps", str(args.raw_steps), "--warmup", str(args.raw_warmup), "--out", str(out)]
    cmd += ["--peak-tflops", str(args.peak_tflops or H100_BF16_TFLOPS), *extra]
    if _run(args, cmd, row, out.with_suffix(".log")):
        report = json.loads(out.read_text())
        positions = report["tokens_per_s"]
        row.source = str(out)
        row.ms_per_step = report["step_s"] * 1e3
        row.audio_s_per_s = report["audio_seconds_per_s"]
        row.tokens_per_s = report.get("real_tokens_per_s", positions)
        row.tflops = report["tflops_per_device"]
        row.mfu = report["mfu"] if args.peak_tflops else None
        row.data_wait = 0.0  # one batch, already on the device
        row.padding = 1.0 - row.tokens_per_s / positions
        row.peak_memory_gib = report["max_memory_allocated_gib"]
    return row


def launch(
    args: argparse.Namespace,
    name: str,
    what: str,
    stage: int,
    overrides: list[str],
    ds_config: str = "ds_configs/zero2.json",
    config: Path | None = None,
) -> Row:
    """`deepspeed --num_gpus 1 launch/stageN.py` for `--steps` steps; figures from the last
    metrics.jsonl row (the second half of the steps)."""
    row = Row(name, "deepspeed", what, args.batch)
    out = args.work / "runs" / name
    shutil.rmtree(out, ignore_errors=True)  # a fresh run, never a resume
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    cmd = [launcher, "--num_gpus", "1", "--master_port", str(free_port())]
    cmd += [str(ROOT / "launch" / f"stage{stage}.py"), "--deepspeed_config", str(ROOT / ds_config)]
    cmd += ["--resume", "none"] + (["--config", str(config)] if config else [])
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
    out.parent.mkdir(parents=True, exist_ok=True)
    if _run(args, cmd, row, out.with_suffix(".log")):
        metrics = out / "metrics.jsonl"
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        last = [r for r in rows if "perf/step_s" in r][-1]
        row.source = f"{metrics} step {last['step']}"
        row.ms_per_step = last["perf/step_s"] * 1e3
        row.audio_s_per_s = last["perf/audio_s_per_s"]
        row.tokens_per_s = last["perf/tokens_per_s"]
        row.tflops = last.get("perf/tflops_per_device")
        row.mfu = last.get("perf/mfu")
        row.data_wait = last["perf/data_wait_frac"]
        row.padding = last["perf/padding_ratio"]
        row.peak_memory_gib = last.get("mem/max_allocated_gb")
        if row.peak_memory_gib is None:
            row.source += " (peak memory: mem/max_rss_gb, process RSS)"
            row.peak_memory_gib = last.get("mem/max_rss_gb")
    return row


def random_projector(path: Path, models: dict[str, Path], stack: int, kind: str) -> Path:
    """A stage-1-shaped projector with random weights: stage 2 needs one to start from."""
    from transformers import AutoConfig

    from audio_llm.model.projector import AudioProjector

    d_encoder = AutoConfig.from_pretrained(models["whisper"]).d_model
    d_llm = AutoConfig.from_pretrained(models["qwen2vl"]).text_config.hidden_size
    path.parent.mkdir(parents=True, exist_ok=True)
    AudioProjector(d_encoder, d_llm, stack=stack, kind=kind).save(path)
    return path


# ----------------------------------------------------------------------------- the suite


def run_suite(args: argparse.Namespace) -> dict:
    began = time.perf_counter()
    timings: dict[str, float] = {}

    def mark(what: str, since: float) -> float:
        timings[what] = round(time.perf_counter() - since, 1)
        return time.perf_counter()

    t = time.perf_counter()
    models = write_models(args, "qwen2-vl-2b")
    t = mark("models_s", t)
    spec = SynthSpec(args.clips, 0, 12.7, 1.0, 25.0)
    mixed_manifest = synthesise(args.work / "data" / "mixed", spec)
    matched = matched_manifest(args.work / "data" / "matched", args.matched_clips, args.seconds)
    workers = max(1, args.workers)
    mixed = pack(args, mixed_manifest, args.work / "shards" / "mixed", 2 * workers)
    matched = pack(args, matched, args.work / "shards" / "matched", 2 * workers)
    mark("data_s", t)
    durations = [json.loads(x)["duration"] for x in mixed_manifest.read_text().splitlines()]

    size = ["--tiny"] if args.tiny else ["--encoder", "whisper-large-v3", "--llm", "qwen2-vl-2b"]
    eff = ["--varlen", "--stack", "8", "--projector", "mlp"]
    rows = [
        raw_step(args, "raw-seed", "gpu_step.py seed settings", [*size, "--seconds", "12.7"]),
        raw_step(
            args, "raw-efficient", "gpu_step.py efficient", [*size, "--seconds", "12.7", *eff]
        ),
    ]
    folders = ["--encoder", str(models["whisper"]), "--llm", str(models["qwen2vl"])]
    rows.append(
        raw_step(
            args,
            "raw-matched",
            "gpu_step.py efficient, loaded folders, first matched batch",
            [*folders, "--batch-from", str(matched), *eff],
        )
    )

    base = [
        f"model.encoder={models['whisper']}",
        f"model.llm={models['qwen2vl']}",
        f"data.batch_size={args.batch}",
        f"data.num_workers={args.workers}",
        "train.lr=1e-4",
    ]
    efficient = [
        *base,
        "model.varlen_encoder=true",
        "model.stack_factor=8",
        "model.projector=mlp",
        "data.bucket_by_length=true",
    ]
    on_mixed = [*efficient, f"data.train_shards={mixed}"]
    rows.append(launch(args, "stage1-zero2", "stage 1, ZeRO-2, mixed", 1, on_mixed))
    stage1 = args.work / "runs" / "stage1-zero2" / "export" / "projector.safetensors"
    if not stage1.is_file():  # stage 2 still runs, from a random projector of the same shape
        stage1 = random_projector(args.work / "projectors" / "s8.safetensors", models, 8, "mlp")
    stage2 = [f"model.projector_init={stage1}"]
    rows.append(launch(args, "stage2-zero2", "stage 2, ZeRO-2, mixed", 2, [*on_mixed, *stage2]))
    rows.append(
        launch(
            args,
            "stage2-zero3",
            "stage 2, ZeRO-3, mixed",
            2,
            [*on_mixed, *stage2],
            ds_config="ds_configs/zero3.json",
        )
    )
    rows.append(
        launch(
            args,
            "stage2-matched",
            "stage 2, ZeRO-2, matched (pair of raw-matched)",
            2,
            [*efficient, f"data.train_shards={matched}", *stage2],
        )
    )
    shipped_projector = random_projector(
        args.work / "projectors" / "s4.safetensors", models, 4, "mlp"
    )
    rows.append(
        launch(
            args,
            "stage2-shipped",
            f"stage 2, {SHIPPED.name} (grad ckpt, accum 2), mixed",
            2,
            [
                f"model.encoder={models['whisper']}",
                f"model.llm={models['qwen2vl']}",
                f"data.train_shards={mixed}",
                "data.eval_shards=",
                f"data.num_workers={args.workers}",
                f"data.batch_size={args.batch}",  # the shipped 8 unless --batch says otherwise
                f"model.projector_init={shipped_projector}",
            ],
            config=SHIPPED,
        )
    )
    if args.with_7b:
        t = time.perf_counter()
        models7 = write_models(args, "qwen2-vl-7b")
        mark("models_7b_s", t)
        projector7 = random_projector(
            args.work / "projectors" / "s8_7b.safetensors", models7, 8, "mlp"
        )
        rows.append(
            launch(
                args,
                "stage2-7b-zero2",
                "stage 2, ZeRO-2, mixed, Qwen2-VL-7B shapes",
                2,
                [
                    *on_mixed,
                    f"model.encoder={models7['whisper']}",
                    f"model.llm={models7['qwen2vl']}",
                    f"model.projector_init={projector7}",
                ],
            )
        )

    pair = {r.name: r for r in rows}
    raw, ds = pair["raw-matched"], pair["stage2-matched"]
    overhead = None
    if raw.ms_per_step and ds.ms_per_step:
        compute_ms = ds.ms_per_step * (1 - (ds.data_wait or 0.0))
        overhead = {
            "raw_ms": raw.ms_per_step,
            "deepspeed_ms": ds.ms_per_step,
            "deepspeed_ms_without_data_wait": compute_ms,
            "ratio": ds.ms_per_step / raw.ms_per_step,
            "ratio_without_data_wait": compute_ms / raw.ms_per_step,
        }
    return {
        "suite": "tiny (CPU)" if args.tiny else "gpu",
        "measured": True,
        "device": _device_name(),
        "torch": _version("torch"),
        "deepspeed": _version("deepspeed"),
        "transformers": _version("transformers"),
        "platform": platform.platform(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "mixed_durations": {
            "clips": len(durations),
            "mean_s": round(float(np.mean(durations)), 2),
            "min_s": round(float(np.min(durations)), 2),
            "max_s": round(float(np.max(durations)), 2),
        },
        "comparable_pair": {
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
        },
        "rows": [vars(r) for r in rows],
        "timings": {**timings, "total_s": round(time.perf_counter() - began, 1)},
    }


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
    """The one table: markdown, one line per run."""
    head = "| run | batch | ms/step | audio-s/s | tokens/s | TFLOP/s | MFU | data wait | padding "
    head += "| peak mem GiB |"
    lines = [head, "|" + "---|" * 10]
    for r in report["rows"]:
        if r["error"]:
            lines.append(f"| {r['name']} | {r['batch']} | failed: {r['error'].splitlines()[0]} |")
            continue
        cells = [
            r["name"],
            str(r["batch"]),
            _fmt(r["ms_per_step"], ".1f"),
            _fmt(r["audio_s_per_s"], ".1f"),
            _fmt(r["tokens_per_s"], ".0f"),
            _fmt(r["tflops"], ".3f"),
            _fmt(r["mfu"], ".1%"),
            _fmt(r["data_wait"], ".1%"),
            _fmt(r["padding"], ".1%"),
            _fmt(r["peak_memory_gib"], ".1f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    pair = report["comparable_pair"]
    if pair["overhead"]:
        o = pair["overhead"]
        lines.append(
            f"\nraw-matched vs stage2-matched ({pair['same']}): {o['raw_ms']:.1f} ms vs "
            f"{o['deepspeed_ms']:.1f} ms per step ({o['ratio']:.2f}x); without the data wait "
            f"{o['deepspeed_ms_without_data_wait']:.1f} ms ({o['ratio_without_data_wait']:.2f}x)"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="See benchmarks/README.md."
    )
    add = p.add_argument
    add("--tiny", action="store_true", help="tiny models on the CPU, float32, 1 rank")
    add("--with-7b", action="store_true", help="also a stage-2 launch at Qwen2-VL-7B shapes")
    add("--work", type=Path, help="models, data, shards, runs (default: a folder under /tmp)")
    add("--out", type=Path, help="JSON (default results/gpu_suite.json; --tiny: *_tiny_cpu.json)")
    add("--batch", type=int, default=8, help="rows per micro-batch everywhere (default 8)")
    add("--steps", type=int, help="optimizer steps per launch (default 20; --tiny 4)")
    add("--raw-steps", type=int, help="timed raw steps (default 10; --tiny 3)")
    add("--raw-warmup", type=int, help="untimed raw steps first (default 3; --tiny 1)")
    add("--clips", type=int, help="clips in the duration mix (default 96; --tiny 24)")
    add("--matched-clips", type=int, help="clips in the matched set (default 32; --tiny 16)")
    add("--seconds", type=float, default=12.7, help="matched clip length (default 12.7)")
    add("--workers", type=int, help="loader workers per launch (default 4; --tiny 0)")
    add("--pack-workers", type=int, default=0, help="audio-llm pack --workers (default 0)")
    add("--launch-timeout", type=float, help="seconds per run (default 240; --tiny 150)")
    add("--peak-tflops", type=float, help="MFU reference (default 989, H100 bf16; --tiny: none)")
    args = p.parse_args(argv)
    tiny = args.tiny
    defaults = {
        "steps": 4 if tiny else 20,
        "raw_steps": 3 if tiny else 10,
        "raw_warmup": 1 if tiny else 3,
        "clips": 24 if tiny else 96,
        "matched_clips": 16 if tiny else 32,
        "workers": 0 if tiny else 4,
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
    if min(args.batch, args.steps, args.raw_steps, args.clips, args.matched_clips) < 1:
        p.error("--batch, --steps, --raw-steps, --clips, --matched-clips must be >= 1")
    if args.matched_clips < args.batch or args.clips < args.batch:
        p.error("--clips and --matched-clips must hold at least one --batch")
    if not 0 < args.seconds <= 25:
        p.error("--seconds must be in (0, 25]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    report = run_suite(args)
    text = table(report)
    print(text)
    report["table"] = text
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    failed = [r["name"] for r in report["rows"] if r["error"]]
    print(f"wrote {args.out} ({report['timings']['total_s']:.0f} s)")
    if failed:
        print(f"failed: {', '.join(failed)} (errors in the JSON, logs under {args.work})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
