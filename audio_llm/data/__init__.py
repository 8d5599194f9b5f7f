"""Shards -> batches: shard sets and epoch plans, the streaming dataset, the collator."""

from audio_llm.data.collate import Collator
from audio_llm.data.loader import build_loader, check_compatible
from audio_llm.data.shards import EpochPlan, ShardInfo, ShardSet, plan_epoch
from audio_llm.data.stream import ShardLoader, ShardStream

__all__ = [
    "Collator",
    "EpochPlan",
    "ShardInfo",
    "ShardLoader",
    "ShardSet",
    "ShardStream",
    "build_loader",
    "check_compatible",
    "plan_epoch",
]
