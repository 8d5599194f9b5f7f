"""The shared data fixtures (tests/data/corpus.py) for every test under tests/data/."""

from tests.data.corpus import bucket_shards, model, shard_dirs

__all__ = ["bucket_shards", "model", "shard_dirs"]
