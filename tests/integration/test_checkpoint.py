"""audio_llm.train.checkpoint with real DeepSpeed engines (ZeRO-2/3, torch Adam, fp32) in launched
processes, one rank and two, with the worker at the bottom of this file: resume, pruning, frozen
weights and DeepSpeed's own tools.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from audio_llm.errors import AudioLLMError
from audio_llm.train import checkpoint as ckpt
from audio_llm.train.checkpoint import CheckpointManager, latest, resolve_resume, tag_for
from tests.integration.launch import deepspeed_cmd, run_launch, worker_env


# -- real DeepSpeed engines ------------------------------------------------------------------
@pytest.fixture(
    scope="module",
    params=[(1, 2), (2, 2), (2, 3)],
    ids=["1rank-zero2", "2ranks-zero2", "2ranks-zero3"],
)
def deepspeed_run(request, tmp_path_factory) -> tuple[int, list[dict], Path]:
    world, stage = request.param
    out = tmp_path_factory.mktemp(f"ds{world}-zero{stage}")
    args = ["--out", str(out), "--stage", str(stage)]
    if world == 1:  # no launcher at all: dist.init_distributed sets up a 1-rank group
        cmd = [sys.executable, "-m", "tests.integration.test_checkpoint", *args]
    else:
        cmd = deepspeed_cmd(world, "tests.integration.test_checkpoint", *args)
    result = run_launch(cmd, worker_env())
    assert result.returncode == 0, result.stdout[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    return world, ranks, out / "run"


def test_resume_matches_an_uninterrupted_run(deepspeed_run):
    _, ranks, _ = deepspeed_run
    for r, res in enumerate(ranks):
        assert res["resumed_from"].endswith(tag_for(3))
        assert res["client_state"] == {"step": 3, "note": "audio_llm"}
        assert res["rank_state"] == {"rank": r, "step": 3}
        assert res["fresh_differs"] > 1e-3  # the second engine really started elsewhere
        assert res["resume_diff"] < 1e-6
        assert res["lr_resumed"] == pytest.approx(res["lr_uninterrupted"])
        assert res["global_steps_resumed"] == 5


def test_only_keep_last_complete_checkpoints_remain(deepspeed_run):
    _, ranks, run = deepspeed_run
    assert ranks[0]["after_saves"] == [tag_for(2), tag_for(3)]
    # The simulated kill left step 4 without a marker, and DeepSpeed's `latest` points at it.
    assert (run / "checkpoints" / "latest").read_text().strip() == tag_for(4)
    assert not ckpt.is_complete(run / "checkpoints" / tag_for(4))
    assert latest(run) == run / "checkpoints" / tag_for(3)


def test_frozen_parameters_are_not_in_the_checkpoint(deepspeed_run):
    _, ranks, run = deepspeed_run
    files = list((run / "checkpoints" / tag_for(3)).glob("*model_states.pt"))
    assert files
    assert ranks[0]["aliases"] == ["3.weight"]  # the model has a tied frozen weight to leave out
    for file in files:  # one file, or one per rank under ZeRO-3
        states = torch.load(file, weights_only=False)
        assert set(states["module"]) == {"2.weight", "2.bias"}  # layer 0 and its alias are frozen
    assert ranks[0]["frozen_unchanged"]


def test_an_old_checkpoint_with_frozen_weights_still_resumes(deepspeed_run):
    _, ranks, _ = deepspeed_run
    for res in ranks:
        assert {"0.weight", "3.weight"} <= set(res["old_saved"])  # frozen weights in the file
        assert res["old_client_state"] == {"step": 3}
        assert res["old_resume_diff"] < 1e-6


def test_zero_to_fp32_reads_our_checkpoint(deepspeed_run):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    world, ranks, run = deepspeed_run
    state = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag=tag_for(3))
    assert set(state) == {"2.weight", "2.bias"}
    for name, values in ranks[0]["params_at_3"].items():
        assert torch.allclose(state[name], torch.tensor(values), atol=1e-7), name
    shards = list((run / "checkpoints" / tag_for(3)).glob("*optim_states.pt"))
    assert len(shards) == world  # one ZeRO shard per rank


def test_load_refuses_a_different_model(deepspeed_run):
    _, ranks, _ = deepspeed_run
    assert "missing trainable ['4.bias', '4.weight']" in ranks[0]["mismatch_error"]


# -- worker ----------------------------------------------------------------------------------
class Alias(nn.Module):
    """Layer 0's frozen weight under a second name, as Qwen2-VL's lm_head shares the frozen input
    embeddings (named_parameters() lists it once, state_dict() twice). Passes its input on."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _worker(out_dir: Path, stage: int) -> None:
    import deepspeed
    from torch import nn

    from audio_llm import dist
    from audio_llm.config import TrainConfig
    from audio_llm.train.schedule import make_scheduler

    dist.init_distributed()
    me = dist.rank()
    train = TrainConfig(lr=1e-2, warmup_steps=2, max_steps=10)
    ds = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": train.lr, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
    }

    def build(trainable_seed: int, extra_layer: bool = False):
        torch.manual_seed(0)  # the frozen layer: identical in every build, like pretrained weights
        layers = [nn.Linear(4, 8), nn.ReLU()]
        torch.manual_seed(trainable_seed)
        layers.append(nn.Linear(8, 2))
        if extra_layer:
            layers += [nn.ReLU(), nn.Linear(2, 2)]
        layers.append(Alias(layers[0].weight))  # last, so the other layers keep their names
        model = nn.Sequential(*layers)
        model[0].requires_grad_(False)
        engine, *_ = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=ds,
            lr_scheduler=lambda opt: make_scheduler(opt, train),
        )
        return engine

    gen = torch.Generator().manual_seed(100 + me)  # each rank its own data
    batches = [
        (torch.randn(2, 4, generator=gen), torch.randn(2, 2, generator=gen)) for _ in range(5)
    ]

    def train_step(engine, step: int) -> None:
        x, y = batches[step - 1]
        loss = (engine(x) - y).pow(2).mean()
        engine.backward(loss)
        engine.step()

    def gathered(engine, trainable_only: bool = True) -> dict[str, torch.Tensor]:
        """Full tensors, also under ZeRO-3 where each rank holds a shard."""
        params = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
        if not trainable_only:
            params = list(engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=stage == 3):
            return {n: p.detach().clone() for n, p in params}

    def trainable(engine) -> dict[str, torch.Tensor]:
        return gathered(engine)

    run = out_dir / "run"
    manager = CheckpointManager(run, keep_last=2)
    a = build(trainable_seed=1)
    frozen_before = gathered(a, trainable_only=False)["0.weight"]
    params_at_3 = {}
    for step in range(1, 6):
        train_step(a, step)
        if step <= 3:
            manager.save(a, step, {"step": step, "note": "audio_llm"}, {"rank": me, "step": step})
        if step == 3:
            params_at_3 = {n: t.tolist() for n, t in trainable(a).items()}
            after_saves = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())
            # A job killed after DeepSpeed's files but before our marker:
            a.save_checkpoint(str(run / "checkpoints"), tag=tag_for(4), client_state={})
            # As saved before frozen weights were left out: every weight, aliases too.
            a.save_checkpoint(
                str(out_dir / "old"), tag=tag_for(3), client_state={ckpt.CLIENT_KEY: {"step": 3}}
            )
            if me == 0:
                marker = {"step": 3, "world_size": dist.world_size()}
                (out_dir / "old" / tag_for(3) / ckpt.MARKER).write_text(json.dumps(marker))
            dist.barrier()
    uninterrupted = trainable(a)
    aliases = sorted(
        {n for n, _ in a.module.named_parameters(remove_duplicate=False)}
        - {n for n, _ in a.module.named_parameters()}
    )

    b = build(trainable_seed=2)
    fresh_differs = max(
        (trainable(b)[n] - uninterrupted[n]).abs().max().item() for n in uninterrupted
    )
    path = resolve_resume("auto", run)
    client_state = ckpt.load(b, path)
    rank_state = ckpt.load_rank_state(path)
    for step in (4, 5):
        train_step(b, step)
    resumed = trainable(b)

    d = build(trainable_seed=2)
    old_client_state = ckpt.load(d, out_dir / "old" / tag_for(3))
    for step in (4, 5):
        train_step(d, step)
    old_resumed = trainable(d)

    c = build(trainable_seed=1, extra_layer=True)
    try:
        ckpt.load(c, path)
        mismatch_error = ""
    except AudioLLMError as exc:
        mismatch_error = str(exc)

    result = {
        "resumed_from": str(path),
        "client_state": client_state,
        "rank_state": rank_state,
        "fresh_differs": fresh_differs,
        "resume_diff": max((resumed[n] - uninterrupted[n]).abs().max().item() for n in resumed),
        "lr_uninterrupted": a.get_lr()[0],
        "lr_resumed": b.get_lr()[0],
        "global_steps_resumed": b.global_steps,
        "after_saves": after_saves,
        "params_at_3": params_at_3,
        "frozen_unchanged": torch.equal(gathered(b, False)["0.weight"], frozen_before),
        "mismatch_error": mismatch_error,
        "aliases": aliases,
        "old_client_state": old_client_state,
        "old_saved": sorted(
            torch.load(
                next((out_dir / "old" / tag_for(3)).glob("*model_states.pt")), weights_only=False
            )["module"]
        ),
        "old_resume_diff": max(
            (old_resumed[n] - uninterrupted[n]).abs().max().item() for n in old_resumed
        ),
    }
    (out_dir / f"rank{me}.json").write_text(json.dumps(result))
    dist.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--local_rank", type=int, default=None)
    cli = parser.parse_args()
    _worker(cli.out, cli.stage)
