import io

import numpy as np
import pytest
import soundfile as sf

from audio_llm.audio.io import (
    AudioDecodeError,
    AudioFileMissing,
    decode_flac,
    encode_flac,
    load_audio,
)
from audio_llm.errors import AudioLLMError

PCM16_STEP = 1 / 32768


def _tone(seconds: float, rate: int, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_44k_stereo_is_downmixed_by_mean_and_resampled_to_16k(tmp_path):
    left, right = _tone(1.0, 44100), -0.5 * _tone(1.0, 44100)  # mean: (1 - 0.5) / 2 = 0.25
    sf.write(tmp_path / "x.wav", np.stack([left, right], axis=1), 44100, subtype="FLOAT")
    audio = load_audio(tmp_path / "x.wav")
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert len(audio) == 16000
    expected = 0.25 * _tone(1.0, 16000)
    # away from the filter's edge transients, a high-quality resampler reproduces the tone
    np.testing.assert_allclose(audio[200:-200], expected[200:-200], atol=2e-3)


@pytest.mark.parametrize("fmt,subtype", [("FLAC", "PCM_16"), ("OGG", "VORBIS"), ("WAV", "PCM_24")])
def test_reads_common_formats(tmp_path, fmt, subtype):
    path = tmp_path / f"x.{fmt.lower()}"
    sf.write(path, _tone(0.5, 22050), 22050, format=fmt, subtype=subtype)
    audio = load_audio(path)
    assert len(audio) == 8000
    assert 0.3 < np.abs(audio).max() < 0.6


def test_offset_and_duration_select_a_segment(tmp_path):
    ramp = np.linspace(-0.9, 0.9, 32000, dtype=np.float32)
    sf.write(tmp_path / "r.wav", ramp, 16000, subtype="FLOAT")
    audio = load_audio(tmp_path / "r.wav", offset=0.5, duration=0.25)
    np.testing.assert_array_equal(audio, ramp[8000:12000])


def test_missing_and_undecodable_files_are_named(tmp_path):
    with pytest.raises(AudioFileMissing, match="nope.wav"):
        load_audio(tmp_path / "nope.wav")
    (tmp_path / "junk.flac").write_bytes(b"not audio at all")
    with pytest.raises(AudioDecodeError, match="junk.flac"):
        load_audio(tmp_path / "junk.flac")
    assert issubclass(AudioDecodeError, AudioLLMError)


def test_flac_round_trip_is_within_16_bit_quantisation():
    audio = np.random.default_rng(0).uniform(-0.9, 0.9, 12345).astype(np.float32)
    data = encode_flac(audio)
    assert data[:4] == b"fLaC"
    info = sf.info(io.BytesIO(data))
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
    np.testing.assert_allclose(decode_flac(data), audio, atol=PCM16_STEP)


def test_flac_encoding_clips_instead_of_wrapping():
    decoded = decode_flac(encode_flac(np.array([1.5, -2.0, 0.25] * 100, dtype=np.float32)))
    np.testing.assert_allclose(decoded[:3], [1.0, -1.0, 0.25], atol=PCM16_STEP)


def test_decode_flac_rejects_garbage_with_its_name():
    with pytest.raises(AudioDecodeError, match="shard-000001.tar:k.flac"):
        decode_flac(b"garbage", "shard-000001.tar:k.flac")


def test_pcm16_decoding_is_the_float_decoding_times_32768():
    """What features_on=device workers send: exactly the 16-bit samples behind the float32."""
    audio = np.random.default_rng(1).uniform(-0.9, 0.9, 4321).astype(np.float32)
    data = encode_flac(audio)
    pcm = decode_flac(data, pcm16=True)
    assert pcm.dtype == np.int16 and pcm.shape == audio.shape
    np.testing.assert_array_equal(pcm.astype(np.float32) / 32768, decode_flac(data))
    # other sources are converted to 16 kHz mono first, then rounded to 16 bits
    buffer = io.BytesIO()
    stereo = np.stack([_tone(0.5, 22050), _tone(0.5, 22050)], axis=1)
    sf.write(buffer, stereo, 22050, format="FLAC", subtype="PCM_24")
    pcm = decode_flac(buffer.getvalue(), pcm16=True)
    assert pcm.dtype == np.int16 and len(pcm) == 8000
    expected = decode_flac(buffer.getvalue()) * 32768
    np.testing.assert_allclose(pcm, expected, atol=0.5)
