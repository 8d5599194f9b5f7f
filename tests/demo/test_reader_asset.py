"""The demo's reading-pretrained tiny LLM ships as a checked asset (issue 16.9): a new user's
first `make demo` copies it instead of spending ~16 min rebuilding it, and `make reader`
rebuilds it from nothing and compares the bytes."""

import argparse
import json

import pytest

from audio_llm.demo import reading
from audio_llm.demo import run as demo


def _args(steps: int) -> argparse.Namespace:
    return argparse.Namespace(reading_steps=steps, seed=0, fresh=False)


def test_the_shipped_reader_matches_the_demo_settings_and_its_hashes():
    manifest, why = reading.shipped_reader(
        demo._settings(_args(reading.ReadingSpec.steps))["qwen2vl"]
    )
    assert manifest is not None, why
    assert "model.safetensors" in manifest["files"] and "config.json" in manifest["files"]
    assert manifest["reading_loss"]["last"] < manifest["reading_loss"]["first"]


@pytest.fixture
def asset(tmp_path, monkeypatch):
    folder = tmp_path / "asset"
    monkeypatch.setattr(reading, "READER_ASSET", folder)
    monkeypatch.setattr(demo, "READER_ASSET", folder)
    assert demo.reader_asset(_args(3), write=True) == 0
    return folder


def test_a_rebuilt_reader_equals_the_shipped_one_bit_for_bit(asset):
    assert demo.reader_asset(_args(3), write=False) == 0
    (asset / "model.safetensors").write_bytes(b"not the weights")
    assert demo.reader_asset(_args(3), write=False) == 1  # a corrupt asset is not "equal"


def test_the_demo_copies_the_shipped_reader_and_falls_back_when_it_is_corrupt(
    asset, tmp_path, capsys
):
    paths, built = demo._tiny_models(tmp_path / "a", _args(3))
    assert built["shipped"] and not built["reused"]
    shipped = (asset / "model.safetensors").read_bytes()
    assert (paths["qwen2vl"] / "model.safetensors").read_bytes() == shipped
    manifest = json.loads((asset / "reader.json").read_text())
    assert built["reading_seconds"] == manifest["reading_seconds"]
    assert "sha256 verified" in capsys.readouterr().out

    (asset / "tokenizer.json").write_text("{}")
    paths, built = demo._tiny_models(tmp_path / "b", _args(3))
    assert not built["shipped"]  # rebuilt by reading pretraining instead
    assert "tokenizer.json: sha256 differs" in capsys.readouterr().out
    assert (paths["qwen2vl"] / "model.safetensors").read_bytes() == shipped  # deterministic
    # other settings than the asset's are never served the asset
    paths, built = demo._tiny_models(tmp_path / "c", _args(4))
    assert not built["shipped"]
