"""Audio I/O: any file soundfile reads -> float32 mono 16 kHz, and in-memory FLAC for shards."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from audio_llm.audio.frames import SAMPLE_RATE
from audio_llm.errors import AudioLLMError


class AudioFileMissing(AudioLLMError):
    """The audio file named by an input does not exist."""


class AudioDecodeError(AudioLLMError):
    """The audio file exists but soundfile cannot decode it."""


def to_mono_16k(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """Downmix `[samples]` or `[samples, channels]` by the channel mean and resample to 16 kHz."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 2:
        audio = audio.mean(axis=1, dtype=np.float32)
    elif audio.ndim != 1:
        raise AudioLLMError(f"audio must be [samples] or [samples, channels], got {audio.shape}")
    if sample_rate != SAMPLE_RATE and audio.size:
        # Downmix first: resampling one channel is cheaper and the mean commutes with the filter.
        audio = soxr.resample(np.ascontiguousarray(audio), sample_rate, SAMPLE_RATE, quality="HQ")
    return np.ascontiguousarray(audio, dtype=np.float32)


def load_audio(path: str | Path, offset: float = 0.0, duration: float | None = None) -> np.ndarray:
    """Read any audio file soundfile decodes (flac, wav, ogg, mp3, ...) as float32 mono 16 kHz.

    `offset` and `duration` (seconds) select a segment, as NeMo manifests do; by default the whole
    file is read. Raises `AudioFileMissing` / `AudioDecodeError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioFileMissing(f"{path}: audio file not found")
    try:
        with sf.SoundFile(str(path)) as f:
            sample_rate = f.samplerate
            start = round(offset * sample_rate)
            frames = -1 if duration is None else round(duration * sample_rate)
            if start:
                f.seek(min(start, f.frames))
            audio = f.read(frames=frames, dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, ValueError) as exc:
        raise AudioDecodeError(f"{path}: cannot decode audio ({exc})") from exc
    return to_mono_16k(audio, sample_rate)


def encode_flac(audio: np.ndarray) -> bytes:
    """16 kHz mono float audio -> 16-bit FLAC bytes (lossless for 16-bit sources: LibriSpeech)."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise AudioLLMError(f"encode_flac expects mono [samples] audio, got shape {audio.shape}")
    buffer = io.BytesIO()
    # Clip explicitly: out-of-range floats would otherwise wrap around when converted to PCM_16.
    sf.write(buffer, np.clip(audio, -1.0, 1.0), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def decode_flac(data: bytes, name: str = "<flac bytes>", pcm16: bool = False) -> np.ndarray:
    """FLAC (or any soundfile format) bytes -> float32 mono 16 kHz; `name` appears in errors.

    With `pcm16`, int16 PCM instead (float32 is that / 32768): half the bytes, and for the 16 kHz
    mono 16-bit FLAC that `encode_flac` writes, libsndfile's own samples with no float pass.
    Other sources are converted to float, downmixed, resampled and rounded to 16 bits.
    """
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            if pcm16 and f.samplerate == SAMPLE_RATE and f.channels == 1:
                return f.read(dtype="int16")
            sample_rate = f.samplerate
            audio = f.read(dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, ValueError) as exc:
        raise AudioDecodeError(f"{name}: cannot decode audio ({exc})") from exc
    audio = to_mono_16k(audio, sample_rate)
    if pcm16:
        audio = np.rint(np.clip(audio, -1.0, 1.0) * 32768).clip(-32768, 32767).astype(np.int16)
    return audio
