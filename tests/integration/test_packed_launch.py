"""A real launch with packed LLM rows (`data.pack_tokens`): the same losses as the padded run,
step for step, and fewer padded positions in its throughput panel. Stage 1 (stage 2 needs a
stage-1 export first): the packed rows still run through the LLM both ways, and the CTC head
sees the clips one per row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def _metrics(run_dir: Path) -> dict[int, dict]:
    """Every value logged at each step, the lines of a step merged."""
    steps: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "step" in row:
            steps.setdefault(int(row["step"]), {}).update(row)
    return steps


def test_packed_rows_train_like_padded_ones(tiny_models, tmp_path):
    from tests.integration.test_train_launch import common, launch

    runs = {}
    for pack in (0, 4096):
        out = tmp_path / f"pack{pack}"
        overrides = [*common(tiny_models, out, 2), "data.batch_size=4", f"data.pack_tokens={pack}"]
        launch(1, [*overrides, "model.varlen_encoder=true", "train.ctc_weight=0.5"], gpus=1)
        runs[pack] = _metrics(out)
    padded, packed = runs[0], runs[4096]
    for step in (1, 2):
        assert packed[step]["train/loss"] == pytest.approx(padded[step]["train/loss"], rel=1e-4)
    assert packed[1]["perf/padding_ratio"] < padded[1]["perf/padding_ratio"]
