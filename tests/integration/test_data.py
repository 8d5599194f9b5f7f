"""Resuming the data pipeline in a new process: from the loader state a checkpoint stores, a fresh
interpreter yields exactly what the uninterrupted epoch had left (fixed and bucketed batches)."""

import json
import subprocess
import sys
import textwrap
from collections import Counter

from audio_llm.config import DataConfig
from audio_llm.data import build_loader, layout_of
from tests.data import corpus
from tests.data.corpus import one_epoch
from tests.integration.launch import REPO

# the data tests' fixtures (tests/data/conftest.py gives them to the tests under tests/data/)
shard_dirs = corpus.shard_dirs
bucket_shards = corpus.bucket_shards
model = corpus.model


STREAM_RESUME_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from audio_llm.config import DataConfig, ModelConfig
    from audio_llm.data import build_loader, layout_of
    from audio_llm.model.build import build_audio_llm
    args = json.loads(sys.argv[1])
    model = build_audio_llm(ModelConfig(**args["model"]))
    cfg = DataConfig(batch_size=3, num_workers=2, shuffle_buffer=8)
    loader = build_loader(cfg, layout_of(model), spec=args["shards"])
    loader.load_state_dict(args["state"])
    left = loader.batches_per_epoch - sum(args["state"]["consumed"])
    it = iter(loader)
    print(json.dumps([k for _ in range(left) for k in next(it)["keys"]]))
    """
)


def test_resume_in_a_new_process_continues_with_the_unseen_samples(shard_dirs, model, model_config):
    cfg = DataConfig(batch_size=3, num_workers=2, shuffle_buffer=8)
    full = build_loader(cfg, layout_of(model), spec=str(shard_dirs["audio"]))
    n = full.batches_per_epoch
    whole = iter(full)
    reference = [k for _ in range(n) for k in next(whole)["keys"]]

    partial = build_loader(cfg, layout_of(model), spec=str(shard_dirs["audio"]))
    it = iter(partial)
    seen = [k for _ in range(5) for k in next(it)["keys"]]
    state = json.loads(json.dumps(partial.state_dict()))  # as a checkpoint stores it
    args = {"model": vars(model_config), "shards": str(shard_dirs["audio"]), "state": state}
    proc = subprocess.run(
        [sys.executable, "-c", STREAM_RESUME_SCRIPT, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rest = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not set(seen) & set(rest)
    assert sorted(seen + rest) == sorted(reference)
    assert len(seen + rest) == len(reference)


BUCKET_RESUME_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from audio_llm.config import DataConfig, ModelConfig
    from audio_llm.data import build_loader, layout_of
    from audio_llm.model.build import build_audio_llm
    args = json.loads(sys.argv[1])
    model = build_audio_llm(ModelConfig(**args["model"]))
    loader = build_loader(DataConfig(**args["data"]), layout_of(model), spec=args["shards"])
    loader.load_state_dict(args["state"])
    left = loader.batches_per_epoch - sum(args["state"]["consumed"])
    it = iter(loader)
    print(json.dumps([next(it)["keys"] for _ in range(left)]))
    """
)


def test_resume_in_a_new_process_gives_the_same_budget_batches(bucket_shards, model, model_config):
    data = {
        "batch_size": 4,
        "num_workers": 2,
        "shuffle_buffer": 6,
        "bucket_by_length": True,
        "max_batch_seconds": 30.0,
    }
    cfg = DataConfig(**data)
    reference, _ = one_epoch(cfg, model, bucket_shards)
    partial = build_loader(cfg, layout_of(model), spec=str(bucket_shards))
    it = iter(partial)
    seen = [next(it)["keys"] for _ in range(5)]
    state = json.loads(json.dumps(partial.state_dict()))  # as a checkpoint stores it
    args = {"model": vars(model_config), "data": data, "shards": str(bucket_shards), "state": state}
    proc = subprocess.run(
        [sys.executable, "-c", BUCKET_RESUME_SCRIPT, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rest = json.loads(proc.stdout.strip().splitlines()[-1])
    batches = Counter(tuple(sorted(keys)) for keys in seen + rest)
    assert batches == Counter(tuple(sorted(b["keys"])) for b in reference)  # the same batches
