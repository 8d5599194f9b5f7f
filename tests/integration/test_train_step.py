"""The real `train_step` on real DeepSpeed engines (ZeRO-2, gloo, tiny models): every target token
weighs the same across micro-batches and ranks, and a non-finite loss on one rank skips the step on
all of them.

The same file is the worker the tests launch
(`torchrun ... tests/integration/test_train_step.py PLAN OUT`): it builds a stage-1 model with the
CTC term, an engine with plain SGD at lr 1 (so a step moves the weights by exactly minus the
gradient), runs the plan's steps and saves what moved.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 300
# Each plan: world size, grad accum, and per step the batch names of each rank's micro-batches.
# A has 2 clips with short transcripts, B 3 clips with long ones: per-batch means weigh A's
# tokens several times more than B's, as length bucketing does.
PLANS = {
    "two_ranks": (2, 1, [[["A"], ["B"]], [["A"], ["B_nan"]], [["A"], ["B"]]]),
    "one_rank_concatenated": (1, 1, [[["A+B"]]]),
    "one_rank_accum": (1, 2, [[["A", "B"]]]),
}
SHORT = ["yes", "no way"]
LONG = [
    "the quick brown fox jumps over the lazy dog again and again",
    "a much longer transcript with many more tokens than the short batch holds",
    "she sells sea shells by the sea shore every single summer morning",
]


def _batches(model) -> dict[str, dict]:
    from audio_llm.model.prompts import IGNORE_INDEX
    from tests.helpers import training_batch

    a = training_batch(model, [300, 170], SHORT, seed=1)
    b = training_batch(model, [240, 200, 280], LONG, seed=2)
    b_nan = {**b, "input_features": b["input_features"].clone()}
    b_nan["input_features"][1, :, :10] = float("nan")  # one clip's audio: its loss is NaN
    pad = model.tokenizer.pad_token_id
    fills = {"input_ids": pad, "labels": IGNORE_INDEX, "attention_mask": 0, "input_features": 0.0}
    both = {}
    for key, fill in fills.items():
        width = max(a[key].shape[-1], b[key].shape[-1])
        padded = [
            torch.nn.functional.pad(t[key], (0, width - t[key].shape[-1]), value=fill)
            for t in (a, b)
        ]
        both[key] = torch.cat(padded)
    both["feature_lengths"] = torch.cat([a["feature_lengths"], b["feature_lengths"]])
    out = {"A": a, "B": b, "B_nan": b_nan, "A+B": both}
    for batch in out.values():
        batch["stats"] = {"samples": len(batch["labels"])}
    return out


def worker(plan_name: str, out_dir: str) -> None:
    """Run one plan on this rank; rank r writes `out_dir/rank{r}.pt`."""
    import deepspeed

    from audio_llm import dist
    from audio_llm.config import ModelConfig
    from audio_llm.model.build import build_audio_llm
    from audio_llm.train.metrics import StepTimer
    from audio_llm.train.step import check_engine, read_steps, train_step

    world, accum, steps = PLANS[plan_name]
    dist.init_distributed()
    assert dist.world_size() == world
    models = json.loads(os.environ["TINY_MODELS"])
    torch.manual_seed(0)
    cfg = ModelConfig(encoder=models["whisper"], llm=models["qwen2vl"], dtype="float32")
    model = build_audio_llm(cfg, ctc_weight=0.5)
    params = [p for p in model.parameters() if p.requires_grad]
    ds = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": accum,
        "train_batch_size": 2 * accum * world,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=params, optimizer=torch.optim.SGD(params, lr=1.0), config=ds
    )
    check_engine(engine)
    named = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
    batches = _batches(model)
    weights = [{n: p.detach().clone() for n, p in named.items()}]
    results = []
    for step in steps:
        mine = iter([batches[name] for name in step[dist.rank()]])
        results.append(train_step(engine, mine, accum, StepTimer()))
        weights.append({n: p.detach().clone() for n, p in named.items()})
    torch.save(
        {
            "weights": weights,
            "finite": [r.finite for r in results],
            "read": read_steps(results),
            "targets": [r.targets for r in results],
        },
        Path(out_dir) / f"rank{dist.rank()}.pt",
    )
    dist.shutdown()


def _run(plan: str, tiny_models, out: Path) -> list[dict]:
    from audio_llm.dist import free_port

    world = PLANS[plan][0]
    out.mkdir(parents=True)
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--nproc_per_node", str(world), "--master_port", str(free_port())]
    cmd += [str(Path(__file__)), plan, str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env["TINY_MODELS"] = json.dumps({k: str(v) for k, v in tiny_models.items()})
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


def _moved(run: dict, step: int) -> dict[str, torch.Tensor]:
    before, after = run["weights"][step - 1], run["weights"][step]
    return {n: after[n] - before[n] for n in after}


@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory) -> dict[str, list[dict]]:
    root = tmp_path_factory.mktemp("train_step")
    return {plan: _run(plan, tiny_models, root / plan) for plan in PLANS}


def test_uneven_batches_on_two_ranks_step_like_one_rank_on_their_concatenation(runs):
    two, one = runs["two_ranks"], runs["one_rank_concatenated"][0]
    reference = _moved(one, 1)
    assert all(d.abs().sum() > 0 for d in reference.values())
    for rank in (0, 1):
        moved = _moved(two[rank], 1)
        for name, delta in reference.items():  # SGD at lr 1: minus the gradient
            torch.testing.assert_close(moved[name], delta, rtol=1e-4, atol=1e-7, msg=name)
    # the logged loss is the global per-token (and per-clip) mean, the same on every rank
    for key in ("loss", "lm_loss", "ctc_loss"):
        assert two[0]["read"][0][key] == pytest.approx(one["read"][0][key], rel=1e-5), key
        assert two[1]["read"][0][key] == two[0]["read"][0][key]
    assert two[0]["targets"][0] == one["targets"][0]


def test_grad_accum_over_uneven_micro_batches_equals_one_batch(runs):
    accum, one = runs["one_rank_accum"][0], runs["one_rank_concatenated"][0]
    reference = _moved(one, 1)
    moved = _moved(accum, 1)
    for name, delta in reference.items():
        torch.testing.assert_close(moved[name], delta, rtol=1e-4, atol=1e-7, msg=name)
    assert accum["read"][0]["loss"] == pytest.approx(one["read"][0]["loss"], rel=1e-5)


def test_a_nan_loss_on_one_rank_skips_the_step_on_every_rank(runs):
    two = runs["two_ranks"]
    for rank in (0, 1):
        run = two[rank]
        assert run["finite"] == [True, False, True], rank
        for name, before in run["weights"][1].items():  # step 2 moved nothing
            assert torch.equal(run["weights"][2][name], before), (rank, name)
        # step 3 trains again from intact weights and optimizer state
        moved = _moved(run, 3)
        assert all(torch.isfinite(d).all() and d.abs().sum() > 0 for d in moved.values())
        for name, delta in _moved(two[0], 3).items():
            assert torch.equal(moved[name], delta), name  # the same step on both ranks
        assert run["read"][1]["loss"] != run["read"][1]["loss"]  # NaN: not a number to plot


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
