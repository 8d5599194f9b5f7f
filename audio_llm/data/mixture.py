"""Several corpora mixed by weight (`data.train_shards` given as a list of sources).

Where the mixing happens. Each (rank, worker) slot keeps one item stream per source: the
source's own epochs, its shards dealt to slots by (seed, source, epoch) as `plan_epoch` deals a
single corpus, then read -> parse -> tokenize -> shuffle buffer (`data.stages`). A seeded weighted
choice merges them into one item stream before batching or length bucketing, so every later
stage (batches, bucketing, decode, collate, SpecAugment, report) is the single-corpus one.

The choice. With W ranks of batch b, a step takes G = W b samples. The sources of step t's G
samples come from one systematic draw seeded by (seed, round, t): G evenly spaced points from a
random offset over the cumulative weights, in a seeded random order, of which rank r takes the
r-th run of b. So a step holds floor or ceil of G x weight samples of each source (i.i.d. choices
would miss a 0.8 share by 2 points in one run of 500 in five), and the same G sources whatever W
divides G. DataLoader workers take steps in turn (worker w: steps w, w + workers, ...), as the
loader delivers them. Length bucketing then regroups the items of its buffer: the proportions hold
per buffer, not in each batch.

Rounds. The loader's epochs are rounds of R batches per rank, R = all sources' samples / G (with
a budget, `estimate_batches` of that many samples of the weighted mean length): a round draws as
many samples as the sources hold together, so a source weighted by its natural share makes about
one epoch a round. A source's own epoch ends when its slot's shards are read; the source then
starts its next epoch (reshuffled) while the others go on where they are.

Exact resume. A round starts each source of a worker at a saved position (its epoch, items taken
in it); the worker's last batch of the round reports where the round left each source, which is
where the next round starts. The loader's state is the single-corpus one (round, batches consumed
per worker) plus these positions, so a resumed run replays at most the round so far and the
current source epochs' cheap stages (no audio is decoded). Problems met in the replayed part are
counted again.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import logging
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from torch.utils.data import get_worker_info

from audio_llm import dist
from audio_llm.config import DataConfig
from audio_llm.data import stages
from audio_llm.data.bucket import estimate_batches
from audio_llm.data.layout import AudioLayout
from audio_llm.data.loader import ShardLoader, build_loader, check_compatible, stream_options
from audio_llm.data.shards import EpochPlan, ShardInfo, ShardSet, plan_epoch
from audio_llm.data.stages import Batch, Item, Problems, Slot
from audio_llm.data.stream import ShardStream
from audio_llm.errors import AudioLLMError

log = logging.getLogger("audio_llm.data")


@dataclass(frozen=True)
class Source:
    """One opened corpus of a mixture: its name (metrics), shards and relative weight."""

    name: str
    shards: ShardSet
    weight: float


@dataclass
class SourcePosition:
    """Where a worker is in one source: its epoch, items taken in it, and the samples its shards
    hold that epoch (from the index, for the epoch's progress)."""

    epoch: int
    taken: int
    samples: int = 0

    @property
    def progress(self) -> float:
        """Epochs done, fractional: 2.5 is half-way through the third."""
        return self.epoch + (min(self.taken / self.samples, 1.0) if self.samples else 0.0)


def _source_seed(seed: int, position: int) -> int:
    """The seed that deals the `position`-th source's shards: its own, so sources differ."""
    digest = hashlib.sha256(f"source:{seed}:{position}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


class MixedStream(ShardStream):
    """Batches for one rank, drawn from several sources by weight (see module doc)."""

    def __init__(self, sources: list[Source], layout: AudioLayout, **options: Any) -> None:
        """`options`: `ShardStream`'s keyword arguments (`data.loader.stream_options`)."""
        modes = {s.name: s.shards.mode for s in sources}
        if len(set(modes.values())) > 1:
            raise AudioLLMError(
                f"data.train_shards mixes shards packed in different modes ({modes}): one run "
                "reads one kind of payload; pack every source with the same --mode"
            )
        self.sources = sources
        total = sum(s.weight for s in sources)
        self.cumulative = list(itertools.accumulate(s.weight / total for s in sources))
        super().__init__(sources[0].shards, layout, **options)  # checks options, plans round 0
        self.starts = [[[0, 0] for _ in sources] for _ in range(max(self.num_workers, 1))]
        for position in range(len(sources)):
            self.deal(position, 0)  # fail now, not in a worker: a source with too few shards

    # -- rounds -----------------------------------------------------------------------------
    def plan(self, epoch: int) -> EpochPlan:
        """Batch quotas of every (rank, worker) slot in round `epoch` (module doc: rounds)."""
        workers, world = max(self.num_workers, 1), self.world_size
        samples = sum(s.shards.num_samples for s in self.sources)
        quotas = {}
        for rank, worker in itertools.product(range(world), range(workers)):
            quotas[(rank, worker)] = self._quota(worker, samples)
        per_rank = sum(quotas[(0, w)] for w in range(workers))
        if per_rank == 0:
            raise AudioLLMError(
                f"the sources hold {samples} samples in all, too few to give {world} rank(s) one "
                f"batch of {self.batch_size}: lower data.batch_size or add data"
            )
        return EpochPlan(epoch, {}, quotas, per_rank, {}, self.max_batch_seconds)

    def round_items(self, worker: int) -> int:
        """Items a worker draws in a round (for the budget's pace; fixed batches: quota x b)."""
        samples = sum(s.shards.num_samples for s in self.sources)
        if self.max_batch_seconds <= 0:
            return self._quota(worker, samples) * self.batch_size
        return _share(samples // self.world_size, max(self.num_workers, 1), worker)

    def _quota(self, worker: int, samples: int) -> int:
        """Batches of `worker` in a round: the same on every rank, from the indexes alone."""
        workers = max(self.num_workers, 1)
        if self.max_batch_seconds <= 0:
            return _share(samples // (self.world_size * self.batch_size), workers, worker)
        items = self.round_items(worker)
        total = sum(s.weight for s in self.sources)
        mean = sum(s.weight / total * _mean_seconds(s) for s in self.sources)
        estimate = estimate_batches(
            items,
            items * mean,
            batch_size=self.batch_size,
            max_batch_seconds=self.max_batch_seconds,
        )
        return min(items, math.ceil(estimate))

    def deal(self, position: int, epoch: int) -> dict[tuple[int, int], list[ShardInfo]]:
        """The shards of source `position` each slot reads in the source's epoch `epoch`."""
        source = self.sources[position]
        seed = _source_seed(self.seed, position)
        try:
            plan = plan_epoch(
                source.shards.shards, self.world_size, self.num_workers, 1, seed, epoch
            )
        except AudioLLMError as exc:
            raise AudioLLMError(f"data.train_shards source {source.name!r}: {exc}") from exc
        return plan.assignments

    def _slot_samples(self, position: int, worker: int, epoch: int) -> int:
        """Samples the index lists in this rank's `worker`'s shards of a source's epoch."""
        return sum(s.samples for s in self.deal(position, epoch)[(self.rank, worker)])

    # -- the stages ---------------------------------------------------------------------------
    def choices(self, worker: int) -> Iterator[int]:
        """The source of each item `worker` draws this round, in order (module doc: the choice)."""
        b, workers = self.batch_size, max(self.num_workers, 1)
        width, last = self.world_size * b, len(self.sources) - 1
        for turn in itertools.count():
            step = turn * workers + worker
            rng = random.Random(f"mix:{self.seed}:{self.epoch}:{step}")
            offset = rng.random()
            picks = [
                min(bisect.bisect_right(self.cumulative, (k + offset) / width), last)
                for k in range(width)
            ]
            rng.shuffle(picks)
            yield from picks[self.rank * b : (self.rank + 1) * b]

    def source_items(self, position: int, worker: int, at: SourcePosition, problems: Problems):
        """Endless items of source `position` for `worker` from `at`, epoch after epoch;
        `at` follows the last item given out."""
        source = self.sources[position]
        mode, payload = source.shards.mode, source.shards.payload
        start_epoch, skip = at.epoch, at.taken
        for epoch in itertools.count(start_epoch):
            slot = Slot(self.seed, epoch, self.rank, worker)
            shards = self.deal(position, epoch)[(self.rank, worker)]
            raws = stages.read_shards(shards, payload, slot.rng("source", position), problems)
            items = stages.parse(raws, mode, payload, self.long_audio, problems)
            items = stages.tokenize(items, self.layout, mode, self.max_length, problems)
            if not self.bucket_by_length:  # bucketing shuffles in its own buffer
                rng = slot.rng("source_shuffle", position)
                items = stages.shuffle(items, rng, self.shuffle_buffer)
            samples = sum(s.samples for s in shards)  # `_slot_samples` without a second deal
            taken = 0
            for taken, item in enumerate(items, 1):
                if epoch == start_epoch and taken <= skip:
                    continue  # taken before this round began
                at.epoch, at.taken, at.samples = epoch, taken, samples
                yield replace(item, source=position)
            if taken == 0:
                raise AudioLLMError(
                    f"data.train_shards source {source.name!r}: rank {self.rank} worker {worker}: "
                    f"no usable sample in {', '.join(s.name for s in shards)}"
                )

    def mixed(self, worker: int, at: list[SourcePosition], problems: Problems) -> Iterator[Item]:
        """Stage: the sources' items merged by the seeded weighted choice."""
        streams = [self.source_items(i, worker, at[i], problems) for i in range(len(at))]
        for choice in self.choices(worker):
            yield next(streams[choice])

    def pipeline(self, worker: int, plan: EpochPlan) -> Iterator[dict]:
        """This round's batches of `worker`: the mixed items, then `ShardStream`'s stages."""
        slot = Slot(self.seed, self.epoch, self.rank, worker)
        quota = plan.quotas[(self.rank, worker)]
        problems = Problems()
        at = [  # copied now, not lazily: the loader moves `starts` on at the round's end
            SourcePosition(epoch, taken, self._slot_samples(i, worker, epoch))
            for i, (epoch, taken) in enumerate(self.starts[worker])
        ]
        items = self.mixed(worker, at, problems)
        if self.bucket_by_length:
            count = self.round_items(worker)
            batches = stages.bucketed_batches(
                lambda _pass: itertools.islice(items, count),  # later passes: fresh draws
                slot.rng("bucket"),
                quota,
                problems,
                batch_size=self.batch_size,
                max_batch_seconds=self.max_batch_seconds,
                buffer_size=self.shuffle_buffer,
                frame_seconds=self.frame_seconds,
                expected_items=count,
                where=f"rank {self.rank} worker {worker} round {self.epoch}",
                order=(lambda *more: slot.shared_rng("order", *more)) if self.align_ranks else None,
            )
        else:
            batches = stages.fixed_batches(items, self.batch_size, quota)
        numbered = stages.number(batches, skip=self.consumed[worker])
        numbered = stages.decode(
            numbered, self.shards.mode, self.collator.features_on_device, problems
        )
        numbered = stages.collate(numbered, self.collator)
        numbered = tag_sources(numbered, at, quota, worker, self.epoch)
        if self.augment is not None:
            numbered = stages.augment(numbered, self.augment, slot)
        return stages.report(numbered, problems, slot)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        plan = self.plan(self.epoch)
        if worker == 0 and self.rank == 0 and self.consumed[worker] == 0:
            shares = ", ".join(f"{s.name} {s.weight:g}" for s in self.sources)
            log.info(
                "round %d: %d batches per rank mixed from %s",
                self.epoch,
                plan.batches_per_rank,
                shares,
            )
        return self.pipeline(worker, plan)


def _share(total: int, parts: int, part: int) -> int:
    """`part`'s share of `total` dealt over `parts`, the first ones taking the remainder."""
    return total // parts + (1 if part < total % parts else 0)


def _mean_seconds(source: Source) -> float:
    shards = source.shards.shards
    return sum(s.seconds for s in shards) / max(sum(s.samples for s in shards), 1)


def tag_sources(
    batches: Iterator[Batch], at: list[SourcePosition], quota: int, worker: int, round_no: int
) -> Iterator[Batch]:
    """Stage: each collated batch tagged `mixture`: its audio seconds and samples per source, the
    sources' epoch progress, and on the round's last batch where it left each source."""
    for batch in batches:
        if not batch.replay:
            seconds, samples = [0.0] * len(at), [0] * len(at)
            for item in batch.items:
                seconds[item.source] += float(item.meta.get("duration", 0.0))
                samples[item.source] += 1
            last = batch.index == quota - 1
            batch.out["mixture"] = {
                "round": round_no,
                "worker": worker,
                "seconds": seconds,
                "samples": samples,
                "progress": [p.progress for p in at],
                "end": [[p.epoch, p.taken] for p in at] if last else None,
            }
        yield batch


class MixedLoader(ShardLoader):
    """`ShardLoader` over a `MixedStream`: its position also holds where each worker's round
    started in each source, and where the round left it; it counts audio seconds, samples and
    epochs per source for the metrics and `summary.json`."""

    def __init__(self, stream: MixedStream, prefetch_factor: int = 2) -> None:
        super().__init__(stream, prefetch_factor)
        self.names = [s.name for s in stream.sources]
        self.weights = [s.weight for s in stream.sources]
        count = len(self.names)
        self.round = 0  # the round `starts` are for
        self.starts = [[[0, 0] for _ in range(count)] for _ in range(self.workers)]
        self.ends: list[list | None] = [None] * self.workers  # the round's last batch says
        self.seconds = [0.0] * count
        self.samples = [0] * count
        self.progress = [[0.0] * count for _ in range(self.workers)]

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["mixture"] = {
            "names": list(self.names),
            "round": self.round,
            "starts": self.starts,
            "ends": self.ends,
            "seconds": list(self.seconds),
            "samples": list(self.samples),
            "progress": self.progress,
        }
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict({k: v for k, v in state.items() if k != "mixture"})
        mix = state.get("mixture") or {}
        if mix.get("names") != self.names:
            saved = f"the sources {mix['names']}" if mix else "one corpus"
            raise AudioLLMError(
                f"the saved data position is for {saved}, this run mixes "
                f"{self.names}: resume with the same data.train_shards list (names and order)"
            )
        self.round = int(mix["round"])
        self.starts, self.ends = mix["starts"], mix["ends"]
        self.seconds, self.samples = list(mix["seconds"]), list(mix["samples"])
        self.progress = mix["progress"]
        self._sync_stream()

    def _sync_stream(self) -> None:
        """Where the stream's next pipelines start: a worker that finished its round (its
        batches are all replays now) starts the next round where this one left it."""
        starts = [
            end if end is not None else s for s, end in zip(self.starts, self.ends, strict=True)
        ]
        self.stream.starts = [[list(p) for p in worker] for worker in starts]

    def __iter__(self) -> Iterator[dict]:
        for batch in super().__iter__():
            info = batch.pop("mixture")
            if info["round"] != self.round:  # a new round starts where the last one left off
                self.starts = [
                    e if e is not None else s for s, e in zip(self.starts, self.ends, strict=True)
                ]
                self.ends, self.round = [None] * self.workers, info["round"]
            worker = info["worker"]
            for i, (seconds, samples) in enumerate(
                zip(info["seconds"], info["samples"], strict=True)
            ):
                self.seconds[i] += seconds
                self.samples[i] += samples
            self.progress[worker] = info["progress"]
            if info["end"] is not None:
                self.ends[worker] = info["end"]
                self._sync_stream()
            yield batch

    def epochs(self) -> list[float]:
        """Epochs of each source this rank has reached (its workers' mean)."""
        return [sum(p[i] for p in self.progress) / self.workers for i in range(len(self.names))]

    def source_metrics(self) -> dict[str, float]:
        """`mix/NAME/audio_seconds` and `mix/NAME/samples` so far, all ranks together, and
        `mix/NAME/epochs` this rank has reached. Collective."""
        counts = {}
        for name, seconds, samples in zip(self.names, self.seconds, self.samples, strict=True):
            counts[f"mix/{name}/audio_seconds"] = seconds
            counts[f"mix/{name}/samples"] = samples
        metrics = dist.sum_counts(counts)
        for name, epochs in zip(self.names, self.epochs(), strict=True):
            metrics[f"mix/{name}/epochs"] = epochs
        return metrics

    def source_summary(self) -> dict[str, dict]:
        """Per source: its weight, audio seconds and samples (all ranks) and epochs reached.
        Collective."""
        metrics = self.source_metrics()
        return {
            name: {
                "weight": weight,
                **{k: metrics[f"mix/{name}/{k}"] for k in ("audio_seconds", "samples", "epochs")},
            }
            for name, weight in zip(self.names, self.weights, strict=True)
        }


def build_train_loader(
    cfg: DataConfig, layout: AudioLayout, *, rank: int = 0, world_size: int = 1
) -> ShardLoader:
    """The training loader of `cfg.train_shards`: one corpus (`build_loader`, as before), or
    several mixed by weight (`MixedLoader`)."""
    sources = cfg.sources()
    if len(sources) == 1:
        only = sources[0]
        return build_loader(
            cfg, layout, spec=only.shards, index=only.index, rank=rank, world_size=world_size
        )
    opened = []
    for source in sources:
        try:
            shards = ShardSet.open(source.shards, source.index)
            check_compatible(shards, layout)
        except AudioLLMError as exc:
            raise AudioLLMError(f"data.train_shards source {source.name!r}: {exc}") from exc
        opened.append(Source(source.name, shards, source.weight))
    options = stream_options(cfg, rank=rank, world_size=world_size)
    return MixedLoader(MixedStream(opened, layout, **options))
