import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor

from audio_llm.audio.features import (
    _filters,
    _log_mel_rows,
    feature_settings,
    log_mel,
    log_mel_batch,
    pcm_to_float,
)
from audio_llm.errors import AudioLLMError


def _signal(seconds: float, seed: int) -> np.ndarray:
    """Sum of sines with a slow amplitude envelope plus noise: a non-flat spectrum over time."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    x = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 0.7 * t))
    x += 0.1 * np.sin(2 * np.pi * 1375 * t) + 0.05 * np.sin(2 * np.pi * 5100 * t)
    return (x + 0.02 * rng.standard_normal(t.shape)).astype(np.float32)


@pytest.fixture(scope="module")
def extractor() -> WhisperFeatureExtractor:
    return WhisperFeatureExtractor(feature_size=80)


@pytest.mark.parametrize("seconds", [1.0, 7.3, 29.0, 0.5137])
def test_matches_whisper_feature_extractor_on_unpadded_clip(extractor, seconds):
    audio = _signal(seconds, seed=int(seconds * 10))
    ref = extractor(
        audio,
        sampling_rate=16000,
        padding="do_not_pad",
        return_attention_mask=True,
        return_tensors="np",
    )
    expected = ref["input_features"][0]
    ours = log_mel(audio, extractor.mel_filters).numpy()
    assert ours.shape == (80, len(audio) // 160) == expected.shape
    assert ref["attention_mask"].sum() == len(audio) // 160
    np.testing.assert_allclose(ours, expected, atol=1e-3, rtol=0)


def test_batched_rows_equal_single_clips(extractor):
    clips = [_signal(s, seed=i) for i, s in enumerate([2.03, 0.61, 5.0, 3.33])]
    lengths = torch.tensor([len(c) for c in clips])
    batch = torch.zeros(len(clips), int(lengths.max()))
    for row, clip in enumerate(clips):
        batch[row, : len(clip)] = torch.from_numpy(clip)
    features, frames = log_mel_batch(batch, lengths, extractor.mel_filters)
    assert features.shape == (4, 80, int(lengths.max()) // 160)
    assert frames.tolist() == [len(c) // 160 for c in clips]
    for row, clip in enumerate(clips):
        single = log_mel(clip, extractor.mel_filters)
        torch.testing.assert_close(features[row, :, : frames[row]], single, atol=1e-5, rtol=0)


def test_frames_past_a_clip_hold_whispers_zero_padding_value(extractor):
    """Padding frames equal what the stock extractor gives for its zero-padded 30 s window."""
    clip = _signal(1.2, seed=3)
    short_and_long = torch.zeros(2, 48000)
    short_and_long[0, : len(clip)] = torch.from_numpy(clip)
    short_and_long[1] = torch.from_numpy(_signal(3.0, seed=4))
    features, _ = log_mel_batch(
        short_and_long, torch.tensor([len(clip), 48000]), extractor.mel_filters
    )
    stock = extractor(clip, sampling_rate=16000, return_tensors="np")["input_features"][0]
    np.testing.assert_allclose(features[0, :, 130:].numpy(), stock[:, 130:300], atol=1e-5)


def test_too_short_clip_is_an_error(extractor):
    with pytest.raises(AudioLLMError, match="clip lengths"):
        log_mel(np.zeros(150, dtype=np.float32), extractor.mel_filters)


def test_feature_settings_record_and_check_the_extractor(extractor):
    assert feature_settings(WhisperFeatureExtractor(feature_size=128)) == {
        "sampling_rate": 16000,
        "n_mels": 128,
        "hop_length": 160,
        "n_fft": 400,
    }
    with pytest.raises(AudioLLMError, match="hop_length=200"):
        feature_settings(WhisperFeatureExtractor(hop_length=200))


ODD_SECONDS = [0.3, 7.77, 29.99]  # 30, 777 and 2,999 frames: none a round size


def _pcm_batch(seconds: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-padded int16 PCM `[B, S]` (what a shard's 16-bit FLAC holds) and lengths."""
    clips = [np.round(_signal(s, seed=i) * 32767).astype(np.int16) for i, s in enumerate(seconds)]
    lengths = torch.tensor([len(c) for c in clips])
    batch = torch.zeros(len(clips), int(lengths.max()), dtype=torch.int16)
    for row, clip in enumerate(clips):
        batch[row, : len(clip)] = torch.from_numpy(clip)
    return batch, lengths


def test_int16_pcm_gives_exactly_the_features_of_its_float_reading(extractor):
    """features_on=device sends int16; the loader path reads the same FLAC as float32."""
    pcm, lengths = _pcm_batch(ODD_SECONDS)
    as_read = pcm.float() / 32768  # soundfile's float32 reading of 16-bit audio
    from_pcm, frames = log_mel_batch(pcm, lengths, extractor.mel_filters)
    from_float, same_frames = log_mel_batch(as_read, lengths, extractor.mel_filters)
    assert torch.equal(from_pcm, from_float) and torch.equal(frames, same_frames)
    assert torch.equal(pcm_to_float(pcm), as_read)
    torch.testing.assert_close(
        log_mel(pcm[0, : lengths[0]].numpy(), extractor.mel_filters),
        from_float[0, :, : frames[0]],
        atol=0,
        rtol=0,
    )
    with pytest.raises(AudioLLMError, match="float or int16"):
        log_mel_batch(pcm.int(), lengths, extractor.mel_filters)


def test_batched_device_path_matches_rows_and_whisper_on_odd_lengths(extractor):
    """A GPU runs one STFT over the padded batch (`_log_mel_rows`), the CPU one clip at a time:
    run the batched path here on 0.3, 7.77 and 29.99 s clips in one batch and compare both."""
    pcm, lengths = _pcm_batch(ODD_SECONDS)
    waveforms = pcm_to_float(pcm)
    frames = waveforms.shape[1] // 160
    batched = _log_mel_rows(waveforms, lengths, _filters(extractor.mel_filters, "cpu"), frames)
    per_row, valid = log_mel_batch(pcm, lengths, extractor.mel_filters)
    assert batched.shape == per_row.shape == (3, 80, frames)
    assert valid.tolist() == [30, 777, 2999]
    # Equal here (1e-7 from Whisper's own); 1e-4 leaves room for other FFTs (cuFFT) to round
    # differently, on values that span about [-1.5, 1.5].
    torch.testing.assert_close(batched, per_row, atol=1e-4, rtol=0)
    for row, n in enumerate(valid.tolist()):
        clip = waveforms[row, : lengths[row]].numpy()
        stock = extractor(
            clip, sampling_rate=16000, padding="do_not_pad", return_tensors="np"
        ).input_features[0]
        assert stock.shape == (80, n)
        np.testing.assert_allclose(batched[row, :, :n].numpy(), stock, atol=1e-4, rtol=0)
