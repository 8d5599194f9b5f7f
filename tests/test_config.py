"""audio_llm.config: YAML/JSON files, overrides, validation errors, and the `config` command."""

import json

import pytest
import yaml

from audio_llm.cli import main
from audio_llm.config import DEFAULT_LORA_REGEX, Config, explain, load_config
from audio_llm.errors import AudioLLMError


def test_defaults_validate_and_stage_decides_lora():
    cfg = load_config()
    assert cfg.to_dict() == Config().to_dict()  # loading adds nothing to the defaults
    assert cfg.lora.target_regex == DEFAULT_LORA_REGEX
    assert not cfg.use_lora
    assert load_config(None, ["train.stage=2"]).use_lora


def test_yaml_file_then_overrides_win(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump({"train": {"lr": 0.5, "max_steps": 7}, "model": {"stack_factor": 2}})
    )
    cfg = load_config(path, ["train.lr=1e-4", "data.batch_size=3"])
    assert cfg.train.lr == pytest.approx(1e-4)  # "1e-4" is a string to YAML; coerced to float
    assert cfg.train.max_steps == 7
    assert cfg.model.stack_factor == 2
    assert cfg.data.batch_size == 3


def test_json_file(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"eval": {"every": 50, "normalizer": "whisper"}}))
    cfg = load_config(path)
    assert cfg.eval.every == 50 and cfg.eval.normalizer == "whisper"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.lrr=1"], "did you mean train.lr"),
        (["model.projector=conv"], "model.projector must be one of"),
        (["data.batch_size=x"], "data.batch_size must be an integer"),
        (["data.batch_size=0"], "data.batch_size must be >= 1"),
        (["model.stack_factor=0"], "model.stack_factor must be >= 1"),
        (["train.stage=3"], "train.stage must be one of"),
        (["lora.rank=0"], "lora.rank must be >= 1"),
        (["nonsense"], "must look like section.key=value"),
        (["train=1"], "train must be a mapping"),
    ],
)
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(AudioLLMError, match=message):
        load_config(None, overrides)


def test_missing_and_unparsable_files(tmp_path):
    with pytest.raises(AudioLLMError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(AudioLLMError, match="cannot parse"):
        load_config(bad)


def test_explain_documents_every_field():
    lines = explain()
    assert any(line.startswith("lora.target_regex = ") for line in lines)
    assert all("  # " in line and not line.endswith("# ") for line in lines)


def test_cli_prints_resolved_yaml(capsys):
    assert main(["config", "train.max_steps=12"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["max_steps"] == 12
    assert main(["config", "train.max_steps=zero"]) == 2
    assert "train.max_steps must be an integer" in capsys.readouterr().err


# -- data.train_shards as a weighted mixture ---------------------------------------------------
MIX = "data.train_shards=[{shards: /d/ls, weight: 0.8}, {shards: /d/cv/, weight: 0.2, name: cv2}]"


def test_train_shards_list_is_a_mixture_that_round_trips(tmp_path):
    cfg = load_config(None, [MIX])
    assert cfg.data.mixed
    assert [(s.name, s.weight) for s in cfg.data.sources()] == [("ls", 0.8), ("cv2", 0.2)]
    path = tmp_path / "run.yaml"  # the trainer writes config.yaml this way; resume reads it
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert load_config(path).data.sources() == cfg.data.sources()
    single = load_config(None, ["data.train_shards=/d/ls", "data.train_index=/i.json"]).data
    assert not single.mixed and single.train_shards == "/d/ls"  # a string stays a string
    assert [(s.shards, s.index, s.weight) for s in single.sources()] == [("/d/ls", "/i.json", 1)]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[{weight: 0.5}]", r"data.train_shards\[0\] has no 'shards'"),
        ("[{shards: a, weight: 1}, {shards: b, weight: 0}]", r"\[1\].weight must be a number > 0"),
        ("[{shards: a, weight: -1}]", r"\[0\].weight must be a number > 0"),
        ("[{shards: a, weight: .inf}]", r"\[0\].weight must be a number > 0"),
        ("[{shards: a, weight: x}]", r"\[0\].weight must be a number"),
        ("[{shards: a, weigth: 1}]", r"did you mean data.train_shards\[0\].weight"),
        ("[]", "empty list"),
        ("[a, b]", r"\[0\] must be a mapping"),
        ("{shards: a, weight: 1}", "must be a string or a list"),
        ("[{shards: x/a}, {shards: y/a}]", r"named \['a'\] more than once"),
        ("[{shards: a, name: 'no/slash'}]", "may hold only letters"),
    ],
)
def test_train_shards_list_errors_name_the_entry(value, message):
    with pytest.raises(AudioLLMError, match=message):
        load_config(None, [f"data.train_shards={value}"])


def test_train_index_with_a_list_is_refused():
    with pytest.raises(AudioLLMError, match="give each URL source its own 'index'"):
        load_config(None, [MIX, "data.train_index=/i.json"])


def test_explain_lists_the_source_fields():
    lines = explain()
    assert any(line.startswith("data.train_shards[].weight = 1.0") for line in lines)


def test_the_shipped_cluster_recipe_uses_the_fast_settings():
    """launch/configs/whisper-large-v3_qwen2-vl-2b.yaml is what users copy: the varlen encoder,
    length buckets under a token budget, checkpointing, no system turn, MFU from the GPU's name."""
    from pathlib import Path

    recipe = (
        Path(__file__).resolve().parent.parent / "launch/configs/whisper-large-v3_qwen2-vl-2b.yaml"
    )
    cfg = load_config(recipe)
    assert cfg.model.varlen_encoder and cfg.model.gradient_checkpointing
    assert cfg.data.bucket_by_length and cfg.data.max_batch_seconds >= 30
    assert cfg.data.pack_tokens >= cfg.data.max_length  # padding-free rows
    assert cfg.model.attn_implementation == "auto"  # flash-attention where it is installed
    assert cfg.model.system_prompt == ""
    assert cfg.train.peak_tflops == 0  # auto
