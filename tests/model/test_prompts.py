import pytest
from transformers import AutoTokenizer

from audio_llm.errors import AudioLLMError
from audio_llm.model.prompts import (
    IGNORE_INDEX,
    PromptBuilder,
    audio_token_id,
    normalize_transcript,
)


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("hello world", "hello world"),
        ("  hello   world \t", "hello world"),
        ("line one\r\nline two\r\n", "line one\nline two"),
        ("a\rb", "a\nb"),
        ("\u00a0polyp ", "polyp"),
        ("", ""),
    ],
)
def test_normalize_transcript(raw, clean):
    assert normalize_transcript(raw) == clean


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    return AutoTokenizer.from_pretrained(tiny_models["qwen2vl"])


def test_same_words_same_ids_whatever_the_padding(tokenizer):
    prompts = PromptBuilder(tokenizer, "<|vision_pad|>")
    variants = ["the red fox", " the red fox", "the  red fox \r\n", "\tthe red\u00a0fox"]
    ids = {tuple(prompts.transcript_ids(v)) for v in variants}
    assert len(ids) == 1
    # Without normalisation the leading space really does change the ids (the bug being fixed).
    assert tokenizer(" the")["input_ids"] != tokenizer("the")["input_ids"]


def test_example_layout_and_exact_label_positions(tokenizer):
    prompts = PromptBuilder(tokenizer, "<|vision_pad|>", prompt="Transcribe the audio.")
    ex = prompts.example(num_audio_tokens=5, transcript="the cat sat")
    audio_id = audio_token_id(tokenizer, "<|vision_pad|>")
    target = tokenizer("the cat sat", add_special_tokens=False)["input_ids"] + [
        tokenizer.convert_tokens_to_ids("<|im_end|>")
    ]
    assert ex.input_ids.count(audio_id) == 5
    assert ex.input_ids[-len(target) :] == target
    learned = [i for i, label in enumerate(ex.labels) if label != IGNORE_INDEX]
    assert learned == list(range(len(ex.input_ids) - len(target), len(ex.input_ids)))
    assert [ex.labels[i] for i in learned] == target
    text = tokenizer.decode(ex.input_ids)
    assert text.startswith("<|im_start|>system\n")
    assert "<|im_start|>user\n" + "<|vision_pad|>" * 5 + "Transcribe the audio.<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\nthe cat sat<|im_end|>")


def test_generation_prompt_is_the_training_context(tokenizer):
    prompts = PromptBuilder(tokenizer, "<|vision_pad|>")
    ex = prompts.example(7, "hello")
    assert ex.input_ids[: len(prompts.prompt(7))] == prompts.prompt(7)


def test_without_chat_template(tokenizer):
    prompts = PromptBuilder(tokenizer, "<|vision_pad|>", prompt="Say it.", chat_template=False)
    text = tokenizer.decode(prompts.prompt(2))
    assert text == "<|vision_pad|><|vision_pad|>Say it.\n"


def test_missing_audio_token_is_a_clear_error(tokenizer):
    with pytest.raises(AudioLLMError, match=r"'<\|audio\|>' is not a token of the tokenizer"):
        PromptBuilder(tokenizer, "<|audio|>")


def test_prompt_may_not_contain_the_placeholder(tokenizer):
    prompts = PromptBuilder(tokenizer, "<|vision_pad|>")
    with pytest.raises(AudioLLMError, match="must contain no"):
        prompts.prompt(3, prompt="listen <|vision_pad|>")


SYSTEM_TURN = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


def test_the_default_config_has_no_system_turn_and_null_keeps_the_templates(
    tokenizer, model_config
):
    """Qwen2-VL's template adds a system turn when given none: the config's default leaves it
    out; system_prompt=None (the demo recipe, runs made before the key) keeps today's ids."""
    assert model_config.system_prompt == ""
    none = PromptBuilder(tokenizer, "<|vision_pad|>", system_prompt="")
    template = PromptBuilder(tokenizer, "<|vision_pad|>", system_prompt=None)
    before = PromptBuilder(tokenizer, "<|vision_pad|>")  # the builder's own default: as before
    assert template.prompt(4) == before.prompt(4)
    assert tokenizer.decode(template.prompt(4)).startswith(SYSTEM_TURN + "<|im_start|>user\n")
    assert tokenizer.decode(none.prompt(4)).startswith("<|im_start|>user\n")
    system_ids = tokenizer(SYSTEM_TURN, add_special_tokens=False)["input_ids"]
    assert template.prompt(4) == system_ids + none.prompt(4)
    ex = none.example(4, "the cat")
    assert ex.input_ids[: len(none.prompt(4))] == none.prompt(4)  # generation = training context


def test_a_system_prompt_of_ones_own(tokenizer):
    prompts = PromptBuilder(tokenizer, "<|vision_pad|>", system_prompt="Write what is said.")
    text = tokenizer.decode(prompts.prompt(2))
    assert text.startswith("<|im_start|>system\nWrite what is said.<|im_end|>\n<|im_start|>user")
    assert "helpful" not in text


def test_a_template_that_cannot_leave_the_system_turn_out_is_a_clear_error(tiny_models):
    odd = AutoTokenizer.from_pretrained(tiny_models["qwen2vl"])
    # the system turn written last: cutting it off the front is impossible
    odd.chat_template = (
        "{% for m in messages if m['role'] != 'system' %}<|im_start|>{{ m['role'] }}\n"
        "{{ m['content'] }}<|im_end|>\n{% endfor %}<|im_start|>system\n"
        "{% for m in messages if m['role'] == 'system' %}{{ m['content'] }}{% endfor %}<|im_end|>\n"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    prompts = PromptBuilder(odd, "<|vision_pad|>", system_prompt="")
    with pytest.raises(AudioLLMError, match="model.system_prompt"):
        prompts.prompt(2)


def test_the_demo_recipe_pins_the_templates_system_turn():
    from pathlib import Path

    from audio_llm.config import load_config

    recipes = sorted((Path(__file__).resolve().parents[2] / "launch" / "configs").glob("demo_*"))
    assert len(recipes) == 4  # two encoders x two stages
    for recipe in recipes:
        assert load_config(recipe).model.system_prompt is None, recipe.name
