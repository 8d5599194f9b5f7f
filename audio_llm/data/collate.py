"""The robust collator: normalised transcripts -> token ids with the audio span -> padded batch.

Token layout and label masking come from `PromptBuilder`; this module sizes the audio span from
each sample's frame count, refuses samples that would not fit `max_length` (counted, never a
crashed step), and pads audio and text into the tensors `AudioLLM.forward` takes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from audio_llm.encoder import HOP_LENGTH, SAMPLE_RATE, encoder_frames
from audio_llm.text import IGNORE_INDEX, Example, PromptBuilder


@dataclass
class AudioSample:
    """One decoded sample: exactly one of `audio` (16 kHz), `mel` [n_mels, T], `enc` [F, d]."""

    key: str
    text: str
    prompt: str | None
    seconds: float
    example: Example | None
    audio: np.ndarray | None = None
    mel: np.ndarray | None = None
    enc: np.ndarray | None = None


def frames_of(meta: dict, mode: str) -> int:
    """Valid frames of a sample from its json: mel frames (audio, mel) or encoder frames."""
    if mode == "audio":
        samples = meta.get("num_samples") or round(float(meta["duration"]) * SAMPLE_RATE)
        return int(samples) // HOP_LENGTH
    return int(meta["frames"])


class Collator:
    """Builds examples (`encode`) and padded batches (`__call__`) for one shard mode."""

    def __init__(
        self,
        prompts: PromptBuilder,
        mode: str,
        stack_factor: int,
        max_length: int,
        mel_filters: np.ndarray | None = None,
    ) -> None:
        if mode == "audio" and mel_filters is None:
            raise ValueError("audio mode computes log-mel live and needs mel_filters")
        self.prompts = prompts
        self.mode = mode
        self.stack_factor = stack_factor
        self.max_length = max_length
        self.mel_filters = mel_filters
        self.pad_id = prompts.tokenizer.pad_token_id

    def audio_tokens(self, frames: int) -> int:
        """LLM positions for `frames` (mel frames, or encoder frames in encoder mode)."""
        enc = frames if self.mode == "encoder" else int(encoder_frames(frames))
        return -(-enc // self.stack_factor)

    def encode(self, meta: dict, frames: int) -> Example | None:
        """Ids + labels for a sample, or None when it exceeds `max_length`."""
        example = self.prompts.example(self.audio_tokens(frames), meta["text"], meta.get("prompt"))
        return example if len(example.input_ids) <= self.max_length else None

    def __call__(self, samples: list[AudioSample]) -> dict:
        """Training batch: right-padded ids, labels and mask, plus the audio tensors."""
        width = max(len(s.example.input_ids) for s in samples)
        ids = torch.full((len(samples), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(samples), width), dtype=torch.long)
        for row, s in enumerate(samples):
            n = len(s.example.input_ids)
            ids[row, :n] = torch.tensor(s.example.input_ids)
            labels[row, :n] = torch.tensor(s.example.labels)
            mask[row, :n] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        return self._add_audio(batch, samples)

    def prompt_batch(self, samples: list[AudioSample]) -> dict:
        """Generation batch: left-padded prompts (no transcript) plus the audio tensors."""
        prompts = [self.prompts.prompt(self.audio_tokens(_frames(s)), s.prompt) for s in samples]
        width = max(map(len, prompts))
        ids = torch.full((len(samples), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(samples), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.full_like(ids, -100)}
        batch = self._add_audio(batch, samples)
        del batch["labels"]
        return batch

    def _add_audio(self, batch: dict, samples: list[AudioSample]) -> dict:
        ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
        if self.mode == "encoder":
            batch["audio_embeds"], batch["audio_lengths"] = _pad_frames([s.enc for s in samples])
        elif self.mode == "mel":
            mels = [s.mel.T for s in samples]  # [T, n_mels] so frames are the padded axis
            feats, lengths = _pad_frames(mels)
            batch["input_features"], batch["feature_lengths"] = feats.transpose(1, 2), lengths
        else:
            from audio_llm.features import log_mel_batch

            waves, lengths = _pad_frames([s.audio[:, None] for s in samples])
            feats, frames = log_mel_batch(waves[..., 0], lengths, self.mel_filters)
            batch["input_features"], batch["feature_lengths"] = feats, frames
        audio_positions = int((ids == self.prompts.audio_token_id).sum())
        batch["stats"] = {
            "samples": len(samples),
            "audio_seconds": float(sum(s.seconds for s in samples)),
            "target_tokens": int((labels != IGNORE_INDEX).sum()),
            "tokens": int(mask.sum()),
            "positions": ids.numel(),
            "audio_positions": audio_positions,
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
    return len(sample.audio) // HOP_LENGTH


def _pad_frames(arrays: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack `[T_i, ...]` arrays into a zero-padded float32 `[B, T_max, ...]` plus lengths."""
    lengths = torch.tensor([a.shape[0] for a in arrays])
    out = torch.zeros((len(arrays), int(lengths.max()), *arrays[0].shape[1:]), dtype=torch.float32)
    for row, a in enumerate(arrays):
        out[row, : a.shape[0]] = torch.from_numpy(np.asarray(a, dtype=np.float32))
    return out, lengths
