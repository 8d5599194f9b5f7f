import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperForConditionalGeneration

from audio_llm.audio.frames import encoder_frames, mel_frames
from audio_llm.errors import AudioLLMError
from audio_llm.model.encoder import AudioEncoder, load_whisper_encoder


def test_loads_only_the_encoder_of_a_full_checkpoint(tiny_models):
    full = WhisperForConditionalGeneration.from_pretrained(tiny_models["whisper"])
    encoder = load_whisper_encoder(tiny_models["whisper"])
    for name, tensor in encoder.state_dict().items():
        assert torch.equal(tensor, full.model.encoder.state_dict()[name]), name
    assert not any(p.requires_grad for p in encoder.parameters())


def test_non_whisper_folder_is_refused(tiny_models, tmp_path):
    with pytest.raises(AudioLLMError, match="cannot load a Whisper encoder"):
        load_whisper_encoder(tmp_path)


def _speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    tone = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))
    return (tone + 0.02 * rng.standard_normal(t.shape)).astype(np.float32)


def test_valid_frames_padded_like_the_feature_extractor(tiny_models):
    """The encoder pads valid frames with exactly what WhisperFeatureExtractor's 30 s padding
    holds past a clip's end, and runs the stock encoder on that window."""
    fe = WhisperFeatureExtractor.from_pretrained(tiny_models["whisper"])
    whisper = load_whisper_encoder(tiny_models["whisper"])
    encoder = AudioEncoder(whisper)
    clips = [_speech_like(4.3, 0), _speech_like(11.0, 1)]
    full = torch.tensor(fe(clips, sampling_rate=16000, return_tensors="np").input_features)
    lengths = torch.tensor([mel_frames(len(c)) for c in clips])
    expected = full.clone()
    for row, n in enumerate(lengths.tolist()):
        floor = torch.clamp(full[row, :, :n].max() - 2.0, min=-1.5)
        # Past the frames whose STFT window still reaches the audio, the extractor holds the floor.
        torch.testing.assert_close(
            full[row, :, n + 2 :], torch.full_like(full[row, :, n + 2 :], floor)
        )
        expected[row, :, n:] = floor
    cut = full[:, :, : int(lengths.max())].clone()
    cut[0, :, int(lengths[0]) :] = 123.0  # junk beyond a clip's end must not matter
    hidden, out_lengths = encoder(cut, lengths)
    stock = whisper(expected).last_hidden_state
    assert out_lengths.tolist() == [encoder_frames(int(n)) for n in lengths]
    for row, n in enumerate(out_lengths.tolist()):
        torch.testing.assert_close(hidden[row, :n], stock[row, :n], rtol=1e-4, atol=1e-4)


def test_longer_than_30s_is_an_error_not_a_silent_cut(tiny_models):
    encoder = AudioEncoder(load_whisper_encoder(tiny_models["whisper"]))
    with pytest.raises(AudioLLMError, match="30 s"):
        encoder(torch.zeros(1, 80, 3100), torch.tensor([3100]))


def test_frame_arithmetic():
    assert mel_frames(16000) == 100
    assert encoder_frames(3000) == 1500
    assert encoder_frames(1) == 1 and encoder_frames(2) == 1 and encoder_frames(3) == 2


def test_stays_frozen_in_train_mode(tiny_models):
    encoder = AudioEncoder(load_whisper_encoder(tiny_models["whisper"]))
    encoder.train()
    assert not encoder.training and not encoder.whisper.training


def test_varlen_on_a_full_30s_clip_equals_the_stock_encoder(tiny_models):
    fe = WhisperFeatureExtractor.from_pretrained(tiny_models["whisper"])
    whisper = load_whisper_encoder(tiny_models["whisper"])
    full = torch.tensor(fe([_speech_like(30.0, 2)], sampling_rate=16000).input_features)
    hidden, out_lengths = AudioEncoder(whisper, varlen=True)(full, torch.tensor([3000]))
    assert out_lengths.tolist() == [1500]
    torch.testing.assert_close(hidden, whisper(full).last_hidden_state, rtol=1e-5, atol=1e-5)


def test_varlen_clip_in_a_batch_equals_the_clip_alone(tiny_models):
    """Padding (any values) beyond a clip changes nothing: masked in attention, zeroed between
    the convolutions, so batching does not change a clip's encoding."""
    fe = WhisperFeatureExtractor.from_pretrained(tiny_models["whisper"])
    encoder = AudioEncoder(load_whisper_encoder(tiny_models["whisper"]), varlen=True)
    clips = [_speech_like(2.37, 3), _speech_like(7.1, 4), _speech_like(0.05, 5)]
    lengths = [mel_frames(len(c)) for c in clips]
    mels = [
        torch.tensor(fe([c], sampling_rate=16000).input_features[0, :, :n])
        for c, n in zip(clips, lengths, strict=True)
    ]
    batch = torch.full((3, 80, max(lengths)), 7.0)  # junk padding
    for row, mel in enumerate(mels):
        batch[row, :, : mel.shape[1]] = mel
    hidden, out_lengths = encoder(batch, torch.tensor(lengths))
    assert hidden.shape[1] == encoder_frames(max(lengths))  # no 30 s window: cost follows length
    for row, mel in enumerate(mels):
        alone, n = encoder(mel[None], torch.tensor([mel.shape[1]]))
        assert alone.shape[1] == int(n) == int(out_lengths[row])
        torch.testing.assert_close(hidden[row, : int(n)], alone[0], rtol=1e-5, atol=1e-5)


def test_varlen_differs_from_padded_on_short_clips(tiny_models):
    """The two settings are different functions for clips under 30 s (why a run keeps one)."""
    whisper = load_whisper_encoder(tiny_models["whisper"])
    mel = torch.randn(1, 80, 500)
    a, _ = AudioEncoder(whisper)(mel, torch.tensor([500]))
    b, _ = AudioEncoder(whisper, varlen=True)(mel, torch.tensor([500]))
    assert a.shape == b.shape and not torch.allclose(a, b, atol=1e-3)
