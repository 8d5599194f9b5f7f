"""demo.run's recipes (config files the demo runs as they are) and its reuse of work: tiny models,
reading pretraining and shards are built once per setting (the demo itself, end to end, is in
tests/integration/test_demo.py)."""

import json
import sys
import time

import pytest

from audio_llm.config import load_config
from audio_llm.demo import pretrained
from audio_llm.demo import run as demo

# The keys in which a recipe's stage-1 file may differ from its stage-2 file; the rest is shared.
STAGE_KEYS = {
    "train.stage",
    "train.max_steps",
    "train.out_dir",
    "model.projector_init",
    "eval.every",
    "eval.at_start",
    "eval.num_beams",
}
PATH_KEYS = (
    "model.encoder",
    "model.llm",
    "model.projector_init",
    "data.train_shards",
    "data.eval_shards",
    "train.out_dir",
)


def _flat(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _default_run(encoder: str) -> tuple:
    """The arguments, folder and models of `python -m audio_llm.demo` with no flags."""
    args = demo._parser().parse_args([])
    out = demo.REPO / args.out
    models = {"whisper": out / "tiny" / "whisper", "qwen2vl": out / "tiny" / "qwen2vl"}
    if encoder == "pretrained whisper-tiny.en":
        models["whisper"] = demo.PRETRAINED_CACHE / pretrained.CHECKPOINT
    return args, out, models


@pytest.mark.parametrize("stage", demo.STAGES)
@pytest.mark.parametrize("encoder", sorted(demo.RECIPES))
def test_the_demos_effective_config_is_its_recipe_file(encoder, stage):
    file = demo.recipe_file(encoder, stage)
    expected = _flat(load_config(file).to_dict())  # as `launch/<stage>.py --config` reads it
    for key in PATH_KEYS:  # the file's paths are relative to the repository top
        if expected[key]:
            expected[key] = str(demo.REPO / expected[key])
    args, out, models = _default_run(encoder)
    got = _flat(demo.effective_config(args, out, models, encoder, stage).to_dict())
    assert got == expected
    assert got["train.stage"] == demo.STAGES.index(stage) + 1


@pytest.mark.parametrize("encoder", sorted(demo.RECIPES))
def test_a_recipes_two_stage_files_share_everything_but_the_stage_keys(encoder):
    one, two = (_flat(load_config(demo.recipe_file(encoder, s)).to_dict()) for s in demo.STAGES)
    assert {key for key in one if one[key] != two[key]} <= STAGE_KEYS
    assert (
        two["model.projector_init"] == str(one["train.out_dir"]) + "/export/projector.safetensors"
    )


def test_the_flags_override_the_recipe_and_set_comes_last():
    encoder = "pretrained whisper-tiny.en"
    _, out, models = _default_run(encoder)
    flags = ["--stage2-steps", "7", "--beams", "2", "--ctc-weight", "0.2", "--seed", "3"]
    args = demo._parser().parse_args([*flags, "--set", "train.max_steps=9", "--set", "lora.rank=8"])
    one, two = (demo.effective_config(args, out, models, encoder, s) for s in demo.STAGES)
    recipe_one = load_config(demo.recipe_file(encoder, "stage1"))
    assert (two.train.max_steps, one.train.max_steps) == (9, 9)  # --set wins over the flags
    assert two.eval.num_beams == 2 and one.eval.num_beams == recipe_one.eval.num_beams
    assert one.eval.ctc_weight == two.eval.ctc_weight == 0.2
    assert one.train.seed == two.data.seed == 3 and two.lora.rank == 8
    assert two.train.lr == recipe_one.train.lr  # --stage2-lr unset: the file's


def test_tiny_models_and_reading_are_built_once_per_setting(tmp_path, monkeypatch):
    import argparse

    from audio_llm.demo.run import _tiny_models

    args = argparse.Namespace(reading_steps=3, seed=0, fresh=False)
    paths, first = _tiny_models(tmp_path / "tiny", args)
    assert not first["reused"] and (paths["qwen2vl"] / "config.json").is_file()
    stamp = (paths["qwen2vl"] / "model.safetensors").stat().st_mtime_ns
    _, again = _tiny_models(tmp_path / "tiny", args)
    assert again["reused"] and again["reading_seconds"] == first["reading_seconds"]
    assert (paths["qwen2vl"] / "model.safetensors").stat().st_mtime_ns == stamp
    # a new encoder setting rebuilds Whisper only: no second reading pretraining
    whisper_stamp = (paths["whisper"] / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr("audio_llm.demo.run.WHISPER_PASSTHROUGH", 0.5)
    _, encoder_only = _tiny_models(tmp_path / "tiny", args)
    assert encoder_only["reused"]
    assert (paths["qwen2vl"] / "model.safetensors").stat().st_mtime_ns == stamp
    assert (paths["whisper"] / "model.safetensors").stat().st_mtime_ns != whisper_stamp
    _, changed = _tiny_models(tmp_path / "tiny", argparse.Namespace(**{**vars(args), "seed": 1}))
    assert not changed["reused"]
    _, fresh = _tiny_models(tmp_path / "tiny", argparse.Namespace(**{**vars(args), "fresh": True}))
    assert not fresh["reused"]


def test_shards_are_reused_only_for_the_same_encoder(tmp_path, tiny_models):
    from audio_llm.demo.run import _shards_match
    from audio_llm.model.encoder import encoder_identity, load_whisper_encoder

    whisper = load_whisper_encoder(tiny_models["whisper"])
    wanted = encoder_identity(whisper, tiny_models["whisper"], varlen=True)
    index = tmp_path / "index.json"
    assert not _shards_match(index, wanted)  # nothing packed yet
    packed = encoder_identity(whisper, "packed/elsewhere", varlen=True)
    index.write_text(json.dumps({"encoder": packed}))
    assert _shards_match(index, wanted)  # the path it was packed from may differ
    index.write_text(json.dumps({"encoder": {**packed, "weights_sha256": "0" * 16}}))
    assert not _shards_match(index, wanted)  # another encoder's outputs
    index.write_text(json.dumps({"encoder": {**packed, "varlen": False}}))
    assert not _shards_match(index, wanted)  # the 30 s window
    # the demo asks for the dtype it packs in: shards from a float32 pack (or from before the
    # index recorded it) are packed again
    wanted_bf16 = {**wanted, "dtype": "bfloat16"}
    index.write_text(json.dumps({"encoder": packed}))
    assert not _shards_match(index, wanted_bf16)
    index.write_text(json.dumps({"encoder": {**packed, "dtype": "float32"}}))
    assert not _shards_match(index, wanted_bf16)
    index.write_text(json.dumps({"encoder": {**packed, "dtype": "bfloat16"}}))
    assert _shards_match(index, wanted_bf16)


def test_the_demo_echoes_the_packs_progress_lines():
    """`make demo` shows the pack phase's progress: PROGRESS matches the line `audio-llm pack`
    writes to a log (not a terminal), and the trainer's step lines still."""
    import io

    from audio_llm.demo.run import PROGRESS
    from audio_llm.pack.progress import PackProgress

    now = [0.0]
    progress = PackProgress(5000, stream=io.StringIO(), interval=1e9, clock=lambda: now[0])
    progress.update(1200)
    now[0] = 40.0  # 1200 clips in 40 s
    line = progress.line()
    assert line == "pack: 1200/5000 clips (24.0%), 30.0 clips/s, ETA 2:07"
    assert PROGRESS.search(f"2026 INFO {line}").group(0) == line
    assert PROGRESS.search("x | step 30/100 (30%) loss 1.2").group(0).startswith("step 30/100")
    assert PROGRESS.search("pack: wrote shard-000001.tar") is None
    # the demo packs in parts side by side, and echoes the first part's lines
    parted = PackProgress(2500, stream=io.StringIO(), interval=1e9, label="pack part 0/2")
    assert PROGRESS.search(parted.line()).group(0) == parted.line()


def test_the_demo_echoes_each_test_sets_wer_line():
    """Both test sets are scored in one `audio-llm eval` launch; each headline names its set."""
    from audio_llm.demo.run import RESULT

    for line in (
        "WER 2.23% over 400 of 400 indexed utterances",
        "test_seen_voices: WER 2.23% over 400 of 400 indexed utterances",
        "step 100: eval WER 58.64% over 400 of 400 indexed utterances",
    ):
        assert RESULT.search(f"{line}\n").group(0) == line
    assert RESULT.search("mean per-utterance WER 2.16% over 400 utterances") is None


def test_pack_parts_run_side_by_side_and_a_failing_part_stops_the_demo(tmp_path):
    """`_run_parts` starts every part before waiting on any, and a part that fails stops the
    demo with its log's tail, after stopping the parts still running."""
    from audio_llm.demo.run import _run_parts

    stamp = "import sys, time; open(sys.argv[1], 'w').write(str(time.time())); time.sleep(1)"
    logs = [tmp_path / f"part{i}.log" for i in range(3)]
    cmds = [[sys.executable, "-c", stamp, str(tmp_path / f"t{i}")] for i in range(3)]
    began = time.time()
    _run_parts(cmds, logs)
    starts = [float((tmp_path / f"t{i}").read_text()) for i in range(3)]
    assert max(starts) - min(starts) < 0.9  # not one after the other (each sleeps 1 s)
    assert time.time() - began < 2.9
    failing = [sys.executable, "-c", "import sys; print('part 1 broke'); sys.exit(3)"]
    slow = [sys.executable, "-c", "import time; time.sleep(60)"]
    with pytest.raises(SystemExit, match="part 1 broke"):
        _run_parts([cmds[0], failing], logs[:2])
    with pytest.raises(SystemExit, match="part 1 broke"):
        _run_parts([failing, slow], logs[:2])  # the first part's failure, the slow one killed
