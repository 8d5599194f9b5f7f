"""The streaming dataset: named stages from tar shards to collated batches, resumable exactly.

`ShardStream.pipeline` composes, per (rank, worker), the stages of `data.stages`, all seeded
from (seed, epoch, rank, worker):
  read shards (only the `.json` and payload members; others are never decoded, nothing is
  unpickled) -> parse json with the 30 s policy -> tokenize (max_length) -> shuffle buffer ->
  batches of `batch_size` up to the worker's quota -> number (resume) -> count repeats ->
  decode payloads -> collate -> SpecAugment masks -> report the position and problems.
Payloads are decoded only for batches that are yielded, so resuming skips the batches already
consumed by replaying the cheap stages without decoding audio. `eval_samples` is the
evaluation pipeline, from the same stages.

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

The position is (epoch, batches consumed per worker), kept by `data.loader.ShardLoader` in the
main process from what the trainer actually received; a resumed run continues with the next
unseen batch.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator

from torch.utils.data import IterableDataset, get_worker_info

from audio_llm.audio.frames import ENCODER_DOWNSAMPLE, HOP_LENGTH, SAMPLE_RATE
from audio_llm.data import stages
from audio_llm.data.augment import SpecAugment
from audio_llm.data.collate import AudioSample, Collator
from audio_llm.data.layout import AudioLayout
from audio_llm.data.shards import EpochPlan, ShardSet, plan_epoch
from audio_llm.data.stages import Item, Problems, Slot
from audio_llm.errors import AudioLLMError

log = logging.getLogger("audio_llm.data")


class ShardStream(IterableDataset):
    """Batches for one rank; each DataLoader worker streams its own shards (see module doc)."""

    def __init__(
        self,
        shards: ShardSet,
        layout: AudioLayout,
        *,
        batch_size: int,
        max_length: int,
        pack_tokens: int = 0,
        features_on: str = "loader",
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        long_audio: str = "skip",
        bucket_by_length: bool = False,
        max_batch_seconds: float = 0.0,
        augment: SpecAugment | None = None,
        align_ranks: bool = True,
    ) -> None:
        collator = Collator(layout, shards.mode, features_on, pack_tokens)
        if max_batch_seconds > 0 and not bucket_by_length:
            raise AudioLLMError(
                "data.max_batch_seconds cuts batches from the length-sorted buffer: "
                "set data.bucket_by_length=true too"
            )
        augment = augment if augment is not None and augment.active else None
        if augment is not None and collator.features_on_device:
            raise AudioLLMError(
                "data.time_masks/feature_masks mask features in the loader, but "
                "data.features_on=device sends waveforms: set data.features_on=loader"
            )
        self.shards = shards
        self.layout = layout
        self.collator = collator
        self.augment = augment
        self.batch_size = batch_size
        self.max_length = max_length
        self.rank, self.world_size = rank, world_size
        self.num_workers = num_workers
        self.seed = seed
        self.shuffle_buffer = max(shuffle_buffer, 1)
        self.long_audio = long_audio
        self.bucket_by_length = bucket_by_length
        # rank-shared batch order (`data.bucket`): only where there are ranks to keep in step
        self.align_ranks = align_ranks and world_size > 1
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

    def pipeline(self, worker: int, plan: EpochPlan) -> Iterator[dict]:
        """This epoch's batches of `worker` (of this rank) under `plan`: the stages, in order."""
        slot = Slot(self.seed, self.epoch, self.rank, worker)
        shards = plan.assignments[(self.rank, worker)]
        quota = plan.quotas[(self.rank, worker)]
        mode, payload = self.shards.mode, self.shards.payload
        problems = Problems()
        names = ", ".join(s.name for s in shards)

        def samples(pass_no: int) -> Iterator[Item]:
            """One read over the worker's shards: the samples that pass the length policies."""
            raws = stages.read_shards(shards, payload, slot.rng("pass", pass_no), problems)
            items = stages.parse(raws, mode, payload, self.long_audio, problems, pass_no)
            items = stages.tokenize(items, self.layout, mode, self.max_length, problems)
            no_sample = f"rank {self.rank} worker {worker}: no usable sample in {names}"
            return stages.require_some(items, no_sample)

        if self.bucket_by_length:
            batches = stages.bucketed_batches(
                samples,
                slot.rng("bucket"),
                quota,
                problems,
                batch_size=self.batch_size,
                max_batch_seconds=self.max_batch_seconds,
                buffer_size=self.shuffle_buffer,
                frame_seconds=self.frame_seconds,
                expected_items=sum(s.samples for s in shards),
                where=f"rank {self.rank} worker {worker} epoch {self.epoch}",
                order=functools.partial(slot.shared_rng, "order") if self.align_ranks else None,
            )
        else:
            items = stages.shuffled_passes(samples, slot.rng("shuffle"), self.shuffle_buffer)
            batches = stages.fixed_batches(items, self.batch_size, quota)
        numbered = stages.number(batches, skip=self.consumed[worker])
        numbered = stages.count_repeats(numbered, problems)
        numbered = stages.decode(numbered, mode, self.collator.features_on_device, problems)
        numbered = stages.collate(numbered, self.collator)
        if self.augment is not None:
            numbered = stages.augment(numbered, self.augment, slot)
        return stages.report(numbered, problems, slot)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        plan = self.plan(self.epoch)
        if worker == 0 and self.rank == 0 and self.consumed[worker] == 0:
            log.info(plan.describe(self.rank))
        return self.pipeline(worker, plan)


def eval_samples(
    shards: ShardSet, rank: int, world: int, long_audio: str, problems: Problems
) -> Iterator[AudioSample]:
    """The evaluation pipeline: every sample of the set exactly once across ranks (sample i
    goes to rank i % world), decoded; nothing is refused for its token length.

    Every rank reads every shard, so that ranks get even shares whatever the shard sizes; a
    shard's own problems are counted by one rank alone (`stages.read_in_order`)."""
    raws = stages.read_in_order(shards, rank, world, problems)
    raws = stages.deal(raws, rank, world)
    items = stages.parse(raws, shards.mode, shards.payload, long_audio, problems)
    return stages.decode_each(items, shards.mode, problems)
