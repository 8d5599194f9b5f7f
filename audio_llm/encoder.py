"""The frozen Whisper encoder and the frame arithmetic that ties audio length to LLM tokens."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn
from transformers import WhisperConfig, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder
from transformers.utils import logging as hf_logging

from audio_llm.errors import AudioLLMError

SAMPLE_RATE = 16_000
HOP_LENGTH = 160  # 10 ms mel hop: 100 mel frames per second
MEL_FRAMES_PER_WINDOW = 3000  # the 30 s window the stock encoder accepts
ENCODER_DOWNSAMPLE = 2  # conv2 has stride 2: 50 encoder frames per second


class _EncoderFromFullCheckpoint(WhisperEncoder):
    # Whisper checkpoints (openai/whisper-*) store the encoder under `model.encoder.`; this prefix
    # lets `from_pretrained` take just those weights and leave the decoder on disk.
    base_model_prefix = "model.encoder"


def load_whisper_encoder(path: str | Path, dtype: torch.dtype = torch.float32) -> WhisperEncoder:
    """Load only the encoder of a Whisper checkpoint (seq2seq or encoder-only), frozen."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the decoder weights are "unexpected" by design
    try:
        encoder, info = _EncoderFromFullCheckpoint.from_pretrained(
            str(path), dtype=dtype, output_loading_info=True
        )
    except OSError as exc:
        raise AudioLLMError(
            f"cannot load a Whisper encoder from {path!r}: {exc}. "
            "Point model.encoder at a Whisper checkpoint folder (or run `audio-llm tiny`)."
        ) from exc
    finally:
        hf_logging.set_verbosity(verbosity)
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


def mel_frames(num_samples: int) -> int:
    """Valid log-mel frames for `num_samples` of 16 kHz audio, as WhisperFeatureExtractor counts."""
    return num_samples // HOP_LENGTH


def encoder_frames(num_mel_frames: torch.Tensor | int) -> torch.Tensor | int:
    """Encoder output frames covering `num_mel_frames` (conv2: kernel 3, stride 2, padding 1)."""
    return (num_mel_frames - 1) // ENCODER_DOWNSAMPLE + 1


def encoder_identity(whisper: WhisperEncoder | WhisperConfig, path: str | Path) -> dict:
    """What must agree between precomputed encoder shards and the encoder a run uses: the
    architecture, and (given the module) a fingerprint of its weights, so two checkpoints of the
    same shape are still told apart."""
    config = whisper if isinstance(whisper, WhisperConfig) else whisper.config
    identity = {
        "name_or_path": str(path),
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

    The stock encoder only accepts the full 30 s window, so shorter features are padded to 3,000
    frames with the log-mel floor of each clip (what WhisperFeatureExtractor's zero padding
    produces after its clamp at max - 8 and rescale), and only the valid output frames are kept.
    Longer features are an error: the length policy in the data pipeline must handle them first.
    """

    def __init__(self, whisper: WhisperEncoder) -> None:
        super().__init__()
        self.whisper = whisper
        self.whisper.requires_grad_(False)
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
        if frames > self.max_mel_frames or int(lengths.max()) > self.max_mel_frames:
            raise AudioLLMError(
                f"{frames} mel frames exceed Whisper's {self.max_mel_frames}-frame (30 s) window; "
                "set data.long_audio to skip or truncate"
            )
        dtype = next(self.whisper.parameters()).dtype
        features = features.to(dtype)
        positions = torch.arange(self.max_mel_frames, device=features.device)
        valid = positions[None, :] < lengths.to(features.device)[:, None]
        padded = nn.functional.pad(features, (0, self.max_mel_frames - frames))
        clip_max = padded.masked_fill(~valid[:, None, :], float("-inf")).amax(dim=(1, 2))
        # zero samples give log10(1e-10) = -10, i.e. -1.5 rescaled, unless the max-8 clamp is higher
        floor = torch.clamp(clip_max - 2.0, min=-1.5)
        padded = torch.where(valid[:, None, :], padded, floor[:, None, None])
        hidden = self.whisper(padded).last_hidden_state
        out_lengths = self.output_lengths(lengths.to(features.device))
        return hidden[:, : int(out_lengths.max())], out_lengths
