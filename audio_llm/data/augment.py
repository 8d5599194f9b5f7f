"""SpecAugment-style masking of a training batch's features: time spans and feature channels.

Applied in the loader worker after collation, to whatever the model reads first:
- log-mel (`input_features` [B, n_mels, T]: live audio computed in the loader, or mel shards),
  before the frozen encoder, as in SpecAugment (Park et al., 2019);
- encoder outputs (`audio_embeds` [B, F, d]: encoder shards), where the encoder has already run
  once at packing time, so the masks fall on its frames and channels instead. This is what keeps
  precomputed-encoder training from memorising the same frames epoch after epoch.
Masks stay inside each clip's valid frames and are filled with that clip's mean, so a masked
span reads as flat signal rather than as padding. The transcript is unchanged: the model learns
to carry a word across a short gap from its context. Waveform batches (`features_on=device`)
have no features yet in the loader and are refused by the config.

Randomness comes from the caller's generator, which the stream seeds per (seed, epoch, rank,
worker, batch): a resumed run masks the batches it replays exactly as the first run did.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class SpecAugment:
    """Masks per clip: `time_masks` spans of up to `time_mask_seconds`, and `feature_masks`
    bands of up to `feature_mask_fraction` of the channels (widths uniform from 0)."""

    time_masks: int = 0
    time_mask_seconds: float = 0.0
    feature_masks: int = 0
    feature_mask_fraction: float = 0.0

    @property
    def active(self) -> bool:
        time = self.time_masks > 0 and self.time_mask_seconds > 0
        return time or (self.feature_masks > 0 and self.feature_mask_fraction > 0)

    def __call__(self, batch: dict, frame_seconds: float, rng: np.random.Generator) -> int:
        """Mask `batch` in place; returns the number of time frames masked (for the counters).

        `frame_seconds`: seconds per time frame of the batch's features (0.01 for log-mel,
        0.02 for Whisper encoder frames)."""
        if "audio_embeds" in batch:  # [B, F, d]: time on axis 1
            feats, lengths = batch["audio_embeds"], batch["audio_lengths"]
            time_axis = 1
        elif "input_features" in batch:  # [B, n_mels, T]: time on axis 2
            feats, lengths = batch["input_features"], batch["feature_lengths"]
            time_axis = 2
        else:
            raise ValueError("SpecAugment needs input_features or audio_embeds in the batch")
        max_width = int(self.time_mask_seconds / frame_seconds)
        channels = feats.shape[3 - time_axis]
        max_band = int(self.feature_mask_fraction * channels)
        masked = 0
        for row, length in enumerate(lengths.tolist()):
            clip = feats[row].narrow(time_axis - 1, 0, length)
            view = clip if time_axis == 2 else clip.transpose(0, 1)  # [channels, time]
            fill = view.float().mean().to(view.dtype)
            hit = torch.zeros(length, dtype=torch.bool)
            for _ in range(self.time_masks if max_width > 0 else 0):
                width = min(int(rng.integers(0, max_width + 1)), length)
                start = int(rng.integers(0, length - width + 1))
                hit[start : start + width] = True
            for _ in range(self.feature_masks if max_band > 0 else 0):
                width = int(rng.integers(0, max_band + 1))
                start = int(rng.integers(0, channels - width + 1))
                view[start : start + width, :] = fill
            view[:, hit] = fill
            masked += int(hit.sum())
        return masked
