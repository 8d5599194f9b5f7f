"""Config + layout -> a ready `ShardLoader` (endless batches with a saveable position), with
the start-up checks that keep hour three safe."""

from __future__ import annotations

import atexit
import signal
import weakref
from collections import Counter
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from audio_llm.config import DataConfig
from audio_llm.data.augment import SpecAugment
from audio_llm.data.layout import AudioLayout
from audio_llm.data.shards import ShardSet
from audio_llm.data.stream import ShardStream
from audio_llm.errors import AudioLLMError


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # loader workers share the node's cores with the training ranks
    # SLURM and the launchers signal every process of the job: a worker that died of it would
    # fail the rank's step (torch's SIGCHLD check) before the rank could save. The rank ends
    # its workers itself; SIGKILL still ends them.
    for stop in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(stop, signal.SIG_IGN)


# DataLoader iterators with workers that are still running. Workers ignore SIGTERM (above), so
# multiprocessing's own exit hook, which terminates daemon children and then joins them, would
# wait for them forever; this hook (registered later, so it runs first) stops them the way the
# DataLoader does when it is done: it tells them to finish and joins them.
_LIVE_WORKERS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_live_workers() -> None:
    for batches in list(_LIVE_WORKERS):
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


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

    def source_metrics(self) -> dict[str, float]:
        """Per-source metrics of a mixture (`data.mixture.MixedLoader`); one corpus: none."""
        return {}

    def source_summary(self) -> dict[str, dict]:
        """Per-source totals for `summary.json` (`data.mixture.MixedLoader`); one corpus: none."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        if "mixture" in state:  # `data.mixture.MixedLoader` reads it; dropping it would mislead
            raise AudioLLMError(
                f"the saved data position is for the mixture {state['mixture'].get('names')}, "
                "this run reads one corpus: resume with the same data.train_shards list"
            )
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
                # page-locked batches: the model's non_blocking copies overlap the step
                pin_memory=torch.cuda.is_available(),
            )
            batches = iter(loader)
            if workers:
                _LIVE_WORKERS.add(batches)
            for batch in batches:
                meta = batch.pop("stream")
                self.consumed[meta["worker"]] += 1
                self.problems.update(meta["problems"])
                yield batch
            self.epoch += 1
            self.consumed = [0] * self.workers


def check_compatible(shards: ShardSet, layout: AudioLayout) -> None:
    """Precomputed shards must come from this run's encoder / feature extractor."""
    index = shards.index
    if shards.mode == "mel":
        n_mels = int(index.get("features", {}).get("n_mels", -1))
        if n_mels != layout.num_mel_bins:
            raise AudioLLMError(
                f"{shards.source}: mel shards have {n_mels} mel bins, the encoder takes "
                f"{layout.num_mel_bins}; "
                "repack with --encoder pointing at this run's encoder"
            )
    elif shards.mode == "encoder":
        packed = index.get("encoder") or {}
        ours = layout.encoder
        packed = {"varlen": False, **packed}  # shards from before the option ran padded
        keys = [k for k in ours if k != "name_or_path" and k in packed]
        diff = {k: (packed[k], ours[k]) for k in keys if packed[k] != ours[k]}
        if diff or not keys:
            if set(diff) == {"varlen"}:
                raise AudioLLMError(
                    f"{shards.source}: encoder-output shards were packed with varlen="
                    f"{packed['varlen']} but model.varlen_encoder is {ours['varlen']}; set "
                    "model.varlen_encoder to match, or repack (pack --varlen-encoder)"
                )
            raise AudioLLMError(
                f"{shards.source}: encoder-output shards were made by another encoder "
                f"({packed.get('name_or_path')!r}; differing: {diff or 'no identity recorded'}) "
                f"than model.encoder ({ours['name_or_path']!r}); repack them with this encoder"
            )


def build_loader(
    cfg: DataConfig,
    layout: AudioLayout,
    *,
    spec: str,
    index: str = "",
    rank: int = 0,
    world_size: int = 1,
    seed_offset: int = 0,
) -> ShardLoader:
    """Open `spec` (packed folder, or URLs + `index`), check it against `layout` (`layout_of`
    the run's model), build a loader."""
    shards = ShardSet.open(spec, index)
    check_compatible(shards, layout)
    options = stream_options(cfg, rank=rank, world_size=world_size, seed_offset=seed_offset)
    stream = ShardStream(shards, layout, **options)
    return ShardLoader(stream)


def stream_options(
    cfg: DataConfig, *, rank: int = 0, world_size: int = 1, seed_offset: int = 0
) -> dict:
    """`ShardStream`'s keyword arguments from the data config (one corpus or a mixture)."""
    return {
        "batch_size": cfg.batch_size,
        "max_length": cfg.max_length,
        "pack_tokens": cfg.pack_tokens,
        "features_on": cfg.features_on,
        "rank": rank,
        "world_size": world_size,
        "num_workers": cfg.num_workers,
        "seed": cfg.seed + seed_offset,
        "shuffle_buffer": cfg.shuffle_buffer,
        "long_audio": cfg.long_audio,
        "bucket_by_length": cfg.bucket_by_length,
        "align_ranks": cfg.align_ranks,
        "max_batch_seconds": cfg.max_batch_seconds,
        "augment": SpecAugment(
            cfg.time_masks, cfg.time_mask_seconds, cfg.feature_masks, cfg.feature_mask_fraction
        ),
    }
