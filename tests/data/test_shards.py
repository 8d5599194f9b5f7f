"""data.shards: the epoch plan's quotas, and shard sets named by folder, URL pattern or pipe."""

import pytest

from audio_llm.data import ShardSet, plan_epoch
from audio_llm.data.shards import ShardInfo
from audio_llm.errors import AudioLLMError


def test_plan_refuses_too_few_shards_and_balances_quotas():
    shards = [ShardInfo(f"s{i}.tar", f"s{i}.tar", 10 + i, 1.0) for i in range(3)]
    with pytest.raises(AudioLLMError, match="3 shard.* for 2 rank.* x 2 loader worker"):
        plan_epoch(shards, world_size=2, num_workers=2, batch_size=2, seed=0, epoch=0)
    shards = [
        ShardInfo(f"s{i}.tar", f"s{i}.tar", n, 1.0) for i, n in enumerate([9, 2, 7, 30, 5, 4])
    ]
    plan = plan_epoch(shards, world_size=2, num_workers=2, batch_size=2, seed=3, epoch=1)
    for r in (0, 1):
        assert sum(plan.quotas[(r, w)] for w in (0, 1)) == plan.batches_per_rank
        for w in (0, 1):
            have = sum(s.samples for s in plan.assignments[(r, w)])
            assert plan.quotas[(r, w)] * 2 <= have
    assert plan == plan_epoch(shards, world_size=2, num_workers=2, batch_size=2, seed=3, epoch=1)


def test_url_specs_need_an_index(shard_dirs, tmp_path):
    names = sorted(p.name for p in shard_dirs["audio"].glob("*.tar"))
    spec = f"{shard_dirs['audio']}/shard-{{000000..{len(names) - 1:06d}}}.tar"
    shards = ShardSet.open(spec)  # local URLs find the index beside them
    assert [s.name for s in shards.shards] == names
    with pytest.raises(AudioLLMError, match="need their index.json"):
        ShardSet.open(f"pipe:cat {shard_dirs['audio']}/shard-000000.tar")
    piped = ShardSet.open(
        f"pipe:cat {shard_dirs['audio']}/shard-000000.tar", str(shard_dirs["audio"] / "index.json")
    )
    assert piped.shards[0].name == names[0]
    with pytest.raises(AudioLLMError, match="no index.json"):
        ShardSet.open(str(tmp_path))
