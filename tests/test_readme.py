"""README.md states facts that live in code: they must agree with it."""

from __future__ import annotations

import re
from pathlib import Path

from audio_llm.demo.run import DEMO_MODELS
from audio_llm.demo.tiny import TinySpec

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def _flat(text: str) -> str:
    return " ".join(text.split())  # sentences wrap across lines


def test_tiny_model_sizes_match_the_demo_and_the_tiny_command():
    text = _flat(README)
    demo = re.search(
        r"at the demo's size \(random tiny Whisper encoder, (\d+) layers x (\d+); "
        r"tiny Qwen2-VL, (\d+) layers x (\d+) with a (\d+)-wide MLP",
        text,
    )
    assert demo, "README no longer gives the demo's model sizes"
    assert [int(g) for g in demo.groups()] == [
        DEMO_MODELS.whisper_layers,
        DEMO_MODELS.whisper_d_model,
        DEMO_MODELS.llm_layers,
        DEMO_MODELS.llm_hidden,
        DEMO_MODELS.llm_intermediate,
    ]
    tiny = re.search(
        r"`audio-llm tiny` itself defaults to .*?\((\d+) layers x (\d+), MLP (\d+)", text
    )
    assert tiny, "README no longer gives `audio-llm tiny`'s default sizes"
    spec = TinySpec()
    assert spec.whisper_layers == spec.llm_layers and spec.whisper_d_model == spec.llm_hidden
    assert [int(g) for g in tiny.groups()] == [
        spec.llm_layers,
        spec.llm_hidden,
        spec.llm_intermediate,
    ]
