"""evaluation.evaluate without a model: how samples are dealt to ranks, counted and reported."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from audio_llm.data import Problems, ShardSet, eval_samples
from audio_llm.evaluation.evaluate import EvalResult

SHARDS = Path(__file__).resolve().parents[2] / "shards" / "sample" / "audio"


def test_two_ranks_count_a_cut_shard_once_and_share_its_samples(tmp_path):
    folder = tmp_path / "shards"
    shutil.copytree(SHARDS, folder)
    shards = ShardSet.open(str(folder))
    for shard in shards.shards[1:3]:  # one shard counted by each rank (shard number % 2)
        data = Path(shard.url).read_bytes()
        Path(shard.url).write_bytes(data[: len(data) // 2])
    counts: Counter = Counter()
    keys: list[str] = []
    for rank in (0, 1):  # what each of 2 ranks reads and counts
        problems = Problems()
        keys += [s.key for s in eval_samples(shards, rank, 2, "skip", problems)]
        counts.update(problems.counts)
    assert counts == {"corrupt_shard": 2}  # each cut shard once, not once per rank
    assert len(keys) == len(set(keys))  # no sample twice
    alone = [s.key for s in eval_samples(shards, 0, 1, "skip", Problems())]
    assert sorted(keys) == sorted(alone) and len(alone) < 24


def _result(scored: int, **kwargs) -> EvalResult:
    report = SimpleNamespace(wer=0.032, to_dict=lambda: {"wer": 0.032})
    return EvalResult([{"id": str(i)} for i in range(scored)], report, 1.0, indexed=24, **kwargs)


def test_headline_says_what_the_wer_is_over_and_what_was_not_scored():
    full = _result(24)
    assert full.headline() == "WER 3.20% over 24 of 24 indexed utterances"
    cut = _result(22, problems={"corrupt_shard": 1})
    assert cut.headline() == (
        "WER 3.20% over 22 of 24 indexed utterances (2 not scored: data problems "
        "corrupt_shard 1 (named in the log))"
    )
    assert cut.summary()["not_scored"] == 2 and cut.summary()["indexed_utterances"] == 24
    assert "(14 not scored: --limit 10)" in _result(10, limit=10).headline()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--shards", "a", "b", "--out", "o"], "2 --shards but 1 --out"),
        (["--shards", "a", "b", "--out", "o", "o"], "the same folder twice"),
        (["--shards", "a", "b", "--out", "o", "./o"], "the same folder twice"),
        (["--shards", "a", "b", "--out", "o", "p", "--index", "i.json"], "give one --shards"),
    ],
)
def test_eval_of_several_sets_needs_one_out_each(tmp_path, capsys, extra, message):
    """Several test sets in one `audio-llm eval`: refused before any model is loaded."""
    from audio_llm.cli import main

    assert main(["eval", "--run", str(tmp_path / "missing-run"), *extra]) == 2
    assert message in capsys.readouterr().err
