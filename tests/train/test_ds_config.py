"""train.ds_config and ds_configs/*.json: "auto" filling, consistency checks, CPU fallbacks."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from audio_llm.config import Config, DataConfig, ModelConfig, TrainConfig
from audio_llm.errors import AudioLLMError
from audio_llm.train.ds_config import build_ds_config, load_ds_json, resolve_ds_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "ds_configs"
SHIPPED = ["zero1", "zero2", "zero3", "zero3_offload"]


def run_cfg(**train) -> Config:
    return Config(
        model=ModelConfig(dtype="bfloat16"),
        data=DataConfig(batch_size=8),
        train=TrainConfig(**({"grad_accum": 2, "lr": 2e-4, "weight_decay": 0.01} | train)),
    )


def minimal(**fields) -> dict:
    base = {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}},
        "zero_optimization": {"stage": 2},
    }
    return base | fields


def test_auto_fields_come_from_the_run_config():
    ds = build_ds_config(minimal(), run_cfg(clip_grad=0.5), world_size=4, cuda=True)
    assert ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 8 * 2 * 4
    assert ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["params"] == {"lr": 2e-4, "weight_decay": 0.01}


def test_source_dict_is_not_modified():
    source = minimal()
    build_ds_config(source, run_cfg(), world_size=1, cuda=False)
    assert source == minimal()


def test_explicit_values_that_agree_are_kept():
    explicit = minimal(
        train_batch_size=32, train_micro_batch_size_per_gpu=8, gradient_accumulation_steps=2
    )
    assert build_ds_config(explicit, run_cfg(), world_size=2, cuda=True)["train_batch_size"] == 32


@pytest.mark.parametrize(
    ("fields", "names"),
    [
        ({"train_micro_batch_size_per_gpu": 16}, "data.batch_size"),
        ({"gradient_accumulation_steps": 4}, "train.grad_accum"),
        ({"train_batch_size": 48}, "world size 2"),
        ({"gradient_clipping": 5.0}, "train.clip_grad"),
    ],
)
def test_explicit_values_that_disagree_fail_in_one_line(fields, names):
    with pytest.raises(AudioLLMError, match=names) as err:
        build_ds_config(minimal(**fields), run_cfg(), world_size=2, cuda=True)
    assert "\n" not in str(err.value)


def test_explicit_optimizer_lr_must_match_train_lr():
    ds = minimal(optimizer={"type": "AdamW", "params": {"lr": 1e-3}})
    with pytest.raises(AudioLLMError, match=r"optimizer\.params\.lr.*train\.lr"):
        build_ds_config(ds, run_cfg(), world_size=1, cuda=True)


def test_a_deepspeed_scheduler_section_is_refused():
    with pytest.raises(AudioLLMError, match="train.schedule"):
        build_ds_config(minimal(scheduler={"type": "WarmupLR"}), run_cfg(), 1, cuda=True)


def test_unfillable_auto_is_named():
    ds = minimal(zero_optimization={"stage": 3, "reduce_bucket_size": "auto"})
    with pytest.raises(AudioLLMError, match=r"zero_optimization\.reduce_bucket_size"):
        build_ds_config(ds, run_cfg(), world_size=1, cuda=True)


def test_precision_must_match_model_dtype():
    fp16_model = Config(model=ModelConfig(dtype="float16"))
    with pytest.raises(AudioLLMError, match="model.dtype=float16"):
        build_ds_config(minimal(bf16={"enabled": True}), fp16_model, 1, cuda=True)
    with pytest.raises(AudioLLMError, match="both enabled"):
        both = minimal(bf16={"enabled": True}, fp16={"enabled": True})
        build_ds_config(both, run_cfg(), 1, cuda=True)
    auto = minimal(bf16={"enabled": "auto"}, fp16={"enabled": "auto"})
    ds = build_ds_config(auto, fp16_model, 1, cuda=True)
    assert (ds["bf16"]["enabled"], ds["fp16"]["enabled"]) == (False, True)


def test_cpu_run_switches_off_half_precision_offload_and_fused_adam(caplog):
    with caplog.at_level(logging.WARNING, logger="audio_llm.train.ds_config"):
        ds = build_ds_config(CONFIGS / "zero3_offload.json", run_cfg(), world_size=1, cuda=False)
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    assert ds["optimizer"]["params"]["torch_adam"] is True
    assert "offload_optimizer" not in ds["zero_optimization"]
    assert "offload_param" not in ds["zero_optimization"]
    text = caplog.text
    assert "bf16/fp16 switched off" in text and "offload_param" in text and "torch_adam" in text


def test_gpu_run_keeps_the_file_as_written():
    ds = build_ds_config(CONFIGS / "zero3_offload.json", run_cfg(), world_size=8, cuda=True)
    assert ds["bf16"]["enabled"] is True
    assert "torch_adam" not in ds["optimizer"]["params"]
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"


def test_offload_checks():
    nvme = minimal(zero_optimization={"stage": 3, "offload_param": {"device": "nvme"}})
    with pytest.raises(AudioLLMError, match="nvme_path"):
        build_ds_config(nvme, run_cfg(), 1, cuda=True)
    params_stage2 = minimal(zero_optimization={"stage": 2, "offload_param": {"device": "cpu"}})
    with pytest.raises(AudioLLMError, match="needs stage 3"):
        build_ds_config(params_stage2, run_cfg(), 1, cuda=True)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(AudioLLMError, match="does not exist"):
        load_ds_json(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    with pytest.raises(AudioLLMError, match="not valid JSON"):
        load_ds_json(bad)


def test_the_default_relative_path_works_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_ds_config("ds_configs/zero2.json") == CONFIGS / "zero2.json"
    assert load_ds_json("ds_configs/zero2.json") == load_ds_json(CONFIGS / "zero2.json")
    assert build_ds_config("ds_configs/zero3.json", run_cfg(), 1, cuda=True)["zero_optimization"]
    # a file of that name in the working directory wins
    (tmp_path / "ds_configs").mkdir()
    (tmp_path / "ds_configs" / "zero2.json").write_text(json.dumps(minimal()))
    assert resolve_ds_config("ds_configs/zero2.json") == Path("ds_configs/zero2.json")
    assert load_ds_json("ds_configs/zero2.json") == minimal()


def test_a_missing_config_names_every_place_looked_and_a_shipped_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_ds_config("ds_configs/zero9.json") is None
    assert resolve_ds_config(tmp_path / "zero2.json") is None  # absolute: only where it says
    with pytest.raises(AudioLLMError) as error:
        load_ds_json("ds_configs/zero9.json")
    message = str(error.value)
    assert str(tmp_path / "ds_configs" / "zero9.json") in message
    assert str(CONFIGS / "zero9.json") in message
    assert f"such as {CONFIGS / 'zero2.json'}" in message


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs(name):
    raw = load_ds_json(CONFIGS / f"{name}.json")
    stage = {"zero1": 1, "zero2": 2, "zero3": 3, "zero3_offload": 3}[name]
    assert raw["zero_optimization"]["stage"] == stage
    assert raw["bf16"]["enabled"] is True
    assert raw["optimizer"]["type"] == "AdamW"
    assert raw["optimizer"]["params"]["lr"] == "auto"
    assert raw["train_batch_size"] == raw["gradient_clipping"] == "auto"
    assert raw["steps_per_print"] >= 10**6 and raw["wall_clock_breakdown"] is False
    assert ("offload_optimizer" in raw["zero_optimization"]) == (name == "zero3_offload")
    if stage == 3:
        assert raw["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    for cuda in (True, False):
        build_ds_config(CONFIGS / f"{name}.json", run_cfg(), world_size=2, cuda=cuda)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_turn_the_synchronised_throughput_timer_off(name):
    """DeepSpeed's throughput timer synchronises the device twice a micro-batch when on (its
    default); the shipped files turn it off, as DeepSpeed's own parser reads them. Its config
    models forbid unknown keys, so a misspelt ZeRO key fails here too."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from deepspeed.utils.config import get_timers_config

    raw = load_ds_json(CONFIGS / f"{name}.json")
    timers = get_timers_config(raw)
    assert timers.enabled is False and timers.synchronized is False
    DeepSpeedZeroConfig(**raw["zero_optimization"])


@pytest.mark.parametrize("name", SHIPPED)
def test_gradient_buckets_are_sized_for_lora_not_the_whole_model(name):
    """With ~29M trainable parameters (LoRA r16 on Qwen2-VL-2B: 18.5M, plus the projector), a bucket
    larger than the LoRA weights alone holds every gradient: nothing is reduced before the
    backward ends, so communication cannot overlap it."""
    from audio_llm.model.arch import resolve_config
    from audio_llm.planning.flops import lora_params

    zero = load_ds_json(CONFIGS / f"{name}.json")["zero_optimization"]
    lora = lora_params(resolve_config("qwen2-vl-2b"), 16)
    assert zero["reduce_bucket_size"] * 2 <= lora
    assert zero.get("allgather_bucket_size", 0) * 2 <= lora


def test_zero3_keeps_the_frozen_2b_base_resident():
    """ZeRO-3 partitions frozen parameters too and gathers them for every forward and backward
    unless they are persistent: every tensor of whisper-large-v3 + Qwen2-VL-2B must fall under
    the per-tensor threshold, and all of them together under the model-wide cap."""
    from audio_llm.model.lora import meta_model

    zero = load_ds_json(CONFIGS / "zero3.json")["zero_optimization"]
    model = meta_model("whisper-large-v3", "qwen2-vl-2b")
    sizes = [p.numel() for p in model.parameters()]
    assert max(sizes) <= zero["stage3_param_persistence_threshold"]
    assert sum(sizes) <= zero["stage3_model_persistence_threshold"]
    # offloading keeps parameters on the CPU: persistence would pull them back to the GPU
    offload = load_ds_json(CONFIGS / "zero3_offload.json")["zero_optimization"]
    assert offload["stage3_param_persistence_threshold"] <= 10**6


@pytest.mark.parametrize("name", SHIPPED)
def test_the_synchronised_throughput_timer_is_off_unless_a_config_asks(name):
    """DeepSpeed's throughput timer synchronises the device twice a micro-batch by default."""
    source = load_ds_json(CONFIGS / f"{name}.json")
    ds = build_ds_config(source, run_cfg(), world_size=1, cuda=True)
    assert ds["timers"]["throughput"] == {"enabled": False, "synchronized": False}
    asked = {**source, "timers": {"throughput": {"enabled": True, "synchronized": False}}}
    ds = build_ds_config(asked, run_cfg(), world_size=1, cuda=True)
    assert ds["timers"]["throughput"] == {"enabled": True, "synchronized": False}
