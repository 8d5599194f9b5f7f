"""Rebuild shards/sample/audio: 24 short English sentences spoken by espeak-ng (mode audio).

    python shards/make_samples.py [--out shards/sample/audio]

The sentences use only words of audio_llm/assets/words.txt, so the tiny tokenizer covers them.
espeak-ng writes 22.05 kHz WAV; `audio-llm pack` resamples to 16 kHz like any other input. The same
espeak-ng version gives the same shards byte for byte.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from audio_llm.cli import main as audio_llm_main

SENTENCES = [
    "the cat slept near the window",
    "my brother bought new bread today",
    "she walked along the river in the morning",
    "we want hot tea and milk please",
    "the old man opened the red door",
    "a small bird sang in the garden",
    "they found a golden key under the table",
    "the train to the city leaves at seven",
    "her sister reads a book every night",
    "the dog ran across the green field",
    "please close the window before the storm",
    "he paid with a silver coin at the market",
    "the boy and the girl played in the snow",
    "our teacher wrote a long letter",
    "the ship moved into the harbour",
    "i like warm soup on a cold day",
    "the farmer keeps sheep and a goat",
    "a bright moon was over the quiet town",
    "you can find the map in the blue bag",
    "the baker cooked cake with honey and butter",
    "my friend is tired after the long week",
    "the queen has a castle on a hill",
    "we will wait at the station tomorrow",
    "the wind was loud and the sky was dark",
]
VOICES = ["en-us", "en-gb+f3"]  # a male US and a female British voice
SPEEDS = [180, 170]  # words per minute


def synthesise(folder: Path) -> Path:
    """Speak every sentence into folder/NNN.wav and write folder/manifest.jsonl."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise SystemExit("espeak-ng not found: apt-get install espeak-ng")
    rows = []
    for i, text in enumerate(SENTENCES):
        voice, speed = VOICES[i % len(VOICES)], SPEEDS[i % len(SPEEDS)]
        wav = folder / f"{i:03d}.wav"
        subprocess.run([espeak, "-v", voice, "-s", str(speed), "-w", str(wav), text], check=True)
        speaker = voice.replace("+", "-")
        rows.append(
            {
                "audio_filepath": wav.name,
                "text": text,
                "id": f"espeak-{i:03d}",
                "speaker": speaker,
                "lang": "en",
            }
        )
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "sample" / "audio"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = synthesise(Path(tmp))
        return audio_llm_main(
            [
                "pack",
                "--input",
                str(manifest),
                "--out",
                args.out,
                "--max-samples",
                "6",
                "--overwrite",
                "--quiet",
            ]
        )


if __name__ == "__main__":
    sys.exit(main())
