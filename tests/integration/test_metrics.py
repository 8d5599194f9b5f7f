"""audio_llm.train.metrics across two launched ranks: step-time skew, and metrics from rank 0 only
(the worker is at the bottom of this file)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from audio_llm import dist
from audio_llm.train.metrics import METRICS_FILE, MetricsLogger, step_time_skew
from tests.integration.launch import deepspeed_cmd, run_launch, worker_env


def test_step_time_skew_across_two_ranks(tmp_path):
    cmd = deepspeed_cmd(2, "tests.integration.test_metrics", "--out", str(tmp_path))
    out = run_launch(cmd, worker_env())
    assert out.returncode == 0, out.stdout[-4000:]
    for r in range(2):
        skew = json.loads((tmp_path / f"skew{r}.json").read_text())
        assert skew == {"step_s_max": 3.0, "step_s_min": 1.0, "step_s_skew": 3.0}
    # Only rank 0 wrote metrics.
    rows = (tmp_path / "run" / METRICS_FILE).read_text().splitlines()
    assert [json.loads(r)["step_s_skew"] for r in rows] == [3.0]


def _worker(out_dir: Path) -> None:
    dist.init_distributed()
    skew = step_time_skew(1.0 + 2.0 * dist.rank())  # rank 0: 1 s, rank 1: 3 s
    with MetricsLogger(out_dir / "run") as logger:
        logger.scalars(1, skew)
    (out_dir / f"skew{dist.rank()}.json").write_text(json.dumps(skew))
    dist.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--local_rank", type=int, default=None)
    _worker(parser.parse_args().out)
