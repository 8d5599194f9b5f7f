"""data.stream: equal batches per rank and worker, every sample once, reshuffled per epoch."""

from audio_llm.config import DataConfig
from audio_llm.data import build_loader, layout_of
from tests.data.corpus import N_CLIPS


def _keys_per_rank(shard_dir, model, world, workers, batch_size=3):
    cfg = DataConfig(batch_size=batch_size, num_workers=workers, shuffle_buffer=8)
    out = {}
    for rank in range(world):
        loader = build_loader(
            cfg, layout_of(model), spec=str(shard_dir), rank=rank, world_size=world
        )
        per_epoch = loader.batches_per_epoch
        batches = [b for _, b in zip(range(per_epoch), loader, strict=False)]
        assert loader.epoch == 0 and sum(loader.consumed) == per_epoch
        out[rank] = (batches, loader)
    return out


def test_two_ranks_two_workers_disjoint_equal_and_complete(shard_dirs, model, caplog):
    runs = _keys_per_rank(shard_dirs["audio"], model, world=2, workers=2)
    plan = runs[0][1].stream.plan(0)
    keys = {r: [k for b in batches for k in b["keys"]] for r, (batches, _) in runs.items()}
    assert len(runs[0][0]) == len(runs[1][0]) == plan.batches_per_rank
    assert not set(keys[0]) & set(keys[1])
    for r in (0, 1):
        assert len(keys[r]) == len(set(keys[r]))  # no repeats within a rank
    dropped = sum(plan.dropped.values())
    assert len(keys[0]) + len(keys[1]) + dropped == N_CLIPS
    assert dropped < 2 * 2 * 3  # at most a partial batch per worker


def test_epochs_reshuffle_and_are_reproducible(shard_dirs, model):
    cfg = DataConfig(batch_size=4, num_workers=0, shuffle_buffer=8)
    first = build_loader(cfg, layout_of(model), spec=str(shard_dirs["mel"]))
    n = first.batches_per_epoch
    stream = iter(first)
    epoch0 = [k for _ in range(n) for k in next(stream)["keys"]]
    epoch1 = [k for _ in range(n) for k in next(stream)["keys"]]
    assert first.epoch == 1 and epoch0 != epoch1
    again = iter(build_loader(cfg, layout_of(model), spec=str(shard_dirs["mel"])))
    assert [k for _ in range(n) for k in next(again)["keys"]] == epoch0
