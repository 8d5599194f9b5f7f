import json
from pathlib import Path

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


# -- start-up path checks (train.trainer.check_start) ---------------------------------------
REPO = Path(__file__).resolve().parents[1]
SHARDS = REPO / "shards" / "sample" / "audio"


def run_paths(tiny_models, **sections) -> Config:
    base = {
        "model": {"encoder": str(tiny_models["whisper"]), "llm": str(tiny_models["qwen2vl"])},
        "data": {"train_shards": str(SHARDS)},
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return load_config(None, [f"{s}.{k}={v}" for s, kv in base.items() for k, v in kv.items()])


def test_the_default_deepspeed_config_is_found_from_another_folder(
    tiny_models, tmp_path, monkeypatch
):
    from audio_llm.train.trainer import check_start

    monkeypatch.chdir(tmp_path)
    found = check_start(run_paths(tiny_models), "ds_configs/zero2.json")
    assert found == REPO / "ds_configs" / "zero2.json"


def test_every_missing_path_is_named_in_one_error_before_any_model_loads(
    tiny_models, tmp_path, monkeypatch
):
    from audio_llm.train.trainer import check_start

    monkeypatch.chdir(tmp_path)
    (tmp_path / "not_a_model").mkdir()
    cfg = run_paths(
        tiny_models,
        model={"encoder": "/models/whisper-large-v3", "llm": str(tmp_path / "not_a_model")},
        data={"eval_shards": "/data/dev"},
        train={"stage": 2, "out_dir": str(tmp_path / "run")},
    )
    with pytest.raises(AudioLLMError) as error:
        check_start(cfg, "ds_configs/zero9.json", resume=str(tmp_path / "step_00000100"))
    message = str(error.value)
    assert message.startswith("6 problem(s) with the paths this run reads")
    for expected in (
        "DeepSpeed config 'ds_configs/zero9.json' does not exist",
        "model.encoder '/models/whisper-large-v3': no such folder",
        f"model.llm '{tmp_path / 'not_a_model'}': no config.json in it",
        "stage 2 starts from a stage-1 projector: set model.projector_init",
        "data.eval_shards: shards '/data/dev': no such file or folder",
        f"--resume: resume checkpoint '{tmp_path / 'step_00000100'}' does not exist",
        f"Relative paths are read from the working directory ({tmp_path})",
    ):
        assert expected in message, message
    cfg.model.projector_init = "runs/s1/export/projector.safetensors"
    with pytest.raises(AudioLLMError, match="model.projector_init 'runs/s1/export/projector"):
        check_start(cfg, "ds_configs/zero2.json")


def test_local_shards_named_by_a_pattern_must_exist(tiny_models, tmp_path):
    from audio_llm.train.trainer import check_start

    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "index.json").write_bytes((SHARDS / "index.json").read_bytes())
    (folder / "shard-000000.tar").write_bytes((SHARDS / "shard-000000.tar").read_bytes())
    spec = f"{folder}/shard-{{000000..000003}}.tar"
    with pytest.raises(AudioLLMError, match=r"data.train_shards: 3 shard\(s\) do not exist"):
        check_start(run_paths(tiny_models, data={"train_shards": spec}), "ds_configs/zero2.json")


def test_the_stage_script_fails_before_loading_a_model(tmp_path, monkeypatch, capsys):
    import audio_llm.train.trainer as train

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the paths were checked")

    monkeypatch.setattr(train, "build_audio_llm", no_model)
    monkeypatch.chdir(tmp_path)
    argv = ["model.encoder=/models/whisper", "model.llm=/models/qwen2vl"]
    argv += [f"data.train_shards={SHARDS}", "--deepspeed_config", "ds_configs/zero2.json"]
    assert train.stage_main(1, argv) == 2
    err = capsys.readouterr().err
    assert "stage 1: error: 2 problem(s)" in err
    assert "model.encoder '/models/whisper'" in err and "model.llm '/models/qwen2vl'" in err
    assert "DeepSpeed config" not in err  # the default resolved against the repository


def test_a_hub_id_is_left_to_from_pretrained_and_a_missing_folder_is_not():
    from audio_llm.train.trainer import _hub_id

    assert _hub_id("openai/whisper-large-v3") and _hub_id("Qwen/Qwen2-VL-2B-Instruct")
    assert not _hub_id("runs/demo/tiny/whisper")  # three parts: a path
    assert not _hub_id("./models/whisper") and not _hub_id("/models/whisper-large-v3")
