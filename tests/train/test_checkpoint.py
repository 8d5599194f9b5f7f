"""audio_llm.train.checkpoint: completion markers, pruning and resume, tested in-process against a
stand-in engine that writes files the way DeepSpeed does (real DeepSpeed engines, launched: see
tests/integration/test_checkpoint.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from audio_llm.errors import AudioLLMError
from audio_llm.train import checkpoint as ckpt
from audio_llm.train.checkpoint import CheckpointManager, latest, resolve_resume, tag_for


class FakeEngine:
    """Writes a tag folder and DeepSpeed's `latest` file, like `engine.save_checkpoint`."""

    def __init__(self, fail: bool = False, module: nn.Module | None = None) -> None:
        self.fail = fail
        self.calls: list[dict] = []
        self.module = module if module is not None else nn.Linear(2, 2)

    def module_state_dict(self, exclude_frozen_parameters=False):
        # DeepSpeed 0.19's rule: drop the frozen names named_parameters() lists (one per tie)
        state = self.module.state_dict()
        if exclude_frozen_parameters:
            for name, param in self.module.named_parameters():
                if not param.requires_grad and name in state:
                    del state[name]
        return state

    def save_checkpoint(self, save_dir, tag, client_state, exclude_frozen_parameters):
        self.calls.append({"tag": tag, "exclude_frozen": exclude_frozen_parameters})
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        states = {"module": self.module_state_dict(exclude_frozen_parameters=True)}
        torch.save(states, folder / "mp_rank_00_model_states.pt")
        if self.fail:
            raise RuntimeError("killed mid-save")
        (Path(save_dir) / "latest").write_text(tag)


def tags(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())


def test_keeps_only_the_newest_keep_last(tmp_path):
    manager, engine = CheckpointManager(tmp_path, keep_last=2), FakeEngine()
    for step in (1, 2, 3):
        manager.save(engine, step, {"step": step})
    assert tags(tmp_path) == [tag_for(2), tag_for(3)]
    assert latest(tmp_path) == tmp_path / "checkpoints" / "step_00000003"
    assert (tmp_path / "checkpoints" / "latest_complete").read_text().strip() == "step_00000003"
    marker = ckpt.read_marker(latest(tmp_path))
    assert (marker["step"], marker["world_size"]) == (3, 1)
    assert all(call["exclude_frozen"] for call in engine.calls)


def test_keep_last_one_never_deletes_the_newest(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=1)
    for step in (10, 20):
        manager.save(FakeEngine(), step, {})
    assert tags(tmp_path) == [tag_for(20)]


def test_a_folder_without_marker_is_ignored(tmp_path):
    CheckpointManager(tmp_path, keep_last=3).save(FakeEngine(), 1, {})
    with pytest.raises(RuntimeError):
        CheckpointManager(tmp_path, keep_last=3).save(FakeEngine(fail=True), 2, {})
    assert (tmp_path / "checkpoints" / tag_for(2) / "mp_rank_00_model_states.pt").exists()
    assert latest(tmp_path) == tmp_path / "checkpoints" / tag_for(1)
    assert resolve_resume("auto", tmp_path) == tmp_path / "checkpoints" / tag_for(1)
    with pytest.raises(AudioLLMError, match="no COMPLETE marker"):
        resolve_resume(str(tmp_path / "checkpoints" / tag_for(2)), tmp_path)


def test_the_next_save_removes_an_interrupted_one(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3)
    manager.save(FakeEngine(), 1, {})
    with pytest.raises(RuntimeError):
        manager.save(FakeEngine(fail=True), 2, {})
    manager.save(FakeEngine(), 3, {})
    assert tags(tmp_path) == [tag_for(1), tag_for(3)]


def test_saving_a_step_again_invalidates_its_old_marker_first(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3)
    manager.save(FakeEngine(), 5, {})
    with pytest.raises(RuntimeError):
        manager.save(FakeEngine(fail=True), 5, {})  # the old files are half overwritten now
    assert latest(tmp_path) is None


def test_newer_checkpoints_of_an_abandoned_history_are_set_aside(tmp_path):
    # Saved 1..3, then resumed from 1 by hand: step 2 of the new history must win over 3.
    manager = CheckpointManager(tmp_path, keep_last=3)
    for step in (1, 2, 3):
        manager.save(FakeEngine(), step, {})
    manager.save(FakeEngine(), 2, {})
    assert latest(tmp_path) == tmp_path / "checkpoints" / tag_for(2)
    assert tags(tmp_path) == [tag_for(1), tag_for(2), tag_for(3) + ckpt.SUPERSEDED]


def test_resolve_resume_modes(tmp_path):
    assert resolve_resume("none", tmp_path) is None
    assert resolve_resume("auto", tmp_path) is None  # fresh run: nothing saved yet
    with pytest.raises(AudioLLMError, match="does not exist"):
        resolve_resume(str(tmp_path / "nowhere"), tmp_path)
    path = CheckpointManager(tmp_path, keep_last=1).save(FakeEngine(), 7, {})
    assert resolve_resume(str(path), tmp_path / "other-run") == path


def test_rank_state_round_trip(tmp_path):
    state = {"epoch": 2, "rng": torch.get_rng_state()}
    path = CheckpointManager(tmp_path, keep_last=1).save(FakeEngine(), 4, {}, rank_state=state)
    loaded = ckpt.load_rank_state(path)
    assert loaded["epoch"] == 2 and torch.equal(loaded["rng"], state["rng"])
    assert ckpt.load_rank_state(tmp_path) is None


class TiedHead(nn.Module):
    """A frozen embedding and an output layer sharing its weight, as Qwen2-VL ties lm_head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.adapter = nn.Linear(8, 8)  # the trainable part
        self.head = nn.Linear(8, 50, bias=False)
        self.head.weight = self.embed.weight
        self.embed.requires_grad_(False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.adapter(self.embed(ids)))


def test_a_tied_frozen_weight_is_not_saved_under_its_alias(tmp_path):
    engine = FakeEngine(module=TiedHead())
    path = CheckpointManager(tmp_path, keep_last=1).save(engine, 1, {})
    saved = torch.load(path / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert set(saved) == {"adapter.weight", "adapter.bias"}  # no "head.weight"
    assert "module_state_dict" not in vars(engine)  # the engine is left as it was
    assert "head.weight" in engine.module_state_dict()


def test_load_refuses_a_folder_without_marker(tmp_path):
    (tmp_path / "step_00000001").mkdir()
    with pytest.raises(AudioLLMError, match="no COMPLETE marker"):
        ckpt.load(object(), tmp_path / "step_00000001")
