"""The one place that assembles an AudioLLM from checkpoint folders and a config.

It imports every component (encoder, projector, prompts, the core `AudioLLM`, LoRA and the
auxiliary heads); none of them imports another's builder, so the model package has no import
circle. `AUX_HEAD_KINDS` lists the auxiliary heads an export may carry: the export and the
inference loader (`evaluation.export`) go through it rather than naming a head.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

from audio_llm.config import LoraConfig, ModelConfig
from audio_llm.errors import AudioLLMError
from audio_llm.model.audio_llm import AudioLLM
from audio_llm.model.ctc import CTCHead
from audio_llm.model.encoder import AudioEncoder, load_feature_extractor, load_whisper_encoder
from audio_llm.model.lora import apply_lora
from audio_llm.model.projector import AudioProjector
from audio_llm.model.prompts import PromptBuilder

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Auxiliary heads an export may hold: each has `name`, `file_key`, `file` and `attach(...)`.
AUX_HEAD_KINDS = (CTCHead,)


def build_audio_llm(
    cfg: ModelConfig,
    lora: LoraConfig | None = None,
    device: str | torch.device = "cpu",
    ctc_weight: float = 0.0,
) -> AudioLLM:
    """Load encoder, feature extractor, tokenizer and LLM; validate them; add projector + LoRA.

    `ctc_weight > 0` adds the auxiliary CTC loss (`train.ctc_weight`, `model.ctc.CTCHead`).

    Every mismatch (mel bins, missing audio token, projector shapes, LoRA targets) is raised here,
    before any training work.
    """
    dtype = DTYPES[cfg.dtype]
    feature_extractor = load_feature_extractor(cfg.encoder)
    whisper = load_whisper_encoder(cfg.encoder, dtype)
    if feature_extractor.feature_size != whisper.config.num_mel_bins:
        raise AudioLLMError(
            f"{cfg.encoder}: feature extractor makes {feature_extractor.feature_size} mel bins, "
            f"the encoder takes {whisper.config.num_mel_bins}"
        )
    if not Path(cfg.llm, "config.json").is_file():
        raise AudioLLMError(f"model.llm {cfg.llm!r} is not a checkpoint folder (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(cfg.llm)
    llm = Qwen2VLForConditionalGeneration.from_pretrained(
        cfg.llm, dtype=dtype, attn_implementation=attention_kernels(cfg, device)
    )
    llm.requires_grad_(False)
    prompts = PromptBuilder(
        tokenizer, cfg.audio_token, cfg.prompt, cfg.chat_template, cfg.system_prompt
    )
    vocab_rows = llm.get_input_embeddings().num_embeddings
    if prompts.audio_token_id >= vocab_rows:
        raise AudioLLMError(
            f"audio token {cfg.audio_token!r} has id {prompts.audio_token_id}, outside the LLM's "
            f"{vocab_rows} embedding rows"
        )

    projector = AudioProjector(
        whisper.config.d_model,
        llm.config.text_config.hidden_size,
        stack=cfg.stack_factor,
        kind=cfg.projector,
        hidden=cfg.projector_hidden,
        context=cfg.projector_context,
        dropout=cfg.projector_dropout,
        context_width=cfg.projector_context_width,
    ).to(dtype)
    if cfg.projector_init:
        projector.load(cfg.projector_init)

    model = AudioLLM(
        AudioEncoder(whisper, cfg.varlen_encoder), projector, llm, prompts.audio_token_id
    )
    model.tokenizer, model.feature_extractor, model.prompts = tokenizer, feature_extractor, prompts
    if ctc_weight > 0:  # it continues the CTC head a stage-1 export left beside its projector
        CTCHead.attach(model, ctc_weight, CTCHead.init_file(cfg.projector_init))
    if lora is not None:
        apply_lora(model, lora)
    if cfg.gradient_checkpointing:
        model.llm.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    return model.to(device)


def attention_kernels(cfg: ModelConfig, device: str | torch.device = "cpu") -> str:
    """The LLM's `attn_implementation` for `model.attn_implementation` on `device`.

    auto picks flash-attention only where it runs and pays: the package is installed (an optional
    extra, never required), the model is on CUDA in 16 bits. Packed rows then use its varlen
    kernels; elsewhere sdpa, which keeps its flash kernel for padded rows (no mask)."""
    chosen = cfg.attn_implementation
    installed = importlib.util.find_spec("flash_attn") is not None
    if chosen == "auto":
        on_cuda = torch.device(device).type == "cuda"
        fits = installed and on_cuda and cfg.dtype in ("bfloat16", "float16")
        return "flash_attention_2" if fits else "sdpa"
    if chosen == "flash_attention_2" and not installed:
        raise AudioLLMError(
            "model.attn_implementation=flash_attention_2 needs the flash-attn package: "
            "pip install -e '.[flash]' on a CUDA machine, or set model.attn_implementation=auto"
        )
    return chosen


def attach_exported_heads(
    model: AudioLLM, folder: str | Path, listed: Mapping[str, str | None] | None = None
) -> None:
    """Attach, for decoding only (weight 0, no loss), every auxiliary head whose file is in
    `folder`: the file a manifest lists under the head's key (`listed`), else its usual name."""
    for kind in AUX_HEAD_KINDS:
        path = Path(folder) / ((listed or {}).get(kind.file_key) or kind.file)
        if path.is_file():
            kind.attach(model, 0.0, path)
