"""Which shards exist (from `index.json`) and which rank and worker reads which, per epoch.

Every rank computes the same plan from the index alone, with no communication: shards are
shuffled by (seed, epoch) and dealt to (rank, worker) slots round-robin. Each worker then gets a
batch quota so that every rank yields the same number of batches per epoch; the few samples that
do not fit (the remainder) are dropped and reported. Unequal counts would leave the ranks with more
data waiting forever in a collective at the end of the epoch.

With a token budget (`max_batch_seconds`) a slot's quota is `data.bucket.estimate_batches` of its
shards (a generous estimate from samples and seconds); the stream splits batches to meet it and
counts what a quota cannot hold (`audio_llm.data.stream`).
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from braceexpand import braceexpand

from audio_llm.data.bucket import estimate_batches
from audio_llm.errors import AudioLLMError

INDEX_NAME = "index.json"
FORMAT_VERSION = 1
PAYLOADS = {"audio": "flac", "mel": "mel.npy", "encoder": "enc.npy"}


@dataclass(frozen=True)
class ShardInfo:
    url: str
    name: str
    samples: int
    seconds: float
    sha256: str = ""


@dataclass
class ShardSet:
    """Shard URLs joined with their index entries."""

    shards: list[ShardInfo]
    index: dict
    source: str

    @property
    def mode(self) -> str:
        return self.index["mode"]

    @property
    def payload(self) -> str:
        return PAYLOADS[self.mode]

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @classmethod
    def open(cls, spec: str, index_path: str = "") -> ShardSet:
        """`spec`: a packed folder, its index.json, or WebDataset URLs (brace patterns, `pipe:`
        commands; several joined with `::`) whose index.json is `index_path`."""
        if not spec:
            raise AudioLLMError("no shards given: set data.train_shards (a packed folder)")
        path = Path(spec)
        if path.is_dir() or path.name == INDEX_NAME:
            folder = path if path.is_dir() else path.parent
            index = read_index(folder / INDEX_NAME)
            shards = [
                ShardInfo(
                    str(folder / e["name"]), e["name"], int(e["samples"]), float(e["seconds"])
                )
                for e in index["shards"]
            ]
            missing = [s.url for s in shards if not Path(s.url).is_file()]
            if missing:
                raise AudioLLMError(
                    f"{len(missing)} shard(s) listed in {folder / INDEX_NAME} are missing, "
                    f"e.g. {missing[0]}"
                )
            return cls(shards, index, spec)
        plain_path = not any(c in spec for c in "{}:") and not spec.startswith("pipe:")
        if plain_path and not path.exists():
            raise AudioLLMError(f"shards {spec!r}: no such file or folder")
        urls = [u for part in spec.split("::") for u in braceexpand(part.strip())]
        if not index_path:
            local = Path(urls[0]).parent / INDEX_NAME
            if urls[0].startswith("pipe:") or not local.is_file():
                raise AudioLLMError(
                    f"shards {spec!r} need their index.json: set data.train_index / eval_index"
                )
            index_path = str(local)
        index = read_index(Path(index_path))
        by_name = {e["name"]: e for e in index["shards"]}
        shards = []
        for url in urls:
            name = next(
                (n for n in by_name if re.search(rf"(^|[/\s]){re.escape(n)}(\s|$)", url)), None
            )
            if name is None:
                raise AudioLLMError(f"shard {url!r} is not listed in {index_path}")
            shards.append(_info(url, by_name[name]))
        return cls(shards, index, spec)


def _info(url: str, entry: dict) -> ShardInfo:
    return ShardInfo(
        url, entry["name"], int(entry["samples"]), float(entry["seconds"]), entry.get("sha256", "")
    )


def read_index(path: Path) -> dict:
    """Load and sanity-check an index.json written by `audio-llm pack`."""
    path = Path(path)
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise AudioLLMError(
            f"{path}: no index.json (is {path.parent} a folder made by `audio-llm pack`?)"
        ) from exc
    except json.JSONDecodeError as exc:
        raise AudioLLMError(f"{path}: not valid JSON ({exc.msg})") from exc
    if index.get("format_version") != FORMAT_VERSION:
        raise AudioLLMError(
            f"{path}: format_version {index.get('format_version')!r}, this audio_llm reads "
            f"{FORMAT_VERSION}; repack with this version"
        )
    if index.get("mode") not in PAYLOADS or not isinstance(index.get("shards"), list):
        raise AudioLLMError(f"{path}: missing or unknown 'mode' / 'shards'")
    if index["mode"] != "audio" and not isinstance(index.get("features"), dict):
        raise AudioLLMError(f"{path}: mode {index['mode']} needs the 'features' settings")
    if index["mode"] == "encoder" and not isinstance(index.get("encoder"), dict):
        raise AudioLLMError(f"{path}: mode encoder needs the 'encoder' identity")
    return index


@dataclass
class EpochPlan:
    """Shards and batch quota of every (rank, worker) slot for one epoch."""

    epoch: int
    assignments: dict[tuple[int, int], list[ShardInfo]]
    quotas: dict[tuple[int, int], int]
    batches_per_rank: int
    dropped: dict[int, int] = field(default_factory=dict)  # rank -> samples left out
    max_batch_seconds: float = 0.0

    def describe(self, rank: int) -> str:
        if self.max_batch_seconds > 0:
            return (
                f"epoch {self.epoch}: {self.batches_per_rank} batches per rank of at most "
                f"{self.max_batch_seconds:g} s of padded audio; samples beyond a worker's quota "
                "are counted as left_out_over_quota"
            )
        return (
            f"epoch {self.epoch}: {self.batches_per_rank} batches per rank; rank {rank} leaves "
            f"out {self.dropped.get(rank, 0)} sample(s) so every rank has the same count"
        )


def plan_epoch(
    shards: list[ShardInfo],
    world_size: int,
    num_workers: int,
    batch_size: int,
    seed: int,
    epoch: int,
    max_batch_seconds: float = 0.0,
) -> EpochPlan:
    """Deal shards to (rank, worker) slots and give each slot a batch quota (see module doc)."""
    workers = max(num_workers, 1)
    slots = world_size * workers
    if len(shards) < slots:
        raise AudioLLMError(
            f"{len(shards)} shard(s) for {world_size} rank(s) x {workers} loader worker(s): every "
            f"worker needs at least one shard. Repack with a smaller --max-samples (>= {slots} "
            "shards) or lower data.num_workers"
        )
    order = list(shards)
    random.Random(f"shards:{seed}:{epoch}").shuffle(order)
    assignments: dict[tuple[int, int], list[ShardInfo]] = {
        (r, w): [] for r in range(world_size) for w in range(workers)
    }
    for i, shard in enumerate(order):
        assignments[(i % world_size, (i // world_size) % workers)].append(shard)

    full = {slot: _batches(sl, batch_size, max_batch_seconds) for slot, sl in assignments.items()}
    per_rank = min(sum(full[(r, w)] for w in range(workers)) for r in range(world_size))
    if per_rank == 0:
        raise AudioLLMError(
            f"{sum(s.samples for s in shards)} samples cannot give every rank one batch of "
            f"{batch_size}: lower data.batch_size or add data"
        )
    quotas = dict(full)
    dropped = {}
    for r in range(world_size):
        excess = sum(quotas[(r, w)] for w in range(workers)) - per_rank
        while excess > 0:  # trim the fullest worker first, so workers stay balanced
            w = max(range(workers), key=lambda w: (quotas[(r, w)], -w))
            quotas[(r, w)] -= 1
            excess -= 1
        samples = sum(s.samples for w in range(workers) for s in assignments[(r, w)])
        # with a budget, batch sizes vary: the stream counts what it leaves out instead
        dropped[r] = 0 if max_batch_seconds > 0 else samples - per_rank * batch_size
    return EpochPlan(epoch, assignments, quotas, per_rank, dropped, max_batch_seconds)


def _batches(shards: list[ShardInfo], batch_size: int, max_batch_seconds: float) -> int:
    """Batches a slot can fill: its full batches, or with a budget the estimate (<= its samples)."""
    samples = sum(s.samples for s in shards)
    if max_batch_seconds <= 0:
        return samples // batch_size
    estimate = sum(
        estimate_batches(
            s.samples, s.seconds, batch_size=batch_size, max_batch_seconds=max_batch_seconds
        )
        for s in shards
    )
    return min(samples, math.ceil(estimate))
