"""The frozen Whisper encoder and the frame arithmetic that ties audio length to LLM tokens."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers import WhisperConfig, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder
from transformers.utils import logging as hf_logging

from audio_llm.audio.frames import ENCODER_DOWNSAMPLE, encoder_frames
from audio_llm.errors import AudioLLMError


class _EncoderFromFullCheckpoint(WhisperEncoder):
    # Whisper checkpoints (openai/whisper-*) store the encoder under `model.encoder.`; this prefix
    # lets `from_pretrained` take just those weights and leave the decoder on disk.
    base_model_prefix = "model.encoder"


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers logs errors only inside the block (its advice and warnings about what we do
    on purpose stay out of the terminal); the verbosity is restored after it."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def load_whisper_encoder(path: str | Path, dtype: torch.dtype = torch.float32) -> WhisperEncoder:
    """Load only the encoder of a Whisper checkpoint (seq2seq or encoder-only), frozen."""
    try:
        with quiet_transformers():  # the decoder weights are "unexpected" by design
            encoder, info = _EncoderFromFullCheckpoint.from_pretrained(
                str(path), dtype=dtype, output_loading_info=True
            )
    except OSError as exc:
        raise AudioLLMError(
            f"cannot load a Whisper encoder from {path!r}: {exc}. "
            "Point model.encoder at a Whisper checkpoint folder (or run `audio-llm tiny`)."
        ) from exc
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise AudioLLMError(
            f"{path}: not a Whisper checkpoint, {len(missing)} encoder weights missing "
            f"(first: {missing[0]})"
        )
    encoder.requires_grad_(False)
    encoder.eval()
    return encoder


def load_feature_extractor(path: str | Path) -> WhisperFeatureExtractor:
    """Load the WhisperFeatureExtractor saved beside the encoder weights."""
    try:
        return WhisperFeatureExtractor.from_pretrained(str(path))
    except OSError as exc:
        raise AudioLLMError(
            f"no Whisper feature extractor (preprocessor_config.json) in {path!r}: {exc}"
        ) from exc


def encoder_identity(
    whisper: WhisperEncoder | WhisperConfig, path: str | Path, varlen: bool = False
) -> dict:
    """What must agree between precomputed encoder shards and the encoder a run uses: the
    architecture, how it is run (`varlen`), and (given the module) a fingerprint of its weights,
    so two checkpoints of the same shape are still told apart."""
    config = whisper if isinstance(whisper, WhisperConfig) else whisper.config
    identity = {
        "name_or_path": str(path),
        "varlen": varlen,
        "d_model": config.d_model,
        "encoder_layers": config.encoder_layers,
        "num_mel_bins": config.num_mel_bins,
        "max_source_positions": config.max_source_positions,
    }
    if isinstance(whisper, nn.Module):
        digest = hashlib.sha256()
        # First and last weights: cheap even for large-v3, and any fine-tune changes them.
        # Rounded to bf16 first, so loading in float32 or bf16 gives the same fingerprint.
        for tensor in (
            whisper.conv1.weight,
            whisper.layers[-1].fc2.weight,
            whisper.layer_norm.weight,
        ):
            rounded = tensor.detach().to(torch.bfloat16).float().cpu()
            digest.update(rounded.numpy().tobytes())
        identity["weights_sha256"] = digest.hexdigest()[:16]
    return identity


class AudioEncoder(nn.Module):
    """Frozen Whisper encoder: log-mel `[B, n_mels, T]` + valid lengths -> `[B, F, d_model]`.

    Two ways to run it (`varlen`):
    - padded (default, what the seed and stock Whisper do): every clip is padded to the 30 s window
      (3,000 mel frames) with the log-mel floor of the clip (what WhisperFeatureExtractor's zero
      padding produces after its clamp at max - 8 and rescale), and only the valid output frames
      are kept. Pretrained Whisper only ever saw 30 s windows, so this is the faithful choice, but
      a 5 s clip costs as much as a 30 s one.
    - varlen: only the batch's longest clip is run; positional embeddings are sliced to its length
      and padded frames are masked out of attention (and zeroed between the convolutions), so each
      clip's output is what it gets when run alone. Cost follows audio length. For a full 30 s clip
      both give the stock encoder's output; for shorter clips varlen is a different function of
      the same weights (attention no longer sees trailing silence), which the projector and LoRA
      are trained on - the same for training and inference, so keep one setting per run.
    Features over 30 s are an error in both: the data pipeline's length policy handles them first.
    """

    def __init__(self, whisper: WhisperEncoder, varlen: bool = False) -> None:
        super().__init__()
        self.whisper = whisper
        self.whisper.requires_grad_(False)
        self.varlen = varlen
        if varlen and whisper.config._attn_implementation.startswith("flash"):
            raise AudioLLMError(
                "the varlen encoder masks padding with a 4-D attention mask, which flash "
                "attention does not take; load Whisper with sdpa or eager attention"
            )
        self.d_model: int = whisper.config.d_model
        self.num_mel_bins: int = whisper.config.num_mel_bins
        self.max_mel_frames: int = whisper.config.max_source_positions * ENCODER_DOWNSAMPLE

    def train(self, mode: bool = True) -> AudioEncoder:
        # Frozen means frozen: dropout and layerdrop stay off even while the wrapper trains.
        return super().train(False)

    def output_lengths(self, mel_lengths: torch.Tensor) -> torch.Tensor:
        return encoder_frames(mel_lengths)

    @torch.no_grad()
    def forward(
        self, features: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _, n_mels, frames = features.shape
        if n_mels != self.num_mel_bins:
            raise AudioLLMError(
                f"features have {n_mels} mel bins but the encoder expects {self.num_mel_bins}: "
                "the feature extractor and encoder come from different checkpoints"
            )
        # Shapes only: reading `lengths` would make the device wait. Valid lengths never exceed
        # the features' width (the collator pads to the longest clip).
        if frames > self.max_mel_frames:
            raise AudioLLMError(
                f"{frames} mel frames exceed Whisper's {self.max_mel_frames}-frame (30 s) window; "
                "set data.long_audio to skip or truncate"
            )
        dtype = next(self.whisper.parameters()).dtype
        features = features.to(dtype)
        lengths = lengths.to(features.device)
        if self.varlen:
            return self._forward_varlen(features, lengths)
        positions = torch.arange(self.max_mel_frames, device=features.device)
        valid = positions[None, :] < lengths[:, None]
        padded = nn.functional.pad(features, (0, self.max_mel_frames - frames))
        clip_max = padded.masked_fill(~valid[:, None, :], float("-inf")).amax(dim=(1, 2))
        # zero samples give log10(1e-10) = -10, i.e. -1.5 rescaled, unless the max-8 clamp is higher
        floor = torch.clamp(clip_max - 2.0, min=-1.5)
        padded = torch.where(valid[:, None, :], padded, floor[:, None, None])
        hidden = self.whisper(padded).last_hidden_state
        return hidden[:, : encoder_frames(frames)], self.output_lengths(lengths)

    def _forward_varlen(
        self, features: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """WhisperEncoder.forward on the features' width (the longest clip's frames, as
        collated), with padding masked out."""
        whisper = self.whisper
        frames = features.shape[-1]
        mel_valid = torch.arange(frames, device=features.device)[None, :] < lengths[:, None]
        # Zeros beyond each clip are what conv1's own zero padding shows a clip run alone ...
        hidden = nn.functional.gelu(whisper.conv1(features * mel_valid[:, None, :]))
        # ... and conv2 must see zeros there too, not gelu(conv1 bias).
        hidden = nn.functional.gelu(whisper.conv2(hidden * mel_valid[:, None, :]))
        hidden = hidden.permute(0, 2, 1)
        out_lengths = self.output_lengths(lengths)
        width = hidden.shape[1]
        hidden = hidden + whisper.embed_positions.weight[:width]
        valid = torch.arange(width, device=hidden.device)[None, :] < out_lengths[:, None]
        # Additive key mask [B, 1, 1, F], read alike by the eager and sdpa attention paths; always
        # built (all zeros when no clip is padded): asking whether it is needed is a host read.
        mask = torch.zeros(valid.shape, dtype=hidden.dtype, device=hidden.device)
        mask = mask.masked_fill(~valid, torch.finfo(hidden.dtype).min)[:, None, None, :]
        for layer in whisper.layers:
            hidden = layer(hidden, mask)
        return whisper.layer_norm(hidden), out_lengths
