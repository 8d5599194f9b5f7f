"""The named stages the training and evaluation pipelines are composed of (`data.stream`).

Each stage is a generator over the previous one's output, so a sample is read, parsed and
tokenised only when a later stage asks for it. Before decoding a sample travels as an `Item` (its
tar members, parsed json, valid frames, token ids, and which read over the shards it came from);
a batch travels as a `Batch` (its items, then its decoded samples, then the collated tensors).
Every random choice is seeded from a `Slot` (seed, epoch, rank, worker), never from timing.

Sample stages: `read_shards` -> `parse` -> `tokenize` -> `require_some`.
Ordering stages: `shuffle` (+ `fixed_batches`), or `bucketed_batches`.
Batch stages: `number` -> `count_repeats` -> `decode` -> `collate` -> `augment` -> `report`.
Evaluation: `read_in_order` -> `deal` -> `parse` -> `decode_each`.
Problems (bad shards, bad samples) are counted and named by a `Problems`, never fatal.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import json
import logging
import random
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import webdataset as wds

from audio_llm.audio.frames import (
    ENCODER_DOWNSAMPLE,
    HOP_LENGTH,
    MEL_FRAMES_PER_WINDOW,
    SAMPLE_RATE,
    mel_frames,
)
from audio_llm.data.augment import SpecAugment
from audio_llm.data.bucket import bucket_batches
from audio_llm.data.collate import AudioSample, Collator
from audio_llm.data.layout import AudioLayout
from audio_llm.data.shards import PAYLOADS, ShardInfo, ShardSet
from audio_llm.errors import AudioLLMError
from audio_llm.model.prompts import Example

log = logging.getLogger("audio_llm.data")
LOG_FIRST = 5  # problems named per reason before the log only counts every LOG_EVERY-th
LOG_EVERY = 100


class Problems:
    """Counts problems by reason and logs them, rate limited, naming shard and sample."""

    def __init__(self, quiet: bool = False) -> None:
        """`quiet`: count without logging (for problems another process reports)."""
        self.counts: Counter = Counter()
        self.quiet = quiet

    def __call__(self, reason: str, where: str, detail: str = "", count: int = 1) -> None:
        self.counts[reason] += count
        n = self.counts[reason]
        if self.quiet:
            return
        if n - count < LOG_FIRST or n // LOG_EVERY > (n - count) // LOG_EVERY:
            log.warning("%s: %s%s (%d so far)", reason, where, f": {detail}" if detail else "", n)


@dataclass(frozen=True)
class Slot:
    """A (rank, worker)'s place in an epoch; every random choice of its stages comes from here."""

    seed: int
    epoch: int
    rank: int
    worker: int

    def key(self, stage: str, *more: int) -> str:
        """`stage:seed:epoch:rank:worker[:more...]`, the seed string of one stage."""
        parts = (stage, self.seed, self.epoch, self.rank, self.worker, *more)
        return ":".join(str(part) for part in parts)

    def rng(self, stage: str, *more: int) -> random.Random:
        """The stage's own `random.Random`, seeded from its `key`."""
        return random.Random(self.key(stage, *more))

    def shared_rng(self, stage: str, *more: int) -> random.Random:
        """A `random.Random` that every rank's slot of this worker builds alike: seeded like
        `rng` without the rank (for choices the ranks must make together)."""
        parts = (stage, "shared", self.seed, self.epoch, self.worker, *more)
        return random.Random(":".join(str(part) for part in parts))

    def numpy_rng(self, stage: str, *more: int) -> np.random.Generator:
        """The stage's own numpy generator, seeded from the sha256 of its `key`."""
        digest = hashlib.sha256(self.key(stage, *more).encode()).digest()
        return np.random.default_rng(int.from_bytes(digest[:8]))


@dataclass(frozen=True)
class Item:
    """One sample between reading and decoding: what the cheap stages know of it.

    `raw`: the tar members read (`__key__`, `__url__`, `json`, the payload's bytes); `meta`: the
    parsed json; `frames`: valid frames after the 30 s policy (mel frames, or encoder frames for
    encoder shards); `pass_no`: the read over the worker's shards it came from (0: the first);
    `example`: its token ids and labels (set by `tokenize`); `source`: the corpus of a weighted
    mixture it came from (`data.mixture`; 0 otherwise)."""

    raw: dict
    meta: dict
    frames: int
    pass_no: int = 0
    example: Example | None = None
    source: int = 0

    @property
    def where(self) -> str:
        """`shard url:sample key`, as problems name a sample."""
        return f"{self.raw['__url__']}:{self.raw['__key__']}"


@dataclass
class Batch:
    """One batch of a worker's epoch as it moves through the batch stages.

    `replay`: consumed before a restart, so only counted (the cheap stages replay it to keep the
    order), never decoded or yielded; `samples` (`decode`) and `out` (`collate`) fill in."""

    index: int
    items: list[Item]
    replay: bool = False
    samples: list[AudioSample] | None = None
    out: dict | None = None


# -- reading and parsing -------------------------------------------------------------------------
class _HashingReader(io.RawIOBase):
    """Passes a stream through while hashing it, so a shard is checked as it is read."""

    def __init__(self, stream: io.IOBase) -> None:
        self.stream, self.digest, self.size = stream, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:
        data = self.stream.read(len(buffer))
        self.digest.update(data)
        self.size += len(data)
        buffer[: len(data)] = data
        return len(data)

    def drain(self) -> None:
        while self.stream.read(1 << 20):
            pass


def read_shard(shard: ShardInfo, payload: str, problems: Problems) -> Iterator[dict]:
    """Raw samples `{"__key__", "__url__", "json", payload}` (bytes) of one tar shard, in order.

    Only the `.json` and payload members are read; others are never decoded, nothing is
    unpickled. A corrupt or truncated shard ends early; its incomplete last sample is dropped.
    Reading ends with the shard's sha256 and sample count checked against the index, so damage
    that tar itself does not notice (a cut at a member boundary) is still counted and named.
    """
    wanted = {"json", payload}
    current: dict | None = None
    count = 0
    try:
        with wds.gopen(shard.url, "rb") as raw_stream:
            reader = _HashingReader(raw_stream)
            # 64 KiB reads instead of tarfile's 10 KiB records: fewer read and hash calls.
            with tarfile.open(fileobj=reader, mode="r|*", bufsize=64 * 1024) as tar:
                for member in tar:
                    if not member.isreg():
                        continue
                    folder, _, base = member.name.rpartition("/")
                    stem, dot, suffix = base.partition(".")
                    if not dot:
                        continue
                    key = f"{folder}/{stem}" if folder else stem
                    if current is None or current["__key__"] != key:
                        if current is not None:
                            count += 1
                            yield current
                        current = {"__key__": key, "__url__": shard.url}
                    if suffix in wanted:
                        current[suffix] = tar.extractfile(member).read()
                    else:
                        problems("ignored_member", f"{shard.url}:{member.name}", "not read")
            if current is not None:
                count += 1
                yield current
            reader.drain()
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        problems("corrupt_shard", shard.url, f"{type(exc).__name__}: {exc}; rest of shard skipped")
        return
    if shard.sha256 and reader.digest.hexdigest() != shard.sha256:
        problems(
            "corrupt_shard", shard.url, f"sha256 differs from the index ({count} samples read)"
        )
    elif count != shard.samples:
        problems("corrupt_shard", shard.url, f"{count} samples, the index lists {shard.samples}")


def read_shards(
    shards: list[ShardInfo], payload: str, rng: random.Random, problems: Problems
) -> Iterator[dict]:
    """Stage: one read over `shards` in an order shuffled by `rng`: their raw samples."""
    order = list(shards)
    rng.shuffle(order)
    for shard in order:
        yield from read_shard(shard, payload, problems)


def frames_of(meta: dict, mode: str) -> int:
    """Valid frames of a sample from its json: mel frames (audio, mel) or encoder frames."""
    if mode == "audio":
        samples = meta.get("num_samples") or round(float(meta["duration"]) * SAMPLE_RATE)
        return mel_frames(int(samples))
    return int(meta["frames"])


def parse_sample(
    raw: dict, mode: str, payload: str, long_audio: str, problems: Problems, pass_no: int = 0
) -> Item | None:
    """The item of a raw sample: its json and valid frames after the 30 s policy (`long_audio`:
    skip or truncate); None, counted, when it is incomplete, its json is bad, or it is skipped."""
    where = f"{raw['__url__']}:{raw['__key__']}"
    if "json" not in raw or payload not in raw:
        problems("incomplete_sample", where, f"needs .json and .{payload}")
        return None
    try:
        meta = json.loads(raw["json"])
        frames = frames_of(meta, mode)
        if not isinstance(meta["text"], str):
            raise TypeError("text is not a string")
    except (ValueError, KeyError, TypeError) as exc:
        problems("bad_json", where, repr(exc))
        return None
    limit = MEL_FRAMES_PER_WINDOW // (ENCODER_DOWNSAMPLE if mode == "encoder" else 1)
    if frames > limit:
        if long_audio == "skip":
            problems("too_long_audio", where, f"{frames} frames > {limit}")
            return None
        frames = limit
        problems("truncated_audio", where)
    return Item(raw, meta, frames, pass_no)


def parse(
    raws: Iterable[dict],
    mode: str,
    payload: str,
    long_audio: str,
    problems: Problems,
    pass_no: int = 0,
) -> Iterator[Item]:
    """Stage: raw samples -> items (`parse_sample`), leaving out what it refuses."""
    for raw in raws:
        item = parse_sample(raw, mode, payload, long_audio, problems, pass_no)
        if item is not None:
            yield item


def tokenize(
    items: Iterable[Item], layout: AudioLayout, mode: str, max_length: int, problems: Problems
) -> Iterator[Item]:
    """Stage: each item with its token ids and labels; one longer than `max_length` tokens is
    left out and counted (`over_max_length`), never a crashed step."""
    for item in items:
        example = layout.example(item.meta, item.frames, mode)
        if len(example.input_ids) > max_length:
            problems("over_max_length", item.where, f"> {max_length} tokens")
            continue
        yield replace(item, example=example)


def require_some(items: Iterable[Item], error: str) -> Iterator[Item]:
    """Stage: the items, passed through; `AudioLLMError(error)` at the end if there were none."""
    count = 0
    for item in items:
        count += 1
        yield item
    if count == 0:
        raise AudioLLMError(error)


# -- ordering into batches -----------------------------------------------------------------------
def shuffle(items: Iterable, rng: random.Random, buffer_size: int) -> Iterator:
    """Stage: a buffer shuffle (each new item takes the place of a random buffered one, which
    goes out); the buffer is shuffled and emptied at the end."""
    buffer: list = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        i = rng.randrange(len(buffer))
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def shuffled_passes(
    passes: Callable[[int], Iterable[Item]], rng: random.Random, buffer_size: int
) -> Iterator[Item]:
    """Stage: `shuffle` over pass after pass (`passes(pass_no)`), endless. Each pass is drained
    before the next starts, so items repeat only once every item of the shards has been used."""
    for pass_no in itertools.count():
        yield from shuffle(passes(pass_no), rng, buffer_size)


def fixed_batches(items: Iterator[Item], batch_size: int, quota: int) -> Iterator[list[Item]]:
    """Stage: exactly `quota` batches of `batch_size` items."""
    for _ in range(max(quota, 0)):
        yield [next(items) for _ in range(batch_size)]


def bucketed_batches(
    passes: Callable[[int], Iterable[Item]],
    rng: random.Random,
    quota: int,
    problems: Problems,
    *,
    batch_size: int,
    max_batch_seconds: float,
    buffer_size: int,
    frame_seconds: float,
    expected_items: int,
    where: str,
    order: Callable[[int, int], random.Random] | None = None,
) -> Iterator[list[Item]]:
    """Stage: exactly `quota` length-bucketed batches (`bucket.bucket_batches`), pass after pass.
    `order(pass, buffer)`: the rank-shared generator that orders a buffer's batches, if any.

    With a budget (`max_batch_seconds`) the first pass is split to keep pace with the quota; a
    pass that still needs more batches is read to its end once the quota is met, and what it
    could not hold is counted as `left_out_over_quota` at `where` (see `data.stream`)."""
    if quota <= 0:
        return
    budget = max_batch_seconds > 0
    sent = 0
    for pass_no in itertools.count():
        read = _Counted(passes(pass_no))
        batches = bucket_batches(
            read,
            lambda item: item.frames * frame_seconds,
            # audio frames and LLM positions, each against its buffer mean: both paddings
            # cost compute (the encoder's once it runs varlen), so neither is left to chance
            sort_key=lambda item: (item.frames, len(item.example.input_ids)),
            batch_size=batch_size,
            max_batch_length=max_batch_seconds,
            buffer_size=buffer_size,
            rng=rng,
            quota=quota if pass_no == 0 and budget else 0,
            expected_items=expected_items,
            order=None if order is None else functools.partial(order, pass_no),
        )
        used = 0
        for batch in batches:
            sent += 1
            used += len(batch)
            if sent == quota:
                if pass_no == 0 and budget:
                    left = read.drain() - used
                    if left:
                        detail = f"{left} sample(s) beyond the quota of {quota} batches"
                        problems("left_out_over_quota", where, detail, count=left)
                yield batch
                return
            yield batch


class _Counted:
    """Passes items through, counting them; `drain()` reads the rest and returns the total."""

    def __init__(self, items: Iterable) -> None:
        self.items, self.count = iter(items), 0

    def __iter__(self) -> Iterator:
        for item in self.items:
            self.count += 1
            yield item

    def drain(self) -> int:
        self.count += sum(1 for _ in self.items)
        return self.count


# -- batch stages --------------------------------------------------------------------------------
def number(batches: Iterable[list[Item]], skip: int) -> Iterator[Batch]:
    """Stage: batches numbered in the worker's epoch; the first `skip` (consumed before a
    restart) are marked `replay`."""
    for index, items in enumerate(batches):
        yield Batch(index, items, replay=index < skip)


def count_repeats(batches: Iterable[Batch], problems: Problems) -> Iterator[Batch]:
    """Stage: counts items from a second or later read (`repeated_to_fill_quota`)."""
    for batch in batches:
        for item in batch.items:
            if item.pass_no:
                problems("repeated_to_fill_quota", item.where)
        yield batch


def decode_sample(item: Item, mode: str, pcm16: bool = False) -> AudioSample:
    """Decode the payload explicitly by mode (FLAC or `.npy` without pickle) and check its size.

    `pcm16`: audio as int16 PCM, not float32 (`Collator.features_on_device`)."""
    raw, meta, frames = item.raw, item.meta, item.frames
    data = raw[PAYLOADS[mode]]
    sample = AudioSample(
        key=raw["__key__"],
        text=meta["text"],
        prompt=meta.get("prompt"),
        seconds=float(meta.get("duration", 0.0)),
        example=item.example,
    )
    if mode == "audio":
        from audio_llm.audio.io import decode_flac

        audio = decode_flac(data, raw["__key__"], pcm16)
        sample.audio = audio[: frames * HOP_LENGTH + HOP_LENGTH - 1]
        if len(sample.audio) // HOP_LENGTH != frames:
            raise ValueError(f"{len(sample.audio)} samples, json says {frames} mel frames")
        return sample
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if array.ndim != 2:
        raise ValueError(f"payload has shape {array.shape}, expected 2 dimensions")
    if mode == "mel":
        sample.mel = array[:, :frames]
        got = sample.mel.shape[1]
    else:
        sample.enc = array[:frames]
        got = sample.enc.shape[0]
    if got != frames:
        raise ValueError(f"payload has shape {array.shape}, json says {frames} frames")
    return sample


def decode(batches: Iterable[Batch], mode: str, pcm16: bool, problems: Problems) -> Iterator[Batch]:
    """Stage: each batch's samples decoded; an undecodable sample is counted and replaced by a
    good one of the same batch (or of the last batch), so the batch count (and the resume
    arithmetic) never depends on decoding."""
    last_good: list[AudioSample] = []
    for batch in batches:
        if not batch.replay:
            decoded: list[AudioSample | None] = []
            for item in batch.items:
                try:
                    decoded.append(decode_sample(item, mode, pcm16))
                except Exception as exc:  # any payload problem: count, name, replace
                    problems("undecodable", item.where, repr(exc))
                    decoded.append(None)
            good = [s for s in decoded if s is not None] or last_good
            if not good:
                url = batch.items[0].raw["__url__"]
                raise AudioLLMError(f"no decodable sample in a batch from {url}")
            last_good = good
            batch.samples = [s if s is not None else good[0] for s in decoded]
        yield batch


def collate(batches: Iterable[Batch], collator: Collator) -> Iterator[Batch]:
    """Stage: each batch's samples padded into tensors (`Collator`)."""
    for batch in batches:
        if not batch.replay:
            batch.out = collator(batch.samples)
        yield batch


def augment(batches: Iterable[Batch], masks: SpecAugment, slot: Slot) -> Iterator[Batch]:
    """Stage: SpecAugment masks on each batch's features, seeded per batch (`slot`, index), so
    a resumed run masks the batches it replays exactly as the first run did."""
    for batch in batches:
        if not batch.replay:
            rng = slot.numpy_rng("augment", batch.index)
            # features' own frame rate: log-mel 10 ms, encoder frames 20 ms
            seconds = HOP_LENGTH / SAMPLE_RATE
            seconds *= ENCODER_DOWNSAMPLE if "audio_embeds" in batch.out else 1
            batch.out["stats"]["masked_frames"] = masks(batch.out, seconds, rng)
        yield batch


def report(batches: Iterable[Batch], problems: Problems, slot: Slot) -> Iterator[dict]:
    """Stage: the collated batches, each tagged `stream` with its position (epoch, worker,
    index) and the problems counted since the batch before; replayed batches end here."""
    reported: Counter = Counter()
    for batch in batches:
        if batch.replay:
            reported = Counter(problems.counts)  # already counted before the restart
            continue
        delta = problems.counts - reported
        reported = Counter(problems.counts)
        batch.out["stream"] = {
            "epoch": slot.epoch,
            "worker": slot.worker,
            "index": batch.index,
            "problems": dict(delta),
        }
        yield batch.out


# -- evaluation ----------------------------------------------------------------------------------
def read_in_order(shards: ShardSet, rank: int, world: int, problems: Problems) -> Iterator[dict]:
    """Stage: every shard's raw samples, in index order. A shard's own problems (corrupt,
    unknown members) are counted by rank `shard number % world` alone, or `world` ranks reading
    the same shard would count each of them once."""
    others = Problems(quiet=True)  # what other ranks count (and log)
    for shard_no, shard in enumerate(shards.shards):
        counted = problems if shard_no % world == rank else others
        yield from read_shard(shard, shards.payload, counted)


def deal(raws: Iterable[dict], rank: int, world: int) -> Iterator[dict]:
    """Stage: this rank's share of the samples (sample i goes to rank i % world)."""
    for index, raw in enumerate(raws):
        if index % world == rank:
            yield raw


def decode_each(items: Iterable[Item], mode: str, problems: Problems) -> Iterator[AudioSample]:
    """Stage: each item decoded (float32 audio); an undecodable one is counted and left out."""
    for item in items:
        try:
            sample = decode_sample(item, mode)
        except Exception as exc:  # counted and named, never fatal
            problems("undecodable", item.where, repr(exc))
            continue
        yield sample
