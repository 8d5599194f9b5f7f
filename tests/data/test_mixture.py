"""data.mixture: corpora mixed by weight, in proportion, resumable exactly, each source on its own
epochs, the same steps on any number of ranks."""

import json
import random
from collections import Counter

import numpy as np
import pytest
import soundfile as sf
import torch

from audio_llm.config import DataConfig, ShardSource
from audio_llm.data import build_loader, build_train_loader, layout_of
from audio_llm.errors import AudioLLMError
from audio_llm.pack.writer import PackOptions, pack

SMALL_CLIPS = 12  # the second corpus: 4 shards of 3, so it runs out long before the first


@pytest.fixture(scope="module")
def small_source(tmp_path_factory):
    """SMALL_CLIPS tone clips whose ids start with `s`, packed as audio shards."""
    root = tmp_path_factory.mktemp("small")
    rng = random.Random(1)
    lines = []
    for i in range(SMALL_CLIPS):
        t = np.arange(int(rng.uniform(0.5, 2.0) * 16000)) / 16000
        audio = 0.3 * np.sin(2 * np.pi * (400 + 20 * i) * t) * np.hanning(len(t))
        sf.write(root / f"s{i:02d}.wav", audio.astype(np.float32), 16000)
        lines.append(
            json.dumps({"audio_filepath": f"s{i:02d}.wav", "text": "hi", "id": f"s{i:02d}"})
        )
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    pack(
        [root / "train.jsonl"],
        PackOptions(out=root / "audio", mode="audio", max_samples=3, quiet=True),
    )
    return root / "audio"


def mix_config(big, small, weights=(0.8, 0.2), **data) -> DataConfig:
    sources = [
        ShardSource(str(big), weights[0], name="big"),
        ShardSource(str(small), weights[1], name="small"),
    ]
    return DataConfig(train_shards=sources, **{"num_workers": 0, "shuffle_buffer": 8, **data})


def source_of(key: str) -> str:
    """The demo corpus's ids start with u, the small one's with s."""
    return "small" if key.startswith("s") else "big"


def take(loader, batches: int) -> list[dict]:
    it = iter(loader)
    return [next(it) for _ in range(batches)]


def test_weights_set_the_share_of_samples(shard_dirs, small_source, model):
    cfg = mix_config(shard_dirs["audio"], small_source, batch_size=4)
    loader = build_train_loader(cfg, layout_of(model))
    keys = [k for b in take(loader, 125) for k in b["keys"]]  # 500 samples, over 9 rounds
    share = Counter(map(source_of, keys))["small"] / len(keys)
    assert abs(share - 0.2) <= 0.03, share
    assert loader.samples == [len(keys) - share * len(keys), share * len(keys)]
    metrics = loader.source_metrics()
    assert metrics["mix/small/samples"] == share * len(keys)
    seconds = sum(
        float(b["stats"]["audio_seconds"])
        for b in take(build_train_loader(cfg, layout_of(model)), 125)
    )
    assert metrics["mix/big/audio_seconds"] + metrics["mix/small/audio_seconds"] == pytest.approx(
        seconds
    )
    summary = loader.source_summary()
    assert summary["small"]["weight"] == 0.2 and summary["small"]["epochs"] > 3


def test_a_small_source_starts_its_next_epoch_without_stopping_the_big_one(
    shard_dirs, small_source, model
):
    cfg = mix_config(shard_dirs["audio"], small_source, weights=(0.5, 0.5), batch_size=4)
    loader = build_train_loader(cfg, layout_of(model))
    assert loader.batches_per_epoch == (40 + SMALL_CLIPS) // 4  # a round: all sources' samples
    keys, epochs = [], []
    for batch in take(loader, loader.batches_per_epoch + 3):  # into the next round
        keys += batch["keys"]
        epochs.append(loader.epochs())
    assert (np.diff(np.array(epochs), axis=0) >= 0).all()  # no source's count of epochs drops
    keys = keys[: loader.batches_per_epoch * 4]
    small = [k for k in keys if source_of(k) == "small"]
    big = [k for k in keys if source_of(k) == "big"]
    assert len(small) == len(big) == 26
    # two whole epochs of the small corpus (each clip once), then the third one begun ...
    assert sorted(small[:SMALL_CLIPS]) == sorted(small[SMALL_CLIPS : 2 * SMALL_CLIPS])
    assert len(set(small[:SMALL_CLIPS])) == SMALL_CLIPS
    assert small[:SMALL_CLIPS] != small[SMALL_CLIPS : 2 * SMALL_CLIPS]  # reshuffled
    # ... while the big one is still in its first: no clip twice
    assert len(set(big)) == len(big)
    big_epochs, small_epochs = epochs[loader.batches_per_epoch - 1]
    assert 2 < small_epochs < 3 and 0.5 < big_epochs < 1


def test_epochs_per_source_never_drop_at_a_round_boundary(shard_dirs, small_source, model):
    cfg = mix_config(shard_dirs["audio"], small_source, weights=(0.9, 0.1), batch_size=2)
    loader = build_train_loader(cfg, layout_of(model))
    it, epochs = iter(loader), []
    for _ in range(loader.batches_per_epoch + 6):  # a rare source: not drawn at once
        next(it)
        epochs.append(loader.epochs())
    assert (np.diff(np.array(epochs), axis=0) >= 0).all()
    assert epochs[-1][1] > 0


@pytest.mark.parametrize(("workers", "bucket"), [(0, False), (2, False), (0, True)])
def test_state_dict_resumes_the_same_sequence(shard_dirs, small_source, model, workers, bucket):
    data = {"batch_size": 3, "num_workers": workers}
    if bucket:
        data |= {"bucket_by_length": True, "max_batch_seconds": 30.0}
    cfg = mix_config(shard_dirs["audio"], small_source, **data)
    first = build_train_loader(cfg, layout_of(model))
    per_round = first.batches_per_epoch
    it = iter(first)
    cut = per_round + 5  # mid-round, after a round boundary moved the sources on
    for _ in range(cut):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint keeps it
    after = [next(it) for _ in range(per_round)]  # on across the next round boundary
    resumed = build_train_loader(cfg, layout_of(model))
    resumed.load_state_dict(state)
    again = take(resumed, per_round)
    if workers:  # the DataLoader asks worker 0 first again: the round's rest in another order
        left = 2 * per_round - cut
        assert sorted(b["keys"] for b in again[:left]) == sorted(b["keys"] for b in after[:left])
        again, after = again[left:], after[left:]
    assert [b["keys"] for b in again] == [b["keys"] for b in after]
    for a, b in zip(again, after, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"])
    assert resumed.samples == first.samples
    assert resumed.seconds == pytest.approx(first.seconds)  # summed in another order
    mine, theirs = resumed.state_dict(), first.state_dict()
    mine["mixture"].pop("seconds"), theirs["mixture"].pop("seconds")
    assert mine == theirs


def test_resume_at_a_round_end_starts_the_next_round_where_the_sources_were(
    shard_dirs, small_source, model
):
    cfg = mix_config(shard_dirs["audio"], small_source, batch_size=4)
    first = build_train_loader(cfg, layout_of(model))
    n = first.batches_per_epoch
    it = iter(first)
    for _ in range(n):
        next(it)
    state = first.state_dict()  # every batch of round 0 taken; round 1 not begun
    after = [next(it)["keys"] for _ in range(3)]
    resumed = build_train_loader(cfg, layout_of(model))
    resumed.load_state_dict(state)
    assert [b["keys"] for b in take(resumed, 3)] == after


def test_every_world_size_dividing_the_step_draws_the_same_sources(shard_dirs, small_source, model):
    def sources_per_step(world: int) -> list[Counter]:
        cfg = mix_config(shard_dirs["audio"], small_source, batch_size=8 // world)
        ranks = [
            take(build_train_loader(cfg, layout_of(model), rank=r, world_size=world), 6)
            for r in range(world)
        ]
        return [
            Counter(source_of(k) for rank in ranks for k in rank[step]["keys"]) for step in range(6)
        ]

    one = sources_per_step(1)
    assert one == sources_per_step(2) == sources_per_step(4)
    assert all(step["small"] in (1, 2) for step in one)  # 8 x 0.2 = 1.6: floor or ceil


def test_one_source_list_is_the_plain_corpus(shard_dirs, model):
    folder = str(shard_dirs["mel"])
    listed = DataConfig(train_shards=[ShardSource(folder, 3.0)], batch_size=4, num_workers=0)
    plain = DataConfig(train_shards=folder, batch_size=4, num_workers=0)
    a = take(build_train_loader(listed, layout_of(model)), 5)
    b = take(build_loader(plain, layout_of(model), spec=folder), 5)
    assert [x["keys"] for x in a] == [x["keys"] for x in b]


def test_resume_refuses_other_sources(shard_dirs, small_source, model):
    cfg = mix_config(shard_dirs["audio"], small_source, batch_size=4)
    state = build_train_loader(cfg, layout_of(model)).state_dict()
    other = DataConfig(
        train_shards=[
            ShardSource(str(shard_dirs["audio"]), name="a"),
            ShardSource(str(small_source)),
        ],
        batch_size=4,
        num_workers=0,
    )
    with pytest.raises(AudioLLMError, match="resume with the same data.train_shards list"):
        build_train_loader(other, layout_of(model)).load_state_dict(state)
    plain = DataConfig(train_shards=str(small_source), batch_size=4, num_workers=0)
    with pytest.raises(AudioLLMError, match=r"for the mixture \['big', 'small'\]"):
        build_train_loader(plain, layout_of(model)).load_state_dict(state)
    single_state = build_train_loader(plain, layout_of(model)).state_dict()
    with pytest.raises(AudioLLMError, match="is for one corpus, this run mixes"):
        build_train_loader(cfg, layout_of(model)).load_state_dict(single_state)


def test_sources_must_share_a_mode(shard_dirs, small_source, model):
    cfg = DataConfig(
        train_shards=[ShardSource(str(shard_dirs["mel"])), ShardSource(str(small_source))],
        num_workers=0,
    )
    with pytest.raises(AudioLLMError, match="different modes"):
        build_train_loader(cfg, layout_of(model))


def test_a_missing_source_is_named(shard_dirs, tmp_path, model):
    cfg = DataConfig(
        train_shards=[ShardSource(str(shard_dirs["audio"])), ShardSource(str(tmp_path / "gone"))],
        num_workers=0,
    )
    with pytest.raises(AudioLLMError, match="source 'gone'"):
        build_train_loader(cfg, layout_of(model))
