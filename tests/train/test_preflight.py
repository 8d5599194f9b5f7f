"""train.preflight's start-up checks (`check_start`): every path a run reads is checked, and named,
before any model loads."""

import json
from pathlib import Path

import pytest

from audio_llm.config import Config, load_config
from audio_llm.errors import AudioLLMError

REPO = Path(__file__).resolve().parents[2]
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
    from audio_llm.train.preflight import check_start

    monkeypatch.chdir(tmp_path)
    found = check_start(run_paths(tiny_models), "ds_configs/zero2.json")
    assert found == REPO / "ds_configs" / "zero2.json"


def test_every_missing_path_is_named_in_one_error_before_any_model_loads(
    tiny_models, tmp_path, monkeypatch
):
    from audio_llm.train.preflight import check_start

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
    from audio_llm.train.preflight import check_start

    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "index.json").write_bytes((SHARDS / "index.json").read_bytes())
    (folder / "shard-000000.tar").write_bytes((SHARDS / "shard-000000.tar").read_bytes())
    spec = f"{folder}/shard-{{000000..000003}}.tar"
    with pytest.raises(AudioLLMError, match=r"data.train_shards: 3 shard\(s\) do not exist"):
        check_start(run_paths(tiny_models, data={"train_shards": spec}), "ds_configs/zero2.json")


def test_each_source_of_a_mixture_is_checked_and_named(tiny_models, tmp_path):
    from audio_llm.train.preflight import check_start

    sources = f"[{{shards: {SHARDS}, weight: 0.8}}, {{shards: {tmp_path}/gone, weight: 0.2}}]"
    cfg = run_paths(tiny_models, data={"train_shards": sources})
    with pytest.raises(AudioLLMError, match=r"1 problem") as error:
        check_start(cfg, "ds_configs/zero2.json")
    assert "data.train_shards[1] (gone): shards" in str(error.value)
    assert "data.train_shards[0]" not in str(error.value)
    mel = tmp_path / "mel"  # an index that says mel: the sources would need two collators
    mel.mkdir()
    (mel / "shard-000000.tar").write_bytes((SHARDS / "shard-000000.tar").read_bytes())
    entry = {"name": "shard-000000.tar", "samples": 6, "seconds": 9.0}
    index = {"format_version": 1, "mode": "mel", "features": {}, "shards": [entry]}
    (mel / "index.json").write_text(json.dumps(index))
    sources = f"[{{shards: {SHARDS}}}, {{shards: {mel}}}]"
    with pytest.raises(AudioLLMError, match="mixes packing modes"):
        check_start(run_paths(tiny_models, data={"train_shards": sources}), "ds_configs/zero2.json")


def test_the_stage_script_fails_before_loading_a_model(tmp_path, monkeypatch, capsys):
    import audio_llm.train.run as train
    from audio_llm.cli.stage import stage_main

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the paths were checked")

    monkeypatch.setattr(train, "build_audio_llm", no_model)
    monkeypatch.chdir(tmp_path)
    argv = ["model.encoder=/models/whisper", "model.llm=/models/qwen2vl"]
    argv += [f"data.train_shards={SHARDS}", "--deepspeed_config", "ds_configs/zero2.json"]
    assert stage_main(1, argv) == 2
    err = capsys.readouterr().err
    assert "stage 1: error: 2 problem(s)" in err
    assert "model.encoder '/models/whisper'" in err and "model.llm '/models/qwen2vl'" in err
    assert "DeepSpeed config" not in err  # the default resolved against the repository


def test_a_hub_id_is_left_to_from_pretrained_and_a_missing_folder_is_not():
    from audio_llm.train.preflight import _hub_id

    assert _hub_id("openai/whisper-large-v3") and _hub_id("Qwen/Qwen2-VL-2B-Instruct")
    assert not _hub_id("runs/demo/tiny/whisper")  # three parts: a path
    assert not _hub_id("./models/whisper") and not _hub_id("/models/whisper-large-v3")


def test_unset_model_folders_are_named_not_read_as_the_working_directory(tmp_path, monkeypatch):
    # The defaults name no checkpoint (they used to point at the demo's runs/tiny): an empty
    # value would be Path("") == ".", a folder that exists, so it must be caught by name.
    from audio_llm.train.preflight import check_start

    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, [f"data.train_shards={SHARDS}"])
    with pytest.raises(AudioLLMError) as error:
        check_start(cfg, "ds_configs/zero2.json")
    message = str(error.value)
    assert message.startswith("2 problem(s)")
    assert "model.encoder is not set: name a local checkpoint folder" in message
    assert "model.llm is not set" in message
