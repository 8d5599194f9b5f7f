"""The model trains in training mode from step 1 (fresh and resumed): `train.run.train()` run
in-process on the tiny models, one rank, with `model.gradient_checkpointing=true`.

transformers checkpoints a decoder layer only when that layer is in training mode, and
`from_pretrained` returns the LLM in eval mode: without `.train()` the first steps (until a
periodic eval restored the mode) ran without checkpointing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers.modeling_utils

from audio_llm import dist
from audio_llm.config import ModelConfig, load_config

REPO = Path(__file__).resolve().parents[2]
SHARDS = REPO / "shards" / "sample" / "audio"


def _config(tiny_models, out_dir: Path, steps: int):
    overrides = {
        "model.encoder": tiny_models["whisper"],
        "model.llm": tiny_models["qwen2vl"],
        "model.gradient_checkpointing": "true",
        "data.train_shards": SHARDS,
        "data.batch_size": 2,
        "data.num_workers": 0,
        "train.stage": 2,
        "model.projector_init": "",
        "train.max_steps": steps,
        "train.save_every": 2,
        "train.log_every": 1,
        "train.out_dir": out_dir,
    }
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()])


@pytest.fixture
def process_group():
    yield
    if dist.is_initialized():  # train() made one in this process: later tests start clean
        dist.shutdown()


def _modes(module: torch.nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in module.named_modules()}


def test_checkpointing_acts_from_the_first_step_and_a_resumed_run_keeps_the_mode(
    tiny_models, tmp_path, monkeypatch, process_group
):
    import audio_llm.train.trainer as trainer
    from audio_llm.model.build import build_audio_llm
    from audio_llm.train.run import train

    calls = []
    real_checkpoint = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(1)
        return real_checkpoint(*args, **kwargs)

    # transformers binds the name at import; patch both so either path counts.
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counting_checkpoint)

    steps: list[tuple[int, dict[str, bool]]] = []  # per step: checkpoint calls, module modes
    real_step = trainer.train_step

    def recording_step(engine, *args, **kwargs):
        before = len(calls)
        modes = _modes(engine.module)  # as the step's forward sees it
        result = real_step(engine, *args, **kwargs)
        steps.append((len(calls) - before, modes))
        return result

    monkeypatch.setattr(trainer, "train_step", recording_step)
    # stage 2 starts from a projector file: a freshly initialised one will do
    init = tmp_path / "projector.safetensors"
    probe = build_audio_llm(
        ModelConfig(encoder=str(tiny_models["whisper"]), llm=str(tiny_models["qwen2vl"]))
    )
    probe.projector.save(init)
    layers = probe.llm.config.text_config.num_hidden_layers

    run = tmp_path / "run"
    cfg = _config(tiny_models, run, steps=2)
    cfg.model.projector_init = str(init)
    train(cfg, "ds_configs/zero2.json", resume="none")
    first_calls, first_modes = steps[0]
    assert first_calls >= layers, f"step 1 checkpointed {first_calls} of {layers} decoder layers"
    decoder = [n for n in first_modes if n.split(".")[-2:-1] == ["layers"] and "llm" in n]
    assert decoder and all(first_modes[n] for n in decoder)
    assert not any(mode for n, mode in first_modes.items() if n.startswith("encoder"))

    cfg = _config(tiny_models, run, steps=3)
    cfg.model.projector_init = str(init)
    train(cfg, "ds_configs/zero2.json", resume="auto")
    resumed_calls, resumed_modes = steps[-1]
    assert len(steps) == 3  # 2 steps, then 1 after resuming at step 2
    assert resumed_calls >= layers
    assert resumed_modes == first_modes
