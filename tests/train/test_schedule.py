"""audio_llm.train.schedule: hand-computed learning rates and a resumable LambdaLR."""

from __future__ import annotations

import pytest
import torch

from audio_llm.config import TrainConfig
from audio_llm.train.schedule import lr_at, make_scheduler


def cfg(**kw) -> TrainConfig:
    base = dict(lr=1e-3, warmup_steps=10, max_steps=110, min_lr_ratio=0.1, schedule="cosine")
    return TrainConfig(**(base | kw))


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 0.0),  # warmup starts at zero
        (5, 5e-4),
        (10, 1e-3),  # peak at the end of warmup
        (35, 1e-3 * (0.1 + 0.9 * 0.5 * (1 + 0.7071067811865476))),  # cos(pi/4)
        (60, 0.55e-3),  # halfway: (1 + 0.1) / 2
        (110, 1e-4),  # floor at max_steps
        (500, 1e-4),  # and after it
    ],
)
def test_cosine_schedule(step, expected):
    assert lr_at(step, cfg()) == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize(("step", "expected"), [(5, 5e-4), (35, 0.775e-3), (60, 0.55e-3)])
def test_linear_schedule(step, expected):
    assert lr_at(step, cfg(schedule="linear")) == pytest.approx(expected, rel=1e-12)


def test_constant_schedule_still_warms_up():
    c = cfg(schedule="constant")
    assert [lr_at(s, c) for s in (0, 5, 10, 109, 1000)] == pytest.approx(
        [0.0, 5e-4, 1e-3, 1e-3, 1e-3]
    )


def test_no_warmup_starts_at_peak():
    assert lr_at(0, cfg(warmup_steps=0)) == pytest.approx(1e-3)


def test_warmup_longer_than_training_does_not_divide_by_zero():
    c = cfg(warmup_steps=20, max_steps=20)
    assert lr_at(19, c) == pytest.approx(0.95e-3)
    assert lr_at(20, c) == pytest.approx(1e-4)


def _optimizer(lr: float = 1e-3) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def test_scheduler_follows_lr_at_step_by_step():
    c = cfg()
    opt = _optimizer()
    sched = make_scheduler(opt, c)
    seen = []
    for _ in range(120):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([lr_at(s, c) for s in range(120)], rel=1e-12, abs=1e-15)


def test_scheduler_resumes_from_its_state_dict():
    c = cfg()
    opt = _optimizer()
    sched = make_scheduler(opt, c)
    for _ in range(37):
        opt.step()
        sched.step()
    state = sched.state_dict()

    opt2 = _optimizer()
    sched2 = make_scheduler(opt2, c)
    sched2.load_state_dict(state)
    opt.step()
    sched.step()
    opt2.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == pytest.approx(lr_at(38, c))


def test_resumed_scheduler_follows_the_current_config():
    # The saved state is a position, not a schedule: extending max_steps on resume takes effect.
    opt = _optimizer()
    sched = make_scheduler(opt, cfg())
    for _ in range(50):
        opt.step()
        sched.step()
    state = sched.state_dict()
    assert state["lr_lambdas"] == [None]

    longer = cfg(max_steps=1010)
    opt2 = _optimizer()
    sched2 = make_scheduler(opt2, longer)
    sched2.load_state_dict(state)
    opt2.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(lr_at(51, longer))
    assert lr_at(51, longer) != pytest.approx(lr_at(51, cfg()))


def test_parameter_groups_keep_their_ratio():
    c = cfg()
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a], "lr": 1e-3}, {"params": [b], "lr": 2e-3}])
    sched = make_scheduler(opt, c)
    for _ in range(5):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-4, 1e-3])
