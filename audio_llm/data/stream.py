"""The streaming dataset: named stages from tar shards to collated batches, resumable exactly.

Stages, per (rank, worker), all seeded from (seed, epoch, rank, worker):
  read shards (only the `.json` and payload members; others are never decoded, nothing is
  unpickled) -> parse json -> length policy (30 s window, max_length) -> shuffle buffer ->
  batches of `batch_size` up to the worker's quota -> decode payloads -> collate.
Payloads are decoded only for batches that are yielded, so resuming skips the batches already
consumed by replaying the cheap stages without decoding audio.

Length bucketing (`bucket_by_length`) replaces the shuffle buffer and the batching: the same
buffer (`shuffle_buffer` samples, so memory does not grow) is sorted and cut by
`data.bucket.bucket_batches`. The sort key joins the sample's audio frames and its LLM length
(audio positions + prompt + transcript), both known from the json before decoding: sorting by
the LLM length alone left ~7% of encoder frames padded at stack 8, by seconds alone ~7% of LLM
positions; the joint key keeps both near 4%. A budget (`max_batch_seconds`) caps batch size x
longest clip in seconds of audio.

Lockstep. Every rank must run the same number of steps per epoch, and a restart must replay the
same batches, so the quota stays a number of batches per (rank, worker) computed from the index
alone on every rank (`plan_epoch`):
- fixed batches, bucketed or not: `samples // batch_size`, as before; bucketed batches are full
  (the buffer holds a short one back until the pass ends), the remainder is left out as before;
- a budget: `estimate_batches` of the slot's shards, generous on purpose (0-30% above the natural
  count on the mixes tried). The bucketing splits batches to keep pace, so a worker's first pass
  comes out as exactly its quota. Were the natural cut to need more batches (an estimate too low,
  or a quota trimmed so ranks match), the pass is read to its end once the quota is met and the
  samples it could not hold are counted as `left_out_over_quota`; they are read again next epoch.
In both modes a worker whose pass runs dry (skipped samples) fills its quota from the next pass,
counted as `repeated_to_fill_quota`. Batches depend only on (seed, epoch, rank, worker), never on
timing or on what other workers do, so the saved position below stays exact.

The position is (epoch, batches consumed per worker), kept by `ShardLoader` in the main process
from what the trainer actually received; a resumed run continues with the next unseen batch.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import random
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from audio_llm.audio.frames import (
    ENCODER_DOWNSAMPLE,
    HOP_LENGTH,
    MEL_FRAMES_PER_WINDOW,
    SAMPLE_RATE,
)
from audio_llm.data.augment import SpecAugment
from audio_llm.data.bucket import bucket_batches
from audio_llm.data.collate import AudioSample, Collator, frames_of
from audio_llm.data.shards import PAYLOADS, EpochPlan, ShardInfo, ShardSet, plan_epoch
from audio_llm.errors import AudioLLMError

log = logging.getLogger("audio_llm.data")
LOG_FIRST = 5  # problems named per reason before the log only counts every LOG_EVERY-th
LOG_EVERY = 100


class _Problems:
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


def read_shard(shard: ShardInfo, payload: str, problems: _Problems) -> Iterator[dict]:
    """Raw samples `{"__key__", "json", payload}` (bytes) of one tar shard, in order.

    A corrupt or truncated shard ends early; its incomplete last sample is dropped. Reading ends
    with the shard's sha256 and sample count checked against the index, so damage that tar itself
    does not notice (a cut at a member boundary) is still counted and named.
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


def parse_sample(
    raw: dict, mode: str, payload: str, long_audio: str, problems: _Problems
) -> tuple[dict, int] | None:
    """The json and valid frame count of a raw sample after the 30 s policy; None if skipped."""
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
    return meta, frames


def decode_sample(
    raw: dict, meta: dict, frames: int, mode: str, example=None, pcm16: bool = False
) -> AudioSample:
    """Decode the payload explicitly by mode (FLAC or `.npy` without pickle) and check its size.

    `pcm16`: audio as int16 PCM, not float32 (see `Collator.pcm16`)."""
    data = raw[PAYLOADS[mode]]
    sample = AudioSample(
        key=raw["__key__"],
        text=meta["text"],
        prompt=meta.get("prompt"),
        seconds=float(meta.get("duration", 0.0)),
        example=example,
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


class ShardStream(IterableDataset):
    """Batches for one rank; each DataLoader worker streams its own shards (see module doc)."""

    def __init__(
        self,
        shards: ShardSet,
        collator: Collator,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        long_audio: str = "skip",
        bucket_by_length: bool = False,
        max_batch_seconds: float = 0.0,
        augment: SpecAugment | None = None,
    ) -> None:
        if collator.mode != shards.mode:
            raise AudioLLMError(f"collator mode {collator.mode} != shard mode {shards.mode}")
        if max_batch_seconds > 0 and not bucket_by_length:
            raise AudioLLMError(
                "data.max_batch_seconds cuts batches from the length-sorted buffer: "
                "set data.bucket_by_length=true too"
            )
        augment = augment if augment is not None and augment.active else None
        if augment is not None and collator.pcm16:
            raise AudioLLMError(
                "data.time_masks/feature_masks mask features in the loader, but "
                "data.features_on=device sends waveforms: set data.features_on=loader"
            )
        self.shards = shards
        self.collator = collator
        self.augment = augment
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.num_workers = num_workers
        self.seed = seed
        self.shuffle_buffer = max(shuffle_buffer, 1)
        self.long_audio = long_audio
        self.bucket_by_length = bucket_by_length
        self.max_batch_seconds = max(max_batch_seconds, 0.0)
        # seconds of audio per valid frame: encoder frames are 2 mel frames
        self.frame_seconds = (
            HOP_LENGTH / SAMPLE_RATE * (ENCODER_DOWNSAMPLE if shards.mode == "encoder" else 1)
        )
        self.epoch = 0
        self.consumed: list[int] = [0] * max(num_workers, 1)
        self.plan(0)  # fail now, not in a worker: too few shards, too little data

    def plan(self, epoch: int) -> EpochPlan:
        return plan_epoch(
            self.shards.shards,
            self.world_size,
            self.num_workers,
            self.batch_size,
            self.seed,
            epoch,
            self.max_batch_seconds,
        )

    def set_position(self, epoch: int, consumed: list[int]) -> None:
        """Start the next iteration at `epoch`, skipping `consumed[w]` batches of worker w."""
        self.epoch, self.consumed = epoch, list(consumed)

    # -- stages -----------------------------------------------------------------------------
    def _pass(
        self, shards: list[ShardInfo], worker: int, pass_no: int, problems: _Problems
    ) -> Iterator[tuple[dict, dict, int]]:
        """One read over the worker's shards: (raw, meta, frames) that pass the length policy."""
        payload, mode = self.shards.payload, self.shards.mode
        order = list(shards)
        random.Random(f"pass:{self.seed}:{self.epoch}:{self.rank}:{worker}:{pass_no}").shuffle(
            order
        )
        usable = 0
        for shard in order:
            for raw in read_shard(shard, payload, problems):
                parsed = parse_sample(raw, mode, payload, self.long_audio, problems)
                if parsed is None:
                    continue
                meta, frames = parsed
                example = self.collator.encode(meta, frames)
                if example is None:
                    where = f"{shard.url}:{raw['__key__']}"
                    problems("over_max_length", where, f"> {self.collator.max_length} tokens")
                    continue
                usable += 1
                yield raw, {**meta, "_example": example, "_pass": pass_no}, frames
        if usable == 0:
            names = ", ".join(s.name for s in shards)
            raise AudioLLMError(f"rank {self.rank} worker {worker}: no usable sample in {names}")

    def _items(self, shards: list[ShardInfo], worker: int, problems: _Problems) -> Iterator:
        """Shuffled samples, pass after pass. Each pass is drained before the next starts, so
        samples repeat only once every sample of the worker's shards has been used."""
        rng = random.Random(f"shuffle:{self.seed}:{self.epoch}:{self.rank}:{worker}")
        pass_no = 0
        while True:
            yield from self._shuffled(self._pass(shards, worker, pass_no, problems), rng)
            pass_no += 1

    def _batches(
        self, shards: list[ShardInfo], worker: int, quota: int, problems: _Problems
    ) -> Iterator[list]:
        """Exactly `quota` batches of (raw, meta, frames) for this worker's epoch."""
        if quota <= 0:
            return
        if not self.bucket_by_length:
            items = self._items(shards, worker, problems)
            for _ in range(quota):
                yield [next(items) for _ in range(self.batch_size)]
            return
        rng = random.Random(f"bucket:{self.seed}:{self.epoch}:{self.rank}:{worker}")
        expected = sum(s.samples for s in shards)
        sent = 0
        for pass_no in itertools.count():
            read = _Counted(self._pass(shards, worker, pass_no, problems))
            batches = bucket_batches(
                read,
                lambda item: item[2] * self.frame_seconds,
                # audio frames and LLM positions, each against its buffer mean: both paddings
                # cost compute (the encoder's once it runs varlen), so neither is left to chance
                sort_key=lambda item: (item[2], len(item[1]["_example"].input_ids)),
                batch_size=self.batch_size,
                max_batch_length=self.max_batch_seconds,
                buffer_size=self.shuffle_buffer,
                rng=rng,
                quota=quota if pass_no == 0 and self.max_batch_seconds > 0 else 0,
                expected_items=expected,
            )
            used = 0
            for batch in batches:
                sent += 1
                used += len(batch)
                if sent == quota:
                    if pass_no == 0 and self.max_batch_seconds > 0:
                        left = read.drain() - used
                        if left:
                            where = f"rank {self.rank} worker {worker} epoch {self.epoch}"
                            detail = f"{left} sample(s) beyond the quota of {quota} batches"
                            problems("left_out_over_quota", where, detail, count=left)
                    yield batch
                    return
                yield batch

    def _shuffled(self, items: Iterator, rng: random.Random) -> Iterator:
        buffer: list = []
        for item in items:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(item)
                continue
            i = rng.randrange(len(buffer))
            yield buffer[i]
            buffer[i] = item
        rng.shuffle(buffer)
        yield from buffer

    def _collate(
        self,
        batch: list,
        problems: _Problems,
        last_good: list,
        rng: np.random.Generator | None = None,
    ) -> dict:
        """Decode and collate; an undecodable sample is replaced by a good one of the same
        batch, so the batch count (and resume arithmetic) never depends on decoding."""
        decoded: list[AudioSample | None] = []
        for raw, meta, frames in batch:
            try:
                sample = decode_sample(
                    raw, meta, frames, self.shards.mode, meta["_example"], self.collator.pcm16
                )
                decoded.append(sample)
            except Exception as exc:  # any payload problem: count, name, replace
                problems("undecodable", f"{raw['__url__']}:{raw['__key__']}", repr(exc))
                decoded.append(None)
        good = [s for s in decoded if s is not None] or last_good
        if not good:
            raise AudioLLMError(f"no decodable sample in a batch from {batch[0][0]['__url__']}")
        last_good[:] = good
        out = self.collator([s if s is not None else good[0] for s in decoded])
        if self.augment is not None:
            # features' own frame rate: log-mel 10 ms, encoder frames 20 ms
            seconds = HOP_LENGTH / SAMPLE_RATE
            seconds *= ENCODER_DOWNSAMPLE if "audio_embeds" in out else 1
            out["stats"]["masked_frames"] = self.augment(out, seconds, rng)
        return out

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        plan = self.plan(self.epoch)
        slot = (self.rank, worker)
        quota, skip = plan.quotas[slot], self.consumed[worker]
        if worker == 0 and self.rank == 0 and skip == 0:
            log.info(plan.describe(self.rank))
        problems = _Problems()
        batches = self._batches(plan.assignments[slot], worker, quota, problems)
        reported: Counter = Counter()
        last_good: list = []
        for index, batch in enumerate(batches):
            for raw, meta, _ in batch:
                if meta["_pass"]:
                    problems("repeated_to_fill_quota", f"{raw['__url__']}:{raw['__key__']}")
            if index < skip:
                reported = Counter(problems.counts)  # already counted before the restart
                continue
            rng = None
            if self.augment is not None:  # per batch, so a resumed run masks the same frames
                key = f"augment:{self.seed}:{self.epoch}:{self.rank}:{worker}:{index}".encode()
                rng = np.random.default_rng(int.from_bytes(hashlib.sha256(key).digest()[:8]))
            out = self._collate(batch, problems, last_good, rng)
            delta = problems.counts - reported
            reported = Counter(problems.counts)
            out["stream"] = {
                "epoch": self.epoch,
                "worker": worker,
                "index": index,
                "problems": dict(delta),
            }
            yield out


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


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # loader workers share the node's cores with the training ranks


class ShardLoader:
    """Endless batches, epoch after epoch, with an exact, saveable stream position.

    `state_dict()` is (epoch, batches consumed per worker, problem counts); `load_state_dict` in a
    new process makes the next batch the first one this position had not yet delivered.
    """

    def __init__(self, stream: ShardStream, prefetch_factor: int = 2) -> None:
        self.stream = stream
        self.prefetch_factor = prefetch_factor
        self.workers = max(stream.num_workers, 1)
        self.epoch = 0
        self.consumed = [0] * self.workers
        self.problems: Counter = Counter()

    @property
    def batches_per_epoch(self) -> int:
        return self.stream.plan(self.epoch).batches_per_rank

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "consumed": list(self.consumed),
            "problems": dict(self.problems),
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["consumed"]) != self.workers:
            raise AudioLLMError(
                f"the saved data position is for {len(state['consumed'])} loader workers, this "
                f"run has {self.workers}: resume with the same data.num_workers"
            )
        self.epoch = int(state["epoch"])
        self.consumed = [int(c) for c in state["consumed"]]
        self.problems = Counter(state.get("problems", {}))

    def __iter__(self) -> Iterator[dict]:
        while True:
            self.stream.set_position(self.epoch, self.consumed)
            workers = self.stream.num_workers
            loader = DataLoader(
                self.stream,
                batch_size=None,
                num_workers=workers,
                worker_init_fn=_worker_init if workers else None,
                prefetch_factor=self.prefetch_factor if workers else None,
            )
            for batch in loader:
                meta = batch.pop("stream")
                self.consumed[meta["worker"]] += 1
                self.problems.update(meta["problems"])
                yield batch
            self.epoch += 1
            self.consumed = [0] * self.workers
