"""Small batch builders shared by tests (the real collator lives in audio_llm.data)."""

from __future__ import annotations

import torch

from audio_llm.model.prompts import IGNORE_INDEX


def training_batch(model, mel_lengths: list[int], texts: list[str], seed: int = 0) -> dict:
    """Right-padded ids/labels plus random log-mel features of the given valid lengths."""
    gen = torch.Generator().manual_seed(seed)
    examples = [
        model.prompts.example(model.num_audio_tokens(n), t)
        for n, t in zip(mel_lengths, texts, strict=True)
    ]
    width = max(len(e.input_ids) for e in examples)
    pad = model.tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor(
            [e.input_ids + [pad] * (width - len(e.input_ids)) for e in examples]
        ),
        "labels": torch.tensor(
            [e.labels + [IGNORE_INDEX] * (width - len(e.labels)) for e in examples]
        ),
        "attention_mask": torch.tensor(
            [[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in examples]
        ),
        "input_features": torch.randn(len(texts), 80, max(mel_lengths), generator=gen),
        "feature_lengths": torch.tensor(mel_lengths),
    }


def generation_batch(model, mel_lengths: list[int], features: torch.Tensor) -> dict:
    """Left-padded prompts for generate()."""
    prompts = [model.prompts.prompt(model.num_audio_tokens(n)) for n in mel_lengths]
    width = max(map(len, prompts))
    pad = model.tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([[pad] * (width - len(p)) + p for p in prompts]),
        "attention_mask": torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts]),
        "input_features": features,
        "feature_lengths": torch.tensor(mel_lengths),
    }
