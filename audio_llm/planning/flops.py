"""Analytic training FLOPs of the AudioLLM from its configs: MFU logging, `plan`, benchmarks.

Conventions (the same as torch's `FlopCounterMode`, so a measured count checks these formulas):

- 2 FLOPs per multiply-accumulate. Only matrix products count: linear layers, Whisper's two
  convolutions, and attention's QK^T and AV. Norms, activations, softmax, RoPE, residual adds and
  the loss are left out (well under 1% at real shapes).
- Attention counts the full T x T score matrix (4 T^2 d per layer), which is what the math and
  memory-efficient kernels execute under a padding mask; a causal flash kernel skips about half.
  GQA shrinks the K/V projections, not the score FLOPs.
- The lm_head is counted on the positions that predict a target only ("scored" positions: the
  transcript's tokens and end-of-turn), which is all `AudioLLM.forward` runs it on in training.
- Training = forward + backward. A matmul's backward costs 1x its forward for the input gradient
  (whenever something below needs it) and 1x for the weight gradient (when the weight trains).
  Frozen LLM weights: 2x (the gradient must reach the projector under them). Attention matmuls
  and LoRA: 3x. The projector's first layer: 2x (its input, the frozen encoder's output, needs no
  gradient); the mlp projector's second layer: 3x. The encoder runs without grad: 1x, and only in
  steps that run it (not on precomputed encoder shards).
- Model FLOPs (PaLM's MFU): a batch's `useful` FLOPs are its samples' own, each at its own length,
  without padding and without gradient checkpointing's recomputed forward; the headline MFU
  counts these. What the device executes (`executed`: padding included; plus `recompute` with
  checkpointing) is the second figure, hardware FLOPs utilisation (HFU).

Encoder modes: `padded` (the seed: every clip runs the full 30 s window, 1,500 frames) and
`varlen` (valid frames only, 50 per second of audio, batches padded to their longest clip).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

from audio_llm.audio.frames import ENCODER_DOWNSAMPLE, HOP_LENGTH, SAMPLE_RATE
from audio_llm.audio.frames import audio_positions as frames_to_positions
from audio_llm.errors import AudioLLMError

if TYPE_CHECKING:  # annotations only: the formulas need neither torch nor transformers
    from torch import nn
    from transformers import PretrainedConfig, WhisperConfig

ENCODER_MODES = ("padded", "varlen")
ENCODER_FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH // ENCODER_DOWNSAMPLE  # 50
# Modules the default `lora.target_regex` adapts in every LLM layer.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """Everything the FLOP formulas need, read from the Whisper and Qwen2-VL configs."""

    n_mels: int
    d_encoder: int
    encoder_layers: int
    encoder_ffn: int
    encoder_max_frames: int  # 1,500: the 30 s window
    d_llm: int
    llm_layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    stack: int = 1
    projector: str = "linear"
    projector_hidden: int = 0  # mlp hidden width; 0: d_llm
    lora_params: int = 0  # all LoRA A and B weights: one MAC per weight per position
    encoder_mode: str = "padded"
    projector_context: str = "none"  # "conv": ConvContext over encoder frames before stacking
    context_width: int = 0  # the ConvContext's width; 0: d_encoder
    ctc: bool = False  # train.ctc_weight > 0: projector output x (embedding table + blank)
    audio_token_id: int = -1  # placeholders never meet the lm_head (-1: trust the batch's labels)

    def __post_init__(self) -> None:
        if self.encoder_mode not in ENCODER_MODES:
            raise AudioLLMError(f"encoder mode must be one of {ENCODER_MODES}")
        if self.projector not in ("linear", "mlp"):
            raise AudioLLMError(f"projector must be 'linear' or 'mlp' (got {self.projector!r})")
        if self.stack < 1:
            raise AudioLLMError(f"stack factor must be >= 1 (got {self.stack})")

    @classmethod
    def from_configs(
        cls,
        whisper: WhisperConfig,
        llm: PretrainedConfig,
        *,
        stack: int = 1,
        projector: str = "linear",
        projector_hidden: int = 0,
        lora_rank: int = 0,
        lora_targets: Sequence[str] = LORA_TARGETS,
        encoder_mode: str = "padded",
    ) -> ModelShape:
        text = getattr(llm, "text_config", llm)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return cls(
            n_mels=whisper.num_mel_bins,
            d_encoder=whisper.d_model,
            encoder_layers=whisper.encoder_layers,
            encoder_ffn=whisper.encoder_ffn_dim,
            encoder_max_frames=whisper.max_source_positions,
            d_llm=text.hidden_size,
            llm_layers=text.num_hidden_layers,
            heads=text.num_attention_heads,
            kv_heads=text.num_key_value_heads,
            head_dim=head_dim,
            intermediate=text.intermediate_size,
            vocab=text.vocab_size,
            stack=stack,
            projector=projector,
            projector_hidden=projector_hidden,
            lora_params=lora_params(llm, lora_rank, lora_targets),
            encoder_mode=encoder_mode,
        )

    @classmethod
    def from_model(cls, model: nn.Module, encoder_mode: str | None = None) -> ModelShape:
        """The shape of a built AudioLLM (encoder mode: the encoder's own unless given); LoRA
        weights are counted, not derived."""
        if encoder_mode is None:
            encoder_mode = "varlen" if getattr(model.encoder, "varlen", False) else "padded"
        projector = model.projector
        hidden = projector.net[0].out_features if projector.kind == "mlp" else 0
        extra = {
            "projector_context": projector.context_kind,
            "context_width": projector.context.inp.out_features
            if projector.context_kind == "conv"
            else 0,
            "ctc": "ctc" in model.loss_heads(),  # the CTC head's loss (train.ctc_weight > 0)
            "audio_token_id": model.audio_token_id,
        }
        shape = cls.from_configs(
            model.encoder.whisper.config,
            model.llm.config,
            stack=projector.stack,
            projector=projector.kind,
            projector_hidden=hidden,
            encoder_mode=encoder_mode,
        )
        lora = sum(p.numel() for n, p in model.llm.named_parameters() if ".lora_" in n)
        return replace(shape, lora_params=lora, **extra)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def lora_params(llm: PretrainedConfig, rank: int, targets: Sequence[str] = LORA_TARGETS) -> int:
    """LoRA weights (A: r x in, B: out x r) on `targets` in every layer of a Qwen2(-VL) LLM."""
    if rank <= 0:
        return 0
    text = getattr(llm, "text_config", llm)
    h, inter = text.hidden_size, text.intermediate_size
    head_dim = getattr(text, "head_dim", None) or h // text.num_attention_heads
    q, kv = text.num_attention_heads * head_dim, text.num_key_value_heads * head_dim
    dims = {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }
    unknown = sorted(set(targets) - set(dims))
    if unknown:
        raise AudioLLMError(f"no FLOP formula for LoRA targets {unknown}; known: {sorted(dims)}")
    return text.num_hidden_layers * rank * sum(sum(dims[t]) for t in targets)


# -- forward FLOPs of one row ------------------------------------------------------------------
def encoder_forward(shape: ModelShape, frames: int, mel_frames: int | None = None) -> float:
    """Whisper encoder forward over `frames` output frames (`mel_frames` in, default 2x)."""
    mel = ENCODER_DOWNSAMPLE * frames if mel_frames is None else mel_frames
    d = shape.d_encoder
    convs = 2 * mel * shape.n_mels * d * 3 + 2 * frames * d * d * 3  # kernel 3; conv2 stride 2
    per_layer = 2 * frames * (4 * d * d + 2 * d * shape.encoder_ffn) + 4 * frames * frames * d
    return float(convs + shape.encoder_layers * per_layer)


def audio_positions(shape: ModelShape, frames: int) -> int:
    """LLM positions the projector makes from `frames` encoder frames."""
    return frames_to_positions(frames, shape.stack)


def context_forward(shape: ModelShape, frames: int) -> tuple[float, float]:
    """(input Linear, convs + output Linear) forward FLOPs of the projector's conv context."""
    if shape.projector_context == "none":
        return 0.0, 0.0
    from audio_llm.model.projector import ConvContext

    width = shape.context_width or shape.d_encoder
    linear = 2.0 * frames * shape.d_encoder * width  # in, and again out to the residual
    convs = 2.0 * frames * width * width * ConvContext.KERNEL * len(ConvContext.DILATIONS)
    return linear, convs + linear


def projector_forward(shape: ModelShape, frames: int) -> tuple[float, float]:
    """(first layer, second layer) forward FLOPs of the projector over `frames` encoder frames."""
    n, d_in = audio_positions(shape, frames), shape.d_encoder * shape.stack
    if shape.projector == "linear":
        return 2.0 * n * d_in * shape.d_llm, 0.0
    hidden = shape.projector_hidden or shape.d_llm
    return 2.0 * n * d_in * hidden, 2.0 * n * hidden * shape.d_llm


@dataclass(frozen=True)
class LLMForward:
    """Forward FLOPs of the LLM over one row, split by how their backward costs."""

    frozen: float  # base projections and lm_head: backward = input gradient only
    attention: float  # QK^T and AV: gradients for both operands
    lora: float

    @property
    def total(self) -> float:
        return self.frozen + self.attention + self.lora


def llm_forward(shape: ModelShape, positions: int, scored: float | None = None) -> LLMForward:
    """Qwen2 decoder over `positions` tokens: GQA attention, SwiGLU MLP, and the lm_head on the
    `scored` positions (default: all of them, as in generation)."""
    t, h = positions, shape.d_llm
    scored = t if scored is None else scored
    projections = h * (2 * shape.q_dim + 2 * shape.kv_dim) + 3 * h * shape.intermediate
    frozen = 2.0 * (t * shape.llm_layers * projections + scored * h * shape.vocab)
    attention = 4.0 * t * t * shape.q_dim * shape.llm_layers
    return LLMForward(frozen, attention, 2.0 * t * shape.lora_params)


# -- training FLOPs ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Flops:
    """Training FLOPs (forward + backward) by component."""

    encoder: float = 0.0
    projector: float = 0.0
    llm: float = 0.0

    @property
    def total(self) -> float:
        return self.encoder + self.projector + self.llm

    def __add__(self, other: Flops) -> Flops:
        return Flops(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def scaled(self, factor: float) -> Flops:
        return Flops(*(getattr(self, f.name) * factor for f in fields(self)))


def training_flops(
    shape: ModelShape,
    frames: int,
    positions: int,
    rows: int = 1,
    run_encoder: bool = True,
    encoder_frames: int | None = None,
    encoder_mel_frames: int | None = None,
    scored: float | None = None,
) -> Flops:
    """Training FLOPs of `rows` rows of `frames` encoder frames and `positions` LLM positions,
    `scored` of which (per row, default all) predict a target and so meet the lm_head.

    The encoder executes `encoder_frames` per row (default: the full window in `padded` mode,
    else `frames`) from `encoder_mel_frames` (default 2x); the projector runs on `frames` (the
    encoder's output is cut to them).
    """
    encoder = 0.0
    if run_encoder:
        if encoder_frames is None:
            padded = shape.encoder_mode == "padded"
            encoder_frames = shape.encoder_max_frames if padded else frames
        encoder = encoder_forward(shape, encoder_frames, encoder_mel_frames)
    first, second = projector_forward(shape, frames)
    context_in, context_rest = context_forward(shape, frames)
    if context_in:
        # The context's input Linear reads the frozen encoder output (weight gradient only);
        # every conv reads a trainable LayerNorm's output, so everything after needs both.
        projector = 2 * context_in + 3 * (context_rest + first + second)
    else:
        projector = 2 * first + 3 * second
    if shape.ctc:  # logits against the frozen table: forward + the projector-side gradient
        projector += 2 * 2.0 * audio_positions(shape, frames) * shape.d_llm * (shape.vocab + 1)
    llm = llm_forward(shape, positions, scored)
    llm_total = 2 * llm.frozen + 3 * (llm.attention + llm.lora)
    return Flops(encoder, projector, llm_total).scaled(rows)


@dataclass(frozen=True)
class BatchFlops:
    """What a padded batch executes, what its samples alone would need, and the padding."""

    executed: Flops
    useful: Flops  # each sample at its own length: valid encoder frames, its own positions
    encoder_frames_executed: int  # 0 when the encoder did not run
    encoder_frames_valid: int
    positions_executed: int
    positions_valid: int
    # Gradient checkpointing runs every LLM decoder layer's forward again in backward, over the
    # executed (padded) positions; the lm_head is not checkpointed.
    recompute: float = 0.0

    def executed_total(self, checkpointing: bool) -> float:
        """FLOPs the device runs: padding included, and the recomputed forward when
        `checkpointing` (model.gradient_checkpointing) is on."""
        return self.executed.total + (self.recompute if checkpointing else 0.0)

    @property
    def encoder_padded_fraction(self) -> float:
        done = self.encoder_frames_executed
        return 1.0 - self.encoder_frames_valid / done if done else 0.0


def padded_batch_flops(
    shape: ModelShape,
    frames: Sequence[int],
    positions: Sequence[int],
    run_encoder: bool = True,
    width_frames: int | None = None,
    width_positions: int | None = None,
    mel_frames: Sequence[int] | None = None,
    scored: Sequence[int] | None = None,
) -> BatchFlops:
    """A batch right-padded to `width_*` (default: its longest row) vs its rows alone.

    `mel_frames` (valid log-mel frames per row, default 2x `frames`) sizes the varlen encoder's
    first convolution exactly. `scored` (per row, default every position) are the positions the
    lm_head runs on; padding never meets it.
    """
    if not frames or len(frames) != len(positions):
        raise AudioLLMError("a batch needs one frame count and one position count per row")
    rows = len(frames)
    mel = [2 * f for f in frames] if mel_frames is None else list(mel_frames)
    width_f = max(frames) if width_frames is None else width_frames
    width_t = max(positions) if width_positions is None else width_positions
    if shape.encoder_mode == "padded":
        enc_width, enc_mel = shape.encoder_max_frames, 2 * shape.encoder_max_frames
    else:
        enc_width, enc_mel = max(frames), max(mel)
    scored = list(positions) if scored is None else list(scored)
    mean_scored = sum(scored) / rows  # the head's FLOPs are linear in its positions
    executed = training_flops(
        shape, width_f, width_t, rows, run_encoder, enc_width, enc_mel, mean_scored
    )
    useful = Flops()
    for f, m, t, n in zip(frames, mel, positions, scored, strict=True):
        useful += training_flops(shape, f, t, 1, run_encoder, f, m, n)
    return BatchFlops(
        executed=executed,
        useful=useful,
        encoder_frames_executed=rows * enc_width if run_encoder else 0,
        encoder_frames_valid=sum(frames) if run_encoder else 0,
        positions_executed=rows * width_t,
        positions_valid=sum(positions),
        recompute=rows * llm_forward(shape, width_t, scored=0).total,
    )


def batch_flops(
    shape: ModelShape, frames: Sequence[int], text_tokens: Sequence[int], run_encoder: bool = True
) -> BatchFlops:
    """A batch of clips (`frames` encoder frames each) with `text_tokens` non-audio positions
    each (prompt, template and transcript), right-padded to its longest row."""
    positions = [audio_positions(shape, f) + t for f, t in zip(frames, text_tokens, strict=True)]
    return padded_batch_flops(shape, frames, positions, run_encoder)


def batch_flops_from_tensors(shape: ModelShape, batch: dict) -> BatchFlops:
    """FLOPs of a collated training batch, read from its tensors (what the step runs).

    The encoder counts only for batches that run it (log-mel or waveforms, not precomputed
    encoder outputs); its output, and so the projector's input, is cut to the longest clip.
    Packed batches (`data.pack_tokens`, several samples per LLM row) execute their LLM rows as
    they are: rows x row length, each row attending over its whole width.
    """
    from audio_llm.model.audio_llm import target_labels

    width_t = int(batch["input_ids"].shape[1])
    if "sample_lengths" in batch:  # collated (`model.rows`): per sample, packed or not
        positions = batch["sample_lengths"].tolist()
        scored = batch["sample_targets"].tolist()
        rows = len(batch["input_ids"])
        if len(positions) != rows:
            padded = _clip_flops(shape, batch, positions, max(positions), scored)
            return _as_packed(shape, padded, rows, width_t, sum(scored))
        return _clip_flops(shape, batch, positions, width_t, scored)
    positions = [int(n) for n in batch["attention_mask"].sum(dim=1).tolist()]
    scored = None
    if "labels" in batch:  # the model's own rule for the positions its loss scores
        targets = target_labels(
            batch["input_ids"], batch["attention_mask"], batch["labels"], shape.audio_token_id
        )
        scored = [int(n) for n in (targets != -100).sum(dim=1).tolist()]
    return _clip_flops(shape, batch, positions, width_t, scored)


def _clip_flops(
    shape: ModelShape,
    batch: dict,
    positions: list[int],
    width_t: int,
    scored: list[int] | None,
) -> BatchFlops:
    """`padded_batch_flops` of a batch's clips, one sample per row."""
    from audio_llm.audio.frames import encoder_frames, mel_frames

    if "audio_embeds" in batch:
        frames = [int(n) for n in batch["audio_lengths"].tolist()]
        width_f = int(batch["audio_embeds"].shape[1])
        return padded_batch_flops(shape, frames, positions, False, width_f, width_t, None, scored)
    if "waveforms" in batch:
        mel = [mel_frames(int(n)) for n in batch["waveform_lengths"].tolist()]
    else:
        mel = [int(n) for n in batch["feature_lengths"].tolist()]
    frames = [int(encoder_frames(n)) for n in mel]
    return padded_batch_flops(shape, frames, positions, True, None, width_t, mel, scored)


def _as_packed(
    shape: ModelShape, padded: BatchFlops, rows: int, width: int, scored: int
) -> BatchFlops:
    """`padded` (the clips one per row) with its executed LLM FLOPs and positions replaced by
    those of `rows` packed rows of `width` positions; the audio side is the same."""
    llm = training_flops(shape, 1, width, rows, False, scored=scored / rows).llm
    executed = replace(padded.executed, llm=llm)
    return replace(padded, executed=executed, positions_executed=rows * width)


# Dense bf16 tensor-core peaks per device (vendor datasheets, without 2:4 sparsity), matched
# against torch.cuda.get_device_name() upper-cased; first match wins, so variants precede their
# family (an H100 PCIe is not an SXM part).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"H100.*PCIE", 756.0),
    (r"H[12]00.*NVL", 835.0),
    (r"H100|H200|GH200", 989.0),  # SXM: H200 has H100's compute, more and faster memory
    (r"B200", 2250.0),
    (r"A100", 312.0),
    (r"L40S", 362.0),
    (r"\bL40\b", 181.0),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),
)


def peak_tflops(device_name: str) -> float:
    """Dense bf16 peak TFLOP/s of a device named as `torch.cuda.get_device_name()` says; 0.0 for
    a device not in `PEAK_BF16_TFLOPS` (MFU is then not logged unless train.peak_tflops is set)."""
    name = device_name.upper()
    return next((peak for pattern, peak in PEAK_BF16_TFLOPS if re.search(pattern, name)), 0.0)


def resolve_peak_tflops(configured: float, device_name: str | None) -> float:
    """`train.peak_tflops` when set (> 0), else the table's figure for this device (0.0: none
    known, or no GPU)."""
    if configured > 0:
        return configured
    return peak_tflops(device_name) if device_name else 0.0


def flops_rates(
    flops: float, seconds: float, peak_tflops: float = 0.0, executed: float | None = None
) -> dict[str, float]:
    """Per device over `seconds`: TFLOP/s of the model FLOPs `flops` (real tokens only) and, with
    `peak_tflops`, MFU; with `executed` (padding and recompute included) also their TFLOP/s and
    HFU, the hardware FLOPs utilisation."""
    per_s = (lambda n: n / seconds / 1e12) if seconds > 0 else (lambda n: 0.0)
    rates = {"tflops_per_device": per_s(flops)}
    if executed is not None:
        rates["executed_tflops_per_device"] = per_s(executed)
    if peak_tflops > 0:
        rates["mfu"] = rates["tflops_per_device"] / peak_tflops
        if executed is not None:
            rates["hfu"] = rates["executed_tflops_per_device"] / peak_tflops
    return rates


def with_flops(
    batches: Iterator[dict], shape: ModelShape, checkpointing: bool = False
) -> Iterator[dict]:
    """The batches, each with its training FLOPs in `batch["stats"]`: `flops`, the model FLOPs
    of its samples alone (MFU's numerator), and `flops_executed`, what the step runs: padding,
    and with `checkpointing` the recomputed forward of the LLM layers."""
    for batch in batches:
        counted = batch_flops_from_tensors(shape, batch)
        stats = batch.setdefault("stats", {})
        stats["flops"] = counted.useful.total
        stats["flops_executed"] = counted.executed_total(checkpointing)
        yield batch
