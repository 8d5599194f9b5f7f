"""model.build: which attention kernels the LLM loads with (`model.attn_implementation`)."""

from __future__ import annotations

import importlib.util

import pytest

from audio_llm.config import ModelConfig
from audio_llm.errors import AudioLLMError
from audio_llm.model.build import attention_kernels, build_audio_llm


def _installed(monkeypatch, present: bool) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: (object() if present else None) if name == "flash_attn" else real(name),
    )


@pytest.mark.parametrize(
    ("present", "device", "dtype", "expected"),
    [
        (True, "cuda:0", "bfloat16", "flash_attention_2"),
        (True, "cuda", "float16", "flash_attention_2"),
        (True, "cpu", "bfloat16", "sdpa"),  # flash-attention runs on CUDA only
        (True, "cuda:0", "float32", "sdpa"),  # and in 16 bits only
        (False, "cuda:0", "bfloat16", "sdpa"),  # an optional extra, never required
    ],
)
def test_auto_picks_flash_attention_only_where_it_runs(
    monkeypatch, present, device, dtype, expected
):
    _installed(monkeypatch, present)
    assert attention_kernels(ModelConfig(dtype=dtype), device) == expected


def test_an_explicit_choice_is_kept_and_flash_without_the_package_is_refused(monkeypatch):
    _installed(monkeypatch, False)
    assert attention_kernels(ModelConfig(attn_implementation="eager"), "cuda") == "eager"
    with pytest.raises(AudioLLMError, match=r"pip install -e '\.\[flash\]'"):
        attention_kernels(ModelConfig(attn_implementation="flash_attention_2"), "cuda")


def test_the_llm_loads_with_the_chosen_kernels(model_config):
    import dataclasses

    eager = build_audio_llm(dataclasses.replace(model_config, attn_implementation="eager"))
    assert eager.causal_lm().config._attn_implementation == "eager"
    auto = build_audio_llm(model_config)  # CPU: sdpa
    assert auto.causal_lm().config._attn_implementation == "sdpa"
