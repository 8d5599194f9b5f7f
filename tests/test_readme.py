"""README.md and docs/ state facts that live in code: they must agree with it. The README is the
front door (short, the two commands first, links that resolve); the rest lives in docs/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from audio_llm.cli import COMMANDS
from audio_llm.config import load_config
from audio_llm.demo import run as demo
from audio_llm.demo.run import DEMO_MODELS
from audio_llm.model.tiny import TinySpec

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
# What a reader sees: HTML comments (the places left for work being merged) are not shown.
SHOWN = re.sub(r"<!--.*?-->", "", README, flags=re.S)
DOCS = sorted((REPO / "docs").glob("*.md"))
DEMO_DOC = (REPO / "docs" / "demo.md").read_text(encoding="utf-8")
TINY_EN = "pretrained whisper-tiny.en"


def _flat(text: str) -> str:
    return " ".join(text.split())  # sentences wrap across lines


def _links(text: str) -> list[str]:
    """Relative markdown link targets (no URLs, no anchors)."""
    found = re.findall(r"\]\(([^)\s]+)\)", text)
    return [t.split("#")[0] for t in found if not re.match(r"[a-z]+://", t) and t.split("#")[0]]


def test_readme_is_a_front_door_of_at_most_200_lines_with_the_two_commands_first():
    lines = README.splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines: move detail to docs/"
    first = "\n".join(lines[:40])
    assert "make demo" in first and "make test" in first


def test_every_link_in_the_readme_and_docs_exists_and_every_docs_page_is_in_the_map():
    for path, text in [(REPO / "README.md", README)] + [(p, p.read_text()) for p in DOCS]:
        for target in _links(text):
            assert (path.parent / target).exists(), f"{path.name} links to missing {target}"
    linked = {(REPO / t).resolve() for t in _links(README)}
    assert {p.resolve() for p in DOCS} <= linked, "a docs/ page the README's map does not list"


def _expand(path: str) -> list[str]:
    """`launch/stage{1,2}.py` -> both paths (one level of braces)."""
    brace = re.search(r"\{([^{}]*)\}", path)
    if not brace:
        return [path]
    return [path[: brace.start()] + alt + path[brace.end() :] for alt in brace.group(1).split(",")]


def test_every_repository_path_and_command_the_readme_names_exists():
    for named in re.findall(r"\b((?:launch|ds_configs|benchmarks|docs)/[\w.{},/-]+)", SHOWN):
        for path in _expand(named.rstrip(".,")):
            assert (REPO / path).exists(), f"README names {path}, which does not exist"
    for command in re.findall(r"`audio-llm ([a-z-]+)", SHOWN) + re.findall(
        r"^audio-llm ([a-z-]+)", SHOWN, flags=re.M
    ):
        assert command in COMMANDS, f"README shows `audio-llm {command}`, not a command"


def test_no_issue_numbers_in_user_facing_text():
    for path in [REPO / "README.md", *DOCS]:
        hits = re.findall(r"\bissues? #?\d+", path.read_text(), flags=re.I)
        assert not hits, f"{path.name}: {hits}"


def test_the_readmes_install_line_names_the_makefiles_torch():
    makefile = (REPO / "Makefile").read_text()
    pinned = re.search(r"^TORCH_SPEC \?= (\S+)", makefile, flags=re.M).group(1)
    assert f"pinned CPU `{pinned}`" in _flat(README)


def test_the_readmes_demo_paragraph_matches_the_recipe_and_the_demo_defaults():
    text = _flat(README)
    one, two = (load_config(demo.recipe_file(TINY_EN, s)) for s in demo.STAGES)
    steps = re.search(r"\((\d+) \+ (\d+) steps\)", text)
    assert steps and [int(g) for g in steps.groups()] == [one.train.max_steps, two.train.max_steps]
    decoding = re.search(r"beam (\d+) at CTC weight ([\d.]+) \(the default\)", text)
    assert decoding, "README no longer gives the demo's decoding"
    assert (int(decoding.group(1)), float(decoding.group(2))) == (
        two.eval.num_beams,
        two.eval.ctc_weight,
    )
    defaults = demo._parser().parse_args([])
    clips = re.search(r"\(([\d,]+) training clips .*? held-out sets of (\d+)\)", text)
    assert clips, "README no longer gives the demo corpus's size"
    assert int(clips.group(1).replace(",", "")) == defaults.train_utterances
    assert int(clips.group(2)) == defaults.test_utterances
    for stage in demo.STAGES:
        assert demo.recipe_file(TINY_EN, stage).name in text


def test_the_demo_docs_recipe_sentence_matches_the_recipe_file():
    text = _flat(DEMO_DOC)
    sentence = re.search(
        r"For whisper-tiny\.en: (.*?) steps, beam (\d+) with CTC at ([\d.]+)\.", text
    )
    assert sentence, "docs/demo.md no longer spells out the whisper-tiny.en recipe"
    two = load_config(demo.recipe_file(TINY_EN, "stage2")).to_dict()
    settings = re.findall(r"`model\.(\w+)=([^`]+)`", sentence.group(1))
    assert len(settings) == 3
    for key, value in settings:
        assert str(two["model"][key]) == value, key
    one = load_config(demo.recipe_file(TINY_EN, "stage1"))
    steps = re.search(r"(\d+) \+ (\d+)$", sentence.group(1)).groups()
    assert [int(s) for s in steps] == [one.train.max_steps, two["train"]["max_steps"]]
    assert (int(sentence.group(2)), float(sentence.group(3))) == (
        two["eval"]["num_beams"],
        two["eval"]["ctc_weight"],
    )


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_the_demo_docs_name_every_recipe_file(stage):
    for encoder in demo.RECIPES:
        assert demo.recipe_file(encoder, stage).name in DEMO_DOC


def test_tiny_model_sizes_match_the_demo_and_the_tiny_command():
    text = _flat(DEMO_DOC)
    found = re.search(
        r"at the demo's size \(random tiny Whisper encoder, (\d+) layers x (\d+); "
        r"tiny Qwen2-VL, (\d+) layers x (\d+) with a (\d+)-wide MLP",
        text,
    )
    assert found, "docs/demo.md no longer gives the demo's model sizes"
    assert [int(g) for g in found.groups()] == [
        DEMO_MODELS.whisper_layers,
        DEMO_MODELS.whisper_d_model,
        DEMO_MODELS.llm_layers,
        DEMO_MODELS.llm_hidden,
        DEMO_MODELS.llm_intermediate,
    ]
    tiny = re.search(
        r"`audio-llm tiny` itself defaults to .*?\((\d+) layers x (\d+), MLP (\d+)", text
    )
    assert tiny, "docs/demo.md no longer gives `audio-llm tiny`'s default sizes"
    spec = TinySpec()
    assert spec.whisper_layers == spec.llm_layers and spec.whisper_d_model == spec.llm_hidden
    assert [int(g) for g in tiny.groups()] == [
        spec.llm_layers,
        spec.llm_hidden,
        spec.llm_intermediate,
    ]
