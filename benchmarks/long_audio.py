"""Long recordings: held-out clips joined with pauses, transcribed whole vs clip by clip.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/long_audio.py          # after `make demo`
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/long_audio.py --clips 23 --seed 1

It takes `--clips` utterances of the demo's seen-voice test set (`--corpus`, its NeMo manifest
gives the references), joins them into one recording with pauses of 0.3-0.6 s (the neighbouring
clip's own noise floor, so the pause sounds like the recording), and transcribes it with the
trained run (`--run`) three ways:

- `windows_30s`: the old `transcribe` (before issue 16): 30 s windows overlapping by 5 s,
  stitched at shared words (`audio.segment.windows` + `evaluation.transcribe.stitch`);
- `pauses_30s`: cut at pauses into pieces of at most 30 s (`--max-segment-seconds 30`);
- `pauses_trained`: cut at pauses into pieces no longer than the run's longest training clip
  (what `transcribe` now does by default).

The same clips are also transcribed one by one (`per_utterance`). Every WER is corpus WER from
`evaluation.wer.score` (basic normaliser); the long recording is one utterance whose reference is
the clips' references joined in order. The recording and references are written to `--work`.
"""

# ruff: noqa: E402  (the thread-count variables must be set before numpy and torch load)

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import itertools
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from audio_llm.audio.frames import SAMPLE_RATE
from audio_llm.audio.io import load_audio
from audio_llm.audio.segment import frame_levels, plan_pieces, windows
from audio_llm.evaluation.export import load_for_inference
from audio_llm.evaluation.transcribe import (
    model_decoder,
    stitch,
    training_clip_seconds,
    transcribe_audio,
)
from audio_llm.evaluation.wer import score


def noise_floor(audio: np.ndarray) -> float:
    """RMS of the clip's quietest 10% of frames: the level of its background noise."""
    levels = frame_levels(audio)
    return float(10 ** (np.percentile(levels, 10) / 20))


def join_with_pauses(
    clips: list[np.ndarray], pause: tuple[float, float], seed: int
) -> tuple[np.ndarray, list[float]]:
    rng = np.random.default_rng(seed)
    parts, pauses = [], []
    for i, clip in enumerate(clips):
        parts.append(clip)
        if i + 1 < len(clips):
            seconds = float(rng.uniform(*pause))
            pauses.append(seconds)
            floor = noise_floor(clip)
            parts.append(rng.normal(0, floor, int(seconds * SAMPLE_RATE)).astype(np.float32))
    return np.concatenate(parts), pauses


def old_transcribe(decode, audio: np.ndarray, overlap: float = 5.0, batch_size: int = 8) -> str:
    """`transcribe` before issue 16: 30 s windows, whatever the run was trained on."""
    spans = windows(len(audio), overlap)
    texts = []
    for i in range(0, len(spans), batch_size):
        texts += decode([audio[a:b] for a, b in spans[i : i + batch_size]])
    shared = [(a[1] - b[0]) / SAMPLE_RATE for a, b in itertools.pairwise(spans)]
    return stitch(texts, shared)


def wer_of(refs: dict[str, str], hyps: dict[str, str]) -> dict:
    report = score(refs, hyps, normalizer="basic", bootstrap=0)
    return {
        "wer": report.wer,
        "ref_words": report.ref_words,
        "substitutions": report.substitutions,
        "deletions": report.deletions,
        "insertions": report.insertions,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/demo/stage2", help="trained run folder")
    parser.add_argument(
        "--corpus",
        default="runs/demo/corpus/test_seen_voices",
        help="folder with the held-out clips and their manifest.jsonl",
    )
    parser.add_argument("--clips", type=int, default=23, help="clips joined into the recording")
    parser.add_argument("--pause", type=float, nargs=2, default=(0.3, 0.6), help="seconds")
    parser.add_argument("--seed", type=int, default=0, help="which clips, and the pauses")
    parser.add_argument("--ctc-weight", type=float, default=0.3, help="as the demo decodes")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="per piece (CLI default)")
    parser.add_argument("--work", default="runs/long_audio", help="recording + references here")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/long_audio.json"))
    args = parser.parse_args()

    corpus = Path(args.corpus)
    rows = [json.loads(line) for line in (corpus / "manifest.jsonl").read_text().splitlines()]
    chosen = sorted(random.Random(args.seed).sample(range(len(rows)), args.clips))
    rows = [rows[i] for i in chosen]
    clips = [load_audio(corpus / r["audio_filepath"]) for r in rows]
    refs = {r["id"]: r["text"] for r in rows}
    audio, pauses = join_with_pauses(clips, tuple(args.pause), args.seed)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    recording = work / "long_recording.wav"
    sf.write(recording, audio, SAMPLE_RATE, subtype="FLOAT")
    joined_ref = " ".join(r["text"] for r in rows)
    (work / "reference.txt").write_text(joined_ref + "\n")

    trained = training_clip_seconds(run=args.run)
    if trained is None:
        raise SystemExit(f"{args.run}: cannot read the training clip lengths from its shards")
    model = load_for_inference(run=args.run, device="cpu")
    decode = model_decoder(model, args.max_new_tokens, 1, args.ctc_weight)
    results: dict = {}

    t = time.time()
    hyps = {uid: transcribe_audio(decode, clip) for uid, clip in zip(refs, clips, strict=True)}
    results["per_utterance"] = {**wer_of(refs, hyps), "seconds": round(time.time() - t, 1)}

    long_ref = {"long": joined_ref}
    ways = {
        "windows_30s": lambda: old_transcribe(decode, audio),
        "pauses_30s": lambda: transcribe_audio(decode, audio, max_seconds=30.0),
        "pauses_trained": lambda: transcribe_audio(decode, audio, max_seconds=trained[1]),
    }
    texts = {}
    for name, transcribe in ways.items():
        t = time.time()
        texts[name] = transcribe()
        results[name] = {
            **wer_of(long_ref, {"long": texts[name]}),
            "seconds": round(time.time() - t, 1),
        }
    pieces = plan_pieces(audio, trained[1], 5.0)
    summary = {
        "run": args.run,
        "recording": {
            "path": str(recording),
            "seconds": round(len(audio) / SAMPLE_RATE, 2),
            "clips": [r["id"] for r in rows],
            "pauses_seconds": [round(p, 3) for p in pauses],
        },
        "trained_clip_seconds": [round(trained[0], 3), round(trained[1], 3)],
        "pieces_at_trained_length": {
            "count": len(pieces),
            "longest_seconds": round(max(p.seconds for p in pieces), 2),
            "windows": sum(p.shared_with_next > 0 for p in pieces),
        },
        "decoding": {"ctc_weight": args.ctc_weight, "max_new_tokens": args.max_new_tokens},
        "wer": results,
        "hypotheses": texts,
        "reference": joined_ref,
        "torch_threads": torch.get_num_threads(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(out)

    print(f"recording: {len(audio) / SAMPLE_RATE:.1f} s, {args.clips} clips, {recording}")
    print(f"trained on {trained[0]:.2f}-{trained[1]:.2f} s clips; {len(pieces)} pieces")
    for name, r in results.items():
        print(f"{name:15s} WER {100 * r['wer']:6.2f}%  ({r['ref_words']} words, {r['seconds']} s)")
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
