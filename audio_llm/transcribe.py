"""Transcribe audio files of any length, rate and channel count.

Whisper's encoder sees at most 30 s. Longer audio is cut into 30 s windows that overlap by
`overlap` seconds; each window is transcribed on its own, and consecutive texts are joined where
their words agree: the longest run of words shared by the end of one window's text and the start
of the next is kept once. Words in the overlap are heard twice, so a word cut at one window's edge
is whole in the other, and neither lost nor doubled at the seam.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Callable, Sequence
from difflib import SequenceMatcher
from pathlib import Path

import numpy as np
import torch

from audio_llm.encoder import HOP_LENGTH, SAMPLE_RATE
from audio_llm.errors import AudioLLMError
from audio_llm.export import add_model_source

WINDOW_SECONDS = 30.0
WORDS_PER_SECOND = 5.0  # generous speaking rate: bounds how far into a text the overlap can reach


def windows(
    num_samples: int, overlap: float, window: float = WINDOW_SECONDS
) -> list[tuple[int, int]]:
    """(start, end) sample ranges of `window` seconds, evenly spaced so that consecutive ones
    share at least `overlap` seconds; one range if the audio fits a single window."""
    if not 0 <= overlap < window / 2:
        raise AudioLLMError(f"overlap must be in [0, {window / 2:g}) seconds (got {overlap})")
    size, shared = int(window * SAMPLE_RATE), int(overlap * SAMPLE_RATE)
    if num_samples <= size:
        return [(0, num_samples)]
    count = -(-(num_samples - shared) // (size - shared))
    starts = [round(i * (num_samples - size) / (count - 1)) for i in range(count)]
    return [(s, s + size) for s in starts]


def stitch(texts: Sequence[str], overlaps: Sequence[float]) -> str:
    """Join window transcripts, keeping the words of each overlap once (see module doc).

    `overlaps[i]` is how many seconds window i shares with window i + 1."""
    words: list[str] = []
    for i, text in enumerate(texts):
        new = text.split()
        if not words or not new:
            words += new
            continue
        reach = int(overlaps[i - 1] * WORDS_PER_SECOND) + 2
        tail_start = max(0, len(words) - reach)
        tail, head = words[tail_start:], new[:reach]
        match = SequenceMatcher(None, tail, head, autojunk=False).find_longest_match(
            0, len(tail), 0, len(head)
        )
        if match.size == 0:
            words += new  # nothing shared: the windows heard different words at the seam
            continue
        # Keep the left text up to the shared run and the right text from it: each half is
        # the one that heard those words away from its own window edge.
        words = words[: tail_start + match.a] + new[match.b :]
    return " ".join(words)


def transcribe_audio(
    decode: Callable[[list[np.ndarray]], list[str]],
    audio: np.ndarray,
    overlap: float = 5.0,
    batch_size: int = 8,
) -> str:
    """Transcribe 16 kHz mono `audio` of any length with `decode(list of <=30 s clips)`."""
    spans = windows(len(audio), overlap)
    clips = [audio[a:b] for a, b in spans]
    texts: list[str] = []
    for i in range(0, len(clips), batch_size):
        texts += decode(clips[i : i + batch_size])
    shared = [(a[1] - b[0]) / SAMPLE_RATE for a, b in itertools.pairwise(spans)]
    return stitch(texts, shared)


def model_decoder(
    model, max_new_tokens: int = 128, num_beams: int = 1, ctc_weight: float = 0.0
) -> Callable[[list[np.ndarray]], list[str]]:
    """A `decode` for `transcribe_audio` backed by an AudioLLM (features computed here)."""
    from audio_llm.data.collate import AudioSample
    from audio_llm.evaluate import eval_collator, transcribe_samples
    from audio_llm.features import log_mel

    collator = eval_collator(model, "mel")
    filters = model.feature_extractor.mel_filters

    def decode(clips: list[np.ndarray]) -> list[str]:
        samples = []
        for clip in clips:
            if len(clip) < HOP_LENGTH * 2:
                clip = np.pad(clip, (0, HOP_LENGTH * 2 - len(clip)))
            mel = log_mel(clip, filters).numpy()
            samples.append(AudioSample("clip", "", None, len(clip) / SAMPLE_RATE, None, mel=mel))
        return transcribe_samples(
            model, collator, samples, max_new_tokens, num_beams, ctc_weight=ctc_weight
        )

    return decode


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "transcribe",
        help="transcribe audio files of any length with a trained model",
        description=(
            "Transcribe audio files (any format soundfile reads, any rate, any channels, any "
            "length). Audio over 30 s is cut into 30 s windows overlapping by --overlap seconds "
            "and the texts are joined at their shared words."
        ),
    )
    add_model_source(p)
    p.add_argument("files", nargs="+", help="audio files")
    p.add_argument("--overlap", type=float, default=5.0, help="window overlap in seconds")
    p.add_argument("--max-new-tokens", type=int, default=128, help="per 30 s window")
    p.add_argument("--beams", type=int, default=1)
    p.add_argument(
        "--ctc-weight",
        type=float,
        default=0.0,
        help="joint CTC/LLM decoding weight in [0, 1] for runs trained with train.ctc_weight",
    )
    p.add_argument("--batch-size", type=int, default=8, help="windows decoded together")
    p.add_argument("--json", action="store_true", help="JSON lines {file, seconds, text}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from audio_llm.audio import load_audio
    from audio_llm.export import load_for_inference

    audio = {path: load_audio(path) for path in args.files}  # bad files fail before the model loads
    model = load_for_inference(args.run, args.export, device=args.device)
    decode = model_decoder(model, args.max_new_tokens, args.beams, args.ctc_weight)
    for path, samples in audio.items():
        text = transcribe_audio(decode, samples, args.overlap, args.batch_size)
        seconds = len(samples) / SAMPLE_RATE
        if args.json:
            print(json.dumps({"file": str(Path(path)), "seconds": round(seconds, 3), "text": text}))
        else:
            print(f"{path}\t{text}")
    return 0
