"""Regex-targeted LoRA on the LLM, checked against the whole model before anything trains.

The regex is matched with `re.fullmatch` against module names, exactly as PEFT matches a string
`target_modules`; a list is matched by name suffix, as PEFT does. Both are checked against every
component of the wrapper (Whisper encoder, projector, vision tower, LLM) so a pattern such as
`.*(q_proj|v_proj)` that would also adapt Whisper's attention is refused instead of trained.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from torch import nn

from audio_llm.config import LoraConfig
from audio_llm.errors import AudioLLMError
from audio_llm.model.audio_llm import AudioLLM
from audio_llm.model.encoder import AudioEncoder
from audio_llm.model.projector import AudioProjector

# Layer types PEFT's LoRA can wrap.
_LORA_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)
_LLM_LAYER = re.compile(r"language_model\.layers\.(\d+)\.")

ENCODER, PROJECTOR, VISION, LLM_LAYERS, LLM_OTHER = (
    "encoder (Whisper)",
    "projector",
    "vision tower",
    "LLM layers",
    "LLM other (embeddings, lm_head)",
)
COMPONENTS = (ENCODER, PROJECTOR, VISION, LLM_LAYERS, LLM_OTHER)


def component_of(name: str) -> str:
    """Which part of the wrapper a module name belongs to."""
    if name.startswith("encoder."):
        return ENCODER
    if name.startswith("projector."):
        return PROJECTOR
    if ".visual." in f".{name}.":
        return VISION
    if _LLM_LAYER.search(name):
        return LLM_LAYERS
    return LLM_OTHER


def matches(name: str, targets: str | list[str]) -> bool:
    """PEFT's rule: a string is a full-match regex, a list matches exact names or suffixes."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


@dataclass
class TargetReport:
    """Which modules a LoRA target spec hits, per component of the wrapper."""

    targets: str | list[str]
    num_llm_layers: int
    matched: dict[str, list[str]] = field(default_factory=dict)
    not_adaptable: list[str] = field(default_factory=list)
    # Names selected in the wrapper but not by PEFT inside the LLM, or the other way round.
    peft_disagrees: list[str] = field(default_factory=list)

    @property
    def layers_hit(self) -> Counter:
        return Counter(int(_LLM_LAYER.search(n).group(1)) for n in self.matched.get(LLM_LAYERS, []))

    def problems(self) -> list[str]:
        """Every reason to refuse this spec, one line each (empty: fine)."""
        problems = []
        outside = [n for c in COMPONENTS if c != LLM_LAYERS for n in self.matched.get(c, [])]
        if outside:
            shown = ", ".join(outside[:4]) + (
                f" (+{len(outside) - 4} more)" if len(outside) > 4 else ""
            )
            problems.append(
                f"LoRA targets {self.targets!r} hit {len(outside)} modules outside the LLM's "
                f"layers: {shown}; anchor the pattern on 'language_model.layers.N.'"
            )
        if self.not_adaptable:
            problems.append(
                f"LoRA targets {self.targets!r} match modules LoRA cannot wrap: "
                f"{', '.join(self.not_adaptable[:4])}"
            )
        if self.peft_disagrees:
            problems.append(
                f"LoRA targets {self.targets!r} select different modules inside the LLM, where "
                f"PEFT applies them, e.g. {self.peft_disagrees[0]}; write the pattern against "
                "names like 'model.language_model.layers.0.self_attn.q_proj'"
            )
        missing = sorted(set(range(self.num_llm_layers)) - set(self.layers_hit))
        if not self.matched.get(LLM_LAYERS):
            problems.append(
                f"LoRA targets {self.targets!r} match no LLM projection; the LLM's modules are "
                "named like 'model.language_model.layers.0.self_attn.q_proj'"
            )
        elif missing:
            problems.append(
                f"LoRA targets {self.targets!r} miss LLM layers {missing[:8]}"
                + (" ..." if len(missing) > 8 else "")
            )
        return problems


def target_report(model: nn.Module, targets: str | list[str]) -> TargetReport:
    """Match `targets` against every module of an AudioLLM (`encoder`, `projector`, `llm`)."""
    text_config = getattr(model.llm.config, "text_config", model.llm.config)
    report = TargetReport(targets, text_config.num_hidden_layers)
    for name, module in model.named_modules():
        if not name or not matches(name, targets):
            continue
        if isinstance(module, _LORA_LAYERS):
            report.matched.setdefault(component_of(name), []).append(name)
        elif not any(True for _ in module.children()):
            report.not_adaptable.append(name)
    # PEFT is applied to the LLM alone (so adapters load onto a stock Qwen2-VL) and sees names
    # without the wrapper's `llm.` prefix: the spec must select the same modules there.
    inner = {f"llm.{n}" for n, m in model.llm.named_modules() if matches(n, targets)}
    inner &= {f"llm.{n}" for n, m in model.llm.named_modules() if isinstance(m, _LORA_LAYERS)}
    outer = {n for c in (VISION, LLM_LAYERS, LLM_OTHER) for n in report.matched.get(c, [])}
    if inner != outer:
        report.peft_disagrees = sorted(outer ^ inner)
    return report


def check_targets(model: nn.Module, targets: str | list[str]) -> TargetReport:
    """`target_report`, raising one AudioLLMError line per problem."""
    report = target_report(model, targets)
    problems = report.problems()
    if problems:
        raise AudioLLMError("; ".join(problems))
    return report


def apply_lora(model: nn.Module, cfg: LoraConfig) -> None:
    """Validate `cfg.target_regex` on the whole wrapper, then wrap `model.llm` with PEFT LoRA."""
    report = check_targets(model, cfg.target_regex)
    peft_cfg = PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_regex,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model.llm = get_peft_model(model.llm, peft_cfg)
    wrapped = sum(1 for _, m in model.llm.named_modules() if hasattr(m, "lora_A"))
    expected = len(report.matched[LLM_LAYERS])
    if wrapped != expected:  # PEFT and this guard disagree: never train an unexpected set
        raise AudioLLMError(f"PEFT wrapped {wrapped} modules, the guard selected {expected}")


def save_adapter(model: nn.Module, out_dir: str | Path) -> Path:
    """PEFT adapter folder (adapter_config.json + adapter_model.safetensors) for stock PEFT."""
    if not hasattr(model.llm, "peft_config"):
        raise AudioLLMError("this model has no LoRA adapter (stage 1 trains the projector only)")
    model.llm.save_pretrained(str(out_dir))
    return Path(out_dir)


def meta_model(encoder: str, llm: str) -> nn.Module:
    """An AudioLLM skeleton on the meta device from configs only (folders or built-in names)."""
    from transformers import Qwen2VLForConditionalGeneration
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from audio_llm.model.arch import resolve_config

    enc_cfg, llm_cfg = resolve_config(encoder), resolve_config(llm)
    if enc_cfg.model_type != "whisper":
        raise AudioLLMError(f"--encoder {encoder!r} is a {enc_cfg.model_type}, not a Whisper model")
    if llm_cfg.model_type != "qwen2_vl":
        raise AudioLLMError(f"--llm {llm!r} is a {llm_cfg.model_type}, not Qwen2-VL")
    with torch.device("meta"):
        whisper = WhisperEncoder(enc_cfg)
        qwen = Qwen2VLForConditionalGeneration(llm_cfg)
        projector = AudioProjector(enc_cfg.d_model, llm_cfg.text_config.hidden_size)
    return AudioLLM(AudioEncoder(whisper), projector, qwen, audio_token_id=0)
