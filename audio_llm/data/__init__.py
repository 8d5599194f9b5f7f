"""Shards -> batches: shard sets and epoch plans, the pipeline's named stages, the collator.

data/ owns reading packed shards (`shards`), the streaming training pipeline and the evaluation
pipeline (`stream`, composed of `stages`), length bucketing (`bucket`), SpecAugment masks
(`augment`), padding into batches (`collate`), the loader with its saveable position
(`loader`) and several corpora mixed by weight (`mixture`). It never holds a model:
`layout_of(model)` reads what it needs into an `AudioLayout`.

data/ may import `audio_llm.audio`, `config`, `errors`, `dist`, `model.prompts`, `model.rows`
(the LLM rows of a batch and their indices) and `model.encoder.encoder_identity` (inside
`layout_of`); never `model.audio_llm`, `train` or `evaluation` (which import data/), nor `demo`.
"""

from audio_llm.data.collate import AudioSample, Collator
from audio_llm.data.layout import AudioLayout, layout_of
from audio_llm.data.loader import ShardLoader, build_loader, check_compatible
from audio_llm.data.mixture import MixedLoader, MixedStream, build_train_loader
from audio_llm.data.shards import EpochPlan, ShardInfo, ShardSet, plan_epoch
from audio_llm.data.stages import Item, Problems
from audio_llm.data.stream import ShardStream, eval_samples

__all__ = [
    "AudioLayout",
    "AudioSample",
    "Collator",
    "EpochPlan",
    "Item",
    "MixedLoader",
    "MixedStream",
    "Problems",
    "ShardInfo",
    "ShardLoader",
    "ShardSet",
    "ShardStream",
    "build_loader",
    "build_train_loader",
    "check_compatible",
    "eval_samples",
    "layout_of",
    "plan_epoch",
]
