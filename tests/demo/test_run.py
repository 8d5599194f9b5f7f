"""demo.run's reuse of work: tiny models, reading pretraining and shards are built once per setting
(the demo itself, end to end, is in tests/integration/test_demo.py)."""

import json


def test_tiny_models_and_reading_are_built_once_per_setting(tmp_path, monkeypatch):
    import argparse

    from audio_llm.demo.run import _tiny_models

    args = argparse.Namespace(reading_steps=3, seed=0, fresh=False)
    paths, first = _tiny_models(tmp_path / "tiny", args)
    assert not first["reused"] and (paths["qwen2vl"] / "config.json").is_file()
    stamp = (paths["qwen2vl"] / "model.safetensors").stat().st_mtime_ns
    _, again = _tiny_models(tmp_path / "tiny", args)
    assert again["reused"] and again["reading_seconds"] == first["reading_seconds"]
    assert (paths["qwen2vl"] / "model.safetensors").stat().st_mtime_ns == stamp
    # a new encoder setting rebuilds Whisper only: no second reading pretraining
    whisper_stamp = (paths["whisper"] / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr("audio_llm.demo.run.WHISPER_PASSTHROUGH", 0.5)
    _, encoder_only = _tiny_models(tmp_path / "tiny", args)
    assert encoder_only["reused"]
    assert (paths["qwen2vl"] / "model.safetensors").stat().st_mtime_ns == stamp
    assert (paths["whisper"] / "model.safetensors").stat().st_mtime_ns != whisper_stamp
    _, changed = _tiny_models(tmp_path / "tiny", argparse.Namespace(**{**vars(args), "seed": 1}))
    assert not changed["reused"]
    _, fresh = _tiny_models(tmp_path / "tiny", argparse.Namespace(**{**vars(args), "fresh": True}))
    assert not fresh["reused"]


def test_shards_are_reused_only_for_the_same_encoder(tmp_path, tiny_models):
    from audio_llm.demo.run import _shards_match
    from audio_llm.model.encoder import encoder_identity, load_whisper_encoder

    whisper = load_whisper_encoder(tiny_models["whisper"])
    wanted = encoder_identity(whisper, tiny_models["whisper"], varlen=True)
    index = tmp_path / "index.json"
    assert not _shards_match(index, wanted)  # nothing packed yet
    packed = encoder_identity(whisper, "packed/elsewhere", varlen=True)
    index.write_text(json.dumps({"encoder": packed}))
    assert _shards_match(index, wanted)  # the path it was packed from may differ
    index.write_text(json.dumps({"encoder": {**packed, "weights_sha256": "0" * 16}}))
    assert not _shards_match(index, wanted)  # another encoder's outputs
    index.write_text(json.dumps({"encoder": {**packed, "varlen": False}}))
    assert not _shards_match(index, wanted)  # the 30 s window
