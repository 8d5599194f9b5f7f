"""Text-only reading pretraining of the tiny LLM (the demo's stand-in for a pretrained LLM)."""

import random

import torch
from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

from audio_llm.config import DEFAULT_AUDIO_TOKEN
from audio_llm.demo.reading import ReadingSpec, _example, teach_reading
from audio_llm.model.prompts import IGNORE_INDEX, PromptBuilder
from audio_llm.model.tiny import vocabulary, write_tiny_models


def test_examples_stretch_tokens_and_target_the_sentence(tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models["qwen2vl"])
    prompts = PromptBuilder(tok, DEFAULT_AUDIO_TOKEN)
    spec = ReadingSpec()
    source, ids, labels = _example(random.Random(0), vocabulary(), prompts, spec)
    assert ids.count(prompts.audio_token_id) == len(source)
    target = [t for t in labels if t != IGNORE_INDEX]
    assert target[-1] == prompts.eos_id
    # the source is the target's tokens, each repeated, with blank (-1) runs between
    runs = [t for i, t in enumerate(source) if t >= 0 and (i == 0 or source[i - 1] != t)]
    assert runs == target[:-1]


def test_reading_lowers_the_loss_and_saves_a_loadable_checkpoint(tmp_path):
    paths = write_tiny_models(tmp_path / "tiny")
    before = (paths["qwen2vl"] / "model.safetensors").read_bytes()
    history = teach_reading(paths["qwen2vl"], ReadingSpec(steps=60, batch_size=16), log_every=20)
    assert len(history) == 3 and history[-1] < history[0] - 0.5
    assert (paths["qwen2vl"] / "model.safetensors").read_bytes() != before
    assert sorted(p.name for p in tmp_path.joinpath("tiny").iterdir()) == ["qwen2vl", "whisper"]
    llm = Qwen2VLForConditionalGeneration.from_pretrained(paths["qwen2vl"])
    assert llm.generation_config.eos_token_id  # generation config kept
    assert AutoTokenizer.from_pretrained(paths["qwen2vl"]).chat_template
    assert torch.isfinite(next(llm.parameters())).all()
