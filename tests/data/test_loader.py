"""data.loader: every shard mode trains the model, and shards the model cannot read are refused at
start."""

from pathlib import Path

import numpy as np
import pytest
import torch

from audio_llm.config import DataConfig
from audio_llm.data import build_loader, layout_of
from audio_llm.errors import AudioLLMError
from audio_llm.model.build import build_audio_llm
from audio_llm.model.prompts import IGNORE_INDEX
from audio_llm.pack.writer import PackOptions, pack
from tests.data.corpus import write_corpus


def test_every_mode_trains_the_model(shard_dirs, model):
    cfg = DataConfig(batch_size=3, num_workers=0, shuffle_buffer=4)
    losses = {}
    for mode, folder in shard_dirs.items():
        batch = next(iter(build_loader(cfg, layout_of(model), spec=str(folder))))
        stats = batch.pop("stats")
        assert stats["samples"] == 3 and stats["target_tokens"] > 0
        batch = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        assert (batch["labels"] != IGNORE_INDEX).sum() == stats["target_tokens"]
        losses[mode] = model(**batch).loss.item()
    assert all(np.isfinite(v) for v in losses.values())
    # the three modes carry the same audio, so the loss agrees up to float16 storage
    assert losses["encoder"] == pytest.approx(losses["audio"], rel=2e-2)


def test_shards_from_another_encoder_are_refused(shard_dirs, model_config, tmp_path):
    from audio_llm.model.tiny import write_tiny_models

    other = write_tiny_models(tmp_path / "other", seed=5)
    import dataclasses

    model = build_audio_llm(dataclasses.replace(model_config, encoder=str(other["whisper"])))
    with pytest.raises(AudioLLMError, match="made by another encoder"):
        build_loader(
            DataConfig(batch_size=2, num_workers=0),
            layout_of(model),
            spec=str(shard_dirs["encoder"]),
        )


def test_varlen_encoder_shards_train_like_the_live_varlen_encoder(
    shard_dirs, model_config, tmp_path
):
    """Shards packed with --varlen-encoder carry what model.varlen_encoder=true computes live, and
    a run whose setting differs from the shards' is refused with the fix."""
    import dataclasses

    manifest = write_corpus(tmp_path)
    options = PackOptions(
        out=tmp_path / "varlen",
        mode="encoder",
        max_samples=5,
        encoder=Path(model_config.encoder),
        varlen_encoder=True,
        quiet=True,
    )
    index = pack([manifest], options)
    assert index["encoder"]["varlen"] is True
    varlen = build_audio_llm(dataclasses.replace(model_config, varlen_encoder=True))
    cfg = DataConfig(batch_size=3, num_workers=0, shuffle_buffer=4)
    losses = {}
    for name, folder in (("live", shard_dirs["audio"]), ("packed", tmp_path / "varlen")):
        batch = next(iter(build_loader(cfg, layout_of(varlen), spec=str(folder))))
        batch = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        losses[name] = varlen(**batch).loss.item()
    assert losses["packed"] == pytest.approx(losses["live"], rel=2e-2)
    with pytest.raises(AudioLLMError, match="model.varlen_encoder"):
        build_loader(cfg, layout_of(varlen), spec=str(shard_dirs["encoder"]))
    with pytest.raises(AudioLLMError, match="model.varlen_encoder"):
        build_loader(cfg, layout_of(build_audio_llm(model_config)), spec=str(tmp_path / "varlen"))
