"""Trainable bridge from encoder frames to LLM embeddings, with optional frame stacking."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from audio_llm.audio.frames import audio_positions
from audio_llm.errors import AudioLLMError


class ConvContext(nn.Module):
    """Residual stack of dilated 1-D convolutions over encoder frames (pre-LayerNorm, GELU).

    Kernel 5 at dilations 1, 2, 4, 8 lets each frame see +-30 frames (0.6 s of Whisper's 50 Hz
    output), about a word either side, before frames are stacked. Padding frames are
    zeroed before every layer, so a clip's output does not depend on its batch. The stack runs
    at `width` (default: the frames' own); a narrower one is projected in and back out to the
    residual, so a wide encoder (384 for whisper-tiny.en) does not make the convolutions wide.
    """

    DILATIONS = (1, 2, 4, 8)
    KERNEL = 5

    def __init__(self, d_frames: int, dropout: float = 0.0, width: int = 0) -> None:
        super().__init__()
        width = width or d_frames
        self.inp = nn.Linear(d_frames, width)
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in self.DILATIONS)
        self.convs = nn.ModuleList(
            nn.Conv1d(width, width, self.KERNEL, padding=2 * d, dilation=d) for d in self.DILATIONS
        )
        self.out = nn.Linear(width, d_frames)
        self.dropout = nn.Dropout(dropout)

    def forward(self, frames: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        mask = valid[..., None].to(frames.dtype)
        hidden = self.inp(frames)
        for norm, conv in zip(self.norms, self.convs, strict=True):
            # GELU on the convolution's own [B, width, F] output, then back to [B, F, width]:
            # GELU's backward over a transposed view mixed with a contiguous gradient runs
            # element by element, 7x slower than over matching layouts.
            update = nn.functional.gelu(conv((norm(hidden) * mask).transpose(1, 2)))
            hidden = hidden + self.dropout(update.transpose(1, 2))
        return (frames + self.out(hidden)) * mask


def context_width_of(state: dict[str, torch.Tensor]) -> int:
    """The conv context's width in a projector state dict (0: no context)."""
    weight = state.get("context.inp.weight")
    return 0 if weight is None else int(weight.shape[0])


class AudioProjector(nn.Module):
    """`[B, F, d_enc]` -> `[B, ceil(F / k), d_llm]`.

    Stacking concatenates k consecutive frames (zero-padding the tail), so the LLM sees k times
    fewer audio positions; `kind="mlp"` adds a GELU hidden layer as in LLaVA-style projectors.
    `context="conv"` first runs a small dilated convolution stack over the frames (`ConvContext`),
    for encoders whose frames carry little context of their own (the demo's random tiny Whisper).
    """

    def __init__(
        self,
        d_encoder: int,
        d_llm: int,
        stack: int = 1,
        kind: str = "linear",
        hidden: int = 0,
        context: str = "none",
        dropout: float = 0.0,
        context_width: int = 0,
    ) -> None:
        super().__init__()
        self.d_encoder, self.d_llm, self.stack, self.kind = d_encoder, d_llm, stack, kind
        self.context_kind = context
        if context == "conv":
            self.context = ConvContext(d_encoder, dropout, context_width)
        elif context != "none":
            raise AudioLLMError(
                f"model.projector_context must be 'none' or 'conv' (got {context!r})"
            )
        d_in = d_encoder * stack
        if kind == "linear":
            self.net = nn.Sequential(nn.Linear(d_in, d_llm))
        elif kind == "mlp":
            hidden = hidden or d_llm
            self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_llm))
        else:
            raise AudioLLMError(f"model.projector must be 'linear' or 'mlp' (got {kind!r})")

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return audio_positions(lengths, self.stack)

    def forward(
        self, frames: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, num, dim = frames.shape
        if dim != self.d_encoder:
            raise AudioLLMError(
                f"audio features have width {dim} but the projector expects {self.d_encoder} "
                "(encoder d_model): shards were made with a different encoder"
            )
        # Zero frames past each clip's end so stacking never mixes padding into valid positions.
        valid = torch.arange(num, device=frames.device)[None, :] < lengths[:, None]
        frames = frames * valid[..., None].to(frames.dtype)
        if self.context_kind != "none":
            frames = self.context(frames.to(self.net[0].weight.dtype), valid)
        pad = (-num) % self.stack
        if pad:
            frames = nn.functional.pad(frames, (0, 0, 0, pad))
        stacked = frames.reshape(batch, (num + pad) // self.stack, dim * self.stack)
        weight_dtype = self.net[0].weight.dtype
        return self.net(stacked.to(weight_dtype)), self.output_lengths(lengths)

    def save(self, path: str | Path) -> None:
        """Safetensors with the shape metadata needed to rebuild the module."""
        meta = {
            "d_encoder": str(self.d_encoder),
            "d_llm": str(self.d_llm),
            "stack": str(self.stack),
            "kind": self.kind,
            "context": self.context_kind,
            "context_width": str(
                self.context.inp.out_features if self.context_kind == "conv" else 0
            ),
        }
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(path), metadata=meta)

    def load(self, path: str | Path) -> None:
        """Load weights saved by `save`; shapes must match this projector."""
        if not Path(path).is_file():
            raise AudioLLMError(f"projector weights {str(path)!r} do not exist")
        state = load_file(str(path))
        own = self.state_dict()
        for key, tensor in state.items():
            if key not in own or own[key].shape != tensor.shape:
                want = tuple(own[key].shape) if key in own else "absent"
                raise AudioLLMError(
                    f"{path}: projector tensor {key} has shape {tuple(tensor.shape)}, this model "
                    f"needs {want} (d_encoder={self.d_encoder}, d_llm={self.d_llm}, "
                    f"stack={self.stack}, kind={self.kind}, context={self.context_kind}, "
                    f"context width {context_width_of(own)}): "
                    "check model.* against stage 1"
                )
        missing = sorted(set(own) - set(state))
        if missing:
            raise AudioLLMError(f"{path}: projector tensors missing: {missing}")
        self.load_state_dict(state)
