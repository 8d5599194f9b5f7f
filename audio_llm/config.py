"""One typed config tree for every run: YAML/JSON file -> dataclasses -> `key=value` overrides.

Each field's `help` is the documentation (`audio-llm config --explain` prints it). Validation runs
in `__post_init__`, so a bad value fails at start-up with a message naming the field to change.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from audio_llm.errors import AudioLLMError

# Hits the LLM's attention and MLP projections and nothing else: Whisper's encoder also has
# `self_attn.q_proj`, so the LLM path (`language_model.layers.N`) is part of the pattern.
DEFAULT_LORA_REGEX = (
    r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
)
# A Qwen2-VL special token (id 151654 in the real tokenizer) that the LLM never sees in text-only
# use, so it is free to mark audio positions in real checkpoints and in the tiny one alike.
DEFAULT_AUDIO_TOKEN = "<|vision_pad|>"


def opt(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with help text (mutable defaults are copied per instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help}, **kwargs)


def signal_number(name: str) -> int:
    """`SIGTERM`, `TERM` or `15` -> 15 (for `train.stop_signals`); unknown names fail."""
    import signal

    text = str(name).strip().upper()
    if text.isdigit():
        return int(text)
    text = text if text.startswith("SIG") else "SIG" + text
    if text not in signal.Signals.__members__:
        raise AudioLLMError(
            f"train.stop_signals: unknown signal {name!r} (e.g. SIGTERM, SIGUSR1, SIGUSR2)"
        )
    return int(signal.Signals[text])


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise AudioLLMError(message)


@dataclass
class ModelConfig:
    encoder: str = opt("", "Whisper checkpoint folder (encoder + feature extractor); required.")
    llm: str = opt("", "Qwen2-VL checkpoint folder (model + tokenizer); required.")
    audio_token: str = opt(DEFAULT_AUDIO_TOKEN, "Tokenizer token that marks each audio position.")
    projector: Literal["linear", "mlp"] = opt(
        "linear", "Projector: one Linear, or Linear-GELU-Linear."
    )
    stack_factor: int = opt(1, "Concatenate k consecutive encoder frames before projecting.")
    projector_hidden: int = opt(0, "Hidden width of the mlp projector (0: the LLM's hidden size).")
    projector_context: Literal["none", "conv"] = opt(
        "none",
        "Before stacking, mix each encoder frame with its neighbours (+-0.6 s) through a residual "
        "dilated-conv stack: for encoders whose frames carry little context (the demo's random "
        "tiny Whisper). Real Whisper frames already do; keep 'none' there.",
    )
    projector_context_width: int = opt(
        0,
        "Width of the conv context stack (0: the encoder's d_model). Narrower keeps a wide "
        "encoder's context stack cheap: its frames are projected in, and back out to the residual.",
    )
    projector_dropout: float = opt(0.0, "Dropout inside the projector's context stack.")
    projector_init: str = opt("", "Projector safetensors to start from (stage 2: stage-1 output).")
    dtype: Literal["float32", "bfloat16", "float16"] = opt(
        "bfloat16", "Weights dtype (CPU: float32)."
    )
    varlen_encoder: bool = opt(
        False,
        "Run Whisper on the valid frames only (positional embeddings sliced, padding masked) "
        "instead of padding every clip to 30 s. Cheaper; Whisper was pretrained on 30 s windows.",
    )
    gradient_checkpointing: bool = opt(
        False, "Recompute LLM activations in backward to save memory."
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = opt(
        "auto",
        "The LLM's attention kernels. auto: flash_attention_2 when the flash-attn package is "
        "installed (pip install -e .[flash]), CUDA is there and model.dtype is 16-bit (packed "
        "rows then run its varlen kernels), otherwise PyTorch's sdpa.",
    )
    prompt: str = opt("Transcribe the audio.", "User instruction placed after the audio.")
    system_prompt: str | None = opt(
        "",
        "The chat template's system turn. '' (default): none: it is the same in every example, "
        "so it teaches a fine-tuned ASR model nothing and costs every sample its positions "
        "(Qwen2-VL-Instruct's default turn is about a dozen tokens, Qwen2.5's about 20). null: the "
        "template's own default (what runs made before this key trained with). Any other text: "
        "that system turn.",
    )
    chat_template: bool = opt(True, "Wrap prompts in the tokenizer's chat template.")

    def __post_init__(self) -> None:
        _check(self.stack_factor >= 1, f"model.stack_factor must be >= 1 (got {self.stack_factor})")
        _check(self.projector_hidden >= 0, "model.projector_hidden must be >= 0")
        _check(self.projector_context_width >= 0, "model.projector_context_width must be >= 0")
        _check(0 <= self.projector_dropout < 1, "model.projector_dropout must be in [0, 1)")
        _check(bool(self.audio_token), "model.audio_token must name a tokenizer token")


@dataclass
class LoraConfig:
    """LoRA on the LLM, used in stage 2 (train.stage=2)."""

    rank: int = opt(16, "LoRA rank r.")
    alpha: float = opt(32.0, "LoRA alpha (scale = alpha / r).")
    dropout: float = opt(0.05, "Dropout on the LoRA input.")
    target_regex: str = opt(
        DEFAULT_LORA_REGEX,
        "re.fullmatch over module names (as PEFT matches them): must hit only LLM projections.",
    )

    def __post_init__(self) -> None:
        _check(self.rank >= 1, f"lora.rank must be >= 1 (got {self.rank})")
        _check(0.0 <= self.dropout < 1.0, f"lora.dropout must be in [0, 1) (got {self.dropout})")


@dataclass
class ShardSource:
    """One corpus of a weighted mixture: an entry of `data.train_shards` given as a list."""

    shards: str = opt("", "This corpus's shards: a packed folder, or brace/pipe: URLs; required.")
    weight: float = opt(
        1.0, "Share of the training samples drawn from it, relative to the other weights (> 0)."
    )
    index: str = opt("", "index.json for URL shards (a packed folder has its own).")
    name: str = opt("", "Name in metrics and summary.json (default: the shards' folder name).")


def source_name(source: ShardSource, position: int) -> str:
    """`source.name`, or a metric-safe name from its shards' folder (`source{position}`)."""
    if source.name:
        return source.name
    path = Path(source.shards.split("::")[0].split()[-1] if source.shards.strip() else "")
    stem = path.parent.name if path.name == "index.json" or "{" in path.name else path.name
    stem = re.sub(r"[^\w.-]", "_", stem.removesuffix(".tar"))
    return stem or f"source{position}"


@dataclass
class DataConfig:
    train_shards: str | list[ShardSource] = opt(  # noqa: RUF009 (the default is "")
        "",
        "Training shards: a packed folder (or its index.json), or brace/pipe: URLs. Or several "
        "corpora mixed by weight, a list of {shards, weight, index, name} (see ShardSource): "
        "each step's samples come from them in proportion to the weights.",
    )
    train_index: str = opt("", "index.json for URL shard specs (a packed folder has its own).")
    eval_shards: str = opt("", "Held-out shards for WER during training (same forms).")
    eval_index: str = opt("", "index.json for URL eval shard specs.")
    batch_size: int = opt(8, "Micro-batch size per rank.")
    num_workers: int = opt(2, "DataLoader workers per rank.")
    shuffle_buffer: int = opt(1000, "Samples held in the shuffle buffer.")
    bucket_by_length: bool = opt(
        False,
        "Group samples of similar duration inside the shuffle buffer so batches carry little "
        "padding.",
    )
    align_ranks: bool = opt(
        True,
        "With bucket_by_length and several ranks: every rank takes its buffer's batches in one "
        "shared order of their lengths, so the ranks' batches at a step are alike and none waits "
        "long for another at the gradient all-reduce. false: each rank shuffles its own.",
    )
    max_batch_seconds: float = opt(
        0.0,
        "Token-budget batches: cap batch_size x longest clip (seconds) per batch; 0 = fixed "
        "batch_size. Needs bucket_by_length; >= 30 so that any clip fits.",
    )
    max_length: int = opt(2048, "Max tokens (audio + prompt + transcript); longer samples skipped.")
    pack_tokens: int = opt(
        0,
        "Pack samples into LLM rows of at most this many tokens, padding-free (each sample keeps "
        "its own positions and attends only to itself); 0 = one sample per row, right-padded. "
        ">= max_length.",
    )
    long_audio: Literal["skip", "truncate"] = opt("skip", "Audio over 30 s: skip or cut to 30 s.")
    features_on: Literal["loader", "device"] = opt(
        "loader",
        "Live (audio) shards: compute log-mel in the loader workers, or only decode there and "
        "compute it batched on the training device (for nodes with few CPU cores per GPU). "
        "Mel and encoder shards carry precomputed features and ignore it.",
    )
    time_masks: int = opt(
        0,
        "SpecAugment: time spans masked per training clip, on log-mel (audio/mel shards) or on "
        "encoder frames (encoder shards); 0 = off. Not with features_on=device.",
    )
    time_mask_seconds: float = opt(0.1, "Longest time mask, in seconds (widths uniform from 0).")
    feature_masks: int = opt(
        0, "SpecAugment: bands of mel bins / encoder channels masked per training clip; 0 = off."
    )
    feature_mask_fraction: float = opt(
        0.1, "Widest feature mask, as a fraction of the channels (widths uniform from 0)."
    )
    seed: int = opt(0, "Seeds shard order, shuffling and augmentation (with epoch, rank, worker).")

    def __post_init__(self) -> None:
        if isinstance(self.train_shards, list):
            self._check_sources()
        _check(self.batch_size >= 1, f"data.batch_size must be >= 1 (got {self.batch_size})")
        _check(self.num_workers >= 0, "data.num_workers must be >= 0")
        _check(self.max_length >= 16, f"data.max_length must be >= 16 (got {self.max_length})")
        _check(
            self.pack_tokens == 0 or self.pack_tokens >= self.max_length,
            f"data.pack_tokens={self.pack_tokens} must be 0 (off) or >= data.max_length="
            f"{self.max_length}, so that every sample fits a row",
        )
        _check(
            self.time_masks >= 0 and self.feature_masks >= 0,
            "data.time_masks/feature_masks must be >= 0",
        )
        _check(self.time_mask_seconds >= 0, "data.time_mask_seconds must be >= 0")
        _check(0 <= self.feature_mask_fraction <= 1, "data.feature_mask_fraction must be in [0, 1]")
        budget = self.max_batch_seconds
        _check(
            budget == 0 or self.bucket_by_length,
            "data.max_batch_seconds cuts batches from the length-sorted buffer: "
            "set data.bucket_by_length=true too (or max_batch_seconds=0)",
        )
        _check(
            budget == 0 or budget >= 30,
            f"data.max_batch_seconds={budget:g} is less than one 30 s clip: set it >= 30 "
            "(or 0 for fixed batch_size)",
        )

    @property
    def mixed(self) -> bool:
        """Several corpora mixed by weight (`train_shards` given as a list)."""
        return isinstance(self.train_shards, list)

    def sources(self) -> list[ShardSource]:
        """The training corpora, names filled in: the list, or the one `train_shards` string
        (weight 1, `train_index`)."""
        if not self.mixed:
            one = ShardSource(self.train_shards, 1.0, self.train_index)
            return [dataclasses.replace(one, name=source_name(one, 0))]
        return [
            dataclasses.replace(s, name=source_name(s, i)) for i, s in enumerate(self.train_shards)
        ]

    def _check_sources(self) -> None:
        """A list of sources: each names its shards, weights are > 0, names are distinct."""
        sources = self.train_shards
        _check(
            len(sources) > 0,
            "data.train_shards is an empty list: give a packed folder, or a list of "
            "{shards: DIR, weight: W} entries",
        )
        _check(
            not self.train_index,
            "data.train_index is for a single train_shards string; with a list, give each "
            "URL source its own 'index'",
        )
        for i, source in enumerate(sources):
            where = f"data.train_shards[{i}]"
            _check(
                bool(source.shards.strip()),
                f"{where} has no 'shards': every source needs shards: DIR (a packed folder) "
                "or URLs, e.g. {shards: /data/ls, weight: 0.8}",
            )
            _check(
                math.isfinite(source.weight) and source.weight > 0,
                f"{where}.weight must be a number > 0 (got {source.weight!r}); leave a corpus "
                "out of the list rather than weighting it 0",
            )
            _check(
                re.fullmatch(r"[\w.-]*", source.name) is not None,
                f"{where}.name {source.name!r} may hold only letters, digits, '_', '.', '-'",
            )
        names = [s.name for s in self.sources()]
        twice = sorted({n for n in names if names.count(n) > 1})
        _check(
            not twice,
            f"data.train_shards: sources named {twice} more than once: give each a distinct 'name'",
        )


@dataclass
class TrainConfig:
    stage: Literal[1, 2] = opt(1, "1: projector only. 2: projector + LoRA.")
    out_dir: str = opt("runs/stage1", "Run directory: checkpoints, exports, TensorBoard.")
    max_steps: int = opt(1000, "Optimizer steps.")
    lr: float = opt(1e-3, "Peak learning rate.")
    min_lr_ratio: float = opt(0.1, "Final lr as a fraction of the peak.")
    warmup_steps: int = opt(100, "Linear warmup steps.")
    schedule: Literal["cosine", "linear", "constant"] = opt("cosine", "Decay after warmup.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    grad_accum: int = opt(1, "Micro-batches per optimizer step.")
    clip_grad: float = opt(1.0, "Gradient-norm clip (0: off).")
    save_every: int = opt(500, "Checkpoint every N steps (and at the end).")
    keep_last: int = opt(3, "Checkpoints to keep.")
    log_every: int = opt(10, "Log every N steps.")
    seed: int = opt(0, "Model-side seed (projector/LoRA init, dropout).")
    max_bad_steps: int = opt(5, "Abort after this many non-finite losses in a row.")
    peak_tflops: float = opt(
        0.0,
        "Peak dense TFLOP/s per device for MFU (H100 SXM bf16: 989). 0 = auto: the dense bf16 "
        "peak of a known GPU by its name (planning.flops.PEAK_BF16_TFLOPS); no MFU on other "
        "devices or the CPU. Set it for an unlisted GPU or for fp16/fp32 training.",
    )
    ctc_weight: float = opt(
        0.0,
        "Add this times a CTC loss on the projector output, scored against the LLM's own (frozen) "
        "input embeddings plus one learned blank vector: it teaches the projector to emit, in "
        "order, vectors the LLM reads as the transcript's tokens. For projectors learning from "
        "nothing against a small LLM (the demo); 0 = off. Costs an audio-positions x vocab "
        "matmul per sample (and, under ZeRO-3, gathering the embedding matrix each step).",
    )

    # opt() gives a list default its own default_factory, so instances never share it.
    stop_signals: list[str] = opt(  # noqa: RUF009
        ["SIGTERM", "SIGUSR1"],
        "Signals that stop training cleanly: every rank finishes its step, the ranks agree on "
        "the step, checkpoint it and exit 75 (preempted, resumable: --resume auto goes on). "
        "SLURM sends SIGTERM at the time limit and on preemption; [] keeps Python's defaults.",
    )
    collective_timeout_s: float = opt(
        1800.0,
        "Seconds a collective waits for every rank before the run stops (exit 4) with a "
        "message naming the ranks that did not arrive and the last step each completed "
        "(RUN_DIR/heartbeat/). Longer than the slowest step, eval or checkpoint save.",
    )

    def __post_init__(self) -> None:
        _check(self.max_steps >= 1, f"train.max_steps must be >= 1 (got {self.max_steps})")
        _check(self.lr > 0, f"train.lr must be > 0 (got {self.lr})")
        _check(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio must be in [0, 1]")
        _check(self.warmup_steps >= 0, "train.warmup_steps must be >= 0")
        _check(self.grad_accum >= 1, f"train.grad_accum must be >= 1 (got {self.grad_accum})")
        _check(self.save_every >= 1 and self.keep_last >= 1, "train.save_every/keep_last >= 1")
        _check(self.peak_tflops >= 0, f"train.peak_tflops must be >= 0 (got {self.peak_tflops})")
        _check(self.ctc_weight >= 0, f"train.ctc_weight must be >= 0 (got {self.ctc_weight})")
        _check(
            self.collective_timeout_s > 0,
            f"train.collective_timeout_s must be > 0 (got {self.collective_timeout_s})",
        )
        for name in self.stop_signals:
            signal_number(name)  # an unknown name fails here, not when the run installs it


@dataclass
class EvalConfig:
    every: int = opt(0, "Run WER on data.eval_shards every N steps and at the end (0: off).")
    at_start: bool = opt(False, "Also score the model before the first step.")
    limit: int = opt(0, "Score at most this many eval samples during training (0: all).")
    batch_size: int = opt(8, "Generation batch size per rank.")
    max_new_tokens: int = opt(128, "Generation length cap.")
    num_beams: int = opt(1, "Beam size (1: greedy).")
    ctc_weight: float = opt(
        0.0,
        "Joint CTC/LLM decoding: weight of the CTC head's prefix score against the LLM's "
        "(needs train.ctc_weight > 0; 0 = the LLM alone).",
    )
    normalizer: Literal["none", "basic", "whisper"] = opt("basic", "Text normaliser for WER.")

    def __post_init__(self) -> None:
        _check(self.every >= 0, f"eval.every must be >= 0 (got {self.every})")
        _check(self.max_new_tokens >= 1, "eval.max_new_tokens must be >= 1")
        _check(self.num_beams >= 1 and self.batch_size >= 1, "eval.num_beams/batch_size >= 1")
        _check(self.limit >= 0, "eval.limit must be >= 0")
        _check(0 <= self.ctc_weight <= 1, f"eval.ctc_weight must be in [0, 1]: {self.ctc_weight}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        _check(
            self.eval.ctc_weight == 0 or self.train.ctc_weight > 0,
            "eval.ctc_weight decodes with the CTC head, which only train.ctc_weight > 0 trains: "
            "set train.ctc_weight too, or eval.ctc_weight=0",
        )

    @property
    def use_lora(self) -> bool:
        """Stage 2 adds LoRA; stage 1 trains the projector alone."""
        return self.train.stage == 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one value against a field's annotation; errors name the field."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise AudioLLMError(f"{where} must be one of {list(choices)} (got {value!r})")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        # a list goes to the union's list alternative (data.train_shards: str | list[...])
        lists = [a for a in args if typing.get_origin(a) is list]
        if lists and isinstance(value, dict):
            raise AudioLLMError(
                f"{where} must be a string or a list (got a mapping): write each entry as a "
                "list item, e.g. [{shards: DIR, weight: 0.8}, {shards: DIR2, weight: 0.2}]"
            )
        return _coerce(value, lists[0] if lists and isinstance(value, list) else args[0], where)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str) and not dataclasses.is_dataclass(item):
            # `train.stop_signals=SIGTERM,SIGUSR1` on a command line
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list):
            raise AudioLLMError(f"{where} must be a list (got {value!r})")
        if dataclasses.is_dataclass(item):
            return [_build(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise AudioLLMError(f"{where} must be true or false (got {value!r})")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise AudioLLMError(f"{where} must be an integer (got {value!r})")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise AudioLLMError(f"{where} must be a number (got {value!r})")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise AudioLLMError(f"{where} must be a string (got {value!r})")
    return value


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise AudioLLMError(f"{where or 'config'} must be a mapping (got {type(data).__name__})")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = f"{where}.{key}" if where else key
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {where + '.' if where else ''}{close[0]}?" if close else ""
            raise AudioLLMError(f"unknown config key {name!r}{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, name)
        else:
            kwargs[key] = _coerce(value, tp, name)
    return cls(**kwargs)


def _merge(base: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = base
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise AudioLLMError(f"override {key!r}: {part!r} is not a section")
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML/JSON config (optional), apply `section.key=value` overrides, validate."""
    data: dict[str, Any] = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise AudioLLMError(f"config file {str(path)!r} does not exist")
        text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text) if path.suffix == ".json" else (yaml.safe_load(text) or {})
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise AudioLLMError(f"{path}: cannot parse: {exc}") from exc
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise AudioLLMError(f"override {item!r} must look like section.key=value")
        _merge(data, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return _build(Config, data, "")


def explain(cls: type = Config, prefix: str = "") -> list[str]:
    """One line per field: dotted name, type, default and help."""
    lines = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            lines.extend(explain(tp, f"{prefix}{f.name}."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"{prefix}{f.name} = {default!r}  # {f.metadata.get('help', '')}")
        for part in typing.get_args(tp):  # list entries' fields: data.train_shards[].weight
            (item,) = typing.get_args(part) or (None,)
            if typing.get_origin(part) is list and dataclasses.is_dataclass(item):
                lines.extend(explain(item, f"{prefix}{f.name}[]."))
    return lines
