"""The collator: tokenised, decoded samples -> the batch `AudioLLM.forward` takes.

Token ids and labels come with each sample (the stream's `tokenize` stage builds them with
`AudioLayout.example` and refuses what would not fit `max_length`); this module lays them out in
LLM rows (right-padded, or packed up to `data.pack_tokens`) with every index the model needs
(`model.rows`, computed here so the device never waits for them), pads the audio (one clip per
row of the audio tensors, packed or not), and builds left-padded generation prompts for
evaluation (never packed).

Audio (live) shards give log-mel computed here, in the loader worker (`features_on="loader"`), or
the padded int16 waveforms, for `AudioLLM` to compute the same log-mel batched on its own device
(`features_on="device"`): then a worker only reads, decodes FLAC and tokenises.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from audio_llm.audio.frames import mel_frames
from audio_llm.data.layout import AudioLayout
from audio_llm.model.prompts import IGNORE_INDEX, Example
from audio_llm.model.rows import build_rows


@dataclass
class AudioSample:
    """One decoded sample: exactly one of `audio` (16 kHz, float32 or int16 PCM), `mel`
    [n_mels, T], `enc` [F, d]."""

    key: str
    text: str
    prompt: str | None
    seconds: float
    example: Example | None
    audio: np.ndarray | None = None
    mel: np.ndarray | None = None
    enc: np.ndarray | None = None


class Collator:
    """Training batches (`__call__`; `pack_tokens` > 0: samples packed into rows of at most that
    many tokens) and generation batches (`prompt_batch`) for one shard mode; each sample is
    visited once, in the batch it belongs to."""

    def __init__(
        self, layout: AudioLayout, mode: str, features_on: str = "loader", pack_tokens: int = 0
    ) -> None:
        if features_on not in ("loader", "device"):
            raise ValueError(f"features_on must be 'loader' or 'device', got {features_on!r}")
        # Waveform batches, for log-mel on the device, travel as int16 PCM: exact for the 16-bit
        # FLAC in shards, and half the bytes of float32 to send from a worker to the trainer.
        # Precomputed (mel, encoder) payloads have no log-mel left to place: they ignore it.
        self.features_on_device = mode == "audio" and features_on == "device"
        if mode == "audio" and not self.features_on_device and layout.mel_filters is None:
            raise ValueError("audio mode computes log-mel in the loader and needs mel_filters")
        self.layout = layout
        self.mode = mode
        self.pad_id = layout.prompts.tokenizer.pad_token_id
        self.pack_tokens = pack_tokens

    def __call__(self, samples: list[AudioSample]) -> dict:
        """Training batch: the LLM rows (one right-padded sample per row, or samples packed up
        to `pack_tokens` per row) with every index the model needs (`model.rows`), plus the
        audio tensors, one clip per row."""
        prompts = self.layout.prompts
        batch = build_rows(
            [s.example.input_ids for s in samples],
            [s.example.labels for s in samples],
            [self.layout.audio_tokens(_frames(s), self.mode) for s in samples],
            audio_token_id=prompts.audio_token_id,
            eos_id=prompts.eos_id,
            pad_id=self.pad_id,
            pack_tokens=self.pack_tokens,
            names=[s.key for s in samples],
        )
        return self._add_audio(batch, samples)

    def prompt_batch(self, samples: list[AudioSample]) -> dict:
        """Generation batch: left-padded prompts (no transcript) plus the audio tensors."""
        prompts = [
            self.layout.prompts.prompt(self.layout.audio_tokens(_frames(s), self.mode), s.prompt)
            for s in samples
        ]
        ids = _pad_ids(prompts, self.pad_id, left=True)
        lengths = torch.tensor([len(p) for p in prompts])
        mask = (torch.arange(ids.shape[1])[None, :] >= ids.shape[1] - lengths[:, None]).long()
        batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.full_like(ids, -100)}
        batch = self._add_audio(batch, samples)
        del batch["labels"]
        return batch

    def _add_audio(self, batch: dict, samples: list[AudioSample]) -> dict:
        ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
        # Stored payloads stay float16 (half the bytes a worker sends to the training process);
        # the encoder and projector cast their input to their own dtype.
        if self.mode == "encoder":
            batch["audio_embeds"] = _pad([s.enc for s in samples])
            batch["audio_lengths"] = torch.tensor([s.enc.shape[0] for s in samples])
        elif self.mode == "mel":
            batch["input_features"] = _pad([s.mel for s in samples])
            batch["feature_lengths"] = torch.tensor([s.mel.shape[1] for s in samples])
        elif self.features_on_device:
            batch["waveforms"] = _pad(_one_dtype([s.audio for s in samples]))
            batch["waveform_lengths"] = torch.tensor([len(s.audio) for s in samples])
        else:
            from audio_llm.audio.features import log_mel_batch

            waves = _pad([s.audio for s in samples])
            lengths = torch.tensor([len(s.audio) for s in samples])
            feats, frames = log_mel_batch(waves, lengths, self.layout.mel_filters)
            batch["input_features"], batch["feature_lengths"] = feats, frames
        audio_positions = int((ids == self.layout.prompts.audio_token_id).sum())
        batch["stats"] = {
            "samples": len(samples),
            "audio_seconds": float(sum(s.seconds for s in samples)),
            "longest_seconds": float(max(s.seconds for s in samples)),  # named after an OOM
            "target_tokens": int((labels != IGNORE_INDEX).sum()),
            "tokens": int(mask.sum()),
            "positions": ids.numel(),  # rows x row length, packed or padded
            "audio_positions": audio_positions,
            "audio_frames": sum(map(_frames, samples)),  # mel frames (encoder frames: enc)
            "audio_frames_padded": len(samples) * max(map(_frames, samples)),
        }
        batch["keys"] = [s.key for s in samples]
        batch["texts"] = [s.text for s in samples]
        return batch


def _frames(sample: AudioSample) -> int:
    """Valid frames of a decoded sample (mel frames, or encoder frames for `enc`)."""
    if sample.enc is not None:
        return sample.enc.shape[0]
    if sample.mel is not None:
        return sample.mel.shape[1]
    return mel_frames(len(sample.audio))


def _pad_ids(rows: list[list[int]], fill: int, left: bool = False) -> torch.Tensor:
    """int64 `[len(rows), longest row]`, each row padded with `fill` on the right (or left)."""
    width = max(map(len, rows))
    out = np.full((len(rows), width), fill, dtype=np.int64)
    for row, values in enumerate(rows):
        # numpy converts the list in one C loop; a torch.tensor per row cost more than the rest
        if left:
            out[row, width - len(values) :] = values
        else:
            out[row, : len(values)] = values
    return torch.from_numpy(out)


def _one_dtype(clips: list[np.ndarray]) -> list[np.ndarray]:
    """The clips as they are when all are int16 PCM; otherwise all as float32 (int16 / 32768)."""
    if all(c.dtype == np.int16 for c in clips):
        return clips
    return [c.astype(np.float32) * (1 / 32768) if c.dtype == np.int16 else c for c in clips]


def _pad(arrays: list[np.ndarray]) -> torch.Tensor:
    """Zero-padded stack `[B, *largest shape]` of arrays of one dtype, in that dtype."""
    shape = np.max([a.shape for a in arrays], axis=0)
    out = np.zeros((len(arrays), *shape), dtype=arrays[0].dtype)
    for row, a in enumerate(arrays):
        out[row][tuple(slice(0, n) for n in a.shape)] = a
    return torch.from_numpy(out)
