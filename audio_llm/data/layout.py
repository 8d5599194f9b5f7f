"""What the data pipeline needs to know of a model, as one small value: `AudioLayout`.

The pipeline never holds the model: `layout_of(model)` reads the few facts it needs (the token
layout of an example, the projector's stack factor, the encoder's input channels and identity,
the feature extractor's mel filters) once, and the loader, the collator and evaluation take the
layout. How many LLM positions a clip occupies is `audio.frames` arithmetic on these facts, the
same arithmetic the model and the FLOP counter use.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from audio_llm.audio.frames import audio_positions, encoder_frames
from audio_llm.model.prompts import Example, PromptBuilder


@dataclass(frozen=True, eq=False)
class AudioLayout:
    """The model facts batches are built from.

    `prompts`: token layout of an example (and the pad and audio-placeholder ids); `stack`:
    encoder frames per LLM audio position; `num_mel_bins`: the encoder's input channels (mel
    shards must match); `mel_filters`: the feature extractor's, for log-mel computed in the
    loader (None: the model has no feature extractor); `encoder`: `encoder_identity` of the
    model's encoder, which encoder-output shards must match.
    """

    prompts: PromptBuilder
    stack: int
    num_mel_bins: int
    mel_filters: np.ndarray | None = None
    encoder: dict = field(default_factory=dict)

    def audio_tokens(self, frames: int, mode: str) -> int:
        """LLM audio positions of a clip of `frames` valid frames: mel frames, or encoder
        frames for `encoder` shards."""
        enc = frames if mode == "encoder" else int(encoder_frames(frames))
        return int(audio_positions(enc, self.stack))

    def example(self, meta: dict, frames: int, mode: str) -> Example:
        """Ids and labels of a sample from its json (`text`, optional `prompt`) and frames."""
        return self.prompts.example(
            self.audio_tokens(frames, mode), meta["text"], meta.get("prompt")
        )


def layout_of(model, identity: bool = True) -> AudioLayout:
    """The layout of an `AudioLLM`: the one place data/ reads a model (duck-typed: its
    `prompts`, `projector.stack`, `encoder` and `feature_extractor`). `identity=False` skips the
    encoder's weight fingerprint (it copies weights to the host), for callers that build batches
    without checking shards against the encoder (evaluation, transcription)."""
    from audio_llm.model.encoder import encoder_identity  # transformers: only when asked

    encoder = model.encoder
    whisper = encoder.whisper
    extractor = model.feature_extractor
    return AudioLayout(
        prompts=model.prompts,
        stack=int(model.projector.stack),
        num_mel_bins=int(encoder.num_mel_bins),
        mel_filters=None if extractor is None else extractor.mel_filters,
        encoder=encoder_identity(whisper, whisper.config.name_or_path, encoder.varlen)
        if identity
        else {},
    )
