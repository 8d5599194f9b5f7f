"""Tiny offline checkpoints shaped like openai/whisper-* and Qwen/Qwen2-VL-*-Instruct.

`audio-llm tiny --out DIR` writes DIR/whisper and DIR/qwen2vl with `save_pretrained`, so every
later step loads them through the same `from_pretrained` code that loads the real 7B models.
Everything is derived from the seed: same seed, same bytes. The random Whisper's residual branches
and positions are scaled down (`WHISPER_PASSTHROUGH`) so that, frozen, it passes the audio on.

`audio-llm tiny --like whisper-large-v3,qwen2-vl-2b --out DIR` writes the same two folders at the
published shapes (`model.arch`) with random bf16 weights instead: for smoke-testing a cluster's
launch, memory and speed before downloading the real checkpoints. The tokenizer is still the tiny
one (its ids fit any embedding table); `--layers` and `--shrink` make smaller relatives for tests.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from torch import nn
from transformers import (
    GenerationConfig,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer
from transformers.models.whisper.modeling_whisper import sinusoids

from audio_llm.errors import AudioLLMError
from audio_llm.model.arch import PUBLISHED

# Qwen2-VL's own special tokens, so prompts and the audio placeholder written for the tiny
# tokenizer are valid for the real one too.
QWEN2VL_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# ChatML as Qwen2-VL-Instruct uses it (string content only: this package sends no images).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """Sizes of the tiny models (defaults: fast enough for unit tests on 2 CPU cores)."""

    n_mels: int = 80
    whisper_d_model: int = 64
    whisper_layers: int = 2
    whisper_heads: int = 4
    llm_hidden: int = 64
    llm_layers: int = 2
    llm_heads: int = 4
    llm_kv_heads: int = 2
    llm_intermediate: int = 128
    tokenizer_vocab: int = 512


def vocabulary() -> list[str]:
    """The embedded English word list (deduplicated, in file order)."""
    text = resources.files("audio_llm.assets").joinpath("words.txt").read_text(encoding="utf-8")
    words = [w for line in text.splitlines() if not line.startswith("#") for w in line.split()]
    return list(dict.fromkeys(words))


def _tokenizer_corpus(seed: int) -> list[str]:
    rng = random.Random(seed)
    words = vocabulary()
    lines = [" ".join(rng.choices(words, k=rng.randint(3, 12))) for _ in range(3000)]
    lines += ["Transcribe the audio.", "You are a helpful assistant.", "0 1 2 3 4 5 6 7 8 9"]
    lines += [w.capitalize() + "." for w in words]
    return lines


def build_tokenizer(vocab_size: int = 512, seed: int = 0) -> Qwen2Tokenizer:
    """Byte-level BPE with Qwen2's pre-tokenizer, trained on the embedded word list."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=QWEN2VL_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(seed), trainer)
    tokenizer = Qwen2Tokenizer(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        model_max_length=32768,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def whisper_config(spec: TinySpec) -> WhisperConfig:
    return WhisperConfig(
        vocab_size=64,
        num_mel_bins=spec.n_mels,
        d_model=spec.whisper_d_model,
        encoder_layers=spec.whisper_layers,
        encoder_attention_heads=spec.whisper_heads,
        encoder_ffn_dim=4 * spec.whisper_d_model,
        decoder_layers=1,
        decoder_attention_heads=spec.whisper_heads,
        decoder_ffn_dim=4 * spec.whisper_d_model,
        max_source_positions=1500,
        max_target_positions=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        begin_suppress_tokens=None,
        # 1/sqrt(width) rather than 0.02: at 0.02 a random tiny encoder's conv features are
        # ~2% of its output (the sinusoidal positions dominate); at this scale about a quarter,
        # and most of it once write_tiny_whisper scales the positions (WHISPER_PASSTHROUGH).
        init_std=spec.whisper_d_model**-0.5,
    )


def qwen2vl_config(spec: TinySpec, tokenizer: Qwen2Tokenizer) -> Qwen2VLConfig:
    head_dim = spec.llm_hidden // spec.llm_heads
    # M-RoPE splits head_dim / 2 rotary frequencies over (time, height, width).
    half = head_dim // 2
    mrope = [half - 2 * (half // 3), half // 3, half // 3]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN2VL_SPECIAL_TOKENS}
    vocab = -(-len(tokenizer) // 64) * 64  # room to spare, like the real checkpoints
    return Qwen2VLConfig(
        text_config={
            "vocab_size": vocab,
            "hidden_size": spec.llm_hidden,
            "intermediate_size": spec.llm_intermediate,
            "num_hidden_layers": spec.llm_layers,
            "num_attention_heads": spec.llm_heads,
            "num_key_value_heads": spec.llm_kv_heads,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "mrope_section": mrope, "rope_theta": 1e6},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            # Scale-aware init (1/sqrt(width), what 0.02 is for the real 1.5k-3.5k widths):
            # with 0.02 at width 64-256 the tied output layer cannot produce confident logits.
            "initializer_range": spec.llm_hidden**-0.5,
        },
        vision_config={
            "depth": 1,
            "embed_dim": 32,
            "hidden_size": spec.llm_hidden,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


# A frozen random encoder is only useful if it does not scramble its input; a pretrained one is
# useful because it was trained. Scaling the random layers' residual branches (attention and MLP
# output projections) and the sinusoidal positions by this factor makes the tiny Whisper pass its
# conv features through, perturbed rather than overwritten. Measured on the demo corpus (greedy
# CTC from a small conv net on the frozen outputs, 500 steps): 13% WER at 0.1, 11% with no
# layers or positions at all, 28% with the positions at full scale, 98% at full scale (1.0).
WHISPER_PASSTHROUGH = 0.1


def write_tiny_whisper(out_dir: str | Path, seed: int = 0, spec: TinySpec | None = None) -> Path:
    """Write a tiny Whisper seq2seq checkpoint + feature extractor to `out_dir`; deterministic."""
    spec = spec or TinySpec()
    torch.manual_seed(seed)
    whisper = WhisperForConditionalGeneration(whisper_config(spec))
    encoder = whisper.model.encoder
    with torch.no_grad():
        encoder.embed_positions.weight.mul_(WHISPER_PASSTHROUGH)
        for layer in encoder.layers:
            for branch_out in (layer.self_attn.out_proj, layer.fc2):
                branch_out.weight.mul_(WHISPER_PASSTHROUGH)
                branch_out.bias.mul_(WHISPER_PASSTHROUGH)
    whisper.save_pretrained(out_dir)
    WhisperFeatureExtractor(feature_size=spec.n_mels).save_pretrained(out_dir)
    return Path(out_dir)


def _save_llm(llm, tokenizer, out_dir: str | Path) -> Path:
    """Save a Qwen2-VL with greedy generation that stops at <|im_end|> or padding, and its
    tokenizer, to `out_dir`."""
    llm.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    llm.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)


def write_tiny_llm(out_dir: str | Path, seed: int = 0, spec: TinySpec | None = None) -> Path:
    """Write a tiny Qwen2-VL checkpoint + BPE tokenizer to `out_dir`; deterministic."""
    spec = spec or TinySpec()
    tokenizer = build_tokenizer(spec.tokenizer_vocab, seed)
    config = qwen2vl_config(spec, tokenizer)
    torch.manual_seed(seed + 1)
    llm = Qwen2VLForConditionalGeneration(config)
    return _save_llm(llm, tokenizer, out_dir)


def write_tiny_models(out_dir: str | Path, seed: int = 0, spec: TinySpec | None = None) -> dict:
    """Write DIR/whisper and DIR/qwen2vl; returns their paths. Deterministic per seed."""
    out = Path(out_dir)
    return {
        "whisper": write_tiny_whisper(out / "whisper", seed, spec),
        "qwen2vl": write_tiny_llm(out / "qwen2vl", seed, spec),
    }


# -- published shapes, random weights ---------------------------------------------------------
LIKE_ENCODERS = ("whisper-large-v3",)
LIKE_LLMS = ("qwen2-vl-2b", "qwen2-vl-7b")


def like_whisper_config(name: str, layers: int = 0, shrink: int = 1) -> WhisperConfig:
    """The published config of `name` (model.arch); `layers` > 0 caps the encoder and decoder
    depth, `shrink` divides the widths (heads kept, so head_dim shrinks too)."""
    config = copy.deepcopy(PUBLISHED[name]())
    if layers:
        config.encoder_layers = min(config.encoder_layers, layers)
        config.decoder_layers = min(config.decoder_layers, layers)
    for key in ("d_model", "encoder_ffn_dim", "decoder_ffn_dim"):
        setattr(config, key, _divide(getattr(config, key), shrink, f"{name} {key}"))
    _divide(config.d_model, config.encoder_attention_heads, f"{name} d_model / heads")
    return config


def like_qwen2vl_config(
    name: str, tokenizer: Qwen2Tokenizer, layers: int = 0, shrink: int = 1
) -> Qwen2VLConfig:
    """The published config of `name` with the special-token ids of `tokenizer` (the tiny one:
    all its ids are below the real vocab size); `layers` caps the text and vision depth,
    `shrink` divides the widths and M-RoPE sections (heads kept)."""
    config = copy.deepcopy(PUBLISHED[name]())
    text, vision = config.text_config, config.vision_config
    if layers:
        text.num_hidden_layers = min(text.num_hidden_layers, layers)
        text.layer_types = text.layer_types[: text.num_hidden_layers]
        vision.depth = min(vision.depth, layers)
    text.hidden_size = _divide(text.hidden_size, shrink, f"{name} hidden_size")
    text.intermediate_size = _divide(text.intermediate_size, shrink, f"{name} intermediate_size")
    head_dim = _divide(text.hidden_size, text.num_attention_heads, f"{name} hidden / heads")
    rope = dict(text.rope_parameters)
    rope["mrope_section"] = [
        _divide(n, shrink, f"{name} mrope_section") for n in rope["mrope_section"]
    ]
    if sum(rope["mrope_section"]) * 2 != head_dim:
        raise AudioLLMError(f"--shrink {shrink}: {name}'s M-RoPE sections no longer fit its heads")
    text.rope_parameters = rope
    vision.embed_dim = _divide(vision.embed_dim, shrink, f"{name} vision embed_dim")
    vision.hidden_size = text.hidden_size
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN2VL_SPECIAL_TOKENS}
    text.bos_token_id = text.pad_token_id = ids["<|endoftext|>"]
    text.eos_token_id = ids["<|im_end|>"]
    config.image_token_id = ids["<|image_pad|>"]
    config.video_token_id = ids["<|video_pad|>"]
    config.vision_start_token_id = ids["<|vision_start|>"]
    config.vision_end_token_id = ids["<|vision_end|>"]
    return config


def _divide(value: int, by: int, what: str) -> int:
    if by < 1 or value % by:
        raise AudioLLMError(f"{what} = {value} is not divisible by {by}: pick another --shrink")
    return value // by


def _random_model(cls: type, config, seed: int, std: float, device: torch.device) -> nn.Module:
    """`cls(config)` in bf16 with random weights, built without HF's per-module init (minutes
    for 2B parameters on a CPU): allocated on `device`, then one fill per tensor. Linear, conv
    and embedding weights ~ N(0, std), biases 0, norm weights 1 (what HF's init draws)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = cls(config)
    finally:
        torch.set_default_dtype(default)
    model.to_empty(device=device)
    model.tie_weights()  # to_empty made new tensors: re-share the tied embedding
    generator = torch.Generator(device).manual_seed(seed)
    seen: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            is_norm = isinstance(module, nn.LayerNorm) or "Norm" in type(module).__name__
            for name, param in module.named_parameters(recurse=False):
                if id(param) in seen:
                    continue
                seen.add(id(param))
                if name == "bias":
                    param.zero_()
                elif is_norm:
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, std, generator=generator)
    return model


def _init_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def write_like_whisper(
    out_dir: str | Path,
    name: str = "whisper-large-v3",
    seed: int = 0,
    layers: int = 0,
    shrink: int = 1,
    device: str | None = None,
) -> Path:
    """Write a Whisper seq2seq checkpoint at `name`'s shapes with random bf16 weights, and its
    feature extractor (128 mel bins for large-v3). Same seed and device: same bytes."""
    config = like_whisper_config(name, layers, shrink)
    whisper = _random_model(
        WhisperForConditionalGeneration, config, seed, config.init_std, _init_device(device)
    )
    positions = whisper.model.encoder.embed_positions.weight
    with torch.no_grad():  # fixed sinusoids, as HF initialises (and trains) them
        positions.copy_(sinusoids(*positions.shape).to(positions))
    whisper.save_pretrained(out_dir)
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(out_dir)
    return Path(out_dir)


def write_like_llm(
    out_dir: str | Path,
    name: str = "qwen2-vl-2b",
    seed: int = 0,
    layers: int = 0,
    shrink: int = 1,
    device: str | None = None,
) -> Path:
    """Write a Qwen2-VL checkpoint at `name`'s shapes (vision tower included, as published) with
    random bf16 weights, and the tiny BPE tokenizer. Same seed and device: same bytes."""
    tokenizer = build_tokenizer(TinySpec().tokenizer_vocab, seed)
    config = like_qwen2vl_config(name, tokenizer, layers, shrink)
    std = config.text_config.initializer_range
    llm = _random_model(
        Qwen2VLForConditionalGeneration, config, seed + 1, std, _init_device(device)
    )
    return _save_llm(llm, tokenizer, out_dir)


def write_like_models(
    out_dir: str | Path,
    like: list[str],
    seed: int = 0,
    layers: int = 0,
    shrink: int = 1,
    device: str | None = None,
) -> dict:
    """DIR/whisper and DIR/qwen2vl at published shapes: `like` names one encoder
    (LIKE_ENCODERS) and one LLM (LIKE_LLMS)."""
    encoders = [n for n in like if n in LIKE_ENCODERS]
    llms = [n for n in like if n in LIKE_LLMS]
    unknown = [n for n in like if n not in LIKE_ENCODERS + LIKE_LLMS]
    if unknown or len(encoders) != 1 or len(llms) != 1:
        raise AudioLLMError(
            f"--like {','.join(like)}: name one encoder of {list(LIKE_ENCODERS)} and one LLM of "
            f"{list(LIKE_LLMS)}" + (f" (unknown: {', '.join(unknown)})" if unknown else "")
        )
    if layers < 0:
        raise AudioLLMError(f"--layers must be >= 0 (0: the published depth), got {layers}")
    out = Path(out_dir)
    return {
        "whisper": write_like_whisper(out / "whisper", encoders[0], seed, layers, shrink, device),
        "qwen2vl": write_like_llm(out / "qwen2vl", llms[0], seed, layers, shrink, device),
    }
