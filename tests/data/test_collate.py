"""data.collate: log-mel computed in the loader equals the packed mel, and features_on=device (int16
waveforms, log-mel on the model's device) gives the same loss and generations."""

import numpy as np
import pytest
import torch

from audio_llm.config import DataConfig
from audio_llm.data import build_loader, layout_of


def test_mel_shards_match_live_features(shard_dirs, model):
    cfg = DataConfig(batch_size=4, num_workers=0, shuffle_buffer=1)
    live = next(iter(build_loader(cfg, layout_of(model), spec=str(shard_dirs["audio"]))))
    mel = next(iter(build_loader(cfg, layout_of(model), spec=str(shard_dirs["mel"]))))
    assert live["keys"] == mel["keys"]
    assert torch.equal(live["feature_lengths"], mel["feature_lengths"])
    assert mel["input_features"].dtype == torch.float16  # as stored; the encoder casts it
    for row, n in enumerate(live["feature_lengths"].tolist()):
        torch.testing.assert_close(
            mel["input_features"][row, :, :n].float(),
            live["input_features"][row, :, :n],
            atol=5e-3,
            rtol=0,
        )
    assert torch.equal(live["input_ids"], mel["input_ids"])


def test_features_on_device_loader_yields_int16_waveforms_and_the_same_loss(shard_dirs, model):
    """features_on=device: workers send int16 waveforms; the model's own log-mel of them equals
    the loader's features, so the loss is the same batch for batch."""
    batches = {}
    for where in ("loader", "device"):
        cfg = DataConfig(batch_size=3, num_workers=1, shuffle_buffer=4, features_on=where)
        batches[where] = next(
            iter(build_loader(cfg, layout_of(model), spec=str(shard_dirs["audio"])))
        )
    live, wave = batches["loader"], batches["device"]
    assert wave["waveforms"].dtype == torch.int16 and "input_features" not in wave
    assert wave["keys"] == live["keys"] and wave["stats"] == live["stats"]
    for key in ("input_ids", "labels", "attention_mask"):
        assert torch.equal(wave[key], live[key])
    assert torch.equal(wave["waveform_lengths"] // 160, live["feature_lengths"])
    features, frames = model.log_mel(wave["waveforms"], wave["waveform_lengths"])
    assert torch.equal(frames, live["feature_lengths"])
    # same clip, same code, int16 / 32768 == soundfile's float32: identical on a CPU
    torch.testing.assert_close(features, live["input_features"], atol=1e-6, rtol=0)
    model.eval()
    losses = {
        where: model(**{k: v for k, v in b.items() if isinstance(v, torch.Tensor)}).loss.item()
        for where, b in batches.items()
    }
    assert losses["device"] == pytest.approx(losses["loader"], rel=1e-6)
    # precomputed shards have no log-mel left to move: the option leaves them as they are
    cfg = DataConfig(batch_size=3, num_workers=0, features_on="device")
    mel = next(iter(build_loader(cfg, layout_of(model), spec=str(shard_dirs["mel"]))))
    assert "input_features" in mel and "waveforms" not in mel


def test_device_log_mel_forward_and_generate_on_odd_lengths(model):
    """0.3, 7.77 and 29.99 s clips in one batch, through FLAC as in shards: the same loss and the
    same generated ids from waveforms (device) as from the collator's log-mel (loader)."""
    from audio_llm.audio.io import decode_flac, encode_flac
    from audio_llm.data import AudioSample, Collator
    from audio_llm.data.stages import frames_of

    rng = np.random.default_rng(7)
    flacs = [encode_flac(0.2 * rng.standard_normal(round(s * 16000))) for s in (0.3, 7.77, 29.99)]
    texts = ["one two", "three four five", "six"]
    outputs = {}
    layout = layout_of(model)
    for where in ("loader", "device"):
        collator = Collator(layout, "audio", where)
        samples = []
        for i, (data, text) in enumerate(zip(flacs, texts, strict=True)):
            audio = decode_flac(data, pcm16=collator.features_on_device)
            meta = {"text": text, "num_samples": len(audio)}
            example = layout.example(meta, frames_of(meta, "audio"), "audio")
            samples.append(AudioSample(f"k{i}", text, None, len(audio) / 16000, example, audio))
        train, prompts = collator(samples), collator.prompt_batch(samples)
        if where == "device":
            assert train["waveforms"].dtype == prompts["waveforms"].dtype == torch.int16
            assert train["waveform_lengths"].tolist() == [4800, 124320, 479840]
        model.eval()
        tensors = {k: v for k, v in train.items() if isinstance(v, torch.Tensor)}
        loss = model(**tensors).loss.item()
        tensors = {k: v for k, v in prompts.items() if isinstance(v, torch.Tensor)}
        audio = {k: v for k, v in tensors.items() if k not in ("input_ids", "attention_mask")}
        projected, _ = model.project_audio(**audio)  # what generate() embeds
        outputs[where] = (loss, projected, model.generate(**tensors, max_new_tokens=4))
    assert outputs["device"][0] == pytest.approx(outputs["loader"][0], rel=1e-6)
    torch.testing.assert_close(outputs["device"][1], outputs["loader"][1], atol=1e-6, rtol=0)
    assert outputs["device"][2] == outputs["loader"][2]
