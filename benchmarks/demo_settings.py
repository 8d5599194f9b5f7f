"""The demo task trained with the seed and the efficient settings for the same steps: WER of each.

    python benchmarks/demo_settings.py                      # 1,000 clips, 100 + 300 steps
    python benchmarks/demo_settings.py --steps 1500 --train-utterances 3000
    python benchmarks/demo_settings.py --work /tmp/bds      # keep shards elsewhere

Issue 7, benchmark (c). It runs the `make demo` tools (audio_llm/demo/run.py) on its tiny models
and espeak-ng corpus with launch/configs/demo_random-encoder_stage{1,2}.yaml (the random-encoder
recipe: mlp projector, LoRA r=64, batches of 16 per rank, lr 3e-3) for every value except the
three that make up each setting:

- seed: encoder shards packed without `--varlen-encoder` (every clip runs Whisper's 30 s window,
  1,500 frames, and the valid frames are kept; `model.varlen_encoder=false`), `model.stack_factor=1`
  (50 LLM positions per audio-second), `data.bucket_by_length=false` (random batches);
- efficient: shards packed with `--varlen-encoder` (`model.varlen_encoder=true`),
  `model.stack_factor=8` (6.25 positions per second), `data.bucket_by_length=true`.

Steps, per setting:
1. `audio-llm pack --mode encoder` of the first N train clips and M seen-voice test clips (a
   sub-manifest of `--corpus`, or of a corpus built with `demo.speech.make_corpus` if it has
   none), timed. The shards hold encoder outputs, so the 30 s padding costs here, on the CPU, and
   not while training; the analytic encoder FLOPs of the pack (`planning.flops`) are shown too.
   Shards are reused when their index.json exists and matches (with the timing of that pack).
2. `deepspeed --num_gpus 2 launch/stage1.py ... --resume none` for `--stage1-steps` steps (default
   100, as `make demo`): launch/stage2.py refuses to start without a stage-1 projector, and the
   projector's input width depends on the stack factor, so each setting trains its own.
3. `deepspeed --num_gpus 2 launch/stage2.py ... model.projector_init=... --resume none` for
   `--steps` steps (2 CPU ranks, ZeRO-2), `eval.every=0`: wall time, mean step time, final loss,
   and from the run's metrics.jsonl the means of perf/tflops_per_device, perf/padding_ratio and
   perf/audio_padding_ratio, and the executed training TFLOP per trained audio-second.
4. `torchrun --nproc_per_node 2 -m audio_llm.cli eval` of the stage-2 run on the test shards
   (batches of 32, 48 new tokens at most): WER.

It prints a table and writes `benchmarks/results/demo_settings.json` (settings, command line,
machine, figures). A failing step prints the tail of its log and exits 1. The tiny model trained
for a few hundred steps is far from reading the audio; compare the WERs with that in mind.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FRAMES_PER_SECOND = 50  # Whisper encoder frames per audio-second
PACK_BATCH = 16  # encoder batch size of the pack (also its default)


@dataclass(frozen=True)
class Setting:
    name: str
    varlen_encoder: bool
    stack_factor: int
    bucket_by_length: bool

    def overrides(self) -> list[str]:
        return [
            f"model.varlen_encoder={str(self.varlen_encoder).lower()}",
            f"model.stack_factor={self.stack_factor}",
            f"data.bucket_by_length={str(self.bucket_by_length).lower()}",
        ]


SETTINGS = (
    Setting("seed", varlen_encoder=False, stack_factor=1, bucket_by_length=False),
    Setting("efficient", varlen_encoder=True, stack_factor=8, bucket_by_length=True),
)
SPLITS = {"train": "train", "test": "test_seen_voices"}  # our name -> corpus split


LOAD: dict[str, float] = {}  # 1-min load average at the end of each step: was the CPU shared?


def run_logged(cmd: list[str], log: Path) -> float:
    """Run one step with its output in `log`; on failure print the log's tail and exit 1."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    log.parent.mkdir(parents=True, exist_ok=True)
    began = time.time()
    with open(log, "w") as out:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-40:])
        print(f"FAILED (exit {proc.returncode}): {shlex.join(cmd)}\nlog {log}:\n{tail}")
        raise SystemExit(1)
    LOAD[log.stem] = os.getloadavg()[0]
    return time.time() - began


def tool(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


# ----------------------------------------------------------------------------- inputs
def corpus_manifests(args: argparse.Namespace, work: Path) -> Path:
    """The corpus folder: `--corpus` if it has both manifests, else one built in the work folder."""
    corpus = args.corpus.resolve()
    if all((corpus / s / "manifest.jsonl").is_file() for s in SPLITS.values()):
        return corpus
    from audio_llm.demo.speech import CorpusSpec, make_corpus

    corpus = work / "corpus"
    if not all((corpus / s / "manifest.jsonl").is_file() for s in SPLITS.values()):
        print(f"no corpus in {args.corpus}: building one in {corpus} (espeak-ng)")
        spec = CorpusSpec(train=args.train_utterances, test=args.test_utterances, seed=args.seed)
        make_corpus(corpus, spec)
    return corpus


def sub_manifest(source: Path, out: Path, count: int) -> list[dict]:
    """The first `count` rows of `source`, audio paths made absolute; returns the rows."""
    rows = []
    with open(source, encoding="utf-8") as f:
        for line in f:
            if len(rows) == count:
                break
            if not line.strip():
                continue
            row = json.loads(line)
            key = "audio_filepath" if "audio_filepath" in row else "audio"
            row[key] = str((source.parent / row[key]).resolve())
            rows.append(row)
    if len(rows) < count:
        raise SystemExit(f"{source} has {len(rows)} utterances, fewer than the {count} asked for")
    out.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if not out.is_file() or out.read_text(encoding="utf-8") != text:
        out.write_text(text, encoding="utf-8")
    return rows


# ----------------------------------------------------------------------------- pack
def pack(setting: Setting, manifest: Path, out: Path, count: int, encoder: Path, log: Path) -> dict:
    """Pack (or reuse) one split's encoder shards; returns {seconds, reused}."""
    stamp = out / "pack_timing.json"
    index = out / "index.json"
    key = {"manifest": str(manifest), "manifest_bytes": manifest.stat().st_size, "count": count}
    if index.is_file() and stamp.is_file():
        meta = json.loads(index.read_text())
        timing = json.loads(stamp.read_text())
        varlen = bool((meta.get("encoder") or {}).get("varlen"))
        samples = (meta.get("totals") or {}).get("samples")
        if varlen == setting.varlen_encoder and samples == count and timing.get("key") == key:
            return {"seconds": timing["seconds"], "reused": True}
    cmd = [tool("audio-llm"), "pack", "--input", str(manifest), "--out", str(out)]
    cmd += ["--mode", "encoder", "--encoder", str(encoder), "--batch-size", str(PACK_BATCH)]
    if setting.varlen_encoder:
        cmd.append("--varlen-encoder")
    # 8 shards at least, as the demo packs: 2 ranks x up to 4 loader workers each need one
    cmd += ["--max-samples", str(max(1, -(-count // 8))), "--overwrite", "--quiet"]
    seconds = run_logged(cmd, log)
    stamp.write_text(json.dumps({"key": key, "seconds": seconds}, indent=2) + "\n")
    return {"seconds": seconds, "reused": False}


def pack_encoder_tflop(setting: Setting, rows: list[dict], whisper: Path, llm: Path) -> float:
    """Analytic Whisper forward TFLOP of packing `rows` (batches of PACK_BATCH, in order)."""
    from audio_llm.audio.frames import encoder_frames, mel_frames
    from audio_llm.model.arch import resolve_config
    from audio_llm.planning.flops import ModelShape, encoder_forward

    shape = ModelShape.from_configs(resolve_config(str(whisper)), resolve_config(str(llm)))
    mels = [mel_frames(round(float(r["duration"]) * 16000)) for r in rows]
    total = 0.0
    for start in range(0, len(mels), PACK_BATCH):
        batch = mels[start : start + PACK_BATCH]
        if setting.varlen_encoder:  # the batch runs its longest clip
            longest = max(batch)
            total += len(batch) * encoder_forward(shape, encoder_frames(longest), longest)
        else:  # every clip runs the 30 s window
            window = shape.encoder_max_frames
            total += len(batch) * encoder_forward(shape, window, 2 * window)
    return total / 1e12


# ----------------------------------------------------------------------------- train + eval
def read_metrics(run_dir: Path) -> dict:
    """Means over the logged intervals, and executed TFLOP per trained audio-second (rank 0)."""
    rows = []
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if "tag" not in row and "perf/step_s" in row:
                rows.append(row)
    out: dict = {"intervals": len(rows)}
    for key in (
        "perf/step_s",
        "perf/tflops_per_device",
        "perf/padding_ratio",
        "perf/audio_padding_ratio",
        "perf/samples_per_s",
        "perf/audio_s_per_s",
        "perf/data_wait_frac",
    ):
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        out[key] = sum(values) / len(values) if values else None
    # each row covers the steps since the previous one: FLOPs = TFLOP/s x step_s x steps
    flops = audio = 0.0
    previous = 0
    for r in rows:
        steps, previous = r["step"] - previous, r["step"]
        seconds = r["perf/step_s"] * steps
        flops += r.get("perf/tflops_per_device", 0.0) * seconds
        audio += r.get("perf/audio_s_per_s", 0.0) * seconds
    out["tflop_per_audio_second"] = flops / audio if audio > 0 else None
    return out


def stage(
    number: int,
    setting: Setting,
    args: argparse.Namespace,
    work: Path,
    shards: dict,
    models: dict,
    steps: int,
    extra: list[str],
) -> tuple[Path, float]:
    """One `deepspeed --num_gpus 2 launch/stageN.py` run from scratch; (run dir, wall seconds)."""
    run_dir = work / "runs" / f"{setting.name}_stage{number}"
    if run_dir.exists():  # metrics.jsonl appends: start clean
        shutil.rmtree(run_dir)
    cmd = [tool("deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]
    cmd += [str(REPO / "launch" / f"stage{number}.py")]
    cmd += ["--deepspeed_config", str(REPO / "ds_configs" / "zero2.json")]
    cmd += [
        "--config",
        str(REPO / "launch" / "configs" / f"demo_random-encoder_stage{number}.yaml"),
    ]
    cmd += [
        f"model.encoder={models['whisper']}",
        f"model.llm={models['qwen2vl']}",
        f"data.train_shards={shards['train']}",
        f"data.eval_shards={shards['test']}",
        f"data.seed={args.seed}",
        f"train.seed={args.seed}",
        f"train.out_dir={run_dir}",
        f"train.max_steps={steps}",
        "eval.every=0",
        *setting.overrides(),
        *extra,
        "--resume",
        "none",
    ]
    print(f"  stage {number}, {steps} steps: {' '.join(setting.overrides())}", flush=True)
    return run_dir, run_logged(cmd, work / "logs" / f"{setting.name}_stage{number}.log")


def train_and_eval(
    setting: Setting, args: argparse.Namespace, work: Path, shards: dict, models: dict
) -> dict:
    # launch/stage2.py refuses to start without a stage-1 projector: a short stage 1 makes one
    # (its input width is 128 x stack, so each setting needs its own), as `make demo` does.
    stage1, stage1_seconds = stage(1, setting, args, work, shards, models, args.stage1_steps, [])
    init = f"model.projector_init={stage1 / 'export' / 'projector.safetensors'}"
    run_dir, train_seconds = stage(2, setting, args, work, shards, models, args.steps, [init])
    summary = json.loads((run_dir / "summary.json").read_text())

    eval_dir = work / "eval" / setting.name
    cmd = [tool("torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())]
    cmd += ["-m", "audio_llm.cli", "eval", "--run-dir", str(run_dir), "--shards", shards["test"]]
    cmd += ["--out", str(eval_dir), "--batch-size", "32", "--max-new-tokens", "48"]
    print("  eval", flush=True)
    eval_seconds = run_logged(cmd, work / "logs" / f"{setting.name}_eval.log")
    report = json.loads((eval_dir / "summary.json").read_text())

    losses = {int(k): v for k, v in summary["losses"].items()}
    tail = [losses[k] for k in sorted(losses)[-max(1, args.steps // 10) :]]
    return {
        "wer": report.get("wer"),
        "wer_interval": report.get("bootstrap"),
        "cer": (report.get("cer") or {}).get("cer"),
        "eval_utterances": report.get("utterances"),
        "hyp_words": report.get("hyp_words"),
        "ref_words": report.get("ref_words"),
        "stage1_wall_seconds": stage1_seconds,
        "stage1_final_loss": _last_loss(stage1),
        "train_wall_seconds": train_seconds,
        "train_loop_seconds": summary.get("wall_seconds"),
        "eval_wall_seconds": eval_seconds,
        "final_loss": losses[max(losses)] if losses else None,
        "mean_loss_last_10pct": sum(tail) / len(tail) if tail else None,
        "metrics": read_metrics(run_dir),
        "run_dir": str(run_dir),
    }


def _last_loss(run_dir: Path) -> float | None:
    losses = json.loads((run_dir / "summary.json").read_text())["losses"]
    return losses[max(losses, key=int)] if losses else None


# ----------------------------------------------------------------------------- report
def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def giga(tera: float | None) -> float | None:
    return None if tera is None else 1000 * tera


def ratio(a: float | None, b: float | None) -> str:
    return "" if not a or not b else f"{a / b:.2f}x"


def print_table(results: dict[str, dict]) -> None:
    seed, eff = results["seed"], results["efficient"]

    def row(label: str, get, spec: str, show_ratio: bool = True) -> None:
        a, b = get(seed), get(eff)
        r = ratio(a, b) if show_ratio else ""
        print(f"{label:<38} {fmt(a, spec):>12} {fmt(b, spec):>12} {r:>10}")

    header = f"{'':<38} {'seed':>12} {'efficient':>12} {'seed/eff':>10}"
    print(header)
    print("-" * len(header))
    row("WER, seen voices", lambda r: r["wer"], ".2%", False)
    row("CER, seen voices", lambda r: r["cer"], ".2%", False)
    row("pack train+test (s)", lambda r: r["pack"]["seconds"], ".1f")
    row("pack encoder TFLOP (analytic)", lambda r: r["pack"]["encoder_tflop"], ".3f")
    row("stage-1 wall, deepspeed launch (s)", lambda r: r["stage1_wall_seconds"], ".1f")
    row("stage-2 wall, deepspeed launch (s)", lambda r: r["train_wall_seconds"], ".1f")
    row("training loop (s)", lambda r: r["train_loop_seconds"], ".1f")
    row("mean step time (s)", lambda r: r["metrics"]["perf/step_s"], ".3f")
    row("final loss", lambda r: r["final_loss"], ".3f", False)
    row("mean loss, last 10% of steps", lambda r: r["mean_loss_last_10pct"], ".3f", False)
    row("GFLOP/s per device (mean)", lambda r: giga(r["metrics"]["perf/tflops_per_device"]), ".2f")
    row(
        "train GFLOP per audio-second",
        lambda r: giga(r["metrics"]["tflop_per_audio_second"]),
        ".3f",
    )
    row("padding ratio, LLM positions", lambda r: r["metrics"]["perf/padding_ratio"], ".1%", False)
    row(
        "padding ratio, audio frames",
        lambda r: r["metrics"]["perf/audio_padding_ratio"],
        ".1%",
        False,
    )
    row("audio-s trained per s (rank 0)", lambda r: r["metrics"]["perf/audio_s_per_s"], ".1f")
    row("LLM audio positions per audio-second", lambda r: r["audio_positions_per_second"], ".2f")
    row("mean LLM audio positions per clip", lambda r: r["mean_audio_positions"], ".1f")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="See benchmarks/README.md."
    )
    add = p.add_argument
    add("--corpus", type=Path, default=Path("runs/demo/corpus"), help="demo corpus folder")
    add("--work", type=Path, default=Path("runs/bench_demo_settings"), help="work folder")
    add("--train-utterances", type=int, default=1000, help="first N train clips (default 1000)")
    add("--test-utterances", type=int, default=100, help="first N test clips (default 100)")
    add("--steps", type=int, default=300, help="stage-2 steps per setting (default 300)")
    add("--stage1-steps", type=int, default=100, help="stage-1 steps first (default 100)")
    add("--seed", type=int, default=0, help="models, corpus, data and train seed (default 0)")
    add("--out", type=Path, default=Path("benchmarks/results/demo_settings.json"))
    args = p.parse_args(argv)
    if min(args.train_utterances, args.test_utterances, args.steps, args.stage1_steps) < 1:
        p.error("--train-utterances, --test-utterances, --steps, --stage1-steps must be >= 1")
    return args


def free_port() -> int:
    from audio_llm.dist import free_port as port

    return port()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from audio_llm.demo.run import DEMO_MODELS
    from audio_llm.model.tiny import write_tiny_models

    began = time.time()
    work = args.work.resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    tiny = work / "tiny"
    if all((tiny / m / "config.json").is_file() for m in ("whisper", "qwen2vl")):
        models = {"whisper": tiny / "whisper", "qwen2vl": tiny / "qwen2vl"}
    else:  # written once: packed shards record the encoder's weights
        models = write_tiny_models(tiny, seed=args.seed, spec=DEMO_MODELS)
    corpus = corpus_manifests(args, work)
    counts = {"train": args.train_utterances, "test": args.test_utterances}
    manifests, rows = {}, {}
    for split, source in SPLITS.items():
        manifests[split] = work / "manifests" / f"{split}.jsonl"
        rows[split] = sub_manifest(
            corpus / source / "manifest.jsonl", manifests[split], counts[split]
        )
    durations = [float(r["duration"]) for r in rows["train"]]
    print(
        f"corpus {corpus}: {len(rows['train'])} train clips ({sum(durations) / 60:.1f} min, mean "
        f"{sum(durations) / len(durations):.2f} s, max {max(durations):.2f} s), "
        f"{len(rows['test'])} test clips"
    )

    results: dict[str, dict] = {}
    for setting in SETTINGS:
        print(f"== {setting.name}", flush=True)
        shards, pack_seconds, reused = {}, 0.0, []
        for split in SPLITS:
            out = work / "shards" / setting.name / split
            log = work / "logs" / f"{setting.name}_pack_{split}.log"
            timing = pack(setting, manifests[split], out, counts[split], models["whisper"], log)
            shards[split] = str(out)
            pack_seconds += timing["seconds"]
            if timing["reused"]:
                reused.append(split)
        note = f" (reused: {', '.join(reused)})" if reused else ""
        print(f"  pack {pack_seconds:.1f} s{note}", flush=True)
        tflop = sum(
            pack_encoder_tflop(setting, rows[s], models["whisper"], models["qwen2vl"])
            for s in SPLITS
        )
        result = train_and_eval(setting, args, work, shards, models)
        positions = [-(-round(d * FRAMES_PER_SECOND) // setting.stack_factor) for d in durations]
        results[setting.name] = {
            "setting": asdict(setting),
            "overrides": setting.overrides(),
            "pack": {"seconds": pack_seconds, "reused": reused, "encoder_tflop": tflop},
            "audio_positions_per_second": FRAMES_PER_SECOND / setting.stack_factor,
            "mean_audio_positions": sum(positions) / len(positions),
            **result,
        }
        print(f"  WER {fmt(result['wer'], '.2%')}", flush=True)

    print(
        f"\nstage 1 {args.stage1_steps} + stage 2 {args.steps} steps per setting, "
        f"demo_random-encoder_stage{{1,2}}.yaml "
        f"(projector mlp, batch 16 per rank, 2 CPU ranks); "
        f"{args.train_utterances} train / {args.test_utterances} test clips"
    )
    print_table(results)
    report = {
        "command": shlex.join(["python", *sys.argv]),
        "config": {k: str(v) for k, v in vars(args).items()},
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_1min_after_each_step": LOAD,
        },
        "corpus": {
            "folder": str(corpus),
            "train_clips": len(rows["train"]),
            "test_clips": len(rows["test"]),
            "train_minutes": sum(durations) / 60,
            "train_mean_seconds": sum(durations) / len(durations),
        },
        "settings": [asdict(s) for s in SETTINGS],
        "results": results,
        "total_seconds": time.time() - began,
        "notes": [
            "stage 1 (projector) then stage 2 (projector + LoRA), "
            "launch/configs/demo_random-encoder_stage{1,2}.yaml "
            "otherwise; stage-2 figures unless named stage 1",
            "shards hold encoder outputs: the 30 s window costs at pack time (CPU here), not in "
            "training; training FLOPs count the projector + LLM only",
            "perf/* are means over the logged intervals of rank 0 (metrics.jsonl); train TFLOP "
            "per audio-second = sum of TFLOP over sum of audio-seconds, rank 0",
            "pack encoder TFLOP: planning.flops.encoder_forward per clip, batches of 16 in "
            "manifest order (varlen: each batch runs its longest clip; padded: 1,500 frames)",
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    busy = {k: v for k, v in LOAD.items() if v > (os.cpu_count() or 1) + 1.5}
    if busy:
        shown = ", ".join(f"{k} {v:.1f}" for k, v in busy.items())
        print(f"note: other processes shared the CPUs (1-min load average after: {shown})")
    print(f"wrote {args.out} ({time.time() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
