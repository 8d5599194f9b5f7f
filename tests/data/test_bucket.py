"""Length bucketing: every sample exactly once, budgets kept, less padding, lockstep and resume."""

import math
import random
from collections import Counter

import numpy as np
import pytest

from audio_llm.config import DataConfig
from audio_llm.data import bucket as bucket_module
from audio_llm.data import plan_epoch
from audio_llm.data.bucket import bucket_batches, estimate_batches
from audio_llm.data.shards import ShardInfo
from audio_llm.errors import AudioLLMError
from tests.data.corpus import BUCKET_CLIPS, one_epoch


def _speech_mix(n: int, seed: int = 0) -> list[float]:
    """LibriSpeech-like durations (gamma, shape 6, mean ~12 s, 1-30 s) mixed half and half with
    Common-Voice-like short clips (lognormal around 4.5 s, 1-12 s)."""
    rng = np.random.default_rng(seed)
    long = np.clip(rng.gamma(6.0, 2.05, n // 2), 1.0, 30.0)
    short = np.clip(rng.lognormal(np.log(4.5), 0.35, n - n // 2), 1.0, 12.0)
    mix = np.concatenate([long, short])
    rng.shuffle(mix)
    return mix.tolist()


def _items(lengths: list[float]) -> list[tuple[int, float]]:
    return list(enumerate(lengths))


def _bucket(items, batch_size, budget=0.0, buffer=64, seed=0, **kw):
    return list(
        bucket_batches(
            items,
            lambda item: item[1],
            batch_size=batch_size,
            max_batch_length=budget,
            buffer_size=buffer,
            rng=random.Random(seed),
            **kw,
        )
    )


def _padded_fraction(batches) -> float:
    valid = sum(n for batch in batches for _, n in batch)
    padded = sum(len(batch) * max(n for _, n in batch) for batch in batches)
    return 1 - valid / padded


@pytest.mark.parametrize("n", [0, 1, 7, 50, 333])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
@pytest.mark.parametrize("buffer", [1, 5, 64, 1000])
@pytest.mark.parametrize("budget", [0.0, 10.0, 45.5])
def test_every_item_comes_out_exactly_once_within_size_and_budget(n, batch_size, buffer, budget):
    rng = random.Random(n * 7 + batch_size)
    # some items longer than the 10 s budget on their own
    items = _items([rng.uniform(0.1, 12.0) for _ in range(n)])
    batches = _bucket(items, batch_size, budget, buffer, seed=n)
    out = [item for batch in batches for item in batch]
    assert sorted(out) == items  # exactly once: nothing lost, nothing repeated
    assert all(1 <= len(batch) <= batch_size for batch in batches)
    if budget:
        for batch in batches:
            padded = len(batch) * max(length for _, length in batch)
            assert padded <= budget or len(batch) == 1


@pytest.mark.parametrize("n", [1, 7, 50, 333])
@pytest.mark.parametrize("quota_per_item", [0.01, 0.3, 1.0, 2.0])
@pytest.mark.parametrize("expected_per_item", [0.5, 1.0, 2.0])
def test_quota_splitting_keeps_every_item_once(n, quota_per_item, expected_per_item):
    rng = random.Random(n)
    items = _items([rng.uniform(0.1, 12.0) for _ in range(n)])
    quota = max(1, round(n * quota_per_item))
    expected = max(1, round(n * expected_per_item))
    batches = _bucket(items, 6, 24.0, 20, quota=quota, expected_items=expected)
    assert sorted(item for batch in batches for item in batch) == items
    assert all(1 <= len(batch) <= 6 for batch in batches)
    assert all(len(b) * max(x for _, x in b) <= 24.0 or len(b) == 1 for b in batches)
    if expected == n:  # the last buffer makes up what pacing has not split yet
        assert len(batches) >= min(quota, n)


def test_an_item_over_the_budget_forms_its_own_batch():
    items = _items([2.0, 2.0, 50.0, 2.0, 2.0, 2.0])
    batches = _bucket(items, batch_size=4, budget=20.0, buffer=3)
    assert [(2, 50.0)] in batches
    assert sorted(item for batch in batches for item in batch) == items
    assert _bucket(_items([50.0]), batch_size=4, budget=20.0, buffer=8) == [[(0, 50.0)]]


def test_fixed_size_batches_are_full_but_the_last():
    items = _items(_speech_mix(203, seed=1))
    batches = _bucket(items, batch_size=8, buffer=50)
    assert [len(b) for b in batches[:-1]] == [8] * (len(batches) - 1)
    assert len(batches[-1]) == 203 % 8


def test_bucketing_cuts_padding_on_a_speech_duration_mix():
    items = _items(_speech_mix(4000))
    unbucketed = [items[i : i + 16] for i in range(0, len(items), 16)]
    bucketed = _bucket(items, batch_size=16, buffer=1000)
    budgeted = _bucket(items, batch_size=64, budget=240.0, buffer=1000)
    before, after = _padded_fraction(unbucketed), _padded_fraction(bucketed)
    assert before > 0.4  # about half of a random batch is padding on this mix
    assert after < 0.06 and _padded_fraction(budgeted) < 0.1
    assert after < before / 8


def test_same_rng_same_batches_other_rng_other_neighbours():
    items = _items(_speech_mix(500, seed=3))
    first = _bucket(items, batch_size=8, budget=60.0, buffer=100, seed=11)
    assert first == _bucket(items, batch_size=8, budget=60.0, buffer=100, seed=11)
    other = _bucket(items, batch_size=8, budget=60.0, buffer=100, seed=12)
    groups = {frozenset(i for i, _ in batch) for batch in first}
    shared = sum(frozenset(i for i, _ in batch) in groups for batch in other)
    assert shared < len(other) / 2  # not the same batches in another order


def test_no_length_waits_for_the_end_of_the_stream():
    """Items held back by a cut go out with the next one, whichever end they came from."""
    lengths = _speech_mix(3000, seed=4)
    lengths[10], lengths[11] = 30.0, 0.2  # the longest and the shortest, early
    read = 0

    def reading():
        nonlocal read
        for item in _items(lengths):
            read += 1
            yield item

    delay = {}
    for batch in bucket_batches(
        reading(),
        lambda item: item[1],
        batch_size=8,
        max_batch_length=60.0,
        buffer_size=100,
        rng=random.Random(0),
    ):
        for i, _ in batch:
            delay[i] = read - i
    assert sorted(delay) == list(range(3000))
    assert delay[10] <= 200 and delay[11] <= 200
    assert max(d for i, d in delay.items() if i < 2800) <= 300  # at most two buffers late


def test_quota_splits_batches_to_land_exactly():
    items = _items(_speech_mix(1500, seed=5))
    natural = _bucket(items, batch_size=32, budget=240.0, buffer=300)
    quota = math.ceil(
        estimate_batches(
            len(items), sum(n for _, n in items), batch_size=32, max_batch_seconds=240.0
        )
    )
    assert len(natural) <= quota <= 1.35 * len(natural)  # generous, not wasteful
    paced = _bucket(items, 32, 240.0, 300, quota=quota, expected_items=len(items))
    assert len(paced) == quota and all(paced)
    assert sorted(item for batch in paced for item in batch) == items
    assert all(len(b) * max(n for _, n in b) <= 240.0 for b in paced)
    # fewer items than expected (samples skipped): the last buffer still makes up the quota
    short = _bucket(items[:1400], 32, 240.0, 300, quota=quota, expected_items=len(items))
    assert len(short) == quota


@pytest.mark.parametrize("seed", range(4))
def test_estimate_is_not_below_the_natural_count(seed):
    rng = np.random.default_rng(seed)
    mixes = {
        "speech": _speech_mix(3000, seed),
        "uniform": rng.uniform(0.5, 30.0, 3000).tolist(),
        "bimodal": np.concatenate([rng.uniform(0.5, 2, 1500), rng.uniform(25, 30, 1500)]).tolist(),
    }
    for name, lengths in mixes.items():
        items = _items(lengths)
        for batch_size, budget in ((16, 120.0), (32, 240.0), (128, 480.0)):
            natural = len(_bucket(items, batch_size, budget, buffer=1000, seed=seed))
            estimate = estimate_batches(
                len(lengths), sum(lengths), batch_size=batch_size, max_batch_seconds=budget
            )
            assert natural <= estimate, (name, batch_size, budget)


def test_budget_plan_gives_every_rank_the_same_quota():
    shards = [
        ShardInfo(f"s{i}.tar", f"s{i}.tar", n, n * mean)
        for i, (n, mean) in enumerate([(9, 2.0), (20, 12.0), (7, 25.0), (30, 5.0), (5, 9.0)] * 2)
    ]
    plan = plan_epoch(
        shards, world_size=2, num_workers=2, batch_size=8, seed=1, epoch=0, max_batch_seconds=60
    )
    for r in (0, 1):
        assert sum(plan.quotas[(r, w)] for w in (0, 1)) == plan.batches_per_rank
        for w in (0, 1):
            assert plan.quotas[(r, w)] <= sum(s.samples for s in plan.assignments[(r, w)])
    fixed = plan_epoch(shards, world_size=2, num_workers=2, batch_size=8, seed=1, epoch=0)
    assert plan.assignments == fixed.assignments
    assert plan.batches_per_rank > fixed.batches_per_rank  # 8 clips of 25 s do not fit 60 s


def test_config_refuses_budgets_that_cannot_work():
    with pytest.raises(AudioLLMError, match="bucket_by_length=true"):
        DataConfig(max_batch_seconds=120.0)
    with pytest.raises(AudioLLMError, match="less than one 30 s clip"):
        DataConfig(bucket_by_length=True, max_batch_seconds=20.0)
    assert DataConfig(bucket_by_length=True, max_batch_seconds=30.0).max_batch_seconds == 30.0


# -- the stream, end to end, on tiny packed shards (tests/data/corpus.py) -----------------------
def _seconds(batch) -> list[float]:
    return (batch["feature_lengths"].float() / 100).tolist()


@pytest.mark.parametrize("budget", [0.0, 30.0])
def test_two_ranks_two_workers_see_every_sample_once_in_equal_steps(bucket_shards, model, budget):
    cfg = DataConfig(
        batch_size=4,
        num_workers=2,
        shuffle_buffer=6,
        bucket_by_length=True,
        max_batch_seconds=budget,
    )
    runs = {rank: one_epoch(cfg, model, bucket_shards, rank, world=2) for rank in (0, 1)}
    plan = runs[0][1].stream.plan(0)
    assert len(runs[0][0]) == len(runs[1][0]) == plan.batches_per_rank
    keys = {r: [k for b in batches for k in b["keys"]] for r, (batches, _) in runs.items()}
    assert not set(keys[0]) & set(keys[1])
    problems = runs[0][1].problems + runs[1][1].problems
    assert problems["repeated_to_fill_quota"] == 0
    for r in (0, 1):
        assert len(keys[r]) == len(set(keys[r]))
    if budget:
        for batches, _ in runs.values():
            for batch in batches:
                assert len(batch["keys"]) * max(_seconds(batch)) <= budget
        # seen once, or counted: quotas are estimates, and one rank's is trimmed to the other's
        assert len(keys[0]) + len(keys[1]) + problems["left_out_over_quota"] == BUCKET_CLIPS
        assert problems["left_out_over_quota"] <= BUCKET_CLIPS // 10
    else:
        for batches, _ in runs.values():
            assert all(len(b["keys"]) == 4 for b in batches)
        assert len(keys[0]) + len(keys[1]) + sum(plan.dropped.values()) == BUCKET_CLIPS


def test_a_quota_too_small_for_the_data_counts_what_it_leaves_out(
    bucket_shards, model, monkeypatch
):
    monkeypatch.setattr(bucket_module, "BUDGET_FILL", 3.0)  # estimates far too low
    cfg = DataConfig(batch_size=4, num_workers=0, bucket_by_length=True, max_batch_seconds=30.0)
    batches, loader = one_epoch(cfg, model, bucket_shards)
    keys = [k for b in batches for k in b["keys"]]
    assert len(keys) == len(set(keys))
    assert loader.problems["left_out_over_quota"] > 0
    assert len(keys) + loader.problems["left_out_over_quota"] == BUCKET_CLIPS


def test_bucketing_lowers_padding_and_the_stats_show_it(bucket_shards, model):
    fractions = {}
    for bucketed in (False, True):
        cfg = DataConfig(batch_size=4, num_workers=0, shuffle_buffer=48, bucket_by_length=bucketed)
        batches, _ = one_epoch(cfg, model, bucket_shards)
        stats = Counter()
        for batch in batches:
            stats.update(batch["stats"])
            lengths = batch["feature_lengths"]
            assert batch["stats"]["audio_frames"] == int(lengths.sum())
            assert batch["stats"]["audio_frames_padded"] == len(lengths) * int(lengths.max())
        fractions[bucketed] = (
            1 - stats["audio_frames"] / stats["audio_frames_padded"],
            1 - stats["tokens"] / stats["positions"],
        )
    assert fractions[True][0] < fractions[False][0] / 2  # audio frames
    assert fractions[True][1] < fractions[False][1] / 2  # LLM positions


# -- ranks in step: a rank-shared batch order -----------------------------------------------------
def _sizes(batches) -> list[float]:
    return [len(batch) * max(n for _, n in batch) for batch in batches]


def _size_ranks(batches) -> list[int]:
    sizes = _sizes(batches)
    return [sorted(sizes).index(size) for size in sizes]


def test_a_shared_order_keeps_the_batches_and_puts_like_sizes_at_like_steps():
    # two ranks: different clips from one duration mix, one buffer per 16 batches
    mixes = {rank: _items(_speech_mix(4 * 256, seed=rank)) for rank in (0, 1)}

    def shared(buffer_no: int) -> random.Random:
        return random.Random(f"order:{buffer_no}")  # what every rank builds alike

    apart = {rank: _bucket(items, 4, buffer=64, seed=rank) for rank, items in mixes.items()}
    shared_order = {
        rank: _bucket(items, 4, buffer=64, seed=rank, order=shared) for rank, items in mixes.items()
    }
    for rank in (0, 1):  # the same batches, in another order
        assert sorted(map(tuple, shared_order[rank])) == sorted(map(tuple, apart[rank]))
        assert shared_order[rank] != apart[rank]

    def lockstep_waste(runs) -> float:  # what the longer batch of each step costs over the mean
        steps = list(zip(_sizes(runs[0]), _sizes(runs[1]), strict=True))
        return sum(max(a, b) for a, b in steps) / sum((a + b) / 2 for a, b in steps) - 1

    # each rank shuffled alone, ranks wait on each other; in one order, much less (buffers of 16
    # batches here: the demo's hold 125, where the waste fell from 19% to 1%)
    assert lockstep_waste(apart) > 0.15
    assert lockstep_waste(shared_order) < lockstep_waste(apart) / 3
    # buffer by buffer, the i-th batch out has the same rank among its buffer's sizes
    for start in range(0, 256, 16):
        ranks = [_size_ranks(shared_order[r][start : start + 16]) for r in (0, 1)]
        assert ranks[0] == ranks[1]


def test_the_shared_order_is_a_random_order_of_sizes():
    batches = [[(i, float(i))] for i in range(12)]
    orders = {
        tuple(n for [(_, n)] in bucket_module.in_shared_order(batches, lambda x: x[1], rng))
        for rng in (random.Random(seed) for seed in range(50))
    }
    assert len(orders) == 50  # not sorted, not one fixed order
    for order in orders:
        assert sorted(order) == [float(i) for i in range(12)]
    # another rank's 12 batches of other sizes, with the same generator: the same places
    others = [[(i, 10.0 * i + 3)] for i in range(12)]
    a = bucket_module.in_shared_order(batches, lambda x: x[1], random.Random(7))
    b = bucket_module.in_shared_order(others, lambda x: x[1], random.Random(7))
    assert [x[0][0] for x in a] == [y[0][0] for y in b]


def test_two_ranks_take_alike_lengths_at_each_step_when_aligned(bucket_shards, model):
    waste, keys = {}, {}
    for align in (False, True):
        cfg = DataConfig(
            batch_size=4, num_workers=2, shuffle_buffer=12, bucket_by_length=True, align_ranks=align
        )
        runs = {rank: one_epoch(cfg, model, bucket_shards, rank, world=2)[0] for rank in (0, 1)}
        longest = [[max(_seconds(b)) for b in runs[rank]] for rank in (0, 1)]
        steps = list(zip(*longest, strict=True))
        waste[align] = sum(max(a, b) for a, b in steps) / sum((a + b) / 2 for a, b in steps) - 1
        keys[align] = {r: sorted(tuple(b["keys"]) for b in runs[r]) for r in (0, 1)}
    assert keys[True] == keys[False]  # the same batches on each rank, only their order differs
    assert waste[True] < waste[False] / 2
