"""train.trainer's step loop: what the steps between two log lines add up (`Interval`)."""

import pytest


def test_interval_adds_model_and_executed_flops_and_the_prompts_share_of_positions():
    import torch

    from audio_llm.train.step import StepResult
    from audio_llm.train.trainer import Interval

    def step(**counts) -> StepResult:
        return StepResult(torch.zeros(1), 1.0, 1.0, {}, None, True, counts)

    interval = Interval()
    interval.add(
        step(flops=2.0, flops_executed=3.0, tokens=100, audio_positions=60, target_tokens=20)
    )
    interval.add(
        step(flops=1.0, flops_executed=1.5, tokens=50, audio_positions=30, target_tokens=5)
    )
    assert (interval.flops, interval.flops_executed) == (3.0, 4.5)
    # 150 real positions: 90 audio, 25 targets, the other 35 template and instruction
    assert interval.prompt_position_ratio() == pytest.approx(35 / 150)
    assert Interval().prompt_position_ratio() == 0.0
