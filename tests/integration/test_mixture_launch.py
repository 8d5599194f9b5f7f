"""A real 2-rank run on two corpora mixed by weight: killed with SIGKILL and resumed, it gives the
same losses as an uninterrupted run, and metrics.jsonl and summary.json count each source."""

import json

import pytest

from tests.integration.test_train_launch import SHARDS, common, launch, losses

# the sample shards' two halves as two corpora (2 shards each: one per rank)
MIXTURE = (
    f"data.train_shards=[{{shards: '{SHARDS}/shard-{{000000..000001}}.tar', "
    f"index: {SHARDS}/index.json, weight: 3, name: read}}, "
    f"{{shards: '{SHARDS}/shard-{{000002..000003}}.tar', "
    f"index: {SHARDS}/index.json, weight: 1, name: chat}}]"
)


def mixed(tiny_models, out, steps: int) -> list[str]:
    return [o for o in common(tiny_models, out, steps) if "train_shards" not in o] + [MIXTURE]


@pytest.mark.timeout(900)  # three launches: slow on a loaded 2-core machine
def test_a_killed_mixture_run_resumes_with_the_same_losses(tiny_models, tmp_path):
    ref = tmp_path / "ref"
    launch(1, mixed(tiny_models, ref, steps=8))  # rounds of 6 steps: step 7 is in the second
    reference = losses(ref)

    run = tmp_path / "killed"
    proc = launch(
        1,
        mixed(tiny_models, run, steps=8),
        env={"AUDIO_LLM_FAULT": "after_step:7"},
        expect_ok=False,
    )
    assert proc.returncode != 0
    launch(1, mixed(tiny_models, run, steps=8))  # resumes from step 6, at the round's end
    resumed = losses(run)
    assert sorted(resumed) == list(range(1, 9))
    for step in range(1, 9):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), step

    summary = json.loads((run / "summary.json").read_text())
    assert summary["start_step"] == 6
    sources = summary["data_sources"]
    assert sources == json.loads((ref / "summary.json").read_text())["data_sources"]
    assert sources["read"]["samples"] + sources["chat"]["samples"] == 8 * 2 * 2  # steps x ranks x b
    assert sources["read"]["samples"] == 24  # 3:1 of 4 samples a step, every step
    assert sources["read"]["audio_seconds"] > 0 and sources["chat"]["epochs"] > 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"mix/read/audio_seconds", "mix/chat/epochs", "mix/chat/samples"} <= set(rows[-1])
