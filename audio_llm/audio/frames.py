"""The one copy of the rates and of the length arithmetic from samples to LLM positions.

16 kHz audio -> 100 log-mel frames per second (hop 160) -> 50 Whisper encoder frames per second
(conv2, stride 2) -> ceil(frames / stack) audio placeholders in the LLM prompt. The collator, the
model, packing, transcription and the FLOP counter all ask here, so they cannot disagree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # plain arithmetic: ints or tensors alike, no torch import needed
    import torch

SAMPLE_RATE = 16_000
HOP_LENGTH = 160  # 10 ms mel hop: 100 mel frames per second
MEL_FRAMES_PER_WINDOW = 3000  # the 30 s window the stock encoder accepts
ENCODER_DOWNSAMPLE = 2  # conv2 has stride 2: 50 encoder frames per second
WINDOW_SECONDS = MEL_FRAMES_PER_WINDOW * HOP_LENGTH / SAMPLE_RATE  # 30.0: the most Whisper sees


def mel_frames(num_samples: int) -> int:
    """Valid log-mel frames for `num_samples` of 16 kHz audio, as WhisperFeatureExtractor counts."""
    return num_samples // HOP_LENGTH


def encoder_frames(num_mel_frames: torch.Tensor | int) -> torch.Tensor | int:
    """Encoder output frames covering `num_mel_frames` (conv2: kernel 3, stride 2, padding 1)."""
    return (num_mel_frames - 1) // ENCODER_DOWNSAMPLE + 1


def audio_positions(num_encoder_frames: torch.Tensor | int, stack: int) -> torch.Tensor | int:
    """LLM audio placeholders for `num_encoder_frames` stacked `stack` at a time (the tail is
    zero-padded to a whole group)."""
    return (num_encoder_frames + stack - 1) // stack
