"""Tiny packed corpora shared by the data tests and their integration tests: tone clips with word
transcripts, packed as audio, mel and encoder shards, and the stage-1 model that reads them.

The fixtures are module-scoped: each test module packs and builds its own. tests/data/conftest.py
makes them available to every test under tests/data/.
"""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from audio_llm.config import DataConfig
from audio_llm.data import build_loader, layout_of
from audio_llm.data.loader import ShardLoader
from audio_llm.model.build import build_audio_llm
from audio_llm.model.tiny import vocabulary
from audio_llm.pack.writer import PackOptions, pack

N_CLIPS = 40


def write_corpus(folder: Path) -> Path:
    """N_CLIPS tone clips of 0.5-3 s with short word transcripts, as a JSONL manifest."""
    rng = random.Random(0)
    words = vocabulary()
    lines = []
    for i in range(N_CLIPS):
        seconds = rng.uniform(0.5, 3.0)
        t = np.arange(int(seconds * 16000)) / 16000
        audio = 0.3 * np.sin(2 * np.pi * (150 + 10 * i) * t) * np.hanning(len(t))
        sf.write(folder / f"clip{i:02d}.wav", audio.astype(np.float32), 16000)
        text = " ".join(rng.choices(words, k=rng.randint(2, 6)))
        lines.append(
            json.dumps({"audio_filepath": f"clip{i:02d}.wav", "text": text, "id": f"u{i:02d}"})
        )
    manifest = folder / "train.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


@pytest.fixture(scope="module")
def shard_dirs(tmp_path_factory, tiny_models) -> dict[str, Path]:
    """The N_CLIPS corpus packed in each mode ("audio", "mel", "encoder"), 5 samples a shard."""
    root = tmp_path_factory.mktemp("data")
    manifest = write_corpus(root)
    dirs = {}
    for mode in ("audio", "mel", "encoder"):
        options = PackOptions(
            out=root / mode,
            mode=mode,
            max_samples=5,
            encoder=tiny_models["whisper"] if mode != "audio" else None,
            quiet=True,
        )
        pack([manifest], options)
        dirs[mode] = root / mode
    return dirs


@pytest.fixture(scope="module")
def model(model_config):
    """The stage-1 model on the tiny checkpoints (what `layout_of` reads)."""
    return build_audio_llm(model_config)


# -- length bucketing: clips whose lengths differ enough for a budget to bind -----------------
BUCKET_CLIPS = 48


@pytest.fixture(scope="module")
def bucket_shards(tmp_path_factory) -> Path:
    """BUCKET_CLIPS tone clips of 0.5-12 s (so a 30 s budget binds), 4 per shard, live audio."""
    root = tmp_path_factory.mktemp("bucket")
    rng = random.Random(0)
    words = vocabulary()
    lines = []
    for i in range(BUCKET_CLIPS):
        seconds = rng.choice([rng.uniform(0.5, 2.0), rng.uniform(2.0, 12.0)])
        t = np.arange(int(seconds * 16000)) / 16000
        audio = 0.3 * np.sin(2 * np.pi * (150 + 10 * i) * t) * np.hanning(len(t))
        sf.write(root / f"c{i:02d}.wav", audio.astype(np.float32), 16000)
        text = " ".join(rng.choices(words, k=max(1, round(seconds * rng.uniform(1.0, 2.5)))))
        lines.append(json.dumps({"audio_filepath": f"c{i:02d}.wav", "text": text, "id": f"u{i}"}))
    manifest = root / "train.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    pack([manifest], PackOptions(out=root / "audio", mode="audio", max_samples=4, quiet=True))
    return root / "audio"


def one_epoch(
    cfg: DataConfig, model, shards: Path, rank: int = 0, world: int = 1
) -> tuple[list[dict], ShardLoader]:
    """One epoch of `rank`'s batches from `shards`, and the loader that yielded them."""
    loader = build_loader(cfg, layout_of(model), spec=str(shards), rank=rank, world_size=world)
    batches = [b for _, b in zip(range(loader.batches_per_epoch), loader, strict=False)]
    assert loader.epoch == 0 and sum(loader.consumed) == loader.batches_per_epoch
    return batches, loader
